"""Compression and the artifact: masks, allocation, packing into files, and bad inputs."""

import dataclasses
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


def _absmax_rtn(w, g, qmax):
    """Plain symmetric round-to-nearest with the absmax scale (no search), float64."""
    n, k = w.shape
    s = np.abs(w.reshape(n, k // g, g)).max(axis=2, keepdims=True) / qmax
    return (np.clip(np.rint(w.reshape(n, k // g, g) / s), -qmax, qmax) * s).reshape(n, k)


def test_clip_search_never_worse_than_absmax():
    rng = np.random.default_rng(3)
    w = rng.standard_t(3, size=(16, 128)).astype(np.float32)      # heavy tails: clipping pays
    ct = compress_tensor("t", w, WeightFormat.parse("int4/32"), None)
    plain = ((_absmax_rtn(w, 32, 7) - w) ** 2).sum()
    assert ct.error < 0.8 * plain                                  # full range + clip search


def test_asymmetric_fit_beats_symmetric_on_skewed_groups():
    rng = np.random.default_rng(4)
    w = (rng.standard_normal((16, 128)) * 0.02 + np.repeat(rng.standard_normal((16, 4)) * 0.05, 32, axis=1)
         ).astype(np.float32)                                       # every group has an offset
    sym = compress_tensor("t", w, WeightFormat.parse("int4/32"), None)
    asym = compress_tensor("t", w, WeightFormat.parse("int4m/32"), None)
    assert asym.error < 0.5 * sym.error
    assert asym.qt.q.min() >= 0 and asym.qt.q.max() <= 15


def test_allocation_meets_budget_and_prefers_sensitive_tensors(tiny_gguf):
    model = load_gguf(tiny_gguf)
    trials = measure_candidates(model, ("int8/32", "int4/32", "int3/32"), None)
    for bpp in (0.45, 0.6, 0.9):
        comp = allocate_mixed(model, Recipe("x", budget_bpp=bpp, candidates=()), trials)
        assert bytes_per_param(model, comp) <= bpp
    with pytest.raises(ValueError, match="below the smallest candidates"):
        allocate_mixed(model, Recipe("x", budget_bpp=0.1), trials)


def test_sensitivity_scales_allocation(tiny_gguf):
    model = load_gguf(tiny_gguf)
    trials = measure_candidates(model, ("int8/32", "int4/32", "int3/32"), None)
    sens = measure_sensitivity(model, trials, np.arange(40, 72), probe="int3/32")
    assert set(sens) == set(n for n, _ in trials) and all(v >= 0 for v in sens.values())
    # a matrix made 1000x more sensitive gets the widest format first
    sens2 = dict(sens, **{"blk.1.ffn_down.weight": 1000 * max(sens.values())})
    comp = allocate_mixed(model, Recipe("x", budget_bpp=0.55), trials, sens2)
    assert comp["blk.1.ffn_down.weight"].fmt.name == "int8/32"
    assert bytes_per_param(model, comp) <= 0.55


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown compression preset 'w5'"):
        get_recipe("w5")


def test_compile_tiny_round_trip(tmp_path):
    src = write_tiny_gguf(tmp_path / "tiny.gguf")
    calib = tmp_path / "calib.txt"
    calib.write_text(CALIB)
    out = tmp_path / "art"
    summary = compile_model(src, out, "w4-2:4-mlp", get_preset("sim"), CALIB, progress=False)
    assert summary["formats"] == {"int4/32": 9, "int4-2:4/64": 6}
    art = Artifact(out)
    assert art.params == get_preset("sim") and art.config.n_layers == 2
    man = json.loads((out / "manifest.json").read_text())
    assert man["tensors"]["blk.0.ffn_up.weight"]["format"] == "int4-2:4/64"
    assert json.loads((out / "params.json").read_text())["name"] == "sim"
    qt = art.unpacked("blk.1.ffn_down.weight")
    assert qt.fmt.name == "int4-2:4/64" and qt.q.shape == (128, 256)
    assert (((qt.q != 0).reshape(128, -1, 4)).sum(axis=2) <= 2).all()
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
    odd = write_tiny_gguf(tmp_path / "odd.gguf", hidden=80, n_heads=5, n_kv_heads=1, ffn=160)
    _cli_fails(base + [str(odd), "-o", str(out), "--preset", "w8"], capsys,
               "tensor 'blk.0.attn_q.weight': input size 80 is not a multiple of the quant group size 32")
    _cli_fails(base + [str(good), "-o", str(out), "--preset", "w8", "--hw", "zcu104"], capsys,
               "unknown hardware preset 'zcu104'")
    _cli_fails(base + [str(good), "-o", str(out), "--preset", "float"], capsys, "no packed form")
    # KV options beyond what the attention instructions can encode
    _cli_fails(base + [str(good), "-o", str(out), "--preset", "w8", "--sink", "2"], capsys,
               "sink 2 (0..15 blocks) needs a window")
    _cli_fails(base + [str(good), "-o", str(out), "--preset", "w8", "--window", "300"], capsys,
               "got window 300")
    # native: an F32 GGUF has no native format; the error names the tensor, its type and a preset
    _cli_fails(base + [str(good), "-o", str(out), "--preset", "native"], capsys,
               "tensor 'blk.0.attn_q.weight' is F32, which has no native format")
    # a format outside the build's set
    only8 = tmp_path / "sim-int8.json"
    only8.write_text(dataclasses.replace(get_preset("sim"), name="sim-int8", weight_formats=("int8/32",)).to_json())
    _cli_fails(base + [str(good), "-o", str(out), "--preset", "w4", "--hw", str(only8)], capsys,
               "tensor 'blk.0.attn_q.weight': format int4/32 is not in hardware preset 'sim-int8'")
    # binary16 scales the fixed point cannot hold
    wild = _wild_scale_gguf(tmp_path / "wild.gguf")
    _cli_fails(base + [str(wild), "-o", str(out), "--preset", "native"], capsys,
               "tensor 'blk.0.attn_q.weight' (int8/32): binary16 scales/mins span exponents")
    assert sorted(os.listdir(tmp_path)) == ["c.txt", "odd.gguf", "sim-int8.json", "tiny.gguf", "trunc.gguf",
                                            "wild.gguf"]


def _wild_scale_gguf(path):
    """A Q8_0 GGUF whose first attention matrix has groups 2**26 apart in scale."""
    import gguf
    rng = np.random.default_rng(0)
    a = (rng.standard_normal((128, 128)) / 12).astype(np.float32)
    a[0, :32] *= 2.0 ** -14
    a[1, :32] *= 2.0 ** 12
    raw = {n: gguf.quants.quantize(v, gguf.GGMLQuantizationType.Q8_0) for n, v in [("blk.0.attn_q.weight", a)]}
    return write_tiny_gguf(path, qtype="Q8_0", raw_q8=raw)


def test_native_preset_keeps_the_gguf_integers(tmp_path):
    """Q4_1 / Q4_0 / Q8_0 tensors are packed as they are: the artifact dequantizes like gguf-py."""
    import gguf
    from gguf.quants import dequantize
    src = write_tiny_gguf(tmp_path / "q.gguf", qtype="Q4_1", embd_qtype="Q8_0", q_qtype="Q4_0")
    out = tmp_path / "art"
    summary = compile_model(src, out, "native", get_preset("sim"), CALIB, progress=False)
    assert summary["formats"] == {"int4/32": 2, "int4m/32": 12, "int8/32": 1}
    art = Artifact(out)
    r = gguf.GGUFReader(str(src))
    for t in r.tensors:
        if t.name in art.tensor_names():
            ref = np.asarray(dequantize(t.data, t.tensor_type), np.float32).reshape(art.unpacked(t.name).shape)
            assert np.array_equal(art.dequantized(t.name), ref), t.name


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
    assert 1.06 < art.manifest["compression"]["bytes_per_param"] < 1.07   # 8.5 bits (Q8_0 layout) + norm tables
    assert len(art.tensor_names()) == 30 * 7 + 1
    assert len(os.listdir(out / "weights")) == 32
    from flightllm.compiler.tokenizer import Tokenizer
    tok = Tokenizer.from_dict(json.loads((out / "tokenizer.json").read_text()))
    assert tok.encode("Hello world") == smollm2_tokenizer.encode("Hello world")
