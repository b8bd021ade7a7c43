"""amaranth.sim checks of the sparse DSP chain against runtime/arith.mpe_reference.

Each test feeds rows of random beats (weights, window indices, per-token candidate
activations) with random bubbles, drives ``u`` and ``xsum_u`` at the lags the chain
documents (and garbage in every other cycle), and compares every accumulator with
:func:`flightllm.runtime.arith.mpe_reference` on the gathered weights and activations.
The latency is measured: the cycle each result appears after its row's last beat.
"""

import dataclasses
import random

import numpy as np
import pytest
from amaranth.sim import Simulator

from flightllm.hw.chain import SparseChain, split_mul, SPLIT_MUL_LATENCY
from flightllm.hw.formats import SCALE_FIXED_BITS
from flightllm.hw.params import get_preset
from flightllm.runtime.arith import ACT_MAX, mpe_reference

SMAX = (1 << (SCALE_FIXED_BITS - 1)) - 1


def make_rows(dut, rows, bpb, tokens, rng, extreme=False):
    """Random rows: per row ``groups`` quant groups of ``bpb`` beats; returns the issue
    order (one entry per beat and token) and the expected accumulator per (row, token)."""
    g = dut.geom
    L, nc = g.L, dut.n_cand
    umax = (1 << g.factor_bits) - 1
    issue, expect = [], []
    for groups in rows:
        n_k = groups * bpb * L
        q = np.zeros((1, n_k), np.int64)
        x = np.zeros((tokens, n_k), np.int64)
        S = rng.integers(-SMAX - 1, SMAX + 1, (1, groups))
        M = rng.integers(-SMAX - 1, SMAX + 1, (1, groups))
        u = rng.integers(0, umax + 1, (tokens, groups))
        if extreme:                                    # push the 64-bit accumulator to wrap
            S[:] = rng.choice([-SMAX - 1, SMAX], (1, groups))
            u[:] = umax
        S[0, 0], M[0, -1] = 0, 0                       # zero scale / min somewhere
        u[0, 0] = 0
        for gi in range(groups):
            for b in range(bpb):
                w = rng.integers(-128, 128, L)
                if extreme:
                    w = rng.choice([-128, 127], L)
                idx = rng.integers(0, nc, L)
                k0 = (gi * bpb + b) * L
                q[0, k0:k0 + L] = w
                for t in range(tokens):
                    cand = rng.integers(-ACT_MAX, ACT_MAX + 1, (L, nc))
                    if extreme:
                        cand = rng.choice([-ACT_MAX, ACT_MAX], (L, nc))
                    x[t, k0:k0 + L] = cand[np.arange(L), idx]
                    issue.append(dict(w=w, idx=idx, cand=cand, scale=int(S[0, gi]), min=int(M[0, gi]),
                                      first=b == 0, last=b == bpb - 1, first_grp=gi == 0,
                                      last_grp=gi == groups - 1, u=int(u[t, gi]),
                                      xsum_u=int(u[t, gi]) * int(x[t, gi * bpb * L:(gi + 1) * bpb * L].sum())))
        ref = mpe_reference(q, S, M if g.has_min else None, x, u, bpb * L, g.acc_w)   # (T, 1)
        expect += [int(v) for v in ref[:, 0]]
    return issue, expect


def run_chain(params, rows, tokens, bpb=None, seed=0, bubble=0.3, extreme=False):
    """Simulate; return (got, expected, measured latencies, the chain)."""
    dut = SparseChain(get_preset(params) if isinstance(params, str) else params)
    g = dut.geom
    bpb = g.bpb_max if bpb is None else bpb
    rng = np.random.default_rng(seed)
    rnd = random.Random(seed)
    issue, expect = make_rows(dut, rows, bpb, tokens, rng, extreme)
    # schedule: each entry goes in at some cycle, bubbles in between
    sched, cyc = [], 0
    for e in issue:
        while rnd.random() < bubble:
            cyc += 1
        sched.append((cyc, e))
        cyc += 1
    late_u = {c + dut.u_lag: e["u"] for c, e in sched if e["last"]}
    late_x = {c + dut.xsum_lag: e["xsum_u"] for c, e in sched if e["last"]}
    ends = [c for c, e in sched if e["last"] and e["last_grp"]]
    end_cycle = cyc + dut.latency + 4
    got, lat = [], []
    L, nc = g.L, dut.n_cand
    umax = (1 << g.factor_bits) - 1
    xlim = 1 << (g.xsum_u_w - 1)

    async def bench(ctx):
        ctx.set(dut.tap, tokens - 1)
        by_cycle = dict(sched)
        for n in range(end_cycle):
            e = by_cycle.get(n)
            ctx.set(dut.valid, e is not None)
            if e is None:                                  # a bubble carries garbage
                e = dict(w=rng.integers(-128, 128, L), idx=rng.integers(0, nc, L),
                         cand=rng.integers(-ACT_MAX, ACT_MAX + 1, (L, nc)), scale=int(rng.integers(0, SMAX)),
                         min=int(rng.integers(0, SMAX)), first=rnd.random() < .5, last=rnd.random() < .5,
                         first_grp=rnd.random() < .5, last_grp=rnd.random() < .5)
            for lane in range(L):
                ctx.set(dut.beat.w[lane], int(e["w"][lane]))
                ctx.set(dut.beat.idx[lane], int(e["idx"][lane]))
                for c in range(nc):
                    ctx.set(dut.cand[lane][c], int(e["cand"][lane, c]))
            ctx.set(dut.beat.scale, e["scale"])
            ctx.set(dut.beat.min, e["min"])
            for f in ("first", "last", "first_grp", "last_grp"):
                ctx.set(getattr(dut, f), int(e[f]))
            ctx.set(dut.u, late_u.get(n, rnd.randrange(umax + 1)))
            ctx.set(dut.xsum_u, late_x.get(n, rnd.randrange(-xlim, xlim)))
            if ctx.get(dut.acc_valid):
                got.append(ctx.get(dut.acc))
                lat.append(n - ends[len(got) - 1])
            await ctx.tick()

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    return got, expect, lat, dut


@pytest.mark.parametrize("preset, tokens, bpb", [
    ("sim", 1, 4), ("sim", 3, 4), ("sim", 3, 1),          # bpb_max 4: the psum line, also 1-beat groups
    ("u280-2ch", 1, 1), ("u280-2ch", 16, 1),              # the u280's chain: 32 lanes, no psum line
    ("sim-mc", 2, 2),
])
def test_chain_matches_reference(preset, tokens, bpb):
    """MV and MM, several rows back to back with bubbles, multi-beat and one-beat groups."""
    got, exp, lat, dut = run_chain(preset, rows=[3, 1, 2], tokens=tokens, bpb=bpb, seed=tokens + bpb)
    assert got == exp
    # measured, not computed: every result leaves exactly `latency` cycles after the
    # row's last beat entered (tokens of a beat are consecutive in the schedule)
    assert set(lat) == {dut.latency}, lat


def test_chain_accumulator_wraps():
    """Extreme weights, activations, scales and factors with a 40-bit accumulator (a 64-bit
    one needs ~2**10 groups of the largest products to wrap): it wraps as the spec's does."""
    p = dataclasses.replace(get_preset("u280-2ch"), acc_bits=40)
    got, exp, _, _ = run_chain(p, rows=[6, 6], tokens=2, bpb=1, seed=11, extreme=True)
    assert got == exp
    full = run_chain(get_preset("u280-2ch"), rows=[6], tokens=1, bpb=1, seed=11, extreme=True)[1]
    assert any(abs(v) >= 1 << 40 for v in full)      # the same kind of row does wrap at 40 bits


@pytest.mark.parametrize("bw", [28, 22, 15])
def test_split_mul(bw):
    """The two-DSP product (and its one-DSP form) against Python integers, corner values."""
    from amaranth import Module, Signal, signed

    m = Module()
    a = Signal(signed(SCALE_FIXED_BITS))
    b = Signal(signed(bw))
    p = split_mul(m, "t", a, b, signed(SCALE_FIXED_BITS + bw))
    rng = np.random.default_rng(bw)
    amax, bmax = 1 << (SCALE_FIXED_BITS - 1), 1 << (bw - 1)
    vals = [(-amax, -bmax), (amax - 1, bmax - 1), (-amax, bmax - 1), (0, -bmax), (-1, -1), (1, min((1 << 17) - 1, bmax - 1))]
    vals += [(int(rng.integers(-amax, amax)), int(rng.integers(-bmax, bmax))) for _ in range(40)]
    got = []

    async def bench(ctx):
        for n in range(len(vals) + SPLIT_MUL_LATENCY):
            if n < len(vals):
                ctx.set(a, vals[n][0])
                ctx.set(b, vals[n][1])
            if n >= SPLIT_MUL_LATENCY:
                got.append(ctx.get(p))
            await ctx.tick()

    sim = Simulator(m)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    assert got == [x * y for x, y in vals]


def test_chain_rejects_bad_params():
    with pytest.raises(TypeError, match="HwParams"):
        SparseChain("sim")
