"""Configurable sparse DSP chain: ``chain_len`` MACs reducing one output row.

Datapath of one chain (``L = chain_len`` lanes, ``D = dsp_group``, ``NG = L / D``)::

    lane i:  cand[i][idx[i]] --(sparse MUX)--> A reg --skew q--> A*B --M reg--> + PCIN --P reg-->  (q = i mod D)
    group d: P of its last MAC = group sum            (fixed PCOUT->PCIN cascade inside the group)
    links:   r[d] = (links[d-1] ? r[d-1] : 0) + gsum[d]   (configurable link between groups;
             a 0 link ends a segment at the reduction node r[d-1])
    node e:  psum[e] = (first ? 0 : psum_line[e][T-1]) + r[e]    int32 per quant group, T-token delay line
             acc     = (first_grp ? 0 : acc_line[T-1]) + sum_e psum[e] * scale[e]   wraps at acc_bits

Each MAC is written as the plain ``a*b + c`` with A/B, M and P registers and the
partial sum passed to the next MAC's adder, the form Yosys/Vivado map to DSP48E2
with the PCOUT->PCIN cascade. Inside a group the inputs of MAC ``q`` are skewed by
``q`` cycles (systolic cascade), so every group's sum leaves its last P register
at the same stage. The links and reduction nodes are a second, short systolic chain
(one register per group) in fabric.

Only the nodes in ``emit_nodes`` get a partial-sum accumulator and a scale
multiplier (the last node always does); a segment may end only there.

The chain is a fixed-latency pipeline with one clock enable ``en`` (the DSP48E2 CE
pins): it has no handshakes of its own; the matrix engine stalls it as a whole.
All run-time config (``links``, ``tap``) must stay constant while beats are in
flight. The psum and acc lines advance only on valid beats, so bubbles are free.
"""

from __future__ import annotations

from amaranth import Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from .geometry import EngineGeometry, delay
from .params import HwParams

__all__ = ["SparseChain"]


class SparseChain(wiring.Component):
    """One configurable sparse DSP chain.

    Parameters
    ----------
    params : HwParams
    emit_nodes : tuple of int, optional
        DSP groups whose reduction node may end a segment; defaults to the last
        group only. Must include ``chain_len // dsp_group - 1``.

    Attributes
    ----------
    en : In(1)
        Clock enable of every register.
    valid : In(1)
        The inputs hold a beat (otherwise a bubble flows through).
    cand : In(ArrayLayout(ArrayLayout(signed(8), 2**index_bits), L))
        Per lane, the activations of its m-window (shared by all chains).
    w, idx : In
        Per lane the INT8 weight and its index into ``cand``.
    scale : In(ArrayLayout(unsigned(16), len(emit_nodes)))
        Group scale of the segment ending at each emit node.
    first, last : In(1)
        First / last beat of a quant group (clear / finish the psum).
    first_grp, last_grp : In(1)
        Beat of the first / last quant group of the row (clear / emit the acc).
    links : In(L // D - 1)
        Bit ``d`` set: group ``d`` continues into group ``d + 1``.
    tap : In(range(mm_tokens))
        Tokens per beat minus one (0 for MV).
    acc : Out(signed(acc_bits))
    acc_valid : Out(1)
        ``acc`` is a finished row result (one per token).
    latency : int
        Cycles (with ``en`` high) from a beat's inputs to its ``acc``.
    """

    def __init__(self, params: HwParams, emit_nodes=None):
        try:
            self.geom = g = EngineGeometry(params)
            ng = g.dsp_groups
            if emit_nodes is None:
                emit_nodes = (ng - 1,)
            emit_nodes = tuple(sorted(set(int(e) for e in emit_nodes)))
            if ng - 1 not in emit_nodes or any(not 0 <= e < ng for e in emit_nodes):
                raise ValueError(f"emit_nodes {emit_nodes} must lie in 0..{ng - 1} and include {ng - 1}")
        except (TypeError, ValueError):
            self._MustUse__silence = True      # never elaborated: no unused-elaboratable warning
            raise
        self.emit_nodes = emit_nodes
        self.n_cand = 1 << g.index_bits
        self.latency = g.D + ng + 5
        super().__init__({
            "en": In(1), "valid": In(1),
            "cand": In(data.ArrayLayout(data.ArrayLayout(signed(8), self.n_cand), g.L)),
            "w": In(data.ArrayLayout(signed(8), g.L)),
            "idx": In(data.ArrayLayout(unsigned(g.index_bits), g.L)),
            "scale": In(data.ArrayLayout(unsigned(16), len(emit_nodes))),
            "first": In(1), "last": In(1), "first_grp": In(1), "last_grp": In(1),
            "links": In(max(1, ng - 1)),
            "tap": In(range(g.tokens_max)),
            "acc": Out(signed(g.acc_w)), "acc_valid": Out(1),
        })

    def elaborate(self, platform):
        g = self.geom
        m = Module()
        en, L, D, NG, PW = self.en, g.L, g.D, g.dsp_groups, g.psum_w

        # -- MACs: sparse MUX, A/B regs, skew, M, P cascade inside each group ------
        gsum = []
        for d in range(NG):
            p_prev = None
            for q in range(D):
                i = d * D + q
                a = Signal(signed(8), name=f"a{i}", reset_less=True)
                b = Signal(signed(8), name=f"b{i}", reset_less=True)
                with m.If(en):
                    m.d.sync += [a.eq(self.cand[i][self.idx[i]]), b.eq(self.w[i])]
                a = delay(m, a, q, en, f"a{i}_skew")
                b = delay(m, b, q, en, f"b{i}_skew")
                mreg = Signal(signed(16), name=f"m{i}", reset_less=True)
                preg = Signal(signed(PW), name=f"p{i}", reset_less=True)
                with m.If(en):
                    m.d.sync += mreg.eq(a * b)
                    m.d.sync += preg.eq(mreg if p_prev is None else p_prev + mreg)
                p_prev = preg
            gsum.append(p_prev)                                   # stage D + 2

        # -- configurable links / reduction nodes ---------------------------------
        r_prev = None
        node = []
        for d in range(NG):
            r = Signal(signed(PW), name=f"r{d}", reset_less=True)
            gs = delay(m, gsum[d], d, en, f"gsum{d}_skew")
            with m.If(en):
                if r_prev is None:
                    m.d.sync += r.eq(gs)
                else:
                    m.d.sync += r.eq(Mux(self.links[d - 1], r_prev, 0) + gs)
            node.append(r)                                        # stage D + 3 + d
            r_prev = r

        # -- control flags to the stages that use them ----------------------------
        s_ps = g.D + NG + 2                     # stage the aligned node sums reach
        v_ps = delay(m, self.valid, s_ps, en, "v_ps", reset_less=False)
        first = delay(m, self.first, s_ps, en, "first_ps")
        fgrp = delay(m, self.first_grp, s_ps + 2, en, "fgrp_acc")
        lgrp = delay(m, self.last_grp, s_ps + 2, en, "lgrp_acc")
        scales = delay(m, self.scale.as_value(), s_ps + 1, en, "scale_m")
        v_m = delay(m, self.valid, s_ps + 2, en, "v_m", reset_less=False)
        last_m = delay(m, self.last, s_ps + 2, en, "last_m")

        def token_line(name, shape, new, shift):
            """T-deep delay line (SRL); returns its tap, the value written T beats ago."""
            line = [Signal(shape, name=f"{name}_{t}", reset_less=True) for t in range(g.tokens_max)]
            with m.If(en & shift):
                m.d.sync += line[0].eq(new)
                for t in range(1, g.tokens_max):
                    m.d.sync += line[t].eq(line[t - 1])
            tap = Signal(shape, name=f"{name}_tap")
            with m.Switch(self.tap):
                for t in range(g.tokens_max):
                    with m.Case(t):
                        m.d.comb += tap.eq(line[t])
            return line[0], tap

        # -- per emit node: psum accumulate, then scale multiply --------------------
        prods = []
        for k, e in enumerate(self.emit_nodes):
            r_al = delay(m, node[e], NG - 1 - e, en, f"node{e}_align")
            ps_new = Signal(signed(PW), name=f"ps_new{e}")
            ps, ps_tap = token_line(f"psum{e}", signed(PW), ps_new, v_ps)
            m.d.comb += ps_new.eq(Mux(first, 0, ps_tap) + r_al)
            ends = (self.links[e] == 0) if e < NG - 1 else 1
            prod = Signal(signed(PW + 17), name=f"prod{e}", reset_less=True)
            scale = scales[16 * k:16 * (k + 1)]
            with m.If(en):
                m.d.sync += prod.eq(Mux(ends, ps * scale, 0))
            prods.append(prod)

        acc_new = Signal(signed(g.acc_w), name="acc_new")
        acc, acc_tap = token_line("acc", signed(g.acc_w), acc_new, v_m & last_m)
        total = prods[0]
        for pr in prods[1:]:
            total = total + pr
        m.d.comb += acc_new.eq(Mux(fgrp, 0, acc_tap) + total)      # truncation = 48-bit wrap
        ov = Signal(name="acc_ov")
        with m.If(en):
            m.d.sync += ov.eq(v_m & last_m & lgrp)
        m.d.comb += [self.acc.eq(acc), self.acc_valid.eq(ov)]
        return m
