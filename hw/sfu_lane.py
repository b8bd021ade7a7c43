"""One lane of the special-function unit: the fixed pipeline every SFU pass runs through.

The stages, in order (:mod:`flightllm.hw.sfu_program` describes what the passes make
of them; the right column is the stage's latency)::

    CVT   a: float32 bits, or an int8 in the low byte -> float32 (I2F)     I2F.latency
    ADD1  x + B                                                          FAdd.latency
    MUL1  x * C                                                          FMul.latency
    EXP   exp(x) or exp(-x) (runtime/sfu.py's fixed point)               FExp.latency
    MASK  +0.0 where the element is masked (SOFTMAX)                     1
    MUL2  x * F                                                          FMul.latency
    ADD2  x + D * D2   (D * D2 from a multiplier started at the input)   FAdd.latency
    DIV   x / E or E / x; a zero divisor gives +0.0 if div_safe          FDiv.latency
    MUL3  x * G                                                          FMul.latency
    RND   rint(x) or ceil(x), then clip to [lo, hi] (order-key compares) FRound.latency + 2
    INT   to int8 / uint8 (F2I: NaN -> 0), or the float32 bits           F2I.latency

An unused ADD, MUL or DIV stage gets its identity operand from the sequencer (``+ -0.0``,
``* 1.0``, ``/ 1.0``: exact for every input, a NaN staying a NaN), so only CVT, EXP and RND
need a bypass delay; every pass has the same latency (:attr:`SfuLane.latency`), which keeps
the lane a plain pipeline without stalls (the SFU issues a pass's elements only when its
output buffer has room: credit-based issue). The operands B..G arrive with their element
and wait in delay lines (SRLs) for their stage. Reductions read the taps ``IN`` (after
CVT), ``MUL1``, ``MASK`` and ``MUL2``, each with the element's valid and mask bits.
"""

from amaranth import Cat, Module, Mux, Signal, unsigned
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from .fexp import FExp
from .fp32 import F2I, I2F, FAdd, FDiv, FMul, FRound
from .geometry import delay

__all__ = ["LaneConfig", "SfuLane", "OUT_FLOAT", "OUT_I8", "OUT_U8", "order_key"]

OUT_FLOAT, OUT_I8, OUT_U8 = 0, 1, 2


class LaneConfig(data.Struct):
    """What a pass configures in every lane (held for the whole pass)."""
    cvt_int8: unsigned(1)          #: the input is an int8 (DEQUANT), not float32 bits
    exp: unsigned(1)
    exp_neg: unsigned(1)
    mask: unsigned(1)
    div_num: unsigned(1)           #: E / x (else x / E)
    div_safe: unsigned(1)
    rnd: unsigned(1)
    rnd_ceil: unsigned(1)
    clip: unsigned(1)
    out: unsigned(2)               #: OUT_FLOAT, OUT_I8 or OUT_U8
    lo: unsigned(32)               #: clip bounds (float32 bits, integral values)
    hi: unsigned(32)


def order_key(m, name, x):
    """A 32-bit unsigned key that orders float32 bit patterns like their values
    (-0 just below +0); used only on non-NaN integral values by the clip."""
    k = Signal(32, name=name)
    m.d.comb += k.eq(Mux(x[31], ~x, x | (1 << 31)))
    return k


class SfuLane(wiring.Component):
    """One SFU lane (module docstring).

    Attributes
    ----------
    cfg : In(LaneConfig)
    i_valid, i_mask : In(1)
    a, b, c, d, d2, e, f, g : In(32)
        The element and the operands of ADD1 (b), MUL1 (c), ADD2 (d * d2), DIV (e), MUL2 (f)
        and MUL3 (g), all with the element.
    o_valid : Out(1)
    o : Out(32)
        float32 bits, or the int8 / uint8 result zero-extended (its low byte).
    tap_in, tap_mul1, tap_mask, tap_mul2 : Out(32)
    tap_in_valid, tap_mul1_valid, tap_mask_valid, tap_mul2_valid : Out(1)
    tap_in_mask, tap_mask_mask : Out(1)
        The element's mask bit at those taps (MAX leaves masked elements out).
    latency : int
    """

    def __init__(self):
        self.stage_latency = {
            "CVT": I2F.latency, "ADD1": FAdd.latency, "MUL1": FMul.latency, "EXP": FExp.latency, "MASK": 1,
            "MUL2": FMul.latency, "ADD2": FAdd.latency, "DIV": FDiv.latency, "MUL3": FMul.latency,
            "RND": FRound.latency + 2, "INT": F2I.latency}
        self.latency = sum(self.stage_latency.values())
        ports = {"cfg": In(LaneConfig), "i_valid": In(1), "i_mask": In(1), "o_valid": Out(1), "o": Out(32)}
        for n in "abcdefg":
            ports[n] = In(32)
        ports["d2"] = In(32)
        for t in ("in", "mul1", "mask", "mul2"):
            ports[f"tap_{t}"] = Out(32)
            ports[f"tap_{t}_valid"] = Out(1)
        ports["tap_in_mask"] = Out(1)
        ports["tap_mask_mask"] = Out(1)
        super().__init__(ports)

    def start(self, stage: str) -> int:
        """Cycles from the lane's input to ``stage``'s input."""
        order = list(self.stage_latency)
        return sum(self.stage_latency[s] for s in order[:order.index(stage)])

    def elaborate(self, platform):
        m = Module()
        lat = self.stage_latency

        def at(sig, t, name):
            """``sig`` (given with the element at the input) ``t`` cycles later."""
            return delay(m, sig, t, name=name)

        def cfg(field, t):
            # the configuration travels with the elements: a new pass may enter while the
            # previous one is still in the pipeline
            return at(getattr(self.cfg, field), t, f"cfg_{field}_{t}")

        valid = delay(m, self.i_valid, self.latency, name="valid", reset_less=False)
        m.d.comb += self.o_valid.eq(valid)

        # CVT
        cvt = m.submodules.cvt = I2F(8)
        m.d.comb += [cvt.i_valid.eq(1), cvt.a.eq(self.a[:8])]
        t = lat["CVT"]
        x_in = Signal(32)
        m.d.comb += x_in.eq(Mux(cfg("cvt_int8", t), cvt.o, at(self.a, t, "a_cvt")))

        def unit(name, cls, a, b):
            u = m.submodules[name.lower()] = cls()
            m.d.comb += [u.i_valid.eq(1), u.a.eq(a), u.b.eq(b)]
            return u.o

        x_add1 = unit("ADD1", FAdd, x_in, at(self.b, self.start("ADD1"), "b"))
        x_mul1 = unit("MUL1", FMul, x_add1, at(self.c, self.start("MUL1"), "c"))
        # EXP (bypassed by a delay line of its latency)
        t = self.start("EXP")
        fexp = m.submodules.exp = FExp()
        m.d.comb += [fexp.i_valid.eq(1), fexp.x.eq(x_mul1 ^ (cfg("exp_neg", t) << 31))]
        t += lat["EXP"]
        x_exp = Signal(32)
        m.d.comb += x_exp.eq(Mux(cfg("exp", t), fexp.y, delay(m, x_mul1, lat["EXP"], name="exp_bypass")))
        # MASK
        x_mask = Signal(32)
        m.d.sync += x_mask.eq(Mux(cfg("mask", t) & ~at(self.i_mask, t, "mask_exp"), 0, x_exp))
        x_mul2 = unit("MUL2", FMul, x_mask, at(self.f, self.start("MUL2"), "f"))
        # ADD2: its product starts with the element and waits for the stage
        dprod = unit("DPROD", FMul, self.d, self.d2)
        x_add2 = unit("ADD2", FAdd, x_mul2, delay(m, dprod, self.start("ADD2") - FMul.latency, name="dprod"))
        # DIV: x / E or E / x
        t = self.start("DIV")
        e = at(self.e, t, "e")
        div_num = cfg("div_num", t)
        num, den = Mux(div_num, e, x_add2), Mux(div_num, x_add2, e)
        q = unit("DIV", FDiv, num, den)
        den_zero = delay(m, (den[:31] == 0) & cfg("div_safe", t), lat["DIV"], name="den_zero")
        x_div = Signal(32)
        m.d.comb += x_div.eq(Mux(den_zero, 0, q))
        x_mul3 = unit("MUL3", FMul, x_div, at(self.g, self.start("MUL3"), "g"))
        # RND: round, then clip by order keys (a NaN is kept: F2I makes it 0)
        t = self.start("RND")
        rnd = m.submodules.rnd = FRound()
        m.d.comb += [rnd.i_valid.eq(1), rnd.a.eq(x_mul3), rnd.ceil.eq(cfg("rnd_ceil", t))]
        t += FRound.latency
        r1 = Signal(32)
        m.d.sync += r1.eq(Mux(cfg("rnd", t), rnd.o, delay(m, x_mul3, FRound.latency, name="rnd_bypass")))
        t += 1
        lo, hi = cfg("lo", t), cfg("hi", t)
        k, klo, khi = order_key(m, "k", r1), order_key(m, "klo", lo), order_key(m, "khi", hi)
        nan = (r1[23:31] == 0xFF) & r1[:23].any()
        r2 = Signal(32)
        m.d.sync += r2.eq(Mux(cfg("clip", t) & ~nan, Mux(k < klo, lo, Mux(k > khi, hi, r1)), r1))
        # INT
        f2i = m.submodules.f2i = F2I(9)                    # int8 and uint8 both fit 9 signed bits
        m.d.comb += [f2i.i_valid.eq(1), f2i.a.eq(r2)]
        fl = delay(m, r2, F2I.latency, name="int_bypass")
        m.d.comb += self.o.eq(Mux(cfg("out", self.latency) == OUT_FLOAT, fl, Cat(f2i.o[:8], 0)))

        for tap, sig, stage in (("in", x_in, "ADD1"), ("mul1", x_mul1, "EXP"), ("mask", x_mask, "MUL2"),
                                ("mul2", x_mul2, "ADD2")):
            m.d.comb += [getattr(self, f"tap_{tap}").eq(sig),
                         getattr(self, f"tap_{tap}_valid").eq(delay(m, self.i_valid, self.start(stage),
                                                                    name=f"v_{tap}", reset_less=False))]
        m.d.comb += [self.tap_in_mask.eq(at(self.i_mask, self.start("ADD1"), "mask_in")),
                     self.tap_mask_mask.eq(at(self.i_mask, self.start("MUL2"), "mask_mul2"))]
        return m
