"""Vitis RTL-kernel packaging and link inputs for the Alveo U280, and the ``bitstream`` command.

What this module is
-------------------
The generator of every file the Vitis flow needs besides the kernel Verilog, and the
driver of that flow (``flightllm bitstream``, ``make bitstream``). From two Python
definitions and nothing retyped:

* the kernel's port list: the ``flightllm_kernel`` module header of the generated Verilog
  (:func:`verilog_ports`), checked against the Amaranth signature of
  :class:`flightllm.hw.kernel.Kernel` (:func:`kernel_ports`);
* the one register map, :func:`flightllm.hw.regmap.register_map` (offsets, widths, the
  m_axi port each pointer argument addresses),

it writes into the build directory (:func:`build_files`):

``package_kernel.tcl``
    Vivado batch Tcl packaging the Verilog as a Vitis RTL kernel (the conventions of
    Xilinx's ``Vitis_Accel_Examples`` ``rtl_kernels/rtl_vadd``): ``ipx::package_project``
    with ``-library RTLKernel -taxonomy /KernelIP``, a check that Vivado inferred every
    ``m_axi_*`` master and ``s_axi_control``, each associated with ``ap_clk``, the
    ``s_axi_control`` memory map (``reg0``: CTRL/GIER/IP_IER/IP_ISR and every kernel argument
    at its offset and size, ``ASSOCIATED_BUSIF`` for the pointers), ``sdx_kernel`` properties
    and ``ipx::check_integrity -kernel``.
``gen_xo.tcl``
    ``package_xo`` of the packaged IP into ``flightllm_kernel.xo``.
``link.cfg``
    The ``v++ --link`` configuration: ``kernel_frequency`` (the preset's clock, 225 MHz for
    ``u280``), ``[connectivity]`` ``nk=``, ``slr=`` and one ``sp=`` per m_axi argument (weight
    channel ``c`` on its own HBM pseudo-channel ``HBM[c]``; the program on ``DDR[0]``), and
    ``[vivado]`` hooks that source the floorplan before ``opt_design``.
``floorplan.tcl``
    Pblock assignments by SLR (the HBM is attached to SLR0), with the reasoning in comments.
``flow.sh``
    The exact commands (:func:`flow_commands`), runnable by hand on a build host.

The LD/ST spaces (KV scales, logits, tokens) are not separate ports: :mod:`flightllm.hw.memmap`
interleaves them over the last ``kv_channels`` weight-channel buffers, so they sit in those
channels' pseudo-channels with the weights and the KV cache.

``flightllm bitstream --preset P -o DIR`` writes the kernel Verilog (cached by a hash of the
``hw/`` sources and the parameters) and the files above, then, with ``vivado`` and ``v++`` on
``PATH``, runs ``vivado -mode batch -source gen_xo.tcl`` and ``v++ --link`` to
``DIR/flightllm.xclbin``, cached by a hash of the design, the parameters and the generated
files (``DIR/build.json``), and prints the routed timing and utilisation. Without the tools
it prints the commands and exits with status 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass

from .build import KERNEL_NAME, _write_atomic, verilog_text
from .geometry import SPLIT_CHANNELS, far_channels
from .params import PRESETS, HwParams, get_preset
from .regmap import AP_DONE, AP_IDLE, AP_READY, AP_START, AUTO_RESTART, DATA_BITS, RegisterMap, register_map

__all__ = ["PLATFORM", "PART", "CU_NAME", "XO_NAME", "XCLBIN_NAME", "INSTR_BANK", "HBM_PSEUDO_CHANNELS",
           "Port", "KernelInterfaces", "verilog_ports", "kernel_ports", "kernel_interfaces",
           "package_kernel_tcl", "gen_xo_tcl", "link_cfg", "floorplan_tcl", "slr_plan", "memory_bank",
           "build_files", "flow_commands", "design_hash", "run_bitstream", "add_cli", "FILES"]

PLATFORM = "xilinx_u280_gen3x16_xdma_1_202211_1"     #: the Vitis platform (XRT 2.15)
PART = "xcu280-fsvh2892-2L-e"                        #: its FPGA (the packaging project's part)
CU_NAME = f"{KERNEL_NAME}_1"                         #: the one compute unit
XO_NAME = f"{KERNEL_NAME}.xo"
XCLBIN_NAME = "flightllm.xclbin"
HBM_PSEUDO_CHANNELS = 32                             #: HBM[0] .. HBM[31] on the U280
#: The program and SFU tables (m_axi ``instr``, 128-bit, a few MB/s of a decode step) go to
#: DDR bank 0 (in SLR0 on the U280, beside the kernel), as FlightLLM placed its instructions:
#: every HBM pseudo-channel is a weight channel's own, and sharing one would take a share of
#: that channel's bandwidth and break the "one master per pseudo-channel" rule.
INSTR_BANK = "DDR[0]"
#: The files :func:`build_files` writes, in order.
FILES = ("package_kernel.tcl", "gen_xo.tcl", "link.cfg", "floorplan.tcl", "flow.sh")
#: Vitis 2022.2 and later support the platform; the commands the flow runs.
TOOLS = ("vivado", "v++")
#: What generating the kernel Verilog costs (measured with /usr/bin/time -v on a 2-core build
#: machine): printed before a generation.
GEN_NOTE = "u280-2ch: about 3 min and 2.4 GB; u280: about 45 min and 13 GB of memory"

_HW_DIR = pathlib.Path(__file__).resolve().parent


# ----------------------------------------------------------------------------- ports
@dataclass(frozen=True)
class Port:
    """One top-level port of the kernel: ``direction`` is ``'input'`` or ``'output'``."""
    name: str
    direction: str
    bits: int


_HEADER = re.compile(r"^module\s+(\\?\S+?)\s*\((.*?)\);", re.S | re.M)
_DECL = re.compile(r"^\s*(input|output|inout)\s+(?:wire\s+|reg\s+)?(?:signed\s+)?"
                   r"(?:\[\s*(\d+)\s*:\s*(\d+)\s*\]\s*)?(\\?[^\s;]+)\s*;", re.M)


def verilog_ports(text: str, top: str = KERNEL_NAME) -> tuple:
    """The ports of module ``top`` in Verilog ``text``: :class:`Port` tuples in header order.

    ``ValueError`` if the module is missing or a header port has no declaration."""
    for m in _HEADER.finditer(text):
        if m.group(1).lstrip("\\") != top:
            continue
        names = [n.strip().lstrip("\\") for n in m.group(2).split(",") if n.strip()]
        end = text.find("\nendmodule", m.end())
        body = text[m.end():end if end >= 0 else len(text)]
        decl = {}
        for d in _DECL.finditer(body):
            hi, lo = d.group(2), d.group(3)
            decl[d.group(4).lstrip("\\")] = Port(d.group(4).lstrip("\\"), d.group(1),
                                                 abs(int(hi) - int(lo)) + 1 if hi is not None else 1)
        missing = [n for n in names if n not in decl]
        if missing:
            raise ValueError(f"module {top}: no declaration for port(s) {', '.join(missing[:5])}")
        return tuple(decl[n] for n in names)
    raise ValueError(f"no module {top!r} in the Verilog")


def kernel_ports(params: HwParams) -> tuple:
    """The ports of :class:`~flightllm.hw.kernel.Kernel` from its Amaranth signature (no
    elaboration): :class:`Port` tuples in signature order."""
    from amaranth.hdl import Shape
    from amaranth.lib.wiring import In

    from .kernel import Kernel

    k = Kernel(params)
    k._MustUse__silence = True                   # read for its signature, never elaborated
    return tuple(Port(name, "input" if m.flow == In else "output", Shape.cast(m.shape).width)
                 for name, m in k.signature.members.items())


@dataclass(frozen=True)
class KernelInterfaces:
    """The kernel's ports grouped as Vitis sees them (:func:`kernel_interfaces`).

    ``m_axi``: ``(interface name, argument name, data bits, address bits)`` per pointer
    argument of the register map, in its order; ``s_axi_addr_bits``: the AXI4-Lite address
    width; ``ports``: every port."""
    m_axi: tuple
    s_axi_addr_bits: int
    ports: tuple

    @property
    def names(self) -> tuple:
        return tuple(p.name for p in self.ports)


_M_AXI_REQUIRED = ("araddr", "arvalid", "arready", "arlen", "rdata", "rvalid", "rready", "rlast",
                   "awaddr", "awvalid", "awready", "awlen", "wdata", "wstrb", "wvalid", "wready", "wlast",
                   "bvalid", "bready")
_S_AXI_REQUIRED = ("awaddr", "awvalid", "awready", "wdata", "wstrb", "wvalid", "wready", "bresp", "bvalid",
                   "bready", "araddr", "arvalid", "arready", "rdata", "rresp", "rvalid", "rready")
_SCALAR_PORTS = {"ap_clk": "input", "ap_rst_n": "input", "interrupt": "output"}


def kernel_interfaces(ports, regmap: RegisterMap) -> KernelInterfaces:
    """Group ``ports`` (:func:`verilog_ports` or :func:`kernel_ports`) into the interfaces of
    ``regmap``: one ``m_axi_<port>`` master per pointer argument, ``s_axi_control``, and
    ``ap_clk``, ``ap_rst_n``, ``interrupt``. ``ValueError`` naming the first port that fits
    none, an interface the map needs and the ports lack, or a width that disagrees with the
    map (``s_axi_control`` address, 32-bit data)."""
    by = {p.name: p for p in ports}
    used = set()

    def group(prefix, required):
        got = {n[len(prefix):]: p for n, p in by.items() if n.startswith(prefix)}
        lacking = [s for s in required if s not in got]
        if lacking:
            raise ValueError(f"interface {prefix.rstrip('_')}: the kernel has no port(s) "
                             f"{', '.join(prefix + s for s in lacking)}")
        used.update(prefix + s for s in got)
        return got

    m_axi = []
    for r in regmap.pointers:
        g = group(f"m_axi_{r.port}_", _M_AXI_REQUIRED)
        if g["rdata"].bits != g["wdata"].bits or g["wstrb"].bits * 8 != g["wdata"].bits:
            raise ValueError(f"m_axi_{r.port}: rdata {g['rdata'].bits}, wdata {g['wdata'].bits}, "
                             f"wstrb {g['wstrb'].bits} bits disagree")
        m_axi.append((f"m_axi_{r.port}", r.name, g["rdata"].bits, g["araddr"].bits))
    s = group("s_axi_control_", _S_AXI_REQUIRED)
    if s["awaddr"].bits != regmap.addr_bits or s["araddr"].bits != regmap.addr_bits:
        raise ValueError(f"s_axi_control address is {s['awaddr'].bits} bits, the register map's "
                         f"{regmap.addr_bits}")
    if s["wdata"].bits != DATA_BITS or s["rdata"].bits != DATA_BITS:
        raise ValueError(f"s_axi_control data is {s['wdata'].bits} bits, not {DATA_BITS}")
    for name, direction in _SCALAR_PORTS.items():
        if name not in by or by[name].direction != direction or by[name].bits != 1:
            raise ValueError(f"the kernel needs a 1-bit {direction} {name!r}")
        used.add(name)
    extra = [n for n in by if n not in used]
    if extra:
        raise ValueError(f"port {extra[0]!r} belongs to no interface of the register map "
                         f"({len(extra)} such port(s)); m_axi interfaces: "
                         f"{', '.join(i[0] for i in m_axi)}")
    return KernelInterfaces(tuple(m_axi), regmap.addr_bits, tuple(ports))


# ----------------------------------------------------------------------------- banks and SLRs
def memory_bank(params: HwParams, argument: str) -> str:
    """The ``sp=`` memory of pointer ``argument``: weight channel ``chNN`` -> ``HBM[NN]``
    (its own pseudo-channel), ``instr`` -> :data:`INSTR_BANK`."""
    rm = register_map(params)
    r = rm[argument]
    if r.kind != "pointer":
        raise ValueError(f"argument {argument!r} is not a pointer")
    if r.port == "instr":
        return INSTR_BANK
    c = [p.name for p in rm.pointers if p.port != "instr"].index(argument)
    if c >= HBM_PSEUDO_CHANNELS:
        raise ValueError(f"weight channel {c} of preset {params.name!r}: the U280 has "
                         f"{HBM_PSEUDO_CHANNELS} HBM pseudo-channels")
    return f"HBM[{c}]"


def slr_plan(params: HwParams) -> dict:
    """``{SLR name: [(cell path under the kernel, reason), ...]}``: which of the kernel's
    instances :func:`floorplan_tcl` pins to which SLR. Instance names are the submodule names
    of :class:`~flightllm.hw.kernel.Kernel` and the units below it."""
    C = params.weight_channels
    if C > HBM_PSEUDO_CHANNELS:
        raise ValueError(f"preset {params.name!r} has {C} weight channels; the U280 has "
                         f"{HBM_PSEUDO_CHANNELS} HBM pseudo-channels")
    slr0, slr1 = [], []
    hbm = "on an HBM pseudo-channel's AXI path: next to the HBM controller in SLR0"
    far_set = set(far_channels(params))
    for c in range(C):
        for cell in (f"read_mux_ch{c:02d}", f"write_mux_ch{c:02d}", f"embed_rd{c:02d}",
                     f"kvstore_rd{c:02d}", f"kvstore_wr{c:02d}", f"unit_mpe/reader{c}"):
            slr0.append((cell, hbm))
        far = c in far_set
        where = slr1 if far else slr0
        why = ("the second half of the channels' dequant units and chains: SLR0 cannot hold "
               "the whole engine; the raw 512-bit beat crosses the SLR boundary (narrower than "
               "the dequantized lanes)" if far else "dequant unit and chains beside their channel")
        for cell in (f"unit_mpe/core/engine/beat_fifo{c}", f"unit_mpe/core/engine/dequant{c}"):
            where.append((cell, why))
        for j in range(c, params.chains, C):            # chain j is fed by dequant unit j % C
            where.append((f"unit_mpe/core/engine/chain{j}", why))
    for cell in ("slave", "control", "fetch", "instr_mux", "tables"):
        slr0.append((cell, "control path: beside the shell's AXI4-Lite and the DDR[0] program port"))
    plan = {"SLR0": slr0}
    if slr1:
        plan["SLR1"] = slr1
    return plan


# ----------------------------------------------------------------------------- the files
def _tcl_str(s: str) -> str:
    return "{" + s.replace("{", "(").replace("}", ")").replace("\\", "/") + "}"


def package_kernel_tcl(params: HwParams, ifs: KernelInterfaces) -> str:
    """``package_kernel.tcl``: Vivado batch packaging of ``flightllm_kernel.v`` as a Vitis RTL
    kernel (module docstring). Defines ``$path_to_packaged`` for :func:`gen_xo_tcl`."""
    rm = register_map(params)
    L = [f"# package_kernel.tcl: {KERNEL_NAME}.v as a Vitis RTL kernel (preset {params.name}).",
         "# Generated by flightllm.hw.vitis from hw/regmap.py and the Verilog's port list; do not edit.",
         "# Sourced by gen_xo.tcl (vivado -mode batch -source gen_xo.tcl -tclargs <xo>).",
         "",
         "set here [file dirname [file normalize [info script]]]",
         "set path_to_packaged [file join $here packaged_kernel]",
         "set path_to_tmp_project [file join $here tmp_kernel_pack]",
         "",
         f"create_project -force kernel_pack $path_to_tmp_project -part {PART}",
         f"add_files -norecurse [file join $here {KERNEL_NAME}.v]",
         f"set_property top {KERNEL_NAME} [current_fileset]",
         "update_compile_order -fileset sources_1",
         "ipx::package_project -root_dir $path_to_packaged -vendor flightllm -library RTLKernel "
         "-taxonomy /KernelIP -import_files -set_current false",
         "ipx::unload_core $path_to_packaged/component.xml",
         "ipx::edit_ip_in_project -upgrade true -name tmp_edit_project -directory $path_to_packaged "
         "$path_to_packaged/component.xml",
         "set core [ipx::current_core]",
         "set_property core_revision 1 $core",
         "foreach up [ipx::get_user_parameters] {",
         "  ipx::remove_user_parameter [get_property NAME $up] $core",
         "}",
         "",
         "# Vivado infers the AXI interfaces from the port names; stop unless it found each one",
         "proc need_busif {core name mode} {",
         "  set b [ipx::get_bus_interfaces -quiet -of $core $name]",
         "  if {[llength $b] == 0} { error \"package_kernel: no bus interface $name inferred from the ports\" }",
         "  if {[get_property INTERFACE_MODE $b] ne $mode} {",
         "    error \"package_kernel: $name is [get_property INTERFACE_MODE $b], not $mode\"",
         "  }",
         "}",
         "need_busif $core s_axi_control slave"]
    for name, arg, dbits, abits in ifs.m_axi:
        L.append(f"need_busif $core {name} master")
    L.append("")
    L.append("# every AXI interface runs on ap_clk (ap_rst_n its reset)")
    for name, arg, dbits, abits in ifs.m_axi:
        L.append(f"ipx::associate_bus_interfaces -busif {name} -clock ap_clk $core"
                 f"    ;# argument {arg}, {dbits}-bit data, {abits}-bit address")
    L.append("ipx::associate_bus_interfaces -busif s_axi_control -clock ap_clk $core")
    L.append("ipx::associate_bus_interfaces -clock ap_clk -reset ap_rst_n $core")
    L += ["",
          f"# the register map (hw/regmap.py): {len(rm.args)} arguments, address {rm.addr_bits} bits",
          "set mem_map    [::ipx::add_memory_map -quiet \"s_axi_control\" $core]",
          "set addr_block [::ipx::add_address_block -quiet \"reg0\" $mem_map]",
          f"set_property range {1 << rm.addr_bits} $addr_block",
          f"set_property width {DATA_BITS} $addr_block",
          ""]
    ctrl_fields = {"CTRL": [("AP_START", AP_START, "read-write", "modify"), ("AP_DONE", AP_DONE, "read-only", None),
                            ("AP_IDLE", AP_IDLE, "read-only", None), ("AP_READY", AP_READY, "read-only", None),
                            ("AUTO_RESTART", AUTO_RESTART, "read-write", "modify")]}
    for r in rm.ctrl:
        L += [f"set reg [::ipx::add_register \"{r.name}\" $addr_block]",
              f"  set_property description    {_tcl_str(r.doc)} $reg",
              f"  set_property address_offset 0x{r.offset:03X} $reg",
              f"  set_property size           {r.bits} $reg"]
        for fname, mask, access, mwv in ctrl_fields.get(r.name, ()):
            L += [f"set field [ipx::add_field {fname} $reg]",
                  f"  set_property ACCESS {{{access}}} $field",
                  f"  set_property BIT_OFFSET {{{mask.bit_length() - 1}}} $field",
                  "  set_property BIT_WIDTH {1} $field"]
            L.append(f"  set_property MODIFIED_WRITE_VALUE {{{mwv}}} $field" if mwv
                     else "  set_property READ_ACTION {modify} $field")
        L.append("")
    L.append("# the kernel arguments: offset and size from the register map; pointers name their m_axi")
    L.append("# (the read-only status registers after them are read by register access, not arguments)")
    for r in rm.args:
        L += [f"set reg [::ipx::add_register -quiet \"{r.name}\" $addr_block]",
              f"  set_property address_offset 0x{r.offset:03X} $reg",
              f"  set_property size           {r.bits} $reg",
              f"  set_property description    {_tcl_str(r.doc)} $reg"]
        if r.kind == "pointer":
            L += ["  set regparam [::ipx::add_register_parameter -quiet {ASSOCIATED_BUSIF} $reg]",
                  f"  set_property value m_axi_{r.port} $regparam"]
    L += ["",
          "set_property slave_memory_map_ref \"s_axi_control\" [::ipx::get_bus_interfaces -of $core \"s_axi_control\"]",
          "set_property xpm_libraries {XPM_CDC XPM_MEMORY XPM_FIFO} $core",
          "set_property sdx_kernel true $core",
          "set_property sdx_kernel_type rtl $core",
          "set_property supported_families { } $core",
          "set_property auto_family_support_level level_2 $core",
          "ipx::create_xgui_files $core",
          "ipx::update_checksums $core",
          "ipx::check_integrity -kernel $core",
          "ipx::save_core $core",
          "close_project -delete",
          ""]
    return "\n".join(L)


def gen_xo_tcl(params: HwParams) -> str:
    """``gen_xo.tcl``: package the kernel (``package_kernel.tcl``) and ``package_xo`` it."""
    return "\n".join([
        f"# gen_xo.tcl: {XO_NAME} for preset {params.name}. Generated by flightllm.hw.vitis; do not edit.",
        "# vivado -mode batch -source gen_xo.tcl -tclargs <xo path>",
        "if {$::argc != 1} {",
        "  puts \"usage: vivado -mode batch -source gen_xo.tcl -tclargs <xo path>\"",
        "  exit 1",
        "}",
        "set xo_path [file normalize [lindex $::argv 0]]",
        "source -notrace [file join [file dirname [file normalize [info script]]] package_kernel.tcl]",
        "if {[file exists $xo_path]} { file delete -force $xo_path }",
        f"package_xo -xo_path $xo_path -kernel_name {KERNEL_NAME} -ip_directory $path_to_packaged "
        "-ctrl_protocol ap_ctrl_hs",
        ""])


def link_cfg(params: HwParams, ifs: KernelInterfaces, floorplan: str = "floorplan.tcl") -> str:
    """``link.cfg`` for ``v++ --link --config``: clock, ``[connectivity]`` and the floorplan hook
    (``floorplan``: the path ``v++``'s Vivado run sources, absolute in a build)."""
    plan = slr_plan(params)
    first, last = params.weight_channels - params.kv_channels, params.weight_channels - 1
    kvc = f"ch{first:02d}" if first == last else f"ch{first:02d}..ch{last:02d}"
    L = [f"# link.cfg: v++ --link configuration of {KERNEL_NAME} on {PLATFORM} (preset {params.name}).",
         "# Generated by flightllm.hw.vitis from hw/regmap.py, hw/params.py and the Verilog's ports; do not edit.",
         f"# Kernel clock: the preset's {params.clock_mhz:g} MHz on ap_clk (clock 0).",
         f"kernel_frequency={params.clock_mhz:g}",
         "",
         "[connectivity]",
         f"nk={KERNEL_NAME}:1:{CU_NAME}",
         "# the compute unit's anchor in SLR0, where the HBM is attached (floorplan.tcl moves the",
         "# far half of the matrix engine)",
         f"slr={CU_NAME}:SLR0",
         f"# one master per memory: weight channel chNN on its own HBM pseudo-channel HBM[NN] (the HBM",
         f"# switch costs bandwidth laterally); the LD/ST spaces (KV scales, logits, tokens) are",
         f"# interleaved over the last {params.kv_channels} channel buffer(s) ({kvc}, hw/memmap.py), so they",
         f"# share those channels' pseudo-channels"]
    for name, arg, dbits, abits in ifs.m_axi:
        L.append(f"# {name}: argument {arg}, {dbits}-bit")
        L.append(f"sp={CU_NAME}.{arg}:{memory_bank(params, arg)}")
    L += ["",
          "[vivado]",
          "# the SLR floorplan (floorplan.tcl), after the shell's own pblocks exist",
          f"prop=run.impl_1.STEPS.OPT_DESIGN.TCL.PRE={floorplan}",
          ""]
    assert "SLR0" in plan
    return "\n".join(L)


def floorplan_tcl(params: HwParams) -> str:
    """``floorplan.tcl``: the kernel's instances into the shell's per-SLR pblocks
    (:func:`slr_plan`), sourced before ``opt_design`` of ``v++``'s implementation run."""
    plan = slr_plan(params)
    L = [f"# floorplan.tcl: SLR placement of {KERNEL_NAME} (preset {params.name}) on {PLATFORM}.",
         "# Generated by flightllm.hw.vitis (slr_plan); do not edit. Sourced by v++'s Vivado run before",
         "# opt_design (link.cfg [vivado] prop=run.impl_1.STEPS.OPT_DESIGN.TCL.PRE).",
         "#",
         "# Why this placement:",
         "# - The U280's HBM stack and its 32 AXI ports sit at the bottom edge of SLR0. Every path on",
         "#   a pseudo-channel's AXI port (the m_axi read/write muxes, the burst readers and writers of",
         "#   the weight streamers, EMBED and ST_KT) stays in SLR0: a Super Long Line crossing on a",
         "#   512-bit AXI bus at 225 MHz would cost a register stage per direction and hundreds of",
         "#   SLLs per channel.",
         "# - The shell (XDMA, its static region) takes part of SLR0 and SLR1; the kernel lives in the",
         "#   dynamic region's per-SLR pblocks pblock_dynamic_SLR0/1/2. Cells are added to those pblocks",
         "#   (nested under the CU, which link.cfg anchors to SLR0 with slr=), not to new ones.",
         f"# - The matrix engine: chain j is fed by dequant unit j % {params.weight_channels}. With "
         f"{SPLIT_CHANNELS} or more channels",
         "#   SLR0 cannot hold all the engine's DSPs next to the HBM paths, so the dequant units and",
         "#   chains of the upper half of the channels go to SLR1; what crosses the boundary is each",
         "#   channel's raw beat (hbm_port_bits wide, from the reader's data FIFO to the engine's beat",
         "#   FIFO) and the activation broadcast, not the wider dequantized lanes. The crossing is",
         "#   registered on both sides: the reader's data FIFO has an output register (SLR0), the",
         "#   dequant unit takes its input into its skid register or word window and drives ready",
         "#   from registers (SLR1); data and valid pass at most one LUT on each side of the SLL.",
         "# - Buffers (URAM/BRAM, the largest block) and the SFU are left to the placer inside the",
         "#   dynamic region: the buffers need URAM of more than one SLR at u280 size.",
         "",
         "proc flightllm_place {slr cells} {",
         "  set pb [get_pblocks -quiet pblock_dynamic_$slr]",
         "  if {[llength $pb] == 0} {",
         "    puts \"CRITICAL WARNING: flightllm floorplan: no pblock pblock_dynamic_$slr in this platform; cells left to the placer\"",
         "    return",
         "  }",
         "  set found {}",
         "  foreach c $cells {",
         f"    set hit [get_cells -quiet -hierarchical -filter \"NAME =~ */{CU_NAME}/inst/$c\"]",
         "    if {[llength $hit] == 0} { puts \"WARNING: flightllm floorplan: no cell */$c\" } else { lappend found {*}$hit }",
         "  }",
         "  if {[llength $found] && [catch {add_cells_to_pblock $pb $found -clear_locs} msg]} {",
         "    puts \"CRITICAL WARNING: flightllm floorplan: add_cells_to_pblock pblock_dynamic_$slr: $msg\"",
         "  }",
         "  puts \"flightllm floorplan: [llength $found] cells into pblock_dynamic_$slr\"",
         "}",
         ""]
    for slr, cells in plan.items():
        reason = None
        L.append(f"flightllm_place {slr} {{")
        for cell, why in cells:
            if why != reason:
                L.append(f"  # {why}")
                reason = why
            L.append(f"  {cell}")
        L.append("}")
        L.append("")
    return "\n".join(L)


def flow_commands(outdir) -> list:
    """The commands of the flow, each an argv run in ``outdir``."""
    return [
        ["vivado", "-mode", "batch", "-nojournal", "-log", "package_kernel.log", "-source", "gen_xo.tcl",
         "-tclargs", XO_NAME],
        ["v++", "--link", "--target", "hw", "--platform", PLATFORM, "--config", "link.cfg",
         "--save-temps", "--temp_dir", "_x", "--report_level", "2", "--output", XCLBIN_NAME, XO_NAME],
    ]


def _flow_sh(params: HwParams, outdir: pathlib.Path) -> str:
    lines = ["#!/bin/sh",
             f"# flow.sh: the commands `flightllm bitstream --preset {params.name}` runs (generated; do not edit).",
             "# Needs Vivado and Vitis 2022.2+ on PATH (source <Vitis>/settings64.sh) and the platform",
             f"# {PLATFORM} installed.",
             "set -e",
             'cd "$(dirname "$0")"']
    lines += [shlex.join(c) for c in flow_commands(outdir)]
    return "\n".join(lines) + "\n"


def build_files(params: HwParams, verilog: str, outdir) -> dict:
    """``{file name: text}`` of :data:`FILES` for the kernel Verilog text ``verilog`` (its ports
    are checked against :func:`kernel_ports` and the register map first: ``ValueError``)."""
    outdir = pathlib.Path(outdir).resolve()
    rm = register_map(params)
    ports = verilog_ports(verilog)
    want = kernel_ports(params)
    if set(ports) != set(want):
        diff = sorted({p.name for p in set(ports) ^ set(want)})
        raise ValueError(f"the Verilog's ports differ from Kernel({params.name})'s signature: "
                         f"{', '.join(diff[:6])}{' ...' if len(diff) > 6 else ''} (Verilog of another preset?)")
    ifs = kernel_interfaces(ports, rm)
    return {"package_kernel.tcl": package_kernel_tcl(params, ifs),
            "gen_xo.tcl": gen_xo_tcl(params),
            "link.cfg": link_cfg(params, ifs, str(outdir / "floorplan.tcl")),
            "floorplan.tcl": floorplan_tcl(params),
            "flow.sh": _flow_sh(params, outdir)}


# ----------------------------------------------------------------------------- hashes and the flow
def design_hash(params: HwParams) -> str:
    """Hash of what the kernel Verilog is made from: the parameters, ``hw/build.py``, the
    package files ``hw/kernel.py`` imports (directly or not: :data:`flightllm.sim.rtl.KERNEL`'s sources, what
    the simulator's cache is keyed by) and the ``hw/*.json`` tables."""
    from flightllm.sim.rtl import KERNEL, ROOT

    h = hashlib.sha256(params.to_json().encode())
    names = sorted({*KERNEL.sources(), "hw/build.py",
                    *(f"hw/{f.name}" for f in _HW_DIR.glob("*.json"))})
    for name in names:
        h.update(name.encode() + b"\0" + (ROOT / name).read_bytes())
    return h.hexdigest()[:16]


def _kernel_verilog(params: HwParams, outdir: pathlib.Path, given=None, log=print) -> tuple:
    """``(text, key, fresh)``: the kernel Verilog for ``outdir`` (the one there when its design
    hash ``key`` is current, else generated, or read from ``given``); ``fresh``: not yet in
    ``outdir`` (:func:`run_bitstream` writes it once the build files are checked)."""
    v = outdir / f"{KERNEL_NAME}.v"
    stamp = outdir / f"{KERNEL_NAME}.v.hash"
    if given is not None:
        text = pathlib.Path(given).read_text()
        return text, "file:" + hashlib.sha256(text.encode()).hexdigest()[:16], True
    key = design_hash(params)
    if v.exists() and stamp.exists() and stamp.read_text().strip() == key:
        log(f"kernel Verilog up to date ({v.name}, design hash {key})")
        return v.read_text(), key, False
    log(f"generating the {params.name} kernel Verilog ({GEN_NOTE}) ...")
    return verilog_text(params, "kernel"), key, True


def _which(tools=TOOLS) -> list:
    return [t for t in tools if shutil.which(t) is None]


def _reports(outdir: pathlib.Path) -> list:
    """Lines summarising the routed timing and utilisation reports v++ left in ``_x``."""
    from .platform_u280 import parse_timing_summary, parse_utilization   # Vivado's report formats

    out = []
    tim = sorted(outdir.glob("_x/**/*timing_summary_routed.rpt")) or sorted(outdir.glob("_x/**/*timing*routed*.rpt"))
    if tim:
        t = parse_timing_summary(tim[-1].read_text(errors="replace"))
        if "WNS(ns)" in t and "TNS(ns)" in t:
            out.append(f"timing: WNS {t['WNS(ns)']} ns, TNS {t['TNS(ns)']} ns ({tim[-1].relative_to(outdir)})")
        else:
            out.append(f"timing: see {tim[-1].relative_to(outdir)}")
    util = sorted(outdir.glob("_x/**/*util*routed*.rpt"))
    if util:
        for key, (used, _, _) in parse_utilization(util[-1].read_text(errors="replace")).items():
            out.append(f"utilisation: {key} {used:g}")
        out.append(f"utilisation report: {util[-1].relative_to(outdir)}")
    if shutil.which("xclbinutil") and (outdir / XCLBIN_NAME).exists():
        r = subprocess.run(["xclbinutil", "--info", "--input", str(outdir / XCLBIN_NAME)],
                           capture_output=True, text=True)
        out += [f"xclbin: {ln.strip()}" for ln in r.stdout.splitlines() if "Frequency" in ln or "MHz" in ln][:4]
    return out or ["no routed timing/utilisation reports found under _x/"]


def run_bitstream(params: HwParams, outdir, *, dry_run: bool = False, verilog=None, log=print) -> int:
    """Write the kernel Verilog and :data:`FILES` into ``outdir``; run the flow when the tools
    are there and not ``dry_run``. Returns the exit status: 0 built (or up to date, or a dry
    run with the tools present), 2 tools missing (after printing the commands)."""
    outdir = pathlib.Path(outdir)
    slr_plan(params)                              # a preset the U280 cannot take: ValueError now
    text, key, fresh = _kernel_verilog(params, outdir, verilog, log)
    files = build_files(params, text, outdir)     # everything made and checked before the first write
    outdir.mkdir(parents=True, exist_ok=True)
    if fresh:
        _write_atomic(outdir / f"{KERNEL_NAME}.v", text)
        _write_atomic(outdir / f"{KERNEL_NAME}.v.hash", key + "\n")
        _write_atomic(outdir / "params.json", params.to_json() + "\n")
    for name, body in files.items():
        p = outdir / name
        if not (p.exists() and p.read_text() == body):
            _write_atomic(p, body)
    os.chmod(outdir / "flow.sh", 0o755)
    h = hashlib.sha256(text.encode())
    for name in FILES:
        h.update(name.encode() + b"\0" + files[name].encode())
    build_key = h.hexdigest()[:16]
    log(f"wrote {outdir}: {KERNEL_NAME}.v, params.json, {', '.join(FILES)} (build hash {build_key})")
    cmds = flow_commands(outdir)
    stamp = outdir / "build.json"
    xclbin = outdir / XCLBIN_NAME
    if xclbin.exists() and stamp.exists():
        try:
            done = json.loads(stamp.read_text()).get("hash") == build_key
        except ValueError:
            done = False
        if done:
            log(f"{xclbin} is up to date (build hash {build_key})")
            for line in _reports(outdir):
                log(line)
            return 0
    log(f"commands (run in {outdir}):")
    for c in cmds:
        log("  " + shlex.join(c))
    missing = _which()
    if missing:
        print(f"flightllm bitstream: {' and '.join(missing)} not on PATH: wrote the build files to {outdir} "
              f"(run {outdir / 'flow.sh'} on a host with Vitis 2022.2+ and {PLATFORM})", file=sys.stderr)
        return 2
    if dry_run:
        return 0
    for c in cmds:
        log("$ " + shlex.join(c))
        r = subprocess.run(c, cwd=outdir)
        if r.returncode:
            print(f"flightllm bitstream: {c[0]} failed with status {r.returncode} (logs in {outdir})",
                  file=sys.stderr)
            return 1
    _write_atomic(stamp, json.dumps({"hash": build_key, "preset": params.name, "platform": PLATFORM,
                                     "xclbin": XCLBIN_NAME}, indent=1) + "\n")
    log(f"built {xclbin}")
    for line in _reports(outdir):
        log(line)
    return 0


def _run(args) -> int:
    return run_bitstream(get_preset(args.preset), args.output, dry_run=args.dry_run, verilog=args.verilog)


def add_cli(subparsers) -> argparse.ArgumentParser:
    """Register the ``bitstream`` subcommand on an argparse ``subparsers`` object."""
    p = subparsers.add_parser(
        "bitstream", help=f"build the U280 xclbin (Vivado + v++), or write the build files and say what it would run",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"Build {XCLBIN_NAME} for {PLATFORM} from the kernel of a hardware preset.\n\n"
                    f"Writes into DIR: {KERNEL_NAME}.v (regenerated only when hw/ or the preset changed;\n"
                    f"the u280 kernel takes long to generate), params.json, and from the register map and\n"
                    f"the Verilog's ports: {', '.join(FILES)}.\n"
                    f"Then, with vivado and v++ on PATH: vivado -mode batch -source gen_xo.tcl (package_xo)\n"
                    f"and v++ --link --config link.cfg, skipped when DIR/{XCLBIN_NAME} was built from the same\n"
                    f"files (DIR/build.json); prints routed timing and utilisation.\n"
                    f"Without the tools: prints the commands and exits with status 2.",
        epilog="example: flightllm bitstream --preset u280 -o out/bitstream-u280   (what `make bitstream` runs)")
    p.add_argument("--preset", default="u280", choices=sorted(k for k, v in PRESETS.items()
                                                               if v.weight_channels <= HBM_PSEUDO_CHANNELS),
                   help="hardware preset from hw/params.py (default: %(default)s)")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="build directory (created if missing)")
    p.add_argument("--dry-run", action="store_true",
                   help="write every file and print the commands, run nothing (exit 0 when the tools are there)")
    p.add_argument("--verilog", metavar="FILE",
                   help=f"use this {KERNEL_NAME}.v (e.g. from `flightllm build-hw`) instead of generating it; "
                        "its ports are checked against the preset")
    p.set_defaults(func=_run)
    return p

