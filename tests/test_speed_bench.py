"""bench/speed.py's orchestration without any model: the rotation of the rounds, the
worker protocol (fake workers in real subprocesses), the agreement count, the skip lines
of a missing peer environment, and the markdown table from a result dict."""

import importlib.util
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def speed():
    spec = importlib.util.spec_from_file_location("bench_speed", ROOT / "bench" / "speed.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# speaks bench/speed_worker.py's protocol; the golden path leaves the others' tokens after
# 3, FAKE_FAIL names a path that fails to load
FAKE_WORKER = textwrap.dedent("""
    import json, os, sys
    path = sys.argv[1]
    if path == os.environ.get("FAKE_FAIL"):
        print(json.dumps({"ready": False, "error": "ImportError: no module named fake"}), flush=True)
        sys.exit(1)
    print(json.dumps({"ready": True, "load_s": 0.5, "versions": {"python": "3", "numpy": "2"},
                      "threads": {"n": 1}}), flush=True)
    speed = {"golden": 2.0, "reference": 1.0}[path]
    for line in sys.stdin:
        c = json.loads(line)
        n = c["tokens"]
        toks = [c["prompt"][-1] + i for i in range(n + 1)]
        if path == "golden":
            toks[3:] = [0] * (n - 2)
        print(json.dumps({"tokens": toks, "prompt_s": 0.1, "decode_s": n / speed, "decode_cpu_s": n / speed,
                          "prefill_s": 0.2 / speed, "prefill_cpu_s": 0.2}), flush=True)
""")


class FakeTok:
    def encode(self, text):
        return [len(text), 7]


@pytest.fixture
def fake(speed, tmp_path, monkeypatch):
    import flightllm.compiler.gguf_import as gi
    import flightllm.compiler.tokenizer as tk

    w = tmp_path / "fake_worker.py"
    w.write_text(FAKE_WORKER)
    monkeypatch.setattr(speed, "WORKER", w)
    monkeypatch.setattr(gi, "default_model_path", lambda: tmp_path / "model.gguf")
    monkeypatch.setattr(tk.Tokenizer, "from_gguf", classmethod(lambda cls, p: FakeTok()))
    return tmp_path


def test_rotation(speed):
    paths = ("golden", "reference", "transformers", "llama.cpp")
    orders = [speed.rotation(paths, r) for r in range(4)]
    assert all(sorted(o) == sorted(paths) for o in orders)
    assert [o[0] for o in orders] == list(paths)          # each path goes first once
    assert speed.rotation(paths, 4) == list(paths)
    assert speed.rotation((), 3) == []


def test_leading_agreement(speed):
    assert speed.leading_agreement([1, 2, 3], [1, 2, 3]) == 3
    assert speed.leading_agreement([1, 2, 4, 5], [1, 2, 3, 5]) == 2
    assert speed.leading_agreement([9], [1]) == 0


def test_missing_peer_venv_gives_skip_lines(speed, tmp_path):
    venv = tmp_path / "no-peers"
    py, skip, installed = speed.peer_python(("golden", "transformers", "llama.cpp"), install=False, venv=venv)
    assert py is None and installed == {}
    assert set(skip) == {"transformers", "llama.cpp"}
    assert all("--peers" in why and str(venv) in why for why in skip.values())
    assert not venv.exists()                               # only --peers creates it


def test_compare_alternates_and_skips(speed, fake, monkeypatch):
    s = speed.compare(paths=("golden", "reference", "transformers"), n_tokens=6, rounds=3,
                      venv=fake / "no-peers", log=lambda *a: None)
    assert s["order"] == [["golden", "reference"], ["reference", "golden"], ["golden", "reference"]]
    assert len(s["load_average"]) == 3 and all(len(x) == 2 for x in s["load_average"])
    g, r = s["paths"]["golden"], s["paths"]["reference"]
    assert g["decode_tokens_per_s"] == pytest.approx(2.0) and r["decode_tokens_per_s"] == pytest.approx(1.0)
    assert len(g["decode_tokens_per_s_rounds"]) == 3 and g["same_tokens_every_round"]
    assert g["agree_with"] == "reference" and g["agreeing_tokens"] == 3 and r["agreeing_tokens"] == 7
    assert "--peers" in s["skipped"]["transformers"]

    llama2 = {"weights_bytes": 3.9e9, "clock_mhz": 225, "peak_hbm_gbps": 460, "decode": [], "prefill": []}
    md = speed.markdown({"smollm2": s, "llama2": llama2})
    rows = [ln for ln in md.splitlines() if ln.startswith("| ")]
    assert rows[1].startswith("| golden model") and "| 2.0 |" in rows[1] and "| 3/7 |" in rows[1]
    assert rows[2].startswith("| float32 numpy reference") and "| 7/7 |" in rows[2]
    assert rows[3].startswith("| HF transformers") and "skipped" in rows[3]
    assert "- transformers skipped: no peer environment" in md
    assert "Golden model decode speed: 2.00x reference." in md

    # a path whose worker cannot load its model is skipped with the worker's reason
    monkeypatch.setenv("FAKE_FAIL", "golden")
    s = speed.compare(paths=("golden", "reference"), n_tokens=2, rounds=1, log=lambda *a: None)
    assert list(s["paths"]) == ["reference"]
    assert "ImportError: no module named fake" in s["skipped"]["golden"]


def test_plot(speed, fake):
    s = speed.compare(paths=("golden", "reference"), n_tokens=2, rounds=2, log=lambda *a: None)
    speed.plot(s, fake / "speed.png")
    assert (fake / "speed.png").read_bytes()[:4] == b"\x89PNG"


def test_llama_cpp_build_is_native_without_amx(speed, monkeypatch):
    monkeypatch.setattr(speed.platform, "machine", lambda: "x86_64")
    env, extra = speed.peer_build("llama.cpp")
    assert env["CMAKE_ARGS"] == "-DGGML_NATIVE=ON" and "--no-cache-dir" in extra
    assert all("-mno-amx-int8" in env[k] for k in ("CFLAGS", "CXXFLAGS"))
    assert speed.peer_build("transformers") == ({}, [])
