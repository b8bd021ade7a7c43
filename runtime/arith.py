"""Exact arithmetic of the matrix engine (MPE): the specification the RTL is held to.

Every rounding and saturation point of the MPE path is here, written once; the
golden model calls these kernels and the cocotb testbenches compare the RTL with
them bit for bit.

MPE arithmetic (per output row ``n``)
------------------------------------
1. Activations ``x`` are INT8 in ``[-127, 127]`` (the requantizer never emits -128).
2. Weights ``q`` are the INT8-widened values of the packed format (zero where pruned).
3. Per quant group ``g`` of ``G`` inputs: ``psum[n, g] = sum_k q[n, gG+k] * x[gG+k]``,
   an int32. ``|psum| <= G * 127 * 127 < 2**31`` for any G <= 2**17, so it never
   wraps; the RTL keeps ``psum_bits`` = 32.
4. Scaled accumulation: ``acc[n] = sum_g psum[n, g] * scale[n, g]`` with the uint16
   scale mantissa, in a two's-complement ``acc_bits`` (48) register that wraps
   (the DSP48E2 P register). Real LLaMA shapes stay far below 2**47.
5. Output: ``acc`` as a signed integer; the SFU turns it into float32 as
   ``float32(acc) * float32(x_scale * 2**-shift)`` (see :mod:`flightllm.runtime.sfu`).

Fast exact evaluation
---------------------
Each product is an integer of magnitude <= 127*127 = 16129 and a group sum stays
below ``G * 16129 < 2**24`` for G <= 1024, so a float32 BLAS matmul over one group
is exact whatever order it sums in. The group sums times the uint16 scales are
below 2**40 and their sum over K/G <= 2**13 groups below 2**53, so float64 does
that step exactly too. :class:`MpeWeights` checks both preconditions.

The fast path hands BLAS contiguous operands: the weights once as float32
(K//G, N, G) (:class:`MpeWeights`), the activations as (K//G, G, T), so numpy runs
one strided-batch GEMV/GEMM per group at memory speed; the scales are kept as float64
(K//G, N). :func:`mpe_accumulate` returns the accumulators as exact float64 integers
(what the SFU's int48 -> float32 conversion starts from); the wrap to ``acc_bits``
is checked only for a tensor whose worst case could leave the register (never for
real shapes), so the common path has no int64 round trip.

Measured alternatives (SmolLM2 shapes, one core): a dense float64 GEMV with
``W_eff = q * scale`` (exact: |q*s| < 2**23, times |x| <= 127 < 2**30, summed over
K < 2**53) reads twice the bytes and is ~1.8x slower; int8 weights converted to
float32 one cache-sized block at a time read a quarter of the bytes but pay the
conversion and ``K//G`` small BLAS calls per block: 1.2-2x slower; an int32
``einsum`` over int8 operands, 2.5x slower.
"""

from __future__ import annotations

import numpy as np

__all__ = ["ACT_MAX", "wrap_signed", "mpe_psums", "mpe_scale_accumulate", "mpe_matmul",
           "mpe_accumulate", "MpeWeights", "prepare_weights"]

ACT_MAX = 127


def wrap_signed(v: np.ndarray, bits: int) -> np.ndarray:
    """Two's-complement wrap of int64 values to ``bits`` (what a fixed-width register does)."""
    v = np.asarray(v, dtype=np.int64)
    half = np.int64(1) << (bits - 1)
    return ((v + half) & ((np.int64(1) << bits) - 1)) - half


def mpe_psums(q: np.ndarray, x: np.ndarray, group_size: int) -> np.ndarray:
    """Reference int32 group partial sums, by plain integer arithmetic.

    ``q`` (N, K) int8, ``x`` (K,) or (T, K) int8 -> (N, K//G) or (T, N, K//G) int64.
    Slow and obvious: the oracle the fast path and the RTL are tested against.
    """
    q = np.asarray(q, dtype=np.int64)
    x = np.asarray(x, dtype=np.int64)
    n, k = q.shape
    qg = q.reshape(n, k // group_size, group_size)
    if x.ndim == 1:
        return np.einsum("ngk,gk->ng", qg, x.reshape(k // group_size, group_size))
    return np.einsum("ngk,tgk->tng", qg, x.reshape(x.shape[0], k // group_size, group_size))


def mpe_scale_accumulate(psums: np.ndarray, scales: np.ndarray, acc_bits: int = 48) -> np.ndarray:
    """Reference scaled accumulation: ``sum_g psum * scale`` wrapped to ``acc_bits``."""
    return wrap_signed((np.asarray(psums, np.int64) * scales.astype(np.int64)).sum(axis=-1), acc_bits)


class MpeWeights:
    """A weight tensor prepared for :func:`mpe_accumulate` (done once per tensor).

    ``wg`` float32 (K//G, N, G): the int8 values, exact; ``st`` float64 (K//G, N): the
    uint16 scales; ``bound``: the largest ``|acc|`` any activation in [-127, 127] can give.
    """
    __slots__ = ("n", "k", "g", "ng", "wg", "st", "bound")

    def __init__(self, q: np.ndarray, scales: np.ndarray, group_size: int):
        n, k = q.shape
        g = group_size
        if g > 1024:
            raise ValueError(f"group size {g} > 1024 breaks the exact float32 group sum")
        if k % g or scales.shape != (n, k // g):
            raise ValueError(f"weights {q.shape} / scales {scales.shape} do not fit group size {g}")
        ng = k // g
        if ng > 1 << 13:
            raise ValueError(f"{ng} quant groups exceed the exact float64 range of the fast path")
        self.wg = np.ascontiguousarray(q.astype(np.float32).reshape(n, ng, g).transpose(1, 0, 2))
        self.st = np.ascontiguousarray(np.asarray(scales).T, dtype=np.float64)
        self.n, self.k, self.g, self.ng = n, k, g, ng
        qabs = np.abs(np.asarray(q, np.int16)).reshape(n, ng, g).sum(axis=-1, dtype=np.int64)
        self.bound = int((qabs * np.asarray(scales, np.int64)).sum(axis=-1).max(initial=0)) * ACT_MAX


def prepare_weights(q: np.ndarray, scales: np.ndarray, group_size: int) -> MpeWeights:
    """``q`` int8 (N, K) and uint16 ``scales`` (N, K//G) laid out for :func:`mpe_accumulate`."""
    return MpeWeights(q, scales, group_size)


def mpe_accumulate(w: MpeWeights, x: np.ndarray, acc_bits: int = 48) -> np.ndarray:
    """The wrapped ``acc_bits`` accumulators as exact float64 integers.

    ``x`` int8 (K,) or (T, K) in [-127, 127]; returns float64 (N,) or (T, N).
    """
    ng, g = w.ng, w.g
    single = x.ndim == 1
    t = 1 if single else x.shape[0]
    xf = np.asarray(x, dtype=np.float32)
    if t == 1:
        ps = np.matmul(w.wg, xf.reshape(ng, g, 1))                                  # (ng, N, 1), exact
        acc = np.einsum("gn,gn->n", ps.reshape(ng, w.n), w.st).reshape(1, w.n)       # exact < 2**53
    else:
        ps = np.matmul(w.wg, np.ascontiguousarray(xf.reshape(t, ng, g).transpose(1, 2, 0)))   # (ng, N, T)
        acc = np.einsum("gnt,gn->tn", ps, w.st)                                      # exact < 2**53
    if w.bound >= 1 << (acc_bits - 1):                 # may wrap (never for real shapes)
        half = float(1 << (acc_bits - 1))
        if not (-half <= acc.min() and acc.max() < half):
            acc = wrap_signed(acc.astype(np.int64), acc_bits).astype(np.float64)
    return acc[0] if single else acc


def mpe_matmul(w: MpeWeights, x: np.ndarray, acc_bits: int = 48) -> np.ndarray:
    """Fast exact MPE result for MV (x: (K,)) or MM (x: (T, K)).

    Parameters
    ----------
    w : :class:`MpeWeights` from :func:`prepare_weights`
    x : int8 (K,) or (T, K), values in [-127, 127]

    Returns
    -------
    int64 (N,) or (T, N): the wrapped ``acc_bits`` accumulator of every row.
    """
    return mpe_accumulate(w, x, acc_bits).astype(np.int64)
