"""RTL efficiency of the matrix engine: cycles in Verilator vs the ideal.

Runs MV (decode, T = 1) and MM (prefill, T tokens) over LLaMA-like shape ratios scaled
to the preset (hidden size ``--dim``): attention projection N:K = 1:1, KV projection 3:8,
FFN up 8:3, FFN down 3:8, for every weight format of the preset (MV) and, at one width,
every format (MM, with as many tokens as the activation buffer holds, up to
``--mm-tokens``), with no stalls; then the attention operations over the raw KV formats
(``int8r/32``, ``int4r/32``: scale 1, no min): QK (the K cache of one kv head as the
weight, ``--positions`` rows x ``--head-dim`` (128, or the most the activation buffer
holds for the GQA group), MM T = 1 and T = ``--gqa-rep`` queries, u = 1) and PV (the
transposed V cache, head_dim rows x ``--positions``, softmax probabilities requantized
per 32 positions, T = 1 and T = ``--gqa-rep``).

* compute ideal = kept MACs / MAC lanes (``chains * chain_len``): one beat per cycle;
* port bound = the words one channel streams (records, scales and mins included; the
  testbench offers one ``hbm_port_bits`` word per cycle on every channel), the most a
  dequant unit can take;
* bound = max(compute ideal, port bound): the fewest cycles the operation can take with
  this stimulus;
* op efficiency = bound / cycles from the config handshake to the last result (pipeline
  fill and drain included);
* steady efficiency = the same between the first and the last result (fill excluded);
* HBM bound = cycles the channels need at ``hbm_channel_gbps`` for the operation's
  records (the device's bandwidth bound; for ``sim-mc`` and ``u280-2ch`` it equals the
  port rate, as on the u280); device efficiency = max(compute, HBM) / max(RTL, HBM).

Presets: ``sim`` (hidden 384), ``sim-mc`` (768: 4x the MAC lanes, the same cycles per
operation) and ``u280-2ch`` (1152: the u280's per-channel geometry, 8x ``sim``'s lanes).

Writes ``docs/rtl_efficiency[_<preset>].{json,md}``, and the measured MPE latency the
performance model takes into ``hw/mpe_timing.json`` (merged with the other presets'
entries, written atomically): per preset ``latency_cycles``, the median over the
measured operations of RTL cycles - bound (fill, drain and issue losses of one
operation), its ``min`` and ``max``, ``ops`` (how many), ``source`` (the command), and
the same per kind of operation (``by_kind``: ``weights``, ``attention``).

Usage::

    .venv/bin/python bench/rtl_efficiency.py                     # sim, full table
    .venv/bin/python bench/rtl_efficiency.py --preset u280-2ch   # the u280's geometry
    .venv/bin/python bench/rtl_efficiency.py --quick             # a few rows
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

import numpy as np

from flightllm.hw.geometry import EngineGeometry
from flightllm.hw.params import get_preset
from flightllm.sim import rtl
from flightllm.sim.cases import make_case, pv_case, qk_case, random_qtensor, save_cases

ROOT = pathlib.Path(__file__).resolve().parent.parent

SHAPES = {                    # name: (N / dim, K / dim) -- LLaMA layer ratios
    "attn 1:1": (1, 1),
    "kv 3:8": (3 / 8, 1),
    "ffn-up 8:3": (8 / 3, 1),
    "ffn-down 3:8": (1, 8 / 3),
}
DEFAULT_DIM = {"sim": 384, "sim-mc": 768, "u280-2ch": 1152}
TIMING = ROOT / "hw" / "mpe_timing.json"


def shape(dim, ratio, geom, wf):
    n = max(1, int(round(dim * ratio[0] / geom.R))) * geom.R
    k = max(1, int(round(dim * ratio[1] / wf.group_size))) * wf.group_size
    return n, k


def hbm_bound(geom, wf, n, k):
    """Cycles one weight channel needs for its records at the sustained HBM rate."""
    p = geom.params
    records = -(-n // geom.R) * (k // wf.group_size)
    return records * geom.info(wf).record_bits / 8 / p.hbm_channel_bytes_per_cycle


def attention_head_dim(geom, want: int, rep: int, group: int) -> int:
    """The largest head_dim <= ``want`` (a multiple of ``group``) whose ``rep`` query vectors
    fit the activation buffer."""
    hd = want - want % group
    while hd > group and rep * geom.act_stride(hd) > geom.act_words:
        hd -= group
    return hd


def latency_stats(values) -> dict:
    """Median, min and max of RTL cycles - bound over operations (one decimal)."""
    v = np.asarray(values, np.float64)
    return {"latency_cycles": round(float(np.median(v)), 1), "min": round(float(v.min()), 1),
            "max": round(float(v.max()), 1), "ops": int(v.size)}


def write_timing(path: pathlib.Path, preset: str, entry: dict) -> dict:
    """Merge ``entry`` as ``preset``'s into the JSON at ``path`` (other presets kept),
    written atomically (a temporary file in the same folder, then a rename)."""
    path = pathlib.Path(path)
    data = json.loads(path.read_text()) if path.exists() else {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object of presets")
    data[preset] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(data, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return data


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="sim", choices=sorted(DEFAULT_DIM))
    ap.add_argument("--dim", type=int, default=None, help="scaled hidden size (default: per preset)")
    ap.add_argument("--mm-tokens", type=int, default=4, help="T of the MM rows (default %(default)s)")
    ap.add_argument("--positions", type=int, default=320,
                    help="KV positions of the attention rows (default %(default)s, a multiple of 32)")
    ap.add_argument("--head-dim", type=int, default=128, help="head_dim of the attention rows (default "
                    "%(default)s, or the most the activation buffer holds for the GQA group)")
    ap.add_argument("--gqa-rep", type=int, default=3, help="query heads per kv head: T of the attention MM "
                    "rows (default %(default)s)")
    ap.add_argument("--quick", action="store_true", help="a few formats only")
    ap.add_argument("-o", "--outdir", default=str(ROOT / "docs"))
    ap.add_argument("--timing", default=str(TIMING), help="latency JSON to merge this preset's entry into "
                    "(default %(default)s; '' to skip)")
    a = ap.parse_args(argv)

    params = get_preset(a.preset)
    dim = a.dim or DEFAULT_DIM[a.preset]
    geom = EngineGeometry(params)
    rng = np.random.default_rng(0)
    fmts = geom.weight_formats()
    if a.quick:
        fmts = fmts[1:2]
    jobs = [(wf, s, 1) for wf in fmts for s in SHAPES]
    jobs += [(wf, s, a.mm_tokens) for wf in fmts if wf.bits == 4 for s in (SHAPES if not a.quick else ["attn 1:1"])]
    cases = []
    for wf, s, t in jobs:
        n, k = shape(dim, SHAPES[s], geom, wf)
        t = min(t, geom.act_words // geom.act_stride(k))     # MM tokens the buffer holds
        c = make_case(geom, random_qtensor(wf, n, k, rng), t, rng, act_base=0)
        c.update(shape=s, mode="MV" if t == 1 else f"MM T={t}", fmt=wf, hbm=hbm_bound(geom, wf, n, k),
                 kind="weights")
        cases.append(c)
    # attention over the raw KV formats: QK (K cache as the weight) and PV (V^T)
    kv = geom.kv_formats()
    if a.quick:
        kv = kv[:1]
    gqa = a.gqa_rep
    hd_used = {}
    for wf in kv:
        hd = hd_used[wf.name] = attention_head_dim(geom, a.head_dim, gqa, wf.group_size)
        pos = a.positions
        for t in (1, gqa):
            c = qk_case(geom, wf, pos, hd, t, rng, act_base=0)
            c.update(shape="attn QK (pos x hd)", mode="MV" if t == 1 else f"MM T={t}", fmt=wf,
                     hbm=hbm_bound(geom, wf, pos, hd), kind="attention")
            cases.append(c)
        for t in (1, gqa):
            c = pv_case(geom, wf, hd, pos, t, rng, act_base=0)
            c.update(shape="attn PV (hd x pos)", mode="MV" if t == 1 else f"MM T={t}", fmt=wf,
                     hbm=hbm_bound(geom, wf, hd, pos), kind="attention")
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
        ideal = c["kept_macs"] / lanes
        bound = max(ideal, r["words"])
        tiles = -(-n // geom.R)
        # between the first result (end of tile 0) and the last: tiles - 1 tiles of work
        steady = None
        if tiles > 1:
            steady = bound * (tiles - 1) / tiles / max(1, r["cycles"] - r["first_out"])
        rows.append({
            "kind": c["kind"],
            "mode": c["mode"], "format": c["fmt"].name, "shape": c["shape"], "N": n, "K": k, "T": t,
            "kept_macs": c["kept_macs"], "ideal_cycles": round(ideal, 1), "port_bound_cycles": r["words"],
            "bound_cycles": round(bound, 1), "rtl_cycles": r["cycles"], "first_out": r["first_out"],
            "op_efficiency": round(bound / r["cycles"], 4),
            "steady_efficiency": None if steady is None else round(min(1.0, steady), 4),
            "hbm_bound_cycles": round(c["hbm"], 1),
            "device_efficiency": round(max(ideal, c["hbm"]) / max(r["cycles"], c["hbm"]), 4),
        })
    out = pathlib.Path(a.outdir)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "" if params.name == "sim" else f"_{params.name.replace('-', '_')}"
    cmd = ("python bench/rtl_efficiency.py" + ("" if params.name == "sim" else f" --preset {params.name}")
           + (f" --dim {a.dim}" if a.dim else "") + (" --quick" if a.quick else ""))
    meta = {"preset": params.name, "params": params.to_dict(), "dim": dim, "mac_lanes": lanes,
            "attention": {"positions": a.positions, "head_dim_wanted": a.head_dim, "head_dim": hd_used,
                          "gqa_rep": gqa},
            "sim_wall_s": round(wall, 1), "command": cmd}
    (out / f"rtl_efficiency{suffix}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    # the performance model's latency: RTL cycles - bound, per operation
    over = [r["rtl_cycles"] - r["bound_cycles"] for r in rows]
    timing = latency_stats(over) | {"source": "bench/rtl_efficiency.py --preset " + params.name
                                    + (f" --dim {a.dim}" if a.dim else "") + (" --quick" if a.quick else "")}
    timing["by_kind"] = {kind: latency_stats([r["rtl_cycles"] - r["bound_cycles"] for r in rows
                                              if r["kind"] == kind])
                         for kind in dict.fromkeys(r["kind"] for r in rows)}
    if a.timing:
        write_timing(pathlib.Path(a.timing), params.name, timing)
    md = [f"# RTL efficiency of the matrix engine (`{params.name}` preset)", "",
          f"Measured under Verilator (cocotb, no stalls) by `{cmd}`; {lanes} MAC lanes "
          f"({geom.R} chains x {geom.L}, {geom.Rc} chains per weight channel, {geom.W}-bit HBM port), "
          f"hidden size scaled to {dim}.",
          "*compute* = kept MACs / MAC lanes; *port* = words per channel (records with their scales; the "
          "testbench offers one word per cycle); *bound* = max of the two. *op eff.* = bound / RTL cycles "
          "from the config handshake to the last result (fill and drain included); *steady* excludes the "
          "fill (first result to last). *HBM* is the cycles a channel needs at the preset's sustained "
          f"{params.hbm_channel_gbps} GB/s ({params.hbm_channel_bytes_per_cycle:.1f} B/cycle); *device eff.* = "
          "max(compute, HBM) / max(RTL, HBM).", "",
          "| mode | format | shape | N x K | compute | port | HBM | RTL cycles | op eff. | steady eff. | device eff. |",
          "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        st = "-" if r["steady_efficiency"] is None else f"{100 * r['steady_efficiency']:.1f}%"
        md.append(f"| {r['mode']} | {r['format']} | {r['shape']} | {r['N']} x {r['K']} | {r['ideal_cycles']:.0f} | "
                  f"{r['port_bound_cycles']} | {r['hbm_bound_cycles']:.0f} | "
                  f"{r['rtl_cycles']} | {100 * r['op_efficiency']:.1f}% | {st} | {100 * r['device_efficiency']:.1f}% |")
    worst = min(rows, key=lambda r: r["op_efficiency"])
    bk = timing["by_kind"]
    hd_text = "/".join(str(v) for v in dict.fromkeys(hd_used.values()))
    md += ["", "Attention rows: the raw KV formats (scale 1, no min) as the weight: *attn QK* is the K cache "
           f"of one kv head ({a.positions} positions x head_dim {hd_text}) against T query vectors (MV: one "
           f"head, MM: the {gqa} heads of a GQA group, u = 1); *attn PV* is V^T (head_dim x {a.positions} "
           "positions) against the requantized softmax probabilities (a factor per 32 positions).", "",
           f"MPE latency (RTL cycles - bound, per operation; `hw/mpe_timing.json`): median "
           f"{timing['latency_cycles']:g} cycles (min {timing['min']:g}, max {timing['max']:g}, "
           f"{timing['ops']} operations); "
           + "; ".join(f"{k} median {v['latency_cycles']:g} ({v['min']:g} .. {v['max']:g}, {v['ops']} ops)"
                       for k, v in bk.items()) + "."]
    md += ["", f"Worst op efficiency: {100 * worst['op_efficiency']:.1f}% ({worst['mode']} {worst['format']} "
           f"{worst['shape']}, {worst['rtl_cycles']} cycles, first result after {worst['first_out']}). "
           f"Simulation wall time {wall:.0f} s (build included)."]
    (out / f"rtl_efficiency{suffix}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
