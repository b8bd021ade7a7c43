"""Matrix engine (MPE): dequant units + activation buffer + sparse DSP chains, MV and MM.

Structure (``C = weight_channels``, ``R = chains``, ``Rc = R / C``)::

    payload{c}, scales{c} --> DequantUnit c --beats--+
                                                     +--> issue --> act read --> route --> R x SparseChain --> out FIFO --> out
    act (addr, L x int8) --> activation buffer ------+      (sequencer: tiles, groups, beats, tokens)

Operation (``cfg``, filled on the host by :func:`mpe_config` from N, K, format, T and
``act_base``): ``fmt`` (a format code, :meth:`EngineGeometry.code`), ``tokens`` T (1 =
MV, decode; up to ``mm_tokens`` = MM, prefill), ``act_base``, and the counts the RTL
would otherwise multiply out: ``tiles`` = ceil(N / R), ``groups`` = K / G, ``stride``
and the per-channel stream word counts. For every row tile (``R`` rows, row
``tile*R + j`` on chain ``j``; chain ``j`` is fed by dequant unit ``j % C``), every
quant group and every beat of it, the engine takes one beat from every dequant unit
and holds it for T cycles, one per token (weight-stationary: weights stream once
whatever T is). It emits one ``out`` beat of R int48 accumulators per (tile, token),
tile-major; rows past N carry 0.

Activation buffer: ``act_buf_depth`` INT8 elements as words of ``L`` elements,
written through ``act`` (word address, data; always ready). Token ``t``'s vector
starts at word ``act_base + t * stride`` with ``stride = ceil(K / L / banks) * banks``
(:meth:`EngineGeometry.act_stride`); ``act_base`` must be a multiple of ``banks``.
Element ``x[k]`` is lane ``k % L`` of word ``k // L``. The engine must not be written
where a running operation reads.

Backpressure: every pipeline register shares one enable, low only while the last
stage holds a result the output FIFO cannot take (``out.ready`` low long enough);
empty dequant beats enter as bubbles. Pipeline depth from issue to result is
``2 + SparseChain.latency`` cycles.
"""

from __future__ import annotations

import math

import numpy as np
from amaranth import Cat, Module, Mux, Shape, Signal, signed, unsigned
from amaranth.lib import data, fifo, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from .chain import SparseChain
from .dequant import DequantUnit
from .formats import WeightFormat
from .geometry import EngineGeometry, delay
from .params import HwParams

__all__ = ["MatrixEngine", "mpe_cfg_layout", "mpe_config", "pack_fields", "act_layout"]


def mpe_cfg_layout(geom: EngineGeometry) -> data.StructLayout:
    """Per-operation config of the matrix engine (fill it with :func:`mpe_config`)."""
    return data.StructLayout({
        "fmt": unsigned(geom.fmt_bits),
        "tokens": unsigned(geom.tokens_max.bit_length()),
        "act_base": unsigned(geom.act_addr_bits),
        "tiles": unsigned(20),
        "groups": unsigned(16),
        "stride": unsigned(geom.act_addr_bits + 1),
        "pay_words": unsigned(32),
        "scale_words": unsigned(32),
    })


def mpe_config(geom: EngineGeometry, wf: WeightFormat, n_rows: int, n_in: int,
               tokens: int = 1, act_base: int = 0) -> dict:
    """Host-side config of one MV/MM operation: validated fields of :func:`mpe_cfg_layout`.

    All counts (row tiles, quant groups, activation stride, stream words) are computed
    here, so the RTL holds no multiplier for them.

    Raises
    ------
    ValueError
        A field is out of what the build supports (the message names it and the limit).
    """
    def bad(what):
        raise ValueError(f"MPE operation {wf.name} {n_rows}x{n_in} T={tokens} "
                         f"(preset {geom.params.name!r}): {what}")

    code = geom.code(wf)
    for name, v in (("n_rows", n_rows), ("n_in", n_in), ("tokens", tokens), ("act_base", act_base)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
            bad(f"{name} must be an int, not {type(v).__name__}")
    if not 1 <= n_rows <= (1 << 20) * geom.R - 1 or -(-n_rows // geom.R) >= 1 << 20:
        bad(f"N (n_rows) must be in 1..{(1 << 20) - 1} row tiles of {geom.R}, got {n_rows}")
    if n_in < geom.G or n_in % geom.G:
        bad(f"K (n_in) must be a positive multiple of group_size {geom.G}, got {n_in}")
    if n_in > geom.params.act_buf_depth or n_in // geom.G >= 1 << 16:
        bad(f"K (n_in) = {n_in} exceeds the activation buffer ({geom.params.act_buf_depth} elements)")
    if not 1 <= tokens <= geom.tokens_max:
        bad(f"tokens must be in 1..mm_tokens ({geom.tokens_max}), got {tokens}")
    if act_base < 0 or act_base % geom.act_banks:
        bad(f"act_base ({act_base}) must be a non-negative multiple of the bank count {geom.act_banks}")
    stride = geom.act_stride(n_in)
    if act_base + tokens * stride > geom.act_words:
        bad(f"activations end at word {act_base + tokens * stride}, past the buffer's {geom.act_words} words")
    pw, sw = geom.stream_words(wf, n_rows, n_in)
    return dict(fmt=code, tokens=tokens, act_base=act_base, tiles=-(-n_rows // geom.R),
                groups=n_in // geom.G, stride=stride, pay_words=pw, scale_words=sw)


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
    """One activation-buffer write: word address and ``L`` INT8 elements."""
    return data.StructLayout({"addr": unsigned(geom.act_addr_bits),
                              "data": data.ArrayLayout(signed(8), geom.L)})


class MatrixEngine(wiring.Component):
    """The MPE: MV and MM over packed N:M-sparse, group-scaled weights.

    Parameters
    ----------
    params : HwParams

    Attributes
    ----------
    cfg : In(stream of :func:`mpe_cfg_layout`)
        Accepted when the previous operation has fully left the pipeline.
    payload0.., scales0.. : In(stream of hbm_port_bits)
        Weight channel ``c``'s payload and scale regions (see :mod:`.dequant`).
    act : In(stream of :func:`act_layout`)
        Activation-buffer writes.
    out : Out(stream of ArrayLayout(signed(acc_bits), chains))
        One row tile's accumulators per beat.
    busy : Out(1)
    """

    def __init__(self, params: HwParams):
        try:
            self.geom = g = EngineGeometry(params)
        except (TypeError, ValueError):
            self._MustUse__silence = True      # never elaborated: no unused-elaboratable warning
            raise
        members = {"cfg": In(stream.Signature(mpe_cfg_layout(g)))}
        for c in range(g.C):
            members[f"payload{c}"] = In(stream.Signature(unsigned(g.W)))
            members[f"scales{c}"] = In(stream.Signature(unsigned(g.W)))
        members["act"] = In(stream.Signature(act_layout(g)))
        members["out"] = Out(stream.Signature(data.ArrayLayout(signed(g.acc_w), g.R)))
        members["busy"] = Out(1)
        super().__init__(members)

    def elaborate(self, platform):
        g = self.geom
        m = Module()
        L, R, C, Rc, NB = g.L, g.R, g.C, g.Rc, g.act_banks
        lnb = int(math.log2(NB))

        # -- dequant units ----------------------------------------------------------
        dqs = []
        for c in range(C):
            dq = DequantUnit(g.params)
            m.submodules[f"dequant{c}"] = dq
            wiring.connect(m, wiring.flipped(getattr(self, f"payload{c}")), dq.payload)
            wiring.connect(m, wiring.flipped(getattr(self, f"scales{c}")), dq.scales)
            dqs.append(dq)

        # -- activation buffer: NB word-interleaved banks ----------------------------
        banks, rports = [], []
        for b in range(NB):
            mem = Memory(shape=unsigned(L * 8), depth=g.act_rows, init=[])
            m.submodules[f"act_bank{b}"] = mem
            wp = mem.write_port()
            m.d.comb += [wp.addr.eq(self.act.payload.addr >> lnb),
                         wp.data.eq(self.act.payload.data.as_value()),
                         wp.en.eq(self.act.valid & ((self.act.payload.addr & (NB - 1)) == b))]
            rports.append(mem.read_port(transparent_for=()))
            banks.append(mem)
        m.d.comb += self.act.ready.eq(1)

        # -- sequencer -------------------------------------------------------------------
        adv = Signal()                 # global pipeline enable
        cfgp = self.cfg.payload
        fmt = Signal(g.fmt_bits)
        tokens = Signal.like(cfgp.tokens)
        base = Signal(g.act_addr_bits)
        tiles = Signal.like(cfgp.tiles)
        groups = Signal.like(cfgp.groups)
        stride = Signal.like(cfgp.stride)
        pay_words = Signal.like(cfgp.pay_words)
        scale_words = Signal.like(cfgp.scale_words)
        bpb = Signal(range(g.kmax + 1))
        gpb = Signal(range(g.gpb_max + 1))
        span = Signal(range(NB + 1))
        pat = Signal(range(len(g.patterns)))
        with m.Switch(fmt):
            for f in g.formats:
                with m.Case(f.code):
                    m.d.comb += [bpb.eq(f.bpb), gpb.eq(f.gpb), span.eq(f.span_words), pat.eq(f.pattern)]

        tok = Signal.like(tokens)
        bsub = Signal.like(bpb)
        grp = Signal.like(groups)
        tile = Signal.like(tiles)
        step_wa = Signal(g.act_addr_bits + 8)      # word address of this beat, token 0
        tok_wa = Signal(g.act_addr_bits + 8)       # ... of this beat and token
        dq_acked = Signal(C)

        inflight = Signal()
        all_valid = Signal()
        m.d.comb += all_valid.eq(Cat(dq.beat.valid for dq in dqs).all())
        issue = Signal()
        last_tok = tok == tokens - 1
        last_step = Signal()
        m.d.comb += last_step.eq(grp + gpb >= groups)
        with m.FSM() as fsm:
            with m.State("IDLE"):
                m.d.comb += self.cfg.ready.eq(~inflight)
                with m.If(self.cfg.valid & ~inflight):
                    m.d.sync += [fmt.eq(cfgp.fmt), tokens.eq(cfgp.tokens), base.eq(cfgp.act_base),
                                 tiles.eq(cfgp.tiles), groups.eq(cfgp.groups), stride.eq(cfgp.stride),
                                 pay_words.eq(cfgp.pay_words), scale_words.eq(cfgp.scale_words),
                                 tok.eq(0), bsub.eq(0), grp.eq(0), tile.eq(0),
                                 step_wa.eq(cfgp.act_base), tok_wa.eq(cfgp.act_base), dq_acked.eq(0)]
                    m.next = "DQCFG"
            with m.State("DQCFG"):
                acked = Signal(C)
                for c, dq in enumerate(dqs):
                    m.d.comb += [dq.cfg.payload.fmt.eq(fmt), dq.cfg.payload.tiles.eq(tiles),
                                 dq.cfg.payload.groups.eq(groups),
                                 dq.cfg.payload.pay_words.eq(pay_words),
                                 dq.cfg.payload.scale_words.eq(scale_words),
                                 dq.cfg.valid.eq(~dq_acked[c]),
                                 acked[c].eq(dq_acked[c] | dq.cfg.ready)]
                m.d.sync += dq_acked.eq(acked)
                with m.If(acked.all()):
                    with m.If((tiles == 0) | (groups == 0) | (tokens == 0)):
                        m.next = "IDLE"
                    with m.Else():
                        m.next = "RUN"
            with m.State("RUN"):
                m.d.comb += issue.eq(adv & all_valid)
                for dq in dqs:
                    m.d.comb += dq.beat.ready.eq(issue & last_tok)
                with m.If(issue):
                    with m.If(~last_tok):
                        m.d.sync += [tok.eq(tok + 1), tok_wa.eq(tok_wa + stride)]
                    with m.Else():
                        m.d.sync += tok.eq(0)
                        last_b = bsub == bpb - 1
                        last_t = tile == tiles - 1
                        m.d.sync += bsub.eq(Mux(last_b, 0, bsub + 1))
                        with m.If(last_b):
                            m.d.sync += grp.eq(Mux(last_step, 0, grp + gpb))
                            with m.If(last_step):
                                m.d.sync += tile.eq(tile + 1)
                        with m.If(last_b & last_step):
                            # next row tile: the activations start over
                            m.d.sync += [step_wa.eq(base), tok_wa.eq(base)]
                        with m.Else():
                            m.d.sync += [step_wa.eq(step_wa + span), tok_wa.eq(step_wa + span)]
                        with m.If(last_b & last_step & last_t):
                            m.next = "IDLE"

        # -- stage 1: activation read, beat capture ----------------------------------
        for rp in rports:
            m.d.comb += [rp.addr.eq(tok_wa >> lnb), rp.en.eq(adv)]
        v1 = Signal()
        f1 = Signal(4)
        off1 = Signal(max(1, lnb))
        beats1 = [Signal(len(dq.beat.payload.as_value()), name=f"beat1_{c}", reset_less=True)
                  for c, dq in enumerate(dqs)]
        flags = Cat(bsub == 0, bsub == bpb - 1, grp == 0, last_step)
        with m.If(adv):
            m.d.sync += [v1.eq(issue), f1.eq(flags), off1.eq(tok_wa[:max(1, lnb)] if NB > 1 else 0)]
            m.d.sync += [b1.eq(dq.beat.payload.as_value()) for b1, dq in zip(beats1, dqs)]

        # -- stage 2: route the span to every lane's m-window candidates -------------
        flat = Signal(NB * L * 8)
        m.d.comb += flat.eq(Cat(rp.data for rp in rports))
        span_sig = Signal(NB * L * 8)
        with m.Switch(off1):
            for o in range(NB):
                with m.Case(o):
                    m.d.comb += span_sig.eq(flat >> (o * L * 8))
        nc = 1 << g.index_bits
        cand = Signal(data.ArrayLayout(data.ArrayLayout(signed(8), nc), L))
        with m.Switch(pat):
            for pi, (n, mm) in enumerate(g.patterns):
                with m.Case(pi):
                    for i in range(L):
                        for cc in range(mm):
                            e = (i // n) * mm + cc
                            if e < NB * L:
                                m.d.comb += cand[i][cc].eq(span_sig[e * 8:(e + 1) * 8].as_signed())
        cand2 = Signal.like(cand, reset_less=True)
        v2 = Signal()
        f2 = Signal(4)
        beats2 = [Signal.like(b, name=f"beat2_{c}", reset_less=True) for c, b in enumerate(beats1)]
        with m.If(adv):
            m.d.sync += [cand2.eq(cand), v2.eq(v1), f2.eq(f1)]
            m.d.sync += [b2.eq(b1) for b2, b1 in zip(beats2, beats1)]

        # -- chains ------------------------------------------------------------------------
        chains = []
        links = Signal(max(1, g.dsp_groups - 1))
        with m.Switch(fmt):
            for f in g.formats:
                with m.Case(f.code):
                    m.d.comb += links.eq(f.links)
        for j in range(R):
            ch = SparseChain(g.params, emit_nodes=g.emit_nodes)
            m.submodules[f"chain{j}"] = ch
            c, jj = j % C, j // C
            bt = data.View(dqs[c].beat.payload.shape(), beats2[c])[jj]
            m.d.comb += [ch.en.eq(adv), ch.valid.eq(v2), ch.cand.eq(cand2),
                         ch.w.eq(bt.w), ch.idx.eq(bt.idx),
                         ch.first.eq(f2[0]), ch.last.eq(f2[1]),
                         ch.first_grp.eq(f2[2]), ch.last_grp.eq(f2[3]),
                         ch.links.eq(links), ch.tap.eq(tokens - 1)]
            # emit node e takes the scale of the segment ending there (a node that does
            # not end a segment of this format multiplies by a don't-care: its product is 0)
            for ni, e in enumerate(g.emit_nodes):
                if g.gpb_max == 1:
                    m.d.comb += ch.scale[ni].eq(bt.scale[0])
                    continue
                with m.Switch(fmt):
                    for f in g.formats:
                        with m.Case(f.code):
                            sg = ((e + 1) * g.D - 1) // f.kept if f.gpb > 1 else 0
                            m.d.comb += ch.scale[ni].eq(bt.scale[min(sg, g.gpb_max - 1)])
            chains.append(ch)
        lat = 2 + chains[0].latency

        # -- output FIFO and the global enable --------------------------------------------
        ofifo = fifo.SyncFIFOBuffered(width=R * g.acc_w, depth=4)
        m.submodules.out_fifo = ofifo
        res_valid = chains[0].acc_valid
        m.d.comb += [adv.eq(~res_valid | ofifo.w_rdy),
                     ofifo.w_en.eq(res_valid & ofifo.w_rdy),
                     ofifo.w_data.eq(Cat(ch.acc for ch in chains)),
                     self.out.valid.eq(ofifo.r_rdy),
                     self.out.payload.eq(ofifo.r_data),
                     ofifo.r_en.eq(self.out.ready)]

        # Anything in flight? (a valid-bit shadow of the whole pipeline)
        vpipe = Signal(lat)
        with m.If(adv):
            m.d.sync += vpipe.eq(Cat(issue, vpipe[:-1]))
        m.d.comb += [inflight.eq(vpipe.any() | issue),
                     self.busy.eq(inflight | ~fsm.ongoing("IDLE"))]
        return m
