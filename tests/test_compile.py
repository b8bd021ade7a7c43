"""Compression and the artifact: masks, allocation, packing into files, and bad inputs."""

import json
import os

import numpy as np
import pytest

from conftest import write_tiny_gguf
from flightllm.cli import main as cli
from flightllm.compiler.artifact import Artifact, ArtifactError
from flightllm.compiler.compile import compile_model
from flightllm.compiler.compress import (PRESETS, Recipe, allocate_mixed, bytes_per_param,
                                         compress_tensor, get_recipe, measure_candidates,
                                         measure_sensitivity, nm_mask)
from flightllm.compiler.gguf_import import load_gguf
from flightllm.hw.formats import WeightFormat
from flightllm.hw.params import get_preset

CALIB = "The quick brown fox jumps over the lazy dog. " * 20


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (2, 8), (8, 16), (4, 4)])
def test_nm_mask_keeps_exactly_n_of_m(n, m):
    rng = np.random.default_rng(n * 100 + m)
    w = rng.standard_normal((7, 64))
    act = rng.uniform(0.1, 5, 64)
    mask = nm_mask(w, n, m, act)
    assert (mask.reshape(7, -1, m).sum(axis=2) == n).all()
    # Wanda: the kept ones are the highest |w| * ||x|| of their window
    score = (np.abs(w) * np.sqrt(act)).reshape(7, -1, m)
    kept_min = np.where(mask.reshape(score.shape), score, np.inf).min(axis=2)
    dropped_max = np.where(~mask.reshape(score.shape), score, -np.inf).max(axis=2)
    assert (kept_min >= dropped_max).all()


def test_activation_weighting_changes_the_choice():
    w = np.array([[1.0, 0.9, 0.1, 0.1]])
    assert nm_mask(w, 1, 4)[0].tolist() == [True, False, False, False]
    assert nm_mask(w, 1, 4, np.array([1.0, 4.0, 1.0, 1.0]))[0].tolist() == [False, True, False, False]


def test_clip_search_never_worse_than_absmax():
    rng = np.random.default_rng(3)
    w = rng.standard_t(3, size=(16, 128)).astype(np.float32)      # heavy tails: clipping pays
    fmt = WeightFormat.parse("int4")
    ct = compress_tensor("t", w, fmt, None)
    from flightllm.hw.formats import quantize_groups
    q, s, sh = quantize_groups(w, fmt)
    plain = ((q * np.repeat(s * 2.0 ** -sh, 64, axis=1) - w) ** 2).sum()
    assert ct.error <= plain
    assert ct.error < 0.95 * plain


def test_allocation_meets_budget_and_prefers_sensitive_tensors(tiny_gguf):
    model = load_gguf(tiny_gguf)
    trials = measure_candidates(model, ("int8", "int4", "int2"), None)
    for bpp in (0.35, 0.5, 0.8):
        comp = allocate_mixed(model, Recipe("x", budget_bpp=bpp, candidates=()), trials)
        assert bytes_per_param(model, comp) <= bpp
    with pytest.raises(ValueError, match="below the smallest candidates"):
        allocate_mixed(model, Recipe("x", budget_bpp=0.1), trials)


def test_sensitivity_scales_allocation(tiny_gguf):
    model = load_gguf(tiny_gguf)
    trials = measure_candidates(model, ("int8", "int4", "int3"), None)
    sens = measure_sensitivity(model, trials, np.arange(40, 72))
    assert set(sens) == set(n for n, _ in trials) and all(v >= 0 for v in sens.values())
    # a matrix made 1000x more sensitive gets the widest format first
    sens2 = dict(sens, **{"blk.1.ffn_down.weight": 1000 * max(sens.values())})
    comp = allocate_mixed(model, Recipe("x", budget_bpp=0.5), trials, sens2)
    assert comp["blk.1.ffn_down.weight"].fmt.name == "int8"
    assert bytes_per_param(model, comp) <= 0.5


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown compression preset 'w5'"):
        get_recipe("w5")


def test_compile_tiny_round_trip(tmp_path):
    src = write_tiny_gguf(tmp_path / "tiny.gguf")
    calib = tmp_path / "calib.txt"
    calib.write_text(CALIB)
    out = tmp_path / "art"
    summary = compile_model(src, out, "w4-2:4-mlp", get_preset("sim"), CALIB, progress=False)
    assert summary["formats"] == {"int4": 9, "int4-2:4": 6}
    art = Artifact(out)
    assert art.params == get_preset("sim") and art.config.n_layers == 2
    man = json.loads((out / "manifest.json").read_text())
    assert man["tensors"]["blk.0.ffn_up.weight"]["format"] == "int4-2:4"
    assert json.loads((out / "params.json").read_text())["name"] == "sim"
    q, s, sh, fmt = art.unpacked("blk.1.ffn_down.weight")
    assert fmt.name == "int4-2:4" and q.shape == (128, 256)
    assert (((q != 0).reshape(128, -1, 4)).sum(axis=2) <= 2).all()
    np.testing.assert_array_equal(art.table("blk.0.attn_norm"), load_gguf(src).layer(0, "attn_norm"))
    assert cli(["info", str(out)]) == 0
    # recompiling replaces the artifact and leaves no temp dirs behind
    compile_model(src, out, "w8", get_preset("sim"), CALIB, progress=False)
    assert Artifact(out).preset == "w8"
    assert sorted(os.listdir(tmp_path)) == ["art", "calib.txt", "tiny.gguf"]


def test_artifact_detects_corruption(tmp_path):
    src = write_tiny_gguf(tmp_path / "tiny.gguf")
    out = tmp_path / "art"
    compile_model(src, out, "w8", get_preset("sim"), CALIB, progress=False)
    img = out / "weights/ch01.bin"
    data = bytearray(img.read_bytes())
    data[100] ^= 1
    img.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"ch01.bin: checksum mismatch"):
        Artifact(out)
    img.write_bytes(bytes(data[:-64]))
    with pytest.raises(ArtifactError, match=r"ch01.bin: .* bytes, manifest says .*truncated"):
        Artifact(out)


def _cli_fails(args, capsys, match):
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert match in err, err
    assert err.count("\n") == 1                       # one clear line


def test_cli_bad_inputs_leave_nothing(tmp_path, capsys):
    good = write_tiny_gguf(tmp_path / "tiny.gguf")
    calib = tmp_path / "c.txt"
    calib.write_text(CALIB)
    base = ["compile", "-q", "--hw", "sim", "--calib", str(calib)]
    out = tmp_path / "out"
    _cli_fails(base + [str(good), "-o", str(out), "--preset", "nope"], capsys, "unknown compression preset 'nope'")
    _cli_fails(base + [str(good), "-o", str(tmp_path / "no/such/dir"), "--preset", "w8"], capsys,
               "does not exist")
    trunc = tmp_path / "trunc.gguf"
    trunc.write_bytes(good.read_bytes()[:5000])
    _cli_fails(base + [str(trunc), "-o", str(out), "--preset", "w8"], capsys, "trunc.gguf")
    odd = write_tiny_gguf(tmp_path / "odd.gguf", hidden=96, n_heads=3, n_kv_heads=1, ffn=192)
    _cli_fails(base + [str(odd), "-o", str(out), "--preset", "w8"], capsys,
               "tensor 'blk.0.attn_q.weight': input size 96 is not a multiple of the quant group size 64")
    _cli_fails(base + [str(good), "-o", str(out), "--preset", "w8", "--hw", "zcu104"], capsys,
               "unknown hardware preset 'zcu104'")
    _cli_fails(base + [str(good), "-o", str(out), "--preset", "float"], capsys, "no packed form")
    assert sorted(os.listdir(tmp_path)) == ["c.txt", "odd.gguf", "tiny.gguf", "trunc.gguf"]


def test_every_preset_is_well_formed():
    for name, r in PRESETS.items():
        if r.is_float:
            continue
        for text in (r.attn, r.mlp, r.embed) + tuple(r.candidates):
            WeightFormat.parse(text)


@pytest.mark.model
def test_compile_smollm2(smollm2_w8_artifact, smollm2_tokenizer):
    out = smollm2_w8_artifact
    art = Artifact(out)
    assert 1.03 < art.manifest["compression"]["bytes_per_param"] < 1.04   # 8.25 bits + norm tables
    assert len(art.tensor_names()) == 30 * 7 + 1
    assert len(os.listdir(out / "weights")) == 32
    from flightllm.compiler.tokenizer import Tokenizer
    tok = Tokenizer.from_dict(json.loads((out / "tokenizer.json").read_text()))
    assert tok.encode("Hello world") == smollm2_tokenizer.encode("Hello world")
