"""Cycles of the RTL kernel against the golden cycle model, per run and per instruction.

The tiny model (``flightllm tiny-model``, default shape) compiled for the ``sim`` preset runs
its prefill and decode programs on the Verilated kernel (``--backend rtl``) and on the
golden model, once with the AXI memories answering at once and once with random pauses on
every AXI channel. Per run: the kernel's cycle counter against the model's cycles (both
include the SFU tables' load on the first run after loading, as the kernel does it). Per
opcode: how much the instructions of that opcode add to the gap, from the kernel's trace
outputs and the model's own schedule (``Golden.trace``): in program order, each
instruction's completion in the RTL and in the model (from the run's start), and the
change of their difference from the previous instruction's. With ``--smollm2-block``: one
block of the real SmolLM2 on the kernel, the Verilator speed, and what a whole SmolLM2
token would take to simulate.

    python bench/kernel_cycles.py [--decode-steps 3] [--prompt 6] [--pauses 0 0.2] [--smollm2-block]

writes ``docs/kernel_cycles.json`` and ``docs/kernel_cycles.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
#: tokens the SmolLM2 block keeps (its tokenizer cut: compiler.tiny.cut_vocabulary)
BLOCK_VOCAB = 384


def rtl_instructions(records):
    """Kernel trace records -> [(pc, unit, issue cycle, done cycle)] (dones pair with issues
    in each unit's order)."""
    issues, dones = defaultdict(list), defaultdict(list)
    for cyc, kind, unit, pc in records:
        (issues if kind == "issue" else dones)[unit].append((cyc, pc))
    out = []
    for u, iss in issues.items():
        for (ci, pc), (cd, _) in zip(iss, dones[u]):
            out.append((pc, u, ci, cd))
    return out


def _devices(art_dir, pause: float):
    """The artifact at ``art_dir`` loaded on the Verilated kernel (AXI pause probability
    ``pause``) and on the golden model: ``(artifact, rtl, golden)``."""
    from flightllm.compiler.artifact import Artifact
    from flightllm.runtime.device import GoldenDevice
    from flightllm.runtime.rtl import RtlDevice

    art = Artifact(art_dir)
    rtl = RtlDevice(pause=pause)
    rtl.load(art)
    gold = GoldenDevice(weight_cache=False)
    gold.load(art)
    return art, rtl, gold


def _run(dev, name: str, pos: int, ids):
    """Program ``name`` on ``dev`` with tokens ``ids`` at position ``pos``: its run stats."""
    dev.write_tokens(pos, ids)
    dev.write_reg("POS", pos)
    dev.write_reg("LEN", len(ids))
    dev.start(name)
    return dev.wait()


def _run_both(rtl, gold, name: str, pos: int, ids, trace: bool = False) -> dict:
    """:func:`_run` on the kernel (timed; with ``trace`` its trace records) and on the golden
    model (with ``trace`` its per-instruction schedule); the last row's logits and ARGMAX
    must be bit-identical (else the bench stops)."""
    import time

    if trace:
        rtl.bus.trace(True)
        gold.machine.trace = []
    t = time.perf_counter()
    r = _run(rtl, name, pos, ids)
    wall = time.perf_counter() - t
    recs = None
    if trace:
        recs = rtl.bus.trace_records()
        rtl.bus.trace(False)
    g = _run(gold, name, pos, ids)
    gtrace, gold.machine.trace = gold.machine.trace, None
    same = np.array_equal(np.asarray(rtl.read_logits(0, 1), np.float32).view(np.uint32),
                          np.asarray(gold.read_logits(0, 1), np.float32).view(np.uint32))
    if not same or rtl.read_reg("ARGMAX") != gold.read_reg("ARGMAX"):
        raise SystemExit(f"{name} at position {pos} on the RTL differs from the golden model")
    return {"rtl": r, "golden": g, "wall": wall, "records": recs, "trace": gtrace}


def measure(steps: int, prompt_len: int, pause: float) -> dict:
    """The runs and the per-opcode gap of one pause probability."""
    os.environ.setdefault("FLIGHTLLM_CACHE", str(Path(tempfile.gettempdir()) / "flcache"))
    from flightllm.compiler.compile import compile_model
    from flightllm.compiler.tiny import write_tiny_model
    from flightllm.hw.params import get_preset
    from flightllm.runtime.device import artifact_programs

    d = Path(tempfile.mkdtemp(prefix="kernel-cycles-"))
    compile_model(write_tiny_model(d / "tiny.gguf"), d / "art", "native", get_preset("sim"), progress=False)
    art, rtl, gold = _devices(d / "art", pause)
    progs = artifact_programs(art)
    rng = np.random.default_rng(0)
    prompt = [int(t) for t in rng.integers(0, gold.plan["vocab"], prompt_len)]
    runs, per_op = [], defaultdict(lambda: {"n": 0, "gap": 0.0})
    plan = [("prefill_last", 0, prompt)] + [("decode", prompt_len + k, None) for k in range(steps)]
    tok = None
    for name, pos, ids in plan:
        ids = ids if ids is not None else [tok]
        x = _run_both(rtl, gold, name, pos, ids, trace=True)
        r, g = x["rtl"], x["golden"]
        tok = gold.read_reg("ARGMAX")
        runs.append({"program": name, "pos": pos, "tokens": len(ids), "rtl": r.cycles, "golden": g.cycles,
                     "diff_pct": round(100 * (r.cycles - g.cycles) / g.cycles, 2)})
        prog = progs[name]
        rtl_done = {pc: cd for pc, u, ci, cd in rtl_instructions(x["records"])}
        t0 = max(rtl_done.values()) - r.cycles              # the run's start (its last completion - cycles)
        prev = 0.0
        for pc, op, u, start, done in x["trace"]:            # program order
            gap = (rtl_done[pc] - t0) - done
            e = per_op[prog[pc].op.name]
            e["n"] += 1
            e["gap"] += gap - prev
            prev = gap
    rtl.close()
    ops = {op: {"count": e["n"], "gap": round(e["gap"]), "gap_mean": round(e["gap"] / e["n"], 1)}
           for op, e in sorted(per_op.items())}
    return {"pause": pause, "runs": runs, "ops": ops}


def smollm2_block(pause: float, prompt_len: int = 4) -> dict:
    """One SmolLM2 block (real weights: ``compiler.tiny.write_model_slice``) on the ``sim``
    kernel: a prefill and a decode step, bit-identical to the golden model; their RTL and
    model cycles, the wall-clock seconds of the simulation (Verilator cycles per second),
    and what a whole SmolLM2 decode token is on ``sim`` (the golden model's cycles for the
    full model compiled for ``sim``) and would take to simulate at that speed."""
    os.environ.setdefault("FLIGHTLLM_CACHE", str(Path(tempfile.gettempdir()) / "flcache"))
    from flightllm.compiler.artifact import Artifact
    from flightllm.compiler.compile import compile_model
    from flightllm.compiler.gguf_import import default_model_path
    from flightllm.compiler.tiny import write_model_slice
    from flightllm.hw.params import get_preset
    from flightllm.runtime.device import GoldenDevice
    from flightllm.sim import rtl as simrtl

    d = Path(tempfile.mkdtemp(prefix="kernel-smollm2-"))
    prompt = [int(t) for t in np.random.default_rng(5).integers(0, BLOCK_VOCAB, prompt_len)]
    # the whole model on `sim` with buffers wide enough for its 49,152 logits (the cycles do
    # not depend on the buffers' size): the golden model's cycles of a decode token
    sim = get_preset("sim")
    wide = dataclasses.replace(sim, act_buf_depth=max(sim.act_buf_depth, 1 << 16), buf_vocab=49152)
    compile_model(default_model_path(), d / "full", "native", wide, progress=False)
    full = GoldenDevice(weight_cache=False)
    full.load(Artifact(d / "full"))
    _run(full, "prefill_last", 0, prompt)
    token = _run(full, "decode", prompt_len, [1]).cycles
    print(f"SmolLM2 on sim (golden model): {token:,} cycles per decode token", flush=True)
    compile_model(write_model_slice(d / "block.gguf", layers=1, vocab=BLOCK_VOCAB), d / "art", "native", sim,
                  progress=False)
    _, rtl, gold = _devices(d / "art", pause)
    runs, tok = [], None
    for name, pos, ids in (("prefill_last", 0, prompt), ("decode", prompt_len, None)):
        ids = ids if ids is not None else [tok]
        x = _run_both(rtl, gold, name, pos, ids)
        r, g, wall = x["rtl"], x["golden"], x["wall"]
        tok = gold.read_reg("ARGMAX")
        runs.append({"program": name, "pos": pos, "tokens": len(ids), "rtl": r.cycles, "golden": g.cycles,
                     "diff_pct": round(100 * (r.cycles - g.cycles) / g.cycles, 2), "seconds": round(wall, 1),
                     "cycles_per_s": round(r.cycles / wall)})
        print(f"SmolLM2 block, {name}: {runs[-1]}", flush=True)
    rtl.close()
    speed = sum(r["rtl"] for r in runs) / sum(r["seconds"] for r in runs)
    return {"pause": pause, "runs": runs, "cycles_per_s": round(speed), "smollm2_decode_cycles": token,
            "smollm2_decode_sim_hours": round(token / speed / 3600, 2), "layers": full.plan["layers"],
            "vocab": full.plan["vocab"], "macs": full.params.macs, "block_vocab": BLOCK_VOCAB,
            "opt_fast": simrtl.KERNEL.opt_fast}


def markdown(res: dict) -> str:
    m = res["by_pause"]
    pauses = [x["pause"] for x in m]
    out = ["# The RTL kernel's cycles against the golden cycle model", "",
           "Generated by `python bench/kernel_cycles.py`: the tiny model (`flightllm tiny-model`, default shape, "
           f"`native` compile) on the `{res['preset']}` preset, the Verilated kernel against the golden model's "
           "cycle model. The AXI memories answer at once (pause 0: full rate, the model assumes 92% of it) or "
           "with random pauses on every channel (each cycle a pause of up to 30 cycles starts with the given "
           "probability: harsher than HBM). The first run (the prefill) includes loading the SFU tables, in the "
           "kernel and in the model.", "",
           "| program | position | tokens | model cycles | " + " | ".join(f"RTL, pause {p} | vs model" for p in pauses)
           + " |", "|---|---:|---:|---:|" + "---:|---:|" * len(pauses)]
    for k, r in enumerate(m[0]["runs"]):
        cells = []
        for x in m:
            rr = x["runs"][k]
            cells += [f"{rr['rtl']:,}", f"{rr['diff_pct']:+.1f}%"]
        out.append(f"| {r['program']} | {r['pos']} | {r['tokens']} | {r['golden']:,} | " + " | ".join(cells) + " |")
    out += ["", "Per opcode, over those runs: the cycles its instructions add to the RTL's excess over the model (+: the RTL "
            "later, -: earlier), in program order (the change of `RTL done - model done` from the previous instruction; "
            "the sum over a run is its gap). A unit that runs ahead of its queue makes the next instruction of "
            "another unit look late, so single instructions are noisy; the sums show where the gap comes from.",
            "", "| opcode | count | " + " | ".join(f"added, pause {p} | per instruction" for p in pauses) + " |",
            "|---|---:|" + "---:|---:|" * len(pauses)]
    for op, e in m[0]["ops"].items():
        cells = []
        for x in m:
            ee = x["ops"].get(op, {"gap": 0, "gap_mean": 0.0})
            cells += [f"{ee['gap']:+,}", f"{ee['gap_mean']:+.1f}"]
        out.append(f"| {op} | {e['count']} | " + " | ".join(cells) + " |")
    b = res.get("smollm2_block")
    if b:
        out += ["", "## One SmolLM2 block on the RTL", "",
                "SmolLM2-135M-Instruct's first block with its real weights and the model's tokenizer cut to "
                f"{b['block_vocab']} tokens (`compiler.tiny.write_model_slice`), compiled for `sim` and run on the Verilated kernel "
                f"(pause {b['pause']}): logits and ARGMAX bit-identical to the golden model (also "
                "`sim/test_kernel_smollm2.py`, in the slow RTL set).", "",
                "| program | position | tokens | RTL cycles | model cycles | RTL vs model | simulation s | "
                "cycles/s |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in b["runs"]:
            out.append(f"| {r['program']} | {r['pos']} | {r['tokens']} | {r['rtl']:,} | {r['golden']:,} | "
                       f"{r['diff_pct']:+.1f}% | {r['seconds']:,} | {r['cycles_per_s']:,} |")
        out += ["", f"Verilator runs the kernel at {b['cycles_per_s']:,} cycles per second (this machine, one "
                f"core, hot code built with `{b['opt_fast']}`: `sim/rtl.py`). A whole SmolLM2 decode token on "
                f"`sim` is "
                f"{b['smollm2_decode_cycles']:,} cycles in the golden model ({b['layers']} blocks and the "
                f"{b['vocab']:,}-row LM head on {b['macs']} MACs per cycle): about {b['smollm2_decode_sim_hours']} hours of simulation."]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--decode-steps", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=6, help="prompt tokens (one prefill chunk)")
    ap.add_argument("--pauses", type=float, nargs="+", default=[0.0, 0.2],
                    help="AXI pause probabilities of the simulated memories, one set of runs each")
    ap.add_argument("--smollm2-block", action="store_true",
                    help="also one block of the real SmolLM2 (minutes) and the Verilator speed")
    a = ap.parse_args(argv)
    res = {"preset": "sim", "model": "tiny-model defaults, native",
           "by_pause": [measure(a.decode_steps, a.prompt, p) for p in a.pauses]}
    if a.smollm2_block:
        res["smollm2_block"] = smollm2_block(a.pauses[-1])
    (DOCS / "kernel_cycles.json").write_text(json.dumps(res, indent=1) + "\n")
    (DOCS / "kernel_cycles.md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
