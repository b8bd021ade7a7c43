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
that step exactly too. :func:`mpe_matmul` relies on both facts and asserts their
preconditions.
"""

from __future__ import annotations

import numpy as np

__all__ = ["ACT_MAX", "wrap_signed", "mpe_psums", "mpe_scale_accumulate", "mpe_matmul",
           "prepare_weights"]

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


def prepare_weights(q: np.ndarray, group_size: int) -> np.ndarray:
    """Weights laid out for :func:`mpe_matmul`: (K//G, N, G) float32, done once per tensor."""
    n, k = q.shape
    if group_size > 1024:
        raise ValueError(f"group size {group_size} > 1024 breaks the exact float32 group sum")
    return np.ascontiguousarray(q.astype(np.float32).reshape(n, k // group_size, group_size).transpose(1, 0, 2))


def mpe_matmul(wg: np.ndarray, scales: np.ndarray, x: np.ndarray, acc_bits: int = 48) -> np.ndarray:
    """Fast exact MPE result for MV (x: (K,)) or MM (x: (T, K)).

    Parameters
    ----------
    wg : float32 (K//G, N, G) from :func:`prepare_weights`
    scales : uint16 (N, K//G)
    x : int8 (K,) or (T, K), values in [-127, 127]

    Returns
    -------
    int64 (N,) or (T, N): the wrapped ``acc_bits`` accumulator of every row.
    """
    ng, n, g = wg.shape
    if ng > 1 << 13:
        raise ValueError(f"{ng} quant groups exceed the exact float64 range of the fast path")
    single = x.ndim == 1
    xt = np.asarray(x, dtype=np.float32).reshape(-1, ng, g).transpose(1, 2, 0)    # (ng, G, T)
    ps = np.matmul(wg, xt)                                                          # (ng, N, T) exact
    acc = np.einsum("gnt,ng->tn", ps.astype(np.float64), scales.astype(np.float64))  # exact < 2**53
    out = wrap_signed(acc.astype(np.int64), acc_bits)
    return out[0] if single else out
