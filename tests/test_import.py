"""GGUF import: hyper-parameters, tensor types, shapes, and every bad input."""

import numpy as np
import pytest

from conftest import TINY, write_tiny_gguf
from flightllm.compiler.gguf_import import GGUFError, load_gguf


@pytest.mark.parametrize("qtype,tol", [("F32", 0), ("F16", 1e-3), ("Q8_0", 0.02), ("Q4_0", 0.3), ("Q4_1", 0.3)])
def test_tensor_types(tmp_path, qtype, tol):
    ref = load_gguf(write_tiny_gguf(tmp_path / "f32.gguf"))
    m = load_gguf(write_tiny_gguf(tmp_path / f"{qtype}.gguf", qtype=qtype))
    a, b = ref.layer(1, "ffn_down"), m.layer(1, "ffn_down")
    assert a.shape == b.shape == (TINY["hidden"], TINY["ffn"])
    rel = np.abs(a - b).max() / np.abs(a).max()
    assert rel <= tol + 1e-7


def test_config(tiny_gguf):
    m = load_gguf(tiny_gguf)
    c = m.config
    assert (c.n_layers, c.hidden, c.ffn, c.n_heads, c.n_kv_heads, c.vocab) == (2, 128, 256, 4, 2, 128)
    assert c.head_dim == 32 and c.kv_dim == 64 and c.tied_embeddings
    assert m.lm_head is m.embedding
    assert c.param_count() == sum(t.size for n, t in m.tensors.items() if n != "output.weight")


def test_smollm2_config(smollm2):
    c = smollm2.config
    assert (c.n_layers, c.hidden, c.ffn, c.n_heads, c.n_kv_heads, c.vocab) == (30, 576, 1536, 9, 3, 49152)
    assert c.rope_theta == 100000.0 and abs(c.rms_eps - 1e-5) < 1e-9 and c.tied_embeddings
    assert smollm2.layer(0, "attn_k").shape == (192, 576)
    assert 134e6 < c.param_count() < 135e6


def test_truncated(tiny_gguf, tmp_path):
    data = tiny_gguf.read_bytes()
    bad = tmp_path / "trunc.gguf"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(GGUFError, match="trunc.gguf"):
        load_gguf(bad)


def test_corrupt_magic(tiny_gguf, tmp_path):
    bad = tmp_path / "junk.gguf"
    bad.write_bytes(b"NOTGGUF" + tiny_gguf.read_bytes()[7:])
    with pytest.raises(GGUFError, match="junk.gguf: not a readable GGUF"):
        load_gguf(bad)


def test_missing_file(tmp_path):
    with pytest.raises(GGUFError, match="no such file"):
        load_gguf(tmp_path / "nope.gguf")


def test_not_llama(tmp_path):
    p = write_tiny_gguf(tmp_path / "gpt2.gguf", arch="gpt2")
    with pytest.raises(GGUFError, match="general.architecture is 'gpt2'"):
        load_gguf(p)


def test_unsupported_type(tmp_path):
    # I8 is a GGML integer type, not a weight encoding flightllm imports
    p = write_tiny_gguf(tmp_path / "i8.gguf", raw={"blk.0.ffn_up.weight": np.zeros((256, 128), np.int8)})
    with pytest.raises(GGUFError, match="i8.gguf: tensor 'blk.0.ffn_up.weight' has type I8"):
        load_gguf(p)


def test_missing_tensor(tmp_path):
    p = write_tiny_gguf(tmp_path / "m.gguf", drop=("blk.1.attn_v.weight",))
    with pytest.raises(GGUFError, match="missing tensor 'blk.1.attn_v.weight'"):
        load_gguf(p)


def test_wrong_shape(tmp_path):
    p = write_tiny_gguf(tmp_path / "s.gguf", shapes={"blk.0.attn_q.weight": (128, 64)})
    with pytest.raises(GGUFError, match=r"blk.0.attn_q.weight.*expected \(128, 128\)"):
        load_gguf(p)
