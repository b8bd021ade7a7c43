"""The matrix engine's output conversion: integer accumulators to float32.

Every MPE operation ends in float32 (``runtime/sfu.py``): an MV/MM result is
``float32(acc) * float32(ldexp(A, -shift))`` (``mpe_to_float``), a PV result
``float32(acc) * scale`` and a QK score ``(float32(acc) * q_scale) * k_scale``
(``qk_scores``). One lane per accumulator does all three as the same pipeline::

    acc (signed acc_bits) --I2F--> * s1 --FMul--> * s2 --FMul--> y

with ``s2 = 1.0`` (exact) outside QK. ``ldexp(A, -shift)`` is itself one FMul of ``A`` by the
power of two ``2^-shift``, which rounds exactly as ``ldexp`` does (:func:`pow2_bits`), so the
sequencer computes ``s1`` per row on the same kind of unit.
"""

from amaranth import Module
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out
from amaranth import signed

from .fp32 import I2F, FMul
from .geometry import delay

__all__ = ["MpeOutLane", "pow2_bits"]


def pow2_bits(k: int) -> int:
    """float32 bits of ``2^k`` (normal or subnormal: ``-149 <= k <= 127``)."""
    if not -149 <= k <= 127:
        raise ValueError(f"2^{k} is not a float32")
    return (k + 127) << 23 if k >= -126 else 1 << (k + 149)


class MpeOutLane(wiring.Component):
    """``y = (float32(acc) * s1) * s2`` for one accumulator per cycle.

    Parameters
    ----------
    acc_bits : int
        Accumulator width (``HwParams.acc_bits``).

    Attributes
    ----------
    i_valid : In(1)
    acc : In(signed(acc_bits))
    s1, s2 : In(32)
        float32 bits, with ``acc``.
    o_valid : Out(1)
    y : Out(32)
    latency : int
    """

    def __init__(self, acc_bits: int):
        if not isinstance(acc_bits, int) or not 2 <= acc_bits <= 64:
            raise ValueError(f"acc_bits must be an int in 2..64, not {acc_bits!r}")
        self.acc_bits = acc_bits
        self.latency = I2F.latency + 2 * FMul.latency
        super().__init__({"i_valid": In(1), "acc": In(signed(acc_bits)), "s1": In(32), "s2": In(32),
                          "o_valid": Out(1), "y": Out(32)})

    def elaborate(self, platform):
        m = Module()
        cvt = m.submodules.cvt = I2F(self.acc_bits)
        mul1 = m.submodules.mul1 = FMul()
        mul2 = m.submodules.mul2 = FMul()
        m.d.comb += [cvt.i_valid.eq(self.i_valid), cvt.a.eq(self.acc),
                     mul1.i_valid.eq(cvt.o_valid), mul1.a.eq(cvt.o),
                     mul1.b.eq(delay(m, self.s1, I2F.latency, name="s1")),
                     mul2.i_valid.eq(mul1.o_valid), mul2.a.eq(mul1.o),
                     mul2.b.eq(delay(m, self.s2, I2F.latency + FMul.latency, name="s2")),
                     self.o_valid.eq(mul2.o_valid), self.y.eq(mul2.o)]
        return m
