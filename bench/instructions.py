"""Instruction storage and compile time: length-adaptive programs vs one program per length.

Shape-only LLaMA2-7B (32 layers, hidden 4096, ffn 11008, 32 heads / 32 kv heads,
vocab 32000, untied LM head), dense INT4 layers and INT8 embedding/LM head, on the
u280 preset (kv_tile 64, mm_tokens 16). For every length L in 1..4096:

* **length-adaptive** (this scheduler): the same two programs serve every L — one
  ``decode`` program (KV loop trip count from the KVLEN register) and one ``prefill``
  program (chunk loop from LEN, KV loops from KVLEN). Stored once.
* **per-length**: what a compiler without loops and runtime registers emits — for
  each L a decode program for a token at position L-1 and a prefill program for an
  L-token prompt (loops unrolled, registers folded into immediates;
  :func:`flightllm.compiler.schedule.unroll`). Instruction counts for all 4096 lengths
  are exact (:func:`~flightllm.compiler.schedule.unrolled_counts`, checked against
  ``unroll`` on the sampled lengths); compile time is measured on sampled lengths and
  extrapolated linearly in instructions.

Run: ``python bench/instructions.py`` -> docs/instructions.json, docs/instructions.md
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from flightllm.compiler.schedule import build_programs, shape_manifest, unroll, unrolled_counts
from flightllm.hw.isa import WORD_BYTES, encode_program
from flightllm.hw.params import get_preset
from flightllm.runtime.perf import LLAMA2_7B

MAX_LEN = 4096
SAMPLES = (1, 16, 64, 256, 1024)


def run(out_dir: Path, max_len: int = MAX_LEN, samples=SAMPLES) -> dict:
    params = get_preset("u280")
    manifest = shape_manifest(LLAMA2_7B, params, "int4/32", "int8/32")
    t0 = time.perf_counter()
    progs = build_programs(manifest)
    images = {k: encode_program(v) for k, v in progs.items()}
    adaptive_s = time.perf_counter() - t0
    adaptive_bytes = sum(len(b) for b in images.values())

    lengths = np.arange(1, max_len + 1)
    t0 = time.perf_counter()
    dec = unrolled_counts(progs["decode"], lengths, pos=lengths - 1)
    pre = unrolled_counts(progs["prefill"], lengths)
    count_s = time.perf_counter() - t0
    per_len_instr = dec + pre
    per_len_bytes = int(per_len_instr.sum()) * WORD_BYTES

    sample_rows = []
    for L in samples:
        if L > max_len:
            continue
        t0 = time.perf_counter()
        d = encode_program(unroll(progs["decode"], L - 1, 1))
        p = encode_program(unroll(progs["prefill"], 0, L))
        dt = time.perf_counter() - t0
        n = (len(d) + len(p)) // WORD_BYTES
        if n != per_len_instr[L - 1]:
            raise AssertionError(f"unrolled_counts disagrees with unroll at L={L}: {per_len_instr[L - 1]} vs {n}")
        sample_rows.append({"length": L, "instructions": n, "bytes": n * WORD_BYTES, "seconds": dt})
    sec_per_instr = sum(r["seconds"] for r in sample_rows) / sum(r["instructions"] for r in sample_rows)
    per_len_s = float(per_len_instr.sum()) * sec_per_instr

    checkpoints = [L for L in (1, 64, 128, 512, 1024, 2048, 4096) if L <= max_len]
    res = {
        "model": LLAMA2_7B.to_dict(), "hw": params.name, "formats": "int4/32 layers (Q4_0 layout), int8/32 embedding and LM head (Q8_0)",
        "lengths": f"1..{max_len}",
        "adaptive": {"programs": {k: {"instructions": len(v), "bytes": len(images[k])} for k, v in progs.items()},
                     "bytes": adaptive_bytes, "compile_seconds": adaptive_s},
        "per_length": {"bytes": per_len_bytes, "instructions": int(per_len_instr.sum()),
                       "compile_seconds_extrapolated": per_len_s, "seconds_per_instruction": sec_per_instr,
                       "count_seconds": count_s, "samples": sample_rows,
                       "at": {str(L): {"decode_bytes": int(dec[L - 1]) * WORD_BYTES,
                                       "prefill_bytes": int(pre[L - 1]) * WORD_BYTES} for L in checkpoints}},
        "storage_ratio": per_len_bytes / adaptive_bytes,
        "decode_storage_ratio": int(dec.sum()) * WORD_BYTES / len(images["decode"]),
        "prefill_storage_ratio": int(pre.sum()) * WORD_BYTES / len(images["prefill"]),
        "per_length_decode_bytes": int(dec.sum()) * WORD_BYTES,
        "per_length_prefill_bytes": int(pre.sum()) * WORD_BYTES,
        "compile_time_ratio": per_len_s / adaptive_s,
        "flightllm_paper_ratio": "about 500x less instruction storage than per-length compilation",
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "instructions.json").write_text(json.dumps(res, indent=1))
    (out_dir / "instructions.md").write_text(markdown(res))
    return res


def _b(n):
    for unit, d in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= d:
            return f"{n / d:,.1f} {unit}"
    return f"{n} B"


def markdown(r) -> str:
    a, p = r["adaptive"], r["per_length"]
    lines = [
        "# Instruction storage: length-adaptive vs per-length programs",
        "",
        f"{r['model']['name']}, {r['formats']}, hardware preset `{r['hw']}`, every length {r['lengths']} "
        "(generated by `bench/instructions.py`).",
        "",
        "| scheme | programs | instructions | bytes | compile time |",
        "|---|---|---|---|---|",
        f"| length-adaptive (this) | decode + prefill | "
        f"{sum(v['instructions'] for v in a['programs'].values()):,} | {_b(a['bytes'])} | {a['compile_seconds']:.2f} s |",
        f"| one program per length | 2 x {r['lengths'].split('..')[1]} | {p['instructions']:,} | {_b(p['bytes'])} | "
        f"{p['compile_seconds_extrapolated'] / 3600:,.1f} h (extrapolated) |",
        "",
        f"**Storage ratio {r['storage_ratio']:,.0f}x** (FlightLLM reports ~500x), "
        f"compile-time ratio {r['compile_time_ratio']:,.0f}x. Split: decode programs "
        f"{_b(r['per_length_decode_bytes'])} per-length vs {_b(a['programs']['decode']['bytes'])} "
        f"(**{r['decode_storage_ratio']:,.0f}x**), prefill {_b(r['per_length_prefill_bytes'])} vs "
        f"{_b(a['programs']['prefill']['bytes'])} ({r['prefill_storage_ratio']:,.0f}x).",
        "",
        "Per-length program sizes at a few lengths (decode: one token at position L-1; prefill: an L-token prompt):",
        "",
        "| L | decode | prefill |",
        "|---|---|---|",
    ]
    for L, v in p["at"].items():
        lines.append(f"| {L} | {_b(v['decode_bytes'])} | {_b(v['prefill_bytes'])} |")
    lines += ["", "Measured per-length compile (unroll + encode) on sampled lengths:", "",
              "| L | instructions | bytes | seconds |", "|---|---|---|---|"]
    for s in p["samples"]:
        lines.append(f"| {s['length']} | {s['instructions']:,} | {_b(s['bytes'])} | {s['seconds']:.2f} |")
    lines += ["", f"Per-length totals over all lengths are exact counts "
              f"(`unrolled_counts`, {p['count_seconds']:.1f} s to count); the per-length compile time is the "
              f"measured {p['seconds_per_instruction'] * 1e6:.1f} us/instruction times the instruction total.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "docs"
    r = run(out)
    print(markdown(r))
