"""Verilog build of the matrix engine: ``build_verilog`` and the ``build-hw`` CLI.

Writes ``<outdir>/flightllm_mpe.v`` (the MPE with its dequant units and chains, one
Verilog module per Amaranth component) and ``<outdir>/params.json``
(:meth:`HwParams.to_json`), each to a temporary file renamed into place, so a
reader never sees half a file.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import tempfile

from .params import PRESETS, HwParams, get_preset

__all__ = ["TOP_NAME", "build_verilog", "add_cli", "verilog_text"]

TOP_NAME = "flightllm_mpe"


def verilog_text(params: HwParams) -> str:
    """Verilog source of the matrix engine for ``params``."""
    from amaranth.back import verilog

    from .mpe import MatrixEngine

    if not isinstance(params, HwParams):
        raise TypeError(f"expected HwParams, not {type(params).__name__}")
    return verilog.convert(MatrixEngine(params), name=TOP_NAME, emit_src=False)


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


def build_verilog(params: HwParams, outdir) -> list[pathlib.Path]:
    """Write the matrix engine's Verilog and ``params.json`` into ``outdir``.

    Parameters
    ----------
    params : HwParams
    outdir : str or os.PathLike
        Created if missing.

    Returns
    -------
    list of pathlib.Path
        ``[<outdir>/flightllm_mpe.v, <outdir>/params.json]``.
    """
    if not isinstance(params, HwParams):
        raise TypeError(f"expected HwParams, not {type(params).__name__}")
    out = pathlib.Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    text = verilog_text(params)          # elaborate first: no files on a bad preset
    v = out / f"{TOP_NAME}.v"
    j = out / "params.json"
    _write_atomic(v, text)
    _write_atomic(j, params.to_json() + "\n")
    return [v, j]


def _run(args) -> int:
    paths = build_verilog(get_preset(args.preset), args.output)
    for p in paths:
        print(p)
    return 0


def add_cli(subparsers) -> argparse.ArgumentParser:
    """Register the ``build-hw`` subcommand on an argparse ``subparsers`` object."""
    p = subparsers.add_parser(
        "build-hw", help="write the matrix engine's Verilog and params.json",
        description="Generate the Verilog of the matrix engine (MPE: dequant units, sparse "
                    "DSP chains, activation buffer) for a hardware preset, plus the "
                    "params.json it was built from.")
    p.add_argument("--preset", default="sim", choices=sorted(PRESETS),
                   help="hardware preset from hw/params.py (default: %(default)s)")
    p.add_argument("-o", "--output", required=True, metavar="DIR",
                   help="output directory (created if missing)")
    p.set_defaults(func=_run)
    return p


if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="python -m flightllm.hw.build")
    add_cli(ap.add_subparsers(dest="cmd", required=True))
    a = ap.parse_args()
    raise SystemExit(a.func(a))
