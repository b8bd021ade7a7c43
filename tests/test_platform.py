"""The U280 as an Amaranth platform (hw/platform_u280.py) and `make synth-ooc`'s dry run.

No Vivado here: the part, the clock resources, a standalone build plan, the out-of-context
scripts (part, top, OOC mode, ap_clk period from the preset's clock_mhz) and the one-line
failure. The only kernel Verilog is the small `sim` preset's; the `vivado` test runs the real
flow where Vivado is installed.
"""

import json
import re
import shutil

import pytest
from amaranth import ClockDomain, Module, Signal
from amaranth.lib import io, wiring
from amaranth.lib.wiring import In, Out

from flightllm.hw import platform_u280 as P
from flightllm.hw.params import get_preset


class Tiny(wiring.Component):
    """A component shaped like a Vitis kernel: ap_clk, ap_rst_n, data in and out."""

    ap_clk: In(1)
    ap_rst_n: In(1)
    a: In(8)
    y: Out(8)

    def elaborate(self, platform):
        m = Module()
        m.domains.sync = cd = ClockDomain("sync")
        m.d.comb += [cd.clk.eq(self.ap_clk), cd.rst.eq(~self.ap_rst_n)]
        m.d.sync += self.y.eq(self.y + self.a)
        return m


class Standalone(wiring.Component):
    """A board top: the default clock, HBM CATTRIP held low, a counter bit on the UART tx."""

    def __init__(self):
        super().__init__({})

    def elaborate(self, platform):
        m = Module()
        m.submodules.cattrip = cattrip = io.Buffer("o", platform.request("hbm_cattrip", 0, dir="-"))
        uart = platform.request("uart", 0, dir={"tx": "-", "rx": "-"})
        m.submodules.tx = tx = io.Buffer("o", uart.tx)
        ctr = Signal(24)
        m.d.sync += ctr.eq(ctr + 1)
        m.d.comb += [cattrip.o.eq(0), tx.o.eq(ctr[-1])]
        return m


@pytest.fixture
def no_vivado(monkeypatch):
    if shutil.which("vivado"):
        pytest.skip("Vivado is on PATH: synth-ooc would run it, not dry-run")
    monkeypatch.delenv("AMARANTH_ENV_VIVADO", raising=False)


def test_part_splits_as_amaranth_expects():
    p = P.U280Platform()
    assert (p.device, p.package, p.speed) == ("xcu280", "fsvh2892", "2L-e")
    assert p._part == P.PART == "xcu280-fsvh2892-2L-e"
    assert p.family == "ultrascaleplus" and p.toolchain == "Vivado"
    assert P.U280OocPlatform()._part == P.PART


def test_clock_resources():
    p = P.U280Platform()
    want = {("clk100", 0): ("BJ43", "BJ44", 100e6), ("clk100", 1): ("BH6", "BJ6", 100e6),
            ("clk100", 2): ("G31", "F31", 100e6), ("clk156", 0): ("G30", "F30", 156.25e6)}
    for (name, number), (pin_p, pin_n, hz) in want.items():
        r = p.lookup(name, number)
        assert r.clock.frequency == hz
        assert (r.ios[0].p.names, r.ios[0].n.names) == ([pin_p], [pin_n])
        assert r.attrs["IOSTANDARD"] == "LVDS"
    assert p.default_clk_frequency == 100e6
    assert p.lookup("rst", 0).ios[0].invert          # CPU_RESET_FPGA is active low
    assert p.lookup("hbm_cattrip", 0).ios[0].names == ["D32"]


def test_standalone_build_plan():
    """A board design builds like any amaranth-boards board: pins, clock, card configuration."""
    plan = P.U280Platform().build(Standalone(), name="standalone", do_build=False)
    xdc, tcl = plan.files["standalone.xdc"], plan.files["standalone.tcl"]
    for pin in ("BJ43", "BJ44", "L30", "D32", "A28"):
        assert f"set_property LOC {pin} " in xdc
    assert re.search(r"create_clock -name \S+ -period 10\.0 ", xdc)
    assert "PULLTYPE \"PULLDOWN\"" in xdc and "CONFIG_VOLTAGE 1.8" in xdc
    assert f"-part {P.PART}" in tcl and "write_bitstream" in tcl
    assert "out_of_context" not in tcl


def test_ooc_tcl_template_is_amaranths_with_two_edits():
    from amaranth.vendor import XilinxPlatform

    ours = P.ooc_tcl_template().splitlines()
    theirs = XilinxPlatform._vivado_file_templates["{{name}}.tcl"].splitlines()
    changed = [(a, b) for a, b in zip(theirs, ours) if a != b]
    assert len(ours) == len(theirs) and len(changed) == 2
    assert "-mode out_of_context" in changed[0][1] and "write_bitstream" in changed[1][0]


@pytest.mark.parametrize("preset", ["u280", "sim"])
def test_dry_run_writes_scripts(tmp_path, capsys, no_vivado, preset):
    """The period comes from the preset's clock_mhz; a tiny kernel-shaped top keeps it fast."""
    params = get_preset(preset)
    out = tmp_path / f"synth-ooc-{preset}"
    assert P.synth_ooc(params, out, top=Tiny(), name="tiny") == 2
    std = capsys.readouterr()
    err = std.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("make synth-ooc: vivado not on PATH")
    assert f"cd {out} && sh build_tiny.sh" in std.out
    assert "vivado -mode batch -log tiny.log -source tiny.tcl" in std.out
    tcl = (out / "tiny.tcl").read_text()
    assert f"create_project -force -name tiny -part {P.PART}" in tcl
    assert re.search(rf"synth_design -top tiny -part {P.PART} -mode out_of_context", tcl)
    assert "place_design" in tcl and "route_design" in tcl
    assert "report_utilization -file tiny_utilization_place.rpt" in tcl
    assert "report_timing_summary -datasheet -max_paths 10 -file tiny_timing.rpt" in tcl
    assert not re.search(r"^\s*write_bitstream", tcl, re.M)
    xdc = (out / "tiny.xdc").read_text()
    period = float(re.search(r'create_clock -name ap_clk -period (\S+) \[get_nets "ap_clk"\]',
                             xdc).group(1))
    assert period == pytest.approx(1e3 / params.clock_mhz)
    assert "LOC" not in xdc                               # ports are not pins
    assert "set_input_delay -clock [get_clocks ap_clk] 0 " in xdc
    assert "set_output_delay -clock [get_clocks ap_clk] 0 " in xdc
    assert "CONFIG_VOLTAGE" not in xdc                    # no board configuration
    assert "vivado" in (out / "build_tiny.sh").read_text()
    assert re.search(r"^module tiny\(", (out / "tiny.v").read_text(), re.M)
    assert type(params).from_dict(json.loads((out / "params.json").read_text())) == params


@pytest.mark.slow_rtl
def test_dry_run_of_the_sim_kernel(tmp_path, capsys, no_vivado):
    """The real kernel (sim preset) through the OOC platform: every signature member a port.
    (Slow set: a whole-kernel Verilog generation, ~90 s; the dry run itself is tested above
    on a small top.)"""
    from flightllm.hw.kernel import Kernel

    params = get_preset("sim")
    out = tmp_path / "synth-ooc-sim"
    assert P.main(["--preset", "sim", "-o", str(out)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    v = (out / "flightllm_kernel.v").read_text()
    head = re.search(r"^module flightllm_kernel\((.*?)\);", v, re.S | re.M).group(1)
    ports = {x.strip() for x in head.split(",")}
    k = Kernel(params)
    k._MustUse__silence = True                            # only its signature is looked at
    assert ports == set(k.signature.members)
    assert any(p.startswith("m_axi_") for p in ports) and "s_axi_control_awaddr" in ports
    assert "create_clock -name ap_clk -period 10.0 " in (out / "flightllm_kernel.xdc").read_text()
    assert "-top flightllm_kernel" in (out / "flightllm_kernel.tcl").read_text()


def test_ooc_needs_a_component_and_its_own_domains():
    class NoDomain(wiring.Component):
        ap_clk: In(1)
        y: Out(1)

        def elaborate(self, platform):
            m = Module()
            m.d.sync += self.y.eq(~self.y)
            return m

    with pytest.raises(RuntimeError, match="uses clock domain 'sync' without defining it"):
        P.U280OocPlatform().build(NoDomain(), name="nodomain", do_build=False)
    m = Module()
    m._MustUse__silence = True
    with pytest.raises(TypeError, match="wiring.Component"):
        P.U280OocPlatform().build(m, name="m", do_build=False)


UTIL = """\
1. CLB Logic
------------

+----------------------------+--------+-------+------------+-----------+-------+
|          Site Type         |  Used  | Fixed | Prohibited | Available | Util% |
+----------------------------+--------+-------+------------+-----------+-------+
| CLB LUTs                   | 412345 |     0 |          0 |   1303680 | 31.63 |
|   LUT as Logic             | 400000 |     0 |          0 |   1303680 | 30.68 |
| CLB Registers              | 600000 |     0 |          0 |   2607360 | 23.01 |
+----------------------------+--------+-------+------------+-----------+-------+
| Block RAM Tile             |  900.5 |     0 |          0 |      2016 | 44.67 |
| URAM                       |    512 |     0 |          0 |       960 | 53.33 |
| DSPs                       |   8192 |     0 |          0 |      9024 | 90.78 |
"""

TIMING = """\
------------------------------------------------------------------------------------------------
| Design Timing Summary
| ---------------------
------------------------------------------------------------------------------------------------

    WNS(ns)      TNS(ns)  TNS Failing Endpoints  TNS Total Endpoints      WHS(ns)      THS(ns)  THS Failing Endpoints  THS Total Endpoints     WPWS(ns)     TPWS(ns)  TPWS Failing Endpoints  TPWS Total Endpoints
    -------      -------  ---------------------  -------------------      -------      -------  ---------------------  -------------------     --------     --------  ----------------------  --------------------
     -0.125      -12.500                    310               912345        0.010        0.000                      0               912345        1.222        0.000                       0                400000
"""


def test_report_parsers():
    u = P.parse_utilization(UTIL)
    assert u["CLB LUTs"] == (412345, 1303680, 31.63) and u["Block RAM Tile"][0] == 900.5
    assert set(u) == set(P.UTIL_ROWS)
    t = P.parse_timing_summary(TIMING)
    assert t["WNS(ns)"] == -0.125 and t["WHS(ns)"] == 0.010 and t["TNS Failing Endpoints"] == 310
    assert P.parse_timing_summary("no table") == {}


@pytest.mark.vivado
@pytest.mark.skipif(shutil.which("vivado") is None, reason="needs Vivado on PATH")
def test_ooc_build_with_vivado(tmp_path, capsys):
    """The real flow on a small top: reports written and parsed, timing met at 225 MHz."""
    out = tmp_path / "ooc"
    rc = P.synth_ooc(get_preset("u280"), out, top=Tiny(), name="tiny")
    assert rc == 0, capsys.readouterr().err
    assert (out / "tiny_route.dcp").exists()
    assert P.parse_utilization((out / "tiny_utilization_place.rpt").read_text())["CLB Registers"][0] >= 8
    assert "WNS" in capsys.readouterr().out
