"""Exact arithmetic of the matrix engine (MPE): the specification the RTL is held to.

Every rounding and saturation point of the MPE path is here, written once; the
golden model calls these kernels and the cocotb testbenches compare the RTL with
them bit for bit.

MPE arithmetic (per token ``t`` and output row ``n``)
-----------------------------------------------------
Inputs: the requantized activations of :func:`flightllm.runtime.sfu.requantize_groups`,
INT8 ``x`` in ``[-127, 127]`` with one unsigned ``act_factor_bits`` (8) factor ``u[g]``
per quant group of the weight format (and one float32 vector scale ``A``); the weights
``q`` (INT8-widened values of the packed format, 0 where pruned) with their group scale
and min as the hardware's fixed-point integers ``S``, ``M``
(:func:`flightllm.hw.formats.to_fixed`, ``M = 0`` without a min).

1. ``psum[g] = sum_{k in g} q[n, k] * x[k]``: exact (``|psum| <= kept * 127 * 128``).
2. ``xsum[g] = sum_{k in g} x[k]``: once per vector, shared by every row.
3. ``acc = sum_g u[g] * (psum[g] * S[n, g] + xsum[g] * M[n, g])`` in a two's-complement
   ``acc_bits`` (64) register that wraps. The activation factor enters every group, so
   an outlier in one group costs the others no precision (per-vector INT8 cost +3.1%
   perplexity on SmolLM2, this +0.3%: ``docs/numerics.md``).
4. Output (in the SFU): ``float32(acc) * float32(ldexp(A, -shift))``, ``acc`` rounded
   once to float32.

Evaluation
----------
:func:`mpe_reference` is the oracle (Python integers, slow); the golden model evaluates
the same sums exactly in int64 on weights kept packed, in
:mod:`flightllm.runtime.native` (``tests/test_native.py`` holds the two equal).
"""

from __future__ import annotations

import numpy as np

from ..hw.params import ACT_MAX

__all__ = ["ACT_MAX", "wrap_signed", "mpe_reference", "group_sums"]


def wrap_signed(v, bits: int) -> np.ndarray:
    """Two's-complement wrap of integers to ``bits`` (what a fixed-width register does)."""
    if not 2 <= bits <= 64:
        raise ValueError(f"register width {bits} outside 2..64")
    v = np.asarray(v, dtype=np.int64)
    if bits == 64:
        return v                          # int64 arithmetic already wrapped
    half = np.int64(1) << (bits - 1)
    return ((v + half) & ((np.int64(1) << bits) - 1)) - half


def group_sums(x: np.ndarray, group_size: int) -> np.ndarray:
    """``xsum``: (..., K) int8 -> (..., K // G) int64 sums of each group."""
    x = np.asarray(x, np.int64)
    return x.reshape(x.shape[:-1] + (x.shape[-1] // group_size, group_size)).sum(axis=-1)


def mpe_reference(q, S, M, x, u, group_size: int, acc_bits: int = 64) -> np.ndarray:
    """The accumulators by plain integer arithmetic (Python ints): the oracle.

    ``q`` (N, K) int8, ``S``/``M`` (N, K//G) ints (``M`` None: no min), ``x`` (T, K) int8,
    ``u`` (T, K//G) uint8 -> (T, N) int64.
    """
    q = np.asarray(q, np.int64)
    n, k = q.shape
    g = group_size
    x = np.atleast_2d(np.asarray(x, np.int64))
    u = np.atleast_2d(np.asarray(u, np.int64))
    ps = np.einsum("ngk,tgk->tng", q.reshape(n, k // g, g), x.reshape(x.shape[0], k // g, g))
    terms = ps.astype(object) * np.asarray(S, np.int64).astype(object)[None]
    if M is not None:
        terms = terms + group_sums(x, g).astype(object)[:, None, :] * np.asarray(M, np.int64).astype(object)[None]
    acc = (terms * u.astype(object)[:, None, :]).sum(axis=-1)
    half = 1 << (acc_bits - 1)
    return np.vectorize(lambda a: ((a + half) % (1 << acc_bits)) - half, otypes=[object])(acc).astype(np.int64)
