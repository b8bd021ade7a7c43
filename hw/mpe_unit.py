"""The matrix engine as a kernel unit: MV, MM, QK and PV on the buffers and the weight channels.

:class:`MpeUnit` executes the MPE's queue entries (``docs/kernel.md``: issue / done / busy /
abort / fault, and ``mpe_tok`` for the compute-phase waits) on the
:class:`~flightllm.hw.mpe.MatrixEngine`, exactly as the golden model's ``_MV``/``_MM`` and
``_attention`` (QK, PV) handlers define them::

  issue --> MpeDecode --fetch desc--> [FIFO] --> fetch sequencer --cmd--> BurstReader c --> words{c} --+
                 |                                 (every channel)   (stream_fifo_beats)              |
                 +----comp desc--> [FIFO] --> loader: mpe_tok, activations (port ld) --act--> MatrixEngine
                                                 |  s1 table (row scales)            cfg -->          |
                                                 +--pass desc--> [FIFO] --> out side <---- out -------+
                                                                     |   KS prefetch (port out, QK)
                                                                     +--> MpeOutLane x NL --> writes (port out) --> done

Decode (:class:`MpeDecode`, :func:`mpe_decode` is the same in Python). A queue entry becomes
two descriptors: what the weight streamers fetch and what the compute side does, every
count computed with shifts from the fields and the entry's register values (the engine's
``cfg`` fields as :func:`~flightllm.hw.mpe.mpe_config` computes them; the streamed KV records
as :meth:`~flightllm.hw.kvcache.KvLayout.stream` counts them). One product each for the
records, the token count and the head offsets; no divider: the tokens per pass are
counted up in a loop of at most ``mm_tokens`` cycles.

* MV / MM: ``rows = R[rows_reg]`` (MV: 1), the tensor at ``w_off`` in every channel, one
  command of ``words`` beats per pass; the activations are the ``K`` int8 elements of each
  row of ``src`` with their group factors (QUANTG's: factor ``g`` is entry ``g`` of the
  row's factor row) and the row's scale ``A`` (entry 0 of its scale row); results
  ``float32(acc) * float32(ldexp(A, -shift))`` into elements ``0 .. N-1`` of row ``t`` of
  ``dst``.
* QK: ``T = rows`` token rows x ``rep`` query heads ``h0 = kvh * rep ..`` as the engine's
  tokens (``h`` fastest), each the ``head_dim`` int8 elements ``(h0 + h) * head_dim ..`` of
  its row of ``src`` (QQ), factors 1, scale: entry ``h0 + h`` of the row's scale row; the
  "weight" is kv head ``kvh``'s K cache (rows = positions) at ``kv_off * 64``, streaming only
  the row tiles (``chains`` positions) that hold an attended position; score ``(float32(acc)
  * q_scale) * k_scale[p]`` (the key scale of position ``p``: word ``p / L`` of row ``kvh`` of
  the transposed ``aux``) into element ``(h0 + h) * cap + p`` of row ``t`` of ``dst`` (S) for
  every position ``p < n`` of a streamed tile, ``n = R[len_reg] + len_add + T - 1``.
* PV: tokens as QK; the weight is the transposed V cache (rows = head dims), streaming of
  every row tile the groups of 32 positions holding an attended position; the activations
  are the probabilities of those groups (elements ``(h0 + h) * cap + p`` of the row of
  ``src`` (PQ), factor ``p / 32`` of the head's factors at ``(h0 + h) * ceil(cap / 32 / L)``
  words of the factor row, scale entry ``h0 + h``); output ``float32(acc) * scale`` into
  elements ``(h0 + h) * head_dim ..`` of row ``t`` of ``dst`` (A).

The attended positions of all rows together (``runtime/sfu.attention_mask``) are at most two
ranges: ``[0, min(sink * 64, n))`` and ``[64 * max(block(valid0 - 1) - window + 1, 0), n)``
(``valid0 = R[len_reg] + len_add``, the first row's length; dense: ``[0, n)``), so a fetch is
one or two commands per channel (PV: per row tile).

Fetch. In MPE program order, each descriptor's commands go to every channel's
:class:`~flightllm.hw.axi.BurstReader` (``fifo_depth = stream_fifo_beats``), whose data FIFO
is the stream FIFO of the ISA's rule 2: weights (and KV records) stream ahead of compute
as far as the FIFOs have room. Addresses start at 0 in every channel (the kernel adds the
channel's pointer). A pass of an MM repeats the tensor's command (``passes = ceil(tokens /
tokens per pass)``).

Compute. Per instruction the loader presents ``wait & COMPUTE_WAITS`` on ``mpe_tok`` (when
nonzero) and, once control accepts it, runs its passes: a pass holds ``min(mm_tokens, half /
stride)`` tokens in one half of the engine's activation buffer (ping-pong: the next pass
loads while the engine runs the last). The loader hands the engine the pass's ``cfg`` first
(the engine runs in its ``overlap`` mode: its dequant units refill from the prefetched words
meanwhile), then reads the tokens' int8 words (one buffer read per activation word, or
``chain_len / sfu_lanes`` reads; factor words once per ``sfu_lanes`` groups) and scales (into
a table; MV/MM: ``A * 2^-shift`` by one FMul) and pulses ``act_done`` when the last word is
written. The engine starts the pass right after the previous one's last issue when both
have the same token count (else after its drain). The out side takes the engine's
accumulators ``NL = min(chains, sfu_lanes)`` at a time (``chains / NL`` chunks per beat)
through ``NL`` :class:`~flightllm.hw.mpe_out.MpeOutLane` into buffer writes (a lane mask
covers rows past ``N``, positions ``>= n``, dims past ``head_dim``; QK's key scales are read
a tile ahead); an instruction is ``done`` when its last write has landed (``wr_done``).

Cycles (``sim/test_mpe_unit.py::test_cycles``, Verilator, AXI memories at the golden model's
sustained channel rate). Back to back, an operation occupies the unit for the golden model's
issue time ``max(compute, fetch)`` within 0-8 cycles (u280's per-channel geometry: 0-4);
operations of a few dozen cycles cost ~15-18 more (the dequant units' refill per operation,
and MV/MM row tiles padded to ``chains`` rows, which the model does not count). After its
compute-phase token an instruction's results land after the activation load (``tokens x
(K / sfu_lanes + 1)`` cycles and a factor read per ``sfu_lanes`` groups), the work, the
engine's latency and the output path (24 cycles of MpeOutLane, ~6 of writes): the golden
model charges each (``runtime/timing.py``: ``act_cycles``, ``mpe_latency``,
``mpe_out_latency``), and ``test_cycles`` checks it within 5% (within a cycle for single-pass
operations on ``sim``).

Faults (``fault``, held until ``abort``): an MV/MM format not in the build, ``N`` or ``K``
zero or ``K`` not whole groups, ``shift > 25``, an MV with ``rows != 1``, a ``w_off`` that is
not a whole port word; QK/PV in a KV format not in the build, ``rows`` 0 or rows attending
outside ``1 .. cap``, ``rep`` 0, ``head_dim`` or ``cap`` not whole groups of 32 (or of ``NL``
where a result row starts); and for all, buffers that do not hold the operands or results
(``src`` not int8, ``dst`` not a float32 row buffer, rows, widths or heads past the
buffers), or an activation vector larger than half the activation buffer.

Abort: every stream the unit drives stops (valid and ready gated); the readers finish the
bursts of the commands they already hold (their data is dropped); when they are idle and
no buffer read is outstanding, the unit resets (``busy`` falls).
"""

from __future__ import annotations

from amaranth import Array, Cat, Const, Module, Mux, ResetInserter, Signal, signed, unsigned
from amaranth.lib import data, fifo, stream, wiring
from amaranth.lib.wiring import In, Out

from .axi import BEATS_BITS, BurstReader, axi4_signature, command_layout
from .buffers import Reach, buf_regions, buffer_map, port_signature
from .control import COMPUTE_WAITS, PC_BITS, entry_layout
from .formats import E0_MAX, WeightFormat
from .fp32 import FMul
from .geometry import EngineGeometry, delay
from .isa import _FIELDS, AttnFmt, Buf, Opcode, WeightFmt
from .kvcache import KV_GROUP
from .mpe import TILE_BITS, MatrixEngine, act_layout, mpe_cfg_layout, mpe_config
from .mpe_out import MpeOutLane
from .params import HwParams
from ..runtime.sfu import KV_BLOCK

__all__ = ["MpeUnit", "MpeDecode", "MpeFault", "mpe_decode", "fetch_layout", "comp_layout", "UnitGeometry",
           "KIND_W", "KIND_QK", "KIND_PV"]

KIND_W, KIND_QK, KIND_PV = 0, 1, 2          #: MV/MM, QK, PV
_ONE = 0x3F800000                           #: float32 1.0
_TRANSPOSED = (Buf.KS, Buf.VS)              #: stored one row per kv head (buffers.py)
_DEC_OPS = (Opcode.MV, Opcode.MM, Opcode.QK, Opcode.PV)


def _lg(v: int) -> int:
    if v <= 0 or v & (v - 1):
        raise ValueError(f"{v} is not a power of two")
    return v.bit_length() - 1


class MpeFault(ValueError):
    """An MPE instruction the unit cannot execute (the unit's ``fault``, BAD_FIELD)."""


class UnitGeometry:
    """The sizes the unit is built from (``params``): the engine's, the buffers', and the
    constants of the build's formats the decode needs."""

    def __init__(self, params: HwParams):
        self.p = p = params
        self.geom = g = EngineGeometry(params)
        self.R, self.L, self.C, self.W = g.R, g.L, g.C, g.W
        self.Ls = p.sfu_lanes
        self.NL = min(self.R, self.Ls)
        self.NB = g.act_banks
        self.T = g.tokens_max
        self.act_words = g.act_words
        self.half = g.act_words // 2
        for name, v in (("chains", self.R), ("chain_len", self.L), ("sfu_lanes", self.Ls),
                        ("hbm_port_bits", self.W), ("act banks", self.NB)):
            _lg(v)
        if self.L > KV_GROUP:
            raise ValueError(f"MpeUnit: chain_len {self.L} above the KV group {KV_GROUP}")
        if self.W > 512:
            raise ValueError(f"MpeUnit: hbm_port_bits {self.W}: KV regions (64-byte units) are not word-aligned")
        self.regions = buffer_map(params)
        self.by_id = sorted(self.regions.values(), key=lambda r: r.id)
        self.weight = [f for f in g.formats if not f.raw]           # (code, fmt, ...) FormatInfo
        self.kv = {}
        for f in g.formats:
            if f.raw:
                if f.record_bits % self.W or f.record_bits % 8:
                    raise ValueError(f"MpeUnit: {f.fmt.name} records ({f.record_bits} bits) are not whole "
                                     f"{self.W}-bit words")
                self.kv[f.fmt.bits] = f
        # widths of the descriptors
        self.EW = max(max(r.width for r in self.regions.values()), p.act_buf_depth, 1 << 16).bit_length() + 1
        self.WB = max(r.words for r in self.regions.values()).bit_length() + 1

    def region(self, b):
        return self.regions[Buf(b).name]

    def is_i8(self, b) -> bool:
        return b in [x.value for x in Buf] and Buf(b).name + ".factor" in self.regions

    def is_f32row(self, b) -> bool:
        return (b in [x.value for x in Buf] and Buf(b) not in _TRANSPOSED and self.region(b).bits == 32)

    def is_trans(self, b) -> bool:
        return b in [x.value for x in _TRANSPOSED]

    def side(self, b, kind):
        return self.regions[Buf(b).name + "." + kind]


def fetch_layout(ug: UnitGeometry) -> data.StructLayout:
    """What the weight streamers read for one instruction: per pass, per outer step ``j <
    outer`` (PV: the V cache's row tiles), the commands ``(base + j * ostride + off0, beats0)``
    and, if ``beats1``, ``(base + j * ostride + off1, beats1)``; passes while tokens remain."""
    return data.StructLayout({
        "base": unsigned(40), "off0": unsigned(32), "beats0": unsigned(BEATS_BITS),
        "off1": unsigned(32), "beats1": unsigned(BEATS_BITS), "outer": unsigned(12), "ostride": unsigned(24),
        "ntok": unsigned(16), "tpp": range(ug.T + 1)})


def comp_layout(ug: UnitGeometry) -> data.StructLayout:
    """The compute side of one instruction (module docstring): the engine's cfg fields (but
    ``tokens`` and ``act_base``, per pass), the tokens and their cursor (row ``t``, head
    ``h``: ``e_base`` / ``f_base`` / ``s_base`` / ``o_base`` start at ``*_base0`` and step by
    ``*_step`` with ``h``), the activation element ranges of a token (relative to its
    ``e_base``), the factor group, the output limit and the tile map (tile ``k`` of a pass
    is row tile ``t_s0 + k`` for ``k < t_n0``, else ``t_s1 + k - t_n0``)."""
    cfg = mpe_cfg_layout(ug.geom)
    EW = ug.EW
    return data.StructLayout({
        "kind": 2, "wait": 4, "empty": 1,
        "fmt": cfg["fmt"].shape, "e0": cfg["e0"].shape, "tiles": cfg["tiles"].shape,
        "groups": cfg["groups"].shape, "stride": cfg["stride"].shape, "records": cfg["records"].shape,
        "words": cfg["words"].shape,
        "ntok": unsigned(16), "tpp": range(ug.T + 1), "rep": unsigned(6),
        "src": unsigned(5), "dst": unsigned(5), "aux": unsigned(5), "shift": unsigned(5), "kvh": unsigned(8),
        "e_base0": unsigned(EW), "e_step": unsigned(17), "e_off0": unsigned(EW), "e_len0": unsigned(EW),
        "e_off1": unsigned(EW), "e_len1": unsigned(EW),
        "f_on": 1, "f_base0": unsigned(EW), "f_step": unsigned(17), "lg_fg": unsigned(4),
        "s_base0": unsigned(14), "s_step": 1,
        "o_base0": unsigned(EW), "o_step": unsigned(17), "nlim": unsigned(EW),
        "t_s0": unsigned(TILE_BITS), "t_n0": unsigned(TILE_BITS), "t_s1": unsigned(TILE_BITS),
    })


# ---------------------------------------------------------------------------------------------
# decode, in Python (the model the RTL decode is tested against)
def _fields(word: int, fmt) -> dict:
    out = {}
    for name, (off, width, shape) in _FIELDS[fmt].items():
        v = (word >> off) & ((1 << width) - 1)
        if not isinstance(shape, type) and getattr(shape, "signed", False) and v >> (width - 1):
            v -= 1 << width
        out[name] = v
    return out


def _ranges(ug, valid0, n, sink, window, unit):
    """The attended positions of all rows in ``unit``-position tiles: ``((s0, n0), (s1, n1))``."""
    end = -(-n // unit)
    if window == 0:
        return (0, end), (0, 0)
    a = -(-min(sink * KV_BLOCK, n) // unit)
    b0 = max((valid0 - 1) // KV_BLOCK - window + 1, 0) * KV_BLOCK // unit
    if b0 <= a:
        return (0, end), (0, 0)
    if a == 0:
        return (b0, end - b0), (0, 0)
    return (0, a), (b0, end - b0)


def mpe_decode(params: HwParams, word: int, regvals) -> dict:
    """The descriptors of MPE queue entry ``(word, regvals)`` (the values of its register
    fields, :func:`flightllm.hw.isa.reg_values`): ``{"fetch": {..}, "comp": {..}}`` with the
    fields of :func:`fetch_layout` and :func:`comp_layout`; :class:`MpeFault` for what the unit
    rejects. The Python model of :class:`MpeDecode`."""
    ug = params if isinstance(params, UnitGeometry) else UnitGeometry(params)
    g = ug.geom
    op = Opcode(word & 63)
    wait = (word >> 6) & 15
    wc = wait & COMPUTE_WAITS

    def bad(why):
        raise MpeFault(f"{op.name}: {why}")

    def rows_of(b):
        return ug.region(b).rows

    def width(b):
        return ug.region(b).width

    if op in (Opcode.MV, Opcode.MM):
        f = _fields(word, WeightFmt)
        rows = regvals[0] if f["rows_reg"] else 1
        wf = None
        try:
            wf = WeightFormat.from_fields(f["bits"], f["n_keep"], f["m"], f["group_log2"], f["kind"])
        except ValueError:
            pass
        info = next((x for x in ug.weight if x.fmt == wf), None)
        if info is None:
            bad("format not in the build")
        G = wf.group_size
        N, K, shift, src, dst = f["n_out"], f["k_in"], f["shift"], f["src"], f["dst"]
        if N == 0 or K == 0 or K % G:
            bad(f"shape {N}x{K}")
        if shift > E0_MAX:
            bad(f"shift {shift}")
        if op == Opcode.MV and rows != 1:
            bad(f"{rows} rows")
        if not ug.is_i8(src) or not ug.is_f32row(dst):
            bad("buffers")
        if rows > rows_of(src) or rows > rows_of(dst) or K > width(src) or N > width(dst):
            bad("beyond the buffers")
        stride = g.act_stride(K)
        if 2 * stride > ug.act_words:
            bad("activations beyond half the activation buffer")
        if f["w_off"] % (ug.W // 8):
            bad("w_off not word-aligned")
        c = mpe_config(g, wf, N, K, 1, 0, shift)
        tpp = min(ug.T, ug.half // stride)
        fetch = dict(base=f["w_off"], off0=0, beats0=c["words"], off1=0, beats1=0, outer=1, ostride=0,
                     ntok=rows, tpp=tpp)
        comp = dict(kind=KIND_W, wait=wc, empty=int(rows == 0), fmt=c["fmt"], e0=c["e0"], tiles=c["tiles"],
                    groups=c["groups"], stride=c["stride"], records=c["records"], words=c["words"],
                    ntok=rows, tpp=tpp, rep=1, src=src, dst=dst, aux=0, shift=shift, kvh=0,
                    e_base0=0, e_step=0, e_off0=0, e_len0=K, e_off1=0, e_len1=0,
                    f_on=1, f_base0=0, f_step=0, lg_fg=_lg(G), s_base0=0, s_step=0,
                    o_base0=0, o_step=0, nlim=N, t_s0=0, t_n0=c["tiles"], t_s1=0)
        return {"fetch": fetch, "comp": comp}

    f = _fields(word, AttnFmt)
    qk = op == Opcode.QK
    rows = regvals[0] if f["rows_reg"] else 1
    valid0 = regvals[1] + f["len_add"]
    info = ug.kv.get(f["bits"])
    if info is None:
        bad(f"KV format int{f['bits']}r not in the build")
    rep, hd, cap, kvh = f["rep"], f["head_dim"], f["cap"], f["kvh"]
    src, dst, aux = f["src"], f["dst"], f["aux"]
    if rows == 0 or valid0 < 1 or valid0 + rows - 1 > cap:
        bad(f"rows {rows} attending {valid0}..{valid0 + rows - 1} of 1..{cap}")
    if rep == 0 or hd == 0 or hd % KV_GROUP or cap == 0 or cap % KV_GROUP:
        bad("rep / head_dim / cap")
    if (cap if qk else hd) % ug.NL:
        bad(f"{'cap' if qk else 'head_dim'} not a multiple of {ug.NL}")
    n = valid0 + rows - 1
    h0 = kvh * rep
    hr = h0 + rep
    fcw = -(-cap // (KV_GROUP * ug.Ls))
    if not ug.is_i8(src) or not ug.is_f32row(dst) or (qk and not ug.is_trans(aux)):
        bad("buffers")
    if rows > rows_of(src) or rows > rows_of(dst) or hr > ug.side(src, "scale").width:
        bad("beyond the buffers")
    if qk and (hr * hd > width(src) or hr * cap > width(dst) or kvh >= rows_of(aux) or cap > width(aux)):
        bad("beyond the buffers")
    if not qk and (hr * cap > width(src) or hr * fcw * ug.Ls > ug.side(src, "factor").width
                   or hr * hd > width(dst)):
        bad("beyond the buffers")
    (s0, n0), (s1, n1) = _ranges(ug, valid0, n, f["sink"], f["window"], ug.R if qk else KV_GROUP)
    ns = n0 + n1
    if qk:
        c = mpe_config(g, info.fmt, ns * ug.R, hd, 1, 0, 0) if 2 * g.act_stride(hd) <= ug.act_words else None
    else:
        c = (mpe_config(g, info.fmt, hd, ns * KV_GROUP, 1, 0, 0)
             if 2 * g.act_stride(ns * KV_GROUP) <= ug.act_words else None)
    if c is None:
        bad("activations beyond half the activation buffer")
    rw = info.record_bits // ug.W
    rb = info.record_bits // 8
    tpp = min(ug.T, ug.half // c["stride"])
    ntok = rows * rep
    if qk:
        grp = hd // KV_GROUP
        fetch = dict(base=f["kv_off"] * 64, off0=s0 * grp * rb, beats0=n0 * grp * rw, off1=s1 * grp * rb,
                     beats1=n1 * grp * rw, outer=1, ostride=0, ntok=ntok, tpp=tpp)
        cur = dict(e_base0=h0 * hd, e_step=hd, e_off0=0, e_len0=hd, e_off1=0, e_len1=0,
                   f_on=0, f_base0=0, f_step=0, lg_fg=_lg(KV_GROUP),
                   o_base0=h0 * cap, o_step=cap, nlim=n, t_s0=s0, t_n0=n0, t_s1=s1)
    else:
        fetch = dict(base=f["kv_off"] * 64, off0=s0 * rb, beats0=n0 * rw, off1=s1 * rb, beats1=n1 * rw,
                     outer=c["tiles"], ostride=cap // KV_GROUP * rb, ntok=ntok, tpp=tpp)
        cur = dict(e_base0=h0 * cap, e_step=cap, e_off0=s0 * KV_GROUP, e_len0=n0 * KV_GROUP,
                   e_off1=s1 * KV_GROUP, e_len1=n1 * KV_GROUP,
                   f_on=1, f_base0=h0 * fcw * ug.Ls, f_step=fcw * ug.Ls, lg_fg=_lg(KV_GROUP),
                   o_base0=h0 * hd, o_step=hd, nlim=hd, t_s0=0, t_n0=c["tiles"], t_s1=0)
    comp = dict(kind=KIND_QK if qk else KIND_PV, wait=wc, empty=0, fmt=c["fmt"], e0=c["e0"], tiles=c["tiles"],
                groups=c["groups"], stride=c["stride"], records=c["records"], words=c["words"],
                ntok=ntok, tpp=tpp, rep=rep, src=src, dst=dst, aux=aux if qk else 0, shift=0, kvh=kvh,
                s_base0=h0, s_step=1, **cur)
    return {"fetch": fetch, "comp": comp}


# ---------------------------------------------------------------------------------------------
# decode, in RTL
class MpeDecode(wiring.Component):
    """Queue entries -> the fetch and compute descriptors (:func:`mpe_decode` in RTL).

    A multi-cycle sequence per entry (registered steps, then the tokens-per-pass loop of at
    most ``mm_tokens`` cycles); the descriptors leave together (both streams valid until
    each is taken). A rejected entry raises ``fault`` with its pc instead, held until the
    unit's reset.

    Attributes
    ----------
    issue : In(stream of :func:`~flightllm.hw.control.entry_layout`)
    fetch : Out(stream of :func:`fetch_layout`)
    comp : Out(stream of :func:`comp_layout`)
    fault : Out(1), fault_pc : Out(PC_BITS)
    """

    def __init__(self, params: HwParams):
        self.ug = ug = UnitGeometry(params)
        super().__init__({
            "issue": In(stream.Signature(entry_layout())),
            "fetch": Out(stream.Signature(fetch_layout(ug))),
            "comp": Out(stream.Signature(comp_layout(ug))),
            "fault": Out(1), "fault_pc": Out(PC_BITS),
        })

    def elaborate(self, platform):
        m = Module()
        ug = self.ug
        g = ug.geom
        R, L, Ls, NL, NB, T = ug.R, ug.L, ug.Ls, ug.NL, ug.NB, ug.T
        lgR, lgL, lgLs, lgNB, lgW = _lg(R), _lg(L), _lg(Ls), _lg(NB), _lg(ug.W)
        EW = ug.EW

        w = Signal(128)
        pc = Signal(PC_BITS)
        r0 = Signal(32)
        r1 = Signal(32)

        def wf(name):
            off, width, _ = _FIELDS[WeightFmt][name]
            return w[off:off + width]

        def af(name):
            off, width, _ = _FIELDS[AttnFmt][name]
            return w[off:off + width]

        # per-buffer constants (indexed by the 5-bit Buf field; ids past Buf: nothing fits)
        def tab(fn, width_):
            vals = [fn(b) if b < len(Buf) else 0 for b in range(32)]
            return Array(Const(v, width_) for v in vals)

        rows_of = tab(lambda b: ug.region(b).rows, 16)
        width_of = tab(lambda b: ug.region(b).width, EW)
        is_i8 = tab(lambda b: int(ug.is_i8(b)), 1)
        is_f32 = tab(lambda b: int(ug.is_f32row(b)), 1)
        is_tr = tab(lambda b: int(ug.is_trans(b)), 1)
        swidth = tab(lambda b: ug.side(b, "scale").width if ug.is_i8(b) else 0, EW)
        fwidth = tab(lambda b: ug.side(b, "factor").width if ug.is_i8(b) else 0, EW)

        op = w[:6]
        is_attn = Signal()
        is_qk = Signal()
        is_mv = Signal()
        m.d.comb += [is_attn.eq((op == Opcode.QK.value) | (op == Opcode.PV.value)),
                     is_qk.eq(op == Opcode.QK.value), is_mv.eq(op == Opcode.MV.value)]

        # -- step 1: formats, rows, lengths ------------------------------------------------------
        wcode = Signal(range(len(g.formats)))
        wfound = Signal()
        lgG = Signal(5)
        rbits = Signal(16)          # record bits of the weight format
        hdr = Signal(8)
        kcode = Signal(range(len(g.formats)))
        kfound = Signal()
        lgRB = Signal(5)            # log2 record bytes / words of the KV format
        lgRW = Signal(5)
        rows = Signal(32)
        valid0 = Signal(signed(35))
        n = Signal(signed(36))
        # step 2 ..
        tiles_w = Signal(TILE_BITS + 1)
        groups_w = Signal(19)
        kmod_bad = Signal()
        stride_w = Signal(20)
        h0 = Signal(14)
        hr = Signal(15)
        own0 = Signal(signed(36))
        aend = Signal(signed(36))
        bs = Signal(signed(36))
        ntok = Signal(22)
        xA = Signal(signed(36))
        xB0 = Signal(signed(36))
        xB1 = Signal(signed(36))
        s0 = Signal(TILE_BITS)
        n0 = Signal(TILE_BITS)
        s1 = Signal(TILE_BITS)
        n1 = Signal(TILE_BITS)
        ns = Signal(TILE_BITS + 1)
        hd = af("head_dim")
        cap = af("cap")
        rep = af("rep")
        grp = hd >> 5
        fcw = Signal(16)
        # step 3/4 results
        records = Signal(32)
        words = Signal(40)
        stride = Signal(20)
        tiles = Signal(TILE_BITS + 1)
        groups = Signal(20)
        prod_a = Signal(40)         # products of step 4
        prod_b = Signal(40)
        prod_c = Signal(40)
        prod_d = Signal(40)
        prod_e = Signal(40)
        badw = Signal()
        bada = Signal()
        tpp = Signal(range(T + 1))
        acc = Signal(24)

        F = self.fetch.payload
        Cp = self.comp.payload
        sent = Signal(2)

        with m.FSM():
            with m.State("IDLE"):
                m.d.comb += self.issue.ready.eq(~self.fault)
                with m.If(self.issue.valid & ~self.fault):
                    e = self.issue.payload
                    m.d.sync += [w.eq(e.word), pc.eq(e.pc), r0.eq(e.regs[0]), r1.eq(e.regs[1])]
                    m.next = "S1"
            with m.State("S1"):
                m.d.sync += [wfound.eq(0), kfound.eq(0)]
                for fi in ug.weight:
                    f = fi.fmt
                    match = ((wf("bits") == f.bits) & (wf("group_log2") == _lg(f.group_size))
                             & (wf("kind") == f.kind))
                    if f.dense:
                        match = match & (wf("n_keep") == wf("m"))
                    else:
                        match = match & (wf("n_keep") == f.n_keep) & (wf("m") == f.m)
                    with m.If(match):
                        m.d.sync += [wcode.eq(fi.code), wfound.eq(1), lgG.eq(_lg(f.group_size)),
                                     rbits.eq(fi.record_bits), hdr.eq(f.header_bits)]
                for bits_, fi in ug.kv.items():
                    with m.If(af("bits") == bits_):
                        m.d.sync += [kcode.eq(fi.code), kfound.eq(1), lgRB.eq(_lg(fi.record_bits // 8)),
                                     lgRW.eq(_lg(fi.record_bits // ug.W))]
                rr = Mux(is_attn, af("rows_reg"), wf("rows_reg"))
                m.d.sync += [rows.eq(Mux(rr != 0, r0, 1)),
                             valid0.eq(r1 + af("len_add").as_signed())]
                m.next = "S2"
            with m.State("S2"):
                N, K = wf("n_out"), wf("k_in")
                m.d.sync += [
                    tiles_w.eq((N + R - 1) >> lgR),
                    groups_w.eq(K >> lgG),
                    kmod_bad.eq((K & ((Const(1, 20) << lgG) - 1)) != 0),
                    stride_w.eq((((K >> lgL) + NB - 1) >> lgNB) << lgNB),
                    h0.eq(af("kvh") * rep),
                    n.eq(valid0 + rows - 1),
                    own0.eq((valid0 - 1) >> _lg(KV_BLOCK)),
                    ntok.eq(rows[:16] * rep),
                    fcw.eq((cap + KV_GROUP * Ls - 1) >> (5 + lgLs)),
                ]
                m.next = "S3"
            with m.State("S3"):
                unit_lg = Mux(is_qk, lgR, 5)
                sink_end = Signal(signed(36))
                m.d.comb += sink_end.eq(af("sink") << _lg(KV_BLOCK))
                m.d.comb += aend.eq(Mux(sink_end < n, sink_end, n))
                bsb = Signal(signed(36))
                m.d.comb += bsb.eq(own0 - af("window") + 1)
                m.d.comb += bs.eq(Mux(bsb > 0, bsb, 0) << _lg(KV_BLOCK))
                m.d.sync += [
                    xA.eq((aend + (Const(1, 36) << unit_lg) - 1) >> unit_lg),
                    xB0.eq(bs >> unit_lg),
                    xB1.eq((n + (Const(1, 36) << unit_lg) - 1) >> unit_lg),
                    hr.eq(h0 + rep),
                ]
                m.next = "S4"
            with m.State("S4"):
                # the streamed ranges
                with m.If((af("window") == 0) | (xB0 <= xA)):
                    m.d.sync += [s0.eq(0), n0.eq(xB1), s1.eq(0), n1.eq(0)]
                with m.Elif(xA == 0):
                    m.d.sync += [s0.eq(xB0), n0.eq(xB1 - xB0), s1.eq(0), n1.eq(0)]
                with m.Else():
                    m.d.sync += [s0.eq(0), n0.eq(xA), s1.eq(xB0), n1.eq(xB1 - xB0)]
                m.next = "S5"
            with m.State("S5"):
                m.d.sync += ns.eq(n0 + n1)
                # products used by the descriptors
                m.d.sync += [prod_a.eq(tiles_w * groups_w),             # MV/MM records
                             prod_b.eq(h0 * hd), prod_c.eq(h0 * cap),
                             prod_d.eq(hr * hd), prod_e.eq(hr * cap)]
                m.next = "S6"
            with m.State("S6"):
                with m.If(is_qk):
                    m.d.sync += [tiles.eq(ns), groups.eq(grp), records.eq(ns * grp),
                                 stride.eq((((hd >> lgL) + NB - 1) >> lgNB) << lgNB)]
                with m.Elif(is_attn):
                    t_pv = (hd + R - 1) >> lgR
                    m.d.sync += [tiles.eq(t_pv), groups.eq(ns), records.eq(t_pv * ns),
                                 stride.eq(((((ns << 5) >> lgL) + NB - 1) >> lgNB) << lgNB)]
                with m.Else():
                    m.d.sync += [tiles.eq(tiles_w), groups.eq(groups_w), records.eq(prod_a), stride.eq(stride_w)]
                m.next = "S7"
            with m.State("S7"):
                m.d.sync += words.eq(Mux(is_attn, records << lgRW,
                                         (hdr + records * rbits + ug.W - 1) >> lgW))
                # faults
                N, K = wf("n_out"), wf("k_in")
                src, dst = wf("src"), wf("dst")
                m.d.sync += badw.eq(
                    ~wfound | (N == 0) | (K == 0) | kmod_bad | (wf("shift") > E0_MAX) | (is_mv & (rows != 1))
                    | ~is_i8[src] | ~is_f32[dst] | (rows > rows_of[src]) | (rows > rows_of[dst])
                    | (K > width_of[src]) | (N > width_of[dst]) | (2 * stride > ug.act_words)
                    | ((wf("w_off") & (ug.W // 8 - 1)) != 0))
                asrc, adst, aaux = af("src"), af("dst"), af("aux")
                kvh = af("kvh")
                qkb = ((cap & (NL - 1)) != 0) | ~is_tr[aaux] | (prod_d > width_of[asrc]) \
                    | (prod_e > width_of[adst]) | (kvh >= rows_of[aaux]) | (cap > width_of[aaux])
                pvb = ((hd & (NL - 1)) != 0) | (prod_e > width_of[asrc]) \
                    | ((hr * fcw) << lgLs > fwidth[asrc]) | (prod_d > width_of[adst])
                m.d.sync += bada.eq(
                    ~kfound | (rows == 0) | (valid0 < 1) | (n > cap) | (rep == 0) | (hd == 0)
                    | ((hd & (KV_GROUP - 1)) != 0) | (cap == 0) | ((cap & (KV_GROUP - 1)) != 0)
                    | ~is_i8[asrc] | ~is_f32[adst] | (rows > rows_of[asrc]) | (rows > rows_of[adst])
                    | (hr > swidth[asrc]) | Mux(is_qk, qkb, pvb) | (2 * stride > ug.act_words))
                m.d.sync += [tpp.eq(0), acc.eq(0)]
                m.next = "TPP"
            with m.State("TPP"):
                # tokens per pass: min(mm_tokens, floor(half / stride)), counted up
                with m.If(Mux(is_attn, bada, badw)):
                    m.d.sync += [self.fault.eq(1), self.fault_pc.eq(pc)]
                    m.next = "FAULT"
                with m.Elif((tpp == T) | (acc + stride > ug.half)):
                    m.d.sync += sent.eq(0)
                    m.next = "EMIT"
                with m.Else():
                    m.d.sync += [tpp.eq(tpp + 1), acc.eq(acc + stride)]
            with m.State("EMIT"):
                m.d.comb += [self.fetch.valid.eq(~sent[0]), self.comp.valid.eq(~sent[1])]
                fire = Cat(self.fetch.valid & self.fetch.ready, self.comp.valid & self.comp.ready)
                m.d.sync += sent.eq(sent | fire)
                with m.If((sent | fire) == 0b11):
                    m.next = "IDLE"
            with m.State("FAULT"):
                pass

        # -- the descriptors (from the registers of the steps) ------------------------------------
        with m.If(is_qk):
            tb = grp << lgRB
            m.d.comb += [F.off0.eq(s0 * tb), F.beats0.eq((n0 * grp) << lgRW), F.off1.eq(s1 * tb),
                         F.beats1.eq((n1 * grp) << lgRW), F.outer.eq(1), F.ostride.eq(0)]
        with m.Elif(is_attn):
            m.d.comb += [F.off0.eq(s0 << lgRB), F.beats0.eq(n0 << lgRW), F.off1.eq(s1 << lgRB),
                         F.beats1.eq(n1 << lgRW), F.outer.eq(tiles), F.ostride.eq((cap >> 5) << lgRB)]
        with m.Else():
            m.d.comb += [F.off0.eq(0), F.beats0.eq(words), F.off1.eq(0), F.beats1.eq(0), F.outer.eq(1),
                         F.ostride.eq(0)]
        m.d.comb += [F.base.eq(Mux(is_attn, af("kv_off") << 6, wf("w_off"))),
                     F.ntok.eq(Mux(is_attn, ntok, rows)), F.tpp.eq(tpp)]

        m.d.comb += [Cp.wait.eq(w[6:10] & COMPUTE_WAITS), Cp.tiles.eq(tiles), Cp.groups.eq(groups),
                     Cp.stride.eq(stride), Cp.records.eq(records), Cp.words.eq(words), Cp.tpp.eq(tpp),
                     Cp.kvh.eq(Mux(is_attn, af("kvh"), 0))]
        with m.If(is_attn):
            m.d.comb += [Cp.kind.eq(Mux(is_qk, KIND_QK, KIND_PV)), Cp.empty.eq(0), Cp.fmt.eq(kcode),
                         Cp.e0.eq(E0_MAX), Cp.ntok.eq(ntok), Cp.rep.eq(rep), Cp.src.eq(af("src")),
                         Cp.dst.eq(af("dst")), Cp.aux.eq(Mux(is_qk, af("aux"), 0)), Cp.shift.eq(0),
                         Cp.s_base0.eq(h0), Cp.s_step.eq(1), Cp.lg_fg.eq(5)]
            with m.If(is_qk):
                m.d.comb += [Cp.e_base0.eq(prod_b), Cp.e_step.eq(hd), Cp.e_off0.eq(0), Cp.e_len0.eq(hd),
                             Cp.e_off1.eq(0), Cp.e_len1.eq(0), Cp.f_on.eq(0), Cp.f_base0.eq(0), Cp.f_step.eq(0),
                             Cp.o_base0.eq(prod_c), Cp.o_step.eq(cap), Cp.nlim.eq(n),
                             Cp.t_s0.eq(s0), Cp.t_n0.eq(n0), Cp.t_s1.eq(s1)]
            with m.Else():
                m.d.comb += [Cp.e_base0.eq(prod_c), Cp.e_step.eq(cap), Cp.e_off0.eq(s0 << 5), Cp.e_len0.eq(n0 << 5),
                             Cp.e_off1.eq(s1 << 5), Cp.e_len1.eq(n1 << 5), Cp.f_on.eq(1),
                             Cp.f_base0.eq((h0 * fcw) << lgLs), Cp.f_step.eq(fcw << lgLs),
                             Cp.o_base0.eq(prod_b), Cp.o_step.eq(hd), Cp.nlim.eq(hd),
                             Cp.t_s0.eq(0), Cp.t_n0.eq(tiles), Cp.t_s1.eq(0)]
        with m.Else():
            m.d.comb += [Cp.kind.eq(KIND_W), Cp.empty.eq(rows == 0), Cp.fmt.eq(wcode), Cp.e0.eq(E0_MAX - wf("shift")),
                         Cp.ntok.eq(rows), Cp.rep.eq(1), Cp.src.eq(wf("src")), Cp.dst.eq(wf("dst")), Cp.aux.eq(0),
                         Cp.shift.eq(wf("shift")), Cp.e_base0.eq(0), Cp.e_step.eq(0), Cp.e_off0.eq(0),
                         Cp.e_len0.eq(wf("k_in")), Cp.e_off1.eq(0), Cp.e_len1.eq(0), Cp.f_on.eq(1),
                         Cp.f_base0.eq(0), Cp.f_step.eq(0), Cp.lg_fg.eq(lgG), Cp.s_base0.eq(0), Cp.s_step.eq(0),
                         Cp.o_base0.eq(0), Cp.o_step.eq(0), Cp.nlim.eq(wf("n_out")),
                         Cp.t_s0.eq(0), Cp.t_n0.eq(tiles), Cp.t_s1.eq(0)]
        return m


# ---------------------------------------------------------------------------------------------
# the unit
def _out_layout(ug: UnitGeometry) -> data.StructLayout:
    """One engine operation (a pass) for the out side: the instruction's output fields and
    the pass's tokens, activation slot and place in the instruction."""
    EW = ug.EW
    return data.StructLayout({
        "kind": 2, "empty": 1, "first": 1, "last": 1, "slot": 1, "ntoks": range(ug.T + 1),
        "tiles": unsigned(TILE_BITS), "rep": unsigned(6), "dst": unsigned(5), "aux": unsigned(5), "kvh": unsigned(8),
        "o_base0": unsigned(EW), "o_step": unsigned(17), "nlim": unsigned(EW),
        "t_s0": unsigned(TILE_BITS), "t_n0": unsigned(TILE_BITS), "t_s1": unsigned(TILE_BITS),
    })


_T_DATA, _T_FACTOR, _T_SCALE = 0, 1, 2


class _Core(wiring.Component):
    """Everything of :class:`MpeUnit` but the burst readers (which outlive an abort)."""

    #: entries of the write FIFO (and the credits of the out lanes)
    WF_DEPTH = 32
    #: instructions whose last write is on its way (the done FIFO)
    DONE_DEPTH = 8

    def __init__(self, params: HwParams, addr_bits: int, chunk: int):
        self.ug = ug = UnitGeometry(params)
        self.addr_bits, self.chunk = addr_bits, chunk
        self.engine = MatrixEngine(params, overlap=True)
        self.decode = MpeDecode(params)
        sig = port_signature(params)
        members = {
            "issue": In(stream.Signature(entry_layout())),
            "done": Out(1), "fault": Out(1), "fault_pc": Out(PC_BITS),
            "mpe_tok": Out(stream.Signature(unsigned(4))),
            "ld": Out(sig), "out": Out(sig),
        }
        for c in range(ug.C):
            members[f"rcmd{c}"] = Out(stream.Signature(command_layout(addr_bits)))
            members[f"rdata{c}"] = In(stream.Signature(unsigned(ug.W)))
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        ug, p = self.ug, self.ug.p
        g = ug.geom
        R, L, Ls, NL, C, T = ug.R, ug.L, ug.Ls, ug.NL, ug.C, ug.T
        lgR, lgL, lgLs = _lg(R), _lg(L), _lg(Ls)
        EW, WB = ug.EW, ug.WB
        CH = R // NL                               # output chunks per engine beat
        P = max(1, L // Ls)                        # buffer words per activation word
        SUB = max(1, Ls // L)                      # activation words per buffer word
        eng = m.submodules.engine = self.engine
        dec = m.submodules.decode = self.decode
        wiring.connect(m, wiring.flipped(self.issue), dec.issue)
        m.d.comb += [self.fault.eq(dec.fault), self.fault_pc.eq(dec.fault_pc)]
        for c in range(C):
            wiring.connect(m, wiring.flipped(getattr(self, f"rdata{c}")), getattr(eng, f"words{c}"))

        regs = ug.regions
        nreg = len(regs)
        row_words = Array(Const(r.row_words, 16) for r in ug.by_id)
        scale_of = Array(Const(regs[b.name + ".scale"].id if b.name + ".scale" in regs else 0, range(nreg))
                         for b in Buf)
        factor_of = Array(Const(regs[b.name + ".factor"].id if b.name + ".factor" in regs else 0, range(nreg))
                          for b in Buf)

        fl, cl, ol = fetch_layout(ug), comp_layout(ug), _out_layout(ug)
        fq = m.submodules.fetch_q = fifo.SyncFIFOBuffered(width=fl.size, depth=4)
        cq = m.submodules.comp_q = fifo.SyncFIFOBuffered(width=cl.size, depth=8)
        odq = m.submodules.pass_q = fifo.SyncFIFOBuffered(width=ol.size, depth=4)
        m.d.comb += [fq.w_en.eq(dec.fetch.valid), fq.w_data.eq(dec.fetch.payload), dec.fetch.ready.eq(fq.w_rdy),
                     cq.w_en.eq(dec.comp.valid), cq.w_data.eq(dec.comp.payload), dec.comp.ready.eq(cq.w_rdy)]

        # -- fetch: every descriptor's commands to every channel's reader, in chunks ----------------
        # (a reader cannot drop a command it holds: chunks of at most `chunk` beats bound what an
        # abort still has to drain)
        fd = data.View(fl, fq.r_data)
        chunk = self.chunk
        f_left = Signal(signed(18))                # tokens left before this pass
        f_j = Signal(12)
        f_r = Signal()
        f_addr = Signal(40)                        # base + j * ostride
        f_pos = Signal(40)                         # the next chunk
        f_beats = Signal(BEATS_BITS)               # beats of the command left
        f_new = Signal()                           # (f_j, f_r)'s command starts next cycle
        f_sent = Signal(C)
        f_run = Signal()
        c_beats = Mux(f_beats > chunk, chunk, f_beats)
        f_fire = Signal(C)
        for c in range(C):
            cmd = getattr(self, f"rcmd{c}")
            m.d.comb += [cmd.valid.eq(f_run & ~f_new & ~f_sent[c]), cmd.payload.addr.eq(f_pos),
                         cmd.payload.beats.eq(c_beats), f_fire[c].eq(cmd.valid & cmd.ready)]
        f_all = (f_sent | f_fire) == (1 << C) - 1
        with m.If(~f_run):
            with m.If(fq.r_rdy):
                with m.If(fd.ntok == 0):
                    m.d.comb += fq.r_en.eq(1)
                with m.Else():
                    m.d.sync += [f_run.eq(1), f_new.eq(1), f_left.eq(fd.ntok), f_j.eq(0), f_r.eq(0),
                                 f_addr.eq(fd.base), f_sent.eq(0)]
        with m.Elif(f_new):
            m.d.sync += [f_new.eq(0), f_pos.eq(f_addr + Mux(f_r, fd.off1, fd.off0)),
                         f_beats.eq(Mux(f_r, fd.beats1, fd.beats0))]
        with m.Elif(f_all):
            m.d.sync += f_sent.eq(0)
            with m.If(f_beats > chunk):
                m.d.sync += [f_pos.eq(f_pos + chunk * (ug.W // 8)), f_beats.eq(f_beats - chunk)]
            with m.Else():
                m.d.sync += f_new.eq(1)
                with m.If(~f_r & (fd.beats1 != 0)):
                    m.d.sync += f_r.eq(1)
                with m.Else():
                    m.d.sync += f_r.eq(0)
                    with m.If(f_j + 1 != fd.outer):
                        m.d.sync += [f_j.eq(f_j + 1), f_addr.eq(f_addr + fd.ostride)]
                    with m.Else():
                        m.d.sync += [f_j.eq(0), f_addr.eq(fd.base), f_left.eq(f_left - fd.tpp)]
                        with m.If(f_left <= fd.tpp):
                            m.d.sync += [f_run.eq(0), f_new.eq(0)]
                            m.d.comb += fq.r_en.eq(1)
        with m.Else():
            m.d.sync += f_sent.eq(f_sent | f_fire)

        # -- loader: tokens, activations, scales, cfg ----------------------------------------------
        cd = data.View(cl, cq.r_data)
        l_t = Signal(8)
        l_h = Signal(6)
        l_e = Signal(EW)
        l_f = Signal(EW)
        l_s = Signal(14)
        rem = Signal(16)
        pt = Signal(range(T + 1))
        li = Signal(range(T + 1))
        slot = Signal()
        first = Signal()
        loaded = Signal(2)
        drained = Signal(2)
        AB = g.act_addr_bits + 1
        aw_tok = Signal(AB)
        aw = Signal(AB)
        drow = Signal(WB)
        frow = Signal(WB)
        srow = Signal(WB)
        ri = Signal()
        lk = Signal(EW)
        part = Signal(range(max(2, P)))
        fc_word = Signal(WB)
        fc_valid = Signal()
        cur_fl = Signal(max(1, lgLs))
        s1_pend = Array(Signal(range(2 * T + 8), name=f"s1_pend{k}") for k in range(2))

        tagl = data.StructLayout({"typ": 2, "aaddr": AB, "sub": max(1, _lg(SUB)), "part": max(1, _lg(P)),
                                  "last": 1, "flane": max(1, lgLs), "u1": 1, "idx": range(2 * T), "lane": max(1, lgLs)})
        tagq = m.submodules.tag_q = fifo.SyncFIFO(width=tagl.size, depth=8)
        tg_in = Signal(tagl)
        m.d.comb += tagq.w_data.eq(tg_in)
        rq = self.ld.rd_req
        m.d.comb += [tagq.w_en.eq(rq.valid & rq.ready), self.ld.wr.valid.eq(0)]

        # activation element and factor of the current request
        pos = Signal(EW)
        len_r = Signal(EW)
        m.d.comb += [pos.eq(Mux(ri, cd.e_off1, cd.e_off0) + lk), len_r.eq(Mux(ri, cd.e_len1, cd.e_len0))]
        elem = Signal(EW + 1)
        m.d.comb += elem.eq(l_e + pos + (part << lgLs if P > 1 else 0))
        gstart = Signal()
        m.d.comb += gstart.eq(((pos & ((Const(1, 16) << cd.lg_fg) - 1)) == 0) & (part == 0))
        fe = Signal(EW + 1)
        m.d.comb += fe.eq(l_f + (pos >> cd.lg_fg))
        fword = Signal(WB)
        m.d.comb += fword.eq(frow + (fe >> lgLs))
        flane = fe[:max(1, lgLs)] if lgLs else Const(0, 1)
        need_f = Signal()
        m.d.comb += need_f.eq(cd.f_on & gstart & ~(fc_valid & (fc_word == fword)))

        pow2 = Signal(32)
        m.d.comb += pow2.eq((127 - cd.shift) << 23)         # float32 2^-shift (shift <= 25: normal)

        o = Signal(ol)                               # the pass descriptor (EMPTY overrides three fields)
        m.d.comb += [o.kind.eq(cd.kind), o.empty.eq(0), o.first.eq(first), o.last.eq(rem == pt),
                     o.slot.eq(slot), o.ntoks.eq(pt), o.tiles.eq(cd.tiles), o.rep.eq(cd.rep),
                     o.dst.eq(cd.dst), o.aux.eq(cd.aux), o.kvh.eq(cd.kvh), o.o_base0.eq(cd.o_base0),
                     o.o_step.eq(cd.o_step), o.nlim.eq(cd.nlim), o.t_s0.eq(cd.t_s0), o.t_n0.eq(cd.t_n0),
                     o.t_s1.eq(cd.t_s1), odq.w_data.eq(o)]

        with m.FSM(name="loader"):
            with m.State("IDLE"):
                with m.If(cq.r_rdy):
                    m.d.sync += [l_t.eq(0), l_h.eq(0), l_e.eq(cd.e_base0), l_f.eq(cd.f_base0), l_s.eq(cd.s_base0),
                                 drow.eq(0), frow.eq(0), srow.eq(0), rem.eq(cd.ntok), first.eq(1)]
                    m.next = "TOK"
            with m.State("TOK"):
                m.d.comb += [self.mpe_tok.valid.eq(cd.wait != 0), self.mpe_tok.payload.eq(cd.wait)]
                with m.If((cd.wait == 0) | self.mpe_tok.ready):
                    with m.If(cd.empty):
                        m.next = "EMPTY"
                    with m.Else():
                        m.next = "PASS"
            with m.State("EMPTY"):
                m.d.comb += [o.empty.eq(1), o.first.eq(1), o.last.eq(1), odq.w_en.eq(odq.w_rdy)]
                with m.If(odq.w_rdy):
                    m.d.comb += cq.r_en.eq(1)
                    m.next = "IDLE"
            with m.State("PASS"):
                with m.If((loaded - drained)[:2] < 2):
                    m.d.sync += [pt.eq(Mux(rem < cd.tpp, rem, cd.tpp)), li.eq(0),
                                 aw_tok.eq(Mux(slot, ug.half, 0)), aw.eq(Mux(slot, ug.half, 0)),
                                 fc_valid.eq(0), ri.eq(0), lk.eq(0), part.eq(0)]
                    m.next = "CFG"
            with m.State("CFG"):
                # the engine gets the pass before its activations: its dequant units refill
                # while they load (it starts the pass on act_done)
                ec = eng.cfg.payload
                m.d.comb += [ec.fmt.eq(cd.fmt), ec.e0.eq(cd.e0), ec.tokens.eq(pt), ec.act_base.eq(Mux(slot, ug.half, 0)),
                             ec.tiles.eq(cd.tiles), ec.groups.eq(cd.groups), ec.stride.eq(cd.stride),
                             ec.records.eq(cd.records), ec.words.eq(cd.words),
                             eng.cfg.valid.eq(odq.w_rdy), odq.w_en.eq(eng.cfg.valid & eng.cfg.ready)]
                with m.If(eng.cfg.valid & eng.cfg.ready):
                    m.d.sync += [loaded.eq(loaded + 1), first.eq(0)]
                    m.next = "SREQ"
            with m.State("SREQ"):
                m.d.comb += [rq.valid.eq(tagq.w_rdy), rq.payload.region.eq(scale_of[cd.src]),
                             rq.payload.word.eq(srow + (l_s >> lgLs)),
                             tg_in.typ.eq(_T_SCALE), tg_in.idx.eq(Mux(slot, T, 0) + li),
                             tg_in.lane.eq(l_s[:max(1, lgLs)] if lgLs else 0)]
                with m.If(rq.valid & rq.ready):
                    m.next = "DREQ"
            with m.State("DREQ"):
                m.d.comb += rq.valid.eq(tagq.w_rdy)
                with m.If(need_f):
                    m.d.comb += [rq.payload.region.eq(factor_of[cd.src]), rq.payload.word.eq(fword),
                                 tg_in.typ.eq(_T_FACTOR)]
                    with m.If(rq.valid & rq.ready):
                        m.d.sync += [fc_word.eq(fword), fc_valid.eq(1)]
                with m.Else():
                    m.d.comb += [rq.payload.region.eq(cd.src), rq.payload.word.eq(drow + (elem >> lgLs)),
                                 tg_in.typ.eq(_T_DATA), tg_in.aaddr.eq(aw),
                                 tg_in.sub.eq((elem >> lgL)[:max(1, _lg(SUB))] if SUB > 1 else 0),
                                 tg_in.part.eq(part), tg_in.last.eq(part == P - 1),
                                 tg_in.flane.eq(Mux(gstart, flane, cur_fl)), tg_in.u1.eq(~cd.f_on)]
                    with m.If(rq.valid & rq.ready):
                        with m.If(gstart):
                            m.d.sync += cur_fl.eq(flane)
                        if P > 1:
                            m.d.sync += part.eq(part + 1)
                        with m.If(part == P - 1):
                            m.d.sync += [part.eq(0), aw.eq(aw + 1), lk.eq(lk + L)]
                            with m.If(lk + L == len_r):
                                m.d.sync += lk.eq(0)
                                with m.If(~ri & (cd.e_len1 != 0)):
                                    m.d.sync += ri.eq(1)
                                with m.Else():
                                    # the token's last request: the cursor moves to the next token
                                    m.d.sync += ri.eq(0)
                                    with m.If(l_h + 1 == cd.rep):
                                        m.d.sync += [l_h.eq(0), l_t.eq(l_t + 1), l_e.eq(cd.e_base0),
                                                     l_f.eq(cd.f_base0), l_s.eq(cd.s_base0),
                                                     drow.eq(drow + row_words[cd.src]),
                                                     frow.eq(frow + row_words[factor_of[cd.src]]),
                                                     srow.eq(srow + row_words[scale_of[cd.src]])]
                                    with m.Else():
                                        m.d.sync += [l_h.eq(l_h + 1), l_e.eq(l_e + cd.e_step),
                                                     l_f.eq(l_f + cd.f_step), l_s.eq(l_s + cd.s_step)]
                                    m.d.sync += [li.eq(li + 1), aw_tok.eq(aw_tok + cd.stride),
                                                 aw.eq(aw_tok + cd.stride), rem.eq(rem - 1)]
                                    with m.If(li + 1 == pt):
                                        m.next = "WAITR"
                                    with m.Else():
                                        m.next = "SREQ"
            with m.State("WAITR"):
                # every activation write is out (the s1 table may still be filling: the out
                # side waits for its pass's scales)
                with m.If(~tagq.r_rdy & ~eng.act.valid):
                    m.d.comb += eng.act_done.eq(1)
                    m.d.sync += slot.eq(~slot)
                    with m.If(rem == 0):
                        m.d.comb += cq.r_en.eq(1)
                        m.next = "IDLE"
                    with m.Else():
                        m.next = "PASS"

        # read data of the loader: activation words, factor words, scales
        rd = self.ld.rd_data
        tg = data.View(tagl, tagq.r_data)
        m.d.comb += tagq.r_en.eq(rd.valid)
        fwd = Signal(data.ArrayLayout(8, Ls))               # the factor word of the current group
        asm = [Signal(8 * Ls, name=f"asm{k}") for k in range(P - 1)]
        act_v = Signal()
        act_p = Signal(act_layout(g))
        m.d.sync += act_v.eq(0)
        m.d.comb += [eng.act.valid.eq(act_v), eng.act.payload.eq(act_p)]
        lanes8 = [rd.payload[l][:8] for l in range(Ls)]
        with m.If(rd.valid):
            with m.Switch(tg.typ):
                with m.Case(_T_DATA):
                    if SUB > 1:
                        with m.Switch(tg.sub):
                            for s in range(SUB):
                                with m.Case(s):
                                    m.d.sync += act_p.data.eq(Cat(*lanes8[s * L:(s + 1) * L]))
                    elif P > 1:
                        with m.Switch(tg.part):
                            for k in range(P - 1):
                                with m.Case(k):
                                    m.d.sync += asm[k].eq(Cat(*lanes8))
                        m.d.sync += act_p.data.eq(Cat(*asm, *lanes8))
                    else:
                        m.d.sync += act_p.data.eq(Cat(*lanes8))
                    m.d.sync += [act_p.addr.eq(tg.aaddr), act_v.eq(tg.last),
                                 act_p.u.eq(Mux(tg.u1, 1, Array(fwd)[tg.flane]))]
                with m.Case(_T_FACTOR):
                    m.d.sync += fwd.eq(Cat(*lanes8))

        # s1 = A * 2^-shift (MV/MM) or the scale itself (QK/PV), into the table of the slot
        s1tab = Array(Signal(32, name=f"s1_{k}") for k in range(2 * T))
        fm = m.submodules.s1_mul = FMul()
        sc_v = rd.valid & (tg.typ == _T_SCALE)
        sc_val = Signal(32)
        m.d.comb += sc_val.eq(Array(rd.payload[l] for l in range(Ls))[tg.lane])
        m.d.comb += [fm.i_valid.eq(sc_v), fm.a.eq(sc_val), fm.b.eq(pow2)]
        raw_d = delay(m, sc_val, FMul.latency, name="s1_raw")
        idx_d = delay(m, tg.idx, FMul.latency, name="s1_idx")
        mul_d = delay(m, cd.kind == KIND_W, FMul.latency, name="s1_mul")
        with m.If(fm.o_valid):
            m.d.sync += s1tab[idx_d].eq(Mux(mul_d, fm.o, raw_d))
        for k in range(2):                          # scales on their way into slot k's half of the table
            m.d.sync += s1_pend[k].eq(s1_pend[k] + (sc_v & ((tg.idx >= T) == k)) - (fm.o_valid & ((idx_d >= T) == k)))

        # -- out side: accumulators -> float32 -> buffer writes ------------------------------------------
        od = data.View(ol, odq.r_data)
        o_on = Signal()                             # the head pass has been set up
        o_t = Signal(8)
        o_h = Signal(6)
        o_b = Signal(EW)
        o_r = Signal(WB)
        ps_t, ps_h, ps_b, ps_r = Signal(8), Signal(6), Signal(EW), Signal(WB)
        o_k = Signal(TILE_BITS)
        o_tp = Signal(TILE_BITS)
        o_i = Signal(range(T + 1))
        o_c = Signal(range(max(2, CH)))
        is_qk = od.kind == KIND_QK

        ksd = 2 * CH + 4
        ksf = m.submodules.ks_fifo = fifo.SyncFIFOBuffered(width=32 * Ls, depth=ksd)
        ksr = Array(Signal(32 * Ls, name=f"ksr{k}") for k in range(CH))

        credit = Signal(range(self.WF_DEPTH + 1), init=self.WF_DEPTH)
        lfly = Signal(range(64))
        donef = m.submodules.done_fifo = fifo.SyncFIFO(width=16, depth=self.DONE_DEPTH)
        last_ok = (lfly + donef.level) < self.DONE_DEPTH
        last_tile = o_k + 1 == od.tiles
        last_tok = o_i + 1 == od.ntoks
        last_c = o_c == CH - 1
        lastchunk = od.last & last_tile & last_tok & last_c
        go_empty = Signal()
        go = Signal()
        m.d.comb += [go_empty.eq(odq.r_rdy & o_on & od.empty & (credit != 0) & last_ok),
                     go.eq(odq.r_rdy & o_on & ~od.empty & eng.out.valid & (credit != 0) & (s1_pend[od.slot] == 0)
                           & (~is_qk | (o_i != 0) | ksf.r_rdy) & (~lastchunk | last_ok))]
        issue = go | go_empty

        with m.If(odq.r_rdy & ~o_on):
            m.d.sync += [o_on.eq(1), o_k.eq(0), o_tp.eq(od.t_s0), o_i.eq(0), o_c.eq(0)]
            with m.If(od.first):
                m.d.sync += [o_t.eq(0), o_h.eq(0), o_b.eq(od.o_base0), o_r.eq(0),
                             ps_t.eq(0), ps_h.eq(0), ps_b.eq(od.o_base0), ps_r.eq(0)]
            with m.Else():
                m.d.sync += [o_t.eq(ps_t), o_h.eq(ps_h), o_b.eq(ps_b), o_r.eq(ps_r)]

        # the token cursor after this token
        a_t, a_h, a_b, a_r = Signal(8), Signal(6), Signal(EW), Signal(WB)
        with m.If(o_h + 1 == od.rep):
            m.d.comb += [a_t.eq(o_t + 1), a_h.eq(0), a_b.eq(od.o_base0), a_r.eq(o_r + row_words[od.dst])]
        with m.Else():
            m.d.comb += [a_t.eq(o_t), a_h.eq(o_h + 1), a_b.eq(o_b + od.o_step), a_r.eq(o_r)]

        with m.If(go_empty):
            m.d.comb += odq.r_en.eq(1)
            m.d.sync += o_on.eq(0)
        with m.If(go):
            with m.If(~last_c):
                m.d.sync += o_c.eq(o_c + 1)
            with m.Else():
                m.d.sync += o_c.eq(0)
                m.d.comb += eng.out.ready.eq(1)
                with m.If(~last_tok):
                    m.d.sync += [o_i.eq(o_i + 1), o_t.eq(a_t), o_h.eq(a_h), o_b.eq(a_b), o_r.eq(a_r)]
                with m.Else():
                    m.d.sync += o_i.eq(0)
                    with m.If(~last_tile):
                        m.d.sync += [o_k.eq(o_k + 1), o_tp.eq(Mux(o_k + 1 == od.t_n0, od.t_s1, o_tp + 1)),
                                     o_t.eq(ps_t), o_h.eq(ps_h), o_b.eq(ps_b), o_r.eq(ps_r)]
                    with m.Else():
                        m.d.comb += odq.r_en.eq(1)
                        m.d.sync += [o_on.eq(0), drained.eq(drained + 1),
                                     ps_t.eq(a_t), ps_h.eq(a_h), ps_b.eq(a_b), ps_r.eq(a_r)]

        # the chunk: its place in the destination, the lanes' operands
        el_tile = Signal(EW + 1)
        m.d.comb += el_tile.eq((o_tp << lgR) + o_c * NL)
        eoff = Signal(EW + 2)
        m.d.comb += eoff.eq(o_b + el_tile)
        ksw = Signal(32 * Ls)
        m.d.comb += ksw.eq(Mux(o_i == 0, ksf.r_data, ksr[o_c]))
        m.d.comb += ksf.r_en.eq(go & is_qk & (o_i == 0))
        with m.If(go & is_qk & (o_i == 0)):
            m.d.sync += ksr[o_c].eq(ksf.r_data)
        lo = Signal(max(1, lgLs))
        m.d.comb += lo.eq(eoff[:lgLs] if lgLs else 0)
        lgNL = _lg(NL)
        ks_sel = lo >> lgNL if Ls > NL else Const(0, 1)     # lo is a multiple of NL
        s1 = Signal(32)
        m.d.comb += s1.eq(s1tab[Mux(od.slot, T, 0) + o_i])
        accs = eng.out.payload
        lanes = []
        for j in range(NL):
            ln = MpeOutLane(g.acc_w)
            m.submodules[f"out_lane{j}"] = ln
            acc_j = Array(accs[k * NL + j] for k in range(CH))[o_c]
            m.d.comb += [ln.i_valid.eq(issue), ln.acc.eq(acc_j), ln.s1.eq(s1),
                         ln.s2.eq(Mux(is_qk, Array(ksw[32 * (k * NL + j):32 * (k * NL + j + 1)]
                                                   for k in range(Ls // NL))[ks_sel], _ONE))]
            lanes.append(ln)

        metal = data.StructLayout({"region": range(nreg), "word": WB, "lo": max(1, lgLs), "mask": NL, "last": 1})
        meta = m.submodules.meta_fifo = fifo.SyncFIFO(width=metal.size, depth=self.WF_DEPTH)
        mi = Signal(metal)
        m.d.comb += [mi.region.eq(od.dst), mi.word.eq(o_r + (eoff >> lgLs)), mi.lo.eq(lo),
                     mi.mask.eq(Mux(go_empty, 0, Cat(el_tile + j < od.nlim for j in range(NL)))),
                     mi.last.eq(go_empty | lastchunk), meta.w_data.eq(mi), meta.w_en.eq(issue)]

        # write stage: the converted chunk at its lanes
        mo = data.View(metal, meta.r_data)
        ov = lanes[0].o_valid
        m.d.comb += meta.r_en.eq(ov)
        wl = data.StructLayout({"region": range(nreg), "word": WB, "data": data.ArrayLayout(32, Ls), "mask": Ls})
        wf = m.submodules.wr_fifo = fifo.SyncFIFO(width=wl.size, depth=self.WF_DEPTH)
        wi = Signal(wl)
        m.d.comb += [wi.region.eq(mo.region), wi.word.eq(mo.word), wi.mask.eq(mo.mask << mo.lo)]
        for lane in range(Ls):                      # lo is a multiple of NL: lane l holds y[l % NL]
            m.d.comb += wi.data[lane].eq(lanes[lane % NL].y)
        push = ov & (mo.mask != 0)
        m.d.comb += [wf.w_data.eq(wi), wf.w_en.eq(push)]
        wh = data.View(wl, wf.r_data)
        wp = self.out.wr.payload
        m.d.comb += [self.out.wr.valid.eq(wf.r_rdy), wp.region.eq(wh.region), wp.word.eq(wh.word),
                     wp.data.eq(wh.data), wp.mask.eq(wh.mask), wf.r_en.eq(self.out.wr.ready)]
        ret = (wf.r_rdy & self.out.wr.ready) + (ov & (mo.mask == 0))
        m.d.sync += credit.eq(credit - issue + ret)
        m.d.sync += lfly.eq(lfly + (issue & mi.last) - (ov & mo.last))

        # done: when the instruction's last write has landed
        pushed = Signal(16)
        landed = Signal(16)
        m.d.sync += [pushed.eq(pushed + push), landed.eq(landed + self.out.wr_done)]
        m.d.comb += [donef.w_en.eq(ov & mo.last), donef.w_data.eq(pushed + push)]
        diff = Signal(16)
        m.d.comb += diff.eq(landed - donef.r_data)
        fin = donef.r_rdy & ~diff[15]
        m.d.comb += donef.r_en.eq(fin)
        m.d.sync += self.done.eq(fin)

        # -- key scales of the QK tiles, ahead of the out side ------------------------------------------
        pf_on = Signal()
        pf_done = Signal()
        pf_k = Signal(TILE_BITS)
        pf_tp = Signal(TILE_BITS)
        pf_c = Signal(range(max(2, CH)))
        ks_row = Signal(WB)
        ks_out = Signal(range(ksd + 1))
        kq = self.out.rd_req
        kd = self.out.rd_data
        m.d.comb += [ksf.w_en.eq(kd.valid), ksf.w_data.eq(kd.payload)]
        want = odq.r_rdy & is_qk & ~od.empty & pf_on & ~pf_done
        m.d.comb += [kq.valid.eq(want & (ksf.level + ks_out < ksd)), kq.payload.region.eq(od.aux),
                     kq.payload.word.eq(ks_row + (((pf_tp << lgR) + pf_c * NL) >> lgLs))]
        m.d.sync += ks_out.eq(ks_out + (kq.valid & kq.ready) - kd.valid)
        with m.If(odq.r_rdy & ~pf_on):
            m.d.sync += [pf_on.eq(1), pf_done.eq(0), pf_k.eq(0), pf_tp.eq(od.t_s0), pf_c.eq(0),
                         ks_row.eq(od.kvh * row_words[od.aux])]
        with m.If(kq.valid & kq.ready):
            with m.If(pf_c != CH - 1):
                m.d.sync += pf_c.eq(pf_c + 1)
            with m.Else():
                m.d.sync += pf_c.eq(0)
                with m.If(pf_k + 1 == od.tiles):
                    m.d.sync += pf_done.eq(1)
                with m.Else():
                    m.d.sync += [pf_k.eq(pf_k + 1), pf_tp.eq(Mux(pf_k + 1 == od.t_n0, od.t_s1, pf_tp + 1))]
        with m.If(odq.r_en):
            m.d.sync += pf_on.eq(0)
        return m


class MpeUnit(wiring.Component):
    """The matrix engine under the kernel's unit contract (module docstring).

    Parameters
    ----------
    params : HwParams
    addr_bits : int
        Width of the weight channels' byte addresses (the kernel adds each channel's base).
    max_burst : int
        Longest read burst of the weight streamers.

    Attributes
    ----------
    issue : In(stream of :func:`~flightllm.hw.control.entry_layout`)
    done, busy, fault : Out(1)
    fault_pc : Out(PC_BITS)
    abort : In(1)
    mpe_tok : Out(stream of unsigned(4))
        ``wait & COMPUTE_WAITS`` of an instruction about to compute (only when nonzero).
    ld, out : Out(:func:`~flightllm.hw.buffers.port_signature`)
        Buffer client ports: ``ld`` reads the activations, their scales and factors; ``out``
        reads the key scales (QK) and writes the results.
    axi0 .. : Out(axi4_signature(addr_bits, hbm_port_bits, write=False))
        One read manager per weight channel (addresses from 0 in the channel).
    """

    def __init__(self, params: HwParams, *, addr_bits: int = 64, max_burst: int = 64):
        self.params = params
        self.ug = ug = UnitGeometry(params)
        self._core = _Core(params, addr_bits, max_burst)
        self._readers = [BurstReader(ug.W, addr_bits, max_burst, params.stream_fifo_beats) for _ in range(ug.C)]
        sig = port_signature(params)
        members = {
            "issue": In(stream.Signature(entry_layout())),
            "done": Out(1), "busy": Out(1), "fault": Out(1), "fault_pc": Out(PC_BITS), "abort": In(1),
            "mpe_tok": Out(stream.Signature(unsigned(4))),
            "ld": Out(sig), "out": Out(sig),
        }
        for c in range(ug.C):
            members[f"axi{c}"] = Out(axi4_signature(addr_bits, ug.W, write=False))
        #: port -> the regions it may touch: what the decode accepts (``is_i8`` sources with
        #: their scales and factors; ``is_trans`` QK key scales; ``is_f32row`` results)
        self.reach = {"ld": Reach(reads=buf_regions(params, [b for b in Buf if ug.is_i8(b.value)], sides=True)),
                      "out": Reach(reads=buf_regions(params, [b for b in Buf if ug.is_trans(b.value)]),
                                   writes=buf_regions(params, [b for b in Buf if ug.is_f32row(b.value)]))}
        super().__init__(members)

    @property
    def engine(self) -> MatrixEngine:
        return self._core.engine

    def elaborate(self, platform):
        m = Module()
        core = self._core
        go = ~self.abort
        idle = Signal()
        m.d.comb += idle.eq(Cat(r.idle for r in self._readers).all())
        pending = Signal(8)                          # buffer reads requested, data not yet back
        req = sum((getattr(self, pn).rd_req.valid & getattr(self, pn).rd_req.ready) for pn in ("ld", "out"))
        got = sum(getattr(self, pn).rd_data.valid for pn in ("ld", "out"))
        m.d.sync += pending.eq(pending + req - got)
        rst = Signal()
        m.d.comb += rst.eq(self.abort & idle & (pending == 0))
        m.submodules.core = ResetInserter(rst)(core)

        m.d.comb += [core.issue.valid.eq(self.issue.valid & go), core.issue.payload.eq(self.issue.payload),
                     self.issue.ready.eq(core.issue.ready & go),
                     self.mpe_tok.valid.eq(core.mpe_tok.valid & go), self.mpe_tok.payload.eq(core.mpe_tok.payload),
                     core.mpe_tok.ready.eq(self.mpe_tok.ready & go),
                     self.done.eq(core.done & go), self.fault.eq(core.fault), self.fault_pc.eq(core.fault_pc)]
        for pn in ("ld", "out"):
            outer, inner = getattr(self, pn), getattr(core, pn)
            for s in ("rd_req", "wr"):
                os_, is_ = getattr(outer, s), getattr(inner, s)
                m.d.comb += [os_.valid.eq(is_.valid & go), os_.payload.eq(is_.payload), is_.ready.eq(os_.ready & go)]
            m.d.comb += [inner.rd_data.valid.eq(outer.rd_data.valid), inner.rd_data.payload.eq(outer.rd_data.payload),
                         inner.wr_done.eq(outer.wr_done)]
        for c, r in enumerate(self._readers):
            m.submodules[f"reader{c}"] = r
            cmd, dat = getattr(core, f"rcmd{c}"), getattr(core, f"rdata{c}")
            m.d.comb += [r.cmd.valid.eq(cmd.valid & go), r.cmd.payload.eq(cmd.payload), cmd.ready.eq(r.cmd.ready & go),
                         dat.valid.eq(r.data.valid & go), dat.payload.eq(r.data.payload),
                         r.data.ready.eq(dat.ready | self.abort)]
            wiring.connect(m, r.axi, wiring.flipped(getattr(self, f"axi{c}")))
        inflight = Signal(8)
        took = self.issue.valid & self.issue.ready
        with m.If(rst):
            m.d.sync += inflight.eq(0)
        with m.Else():
            m.d.sync += inflight.eq(inflight + took - self.done)
        m.d.comb += self.busy.eq((inflight != 0) | ~idle | (pending != 0))
        return m
