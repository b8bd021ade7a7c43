"""Compression: calibration, N:M pruning, group quantization and mixed-precision allocation.

Pipeline for one model and one :class:`Recipe`:

1. **Calibrate**: run the float reference over calibration text and keep, for every
   linear input, the Hessian ``H = E[x x^T]``.
0. **Native** (preset ``native``, the default): every matrix keeps its GGUF integers and
   binary16 scales (Q8_0, Q4_0, Q4_1: :data:`flightllm.hw.formats.GGUF_NATIVE`); nothing
   below runs.
2. **Prune and quantize** each matrix to INTb with one binary16 scale (and min, for
   ``intBm``) per group (:mod:`flightllm.hw.formats`). Sparse formats use one optimal-brain-surgeon
   sweep (:mod:`.obs`): SparseGPT's N:M mask along the input axis and GPTQ rounding, the
   error of every column compensated on the columns not yet done. Dense formats use
   round-to-nearest weighted by ``||X_k||^2``: symmetric formats use the full two's
   complement range with a per-group clip search (llama.cpp's Q4_0 maps the largest
   magnitude to -2**(B-1)), formats with a min a weighted least-squares fit of scale and
   min (it beat GPTQ on held-out text here; ``method="obs"`` forces GPTQ, ``"rtn"``
   forces Wanda + RTN).
3. **Allocate** (mixed presets): for every matrix and candidate format the output error
   ``tr(dW H dW^T)`` is *measured*, and every matrix's sensitivity (KL at the logits per
   unit of that error, :func:`measure_sensitivity`); a greedy knapsack then upgrades the
   matrix with the best estimated-KL reduction per extra byte until the
   bytes-per-parameter budget is met.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..hw.formats import GGUF_NATIVE, QTensor, WeightFormat, fit_scales, nm_mask as _nm_mask_by_score
from .gguf_import import LINEARS, LlamaModel
from .obs import obs_compress
from .reference import FloatLlama, log_softmax

__all__ = ["Recipe", "PRESETS", "get_recipe", "calibrate", "nm_mask", "compress_tensor",
           "CompressedTensor", "compress_model", "measure_candidates", "measure_sensitivity",
           "allocate_mixed", "SENSITIVITY_PROBE", "DEFAULT_PRESET", "quantize_sym", "quantize_asym", "quantize_two_level",
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
    ``candidates``. ``float`` is no compression at all; ``native`` keeps each tensor's
    own GGUF format.
    """

    name: str
    attn: str = "int8/32"
    mlp: str = "int8/32"
    embed: str = "int8/32"
    budget_bpp: float | None = None
    candidates: tuple = ()
    description: str = ""
    method: str = "auto"

    @property
    def is_float(self) -> bool:
        return self.name == "float"

    @property
    def is_native(self) -> bool:
        return self.name == "native"


# Dense widths only: a sparse candidate's error is measured after SparseGPT fitted it to
# the very calibration tokens it is measured on, so it looks far better than it is on
# held-out text, and the knapsack then picked sparse formats that cost +80% perplexity
# (docs/quality.md). Sparse formats stay available through the fixed presets.
_MIXED_CANDIDATES = ("int8/32", "int4m/32", "int4k/32", "int4/32")
SENSITIVITY_PROBE = "int4/32"   #: format whose effect on the logits calibrates each tensor's error

PRESETS = {r.name: r for r in [
    Recipe("native", description="every tensor in its own GGUF format (Q8_0, Q4_0, Q4_1): no requantization"),
    Recipe("float", description="unquantized float32 reference"),
    Recipe("w8", "int8/32", "int8/32", "int8/32", description="dense INT8 everywhere (Q8_0 layout)"),
    Recipe("w4", "int4/32", "int4/32", "int4/32", description="dense INT4, symmetric (Q4_0 layout), 4.5 bits"),
    Recipe("w4m", "int4m/32", "int4m/32", "int4m/32",
           description="dense INT4 with a min (Q4_1 layout), 5 bits"),
    Recipe("w4k", "int4k/32", "int4k/32", "int4k/32",
           description="dense INT4 with a min, two-level 8-bit group scales (K-quant style), 4.5 bits"),
    Recipe("w4k-e8", "int4k/32", "int4k/32", "int8/32",
           description="w4k layers, INT8 embedding/LM head"),
    Recipe("w4-e8", "int4/32", "int4/32", "int8/32", description="dense INT4, INT8 embedding/LM head"),
    Recipe("w4-gptq", "int4/32", "int4/32", "int4/32", method="obs",
           description="dense INT4 by GPTQ column updates instead of round-to-nearest, for comparison"),
    Recipe("w4-2:4-mlp-rtn", "int4/32", "int4-2:4/64", "int4/32", method="rtn",
           description="as w4-2:4-mlp with Wanda + round-to-nearest (no SparseGPT/GPTQ)"),
    Recipe("w4-2:4", "int4-2:4/64", "int4-2:4/64", "int4/32", description="2:4 sparse INT4 layers"),
    Recipe("w4-2:4-mlp", "int4/32", "int4-2:4/64", "int4/32", description="2:4 sparse INT4 MLP, dense INT4 attention"),
    Recipe("w4-4:8-mlp", "int4/32", "int4-4:8/64", "int4/32", description="4:8 sparse INT4 MLP, dense INT4 attention"),
    Recipe("mixed-4.75b", budget_bpp=4.75 / 8, candidates=_MIXED_CANDIDATES,
           description="measured mixed precision at 4.75 bits (0.594 B) per parameter"),
    Recipe("mixed-5b", budget_bpp=5.0 / 8, candidates=_MIXED_CANDIDATES,
           description="measured mixed precision at 5 bits (0.625 B) per parameter"),
    Recipe("mixed-6b", budget_bpp=6.0 / 8, candidates=_MIXED_CANDIDATES,
           description="measured mixed precision at 6 bits (0.75 B) per parameter"),
]}
DEFAULT_PRESET = "native"


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
    plain magnitude otherwise (:func:`flightllm.hw.formats.nm_mask`; ties keep the earlier).
    """
    score = np.abs(w) if act_sq is None else np.abs(w) * np.sqrt(act_sq)[None, :]
    return _nm_mask_by_score(score, n_keep, m)


@dataclass
class CompressedTensor:
    """A compressed matrix (:class:`~flightllm.hw.formats.QTensor`) and what it costs."""

    name: str
    qt: QTensor
    error: float | None = None   # output error tr(dW H dW^T) per calibration token, if measured

    @property
    def fmt(self) -> WeightFormat:
        return self.qt.fmt

    def dequantize(self) -> np.ndarray:
        return self.qt.dequantize()

    @property
    def nbytes(self) -> float:
        return self.qt.nbytes


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
    if method == "obs" and hessian is not None and not fmt.has_min:
        ct = CompressedTensor(name, obs_compress(w, fmt, hessian))
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
    quant = quantize_two_level if fmt.two_level else quantize_asym if fmt.has_min else quantize_sym
    return CompressedTensor(name, quant(wm, fmt, weight, mask))


def _weighted_err(deq, wm, weight, g):
    n, k = wm.shape
    return ((deq - wm) ** 2 * weight[None, :]).reshape(n, k // g, g).sum(axis=2)


def _final(fmt, wm, scale, mn, mask):
    """Integers for binary16 scales (and mins) that fit the hardware, then the QTensor."""
    g = fmt.group_size
    scale = fit_scales(scale)
    d = np.repeat(scale.astype(np.float32), g, axis=1)
    off = 0.0 if mn is None else np.repeat(mn.astype(np.float32), g, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(d != 0, np.rint((wm - off) / d), 0.0)
    q = np.clip(q, fmt.qmin, fmt.qmax).astype(np.int8)
    if mask is not None:
        q[~mask] = 0
    return QTensor(fmt, q, scale, mn, mask)


def quantize_sym(wm: np.ndarray, fmt: WeightFormat, weight: np.ndarray, mask=None) -> QTensor:
    """Signed round-to-nearest over the full two's complement range, per-group clip search.

    As llama.cpp's Q4_0: the value of largest magnitude maps to ``-2**(B-1)`` (one more
    level than a symmetric grid), its scale shrunk by the clip ratio with the least
    ``weight``-ed squared error."""
    n, k = wm.shape
    g = fmt.group_size
    grp = wm.reshape(n, k // g, g)
    idx = np.abs(grp).argmax(axis=2)
    peak = np.take_along_axis(grp, idx[..., None], axis=2)[..., 0]          # signed largest magnitude
    lo = -(1 << (fmt.bits - 1))
    best_err, best = None, None
    for c in ((1.0,) if fmt.bits >= 8 else _CLIPS):
        scale = peak * np.float32(c) / np.float32(lo) if fmt.bits < 8 else np.abs(peak) / np.float32(fmt.qmax)
        qt = _final(fmt, wm, scale, None, mask)
        err = _weighted_err(qt.dequantize(), wm, weight, g)
        if best is None:
            best_err, best = err, qt.scale.astype(np.float32)
        else:
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best = np.where(better, qt.scale.astype(np.float32), best)
    return _final(fmt, wm, best, None, mask)


def _lsq_scale_min(x, wt, q, d0, m0):
    """Per group, the ``wt``-weighted least-squares (d, mn) of ``x ~ d * q + mn`` for fixed
    integers ``q`` (all (N, groups, G)); ``(d0, m0)`` where the fit is degenerate."""
    sw, sq, sx = wt.sum(2), (wt * q).sum(2), (wt * x).sum(2)
    sqq, sqx = (wt * q * q).sum(2), (wt * q * x).sum(2)
    det = sw * sqq - sq * sq
    ok = det > 1e-30
    safe = np.where(ok, det, 1.0)
    return (np.where(ok, (sw * sqx - sq * sx) / safe, d0),
            np.where(ok, (sqq * sx - sq * sqx) / safe, m0))


def _refit_two_level(x, wt, q, D, Mn, top):
    """Least-squares (d, mn) per group for fixed integers, then rounded onto the sub-scale grids."""
    d, mn = _lsq_scale_min(x, wt, q, 0.0, 0.0)
    sc = np.clip(np.rint(d / D), 0, top) if D else np.zeros_like(d)
    sm = np.clip(np.rint(mn / Mn), 0, top) if Mn else np.zeros_like(mn)
    return sc, sm


def quantize_two_level(wm: np.ndarray, fmt: WeightFormat, weight: np.ndarray, mask=None, iters: int = 3) -> QTensor:
    """Two-level ``intBk``: the per-group (scale, min) of :func:`quantize_asym`, expressed as
    8-bit multiples of one binary16 ``D`` and ``Mn`` per tensor, then alternating integer
    rounding and a ``weight``-ed least-squares refit of each group's (sub-scale, sub-min);
    the best iterate per group is kept. (From SmolLM2's Q4_1 weights: +1.4% perplexity in the
    float forward at 4.5 bits, against +27% for symmetric ``int4/32``.)"""
    from ..hw.formats import SUB_BITS, SUB_EXP_SPAN

    n, k = wm.shape
    g = fmt.group_size
    top = (1 << SUB_BITS) - 1
    base = quantize_asym(wm, WeightFormat(fmt.bits, group_size=g, has_min=True), weight)
    d0, m0 = (a.astype(np.float64) for a in base.group_scales())
    # tensor D and Mn: the largest scale and most negative min map to sub-value 255; their
    # binary16 exponents may lie at most SUB_EXP_SPAN apart (the smaller is raised if not)
    D = float(np.float16(d0.max() / top * (1 + 2 ** -10))) if d0.max() > 0 else 0.0
    Mn = float(np.float16(m0.min() / top * (1 + 2 ** -10))) if m0.min() < 0 else 0.0
    big = max(abs(D), abs(Mn))
    if big:
        lo = 2.0 ** max(int(np.floor(np.log2(big))) - SUB_EXP_SPAN, -14)
        D = max(D, lo) if D else 0.0
        Mn = min(Mn, -lo) if Mn else 0.0
    D, Mn = float(np.float16(D)), float(np.float16(Mn))
    x = wm.reshape(n, k // g, g).astype(np.float64)
    wt = np.broadcast_to(weight.reshape(1, k // g, g), x.shape).astype(np.float64)
    sc = np.clip(np.rint(d0 / D), 0, top) if D else np.zeros_like(d0)
    sm = np.clip(np.rint(m0 / Mn), 0, top) if Mn else np.zeros_like(m0)
    best_err = best_sc = best_sm = None
    for _ in range(iters + 1):
        d, mn = D * sc, Mn * sm
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.where(d[..., None] > 0, np.clip(np.rint((x - mn[..., None]) / d[..., None]), 0, fmt.qmax), 0.0)
        err = (((q * d[..., None] + mn[..., None]) - x) ** 2 * wt).sum(2)
        if best_err is None:
            best_err, best_sc, best_sm = err, sc, sm
        else:
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_sc, best_sm = np.where(better, sc, best_sc), np.where(better, sm, best_sm)
        sc, sm = _refit_two_level(x, wt, q, D, Mn, top)
    d, mn = D * best_sc, Mn * best_sm
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(d[..., None] > 0, np.clip(np.rint((x - mn[..., None]) / d[..., None]), 0, fmt.qmax), 0.0)
    return QTensor(fmt, q.reshape(n, k).astype(np.int8), best_sc.astype(np.uint8), best_sm.astype(np.uint8),
                   None, np.float16(D), np.float16(Mn))


def quantize_asym(wm: np.ndarray, fmt: WeightFormat, weight: np.ndarray, mask=None, iters: int = 4) -> QTensor:
    """Unsigned values with a scale and a min per group: range start, then alternating
    rounding and a ``weight``-ed least-squares refit of (scale, min) per group, as
    llama.cpp's ``make_qkx`` quantizers do; the best of the iterates per group is kept."""
    n, k = wm.shape
    g = fmt.group_size
    top = float(fmt.qmax)
    x = wm.reshape(n, k // g, g).astype(np.float64)
    wt = np.broadcast_to(weight.reshape(1, k // g, g), x.shape).astype(np.float64)
    lo, hi = x.min(axis=2), x.max(axis=2)
    lo = np.minimum(lo, 0.0)                       # the min never above 0, as llama.cpp's
    d = (hi - lo) / top
    mn = lo
    best_err, best_d, best_m = None, None, None
    for _ in range(iters + 1):
        qt = _final(fmt, wm, d.astype(np.float32), mn.astype(np.float32).astype(np.float16), mask)
        err = _weighted_err(qt.dequantize(), wm, weight, g)
        if best_err is None:
            best_err, best_d, best_m = err, qt.scale.astype(np.float64), qt.min.astype(np.float64)
        else:
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_d = np.where(better, qt.scale.astype(np.float64), best_d)
            best_m = np.where(better, qt.min.astype(np.float64), best_m)
        # least squares of x ~ d * q + mn over the group with the current integers
        d, mn = _lsq_scale_min(x, wt, qt.q.reshape(x.shape).astype(np.float64), d, mn)
        d = np.maximum(d, 0.0)
    return _final(fmt, wm, best_d.astype(np.float32), best_m.astype(np.float16), mask)


def _fixed_format(recipe: Recipe, tensor_name: str) -> WeightFormat:
    if tensor_name in ("token_embd.weight", "output.weight"):
        text = recipe.embed
    elif ".attn_" in tensor_name:
        text = recipe.attn
    else:
        text = recipe.mlp
    return WeightFormat.parse(text)


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
                   progress=None, probe_tokens=None) -> dict:
    """Compress every packed matrix of ``model``; returns name -> CompressedTensor.

    Mixed recipes measure every candidate, then (given ``probe_tokens``) each matrix's
    sensitivity at the logits, and allocate the budget (:func:`allocate_mixed`).
    """
    if recipe.is_float:
        raise ValueError("the 'float' preset is the uncompressed reference; nothing to compress")
    names = model_tensor_names(model)
    if recipe.is_native:
        from .gguf_import import native_tensors
        return {nm: CompressedTensor(nm, qt) for nm, qt in native_tensors(model.path, names).items()}
    out = {}
    if recipe.budget_bpp is None:
        it = progress(names, desc=f"compress {recipe.name}") if progress else names
        for nm in it:
            fmt = _fixed_format(recipe, nm)
            out[nm] = compress_tensor(nm, model.tensors[nm], fmt, _hessian(act_stats, nm), recipe.method,
                                      measure=False)
        return out
    trials = measure_candidates(model, recipe.candidates, act_stats, progress, recipe.method)
    sens = None if probe_tokens is None else measure_sensitivity(model, trials, probe_tokens, progress=progress)
    return allocate_mixed(model, recipe, trials, sens)


def measure_candidates(model: LlamaModel, candidates, act_stats: dict | None,
                       progress=None, method: str = "auto") -> dict:
    """Compress every matrix in every candidate format: (name, format) -> CompressedTensor.

    The measured errors drive :func:`allocate_mixed`; one measurement serves any budget.
    """
    fmts = [WeightFormat.parse(c) for c in candidates]
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
