"""Native kernels of the golden model (numba): the MPE's exact integer sums on packed weights.

The arithmetic is :mod:`flightllm.runtime.arith`'s, written once there as the oracle
(:func:`~flightllm.runtime.arith.mpe_reference`); this module evaluates it fast and
exactly, in integers, on weights kept in their packed width instead of float32
(``tests/test_native.py`` holds the two equal on every weight format, on random and on
extreme values).

Why numba: a JIT with wheels for every CPython and NumPy we support (a fresh machine
needs no compiler), which releases the GIL in its kernels (``nogil``) so plain threads
split one large product over both cores. Its own ``prange`` was measured and rejected:
with it LLVM stopped vectorizing the inner loop (3-5 GMAC/s against 15 serial).

Weight layout (:class:`PackedMpe`): blocks of ``B = 256`` output rows (the last one
padded with zero rows), each block contiguous with its rows innermost, so the inner loop
runs across output rows (one SIMD lane per row, the activation broadcast):

* up to 4 bits: ``w`` uint8 ``(N/B, K/G, G/2, B)``; byte ``[b, g, j, i]`` holds element
  ``j`` of group ``g`` of row ``b B + i`` in its low nibble and element ``j + G/2`` in its
  high nibble, both as ``q - qmin`` (0..15); the min term carries ``qmin * S`` (below).
* 5 to 8 bits: ``w`` int8 ``(N/B, K/G, G, B)``, the values themselves.
* ``S``, ``M`` int32 ``(N/B, K/G, B)``: the fixed-point scale and min (27 bits signed,
  :data:`flightllm.hw.formats.SCALE_FIXED_BITS`), the min plus ``qmin * S`` for nibbles
  stored as ``q - qmin``; no min and no offset: ``M`` is None.

Per token ``t``, row ``n``: ``psum`` in int32 (at most ``G * 255 * 127``), then
``acc += (u[g] psum) S + (u[g] xsum[g]) M`` in int64 (``u psum`` in int32 while it fits: one
32 x 32 -> 64-bit multiply per term), which wraps at 64 bits exactly as the
``acc_bits = 64`` register does: every step is a ring operation mod 2**64, so the
reordering changes nothing (narrower registers: :func:`~flightllm.runtime.arith.wrap_signed`
afterwards).
"""

from __future__ import annotations

import functools
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def _target_generic_cpu() -> None:
    """Compile for the host's instruction set with LLVM's generic CPU model.

    numba names the host CPU model by default, and LLVM's tuning for AVX-512 server parts
    keeps vectors at 256 bits; with the generic model and the same features the kernels
    use 512-bit vectors: SmolLM2 decode measured 22.5-22.9 tok/s with the host model,
    28.2-30.3 with this (alternating runs, second core shared). numba reads these settings
    once, at its import, so this applies only if nothing imported numba before and the
    user set neither variable. Integer results do not depend on it, and float32 ones do
    not either: without fastmath LLVM does not contract a*b+c into an FMA
    (``tests/test_native.py`` compares every kernel bit for bit with numpy)."""
    if "numba" in sys.modules or "NUMBA_CPU_NAME" in os.environ or "NUMBA_CPU_FEATURES" in os.environ:
        return
    import llvmlite.binding as llvm

    os.environ["NUMBA_CPU_NAME"] = "generic"
    os.environ["NUMBA_CPU_FEATURES"] = llvm.get_host_cpu_features().flatten()


_target_generic_cpu()
from numba import njit  # noqa: E402  (after the target settings above)

from ..hw.params import ACT_MAX, FACTOR_MAX
from .arith import wrap_signed
from .sfu import lane_tree_width, mpe_scale, mpe_to_float
from .sfu import (EXP_A_FRAC, EXP_BIG_E, EXP_H_SHIFT, EXP_J_BITS, EXP_LN2, EXP_LOG2E, EXP_LOG2E_FRAC, EXP_R_BITS,
                  EXP_T_FRAC, EXP_T_SHIFT, EXP_TABLE, EXP_TABLE_FRAC)

__all__ = ["PackedMpe", "pack_mpe", "mpe_acc", "mpe_float", "threads", "requantize_groups", "requantize", "softmax_probs", "softmax_into",
           "lane_sum", "exp", "rmsnorm", "silu_mul"]

#: output rows per block: a block's int32 sums and int64 accumulators stay in L1
_BLOCK = 256
#: below this many MACs a product runs on one thread: a share handed to the pool costs a
#: thread wake-up, and splitting SmolLM2's 0.9M-MAC layer products measured slower
#: (23.5 against 25.2 tok/s with the second core shared); the LM head (28M) gains
_SPLIT_MACS = 4 << 20


def threads() -> int:
    """Threads for large products: ``FLIGHTLLM_THREADS``, else the usable cores (at most 8)."""
    return _threads(os.environ.get("FLIGHTLLM_THREADS"))


@functools.lru_cache(maxsize=4)
def _threads(env) -> int:
    if env:
        n = int(env)
        if n < 1:
            raise ValueError(f"FLIGHTLLM_THREADS={env}: need at least 1")
        return n
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


_pool: ThreadPoolExecutor | None = None


def _executor() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(threads(), thread_name_prefix="flightllm-mpe")
    return _pool


class PackedMpe:
    """One weight tensor laid out for :func:`mpe_acc` (module docstring)."""

    __slots__ = ("n", "k", "g", "ng", "nibbles", "narrow", "w", "S", "M")

    def __init__(self, q: np.ndarray, S: np.ndarray, M: np.ndarray | None, group_size: int):
        q = np.asarray(q)
        if q.ndim != 2:
            raise ValueError(f"weights must be (N, K), not {q.shape}")
        n, k = q.shape
        g = group_size
        if g <= 0 or g % 2 or k % g:
            raise ValueError(f"group size {g} does not divide K={k} into even groups")
        ng = k // g
        if np.shape(S) != (n, ng) or (M is not None and np.shape(M) != (n, ng)):
            raise ValueError(f"scales {np.shape(S)} / mins {np.shape(M)} do not fit {n}x{k} in groups of {g}")
        for name, a in (("scale", S), ("min", M)):
            if a is not None and a.size and (np.min(a) < -(1 << 31) or np.max(a) >= 1 << 31):
                raise ValueError(f"a fixed-point {name} does not fit 32 bits")
        if q.size and (q.min() < -128 or q.max() > 127):
            raise ValueError("weight values outside int8")
        self.n, self.k, self.g, self.ng = n, k, g, ng
        qmin = int(q.min(initial=0))
        self.nibbles = bool(q.size) and int(q.max()) - qmin <= 15
        if not self.nibbles:
            qmin = 0
        # stored values q - qmin: sum(q x) = sum((q - qmin) x) + qmin xsum, so the min term
        # takes qmin S in: psum S + xsum M  =  stored psum S + xsum (M + qmin S)
        S = np.asarray(S, np.int64)
        M = None if M is None and not qmin else (0 if M is None else np.asarray(M, np.int64)) + qmin * S
        if M is not None and M.size and (M.min() < -(1 << 31) or M.max() >= 1 << 31):
            raise ValueError("a fixed-point min (with the values' offset) does not fit 32 bits")
        # u psum and u xsum in int32 (then one 32 x 32 -> 64-bit product each) while they fit
        wmax = 15 if self.nibbles else int(np.abs(q).max(initial=0))
        self.narrow = g * max(wmax, 1) * ACT_MAX * FACTOR_MAX < 1 << 31
        nb = -(-n // _BLOCK)
        pad = nb * _BLOCK - n                       # padding rows: zero weights, outputs dropped

        def blocked(a, dtype):                      # (N, ng, X) -> (blocks, ng, X, _BLOCK)
            a = np.concatenate([a, np.zeros((pad,) + a.shape[1:], a.dtype)]) if pad else a
            return np.ascontiguousarray(a.reshape(nb, _BLOCK, *a.shape[1:]).transpose(0, 2, 3, 1).astype(dtype))

        qg = q.reshape(n, ng, g)
        if self.nibbles:
            v = (qg.astype(np.int16) - qmin).astype(np.uint8)
            self.w = blocked(v[..., :g // 2] | (v[..., g // 2:] << 4), np.uint8)
        else:
            self.w = blocked(qg, np.int8)
        self.S = blocked(S[..., None], np.int32)[:, :, 0]
        self.M = None if M is None else blocked(M[..., None], np.int32)[:, :, 0]

    @property
    def nbytes(self) -> int:
        return self.w.nbytes + self.S.nbytes + (0 if self.M is None else self.M.nbytes)


def pack_mpe(q, S, M, group_size: int) -> PackedMpe:
    """int8 ``q`` (N, K) and fixed-point ``S``, ``M`` (N, K//G) laid out for :func:`mpe_acc`."""
    return PackedMpe(q, S, M, group_size)


@njit(nogil=True, cache=True)
def _xsums(x, ng, G):
    T = x.shape[0]
    xs = np.zeros((T, ng), np.int64)
    for t in range(T):
        for g in range(ng):
            s = 0
            for j in range(G):
                s += x[t, g * G + j]
            xs[t, g] = s
    return xs


@njit(nogil=True, cache=True)
def _finish(acc, ps, xs_g, u_g, Sg, Mg, has_m, narrow):
    """``acc += u (psum S + xsum M)`` over a block's rows; ``narrow``: ``u psum`` and
    ``u xsum`` fit int32, so each product is one 32 x 32 -> 64-bit multiply."""
    if narrow:
        u32 = np.int32(u_g)
        uxs = np.int64(np.int32(u32 * np.int32(xs_g)))
        if has_m:
            for i in range(acc.size):
                acc[i] += np.int64(np.int32(u32 * ps[i])) * np.int64(Sg[i]) + uxs * np.int64(Mg[i])
        else:
            for i in range(acc.size):
                acc[i] += np.int64(np.int32(u32 * ps[i])) * np.int64(Sg[i])
    elif has_m:
        for i in range(acc.size):
            acc[i] += u_g * (np.int64(ps[i]) * np.int64(Sg[i]) + xs_g * np.int64(Mg[i]))
    else:
        for i in range(acc.size):
            acc[i] += u_g * (np.int64(ps[i]) * np.int64(Sg[i]))


@njit(nogil=True, cache=True)
def _acc(w, S, M, has_m, nibbles, narrow, x, u, xs, out, to_float, scale, out_f, b_lo, b_hi):
    """Accumulators of output blocks ``b_lo .. b_hi - 1`` into ``out`` (T, N) int64, or with
    ``to_float`` as ``float32(acc) * scale[t]`` into ``out_f`` (``sfu.mpe_to_float``)."""
    _, ng, R, B = w.shape                   # R: G/2 bytes of nibble pairs, or G bytes
    G = 2 * R if nibbles else R
    T = x.shape[0]
    N = out_f.shape[1] if to_float else out.shape[1]
    p32 = np.empty(B, np.int32)
    acc = np.empty(B, np.int64)
    for b in range(b_lo, b_hi):
        wb, Sb, Mb = w[b], S[b], M[b]
        for t in range(T):
            acc[:] = 0
            for g in range(ng):
                p32[:] = 0
                for j in range(R):
                    xa = np.int32(x[t, g * G + j])
                    row = wb[g, j]
                    if nibbles:
                        xb = np.int32(x[t, g * G + R + j])
                        for i in range(B):
                            v = np.int32(row[i])
                            p32[i] += (v & 15) * xa + (v >> 4) * xb
                    else:
                        for i in range(B):
                            p32[i] += np.int32(row[i]) * xa
                _finish(acc, p32, xs[t, g], np.int64(u[t, g]), Sb[g], Mb[g], has_m, narrow)
            n0 = b * B
            if to_float:
                st = scale[t]
                for i in range(min(B, N - n0)):
                    out_f[t, n0 + i] = np.float32(np.float32(acc[i]) * st)
            else:
                for i in range(min(B, N - n0)):
                    out[t, n0 + i] = acc[i]


def mpe_acc(pw: PackedMpe, x: np.ndarray, u: np.ndarray, acc_bits: int = 64) -> np.ndarray:
    """The wrapped ``acc_bits`` accumulators int64 (T, N) of ``x`` int8 (T, K) in
    [-127, 127] with group factors ``u`` (T, K//G)."""
    out = _run(pw, x, u, None)
    return out if acc_bits == 64 else wrap_signed(out, acc_bits)


def mpe_float(pw: PackedMpe, x: np.ndarray, u: np.ndarray, x_scale: np.ndarray, shift: int,
              acc_bits: int = 64) -> np.ndarray:
    """The MPE's float32 output (T, N): :func:`flightllm.runtime.sfu.mpe_to_float` of
    :func:`mpe_acc` with the activations' scales ``x_scale`` (T,), fused into the kernel."""
    if acc_bits != 64:
        return mpe_to_float(mpe_acc(pw, x, u, acc_bits), x_scale, shift)
    return _run(pw, x, u, mpe_scale(x_scale, shift))


_NO_INT = np.zeros((1, 1), np.int64)          # the output array a call does not write
_NO_FLOAT = np.zeros((1, 1), np.float32)


def _run(pw: PackedMpe, x, u, scale):
    x = np.ascontiguousarray(x, np.int8)
    u = np.ascontiguousarray(u, np.int64)
    t = x.shape[0]
    if x.shape != (t, pw.k) or u.shape != (t, pw.ng):
        raise ValueError(f"activations {x.shape} / factors {u.shape} do not fit weights {pw.n}x{pw.k} "
                         f"in groups of {pw.g}")
    xs = _xsums(x, pw.ng, pw.g)
    to_float = scale is not None
    out = np.empty((t, pw.n), np.float32 if to_float else np.int64)
    args = (pw.w, pw.S, pw.S if pw.M is None else pw.M, pw.M is not None, pw.nibbles, pw.narrow,
            x, u, xs, _NO_INT if to_float else out, to_float,
            np.ascontiguousarray(scale, np.float32) if to_float else _NO_FLOAT[0], out if to_float else _NO_FLOAT)
    nb = pw.w.shape[0]
    nt = min(threads(), nb)
    if nt > 1 and pw.n * pw.k * t >= _SPLIT_MACS:
        # the first share on this thread, the others on the pool (their kernels release the GIL)
        cuts = [nb * i // nt for i in range(nt + 1)]
        futs = [_executor().submit(_acc, *args, lo, hi) for lo, hi in zip(cuts[1:-1], cuts[2:])]
        _acc(*args, 0, cuts[1])
        for f in futs:
            f.result()
    else:
        _acc(*args, 0, nb)
    return out


# -- SFU: fused row kernels ------------------------------------------------------------
# The same float32 operations in the same order as runtime/sfu.py (the specification;
# ``tests/test_native.py`` holds them equal, NaN, infinities, zeros and subnormals
# included): every product, quotient and sum is a float32 operation, ``_f`` rounds a
# value to float32 where numba would otherwise keep it wider.
_f = np.float32
_F0, _F127, _FU, _FQU = _f(0.0), _f(ACT_MAX), _f(FACTOR_MAX), _f(ACT_MAX * FACTOR_MAX)


@njit(nogil=True, cache=True)
def _lane_sum(x, n, lanes, slots, width):
    """``sfu.lane_sum`` of ``x[:n]``: ``lanes`` x ``slots`` accumulators from +0.0 in
    arrival order, then the pairwise tree over ``width`` (lanes padded to a power of two)."""
    block = lanes * slots
    blocks = max(1, (n + block - 1) // block)
    a = np.zeros(width * slots, np.float32)
    for lane in range(lanes):
        for s in range(slots):
            acc = _F0
            for blk in range(blocks):
                i = (blk * slots + s) * lanes + lane
                if i < n:
                    acc = _f(acc + x[i])
            a[lane * slots + s] = acc
    m = width * slots
    while m > 1:
        m //= 2
        for i in range(m):
            a[i] = _f(a[2 * i] + a[2 * i + 1])
    return a[0]


@njit(nogil=True, cache=True)
def _exp_into(x, y):
    """``sfu.exp`` of float32 ``x`` into ``y`` (1-D, contiguous)."""
    xb = x.view(np.uint32)
    yb = y.view(np.uint32)
    for i in range(x.size):
        b = np.int64(xb[i])
        neg = b >> 31
        e = (b >> 23) & 0xFF
        if x[i] != x[i]:
            yb[i] = xb[i]
            continue
        if e >= EXP_BIG_E:
            yb[i] = 0 if neg else 0x7F800000
            continue
        m = (b & 0x7FFFFF) | (1 << 23)
        mag = 0
        if e != 0:
            mag = (m * EXP_LOG2E) >> min(max(150 + EXP_LOG2E_FRAC - EXP_T_FRAC - e, 0), 63)
        t = -mag if neg else mag
        k = t >> EXP_T_FRAC
        j = (t >> EXP_R_BITS) & ((1 << EXP_J_BITS) - 1)
        a = ((t & ((1 << EXP_R_BITS) - 1)) * EXP_LN2) >> (EXP_T_FRAC + EXP_R_BITS - EXP_A_FRAC)
        h = a >> EXP_H_SHIFT
        d = a + ((h * h) >> (2 * (EXP_A_FRAC - EXP_H_SHIFT) - EXP_A_FRAC + 1))
        T = EXP_TABLE[j]
        M = T + (((T >> EXP_T_SHIFT) * d) >> (EXP_TABLE_FRAC - EXP_T_SHIFT + EXP_A_FRAC - EXP_TABLE_FRAC))
        cut = EXP_TABLE_FRAC - 23
        sig = M >> cut
        rem = M & ((1 << cut) - 1)
        half = 1 << (cut - 1)
        if rem > half or (rem == half and (sig & 1) == 1):
            sig += 1
        carry = sig >> 24
        sig >>= carry
        ef = k + carry + 127
        if ef <= 0:
            yb[i] = 0
        elif ef >= 255:
            yb[i] = 0x7F800000
        else:
            yb[i] = (ef << 23) | (sig & 0x7FFFFF)


@njit(nogil=True, cache=True)
def _nanmax(a, b):
    """``np.maximum``: NaN if either is NaN."""
    if a != a:
        return a
    if b != b:
        return b
    return a if a >= b else b


@njit(nogil=True, cache=True)
def _clip(t, q):
    """``np.minimum(np.maximum(t, -q), q)``: NaN stays NaN."""
    if t < -q:
        return -q
    return q if t > q else t


@njit(nogil=True, cache=True)
def _requantize_row(x, g, q, u):
    """``sfu.requantize_groups`` of one row ``x`` (n,) into ``q`` (n,) int8 and ``u``
    (n // g,) uint8; returns ``A``."""
    n = x.size
    amax = _F0
    for i in range(n):
        amax = _nanmax(amax, abs(x[i]))
    r = _f(_FU / amax) if amax > 0 else _F0
    for grp in range(n // g):
        ag = _F0
        for i in range(grp * g, grp * g + g):
            ag = _nanmax(ag, abs(x[i]))
        uf = np.ceil(_f(ag * r))
        if uf > _FU:                                    # NaN stays NaN
            uf = _FU
        inv = _f(_FQU / _f(uf * amax)) if uf > 0 else _F0
        u[grp] = 0 if uf != uf else np.uint8(uf)
        for i in range(grp * g, grp * g + g):
            t = _clip(np.rint(_f(x[i] * inv)), _F127)
            q[i] = 0 if t != t else np.int8(t)
    return _f(amax / _FQU)


@njit(nogil=True, cache=True)
def _requantize_rows(x, g, q, a, u):
    for r in range(x.shape[0]):
        a[r] = _requantize_row(x[r], g, q[r], u[r])


def requantize_groups(x: np.ndarray, g: int):
    """:func:`flightllm.runtime.sfu.requantize_groups`, fused: (q int8, A float32, u uint8)."""
    x = np.ascontiguousarray(x, np.float32)
    rows, n = x.shape
    if n % g:
        raise ValueError(f"requantize_groups: group {g} does not divide the row of {n}")
    q = np.empty((rows, n), np.int8)
    a = np.empty(rows, np.float32)
    u = np.empty((rows, n // g), np.uint8)
    _requantize_rows(x, g, q, a, u)
    return q, a, u


@njit(nogil=True, cache=True)
def _softmax_into(S, mask, vs, g0, kvn, rep, n, n32, c, lanes, slots, width, q, scale, u):
    """SOFTMAX of the query heads of kv heads ``g0 .. g0+kvn-1`` over positions
    ``0 .. n32-1`` into ``q``, ``scale``, ``u``; kv head ``gg``'s value scales are
    ``vs[:n, gg]`` (0 from ``n`` on)."""
    e = np.empty(n32, np.float32)
    z = np.empty(n32, np.float32)
    w = np.empty(n32, np.float32)
    for t in range(mask.shape[0]):
        for gg in range(g0, g0 + kvn):
            for r in range(rep):
                h = gg * rep + r
                row = S[t, h]
                m = _f(-np.inf)
                for p in range(n32):
                    if mask[t, p]:
                        m = _nanmax(m, row[p])
                for p in range(n32):
                    z[p] = _f(_f(row[p] - m) * c) if mask[t, p] else _F0
                _exp_into(z, e)
                for p in range(n32):
                    if not mask[t, p]:
                        e[p] = _F0
                d = _lane_sum(e, n32, lanes, slots, width)
                for p in range(n32):
                    w[p] = _f(e[p] * (vs[p, gg] if p < n else _F0))
                a = _requantize_row(w, 32, q[t, h, :n32], u[t, h, :n32 // 32])
                scale[t, h] = _f(a / d)


def softmax_into(S, mask, vs, g0: int, kvn: int, rep: int, n: int, c: float, lanes: int, slots: int,
                 q, scale, u) -> None:
    """:func:`flightllm.runtime.sfu.softmax_probs` of every query head of kv heads
    ``g0 .. g0+kvn-1`` (scores ``S`` (T, heads, >= n32), ``mask`` (T, n32), value scales
    ``vs`` (>= n, kv heads)), written into the probability buffer ``q``, ``scale``, ``u``."""
    _softmax_into(S, np.ascontiguousarray(mask, np.bool_), vs, g0, kvn, rep, n, mask.shape[1], np.float32(c),
                  lanes, slots, lane_tree_width(lanes), q, scale, u)


def softmax_probs(s: np.ndarray, mask: np.ndarray, vs: np.ndarray, c: float, lanes: int, slots: int = 1):
    """:func:`flightllm.runtime.sfu.softmax_probs`, fused: ``(q int8 (T, rep, n), scale
    float32 (T, rep), u uint8 (T, rep, n // 32))``."""
    s = np.ascontiguousarray(s, np.float32)
    t, rep, n = s.shape
    q = np.empty((t, rep, n), np.int8)
    scale = np.empty((t, rep), np.float32)
    u = np.empty((t, rep, n // 32), np.uint8)
    softmax_into(s, mask, np.ascontiguousarray(vs, np.float32).reshape(n, 1), 0, 1, rep, n, c, lanes, slots,
                 q, scale, u)
    return q, scale, u


def lane_sum(x: np.ndarray, lanes: int, slots: int = 1) -> np.ndarray:
    """:func:`flightllm.runtime.sfu.lane_sum` over the last axis of (rows, n)."""
    x = np.ascontiguousarray(x, np.float32)
    out = np.empty(x.shape[0], np.float32)
    width = lane_tree_width(lanes)
    for r in range(x.shape[0]):
        out[r] = _lane_sum(x[r], x.shape[1], lanes, slots, width)
    return out


def exp(x: np.ndarray) -> np.ndarray:
    """:func:`flightllm.runtime.sfu.exp`."""
    x = np.ascontiguousarray(x, np.float32)
    y = np.empty_like(x)
    _exp_into(x.reshape(-1), y.reshape(-1))
    return y


@njit(nogil=True, cache=True)
def _rmsnorm_rows(x, w, eps, lanes, slots, width, y):
    rows, n = x.shape
    sq = np.empty(n, np.float32)
    for r in range(rows):
        for i in range(n):
            sq[i] = _f(x[r, i] * x[r, i])
        ms = _f(_lane_sum(sq, n, lanes, slots, width) / _f(n))
        inv = _f(_f(1.0) / np.sqrt(_f(ms + eps)))
        for i in range(n):
            y[r, i] = _f(_f(x[r, i] * inv) * w[i])


def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float, lanes: int, slots: int = 1) -> np.ndarray:
    """:func:`flightllm.runtime.sfu.rmsnorm` of (rows, n)."""
    x = np.ascontiguousarray(x, np.float32)
    y = np.empty_like(x)
    _rmsnorm_rows(x, np.ascontiguousarray(w, np.float32), np.float32(eps), lanes, slots,
                  lane_tree_width(lanes), y)
    return y


@njit(nogil=True, cache=True)
def _silu_mul_into(g, u, y):
    for i in range(g.size):
        y[i] = -g[i]
    _exp_into(y, y)
    for i in range(g.size):
        y[i] = _f(_f(g[i] / _f(y[i] + _f(1.0))) * u[i])


def silu_mul(g: np.ndarray, u: np.ndarray) -> np.ndarray:
    """:func:`flightllm.runtime.sfu.silu_mul`."""
    g = np.ascontiguousarray(g, np.float32)
    y = np.empty_like(g)
    _silu_mul_into(g.reshape(-1), np.ascontiguousarray(u, np.float32).reshape(-1), y.reshape(-1))
    return y


@njit(nogil=True, cache=True)
def _requantize_segs(x, seg, qmax, q, scale):
    rows, n = x.shape
    for r in range(rows):
        for s in range(n // seg):
            amax = _F0
            for i in range(s * seg, s * seg + seg):
                amax = _nanmax(amax, abs(x[r, i]))
            inv = _f(qmax / amax) if amax != 0 else _F0
            scale[r, s] = _f(amax / qmax)
            for i in range(s * seg, s * seg + seg):
                t = _clip(np.rint(_f(x[r, i] * inv)), qmax)
                q[r, i] = 0 if t != t else np.int8(t)


def requantize(x: np.ndarray, seg: int | None = None, qmax: float = 0.0):
    """:func:`flightllm.runtime.sfu.requantize` of (rows, n)."""
    x = np.ascontiguousarray(x, np.float32)
    rows, n = x.shape
    seg = seg or n
    if n % seg:
        raise ValueError(f"requantize: segment {seg} does not divide the row of {n}")
    q = np.empty((rows, n), np.int8)
    scale = np.empty((rows, n // seg), np.float32)
    _requantize_segs(x, seg, np.float32(qmax) if qmax else _F127, q, scale)
    return q, scale


# -- attention on the matrix engine (QK, PV): exact integer sums, then sfu's float32 steps --
@njit(nogil=True, cache=True)
def _qk_into(q, qs, h0, rep, hd, K, n, ks, S):
    T = q.shape[0]
    Kt = np.empty((hd, n), np.int32)                # positions innermost: the sums run across them
    for p in range(n):
        for d in range(hd):
            Kt[d, p] = K[p, d]
    acc = np.empty(n, np.int32)
    for t in range(T):
        for r in range(rep):
            h = h0 + r
            acc[:] = 0
            for d in range(hd):
                qd = np.int32(q[t, h * hd + d])
                row = Kt[d]
                for p in range(n):
                    acc[p] += qd * row[p]
            for p in range(n):
                S[t, h, p] = _f(_f(_f(acc[p]) * qs[t, h]) * ks[p])


def qk_into(q, qs, h0: int, rep: int, hd: int, K, n: int, ks, S) -> None:
    """QK of query heads ``h0 .. h0+rep-1`` over positions ``0 .. n-1`` into the scores ``S``
    (T, heads, cap): ``sfu.qk_scores`` of the exact int8 dot products ``q . K[p]``."""
    _qk_into(q, qs, h0, rep, hd, K, n, ks, S)


@njit(nogil=True, cache=True)
def _pv_into(pq, u, sc, h0, rep, V, n, out):
    T = pq.shape[0]
    hd = V.shape[1]
    ps = np.empty(hd, np.int64)
    acc = np.empty(hd, np.int64)
    for t in range(T):
        for r in range(rep):
            h = h0 + r
            acc[:] = 0
            for g in range((n + 31) // 32):
                ps[:] = 0
                for p in range(g * 32, min(g * 32 + 32, n)):
                    w = np.int64(pq[t, h, p])
                    if w != 0:
                        for d in range(hd):
                            ps[d] += w * V[p, d]
                ug = np.int64(u[t, h, g])
                for d in range(hd):
                    acc[d] += ug * ps[d]
            for d in range(hd):
                out[t, h * hd + d] = _f(_f(acc[d]) * sc[t, h])


def pv_into(pq, u, sc, h0: int, rep: int, V, n: int, out) -> None:
    """PV of query heads ``h0 .. h0+rep-1`` over positions ``0 .. n-1`` into ``out``
    (T, heads * head_dim): ``acc = sum_g u[g] * sum_{p in g} q[p] * V[p]`` (exact), then
    ``sfu.mpe_to_float(acc, scale, 0)``."""
    _pv_into(pq, u, sc, h0, rep, V, n, out)
