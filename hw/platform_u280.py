"""The Alveo U280 in Amaranth's own terms, and the kernel's out-of-context Vivado run.

:class:`U280Platform` is an ``amaranth.vendor.XilinxPlatform`` in the style of ``amaranth-boards``
(compare ``amaranth_boards/kcu105.py``): the part ``xcu280-fsvh2892-2L-e`` split the way
Amaranth splits it, the card's reference clocks, its reset button, its UART and the HBM
``CATTRIP`` pin that every standalone design must drive. A standalone design (no Vitis shell)
builds with ``U280Platform().build(top)`` like any amaranth-boards board.

:class:`U280OocPlatform` and :func:`synth_ooc` (``make synth-ooc``) run the kernel
(:class:`flightllm.hw.kernel.Kernel`, top ``flightllm_kernel``) through Vivado out of context:
synthesis, placement and routing on the U280 part with ``ap_clk`` constrained at the preset's
``clock_mhz``, reporting utilisation and timing in minutes-to-hours instead of the full Vitis
link. With Vivado absent it writes every file into its build directory, prints what it would
run and exits non-zero with one line.

Why the platform cannot build the kernel as it stands, and what it is used for
--------------------------------------------------------------------------------
Amaranth's platform build (``Platform.prepare``) makes a *chip top*: the design's only ports
are the board resources it requested (``Design(fragment, [], ...)``), each behind an I/O buffer,
with a ``LOC``/``IOSTANDARD`` for every pin, and a bitstream at the end. The kernel is not a
chip top: its ports (``ap_clk``, ``s_axi_control_*``, one 256-bit AXI4 master per HBM channel,
thousands of bits) connect to the Vitis shell's logic, not to package balls; a platform build
would leave them as undriven internal nets and Vivado would optimise the whole kernel away,
and there are not enough balls to pin them out anyway. So the unchanged platform cannot serve
the kernel build, and the dependency is *not* dropped, because everything else in it fits:

* the part string and device family (``XilinxPlatform._part``, ``family``);
* Amaranth's build machinery: ``Platform.build`` / ``BuildPlan`` (the ``build_*.sh`` script, the
  ``vivado -mode batch`` command line, ``AMARANTH_ENV_VIVADO`` and the ``AMARANTH_*`` overrides),
  the Verilog it emits, and its clock constraints (``add_clock_constraint`` -> ``create_clock``);
* its Vivado Tcl template, taken from ``XilinxPlatform`` and changed in two places only:
  ``synth_design ... -mode out_of_context`` (no I/O buffers, ports left as ports) and no
  ``write_bitstream`` (an OOC netlist has no bitstream; the routed checkpoint is the product).

:class:`U280OocPlatform` is that narrow subclass: it overrides ``prepare`` to make the
component's signature the top-level ports (what ``amaranth.back.verilog.convert`` does for the
``build-hw`` Verilog) and yields no pin constraints. It relies on Amaranth 0.5 internals
(``Fragment.prepare``, ``TemplatedPlatform.toolchain_prepare``), which ``pyproject.toml`` pins
(``amaranth~=0.5.4``); a change there fails :mod:`tests.test_platform` first.

The Vitis flow (``make bitstream``) does not use this platform: ``v++ --link`` places the kernel
inside the ``xilinx_u280_gen3x16_xdma_1_202211_1`` shell, whose clocks and pins are the shell's.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys

from amaranth.build import Attrs, Clock, DiffPairs, Pins, PinsN, Resource
from amaranth.hdl import Fragment, ValueCastable
from amaranth.hdl._ir import PortDirection
from amaranth.lib import wiring
from amaranth.vendor import XilinxPlatform
from amaranth_boards.resources import UARTResource

__all__ = ["PART", "U280Platform", "U280OocPlatform", "ooc_tcl_template", "synth_ooc",
           "parse_utilization", "parse_timing_summary", "main"]

PART = "xcu280-fsvh2892-2L-e"   #: the U280's FPGA (DESIGN.md "U280 facts")

# Pin sources (public board files; pins agree across them unless a comment says otherwise):
#  [C] corundum/corundum, fpga/mqnic/AU280/fpga_100g/fpga.xdc (commit 1248ca1a): "System clocks"
#      (clk_100mhz_0/1/2, clk_si570), "Reset button", "UART", "HBM overtemp" sections.
#  [M] bsc-loca/100gb-ethernet, xdc/ethernet_test_alveo280.xdc: the U280 master XDC as posted on
#      the Xilinx forum, with bank/net names (SYSCLK0 on IO_L12P/N_T1U_N10/N11_GC_65, bank 65,
#      VCCO 1.2 V; CPU_RESET_FPGA on L30, active low; HBM_CATTRIP on D32).
#  [T] the corundum AU280 XDC's clock-tree comment (same file family): SYSCLK0/1/3 are 100 MHz
#      outputs of one SI53340 buffer; USER_SI570_CLOCK is 156.25 MHz on IO_L12P/N_..._75 G30/F30.
#  [L] litex-hub/litex-boards, litex_boards/platforms/xilinx_alveo_u280.py: agrees on BJ43/BJ44,
#      BH6/BJ6, L30, A28/B33, but lists DIFF_SSTL12 for SYSCLK0/1 (the XDCs say LVDS; we follow
#      the XDCs) and "gpio_led" C32/D32/D31, of which D32 is HBM_CATTRIP in [M] and [C].
# User LEDs: none are documented for the FPGA in [M] or [C] (the card's LEDs are driven by the
# satellite controller); [L]'s LED pins contradict [M], so no LED resource is declared here.


class U280Platform(XilinxPlatform):
    """Xilinx Alveo U280 (``xcu280-fsvh2892-2L-e``) as an ``amaranth-boards``-style platform.

    Resources
    ---------
    ``clk100`` 0..2
        100 MHz LVDS reference clocks SYSCLK0 (bank 65, BJ43/BJ44), SYSCLK1 (BH6/BJ6),
        SYSCLK3 (bank 75, G31/F31) [C][T]. ``clk100`` 0 is ``default_clk``.
    ``clk156`` 0
        156.25 MHz LVDS user clock from the SI570 (G30/F30) [C][T].
    ``rst`` 0
        CPU_RESET_FPGA push button, active low, LVCMOS18 (L30) [C][M]; ``default_rst``.
    ``uart`` 0
        USB UART through the satellite controller, LVCMOS18: tx A28, rx B33 [C][L].
    ``hbm_cattrip`` 0
        HBM catastrophic-temperature output to the satellite controller (D32) [C][M]. A design
        without the HBM IP must drive it low, or the card powers down; it carries a pulldown.

    The part is split as Amaranth expects for UltraScale+ (``{device}-{package}-{speed}``):
    ``device="xcu280"`` (family ``ultrascaleplus``: ``u...`` devices), ``package="fsvh2892"``,
    ``speed="2L-e"``. Standalone builds add the card's configuration settings (SPIx4 flash at
    1.8 V, from [C]) to the XDC unless an ``add_constraints`` override is given.
    """

    device      = "xcu280"
    package     = "fsvh2892"
    speed       = "2L-e"
    default_clk = "clk100"
    default_rst = "rst"
    resources   = [
        # [C] clk_100mhz_0 / [M] SYSCLK0_P/N (DDR4 C0 and HBM reference)
        Resource("clk100", 0, DiffPairs("BJ43", "BJ44", dir="i"),
                 Clock(100e6), Attrs(IOSTANDARD="LVDS")),
        # [C] clk_100mhz_1 / [T] SYSCLK1 (DDR4 C1 reference)
        Resource("clk100", 1, DiffPairs("BH6", "BJ6", dir="i"),
                 Clock(100e6), Attrs(IOSTANDARD="LVDS")),
        # [C] clk_100mhz_2 / [T] SYSCLK3, bank 75 (1.8 V, same bank as reset and UART)
        Resource("clk100", 2, DiffPairs("G31", "F31", dir="i"),
                 Clock(100e6), Attrs(IOSTANDARD="LVDS")),
        # [C] clk_si570 (create_clock -period 6.4) / [T] USER_SI570_CLOCK
        Resource("clk156", 0, DiffPairs("G30", "F30", dir="i"),
                 Clock(156.25e6), Attrs(IOSTANDARD="LVDS")),
        # [C] reset / [M] CPU_RESET_FPGA "active low reset input"
        Resource("rst", 0, PinsN("L30", dir="i"), Attrs(IOSTANDARD="LVCMOS18")),
        # [C] uart_txd A28 (SLEW SLOW DRIVE 8), uart_rxd B33
        UARTResource(0, rx="B33", tx="A28", attrs=Attrs(IOSTANDARD="LVCMOS18")),
        # [C] hbm_cattrip / [M] HBM_CATTRIP, PULLTYPE PULLDOWN as in [M]
        Resource("hbm_cattrip", 0, Pins("D32", dir="o"),
                 Attrs(IOSTANDARD="LVCMOS18", PULLTYPE="PULLDOWN")),
    ]
    connectors  = []

    #: XDC lines added to standalone builds (configuration flash of the card, from [C])
    board_constraints = "\n".join([
        "set_property CFGBVS GND [current_design]",
        "set_property CONFIG_VOLTAGE 1.8 [current_design]",
        "set_property CONFIG_MODE SPIx4 [current_design]",
        "set_property BITSTREAM.CONFIG.SPI_BUSWIDTH 4 [current_design]",
        "set_property BITSTREAM.CONFIG.CONFIGRATE 85.0 [current_design]",
        "set_property BITSTREAM.CONFIG.SPI_32BIT_ADDR YES [current_design]",
        "set_property BITSTREAM.GENERAL.COMPRESS TRUE [current_design]",
    ])

    def __init__(self, *, toolchain="Vivado"):
        super().__init__(toolchain=toolchain)

    def toolchain_prepare(self, fragment, name, **kwargs):
        if self.board_constraints:
            kwargs.setdefault("add_constraints", self.board_constraints)
        return super().toolchain_prepare(fragment, name, **kwargs)


def ooc_tcl_template() -> str:
    """Amaranth's own Vivado Tcl template, made out-of-context.

    Two edits of ``XilinxPlatform``'s ``{{name}}.tcl``: ``synth_design`` gets ``-mode
    out_of_context``, and ``write_bitstream`` becomes a comment. Raises ``RuntimeError`` if the
    template no longer has either line (an Amaranth upgrade changed it; look before patching).
    """
    tcl = XilinxPlatform._vivado_file_templates["{{name}}.tcl"]
    synth = 'synth_design -top {{name}} {{get_override("synth_design_opts")}}'
    bit = "write_bitstream -force -bin_file {{name}}.bit"
    for needle in (synth, bit):
        if tcl.count(needle) != 1:
            raise RuntimeError(f"Amaranth's Vivado Tcl template has no single {needle!r}; "
                               "hw/platform_u280.py needs updating for this Amaranth version")
    tcl = tcl.replace(synth, 'synth_design -top {{name}} -part {{platform._part}} '
                             '-mode out_of_context {{get_override("synth_design_opts")}}')
    return tcl.replace(bit, "# no write_bitstream: an out-of-context netlist has no bitstream; "
                            "{{name}}_route.dcp is the product")


class U280OocPlatform(U280Platform):
    """The U280 part for an out-of-context build of a component whose ports are not pins.

    ``build(component, name)`` makes the component's signature members the top-level ports
    (as ``amaranth.back.verilog.convert`` does), uses :func:`ooc_tcl_template`, emits no pin
    constraints and no board configuration; clock constraints come from
    ``add_clock_constraint(component.ap_clk, hz)``, and the port delays of
    :attr:`board_constraints` are relative to that ``ap_clk``. Every domain must be defined by the
    component itself (the kernel makes ``sync`` from ``ap_clk``/``ap_rst_n``).
    """

    #: the boundary: the shell's interconnect registers sit on the other side of every port, so
    #: the kernel gets the whole ap_clk period on its side of each port path (input and output
    #: delay 0), and a combinational port-to-port path (two handshakes in one cycle, which
    #: DESIGN.md's timing rules forbid) is timed too instead of left unconstrained
    board_constraints = "\n".join([
        "set_input_delay -clock [get_clocks ap_clk] 0 "
        "[get_ports -filter {DIRECTION == IN && NAME != ap_clk}]",
        "set_output_delay -clock [get_clocks ap_clk] 0 [get_ports -filter {DIRECTION == OUT}]",
    ])

    @property
    def file_templates(self):
        return {**super().file_templates, "{{name}}.tcl": ooc_tcl_template()}

    def prepare(self, elaboratable, name="top", **kwargs):
        if not isinstance(getattr(elaboratable, "signature", None), wiring.Signature):
            raise TypeError("an out-of-context build needs a wiring.Component: its signature "
                            "gives the ports")
        assert not self._prepared
        self._prepared = True
        ports = {}
        for path, member, value in elaboratable.signature.flatten(elaboratable):
            if isinstance(value, ValueCastable):
                value = value.as_value()
            ports["__".join(map(str, path))] = (
                value, PortDirection.Input if member.flow == wiring.In else PortDirection.Output)

        def missing(domain):
            raise RuntimeError(f"{type(elaboratable).__name__} uses clock domain {domain!r} "
                               "without defining it; an out-of-context top has no board clock")

        fragment = Fragment.get(elaboratable, self)
        self._design = fragment.prepare(ports=ports, hierarchy=(name,), missing_domain=missing)
        return self.toolchain_prepare(self._design, name, **kwargs)

    def iter_port_constraints_bits(self):
        return iter(())          # out of context: ports are nets into the shell, not pins


# --- reports -------------------------------------------------------------------------------

#: utilisation rows reported (Vivado UltraScale+ ``report_utilization`` site types)
UTIL_ROWS = ("CLB LUTs", "CLB Registers", "Block RAM Tile", "URAM", "DSPs")


def parse_utilization(text: str) -> dict:
    """``{site type: (used, available, util %)}`` for :data:`UTIL_ROWS` in a Vivado
    ``report_utilization`` text (first occurrence of each row)."""
    out = {}
    for line in text.splitlines():
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 4 or cells[0] not in UTIL_ROWS or cells[0] in out:
            continue
        try:
            out[cells[0]] = (float(cells[1]), float(cells[-2]), float(cells[-1]))
        except ValueError:
            continue
    return out


def parse_timing_summary(text: str) -> dict:
    """``{"WNS(ns)": float, "TNS(ns)": ..., "WHS(ns)": ..., ...}`` from the Design Timing Summary
    table of a Vivado ``report_timing_summary`` text; empty if there is none."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if "WNS(ns)" in line and "TNS(ns)" in line:
            names = re.split(r"\s{2,}", line.strip())
            for values in lines[i + 1:i + 4]:
                vals = values.split()
                if len(vals) == len(names) and not set(values.strip()) <= set("- "):
                    try:
                        return {n: float(v) for n, v in zip(names, vals)}
                    except ValueError:
                        return {}
            return {}
    return {}


# --- make synth-ooc -------------------------------------------------------------------------

def _kernel(params):
    from .kernel import Kernel
    return Kernel(params)


def synth_ooc(params, outdir, *, top=None, name=None, out=None, err=None) -> int:
    """Out-of-context synthesis and implementation of the kernel on the U280 part.

    Parameters
    ----------
    params : HwParams
        The preset; ``ap_clk`` is constrained at ``params.clock_mhz``.
    outdir : str or os.PathLike
        Build directory: the Verilog, ``<name>.tcl``, ``<name>.xdc``, ``build_<name>.sh``,
        ``params.json``, and with Vivado its reports and ``<name>_route.dcp``.
    top : wiring.Component, optional
        The design (default: ``Kernel(params)``); it must have an ``ap_clk`` input.
    name : str, optional
        Top module name (default ``flightllm_kernel``).
    out, err : file, optional
        Where the commands / report and the failure line go (default ``sys.stdout`` /
        ``sys.stderr``).

    Returns
    -------
    int
        0: built and timing met; 1: built, timing not met; 2: Vivado not found (files written,
        commands printed, one line on ``err``).
    """
    from .build import KERNEL_NAME, _write_atomic

    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    name = name or KERNEL_NAME
    top = _kernel(params) if top is None else top
    outdir = pathlib.Path(outdir)
    platform = U280OocPlatform()
    platform.add_clock_constraint(top.ap_clk, params.clock_mhz * 1e6)
    have = platform.has_required_tools()
    run = f"cd {outdir} && sh build_{name}.sh"
    if not have:
        plan = platform.build(top, name=name, build_dir=str(outdir), do_build=False,
                              emit_src=False)
        plan.extract(str(outdir))
        _write_atomic(outdir / "params.json", params.to_json() + "\n")
        print(f"# out-of-context {name} on {platform._part}, ap_clk {params.clock_mhz:g} MHz "
              f"(period {1e3 / params.clock_mhz:.3f} ns), files in {outdir}", file=out)
        print(run, file=out)
        print(f"#   runs: vivado -mode batch -log {name}.log -source {name}.tcl", file=out)
        print(f"make synth-ooc: vivado not on PATH (nor AMARANTH_ENV_VIVADO set); wrote the "
              f"out-of-context scripts to {outdir}: run them on a Vivado host", file=err)
        return 2
    outdir.mkdir(parents=True, exist_ok=True)
    _write_atomic(outdir / "params.json", params.to_json() + "\n")
    print(f"# {run}", file=out)
    platform.build(top, name=name, build_dir=str(outdir), do_build=True, emit_src=False)
    util = parse_utilization((outdir / f"{name}_utilization_place.rpt").read_text())
    timing = parse_timing_summary((outdir / f"{name}_timing.rpt").read_text())
    for k, (used, avail, pct) in util.items():
        print(f"{k:16s} {used:12,.1f} / {avail:12,.0f}  {pct:6.2f}%", file=out)
    wns = timing.get("WNS(ns)")
    whs = timing.get("WHS(ns)")
    print(f"ap_clk {params.clock_mhz:g} MHz: WNS {wns} ns, WHS {whs} ns", file=out)
    if wns is None or wns < 0 or (whs is not None and whs < 0):
        print(f"make synth-ooc: timing not met at {params.clock_mhz:g} MHz "
              f"(see {outdir / (name + '_timing.rpt')})", file=err)
        return 1
    return 0


def main(argv=None) -> int:
    from .params import PRESETS, get_preset

    ap = argparse.ArgumentParser(
        prog="python -m flightllm.hw.platform_u280",
        description="Out-of-context Vivado synthesis + place + route of flightllm_kernel on "
                    f"the U280 part ({PART}), reporting utilisation and timing; without "
                    "Vivado it writes the scripts and says what it would run.")
    ap.add_argument("--preset", default="u280", choices=sorted(PRESETS),
                    help="hardware preset (default: %(default)s)")
    ap.add_argument("-o", "--output", required=True, metavar="DIR", help="build directory")
    args = ap.parse_args(argv)
    return synth_ooc(get_preset(args.preset), args.output)


if __name__ == "__main__":
    sys.exit(main())
