"""Verilog build of the kernel and of the matrix engine: files, ports, CLI, and a clean Verilator lint."""

import argparse
import json
import os
import re
import subprocess

import pytest

from flightllm.hw.build import KERNEL_NAME, TOP_NAME, add_cli, build_verilog
from flightllm.hw.params import HwParams, get_preset


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """Verilog of ``sim`` and ``u280-2ch`` (the u280's per-channel geometry), built once."""
    out = {}
    for name in ("sim", "u280-2ch"):
        d = tmp_path_factory.mktemp(name)
        out[name] = (d, build_verilog(get_preset(name), d, "mpe"))
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
    assert (args.preset, args.output, args.design) == ("sim", str(tmp_path / "x"), "kernel")
    assert ap.parse_args(["build-hw", "-o", "d", "--design", "mpe"]).design == "mpe"
    with pytest.raises(SystemExit):
        ap.parse_args(["build-hw", "--preset", "nope", "-o", "/tmp/x"])


def test_build_rejects_bad_params(tmp_path):
    with pytest.raises(TypeError, match="HwParams"):
        build_verilog("sim", tmp_path)
    bad = HwParams(name="bad", clock_mhz=100.0, chains=3, chain_len=8, dsp_group=4, weight_channels=1)
    with pytest.raises(ValueError, match="chains a power of two"):
        build_verilog(bad, tmp_path)
    assert not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def kernel_v():
    """The sim kernel's Verilog (the one the RTL tests simulate, generated once per sources)."""
    from flightllm.sim import rtl
    return rtl.verilog(get_preset("sim"), rtl.KERNEL)


@pytest.mark.rtl
def test_kernel_ports_are_what_vitis_expects(kernel_v):
    from flightllm.hw.axi import axi4_signature
    from flightllm.hw.axil import axil_signature
    from flightllm.hw.regmap import register_map

    p = get_preset("sim")
    rm = register_map(p)
    head = re.search(rf"module {KERNEL_NAME}\((.*?)\);", kernel_v.read_text(), re.S).group(1)
    ports = {x.strip() for x in head.split(",")}
    from flightllm.hw.control import UNIT_NAMES
    from flightllm.hw.kernel import Kernel

    # the simulated kernel carries trace outputs; the Vitis kernel (trace=False) does not
    traced = {"trace_issue", "trace_done"} | {f"trace_pc_{n}" for n in UNIT_NAMES}
    vitis = Kernel(p)
    vitis._MustUse__silence = True                # only its signature is looked at
    assert not traced & set(vitis.signature.members)
    want = {"ap_clk", "ap_rst_n", "interrupt"} | traced
    want |= {f"s_axi_control_{n}" for n in axil_signature(rm.addr_bits).members}
    for port in rm.ports:                        # one m_axi per pointer argument, and its IDs
        want |= {f"m_axi_{port}_{n}" for n in axi4_signature().members}
        want |= {f"m_axi_{port}_{n}" for n in ("arid", "awid", "rid", "bid")}
    assert ports == want, (ports ^ want)


@pytest.mark.rtl
def test_kernel_verilator_lint_clean(kernel_v):
    """-Wall with only the named, justified waivers of sim/rtl.py (global and the kernel's)."""
    from flightllm.sim.rtl import KERNEL, verilator_env, waiver_args

    env = verilator_env()
    own = [f"-Wno-{w}" for w, _ in KERNEL.waivers]
    r = subprocess.run(["verilator", "--lint-only", "-Wall", *waiver_args(), *own, "--top-module", KERNEL_NAME,
                        str(kernel_v)], capture_output=True, text=True, env={**os.environ, **env})
    assert r.returncode == 0 and "%Warning" not in r.stderr and "%Error" not in r.stderr, r.stderr[-3000:]


def test_build_hw_writes_the_kernel(tmp_path, monkeypatch):
    """`build-hw` writes flightllm_kernel.v (the default design) and params.json, atomically."""
    import flightllm.hw.build as B

    monkeypatch.setattr(B, "verilog_text", lambda params, design="kernel": f"module {B.DESIGNS[design][0]}(); endmodule\n")
    paths = build_verilog(get_preset("sim"), tmp_path / "o")
    assert [x.name for x in paths] == [f"{KERNEL_NAME}.v", "params.json"]
    with pytest.raises(ValueError, match="unknown design"):
        build_verilog(get_preset("sim"), tmp_path / "p", "nope")
    assert not (tmp_path / "p").exists()
