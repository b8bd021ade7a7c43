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

``softmax`` over the first ``n`` entries of a row (the rest become 0):
``m = max``, ``e = exp(s - m)``, ``d = lane_sum(e)``, ``p = e / d``.

Attention ``qk``: int8 q (one scale per head) . int8 k (one scale per position and kv
head) summed exactly as int32, then ``((float32(acc) * q_scale) * k_scale) * c`` with
``c = float32(1/sqrt(head_dim))``. ``pv``: ``a = a + p * (float32(v) * v_scale)``,
sequentially in position order, the accumulator starting at +0.0.

Embedding gather: ``float32(q) * float32(ldexp(scale, -shift))`` (exact: 8 x 16 bits).
"""

from __future__ import annotations

import numpy as np

from ..compiler.reference import apply_rope
from ..hw.params import ACT_MAX, FACTOR_MAX

__all__ = ["F32", "lane_sum", "requantize", "requantize_groups", "FACTOR_MAX", "mpe_to_float", "rmsnorm", "rope", "exp", "silu_mul",
           "softmax_rows", "qk_scores", "pv_accumulate", "argmax", "dequantize"]

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


def requantize(x: np.ndarray, seg: int | None = None):
    """float32 (..., n) -> (int8 (..., n), float32 scales (..., n // seg))."""
    x = np.asarray(x, dtype=F32)
    n = x.shape[-1]
    seg = n if not seg else seg
    xs = x.reshape(x.shape[:-1] + (n // seg, seg))
    absmax = np.maximum.reduce(np.abs(xs), axis=-1)
    if absmax.all():
        inv = _Q / absmax
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            inv = np.where(absmax > 0, _Q / absmax, _ZERO).astype(F32)
    scale = absmax / _Q
    t = xs * inv[..., None]
    np.rint(t, out=t)
    np.maximum(t, _M127, out=t)             # = clip(t, -127, 127), NaN kept as in np.clip
    np.minimum(t, _Q, out=t)
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


def softmax_rows(s: np.ndarray, valid: np.ndarray, lanes: int) -> np.ndarray:
    """s (..., S) float32; entries ``>= valid`` (broadcast over the last axis) are masked."""
    s = np.asarray(s, dtype=F32)
    valid = np.asarray(valid)
    if valid.size and valid.min() >= s.shape[-1]:          # nothing masked (decode): the same values
        m = np.maximum.reduce(s, axis=-1, keepdims=True) if s.shape[-1] else np.full(s.shape[:-1] + (1,), -_INF)
        with np.errstate(invalid="ignore", over="ignore"):
            e = exp(s - m)
            d = lane_sum(e, lanes)
            e /= d[..., None]
        return e
    mask = np.arange(s.shape[-1]) < valid[..., None]
    m = np.where(mask, s, F32(-np.inf)).max(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", over="ignore"):
        e = np.where(mask, exp(np.where(mask, s - m, F32(0))), F32(0))
    d = lane_sum(e, lanes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(mask, e / d[..., None], F32(0)).astype(F32)


def qk_scores(q: np.ndarray, qs: np.ndarray, k: np.ndarray, ks: np.ndarray, c: float) -> np.ndarray:
    """q int8 (T, H, D), qs (T, H); k int8 (P, KVH, D), ks (P, KVH) -> (T, H, P) float32."""
    t, h, d = q.shape
    p, kvh, _ = k.shape
    rep = h // kvh
    # int8 x int8 sums over D <= 1024 stay below 2**24: exact in float32 whatever the order
    acc = np.matmul(q.astype(F32).reshape(t, kvh, rep, d).transpose(1, 0, 2, 3).reshape(kvh, t * rep, d),
                    k.astype(F32).transpose(1, 2, 0))                      # (KVH, T*rep, P)
    acc = acc.reshape(kvh, t, rep, p).transpose(1, 0, 2, 3).reshape(t, h, p)
    ksh = np.repeat(ks.T, rep, axis=0)                                      # (H, P)
    return ((acc * qs[..., None].astype(F32)) * ksh[None].astype(F32)) * F32(c)


def pv_accumulate(a: np.ndarray, p: np.ndarray, v: np.ndarray, vs: np.ndarray, valid=None) -> np.ndarray:
    """a (T, H, D) += sum over positions (in order) of p (T, H, P) * dequant(v (P, KVH, D)).

    ``valid`` (T,): row t only adds positions ``< valid[t]``; each skipped position
    adds +0.0 instead (which changes nothing but a -0.0 sum into +0.0).
    """
    t, h, d = a.shape
    P = p.shape[-1]
    kvh = v.shape[1]
    rep = h // kvh
    if valid is None:
        valid = np.full(t, P)
    valid = np.clip(np.asarray(valid), 0, P)
    nv = int(valid.max(initial=0))            # positions nobody adds are +0.0 for every row
    vd = v[:nv].astype(F32) * vs[:nv, :, None].astype(F32)                  # (nv, KVH, D)
    pp = p[..., :nv].reshape(t, kvh, rep, nv).transpose(3, 0, 1, 2)[..., None].astype(F32)
    prods = (pp * vd[:, None, :, None, :]).reshape(nv, t, h, d)             # (nv, T, H, D)
    if nv and valid.min() < nv:
        keep = np.arange(nv)[:, None] < valid[None, :]                     # (nv, T)
        prods = np.where(keep[:, :, None, None], prods, F32(0))
    out = np.array(a, dtype=F32)
    for i in range(nv):                                                    # in position order
        out += prods[i]
    short = valid < P
    if short.any():
        out = np.where(short[:, None, None], out + F32(0), out)
    return out


def argmax(x: np.ndarray) -> np.ndarray:
    return np.argmax(x, axis=-1)
