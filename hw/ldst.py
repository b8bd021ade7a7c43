"""The LD and ST units' space transfers: LD_KV (:class:`SpaceLoad`), ST_KV and ST_OUT
(:class:`SpaceStore`), and :class:`UnitMux`, which puts several engines behind one unit
port (:class:`LdUnit`, :class:`StUnit`).

Each engine follows the unit contract of ``docs/kernel.md`` by itself (``issue`` stream of
:func:`~flightllm.hw.control.entry_layout` entries, ``done``, ``busy``, ``abort``,
``fault``/``fault_pc``), so it can stand alone as a unit or sit behind a :class:`UnitMux`
with the other engines of its unit (EMBED on LD, ST_KT on ST).

The spaces
----------
Space ``KV`` (the KV cache's float32 scales) and space ``OUT`` (the logits) are byte arrays
interleaved over the last ``K = kv_channels`` weight channels in 64-byte granules
(:mod:`flightllm.hw.memmap`): space byte ``a`` is in kv channel ``(a // 64) % K`` (weight
channel ``C - K + that``) at ``space offset + (a // 64 // K) * 64 + a % 64`` of that channel's
buffer. The space offsets are the kernel arguments ``kv_space``, ``out_space`` (input
``spaces``); units address channel buffers from 0 (the kernel adds ``chNN``). An engine has
one AXI manager per kv channel (``axi[i]``: kv channel ``i``), a
:class:`~flightllm.hw.axi.BurstReader` (LD) or :class:`~flightllm.hw.axi.BurstWriter` (ST),
for the integrator to put on that channel's ReadMux / WriteMux.

A transfer of ``n = rows * row_bytes`` bytes from space byte ``A`` touches the space beats
(``W = hbm_port_bits / 8`` bytes, ``G = 64 / W`` beats per granule) ``A // W`` ..
``(A + n - 1) // W``; each channel's share of them is one contiguous range of its buffer.
The front end asks for them in *segments* (:func:`space_commands`, the model the tests
check the RTL against): commands of ``S = seg_granules`` granules per channel, the
channels in granule order, so a long transfer keeps a few commands per channel queued
(the readers' and writers' command FIFOs hold the loop back) rather than one huge one,
and an abort leaves only those few to finish.

Entries (``MemFmt``)
--------------------
``rows = R[rows_reg]`` if the word's ``rows_reg`` is not ``ZERO`` else the ``rows`` field
(``entry.regs[0]`` holds ``R[rows_reg]``), ``A = addr + R[preg] * pmul``
(``entry.regs[1]`` holds ``R[preg]``), ``n = rows * row_bytes``. Element ``e`` of row ``r``
is space bytes ``A + r * row_bytes + 4 e`` .. ``+ 3`` (a little-endian float32); neither
``A`` nor ``row_bytes`` need be beat-aligned, and ``A`` need not even be a multiple of 4.

- LD_KV: the rows into float32 buffer ``buf``: element ``e`` of row ``r`` at word
  ``r * row_words + e // L``, lane ``e % L`` (``L = sfu_lanes``); for ``KS`` and ``VS``
  (stored transposed, :mod:`flightllm.hw.buffers`) at word ``e * row_words + r // L``, lane
  ``r % L``. The golden model: ``bufs[buf] = kv[A:A + n].view('<f4').reshape(rows, row_bytes / 4)``.
- ST_KV: the float32 scales of int8 buffer ``buf`` (its ``.scale`` region, the first
  ``row_bytes / 4`` of each row) to space KV: ``kv[A:A + n] = scales``.
- ST_OUT: float32 rows of ``buf`` (not ``KS``/``VS``) to space OUT: ``out[A:A + n] = rows``.
  A partial first or last beat is written with ``wstrb`` (never read-modify-write).

Faults
------
``fault`` (with the entry's pc) drops the entry; the engine takes nothing more until
``abort``, which clears it. The checks, against the golden model's (``GoldenError`` in
:class:`~flightllm.runtime.golden.Golden`):

================================================  ===================  =======================
check                                             golden model         RTL
================================================  ===================  =======================
the opcode is the engine's                        (dispatch)           yes
``space`` is KV (LD_KV, ST_KV), OUT (ST_OUT)      yes                  yes
``A + n`` within space KV                         ``plan kv_bytes``    the space's room (a)
``A + n`` within space OUT                        ``max_seq x row``    the space's room (a)
``row_bytes`` a multiple of 4                     yes (b)              yes
``buf`` holds float32 (LD_KV, ST_OUT) / int8      when it runs (c)     by the buffer (c)
``rows``, ``row_bytes / 4`` fit ``buf``           no                   yes (:func:`targets`)
``row_bytes`` is ``buf``'s row width (ST)         when it runs         no
================================================  ===================  =======================

(a) The kernel knows only its arguments: a space's room is what they leave it,
``(out_space - kv_space) * K`` bytes for KV and ``(tok_space - out_space) * K`` for OUT.
:func:`flightllm.hw.memmap.memory_map` rounds each space up to whole granules per channel
and a page, so the room is at least the golden model's bound: what the golden model
accepts never faults here, and nothing the RTL accepts leaves its space. A transfer
between the two bounds (a compiler bug) runs here and raises in the golden model.
(b) ST_KV and ST_OUT when they run (against the buffer's row), LD_KV always (also for
``rows = 0``). (c) The golden model decides from
what the buffer holds when the instruction runs; the RTL by the buffer: LD_KV takes the
float32 buffers, ST_OUT those but ``KS``/``VS``, ST_KV the int8 ones (``HQ QQ KQ VQ PQ``).
The compiler's programs never tell the two apart.

Structure (LD)::

  issue -> entry regs -> checks, A, n (CALC_STAGES) -+-> fault, fault_pc
                                                     +-> cmd loop -> cmd[ch] -> BurstReader[ch] <-> axi[ch]
                                                     +-> job FIFO                       | data[ch]
                                                                                        v
    merge (the channels in granule order) -> delay by (-A) % 4 bytes -> ring (C elements;
    a beat in at a beat-aligned slot) -> chunk reg (<= L elements of one row, from any slot) -+
      plain buffer: word r * row_words + j, lanes masked ------------------------------------+--> wr
      KS/VS: L skewed lane memories, 2 halves of buf_kv_heads entries: position r writes     |
        lane r % L of every kv head (bank (h + l) % L, entry h); a full block of L positions |
        goes to the emitter: word h * row_words + r // L per kv head, while the next block --+
        collects in the other half
    done <- a FIFO of each job's write count, retired by wr_done

Structure (ST)::

  issue -> entry regs -> checks (CALC_STAGES) -+-> fault | cmd loop -> cmd[ch] -> BurstWriter[ch] <-> axi[ch]
                                               +-> job FIFO                 ^ data[ch], strb   | done[ch]
    rd_req (credit: the rdq's room) -> rd_data -> rdq -> ring (a word's first min(L, left)     |
      lanes in at any slot) -> E elements out -> delay by A % 4 bytes -> strobes (first, last |
      beat) -> space beat reg -> the channel of its granule ----------------------------------+
    done <- two instruction slots: commands per channel vs the writers' done pulses <---------+

Rates. One space beat (``W`` bytes) per cycle in both directions, whatever ``A``: the
buffer side moves up to ``L`` elements (one word) per cycle, so plain rows of at least
``L`` elements stream at the beat rate when ``4 L >= W`` (the ring holds ``C >= L + 2 E``
elements, ``E = W / 4``, so neither side waits for the other's alignment). Short rows move
one row per cycle; LD into KS/VS one position (``row_bytes / 4`` kv heads, in chunks of
``L``) per cycle, at most a beat, and each block of ``L`` positions leaves as
``kv_heads`` full words while the next collects. The golden cycle model charges
``n / (K x channel rate)``: with ``K > 1`` the single merge (``W`` bytes per cycle) and the
buffer port (``4 L`` bytes per cycle) are the limit, not HBM.

Abort. The front end drops its entry and issues no more commands. LD drains every reader
(its commands' data) and drops it; ST gives every writer the beats its commands still
owe with ``wstrb = 0`` (nothing written) and waits for every B; buffer reads and writes
in flight land. Then ``busy`` falls.

AXI parameters (``max_burst``, ``fifo_depth``, ``outstanding``) are constructor arguments.
On a port shared with another writer (:class:`~flightllm.hw.axi.WriteMux`) a burst of ST
holds W for about ``K x burst`` cycles while the kv channels take turns, so ST's default
bursts are short. The writers get their commands as soon as the loop makes them (the
data follows within a few cycles, read from the buffers).
"""

from __future__ import annotations

from amaranth import Array, Cat, Const, Module, Mux, ResetInserter, Signal, signed, unsigned
from amaranth.lib import data, fifo, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out
from amaranth.utils import ceil_log2, exact_log2

from .axi import BEATS_BITS, BurstReader, BurstWriter, axi4_signature
from .buffers import Reach, buffer_map, capacity, port_signature
from .control import PC_BITS, entry_layout
from .isa import _FIELDS, REG_BITS, UNIT_OF, WORD_BITS, Buf, MemFmt, Opcode, Space, Unit
from .memmap import GRANULE
from .params import HwParams

__all__ = ["SpaceLoad", "SpaceStore", "UnitMux", "LdUnit", "StUnit", "space_commands", "mem_op",
           "space_args_layout", "targets", "CALC_STAGES"]

_INT8 = (Buf.HQ, Buf.QQ, Buf.KQ, Buf.VQ, Buf.PQ)
_TRANSPOSED = (Buf.KS, Buf.VS)
CALC_STAGES = 6             #: cycles from taking an entry to its fault or its first command


def _bits(n: int) -> int:
    """Bits of an unsigned value up to ``n``."""
    return max(1, int(n).bit_length())


def space_args_layout() -> data.StructLayout:
    """The kernel arguments the engines read: the spaces' byte offsets in each kv channel's
    buffer (:mod:`flightllm.hw.regmap`, :mod:`flightllm.hw.memmap`)."""
    return data.StructLayout({"kv_space": unsigned(32), "out_space": unsigned(32), "tok_space": unsigned(32)})


def targets(params: HwParams, op: Opcode) -> dict:
    """Buf -> (region, rows, elements per row, transposed) that ``op`` may move, in the golden
    model's terms (rows x elements; KS/VS positions x kv heads); region from
    :func:`~flightllm.hw.buffers.buffer_map` (ST_KV: the buffer's ``.scale`` region)."""
    bm, cap = buffer_map(params), capacity(params)
    out = {}
    for b in Buf:
        if op == Opcode.ST_KV:
            if b in _INT8:
                r = bm[b.name + ".scale"]
                out[b] = (r, r.rows, r.width, False)
        elif b not in _INT8 and not (op == Opcode.ST_OUT and b in _TRANSPOSED):
            rows, width = cap[b]
            out[b] = (bm[b.name], rows, width, b in _TRANSPOSED)
    return out


def mem_op(ins, regs) -> dict:
    """A ``MemFmt`` instruction ``ins`` with registers ``regs`` (16 ints) read as the
    dispatcher hands it over: ``rows``, ``addr`` (``A``), ``nbytes``, ``row_bytes``,
    ``buf``, ``space``."""
    f = ins.f

    def v(name):
        x = f.get(name, 0)
        return x.value if hasattr(x, "value") else int(x)

    rows = regs[v("rows_reg")] if v("rows_reg") else v("rows")
    addr = v("addr") + regs[v("preg")] * v("pmul")
    return dict(rows=rows, addr=addr, nbytes=rows * v("row_bytes"), row_bytes=v("row_bytes"), buf=v("buf"),
                space=v("space"))


def space_commands(addr: int, nbytes: int, kv_channels: int, beat_bytes: int, seg_granules: int) -> list:
    """The commands the front end issues for ``nbytes`` bytes of a space from byte ``addr``:
    ``[(kv channel, first beat in that channel's part of the space, beats), ...]`` in issue
    order (module docstring). The RTL's command loop is this function."""
    if nbytes == 0:
        return []
    K, G, S = kv_channels, GRANULE // beat_bytes, seg_granules
    sb0, sb1 = addr // beat_bytes, (addr + nbytes - 1) // beat_bytes
    g0, j0, g1, j1 = sb0 // G, sb0 % G, sb1 // G, sb1 % G
    out, gs = [], g0
    while True:
        for k in range(K):
            gk = gs + k
            if gk > g1:
                return out
            rem = g1 - gk
            nall = rem // K + 1
            cnt = min(S, nall)
            first, end = gk == g0, cnt == nall and rem % K == 0
            beats = cnt * G - (j0 if first else 0) - (G - 1 - j1 if end else 0)
            out.append((gk % K, (gk // K) * G + (j0 if first else 0), beats))
        gs += K * S


def _field(word, name):
    off, width, _ = _FIELDS[MemFmt][name]
    return word[off:off + width]


class _SpaceEngine(wiring.Component):
    """What SpaceLoad and SpaceStore share: geometry, the entry checks and the command loop."""

    OPCODES = ()

    def _geometry(self, params: HwParams, max_burst: int, seg_granules: int | None):
        """Check the parameters and set the geometry (before any submodule is built)."""
        p = self.params = params
        who = type(self).__name__
        try:
            W = p.hbm_port_bits // 8
            if W < 4 or W > GRANULE or GRANULE % W:
                raise ValueError(f"{who}: hbm_port_bits {p.hbm_port_bits}: a beat must be 4..{GRANULE} bytes "
                                 f"and divide the {GRANULE}-byte granule")
            for name in ("kv_channels", "sfu_lanes"):
                v = getattr(p, name)
                if v & (v - 1):
                    raise ValueError(f"{who}: {name} must be a power of two, not {v}")
            S = seg_granules if seg_granules is not None else max(1, max_burst // (GRANULE // W))
            if isinstance(S, bool) or not isinstance(S, int) or S < 1:
                raise ValueError(f"{who}: seg_granules must be a positive int, not {seg_granules!r}")
        except ValueError:
            self._MustUse__silence = True
            raise
        self.W, self.lgW = W, exact_log2(W)
        self.G, self.lgG = GRANULE // W, exact_log2(GRANULE // W)
        self.K, self.lgK = p.kv_channels, exact_log2(p.kv_channels)
        self.E, self.L, self.lgL = W // 4, p.sfu_lanes, exact_log2(p.sfu_lanes)
        self.S = S
        # ring elements (a multiple of E): the beat side moves E, the buffer side up to L per cycle,
        # and both keep moving whatever the start's offset in a beat when C >= L + 2 E
        self.C = 1 << ceil_log2(self.L + 2 * self.E)

    def __init__(self, params: HwParams, members: dict):
        p = params
        self.kinds = {op: targets(p, op) for op in self.OPCODES}
        regs = buffer_map(p)
        self.n_regions = len(regs)
        self.word_bits = max(1, (max(r.words for r in regs.values()) - 1).bit_length())
        allt = [t for k in self.kinds.values() for t in k.values()]
        self.rows_bits = _bits(max(t[1] for t in allt))
        self.ne_bits = _bits(max(t[2] for t in allt))
        self.nb_bits = _bits(max(t[1] * t[2] * 4 for t in allt))
        self.rw_bits = _bits(max(t[0].row_words for t in allt))
        self.sa_bits = 32 + self.lgK + 1                     # space addresses (the room is < 2**(32 + lgK))
        self.g_bits = self.sa_bits - exact_log2(GRANULE)
        self.mb_bits = self.nb_bits - self.lgW + 2           # beats of one transfer
        moved = frozenset(t[0].name for t in allt)
        #: ``buf`` reaches the regions its opcodes move (:func:`targets`): the LD unit's (HBM ->
        #: buffers) write them, the ST unit's read them
        loads = all(UNIT_OF[op] == Unit.LD for op in self.OPCODES)
        self.reach = {"buf": Reach(writes=moved) if loads else Reach(reads=moved)}
        super().__init__({
            "issue": In(stream.Signature(entry_layout())),
            "done": Out(1), "busy": Out(1), "abort": In(1), "fault": Out(1), "fault_pc": Out(PC_BITS),
            "spaces": In(space_args_layout()),
            "buf": Out(port_signature(p)),
            "axi_error": Out(1),
            **members,
        })

    @property
    def opcodes(self) -> tuple:
        """The opcodes the engine executes (what :class:`UnitMux` routes to it)."""
        return self.OPCODES

    def _job_layout(self) -> data.StructLayout:
        W = self.W
        return data.StructLayout({
            "empty": 1,                                    # n == 0: nothing to move
            "mbeats": self.mb_bits,                        # space beats
            "ch0": max(1, self.lgK), "j0": max(1, self.lgG),   # the first space beat's channel, beat in granule
            "xbeats": self.mb_bits,                        # LD: delayed beats; ST: ring beats
            "d": 2,                                        # LD: (-A) % 4; ST: A % 4
            "p0": _bits(self.E),                           # LD: first element in the ring; ST: (A % W) // 4
            "first_strb": W, "last_strb": W,               # ST: strobes of the first and last space beat
            "rows": self.rows_bits, "ne": self.ne_bits, "row_words": self.rw_bits,
            "region": range(self.n_regions), "transposed": 1,
        })

    def _job_fields(self, m, job, A, n, off):
        raise NotImplementedError

    # ---------------------------------------------------------------------------- front end
    def _front(self, m, gate, can_decide, on_decide):
        """The entry checks and the command loop (module docstring). ``gate``: the engine may
        take an entry; ``can_decide``: it can take a job now; ``on_decide(job)`` adds the comb
        statements of the decide cycle of a good entry. Returns a namespace of signals."""
        W, lgW, G, lgG, K, lgK, S = self.W, self.lgW, self.G, self.lgG, self.K, self.lgK, self.S
        ns = type("Front", (), {})()
        issue, abort = self.issue, self.abort
        IDLE, CALC, DECIDE, CMD = range(4)
        state = ns.state = Signal(range(4))
        calc = Signal(range(CALC_STAGES + 1))
        e_word, e_pc = Signal(WORD_BITS), Signal(PC_BITS)
        e_r0, e_r1 = Signal(REG_BITS), Signal(REG_BITS)
        m.d.comb += issue.ready.eq((state == IDLE) & ~self.fault & ~abort & gate)
        with m.If(issue.valid & issue.ready):
            m.d.sync += [e_word.eq(issue.payload.word), e_pc.eq(issue.payload.pc),
                         e_r0.eq(issue.payload.regs[0]), e_r1.eq(issue.payload.regs[1]),
                         state.eq(CALC), calc.eq(0)]

        # -- the checks and the numbers: a free-running pipeline on the entry registers
        op = e_word[:6]
        buf = _field(e_word, "buf")
        space = _field(e_word, "space")
        rb = _field(e_word, "row_bytes")
        s1_rows = Signal(REG_BITS)
        s1_kind_ok, s1_space_ok, s1_buf_ok, s1_out = Signal(), Signal(), Signal(), Signal()
        s1_caprows, s1_capw = Signal(self.rows_bits), Signal(self.ne_bits)
        s1_region, s1_rw, s1_tr = Signal(range(self.n_regions)), Signal(self.rw_bits), Signal()
        m.d.sync += [s1_rows.eq(Mux(_field(e_word, "rows_reg") != 0, e_r0, _field(e_word, "rows"))),
                     s1_kind_ok.eq(0), s1_space_ok.eq(0), s1_buf_ok.eq(0), s1_out.eq(0)]
        with m.Switch(op):
            for opc, tgt in self.kinds.items():
                with m.Case(opc.value):
                    want = Space.OUT if opc == Opcode.ST_OUT else Space.KV
                    m.d.sync += [s1_kind_ok.eq(1), s1_space_ok.eq(space == want.value),
                                 s1_out.eq(want == Space.OUT)]
                    with m.Switch(buf):
                        for b, (reg, rows, width, tr) in tgt.items():
                            with m.Case(b.value):
                                m.d.sync += [s1_buf_ok.eq(1), s1_caprows.eq(rows), s1_capw.eq(width),
                                             s1_region.eq(reg.id), s1_rw.eq(reg.row_words), s1_tr.eq(tr)]
        # products (two register stages after each: the DSPs' M and P registers)
        s2_prod, s2_nb = Signal(REG_BITS + 24), Signal(REG_BITS + 20)
        s2_ok, s2_fit = Signal(), Signal()
        m.d.sync += [s2_prod.eq(e_r1 * _field(e_word, "pmul")), s2_nb.eq(s1_rows * rb),
                     s2_ok.eq(s1_kind_ok & s1_space_ok & s1_buf_ok & (rb[:2] == 0)),
                     s2_fit.eq((s1_rows <= s1_caprows) & (rb[2:] <= s1_capw))]
        s3_prod, s3_nb, s3_ok = Signal.like(s2_prod), Signal.like(s2_nb), Signal()
        m.d.sync += [s3_prod.eq(s2_prod), s3_nb.eq(s2_nb), s3_ok.eq(s2_ok & s2_fit)]
        s4_a, s4_nb, s4_ok = Signal(REG_BITS + 24 + 1), Signal.like(s3_nb), Signal()
        m.d.sync += [s4_a.eq(_field(e_word, "addr") + s3_prod), s4_nb.eq(s3_nb), s4_ok.eq(s3_ok)]
        s5_end, s5_a, s5_nb, s5_ok = Signal(len(s4_a) + 1), Signal.like(s4_a), Signal.like(s4_nb), Signal()
        m.d.sync += [s5_end.eq(s4_a + s4_nb), s5_a.eq(s4_a), s5_nb.eq(s4_nb), s5_ok.eq(s4_ok)]
        # the spaces' room, from the arguments
        sp = self.spaces
        lim_kv, lim_out = Signal(self.sa_bits), Signal(self.sa_bits)
        m.d.sync += [lim_kv.eq(Mux(sp.out_space >= sp.kv_space, (sp.out_space - sp.kv_space)[:32] << lgK, 0)),
                     lim_out.eq(Mux(sp.tok_space >= sp.out_space, (sp.tok_space - sp.out_space)[:32] << lgK, 0))]
        s6_ok = Signal()
        A, n = Signal(self.sa_bits), Signal(self.nb_bits)
        m.d.sync += [s6_ok.eq(s5_ok & (s5_end <= Mux(s1_out, lim_out, lim_kv))), A.eq(s5_a), n.eq(s5_nb)]

        # -- the job (from A and n; meaningful when s6_ok)
        job = Signal(self._job_layout())
        end1 = Signal(self.sa_bits)
        m.d.comb += end1.eq(A + n - 1)
        sb0, sb1 = A[lgW:], end1[lgW:]
        off, lastoff = A[:lgW], end1[:lgW]
        hi_sh = Signal(lgW)
        m.d.comb += hi_sh.eq(~lastoff)                    # W - 1 - lastoff
        m.d.comb += [
            job.empty.eq(n == 0),
            job.mbeats.eq(sb1 - sb0 + 1),
            job.ch0.eq(A[6:6 + lgK] if lgK else 0),
            job.j0.eq(sb0[:lgG] if lgG else 0),
            job.rows.eq(s1_rows), job.ne.eq(rb[2:]), job.row_words.eq(s1_rw),
            job.region.eq(s1_region), job.transposed.eq(s1_tr),
            job.first_strb.eq(Const((1 << W) - 1, W) << off),
            job.last_strb.eq(Const((1 << W) - 1, W) >> hi_sh),
        ]
        self._job_fields(m, job, A, n, off)
        ns.n_zero = n == 0

        # -- decide: fault, or a job and the command loop
        g0, g1 = Signal(self.g_bits), Signal(self.g_bits)
        j0, j1 = Signal(max(1, lgG)), Signal(max(1, lgG))
        gs, k = Signal(self.g_bits + 1), Signal(range(max(K, 2)))
        base = Signal(32)
        ns.decide = Signal()
        with m.If(state == CALC):
            m.d.sync += calc.eq(calc + 1)
            with m.If(calc == CALC_STAGES - 1):
                m.d.sync += state.eq(DECIDE)
        with m.If(state == DECIDE):
            with m.If(~s6_ok):
                m.d.sync += [self.fault.eq(1), self.fault_pc.eq(e_pc), state.eq(IDLE)]
            with m.Elif(can_decide):
                m.d.comb += ns.decide.eq(1)
                on_decide(job)
                m.d.sync += [g0.eq(sb0 >> lgG), j0.eq(sb0[:lgG] if lgG else 0),
                             g1.eq(sb1 >> lgG), j1.eq(sb1[:lgG] if lgG else 0),
                             gs.eq(sb0 >> lgG), k.eq(0),
                             base.eq(Mux(s1_out, sp.out_space, sp.kv_space)),
                             state.eq(Mux(n == 0, IDLE, CMD))]

        # -- the command loop (space_commands)
        ns.cmd_v, ns.cmd_ch = Signal(), Signal(range(max(K, 2)))
        ns.cmd_addr, ns.cmd_beats = Signal(36), Signal(BEATS_BITS)
        ns.cmd_rdy = Signal()
        cmd_fire = ns.cmd_fire = Signal()
        m.d.comb += cmd_fire.eq(ns.cmd_v & ns.cmd_rdy)
        gk = Signal(self.g_bits + 1)
        m.d.comb += gk.eq(gs + k)
        past = gk > g1
        rem = Signal(self.g_bits)
        m.d.comb += rem.eq(g1 - gk)
        nall = Signal(self.g_bits + 1)
        m.d.comb += nall.eq((rem >> lgK) + 1)
        cnt = Signal(range(S + 1))
        m.d.comb += cnt.eq(Mux(nall < S, nall, S))
        first = gk == g0
        last = (nall <= S) & ((rem[:lgK] == 0) if lgK else Const(1))
        beats = Signal(BEATS_BITS)
        m.d.comb += beats.eq((cnt << lgG) - Mux(first, j0, 0) - Mux(last, G - 1 - j1, 0))
        lo = Signal(self.g_bits + lgG + 1)
        m.d.comb += lo.eq(((gk >> lgK) << lgG) + Mux(first, j0, 0))
        ns.loop_end = Signal()
        with m.If(cmd_fire):
            m.d.sync += ns.cmd_v.eq(0)
        with m.If((state == CMD) & (~ns.cmd_v | cmd_fire)):
            with m.If(past):
                m.d.comb += ns.loop_end.eq(1)
                m.d.sync += state.eq(IDLE)
            with m.Else():
                m.d.sync += [ns.cmd_v.eq(1), ns.cmd_ch.eq(gk[:lgK] if lgK else 0),
                             ns.cmd_addr.eq(base + (lo << lgW)), ns.cmd_beats.eq(beats)]
                if K > 1:
                    m.d.sync += k.eq(k + 1)
                with m.If(k == K - 1):
                    m.d.sync += gs.eq(gs + K * S)
        ns.idle = (state == IDLE) & ~ns.cmd_v
        with m.If(abort):
            m.d.sync += [state.eq(IDLE), ns.cmd_v.eq(0), self.fault.eq(0)]
        return ns


# =========================================================================== LD_KV
class SpaceLoad(_SpaceEngine):
    """LD_KV: rows of space KV -> a float32 buffer (module docstring).

    Parameters
    ----------
    params : HwParams
    addr_bits : int
        Width of the AXI addresses (channel buffer offsets; the kernel adds ``chNN``).
    max_burst : int
        Longest read burst (beats).
    fifo_depth : int, optional
        Each reader's data FIFO in beats (default ``2 * max_burst``): with ``K`` channels
        taking turns a channel needs about ``latency / K`` beats in flight.
    seg_granules : int, optional
        Granules per channel per command (default ``max_burst / G``: one burst).

    Attributes
    ----------
    issue : In(stream of :func:`~flightllm.hw.control.entry_layout`)
    done, busy : Out(1)
    abort : In(1)
    fault : Out(1), fault_pc : Out(PC_BITS)
    spaces : In(:func:`space_args_layout`)
        The kernel arguments ``kv_space``, ``out_space``, ``tok_space``.
    buf : Out(:func:`~flightllm.hw.buffers.port_signature`)
        A buffer client port (writes only).
    axi : Out(axi4_signature(addr_bits, hbm_port_bits, write=False)).array(kv_channels)
        Kv channel ``i`` (weight channel ``weight_channels - kv_channels + i``).
    axi_error : Out(1)
        Sticky: a read came back with an error response (its data is used all the same).
    """

    OPCODES = (Opcode.LD_KV,)

    def __init__(self, params: HwParams, *, addr_bits: int = 64, max_burst: int = 32, fifo_depth: int | None = None,
                 seg_granules: int | None = None):
        self._geometry(params, max_burst, seg_granules)
        self.addr_bits = addr_bits
        self.fifo_depth = fifo_depth if fifo_depth is not None else 2 * max_burst
        self.readers = [BurstReader(params.hbm_port_bits, addr_bits, max_burst, self.fifo_depth)
                        for _ in range(params.kv_channels)]
        super().__init__(params, {
            "axi": Out(axi4_signature(addr_bits, params.hbm_port_bits, write=False)).array(params.kv_channels),
        })
        bm = buffer_map(params)
        self.H = max(bm[b.name].rows for b in _TRANSPOSED)      # kv heads the KS/VS regions hold

    def _job_fields(self, m, job, A, n, off):
        d = Signal(2)
        m.d.comb += d.eq(-A[:2])                           # the delay that makes A's byte 4-aligned
        m.d.comb += [job.d.eq(d), job.xbeats.eq((off + d + n + self.W - 1) >> self.lgW),
                     job.p0.eq((off + d) >> 2)]

    def elaborate(self, platform):
        m = Module()
        W, E, L, lgL, K, G, C = self.W, self.E, self.L, self.lgL, self.K, self.G, self.C
        lgC = ceil_log2(C)
        abort = self.abort
        for i, r in enumerate(self.readers):
            m.submodules[f"reader{i}"] = r
            wiring.connect(m, wiring.flipped(self.axi[i]), r.axi)
        m.d.comb += self.axi_error.eq(Cat(r.error for r in self.readers).any())

        jl = self._job_layout()
        jq = m.submodules.jobq = ResetInserter(abort)(fifo.SyncFIFO(width=jl.size, depth=2))

        def on_decide(job):
            m.d.comb += [jq.w_en.eq(1), jq.w_data.eq(job)]
        f = self._front(m, Const(1), jq.w_rdy, on_decide)
        for i, r in enumerate(self.readers):
            m.d.comb += [r.cmd.valid.eq(f.cmd_v & (f.cmd_ch == i)),
                         r.cmd.payload.addr.eq(f.cmd_addr), r.cmd.payload.beats.eq(f.cmd_beats)]
        m.d.comb += f.cmd_rdy.eq(Array(r.cmd.ready for r in self.readers)[f.cmd_ch])

        # ------------------------------------------------------------- state of the job
        J = Signal(jl)
        active = Signal()
        m_ch, m_j = Signal(range(max(K, 2))), Signal(max(1, self.lgG))       # merge: channel, beat in granule
        m_left, t_left = Signal(self.mb_bits), Signal(self.mb_bits)  # space beats to pop, delayed beats to make
        prev = Signal(8 * W)
        ring = [Signal(32, name=f"ring{i}") for i in range(C)]
        wb = Signal(range(C // E)) if C > E else Const(0, 1)         # ring block the next beat goes to
        rp = Signal(lgC)
        avail = Signal(signed(lgC + 2))                              # elements from rp (negative: p0 to skip)
        c_left, c_rows = Signal(self.ne_bits), Signal(self.rows_bits)
        c_r, c_j = Signal(self.rows_bits), Signal(self.ne_bits)
        c_wbase = Signal(self.word_bits + 1)
        ck_v, ck_need = Signal(), Signal(range(L + 1))               # the chunk register
        ck_data = Signal(data.ArrayLayout(32, L))
        ck_word, ck_r, ck_j = Signal(self.word_bits), Signal(self.rows_bits), Signal(self.ne_bits)
        ck_bend, ck_jend = Signal(), Signal()
        hb = max(1, (self.H - 1).bit_length())
        em_busy, em_half = Signal(), Signal()                        # the KS/VS emitter
        em_h, em_H = Signal(hb + 1), Signal(hb + 1)
        em_wbase = Signal(self.word_bits + 1)
        em_fill, em_jend = Signal(range(L + 1)), Signal()
        o_v, o_h, o_word, o_last = Signal(), Signal(max(1, lgL)), Signal(self.word_bits), Signal()
        o_mask = Signal(L)
        pp = Signal()                                                # the half being collected
        cq = m.submodules.countq = ResetInserter(abort)(fifo.SyncFIFO(width=self.word_bits + 1, depth=4))
        jw = Signal(self.word_bits + 1)                              # writes of the job so far
        landed = Signal(self.word_bits + 2)
        outst = Signal(8)                                            # writes issued, not landed

        wr = self.buf.wr
        wr_fire = Signal()
        m.d.comb += [self.buf.rd_req.valid.eq(0), wr_fire.eq(wr.valid & wr.ready)]
        final_ok = cq.w_rdy

        # -- merge the channels' beats in granule order, delay by d bytes, into the ring
        rdata = Array(r.data for r in self.readers)
        cur, cur_v = rdata[m_ch].payload, rdata[m_ch].valid
        t_go = Signal()
        m.d.comb += t_go.eq(active & (t_left != 0) & (avail <= C - E) & ((m_left == 0) | cur_v) & ~abort)
        pop = t_go & (m_left != 0)
        for i, r in enumerate(self.readers):
            m.d.comb += r.data.ready.eq((pop & (m_ch == i)) | abort)
        curz = Signal(8 * W)
        m.d.comb += curz.eq(Mux(m_left != 0, cur, 0))
        tbeat = Signal(8 * W)
        with m.Switch(J.d):
            for dd in range(4):
                with m.Case(dd):
                    m.d.comb += tbeat.eq(curz if dd == 0 else Cat(prev[8 * (W - dd):], curz[:8 * (W - dd)]))
        with m.If(t_go):
            m.d.sync += t_left.eq(t_left - 1)
            with m.If(m_left != 0):
                m.d.sync += [prev.eq(cur), m_left.eq(m_left - 1)]
                if G > 1:
                    m.d.sync += m_j.eq(m_j + 1)
                if K > 1:
                    with m.If(m_j == G - 1):
                        m.d.sync += m_ch.eq(m_ch + 1)
            for blk in range(C // E):
                with m.If(wb == blk):
                    m.d.sync += [ring[blk * E + e].eq(tbeat[32 * e:32 * e + 32]) for e in range(E)]
            if C > E:
                m.d.sync += wb.eq(wb + 1)

        # -- chunks of <= L elements of one row, from any ring slot
        need = Signal(range(L + 1))
        m.d.comb += need.eq(Mux(c_left < L, c_left, L))
        row_end = c_left <= L
        ck_take, c_go = Signal(), Signal()
        m.d.comb += c_go.eq(active & (avail >= need) & (~ck_v | ck_take) & ~abort)
        ring_a = Array(ring)
        with m.If(c_go):
            blk_end = (c_r[:lgL] == L - 1) if lgL else Const(1)
            m.d.sync += [ck_v.eq(1), ck_need.eq(need), ck_word.eq(c_wbase + c_j), ck_r.eq(c_r), ck_j.eq(c_j),
                         ck_jend.eq(row_end & (c_rows == 1)), ck_bend.eq(row_end & (blk_end | (c_rows == 1))),
                         rp.eq(rp + need)]
            m.d.sync += [ck_data[i].eq(ring_a[(rp + i)[:lgC]]) for i in range(L)]
            with m.If(row_end):
                m.d.sync += [c_left.eq(J.ne), c_rows.eq(c_rows - 1), c_r.eq(c_r + 1), c_j.eq(0),
                             c_wbase.eq(c_wbase + J.row_words)]
                with m.If(c_rows == 1):
                    m.d.sync += active.eq(0)
            with m.Else():
                m.d.sync += [c_left.eq(c_left - L), c_j.eq(c_j + 1)]
        with m.Elif(ck_take):
            m.d.sync += ck_v.eq(0)
        m.d.sync += avail.eq(avail + Mux(t_go, E, 0) - Mux(c_go, need, 0))

        # -- KS/VS: L skewed lane memories of two halves of H kv heads: cell (head h, position
        #    l of the block) in bank (h + l) % L at address h, so a position writes one entry
        #    of every bank and a head reads one entry of every bank
        banks = []
        for b in range(L):
            mem = Memory(shape=32, depth=2 << hb, init=[])
            m.submodules[f"tbank{b}"] = mem
            banks.append((mem.write_port(), mem.read_port(transparent_for=())))
        tr_take = Signal()
        m.d.comb += tr_take.eq(ck_v & J.transposed & (~ck_bend | ~em_busy) & ~abort)
        l_pos = ck_r[:lgL] if lgL else Const(0, 1)
        ck_lanes = Array(ck_data[i] for i in range(L))
        for b, (wp, _) in enumerate(banks):
            i = Signal(max(1, lgL), name=f"tb_i{b}")
            m.d.comb += i.eq((b - l_pos)[:lgL] if lgL else 0)
            h = Cat(i[:lgL], ck_j) if lgL else ck_j
            m.d.comb += [wp.addr.eq(Cat(h[:hb], pp)), wp.data.eq(ck_lanes[i]),
                         wp.en.eq(tr_take & (i < ck_need))]
        with m.If(tr_take & ck_bend):
            m.d.sync += [em_busy.eq(1), em_half.eq(pp), em_h.eq(0), em_H.eq(J.ne),
                         em_wbase.eq(ck_r >> lgL), em_fill.eq(l_pos + 1), em_jend.eq(ck_jend), pp.eq(~pp)]
        em_fire = o_v & wr.ready & (~o_last | final_ok) & ~abort
        em_rd = em_busy & (~o_v | em_fire) & ~abort
        for _, rdp in banks:
            m.d.comb += [rdp.addr.eq(Cat(em_h[:hb], em_half)), rdp.en.eq(em_rd)]
        with m.If(em_rd):
            m.d.sync += [o_v.eq(1), o_h.eq(em_h[:lgL] if lgL else 0), o_word.eq(em_wbase),
                         o_mask.eq((Const(1, L + 1) << em_fill) - 1), o_last.eq(em_jend & (em_h == em_H - 1)),
                         em_h.eq(em_h + 1), em_wbase.eq(em_wbase + J.row_words)]
            with m.If(em_h == em_H - 1):
                m.d.sync += em_busy.eq(0)
        with m.Elif(em_fire):
            m.d.sync += o_v.eq(0)
        rot = Array(rdp.data for _, rdp in banks)

        # -- the write port: the emitter's word, or a plain chunk
        m.d.comb += ck_take.eq(Mux(J.transposed, tr_take, wr.ready & ~o_v & (~ck_jend | final_ok) & ~abort))
        with m.If(o_v):
            m.d.comb += [wr.valid.eq((~o_last | final_ok) & ~abort), wr.payload.region.eq(J.region),
                         wr.payload.word.eq(o_word), wr.payload.mask.eq(o_mask)]
            m.d.comb += [wr.payload.data[l].eq(rot[(o_h + l)[:lgL]] if lgL else rot[0]) for l in range(L)]
        with m.Else():
            m.d.comb += [wr.valid.eq(ck_v & ~J.transposed & (~ck_jend | final_ok) & ~abort),
                         wr.payload.region.eq(J.region), wr.payload.word.eq(ck_word),
                         wr.payload.mask.eq((Const(1, L + 1) << ck_need) - 1), wr.payload.data.eq(ck_data)]
        final = wr_fire & Mux(o_v, o_last, ck_jend)
        with m.If(wr_fire):
            m.d.sync += jw.eq(Mux(final, 0, jw + 1))

        # -- done: the head job's writes have all landed
        fin = Signal()
        m.d.comb += [fin.eq(cq.r_rdy & (landed >= cq.r_data) & ~abort), cq.r_en.eq(fin)]
        m.d.sync += [landed.eq(landed + self.buf.wr_done - Mux(fin, cq.r_data, 0)), self.done.eq(fin),
                     outst.eq(outst + wr_fire - self.buf.wr_done)]

        # -- start a job when the previous one has issued all its writes (an empty job: a 0 count)
        start, zero_done = Signal(), Signal()
        m.d.comb += start.eq(jq.r_rdy & ~active & ~ck_v & ~em_busy & ~o_v & ~abort)
        jn = data.View(jl, jq.r_data)
        with m.If(start):
            with m.If(jn.empty):
                m.d.comb += [zero_done.eq(cq.w_rdy), jq.r_en.eq(cq.w_rdy)]
            with m.Else():
                m.d.comb += jq.r_en.eq(1)
                m.d.sync += [J.eq(jn), active.eq(1),
                             m_ch.eq(jn.ch0), m_j.eq(jn.j0), m_left.eq(jn.mbeats), t_left.eq(jn.xbeats),
                             rp.eq(jn.p0), avail.eq(-jn.p0),
                             c_left.eq(jn.ne), c_rows.eq(jn.rows), c_r.eq(0), c_j.eq(0), c_wbase.eq(0)]
                if C > E:
                    m.d.sync += wb.eq(0)
        m.d.comb += [cq.w_en.eq(final | zero_done), cq.w_data.eq(Mux(zero_done, 0, jw + 1))]

        with m.If(abort):
            m.d.sync += [active.eq(0), ck_v.eq(0), em_busy.eq(0), o_v.eq(0), jw.eq(0), landed.eq(0)]
        readers_idle = Cat(r.idle for r in self.readers).all()
        m.d.comb += self.busy.eq(~f.idle | jq.r_rdy | active | ck_v | em_busy | o_v | cq.r_rdy | (outst != 0)
                                 | ~readers_idle)
        return m


# =========================================================================== ST_KV, ST_OUT
class SpaceStore(_SpaceEngine):
    """ST_KV (int8 buffers' scales -> space KV) and ST_OUT (float32 rows -> space OUT)
    (module docstring).

    Parameters
    ----------
    params : HwParams
    addr_bits : int
    max_burst : int
        Longest write burst (beats); short by default (the channels take turns, and a
        burst holds a shared port's W until its last beat).
    outstanding : int
        Bursts per writer whose B may be pending.
    seg_granules : int, optional
        Granules per channel per command (default ``max_burst / G``).
    rd_depth : int
        Buffer words in flight (the read-data FIFO).

    Attributes
    ----------
    issue, done, busy, abort, fault, fault_pc, spaces, buf, axi_error
        As :class:`SpaceLoad` (``buf`` reads only; ``axi_error``: a B with an error response).
    axi : Out(axi4_signature(addr_bits, hbm_port_bits, read=False)).array(kv_channels)
    """

    OPCODES = (Opcode.ST_KV, Opcode.ST_OUT)

    def __init__(self, params: HwParams, *, addr_bits: int = 64, max_burst: int = 8, outstanding: int = 16,
                 seg_granules: int | None = None, rd_depth: int = 8):
        self._geometry(params, max_burst, seg_granules)
        self.addr_bits, self.rd_depth = addr_bits, rd_depth
        self.writers = [BurstWriter(params.hbm_port_bits, addr_bits, max_burst, outstanding)
                        for _ in range(params.kv_channels)]
        super().__init__(params, {
            "axi": Out(axi4_signature(addr_bits, params.hbm_port_bits, read=False)).array(params.kv_channels),
        })
        self.owed_bits = _bits((outstanding + 4) * self.S * self.G)
        self.cnt_bits = _bits(-(-(1 << self.nb_bits) // (GRANULE * self.K * self.S)) + 2) + 1

    def _job_fields(self, m, job, A, n, off):
        lo4 = Signal(self.lgW)
        m.d.comb += lo4.eq(off & ~3)
        m.d.comb += [job.d.eq(A[:2]), job.xbeats.eq((lo4 + n + self.W - 1) >> self.lgW), job.p0.eq(off >> 2)]

    def elaborate(self, platform):
        m = Module()
        W, E, L, lgL, K, G, C = self.W, self.E, self.L, self.lgL, self.K, self.G, self.C
        lgC = ceil_log2(C)
        abort = self.abort
        for i, w in enumerate(self.writers):
            m.submodules[f"writer{i}"] = w
            wiring.connect(m, wiring.flipped(self.axi[i]), w.axi)
        m.d.comb += self.axi_error.eq(Cat(w.error for w in self.writers).any())

        # -- completion: two instruction slots; a slot counts its commands per channel, and
        #    retires when its loop is over and every channel's writer has that many done
        n_inst = Signal(range(3))
        oldest, cur_slot = Signal(), Signal()
        cnts = [[Signal(self.cnt_bits, name=f"cnt{s}_{c}") for c in range(K)] for s in range(2)]
        loop_done = [Signal(name=f"loop_done{s}") for s in range(2)]
        dcnt = [Signal(self.cnt_bits + 1, name=f"dcnt{c}") for c in range(K)]
        new_slot = Signal()
        m.d.comb += new_slot.eq(oldest ^ (n_inst == 1))

        jl = self._job_layout()
        jq = m.submodules.jobq = ResetInserter(abort)(fifo.SyncFIFO(width=jl.size, depth=2))

        def on_decide(job):
            m.d.comb += [jq.w_en.eq(~job.empty), jq.w_data.eq(job)]
        f = self._front(m, n_inst < 2, jq.w_rdy, on_decide)
        for i, w in enumerate(self.writers):
            m.d.comb += [w.cmd.valid.eq(f.cmd_v & (f.cmd_ch == i)),
                         w.cmd.payload.addr.eq(f.cmd_addr), w.cmd.payload.beats.eq(f.cmd_beats)]
        m.d.comb += f.cmd_rdy.eq(Array(w.cmd.ready for w in self.writers)[f.cmd_ch])

        retire = Signal()
        o_cnt = [Mux(oldest, cnts[1][c], cnts[0][c]) for c in range(K)]
        o_done = Mux(oldest, loop_done[1], loop_done[0])
        m.d.comb += retire.eq((n_inst != 0) & o_done & Cat(dcnt[c] >= o_cnt[c] for c in range(K)).all() & ~abort)
        for c, w in enumerate(self.writers):
            m.d.sync += dcnt[c].eq(dcnt[c] + w.done - Mux(retire, o_cnt[c], 0))
        for s in range(2):
            for c in range(K):
                with m.If(retire & (oldest == s)):
                    m.d.sync += cnts[s][c].eq(0)
                with m.Elif(f.cmd_fire & (cur_slot == s) & (f.cmd_ch == c)):
                    m.d.sync += cnts[s][c].eq(cnts[s][c] + 1)
            with m.If(retire & (oldest == s)):
                m.d.sync += loop_done[s].eq(0)
            with m.If(f.decide & (new_slot == s)):
                m.d.sync += loop_done[s].eq(f.n_zero)
            with m.If(f.loop_end & (cur_slot == s)):
                m.d.sync += loop_done[s].eq(1)
        with m.If(f.decide):
            m.d.sync += [cur_slot.eq(new_slot), n_inst.eq(n_inst + 1 - retire)]
        with m.Elif(retire):
            m.d.sync += n_inst.eq(n_inst - 1)
        with m.If(retire):
            m.d.sync += oldest.eq(~oldest)
        m.d.sync += self.done.eq(retire)

        # ------------------------------------------------------------- the data path
        J = Signal(jl)
        active = Signal()
        rd, rdd = self.buf.rd_req, self.buf.rd_data
        m.d.comb += self.buf.wr.valid.eq(0)
        r_left, r_rows = Signal(self.ne_bits), Signal(self.rows_bits)       # the row reader
        r_j, r_wbase = Signal(self.ne_bits), Signal(self.word_bits + 1)
        credit = Signal(range(self.rd_depth + 1))                         # reads not yet out of rdq
        rd_out = Signal(range(self.rd_depth + 4))                         # reads whose data has not come
        rdq = m.submodules.rdq = ResetInserter(abort)(fifo.SyncFIFO(width=32 * L, depth=self.rd_depth))
        i_left, i_rows = Signal(self.ne_bits), Signal(self.rows_bits)       # ring insert
        ring = [Signal(32, name=f"ring{i}") for i in range(C)]
        wp = Signal(lgC)
        ub = Signal(range(C // E)) if C > E else Const(0, 1)               # ring block of the next beat
        occ = Signal(range(C + 1))
        u_left, s_left = Signal(self.mb_bits), Signal(self.mb_bits)        # ring beats, space beats to make
        prev = Signal(8 * W)
        s_ch, s_j = Signal(range(max(K, 2))), Signal(max(1, self.lgG))
        sb_v, sb_ch = Signal(), Signal(range(max(K, 2)))                           # the space beat register
        sb_data, sb_strb = Signal(8 * W), Signal(W)
        owed = [Signal(self.owed_bits, name=f"owed{c}") for c in range(K)]  # beats commanded, not given

        # -- buffer reads, credit-based (rd_data is always ready)
        m.d.comb += [rd.valid.eq(active & (r_rows != 0) & (credit < self.rd_depth) & ~abort),
                     rd.payload.region.eq(J.region), rd.payload.word.eq(r_wbase + r_j)]
        rd_fire = rd.valid & rd.ready
        with m.If(rd_fire):
            with m.If(r_left <= L):
                m.d.sync += [r_left.eq(J.ne), r_rows.eq(r_rows - 1), r_j.eq(0), r_wbase.eq(r_wbase + J.row_words)]
            with m.Else():
                m.d.sync += [r_left.eq(r_left - L), r_j.eq(r_j + 1)]
        m.d.comb += [rdq.w_en.eq(rdd.valid & ~abort), rdq.w_data.eq(rdd.payload)]
        m.d.sync += [credit.eq(credit + rd_fire - rdq.r_en), rd_out.eq(rd_out + rd_fire - rdd.valid)]

        # -- a word's first min(L, left) lanes into the ring at any slot
        i_need = Signal(range(L + 1))
        m.d.comb += i_need.eq(Mux(i_left < L, i_left, L))
        u_go, i_go = Signal(), Signal()
        m.d.comb += i_go.eq(active & (i_rows != 0) & rdq.r_rdy & (occ + i_need <= C) & ~abort)
        m.d.comb += rdq.r_en.eq(i_go)
        lanes = data.View(data.ArrayLayout(32, L), rdq.r_data)
        lanes_a = Array(lanes[i] for i in range(L))
        with m.If(i_go):
            for s in range(C):
                idx = Signal(lgC, name=f"ins_idx{s}")
                m.d.comb += idx.eq(s - wp)
                with m.If(idx < i_need):
                    m.d.sync += ring[s].eq(lanes_a[idx[:lgL]] if lgL else lanes[0])
            m.d.sync += wp.eq(wp + i_need)
            with m.If(i_left <= L):
                m.d.sync += [i_left.eq(J.ne), i_rows.eq(i_rows - 1)]
            with m.Else():
                m.d.sync += i_left.eq(i_left - L)
        ins_done = i_rows == 0
        m.d.sync += occ.eq(occ + Mux(i_go, i_need, 0) - Mux(u_go, Mux(occ < E, occ, E), 0))

        # -- space beats: a ring beat (E elements) delayed by d bytes, strobes, to its channel
        sb_fire = Signal()
        flush_beat = u_left == 0
        have_u = (occ >= E) | (ins_done & (occ != 0))
        s_go = Signal()
        m.d.comb += s_go.eq(active & (s_left != 0) & (flush_beat | have_u) & (~sb_v | sb_fire) & ~abort)
        m.d.comb += u_go.eq(s_go & ~flush_beat)
        ring_blocks = Array(Cat(ring[b * E:(b + 1) * E]) for b in range(C // E))
        ucur = Signal(8 * W)
        m.d.comb += ucur.eq(Mux(flush_beat, 0, ring_blocks[ub]))
        sbeat = Signal(8 * W)
        with m.Switch(J.d):
            for dd in range(4):
                with m.Case(dd):
                    m.d.comb += sbeat.eq(ucur if dd == 0 else Cat(prev[8 * (W - dd):], ucur[:8 * (W - dd)]))
        strb = Signal(W)
        m.d.comb += strb.eq(Mux(s_left == J.mbeats, J.first_strb, (1 << W) - 1)
                            & Mux(s_left == 1, J.last_strb, (1 << W) - 1))
        with m.If(s_go):
            m.d.sync += [sb_v.eq(1), sb_data.eq(sbeat), sb_strb.eq(strb), sb_ch.eq(s_ch),
                         s_left.eq(s_left - 1), prev.eq(ucur)]
            if G > 1:
                m.d.sync += s_j.eq(s_j + 1)
            if K > 1:
                with m.If(s_j == G - 1):
                    m.d.sync += s_ch.eq(s_ch + 1)
            with m.If(~flush_beat):
                m.d.sync += u_left.eq(u_left - 1)
                if C > E:
                    m.d.sync += ub.eq(ub + 1)
            with m.If(s_left == 1):
                m.d.sync += active.eq(0)
        with m.Elif(sb_fire):
            m.d.sync += sb_v.eq(0)
        wdrdy = Array(w.data.ready for w in self.writers)
        m.d.comb += sb_fire.eq(sb_v & wdrdy[sb_ch] & ~abort)
        # abort: every writer gets the beats its commands still owe, with no byte enabled
        for c, w in enumerate(self.writers):
            m.d.comb += [w.data.valid.eq(Mux(abort, owed[c] != 0, sb_v & (sb_ch == c))),
                         w.data.payload.data.eq(sb_data), w.data.payload.strb.eq(Mux(abort, 0, sb_strb))]
            dfire = w.data.valid & w.data.ready
            m.d.sync += owed[c].eq(owed[c] + Mux(f.cmd_fire & (f.cmd_ch == c), f.cmd_beats, 0) - dfire)

        start = Signal()
        m.d.comb += start.eq(jq.r_rdy & ~active & ~abort)
        with m.If(start):
            jn = data.View(jl, jq.r_data)
            m.d.comb += jq.r_en.eq(1)
            m.d.sync += [J.eq(jn), active.eq(1),
                         r_left.eq(jn.ne), r_rows.eq(jn.rows), r_j.eq(0), r_wbase.eq(0),
                         i_left.eq(jn.ne), i_rows.eq(jn.rows),
                         wp.eq(jn.p0), occ.eq(jn.p0), u_left.eq(jn.xbeats), s_left.eq(jn.mbeats),
                         s_ch.eq(jn.ch0), s_j.eq(jn.j0)]
            if C > E:
                m.d.sync += ub.eq(0)

        with m.If(abort):
            m.d.sync += [active.eq(0), sb_v.eq(0), n_inst.eq(0), oldest.eq(0), credit.eq(0)]
            m.d.sync += [x.eq(0) for row in cnts for x in row]
            m.d.sync += [x.eq(0) for x in dcnt + loop_done]
        writers_idle = Cat(w.idle for w in self.writers).all()
        m.d.comb += self.busy.eq(~f.idle | (n_inst != 0) | jq.r_rdy | active | sb_v | (rd_out != 0)
                                 | Cat(o != 0 for o in owed).any() | ~writers_idle)
        return m


# =========================================================================== the unit
class UnitMux(wiring.Component):
    """Several engines behind one unit port (``docs/kernel.md``): entries routed by opcode,
    ``done`` in issue order.

    ::

      issue --opcode--> engine k's issue      order FIFO <- the engine of each entry taken
      done  <-- [reg] <-- the head entry's engine has a done pending (a counter per engine)
      busy = any engine busy | an entry not done;  fault = an engine's (or an opcode no
      engine takes: the mux's own); abort -> every engine, clears the order

    Parameters
    ----------
    engines : sequence
        Engines with the unit contract's members (``issue``, ``done``, ``busy``, ``abort``,
        ``fault``, ``fault_pc``) and an ``opcodes`` attribute, or ``(opcodes, engine)`` pairs.
        They become submodules; the integrator wires their other ports (buffers, AXI).
    concurrent : bool
        True: an entry goes to its engine whatever the others hold (their instructions
        overlap; the order FIFO keeps ``done`` in issue order). False: only while no entry
        of another engine is undone (engines that may write the same buffer: LD).
    depth : int
        Entries taken and not yet done.

    Attributes
    ----------
    issue : In(stream of entry_layout()); done, busy, fault : Out(1); fault_pc : Out(PC_BITS);
    abort : In(1)
    """

    def __init__(self, engines, *, concurrent: bool = True, depth: int = 16):
        pairs = []
        for e in engines:
            ops, eng = e if isinstance(e, tuple) else (e.opcodes, e)
            pairs.append((tuple(Opcode(o) for o in ops), eng))
        seen = [o for ops, _ in pairs for o in ops]
        if not pairs or len(set(seen)) != len(seen):
            self._MustUse__silence = True
            raise ValueError(f"UnitMux: engines must take distinct opcodes, not {[o.name for o in seen]}")
        self.engines, self.concurrent, self.depth = pairs, concurrent, depth
        super().__init__({
            "issue": In(stream.Signature(entry_layout())),
            "done": Out(1), "busy": Out(1), "abort": In(1), "fault": Out(1), "fault_pc": Out(PC_BITS),
        })

    def elaborate(self, platform):
        m = Module()
        n = len(self.engines)
        ib = max(1, ceil_log2(n))
        abort = self.abort
        order = m.submodules.order = ResetInserter(abort)(fifo.SyncFIFO(width=ib, depth=self.depth))
        op = self.issue.payload.word[:6]
        sel, known = Signal(ib), Signal()
        for k, (ops, eng) in enumerate(self.engines):
            m.submodules[f"engine{k}"] = eng
            with m.If(Cat(op == o.value for o in ops).any()):
                m.d.comb += [sel.eq(k), known.eq(1)]
        last = Signal(ib)
        own_fault, own_pc = Signal(), Signal(PC_BITS)
        faults = Cat(e.fault for _, e in self.engines).any() | own_fault
        gate = order.w_rdy & ~faults & ~abort
        if not self.concurrent:
            gate = gate & (~order.r_rdy | (last == sel))
        for k, (_, eng) in enumerate(self.engines):
            m.d.comb += [eng.issue.payload.eq(self.issue.payload),
                         eng.issue.valid.eq(self.issue.valid & known & (sel == k) & gate),
                         eng.abort.eq(abort)]
        m.d.comb += self.issue.ready.eq(gate & (~known | Array(e.issue.ready for _, e in self.engines)[sel]))
        took = self.issue.valid & self.issue.ready
        with m.If(took & ~known):
            m.d.sync += [own_fault.eq(1), own_pc.eq(self.issue.payload.pc)]
        with m.If(took & known):
            m.d.sync += last.eq(sel)
        m.d.comb += [order.w_en.eq(took & known), order.w_data.eq(sel)]
        pend = [Signal(range(self.depth + 1), name=f"pend{k}") for k in range(n)]
        head = order.r_data
        out = Signal()
        m.d.comb += [out.eq(order.r_rdy & Array(p != 0 for p in pend)[head] & ~abort), order.r_en.eq(out)]
        for k, (_, eng) in enumerate(self.engines):
            with m.If(abort):
                m.d.sync += pend[k].eq(0)
            with m.Else():
                m.d.sync += pend[k].eq(pend[k] + eng.done - (out & (head == k)))
        m.d.sync += self.done.eq(out)
        with m.If(abort):
            m.d.sync += own_fault.eq(0)
        fpc = own_pc
        for _, eng in reversed(self.engines):
            fpc = Mux(eng.fault, eng.fault_pc, fpc)
        m.d.comb += [self.fault.eq(faults), self.fault_pc.eq(fpc),
                     self.busy.eq(Cat(e.busy for _, e in self.engines).any() | order.r_rdy)]
        return m


class LdUnit(UnitMux):
    """The LD unit: LD_KV (:class:`SpaceLoad`, built from ``params`` and ``kw`` unless
    ``engines`` is given) and the other engines given (EMBED), one engine at a time (both
    write buffers), each pipelining its own instructions."""

    def __init__(self, params: HwParams, engines=None, **kw):
        super().__init__(engines if engines is not None else [SpaceLoad(params, **kw)], concurrent=False)


class StUnit(UnitMux):
    """The ST unit: ST_KV and ST_OUT (:class:`SpaceStore`) and the other engines given
    (ST_KT), overlapping (they read buffers and write disjoint places)."""

    def __init__(self, params: HwParams, engines=None, **kw):
        super().__init__(engines if engines is not None else [SpaceStore(params, **kw)], concurrent=True)
