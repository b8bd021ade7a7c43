"""amaranth.sim checks of the whole matrix engine (sequencer, credits, FIFOs) on the ``sim``
preset: bit-exact against runtime/arith.mpe_reference (through sim/cases.py), with random
stalls and long output back-pressure, and the one-beat-per-cycle issue rate measured.
The cocotb/Verilator tests in sim/ cover the larger presets."""

import random

import numpy as np
import pytest
from amaranth.sim import Simulator

from flightllm.hw.formats import WeightFormat
from flightllm.hw.geometry import EngineGeometry
from flightllm.hw.mpe import MatrixEngine
from flightllm.hw.params import get_preset
from flightllm.sim.cases import make_case, pv_case, qk_case, random_qtensor

PARAMS = get_preset("sim")
GEOM = EngineGeometry(PARAMS)


def simulate(cases, stall=0.0, out_stall=None, seed=0, budget=20000, geom=GEOM, **engine):
    """Run the cases back to back; return per case (results, cycles from the config
    handshake to the last result)."""
    dut = MatrixEngine(geom.params, **engine)
    rnd = random.Random(seed)
    out_stall = stall if out_stall is None else out_stall
    runs = []

    async def bench(ctx):
        for case in cases:
            for a, d, u in zip(case["act_addr"], case["act_data"], case["act_u"]):
                ctx.set(dut.act.valid, 1)
                ctx.set(dut.act.payload.addr, int(a))
                for lane in range(geom.L):
                    ctx.set(dut.act.payload.data[lane], int(d[lane]))
                ctx.set(dut.act.payload.u, int(u))
                await ctx.tick()
            ctx.set(dut.act.valid, 0)
            for k, v in case["cfg"].items():
                ctx.set(getattr(dut.cfg.payload, k), v)
            ctx.set(dut.cfg.valid, 1)
            while not ctx.get(dut.cfg.ready):
                await ctx.tick()
            await ctx.tick()
            ctx.set(dut.cfg.valid, 0)
            n0 = 0
            words = [[int.from_bytes(w.tobytes(), "little") for w in case[f"words{c}"]] for c in range(geom.C)]
            pos, got, last = [0] * geom.C, [], None
            while len(got) < len(case["expected"]):
                buses = [getattr(dut, f"words{c}") for c in range(geom.C)]
                for c, bus in enumerate(buses):
                    v = pos[c] < len(words[c]) and rnd.random() >= stall
                    ctx.set(bus.valid, v)
                    if v:
                        ctx.set(bus.payload, words[c][pos[c]])
                r = rnd.random() >= out_stall
                ctx.set(dut.out.ready, r)
                fired = [ctx.get(b.valid) and ctx.get(b.ready) for b in buses]
                if r and ctx.get(dut.out.valid):
                    got.append([ctx.get(dut.out.payload[j]) for j in range(geom.R)])
                    last = n0
                await ctx.tick()
                pos = [p + f for p, f in zip(pos, fired)]
                n0 += 1
                assert n0 < budget, f"{case['name']}: {len(got)} of {len(case['expected'])} results"
            for c in range(geom.C):
                ctx.set(getattr(dut, f"words{c}").valid, 0)
            ctx.set(dut.out.ready, 0)
            runs.append((got, last + 1))
            while ctx.get(dut.busy):
                await ctx.tick()

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    return runs


def test_every_format_with_stalls():
    """Every format, MV and MM, ragged tiles, several groups; stalls on every stream."""
    rng = np.random.default_rng(7)
    cases = []
    for i, wf in enumerate(GEOM.weight_formats()):
        for t in (1, 3):
            n = [3, GEOM.R + 1, 2 * GEOM.R][(i + t) % 3]
            qt = random_qtensor(wf, n, (1 + (i + t) % 3) * wf.group_size, rng)
            cases.append(make_case(GEOM, qt, t, rng))
    for case, (got, _) in zip(cases, simulate(cases, stall=0.3, seed=1)):
        assert got == case["expected"].tolist(), case["name"]


def test_output_backpressure():
    """The consumer takes nothing for long stretches: credits hold the issue, nothing is lost."""
    rng = np.random.default_rng(8)
    wf = GEOM.weight_formats()[1]
    cases = [make_case(GEOM, random_qtensor(wf, 4 * GEOM.R, wf.group_size, rng), GEOM.tokens_max, rng)]
    (got, _), = simulate(cases, out_stall=0.97, seed=2, budget=200000)
    assert got == cases[0]["expected"].tolist()


def test_full_rate_mm():
    """MM with K = one group on the u280's chain geometry (one-beat groups: every beat ends
    a row, a result per cycle) keeps one beat per cycle: 10 more row tiles take exactly
    10 * T more cycles (no credit stalls)."""
    geom = EngineGeometry(get_preset("u280-2ch"))
    rng = np.random.default_rng(9)
    wf = geom.weight_formats()[1]
    assert geom.info(wf).bpb == 1
    T = geom.tokens_max
    cases = [make_case(geom, random_qtensor(wf, tiles * geom.R, wf.group_size, rng), T, rng)
             for tiles in (4, 14)]
    (g1, c1), (g2, c2) = simulate(cases, geom=geom)
    assert g1 == cases[0]["expected"].tolist() and g2 == cases[1]["expected"].tolist()
    assert c2 - c1 == 10 * T


def test_two_level_format():
    """The two-level format (int4k/32: the tensor header, 8-bit sub-scales and sub-mins):
    MV and MM next to int4m/32, operations back to back."""
    params = get_preset("sim")
    assert "int4k/32" in params.weight_formats
    geom = EngineGeometry(params)
    rng = np.random.default_rng(10)
    k4, m4 = (WeightFormat.parse(f) for f in ("int4k/32", "int4m/32"))
    cases = [make_case(geom, random_qtensor(wf, n, k, rng), t, rng)
             for wf, n, k, t in ((k4, 5, 64, 1), (k4, 2 * geom.R + 1, 96, 3), (m4, 5, 64, 2), (k4, 3, 32, 16))]
    for case, (got, _) in zip(cases, simulate(cases, stall=0.3, seed=3, geom=geom)):
        assert got == case["expected"].tolist(), case["name"]


def test_broadcast_stages():
    """The activation broadcast's depth is a build parameter: 0 and 3 register levels (and
    a fanout of 2, so the tree has several copies per level) give the same results."""
    rng = np.random.default_rng(11)
    fmts = GEOM.weight_formats()
    cases = [make_case(GEOM, random_qtensor(wf, GEOM.R + 3, 2 * wf.group_size, rng), 2, rng)
             for wf in (fmts[2], fmts[4])]
    for kw in (dict(bcast_stages=0), dict(bcast_stages=3, bcast_fanout=2)):
        for case, (got, _) in zip(cases, simulate(cases, stall=0.2, seed=4, **kw)):
            assert got == case["expected"].tolist(), (kw, case["name"])
    with pytest.raises(ValueError, match="bcast_fanout must be an int >= 2"):
        MatrixEngine(PARAMS, bcast_fanout=1)


def test_attention_raw_formats():
    """Attention on the engine over the raw KV formats (scale 1, min 0): QK (the K cache
    as the weight, rows = positions, K = head_dim 64, 3 queries of a GQA group, u = 1) and
    PV (V^T, rows = head_dim, K = positions, softmax probabilities requantized per 32
    positions, and uniform ones), between weight operations with scales and mins (the
    scale must come back), stalls on every stream."""
    rng = np.random.default_rng(12)
    kv = GEOM.kv_formats()
    assert [f.name for f in kv] == ["int8r/32", "int4r/32"]
    m4 = WeightFormat.parse("int4m/32")
    cases = [qk_case(GEOM, kv[0], 3 * GEOM.R - 2, 64, 3, rng),
             make_case(GEOM, random_qtensor(m4, GEOM.R + 1, 64, rng), 2, rng),
             pv_case(GEOM, kv[1], 64, 96, 1, rng),
             qk_case(GEOM, kv[1], 2 * GEOM.R + 1, 64, 3, rng),
             pv_case(GEOM, kv[0], 64, 160, 3, rng, probs="random"),
             make_case(GEOM, random_qtensor(m4, 3, 32, rng), 1, rng)]
    for case, (got, _) in zip(cases, simulate(cases, stall=0.3, seed=5)):
        assert got == case["expected"].tolist(), case["name"]
