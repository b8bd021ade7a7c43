"""Verilog build of the matrix engine: files, CLI, and a clean Verilator lint."""

import argparse
import json
import subprocess

import pytest

from flightllm.hw.build import TOP_NAME, add_cli, build_verilog
from flightllm.hw.params import HwParams, get_preset


@pytest.fixture(scope="module")
def sim_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("hw")
    return out, build_verilog(get_preset("sim"), out)


@pytest.mark.rtl
def test_build_writes_verilog_and_params(sim_build):
    out, paths = sim_build
    assert [p.name for p in paths] == [f"{TOP_NAME}.v", "params.json"]
    assert HwParams.from_dict(json.loads(paths[1].read_text())) == get_preset("sim")
    text = paths[0].read_text()
    assert f"module {TOP_NAME}(" in text
    for port in ("cfg__valid", "payload0__ready", "scales1__payload", "act__payload", "out__ready"):
        assert port in text
    assert not list(out.glob(".*.tmp")), "temporary files left behind"


@pytest.mark.rtl
def test_verilator_lint_clean(sim_build):
    """-Wall with only the named, justified waivers of sim/rtl.py."""
    from flightllm.sim.rtl import VERILATOR_WAIVERS, verilator_env, waiver_args

    env = verilator_env()
    assert all(VERILATOR_WAIVERS.values())
    _, paths = sim_build
    r = subprocess.run(["verilator", "--lint-only", "-Wall", *waiver_args(), "--top-module", TOP_NAME,
                        str(paths[0])], capture_output=True, text=True, env={**__import__("os").environ, **env})
    assert r.returncode == 0 and "%Warning" not in r.stderr and "%Error" not in r.stderr, r.stderr[-3000:]


def test_cli_registers_build_hw():
    ap = argparse.ArgumentParser(prog="flightllm")
    add_cli(ap.add_subparsers(dest="cmd"))
    args = ap.parse_args(["build-hw", "--preset", "sim", "-o", "/tmp/x"])
    assert args.preset == "sim" and args.output == "/tmp/x" and callable(args.func)
    with pytest.raises(SystemExit):
        ap.parse_args(["build-hw", "--preset", "nope", "-o", "/tmp/x"])


def test_build_rejects_bad_params(tmp_path):
    with pytest.raises(TypeError, match="HwParams"):
        build_verilog("sim", tmp_path)
    bad = HwParams(name="bad", clock_mhz=100.0, chains=3, chain_len=8, dsp_group=4, weight_channels=1)
    with pytest.raises(ValueError, match="chains a power of two"):
        build_verilog(bad, tmp_path)
    assert not list(tmp_path.iterdir())
