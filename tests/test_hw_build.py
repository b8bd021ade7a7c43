"""Verilog build of the matrix engine: files, ports, CLI, and a clean Verilator lint."""

import argparse
import json
import os
import re
import subprocess

import pytest

from flightllm.hw.build import TOP_NAME, add_cli, build_verilog
from flightllm.hw.params import HwParams, get_preset


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """Verilog of ``sim`` and ``u280-2ch`` (the u280's per-channel geometry), built once."""
    out = {}
    for name in ("sim", "u280-2ch"):
        d = tmp_path_factory.mktemp(name)
        out[name] = (d, build_verilog(get_preset(name), d))
    return out


@pytest.mark.rtl
def test_build_writes_verilog_and_params(builds):
    out, paths = builds["sim"]
    assert [p.name for p in paths] == [f"{TOP_NAME}.v", "params.json"]
    assert HwParams.from_dict(json.loads(paths[1].read_text())) == get_preset("sim")
    text = paths[0].read_text()
    head = re.search(rf"module {TOP_NAME}\((.*?)\);", text, re.S).group(1)
    ports = {p.strip() for p in head.split(",")}
    want = {"clk", "rst", "busy"} | {f"{s}__{k}" for s in ("cfg", "act", "out", "words0", "words1")
                                       for k in ("valid", "ready", "payload")}
    assert ports == want                          # one record stream per channel, nothing else
    assert not list(out.glob(".*.tmp")), "temporary files left behind"


@pytest.mark.rtl
@pytest.mark.parametrize("preset", ["sim", "u280-2ch"])
def test_verilator_lint_clean(builds, preset):
    """-Wall with only the named, justified waivers of sim/rtl.py."""
    from flightllm.sim.rtl import verilator_env, waiver_args

    env = verilator_env()
    _, paths = builds[preset]
    r = subprocess.run(["verilator", "--lint-only", "-Wall", *waiver_args(), "--top-module", TOP_NAME,
                        str(paths[0])], capture_output=True, text=True, env={**os.environ, **env})
    assert r.returncode == 0 and "%Warning" not in r.stderr and "%Error" not in r.stderr, r.stderr[-3000:]


def test_cli_registers_build_hw(tmp_path):
    ap = argparse.ArgumentParser(prog="flightllm")
    add_cli(ap.add_subparsers(dest="cmd"))
    args = ap.parse_args(["build-hw", "--preset", "sim", "-o", str(tmp_path / "x")])
    assert (args.preset, args.output) == ("sim", str(tmp_path / "x"))
    with pytest.raises(SystemExit):
        ap.parse_args(["build-hw", "--preset", "nope", "-o", "/tmp/x"])


def test_build_rejects_bad_params(tmp_path):
    with pytest.raises(TypeError, match="HwParams"):
        build_verilog("sim", tmp_path)
    bad = HwParams(name="bad", clock_mhz=100.0, chains=3, chain_len=8, dsp_group=4, weight_channels=1)
    with pytest.raises(ValueError, match="chains a power of two"):
        build_verilog(bad, tmp_path)
    assert not list(tmp_path.iterdir())
