"""SFU cycles per operation in RTL, the golden cycle model's calibration, and the comparison.

Runs the SFU unit on the on-chip buffers (the cocotb build of ``sim/test_sfu.py``: the
``sim`` preset's 8 lanes, buffers for SmolLM2-135M) without stalls or contention and
times every operation (accepted -> ``done``, one at a time):

1. ``latency``: tiny independent ADDs, one at a time and back to back: the cycles from
   an operation's last issue to its ``done`` (= one-at-a-time minus back-to-back interval);
2. every opcode at 1 and 4 token rows (random rows, ``n`` 256), SmolLM2's own last-layer
   SFU instructions on its real buffers (decode: 1 row; prefill: 4 rows) and SOFTMAX of
   one kv head at 64 .. 4096 positions. For each, the overhead beyond streaming the
   elements (the golden model's work term: passes x rows x n / lanes, and the sum tree's
   ``lanes x slots / 2`` cycles per SUM row shorter than that) is ``RTL - work - latency``;
   per opcode a least-squares ``fixed + per_row x rows``.

Writes ``hw/sfu_timing.json`` (what runtime/timing.py gives the golden model) and
``docs/sfu_cycles.json`` / ``docs/sfu_cycles.md``: RTL against the golden model before
(the old estimate: 32 cycles of latency, no overhead) and after the calibration::

    .venv/bin/python bench/sfu_cycles.py
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT.parent))


def golden_cycles(p, plan, ins, regs, timing):
    """Cycles the golden model's timing gives one instruction alone."""
    from flightllm.hw.isa import Instr, Opcode
    from flightllm.runtime.golden import Golden

    g = Golden(p, None, None, plan, functional=False, timing=timing.with_(fetch_latency=0))  # the unit alone
    g.regs = list(regs)
    return g.run([ins, Instr(Opcode.END)]).cycles


def sequence_cycles(p, plan, prog, regs, timing):
    from flightllm.hw.isa import Instr, Opcode
    from flightllm.runtime.golden import Golden

    g = Golden(p, None, None, plan, functional=False, timing=timing.with_(fetch_latency=0))
    g.regs = list(regs)
    return g.run(list(prog) + [Instr(Opcode.END)]).cycles


def softmax_case(pos, rng):
    from flightllm.hw.isa import Buf, Instr, Opcode, Reg
    from flightllm.runtime import sfu
    from flightllm.sim.sfu_cases import make_case
    from flightllm.sim.test_sfu import PARAMS

    plan = {"max_seq": 4096, "kv_bytes": 0, "out_row_bytes": 4, "heads": 9, "kv_heads": 3, "head_dim": 64,
            "layers": 1, "kv_format": "int8r/32", "kv_base": 0}
    regs = [0] * 16
    regs[Reg.LEN.value] = pos
    bufs = {Buf.S.value: (rng.standard_normal((1, 9, 4096)) * 3).astype(np.float32),
            Buf.VS.value: rng.uniform(0.001, 0.05, (4096, 3)).astype(np.float32)}
    prog = [Instr(Opcode.SOFTMAX, dict(src=Buf.S, dst=Buf.PQ, aux=Buf.VS, len_reg=Reg.LEN, kvh=1, rep=3, cap=4096,
                                       scale=float(sfu.score_scale(64))))]
    case = make_case(PARAMS, bufs, np.zeros(16, np.float32), plan, prog, regs)
    case.update(prog=prog, plan=plan, regs=regs)
    return case


def tiny_adds():
    from flightllm.hw.isa import Buf, Instr, Opcode
    from flightllm.sim.sfu_cases import make_case
    from flightllm.sim.test_sfu import PARAMS

    rng = np.random.default_rng(1)
    bufs = {Buf.X.value: rng.standard_normal((1, 8)).astype(np.float32),
            Buf.Y.value: rng.standard_normal((1, 8)).astype(np.float32)}
    prog = [Instr(Opcode.ADD, dict(src=Buf.X, src2=Buf.Y, dst=d, n=8)) for d in (Buf.A, Buf.K, Buf.V, Buf.Q, Buf.H, Buf.G)]
    plan = {"max_seq": 64, "kv_bytes": 0, "out_row_bytes": 4}
    case = make_case(PARAMS, bufs, np.zeros(16, np.float32), plan, prog, [0] * 16)
    case.update(prog=prog, plan=plan, regs=[0] * 16)
    return case


def rows_of(ins, regs):
    from flightllm.hw.isa import Opcode
    f = ins.f
    rows = regs[f["rows_reg"].value if hasattr(f.get("rows_reg"), "value") else f.get("rows_reg", 0)] \
        if f.get("rows_reg") else 1
    if ins.op == Opcode.SOFTMAX:
        return rows * f["rep"] * max(f.get("kvn", 0), 1)
    return 1 if ins.op == Opcode.ARGMAX else rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--outdir", default=str(ROOT / "docs"))
    ap.add_argument("--timing-file", default=str(ROOT / "hw" / "sfu_timing.json"))
    a = ap.parse_args(argv)
    from flightllm.hw.isa import Reg
    from flightllm.runtime.timing import Timing, timing_for
    from flightllm.sim.test_sfu import PARAMS, random_case, run_case, smollm2_cases

    before = Timing()                               # the estimate the model had: 32, no overhead
    bare = Timing(sfu_latency=0)                    # the work term alone
    # 1. latency
    tiny = tiny_adds()
    one = run_case("cycles-tiny-serial", tiny, stall=0.0, serial=True, contention=False)
    b2b = run_case("cycles-tiny-b2b", tiny, stall=0.0, contention=False)
    t_one = int(np.median([d - s for s, d in zip(one["accepted"], one["done"])]))
    interval = int(np.median(np.diff(b2b["accepted"])))
    latency = t_one - interval
    # 2. operations
    rng = np.random.default_rng(0)
    cases = [(f"random, {t} row{'s' * (t > 1)}", random_case(rng, False, T=t)) for t in (1, 4)]
    cases += [(f"SmolLM2 {mode}", c) for mode, c in smollm2_cases()]
    cases += [(f"SOFTMAX, 1 kv head, {pos} positions", softmax_case(pos, rng)) for pos in (64, 512, 2048, 4096)]
    points = []
    for name, case in cases:
        prog, plan, regs = case["prog"], case["plan"], case["regs"]
        st = run_case(f"cycles-{len(points)}", case, stall=0.0, serial=True, contention=False)
        for k, ins in enumerate(prog):
            rtl_c = st["done"][k] - st["accepted"][k]
            work = golden_cycles(PARAMS, plan, ins, regs, bare)
            n = ins.f.get("n") or f"{regs[ins.f['len_reg'].value] + ins.f.get('len_add', 0)} pos"
            points.append({"case": name, "op": ins.op.name, "rows": rows_of(ins, regs), "n": n, "rtl": rtl_c,
                           "work": work, "before": golden_cycles(PARAMS, plan, ins, regs, before),
                           "ins": ins, "plan": plan, "regs": regs})
    overhead = {}
    for op in sorted({p["op"] for p in points}):
        pts = [p for p in points if p["op"] == op]
        y = np.array([p["rtl"] - p["work"] - latency for p in pts], float)
        r = np.array([p["rows"] for p in pts], float)
        if len(set(r)) > 1:
            per_row, fixed = np.polyfit(r, y, 1)
        else:
            per_row, fixed = 0.0, float(y.mean())
        overhead[op] = [round(float(fixed), 1) + 0.0, round(float(per_row), 1) + 0.0]   # (no -0.0)
    tf = pathlib.Path(a.timing_file)
    tf.write_text(json.dumps({"params": PARAMS.name, "latency_cycles": latency, "overhead": overhead,
                              "source": "bench/sfu_cycles.py"}, indent=1) + "\n")
    after = timing_for(PARAMS)
    assert after.sfu_latency == latency
    for p in points:
        p["after"] = golden_cycles(PARAMS, p["plan"], p["ins"], p["regs"], after)
    seqs = []
    for name, case in cases:
        if name.startswith("SmolLM2"):
            bb = run_case(f"cycles-b2b-{name.split()[-1]}", case, stall=0.0, contention=False)
            seqs.append({"case": f"{name}: last layer + head, back to back", "ops": len(case["prog"]),
                         "rtl": bb["done"][-1],
                         "before": sequence_cycles(PARAMS, case["plan"], case["prog"], case["regs"], before),
                         "after": sequence_cycles(PARAMS, case["plan"], case["prog"], case["regs"], after)})
    rows = [{k: v for k, v in p.items() if k not in ("ins", "plan", "regs")} for p in points]
    res = {"params": PARAMS.name, "lanes": PARAMS.sfu_lanes, "latency": latency, "t_one_tiny": t_one,
           "interval_tiny": interval, "overhead": overhead, "ops": rows, "sequences": seqs}
    out = pathlib.Path(a.outdir)
    (out / "sfu_cycles.json").write_text(json.dumps(res, indent=1) + "\n")
    err = [abs(p["after"] / p["rtl"] - 1) for p in rows]
    md = ["# SFU cycles: RTL against the golden cycle model", "",
          f"`python bench/sfu_cycles.py`: the SFU unit on the on-chip buffers under Verilator (`{PARAMS.name}`: "
          f"{PARAMS.sfu_lanes} lanes, {PARAMS.sfu_acc_slots} accumulator slots, buffers for SmolLM2-135M), no "
          "stalls, one operation at a time: cycles from the operation accepted to its `done` (results in the "
          "buffers). *Before*: the golden model's old estimate (elements / lanes x passes + 32). *After*: the "
          f"model calibrated on these runs (`hw/sfu_timing.json`): a latency of {latency} cycles (last issue -> "
          f"done: {t_one} one at a time, minus {interval} between back-to-back tiny ADDs) and per opcode "
          "`fixed + per_row x rows` issue cycles beyond the elements (dependent passes waiting for the "
          "115-cycle lanes, reductions, SQRT).", "",
          "| opcode | fixed | per row |", "|---|---:|---:|"]
    md += [f"| {op} | {f:,.0f} | {r:,.0f} |" for op, (f, r) in overhead.items()]
    md += ["", f"Calibrated model against RTL over {len(rows)} operations: mean |error| "
               f"{100 * np.mean(err):.1f}%, max {100 * max(err):.1f}%.", "",
           "| case | op | rows | n | RTL | before | after | after / RTL |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        md.append(f"| {r['case']} | {r['op']} | {r['rows']} | {r['n']} | {r['rtl']:,} | {r['before']:,} | "
                  f"{r['after']:,} | {r['after'] / r['rtl']:.2f} |")
    md += ["", "Back to back (independent operations overlap: the next is accepted when the previous has "
           "issued its last element; dependent ones wait for its results):", "",
           "| sequence | ops | RTL | before | after | after / RTL |", "|---|---:|---:|---:|---:|---:|"]
    for s in seqs:
        md.append(f"| {s['case']} | {s['ops']} | {s['rtl']:,} | {s['before']:,} | {s['after']:,} | "
                  f"{s['after'] / s['rtl']:.2f} |")
    (out / "sfu_cycles.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
