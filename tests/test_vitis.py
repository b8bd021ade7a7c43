"""Vitis packaging and link files (hw/vitis.py) checked against the kernel Verilog of the ``sim``
preset: ports, interfaces, register offsets and widths, kernel name, clock, floorplan cells, and
the ``bitstream`` command's dry run, errors and cache. No Vivado needed (one test that runs the
packaging carries the ``vivado`` marker and skips without it).

The ``sim`` kernel Verilog is generated once per hw/ sources into ``sim_build/`` (86 s measured
the first time, then reused)."""

import json
import os
import re
import shutil
import stat
import subprocess

import pytest

from flightllm.hw import vitis
from flightllm.hw.build import KERNEL_NAME
from flightllm.hw.params import get_preset
from flightllm.hw.regmap import register_map

PRESET = "sim"


@pytest.fixture(scope="module")
def kernel_v():
    """``(path, text)`` of the sim preset's Vitis kernel Verilog (no trace ports), cached in
    sim_build by a hash of the kernel's sources."""
    from flightllm.sim import rtl

    def make(params):
        from flightllm.hw.kernel import Kernel
        return Kernel(params)

    design = rtl.Design("vitis", KERNEL_NAME, make, rtl.KERNEL.sources)
    path = rtl.verilog(get_preset(PRESET), design)
    return path, path.read_text()


@pytest.fixture(scope="module")
def files(kernel_v, tmp_path_factory):
    d = tmp_path_factory.mktemp("bitstream")
    return d, vitis.build_files(get_preset(PRESET), kernel_v[1], d)


def _m_axi_interfaces(text):
    names = {p.name for p in vitis.verilog_ports(text)}
    ifs = {m.group(1) for n in names for m in [re.match(r"(m_axi_[a-z0-9]+)_", n)] if m}
    assert ifs, "no m_axi ports in the Verilog"
    return names, ifs


def _tcl_registers(tcl):
    """{name: (offset, size, ASSOCIATED_BUSIF or None)} from package_kernel.tcl."""
    regs = {}
    for block in re.split(r"\n(?=set reg )", tcl)[1:]:
        name = re.match(r'set reg \[::ipx::add_register (?:-quiet )?"(\w+)"', block).group(1)
        off = int(re.search(r"address_offset (0x[0-9A-F]+)", block).group(1), 16)
        size = int(re.search(r"set_property size\s+(\d+)", block).group(1))
        bus = re.search(r"set_property value (\S+) \$regparam", block)
        regs[name] = (off, size, bus.group(1) if bus else None)
    return regs


def test_ports_from_verilog_equal_the_signature(kernel_v):
    ports = vitis.verilog_ports(kernel_v[1])
    assert set(ports) == set(vitis.kernel_ports(get_preset(PRESET)))
    ifs = vitis.kernel_interfaces(ports, register_map(get_preset(PRESET)))
    assert [i[0] for i in ifs.m_axi] == [f"m_axi_{p}" for p in register_map(get_preset(PRESET)).ports]


def test_every_m_axi_port_in_connectivity_and_packaging(kernel_v, files):
    _, f = files
    names, ifs = _m_axi_interfaces(kernel_v[1])
    rm = register_map(get_preset(PRESET))
    sp = dict(re.findall(rf"^sp={vitis.CU_NAME}\.(\w+):(\S+)$", f["link.cfg"], re.M))
    assert set(sp) == {r.name for r in rm.pointers}             # every pointer argument, nothing else
    assert {f"m_axi_{rm[a].port}" for a in sp} == ifs           # = every m_axi interface of the Verilog
    for i in ifs:
        assert re.search(rf"^# {i}: argument \w+", f["link.cfg"], re.M), i
        assert f"need_busif $core {i} master" in f["package_kernel.tcl"]
        assert f"ipx::associate_bus_interfaces -busif {i} -clock ap_clk $core" in f["package_kernel.tcl"]
    weights = [a for a in sp if a != "instr"]
    assert [sp[a] for a in weights] == [f"HBM[{c}]" for c in range(len(weights))]   # one pseudo-channel each
    assert len(set(sp.values())) == len(sp)
    assert sp["instr"] == vitis.INSTR_BANK
    assert "ipx::associate_bus_interfaces -busif s_axi_control -clock ap_clk $core" in f["package_kernel.tcl"]
    assert {"ap_clk", "ap_rst_n", "interrupt"} <= names


def test_register_offsets_and_widths_equal_the_rtl_map(kernel_v, files):
    from flightllm.hw.kernel import Kernel

    _, f = files
    k = Kernel(get_preset(PRESET))
    k._MustUse__silence = True                           # not elaborated here
    rtl_map = k.regmap                                   # the map the RTL's control slave implements
    regs = _tcl_registers(f["package_kernel.tcl"])
    want = {r.name: (r.offset, r.bits, f"m_axi_{r.port}" if r.kind == "pointer" else None)
            for r in rtl_map.ctrl + rtl_map.args}
    assert regs == want
    assert not set(regs) & {r.name for r in rtl_map.status}     # status: register reads, not arguments
    # the address window equals the RTL's s_axi_control address width
    awaddr = next(p for p in vitis.verilog_ports(kernel_v[1]) if p.name == "s_axi_control_awaddr")
    assert f"set_property range {1 << awaddr.bits} $addr_block" in f["package_kernel.tcl"]
    assert awaddr.bits == rtl_map.addr_bits
    # ap_ctrl_hs bits at the map's positions
    for fld, bit in (("AP_START", 0), ("AP_DONE", 1), ("AP_IDLE", 2), ("AP_READY", 3), ("AUTO_RESTART", 7)):
        assert re.search(rf"add_field {fld} \$reg\]\n  set_property ACCESS \{{[\w-]+\}} \$field\n"
                         rf"  set_property BIT_OFFSET \{{{bit}\}}", f["package_kernel.tcl"]), fld


def test_kernel_name_clock_and_sdx_properties(kernel_v, files):
    _, f = files
    assert re.search(rf"^module {KERNEL_NAME}\(", kernel_v[1], re.M)
    tcl, xo, cfg = f["package_kernel.tcl"], f["gen_xo.tcl"], f["link.cfg"]
    assert f"set_property top {KERNEL_NAME} [current_fileset]" in tcl
    assert f"add_files -norecurse [file join $here {KERNEL_NAME}.v]" in tcl
    for line in ("-library RTLKernel -taxonomy /KernelIP", "set_property sdx_kernel true $core",
                 "set_property sdx_kernel_type rtl $core", "ipx::check_integrity -kernel $core"):
        assert line in tcl, line
    assert f"package_xo -xo_path $xo_path -kernel_name {KERNEL_NAME} " in xo
    assert "source -notrace" in xo and "package_kernel.tcl" in xo
    assert re.search(rf"^nk={KERNEL_NAME}:1:{vitis.CU_NAME}$", cfg, re.M)
    assert re.search(rf"^slr={vitis.CU_NAME}:SLR0$", cfg, re.M)
    clock = float(re.search(r"^kernel_frequency=([\d.]+)$", cfg, re.M).group(1))
    assert clock == get_preset(PRESET).clock_mhz
    assert vitis.link_cfg(get_preset("u280-2ch"), vitis.kernel_interfaces(
        vitis.kernel_ports(get_preset("u280-2ch")), register_map(get_preset("u280-2ch")))).count(
        "kernel_frequency=225\n") == 1
    assert re.search(r"^prop=run\.impl_1\.STEPS\.OPT_DESIGN\.TCL\.PRE=(/\S+)/floorplan\.tcl$", cfg, re.M)


def test_floorplan_cells_exist_in_the_verilog(kernel_v, files):
    """Every cell the floorplan pins is an instance of the generated hierarchy (Amaranth names
    each module by its path), for sim here; u280's plan splits the engine over SLR0/SLR1."""
    _, f = files
    mods = set(re.findall(rf"^module \\{KERNEL_NAME}\.(\S+)\s*\(", kernel_v[1], re.M))
    plan = vitis.slr_plan(get_preset(PRESET))
    assert list(plan) == ["SLR0"]
    for cells in plan.values():
        for cell, _ in cells:
            assert cell.replace("/", ".") in mods, cell
            assert f"\n  {cell}\n" in f["floorplan.tcl"]
    big = vitis.slr_plan(get_preset("u280"))
    assert set(big) == {"SLR0", "SLR1"}
    chains = {c for cells in big.values() for c, _ in cells if "/chain" in c}
    assert len(chains) == get_preset("u280").chains
    assert all("read_mux" not in c and "reader" not in c for c, _ in big["SLR1"])   # HBM paths in SLR0
    with pytest.raises(ValueError, match="HBM pseudo-channels"):
        vitis.slr_plan(get_preset("vhk158"))


def test_mismatched_verilog_is_refused(kernel_v):
    p = get_preset(PRESET)
    bad = kernel_v[1].replace("m_axi_ch01_wstrb", "m_axi_ch01_wstrobe")
    with pytest.raises(ValueError, match="wstrb|wstrobe"):
        vitis.build_files(p, bad, "/nonexistent")
    with pytest.raises(ValueError, match="no module"):
        vitis.verilog_ports("module other(a);\n  input a;\nendmodule\n")


def _no_tools_path(tmp_path):
    d = tmp_path / "nobin"
    d.mkdir(exist_ok=True)
    return str(d)


def test_dry_run_writes_everything_and_exits_with_one_line(kernel_v, tmp_path, monkeypatch, capsys):
    from flightllm.cli import main

    monkeypatch.setenv("PATH", _no_tools_path(tmp_path))
    out = tmp_path / "bitstream-sim"
    rc = main(["bitstream", "--preset", PRESET, "-o", str(out), "--verilog", str(kernel_v[0])])
    cap = capsys.readouterr()
    assert rc != 0
    err = cap.err.strip().splitlines()
    assert len(err) == 1 and "not on PATH" in err[0] and "vivado" in err[0], cap.err
    names = {p.name for p in out.iterdir()}
    assert names == {*vitis.FILES, f"{KERNEL_NAME}.v", f"{KERNEL_NAME}.v.hash", "params.json"}
    assert (out / f"{KERNEL_NAME}.v").read_text() == kernel_v[1]
    assert json.loads((out / "params.json").read_text())["name"] == PRESET
    for cmd in vitis.flow_commands(out):                      # the exact commands, printed and in flow.sh
        assert " ".join(cmd) in cap.out
        assert " ".join(cmd) in (out / "flow.sh").read_text()
    assert os.stat(out / "flow.sh").st_mode & stat.S_IXUSR


def test_error_leaves_no_files(kernel_v, tmp_path, monkeypatch, capsys):
    from flightllm.cli import main

    monkeypatch.setenv("PATH", _no_tools_path(tmp_path))
    bad = tmp_path / "bad.v"
    bad.write_text(kernel_v[1].replace("m_axi_instr_", "m_axi_inst_"))
    out = tmp_path / "b"
    rc = main(["bitstream", "--preset", PRESET, "-o", str(out), "--verilog", str(bad)])
    cap = capsys.readouterr()
    assert rc == 2 and len(cap.err.strip().splitlines()) == 1 and "error" in cap.err
    assert not out.exists()
    # an existing build dir keeps its files whole, and nothing temporary is left
    out.mkdir()
    (out / "link.cfg").write_text("old\n")
    assert main(["bitstream", "--preset", PRESET, "-o", str(out), "--verilog", str(bad)]) == 2
    assert [p.name for p in out.iterdir()] == ["link.cfg"] and (out / "link.cfg").read_text() == "old\n"


def test_verilog_cache_by_design_hash(kernel_v, tmp_path, monkeypatch):
    p = get_preset(PRESET)
    out = tmp_path / "c"
    out.mkdir()
    (out / f"{KERNEL_NAME}.v").write_text(kernel_v[1])
    (out / f"{KERNEL_NAME}.v.hash").write_text(vitis.design_hash(p) + "\n")

    def boom(*a, **k):
        raise AssertionError("regenerated a current Verilog")
    monkeypatch.setattr(vitis, "verilog_text", boom)
    text, key, fresh = vitis._kernel_verilog(p, out, log=lambda *a: None)
    assert text == kernel_v[1] and not fresh
    assert vitis.design_hash(p) != vitis.design_hash(get_preset("u280-2ch"))


def test_flow_runs_the_tools_and_caches_the_xclbin(kernel_v, tmp_path, monkeypatch, capsys):
    """The flow with stand-ins for vivado and v++ (scripts that write the xo, the xclbin and a
    routed timing report): both run once, in order; a second call finds the xclbin current."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "calls"
    (bindir / "vivado").write_text(f'#!/bin/sh\necho vivado "$@" >> {log}\ntouch {vitis.XO_NAME}\n')
    (bindir / "v++").write_text(
        f'#!/bin/sh\necho v++ "$@" >> {log}\nmkdir -p _x/reports/link/imp\ntouch {vitis.XCLBIN_NAME}\n'
        "printf '    WNS(ns)      TNS(ns)\\n    -------      -------\\n      0.052        0.000\\n' "
        "> _x/reports/link/imp/impl_1_full_util_routed.rpt.tmp\n"
        "mv _x/reports/link/imp/impl_1_full_util_routed.rpt.tmp _x/reports/link/imp/impl_1_timing_summary_routed.rpt\n")
    for f in bindir.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "bs"
    p = get_preset(PRESET)
    assert vitis.run_bitstream(p, out, verilog=kernel_v[0]) == 0
    calls = log.read_text().splitlines()
    assert [c.split()[0] for c in calls] == ["vivado", "v++"]
    assert "--config link.cfg" in calls[1] and f"--platform {vitis.PLATFORM}" in calls[1]
    assert json.loads((out / "build.json").read_text())["platform"] == vitis.PLATFORM
    assert "WNS 0.052 ns" in capsys.readouterr().out
    assert vitis.run_bitstream(p, out, verilog=kernel_v[0]) == 0
    assert len(log.read_text().splitlines()) == 2                 # cached: the tools did not run again
    assert "up to date" in capsys.readouterr().out


def test_help_explains(capsys):
    from flightllm.cli import main

    with pytest.raises(SystemExit) as e:
        main(["bitstream", "--help"])
    text = capsys.readouterr().out
    assert e.value.code == 0
    for word in ("--preset", "--dry-run", "--verilog", vitis.PLATFORM, "package_xo", "v++ --link", "status 2"):
        assert word in text, word


@pytest.mark.vivado
@pytest.mark.skipif(shutil.which("vivado") is None, reason="needs Vivado on PATH (source settings64.sh)")
def test_vivado_packages_the_kernel(kernel_v, tmp_path):
    """Vivado runs package_kernel.tcl and package_xo on the sim kernel (minutes)."""
    out = tmp_path / "pkg"
    assert vitis.run_bitstream(get_preset(PRESET), out, dry_run=True, verilog=kernel_v[0]) in (0, 2)
    r = subprocess.run(vitis.flow_commands(out)[0], cwd=out, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (out / vitis.XO_NAME).exists()
