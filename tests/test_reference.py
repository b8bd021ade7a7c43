"""Float reference: RoPE layout, KV-cache consistency, and SmolLM2 coherence."""

import numpy as np
import pytest

from flightllm.compiler.gguf_import import load_gguf
from flightllm.compiler.reference import FloatLlama, apply_rope, perplexity, rope_tables


def _unpermute(w, n_head):
    """Undo llama.cpp's convert-time permutation: GGUF rows -> HF rows."""
    out, inp = w.shape
    return w.reshape(n_head, out // n_head // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def _rotate_half_rope(x, pos, theta):
    """HF transformers' RoPE: rotate the two halves of each head."""
    d = x.shape[-1]
    inv = theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    ang = pos[:, None] * inv[None]
    cos = np.concatenate([np.cos(ang)] * 2, -1)[:, None, :]
    sin = np.concatenate([np.sin(ang)] * 2, -1)[:, None, :]
    rot = np.concatenate([-x[..., d // 2:], x[..., : d // 2]], -1)
    return x * cos + rot * sin


def test_adjacent_pair_rope_matches_hf_on_unpermuted_weights(tiny_gguf):
    m = load_gguf(tiny_gguf)
    c = m.config
    rng = np.random.default_rng(0)
    h = rng.standard_normal((5, c.hidden)).astype(np.float32)
    pos = np.arange(3, 8)
    wq, wk = m.layer(0, "attn_q"), m.layer(0, "attn_k")
    cos, sin = rope_tables(c.head_dim, pos, c.rope_theta)
    q = apply_rope((h @ wq.T).reshape(5, c.n_heads, -1), cos, sin)
    k = apply_rope((h @ wk.T).reshape(5, c.n_kv_heads, -1), cos, sin)
    qh = _rotate_half_rope((h @ _unpermute(wq, c.n_heads).T).reshape(5, c.n_heads, -1), pos, c.rope_theta)
    kh = _rotate_half_rope((h @ _unpermute(wk, c.n_kv_heads).T).reshape(5, c.n_kv_heads, -1), pos, c.rope_theta)
    rep = c.n_heads // c.n_kv_heads
    s = np.einsum("thd,shd->hts", q, np.repeat(k, rep, axis=1))
    sh = np.einsum("thd,shd->hts", qh, np.repeat(kh, rep, axis=1))
    np.testing.assert_allclose(s, sh, rtol=1e-4, atol=1e-4)


def test_incremental_decode_matches_full_prefill(tiny_gguf):
    m = load_gguf(tiny_gguf)
    toks = [40, 41, 50, 60, 70, 80, 33]
    full = FloatLlama(m).forward(toks)
    inc = FloatLlama(m)
    rows = [inc.forward(toks[:3])[-1]] + [inc.forward([t])[-1] for t in toks[3:]]
    np.testing.assert_allclose(np.stack(rows), full[2:], rtol=1e-4, atol=1e-4)


def test_kv_cache_bound(tiny_gguf):
    ref = FloatLlama(load_gguf(tiny_gguf), max_seq=4)
    ref.forward([40, 41, 42])
    with pytest.raises(ValueError, match="exceeds the KV cache of 4"):
        ref.forward([43, 44])


@pytest.mark.model
def test_smollm2_answers_coherently(smollm2, smollm2_tokenizer):
    tok = smollm2_tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    ids = tok.encode(prompt)
    out = FloatLlama(smollm2, max_seq=256).generate(ids, 24, stop_ids=tok.eot_ids)
    text = tok.decode(out)
    assert "Paris" in text, text


@pytest.mark.model
def test_smollm2_completes_plain_text(smollm2, smollm2_tokenizer):
    tok = smollm2_tokenizer
    out = FloatLlama(smollm2, max_seq=64).generate(tok.encode("The capital of France is"), 4)
    assert tok.decode(out).strip().startswith("Paris"), tok.decode(out)


@pytest.mark.model
def test_smollm2_perplexity_is_sane(smollm2, smollm2_tokenizer):
    from pathlib import Path

    text = (Path(__file__).parents[1] / "bench/data/gpl-3.0.txt").read_text()[:6000]
    ids = smollm2_tokenizer.encode(text)
    res = perplexity(smollm2, ids, context=256)
    # A 135M model on legal English: single digits to low tens; random would be ~49152.
    assert 2.0 < res["ppl"] < 40.0, res
    assert res["tokens"] == len(ids) - -(-len(ids) // 256)
