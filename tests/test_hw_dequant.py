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
    """Beats (per chain: weights, indices, per-segment scales) channel c must emit.

    Lanes of a segment missing from the short last step of a tile are None (don't
    care: their scale is 0)."""
    f = geom.fmt_of(wf)
    n, k = pt.shape
    tiles, groups = -(-n // geom.R), k // geom.G
    raw = np.frombuffer(bytes(pt.payload[c]), np.uint8)
    nb = len(raw) // wf.block_bytes
    vals, idx = formats.unpack_blocks(raw[:nb * wf.block_bytes].reshape(nb, -1), wf)
    scl = np.frombuffer(bytes(pt.scales[c]), "<u2")
    beats = []
    for tile in range(tiles):
        for g0 in range(0, groups, f.gpb):
            ng = min(f.gpb, groups - g0)
            for t in range(f.bpb):
                beat = []
                for j in range(geom.Rc):
                    blk = lambda grp: (tile * groups + grp) * geom.Rc + j
                    wv, iv = [], []
                    for lane in range(geom.L):
                        if f.gpb > 1:
                            sg, e = lane // f.kept, lane % f.kept
                        else:
                            sg, e = 0, t * geom.L + lane
                        if sg >= ng:
                            wv.append(None)
                            iv.append(None)
                        else:
                            wv.append(int(vals[blk(g0 + sg), e]))
                            iv.append(int(idx[blk(g0 + sg), e]) if f.index_bits else 0)
                    sc = [int(scl[blk(g0 + sg)]) if sg < ng else 0 for sg in range(geom.gpb_max)]
                    beat.append((wv, iv, sc))
                beats.append(beat)
    return beats


def same_beat(got, exp):
    for (gw, gi, gs), (ew, ei, es) in zip(got, exp):
        if gs != es:
            return False
        for a, b, c, d in zip(gw, ew, gi, ei):
            if b is not None and (a != b or c != d):
                return False
    return True


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
        pw, sw = g.stream_words(wf, n, k)
        jobs.append((g.code(wf), (-(-n // g.R), k // g.G, pw, sw), to_words(pt.payload[0], g.W, pw),
                     to_words(pt.scales[0], g.W, sw), expected_beats(g, wf, pt, 0)))

    async def bench(ctx):
        for code, (tiles, groups, pw, sw), pwords, swords, exp in jobs:
            ctx.set(dut.cfg.payload.fmt, code)
            ctx.set(dut.cfg.payload.tiles, tiles)
            ctx.set(dut.cfg.payload.groups, groups)
            ctx.set(dut.cfg.payload.pay_words, pw)
            ctx.set(dut.cfg.payload.scale_words, sw)
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
                    got.append([([int(x) for x in pl[j].w], [int(x) for x in pl[j].idx],
                                 [int(x) for x in pl[j].scale]) for j in range(g.Rc)])
                await ctx.tick()
            ctx.set(dut.payload.valid, 0)
            ctx.set(dut.scales.valid, 0)
            ctx.set(dut.beat.ready, 0)
            assert pcur is None and scur is None, "unit did not take every word"
            for i, (a, b) in enumerate(zip(got, exp)):
                assert same_beat(a, b), f"beat {i}: got {a} expected {b}"
            return_cycles.append(cycles)

    return_cycles = []
    sim.add_testbench(bench)
    sim.run()
    return return_cycles


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
def test_dequant_every_pattern(bits):
    """One unit, back-to-back operations of every pattern of the sim preset at this width."""
    p = get_preset("sim")
    g = EngineGeometry(p)
    cases = []
    for i, wf in enumerate(wf for wf in g.weight_formats() if wf.bits == bits):
        cases.append((wf, packed(g, wf, 6, 128, seed=i)))
    run_dequant(p, cases, seed=bits)


def test_dequant_segments():
    """kept < chain_len (u280-like 1:4, 2:4 with 32 lanes): two quant groups per beat in
    two chain segments; an odd group count leaves a short last step (scale 0)."""
    p = HwParams(name="seg", clock_mhz=100.0, chains=2, chain_len=32, dsp_group=8,
                 weight_channels=1, hbm_port_bits=128, weight_bits=(4,),
                 nm_patterns=((1, 4), (2, 4)), act_buf_depth=1024, kv_tile=16, max_seq_len=512)
    g = EngineGeometry(p)
    cases = [(wf, packed(g, wf, 3, k, seed=3)) for wf in g.weight_formats() for k in (128, 192)]
    run_dequant(p, cases, stall=0.2)


MC = HwParams(name="sim-mc", clock_mhz=100.0, chains=8, chain_len=16, dsp_group=4, group_size=32,
              weight_channels=2, hbm_port_bits=256, hbm_channel_gbps=3.2, act_buf_depth=8192,
              kv_tile=16, max_seq_len=512)


@pytest.mark.parametrize("bits", [4, 2])
def test_dequant_multi_chain(bits):
    """Four chains per channel (u280 ratios): several blocks cut per cycle, with stalls."""
    g = EngineGeometry(MC)
    cases = [(wf, packed(g, wf, 8, 96, seed=i)) for i, wf in enumerate(g.weight_formats()) if wf.bits == bits]
    run_dequant(MC, cases, stall=0.3, seed=bits)


def test_dequant_multi_chain_rate():
    """No stalls: one beat per cycle, or one HBM word per cycle when that is the bound."""
    g = EngineGeometry(MC)
    wfs = [wf for wf in g.weight_formats() if wf.name in ("int4", "int2-1:4", "int4-2:4", "int8", "int3-2:8")]
    n, k = 32, 512
    cases = [(wf, packed(g, wf, n, k, seed=1)) for wf in wfs]
    cycles = run_dequant(MC, cases, stall=0.0)
    for (wf, pt), cyc in zip(cases, cycles):
        f = g.fmt_of(wf)
        beats = -(-n // g.R) * -(-(k // g.G) // f.gpb) * f.bpb
        words = g.stream_words(wf, n, k)[0]
        bound = max(beats, words)
        assert cyc <= bound * 1.05 + 8, f"{wf.name}: {cyc} cycles for {beats} beats / {words} words"


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
