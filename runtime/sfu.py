"""Exact arithmetic of the special-function unit (SFU): the specification the RTL is held to.

Number format
-------------
The SFU is IEEE-754 binary32 throughout: add, subtract, multiply, divide and sqrt
are correctly rounded (round to nearest, ties to even), so numpy float32
element-wise operations reproduce an RTL IEEE unit exactly. There is no fused
multiply-add: ``a*b + c`` rounds twice. Subnormal results of ``exp`` are flushed
to zero (see :func:`exp`); everywhere else subnormals are kept (numpy default).

Reductions (fixed order)
------------------------
A sum over a vector of ``n`` elements uses ``lanes = params.sfu_lanes`` lane
accumulators, each starting at +0.0: lane ``j`` adds elements ``j, j+L, j+2L, ...``
in that order; then the lanes are combined by a fixed pairwise tree
(``a[i] = a[2i] + a[2i+1]`` until one is left; ``lanes`` is a power of two, a
non-power-of-two lane count pads with +0.0 lanes). ``max``/``argmax`` are order
independent (argmax takes the lowest index of the maximum).

Operations
----------
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

``exp(x)`` (softmax, SiLU), built from float32 operations only::

    x >= 88.75 -> +inf;  x <= -87.5 -> 0;  NaN -> NaN
    k  = rint(x * LOG2E)                       (float32 product, ties to even)
    f  = (x - k*LN2_HI) - k*LN2_LO             (Cody-Waite; k*LN2_HI is exact)
    p  = P7(f) by Horner, coefficients 1/i! as float32, i = 7 .. 0
    y  = ldexp(p, k), flushed to 0 below 2**-126

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

__all__ = ["F32", "lane_sum", "requantize", "requantize_groups", "FACTOR_MAX", "mpe_to_float", "rmsnorm", "rope", "exp", "silu_mul",
           "qk_scores", "softmax_probs", "attention_mask", "KV_BLOCK", "score_scale",
           "argmax", "dequantize"]

KV_BLOCK = 64       #: positions per block of block-sparse attention

F32 = np.float32
_LOG2E = F32(1.4426950408889634)
_LN2_HI = F32(0.693359375)              # 0x3F318000: 9 significant bits, k*LN2_HI exact
_LN2_LO = F32(-2.12194440e-4)
_POLY = [F32(1.0 / f) for f in (5040.0, 720.0, 120.0, 24.0, 6.0, 2.0, 1.0, 1.0)]   # 1/7! .. 1/0!
_EXP_HI = F32(88.75)
_EXP_LO = F32(-87.5)
_TINY = F32(2.0 ** -126)
_Q = F32(ACT_MAX)


_ZERO = F32(0.0)
_INF = F32(np.inf)
_M127 = F32(-ACT_MAX)


def lane_sum(x: np.ndarray, lanes: int) -> np.ndarray:
    """Sum over the last axis in the SFU's fixed order (see the module docstring)."""
    x = np.asarray(x, dtype=F32)
    n = x.shape[-1]
    lead = x.shape[:-1]
    steps = max(1, -(-n // lanes))
    if n == steps * lanes:
        # lane j: ((x[j] + x[j+L]) + ...) + 0.0 equals (((+0.0 + x[j]) + x[j+L]) + ...): the
        # +0.0 start only turns an all-(-0.0) lane into +0.0, and so does the final + 0.0
        acc = np.add.accumulate(x.reshape(lead + (steps, lanes)), axis=-2)[..., -1, :] + _ZERO
    else:
        flat = np.zeros(lead + ((steps + 1) * lanes,), dtype=F32)       # step 0: the +0.0 start
        flat[..., lanes:lanes + n] = x
        acc = np.add.accumulate(flat.reshape(lead + (steps + 1, lanes)), axis=-2)[..., -1, :]
    width = 1 << max(0, (lanes - 1).bit_length())
    if width != lanes:
        acc = np.concatenate([acc, np.zeros(lead + (width - lanes,), F32)], axis=-1)
    while acc.shape[-1] > 1:
        acc = acc[..., 0::2] + acc[..., 1::2]
    return acc[..., 0]


def requantize(x: np.ndarray, seg: int | None = None, qmax: float = 0.0):
    """float32 (..., n) -> (int8 (..., n) in ``[-qmax, qmax]``, float32 scales (..., n // seg)).

    ``qmax`` is QUANT's largest level (0: ``ACT_MAX`` = 127; the INT4 KV cache uses 7)."""
    x = np.asarray(x, dtype=F32)
    q = F32(qmax) if qmax else _Q
    n = x.shape[-1]
    seg = n if not seg else seg
    xs = x.reshape(x.shape[:-1] + (n // seg, seg))
    absmax = np.maximum.reduce(np.abs(xs), axis=-1)
    if absmax.all():
        inv = q / absmax
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            inv = np.where(absmax > 0, q / absmax, _ZERO).astype(F32)
    scale = absmax / q
    t = xs * inv[..., None]
    np.rint(t, out=t)
    np.maximum(t, -q, out=t)                # = clip(t, -q, q), NaN kept as in np.clip
    np.minimum(t, q, out=t)
    return t.astype(np.int8).reshape(x.shape), scale


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
    return t.astype(np.int8).reshape(rows, n), (amax / _QU).astype(F32), u.astype(np.uint8)


def mpe_to_float(acc: np.ndarray, x_scale: np.ndarray, shift: int) -> np.ndarray:
    """Accumulators (T, N) (int64, or float64 holding exact integers) and per-row activation
    scales (T,) -> float32: ``acc`` rounded once to float32, times ``float32(ldexp(A, -shift))``."""
    s = np.ldexp(np.asarray(x_scale, dtype=F32), -shift).astype(F32)
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


def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float, lanes: int) -> np.ndarray:
    x = np.asarray(x, dtype=F32)
    ss = lane_sum(x * x, lanes)
    ms = ss / F32(x.shape[-1])
    r = F32(1.0) / np.sqrt(ms + F32(eps))
    return (x * r[..., None]) * np.asarray(w, dtype=F32)


# RoPE is four float32 products and two sums per pair, each correctly rounded, so the
# float reference's function *is* the SFU's: one definition serves both.
rope = apply_rope


def exp(x: np.ndarray) -> np.ndarray:
    """float32 exp by the documented range reduction and polynomial."""
    x = np.ascontiguousarray(x, dtype=F32)
    with np.errstate(over="ignore", invalid="ignore", under="ignore"):
        xc = np.maximum(x, _EXP_LO)              # = clip(x, LO, HI), NaN kept
        np.minimum(xc, _EXP_HI, out=xc)
        k = xc * _LOG2E
        np.rint(k, out=k)
        f = xc - k * _LN2_HI
        f -= k * _LN2_LO
        p = f * _POLY[0]                        # = full(POLY[0]) * f
        p += _POLY[1]
        for c in _POLY[2:]:
            p *= f
            p += c
        y = np.ldexp(p, k.astype(np.int32))
        if y.dtype != F32:
            y = y.astype(F32)
        np.copyto(y, _ZERO, where=y < _TINY)
        for m, v in ((x >= _EXP_HI, _INF), (x <= _EXP_LO, _ZERO)):
            if m.any():
                np.copyto(y, v, where=m)
        m = np.isnan(x)
        if m.any():
            np.copyto(y, x, where=m)
    return y


def silu_mul(g: np.ndarray, u: np.ndarray) -> np.ndarray:
    g = np.asarray(g, dtype=F32)
    d = exp(-g)
    d += F32(1.0)
    with np.errstate(over="ignore"):
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


def softmax_probs(s: np.ndarray, mask: np.ndarray, vs: np.ndarray, c: float, lanes: int):
    """Scores ``s`` (T, rep, n) float32, ``mask`` (T, n), value scales ``vs`` (n,), score
    scale ``c`` -> ``(q int8 (T, rep, n), scale float32 (T, rep), u (T, rep, n // 32))``."""
    s = np.asarray(s, F32)
    t, rep, n = s.shape
    mk = np.broadcast_to(np.asarray(mask, bool)[:, None, :], s.shape)
    m = np.where(mk, s, F32(-np.inf)).max(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", over="ignore"):
        z = np.where(mk, (s - m) * F32(c), F32(0))
        e = np.where(mk, exp(z), F32(0))
    d = lane_sum(e, lanes)
    w = e * np.asarray(vs, F32)
    q, a, u = requantize_groups(w.reshape(t * rep, n), 32)
    with np.errstate(invalid="ignore", divide="ignore"):
        scale = (a / d.reshape(-1)).astype(F32)
    return q.reshape(t, rep, n), scale.reshape(t, rep), u.reshape(t, rep, n // 32)


def argmax(x: np.ndarray) -> np.ndarray:
    return np.argmax(x, axis=-1)
