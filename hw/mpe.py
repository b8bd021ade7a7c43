"""Matrix engine (MPE): dequant units, activation buffer and sparse DSP chains; MV and MM.

Structure (``C = weight_channels``, ``R = chains``, ``Rc = R / C``, ``B = bcast_stages``,
``@n``: cycles after the issue of a (beat, token))::

  words{c} -> DequantUnit c -> beat FIFO c (LUTRAM) ------------------------------> beat reg c -----+
                 push (reg) |              ^ pop (reg, one per unit) @2+B            @3+B           |
                            v              |                                                        v
  cfg -> sequencer --issue @0--> act banks read --> span, u --> cand mux -> root + B levels --> R x SparseChain
         avail[c] != 0             @1               @2          ctrl, tap   (fanout <= F)    @3+B      |
         credits != 0                                |                                                 |
           ^                                         +-> xsum tree, + over beats, * u -> root + B ---->+ (late:
           |                                                                                           |  xsum_lag)
           +-- credit back (reg) <-- out <-- out FIFO slice c (one per channel) <-- acc @latency -------+
  act (addr, L x int8, u) -> reg -> activation buffer (act_banks word-interleaved banks)

Operation (``cfg``, filled on the host by :func:`mpe_config`): the format code, ``e0``
of the tensor's scales (for the dequant units), ``tokens`` T (1 = MV, decode; up to
``mm_tokens`` = MM, prefill), ``act_base``, and the counts the RTL would otherwise
multiply out: ``tiles`` = ceil(N / R), ``groups`` = K / G, the activation ``stride``,
and the ``records`` and ``words`` every channel streams. For every row tile (row
``tile*R + j`` on chain ``j``, fed by dequant unit ``j % C`` as its local chain
``j // C``), every quant group and every beat of it, the engine takes one beat from
every dequant unit and holds it for T cycles, one per token (weight-stationary: the
weights stream once whatever T is). ``out`` carries one beat of R accumulators per
(tile, token), tile-major; rows past N carry 0 (the packer zeroes their scales, and
their values).

Attention uses the same operations over the raw KV formats (format codes after the
weight formats, :class:`~flightllm.hw.geometry.EngineGeometry`): their dequant beats
carry scale 1 and min 0, so ``acc = sum_g u[g] * psum[g]`` exactly. QK is an MM with one
kv head's K cache as the weight (N = positions, K = head_dim) and the queries of the
heads sharing it as the T tokens, every factor 1; PV an MV/MM with the transposed V
cache (N = head_dim, K = positions, groups of 32 positions) and the requantized
attention probabilities (INT8 in [0, 127], a factor per group) as the activations.

Activation buffer: ``act_buf_depth`` INT8 elements as words of ``L`` elements, each word
with the unsigned factor ``u`` of its quant group (:func:`act_layout`; the writer repeats
a group's factor on each of its words), written through ``act`` (always ready). Token
``t``'s vector starts at word ``act_base + t * stride`` (:meth:`EngineGeometry.act_stride`);
element ``x[k]`` is lane ``k % L`` of word ``k // L``. The engine must not be written
where a running operation reads (wait for ``busy`` low).

Timing: every stream boundary has a registered ready (``cfg.ready`` is a register,
``act.ready`` a constant, ``out`` leaves a FIFO, each dequant unit's ``beat.ready`` is
decoded from its FIFO's level register alone); nothing stalls the chains. The sequencer issues a (beat, token) only
when

* every dequant unit has a beat: per-unit counters of the beats in its FIFO, counted
  up by registered push pulses (never by the units' combinational ``valid``), down at
  issue; the FIFOs are popped in lockstep ``B + 2`` cycles later through per-unit
  registered pops, as the beat reaches the chains;
* if the beat ends a row (last beat of the last group), the output FIFO has a free
  entry for its result: a credit counter, taken at issue, returned one cycle after the
  result leaves ``out``. The FIFO holds every result that can be in flight (``latency``
  + the credit round trip), so a full-rate MM never waits for credits. It is cut into
  one slice per weight channel (Rc chains each) that move in lockstep, each written on
  its own first chain's ``acc_valid``.

The wide broadcasts to the chains (candidate activations, control, ``u``, ``xsum_u``)
pass a root register and ``B`` register levels, each register feeding at most
``bcast_fanout`` of the next (:func:`broadcast`).
"""

from __future__ import annotations

import operator
from functools import reduce

import numpy as np
from amaranth import Cat, Module, Mux, Shape, Signal, signed, unsigned
from amaranth.lib import data, fifo, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from .chain import SparseChain, token_line
from .dequant import DequantUnit
from .formats import E0_MAX, WeightFormat, record_count
from .geometry import EngineGeometry, beat_layout, ceil_div, delay, dequant_cfg_layout
from .params import HwParams

__all__ = ["MatrixEngine", "mpe_cfg_layout", "mpe_config", "pack_fields", "act_layout", "broadcast",
           "TILE_BITS"]

#: Width of the row-tile count (``N`` up to ``2**20 - 1`` tiles of ``chains`` rows).
TILE_BITS = 20


def mpe_cfg_layout(geom: EngineGeometry) -> data.StructLayout:
    """Per-operation config of the matrix engine (fill it with :func:`mpe_config`)."""
    dq = dequant_cfg_layout(geom)
    return data.StructLayout({
        "fmt": dq["fmt"].shape,
        "e0": dq["e0"].shape,
        "tokens": range(geom.tokens_max + 1),
        "act_base": unsigned(geom.act_addr_bits),
        "tiles": unsigned(TILE_BITS),
        "groups": range(geom.act_words + 1),      # K / G <= K / L <= the buffer's words
        "stride": range(geom.act_words + 1),
        "records": dq["records"].shape,
        "words": dq["words"].shape,
    })


def mpe_config(geom: EngineGeometry, wf: WeightFormat, n_rows: int, n_in: int,
               tokens: int = 1, act_base: int = 0, shift: int = 0) -> dict:
    """Host-side config of one MV/MM operation: validated fields of :func:`mpe_cfg_layout`.

    Parameters
    ----------
    geom : EngineGeometry
    wf : WeightFormat
        The tensor's format (one of the build's).
    n_rows, n_in : int
        ``N`` and ``K`` of the weight matrix.
    tokens : int
        ``T``: 1 for MV, up to ``mm_tokens`` for MM.
    act_base : int
        Activation-buffer word of token 0's vector (a multiple of the bank count).
    shift : int
        The packed tensor's scale shift (:attr:`PackedTensor.shift`); the dequant units
        get ``e0 = E0_MAX - shift``. Raw (KV) formats have no scales: shift 0 (their
        ``e0`` is ignored by the dequant units).

    Every count (row tiles, quant groups, activation stride, records and stream words
    per channel) is computed here, so the RTL holds no multiplier for them.

    Raises
    ------
    ValueError
        A field is out of what the build supports (the message names it and the limit).
    """
    def bad(what):
        raise ValueError(f"MPE operation {wf.name} {n_rows}x{n_in} T={tokens} "
                         f"(preset {geom.params.name!r}): {what}")

    code = geom.code(wf)
    for name, v in (("n_rows", n_rows), ("n_in", n_in), ("tokens", tokens), ("act_base", act_base),
                    ("shift", shift)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
            bad(f"{name} must be an int, not {type(v).__name__}")
    max_tiles = (1 << TILE_BITS) - 1
    if not 1 <= n_rows <= max_tiles * geom.R:
        bad(f"N (n_rows) must be in 1..{max_tiles * geom.R} ({max_tiles} row tiles of {geom.R}), got {n_rows}")
    g = wf.group_size
    if n_in < g or n_in % g:
        bad(f"K (n_in) must be a positive multiple of the group size {g} of {wf.name}, got {n_in}")
    if n_in > geom.params.act_buf_depth:
        bad(f"K (n_in) = {n_in} exceeds the activation buffer ({geom.params.act_buf_depth} elements)")
    if not 1 <= tokens <= geom.tokens_max:
        bad(f"tokens must be in 1..mm_tokens ({geom.tokens_max}), got {tokens}")
    if act_base < 0 or act_base % geom.act_banks:
        bad(f"act_base ({act_base}) must be a non-negative multiple of the bank count {geom.act_banks}")
    stride = geom.act_stride(n_in)
    if act_base + tokens * stride > geom.act_words:
        bad(f"activations end at word {act_base + tokens * stride}, past the buffer's {geom.act_words} words")
    if not 0 <= shift <= E0_MAX:
        bad(f"shift must be in 0..{E0_MAX} (e0 = {E0_MAX} - shift), got {shift}")
    if wf.raw and shift:
        bad(f"a raw format has no scales: shift must be 0, got {shift}")
    tiles, groups = ceil_div(n_rows, geom.R), n_in // g
    fields = dict(fmt=code, e0=E0_MAX - shift, tokens=tokens, act_base=act_base, tiles=tiles,
                  groups=groups, stride=stride, records=record_count(wf, (n_rows, n_in), geom.R),
                  words=geom.stream_words(wf, n_rows, n_in))
    fields = {k: int(v) for k, v in fields.items()}       # plain ints (JSON, numpy inputs)
    for name, f in mpe_cfg_layout(geom):
        if fields[name] >= 1 << Shape.cast(f.shape).width:
            bad(f"{name} = {fields[name]} does not fit the config's {Shape.cast(f.shape).width} bits")
    return fields


def pack_fields(layout: data.StructLayout, fields: dict) -> int:
    """The integer (LSB first, as Amaranth lays it out) of a struct layout's fields.

    Raises ``ValueError`` for an unknown field or a value that does not fit its width."""
    names = {name for name, _ in layout}
    unknown = set(fields) - names
    if unknown:
        raise ValueError(f"unknown field(s) {sorted(unknown)}; layout has {sorted(names)}")
    v = 0
    for name, f in layout:
        if name in fields:
            width = Shape.cast(f.shape).width
            x = int(fields[name])
            if not 0 <= x < 1 << width:
                raise ValueError(f"field {name} = {x} does not fit {width} bits")
            v |= x << f.offset
    return v


def act_layout(geom: EngineGeometry) -> data.StructLayout:
    """One activation-buffer write: word address, ``L`` INT8 elements and the factor ``u``
    of the quant group the word belongs to."""
    return data.StructLayout({"addr": unsigned(geom.act_addr_bits),
                              "data": data.ArrayLayout(signed(8), geom.L),
                              "u": unsigned(geom.factor_bits)})


def broadcast(m: Module, name: str, value, sinks: int, stages: int, fanout: int,
              reset_less: bool = True) -> list:
    """``value`` registered ``stages + 1`` times as a fanout tree; one leaf per sink.

    Level 0 is one register; level ``s`` has ``ceil(sinks / fanout**(stages - s + 1))``
    copies, copy ``k`` fed by copy ``k // fanout`` of the level before, and sink ``j``
    reads leaf ``j // fanout``: no register drives more than ``fanout`` registers (or
    sinks) of the next level. The copies are marked so Vivado keeps them apart
    (``equivalent_register_removal``). ``reset_less=False`` for valid bits (a reset then
    empties the tree at once).
    """
    attrs = {"equivalent_register_removal": "no"}
    prev = []
    for s in range(stages + 1):
        n = ceil_div(sinks, fanout ** (stages - s + 1))
        cur = [Signal.like(value, name=f"{name}_b{s}_{k}", reset_less=reset_less, attrs=attrs)
               for k in range(n)]
        for k, r in enumerate(cur):
            m.d.sync += r.eq(value if s == 0 else prev[k // fanout])
        prev = cur
    return [prev[j // fanout] for j in range(sinks)]


def adder_tree(m: Module, name: str, values, levels_per_stage: int = 2):
    """Pipelined sum of ``values``: a register after every ``levels_per_stage`` adder levels.

    Returns ``(sum, stages)``."""
    vals, level, stages = list(values), 0, 0
    while len(vals) > 1:
        nxt = []
        for i in range(0, len(vals) - 1, 2):
            nxt.append(vals[i] + vals[i + 1])
        if len(vals) % 2:
            nxt.append(vals[-1])
        vals, level = nxt, level + 1
        if level % levels_per_stage == 0 or len(vals) == 1:
            regs = []
            for i, v in enumerate(vals):
                r = Signal(v.shape(), name=f"{name}_s{stages}_{i}", reset_less=True)
                m.d.sync += r.eq(v)
                regs.append(r)
            vals, stages = regs, stages + 1
    return vals[0], stages


class MatrixEngine(wiring.Component):
    """The MPE: MV and MM over packed, group-scaled (N:M-sparse) weights.

    Parameters
    ----------
    params : HwParams
    bcast_stages : int, optional
        Register levels of the activation broadcast after its root register; default
        the fewest that keep every register's fanout within ``bcast_fanout``.
    bcast_fanout : int
        Registers (or chains) one broadcast register drives.
    overlap : bool
        Back-to-back operations (the MPE unit's mode): ``cfg`` is taken into a pending
        register whenever it is free; the dequant units get the pending operation as soon
        as each has sent its last beat of the current one, and the sequencer starts it right
        after the current operation's last issue if both have the same ``tokens`` (the
        chains' tap is unchanged; everything else an operation sets travels with its beats
        or is read before the next SETUP), else once the current one has drained. The
        writer of ``act`` must then keep the pending operation's activations apart from the
        running one's (the unit alternates two halves of the buffer), and pulses ``act_done``
        once they are all written: the pending operation starts only after that, so its cfg
        (and the dequant units' refill) may come before its activations.

    Attributes
    ----------
    cfg : In(stream of :func:`mpe_cfg_layout`)
        Accepted when the previous operation has left the pipeline (``overlap``: when the
        pending register is free).
    words0.. : In(stream of unsigned(hbm_port_bits))
        Weight channel ``c``'s records (:mod:`flightllm.hw.formats`), exactly ``words``
        of the config.
    act : In(stream of :func:`act_layout`)
        Activation-buffer writes.
    act_done : In(1)
        ``overlap`` only: a pulse when the pending operation's activations are written.
    out : Out(stream of ArrayLayout(signed(acc_bits), chains))
        One row tile's accumulators per token.
    busy : Out(1)
        An operation is being sequenced or in flight (the buffer is being read).
    latency : int
        Cycles from a (beat, token)'s issue to its result entering the output FIFO.
    out_depth, beat_fifo_depth : int
        Entries of the output FIFO (= the credits) and of each dequant unit's beat FIFO.
    """

    def __init__(self, params: HwParams, *, bcast_stages: int | None = None, bcast_fanout: int = 8,
                 overlap: bool = False):
        self.overlap = bool(overlap)
        try:
            self.geom = g = EngineGeometry(params)
            if not (isinstance(bcast_fanout, int) and bcast_fanout >= 2):
                raise ValueError(f"bcast_fanout must be an int >= 2, not {bcast_fanout!r}")
            if bcast_stages is None:          # the fewest levels >= 1 with fanout**(levels + 1) >= R
                bcast_stages = 1
                while bcast_fanout ** (bcast_stages + 1) < g.R:
                    bcast_stages += 1
            if not (isinstance(bcast_stages, int) and bcast_stages >= 0):
                raise ValueError(f"bcast_stages must be an int >= 0, not {bcast_stages!r}")
            self._chain = SparseChain(params)
            self._chain._MustUse__silence = True    # a template for latencies; one per chain is built
        except (TypeError, ValueError):
            self._MustUse__silence = True      # never elaborated: no unused-elaboratable warning
            raise
        self.bcast_stages, self.bcast_fanout = bcast_stages, bcast_fanout
        # issue -> s1 (act read, pop pending) -> span -> broadcast root + B levels -> chain ports
        self.chain_offset = 3 + bcast_stages
        self.latency = self.chain_offset + self._chain.latency
        # the FIFO write is `latency` after the credit is taken; the result is on `out` two
        # cycles later (SyncFIFOBuffered), and its credit is back two cycles after it leaves
        self.out_depth = self.latency + 5
        # a beat stays from its push until its pop: push_r, avail, issue, then chain_offset - 1
        self.beat_fifo_depth = 1 << (self.chain_offset + 4).bit_length()
        members = {"cfg": In(stream.Signature(mpe_cfg_layout(g)))}
        for c in range(g.C):
            members[f"words{c}"] = In(stream.Signature(unsigned(g.W)))
        members["act"] = In(stream.Signature(act_layout(g)))
        if self.overlap:
            members["act_done"] = In(1)
        members["out"] = Out(stream.Signature(data.ArrayLayout(signed(g.acc_w), g.R)))
        members["busy"] = Out(1)
        super().__init__(members)

    def elaborate(self, platform):
        g = self.geom
        m = Module()
        L, R, C, NB, FB = g.L, g.R, g.C, g.act_banks, g.factor_bits
        B, F = self.bcast_stages, self.bcast_fanout
        lnb = (NB - 1).bit_length()
        ch0 = self._chain
        bl = beat_layout(g)

        # -- dequant units, each into a beat FIFO -----------------------------------------
        dqs, bfifos, push_r = [], [], []
        for c in range(C):
            dq = DequantUnit(g.params)
            m.submodules[f"dequant{c}"] = dq
            wiring.connect(m, wiring.flipped(getattr(self, f"words{c}")), dq.words)
            bf = fifo.SyncFIFO(width=bl.size, depth=self.beat_fifo_depth)
            m.submodules[f"beat_fifo{c}"] = bf
            m.d.comb += [bf.w_data.eq(dq.beat.payload.as_value()), bf.w_en.eq(dq.beat.valid),
                         dq.beat.ready.eq(bf.w_rdy)]
            pr = Signal(name=f"push_r{c}")
            m.d.sync += pr.eq(bf.w_en & bf.w_rdy)
            dqs.append(dq)
            bfifos.append(bf)
            push_r.append(pr)

        # -- activation buffer: NB word-interleaved banks, writes registered once ------------
        act_q = Signal(act_layout(g), reset_less=True)
        act_v = Signal()
        m.d.sync += [act_q.eq(self.act.payload), act_v.eq(self.act.valid)]
        m.d.comb += self.act.ready.eq(1)
        word_w = L * 8 + FB
        rports = []
        for b in range(NB):
            mem = Memory(shape=unsigned(word_w), depth=g.act_rows, init=[])
            m.submodules[f"act_bank{b}"] = mem
            wp = mem.write_port()
            m.d.comb += [wp.addr.eq(act_q.addr >> lnb), wp.data.eq(Cat(act_q.data.as_value(), act_q.u)),
                         wp.en.eq(act_v & ((act_q.addr & (NB - 1)) == b))]
            rports.append(mem.read_port(transparent_for=()))

        # -- the operation ---------------------------------------------------------------------
        cfg_l = mpe_cfg_layout(g)
        op = Signal(cfg_l, reset_less=True)
        cfg_ready = Signal(init=1)
        dq_pend = Signal(C)
        if self.overlap:
            pend = Signal(cfg_l, reset_less=True)     # the next operation
            pend_v = Signal()
            pend_act = Signal()                   # its activations are in the buffer
            seq_idle = Signal()
            with m.If(self.act_done):
                m.d.sync += pend_act.eq(1)
            m.d.comb += [self.cfg.ready.eq(~pend_v), self.busy.eq(~seq_idle | pend_v)]
            dq_op = pend
        else:
            m.d.comb += [self.cfg.ready.eq(cfg_ready), self.busy.eq(~cfg_ready)]
            dq_op = op
        for c, dq in enumerate(dqs):
            m.d.comb += [dq.cfg.payload.fmt.eq(dq_op.fmt), dq.cfg.payload.e0.eq(dq_op.e0),
                         dq.cfg.payload.records.eq(dq_op.records), dq.cfg.payload.words.eq(dq_op.words),
                         dq.cfg.valid.eq(dq_pend[c])]
            with m.If(dq.cfg.ready):
                m.d.sync += dq_pend[c].eq(0)
        if self.overlap:
            with m.If(self.cfg.valid & ~pend_v):
                p = self.cfg.payload
                with m.If((p.tiles != 0) & (p.groups != 0) & (p.tokens != 0)):
                    m.d.sync += [pend.eq(p), pend_v.eq(1), dq_pend.eq((1 << C) - 1)]

        # per-format constants, registered in SETUP
        bpb_m1 = Signal(range(max(2, g.bpb_max)), reset_less=True)    # no zero-width counters
        span = Signal(range(NB + 1), reset_less=True)
        pats = list(dict.fromkeys((f.fmt.n_keep, f.fmt.m) for f in g.formats))   # N:M patterns (dense 1:1)
        pat_sel = Signal(len(pats), reset_less=True, attrs={"max_fanout": "64"})
        # the last values of the counters (registered compares against them)
        tok_m1 = Signal(range(max(2, g.tokens_max)), reset_less=True)
        grp_m1 = Signal.like(op.groups, reset_less=True)
        tile_m1 = Signal.like(op.tiles, reset_less=True)

        tok = Signal.like(tok_m1)
        bsub = Signal.like(bpb_m1)
        grp = Signal.like(grp_m1)
        tile = Signal.like(tile_m1)
        aw = g.act_addr_bits + 1
        step_wa = Signal(aw)                 # word address of this beat's span, token 0
        tok_wa = Signal(aw)                  # ... for this token
        last_tok, last_b, last_g, last_t = tok == tok_m1, bsub == bpb_m1, grp == grp_m1, tile == tile_m1

        run = Signal()
        issue = Signal()
        res_beat = Signal()                  # the beat ends a row: one result per token
        m.d.comb += res_beat.eq(last_b & last_g)

        # beats available in every FIFO (counted from registered push pulses)
        avail_nz = Signal(C)
        pop_now = Signal()
        m.d.comb += pop_now.eq(issue & last_tok)
        for c in range(C):
            av = Signal(range(self.beat_fifo_depth + 1), name=f"avail{c}")
            nxt = Signal.like(av, name=f"avail{c}_next")
            m.d.comb += nxt.eq(av + push_r[c] - pop_now)
            m.d.sync += [av.eq(nxt), avail_nz[c].eq(nxt != 0)]
        # output FIFO credits
        credit = Signal(range(self.out_depth + 1), init=self.out_depth)
        credit_nz = Signal(init=1)
        out_pop = Signal()
        m.d.sync += out_pop.eq(self.out.valid & self.out.ready)
        credit_next = Signal.like(credit)
        m.d.comb += credit_next.eq(credit - (issue & res_beat) + out_pop)
        m.d.sync += [credit.eq(credit_next), credit_nz.eq(credit_next != 0)]
        m.d.comb += issue.eq(run & avail_nz.all() & (credit_nz | ~res_beat))

        drain = Signal(range(self.latency + 1))

        def start(p):
            m.d.sync += [op.eq(p), tok_m1.eq(p.tokens - 1), grp_m1.eq(p.groups - 1),
                         tile_m1.eq(p.tiles - 1), tok.eq(0), bsub.eq(0), grp.eq(0), tile.eq(0),
                         step_wa.eq(p.act_base), tok_wa.eq(p.act_base)]

        if self.overlap:
            # the pending operation may start once every dequant unit has taken it
            can_start = Signal()
            m.d.comb += can_start.eq(pend_v & pend_act & (dq_pend == 0))
        with m.FSM() as fsm:
            with m.State("IDLE"):
                if self.overlap:
                    with m.If(can_start):
                        start(pend)
                        m.d.sync += [pend_v.eq(0), pend_act.eq(0)]
                        m.next = "SETUP"
                else:
                    with m.If(self.cfg.valid & cfg_ready):
                        p = self.cfg.payload
                        start(p)
                        with m.If((p.tiles != 0) & (p.groups != 0) & (p.tokens != 0)):
                            m.d.sync += [cfg_ready.eq(0), dq_pend.eq((1 << C) - 1)]
                            m.next = "SETUP"
            with m.State("SETUP"):
                with m.Switch(op.fmt):
                    for f in g.formats:
                        with m.Case(f.code):
                            m.d.sync += [bpb_m1.eq(f.bpb - 1), span.eq(f.span_words),
                                         pat_sel.eq(1 << pats.index((f.fmt.n_keep, f.fmt.m)))]
                m.next = "RUN"
            with m.State("RUN"):
                m.d.comb += run.eq(1)
                with m.If(issue):
                    with m.If(~last_tok):
                        m.d.sync += [tok.eq(tok + 1), tok_wa.eq(tok_wa + op.stride)]
                    with m.Else():
                        nxt_wa = Signal(aw)
                        m.d.comb += nxt_wa.eq(step_wa + span)
                        m.d.sync += tok.eq(0)
                        with m.If(~last_b):
                            m.d.sync += [bsub.eq(bsub + 1), step_wa.eq(nxt_wa), tok_wa.eq(nxt_wa)]
                        with m.Else():
                            m.d.sync += bsub.eq(0)
                            with m.If(~last_g):
                                m.d.sync += [grp.eq(grp + 1), step_wa.eq(nxt_wa), tok_wa.eq(nxt_wa)]
                            with m.Else():      # next row tile: the activations start over
                                m.d.sync += [grp.eq(0), tile.eq(tile + 1),
                                             step_wa.eq(op.act_base), tok_wa.eq(op.act_base)]
                                with m.If(last_t):
                                    m.d.sync += drain.eq(self.latency)
                                    m.next = "DRAIN"
            with m.State("DRAIN"):
                # the last beat's result is in the output FIFO after `latency` cycles; the
                # chains' tap and the activation buffer are then free for the next operation
                m.d.sync += drain.eq(drain - 1)
                if self.overlap:            # same tap: the next operation follows at once
                    with m.If(can_start & (pend.tokens == op.tokens)):
                        start(pend)
                        m.d.sync += [pend_v.eq(0), pend_act.eq(0)]
                        m.next = "SETUP"
                    with m.Elif(drain == 0):
                        m.next = "IDLE"
                else:
                    with m.If(drain == 0):
                        m.d.sync += cfg_ready.eq(1)
                        m.next = "IDLE"
        if self.overlap:
            m.d.comb += seq_idle.eq(fsm.ongoing("IDLE"))

        # -- stage 1: activation read (address from the sequencer's register) -------------
        for rp in rports:
            m.d.comb += rp.addr.eq(tok_wa >> lnb)
        ctrl_l = data.StructLayout({"valid": 1, "first": 1, "last": 1, "first_grp": 1, "last_grp": 1})
        ctrl1 = Signal(ctrl_l)
        off1 = Signal(max(1, lnb), reset_less=True)
        pop1 = Signal()
        m.d.sync += [ctrl1.valid.eq(issue), ctrl1.first.eq(bsub == 0), ctrl1.last.eq(last_b),
                     ctrl1.first_grp.eq(grp == 0), ctrl1.last_grp.eq(last_g),
                     off1.eq(tok_wa[:lnb] if lnb else 0), pop1.eq(pop_now)]

        # -- stage 2 (E0): the aligned span and its factor ---------------------------------------
        span2 = Signal(data.ArrayLayout(signed(8), NB * L), reset_less=True)
        u2 = Signal(unsigned(FB), reset_less=True)
        ctrl2 = Signal(ctrl_l)
        with m.Switch(off1):
            for o in range(NB):
                with m.Case(o):
                    words = [rports[(o + k) % NB].data for k in range(NB)]
                    m.d.sync += [span2.eq(Cat(w[:L * 8] for w in words)), u2.eq(words[0][L * 8:])]
        m.d.sync += ctrl2.eq(ctrl1)

        # candidates of every lane's m-window, per N:M pattern (shared by all chains): an
        # AND-OR over the patterns, selected one-hot by registers decoded in SETUP (static
        # during the operation; each drives every lane, so Vivado may replicate them)
        cand = Signal(data.ArrayLayout(data.ArrayLayout(signed(8), ch0.n_cand), L))
        for i in range(L):
            for c in range(ch0.n_cand):
                terms = [span2[(i // n) * mm + c].as_unsigned() & pat_sel[k].replicate(8)
                         for k, (n, mm) in enumerate(pats) if c < mm]
                if terms:
                    m.d.comb += cand[i][c].eq(reduce(operator.or_, terms))

        # -- broadcast to the chains: root register + B levels ---------------------------------
        cand_b = broadcast(m, "cand", cand, R, B, F)
        ctrl_b = broadcast(m, "ctrl", ctrl2, R, B, F, reset_less=False)
        tap_b = broadcast(m, "tap", tok_m1, R, B, F)
        # u and xsum_u enter the broadcast so that they reach the chains u_lag / xsum_lag
        # cycles after the beat (which enters at E0)
        u_b = broadcast(m, "u", delay(m, u2, ch0.u_lag, name="u_lag"), R, B, F)

        xs_b = None
        if g.has_min:
            # xsum of the span's first L activations (formats with a min are dense: span 1),
            # accumulated over the group's beats per token, times u: once, for every chain
            xsum, t_st = adder_tree(m, "xsum_tree", [span2[i] for i in range(L)])
            ctrl_x = Signal(ctrl_l, name="ctrl_x")
            m.d.comb += ctrl_x.eq(delay(m, ctrl2.as_value(), t_st, name="ctrl_xs"))
            if g.bpb_max > 1:
                xs_new = Signal(signed(g.xsum_w), name="xs_new")
                xs_tap = token_line(m, "xsum_line", xs_new, ctrl_x.valid, tok_m1, g.tokens_max)
                m.d.comb += xs_new.eq(Mux(ctrl_x.first, 0, xs_tap) + xsum)
                xs = Signal(signed(g.xsum_w), name="xsum", reset_less=True)
                m.d.sync += xs.eq(xs_new)
                t_st += 1
            else:
                xs = xsum
            # one DSP48E2: A/B, M, P registers
            xa = Signal(signed(g.xsum_w), name="xs_a", reset_less=True)
            xb = Signal(unsigned(FB), name="xs_b", reset_less=True)
            xm = Signal(signed(g.xsum_u_w), name="xs_m", reset_less=True)
            xp = Signal(signed(g.xsum_u_w), name="xs_p", reset_less=True)
            m.d.sync += [xa.eq(xs), xb.eq(delay(m, u2, t_st, name="u_xs")), xm.eq(xa * xb), xp.eq(xm)]
            pad = ch0.xsum_lag - (t_st + 3)
            if pad < 0:
                raise ValueError(f"the xsum path ({t_st + 3} cycles) is longer than the chain's "
                                 f"xsum_lag ({ch0.xsum_lag})")
            xs_b = broadcast(m, "xsum_u", delay(m, xp, pad, name="xsum_u_lag"), R, B, F)

        # -- the weights: FIFO head -> per-unit beat register, aligned with the broadcast ------
        pop_d = delay(m, pop1, B, name="pop_d", reset_less=False)          # issue + 1 + B
        beat_q = []
        for c, bf in enumerate(bfifos):
            popc = Signal(name=f"pop{c}")                                  # issue + 2 + B, per unit
            m.d.sync += popc.eq(pop_d)
            m.d.comb += bf.r_en.eq(popc)
            bq = Signal(bl, name=f"beat_q{c}", reset_less=True)            # issue + 3 + B
            m.d.sync += bq.eq(bf.r_data)
            beat_q.append(bq)

        # -- chains ------------------------------------------------------------------------------
        chains = []
        for j in range(R):
            ch = SparseChain(g.params)
            m.submodules[f"chain{j}"] = ch
            ctl = ctrl_b[j]
            m.d.comb += [ch.valid.eq(ctl.valid), ch.first.eq(ctl.first), ch.last.eq(ctl.last),
                         ch.first_grp.eq(ctl.first_grp), ch.last_grp.eq(ctl.last_grp),
                         ch.tap.eq(tap_b[j]), ch.cand.eq(cand_b[j]), ch.u.eq(u_b[j]),
                         ch.beat.eq(beat_q[j % C][j // C])]
            if xs_b is not None:
                m.d.comb += ch.xsum_u.eq(xs_b[j])
            chains.append(ch)

        # -- output FIFO: one slice per weight channel, next to its chains ------------------
        # The slices move in lockstep (same writes, same reads): each takes its write enable
        # from its own first chain, so no single register drives the whole R x acc_bits
        # write side.
        slices = []
        for c in range(C):
            sl = fifo.SyncFIFOBuffered(width=g.Rc * g.acc_w, depth=self.out_depth)
            m.submodules[f"out_fifo{c}"] = sl
            mine = chains[c::C]                          # chains c, c + C, ...: local index i
            m.d.comb += [sl.w_en.eq(mine[0].acc_valid), sl.w_data.eq(Cat(ch.acc for ch in mine)),
                         sl.r_en.eq(self.out.ready)]
            slices.append(sl)
        m.d.comb += self.out.valid.eq(slices[0].r_rdy)
        for j in range(R):
            m.d.comb += self.out.payload[j].eq(
                slices[j % C].r_data[(j // C) * g.acc_w:(j // C + 1) * g.acc_w])
        return m
