"""IEEE-754 binary32 arithmetic units, bit-exact with numpy ``float32``.

Every unit rounds to nearest, ties to even, handles subnormal inputs and outputs, signed
zeros and infinities like numpy (``np.errstate(all="ignore")``), and returns the canonical
quiet NaN :data:`QNAN` for every NaN result (IEEE leaves sign and payload open).

Interfaces. ``FAdd``, ``FMul``, ``FCmp``, ``I2F``, ``FRound``, ``F2I`` and ``FDiv`` are
fixed-latency pipelines without clock enable or ready (the project's rule: credit-based
issue into output FIFOs, no global stall): an operation on the ports with ``i_valid``
high comes out with ``o_valid`` exactly ``latency`` cycles later, one operation a cycle;
a bubble (``i_valid`` low) flows through like an operation. Inputs are registered at the
ports and results leave from registers. Only the valid line is reset. ``FSqrt`` is
iterative (one operation in flight, ``i_valid``/``i_ready`` and ``o_valid``/``o_ready``):
it is needed once per row.

Timing. Every stage is at most one carry chain of about 32 bits or a few LUT levels, so
that the units can close 300 MHz on UltraScale+: alignment and normalisation shifts are
split into a coarse stage (multiples of 8: one 4:1 mux level) and a fine one (0..7), and
leading-zero counts get their own stage. The 24x24 significand product of ``FMul`` is the
plain ``a * b`` with a register before (A/B), after (M) and after again (P), which maps
onto two DSP48E2.

Internal format. Before rounding, a finite result is a *frame* ``Cat(sticky, guard,
sig)``: a 24-bit significand whose bit 23 is the hidden bit, the next lower bit and the
OR of all lower bits, with a biased exponent ``e``. Rounding then adds ``guard & (sticky
| lsb)`` to the bit pattern ``Cat(sig[:23], e if sig[23] else 0)``: a carry out of the
fraction increments the exponent, which also turns the largest subnormal into the
smallest normal and the largest finite value into infinity. A result below the normal
range is first shifted right with sticky (its frame's hidden bit becomes 0: exponent field
0); a result whose ``e`` reaches 255 before rounding is infinite.

Pipelines (the number is the stage, i.e. the cycle after the ports that holds the
registers the line computes)::

    FAdd (latency 9)        1 a, b (b's sign flipped when sub)
                            2 order by magnitude (31-bit compare), exponent difference d
                            3 d clamped to 27; smaller significand >> coarse(d), sticky
                            4 >> fine(d), sticky: a 27-bit frame (24 + guard, round, sticky)
                            5 28-bit add / subtract (never negative: the larger comes first)
                            6 leading zeros, limited so that the exponent stays >= 1
                            7 << coarse; exponent - shift
                            8 << fine; overflow flag
                            9 round, specials -> o
    FMul (latency 9)        1 a, b
                            2 significands, leading zeros (subnormal inputs), exponent sum
                            3 significands normalised (DSP A/B registers)
                            4 24x24 product (M)      5 P
                            6 1-bit normalisation: frame, exponent
                            7-9 underflow: >> coarse, >> fine (sticky); round -> o
    FDiv (latency 33)       1-3 as FMul (exponent difference)
                            4-29 restoring division, one quotient bit per stage (25-bit
                                 subtract and mux): 26 bits, remainder
                            30 1-bit normalisation, sticky = remainder != 0
                            31-33 as FMul 7-9
    FCmp (latency 3)        1 a, b     2 32-bit compare of order keys    3 max, lt, eq
    I2F (latency 6)         1 x        2 sign, |x|    3 leading zeros
                            4 << coarse, exponent    5 << fine, sticky    6 round -> o
    FRound (latency 4)      1 a, mode  2 masks of the fraction bits from the exponent
                            3 round-up decision, truncated value and increment
                            4 31-bit add -> o
    F2I (latency 5)         1 a        2 classify, shift amount   3 << coarse
                            4 << fine  5 negate, saturate -> o
    FSqrt (iterative)       accept, unpack + leading zeros, normalise, 25 root bits
                            (one per cycle), sticky, round, hold until o_ready
"""

from __future__ import annotations

from amaranth import C, Cat, Module, Mux, Signal, Value, signed
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from .geometry import delay

__all__ = ["QNAN", "INF", "FAdd", "FMul", "FDiv", "FCmp", "I2F", "FRound", "F2I", "FSqrt"]

#: The NaN every unit returns.
QNAN = 0x7FC00000
#: +infinity (with the sign bit: -infinity).
INF = 0x7F800000


def _reg(m, name, value, shape=None):
    """A register loaded with ``value`` every cycle (no reset: only valid lines are reset)."""
    value = Value.cast(value)
    r = Signal(value.shape() if shape is None else shape, name=name, reset_less=True)
    m.d.sync += r.eq(value)
    return r


class _Fields:
    """Fields and classes of a binary32 bit pattern."""

    def __init__(self, x):
        self.sign, self.e, self.frac = x[31], x[23:31], x[:23]
        normal = self.e.any()
        self.sig = Cat(self.frac, normal)                   # significand, hidden bit 23
        # max(e, 1): a subnormal has exponent 1's scale without the hidden bit
        self.ee = Cat(self.e[0] | ~normal, self.e[1:])
        self.zero = ~normal & ~self.frac.any()
        self.inf = self.e.all() & ~self.frac.any()
        self.nan = self.e.all() & self.frac.any()


def _order_key(x):
    """A key that orders binary32 values (not NaN) as unsigned integers, -0 just below +0:
    negatives inverted (larger magnitude, smaller key), positives above them."""
    return Mux(x[31], ~x, x | (1 << 31))


def _lzc(x):
    """Leading zeros of ``x`` (``len(x)`` for 0): a balanced tree of (all zero, count)."""
    n = len(x)
    p = 1 << n.bit_length()                 # > n: a padding 1 below x stops the count at n

    def tree(v):
        if len(v) == 2:
            return ~v.any(), ~v[1]
        h = len(v) // 2
        zl, cl = tree(v[:h])
        zh, ch = tree(v[h:])
        return zl & zh, Mux(zh, Cat(cl, 1), Cat(ch, 0))

    return tree(Cat(C((1 << (p - n)) - 1, p - n), x))[1]


def _split(n):
    """A shift amount as (coarse: its multiple of 8, fine: 0..7), one stage each."""
    return (Cat(C(0, 3), n[3:]) if len(n) > 3 else C(0, 1)), n[:3]


def _shl(x, n):
    return (x << n)[:len(x)]


def _shr_sticky(x, n):
    """``x >> n`` with every bit shifted out ORed into bit 0 (the frame's sticky bit)."""
    w = len(x)
    kept = (C((1 << w) - 1, w) << n)[:w]
    return (x >> n) | (x & ~kept).any()


def _round_out(m, o, sign, e, frame, *, ovf=0, nan=0, inf=0, zero=0):
    """The last stage: ``frame`` (``Cat(sticky, guard, sig24)``) with biased exponent ``e``
    (8 bits) rounded to nearest even into the register ``o``, unless a special case."""
    sig, g, st = frame[2:26], frame[1], frame[0]
    mag = (Cat(sig[:23], Mux(sig[23], e, 0)) + (g & (st | sig[0])))[:31]
    with m.If(nan):
        m.d.sync += o.eq(QNAN)
    with m.Elif(inf | ovf):
        m.d.sync += o.eq(Cat(C(INF, 31), sign))
    with m.Elif(zero):
        m.d.sync += o.eq(Cat(C(0, 31), sign))
    with m.Else():
        m.d.sync += o.eq(Cat(mag, sign))


def _valid(m, unit):
    m.d.comb += unit.o_valid.eq(delay(m, unit.i_valid, unit.latency, name="v", reset_less=False))


def _operands(m, a, b):
    """Stages 1-3 of FMul and FDiv: the operands (1), their significands and leading-zero
    counts (2), the significands normalised to bit 23 (3; 0 stays 0). Returns the stage-1
    fields, the stage-2 counts and the stage-3 significands."""
    a1, b1 = _reg(m, "a1", a), _reg(m, "b1", b)
    fa, fb = _Fields(a1), _Fields(b1)
    sa2, sb2 = _reg(m, "sig_a2", fa.sig), _reg(m, "sig_b2", fb.sig)
    lza2, lzb2 = _reg(m, "lz_a2", _lzc(fa.sig)), _reg(m, "lz_b2", _lzc(fb.sig))
    return fa, fb, lza2, lzb2, _reg(m, "sig_a3", _shl(sa2, lza2)), _reg(m, "sig_b3", _shl(sb2, lzb2))


def _tail(m, o, frame, e, sign, nan, inf, zero):
    """The last three stages of FMul and FDiv. ``frame`` and the signed biased exponent
    ``e`` (any value: <= 0 underflows, >= 255 overflows) and the flags are registers of
    one stage; a result below exponent 1 is shifted right by ``1 - e`` (26 shifts
    everything into the sticky bit) in two stages, then rounded."""
    # the clamps compare e with constants beside a 5-bit subtract, not after a full one
    co, fi = _split(Mux(e >= 1, 0, Mux(e <= -25, 26, (1 - e)[:5])))
    fr1 = _reg(m, "den_coarse", _shr_sticky(frame, co))
    fi1 = _reg(m, "den_fine_amt", fi)
    e1 = _reg(m, "den_e1", e)
    fr2 = _reg(m, "den_fine", _shr_sticky(fr1, fi1))
    e2 = _reg(m, "den_e2", e1[:8])
    ovf2 = _reg(m, "ovf", e1 >= 255)
    flags = [delay(m, f, 2, name=n) for f, n in ((sign, "sign_t"), (nan, "nan_t"), (inf, "inf_t"),
                                                  (zero, "zero_t"))]
    _round_out(m, o, flags[0], e2, fr2, ovf=ovf2, nan=flags[1], inf=flags[2], zero=flags[3])


class FAdd(wiring.Component):
    """``a + b`` (``sub`` low) or ``a - b`` (``sub`` high) in binary32, ``latency`` = 9.

    Attributes
    ----------
    i_valid : In(1)
    a, b : In(32)
        binary32 bit patterns.
    sub : In(1)
        Subtract ``b``.
    o_valid : Out(1)
        ``latency`` cycles after ``i_valid``.
    o : Out(32)
        The correctly rounded sum; an exact zero sum is +0 unless both addends (``b``
        negated by ``sub``) are -0, so ``x - x = +0``; ``inf - inf`` and NaN operands give
        :data:`QNAN`.
    latency : int
    """

    latency = 9

    def __init__(self):
        super().__init__({"i_valid": In(1), "a": In(32), "b": In(32), "sub": In(1),
                          "o_valid": Out(1), "o": Out(32)})

    def elaborate(self, platform):
        m = Module()
        _valid(m, self)
        # 1: a - b is a + (-b)
        a1 = _reg(m, "a1", self.a)
        b1 = _reg(m, "b1", Cat(self.b[:31], self.b[31] ^ self.sub))
        fa, fb = _Fields(a1), _Fields(b1)
        # 2: the larger magnitude first (bit patterns without the sign order like magnitudes),
        # so the difference of significands is never negative and its sign is the larger's
        swap = b1[:31] > a1[:31]
        big2 = _reg(m, "big2", Mux(swap, b1, a1))
        small2 = _reg(m, "small2", Mux(swap, fa.sig, fb.sig))
        d2 = _reg(m, "d2", Mux(swap, fb.ee - fa.ee, fa.ee - fb.ee)[:8])   # both ways in parallel
        esub = a1[31] ^ b1[31]
        sub2 = _reg(m, "esub2", esub)
        nan2 = _reg(m, "nan2", fa.nan | fb.nan | (fa.inf & fb.inf & esub))
        inf2 = _reg(m, "inf2", fa.inf | fb.inf)             # the larger one: its sign
        zsign2 = _reg(m, "zsign2", a1[31] & b1[31])         # an exact zero is -0 only for -0 + -0
        # 3, 4: align the smaller significand in a 27-bit frame (24 bits, guard, round,
        # sticky): enough for a correctly rounded sum, as a shift by d >= 2 leaves at most
        # one bit of cancellation; d >= 27 shifts everything into the sticky bit
        co, fi = _split(Mux(d2 > 27, 27, d2)[:5])
        small3 = _reg(m, "small3", _shr_sticky(Cat(C(0, 3), small2), co))
        fine3 = _reg(m, "dfine3", fi)
        small4 = _reg(m, "small4", _shr_sticky(small3, fine3))
        big4, sub4 = delay(m, big2, 2, name="big"), delay(m, sub2, 2, name="esub")
        fg = _Fields(big4)
        # 5: add or subtract (28 bits: the carry); the two's complement folds into the adder
        y = Cat(small4, C(0, 1)) ^ sub4.replicate(28)
        sum5 = _reg(m, "sum5", (Cat(C(0, 3), fg.sig, C(0, 1)) + y + sub4)[:28])
        # normalised, the hidden bit sits at 27 with exponent E + 1 - shift; a 1 at bit
        # 27 - E stops the leading-zero count at E, so the exponent stays >= 1 and a tiny
        # sum stays subnormal
        limit5 = _reg(m, "limit5", C(1 << 27, 28) >> fg.ee)
        e5 = _reg(m, "e5", fg.ee + 1)
        # 6: leading zeros
        lz6 = _reg(m, "lz6", _lzc(sum5 | limit5))
        sum6, e6 = _reg(m, "sum6", sum5), _reg(m, "e6", e5)
        zero6 = _reg(m, "zero6", ~sum5.any())
        # 7, 8: normalise
        co, fi = _split(lz6)
        sum7, fine7 = _reg(m, "sum7", _shl(sum6, co)), _reg(m, "lzfine7", fi)
        e7 = _reg(m, "e7", e6 - lz6, signed(10))
        zero7 = _reg(m, "zero7", zero6)
        sign7 = Mux(zero7, delay(m, zsign2, 5, name="zsign"), delay(m, big2[31], 5, name="bsign"))
        sum8 = _reg(m, "sum8", _shl(sum7, fine7))
        e8, ovf8 = _reg(m, "e8", e7[:8]), _reg(m, "ovf8", e7 >= 255)
        sign8, zero8 = _reg(m, "sign8", sign7), _reg(m, "zero8", zero7)
        # 9: round
        _round_out(m, self.o, sign8, e8, Cat(sum8[:3].any(), sum8[3:]), ovf=ovf8,
                   nan=delay(m, nan2, 6, name="nan"), inf=delay(m, inf2, 6, name="inf"), zero=zero8)
        return m


class FMul(wiring.Component):
    """``a * b`` in binary32, ``latency`` = 9; two DSP48E2.

    Attributes
    ----------
    i_valid : In(1)
    a, b : In(32)
    o_valid : Out(1)
    o : Out(32)
        The correctly rounded product (sign ``sa ^ sb``, also of zeros and infinities);
        ``0 * inf`` and NaN operands give :data:`QNAN`.
    latency : int
    """

    latency = 9

    def __init__(self):
        super().__init__({"i_valid": In(1), "a": In(32), "b": In(32), "o_valid": Out(1), "o": Out(32)})

    def elaborate(self, platform):
        m = Module()
        _valid(m, self)
        fa, fb, lza2, lzb2, ma3, mb3 = _operands(m, self.a, self.b)
        # 2, 3: the exponent of ma3 * mb3 / 2**46 (a significand in [1, 4))
        t2 = _reg(m, "t2", fa.ee + fb.ee - 127, signed(10))
        t3 = _reg(m, "t3", t2 - lza2 - lzb2, signed(10))
        sign2 = _reg(m, "sign2", fa.sign ^ fb.sign)
        nan2 = _reg(m, "nan2", fa.nan | fb.nan | (fa.inf & fb.zero) | (fa.zero & fb.inf))
        inf2 = _reg(m, "inf2", fa.inf | fb.inf)
        zero2 = _reg(m, "zero2", fa.zero | fb.zero)
        # 4, 5: the product: M and P registers after the A/B registers ma3, mb3
        p4 = _reg(m, "prod_m", ma3 * mb3)
        p5 = _reg(m, "prod_p", p4)
        # 6: [1, 2) or [2, 4): frame from the top 25 or 26 bits, the rest sticky
        top = p5[47]
        frame6 = _reg(m, "frame6", Mux(top, Cat(p5[:23].any(), p5[23:48]), Cat(p5[:22].any(), p5[22:47])))
        e6 = _reg(m, "e6", delay(m, t3, 2, name="t") + top, signed(10))
        # 7-9
        _tail(m, self.o, frame6, e6, delay(m, sign2, 4, name="sign"), delay(m, nan2, 4, name="nan"),
              delay(m, inf2, 4, name="inf"), delay(m, zero2, 4, name="zero"))
        return m


class FDiv(wiring.Component):
    """``a / b`` in binary32, fully pipelined (one operation a cycle), ``latency`` = 33.

    Radix-2 restoring division of the normalised significands, one quotient bit per
    stage (26 bits: 24, guard, and one for a quotient below 1), the remainder's
    nonzero-ness as sticky.

    Attributes
    ----------
    i_valid : In(1)
    a, b : In(32)
    o_valid : Out(1)
    o : Out(32)
        The correctly rounded quotient (sign ``sa ^ sb``); ``x / 0`` is a signed infinity
        for ``x != 0``, ``0 / 0``, ``inf / inf`` and NaN operands give :data:`QNAN`.
    latency : int
    """

    QUOTIENT_BITS = 26
    latency = 3 + QUOTIENT_BITS + 4

    def __init__(self):
        super().__init__({"i_valid": In(1), "a": In(32), "b": In(32), "o_valid": Out(1), "o": Out(32)})

    def elaborate(self, platform):
        m = Module()
        _valid(m, self)
        fa, fb, lza2, lzb2, ma3, mb3 = _operands(m, self.a, self.b)
        # 2, 3: the exponent of a quotient in [1, 2)
        t2 = _reg(m, "t2", fa.ee - fb.ee + 127, signed(10))
        t3 = _reg(m, "t3", t2 - lza2 + lzb2, signed(10))
        sign2 = _reg(m, "sign2", fa.sign ^ fb.sign)
        nan2 = _reg(m, "nan2", fa.nan | fb.nan | (fa.zero & fb.zero) | (fa.inf & fb.inf))
        inf2 = _reg(m, "inf2", fa.inf | fb.zero)
        zero2 = _reg(m, "zero2", fa.zero | fb.inf)
        # 4 .. 29: q_i = (r >= d), r <- 2 * (r - q_i * d); r < 2d throughout (r0 = ma < 2^24
        # <= 2 mb), so r - d and r fit 24 bits when chosen and the doubled remainder 25
        r, d, q = Cat(ma3, C(0, 1)), mb3, None
        for i in range(self.QUOTIENT_BITS):
            diff = r - d
            ge = ~diff[-1]
            r = _reg(m, f"rem{i}", Cat(C(0, 1), Mux(ge, diff[:24], r[:24])))
            q = _reg(m, f"quo{i}", ge if q is None else Cat(ge, q))     # first bit ends on top
            d = _reg(m, f"div{i}", d)
        # 30: a/b in [1, 2) (q[25] set) or (1/2, 1): frame from the top 25 bits, sticky
        # below them and the remainder
        s = self.latency - 4                      # the stage of the last quotient bit
        top, rem = q[25], r.any()
        frame = _reg(m, "frame", Mux(top, Cat(q[0] | rem, q[1:26]), Cat(rem, q[:25])))
        e = _reg(m, "e", delay(m, t3, s - 3, name="t") - 1 + top, signed(10))
        # 31-33
        _tail(m, self.o, frame, e, *(delay(m, f, s - 1, name=n) for f, n in
                                     ((sign2, "sign"), (nan2, "nan"), (inf2, "inf"), (zero2, "zero"))))
        return m


class FCmp(wiring.Component):
    """``max(a, b)`` and the IEEE comparisons ``a < b``, ``a == b``; ``latency`` = 3.

    ``max`` is ``np.maximum``: NaN (:data:`QNAN`) if either operand is NaN, else the larger
    value; of +0 and -0 it returns **+0** in either order (IEEE 754-2019 ``maximum``;
    numpy returns its first operand). ``lt`` and ``eq`` are false if either
    operand is NaN, and ``+0 == -0``.

    Attributes
    ----------
    i_valid : In(1)
    a, b : In(32)
    o_valid : Out(1)
    max : Out(32)
    lt, eq : Out(1)
    latency : int
    """

    latency = 3

    def __init__(self):
        super().__init__({"i_valid": In(1), "a": In(32), "b": In(32),
                          "o_valid": Out(1), "max": Out(32), "lt": Out(1), "eq": Out(1)})

    def elaborate(self, platform):
        m = Module()
        _valid(m, self)
        a1, b1 = _reg(m, "a1", self.a), _reg(m, "b1", self.b)
        fa, fb = _Fields(a1), _Fields(b1)
        # 2
        lt2 = _reg(m, "lt2", _order_key(a1) < _order_key(b1))
        same2 = _reg(m, "same2", a1 == b1)
        zeros2 = _reg(m, "zeros2", fa.zero & fb.zero)
        nan2 = _reg(m, "nan2", fa.nan | fb.nan)
        a2, b2 = _reg(m, "a2", a1), _reg(m, "b2", b1)
        # 3
        m.d.sync += [
            self.max.eq(Mux(nan2, QNAN, Mux(lt2, b2, a2))),
            self.lt.eq(lt2 & ~nan2 & ~zeros2),
            self.eq.eq((same2 | zeros2) & ~nan2),
        ]
        return m


def _check_width(unit, width):
    if not isinstance(width, int) or isinstance(width, bool):
        unit._MustUse__silence = True      # never elaborated: no unused-elaboratable warning
        raise TypeError(f"width must be an int, not {width!r}")
    if not 2 <= width <= 64:
        unit._MustUse__silence = True
        raise ValueError(f"width must be in 2..64, not {width}")
    return width


class I2F(wiring.Component):
    """Signed ``width``-bit integer to binary32, rounded to nearest even; ``latency`` = 6.

    Parameters
    ----------
    width : int
        2 .. 64 (numpy's ``int64`` is the reference).

    Attributes
    ----------
    i_valid : In(1)
    a : In(signed(width))
    o_valid : Out(1)
    o : Out(32)
        ``np.float32`` of ``a`` (0 is +0).
    latency : int
    """

    latency = 6

    def __init__(self, width: int):
        self.width = _check_width(self, width)
        super().__init__({"i_valid": In(1), "a": In(signed(width)), "o_valid": Out(1), "o": Out(32)})

    def elaborate(self, platform):
        m = Module()
        _valid(m, self)
        w = self.width
        f = max(w, 26)                                     # frame: 24 bits, guard, sticky
        x1 = _reg(m, "x1", self.a)
        # 2: sign and magnitude (|-2^(w-1)| fits w unsigned bits)
        neg2 = _reg(m, "neg2", x1[w - 1])
        mag2 = _reg(m, "mag2", Mux(x1[w - 1], -x1, x1)[:w])
        # 3
        lz3, mag3 = _reg(m, "lz3", _lzc(mag2)), _reg(m, "mag3", mag2)
        zero3 = _reg(m, "zero3", ~mag2.any())
        # 4, 5: the leading one to the top of the frame, the bits below guard ORed into the
        # sticky bit (here, not in front of the rounding adder); exponent of the top bit
        co, fi = _split(lz3)
        x4, fine4 = _reg(m, "x4", _shl(Cat(C(0, f - w), mag3), co)), _reg(m, "lzfine4", fi)
        e4 = _reg(m, "e4", 127 + w - 1 - lz3, 8)
        x = _shl(x4, fine4)
        frame5, e5 = _reg(m, "frame5", Cat(x[:f - 25].any(), x[f - 25:])), _reg(m, "e5", e4)
        # 6
        _round_out(m, self.o, delay(m, neg2, 3, name="neg"), e5, frame5, zero=delay(m, zero3, 2, name="zero"))
        return m


class FRound(wiring.Component):
    """binary32 to the integral binary32 value nearest to it (``np.rint``: ties to even) or
    above it (``np.ceil``), chosen per operation; ``latency`` = 4.

    The sign is kept: ``rint(-0.4) = ceil(-0.5) = -0``; zeros, infinities and integral
    values pass unchanged, NaN gives :data:`QNAN`.

    Attributes
    ----------
    i_valid : In(1)
    a : In(32)
    ceil : In(1)
        Round up (``np.ceil``) instead of to nearest even (``np.rint``).
    o_valid : Out(1)
    o : Out(32)
    latency : int
    """

    latency = 4

    def __init__(self):
        super().__init__({"i_valid": In(1), "a": In(32), "ceil": In(1), "o_valid": Out(1), "o": Out(32)})

    def elaborate(self, platform):
        m = Module()
        _valid(m, self)
        x1, ceil1 = _reg(m, "x1", self.a), _reg(m, "ceil1", self.ceil)
        fx = _Fields(x1)
        # 2: a value with exponent e in 127..149 has f = 150 - e fraction bits. mask: the
        # fraction bits (all of them below 1.0, none from 2^23 on); unit: bit f, the
        # integer part's lsb (bit 23 = hidden bit for e = 127; none below 1.0)
        mask2 = _reg(m, "mask2", Cat(*(fx.e < 150 - i for i in range(23))))
        unit2 = _reg(m, "unit2", Cat(*(fx.e == 150 - i for i in range(24))))
        below1 = _reg(m, "below1", fx.e < 127)
        half2 = _reg(m, "half2", fx.e == 126)               # [0.5, 1)
        x2, ceil2 = _reg(m, "x2", x1), _reg(m, "ceil2", ceil1)
        nan2 = _reg(m, "nan2", fx.nan)
        # 3: the truncated value and what to add: one unit (its carry may reach the
        # exponent), or, below 1.0, the value is 0 or 1.0 whole
        f2 = _Fields(x2)
        g = (f2.sig & (unit2 >> 1)).any()                   # the bit worth 1/2
        st = (f2.frac & (mask2 >> 1)).any()                 # the bits below it
        lsb = (f2.sig & unit2).any()
        up = Mux(ceil2, ~f2.sign & (g | st), g & (st | lsb))
        # below 1.0: rint gives 1 for (0.5, 1), ceil for any positive nonzero value
        one = Mux(ceil2, ~f2.sign & x2[:31].any(), half2 & f2.frac.any())
        base3 = _reg(m, "base3", Mux(below1, Mux(one, 0x3F800000, 0), Cat(f2.frac & ~mask2, f2.e)), 31)
        inc3 = _reg(m, "inc3", Mux(~below1 & up, unit2, 0))
        sign3, nan3 = _reg(m, "sign3", f2.sign), _reg(m, "nan3", nan2)
        # 4
        m.d.sync += self.o.eq(Mux(nan3, QNAN, Cat((base3 + inc3)[:31], sign3)))
        return m


class F2I(wiring.Component):
    """binary32 holding an integral value to a signed ``width``-bit integer; ``latency`` = 5.

    Saturating: values at or above ``2^(width-1)`` (and +inf) give ``2^(width-1) - 1``,
    values below ``-2^(width-1)`` (and -inf) give ``-2^(width-1)``; NaN gives 0. A value
    with a fraction is truncated toward zero (``np.trunc``).

    Parameters
    ----------
    width : int
        2 .. 64 (numpy's ``int64`` is the reference).

    Attributes
    ----------
    i_valid : In(1)
    a : In(32)
    o_valid : Out(1)
    o : Out(signed(width))
    latency : int
    """

    latency = 5

    def __init__(self, width: int):
        self.width = _check_width(self, width)
        super().__init__({"i_valid": In(1), "a": In(32), "o_valid": Out(1), "o": Out(signed(width))})

    def elaborate(self, platform):
        m = Module()
        _valid(m, self)
        w = self.width
        x1 = _reg(m, "x1", self.a)
        fx = _Fields(x1)
        # 2: |x| < 1 gives 0, |x| >= 2^(w-1) saturates, else the integer is sig << (e - 127)
        # >> 23 with e - 127 in 0..w-2
        sh2 = _reg(m, "sh2", (fx.e - 127)[:max(1, (w - 2).bit_length())])
        sig2 = _reg(m, "sig2", fx.sig)
        zero2 = _reg(m, "zero2", (fx.e < 127) | fx.nan)
        sat2 = _reg(m, "sat2", fx.e >= 127 + w - 1)
        neg2 = _reg(m, "neg2", fx.sign)
        # 3, 4
        co, fi = _split(sh2)
        x3, fine3 = _reg(m, "x3", _shl(Cat(sig2, C(0, w - 2)), co)), _reg(m, "shfine3", fi)
        x4 = _reg(m, "x4", _shl(x3, fine3))
        zero4, sat4, neg4 = (delay(m, f, 2, name=n) for f, n in ((zero2, "zero"), (sat2, "sat"), (neg2, "neg")))
        # 5
        mag = x4[23:]
        lim = Mux(neg4, -(1 << (w - 1)), (1 << (w - 1)) - 1)
        m.d.sync += self.o.eq(Mux(zero4, 0, Mux(sat4, lim, Mux(neg4, -mag, mag))))
        return m


class FSqrt(wiring.Component):
    """``sqrt(a)`` in binary32, iterative with ready/valid handshakes.

    One operation in flight: ``i_ready`` is high while idle; the result is held on ``o``
    with ``o_valid`` until ``o_ready``. An operation takes ``cycles`` cycles from its
    acceptance to ``o_valid`` (unpack, normalise, 25 root bits, sticky, round), one more
    to return to idle after ``o_ready``. ``sqrt(-0) = -0``, ``sqrt(+inf) = +inf``, a NaN or
    any value below zero gives :data:`QNAN`.

    Attributes
    ----------
    i_valid : In(1)
    i_ready : Out(1)
    a : In(32)
    o_valid : Out(1)
    o_ready : In(1)
    o : Out(32)
    cycles : int
    """

    ROOT_BITS = 25                                          # 24 and the guard bit
    cycles = ROOT_BITS + 5

    def __init__(self):
        super().__init__({"i_valid": In(1), "i_ready": Out(1), "a": In(32),
                          "o_valid": Out(1), "o_ready": In(1), "o": Out(32)})

    def elaborate(self, platform):
        m = Module()
        x = Signal(32, name="x", reset_less=True)
        fx = _Fields(x)
        sig, lz = Signal(24, name="sig", reset_less=True), Signal(5, name="lz", reset_less=True)
        ee = Signal(8, name="ee", reset_less=True)
        # radicand bits, consumed two at a time from the top; partial root and remainder
        # (rem <= 2 * root: 27 bits)
        rad = Signal(50, name="rad", reset_less=True)
        root = Signal(self.ROOT_BITS, name="root", reset_less=True)
        rem = Signal(27, name="rem", reset_less=True)
        e = Signal(8, name="e_out", reset_less=True)
        frame = Signal(26, name="frame", reset_less=True)
        step = Signal(range(self.ROOT_BITS), name="step", reset_less=True)

        cur = Cat(rad[48:50], rem)                          # 4 rem + the next two bits
        diff = cur - Cat(C(1, 2), root)                     # - (4 root + 1)
        ge = ~diff[-1]
        with m.FSM():
            with m.State("IDLE"):
                m.d.comb += self.i_ready.eq(1)
                with m.If(self.i_valid):
                    m.d.sync += x.eq(self.a)
                    m.next = "UNPACK"
            with m.State("UNPACK"):
                m.d.sync += [sig.eq(fx.sig), lz.eq(_lzc(fx.sig)), ee.eq(fx.ee)]
                m.next = "NORM"
            with m.State("NORM"):
                # x = sig' * 2^(u - 23) with sig' normalised and u = ee - lz - 127; an odd u
                # moves one factor 2 into the radicand, so the root's biased exponent is
                # floor(u / 2) + 127 = v >> 1 with v = u + 254 (odd exactly when u is), and
                # sqrt(sig' (<< 1)) * 2^12 = isqrt(radicand << 25) has 25 bits
                v = (ee + 127 - lz)[:9]
                norm = _shl(sig, lz)
                m.d.sync += [
                    rad.eq(Cat(C(0, 25), Mux(v[0], Cat(C(0, 1), norm), Cat(norm, C(0, 1))))),
                    e.eq(v >> 1), root.eq(0), rem.eq(0), step.eq(0),
                ]
                m.next = "ROOT"
            with m.State("ROOT"):
                m.d.sync += [rem.eq(Mux(ge, diff, cur)), root.eq(Cat(ge, root)), rad.eq(rad << 2),
                             step.eq(step + 1)]
                with m.If(step == self.ROOT_BITS - 1):
                    m.next = "STICKY"
            with m.State("STICKY"):
                m.d.sync += frame.eq(Cat(rem.any(), root))
                m.next = "ROUND"
            with m.State("ROUND"):
                _round_out(m, self.o, fx.sign, e, frame, nan=fx.nan | (fx.sign & ~fx.zero),
                           inf=fx.inf, zero=fx.zero)
                m.next = "DONE"
            with m.State("DONE"):
                m.d.comb += self.o_valid.eq(1)
                with m.If(self.o_ready):
                    m.next = "IDLE"
        return m
