"""Compression: calibration, N:M pruning, group quantization and mixed-precision allocation.

Pipeline for one model and one :class:`Recipe`:

1. **Calibrate**: run the float reference over calibration text and keep, for every
   linear input, the Hessian ``H = E[x x^T]``.
2. **Prune and quantize** each matrix to signed INTb with one fixed-point scale per group
   of G inputs (:mod:`flightllm.hw.formats`). Sparse formats use one optimal-brain-surgeon
   sweep (:mod:`.obs`): SparseGPT's N:M mask along the input axis and GPTQ rounding, the
   error of every column compensated on the columns not yet done. Dense formats use
   round-to-nearest with a per-block clip search weighted by ``||X_k||^2`` (it beat GPTQ on
   held-out text here; ``method="obs"`` forces GPTQ, ``"rtn"`` forces Wanda + RTN).
3. **Allocate** (mixed presets): for every matrix and candidate format the output error
   ``tr(dW H dW^T)`` is *measured*, and every matrix's sensitivity (KL at the logits per
   unit of that error, :func:`measure_sensitivity`); a greedy knapsack then upgrades the
   matrix with the best estimated-KL reduction per extra byte until the
   bytes-per-parameter budget is met.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..hw.formats import SCALE_BITS, WeightFormat, quantize_groups
from .gguf_import import LINEARS, LlamaModel
from .obs import obs_compress
from .reference import FloatLlama, log_softmax

__all__ = ["Recipe", "PRESETS", "get_recipe", "calibrate", "nm_mask", "compress_tensor",
           "CompressedTensor", "compress_model", "measure_candidates", "measure_sensitivity",
           "allocate_mixed", "SENSITIVITY_PROBE",
           "model_tensor_names", "input_stat_key", "bytes_per_param"]

# Which calibration statistic feeds each linear (q, k, v share their input, gate/up too).
_INPUT_OF = {"attn_q": "attn_in", "attn_k": "attn_in", "attn_v": "attn_in",
             "attn_output": "attn_output", "ffn_gate": "ffn_in", "ffn_up": "ffn_in",
             "ffn_down": "ffn_down"}
_CLIPS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


@dataclass(frozen=True)
class Recipe:
    """How to compress a model.

    ``attn``, ``mlp`` and ``embed`` name the format of attention projections, MLP
    projections and the (tied) embedding / LM head; ``budget_bpp`` (bytes per
    parameter, embeddings included) switches to measured mixed allocation over
    ``candidates``. ``float`` is no compression at all.
    """

    name: str
    attn: str = "int8"
    mlp: str = "int8"
    embed: str = "int8"
    budget_bpp: float | None = None
    candidates: tuple = ()
    description: str = ""
    method: str = "auto"

    @property
    def is_float(self) -> bool:
        return self.name == "float"


# Dense widths only: a sparse candidate's error is measured after SparseGPT fitted it to
# the very calibration tokens it is measured on, so it looks far better than it is on
# held-out text, and the knapsack then picked sparse formats that cost +80% perplexity
# (docs/quality.md). Sparse formats stay available through the fixed presets.
_MIXED_CANDIDATES = ("int8", "int4", "int3")
SENSITIVITY_PROBE = "int3"      #: format whose effect on the logits calibrates each tensor's error

PRESETS = {r.name: r for r in [
    Recipe("float", description="unquantized float32 reference"),
    Recipe("w8", "int8", "int8", "int8", description="dense INT8 everywhere"),
    Recipe("w4", "int4", "int4", "int4", description="dense INT4 everywhere"),
    Recipe("w4-e8", "int4", "int4", "int8", description="dense INT4, INT8 embedding/LM head"),
    Recipe("w4-gptq", "int4", "int4", "int4", method="obs",
           description="dense INT4 by GPTQ column updates instead of round-to-nearest, for comparison"),
    Recipe("w4-2:4-mlp-rtn", "int4", "int4-2:4", "int4", method="rtn",
           description="as w4-2:4-mlp with Wanda + round-to-nearest (no SparseGPT/GPTQ)"),
    Recipe("w3", "int3", "int3", "int4", description="dense INT3 layers, INT4 embedding"),
    Recipe("w8-2:4", "int8-2:4", "int8-2:4", "int8", description="2:4 sparse INT8 layers"),
    Recipe("w4-2:4", "int4-2:4", "int4-2:4", "int4", description="2:4 sparse INT4 layers"),
    Recipe("w4-2:4-mlp", "int4", "int4-2:4", "int4", description="2:4 sparse INT4 MLP, dense INT4 attention"),
    Recipe("w4-4:8-mlp", "int4", "int4-4:8", "int4", description="4:8 sparse INT4 MLP, dense INT4 attention"),
    Recipe("w4-8:16-mlp", "int4", "int4-8:16", "int4", description="8:16 sparse INT4 MLP, dense INT4 attention"),
    Recipe("w4-1:4-mlp", "int4", "int4-1:4", "int4", description="1:4 sparse INT4 MLP, dense INT4 attention"),
    Recipe("w4-2:8-mlp", "int4", "int4-2:8", "int4", description="2:8 sparse INT4 MLP, dense INT4 attention"),
    Recipe("mixed-4.4b", budget_bpp=4.4 / 8, candidates=_MIXED_CANDIDATES,
           description="measured mixed precision at 4.4 bits (0.55 B) per parameter"),
    Recipe("mixed-4b", budget_bpp=4.0 / 8, candidates=_MIXED_CANDIDATES,
           description="measured mixed precision at 4 bits (0.5 B) per parameter"),
    Recipe("mixed-3.6b", budget_bpp=3.6 / 8, candidates=_MIXED_CANDIDATES,
           description="measured mixed precision at 3.6 bits (0.45 B) per parameter"),
]}


def get_recipe(name: str) -> Recipe:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown compression preset {name!r}; choose one of: {', '.join(PRESETS)}") from None


def model_tensor_names(model: LlamaModel) -> list:
    """Names of the matrices that get packed, in a stable order (embedding last)."""
    names = [f"blk.{i}.{n}.weight" for i in range(model.config.n_layers) for n in LINEARS]
    names.append("token_embd.weight")
    if not model.config.tied_embeddings:
        names.append("output.weight")
    return names


def input_stat_key(tensor_name: str) -> str:
    """Calibration statistic that weights ``tensor_name``'s error (see :func:`calibrate`)."""
    if tensor_name in ("token_embd.weight", "output.weight"):
        return "output"                       # the LM head's input; the same table is tied
    _, i, short, _ = tensor_name.split(".")
    return f"blk.{i}.{_INPUT_OF[short]}"


def _hessian(act_stats: dict | None, tensor_name: str):
    """The calibration Hessian that weights ``tensor_name`` (None without calibration)."""
    return None if act_stats is None else act_stats.get(input_stat_key(tensor_name))


def calibrate(model: LlamaModel, tokens, context: int = 512, progress=None) -> dict:
    """Input Hessians ``E[x x^T]`` (float32, K x K) of every linear input over the calibration tokens.

    Keys are the observer names of :class:`FloatLlama` (see :func:`input_stat_key`); the
    diagonal is the per-channel mean square that Wanda's criterion uses.
    """
    sums, count = {}, [0]

    def observe(name, x):
        # float32 BLAS per window (fast), float64 across windows (no drift)
        x = np.ascontiguousarray(x, dtype=np.float32)
        sums[name] = sums.get(name, 0.0) + (x.T @ x).astype(np.float64)
        if name == "output":
            count[0] += x.shape[0]

    ref = FloatLlama(model, max_seq=context, observer=observe)
    tokens = np.asarray(tokens)
    starts = list(range(0, max(len(tokens) - 1, 1), context))
    for s in (progress(starts) if progress else starts):
        ref.reset()
        ref.forward(tokens[s:s + context])
    return {k: (v / max(count[0], 1)).astype(np.float32) for k, v in sums.items()}


def nm_mask(w: np.ndarray, n_keep: int, m: int, act_sq: np.ndarray | None = None) -> np.ndarray:
    """Boolean mask keeping the ``n_keep`` highest-scoring weights of every m-window.

    Score is Wanda's ``|W| * ||X||`` when ``act_sq`` (per-input mean square) is given,
    plain magnitude otherwise. Ties keep the earlier position.
    """
    n, k = w.shape
    if k % m:
        raise ValueError(f"input size {k} is not a multiple of m={m}")
    score = np.abs(w) if act_sq is None else np.abs(w) * np.sqrt(act_sq)[None, :]
    sw = score.reshape(n, k // m, m)
    keep = np.argsort(-sw, axis=2, kind="stable")[..., :n_keep]
    mask = np.zeros(sw.shape, dtype=bool)
    np.put_along_axis(mask, keep, True, axis=2)
    return mask.reshape(n, k)


@dataclass
class CompressedTensor:
    """A compressed matrix: integers, scales and what they cost."""

    name: str
    fmt: WeightFormat
    q: np.ndarray            # int8 (N, K), 0 where pruned
    scales: np.ndarray       # uint16 (N, K // G)
    shift: int
    mask: np.ndarray         # bool (N, K)
    error: float | None = None   # output error tr(dW H dW^T) per calibration token, if measured

    def dequantize(self) -> np.ndarray:
        g = self.fmt.group_size
        s = np.repeat(self.scales.astype(np.float64) * 2.0 ** -self.shift, g, axis=1)
        return (self.q * s).astype(np.float32)

    @property
    def nbytes(self) -> float:
        n, k = self.q.shape
        return n * k * self.fmt.bits_per_weight() / 8


def compress_tensor(name: str, w: np.ndarray, fmt: WeightFormat, hessian: np.ndarray | None,
                    method: str = "auto", measure: bool = True) -> CompressedTensor:
    """Prune (if sparse) and quantize one matrix.

    ``method="obs"`` (needs ``hessian``) is SparseGPT + GPTQ (:mod:`.obs`); ``"rtn"`` is
    Wanda pruning and round-to-nearest with a per-block clip search; ``"auto"`` (the
    presets' default) is OBS for sparse formats and RTN for dense ones: on SmolLM2 with
    G=64 and the clip search, GPTQ's column updates did not beat RTN on held-out text
    (docs/quality.md), while SparseGPT's updates halve the perplexity cost of pruning. The error recorded
    is the output error ``tr(dW H dW^T)`` per calibration token (or plain squared error
    without a Hessian); ``measure=False`` skips it (it costs N*K^2) and leaves ``error`` None.
    """
    n, k = w.shape
    if k % fmt.group_size:
        raise ValueError(f"tensor {name!r}: input size {k} is not a multiple of the quant group size {fmt.group_size}")
    if k % fmt.m:
        raise ValueError(f"tensor {name!r}: input size {k} is not a multiple of m={fmt.m}")
    if method == "auto":
        method = "rtn" if fmt.dense else "obs"
    if method == "obs" and hessian is not None:
        q, s, sh, full_mask = obs_compress(w, fmt, hessian)
        ct = CompressedTensor(name, fmt, q, s, sh, full_mask)
    elif method in ("obs", "rtn"):      # (obs without a Hessian falls back to rtn)
        ct = _rtn_compress(name, w, fmt, None if hessian is None else np.diag(hessian))
    else:
        raise ValueError(f"unknown compression method {method!r}: use 'auto', 'obs' or 'rtn'")
    if not measure:
        return ct
    dw = ct.dequantize() - w                                  # float32: BLAS-fast, ample for ranking
    ct.error = float(((dw @ hessian) * dw).sum(dtype=np.float64)) if hessian is not None \
        else float((dw.astype(np.float64) ** 2).sum())
    return ct


def _rtn_compress(name, w, fmt, act_sq):
    n, k = w.shape
    weight = np.ones(k, np.float32) if act_sq is None else np.maximum(act_sq, 1e-12).astype(np.float32)
    mask = None if fmt.dense else nm_mask(w, fmt.n_keep, fmt.m, act_sq)
    wm = w if mask is None else np.where(mask, w, 0.0).astype(np.float32)
    g = fmt.group_size
    clips = (1.0,) if fmt.bits >= 8 else _CLIPS
    best_err, best_clip = None, None
    for c in clips:
        q, s, sh = quantize_groups(w, fmt, mask, clip=c)
        deq = q * np.repeat(s.astype(np.float32) * np.float32(2.0 ** -sh), g, axis=1)
        err = ((deq - wm) ** 2 * weight[None, :]).reshape(n, k // g, g).sum(axis=2)
        if best_err is None:
            best_err, best_clip = err, np.full(err.shape, c, np.float32)
        else:
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_clip = np.where(better, np.float32(c), best_clip)
    q, s, sh = quantize_groups(w, fmt, mask, clip=best_clip)
    return CompressedTensor(name, fmt, q, s, sh, np.ones(w.shape, bool) if mask is None else mask)


def _fixed_format(recipe: Recipe, tensor_name: str, group_size: int) -> WeightFormat:
    if tensor_name in ("token_embd.weight", "output.weight"):
        text = recipe.embed
    elif ".attn_" in tensor_name:
        text = recipe.attn
    else:
        text = recipe.mlp
    return WeightFormat.parse(text, group_size)


def _allocate(cands: dict, budget_bytes: float) -> dict:
    """Greedy knapsack: cheapest format per tensor, then best error-per-byte upgrades.

    ``cands[name]`` is a list of (bytes, error, fmt_name). Returns name -> fmt_name.
    """
    choice = {}
    for name, opts in cands.items():
        opts.sort(key=lambda o: (o[0], o[1]))
        # Pareto frontier: more bytes must buy less error.
        front = []
        for o in opts:
            if not front or o[1] < front[-1][1]:
                front.append(o)
        cands[name] = front
        choice[name] = 0
    used = sum(cands[n][0][0] for n in cands)
    while True:
        best, best_gain = None, 0.0
        for name, i in choice.items():
            front = cands[name]
            if i + 1 < len(front):
                db = front[i + 1][0] - front[i][0]
                de = front[i][1] - front[i + 1][1]
                if used + db <= budget_bytes and de / db > best_gain:
                    best, best_gain = name, de / db
        if best is None:
            break
        i = choice[best]
        used += cands[best][i + 1][0] - cands[best][i][0]
        choice[best] = i + 1
    return {n: cands[n][i][2] for n, i in choice.items()}


def compress_model(model: LlamaModel, recipe: Recipe, act_stats: dict | None,
                   group_size: int = 64, progress=None, probe_tokens=None) -> dict:
    """Compress every packed matrix of ``model``; returns name -> CompressedTensor.

    Mixed recipes measure every candidate, then (given ``probe_tokens``) each matrix's
    sensitivity at the logits, and allocate the budget (:func:`allocate_mixed`).
    """
    if recipe.is_float:
        raise ValueError("the 'float' preset is the uncompressed reference; nothing to compress")
    names = model_tensor_names(model)
    out = {}
    if recipe.budget_bpp is None:
        it = progress(names, desc=f"compress {recipe.name}") if progress else names
        for nm in it:
            fmt = _fixed_format(recipe, nm, group_size)
            out[nm] = compress_tensor(nm, model.tensors[nm], fmt, _hessian(act_stats, nm), recipe.method,
                                      measure=False)
        return out
    trials = measure_candidates(model, recipe.candidates, act_stats, group_size, progress, recipe.method)
    sens = None if probe_tokens is None else measure_sensitivity(model, trials, probe_tokens, progress=progress)
    return allocate_mixed(model, recipe, trials, sens)


def measure_candidates(model: LlamaModel, candidates, act_stats: dict | None, group_size: int = 64,
                       progress=None, method: str = "auto") -> dict:
    """Compress every matrix in every candidate format: (name, format) -> CompressedTensor.

    The measured errors drive :func:`allocate_mixed`; one measurement serves any budget.
    """
    fmts = [WeightFormat.parse(c, group_size) for c in candidates]
    work = [(nm, f) for nm in model_tensor_names(model) for f in fmts]
    it = progress(work, desc="measure candidates") if progress else work
    return {(nm, f.name): compress_tensor(nm, model.tensors[nm], f, _hessian(act_stats, nm), method)
            for nm, f in it}


def measure_sensitivity(model: LlamaModel, trials: dict, tokens, probe: str = SENSITIVITY_PROBE,
                        progress=None) -> dict:
    """How much each matrix's output error costs at the logits: name -> KL per unit error.

    The proxy ``tr(dW H dW^T)`` is comparable within a matrix but not across matrices
    (an error early in the network or in q/k is amplified differently). For each matrix
    alone, the ``probe`` format's weights are put in, the network is re-run from that
    layer on ``tokens``, and the mean KL divergence of the next-token distributions from
    the float model's is divided by the probe's proxy error. To first order KL is
    proportional to that error, so ``error * factor`` estimates each candidate's KL.
    """
    tokens = np.asarray(tokens)
    ref = FloatLlama(model, max_seq=len(tokens))
    trace = []
    base = log_softmax(ref.forward(tokens, trace=trace))
    pbase = np.exp(base)
    names = model_tensor_names(model)
    out = {}
    for nm in (progress(names, desc="sensitivity") if progress else names):
        ct = trials.get((nm, probe))
        if ct is None:
            raise ValueError(f"sensitivity probe {probe!r} was not measured for {nm!r}")
        run = FloatLlama(model.with_tensors({nm: ct.dequantize()}), max_seq=len(tokens))
        if nm.startswith("blk."):
            layer = int(nm.split(".")[1])
            logits = run.forward(tokens, first_layer=layer, x=trace[layer])
        else:                                        # embedding / LM head: the whole network
            logits = run.forward(tokens)
        kl = float((pbase * (base - log_softmax(logits))).sum(axis=-1).mean())
        out[nm] = max(kl, 0.0) / max(ct.error, 1e-30)
    return out


def allocate_mixed(model: LlamaModel, recipe: Recipe, trials: dict, sensitivity: dict | None = None) -> dict:
    """Pick one measured candidate per matrix so the whole model meets ``recipe.budget_bpp``.

    With ``sensitivity`` (from :func:`measure_sensitivity`) the knapsack minimises the
    estimated KL at the logits; without it, the sum of the matrices' output errors.
    """
    cands = {}
    for (nm, fname), ct in trials.items():
        w = 1.0 if sensitivity is None else sensitivity[nm]
        cands.setdefault(nm, []).append((ct.nbytes, ct.error * w, fname))
    budget = recipe.budget_bpp * model.config.param_count() - _unpacked_bytes(model)
    floor = sum(min(o[0] for o in v) for v in cands.values())
    if budget < floor:
        raise ValueError(f"preset {recipe.name}: budget {recipe.budget_bpp:.3f} B/param is below the "
                         f"smallest candidates ({(floor + _unpacked_bytes(model)) / model.config.param_count():.3f})")
    choice = _allocate(cands, budget)
    return {nm: trials[(nm, choice[nm])] for nm in model_tensor_names(model)}


def _unpacked_bytes(model: LlamaModel) -> int:
    """Bytes of the norm weights, stored as float32 tables."""
    c = model.config
    return 4 * c.hidden * (2 * c.n_layers + 1)


def bytes_per_param(model: LlamaModel, compressed: dict) -> float:
    """Stored bytes (values, indices, scales, norm tables) per model parameter."""
    total = sum(ct.nbytes for ct in compressed.values()) + _unpacked_bytes(model)
    return total / model.config.param_count()
