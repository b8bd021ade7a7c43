"""Where the hardware numerics lose accuracy: each quantization point alone, in a float forward.

The bit-exact golden model differs from the float reference in several places at once
(INT8 activations at every matrix-engine input, the INT8 KV cache, INT8 attention
probabilities once PV runs on the matrix engine, the float32 SFU). This bench switches
them on one at a time in the float reference (fake quantization with the SFU's own
requantizer, :func:`flightllm.runtime.sfu.requantize`), so each cost is measured alone
and the fix can be chosen by measurement.

Run: ``python bench/numerics.py [--chars N] [--context C] [--variants ...]``
-> docs/numerics.json, docs/numerics.md
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
F32 = np.float32

#: variant -> (activation segment or None, which linear inputs, kv, description)
VARIANTS = {
    "float": dict(desc="float32 reference (dequantized GGUF weights)"),
    "act-vec": dict(act="vec", desc="INT8 activations, one scale per vector, every linear input"),
    "act-g32": dict(act=32, desc="INT8 activations, one scale per group of 32, every linear input"),
    "act-vec-not-down": dict(act="vec", skip=("ffn_down",),
                             desc="INT8 per vector everywhere except the ffn_down input"),
    "act-vec-down-only": dict(act="vec", only=("ffn_down",), desc="INT8 per vector at the ffn_down input only"),
    "act-vec-head-only": dict(act="vec", only=("output",), desc="INT8 per vector at the LM head input only"),
    "act-g32-u8": dict(act=("u8", 32), desc="INT8 activations, per group of 32 an 8-bit factor u of one per-vector scale"),
    "act-g32-pow2": dict(act=("pow2", 32), desc="INT8 activations, per group of 32 a power-of-two factor of one per-vector scale"),
    "act-g64-u8": dict(act=("u8", 64), desc="as act-g32-u8 with groups of 64"),
    "kv8": dict(kv=True, desc="INT8 K and V cache, one scale per (position, kv head); INT8 q per head"),
    "kv8-g32": dict(kv=32, desc="INT8 K and V cache and q, one scale per group of 32 of each head"),
    "g32u8+kv8-g32": dict(act=("u8", 32), kv=32, desc="per-group-32 8-bit activation factors + INT8 KV per group of 32"),
    "g32u8+kv8": dict(act=("u8", 32), kv=True, desc="per-group-32 8-bit activation factors + INT8 KV per head (this hardware)"),
    "p8": dict(p8=True, desc="attention probabilities INT8 per (token, head) row before P.V"),
    "vec+kv8": dict(act="vec", kv=True, desc="per-vector activations + INT8 KV (the v1 hardware)"),
    "g32+kv8": dict(act=32, kv=True, desc="per-group-32 activations + INT8 KV"),
    "g32+kv8+p8": dict(act=32, kv=True, p8=True, desc="per-group-32 activations + INT8 KV + INT8 P"),
}


def fake_quant(x, seg):
    """x (..., n) through the SFU's requantizer and back (``seg`` None: one scale per row)."""
    from flightllm.runtime.sfu import dequantize, requantize

    x = np.asarray(x, F32)
    n = x.shape[-1]
    if isinstance(seg, tuple):
        return _fake_quant_factored(x, *seg)
    q, s = requantize(x.reshape(-1, n), None if seg == "vec" else seg)
    return dequantize(q, s).reshape(x.shape)


def _fake_quant_factored(x, kind, g):
    """One float scale per vector times a per-group factor: 8-bit integer or power of two."""
    shp = x.shape
    xg = x.reshape(-1, shp[-1] // g, g).astype(np.float64)
    amax = np.abs(xg).max(axis=(1, 2), keepdims=True)
    ag = np.abs(xg).max(axis=2, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        if kind == "u8":
            u = np.clip(np.ceil(ag / amax * 255), 1, 255)
            sc = amax * u / (127 * 255)
        else:
            e = np.clip(np.floor(np.log2(amax / ag)), 0, 15)
            sc = amax / 127 * 2.0 ** -e
        q = np.where(sc > 0, np.clip(np.rint(xg / sc), -127, 127), 0)
    return (q * np.where(sc > 0, sc, 0)).astype(F32).reshape(shp)


def make_model_class():
    from flightllm.compiler.reference import FloatLlama, apply_rope, rms_norm, silu

    class FakeQuantLlama(FloatLlama):
        """The float reference with switchable fake quantization points."""

        def __init__(self, model, max_seq, act=None, only=None, skip=(), kv=False, p8=False):
            super().__init__(model, max_seq=max_seq)
            self.act, self.only, self.skip, self.kv, self.p8 = act, only, tuple(skip), kv, p8

        def qa(self, where, x):
            if self.act is None or where in self.skip or (self.only is not None and where not in self.only):
                return x
            return fake_quant(x, self.act)

        def _obs(self, name, x):
            pass

        def _layer(self, i, x, p0, cos, sin, causal):
            c, m = self.cfg, self.m
            t = x.shape[0]
            hd, nh, nkv = c.head_dim, c.n_heads, c.n_kv_heads
            rep = nh // nkv
            h = self.qa("attn_in", rms_norm(x, m.layer(i, "attn_norm"), c.rms_eps))
            q = (h @ m.layer(i, "attn_q").T).reshape(t, nh, hd)
            k = (h @ m.layer(i, "attn_k").T).reshape(t, nkv, hd)
            v = (h @ m.layer(i, "attn_v").T).reshape(t, nkv, hd)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            if self.kv:
                seg = "vec" if self.kv is True else self.kv
                q, k, v = fake_quant(q, seg), fake_quant(k, seg), fake_quant(v, seg)
            self.k_cache[i, p0:p0 + t] = k
            self.v_cache[i, p0:p0 + t] = v
            kk = self.k_cache[i, :p0 + t].transpose(1, 0, 2)
            vv = self.v_cache[i, :p0 + t].transpose(1, 0, 2)
            qg = q.reshape(t, nkv, rep, hd).transpose(1, 2, 0, 3)
            s = np.matmul(qg, kk[:, None].swapaxes(-1, -2)) * F32(1.0 / math.sqrt(hd))
            s = np.where(causal, s, -np.inf)
            s = s - s.max(axis=-1, keepdims=True)
            p = np.exp(s)
            p /= p.sum(axis=-1, keepdims=True)
            if self.p8:
                p = fake_quant(p, "vec")
            a = np.matmul(p, vv[:, None]).transpose(2, 0, 1, 3).reshape(t, nh * hd)
            x = x + self.qa("attn_output", a) @ m.layer(i, "attn_output").T
            h = self.qa("ffn_in", rms_norm(x, m.layer(i, "ffn_norm"), c.rms_eps))
            g = silu(h @ m.layer(i, "ffn_gate").T) * (h @ m.layer(i, "ffn_up").T)
            return x + self.qa("ffn_down", g) @ m.layer(i, "ffn_down").T

    return FakeQuantLlama


def run(variants, chars: int, context: int, out_dir: Path) -> dict:
    from flightllm.compiler.gguf_import import load_gguf
    from flightllm.compiler.reference import rms_norm, rope_tables, windows_nll
    from flightllm.compiler.tokenizer import Tokenizer

    model = load_gguf(None)
    tok = Tokenizer.from_gguf(model.path)
    text = (ROOT / "bench" / "data" / "gpl-3.0.txt").read_text()
    text = text[:chars] if chars else text
    ids = np.asarray(tok.encode(text), dtype=np.int64)
    cls = make_model_class()
    rows = []
    base = None
    for name in variants:
        spec = {k: v for k, v in VARIANTS[name].items() if k != "desc"}
        net = cls(model, context, **spec)
        c = model.config

        def logits_q(w, net=net):
            net.reset()
            tokens = np.asarray(w)
            pos = np.arange(len(tokens))
            cos, sin = rope_tables(c.head_dim, pos, c.rope_theta)
            x = model.embedding[tokens].astype(F32)
            causal = pos[:, None] >= pos[None, :]
            for i in range(c.n_layers):
                x = net._layer(i, x, 0, cos, sin, causal)
            h = net.qa("output", rms_norm(x, model.tensors["output_norm.weight"], c.rms_eps))
            return h @ model.lm_head.T

        t0 = time.perf_counter()
        nll, n = windows_nll(logits_q, ids, context)
        ppl = math.exp(nll / n)
        if base is None:
            base = ppl
        rows.append({"variant": name, "description": VARIANTS[name]["desc"], "ppl": ppl,
                     "vs_float": ppl / base - 1.0, "seconds": time.perf_counter() - t0})
        print(f"{name:20s} ppl {ppl:.4f}  {100 * (ppl / base - 1):+.2f}%", file=sys.stderr)
    res = {"text": f"bench/data/gpl-3.0.txt[:{chars}]" if chars else "bench/data/gpl-3.0.txt", "context": context, "tokens": int(n), "rows": rows}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "numerics.json").write_text(json.dumps(res, indent=1))
    (out_dir / "numerics.md").write_text(markdown(res))
    return res


def markdown(r) -> str:
    lines = ["# Where the hardware numerics cost accuracy (fake quantization in the float forward)", "",
             f"SmolLM2-135M-Instruct (Q4_1 weights dequantized), {r['text']}, {r['tokens']} scored tokens, "
             f"context {r['context']}. Each row switches on the named quantization points in the float32 "
             "reference, using the SFU's requantizer. Generated by `python bench/numerics.py`.", "",
             "| variant | perplexity | vs float | what is quantized |", "|---|---:|---:|---|"]
    for row in r["rows"]:
        lines.append(f"| {row['variant']} | {row['ppl']:.3f} | {100 * row['vs_float']:+.2f}% | {row['description']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--chars", type=int, default=0, help="use the first N characters (0: the whole text)")
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--out", default=str(ROOT / "docs"))
    a = ap.parse_args()
    print(markdown(run(a.variants, a.chars, a.context, Path(a.out))))
