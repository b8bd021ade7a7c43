"""The runtime CLI: generate, chat, disasm and perplexity through the golden model."""

import json
import os

import pytest

from flightllm.cli import main
from flightllm.compiler.compile import compile_model
from flightllm.hw.params import get_preset

from conftest import write_tiny_gguf

CALIB = "the quick brown fox jumps over the lazy dog. " * 20


pytestmark = pytest.mark.usefixtures("isolated_cache")


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    d = tmp_path_factory.mktemp("drv")
    g = write_tiny_gguf(d / "tiny.gguf")
    compile_model(g, d / "art", "w8", get_preset("sim"), calib_text=CALIB, progress=False)
    return d / "art"


def test_generate_streams_and_is_deterministic(art, capsys):
    assert main(["generate", "--artifact", str(art), "--prompt", "hello", "--max-new-tokens", "5", "-q"]) == 0
    a = capsys.readouterr().out
    assert main(["generate", "--artifact", str(art), "--prompt", "hello", "--max-new-tokens", "5", "-q"]) == 0
    assert capsys.readouterr().out == a
    assert main(["generate", "--artifact", str(art), "--prompt", "hello", "--max-new-tokens", "5",
                 "--temperature", "0.9", "--top-k", "10", "--top-p", "0.9", "--seed", "3"]) == 0
    err = capsys.readouterr().err
    assert "generated tokens" in err and "tok/s on sim" in err


def test_generate_chat_wraps_the_prompt_in_the_template(art, capsys):
    assert main(["generate", "--artifact", str(art), "--prompt", "hi", "--chat", "--max-new-tokens", "4", "-q"]) == 0
    chat = capsys.readouterr().out
    templated = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"     # the ChatML fallback
    assert main(["generate", "--artifact", str(art), "--prompt", templated, "--max-new-tokens", "4", "-q"]) == 0
    assert capsys.readouterr().out == chat


def test_chat_with_piped_stdin(art, capsys, monkeypatch):
    import io
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n\nhow are you\n/exit\n"))
    assert main(["chat", "--artifact", str(art), "--max-new-tokens", "4", "-q"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") >= 2


def test_disasm(art, capsys):
    assert main(["disasm", str(art), "--program", "decode"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("; program decode:") and "QK" in out and "PV" in out and "SOFTMAX" in out and "END" in out


def test_perplexity_golden_path(art, tmp_path, capsys):
    txt = tmp_path / "t.txt"
    txt.write_text("the quick brown fox jumps over the lazy dog. " * 8)
    assert main(["perplexity", "--text", str(txt), "--artifact", str(art), "--context", "64", "--json", "-q"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["tokens"] > 0 and res["ppl"] > 1 and "golden" in res["path"]


def test_cli_bad_inputs(art, tmp_path, capsys):
    assert main(["generate", "--artifact", str(art), "--prompt", "x" * 200, "--max-new-tokens", "5"]) == 2
    err = capsys.readouterr().err
    assert "exceeds the artifact's maximum sequence length of 128" in err and len(err.strip().splitlines()) == 1
    assert main(["generate", "--artifact", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert "manifest.json: missing" in capsys.readouterr().err
    assert main(["generate", "--artifact", str(art), "--prompt", "x", "--hw", "u280"]) == 2
    assert "built for hardware 'sim'" in capsys.readouterr().err
    assert main(["generate", "--artifact", str(art), "--prompt", "x", "--top-p", "0"]) == 2
    assert "--top-p" in capsys.readouterr().err
