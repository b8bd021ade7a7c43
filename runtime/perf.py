"""`flightllm perf`: the performance model as a command.

Schedules a model's programs for a hardware preset and runs them on the golden model's
cycle model (timing only: shape-only models need no weights), which follows the ISA's
overlap rules (:mod:`flightllm.hw.isa`) with the durations of :mod:`flightllm.runtime.timing`.
For each position: decode tok/s, the HBM bytes a token must read (the weights it streams
and the KV cache up to its position) and the bytes the model streams, achieved GB/s and
its fraction of the peak, per-unit busy cycles; and prefill tok/s for given prompt lengths.
"""

from __future__ import annotations

import json
import sys

import numpy as np

from ..compiler.gguf_import import ModelConfig
from ..compiler.schedule import ScheduleError, build_programs, check_buffers, plan_from_manifest, shape_manifest
from ..hw.params import get_preset
from ..hw.kvcache import K, V
from .golden import Golden
from .sfu import attention_mask
from .timing import Timing, mpe_latency, sfu_timing, timing_for

__all__ = ["LLAMA2_7B", "MODELS", "LAYER_FORMATS", "model_config", "perf", "markdown", "add_kv_args", "add_cli"]

#: LLaMA2-7B's shape (the GGUF's hyper-parameters; no weights needed to model it)
LLAMA2_7B = ModelConfig(name="LLaMA2-7B (shape only)", n_layers=32, hidden=4096, ffn=11008, n_heads=32,
                        n_kv_heads=32, vocab=32000, context_length=4096, rope_theta=10000.0,
                        rms_eps=1e-5, tied_embeddings=False)
MODELS = {"llama2-7b": LLAMA2_7B}

#: --preset -> (layer format, embedding / LM head format) of a shape-only model
LAYER_FORMATS = {"w4": ("int4/32", "int8/32"), "w4m": ("int4m/32", "int8/32"), "native": ("int4m/32", "int8/32"),
                 "w4k": ("int4k/32", "int8/32"), "w8": ("int8/32", "int8/32"),
                 "w4-2:4": ("int4-2:4/64", "int8/32")}


def model_config(name: str) -> ModelConfig:
    """A known model's shape, SmolLM2's from the packaged GGUF, or any LLaMA GGUF's."""
    if name in MODELS:
        return MODELS[name]
    from ..compiler.gguf_import import _open, default_model_path, read_config
    path = default_model_path() if name == "smollm2" else name
    if name != "smollm2" and not str(name).endswith(".gguf"):
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join([*MODELS, 'smollm2'])} or a .gguf path")
    return read_config(_open(path), path)


def perf(model: str = "llama2-7b", hw: str = "u280", preset: str = "w4", positions=(1, 128, 512, 2048, 4096),
         prompts=(128, 512), kv: str = "int8", sink: int = 0, window: int = 0, **timing) -> dict:
    cfg = model_config(model)
    params = get_preset(hw)
    if preset not in LAYER_FORMATS:
        raise ValueError(f"unknown --preset {preset!r}; choose one of {', '.join(LAYER_FORMATS)}")
    layer_fmt, head_fmt = LAYER_FORMATS[preset]
    m = shape_manifest(cfg, params, layer_fmt, head_fmt)
    plan = plan_from_manifest(m, kv, sink, window)
    progs = build_programs(m, check=False, plan=plan)
    try:
        check_buffers(m, progs, plan)
    except ScheduleError as e:
        raise ValueError(f"{cfg.name} does not fit hardware preset {hw!r}: {e}") from None
    for pos in positions:
        if not 1 <= pos <= plan.max_seq:
            raise ValueError(f"position {pos} is outside 1..{plan.max_seq} (the {cfg.name} context on {hw})")
    for n in prompts:
        if not 1 <= n <= plan.max_seq:
            raise ValueError(f"prompt of {n} tokens is outside 1..{plan.max_seq}")
    tm = timing_for(params, **timing)
    g = Golden(params, None, None, plan.to_dict(), functional=False, timing=tm)
    clock = params.clock_mhz * 1e6
    peak = params.hbm_channel_gbps * 1e9 * params.weight_channels
    lay = plan.layout(params)
    weights = sum(t["region_bytes"] for n, t in m["tensors"].items() if n != "token_embd.weight") \
        * params.weight_channels
    row_bytes = m["tensors"]["token_embd.weight"]["region_bytes"] * params.weight_channels // cfg.vocab
    kv_row = cfg.n_layers * cfg.n_kv_heads * sum(cfg.head_dim * lay.fmt_of(k).bits // 8 + 4 for k in (K, V))
    rows = []
    for pos in positions:
        st = g.run(progs["decode"], {"POS": pos - 1, "LEN": 1})      # the token at pos-1 attends pos positions
        secs = st.cycles / clock
        attended = int(attention_mask(np.array([pos]), pos, sink, window).sum())   # block-sparse reads fewer
        need = weights + row_bytes + attended * kv_row
        roof = peak / need
        rows.append({"position": pos, "attended": attended, "decode_tok_s": 1 / secs, "cycles": st.cycles,
                     "hbm_bytes_per_token": need, "streamed_bytes": st.hbm_bytes,
                     "achieved_gbps": need / secs / 1e9, "fraction_of_peak": need / secs / peak,
                     "roofline_tok_s": roof, "of_roofline": 1 / secs / roof, "busy": st.busy})
    pre = []
    for n in prompts:
        st = g.run(progs["prefill"], {"POS": 0, "LEN": n})
        pre.append({"tokens": n, "cycles": st.cycles, "prefill_tok_s": n / (st.cycles / clock)})
    lat, src = mpe_latency(params.name)
    return {"model": cfg.name, "hw": hw, "preset": preset, "layer_format": layer_fmt, "kv": lay.fmt.name if lay.fmt_v == lay.fmt else f"K {lay.fmt.name}, V {lay.fmt_v.name}",
            "sink": sink, "window": window, "clock_mhz": params.clock_mhz, "peak_hbm_gbps": peak / 1e9,
            "timing": {**tm.__dict__, "mpe_latency_source": src, "sfu_timing_source": sfu_timing()[2]},
            "weights_bytes": weights, "positions": rows, "prefill": pre}


def markdown(r: dict) -> str:
    lines = [f"{r['model']} on `{r['hw']}` ({r['layer_format']} layers, KV {r['kv']}), {r['clock_mhz']:.0f} MHz, "
             f"peak {r['peak_hbm_gbps']:.0f} GB/s, HBM efficiency {r['timing']['hbm_efficiency']:.2f}",
             "", "| position | decode tok/s | HBM bytes/token | GB/s | of peak | roofline tok/s | of roofline |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for p in r["positions"]:
        lines.append(f"| {p['position']} | {p['decode_tok_s']:.1f} | {p['hbm_bytes_per_token'] / 1e9:.3f} G | "
                     f"{p['achieved_gbps']:.0f} | {p['fraction_of_peak']:.1%} | {p['roofline_tok_s']:.1f} | "
                     f"{p['of_roofline']:.1%} |")
    lines += ["", "Prefill: " + ", ".join(f"{p['tokens']} tokens at {p['prefill_tok_s']:.0f} tok/s"
                                         for p in r["prefill"])]
    return "\n".join(lines)


def _cmd(args) -> int:
    try:
        positions = [int(x) for x in args.positions.split(",")]
        prompts = [int(x) for x in args.prompts.split(",")]
    except ValueError:
        print("flightllm perf: --positions and --prompts take comma-separated integers", file=sys.stderr)
        return 2
    try:
        r = perf(args.model, args.hw, args.preset, positions, prompts, args.kv, args.sink, args.window,
                 hbm_efficiency=args.hbm_efficiency)
    except (ValueError, OSError) as e:
        print(f"flightllm perf: {e}", file=sys.stderr)
        return 2
    print(json.dumps(r, indent=1) if args.json else markdown(r))
    return 0


def add_kv_args(p) -> None:
    """The KV cache options of ``compile``, ``perplexity`` and ``perf`` (:func:`compile_model`)."""
    from ..compiler.schedule import KV_FORMATS
    from .sfu import KV_BLOCK

    p.add_argument("--kv", default="int8", choices=sorted(KV_FORMATS),
                   help="KV cache values, one float32 scale per (position, head): int8, int4, or k8v4 "
                        "(INT8 keys, INT4 values) (default int8)")
    p.add_argument("--window", type=int, default=0, metavar="BLOCKS",
                   help=f"block-sparse attention: attend only the last BLOCKS blocks of {KV_BLOCK} positions "
                        "up to the query's own (default 0: dense)")
    p.add_argument("--sink", type=int, default=0, metavar="BLOCKS",
                   help="with --window: also attend the first BLOCKS blocks (attention sinks; default 0)")


def add_cli(sub) -> None:
    p = sub.add_parser("perf", help="decode and prefill speed of a model on a hardware preset (performance model)",
                       description="Run the performance model (the golden model's cycle model, timing only) "
                                   "for a model shape on a hardware preset: decode tok/s per position, HBM "
                                   "bytes per token, achieved bandwidth against the peak and the roofline, "
                                   "prefill tok/s.")
    p.add_argument("--model", default="llama2-7b", help="llama2-7b, smollm2 or a LLaMA .gguf path")
    p.add_argument("--hw", default="u280", help="hardware preset or params.json (default u280)")
    p.add_argument("--preset", default="w4", help=f"layer formats: {', '.join(LAYER_FORMATS)} (default w4)")
    p.add_argument("--positions", default="1,128,512,2048,4096", help="comma-separated context positions")
    p.add_argument("--prompts", default="128,512", help="comma-separated prompt lengths for prefill")
    add_kv_args(p)
    p.add_argument("--hbm-efficiency", type=float, default=Timing.hbm_efficiency,
                   help="sustained fraction of peak HBM bandwidth (default %(default)s: sequential long-burst "
                        "reads on the U280, Shuhai, FCCM 2020)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd)
