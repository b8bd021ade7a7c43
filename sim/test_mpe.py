"""cocotb RTL tests of the matrix engine (dequant units -> chains -> MPE), bit-exact vs
runtime/arith.mpe_reference.

Three parameter sets, each Verilated once (``sim_build/<name>-<hash>``): ``sim`` (2 chains
per channel, 8 lanes: 4-beat groups, the psum line), ``sim-mc`` (4 chains per channel,
16 lanes: 2-beat groups) and ``u280-2ch`` (the u280's own per-channel geometry, 2 of its
channels: 32 lanes, one-beat groups, no psum line). Each test runs many operations back
to back in one simulation, with random stalls on every stream. CI runs the ``rtl``
tests; ``slow_rtl`` holds the larger sweeps. ``test_attention`` runs the attention
operations (QK, PV) over the raw KV formats (the KV cache as the weight).
"""

from __future__ import annotations

import numpy as np
import pytest

from flightllm.hw.geometry import EngineGeometry
from flightllm.hw.params import get_preset
from flightllm.sim import rtl
from flightllm.sim.cases import make_case, pv_case, qk_case, random_qtensor, save_cases, smollm2_qtensor

REGIMES = ("typical", "wide", "subnormal", "large")


def run_cases(params, tag, cases, stall=0.3, seed=0):
    bdir = rtl.build_dir(params)
    stim = save_cases(bdir / f"run-{tag}" / "stimuli.npz", params, cases, stall, seed)
    rtl.run(params, "mpe_cases", stim, tag, seed=seed + 1)


def every_format_cases(geom, rng, shapes):
    """Every format of the build x T in (1, 2, 5, mm_tokens): ragged row counts (1..3 row
    tiles), 1..3 quant groups, every scale regime, factors including 0 and the maximum."""
    cases = []
    tokens = (1, 2, 5, geom.tokens_max)
    for i, wf in enumerate(geom.weight_formats()):
        for j, t in enumerate(tokens):
            n_tiles_rows, groups = shapes[(i + j) % len(shapes)]
            n = n_tiles_rows(geom.R)
            qt = random_qtensor(wf, n, groups * wf.group_size, rng, REGIMES[(i + j) % len(REGIMES)])
            cases.append(make_case(geom, qt, t, rng))
    return cases


SHAPES = (                                      # (rows from R, quant groups)
    (lambda r: r + r // 2 + 1, 3),              # ragged second tile
    (lambda r: 1, 1),                           # a single row, a single group
    (lambda r: 3 * r - 1, 2),                   # three tiles, the last one row short
    (lambda r: 2 * r, 1),
)


#: sim-mc's own build runs in the slow set (sim and the u280's per-channel geometry in CI)
PRESETS_CI = ["sim", pytest.param("sim-mc", marks=pytest.mark.slow_rtl), "u280-2ch"]


@pytest.mark.rtl
@pytest.mark.parametrize("preset", PRESETS_CI)
def test_every_format(preset):
    """Every format x MV / MM (T = 1, 2, 5, mm_tokens), random stalls on every stream."""
    params = get_preset(preset)
    geom = EngineGeometry(params)
    rng = np.random.default_rng(sum(map(ord, preset)))
    run_cases(params, "formats", every_format_cases(geom, rng, SHAPES), stall=0.3, seed=1)


def attention_cases(geom, rng, head_dim=64, rep=3):
    """Attention in the raw KV formats (scale 1, min 0): per format a QK (K cache of
    ``3 * chains - 3`` positions x head_dim, the ``rep`` queries of a GQA group, u = 1),
    a decode PV (V^T head_dim x 96 positions, T = 1, softmax probabilities requantized per
    32 positions) and a prefill-style PV (160 positions, T = rep, uniform probabilities
    and factors with 0 and the maximum); a weight MM in between brings scales back."""
    cases = []
    for i, wf in enumerate(geom.kv_formats()):
        cases.append(qk_case(geom, wf, 3 * geom.R - 3, head_dim, rep, rng))
        cases.append(pv_case(geom, wf, head_dim, 96, 1, rng, probs="softmax"))
        cases.append(pv_case(geom, wf, head_dim, 160, rep, rng, probs="random"))
        wm = geom.weight_formats()[(2 * i + 2) % len(geom.weight_formats())]
        cases.append(make_case(geom, random_qtensor(wm, geom.R + 1, 2 * wm.group_size, rng), 2, rng))
    return cases


@pytest.mark.rtl
@pytest.mark.parametrize("preset", PRESETS_CI)
def test_attention(preset):
    """Attention mode: QK and PV over int8r/32 and int4r/32, MV and MM, bit-exact against
    mpe_reference with S = 1 and no M, random stalls on every stream."""
    params = get_preset(preset)
    geom = EngineGeometry(params)
    assert {wf.name for wf in geom.kv_formats()} == {"int8r/32", "int4r/32"}
    rng = np.random.default_rng(sum(map(ord, preset)) + 1)
    run_cases(params, "attention", attention_cases(geom, rng), stall=0.3, seed=8)


@pytest.mark.rtl
@pytest.mark.model
def test_smollm2_q4_1():
    """A slice of SmolLM2-135M's first attention query projection in its native Q4_1 form
    (int4m/32: GGUF's own nibbles, binary16 scales and mins), on the u280's geometry, MV and MM."""
    qt, why = smollm2_qtensor(20, 192)
    if qt is None:
        pytest.skip(why)
    params = get_preset("u280-2ch")
    geom = EngineGeometry(params)
    rng = np.random.default_rng(3)
    cases = [make_case(geom, qt, t, rng, name=f"{why} T={t}") for t in (1, 3)]
    run_cases(params, "smollm2", cases, stall=0.3, seed=2)


@pytest.mark.rtl
@pytest.mark.slow_rtl
@pytest.mark.parametrize("preset", ["sim", "sim-mc", "u280-2ch"])
def test_sweep(preset):
    """Every format x MV / MM over larger shapes (up to 12 row tiles and 16 groups), every
    scale regime, heavy stalls."""
    params = get_preset(preset)
    geom = EngineGeometry(params)
    rng = np.random.default_rng(4)
    cases = []
    for wf in geom.weight_formats():
        for n_t, groups, t in ((5.5, 8, 1), (12, 16, 1), (2, 5, 3), (1.25, 3, geom.tokens_max), (3, 4, 7)):
            n = int(n_t * geom.R)
            qt = random_qtensor(wf, n, groups * wf.group_size, rng, REGIMES[len(cases) % len(REGIMES)])
            cases.append(make_case(geom, qt, t, rng))
    run_cases(params, "sweep", cases, stall=0.5, seed=5)


@pytest.mark.rtl
@pytest.mark.slow_rtl
@pytest.mark.model
def test_smollm2_tensors():
    """Larger slices of several SmolLM2-135M tensors in their native GGUF forms (Q4_1
    projections, the Q8_0 token embedding as int8/32), MV and MM, on the u280's geometry."""
    params = get_preset("u280-2ch")
    geom = EngineGeometry(params)
    rng = np.random.default_rng(6)
    cases = []
    for tensor, rows, cols in (("blk.0.attn_k.weight", 64, 576), ("blk.3.ffn_down.weight", 40, 1536),
                               ("blk.7.ffn_gate.weight", 33, 576), ("token_embd.weight", 48, 576)):
        qt, why = smollm2_qtensor(rows, cols, tensor)
        if qt is None:
            pytest.skip(why)
        for t in (1, 4):
            if t * geom.act_stride(cols) <= geom.act_words:
                cases.append(make_case(geom, qt, t, rng, name=f"{why} T={t}"))
    run_cases(params, "smollm2-sweep", cases, stall=0.5, seed=7)
