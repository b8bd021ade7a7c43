"""Verilog build of the kernel: ``build_verilog`` and the ``build-hw`` CLI.

Writes ``<outdir>/flightllm_kernel.v`` (the whole Vitis RTL kernel of :mod:`flightllm.hw.kernel`,
one Verilog module per Amaranth component; ``design="mpe"``: the matrix engine alone,
``flightllm_mpe.v``, what its own testbenches simulate) and ``<outdir>/params.json``
(:meth:`HwParams.to_json`), each to a temporary file renamed into place, so a
reader never sees half a file.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import tempfile

from .params import PRESETS, HwParams, get_preset

__all__ = ["TOP_NAME", "KERNEL_NAME", "DESIGNS", "build_verilog", "add_cli", "verilog_text"]

TOP_NAME = "flightllm_mpe"            #: the matrix engine alone
KERNEL_NAME = "flightllm_kernel"      #: the kernel (hw/kernel.py)


def _kernel(params):
    from .kernel import Kernel
    return Kernel(params)


def _mpe(params):
    from .mpe import MatrixEngine
    return MatrixEngine(params)


#: design -> (top module name, constructor)
DESIGNS = {"kernel": (KERNEL_NAME, _kernel), "mpe": (TOP_NAME, _mpe)}


def verilog_text(params: HwParams, design: str = "kernel") -> str:
    """Verilog source of ``design`` (:data:`DESIGNS`) for ``params``."""
    from amaranth.back import verilog

    if not isinstance(params, HwParams):
        raise TypeError(f"expected HwParams, not {type(params).__name__}")
    if design not in DESIGNS:
        raise ValueError(f"unknown design {design!r}; choose one of {sorted(DESIGNS)}")
    name, make = DESIGNS[design]
    return verilog.convert(make(params), name=name, emit_src=False)


def _write_atomic(path: pathlib.Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)             # mkstemp makes 0600; outputs are ordinary files
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def build_verilog(params: HwParams, outdir, design: str = "kernel") -> list[pathlib.Path]:
    """Write ``design``'s Verilog and ``params.json`` into ``outdir``.

    Parameters
    ----------
    params : HwParams
    outdir : str or os.PathLike
        Created if missing.
    design : str
        ``"kernel"`` (default) or ``"mpe"`` (:data:`DESIGNS`).

    Returns
    -------
    list of pathlib.Path
        ``[<outdir>/<top>.v, <outdir>/params.json]`` (``design``: ``"kernel"`` or ``"mpe"``).
    """
    if not isinstance(params, HwParams):
        raise TypeError(f"expected HwParams, not {type(params).__name__}")
    if design not in DESIGNS:
        raise ValueError(f"unknown design {design!r}; choose one of {sorted(DESIGNS)}")
    out = pathlib.Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    text = verilog_text(params, design)  # elaborate first: no files on a bad preset
    v = out / f"{DESIGNS[design][0]}.v"
    j = out / "params.json"
    _write_atomic(v, text)
    _write_atomic(j, params.to_json() + "\n")
    return [v, j]


def _run(args) -> int:
    paths = build_verilog(get_preset(args.preset), args.output, args.design)
    for p in paths:
        print(p)
    return 0


def add_cli(subparsers) -> argparse.ArgumentParser:
    """Register the ``build-hw`` subcommand on an argparse ``subparsers`` object."""
    p = subparsers.add_parser(
        "build-hw", help="write the kernel's Verilog and params.json",
        description="Generate the Verilog of the Vitis RTL kernel flightllm_kernel (control, "
                    "instruction fetch, memory units, matrix engine, SFU, on-chip buffers, "
                    "s_axi_control and the m_axi ports) for a hardware preset, plus the "
                    "params.json it was built from. The kernel of a small preset takes about "
                    "a minute to generate; u280 several.")
    p.add_argument("--preset", default="sim", choices=sorted(PRESETS),
                   help="hardware preset from hw/params.py (default: %(default)s)")
    p.add_argument("-o", "--output", required=True, metavar="DIR",
                   help="output directory (created if missing)")
    p.add_argument("--design", default="kernel", choices=sorted(DESIGNS),
                   help="kernel (default), or the matrix engine alone (mpe)")
    p.set_defaults(func=_run)
    return p


if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="python -m flightllm.hw.build")
    add_cli(ap.add_subparsers(dest="cmd", required=True))
    a = ap.parse_args()
    raise SystemExit(a.func(a))
