"""Exact arithmetic of the special-function unit (SFU): the specification the RTL is held to.

Number format
-------------
The SFU is IEEE-754 binary32 throughout: add, subtract, multiply, divide and sqrt
are correctly rounded (round to nearest, ties to even), so numpy float32
element-wise operations reproduce an RTL IEEE unit exactly. There is no fused
multiply-add: ``a*b + c`` rounds twice. Subnormal results of ``exp`` are flushed
to zero (see :func:`exp`); everywhere else subnormals are kept (numpy default).
A NaN result is any NaN (its sign and payload are not specified; the RTL makes
0x7FC00000), and a NaN converted to an integer (the requantizers' ``q`` and ``u``)
is 0 (:func:`to_int`).

Reductions (fixed order)
------------------------
A sum over a vector of ``n`` elements uses ``lanes = params.sfu_lanes`` lanes of
``slots = params.sfu_acc_slots`` accumulators each, every accumulator starting at
+0.0: element ``i`` arrives in lane ``i % lanes`` at beat ``b = i // lanes`` and is
added to that lane's slot ``b % slots`` (so consecutive beats of a lane go to
different slots and a pipelined adder accumulates one beat per cycle); each
accumulator adds its elements in arrival order. Then the ``lanes * slots``
accumulators, indexed ``lane * slots + slot``, are combined by a fixed pairwise tree
(``a[i] = a[2i] + a[2i+1]`` until one is left: a lane's slots first, then the
lanes; a non-power-of-two lane count pads with +0.0 lanes). ``max``/``argmax`` are
order independent (argmax takes the lowest index of the maximum).

``requantize`` (QUANT), per row segment of ``seg`` elements::

    absmax = max |x|            (float32)
    scale  = absmax / 127       (float32 division)
    q      = clip(rint(x * (127 / absmax)), -127, 127)   (127/absmax: float32 division,
                                the product rounded to float32, then round half to even)
    absmax == 0  ->  q = 0, scale = 0

``requantize_groups`` (QUANTG: the matrix engine's input), per row, groups of ``g``::

    amax = max |x| over the row;  A = amax / 32385          (32385 = 127 * 255)
    ag   = max |x| over the group
    u    = min(255, ceil(ag * (255 / amax)))                  (0 when ag == 0)
    q    = clip(rint(x * (32385 / (float32(u) * amax))), -127, 127)   (0 when u == 0)

so ``x ~ q * u * A``: one float32 scale per row and an 8-bit factor per group (every
product and quotient a float32 operation, rounded). amax == 0 gives A = 0, u = 0, q = 0.

MPE result to float: ``float32(acc) * float32(ldexp(A, -shift))`` where the int64
``acc`` rounds once to float32.

``rmsnorm``: ``ss = lane_sum(x*x)``, ``ms = ss / float32(n)``, ``r = 1 / sqrt(ms + eps)``,
``y = (x * r) * w``.

``rope`` on adjacent pairs (2i, 2i+1) with the compiler's float32 cos/sin table:
``y0 = x0*c - x1*s``, ``y1 = x0*s + x1*c`` (products rounded, then the sum).

``exp(x)`` (softmax, SiLU) in fixed point: one 24 x 33-bit product, a 256-entry table
and a short polynomial, all exact integer operations (max error 0.8 ulp against the
true exp on normal results; cheaper in hardware than float32 Horner, which had 1.2)::

    NaN -> NaN;  |x| >= 128 -> +inf (x > 0) or 0;  subnormal x -> t = 0
    x = (-1)^s * m * 2^(e - 150)             (m: 24-bit significand, e: biased exponent)
    t = (-1)^s * ((m * LOG2E) >> (156 - e))  (LOG2E = round(log2(e) * 2^32): t = x log2 e, 26 fraction bits)
    k = t >> 26 (floor);  j = bits 25..18 of t;  r = bits 17..0 of t
    a = (r * LN2) >> 8                        (LN2 = round(ln 2 * 2^18); a = r ln 2, 36 fraction bits)
    d = a + (((a >> 10)^2) >> 17)             (2^(r/2^26) - 1 ~ a + a^2/2)
    M = T[j] + (((T[j] >> 4) * d) >> 32)      (T[j] = round(2^(j/256) * 2^30): 2^(frac t), 30 fraction bits)
    significand = M >> 7 rounded half to even (carry to 2^24: halve, k + 1)
    y = significand * 2^(k - 23);  0 if k + 127 <= 0 (flushed below 2^-126), +inf if k + 127 >= 255

``silu_mul``: ``(g / (1 + exp(-g))) * u``.

Attention (one kv head ``g`` and its query heads ``h``; the integer products run on
the matrix engine, :mod:`flightllm.runtime.arith`):

* ``qk_scores``: ``acc = sum_d q[t,h,d] * k[p,d]`` (int8 x int8, exact), then
  ``s = (float32(acc) * q_scale[t,h]) * k_scale[p,g]`` (two float32 products).
* ``softmax_probs`` over row ``t``'s attended positions (``attention_mask``)::

      m = max s;  z = (s - m) * c   (c = float32(1/sqrt(head_dim)));  e = exp(z)   (0 if masked)
      d = lane_sum(e)               (over positions 0 .. n-1, n a multiple of 32)
      w = e * v_scale[p, g]         (the value scale folded into the probability)
      q, A, u = requantize_groups(w, 32);   scale = A / d

  so ``p * v_scale ~ q * u * scale``: the normaliser and the value scale cost nothing
  per output, and the probabilities are quantized per group of 32 positions.
* ``pv``: ``acc = sum_g u[g] * sum_{p in g} q[t,h,p] * v[p,d]`` (exact), output
  ``float32(acc) * scale[t,h]``.

``attention_mask``: row ``t`` attends positions ``p < valid[t]``; with block-sparse
attention (``window > 0``, blocks of :data:`KV_BLOCK` positions) only the blocks
``b < sink`` and ``b > block(valid[t] - 1) - window``.

Embedding gather: ``float32(q) * float32(ldexp(scale, -shift))`` (exact: 8 x 16 bits).
"""

from __future__ import annotations

import numpy as np

from ..compiler.reference import apply_rope
from ..hw.params import ACT_MAX, FACTOR_MAX

__all__ = ["F32", "lane_tree_width", "lane_sum", "to_int", "requantize", "requantize_groups", "FACTOR_MAX", "mpe_scale", "mpe_to_float", "rmsnorm", "rope", "exp", "silu_mul",
           "qk_scores", "softmax_probs", "attention_mask", "KV_BLOCK", "score_scale",
           "argmax", "dequantize"]

KV_BLOCK = 64       #: positions per block of block-sparse attention

F32 = np.float32
#: exp's fixed point (module docstring; the RTL builds from these): fraction bits of
#: t = x log2(e), of the LOG2E constant, of the remainder polynomial's a and of the
#: 2^(j/256) table; the table's index bits; the biased exponent from which |x| >= 128
EXP_T_FRAC, EXP_LOG2E_FRAC, EXP_A_FRAC, EXP_TABLE_FRAC = 26, 32, 36, 30
EXP_J_BITS = 8
EXP_R_BITS = EXP_T_FRAC - EXP_J_BITS
#: a's bits dropped before squaring (its top 18 bits: one DSP) and T's bits dropped
#: before the product with d (a 27-bit multiplier operand)
EXP_H_SHIFT, EXP_T_SHIFT = 10, 4
EXP_BIG_E = 127 + 7
EXP_LOG2E = round(1.4426950408889634 * 2 ** EXP_LOG2E_FRAC)
EXP_LN2 = round(0.6931471805599453 * 2 ** EXP_R_BITS)
EXP_TABLE = np.array([round(2 ** (j / 2 ** EXP_J_BITS) * 2 ** EXP_TABLE_FRAC) for j in range(2 ** EXP_J_BITS)],
                     np.int64)
_Q = F32(ACT_MAX)


_ZERO = F32(0.0)
_INF = F32(np.inf)
_M127 = F32(-ACT_MAX)


def lane_tree_width(lanes: int) -> int:
    """Inputs of the sum tree's lane level: ``lanes`` padded to a power of two with +0.0 lanes."""
    return 1 << max(0, (lanes - 1).bit_length())


def lane_sum(x: np.ndarray, lanes: int, slots: int = 1) -> np.ndarray:
    """Sum over the last axis in the SFU's fixed order (see the module docstring)."""
    x = np.asarray(x, dtype=F32)
    n = x.shape[-1]
    lead = x.shape[:-1]
    block = lanes * slots
    blocks = max(1, -(-n // block))
    if n != blocks * block:                     # absent elements: +0.0, which changes no sum
        x = np.concatenate([x, np.zeros(lead + (blocks * block - n,), F32)], axis=-1)
    # slot s of lane l adds beats s, s + slots, ...: x[(blk * slots + s) * lanes + l];
    # (+0.0 + v0) + v1 ... equals (v0 + v1 ...) + 0.0 (the +0.0 start only turns an
    # all-(-0.0) accumulator into +0.0, and so does the final + 0.0)
    acc = np.add.accumulate(x.reshape(lead + (blocks, slots, lanes)), axis=-3)[..., -1, :, :] + _ZERO
    acc = np.swapaxes(acc, -1, -2).reshape(lead + (block,))              # index lane * slots + slot
    width = lane_tree_width(lanes)
    if width != lanes:
        acc = np.concatenate([acc, np.zeros(lead + ((width - lanes) * slots,), F32)], axis=-1)
    while acc.shape[-1] > 1:
        acc = acc[..., 0::2] + acc[..., 1::2]
    return acc[..., 0]


def to_int(t: np.ndarray, dtype) -> np.ndarray:
    """Integral float32 values already clipped to ``dtype``'s range -> ``dtype``; NaN -> 0."""
    if np.isnan(t).any():
        t = np.where(np.isnan(t), _ZERO, t)
    return t.astype(dtype)


def requantize(x: np.ndarray, seg: int | None = None, qmax: float = 0.0):
    """float32 (..., n) -> (int8 (..., n) in ``[-qmax, qmax]``, float32 scales (..., n // seg)).

    ``qmax`` is QUANT's largest level (0: ``ACT_MAX`` = 127; the INT4 KV cache uses 7)."""
    x = np.asarray(x, dtype=F32)
    q = F32(qmax) if qmax else _Q
    n = x.shape[-1]
    seg = n if not seg else seg
    xs = x.reshape(x.shape[:-1] + (n // seg, seg))
    absmax = np.maximum.reduce(np.abs(xs), axis=-1)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):     # subnormal absmax: inv inf
        inv = q / absmax if absmax.all() else np.where(absmax > 0, q / absmax, _ZERO).astype(F32)
    with np.errstate(invalid="ignore", over="ignore"):
        scale = absmax / q
        t = xs * inv[..., None]
    np.rint(t, out=t)
    np.maximum(t, -q, out=t)                # = clip(t, -q, q), NaN kept as in np.clip
    np.minimum(t, q, out=t)
    return to_int(t, np.int8).reshape(x.shape), scale


_QU = F32(ACT_MAX * FACTOR_MAX)
_U = F32(FACTOR_MAX)


def requantize_groups(x: np.ndarray, g: int):
    """float32 (rows, n) -> (int8 q (rows, n), float32 A (rows,), uint8 u (rows, n // g)).

    The matrix engine's input: ``x ~ q * u * A`` (module docstring, QUANTG)."""
    x = np.asarray(x, dtype=F32)
    rows, n = x.shape
    if n % g:
        raise ValueError(f"requantize_groups: group {g} does not divide the row of {n}")
    ax = np.abs(x)
    amax = np.maximum.reduce(ax, axis=-1)                                    # (rows,)
    ag = np.maximum.reduce(ax.reshape(rows, n // g, g), axis=-1)             # (rows, ng)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        r = np.where(amax > 0, _U / amax, _ZERO).astype(F32)
        u = np.minimum(np.ceil(ag * r[:, None]), _U)                         # float32, exact ints
        inv = np.where(u > 0, _QU / (u * amax[:, None]), _ZERO).astype(F32)
        t = x.reshape(rows, n // g, g) * inv[..., None]
    np.rint(t, out=t)
    np.maximum(t, _M127, out=t)
    np.minimum(t, _Q, out=t)
    return to_int(t, np.int8).reshape(rows, n), (amax / _QU).astype(F32), to_int(u, np.uint8)


def mpe_scale(x_scale: np.ndarray, shift: int) -> np.ndarray:
    """The float32 factor of every output of a row: ``float32(ldexp(A, -shift))``."""
    return np.ldexp(np.asarray(x_scale, dtype=F32), -shift).astype(F32)


def mpe_to_float(acc: np.ndarray, x_scale: np.ndarray, shift: int) -> np.ndarray:
    """Accumulators (T, N) (int64, or float64 holding exact integers) and per-row activation
    scales (T,) -> float32: ``acc`` rounded once to float32, times ``float32(ldexp(A, -shift))``."""
    s = mpe_scale(x_scale, shift)
    a = np.asarray(acc)
    a = a.astype(F32) if a.dtype == np.int64 else a.astype(np.float64).astype(F32)
    return a * s[..., None]


def dequantize(q: np.ndarray, scale: np.ndarray, factors: np.ndarray | None = None) -> np.ndarray:
    """int8 (..., n) with float32 scales (..., n // seg) -> float32; with group ``factors``
    (QUANTG's, one scale per row) ``float32(q * u) * A``."""
    q = np.asarray(q)
    if factors is not None:
        g = q.shape[-1] // factors.shape[-1]
        qu = q.astype(F32).reshape(factors.shape + (g,)) * factors[..., None].astype(F32)
        return qu.reshape(q.shape) * np.asarray(scale, F32).reshape(q.shape[:-1] + (1,))
    seg = q.shape[-1] // scale.shape[-1]
    return (q.astype(F32).reshape(scale.shape + (seg,)) * scale[..., None].astype(F32)).reshape(q.shape)


def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float, lanes: int, slots: int = 1) -> np.ndarray:
    x = np.asarray(x, dtype=F32)
    with np.errstate(all="ignore"):          # inf / NaN inputs follow IEEE
        ss = lane_sum(x * x, lanes, slots)
        ms = ss / F32(x.shape[-1])
        r = F32(1.0) / np.sqrt(ms + F32(eps))
        return (x * r[..., None]) * np.asarray(w, dtype=F32)


# RoPE is four float32 products and two sums per pair, each correctly rounded, so the
# float reference's function *is* the SFU's: one definition serves both.
rope = apply_rope


def exp(x: np.ndarray) -> np.ndarray:
    """float32 exp by the documented fixed-point algorithm (module docstring)."""
    x = np.ascontiguousarray(x, dtype=F32)
    b = x.view(np.uint32).astype(np.int64)
    neg, e = b >> 31, (b >> 23) & 0xFF
    m = (b & 0x7FFFFF) | (1 << 23)
    # t = x log2 e: m * 2^(e-150) * LOG2E * 2^-32 with EXP_T_FRAC fraction bits (e < EXP_BIG_E: shift >= 23)
    mag = (m * EXP_LOG2E) >> np.clip(150 + EXP_LOG2E_FRAC - EXP_T_FRAC - e, 0, 63)
    mag[e == 0] = 0                                          # zero and subnormal x: t = 0
    t = np.where(neg == 1, -mag, mag)
    k = t >> EXP_T_FRAC
    j = (t >> EXP_R_BITS) & ((1 << EXP_J_BITS) - 1)
    # a = r ln 2 (r: the low EXP_R_BITS of t), then d = a + a^2 / 2, EXP_A_FRAC fraction bits
    a = ((t & ((1 << EXP_R_BITS) - 1)) * EXP_LN2) >> (EXP_T_FRAC + EXP_R_BITS - EXP_A_FRAC)
    h = a >> EXP_H_SHIFT
    d = a + ((h * h) >> (2 * (EXP_A_FRAC - EXP_H_SHIFT) - EXP_A_FRAC + 1))
    T = EXP_TABLE[j]                                         # 2^(j/256), EXP_TABLE_FRAC fraction bits
    M = T + (((T >> EXP_T_SHIFT) * d) >> (EXP_TABLE_FRAC - EXP_T_SHIFT + EXP_A_FRAC - EXP_TABLE_FRAC))
    cut = EXP_TABLE_FRAC - 23                                # to 24 significant bits, half to even
    sig = M >> cut
    rem = M & ((1 << cut) - 1)
    half = 1 << (cut - 1)
    sig += (rem > half) | ((rem == half) & ((sig & 1) == 1))
    carry = sig >> 24
    sig >>= carry
    ef = k + carry + 127
    bits = (ef << 23) | (sig & 0x7FFFFF)
    bits[ef <= 0] = 0
    bits[(ef >= 255) | ((e >= EXP_BIG_E) & (neg == 0))] = 0x7F800000
    bits[(e >= EXP_BIG_E) & (neg == 1)] = 0
    y = bits.astype(np.uint32).view(F32)
    nan = np.isnan(x)
    if nan.any():
        y[nan] = x[nan]
    return y


def silu_mul(g: np.ndarray, u: np.ndarray) -> np.ndarray:
    g = np.asarray(g, dtype=F32)
    d = exp(-g)
    with np.errstate(all="ignore"):
        d += F32(1.0)
        r = g / d
        r *= np.asarray(u, dtype=F32)
    return r


def score_scale(head_dim: int) -> float:
    """``c = float32(1 / sqrt(head_dim))``: SOFTMAX's score scale (its instruction field)."""
    return float(np.float32(1.0 / np.sqrt(float(head_dim))))


def qk_scores(acc: np.ndarray, qs: np.ndarray, ks: np.ndarray) -> np.ndarray:
    """int ``acc`` (T, rep, P) of one kv head, query scales ``qs`` (T, rep), key scales
    ``ks`` (P,) -> float32 scores (T, rep, P)."""
    return (np.asarray(acc).astype(F32) * np.asarray(qs, F32)[..., None]) * np.asarray(ks, F32)


def attention_mask(valid: np.ndarray, n: int, sink: int = 0, window: int = 0) -> np.ndarray:
    """bool (T, n): row ``t`` attends position ``p`` (module docstring)."""
    valid = np.asarray(valid, np.int64)
    p = np.arange(n)
    m = p[None, :] < valid[:, None]
    if window:
        blk = p // KV_BLOCK
        own = (valid - 1) // KV_BLOCK
        m &= (blk[None, :] < sink) | (blk[None, :] > own[:, None] - window)
    return m


def softmax_probs(s: np.ndarray, mask: np.ndarray, vs: np.ndarray, c: float, lanes: int, slots: int = 1):
    """Scores ``s`` (T, rep, n) float32, ``mask`` (T, n), value scales ``vs`` (n,), score
    scale ``c`` -> ``(q int8 (T, rep, n), scale float32 (T, rep), u (T, rep, n // 32))``."""
    s = np.asarray(s, F32)
    t, rep, n = s.shape
    mk = np.broadcast_to(np.asarray(mask, bool)[:, None, :], s.shape)
    m = np.where(mk, s, F32(-np.inf)).max(axis=-1, keepdims=True)
    with np.errstate(all="ignore"):          # inf / NaN scores follow IEEE
        z = np.where(mk, (s - m) * F32(c), F32(0))
        e = np.where(mk, exp(z), F32(0))
        d = lane_sum(e, lanes, slots)
        w = e * np.asarray(vs, F32)
        q, a, u = requantize_groups(w.reshape(t * rep, n), 32)
        scale = (a / d.reshape(-1)).astype(F32)
    return q.reshape(t, rep, n), scale.reshape(t, rep), u.reshape(t, rep, n // 32)


def argmax(x: np.ndarray) -> np.ndarray:
    return np.argmax(x, axis=-1)
