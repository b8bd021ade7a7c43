"""Dequant unit: one weight channel's record stream in, chain beats out.

One unit per weight channel. It reads the channel's records exactly as
:func:`flightllm.hw.formats.pack_tensor` lays them out (the *lane-domain records* of
:mod:`flightllm.hw.formats`), as a stream of ``W = hbm_port_bits``-wide words (byte 0 of
the region in bits ``[7:0]`` of the first word), and emits ``bpb`` beats per record for
its ``Rc`` chains (:func:`~flightllm.hw.geometry.beat_layout`). Per operation ``cfg``
gives the format code, ``e0`` of the tensor's scales, the number of records and the
number of words the streamer sends (``ceil((header_bits + records * record_bits) / W)``,
:meth:`~flightllm.hw.geometry.EngineGeometry.stream_words`, computed on the host: no
multiplier for it here); the tail of the last word after the last record is dropped. A
two-level tensor (``intBk``) starts with its 64-bit header (binary16 ``D`` and ``Mn``):
the unit reads it from the operation's first word and cuts the first record one granule
further on. A raw tensor (``intBr``, the KV cache: codes after the weight formats,
:class:`~flightllm.hw.geometry.EngineGeometry`) has records of values alone; its beats
carry scale 1 and min 0 on every chain (below).

Pipeline (``G = W / 64`` granules of ``RECORD_ALIGN_BITS`` per word)::

    words --> skid register        words.ready = (words left) & ~skid_valid: two registers
               |
               v
           word window: span whole words S0 .. S(span-1), a *falling* FIFO: a word enters
               |        the top slot and drops one slot a cycle into any free slot below;
               |        S0 leaves once the records are past it (at most one word a cycle)
               |  record start r: granules into S0 (r < G when a record is cut)
               v
           aligner: (S0 .. S(span-1)) >> 64*r  --  a coarse 4:1 and a fine 2:1 granule mux
               |  one whole record (record_bits_max bits), once all its words are there
               v
          [rec_in: one record register (builds with a two-level format only); while a
               |        record waits here its Rc scales and mins become fixed point into
               |        registers: binary16 -> fixed point, or sub-scale / sub-min x D / Mn
               |        in 2 * Rc DSP multipliers]
               v
           record FIFO: two ping-pong record registers (and, with a two-level format,
               |        their records' fixed-point scales and mins); written on the
               |        registered fill count only
               |  head record, beat counter b
               v
           lane muxes: per lane and weight bit a mux over the build's (bits, signedness)
               |        at the lane's fixed offset ((b*Rc + i)*L + l) * bits (index bits
               |        likewise); per chain a mux over the scale (and min) offsets and
               |        binary16 -> fixed point (no two-level format), or the head
               |        record's registered scales and mins (raw formats: held at
               |        scale 1, min 0)
               v
           output register (one beat) --> beat   beat.ready only enables this register
                                                 and pops the record FIFO

Why this shape:

* Records start on 64-bit granules of the stream, so a record is a window of whole
  words read at one of ``G`` granule offsets (8 for ``W = 512``; fewer when every
  record size shares a factor with ``G``): the only wide mux is ``record_bits_max``
  bits by ``G`` positions. Inside a record every lane's value sits at a fixed offset
  per (bit width, beat), so a lane is a mux over the build's few widths, never a
  per-format crossbar or a fine-grained shifter.
* The window moves words only from one slot to the next (and the input, or the skid
  register, into the top slot), so its slots have clock enables and no data muxes. It
  shifts out at most one word a cycle, the most the input brings: with data always
  available an operation takes ``max(records * bpb, words)`` cycles plus a few cycles
  of latency.
* ``words.ready`` and ``cfg.ready`` come from registers. The record FIFO has two
  entries so that the aligner can decide on its registered fill count at full rate;
  ``beat.ready`` therefore reaches only the output register, the FIFO's read side and
  ``busy``, never the window or the aligner. ``beat`` comes straight from registers.
* The extract / shift decisions use registered facts about ``r`` (``r >= G``, whether
  the record at ``r`` uses ``S0`` up, how many words it touches), which are computed
  for the four possible next values of ``r`` side by side: two LUT levels from
  registers to the window's clock enables.

Fixed point (the golden definition is :meth:`flightllm.hw.formats.QTensor.fixed`): a
binary16 ``(s, E, frac)`` becomes ``sig << (max(E, 1) - e0)``, ``sig = frac | (E != 0) << 10``,
negated if ``s``. The packer guarantees ``0 <= max(E, 1) - e0 <= 15`` for every nonzero
value and a zero has ``sig = 0``, so only the low four bits of the shift matter.

Raw formats (``intBr``): the records hold the values and nothing else (no scale or min
fields, so a record is shorter than its scaled sibling's; it never sets a new maximum of
the record register or the window). The values are laid out exactly as in the signed
format of the same width (``int8r/32`` as ``int8/32``, ``int4r/32`` as ``int4/32``), so a
raw format shares its lane mux case ``(bits, signed)`` with that format: no new lane
input. The beat's scale is 1 and its min 0 on every chain (rows past N too: their values
are 0): per operation a register ``raw`` holds the output scale register at 1 and
``min_zero`` holds the min register at 0, through the registers' synchronous set / reset
(reset over enable, as the weight bits a format zero-extends), whatever the binary16
conversion (or, in two-level builds, the ``new_`` registers) computes from the
record's bits. So ``e0`` means nothing for a raw operation and is ignored: the host
sends ``E0_MAX`` (``QTensor.fixed`` gives raw tensors shift 0), any value gives the same
beats. The cost is one register and the set / reset pins of the scale register; the
scale path gains no LUT level.

Two-level formats: when the operation's first word reaches ``S0`` the header's ``D`` and
``Mn`` become fixed point the same way (the packer keeps their ``max(E, 1) - e0`` in
``[0, 7]``, so 19 signed bits), into two registers; a record's scale and min are then
``D_fix * sc`` and ``Mn_fix * sm`` (19 x 8 bits, at most 26 bits of magnitude), one
DSP48E2 multiplier per (chain, field), fed from registers (``rec_in`` and the two header
registers) into registers (``new_prod_*``: the DSP's M or P register).

Builds with a two-level format convert every format's scales in the ``rec_in`` cycle:
into ``new_f16_*`` (binary16, 0 for a two-level format) and ``new_prod_*`` (the products,
0 for other formats), ``new = new_f16 | new_prod``. A record cut at cycle ``t`` waits in
``rec_in`` at ``t + 1``; ``new`` holds its values at ``t + 2``, the first cycle the
record can be at the FIFO's head. So each FIFO entry keeps its record's values
(``prod0``, ``prod1``, loaded from ``new`` the cycle after the push) and in that first
cycle the head reads ``new`` itself (``prod_bypass``): the output register's scale and
min inputs are one LUT6 over registers, the multipliers and the binary16 shifters off
that path. ``rec_in`` adds one cycle of latency and no cycle per record: the aligner
cuts and ``rec_in`` moves on on the same registered condition (the FIFO's ``rec_count
!= 2``), so rec_in is empty or moving whenever a record is cut.
"""

from __future__ import annotations

import math

from amaranth import C, Cat, Const, Module, Mux, Signal, signed
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from .formats import RECORD_ALIGN_BITS, SCALE_EXP_SPAN, SCALE_STORE_BITS, SIG_BITS, SUB_BITS, SUB_EXP_SPAN
from .geometry import EngineGeometry, beat_layout, ceil_div, dequant_cfg_layout
from .params import HwParams

__all__ = ["DequantUnit", "fixed_from_f16"]

_SIG = SIG_BITS                                  # binary16 significand with its hidden bit
_SHIFT_BITS = SCALE_EXP_SPAN.bit_length()        # max(E, 1) - e0 is in [0, SCALE_EXP_SPAN]


def fixed_from_f16(h, e0):
    """The fixed-point value of binary16 ``h`` for the tensor's ``e0``
    (:func:`flightllm.hw.formats.to_fixed`), as a signed 27-bit expression.

    The significand is negated before the shift (a 12-bit adder instead of a 27-bit
    one, in parallel with the shift amount's subtraction), then shifted as a signed value.

    Parameters
    ----------
    h : Value
        16-bit binary16 field.
    e0 : Value
        5-bit ``e0 = 25 - shift`` of the operation.
    """
    e = h[10:15]
    nz = e.any()
    sig = Cat(h[0:10], nz)
    sh = (Mux(nz, e, 1) - e0)[:_SHIFT_BITS]
    neg = h[15]
    # two's complement of the significand as one adder: (sig ^ -neg) + neg
    ssig = ((Cat(sig, C(0, 1)) ^ neg.replicate(_SIG + 1)) + neg)[:_SIG + 1].as_signed()
    return (ssig << sh)[:_SIG + (1 << _SHIFT_BITS)].as_signed()             # 27 bits


class DequantUnit(wiring.Component):
    """Turns one weight channel's record stream into lockstep beats for its ``Rc`` chains.

    Parameters
    ----------
    params : HwParams

    Attributes
    ----------
    cfg : In(stream.Signature(dequant_cfg_layout))
        ``fmt`` (format code: :meth:`HwParams.engine_formats`, weight formats then KV
        formats), ``e0`` (ignored for raw formats), ``records``, ``words``. Taken only
        when idle (the previous operation's last beat has left). A code past the build's
        formats acts as code 0.
    words : In(stream.Signature(hbm_port_bits))
        The channel's region (a two-level tensor's header, then the records),
        ``cfg.words`` words per operation. Words past the last record are taken and
        dropped; no word is taken before its operation's cfg.
    beat : Out(stream.Signature(beat_layout))
        ``records * bpb`` beats per operation, from registers.
    busy : Out(1)
        An operation is in progress.
    granules : int
        64-bit granules per word (``G``).
    step : int
        Every record start is a multiple of ``step`` granules: the aligner has
        ``G / step`` positions.
    span : int
        Most words one record touches; the window's slots.
    rec_granules : int
        Granules of the largest record: the record registers' width / 64.
    two_level : bool
        The build has a two-level format: it has the header reader, ``rec_in`` (one
        more cycle of latency) and ``2 * Rc`` multipliers.

    Raises
    ------
    TypeError
        ``params`` is not a :class:`HwParams`.
    ValueError
        The parameters describe a geometry the RTL cannot build.
    """

    def __init__(self, params: HwParams):
        try:
            self.geom = g = EngineGeometry(params)
        except (TypeError, ValueError):
            self._MustUse__silence = True      # never elaborated: no unused-elaboratable warning
            raise
        super().__init__({
            "cfg": In(stream.Signature(dequant_cfg_layout(g))),
            "words": In(stream.Signature(g.W)),
            "beat": Out(stream.Signature(beat_layout(g))),
            "busy": Out(1),
        })
        self.granules = G = g.W // RECORD_ALIGN_BITS
        rgs = [f.record_bits // RECORD_ALIGN_BITS for f in g.formats]
        hgs = [f.fmt.header_bits // RECORD_ALIGN_BITS for f in g.formats]
        self.rec_granules = max(rgs)
        # a two-level tensor's first record starts after its header
        self.step = math.gcd(G, *rgs, *hgs)
        self.two_level = any(f.fmt.two_level for f in g.formats)
        # from the last start offset in S0 (G - step) to the end of the record
        self.span = max(ceil_div(G - self.step + rg, G) for rg in rgs)

    def elaborate(self, platform):
        g = self.geom
        m = Module()
        F = g.formats
        Rc, L, W = g.Rc, g.L, g.W
        GB = RECORD_ALIGN_BITS
        G, step, span = self.granules, self.step, self.span
        GL = G.bit_length() - 1
        RB = self.rec_granules * GB                                     # record register width
        bpb_max = g.bpb_max
        two = self.two_level
        cfg, words, beat, busy = self.cfg, self.words, self.beat, self.busy

        # -- the build's formats as lane / field "kinds" ------------------------------------
        # A lane's weight bit depends on the format only through (bits, signedness), its
        # index bit through (index bits, size of the value section), a chain's binary16
        # scale (min) through the scale (min) offset, a chain's 8-bit sub-scale and sub-min
        # (two-level formats) through the scale offset. One-hot selects of these, set per
        # operation. Raw formats have no scale or min field (none of their selects is set:
        # the output registers are held at scale 1, min 0) and share a value kind with the
        # signed format of their width.
        def vsec_of(f):
            return Rc * f.fmt.kept_per_group * f.bits

        def soff_of(f):
            return vsec_of(f) + Rc * f.fmt.kept_per_group * f.index_bits

        vkinds, ikinds, skinds, mkinds, tkinds = {}, {}, {}, {}, {}
        for f in F:
            vkinds.setdefault((f.bits, f.signed), []).append(f)
            if f.index_bits:
                ikinds.setdefault((f.index_bits, vsec_of(f)), []).append(f)
            if f.fmt.two_level:
                tkinds.setdefault(soff_of(f), []).append(f)
                continue
            if f.raw:
                continue
            skinds.setdefault(soff_of(f), []).append(f)
            if f.has_min:
                mkinds.setdefault(soff_of(f) + Rc * SCALE_STORE_BITS, []).append(f)
        vk, ik, sk, mk, tk = list(vkinds), list(ikinds), list(skinds), list(mkinds), list(tkinds)

        # -- per-operation registers (format decoded once, at cfg time) -----------------------
        vsel = Signal(len(vk), name="vsel")
        isel = Signal(max(1, len(ik)), name="isel")
        ssel = Signal(max(1, len(sk)), name="ssel")
        msel = Signal(max(1, len(mk)), name="msel")
        tsel = Signal(max(1, len(tk)), name="tsel")
        tl = Signal(name="two_level")                   # the format is two-level
        tl_n = Signal(name="not_two_level")             # ~tl, as a register (a reset)
        wzero = Signal(8, name="w_zero")                # weight bits that are 0 (zero-extended)
        izero = Signal(g.index_bits, name="idx_zero")   # index bits that are 0 (dense: all)
        mzero = Signal(name="min_zero")                 # the format has no min
        sone = Signal(name="raw")                       # raw format: every scale is 1
        rg = Signal(range(self.rec_granules + 1), name="rec_size")      # granules per record
        bpb_m1 = Signal(range(max(2, bpb_max)), name="bpb_m1")     # >= 1 bit: no zero-width wire
        e0 = Signal(5, name="e0")
        recs_left = Signal(32, name="recs_left")
        recs_more = Signal(name="recs_more")            # recs_left != 0
        in_left = Signal(32, name="in_left")
        in_more = Signal(name="in_more")                # in_left != 0

        # -- input skid register and word window --------------------------------------------
        # A word that arrives while the window's top slot is busy waits in the skid
        # register, which refills the top slot before the input does; so words.ready is
        # an AND of two registers and the window still takes a word every cycle.
        skid = Signal(W, name="skid", reset_less=True)
        sk_valid = Signal(name="skid_valid")
        slot = [Signal(W, name=f"win{j}", reset_less=True) for j in range(span)]
        valid = Signal(span, name="win_valid")
        acc = Signal()
        m.d.comb += [words.ready.eq(in_more & ~sk_valid), acc.eq(words.valid & words.ready)]

        # -- record FIFO (ping-pong) and output control ------------------------------------------
        rec = [Signal(RB, name=f"rec{k}", reset_less=True) for k in range(2)]
        tail = Signal(name="rec_tail")
        head = Signal(name="rec_head")
        fcnt = Signal(range(3), name="rec_count")
        bcnt = Signal(range(max(2, bpb_max)), name="beat_count")
        o_valid = Signal(name="out_valid")
        m.d.comb += beat.valid.eq(o_valid)

        # -- aligner: cut one record at granule offset r --------------------------------------
        r = Signal(range(G + self.rec_granules), name="rec_start")      # granules into S0
        r_hi = Signal(name="rec_start_hi")              # r >= G: S0 is used up
        r_ext = Signal(name="rec_ends_past_s0")         # r + rg >= G
        need_m1 = Signal(range(max(2, span)), name="rec_need_m1")       # words touched - 1 (r < G)
        prefix = Signal(span, name="win_prefix")        # prefix[j]: S0 .. Sj all valid
        m.d.comb += [prefix[j].eq(valid[:j + 1].all()) for j in range(span)]
        have = Signal()
        with m.Switch(need_m1):
            for j in range(span):
                with m.Case(j):
                    m.d.comb += have.eq(prefix[j])
        extract = Signal()
        pos = Signal(range(G // step), name="rec_pos")  # r / step (r < G when cutting)
        m.d.comb += pos.eq(r[step.bit_length() - 1:])
        aligned = _staged_select(m, Cat(*slot), pos, step * GB, RB)
        push = Signal()                                 # a record enters the FIFO
        m.d.comb += extract.eq(recs_more & ~r_hi & (fcnt != 2) & have)
        if two:
            # Builds with a two-level format stage the record in rec_in first: its scales
            # and mins become fixed point (binary16 shifters, or the multipliers) while it
            # waits, into registers that are there when the record reaches the FIFO's head.
            rin = Signal(RB, name="rec_in", reset_less=True)
            rin_valid = Signal(name="rec_in_valid")
            # on the FIFO's registered count, as the aligner: rec_in is empty or moves
            # on whenever the aligner cuts
            m.d.comb += push.eq(rin_valid & (fcnt != 2))
            with m.If(extract):
                m.d.sync += rin.eq(aligned)
            m.d.sync += rin_valid.eq(extract | (rin_valid & ~push))
            src = rin
        else:
            m.d.comb += push.eq(extract)
            src = aligned
        with m.If(extract):
            m.d.sync += [recs_left.eq(recs_left - 1), recs_more.eq(recs_left != 1)]
        with m.If(push):
            m.d.sync += tail.eq(~tail)
            for k in range(2):
                with m.If(tail == k):
                    m.d.sync += rec[k].eq(src)

        # S0 leaves once the records are past it, or unconditionally once every record is
        # out (the tail of the last word, and any word past the operation's records).
        shift = Signal()
        m.d.comb += shift.eq(valid[0] & (r_hi | ~recs_more | (extract & r_ext)))
        wr = len(r) + 1

        def facts(x):
            """(x, x >= G, x + rg >= G, (x + rg - 1) // G), modulo 2**wr (the draining
            values below zero are never used)."""
            x = x[:wr]
            return x, (x >> GL) != 0, ((x + rg) >> GL) != 0, (x + rg - 1)[:wr] >> GL

        nxt_r = [facts(r + rg - G), facts(r + rg), facts(r - G), facts(r)]
        for k, reg in enumerate((r, r_hi, r_ext, need_m1)):
            m.d.sync += reg.eq(Mux(extract, Mux(shift, nxt_r[0][k], nxt_r[1][k]),
                                   Mux(shift, nxt_r[2][k], nxt_r[3][k])))

        # Falling FIFO: slot j is free when it is empty or everything below it moves.
        # (one signal per slot: a ripple through the bits of one vector reads as a loop to Verilator)
        free = [Signal(name=f"win_free{j}") for j in range(span)]
        m.d.comb += free[0].eq(~valid[0] | shift)
        for j in range(1, span):
            m.d.comb += free[j].eq(~valid[j] | free[j - 1])
        for j in range(span - 1):
            with m.If(free[j]):
                m.d.sync += [slot[j].eq(slot[j + 1]), valid[j].eq(valid[j + 1])]
        with m.If(free[span - 1]):
            m.d.sync += [slot[span - 1].eq(Mux(sk_valid, skid, words.payload)),
                         valid[span - 1].eq(sk_valid | acc), sk_valid.eq(0)]
        with m.Elif(acc):
            m.d.sync += [skid.eq(words.payload), sk_valid.eq(1)]
        with m.If(acc):
            m.d.sync += [in_left.eq(in_left - 1), in_more.eq(in_left != 1)]

        # -- output stage: lane muxes from the head record into the output register ----------
        o_load = Signal()
        last_b = Signal()
        m.d.comb += [o_load.eq((~o_valid | beat.ready) & (fcnt != 0)), last_b.eq(bcnt == bpb_m1)]
        pop = o_load & last_b
        with m.If(o_load):
            m.d.sync += bcnt.eq(Mux(last_b, 0, bcnt + 1))
        m.d.sync += [fcnt.eq(fcnt + push - pop), head.eq(head ^ pop),
                     o_valid.eq(o_load | (o_valid & ~beat.ready))]

        hd = Signal(RB, name="head_rec")
        m.d.comb += hd.eq(Mux(head, rec[1], rec[0]))

        def beat_sel(sel, b):
            return sel & (bcnt == b) if bpb_max > 1 else sel

        def pick(cands, src=hd):
            """One bit from (select, ``src`` bit) candidates: a mux over the distinct
            bits, the last one the default. (A bit that is 0 for some formats gets that
            from a per-operation mask, on the register's synchronous reset.)"""
            if not cands:
                return C(0, 1)
            by_bit = {}
            for sel, p in cands:
                by_bit.setdefault(p, []).append(sel)
            items = list(by_bit.items())
            v = src[items[-1][0]]
            for p, sels in reversed(items[:-1]):
                any_sel = sels[0]
                for x in sels[1:]:
                    any_sel = any_sel | x
                v = Mux(any_sel, src[p], v)
            return v

        wbit = [[] for _ in range(8)]
        ibit = [[] for _ in range(g.index_bits)]
        for i in range(Rc):
            for l in range(L):
                # lane (i, l) of beat b: kept weight e = (b*Rc + i)*L + l of the record
                for k in range(8):
                    cands = []
                    for n, kind in enumerate(vk):
                        bits, sgn = kind
                        for b in range(max(f.bpb for f in vkinds[kind])):
                            e = (b * Rc + i) * L + l
                            if k < bits or sgn:                  # else 0: w_zero[k]
                                cands.append((beat_sel(vsel[n], b), e * bits + min(k, bits - 1)))
                    wbit[k].append(pick(cands))
                for k in range(g.index_bits):
                    cands = []
                    for n, kind in enumerate(ik):
                        ib, vsec = kind
                        for b in range(max(f.bpb for f in ikinds[kind])):
                            e = (b * Rc + i) * L + l
                            if k < ib:                           # else 0: idx_zero[k]
                                cands.append((beat_sel(isel[n], b), vsec + e * ib + k))
                    ibit[k].append(pick(cands))

        # Scales and mins. Builds without a two-level format: a mux over the binary16 field
        # offsets and binary16 -> fixed point, from the head record into the output register.
        # Builds with one: per record, while it waits in rec_in, into registers (``new_``):
        # the binary16 conversion likewise (from rec_in, 0 for a two-level format), and the
        # tensor header's D and Mn as fixed point (read once per operation, from its first
        # word) times the 8-bit sub-scale and sub-min (0 for other formats): Rc * 2
        # multipliers fed from registers (rec_in's sub-fields, a mux only if several
        # two-level formats place them differently, and D, Mn) into registers (the DSP's M
        # or P register). A record's values follow it into the FIFO a cycle after it
        # (``prod0``, ``prod1``); in the cycle after its push its first beat takes them
        # from the ``new_`` registers themselves. The output register's input is then one
        # LUT6 over registers: (bypass, head, new binary16, new product, prod0, prod1).
        scl, mns = [], []
        if two:
            hdr_pend = Signal(name="header_pending")
            base = [Signal(signed(_SIG + SUB_EXP_SPAN + 1), name=n, reset_less=True)
                    for n in ("head_scale", "head_min")]
            with m.If(valid[0] & hdr_pend):
                m.d.sync += hdr_pend.eq(0)
                for j, reg in enumerate(base):
                    h = slot[0][j * SCALE_STORE_BITS:(j + 1) * SCALE_STORE_BITS]
                    m.d.sync += reg.eq(fixed_from_f16(h, e0)[:len(reg)].as_signed())
            fresh = Signal(2, name="prod_fresh")        # fresh[k]: rec[k] was pushed last cycle
            m.d.sync += fresh.eq(Mux(push, Mux(tail, 2, 1), 0))
            byp = Signal(name="prod_bypass")            # the head record was pushed last cycle
            m.d.comb += byp.eq(Mux(head, fresh[1], fresh[0]))
        for i in range(Rc):
            field = []
            for offs, sel in ((sk, ssel), (mk, msel)):
                field.append(Cat(*[pick([(sel[n], off + SCALE_STORE_BITS * i + k) for n, off in enumerate(offs)],
                                        rin if two else hd)
                                   for k in range(SCALE_STORE_BITS)]) if offs else None)
            v16 = [fixed_from_f16(field[j], e0) if offs else None for j, offs in enumerate((sk, mk))]
            if not two:
                scl.append(v16[0])
                mns.append(v16[1] if mk else C(0, g.scale_w))
                continue
            for j, out in enumerate((scl, mns)):
                fn = f"{'sm'[j]}{i}"
                sub = Signal(SUB_BITS, name=f"sub_{fn}")
                m.d.comb += sub.eq(Cat(*[
                    pick([(tsel[n], off + Rc * SUB_BITS * j + SUB_BITS * i + k) for n, off in enumerate(tk)], rin)
                    for k in range(SUB_BITS)]))
                new = Signal(signed(g.scale_w), name=f"new_{fn}")
                pn = Signal(signed(g.scale_w), name=f"new_prod_{fn}", reset_less=True)
                with m.If(tl_n):
                    m.d.sync += pn.eq(0)
                with m.Else():
                    m.d.sync += pn.eq((base[j] * sub)[:g.scale_w].as_signed())
                if v16[j] is not None:
                    q16 = Signal(signed(g.scale_w), name=f"new_f16_{fn}", reset_less=True)
                    with m.If(tl):
                        m.d.sync += q16.eq(0)
                    with m.Else():
                        m.d.sync += q16.eq(v16[j])
                    m.d.comb += new.eq(pn | q16)
                else:
                    m.d.comb += new.eq(pn)
                pk = [Signal(signed(g.scale_w), name=f"prod{k}_{fn}", reset_less=True) for k in range(2)]
                for k in range(2):
                    with m.If(fresh[k]):
                        m.d.sync += pk[k].eq(new)
                out.append(Mux(byp, new, Mux(head, pk[1], pk[0])))

        # One register per weight bit / index bit / field across all lanes: the bits some
        # formats zero-extend are cleared by a per-operation mask, which holds for the
        # whole operation, so it may clear them every cycle (reset over enable, as the
        # FDRE has it) and leave the clock enable to o_load. Likewise a raw format holds
        # the scale register at 1 per chain (bit 0 of each field on its FDSE's set, the
        # others on their FDRE's reset) and the min register at 0.
        o_w = [Signal(Rc * L, name=f"out_w{k}", reset_less=True) for k in range(8)]
        o_i = [Signal(Rc * L, name=f"out_idx{k}", reset_less=True) for k in range(g.index_bits)]
        o_s = Signal(Rc * g.scale_w, name="out_scale", reset_less=True)
        o_m = Signal(Rc * g.scale_w, name="out_min", reset_less=True)
        one = C(sum(1 << (i * g.scale_w) for i in range(Rc)), Rc * g.scale_w)
        for reg, force, fval, val in ([(o_w[k], wzero[k], 0, Cat(*wbit[k])) for k in range(8)]
                                      + [(o_i[k], izero[k], 0, Cat(*ibit[k])) for k in range(g.index_bits)]
                                      + [(o_s, sone, one, Cat(*scl)), (o_m, mzero, 0, Cat(*mns))]):
            with m.If(force):
                m.d.sync += reg.eq(fval)
            with m.Elif(o_load):
                m.d.sync += reg.eq(val)
        bp = beat.payload
        for i in range(Rc):
            fs = slice(i * g.scale_w, (i + 1) * g.scale_w)
            m.d.comb += [bp[i].scale.eq(o_s[fs]), bp[i].min.eq(o_m[fs])]
            for l in range(L):
                m.d.comb += [bp[i].w[l].eq(Cat(*[o_w[k][i * L + l] for k in range(8)])),
                             bp[i].idx[l].eq(Cat(*[o_i[k][i * L + l] for k in range(g.index_bits)]))]

        # -- operation control ----------------------------------------------------------------
        drained = (fcnt == 0) & ~rin_valid if two else fcnt == 0
        with m.If(busy & ~recs_more & ~in_more & drained & (~o_valid | beat.ready)):
            m.d.sync += busy.eq(0)
        m.d.comb += cfg.ready.eq(~busy)
        with m.If(cfg.valid & cfg.ready):
            c = cfg.payload
            m.d.sync += [busy.eq(1), e0.eq(c.e0),
                         recs_left.eq(c.records), recs_more.eq(c.records != 0),
                         in_left.eq(c.words), in_more.eq(c.words != 0),
                         valid.eq(0), sk_valid.eq(0),
                         vsel.eq(0), isel.eq(0), ssel.eq(0), msel.eq(0), tsel.eq(0), tl.eq(0), tl_n.eq(1),
                         wzero.eq(0), izero.eq(-1), mzero.eq(1), sone.eq(0)]
            if two:
                m.d.sync += hdr_pend.eq(0)
            with m.Switch(c.fmt):
                for f in F[1:] + F[:1]:
                    with (m.Case(f.code) if f.code else m.Default()):      # unknown codes: code 0
                        rgf = f.record_bits // GB
                        hg = f.fmt.header_bits // GB                 # the first record's start
                        m.d.sync += [vsel[vk.index((f.bits, f.signed))].eq(1),
                                     rg.eq(rgf), bpb_m1.eq(f.bpb - 1),
                                     r.eq(hg), r_hi.eq(hg >= G), r_ext.eq(hg + rgf >= G),
                                     need_m1.eq((hg + rgf - 1) // G if hg < G else 0),
                                     izero.eq(((1 << g.index_bits) - 1) & ~((1 << f.index_bits) - 1)),
                                     mzero.eq(not f.has_min)]
                        if not f.signed:
                            m.d.sync += wzero.eq(0xff & ~((1 << f.bits) - 1))
                        if f.index_bits:
                            m.d.sync += isel[ik.index((f.index_bits, vsec_of(f)))].eq(1)
                        if f.fmt.two_level:
                            m.d.sync += [tsel[tk.index(soff_of(f))].eq(1), tl.eq(1), tl_n.eq(0),
                                         hdr_pend.eq(1)]
                        elif f.raw:                          # no fields: scale 1, min 0
                            m.d.sync += sone.eq(1)
                        else:
                            m.d.sync += ssel[sk.index(soff_of(f))].eq(1)
                            if f.has_min:
                                m.d.sync += msel[mk.index(soff_of(f) + Rc * SCALE_STORE_BITS)].eq(1)
        return m


def _staged_select(m, src, pos, unit, width):
    """``src[pos*unit : pos*unit + width]`` (zero past the end) as radix-4 mux stages.

    The last stage is radix 2 if ``pos`` has an odd width. Each stage is one LUT per bit
    on UltraScale+ and the stage widths shrink towards ``width``: one ``2**len(pos)``-way
    mux would take about three LUTs a bit at 8 positions, this takes two.

    Parameters
    ----------
    m : Module
    src : Value
        The bits to select from.
    pos : Signal
        Position, in units.
    unit : int
        Bits per position step.
    width : int
        Bits selected.

    Returns
    -------
    Signal
        ``width`` bits.
    """
    nb = len(pos)
    need = width + ((1 << nb) - 1) * unit
    cur = Cat(src, Const(0, max(0, need - len(src))))
    hi = nb
    while hi > 0:
        lo = max(0, hi - 2)
        w = width + ((1 << lo) - 1) * unit              # what the later stages still shift
        st = unit << lo
        nxt = Signal(w, name=f"align_s{lo}")
        with m.Switch(pos[lo:hi]):
            for v in range(1 << (hi - lo)):
                with m.Case(v):
                    m.d.comb += nxt.eq(cur[v * st:v * st + w])
        cur, hi = nxt, lo
    if nb == 0:
        nxt = Signal(width, name="align_s0")
        m.d.comb += nxt.eq(cur[:width])
        cur = nxt
    return cur
