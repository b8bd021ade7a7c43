"""Optimal-brain-surgeon compression: SparseGPT N:M pruning and GPTQ quantization in one sweep.

For a linear layer ``y = W x`` with calibration Hessian ``H = E[x x^T]`` the output error
of a change ``dW`` is ``tr(dW H dW^T)``. Sweeping the input columns left to right, each
column is pruned (if the N:M mask drops it) or rounded to its group's INT grid, and the
error it leaves is pushed onto the columns not yet processed through the inverse
Hessian (Frantar & Alistarh: GPTQ, 2022; SparseGPT, 2023). At the start of every quant
group of ``G`` columns the mask is chosen with SparseGPT's score ``w^2 / [H^-1]_jj^2``
on the *updated* weights, and the group scale by a clip search on them.

Scales are binary16 (:mod:`flightllm.hw.formats`); their floor (the smallest magnitude
the tensor's fixed point holds next to its largest scale) is fixed up front from the
original weights with one bit of headroom, because the sweep changes the weights before
later groups get their scale. Symmetric formats only (no min).
"""

from __future__ import annotations

import numpy as np

from ..hw.formats import QTensor, WeightFormat, scale_floor

__all__ = ["obs_compress"]

_CLIPS = np.array([1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7])


_FACTORS: dict = {}


def _inverse_hessian_factor(h: np.ndarray, damp: float) -> np.ndarray:
    """Upper Cholesky factor U of H^-1 (U^T U = H^-1), with dampening for stability.

    Matrices that share an input (q/k/v, gate/up) share the Hessian object, so the
    last few factors are kept, keyed by identity: the factorisation is O(K^3).
    """
    key = (id(h), damp)
    hit = _FACTORS.get(key)
    if hit is not None and hit[0] is h:
        return hit[1]
    u = _factor(h, damp)
    if len(_FACTORS) >= 4:
        _FACTORS.pop(next(iter(_FACTORS)))
    _FACTORS[key] = (h, u)
    return u


def _lower_inverse(m: np.ndarray) -> np.ndarray:
    """Inverse of a lower-triangular matrix by 2x2 block recursion (~K^3/3 flops, all BLAS)."""
    k = m.shape[0]
    if k <= 128:
        return np.linalg.inv(m)
    h = k // 2
    a_inv = _lower_inverse(m[:h, :h])
    d_inv = _lower_inverse(m[h:, h:])
    out = np.zeros_like(m)
    out[:h, :h] = a_inv
    out[h:, h:] = d_inv
    out[h:, :h] = -d_inv @ (m[h:, :h] @ a_inv)
    return out


def _factor(h: np.ndarray, damp: float) -> np.ndarray:
    h = h.astype(np.float64).copy()
    k = h.shape[0]
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    h[np.diag_indices(k)] += damp * np.mean(np.diag(h))
    rev = slice(None, None, -1)
    for attempt in range(5):
        try:
            # With P the order reversal and P H P = M M^T (M lower), U = P M^-1 P is upper
            # and U^T U = H^-1: one Cholesky and one inverse instead of two and two.
            m = np.linalg.cholesky(h[rev, rev])
            return _lower_inverse(m)[rev, rev]
        except np.linalg.LinAlgError:                              # not positive definite: damp more
            h[np.diag_indices(k)] += damp * np.mean(np.diag(h)) * 10 ** attempt
    raise ValueError("calibration Hessian is singular even after dampening")


def obs_compress(w: np.ndarray, fmt: WeightFormat, hessian: np.ndarray, damp: float = 0.01):
    """Prune and quantize ``w`` (N, K) minimising the Hessian-weighted output error.

    Returns a :class:`~flightllm.hw.formats.QTensor` (values symmetric in +-(2**(B-1) - 1)).
    """
    if fmt.has_min:
        raise ValueError(f"OBS compression supports symmetric formats, not {fmt.name}")
    n, k = w.shape
    g = fmt.group_size
    W = w.astype(np.float64).copy()
    dead = np.diag(hessian) == 0
    W[:, dead] = 0.0
    U = _inverse_hessian_factor(hessian, damp)
    qmax = (1 << (fmt.bits - 1)) - 1
    top = 2.0 * np.abs(W).max() / qmax
    floor = scale_floor(top)
    q = np.zeros((n, k), np.int8)
    scale = np.zeros((n, k // g), np.float16)
    mask = np.ones((n, k), bool)
    for g0 in range(0, k, g):
        sl = slice(g0, g0 + g)
        W1 = W[:, sl].copy()
        U1 = U[sl, sl]
        if not fmt.dense:
            score = (W1 ** 2 / np.diag(U1)[None, :] ** 2).reshape(n, g // fmt.m, fmt.m)
            keep = np.argsort(-score, axis=2, kind="stable")[..., :fmt.n_keep]
            m1 = np.zeros(score.shape, bool)
            np.put_along_axis(m1, keep, True, axis=2)
            mask[:, sl] = m1.reshape(n, g)
        m1 = mask[:, sl]
        # Group scale: the clip ratio with least diag-weighted rounding error on the current weights.
        kept = np.where(m1, W1, 0.0)
        amax = np.abs(kept).max(axis=1)
        wdiag = 1.0 / np.diag(U1) ** 2
        best, best_err = None, None
        for c in _CLIPS if fmt.bits < 8 else _CLIPS[:1]:
            mt = np.maximum(amax * c / qmax, np.where(amax > 0, floor, 0.0)).astype(np.float16)
            s = mt.astype(np.float64)[:, None]
            with np.errstate(divide="ignore", invalid="ignore"):
                rq = np.where(s > 0, np.clip(np.rint(kept / s), -qmax, qmax) * s, 0.0)
            err = (((rq - kept) ** 2) * wdiag[None, :]).sum(axis=1)
            if best is None:
                best, best_err = mt, err
            else:
                better = err < best_err
                best, best_err = np.where(better, mt, best), np.where(better, err, best_err)
        scale[:, g0 // g] = best
        s = best.astype(np.float64)
        inv_s = np.where(s > 0, 1.0 / np.where(s > 0, s, 1.0), 0.0)
        E1 = np.zeros((n, g))
        for j in range(g):
            col = W1[:, j]
            qi = np.where(m1[:, j], np.clip(np.rint(col * inv_s), -qmax, qmax), 0.0)
            q[:, g0 + j] = qi.astype(np.int8)
            err = (col - qi * s) / U1[j, j]
            W1[:, j:] -= np.outer(err, U1[j, j:])
            E1[:, j] = err
        W[:, g0 + g:] -= E1 @ U[sl, g0 + g:]
    return QTensor(fmt, q, scale, None, None if fmt.dense else mask)
