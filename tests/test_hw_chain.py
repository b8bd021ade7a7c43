"""amaranth.sim checks of the sparse DSP chain: sparse MUX, DSP groups, links, token lines."""

import random

import numpy as np
import pytest
from amaranth.sim import Simulator

from flightllm.hw.chain import SparseChain
from flightllm.hw.params import get_preset
from flightllm.runtime.arith import wrap_signed


def run_chain(rows, tokens, links, emit_nodes, bpb, seed=0, stall=0.25):
    """Feed ``rows`` rows of random beats; return (got, expected) accumulators.

    Each row has ``groups`` quant-group steps of ``bpb`` beats, every beat repeated for
    ``tokens`` tokens with its own activations. A segment (links) is one quant group.
    """
    p = get_preset("sim")
    dut = SparseChain(p, emit_nodes=emit_nodes)
    emit_nodes = dut.emit_nodes
    g = dut.geom
    rng = np.random.default_rng(seed)
    rnd = random.Random(seed)
    L, D, nc = g.L, g.D, dut.n_cand
    # segment boundaries from the links: a 0 link after group d ends a segment there
    ends = [d for d in range(g.dsp_groups - 1) if not (links >> d) & 1] + [g.dsp_groups - 1]
    seg_of_node = {e: i for i, e in enumerate(ends)}
    beats, expect = [], []
    for r, groups in enumerate(rows):
        acc = np.zeros(tokens, np.int64)
        for gi in range(groups):
            psum = np.zeros((tokens, len(ends)), np.int64)
            scales = [int(rng.integers(0, 1 << 16)) for _ in emit_nodes]
            for b in range(bpb):
                w = rng.integers(-127, 128, L)
                idx = rng.integers(0, nc, L)
                for t in range(tokens):
                    cand = rng.integers(-127, 128, (L, nc))
                    act = cand[np.arange(L), idx]
                    for lane in range(L):
                        seg = next(i for i, e in enumerate(ends) if lane // D <= e)
                        psum[t, seg] += int(w[lane]) * int(act[lane])
                    beats.append(dict(w=w, idx=idx, cand=cand, scale=scales, first=b == 0,
                                      last=b == bpb - 1, first_grp=gi == 0, last_grp=gi == groups - 1))
            for k, e in enumerate(emit_nodes):
                if e in seg_of_node:
                    acc += psum[:, seg_of_node[e]] * scales[k]
        expect += list(wrap_signed(acc, 48))

    got = []
    sim = Simulator(dut)
    sim.add_clock(1e-8)

    async def bench(ctx):
        ctx.set(dut.links, links)
        ctx.set(dut.tap, tokens - 1)
        queue = list(beats)
        idle = 0
        while len(got) < len(expect):
            en = rnd.random() >= stall
            ctx.set(dut.en, en)
            if queue and rnd.random() >= stall:
                bt = queue[0]
                ctx.set(dut.valid, 1)
                for lane in range(L):
                    ctx.set(dut.w[lane], int(bt["w"][lane]))
                    ctx.set(dut.idx[lane], int(bt["idx"][lane]))
                    for c in range(nc):
                        ctx.set(dut.cand[lane][c], int(bt["cand"][lane, c]))
                for k in range(len(emit_nodes)):
                    ctx.set(dut.scale[k], bt["scale"][k])
                for f in ("first", "last", "first_grp", "last_grp"):
                    ctx.set(getattr(dut, f), int(bt[f]))
                if en:
                    queue.pop(0)
            else:
                ctx.set(dut.valid, 0)
            if en and ctx.get(dut.acc_valid):
                got.append(ctx.get(dut.acc))
            await ctx.tick()
            idle = 0 if queue else idle + 1
            assert idle < 200, f"chain produced {len(got)} of {len(expect)} results"

    sim.add_testbench(bench)
    sim.run()
    return got, expect


@pytest.mark.parametrize("tokens", [1, 3])
def test_chain_one_segment(tokens):
    """MV (1 token) and MM (3 tokens): one segment, multi-beat quant groups."""
    got, exp = run_chain(rows=[3, 1, 2], tokens=tokens, links=0b1, emit_nodes=None, bpb=2, seed=tokens)
    assert got == [int(v) for v in exp]


def test_chain_two_segments():
    """Link 0 open: the two DSP groups reduce two quant groups with their own scales."""
    got, exp = run_chain(rows=[2, 3], tokens=2, links=0b0, emit_nodes=(0, 1), bpb=1, seed=7)
    assert got == [int(v) for v in exp]


def test_chain_config_checks():
    """Latency formula and emit-node validation."""
    p = get_preset("sim")
    dut = SparseChain(p)
    dut._MustUse__silence = True        # built only to read its latency
    assert dut.latency == p.dsp_group + p.chain_len // p.dsp_group + 5
    with pytest.raises(ValueError, match="emit_nodes"):
        SparseChain(p, emit_nodes=(0,))
