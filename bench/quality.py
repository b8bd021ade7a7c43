"""Quality bench: perplexity of every compression preset against the float reference.

Run:  .venv/bin/python bench/quality.py [--context 512] [--presets w8,w4,...] [--max-tokens N]
Writes docs/quality.json and docs/quality.md (and docs/quality.png when matplotlib is present).

Protocol (the same as `flightllm perplexity`): bench/data/gpl-3.0.txt tokenized whole
(no BOS), non-overlapping windows of --context tokens, every token but a window's first
scored, exp(mean NLL). Calibration uses the bundled Python-docs text, never this one.
Weights are compressed, dequantized and run through the float forward pass.
Bytes per parameter count values, N:M indices, group scales and the float32 norm
tables, over all parameters including the (tied) embedding / LM head.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

def _presets():
    """Every compression preset but the float reference, in the compressor's order."""
    from flightllm.compiler.compress import PRESETS
    return [n for n, r in PRESETS.items() if not r.is_float]


DEFAULT_PRESETS = _presets()


def main(argv=None):
    from flightllm.compiler.compile import PROBE_TOKENS, calibration_tokens
    from flightllm.compiler.compress import (allocate_mixed, bytes_per_param, calibrate,
                                             compress_model, get_recipe, measure_candidates,
                                             measure_sensitivity)
    from flightllm.compiler.gguf_import import load_gguf
    from flightllm.compiler.reference import perplexity
    from flightllm.compiler.tokenizer import Tokenizer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--presets", default=",".join(DEFAULT_PRESETS))
    ap.add_argument("--max-tokens", type=int, default=0, help="truncate the text (0 = all)")
    ap.add_argument("--out", default=str(ROOT / "docs"))
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows of docs/quality.json for presets not measured in this run")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kept = []
    if args.merge and (out / "quality.json").is_file():
        kept = json.loads((out / "quality.json").read_text())["rows"]

    model = load_gguf()
    tok = Tokenizer.from_gguf(model.path)
    text_path = ROOT / "bench/data/gpl-3.0.txt"
    ids = np.asarray(tok.encode(text_path.read_text()), dtype=np.int64)
    if args.max_tokens:
        ids = ids[:args.max_tokens]
    rows = []
    t0 = time.time()
    ref = perplexity(model, ids, args.context)
    rows.append({"preset": "float", "description": "unquantized float32 reference (GGUF Q4_1 weights dequantized)",
                 "bytes_per_param": 4.0, "ppl": ref["ppl"], "tokens": ref["tokens"], "delta_pct": 0.0,
                 "seconds": time.time() - t0})
    print(f"float: ppl {ref['ppl']:.4f} over {ref['tokens']} tokens", flush=True)
    calib = calibration_tokens(tok)
    stats = calibrate(model, calib, args.context)
    trials = sens = None
    for name in args.presets.split(","):
        recipe = get_recipe(name)
        t0 = time.time()
        if recipe.is_native:
            comp = compress_model(model, recipe, None)
        elif recipe.budget_bpp is not None:
            if trials is None:      # one measurement serves every budget
                trials = measure_candidates(model, recipe.candidates, stats)
                sens = measure_sensitivity(model, trials, calib[-PROBE_TOKENS:])
            comp = allocate_mixed(model, recipe, trials, sens)
        else:
            comp = compress_model(model, recipe, stats)
        m2 = model.with_tensors({n: ct.dequantize() for n, ct in comp.items()})
        res = perplexity(m2, ids, args.context)
        formats = {}
        for ct in comp.values():
            formats[ct.fmt.name] = formats.get(ct.fmt.name, 0) + 1
        row = {"preset": name, "description": recipe.description,
               "bytes_per_param": bytes_per_param(model, comp), "ppl": res["ppl"],
               "tokens": res["tokens"], "delta_pct": 100 * (res["ppl"] / ref["ppl"] - 1),
               "formats": formats, "embedding": comp["token_embd.weight"].fmt.name,
               "seconds": time.time() - t0}
        rows.append(row)
        print(f"{name}: {row['bytes_per_param']:.4f} B/param, ppl {row['ppl']:.4f} "
              f"({row['delta_pct']:+.2f}%), {row['seconds']:.0f}s", flush=True)
        _write(out, model, text_path, args, argv, ref, _merged(kept, rows))   # a crash keeps what is done
    _write(out, model, text_path, args, argv, ref, _merged(kept, rows), plot=True)


def _merged(kept, rows):
    done = {r["preset"] for r in rows}
    order = ["float"] + DEFAULT_PRESETS
    allr = [r for r in kept if r["preset"] not in done] + rows
    return sorted(allr, key=lambda r: order.index(r["preset"]) if r["preset"] in order else len(order))


def _write(out, model, text_path, args, argv, ref, rows, plot=False):
    meta = {"model": model.config.name, "text": str(text_path.relative_to(ROOT)), "context": args.context,
            "tokens": ref["tokens"], "command": "python bench/quality.py " + " ".join(argv or sys.argv[1:]),
            "python": platform.python_version(), "numpy": np.__version__}
    from flightllm.compiler.artifact import atomic_write

    atomic_write(out / "quality.json", json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# Perplexity by compression preset: {meta['model']}", "",
             f"Text `{meta['text']}` ({meta['tokens']} scored tokens, windows of {meta['context']}), "
             "float forward of the dequantized weights. Regenerate with `make bench-quality` "
             f"(`{meta['command']}`).", "",
             "| preset | bytes/param | perplexity | vs float | formats (tensor count) | description |",
             "|---|---:|---:|---:|---|---|"]
    for r in rows:
        fm = ", ".join(f"{k}x{v}" for k, v in sorted(r.get("formats", {}).items())) or "-"
        lines.append(f"| {r['preset']} | {r['bytes_per_param']:.4f} | {r['ppl']:.3f} | "
                     f"{r['delta_pct']:+.2f}% | {fm} | {r['description']} |")
    atomic_write(out / "quality.md", "\n".join(lines) + "\n")
    if plot:
        _plot(rows, out / "quality.png")
        print("\n".join(lines))


def _plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ref = rows[0]["ppl"]
    for r in rows[1:]:
        ax.scatter(r["bytes_per_param"], r["ppl"], color="C1" if r["preset"].startswith("mixed") else "C0")
        ax.annotate(r["preset"], (r["bytes_per_param"], r["ppl"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.axhline(ref, color="k", ls="--", lw=0.8, label=f"float reference {ref:.2f}")
    ax.axhline(ref * 1.05, color="g", ls=":", lw=0.8, label="+5%")
    ax.axhline(ref * 1.15, color="r", ls=":", lw=0.8, label="+15%")
    ax.set_xlabel("bytes per parameter (values + indices + scales, embeddings included)")
    ax.set_ylabel("perplexity")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
