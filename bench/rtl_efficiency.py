"""RTL efficiency of the matrix engine: cycles in Verilator vs the MAC-bound ideal.

Runs MV (decode, T = 1) and MM (prefill, T tokens) over LLaMA-like shape ratios,
scaled down to the ``sim`` preset (hidden size ``--dim``): attention projection
N:K = 1:1, KV projection 3:8, FFN up 8:3, FFN down 3:8, for every weight format
the preset supports (MV) and every N:M pattern at one width (MM), with no stalls.

* compute ideal = kept MACs / MAC lanes (``chains * chain_len``), one beat per cycle;
* port bound = payload words per channel (the testbench offers one ``hbm_port_bits``
  word per cycle on every stream), the most a dequant unit can take;
* bound = max(compute ideal, port bound): the fewest cycles the operation can take
  with this stimulus (the engine is compute- or bandwidth-bound);
* op efficiency = bound / cycles from the config handshake to the last result
  (pipeline fill and drain included, nothing overlapped between operations);
* steady efficiency = the same per row tile, between the first and last result;
* HBM bound = cycles the channels need at ``hbm_channel_gbps`` for the operation's
  payload + scales (the device's bandwidth bound; for ``sim-mc`` it equals the port
  rate, as on the u280).

Presets: ``sim`` and ``sim-mc`` (:data:`flightllm.sim.cases.SIM_MC`, u280 ratios:
4 chains per weight channel, two-segment beats for 1:4 / 2:8).

Writes ``docs/rtl_efficiency.json`` and ``docs/rtl_efficiency.md``.

Usage::

    .venv/bin/python bench/rtl_efficiency.py                   # sim, full table
    .venv/bin/python bench/rtl_efficiency.py --preset sim-mc   # u280-ratio variant
    .venv/bin/python bench/rtl_efficiency.py --quick           # a few rows
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

from flightllm.hw.formats import SCALE_BITS
from flightllm.hw.geometry import EngineGeometry
from flightllm.hw.params import get_preset
from flightllm.sim import rtl
from flightllm.sim.cases import SIM_MC, make_case, save_cases

ROOT = pathlib.Path(__file__).resolve().parent.parent

SHAPES = {                    # name: (N / dim, K / dim) -- LLaMA layer ratios
    "attn 1:1": (1, 1),
    "kv 3:8": (3 / 8, 1),
    "ffn-up 8:3": (8 / 3, 1),
    "ffn-down 3:8": (1, 8 / 3),
}


def shape(dim, ratio, geom):
    n = int(round(dim * ratio[0] / geom.R)) * geom.R
    k = int(round(dim * ratio[1] / geom.G)) * geom.G
    return n, k


def hbm_bound(geom, wf, n, k):
    """Cycles the weight channels need at the sustained HBM rate (per channel, in parallel)."""
    p = geom.params
    f = geom.fmt_of(wf)
    blocks = -(-n // geom.R) * (k // geom.G) * geom.Rc
    chan_bytes = blocks * (f.block_bits // 8 + SCALE_BITS // 8)
    per_cycle = p.hbm_weight_bytes_per_cycle / p.weight_channels
    return chan_bytes / per_cycle


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="sim")
    ap.add_argument("--dim", type=int, default=384, help="scaled hidden size (default %(default)s)")
    ap.add_argument("--mm-tokens", type=int, default=4, help="T of the MM rows (default %(default)s)")
    ap.add_argument("--mm-bits", type=int, default=4, help="weight width of the MM rows")
    ap.add_argument("--quick", action="store_true", help="a few formats only")
    ap.add_argument("-o", "--outdir", default=str(ROOT / "docs"))
    a = ap.parse_args(argv)

    params = SIM_MC if a.preset == SIM_MC.name else get_preset(a.preset)
    geom = EngineGeometry(params)
    rng = np.random.default_rng(0)
    fmts = geom.weight_formats()
    if a.quick:
        fmts = [f for f in fmts if f.bits == 4]
    jobs = [(wf, s, 1) for wf in fmts for s in SHAPES]
    jobs += [(wf, s, a.mm_tokens) for wf in geom.weight_formats() if wf.bits == a.mm_bits
             for s in (SHAPES if not a.quick else ["attn 1:1"])]
    cases = []
    for wf, s, t in jobs:
        n, k = shape(a.dim, SHAPES[s], geom)
        c = make_case(geom, wf, n, k, t, rng, act_base=0)
        c["shape"], c["mode"] = s, ("MV" if t == 1 else f"MM T={t}")
        c["hbm"] = hbm_bound(geom, wf, n, k)
        c["port"] = geom.stream_words(wf, n, k)[0]
        c["fmt"] = wf
        cases.append(c)

    t0 = time.time()
    stim = save_cases(rtl.build_dir(params) / "run-bench" / "stimuli.npz", params, cases, stall=0.0)
    rtl.run(params, "mpe_cases", stim, "bench")
    wall = time.time() - t0
    rep = json.loads(pathlib.Path(str(stim) + ".cycles.json").read_text())

    lanes = geom.R * geom.L
    rows = []
    for c, r in zip(cases, rep):
        n, k, t = c["N"], c["K"], c["cfg"]["tokens"]
        tiles = -(-n // geom.R)
        ideal = c["kept_macs"] / lanes
        bound = max(ideal, c["port"])
        # Row padding: a ragged last tile still takes a whole tile's beats.
        steady = None
        if tiles > 1:
            # results leave once per row tile (T back-to-back cycles at its end)
            per_tile = bound / (n / geom.R)
            steady = per_tile * (tiles - 1) / max(1, r["cycles"] - r["first_out"] - (t - 1))
        rows.append({
            "mode": c["mode"], "format": c["fmt"].name, "pattern": "dense" if c["fmt"].dense else f"{c['fmt'].n_keep}:{c['fmt'].m}",
            "bits": c["fmt"].bits, "shape": c["shape"], "N": n, "K": k, "T": t,
            "kept_macs": c["kept_macs"], "ideal_cycles": round(ideal, 1), "port_bound_cycles": c["port"],
            "bound_cycles": round(bound, 1), "rtl_cycles": r["cycles"],
            "op_efficiency": round(bound / r["cycles"], 4),
            "steady_efficiency": None if steady is None else round(steady, 4),
            "hbm_bound_cycles": round(c["hbm"], 1),
            "hbm_bound_fraction_of_ideal": round(ideal / c["hbm"], 3),
            "device_efficiency": round(max(ideal, c["hbm"]) / max(r["cycles"], c["hbm"]), 4),
        })
    out = pathlib.Path(a.outdir)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "" if params.name == "sim" else f"_{params.name.replace('-', '_')}"
    meta = {"preset": params.name, "params": params.to_dict(), "dim": a.dim, "mac_lanes": lanes,
            "sim_wall_s": round(wall, 1),
            "command": "python bench/rtl_efficiency.py" + ("" if params.name == "sim" else f" --preset {params.name}")
                       + (f" --dim {a.dim}" if a.dim != 384 else "") + (" --quick" if a.quick else "")}
    (out / f"rtl_efficiency{suffix}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    md = [f"# RTL efficiency of the matrix engine (`{params.name}` preset)", "",
          f"Measured under Verilator (cocotb, no stalls) by `{meta['command']}`; {lanes} MAC lanes "
          f"({geom.R} chains x {geom.L}, {geom.Rc} chains per weight channel, {geom.W}-bit HBM port), "
          f"hidden size scaled to {a.dim}.",
          "*compute* = kept MACs / MAC lanes; *port* = payload words per channel (the testbench offers "
          "one word per cycle); *bound* = max of the two. *op eff.* = bound / RTL cycles from the config "
          "handshake to the last result (fill and drain included); *steady* is per row tile between the "
          "first and last result. *HBM* is the cycles the weight channels need at the preset's sustained "
          f"{params.hbm_channel_gbps} GB/s per channel ({params.hbm_weight_bytes_per_cycle / params.weight_channels:.1f} B/cycle, "
          "payload + scales); *device eff.* = max(compute, HBM) / max(RTL, HBM), the efficiency on a device "
          "whose channels deliver that rate.", "",
          "| mode | format | shape | N x K | compute | port | HBM | RTL cycles | op eff. | steady eff. | device eff. |",
          "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        st = "-" if r["steady_efficiency"] is None else f"{100 * r['steady_efficiency']:.1f}%"
        md.append(f"| {r['mode']} | {r['format']} | {r['shape']} | {r['N']} x {r['K']} | {r['ideal_cycles']:.0f} | "
                  f"{r['port_bound_cycles']} | {r['hbm_bound_cycles']:.0f} | "
                  f"{r['rtl_cycles']} | {100 * r['op_efficiency']:.1f}% | {st} | {100 * r['device_efficiency']:.1f}% |")
    worst = min(rows, key=lambda r: r["op_efficiency"])
    md += ["", f"Worst op efficiency: {100 * worst['op_efficiency']:.1f}% ({worst['mode']} {worst['format']} {worst['shape']}). "
           f"Simulation wall time {wall:.0f} s."]
    (out / f"rtl_efficiency{suffix}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
