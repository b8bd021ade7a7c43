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

Fast exact evaluation
---------------------
Each group sum of int8 x int8 products stays below ``2**24`` for groups up to 1024, so
a float32 BLAS matmul per group is exact in any order. The rest runs in float64, exact
while every partial sum stays below ``2**53``: :class:`MpeWeights` computes the largest
``|acc|`` any activation can give from the tensor's own ``|q|``, ``|S|`` and ``|M|``, and
:func:`mpe_accumulate` falls back to exact int64 arithmetic (which wraps at 64 bits
exactly as the register does) when that bound is not below ``2**53``. Real tensors stay
on the fast path (SmolLM2: below ``2**50``).
"""

from __future__ import annotations

import numpy as np

from ..hw.params import ACT_MAX

__all__ = ["ACT_MAX", "wrap_signed", "mpe_reference", "MpeWeights", "prepare_weights",
           "mpe_accumulate", "group_sums"]

_EXACT = float(1 << 53)


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


class MpeWeights:
    """A weight tensor prepared for :func:`mpe_accumulate` (once per tensor).

    ``wg`` float32 (K//G, N, G): the int8 values, exact; ``S``, ``M`` float64 (K//G, N)
    (``M`` None without a min); ``Si``, ``Mi`` the same as int64; ``bound``: the largest
    ``|acc|`` any activation in [-127, 127] with factors up to ``2**factor_bits - 1`` gives.
    """
    __slots__ = ("n", "k", "g", "ng", "wg", "S", "M", "Si", "Mi", "qi", "bound")

    def __init__(self, q: np.ndarray, S: np.ndarray, M: np.ndarray | None, group_size: int,
                 factor_bits: int = 8):
        q = np.asarray(q)
        n, k = q.shape
        g = group_size
        if g > 1024:
            raise ValueError(f"group size {g} > 1024 breaks the exact float32 group sum")
        if k % g or np.shape(S) != (n, k // g) or (M is not None and np.shape(M) != (n, k // g)):
            raise ValueError(f"weights {q.shape} / scales {np.shape(S)} do not fit group size {g}")
        ng = k // g
        self.n, self.k, self.g, self.ng = n, k, g, ng
        self.qi = np.asarray(q, np.int8)
        self.wg = np.ascontiguousarray(q.astype(np.float32).reshape(n, ng, g).transpose(1, 0, 2))
        self.Si = np.ascontiguousarray(np.asarray(S, np.int64).T)
        self.S = self.Si.astype(np.float64)
        self.Mi = None if M is None else np.ascontiguousarray(np.asarray(M, np.int64).T)
        self.M = None if M is None else self.Mi.astype(np.float64)
        umax = (1 << factor_bits) - 1
        qabs = np.abs(self.qi.astype(np.int64)).reshape(n, ng, g).sum(axis=-1)             # (N, ng)
        b = (qabs * np.abs(self.Si.T)).astype(np.float64)
        if self.Mi is not None:
            b = b + float(g) * np.abs(self.Mi.T)
        self.bound = float(b.sum(axis=-1).max(initial=0.0)) * ACT_MAX * umax


def prepare_weights(q, S, M, group_size: int, factor_bits: int = 8) -> MpeWeights:
    """int8 ``q`` (N, K) and fixed-point ``S``, ``M`` (N, K//G) laid out for :func:`mpe_accumulate`."""
    return MpeWeights(q, S, M, group_size, factor_bits)


def mpe_accumulate(w: MpeWeights, x: np.ndarray, u: np.ndarray, acc_bits: int = 64) -> np.ndarray:
    """The wrapped ``acc_bits`` accumulators (float64 if exact, else int64) of (T, N).

    ``x`` int8 (T, K) in [-127, 127], ``u`` (T, K//G) unsigned factors.
    """
    ng, g, t = w.ng, w.g, x.shape[0]
    uf = np.asarray(u, np.float64).T                                                   # (ng, T)
    if w.bound < _EXACT and acc_bits >= 54:
        xf = np.asarray(x, dtype=np.float32)
        if t == 1:
            ps = np.matmul(w.wg, xf.reshape(ng, g, 1))[..., 0].astype(np.float64)      # (ng, N) exact
            term = ps * w.S
            if w.M is not None:
                term += group_sums(x[0], g).astype(np.float64)[:, None] * w.M
            return (uf[:, 0] @ term)[None]                                             # (1, N) exact
        ps = np.matmul(w.wg, np.ascontiguousarray(xf.reshape(t, ng, g).transpose(1, 2, 0)))   # (ng, N, T)
        term = ps.astype(np.float64) * w.S[:, :, None]
        if w.M is not None:
            term += group_sums(x, g).T.astype(np.float64)[:, None, :] * w.M[:, :, None]
        return np.einsum("gnt,gt->tn", term, uf)
    # exact integer path: int64 arithmetic wraps at 64 bits like the register
    xi = np.asarray(x, np.int64).reshape(t, ng, g)
    ps = np.einsum("gnk,tgk->tgn", w.qi.astype(np.int64).reshape(w.n, ng, g).transpose(1, 0, 2), xi)   # (T, ng, N)
    with np.errstate(over="ignore"):
        term = ps * w.Si[None]
        if w.Mi is not None:
            term = term + group_sums(x, g)[:, :, None] * w.Mi[None]
        acc = (term * np.asarray(u, np.int64)[:, :, None]).sum(axis=1)
    return acc if acc_bits == 64 else wrap_signed(acc, acc_bits)
