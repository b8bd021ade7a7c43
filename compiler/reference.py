"""Float32 LLaMA forward pass in numpy: the accuracy reference for everything else.

RMSNorm, RoPE on adjacent pairs (GGUF's Q/K row order, see :mod:`gguf_import`),
grouped-query attention with a KV cache, SwiGLU MLP, tied or separate LM head:
llama.cpp / HF transformers semantics. An optional *observer* sees the input of
every linear layer, which is how calibration statistics are gathered.
"""

from __future__ import annotations

import math

import numpy as np

from .gguf_import import LlamaModel

__all__ = ["FloatLlama", "rms_norm", "rope_tables", "apply_rope", "silu", "log_softmax",
           "windows_nll", "perplexity"]


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    ms = np.mean(np.square(x, dtype=np.float32), axis=-1, keepdims=True)
    return (x / np.sqrt(ms + np.float32(eps))) * w


def rope_tables(head_dim: int, positions: np.ndarray, theta: float):
    """cos, sin of shape (len(positions), head_dim // 2) for pairs (2i, 2i+1)."""
    inv = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    ang = np.asarray(positions, dtype=np.float64)[:, None] * inv[None, :]
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate adjacent pairs of x (T, H, D) by the per-position angles."""
    x0, x1 = x[..., 0::2], x[..., 1::2]
    c, s = cos[:, None, :], sin[:, None, :]
    out = np.empty_like(x)
    out[..., 0::2] = x0 * c - x1 * s
    out[..., 1::2] = x0 * s + x1 * c
    return out


def silu(x: np.ndarray) -> np.ndarray:
    return x / (np.float32(1.0) + np.exp(-x))


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _fake_quant(x: np.ndarray, levels: int) -> np.ndarray:
    """``x`` (..., D) rounded to ``+-levels`` steps of its absmax along the last axis."""
    step = np.abs(x).max(axis=-1, keepdims=True) / np.float32(levels)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(step > 0, np.rint(x / step) * step, 0).astype(np.float32)


class FloatLlama:
    """The float reference model.

    Parameters
    ----------
    model : LlamaModel
    max_seq : int, optional
        KV-cache length (default: the model's context length, capped at 4096).
    observer : callable(name, x), optional
        Called with the (T, in) input of each linear layer group:
        ``blk.{i}.attn_in`` (q, k, v), ``blk.{i}.attn_output``, ``blk.{i}.ffn_in``
        (gate, up), ``blk.{i}.ffn_down`` and ``output``.
    sink, window : int, optional
        Block-sparse attention as the compiler's KV options select it
        (:func:`flightllm.runtime.sfu.attention_mask`); ``window=0``: dense causal.
    kv_levels : int, optional
        Round K (after RoPE) and V to ``+-kv_levels`` steps of their absmax per
        (position, head), as the hardware's KV cache does (127: INT8, 7: INT4);
        0 keeps them float32.
    """

    def __init__(self, model: LlamaModel, max_seq: int | None = None, observer=None, sink: int = 0,
                 window: int = 0, kv_levels: int = 0):
        self.m = model
        self.sink, self.window, self.kv_levels = sink, window, kv_levels
        self.cfg = model.config
        self.max_seq = max_seq or min(self.cfg.context_length, 4096)
        self.observer = observer
        self.reset()

    def reset(self):
        c = self.cfg
        self.k_cache = np.zeros((c.n_layers, self.max_seq, c.n_kv_heads, c.head_dim), np.float32)
        self.v_cache = np.zeros_like(self.k_cache)
        self.pos = 0

    def _obs(self, name, x):
        if self.observer is not None:
            self.observer(name, x)

    def forward(self, tokens, *, first_layer: int = 0, x=None, trace=None) -> np.ndarray:
        """Logits (T, vocab) for ``tokens`` appended after the cached positions.

        ``first_layer`` > 0 starts from the residual ``x`` entering that layer (as
        recorded by ``trace``, a list that receives every layer's input residual), which
        lets sensitivity analysis re-run only the layers after a change.
        """
        c, m = self.cfg, self.m
        tokens = np.asarray(tokens, dtype=np.int64)
        t = len(tokens)
        if self.pos + t > self.max_seq:
            raise ValueError(f"sequence of {self.pos + t} tokens exceeds the KV cache of {self.max_seq}")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= c.vocab):
            raise ValueError(f"token id out of range 0..{c.vocab - 1}")
        p0 = self.pos
        pos = np.arange(p0, p0 + t)
        cos, sin = rope_tables(c.head_dim, pos, c.rope_theta)
        if x is None:
            x = m.embedding[tokens].astype(np.float32)
        from ..runtime.sfu import attention_mask      # the hardware's definition (sfu imports this module)
        causal = attention_mask(pos + 1, p0 + t, self.sink, self.window)      # (T, S)
        for i in range(first_layer, c.n_layers):
            if trace is not None:
                trace.append(x)
            x = self._layer(i, x, p0, cos, sin, causal)
        h = rms_norm(x, m.tensors["output_norm.weight"], c.rms_eps)
        self._obs("output", h)
        self.pos += t
        return h @ m.lm_head.T

    def _layer(self, i, x, p0, cos, sin, causal):
        c, m = self.cfg, self.m
        t = x.shape[0]
        hd, nh, nkv = c.head_dim, c.n_heads, c.n_kv_heads
        rep = nh // nkv
        h = rms_norm(x, m.layer(i, "attn_norm"), c.rms_eps)
        self._obs(f"blk.{i}.attn_in", h)
        q = (h @ m.layer(i, "attn_q").T).reshape(t, nh, hd)
        k = (h @ m.layer(i, "attn_k").T).reshape(t, nkv, hd)
        v = (h @ m.layer(i, "attn_v").T).reshape(t, nkv, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.kv_levels:
            k, v = (_fake_quant(a, self.kv_levels) for a in (k, v))
        self.k_cache[i, p0:p0 + t] = k
        self.v_cache[i, p0:p0 + t] = v
        kk = self.k_cache[i, :p0 + t].transpose(1, 0, 2)                      # (kvH, S, D)
        vv = self.v_cache[i, :p0 + t].transpose(1, 0, 2)
        qg = q.reshape(t, nkv, rep, hd).transpose(1, 2, 0, 3)                 # (kvH, rep, T, D)
        s = np.matmul(qg, kk[:, None].swapaxes(-1, -2)) * np.float32(1.0 / math.sqrt(hd))
        s = np.where(causal, s, -np.inf)
        s = s - s.max(axis=-1, keepdims=True)
        p = np.exp(s)
        p /= p.sum(axis=-1, keepdims=True)
        a = np.matmul(p, vv[:, None])                                          # (kvH, rep, T, D)
        a = a.transpose(2, 0, 1, 3).reshape(t, nh * hd)
        self._obs(f"blk.{i}.attn_output", a)
        x = x + a @ m.layer(i, "attn_output").T
        h = rms_norm(x, m.layer(i, "ffn_norm"), c.rms_eps)
        self._obs(f"blk.{i}.ffn_in", h)
        g = silu(h @ m.layer(i, "ffn_gate").T) * (h @ m.layer(i, "ffn_up").T)
        self._obs(f"blk.{i}.ffn_down", g)
        return x + g @ m.layer(i, "ffn_down").T

    def generate(self, prompt_ids, max_new_tokens: int, stop_ids=()) -> list:
        """Greedy continuation of ``prompt_ids`` (fresh cache)."""
        self.reset()
        logits = self.forward(prompt_ids)
        out = []
        for _ in range(max_new_tokens):
            nxt = int(np.argmax(logits[-1]))
            if nxt in stop_ids:
                break
            out.append(nxt)
            if self.pos >= self.max_seq:
                break
            logits = self.forward([nxt])
        return out


def windows_nll(logits_fn, tokens, context: int, progress=None):
    """Sum of NLL and count over non-overlapping windows of ``context`` tokens.

    The protocol of ``flightllm perplexity``: each window is scored from a fresh
    cache and every token but its first is predicted. ``logits_fn(window)`` returns
    (len(window), vocab) logits.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    starts = list(range(0, len(tokens) - 1, context))
    nll, count = 0.0, 0
    for s in (progress(starts) if progress else starts):
        w = tokens[s:s + context]
        if len(w) < 2:
            continue
        lp = log_softmax(logits_fn(w)[:-1])
        nll -= float(lp[np.arange(len(w) - 1), w[1:]].sum())
        count += len(w) - 1
    return nll, count


def perplexity(model: LlamaModel, tokens, context: int = 512, progress=None) -> dict:
    """Float-reference perplexity of ``tokens`` under the protocol of :func:`windows_nll`."""
    ref = FloatLlama(model, max_seq=context)

    def fn(w):
        ref.reset()
        return ref.forward(w)

    nll, n = windows_nll(fn, tokens, context, progress)
    if n == 0:
        raise ValueError("text too short: need at least 2 tokens")
    return {"ppl": math.exp(nll / n), "nll": nll / n, "tokens": n}
