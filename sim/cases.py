"""Stimuli for the MPE testbench: packed weights, activations with factors, golden results.

A case is one MV (T = 1) or MM operation. Its weights are a :class:`~flightllm.hw.formats.QTensor`
(random, or a real GGUF tensor slice) packed by the real packer
(:func:`formats.pack_tensor`) into per-channel record streams; the expected accumulators
come from :func:`flightllm.runtime.arith.mpe_reference` on the tensor unpacked back from
those channel bytes (:func:`formats.unpack_tensor`, :func:`formats.to_fixed` with the
packed tensor's shift; for a raw format S = 1 and no M, by definition), never from the
RTL's own formulas. Cases are saved together in one ``.npz`` that the cocotb testbench
(:mod:`flightllm.sim.mpe_tb`) reads.

Attention runs on the same engine over the raw KV formats (``int8r/32``, ``int4r/32``):
:func:`qk_case` (the K cache of one kv head as the weight, rows = positions, K =
head_dim; the GQA group's queries as the tokens, every factor 1) and :func:`pv_case`
(the transposed V cache, rows = head_dim, K = positions; the quantized attention
probabilities, INT8 in [0, 127] with a factor per 32 positions, as the activations).
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

from flightllm.hw import formats
from flightllm.hw.geometry import EngineGeometry
from flightllm.hw.mpe import mpe_config
from flightllm.runtime.arith import ACT_MAX, mpe_reference

__all__ = ["random_f16", "random_qtensor", "make_case", "save_cases", "smollm2_qtensor", "channel_words",
           "random_kv", "qk_case", "pv_case", "softmax_probs"]


def random_f16(rng, shape, regime: str = "typical") -> np.ndarray:
    """Random binary16 scales: random signs, some zeros, exponents that one tensor's
    fixed point holds (at most ``SCALE_EXP_SPAN + 1`` binades).

    ``regime``: ``typical`` (GGUF-like 2**-10..2**-5), ``wide`` (exactly the 16 binades
    the fixed point holds), ``subnormal`` (down to the smallest subnormals), ``large``
    (exponent fields up to 30: ``e0`` saturates at ``E0_MAX``).
    """
    lo, hi = {"typical": (5, 10), "wide": (3, 3 + formats.SCALE_EXP_SPAN), "subnormal": (0, 12),
              "large": (22, 30)}[regime]
    e = rng.integers(lo, hi + 1, shape)
    frac = rng.integers(0, 1024, shape)
    sign = rng.integers(0, 2, shape)
    if regime == "wide":                                   # both ends of the span present
        e.flat[0], e.flat[-1] = lo, hi
    bits = (sign << 15) | (e << 10) | frac
    bits[rng.random(shape) < 0.05] = 0                     # zero scales
    return bits.astype(np.uint16).view(np.float16)


def random_qtensor(wf: formats.WeightFormat, n: int, k: int, rng, regime: str = "typical") -> formats.QTensor:
    """Random values over the format's whole range, an exact N:M mask, random scales/mins
    (two-level formats: random 8-bit sub-scales and sub-mins, 0 and 255 included, under a
    random tensor scale and min; raw formats: the values alone)."""
    if wf.raw:
        return random_kv(wf, n, k, rng)
    q = rng.integers(wf.qmin, wf.qmax + 1, (n, k))
    mask = None
    if not wf.dense:
        mask = formats.nm_mask(rng.random((n, k)), wf.n_keep, wf.m)
        q = np.where(mask, q, 0)
    ng = k // wf.group_size
    if wf.two_level:
        sub = (1 << formats.SUB_BITS) - 1
        sc, sm = rng.integers(0, sub + 1, (2, n, ng))
        sc.flat[0], sm.flat[-1] = 0, sub
        top = random_f16(rng, (2,), "typical")              # D and Mn: within SUB_EXP_SPAN binades
        return formats.QTensor(wf, q, sc, sm, mask, tensor_scale=top[0], tensor_min=top[1])
    mn = random_f16(rng, (n, ng), regime) if wf.has_min else None
    return formats.QTensor(wf, q, random_f16(rng, (n, ng), regime), mn, mask)


def smollm2_qtensor(rows: int, cols: int, tensor: str = "blk.0.attn_q.weight"):
    """A slice (whole rows, whole 32-groups) of a real SmolLM2-135M tensor in its native GGUF
    form, or ``(None, reason)`` when the model package is absent."""
    from flightllm.compiler.gguf_import import GGUFError, default_model_path

    try:
        path = default_model_path()
    except GGUFError as e:
        return None, str(e)
    import gguf

    for t in gguf.GGUFReader(str(path)).tensors:
        if t.name == tensor:
            kind = t.tensor_type.name
            raw = np.asarray(t.data, np.uint8)                      # (N, K / 32 * block bytes)
            bb = formats.gguf_block_bytes(kind)
            n_full, k_full = raw.shape[0], raw.shape[1] // bb * 32
            if rows > n_full or cols > k_full or cols % 32:
                raise ValueError(f"{tensor} is {n_full}x{k_full}: cannot slice {rows}x{cols}")
            blocks = raw.reshape(n_full, k_full // 32, bb)[:rows, :cols // 32]
            qt = formats.gguf_to_qtensor(kind, blocks, (rows, cols))
            return qt, f"{tensor}[:{rows}, :{cols}] ({kind}) of {path.name}"
    return None, f"tensor {tensor} not in {path.name}"


def channel_words(data: bytes, width_bits: int) -> np.ndarray:
    """A channel's bytes as ``width_bits`` words (count, bytes), the last one zero-padded."""
    nbytes = width_bits // 8
    count = -(-len(data) // nbytes)
    buf = bytes(data) + bytes(count * nbytes - len(data))
    return np.frombuffer(buf, np.uint8).reshape(count, nbytes)


def make_case(geom: EngineGeometry, qt: formats.QTensor, tokens: int, rng, act_base=None,
              u_extremes: bool = True, name: str | None = None, x=None, u=None) -> dict:
    """One operation of ``qt`` over ``tokens`` activation vectors with their factors:
    ``x`` (T, K) int8 and ``u`` (T, K // G) given, or random (``u_extremes``: the first
    factor 0 and the last the largest)."""
    wf = qt.fmt
    n_rows, n_in = qt.shape
    g = wf.group_size
    pt = formats.pack_tensor(qt, geom.params)
    back = formats.unpack_tensor(pt)                     # the golden model sees what HBM holds
    if wf.raw:                                           # no scales in HBM: S = 1, no min
        if pt.shift != 0:
            raise AssertionError(f"{wf.name}: a raw tensor packed with shift {pt.shift}")
        S, M = np.ones((n_rows, n_in // g), np.int64), None
    else:
        _, S, M = back.fixed(pt.shift)                   # formats.to_fixed at the packed shift
    umax = (1 << geom.factor_bits) - 1
    if x is None:
        x = rng.integers(-ACT_MAX, ACT_MAX + 1, size=(tokens, n_in)).astype(np.int8)
    if u is None:
        u = rng.integers(0, umax + 1, size=(tokens, n_in // g))
        if u_extremes and u.size >= 2:
            u.flat[0], u.flat[-1] = 0, umax
    x, u = np.asarray(x), np.asarray(u)
    if x.shape != (tokens, n_in) or u.shape != (tokens, n_in // g):
        raise ValueError(f"activations {x.shape} / factors {u.shape} for T={tokens}, K={n_in}, G={g}")
    if np.abs(x.astype(np.int64)).max(initial=0) > ACT_MAX or u.min(initial=0) < 0 or u.max(initial=0) > umax:
        raise ValueError("activations outside [-127, 127] or factors outside the factor bits")
    x = x.astype(np.int8)
    exp = mpe_reference(back.q, S, M, x, u, g, geom.acc_w)               # (T, N)
    tiles = -(-n_rows // geom.R)
    padded = np.zeros((tokens, tiles * geom.R), np.int64)
    padded[:, :n_rows] = exp
    out = padded.reshape(tokens, tiles, geom.R).transpose(1, 0, 2).reshape(tiles * tokens, geom.R)

    stride = geom.act_stride(n_in)
    if act_base is None:
        room = geom.act_words - tokens * stride
        if room < 0:
            raise ValueError(f"{tokens} x {n_in} activations exceed the activation buffer")
        act_base = int(rng.integers(0, room // geom.act_banks + 1)) * geom.act_banks
    nw = n_in // geom.L
    act_addr = np.array([act_base + t * stride + i for t in range(tokens) for i in range(nw)], np.int64)
    act_data = x.reshape(tokens * nw, geom.L)
    act_u = np.repeat(u, g // geom.L, axis=1).reshape(tokens * nw)        # each word: its group's u
    cfg = mpe_config(geom, wf, n_rows, n_in, tokens, act_base, pt.shift)
    case = {
        "cfg": cfg, "N": n_rows, "K": n_in,
        "name": name or f"{wf.name} {n_rows}x{n_in} T={tokens}",
        "act_addr": act_addr, "act_data": act_data, "act_u": act_u,
        "expected": out,
        "kept_macs": n_rows * n_in * wf.n_keep // wf.m * tokens,
    }
    for c in range(geom.C):
        w = channel_words(pt.data[c], geom.W)
        if len(w) != cfg["words"]:                       # the host count vs what the packer wrote
            raise AssertionError(f"channel {c}: packer wrote {len(w)} words, mpe_config says {cfg['words']}")
        case[f"words{c}"] = w
    return case


def save_cases(path: pathlib.Path, params, cases, stall: float, seed: int = 0) -> pathlib.Path:
    """Write cases for ``sim/mpe_tb.py``; ``stall`` is the per-cycle probability that
    each input holds valid low and the output holds ready low."""
    arrays = {"params": np.frombuffer(params.to_json().encode(), np.uint8),
              "meta": np.frombuffer(json.dumps({
                  "stall": stall, "seed": seed, "n": len(cases),
                  "cfg": [c["cfg"] for c in cases], "names": [c["name"] for c in cases],
                  "kept_macs": [c["kept_macs"] for c in cases]}).encode(), np.uint8)}
    for i, c in enumerate(cases):
        for k, v in c.items():
            if isinstance(v, np.ndarray):
                arrays[f"c{i}_{k}"] = v
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


# -- attention on the matrix engine (raw KV formats) ---------------------------------------

def random_kv(wf: formats.WeightFormat, n: int, k: int, rng) -> formats.QTensor:
    """A random raw KV-cache tensor: values over the format's whole range, both ends present."""
    if not wf.raw:
        raise ValueError(f"{wf.name} is not a raw (KV-cache) format")
    q = rng.integers(wf.qmin, wf.qmax + 1, (n, k))
    q.flat[0], q.flat[-1] = wf.qmin, wf.qmax
    return formats.QTensor(wf, q.astype(np.int8), None)


def qk_case(geom: EngineGeometry, wf: formats.WeightFormat, positions: int, head_dim: int, rep: int,
            rng, act_base=None, name: str | None = None) -> dict:
    """QK: one kv head's K cache (``positions`` x ``head_dim``, ``wf`` raw) times the ``rep``
    queries of the heads that share it (INT8, +-127 included), every factor 1:
    ``acc[t, pos] = sum_d K[pos, d] * q[t, d]``."""
    qt = random_kv(wf, positions, head_dim, rng)
    x = rng.integers(-ACT_MAX, ACT_MAX + 1, (rep, head_dim))
    x.flat[0], x.flat[-1] = -ACT_MAX, ACT_MAX
    u = np.ones((rep, head_dim // wf.group_size), np.int64)
    return make_case(geom, qt, rep, rng, act_base=act_base, x=x, u=u,
                     name=name or f"QK {wf.name} pos={positions} hd={head_dim} T={rep}")


def softmax_probs(rng, tokens: int, positions: int, group: int):
    """Attention probabilities of ``tokens`` query heads over ``positions`` as the engine
    takes them: a softmax of random scores (some peaked, some flat), requantized per
    group of ``group`` positions by :func:`flightllm.runtime.sfu.requantize_groups`
    (INT8 in [0, 127], one 8-bit factor per group)."""
    from flightllm.runtime.sfu import requantize_groups

    s = rng.standard_normal((tokens, positions)).astype(np.float32) * rng.uniform(0.5, 6.0, (tokens, 1))
    p = np.exp(s - s.max(axis=1, keepdims=True))
    p = (p / p.sum(axis=1, keepdims=True)).astype(np.float32)
    q, _, u = requantize_groups(p, group)
    return q, u


def pv_case(geom: EngineGeometry, wf: formats.WeightFormat, head_dim: int, positions: int, tokens: int,
            rng, probs: str = "softmax", act_base=None, name: str | None = None) -> dict:
    """PV: the transposed V cache of one kv head (``head_dim`` x ``positions``, ``wf`` raw)
    times ``tokens`` probability vectors: ``probs="softmax"`` (:func:`softmax_probs`) or
    ``"random"`` (uniform in [0, 127] and factors in [0, 255], both ends present)."""
    qt = random_kv(wf, head_dim, positions, rng)
    g = wf.group_size
    if probs == "softmax":
        x, u = softmax_probs(rng, tokens, positions, g)
    elif probs == "random":
        umax = (1 << geom.factor_bits) - 1
        x = rng.integers(0, ACT_MAX + 1, (tokens, positions))
        u = rng.integers(0, umax + 1, (tokens, positions // g))
        x.flat[0], x.flat[-1] = 0, ACT_MAX
        u.flat[0], u.flat[-1] = umax, 0
    else:
        raise ValueError(f"probs must be 'softmax' or 'random', not {probs!r}")
    if x.min() < 0:
        raise AssertionError("attention probabilities below 0")
    return make_case(geom, qt, tokens, rng, act_base=act_base, x=x, u=u,
                     name=name or f"PV {wf.name} hd={head_dim} pos={positions} T={tokens} ({probs})")
