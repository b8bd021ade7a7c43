"""EMBED: gather embedding rows by token id from the weight channels and dequantize them.

An LD-unit engine under the unit contract of ``docs/kernel.md`` (issue / done / busy /
abort / fault). The instruction (:class:`~flightllm.hw.isa.WeightFmt`) names a packed
weight tensor (``w_off``, ``n_out`` x ``k_in``, its format from ``bits``, ``n_keep``,
``m``, ``group_log2``, ``kind`` and ``shift``); row ``t`` of the operation
(``rows = R[rows_reg]`` if ``rows_reg`` is not ``ZERO``, else 1) is the tensor row whose
index is the int32 token id at position ``R[pos_reg] + t`` of the token buffer, and goes
to row ``t`` of the float32 buffer ``dst`` as ``float32(q * S + M) * 2**-shift`` (the
golden model's ``np.ldexp(v.astype(float32), -shift)`` with ``v = q * S (+ M)`` the exact
integer, :meth:`~flightllm.hw.formats.QTensor.fixed`)::

  issue --> CHECK (fields) --> TOK: token ids, one 1-beat read per beat of the token buffer
                               (interleaved over the last kv_channels channels, hw/memmap.py)
        --> [HDR: a two-level tensor's header (D, Mn) from channel 0]
        --> ROWS: per row one read of the row's records (row issuer) --> extractor --> output
  extractor: a two-word window over the record stream of the row's channel; per record the
             row's value fields (one per beat of its chain), its scale (and min) field
  output:    per group: scale and min to fixed point, then min(group, sfu_lanes) lanes a cycle:
             q * S + M (DSP) -> I2F (hw/fp32.py) -> exponent - shift -> buffer write

Where a row lies (:mod:`flightllm.hw.formats`, "Lane-domain records"): row ``r`` is chain
``j = r % R`` of row tile ``r // R`` (``R = chains``), streamed by channel ``c = j % C`` as
local chain ``i = j // C``; its values are in the ``K / G`` records ``tile * K/G + grp``
of channel ``c`` (``header_bits + rec * record_bits`` into the tensor's region), which are
contiguous: the engine reads ``K/G * record_bits / 8`` bytes from ``w_off + header +
tile * that`` in channel ``c`` (what the golden model's timing counts: a row's values lie
in one record per group). In a record the row's values for beat ``b`` are the ``L * bits``
bits at ``(b * Rc + i) * L * bits``, its scale the field at ``Rc * G * bits + i * fb``
and its min ``Rc * fb`` further on (``fb`` 16, or 8 for the two-level sub-scales).
:func:`row_fields` is that statement in Python; the RTL computes it with shifts and one
multiply per row (``tile * row_bytes``).

Formats (:func:`embed_formats`): the build's dense formats with a scale of 4 or 8 bits:
``int8/32`` (GGUF Q8_0, what the shipped SmolLM2 and the tiny model's embedding get with
the default preset ``native``), ``int4/32`` (Q4_0), ``int4m/32`` (Q4_1) and ``int4k/32``
(two-level). Sparse and raw formats, and formats outside the build, are ``BAD_FIELD``.

Faults (``fault`` with the instruction's pc, held until ``abort``), before anything is
written: an opcode other than EMBED, a format it does not gather, ``n_out`` or ``k_in`` zero, ``k_in`` not a multiple
of the group, ``w_off`` not a multiple of 64 (no tensor starts there), ``dst`` not a
float32 token-row buffer (X H Q K V A Y G U LOG) or ``rows`` / ``k_in`` beyond its
region, positions ``R[pos_reg] .. + rows - 1`` beyond the token buffer
(``max_seq`` positions: the plan's ``max_seq``, as the golden model's; the kernel has no
argument for it yet, so tied to 0 it means ``HwParams.max_seq_len``, which the compiler's
``max_seq`` never exceeds, but then positions between the two read past the token buffer
instead of faulting), and a token id ``>= n_out`` (ids are read as unsigned: a
negative int32 is out of range too), checked on all rows before the first row is read.

Ports: :func:`read_port_signature` per weight channel (``rd[c]``: a command stream of
:func:`~flightllm.hw.axi.command_layout` and the data words, for a
:class:`~flightllm.hw.axi.BurstReader`), one buffer client port (``buf``, writes only),
``tok_space`` (the kernel argument) and ``max_seq`` (positions of the token buffer).
Addresses are byte offsets in the channel's buffer (the kernel adds the channel pointer).
One instruction at a time (EMBED is one per run or prefill chunk); ``done`` pulses once
every write of it is in the buffer (``wr_done``).

Resources (Yosys ``synth_xilinx -family xcup``, the flow of ``bench/resources.py``): ``u280``
21.2k LUTs (82 LUTRAM, 81 SRL), 14.1k FFs, 40 DSP48E2 (the 32 lanes' ``q * S`` and the row
multiply; the 32:1 mux of 512-bit channel words takes most of the LUTs); ``sim`` 5.2k LUTs,
4.9k FFs, 17 DSP48E2.

Abort: no new command; the cmd slot is dropped (a command not yet taken by a reader is not
in flight); every beat of the commands taken is read and dropped (per-channel beat
counters); the output pipeline and the write FIFO are emptied and the writes already
given to the buffers counted back (``wr_done``); then ``busy`` falls.
"""

from __future__ import annotations

from amaranth import Array, Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, fifo, stream, wiring
from amaranth.lib.wiring import In, Out
from amaranth.utils import exact_log2

from .axi import command_layout, write_data_layout
from .buffers import Reach, buf_regions, buffer_map, port_signature
from .formats import RECORD_ALIGN_BITS, SCALE_FIXED_BITS, SCALE_STORE_BITS, SUB_BITS, WeightFormat, record_bits
from .fp32 import I2F
from .geometry import delay
from .isa import _FIELDS, Buf, Opcode, WeightFmt
from .memmap import GRANULE
from .params import HwParams

__all__ = ["read_port_signature", "write_port_signature", "embed_formats", "row_fields", "EmbedEngine",
           "EMBED_DST", "f16_fixed"]

#: the buffers EMBED may write: float32 rows of one token each
EMBED_DST = (Buf.X, Buf.H, Buf.Q, Buf.K, Buf.V, Buf.A, Buf.Y, Buf.G, Buf.U, Buf.LOG)
GRANULE_BITS = RECORD_ALIGN_BITS        #: records start on these in a channel's stream
_TOK_BYTES = 4                          #: an int32 token id


def read_port_signature(addr_bits: int, data_bits: int) -> wiring.Signature:
    """A read client (engine side): ``cmd`` (Out, :func:`~flightllm.hw.axi.command_layout`)
    and ``data`` (In, the words in command order): a :class:`~flightllm.hw.axi.BurstReader`'s
    ``cmd`` and ``data`` flipped."""
    return wiring.Signature({"cmd": Out(stream.Signature(command_layout(addr_bits))),
                             "data": In(stream.Signature(unsigned(data_bits)))})


def write_port_signature(addr_bits: int, data_bits: int) -> wiring.Signature:
    """A write client (engine side): ``cmd`` and ``data`` (Out, :func:`~flightllm.hw.axi.write_data_layout`)
    and ``done`` (In: a pulse per command after its B response): a
    :class:`~flightllm.hw.axi.BurstWriter`'s ports flipped."""
    return wiring.Signature({"cmd": Out(stream.Signature(command_layout(addr_bits))),
                             "data": Out(stream.Signature(write_data_layout(data_bits))),
                             "done": In(1)})


def embed_formats(params: HwParams) -> tuple:
    """The formats :class:`EmbedEngine` gathers: the build's dense scaled formats of 4 or 8 bits."""
    return tuple(f for f in params.formats() if f.dense and not f.raw and f.bits in (4, 8))


def row_fields(fmt: WeightFormat, params: HwParams, row: int, k_in: int) -> dict:
    """Where tensor row ``row`` lies (module docstring), in the terms the RTL uses:
    ``channel``, ``chain`` (local chain ``i``), ``start`` (byte offset of its records from
    the tensor's ``w_off``), ``row_bytes`` (bytes read), and per record the bit offsets
    (from the record's start) of its value fields, its scale and min."""
    R, C, L = params.chains, params.weight_channels, params.chain_len
    Rc = R // C
    G = fmt.group_size
    ng = k_in // G
    rb = record_bits(fmt, Rc, L)
    tile, j = divmod(row, R)
    i = j // C
    fb = fmt.scale_field_bits
    nv = Rc * G * fmt.bits
    return {"channel": j % C, "chain": i, "start": fmt.header_bits // 8 + tile * ng * rb // 8,
            "row_bytes": ng * rb // 8, "record_bits": rb,
            "values": [(b * Rc + i) * L * fmt.bits for b in range(G // L)],
            "scale": nv + i * fb, "min": nv + Rc * fb + i * fb if fmt.has_min else None}


def f16_fixed(h16, shift):
    """A binary16 (16 bits) as the hardware's fixed point ``d * 2**shift``
    (:func:`flightllm.hw.formats.to_fixed`): ``sig << (max(E, 1) + shift - 25)``, negated
    if the sign is set; only the low 4 bits of the shift matter (the packer keeps it in
    0..15 for every nonzero value). ``signed(SCALE_FIXED_BITS)``."""
    e, frac = h16[10:15], h16[:10]
    sig = Cat(frac, e.any())
    ee = Mux(e == 0, 1, e)
    sh = (ee + shift - 25)[:4]
    mag = (sig << sh)[:SCALE_FIXED_BITS - 1]
    return Mux(h16[15], -mag, mag)


def _lg(v, what):
    try:
        return exact_log2(v)
    except ValueError:
        raise ValueError(f"EMBED/ST_KT engines need {what} a power of two, not {v}") from None


def _fld(word, name, fmt=WeightFmt):
    off, width, _ = _FIELDS[fmt][name]
    return word[off:off + width]


class EmbedEngine(wiring.Component):
    """The EMBED engine (module docstring).

    Parameters
    ----------
    params : HwParams
    addr_bits : int
        Width of the command addresses (:func:`~flightllm.hw.axi.command_layout`).
    wr_depth : int
        Buffer writes queued (and the credit of the output pipeline).

    Attributes
    ----------
    issue : In(stream of :func:`~flightllm.hw.control.entry_layout`)
    done, busy, fault : Out(1)
    fault_pc : Out(32)
    abort : In(1)
    tok_space : In(32)
        Byte offset of the token buffer in the last ``kv_channels`` channel buffers.
    max_seq : In(32)
        Positions the token buffer holds (the plan's ``max_seq``); 0: ``HwParams.max_seq_len``.
    rd : Out(:func:`read_port_signature`).array(weight_channels)
    buf : Out(:func:`~flightllm.hw.buffers.port_signature`)
        Writes only (``rd_req`` idle).
    """

    def __init__(self, params: HwParams, *, addr_bits: int = 64, wr_depth: int = 8):
        from .control import PC_BITS, entry_layout

        try:
            self.p = params
            C, KV, R, L, Lb, W = (params.weight_channels, params.kv_channels, params.chains, params.chain_len,
                                  params.sfu_lanes, params.hbm_port_bits)
            for v, what in ((C, "weight_channels"), (KV, "kv_channels"), (R, "chains"), (L, "chain_len"),
                            (Lb, "sfu_lanes"), (W, "hbm_port_bits")):
                _lg(v, what)
            if not 64 <= W <= 8 * GRANULE:
                raise ValueError(f"EmbedEngine: hbm_port_bits must be 64..{8 * GRANULE} (a beat within a "
                                 f"token-buffer granule), not {W}")
            if L * 8 > W:
                raise ValueError(f"EmbedEngine: a chain's beat of INT8 values ({L * 8} bits) must fit a word ({W})")
            if wr_depth < 4:
                raise ValueError(f"EmbedEngine: wr_depth must be at least 4, not {wr_depth}")
        except ValueError:
            self._MustUse__silence = True
            raise
        self.addr_bits, self.wr_depth = addr_bits, wr_depth
        self.formats = embed_formats(params)
        self.regions = buffer_map(params)
        self.reach = {"buf": Reach(writes=buf_regions(params, EMBED_DST))}     #: what ``buf`` touches
        super().__init__({
            "issue": In(stream.Signature(entry_layout())),
            "done": Out(1), "busy": Out(1), "fault": Out(1), "fault_pc": Out(PC_BITS), "abort": In(1),
            "tok_space": In(32),
            "max_seq": In(32),
            "rd": Out(read_port_signature(addr_bits, W)).array(C),
            "buf": Out(port_signature(params)),
        })

    # ------------------------------------------------------------------------------------
    def elaborate(self, platform):
        m = Module()
        p, fmts = self.p, self.formats
        C, KV, R, L, Lb, W = (p.weight_channels, p.kv_channels, p.chains, p.chain_len, p.sfu_lanes,
                              p.hbm_port_bits)
        Rc = R // C
        BB, NG = W // 8, W // GRANULE_BITS
        lgC, lgKV, lgR, lgL, lgLb, lgW, lgBB = (exact_log2(v) for v in (C, KV, R, L, Lb, W, BB))
        IPB = BB // _TOK_BYTES                       # token ids per beat
        NF = len(fmts)
        A = self.addr_bits
        regs = self.regions
        by_id = sorted(regs.values(), key=lambda r: r.id)
        nreg = len(by_id)
        wbits = len(self.buf.wr.payload.word)

        # per-format constants
        G = [f.group_size for f in fmts]
        Gmax = max(G, default=32)
        Gmin = min(G, default=32)
        Lo = min(Lb, Gmin)                          # lanes converted a cycle
        bpb = [g // L for g in G]
        bpb_max = max(bpb, default=1)
        rbits = [record_bits(f, Rc, L) for f in fmts]
        fbits = [f.scale_field_bits for f in fmts]
        nv = [Rc * g * f.bits for f, g in zip(fmts, G)]
        nfield = [bb + (2 if f.has_min else 1) for bb, f in zip(bpb, fmts)]
        vbits = [L * f.bits for f in fmts]           # a value field
        XB = max([GRANULE_BITS] + [v for v in vbits if v >= GRANULE_BITS])
        two_level = any(f.two_level for f in fmts)

        # ---------------------------------------------------------------- the instruction
        e = self.issue.payload
        word = Signal(128)
        pc = Signal(32)
        rows = Signal(32)
        pos = Signal(32)
        m_dst = Signal(5)
        m_glog = Signal(4)
        shift = Signal(5)
        n_out, k_in, w_off = Signal(20), Signal(18), Signal(32)
        fsel = Signal(max(1, NF))                    # one-hot format
        ng = Signal(18)                              # records per row
        row_bytes = Signal(32)

        def pick(vals, shape=None):
            """The value of the selected format (a mux over the one-hot ``fsel``)."""
            out = Const(0, shape or unsigned(max(1, max((int(v).bit_length() for v in vals), default=1))))
            for k, v in enumerate(vals):
                out = Mux(fsel[k], v, out)
            return out

        # ---------------------------------------------------------------- read commands
        slot_v = Signal()
        slot_ch = Signal(range(C))
        slot_addr = Signal(A)
        slot_beats = Signal(24)
        outst = [Signal(25, name=f"outst{c}") for c in range(C)]
        take = Signal()
        m.d.comb += take.eq(slot_v & Array(self.rd[c].cmd.ready for c in range(C))[slot_ch])
        for c in range(C):
            cmd = self.rd[c].cmd
            m.d.comb += [cmd.valid.eq(slot_v & (slot_ch == c)), cmd.payload.addr.eq(slot_addr),
                         cmd.payload.beats.eq(slot_beats)]
        with m.If(take):
            m.d.sync += slot_v.eq(0)
        # data: one consumer at a time reads channel dsel
        dsel = Signal(range(C))
        dwant = Signal()                             # the consumer takes a word of dsel now
        drain = Signal()
        dvalid = Signal()
        dword = Signal(W)
        m.d.comb += [dvalid.eq(Array(self.rd[c].data.valid for c in range(C))[dsel]),
                     dword.eq(Array(self.rd[c].data.payload for c in range(C))[dsel])]
        for c in range(C):
            d = self.rd[c].data
            m.d.comb += d.ready.eq((dwant & (dsel == c)) | (drain & (outst[c] != 0)))
            inc = take & (slot_ch == c)
            m.d.sync += outst[c].eq(outst[c] + Mux(inc, slot_beats, 0) - (d.valid & d.ready))

        # ---------------------------------------------------------------- buffer writes
        wl = data.StructLayout({"word": wbits, "data": data.ArrayLayout(32, Lb), "mask": Lb})
        wq = m.submodules.wr_fifo = fifo.SyncFIFOBuffered(width=wl.size, depth=self.wr_depth)
        wh = data.View(wl, wq.r_data)
        wr = self.buf.wr
        m.d.comb += [wr.valid.eq(wq.r_rdy & ~drain), wr.payload.region.eq(m_dst), wr.payload.word.eq(wh.word),
                     wr.payload.data.eq(wh.data), wr.payload.mask.eq(wh.mask),
                     wq.r_en.eq((wr.valid & wr.ready) | drain), self.buf.rd_req.valid.eq(0)]
        sent = Signal(32)
        landed = Signal(32)
        m.d.sync += [sent.eq(sent + (wr.valid & wr.ready)), landed.eq(landed + self.buf.wr_done)]

        # ---------------------------------------------------------------- token ids
        idq = m.submodules.id_fifo = fifo.SyncFIFO(width=20, depth=max(2, p.mm_tokens))
        ti = Signal(32)                              # next row whose token beat to request
        tr = Signal(32)                              # next row whose id to take
        bad_id = Signal()
        p_i = Signal(32)
        p_r = Signal(32)
        m.d.comb += [p_i.eq(pos + ti), p_r.eq(pos + tr)]

        def tok_where(pp):
            """(channel, beat address) of the token of position ``pp`` (hw/memmap.interleave)."""
            a = pp << 2
            g = a >> exact_log2(GRANULE)
            ch = (C - KV) + (g & (KV - 1) if KV > 1 else 0)
            addr = (self.tok_space + ((g >> lgKV) << exact_log2(GRANULE))
                    + (a & ((GRANULE - 1) & ~(BB - 1))))
            return ch, addr

        tok_ch_i, tok_addr_i = tok_where(p_i)
        tok_ch_r, _ = tok_where(p_r)
        tid = Signal(32)
        m.d.comb += tid.eq(dword.word_select(((p_r << 2) & (BB - 1)) >> 2, 32))

        # ---------------------------------------------------------------- two-level header
        d_fix = Signal(signed(SCALE_FIXED_BITS))
        mn_fix = Signal(signed(SCALE_FIXED_BITS))

        # ---------------------------------------------------------------- rows: issue
        rinfo = data.StructLayout({"c": range(C), "i": range(max(2, Rc)), "s0": range(max(2, NG)),
                                   "beats": 24})
        riq = m.submodules.row_fifo = fifo.SyncFIFO(width=rinfo.size, depth=4)
        ri_head = data.View(rinfo, riq.r_data)
        n_iss = Signal(32)                           # rows whose read is issued
        r_tile = Signal(20)
        r_c = Signal(range(C))
        r_i = Signal(range(max(2, Rc)))
        r_prod = Signal(40)
        r_prod2 = Signal(40)
        r_start = Signal(A)
        r_st = Signal(3)
        hdr_bytes = pick([f.header_bits // 8 for f in fmts])

        # ---------------------------------------------------------------- rows: extractor
        ex_v = Signal()                              # a row is being extracted
        ex_c = Signal(range(C))
        ex_i = Signal(range(max(2, Rc)))
        ex_left = Signal(24)                         # words of the row still to take from the reader
        ex_rows = Signal(32)                         # rows extracted
        rec = Signal(18)
        fld = Signal(range(max(2, bpb_max + 2)))     # field of the record: values 0..bpb-1, scale, min
        recbase = Signal(40)                         # bit of the record's start from the row's first word
        P = Signal(40)                               # bit of the current field
        cnt = Signal(range(3))                       # words in the window
        base = Signal(24)                            # word index of w0
        w0, w1 = Signal(W), Signal(W)
        window = Cat(w0, w1)
        s_raw = Signal(16)
        gbuf = [Signal(8, name=f"gbuf{k}") for k in range(Gmax)]

        f_bpb = pick(bpb)
        f_nfield = pick(nfield)
        f_rb = pick(rbits)
        f_fb = pick(fbits)
        f_nv = pick(nv)
        f_vbits = pick(vbits)
        is_val = fld < f_bpb
        is_scale = fld == f_bpb
        fwidth = Mux(is_val, f_vbits, f_fb)
        pw = P[:lgW]                                 # bit in its word
        wi = P[lgW:]
        needs2 = (pw + fwidth) > W
        all_done = rec == ng
        pop = Signal()
        push = Signal()
        extract = Signal()
        out_free = Signal()
        push_ok = Signal()
        m.d.comb += pop.eq(ex_v & (cnt != 0) & (all_done | (wi > base)))
        m.d.comb += push_ok.eq(ex_v & (ex_left != 0) & ((cnt - pop) < 2))
        m.d.comb += push.eq(push_ok & dvalid)
        last_field = fld == f_nfield - 1
        m.d.comb += extract.eq(ex_v & ~all_done & (cnt != 0) & (wi == base) & (~needs2 | (cnt == 2))
                               & (~last_field | out_free))

        # field extraction: a granule-aligned chunk (wide value fields) or a byte-aligned 32 bits
        chunk = Signal(XB)
        small = Signal(32)
        m.d.comb += [chunk.eq(Array(window[GRANULE_BITS * j:GRANULE_BITS * j + XB] for j in range(NG))[pw[6:]]),
                     small.eq(Array(window[8 * j:8 * j + 32] for j in range(W // 8))[pw[3:]])]
        vals = [Signal(signed(8), name=f"val{lane}") for lane in range(L)]
        for k, f in enumerate(fmts):
            src = chunk if vbits[k] >= GRANULE_BITS else small
            with m.If(fsel[k]):
                for lane in range(L):
                    v = src[lane * f.bits:(lane + 1) * f.bits]
                    m.d.comb += vals[lane].eq(v.as_signed() if f.kind == 0 else v)
        field16 = small[:16]

        # ---------------------------------------------------------------- output stage
        o_full = Signal()                            # a group latched
        o_conv = Signal()                            # its scale and min are fixed point
        o_k = Signal(range(max(2, Gmax // Lo)))
        o_q = [Signal(signed(8), name=f"oq{k}") for k in range(Gmax)]
        o_s, o_m = Signal(16), Signal(16)
        o_grp = Signal(18)
        o_rowbase = Signal(wbits)
        ex_rowbase = Signal(wbits)
        S_fix = Signal(signed(SCALE_FIXED_BITS))
        M_fix = Signal(signed(SCALE_FIXED_BITS))
        inflight = Signal(range(16))
        emit = Signal()
        nchunks = pick([g // Lo for g in G])
        f_glog = pick([exact_log2(g) for g in G])
        m.d.comb += out_free.eq(~o_full)
        row_words = Array([Const(r.row_words, 16) for r in by_id] + [Const(0, 16)] * (32 - nreg))
        m.d.comb += emit.eq(o_full & o_conv & ((inflight + wq.level) < self.wr_depth) & ~drain)

        e0 = Signal(32)
        m.d.comb += e0.eq((o_grp << f_glog) + (o_k * Lo))
        ev = Signal()
        eword = Signal(wbits)
        emask = Signal(Lb)
        prods = [Signal(signed(SCALE_FIXED_BITS + 9), name=f"prod{lane}") for lane in range(Lo)]
        i2f = [I2F(SCALE_FIXED_BITS + 9) for _ in range(Lo)]
        for lane, u in enumerate(i2f):
            m.submodules[f"i2f{lane}"] = u
            m.d.comb += [u.i_valid.eq(ev), u.a.eq(prods[lane])]
        m.d.sync += ev.eq(emit)
        qsel = Signal(8 * Lo)                       # the chunk's values (a signal: sliced per lane)
        m.d.comb += qsel.eq(Array(Cat(*o_q[k * Lo:(k + 1) * Lo]) for k in range(Gmax // Lo))[o_k])
        with m.If(emit):
            for lane in range(Lo):
                m.d.sync += prods[lane].eq(qsel[8 * lane:8 * lane + 8].as_signed() * S_fix + M_fix)
            m.d.sync += [eword.eq(o_rowbase + (e0 >> lgLb)),
                         emask.eq(Const((1 << Lo) - 1, Lb) << (e0 & (Lb - 1)) if Lo < Lb else Const((1 << Lb) - 1, Lb))]
        lat = I2F.latency
        word_d = delay(m, eword, lat, name="eword")
        mask_d = delay(m, emask, lat, name="emask")
        pv = Signal()
        pword = Signal(wbits)
        pmask = Signal(Lb)
        pdata = [Signal(32, name=f"pdata{lane}") for lane in range(Lo)]
        m.d.sync += [pv.eq(i2f[0].o_valid), pword.eq(word_d), pmask.eq(mask_d)]
        for lane, u in enumerate(i2f):
            o = u.o
            m.d.sync += pdata[lane].eq(Mux(o[:31] == 0, 0, Cat(o[:23], (o[23:31] - shift)[:8], o[31])))
        wd = data.View(wl, wq.w_data)
        m.d.comb += [wq.w_en.eq(pv), wd.word.eq(pword), wd.mask.eq(pmask)]
        for lane in range(Lb):
            m.d.comb += wd.data[lane].eq(pdata[lane % Lo])
        m.d.sync += inflight.eq(inflight + emit - pv)

        # output stage sequencing
        with m.If(o_full & ~o_conv):
            m.d.sync += o_conv.eq(1)
            if two_level:
                kind2 = pick([int(f.two_level) for f in fmts], unsigned(1))
            has_min = pick([int(f.has_min) for f in fmts], unsigned(1))
            s_one = f16_fixed(o_s, shift)
            m_one = Mux(has_min, f16_fixed(o_m, shift), 0)
            if two_level:
                m.d.sync += [S_fix.eq(Mux(kind2, d_fix * o_s[:SUB_BITS], s_one)),
                             M_fix.eq(Mux(kind2, mn_fix * o_m[:SUB_BITS], m_one))]
            else:
                m.d.sync += [S_fix.eq(s_one), M_fix.eq(m_one)]
        with m.If(emit):
            with m.If(o_k == nchunks - 1):
                m.d.sync += [o_k.eq(0), o_full.eq(0), o_conv.eq(0)]
            with m.Else():
                m.d.sync += o_k.eq(o_k + 1)

        # ---------------------------------------------------------------- the window
        m.d.comb += dwant.eq(0)
        with m.If(push):
            m.d.sync += ex_left.eq(ex_left - 1)
        with m.If(pop):
            m.d.sync += base.eq(base + 1)
        with m.If(pop & push):
            with m.If(cnt == 2):
                m.d.sync += [w0.eq(w1), w1.eq(dword)]
            with m.Else():
                m.d.sync += w0.eq(dword)
        with m.Elif(pop):
            m.d.sync += [w0.eq(w1), cnt.eq(cnt - 1)]
        with m.Elif(push):
            with m.If(cnt == 0):
                m.d.sync += w0.eq(dword)
            with m.Else():
                m.d.sync += w1.eq(dword)
            m.d.sync += cnt.eq(cnt + 1)

        # field offsets of the next field (record-relative)
        f_lgv = pick([exact_log2(v) for v in vbits])
        f_lgfb = pick([exact_log2(v) for v in fbits])
        f_rcfb = pick([Rc * v for v in fbits])

        def foff(f, i):
            return Mux(f < f_bpb, ((f << exact_log2(Rc)) + i) << f_lgv,
                       f_nv + (i << f_lgfb) + Mux(f == f_bpb, 0, f_rcfb))

        with m.If(extract):
            with m.If(is_val):
                with m.Switch(fld):
                    for b in range(bpb_max):
                        with m.Case(b):
                            for lane in range(L):
                                m.d.sync += gbuf[b * L + lane].eq(vals[lane])
            with m.If(is_scale):
                m.d.sync += s_raw.eq(field16)
            with m.If(last_field):
                nxt_base = recbase + f_rb
                m.d.sync += [fld.eq(0), rec.eq(rec + 1), recbase.eq(nxt_base), P.eq(nxt_base + foff(0, ex_i)),
                             o_full.eq(1), o_grp.eq(rec), o_rowbase.eq(ex_rowbase),
                             o_s.eq(Mux(is_scale, field16, s_raw)), o_m.eq(Mux(is_scale, 0, field16))]
                m.d.sync += [o_q[k].eq(gbuf[k]) for k in range(Gmax)]
            with m.Else():
                m.d.sync += [fld.eq(fld + 1), P.eq(recbase + foff(fld + 1, ex_i))]
        # a row ends when its records are extracted and its words taken
        row_end = ex_v & all_done & (ex_left == 0) & ((cnt == 0) | ((cnt == 1) & pop))
        with m.If(row_end):
            m.d.sync += [ex_v.eq(0), ex_rows.eq(ex_rows + 1)]
        with m.If(~ex_v & riq.r_rdy & ~drain):
            s0bits = ri_head.s0 << 6
            m.d.comb += riq.r_en.eq(1)
            m.d.sync += [ex_v.eq(1), ex_c.eq(ri_head.c), ex_i.eq(ri_head.i), ex_left.eq(ri_head.beats),
                         rec.eq(0), fld.eq(0), recbase.eq(s0bits), P.eq(s0bits + foff(0, ri_head.i)),
                         base.eq(0), cnt.eq(0),
                         ex_rowbase.eq(ex_rows[:max(1, p.mm_tokens.bit_length())] * row_words[m_dst])]

        # ---------------------------------------------------------------- the sequence
        fault = self.fault
        m.d.comb += [self.busy.eq(0), drain.eq(0)]
        with m.FSM(name="embed"):
            with m.State("IDLE"):
                m.d.comb += self.issue.ready.eq(~self.abort & ~fault)
                with m.If(self.issue.valid & self.issue.ready):
                    m.d.sync += [word.eq(e.word), pc.eq(e.pc),
                                 rows.eq(Mux(_fld(e.word, "rows_reg") != 0, e.regs[0], 1)), pos.eq(e.regs[1])]
                    m.next = "LATCH"
            with m.State("LATCH"):
                m.d.comb += self.busy.eq(1)
                m.d.sync += [m_dst.eq(_fld(word, "dst")), m_glog.eq(_fld(word, "group_log2")),
                             shift.eq(_fld(word, "shift")), n_out.eq(_fld(word, "n_out")),
                             k_in.eq(_fld(word, "k_in")), w_off.eq(_fld(word, "w_off")),
                             ti.eq(0), tr.eq(0), bad_id.eq(0), n_iss.eq(0), ex_rows.eq(0)]
                for k, f in enumerate(fmts):
                    m.d.sync += fsel[k].eq((_fld(word, "bits") == f.bits)
                                           & (_fld(word, "group_log2") == exact_log2(f.group_size))
                                           & (_fld(word, "kind") == f.kind)
                                           & (_fld(word, "n_keep") == _fld(word, "m")))
                m.next = "CHECK"
                with m.If(self.abort):
                    m.next = "DRAIN"
            with m.State("CHECK"):
                m.d.comb += self.busy.eq(1)
                dst_rows = Array([Const(regs[b.name].rows if b in EMBED_DST and b.name in regs else 0, 16)
                                  for b in Buf] + [Const(0, 16)] * (32 - len(Buf)))
                dst_width = Array([Const(regs[b.name].width if b in EMBED_DST and b.name in regs else 0, 32)
                                   for b in Buf] + [Const(0, 32)] * (32 - len(Buf)))
                dst_ok = (m_dst < len(Buf)) & (dst_rows[m_dst] != 0)
                bad = ((word[:6] != Opcode.EMBED.value) | (fsel == 0) | (n_out == 0) | (k_in == 0)
                       | ((k_in & ((Const(1, 19) << m_glog) - 1)) != 0) | (w_off[:6] != 0)
                       | ~dst_ok | (rows > dst_rows[m_dst]) | (k_in > dst_width[m_dst])
                       | ((pos + rows)[:33] > Mux(self.max_seq == 0, p.max_seq_len, self.max_seq)))
                m.d.sync += ng.eq(k_in >> m_glog)
                with m.If(self.abort):
                    m.next = "DRAIN"
                with m.Elif(bad):
                    m.d.sync += [fault.eq(1), self.fault_pc.eq(pc)]
                    m.next = "FAULT"
                with m.Elif(rows == 0):
                    m.next = "DONE"
                with m.Else():
                    m.next = "SIZE"
            with m.State("SIZE"):
                m.d.comb += self.busy.eq(1)
                m.d.sync += row_bytes.eq(pick([ng * (rb // 8) for rb in rbits], unsigned(32)))
                m.next = "TOK"
                with m.If(self.abort):
                    m.next = "DRAIN"
            with m.State("TOK"):
                m.d.comb += self.busy.eq(1)
                # requests: a beat whenever a row's token starts one
                with m.If(ti < rows):
                    need = (ti == 0) | ((p_i & (IPB - 1)) == 0)
                    with m.If(~need):
                        m.d.sync += ti.eq(ti + 1)
                    with m.Elif(~slot_v):
                        m.d.sync += [slot_v.eq(1), slot_ch.eq(tok_ch_i), slot_addr.eq(tok_addr_i),
                                     slot_beats.eq(1), ti.eq(ti + 1)]
                # ids: taken in row order; a beat is popped after its last row
                m.d.comb += dsel.eq(tok_ch_r)
                lastr = (tr == rows - 1) | (((p_r + 1) & (IPB - 1)) == 0)
                with m.If(tr < rows):
                    with m.If(lastr):
                        m.d.comb += dwant.eq(1)
                        with m.If(dvalid):
                            m.d.sync += tr.eq(tr + 1)
                    with m.Elif(dvalid):
                        m.d.sync += tr.eq(tr + 1)
                    with m.If(dvalid):
                        m.d.comb += [idq.w_en.eq(1), idq.w_data.eq(tid)]
                        with m.If(tid >= n_out):
                            m.d.sync += bad_id.eq(1)
                with m.Else():
                    with m.If(bad_id):
                        m.d.sync += [fault.eq(1), self.fault_pc.eq(pc)]
                        m.next = "FAULT"
                    with m.Elif(pick([int(f.two_level) for f in fmts], unsigned(1))):
                        m.next = "HDR"
                    with m.Else():
                        m.next = "ROWS"
                with m.If(self.abort):
                    m.next = "DRAIN"
            with m.State("HDR"):
                m.d.comb += self.busy.eq(1)
                m.d.sync += [slot_v.eq(1), slot_ch.eq(0), slot_addr.eq(w_off), slot_beats.eq(1)]
                m.next = "HDR_WAIT"
                with m.If(self.abort):
                    m.next = "DRAIN"
            with m.State("HDR_WAIT"):
                m.d.comb += [self.busy.eq(1), dsel.eq(0), dwant.eq(1)]
                with m.If(dvalid):
                    m.d.sync += [d_fix.eq(f16_fixed(dword[:SCALE_STORE_BITS], shift)),
                                 mn_fix.eq(f16_fixed(dword[SCALE_STORE_BITS:2 * SCALE_STORE_BITS], shift))]
                    m.next = "ROWS"
                with m.If(self.abort):
                    m.next = "DRAIN"
            with m.State("ROWS"):
                m.d.comb += [self.busy.eq(1), dsel.eq(ex_c), dwant.eq(push_ok)]
                # the row issuer: id -> (tile, channel, chain) -> tile * row_bytes -> command
                with m.Switch(r_st):
                    with m.Case(0):
                        with m.If((n_iss < rows) & idq.r_rdy & riq.w_rdy):
                            rid = idq.r_data
                            m.d.comb += idq.r_en.eq(1)
                            m.d.sync += [r_tile.eq(rid >> lgR), r_c.eq(rid[:lgC] if C > 1 else 0),
                                         r_i.eq((rid >> lgC)[:max(1, lgR - lgC)] if Rc > 1 else 0), r_st.eq(1)]
                    with m.Case(1):
                        m.d.sync += [r_prod.eq(r_tile * row_bytes), r_st.eq(2)]
                    with m.Case(2):
                        m.d.sync += [r_prod2.eq(r_prod), r_st.eq(3)]
                    with m.Case(3):
                        m.d.sync += [r_start.eq(w_off + hdr_bytes + r_prod2), r_st.eq(4)]
                    with m.Case(4):
                        with m.If(~slot_v):
                            off = r_start[:lgBB]
                            beats = (off + row_bytes + BB - 1) >> lgBB
                            m.d.sync += [slot_v.eq(1), slot_ch.eq(r_c), slot_beats.eq(beats), n_iss.eq(n_iss + 1),
                                         slot_addr.eq(Cat(Const(0, lgBB), r_start[lgBB:])), r_st.eq(0)]
                            wi_ = data.View(rinfo, riq.w_data)
                            m.d.comb += [riq.w_en.eq(1), wi_.c.eq(r_c), wi_.i.eq(r_i), wi_.s0.eq(off >> 3),
                                         wi_.beats.eq(beats)]
                finished = ((ex_rows == rows) & ~o_full & (inflight == 0) & (wq.level == 0) & ~pv
                            & (landed == sent))
                with m.If(self.abort):
                    m.next = "DRAIN"
                with m.Elif(finished):
                    m.next = "DONE"
            with m.State("DONE"):
                m.d.comb += self.busy.eq(1)
                m.d.comb += self.done.eq(1)
                m.next = "IDLE"
            with m.State("FAULT"):
                m.d.comb += self.busy.eq(1)
                with m.If(self.abort):
                    m.d.sync += fault.eq(0)
                    m.next = "DRAIN"
            with m.State("DRAIN"):
                m.d.comb += [self.busy.eq(1), drain.eq(1)]
                m.d.sync += [slot_v.eq(0), ex_v.eq(0), o_full.eq(0), o_conv.eq(0), o_k.eq(0), fault.eq(0),
                             cnt.eq(0), r_st.eq(0)]
                m.d.comb += [idq.r_en.eq(1), riq.r_en.eq(1)]
                quiet = ((Cat(*(o != 0 for o in outst)) == 0) & (inflight == 0) & (wq.level == 0) & ~pv & ~ev
                         & ~idq.r_rdy & ~riq.r_rdy
                         & (landed == sent))
                with m.If(quiet):
                    m.next = "IDLE"
        return m
