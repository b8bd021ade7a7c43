"""cocotb RTL tests of the matrix engine (dequant -> chains -> MPE), bit-exact vs runtime/arith.

Two parameter sets, each built once (``sim_build/<name>-<hash>``): the ``sim`` preset
and ``SIM_MC`` (u280 ratios: 4 chains per weight channel, so the dequant unit cuts
several blocks per cycle, and 1:4 / 2:8 blocks shorter than a chain, so beats carry
two quant groups in two chain segments). Each test runs many operations back to back
in one simulation with random stalls on every stream.
CI runs the ``rtl`` tests; ``slow_rtl`` holds the full sweeps.
"""

from __future__ import annotations

import numpy as np
import pytest

from flightllm.hw.geometry import EngineGeometry
from flightllm.hw.params import get_preset
from flightllm.sim import rtl
from flightllm.sim.cases import SIM_MC, make_case, save_cases, smollm2_slice

PARAMS = get_preset("sim")
GEOM = EngineGeometry(PARAMS)
MC_GEOM = EngineGeometry(SIM_MC)


def run_cases(tag, cases, stall=0.3, seed=0, params=PARAMS):
    bdir = rtl.build_dir(params)
    stim = save_cases(bdir / f"run-{tag}" / "stimuli.npz", params, cases, stall, seed)
    rtl.run(params, "mpe_cases", stim, tag, seed=seed + 1)


@pytest.mark.rtl
def test_mv_every_format():
    """MV (decode) for every bit width x N:M pattern of the sim preset, random weights."""
    rng = np.random.default_rng(1)
    cases = []
    for i, wf in enumerate(GEOM.weight_formats()):
        n = [4, 7, 12][i % 3]                      # 1..3 row tiles, ragged last tile
        k = [64, 128, 192][(i // 3) % 3]
        cases.append(make_case(GEOM, wf, n, k, 1, rng))
    run_cases("mv", cases)


@pytest.mark.rtl
def test_mm_tokens():
    """MM (prefill): weights held for T tokens; T = 1, 2, 5, mm_tokens."""
    rng = np.random.default_rng(2)
    fmts = GEOM.weight_formats()
    picks = [fmts[i] for i in (0, 5, 7, 13, 20, 23)]
    cases = [make_case(GEOM, wf, 8, 128, t, rng)
             for wf, t in zip(picks, [2, 5, PARAMS.mm_tokens, 3, 1, 4])]
    run_cases("mm", cases)


@pytest.mark.rtl
def test_multi_chain_every_format():
    """SIM_MC: every format, MV and MM, odd group counts (short last step), ragged tiles."""
    rng = np.random.default_rng(5)
    cases = []
    for i, wf in enumerate(MC_GEOM.weight_formats()):
        n = [8, 13, 24][i % 3]
        k = [96, 64, 160][(i // 3) % 3]            # 3, 2, 5 quant groups of 32
        cases.append(make_case(MC_GEOM, wf, n, k, [1, 1, 3][(i // 2) % 3], rng))
    run_cases("mc", cases, params=SIM_MC)


@pytest.mark.rtl
@pytest.mark.model
def test_smollm2_layer():
    """A 16 x 128 slice of SmolLM2-135M's first FFN down projection, MV and MM."""
    w, why = smollm2_slice(16, 128)
    if w is None:
        pytest.skip(why)
    rng = np.random.default_rng(3)
    from flightllm.hw.formats import WeightFormat
    fmts = [WeightFormat.parse(s, GEOM.G) for s in ("int8", "int4", "int4-2:4", "int3-1:4", "int2-8:16", "int8-4:8")]
    cases = [make_case(GEOM, wf, 16, 128, t, rng, w=w) for wf in fmts for t in (1, 3)]
    run_cases("smollm2", cases)


@pytest.mark.rtl
@pytest.mark.slow_rtl
def test_sweep_shapes():
    """Every format x MV/MM over larger shapes (bench-sized), heavy stalls."""
    rng = np.random.default_rng(4)
    cases = []
    for wf in GEOM.weight_formats():
        for n, k, t in ((24, 256, 1), (8, 512, 3), (12, 128, PARAMS.mm_tokens)):
            cases.append(make_case(GEOM, wf, n, k, t, rng))
    run_cases("sweep", cases, stall=0.5)


@pytest.mark.rtl
@pytest.mark.slow_rtl
def test_multi_chain_sweep():
    """SIM_MC: every format x MV/MM over larger shapes, heavy stalls."""
    rng = np.random.default_rng(6)
    cases = []
    for wf in MC_GEOM.weight_formats():
        for n, k, t in ((40, 256, 1), (16, 224, 3), (8, 96, SIM_MC.mm_tokens)):
            cases.append(make_case(MC_GEOM, wf, n, k, t, rng))
    run_cases("mc-sweep", cases, stall=0.5, params=SIM_MC)
