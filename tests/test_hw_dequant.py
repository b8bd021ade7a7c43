"""amaranth.sim checks of the dequant unit against formats.pack_tensor / unpack_blocks."""

import random

import numpy as np
import pytest
from amaranth.sim import Simulator

from flightllm.hw import formats
from flightllm.hw.dequant import DequantUnit
from flightllm.hw.geometry import EngineGeometry
from flightllm.hw.params import HwParams, get_preset


def nm_mask(rng, n, k, n_keep, m):
    """Random mask keeping exactly n_keep of every m-window."""
    mask = np.zeros((n, k // m, m), dtype=bool)
    for r in range(n):
        for w in range(k // m):
            mask[r, w, rng.choice(m, n_keep, replace=False)] = True
    return mask.reshape(n, k)


def packed(geom, wf, n, k, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32)
    mask = None if wf.dense else nm_mask(rng, n, k, wf.n_keep, wf.m)
    q, s, sh = formats.quantize_groups(w, wf, mask)
    return formats.pack_tensor(q, s, sh, wf, geom.R, geom.C, mask)


def expected_beats(geom, wf, pt, c):
    """Beats (per chain: weights, indices, scale) channel c must emit."""
    f = geom.fmt_of(wf)
    raw = np.frombuffer(bytes(pt.payload[c]), np.uint8)
    nb = len(raw) // wf.block_bytes
    vals, idx = formats.unpack_blocks(raw[:nb * wf.block_bytes].reshape(nb, -1), wf)
    scl = np.frombuffer(bytes(pt.scales[c]), "<u2")
    beats = []
    for step in range(nb // geom.Rc):
        for t in range(f.bpb):
            beat = []
            for j in range(geom.Rc):
                b = step * geom.Rc + j
                lo = t * geom.L
                wv = np.zeros(geom.L, np.int64)
                iv = np.zeros(geom.L, np.int64)
                n = min(geom.L, f.kept)
                wv[:n] = vals[b, lo:lo + n]
                if f.index_bits:
                    iv[:n] = idx[b, lo:lo + n]
                beat.append((list(wv), list(iv), int(scl[b])))
            beats.append(beat)
    return beats


def to_words(data: bytes, width_bits: int, count: int):
    nbytes = width_bits // 8
    data = bytes(data) + bytes(count * nbytes - len(data))
    return [int.from_bytes(data[i * nbytes:(i + 1) * nbytes], "little") for i in range(count)]


def run_dequant(params, cases, stall=0.3, seed=1):
    """Feed several operations (wf, packed tensor) through one unit; compare every beat."""
    dut = DequantUnit(params)
    g = dut.geom
    rnd = random.Random(seed)
    sim = Simulator(dut)
    sim.add_clock(1e-8)
    jobs = []
    for wf, pt in cases:
        n, k = pt.shape
        steps = -(-n // g.R) * (k // g.G)
        pw, sw = g.stream_words(wf, n, k)
        jobs.append((g.code(wf), steps, to_words(pt.payload[0], g.W, pw),
                     to_words(pt.scales[0], g.W, sw), expected_beats(g, wf, pt, 0)))

    async def bench(ctx):
        for code, steps, pwords, swords, exp in jobs:
            ctx.set(dut.cfg.payload.fmt, code)
            ctx.set(dut.cfg.payload.steps, steps)
            ctx.set(dut.cfg.valid, 1)
            await ctx.tick().until(dut.cfg.ready)
            ctx.set(dut.cfg.valid, 0)
            got = []
            # Feed both regions and drain beats in one loop, one clock at a time.
            pit, sit = iter(pwords), iter(swords)
            pcur, scur = next(pit, None), next(sit, None)
            cycles = 0
            while len(got) < len(exp):
                cycles += 1
                assert cycles < 100000, "dequant hung"
                pv = pcur is not None and rnd.random() >= stall
                sv = scur is not None and rnd.random() >= stall
                ctx.set(dut.payload.valid, pv)
                ctx.set(dut.payload.payload, pcur or 0)
                ctx.set(dut.scales.valid, sv)
                ctx.set(dut.scales.payload, scur or 0)
                rdy = rnd.random() >= stall
                ctx.set(dut.beat.ready, rdy)
                await ctx.delay(1e-9)     # let combinational ready settle
                if pv and ctx.get(dut.payload.ready):
                    pcur = next(pit, None)
                if sv and ctx.get(dut.scales.ready):
                    scur = next(sit, None)
                if rdy and ctx.get(dut.beat.valid):
                    pl = ctx.get(dut.beat.payload)
                    got.append([([int(x) for x in pl[j].w], [int(x) for x in pl[j].idx], int(pl[j].scale))
                                for j in range(g.Rc)])
                await ctx.tick()
            ctx.set(dut.payload.valid, 0)
            ctx.set(dut.scales.valid, 0)
            ctx.set(dut.beat.ready, 0)
            assert pcur is None and scur is None, "unit did not take every word"
            for i, (a, b) in enumerate(zip(got, exp)):
                assert a == b, f"beat {i}: got {a} expected {b}"

    sim.add_testbench(bench)
    sim.run()


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
def test_dequant_every_pattern(bits):
    """One unit, back-to-back operations of every pattern of the sim preset at this width."""
    p = get_preset("sim")
    g = EngineGeometry(p)
    cases = []
    for i, wf in enumerate(wf for wf in g.weight_formats() if wf.bits == bits):
        cases.append((wf, packed(g, wf, 6, 128, seed=i)))
    run_dequant(p, cases, seed=bits)


def test_dequant_pad_lanes():
    """kept < chain_len (u280-like 1:4): lanes past the block are weight 0."""
    p = HwParams(name="pad", clock_mhz=100.0, chains=2, chain_len=32, dsp_group=8,
                 weight_channels=1, hbm_port_bits=128, weight_bits=(4,),
                 nm_patterns=((1, 4), (2, 4)), act_buf_depth=1024, kv_tile=16, max_seq_len=512)
    g = EngineGeometry(p)
    cases = [(wf, packed(g, wf, 3, 128, seed=3)) for wf in g.weight_formats()]
    run_dequant(p, cases, stall=0.2)


def test_geometry_rejects_bad_shapes():
    bad = HwParams(name="bad", clock_mhz=100.0, chains=4, chain_len=8, dsp_group=4,
                   nm_patterns=((8, 16),), group_size=16, weight_bits=(8,))
    with pytest.raises(ValueError, match="chains a power of two"):
        EngineGeometry(HwParams(name="odd", clock_mhz=1.0, chains=3, chain_len=8, dsp_group=4,
                                weight_channels=1))
    g = EngineGeometry(bad)
    with pytest.raises(ValueError, match="not supported"):
        g.code(formats.WeightFormat(4, 1, 1, 16))
    with pytest.raises(TypeError):
        EngineGeometry("sim")
