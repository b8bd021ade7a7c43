"""`flightllm compile`: GGUF -> compressed, packed artifact (and, later, programs)."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np

from ..hw.params import HwParams
from .artifact import ArtifactWriter
from .compress import DEFAULT_PRESET, bytes_per_param, calibrate, compress_model, get_recipe
from .gguf_import import LlamaModel, load_gguf

PROBE_TOKENS = 96      #: calibration tokens the mixed allocation's sensitivity pass runs on

__all__ = ["default_calibration_text", "calibration_tokens", "compress_for_preset", "compile_model",
           "pbar"]


def pbar(enabled: bool = True):
    """A tqdm wrapper (to stderr) or the identity, for ``progress=`` arguments."""
    if not enabled:
        return None
    from tqdm import tqdm

    def wrap(it, desc=None, **kw):
        return tqdm(it, desc=desc, leave=False, dynamic_ncols=True, **kw)
    return wrap


def default_calibration_text() -> str:
    return resources.files("flightllm.compiler").joinpath("data/calibration.txt").read_text()


def calibration_tokens(tokenizer, text: str | None = None, max_tokens: int = 4096) -> np.ndarray:
    ids = tokenizer.encode(text if text is not None else default_calibration_text())
    return np.asarray(ids[:max_tokens], dtype=np.int64)


def compress_for_preset(model: LlamaModel, tokenizer, preset: str = DEFAULT_PRESET,
                        calib_text: str | None = None, progress=None, context: int = 512):
    """Calibrate and compress ``model`` with a named preset; returns (recipe, compressed)."""
    recipe = get_recipe(preset)
    if recipe.is_float:
        return recipe, None
    if recipe.is_native:
        return recipe, compress_model(model, recipe, None, progress)
    toks = calibration_tokens(tokenizer, calib_text)
    stats = calibrate(model, toks, context=context, progress=progress and
                      (lambda it: progress(it, desc="calibrate")))
    probe = toks[-PROBE_TOKENS:] if recipe.budget_bpp is not None else None
    return recipe, compress_model(model, recipe, stats, progress, probe)


def compile_model(model_path, out, preset: str, params: HwParams, calib_text: str | None = None,
                  progress: bool = True, kv: str = "int8", sink: int = 0, window: int = 0) -> dict:
    """Import, compress and pack a model into the artifact directory ``out``.

    ``kv`` is the KV cache format (``int8`` or ``int4``, per group of 32); ``window``
    (blocks of 64 positions, 0: dense) and ``sink`` (leading blocks always attended)
    select block-sparse attention. Returns a summary dict (preset, bytes/param,
    per-format tensor counts, KV options, size).
    """
    from .tokenizer import Tokenizer

    recipe = get_recipe(preset)              # fail fast on an unknown preset
    from .schedule import add_programs, check_kv_options
    check_kv_options(kv, sink, window)       # ... and on bad KV options, before minutes of work
    if recipe.is_float:
        raise ValueError("preset 'float' is the uncompressed reference: it has no packed form to compile")
    out = Path(out)
    if not out.absolute().parent.is_dir():
        raise ValueError(f"{out}: parent directory {out.absolute().parent} does not exist")
    bar = pbar(progress)
    model = load_gguf(model_path, progress=bar and (lambda it: bar(it, desc="import")))
    tok = Tokenizer.from_gguf(model.path)
    recipe, comp = compress_for_preset(model, tok, preset, calib_text, bar)
    w = ArtifactWriter(params, model.config, preset)
    items = list(comp.items())
    for name, ct in (bar(items, desc="pack") if bar else items):
        w.add_tensor(name, ct.qt)
    c = model.config
    for i in range(c.n_layers):
        w.add_table(f"blk.{i}.attn_norm", model.layer(i, "attn_norm"))
        w.add_table(f"blk.{i}.ffn_norm", model.layer(i, "ffn_norm"))
    w.add_table("output_norm", model.tensors["output_norm.weight"])
    w.files["tokenizer.json"] = json.dumps(tok.to_dict()).encode()
    # [issue 3, scheduler] RoPE table + length-adaptive instruction programs
    add_programs(w, kv, sink, window)
    formats = {}
    for ct in comp.values():
        formats[ct.fmt.name] = formats.get(ct.fmt.name, 0) + 1
    summary = {"preset": preset, "model": c.name, "source": str(model.path),
               "params": c.param_count(), "bytes_per_param": bytes_per_param(model, comp),
               "formats": formats, "hw": params.name,
               "kv": {"format": kv, "sink": sink, "window": window}}
    w.extra["compression"] = {
        "recipe": recipe.name, "description": recipe.description,
        "bytes_per_param": summary["bytes_per_param"],
        "tensor_formats": {n: ct.fmt.name for n, ct in comp.items()},
        "tensor_error": {n: ct.error for n, ct in comp.items()}}
    w.write(out)
    summary["artifact"] = str(out)
    summary["bytes"] = sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file())
    return summary
