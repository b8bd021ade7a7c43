"""``exp(x)`` on binary32 bit patterns, bit-exact with :func:`flightllm.runtime.sfu.exp`.

The specification is the fixed-point algorithm of :mod:`flightllm.runtime.sfu` (module
docstring, section ``exp(x)``); every constant, width and shift below is derived from the
constants that module exports (``EXP_*``), so the two cannot drift apart silently. In
short: ``t = x log2 e`` with 26 fraction bits from one 24 x 33-bit product and a right
shift, ``k = floor(t)``, ``2^frac(t) ~ T[j] * (1 + d)`` from a 256-entry table and the
quadratic ``d = a + a^2 / 2`` in ``a = r ln 2``, then rounding to 24 bits.

Interface. A fixed-latency pipeline without clock enable or ready (the project's rule:
credit-based issue into output FIFOs, no global stall): an ``x`` on the port with
``i_valid`` high comes out as ``y`` with ``o_valid`` exactly :attr:`FExp.latency` = 19
cycles later, one input a cycle; a bubble flows through like an input. Only the valid
line is reset. ``y`` is the golden model's result for every one of the 2^32 inputs, with
the canonical quiet NaN :data:`~flightllm.hw.fp32.QNAN` for a NaN ``x`` (the golden
model passes the NaN through; any NaN is allowed).

Pipeline (the number is the stage, i.e. the cycle after the ports that holds the
registers the line computes; DSP = DSP48E2, written as the plain ``a * b`` with a
register before it, after the product (M) and after the adder (P))::

     1  x (sign, exponent); m = significand with its hidden one: the A register of
        m * LOG2E (hw.chain.split_mul: 2 DSP, LOG2E cut at 17 bits, PCIN >> 17 cascade)
     2  classify the exponent e: NaN, |x| >= 128 (e >= EXP_BIG_E), t = 0 (e < 100:
        zero, subnormals and every x whose t has no bit left), shift sh = 133 - e
     4  P = m * LOG2E (57 bits)
     5  P >> 23 >> coarse(sh)                     (multiples of 8: one 8:1 mux level)
     6  >> fine(sh), zero if t = 0: mag = |t|     (34 bits)
     7  t = sign ? -mag : mag                     (35-bit carry chain: k, j, r = its bits)
        r is the A register of r * LN2 (1 DSP)
     8  r * LN2 (M)          9  P: a = (r * LN2) >> 8 (28 bits)
    10  h = a >> 10 and h - 2^17 (A, B registers of h * h, 1 DSP),
        (h << 17) + (a << 17) (29-bit add);  j is the table ROM's address
    11  h * (h - 2^17) (M), the sum in the C register;  the ROM read (RAMB18)
    12  P = h^2 + (a << 17): d = a + (h^2 >> 17) is P >> 17;  T = table[j] (output register)
    13  T' = T[4:30], d: the A, B registers of T' * d (split_mul: 2 DSP);
        V = (T << 6) + d (31-bit add)
    16  X = T' * d (54 bits)
    17  M = (V + (X >> 26)) >> 6                  (38-bit add; M = T + ((T >> 4) * d >> 32))
    18  significand = (M >> 7) + round-up bit (25-bit add, half to even);
        exponent k + 127 and k + 128, each with its flush-to-zero and overflow flag
    19  y: the carry out of the rounding picks the exponent; specials

Why the products look the way they do: a DSP48E2 multiplies a signed 27-bit A by a
signed 18-bit B, so an unsigned operand fits A with 26 bits and B with 17.

* ``m * LOG2E`` (24 x 33 bits): ``m`` on A, the constant on B in two pieces of 17 and
  16 bits, the second DSP adding the first's P shifted by 17 (:func:`split_mul`).
* ``r * LN2`` (18 x 18 bits): ``LN2`` = 181,704 = 22,713 * 2^3, so the B port gets the
  odd 15-bit factor and the shift by 3 is folded into the following ``>> 8``.
* ``h * h`` (18 x 18 bits, ``h`` up to 181,703 > 2^17): ``h`` fits A, but not B. With
  ``hb = h - 2^17`` (a signed 18-bit number: ``h`` with its top bit inverted),
  ``h^2 = h * hb + (h << 17)``; the DSP's post-adder adds the correction through its C
  port, together with ``a << 17``, so its P is ``h^2 + (a << 17)`` and ``d`` is P's bits
  from 17 up: the golden ``a + (h^2 >> 17)`` (the sum of a multiple of 2^17 and
  ``h^2`` loses nothing below bit 17). One DSP; a plain unsigned ``h * h`` needs two.
* ``(T >> 4) * d`` (27 x 28 bits): ``T >> 4`` lies in [2^26, 2^27), one bit too wide for
  A; its leading one is split off: ``(T >> 4) * d = T' * d + (d << 26)`` with the 26-bit
  ``T' = T[4:30]``. ``d`` (28 bits) goes on B in two pieces (:func:`split_mul`). The
  ``d << 26`` term and ``T`` are added after the product without a second carry chain:
  ``T + ((X + (d << 26)) >> 32) = (64 T + d + (X >> 26)) >> 6`` (the added terms are
  multiples of 2^26 and of 64), and ``V = 64 T + d`` is computed while the DSPs run.

The largest ``M`` is 2^31 - 42 (``j`` = 255, ``r`` = 2^18 - 1), so ``M >> 7`` is a 24-bit
significand with its leading one at bit 23 and only the rounding increment can carry to
2^24; then the fraction bits are all zero and the exponent is ``k + 128``, which is what
the golden model's "halve, k + 1" gives (the tests include inputs with that largest ``M``).

Resources (Yosys ``synth_xilinx -family xcup``, the flow of ``bench/resources.py``): 6
DSP48E2, one RAMB18E2 (the 256 x 31-bit table, ``rom_style = "block"``: as LUTs it costs
about 115 more), 382 LUTs (65 of them SRLs), 799 FFs and 37 CARRY8. Yosys packs none of
the DSP48E2 registers (A/B/C, M, P: about 530 of the FFs) nor the post-adders (about 90
LUTs and 12 CARRY8) nor the table's output register (30 FFs); Vivado would.
"""

from __future__ import annotations

import numpy as np
from amaranth import C, Cat, Module, Mux, Signal, Value, signed, unsigned
from amaranth.lib import wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from ..runtime.sfu import (EXP_A_FRAC, EXP_BIG_E, EXP_H_SHIFT, EXP_J_BITS, EXP_LN2, EXP_LOG2E,
                           EXP_LOG2E_FRAC, EXP_R_BITS, EXP_T_FRAC, EXP_T_SHIFT, EXP_TABLE, EXP_TABLE_FRAC)
from .chain import SPLIT_MUL_LATENCY, split_mul
from .fp32 import INF, QNAN
from .geometry import delay

__all__ = ["FExp"]

# -- binary32 fields ------------------------------------------------------------------
_FRAC = np.finfo(np.float32).nmant                  # 23 fraction bits
_EBITS = 32 - 1 - _FRAC                             # 8 exponent bits
_BIAS = (1 << (_EBITS - 1)) - 1                     # 127
_EMAX = (1 << _EBITS) - 1                           # 255: inf / NaN

# -- t = x log2 e = m * LOG2E >> (shift(e)), sfu.exp's `mag` -------------------------
#: the right shift of m * LOG2E for biased exponent e is _SH_BASE - e (156 - e)
_SH_BASE = _BIAS + _FRAC + EXP_LOG2E_FRAC - EXP_T_FRAC
_P_BITS = (_FRAC + 1) + EXP_LOG2E.bit_length()      # 57: the product m * LOG2E
_SH_MIN = _SH_BASE - (EXP_BIG_E - 1)                # 23: the shift of the largest finite case
#: smallest exponent with a nonzero t (a smaller one shifts every product bit out)
_E_MIN = _SH_BASE - (_P_BITS - 1)                   # 100
_SH_BITS = (EXP_BIG_E - 1 - _E_MIN).bit_length()    # sh = 133 - e in 0..33: 6 bits
_MAG_BITS = _P_BITS - _SH_MIN                       # 34: |t|
_T_BITS = _MAG_BITS + 1                             # 35: t, signed (k = t >> 26: 9 bits)

# -- a = r ln 2, d = a + a^2 / 2 -------------------------------------------------------
_A_SHIFT = EXP_T_FRAC + EXP_R_BITS - EXP_A_FRAC     # 8: a = (r * LN2) >> 8
_LN2_TZ = (EXP_LN2 & -EXP_LN2).bit_length() - 1     # 3 trailing zero bits of LN2 ...
_LN2_ODD = EXP_LN2 >> _LN2_TZ                       # ... and the odd rest on the B port
_A_MAX = ((1 << EXP_R_BITS) - 1) * EXP_LN2 >> _A_SHIFT
_A_BITS = _A_MAX.bit_length()                       # 28
_H_SHIFT = EXP_H_SHIFT                              # h = a >> 10: a's top 18 bits
_SQ_SHIFT = 2 * (EXP_A_FRAC - _H_SHIFT) - EXP_A_FRAC + 1    # 17
_H_BITS = _A_BITS - _H_SHIFT                        # 18
_D_BITS = (_A_MAX + ((_A_MAX >> _H_SHIFT) ** 2 >> _SQ_SHIFT)).bit_length()   # 28

# -- M = T + ((T >> 4) * d >> 32) ------------------------------------------------------
_T_SHIFT = EXP_T_SHIFT                              # T >> 4: a 27-bit multiplier operand
_M_SHIFT = EXP_TABLE_FRAC - _T_SHIFT + EXP_A_FRAC - EXP_TABLE_FRAC      # 32
_TP_BITS = EXP_TABLE_FRAC - _T_SHIFT                # 26: T' = (T >> 4) - 2^26
_G = _M_SHIFT - _TP_BITS                            # 6: M = (64 T + d + (X >> 26)) >> 6
_X_BITS = _TP_BITS + _D_BITS                        # 54: X = T' * d
_CUT = EXP_TABLE_FRAC - _FRAC                       # 7: M >> 7 is the significand

_DSP_A, _DSP_B = 27, 18                             # DSP48E2 signed multiplier ports


def _check():
    """The facts the datapath relies on, checked on the imported constants."""
    tab = [int(v) for v in EXP_TABLE]
    if len(tab) != 1 << EXP_J_BITS or not all(1 << EXP_TABLE_FRAC <= v < 2 << EXP_TABLE_FRAC for v in tab):
        raise ValueError(f"FExp: EXP_TABLE must hold {1 << EXP_J_BITS} entries in "
                         f"[2^{EXP_TABLE_FRAC}, 2^{EXP_TABLE_FRAC + 1}) (its leading one is split off)")
    if _SH_MIN < 0 or _E_MIN < 1 or _G < 0 or _CUT < 1 or _LN2_TZ > _A_SHIFT:
        raise ValueError("FExp: the EXP_* constants give a shift this datapath does not implement")
    # (operand, its width as a signed number, the port): an unsigned operand needs one more bit
    for what, bits, port in (("m", _FRAC + 2, _DSP_A), ("LN2's odd factor", _LN2_ODD.bit_length() + 1, _DSP_B),
                             ("r", EXP_R_BITS + 1, _DSP_A), ("h", _H_BITS + 1, _DSP_A),
                             ("h - 2^(h bits - 1)", _H_BITS, _DSP_B), ("T'", _TP_BITS + 1, _DSP_A)):
        if bits > port:
            raise ValueError(f"FExp: {what} ({bits} bits signed) does not fit the {port}-bit DSP48E2 port")


_check()


def _reg(m, name, value, shape=None):
    """A register loaded with ``value`` every cycle (no reset: only the valid line is)."""
    value = Value.cast(value)
    r = Signal(value.shape() if shape is None else shape, name=name, reset_less=True)
    m.d.sync += r.eq(value)
    return r


class FExp(wiring.Component):
    """``y = exp(x)`` in binary32 as :func:`flightllm.runtime.sfu.exp`, ``latency`` = 19.

    Attributes
    ----------
    i_valid : In(1)
    x : In(32)
        A binary32 bit pattern.
    o_valid : Out(1)
        ``latency`` cycles after ``i_valid``.
    y : Out(32)
        ``sfu.exp(x)`` bit for bit: +inf for ``x >= 128`` or an overflowing result, +0 for
        ``x <= -128`` or a result below 2^-126 (flushed), :data:`~flightllm.hw.fp32.QNAN`
        for a NaN ``x``.
    latency : int
        Cycles from ``x`` to ``y`` (a class attribute: the SFU lane plans with it).
    dsps : int
        DSP48E2 multipliers: 2 for ``m * LOG2E``, 1 for ``r * LN2``, 1 for ``h * h``, 2 for
        ``T' * d``.
    """

    # the stage that holds each value (module docstring)
    S_C = 2                             # the exponent's classes
    S_P = SPLIT_MUL_LATENCY             # 4: split_mul samples m at the port
    S_T = S_P + 3                       # 7: coarse shift, fine shift, negate
    S_A = S_T + 2                       # 9: r * LN2's M and P (t is its A register)
    S_D = S_A + 3                       # 12: h * h's A/B/C, M and P; the table's output
    S_X = S_D + SPLIT_MUL_LATENCY       # 16: T' * d
    S_M = S_X + 1                       # 17: M
    latency = S_M + 2                   # 19: rounding, y
    dsps = 6

    def __init__(self):
        super().__init__({"i_valid": In(1), "x": In(32), "o_valid": Out(1), "y": Out(32)})

    def elaborate(self, platform):
        m = Module()

        # -- 1-2: the port register, the exponent's classes ------------------------------
        x1 = _reg(m, "x1", self.x)
        sign1, e1, frac1 = x1[31], x1[_FRAC:31], x1[:_FRAC]
        nan2 = _reg(m, "nan2", (e1 == _EMAX) & frac1.any())
        big2 = _reg(m, "big2", e1 >= EXP_BIG_E)                  # |x| >= 128: inf or 0
        tiny2 = _reg(m, "tiny2", e1 < _E_MIN)                    # t = 0 (zero, subnormal, tiny)
        sh2 = _reg(m, "sh2", (EXP_BIG_E - 1 - e1)[:_SH_BITS])    # the shift - 23 (e in 100..133)
        sign2 = _reg(m, "sign2", sign1)

        # -- 1-4: P = m * LOG2E (split_mul's first register samples the port) ------------
        # the hidden one is always set: a zero or subnormal x has t = 0 anyway (tiny)
        sig = Cat(self.x[:_FRAC], C(1, 1))
        log2e = C(EXP_LOG2E, EXP_LOG2E.bit_length() + 1)          # + 1: the high piece stays >= 0
        prod4 = split_mul(m, "mlog2e", sig, log2e, unsigned(_P_BITS))
        dly = self.S_P - self.S_C
        sh4 = delay(m, sh2, dly, name="sh")
        tiny4 = delay(m, tiny2, dly, name="tiny")

        # -- 5-6: |t| = P >> (23 + sh), coarse then fine ---------------------------------
        coarse5 = _reg(m, "coarse5", prod4[_SH_MIN:] >> Cat(C(0, 3), sh4[3:]), unsigned(_MAG_BITS))
        fine5 = _reg(m, "fine5", sh4[:3])
        tiny5 = _reg(m, "tiny5", tiny4)
        mag6 = _reg(m, "mag6", Mux(tiny5, 0, coarse5 >> fine5), unsigned(_MAG_BITS))

        # -- 7: t = sign ? -mag : mag, as (mag ^ -s) + s: the XOR sits in the carry chain's LUTs
        sign6 = delay(m, sign2, self.S_T - 1 - self.S_C, name="sign")
        ext = Cat(mag6, C(0, 1))
        t7 = _reg(m, "t7", Mux(sign6, ~ext, ext) + sign6, signed(_T_BITS))
        k7 = t7[EXP_T_FRAC:].as_signed()                           # floor(t)
        j7 = t7[EXP_R_BITS:EXP_T_FRAC]
        r7 = t7[:EXP_R_BITS]                                       # only feeds the DSP: its A register

        # -- 8-9: a = r * LN2 >> 8 (one DSP: M, P) ----------------------------------------
        am8 = _reg(m, "ln2_m", r7 * _LN2_ODD)
        ap9 = _reg(m, "ln2_p", am8)
        a9 = ap9[_A_SHIFT - _LN2_TZ:][:_A_BITS]

        # -- 10-12: d = a + (h^2 >> 17) = P >> 17 of h * (h - 2^17) + ((h << 17) + (a << 17))
        h9 = a9[_H_SHIFT:]
        hb = Cat(h9[:_H_BITS - 1], ~h9[_H_BITS - 1]).as_signed()  # h - 2^17, signed 18 bits
        h10 = _reg(m, "sq_a", h9)
        hb10 = _reg(m, "sq_b", hb)
        c10 = _reg(m, "sq_c0", (h9 << (_H_BITS - 1)) + (a9 << _SQ_SHIFT), unsigned(_SQ_SHIFT + _D_BITS + 1))
        c11 = _reg(m, "sq_c", c10)                                 # DSP C register
        sqm11 = _reg(m, "sq_m", h10 * hb10)
        # P = h^2 + (a << 17) >= 0; bits from 17 up are d (< 2^28), the upper ones are 0
        sqp12 = _reg(m, "sq_p", sqm11 + c11, unsigned(_SQ_SHIFT + _D_BITS))
        d12 = sqp12[_SQ_SHIFT:]

        # -- 10-12: T = table[j] (ROM: the address register, the read, the output register)
        tab = Memory(shape=unsigned(EXP_TABLE_FRAC + 1), depth=1 << EXP_J_BITS,
                     init=[int(v) for v in EXP_TABLE], attrs={"rom_style": "block"})
        m.submodules.table = tab
        rd = tab.read_port()
        m.d.comb += rd.addr.eq(delay(m, j7, self.S_D - 2 - self.S_T, name="j"))   # 2: read, output reg
        t12 = _reg(m, "tab12", rd.data)

        # -- 13-16: X = T' * d (split_mul: 2 DSP); V = 64 T + d meanwhile ---------------
        x16 = split_mul(m, "td", t12[_T_SHIFT:EXP_TABLE_FRAC], Cat(d12, C(0, 1)), unsigned(_X_BITS))
        v13 = _reg(m, "v13", (t12 << _G) + d12, unsigned(EXP_TABLE_FRAC + 2 + _G))
        v16 = delay(m, v13, self.S_X - self.S_D - 1, name="v")

        # -- 17: M = (V + (X >> 26)) >> 6 ------------------------------------------------
        msum17 = _reg(m, "msum17", v16 + (x16 >> _TP_BITS), unsigned(EXP_TABLE_FRAC + 2 + _G))
        m17 = msum17[_G:_G + EXP_TABLE_FRAC + 1]                  # < 2^31 (module docstring)

        # -- 18: round to 24 bits, half to even; exponent candidates and their flags ----
        sig17 = m17[_CUT:]
        up = m17[_CUT - 1] & (m17[:_CUT - 1].any() | sig17[0])
        rs18 = _reg(m, "rs18", sig17 + up, unsigned(_FRAC + 2))  # bit 24: carried to 2^24
        k17 = delay(m, k7, self.S_M - self.S_T, name="k")
        s17, big17, nan17 = (delay(m, f, self.S_M - self.S_C, name=n)
                             for f, n in ((sign2, "s"), (big2, "big"), (nan2, "nan")))
        # exponent field k + 127 + carry, without (0) and with (1) the carry; flush to zero
        # below 2^-126 (field <= 0), inf from field >= 255: compares of k with constants
        # (no add in front); |x| >= 128 decides alone
        ef18 = [_reg(m, f"ef{c}_18", (k17 + _BIAS + c)[:_EBITS]) for c in (0, 1)]
        zero18 = [_reg(m, f"zero{c}_18", Mux(big17, s17, k17 <= -_BIAS - c)) for c in (0, 1)]
        inf18 = [_reg(m, f"inf{c}_18", Mux(big17, ~s17, k17 >= _EMAX - _BIAS - c)) for c in (0, 1)]
        nan18 = _reg(m, "nan18", nan17)

        # -- 19: the carry picks the exponent; specials -----------------------------------
        carry = rs18[_FRAC + 1]                                    # then the fraction bits are 0
        y = Signal(32, name="y19", reset_less=True)
        with m.If(nan18):
            m.d.sync += y.eq(QNAN)
        with m.Elif(Mux(carry, inf18[1], inf18[0])):
            m.d.sync += y.eq(INF)
        with m.Elif(Mux(carry, zero18[1], zero18[0])):
            m.d.sync += y.eq(0)
        with m.Else():
            m.d.sync += y.eq(Cat(rs18[:_FRAC], Mux(carry, ef18[1], ef18[0]), C(0, 1)))
        m.d.comb += [self.y.eq(y),
                     self.o_valid.eq(delay(m, self.i_valid, self.latency, name="v", reset_less=False))]
        return m
