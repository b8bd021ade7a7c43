"""Sparse DSP chain: ``chain_len`` MACs reducing one output row, then its group scaling.

A chain is a fixed-latency pipeline without clock enable: every register advances every
cycle and a bubble (``valid`` low) flows through like a beat, so nothing outside the
chain has to stop it (the matrix engine issues a beat only when the output FIFO has room
for what it will produce: credit-based issue). Its only enables are local: the per-token
delay lines shift on valid beats.

Datapath (``L = chain_len`` lanes, ``D = dsp_group``, ``NG = L / D`` DSP groups, the
column on the right the cycle a value is held, counted from the beat at the ports; the
u280's 32 lanes in groups of 8 give s_b = s_ps = 13 and a latency of 22)::

    lane i = d*D + q (q < D)
      cand[i][idx[i]] -> A reg -skew q-> M = A*B -> P = PCIN + M               1 .. 3+q
      w[i]            -> B reg -skew q->           (PCOUT->PCIN inside group d)
    group d sum: P of its last lane                                             D+2
    fabric chain: r[d] = r[d-1] + gsum[d] (gsum[d] skewed by d-1)               s_b = D+1+NG
    psum   = (first ? 0 : psum line[T-1]) + r[NG-1]   (only if bpb_max > 1)      s_ps = s_b (+1)
    psum_u = psum * u                  1 DSP48E2: A/B, M, P registers            s_ps+3
                                       (u on its port in cycle u_lag = s_ps)
    prod_s = psum_u * S                2 DSP48E2: psum_u split at 17 bits,       s_ps+7
                                       high half's product + (PCIN >> 17)
    prod_m = xsum_u * M                2 DSP48E2, the same split (builds with    s_ps+7
                                       a min format only; xsum_u on its port
                                       in cycle xsum_lag = s_ps+3)
    tot    = prod_s + prod_m           fabric                                    s_ps+8
    acc    = (first_grp ? 0 : acc line[T-1]) + tot     fabric, wraps at acc_bits s_ps+9 = latency

Every multiply is written as the plain ``a*b (+c)`` with a register before, after the
product (M) and after the add (P), the form Vivado maps onto DSP48E2 AREG/BREG, MREG and
PREG; inside a DSP group the lane inputs are skewed by ``q`` cycles (systolic cascade), so
each group's sum leaves its last P register at the same stage. A beat is always all
``L`` lanes of one quant group (:class:`~flightllm.hw.geometry.EngineGeometry`), so the
chain reduces every lane into one partial sum per beat; a group's ``bpb`` beats add up in
the psum line. Then, once per group, the sum is scaled:
``acc += u * (psum * S + xsum * M)`` (:mod:`flightllm.runtime.arith`), with
``xsum_u = xsum * u`` computed once per token by the engine and broadcast.

MM (``T`` tokens, ``tap = T - 1``): the engine holds each beat for ``T`` cycles, one per
token, so the psum and acc lines are ``T`` valid beats (groups) deep: the tap is the
same token's value of the previous beat (group). Both lines are small LUTRAM ring
buffers (``mm_tokens`` deep). ``u`` and ``xsum_u`` come late: they must be on their ports
``u_lag`` and ``xsum_lag`` cycles after the beat they belong to (the last beat of the
group), when the chain multiplies by them, so the engine computes and broadcasts them
without delaying the weights.
"""

from __future__ import annotations

from amaranth import Cat, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from .geometry import EngineGeometry, beat_layout, delay
from .params import HwParams

__all__ = ["SparseChain", "token_line", "split_mul", "SPLIT_BITS", "SPLIT_MUL_LATENCY"]

#: Low-half width of a product split over two cascaded DSP48E2: the cascade's
#: ``PCIN >> 17`` shift, and the low half fits the 18-bit B port as a positive number.
SPLIT_BITS = 17
#: Cycles from :func:`split_mul`'s operands to its product.
SPLIT_MUL_LATENCY = 4


def token_line(m: Module, name: str, new, shift, tap, tokens_max: int):
    """A ``T``-deep delay line: the value ``new`` had ``T = tap + 1`` shifts ago.

    A ring buffer in LUTRAM (asynchronous read, write on ``shift``) with a registered
    read pointer ``T`` behind the write pointer; nothing is reset (the first beat of a
    group or row never reads it). ``tap`` must not change while the line is in use.
    """
    if tokens_max == 1:
        reg = Signal.like(new, name=f"{name}_q", reset_less=True)
        with m.If(shift):
            m.d.sync += reg.eq(new)
        return reg
    depth = 1 << (tokens_max - 1).bit_length()       # power of two: pointers wrap by truncation
    mem = Memory(shape=new.shape(), depth=depth, init=[])
    m.submodules[name] = mem
    wr = mem.write_port()
    rd = mem.read_port(domain="comb")
    wp = Signal(range(depth), name=f"{name}_wp", reset_less=True)
    rp = Signal(range(depth), name=f"{name}_rp", reset_less=True)
    wp_next = Signal.like(wp, name=f"{name}_wp_next")
    m.d.comb += [wp_next.eq(wp + shift), wr.addr.eq(wp), wr.data.eq(new), wr.en.eq(shift),
                 rd.addr.eq(rp)]
    # registered read address (no pointer arithmetic in front of the LUTRAM read)
    m.d.sync += [wp.eq(wp_next), rp.eq(wp_next - tap - 1)]
    return rd.data


def split_mul(m: Module, name: str, a, b, shape):
    """``a * b`` for a 27-bit ``a`` (A port) and a ``b`` wider than the 18-bit B port.

    Two DSP48E2 in cascade: the first multiplies ``a`` by the low :data:`SPLIT_BITS` bits
    of ``b`` (zero-extended), the second by the signed high part and adds the first's P
    shifted right by 17 (the DSP48E2 ``PCIN >> 17`` cascade); the product is the second P
    above the first's low 17 bits. ``a`` and ``b`` are sampled in the cycle they are
    given; the product is there :data:`SPLIT_MUL_LATENCY` cycles later. Registers: A/B
    (the second DSP has two input stages, AREG/BREG = 2), M and P of each.
    """
    S = SPLIT_BITS
    if len(b) <= S + 1:                  # fits the B port: one DSP48E2, same latency
        a1 = Signal.like(a, name=f"{name}_a1", reset_less=True)
        b1 = Signal.like(b, name=f"{name}_b1", reset_less=True)
        mr = Signal(shape, name=f"{name}_m", reset_less=True)
        pr = Signal(shape, name=f"{name}_p", reset_less=True)
        m.d.sync += [a1.eq(a), b1.eq(b), mr.eq(a1 * b1), pr.eq(mr)]
        return delay(m, pr, SPLIT_MUL_LATENCY - 3, name=f"{name}_pad")
    lo_w = len(a) + S + 1
    hi_w = len(a) + len(b) - S + 1
    a1 = Signal.like(a, name=f"{name}_a1", reset_less=True)
    a2 = Signal.like(a, name=f"{name}_a2", reset_less=True)
    blo = Signal(unsigned(S), name=f"{name}_blo", reset_less=True)
    bhi1 = Signal(signed(len(b) - S), name=f"{name}_bhi1", reset_less=True)
    bhi2 = Signal.like(bhi1, name=f"{name}_bhi2", reset_less=True)
    m1 = Signal(signed(lo_w), name=f"{name}_m1", reset_less=True)
    p1 = Signal(signed(lo_w), name=f"{name}_p1", reset_less=True)
    m2 = Signal(signed(hi_w), name=f"{name}_m2", reset_less=True)
    p2 = Signal(signed(hi_w), name=f"{name}_p2", reset_less=True)
    lo = Signal(unsigned(S), name=f"{name}_lo", reset_less=True)
    m.d.sync += [
        a1.eq(a), blo.eq(b[:S]), bhi1.eq(b[S:].as_signed()),     # A, B registers
        a2.eq(a1), bhi2.eq(bhi1),                                # second input stage
        m1.eq(a1 * blo), p1.eq(m1),                              # DSP 1: M, P
        m2.eq(a2 * bhi2), p2.eq(m2 + (p1 >> S)),                 # DSP 2: M, P = M + (PCIN >> 17)
        lo.eq(p1[:S]),                                           # low bits wait for DSP 2
    ]
    prod = Signal(shape, name=f"{name}_prod")
    m.d.comb += prod.eq(Cat(lo, p2).as_signed())
    return prod


class SparseChain(wiring.Component):
    """One sparse DSP chain: a row's beats in, its accumulator per token out.

    Parameters
    ----------
    params : HwParams

    Attributes
    ----------
    valid : In(1)
        The ports hold a beat (otherwise a bubble flows through).
    first, last : In(1)
        First / last beat of a quant group.
    first_grp, last_grp : In(1)
        The beat belongs to the first / last quant group of the row (clears / emits the acc).
    tap : In(range(mm_tokens))
        Tokens of the operation minus one (0 for MV); constant while beats are in flight.
    cand : In(ArrayLayout(ArrayLayout(signed(8), m_max), L))
        Per lane the activations of its ``m``-window (shared by all chains).
    beat : In(one chain of :func:`~flightllm.hw.geometry.beat_layout`)
        The lanes' weights and window indices, the group's fixed-point scale and min.
    u : In(unsigned(act_factor_bits))
        The group's activation factor, ``u_lag`` cycles after the group's last beat.
    xsum_u : In(signed)
        ``u`` times the group's activation sum, ``xsum_lag`` cycles after the group's last beat.
    acc : Out(signed(acc_bits))
    acc_valid : Out(1)
        ``acc`` is a finished row result (one per token), ``latency`` cycles after the
        last beat of the row's last group.
    latency, u_lag, xsum_lag : int
    dsps : int
        DSP48E2 multipliers of the chain: ``L`` MACs, 1 for ``psum * u`` and 2 each for the
        scale and (if the build has a format with a min) the min product.
    """

    def __init__(self, params: HwParams):
        try:
            self.geom = g = EngineGeometry(params)
        except (TypeError, ValueError):
            self._MustUse__silence = True      # never elaborated: no unused-elaboratable warning
            raise
        self.n_cand = g.m_max
        self.s_beat = g.D + 1 + g.dsp_groups
        self.s_psum = self.s_beat + (1 if g.bpb_max > 1 else 0)
        self.u_lag = self.s_psum
        self.xsum_lag = self.s_psum + 3
        # psum_u three cycles after psum (A/B, M, P), then the scale product, then tot
        self.s_acc = self.s_psum + 3 + SPLIT_MUL_LATENCY + 1
        self.latency = self.s_acc + 1
        self.dsps = g.L + 1 + 2 + (2 if g.has_min else 0)
        super().__init__({
            "valid": In(1), "first": In(1), "last": In(1), "first_grp": In(1), "last_grp": In(1),
            "tap": In(range(max(2, g.tokens_max))),
            "cand": In(data.ArrayLayout(data.ArrayLayout(signed(8), self.n_cand), g.L)),
            "beat": In(beat_layout(g).elem_shape),
            "u": In(unsigned(g.factor_bits)),
            "xsum_u": In(signed(g.xsum_u_w)),
            "acc": Out(signed(g.acc_w)), "acc_valid": Out(1),
        })

    def elaborate(self, platform):
        g = self.geom
        m = Module()
        D, NG, PW = g.D, g.dsp_groups, g.psum_w
        bt = self.beat

        # -- MACs: sparse MUX into the A register, skew, M, P cascade inside each group --
        gsum = []
        for d in range(NG):
            p_prev = None
            for q in range(D):
                i = d * D + q
                a = Signal(signed(8), name=f"a{i}", reset_less=True)
                b = Signal(signed(8), name=f"b{i}", reset_less=True)
                pick = self.cand[i][bt.idx[i]] if self.n_cand > 1 else self.cand[i][0]
                m.d.sync += [a.eq(pick), b.eq(bt.w[i])]
                a = delay(m, a, q, name=f"a{i}_skew")
                b = delay(m, b, q, name=f"b{i}_skew")
                mreg = Signal(signed(16), name=f"m{i}", reset_less=True)
                preg = Signal(signed(PW), name=f"p{i}", reset_less=True)
                m.d.sync += [mreg.eq(a * b), preg.eq(mreg if p_prev is None else p_prev + mreg)]
                p_prev = preg
            gsum.append(p_prev)                                        # held in cycle D + 2

        # -- the group sums: a short systolic adder chain in fabric -------------------
        r = gsum[0]
        for d in range(1, NG):
            nr = Signal(signed(PW), name=f"r{d}", reset_less=True)
            m.d.sync += nr.eq(r + delay(m, gsum[d], d - 1, name=f"gsum{d}_skew"))
            r = nr                                                     # cycle D + 2 + d
        beat_sum = r                                                   # cycle s_beat

        # -- control to the stages that use it ----------------------------------------
        sb, sp, s_acc = self.s_beat, self.s_psum, self.s_acc          # s_acc: tot is held there

        def flag(sig, n, name):
            return delay(m, sig, n, name=name, reset_less=False)

        # -- psum over the group's beats (per token) ----------------------------------
        if g.bpb_max > 1:
            v_b, first_b = flag(self.valid, sb, "v_beat"), flag(self.first, sb, "first_beat")
            ps_new = Signal(signed(PW), name="ps_new")
            ps_tap = token_line(m, "psum_line", ps_new, v_b, self.tap, g.tokens_max)
            m.d.comb += ps_new.eq(Mux(first_b, 0, ps_tap) + beat_sum)
            psum = Signal(signed(PW), name="psum", reset_less=True)
            m.d.sync += psum.eq(ps_new)
        else:
            psum = beat_sum                                            # every group is one beat

        # -- psum * u: one DSP48E2 (A/B, M, P) ----------------------------------------
        ua = Signal(signed(PW), name="ua", reset_less=True)
        ub = Signal(unsigned(g.factor_bits), name="ub", reset_less=True)
        um = Signal(signed(g.psum_u_w), name="um", reset_less=True)
        psum_u = Signal(signed(g.psum_u_w), name="psum_u", reset_less=True)
        m.d.sync += [ua.eq(psum), ub.eq(self.u), um.eq(ua * ub), psum_u.eq(um)]   # held in sp + 3

        # -- times the scale (and the min): two DSP48E2 each ---------------------------
        prod_w = g.psum_u_w + g.scale_w
        scale = delay(m, bt.scale, sp + 3, name="scale_d")
        prod_s = split_mul(m, "mul_s", scale, psum_u, signed(prod_w))                 # sp + 7
        tot = Signal(signed(prod_w + 1), name="tot", reset_less=True)
        if g.has_min:
            mn = delay(m, bt.min, sp + 3, name="min_d")
            prod_m = split_mul(m, "mul_m", mn, self.xsum_u, signed(g.xsum_u_w + g.scale_w))
            m.d.sync += tot.eq(prod_s + prod_m)
        else:
            m.d.sync += tot.eq(prod_s)

        # -- the accumulator over the row's groups (per token), wrapping at acc_bits ---
        v_a, last_a = flag(self.valid, s_acc, "v_acc"), flag(self.last, s_acc, "last_acc")
        fg_a, lg_a = flag(self.first_grp, s_acc, "fgrp_acc"), flag(self.last_grp, s_acc, "lgrp_acc")
        done = Signal(name="grp_done")
        m.d.comb += done.eq(v_a & last_a)
        acc_new = Signal(signed(g.acc_w), name="acc_new")
        acc_tap = token_line(m, "acc_line", acc_new, done, self.tap, g.tokens_max)
        m.d.comb += acc_new.eq(Mux(fg_a, 0, acc_tap) + tot)          # truncation = the wrap
        acc = Signal(signed(g.acc_w), name="acc_q", reset_less=True)
        ov = Signal(name="acc_ov")
        m.d.sync += [acc.eq(acc_new), ov.eq(done & lg_a)]
        m.d.comb += [self.acc.eq(acc), self.acc_valid.eq(ov)]
        return m
