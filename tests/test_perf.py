"""`flightllm perf`: the performance model's command, its JSON and its errors."""

import json

from flightllm.cli import main

from conftest import write_tiny_gguf


def test_perf_json_llama2(capsys):
    assert main(["perf", "--positions", "1,512,4096", "--prompts", "128", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    pos = r["positions"]
    assert [p["position"] for p in pos] == [1, 512, 4096]
    for p in pos:
        assert {"position", "decode_tok_s", "hbm_bytes_per_token"} <= set(p)
        # the model never beats the bytes it must read at the preset's sustained bandwidth
        assert p["decode_tok_s"] <= 460e9 * r["timing"]["hbm_efficiency"] / p["hbm_bytes_per_token"]
    # longer contexts read more KV cache: slower, more bytes
    assert pos[0]["decode_tok_s"] > pos[1]["decode_tok_s"] > pos[2]["decode_tok_s"]
    assert pos[0]["hbm_bytes_per_token"] < pos[2]["hbm_bytes_per_token"]
    assert r["prefill"][0]["tokens"] == 128 and r["prefill"][0]["prefill_tok_s"] > pos[0]["decode_tok_s"]


def test_perf_int4_kv_reads_fewer_bytes(capsys):
    assert main(["perf", "--positions", "4096", "--prompts", "1", "--json"]) == 0
    int8 = json.loads(capsys.readouterr().out)["positions"][0]
    assert main(["perf", "--positions", "4096", "--prompts", "1", "--kv", "int4", "--json"]) == 0
    int4 = json.loads(capsys.readouterr().out)["positions"][0]
    assert int4["hbm_bytes_per_token"] < int8["hbm_bytes_per_token"]
    assert int4["decode_tok_s"] > int8["decode_tok_s"]


def test_perf_bad_input(capsys, tmp_path):
    assert main(["perf", "--model", "gpt-9"]) == 2
    assert "unknown model 'gpt-9'" in capsys.readouterr().err
    assert main(["perf", "--positions", "5000"]) == 2
    assert "position 5000 is outside 1..4096" in capsys.readouterr().err
    assert main(["perf", "--hw", "sim"]) == 2
    assert "does not fit hardware preset 'sim'" in capsys.readouterr().err
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf")
    assert main(["perf", "--model", str(bad)]) == 2
    assert str(bad) in capsys.readouterr().err
    gpt2 = write_tiny_gguf(tmp_path / "gpt2.gguf", arch="gpt2")
    assert main(["perf", "--model", str(gpt2)]) == 2
    err = capsys.readouterr().err
    assert "gpt2" in err and err.count("\n") == 1, err
