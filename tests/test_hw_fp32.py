"""The binary32 units of hw/fp32 against numpy float32, bit for bit.

Operands: uniform random bit patterns, typical normal values of similar and of very
different magnitudes, the special values crossed with each other, and per operation the
hard cases (ties, cancellation, overflow and underflow boundaries, subnormals, exact
results). Expected results are numpy's (``float32`` arithmetic under
``np.errstate(all="ignore")``): where numpy gives a NaN any NaN is accepted (the units
return 0x7FC00000) and only a NaN; everything else must be the same bit pattern, signed
zeros and subnormals included. The one documented exception: ``FCmp.max`` of +0 and -0
is +0 in either order (numpy returns its first operand).

CI drives each unit under ``amaranth.sim`` with random bubbles (garbage on the data
ports) and checks that every ``o_valid`` comes exactly ``latency`` cycles after its
operation; ``FSqrt`` gets random gaps on ``i_valid`` and random ``o_ready`` backpressure
(its result must hold while stalled). The ``slow_rtl`` sweeps push ``SWEEP_OPS`` operations
per unit through the Verilator harness of :mod:`flightllm.sim.fp32_harness` (about 3 to 8
million a second; FSqrt 0.4 million).
"""

from __future__ import annotations

import dataclasses
import os
import random
import subprocess
from typing import Callable

import numpy as np
import pytest
from amaranth.sim import Simulator

from flightllm.hw.fp32 import F2I, FAdd, FCmp, FDiv, FMul, FRound, FSqrt, I2F
from flightllm.sim.pipeline import simulate_pipeline

SWEEP_OPS = 2_000_000


# -- operands -------------------------------------------------------------------------

SPECIALS = np.array([
    0x00000000, 0x80000000, 0x7F800000, 0xFF800000,          # +-0, +-inf
    0x7FC00000, 0xFFC00001, 0x7F800001, 0xFFBFFFFF,          # quiet and signalling NaNs
    0x3F800000, 0xBF800000, 0x3F000000, 0x40400000, 0xC0000000,   # +-1, 0.5, 3, -2
    0x3F800001, 0x3F7FFFFF, 0x33800000, 0x34000000,          # 1 + ulp, 1 - ulp/2, 2^-24, 2^-23
    0x00800000, 0x80800000, 0x00800001,                      # smallest normals
    0x7F7FFFFF, 0xFF7FFFFF, 0x7F7FFFFE, 0x7F000000,          # largest normals, 2^127
    0x73000000, 0xF3000000, 0x72FFFFFF,                      # half an ulp of the largest, below
    0x00000001, 0x80000001, 0x00000002, 0x00000003,          # smallest subnormals
    0x007FFFFF, 0x807FFFFF, 0x00400000, 0x00400001,          # largest and middle subnormals
    0x4B000000, 0x4AFFFFFF, 0x4B7FFFFF, 0x5F000000, 0xDF000000, 0x20000000,  # 2^23, 2^63, 2^-63
], np.uint32)


def f32(u):
    return np.asarray(u, np.uint32).view(np.float32)


def u32(f):
    return np.asarray(f, np.float32).view(np.uint32)


def pack(sign, e, frac):
    s, e, f = (np.asarray(v).astype(np.uint64) for v in (sign, e, frac))
    return ((s << 31) | (e << 23) | f).astype(np.uint32)


def rand_bits(rng, n):
    return rng.integers(0, 1 << 32, n, dtype=np.uint64).astype(np.uint32)


def rand_normal(rng, n, emin=1, emax=254):
    return pack(rng.integers(0, 2, n), rng.integers(emin, emax + 1, n), rng.integers(0, 1 << 23, n))


def rand_subnormal(rng, n):
    return pack(rng.integers(0, 2, n), np.zeros(n), rng.integers(1, 1 << 23, n))


def near(rng, x, spread):
    """Normal values whose exponent is within ``spread`` of ``x``'s (random sign, fraction)."""
    e = ((x >> 23) & 0xFF).astype(np.int64) + rng.integers(-spread, spread + 1, len(x))
    return pack(rng.integers(0, 2, len(x)), np.clip(e, 1, 254), rng.integers(0, 1 << 23, len(x)))


def scaled(m, k, sign=0):
    """``+-m * 2^k`` as binary32 (exact: the callers keep m within 24 bits and in range)."""
    return u32(np.ldexp(np.asarray(m, np.float64), np.asarray(k)).astype(np.float32)) | (np.asarray(sign, np.uint32) << 31)


def odd(rng, lo_bits, hi_bits, n):
    """Odd integers of ``lo_bits + 1 .. hi_bits`` bits."""
    return rng.integers(1 << lo_bits, 1 << hi_bits, n) | 1


def crossed(vals):
    a, b = np.meshgrid(vals, vals)
    return a.ravel(), b.ravel()


def rand_range(rng, lo, hi):
    """Per element a random integer in [lo, hi]."""
    return lo + (rng.random(len(lo)) * (hi - lo + 1)).astype(np.int64)


def cat(*parts):
    """Concatenate operand blocks (tuples of arrays) column by column."""
    return tuple(np.concatenate(col) for col in zip(*parts))


def add_ties(rng, k):
    """a + b exactly halfway between two floats: b an odd multiple of a's half ulp."""
    a = rand_normal(rng, k, 2, 253)
    m = 2 * (rng.integers(0, 1 << 11, k) >> rng.integers(0, 12, k)) + 1
    return a, scaled(m, ((a >> 23) & 0xFF).astype(np.int64) - 151, rng.integers(0, 2, k))


def close_pairs(rng, k):
    """b a few ulps from a (also across binades and among subnormals): a - b cancels (the
    callers' random ``sub`` makes half of them subtractions)."""
    n1, n2 = k // 2, k // 4
    a = np.concatenate([rand_normal(rng, n1), pack(rng.integers(0, 2, n2), rng.integers(1, 255, n2), 0),
                        rand_subnormal(rng, k - n1 - n2)])
    mag = np.clip((a & 0x7FFFFFFF).astype(np.int64) + rng.integers(-6, 7, k), 0, 0x7F7FFFFF)
    return a, (a & 0x80000000) | mag.astype(np.uint32)


def mul_ties(rng, k):
    """Products of odd integers with exactly 25 significant bits (halfway between two floats),
    scaled into the normal range; and odd products times 2^-150 .. 2^-152 (subnormal
    results, at or between halves of the smallest ulp)."""
    x, y = odd(rng, 12, 13, 4 * k), odd(rng, 11, 12, 4 * k)
    keep = (x * y) >= 1 << 24
    x, y = x[keep][:k], y[keep][:k]
    ka = rng.integers(-100, 100, len(x))
    kb = np.clip(rng.integers(-100, 100, len(x)), -149 - ka, 102 - ka)
    xs, ys = odd(rng, 4, 11, k), odd(rng, 4, 11, k)
    s = rng.integers(-152, -149, k)
    return cat((scaled(x, ka, rng.integers(0, 2, len(x))), scaled(y, kb, rng.integers(0, 2, len(x)))),
               (scaled(xs, -75, rng.integers(0, 2, k)), scaled(ys, s + 75, rng.integers(0, 2, k))))


def exponent_edges(rng, k, targets, div=False):
    """Pairs whose product (quotient) has an unbiased exponent of about one of ``targets``
    (overflow, the smallest normal, the subnormal floor), random fractions."""
    t = rng.choice(targets, k)
    # ua such that ub = t - ua (product) or ua - t (quotient) is a normal exponent
    ua = rand_range(rng, np.maximum(-126, t - 127 + div), np.minimum(127, t + 126 + div))
    ub = np.clip((ua - t if div else t - ua) + rng.integers(-1, 2, k), -126, 127)
    return (pack(rng.integers(0, 2, k), ua + 127, rng.integers(0, 1 << 23, k)),
            pack(rng.integers(0, 2, k), ub + 127, rng.integers(0, 1 << 23, k)))


def typical_pairs(rng, k):
    a1, a2 = rand_normal(rng, k // 2), rand_normal(rng, k - k // 2)
    return cat((a1, near(rng, a1, 2)), (a2, near(rng, a2, 40)))


def subnormal_pairs(rng, k):
    a = rand_subnormal(rng, k)
    return cat((a[:k // 2], rand_subnormal(rng, k // 2)),
               (a[k // 2:], rand_normal(rng, k - k // 2, 1, 3)))


def binary_cases(rng, n, extra):
    """Specials crossed, then ``n`` operations: a fifth each random bits, typical pairs,
    subnormal pairs (swapped half the time), and two fifths from ``extra(rng, k)``."""
    k = n // 5
    sa, sb = crossed(SPECIALS)
    sub_a, sub_b = subnormal_pairs(rng, k)
    flip = rng.random(k) < 0.5
    return cat((sa, sb), (rand_bits(rng, k), rand_bits(rng, k)), typical_pairs(rng, k),
               (np.where(flip, sub_b, sub_a), np.where(flip, sub_a, sub_b)), extra(rng, n - 3 * k))


def add_cases(rng, n):
    def extra(rng, k):
        a, b = cat(add_ties(rng, k // 3), close_pairs(rng, k // 3),
                   (rand_normal(rng, k - 2 * (k // 3), 252, 254), rand_normal(rng, k - 2 * (k // 3), 240, 254)))
        return a, b
    a, b = binary_cases(rng, n, extra)
    s = len(SPECIALS) ** 2
    sub = rng.integers(0, 2, len(a))
    a, b, sub = np.concatenate([a[:s], a]), np.concatenate([b[:s], b]), np.concatenate([np.zeros(s, int), sub])
    sub[s:2 * s] = 1                                      # the specials both ways
    return {"a": a, "b": b, "sub": sub}


def add_ref(ops):
    a, b = f32(ops["a"]), f32(ops["b"])
    return {"o": np.where(ops["sub"] == 1, a - b, a + b)}


def mul_cases(rng, n):
    def extra(rng, k):
        sub = rand_subnormal(rng, k // 4)
        return cat(mul_ties(rng, k // 4), exponent_edges(rng, k // 4, [127, 128, -126, -127, -149, -150, -151]),
                   (sub, rand_normal(rng, k // 4, 120, 254)), (rand_normal(rng, k - 3 * (k // 4)),) * 2)   # x * x
    a, b = binary_cases(rng, n, extra)
    return {"a": a, "b": b}


def div_cases(rng, n):
    def extra(rng, k):
        q = k // 5
        ties = scaled(odd(rng, 0, 23, q), -149, rng.integers(0, 2, q))           # odd subnormal / 2^j
        dv = scaled(1, rng.integers(-2, 4, q), rng.integers(0, 2, q))
        b_ex = scaled(rng.integers(1, 1 << 20, q), rng.integers(-60, 60, q))        # a = b * c exactly
        a_ex = scaled(np.asarray(rng.integers(1, 16, q)) * (b_ex.view(np.float32).astype(np.float64)), 0)
        sub = rand_subnormal(rng, q)
        return cat((ties, dv), (a_ex, b_ex), exponent_edges(rng, q, [127, 128, -126, -127, -149, -150], div=True),
                   (rand_normal(rng, q, 1, 254), sub), (rand_normal(rng, k - 4 * q),) * 2)           # x / x
    a, b = binary_cases(rng, n, extra)
    return {"a": a, "b": b}


def cmp_cases(rng, n):
    def extra(rng, k):
        a = np.concatenate([rand_normal(rng, k // 2), rand_subnormal(rng, k - k // 2)])
        step = rng.integers(-1, 2, k)
        return a, np.where(step == 0, a, (a.astype(np.int64) + step).clip(0, 0xFFFFFFFF).astype(np.uint32))
    a, b = binary_cases(rng, n, extra)
    return {"a": a, "b": b}


def sqrt_cases(rng, n):
    k = n // 5
    y = scaled(odd(rng, 0, 12, k), rng.integers(-80, 52, k))                        # exact squares
    sq = u32(f32(y) * f32(y))
    return {"a": np.concatenate([SPECIALS, rand_bits(rng, k), rand_bits(rng, k) & 0x7FFFFFFF,
                                 rand_subnormal(rng, k) & 0x7FFFFFFF, sq, rand_normal(rng, n - 4 * k)])}


def round_cases(rng, n):
    k = n // 5
    half = scaled(2 * (rng.integers(0, 1 << 22, k) >> rng.integers(0, 23, k)) + 1, -1, rng.integers(0, 2, k))
    nudge = (half.astype(np.int64) + rng.integers(-1, 2, k)).astype(np.uint32)
    a = np.concatenate([SPECIALS, SPECIALS, rand_bits(rng, k), half, nudge,
                        rand_normal(rng, k, 100, 160), rand_subnormal(rng, n - 4 * k)])
    ceil = rng.integers(0, 2, len(a))
    ceil[:len(SPECIALS)], ceil[len(SPECIALS):2 * len(SPECIALS)] = 0, 1
    return {"a": a, "ceil": ceil}


def round_ref(ops):
    a = f32(ops["a"])
    return {"o": np.where(ops["ceil"] == 1, np.ceil(a), np.rint(a))}


def int_range(w):
    return -(1 << (w - 1)), (1 << (w - 1)) - 1


def i2f_cases(w):
    def cases(rng, n):
        lo, hi = int_range(w)
        if w <= 16:                                      # every value
            x = np.arange(lo, hi + 1)
            return {"a": np.concatenate([x, rng.integers(lo, hi, n, endpoint=True)])}
        k = n // 4
        small = rng.integers(lo, hi, k, endpoint=True) >> rng.integers(0, w, k)
        s = rng.integers(1, max(2, w - 24), k)                       # halfway: m * 2^s + 2^(s-1)
        tie = ((rng.integers(1 << 23, 1 << 24, k) << s) + (1 << (s - 1)) + rng.integers(-1, 2, k)) >> max(0, 26 - w)
        tie = np.where(rng.random(k) < 0.5, -tie, tie)
        edge = np.array([lo, lo + 1, hi, hi - 1, 0, 1, -1, (1 << 24) + 1, -(1 << 24) - 1, (1 << 24) + 3])
        edge = edge[(edge >= lo) & (edge <= hi)]
        return {"a": np.concatenate([edge, rng.integers(lo, hi, k, endpoint=True), small, tie,
                                     rng.integers(lo, hi, n - 3 * k, endpoint=True) >> 8])}
    return cases


def i2f_ref(ops):
    return {"o": np.asarray(ops["a"], np.int64).astype(np.float32)}


def f2i_cases(w):
    def cases(rng, n):
        k = n // 5
        p = np.array([f32(scaled(1, w - 1, s)) for s in (0, 1)], np.float32)        # +-2^(w-1)
        edge = np.concatenate([p, np.nextafter(p, np.float32(0)), np.nextafter(p, p * 2)])
        ints = np.rint(f32(rand_normal(rng, k, 125, min(254, 129 + w))))
        return {"a": np.concatenate([SPECIALS, u32(edge), u32(ints), rand_bits(rng, k),
                                     rand_normal(rng, k, 100, 160), u32(np.rint(f32(rand_normal(rng, k, 126, 127 + w)))),
                                     rand_subnormal(rng, n - 4 * k)])}
    return cases


def f2i_ref(w):
    def ref(ops):
        x = f32(ops["a"]).astype(np.float64)
        t = np.trunc(x)
        lo, hi = int_range(w)
        inside = (t >= lo) & (t < 2.0 ** (w - 1))                # false for NaN
        out = np.zeros(len(x), np.int64)
        out[inside] = t[inside].astype(np.int64)
        out[t >= 2.0 ** (w - 1)] = hi
        out[t < lo] = lo
        return {"o": out}
    return ref


def binop(f):
    return lambda ops: {"o": f(f32(ops["a"]), f32(ops["b"]))}


@dataclasses.dataclass
class Unit:
    make: Callable
    cases: Callable                      # (rng, n) -> {port: operands}
    ref: Callable                        # operands -> {port: numpy's results}
    n_ci: int                            # operations under amaranth.sim (about 10 s)


UNITS = {
    "fadd": Unit(FAdd, add_cases, add_ref, 60_000),
    "fmul": Unit(FMul, mul_cases, binop(np.multiply), 60_000),
    "fdiv": Unit(FDiv, div_cases, binop(np.divide), 30_000),
    "fcmp": Unit(FCmp, cmp_cases, lambda ops: {"max": np.maximum(f32(ops["a"]), f32(ops["b"])),
                                               "lt": f32(ops["a"]) < f32(ops["b"]),
                                               "eq": f32(ops["a"]) == f32(ops["b"])}, 60_000),
    "fround": Unit(FRound, round_cases, round_ref, 60_000),
    "fsqrt": Unit(FSqrt, sqrt_cases, lambda ops: {"o": np.sqrt(f32(ops["a"]))}, 3_000),
    **{f"i2f{w}": Unit(lambda w=w: I2F(w), i2f_cases(w), i2f_ref, 20_000) for w in (2, 8, 24, 32, 64)},
    **{f"f2i{w}": Unit(lambda w=w: F2I(w), f2i_cases(w), f2i_ref(w), 20_000) for w in (2, 8, 32, 64)},
}


# -- checking ---------------------------------------------------------------------------

def check(name, ops, got, want):
    """Compare every output port: float ports bit for bit (any NaN for a NaN), the rest as
    integers; report the first mismatches with their operands."""
    n = len(next(iter(ops.values())))
    for port, w in want.items():
        g = np.asarray(got[port])
        assert len(g) == n, f"{name}.{port}: {len(g)} results for {n} operations"
        if w.dtype == np.float32:
            g = g.astype(np.uint32)
            bad = np.where(np.isnan(w), ~np.isnan(f32(g)), g != u32(w))
            if name == "fcmp":                              # documented: max(+0, -0) = +0
                mixed = (((ops["a"] | ops["b"]) & 0x7FFFFFFF) == 0) & (ops["a"] != ops["b"])
                bad = np.where(mixed, g != 0, bad)
            show = lambda v: f"{int(v):#010x}"
            wv = u32(w)
        else:
            bad = g != w.astype(np.int64)
            show, wv = int, w.astype(np.int64)
        if bad.any():
            idx = np.flatnonzero(bad)[:8]
            rows = [", ".join(f"{k}={int(ops[k][i]):#x}" for k in ops) + f" -> {show(g[i])}, numpy {show(wv[i])}"
                    for i in idx]
            raise AssertionError(f"{name}.{port}: {bad.sum()} of {n} wrong:\n  " + "\n  ".join(rows))


# -- amaranth.sim drivers ---------------------------------------------------------------

def simulate_handshake(dut, ops, gap=0.3, stall=0.4, seed=0):
    """FSqrt: ``i_valid`` after random gaps, held until accepted (garbage while low);
    ``o_ready`` randomly low. Checks one operation in flight, ``o_valid`` exactly
    ``cycles`` after the acceptance, the result held while stalled, and bounds the run."""
    a = [int(v) for v in ops["a"]]
    n = len(a)
    rnd = random.Random(seed)
    got, lat = [], []

    async def bench(ctx):
        k, have, accepted, held = 0, False, None, None
        for c in range(n * (dut.cycles + 40) + 100):         # bounded
            if len(got) == n:
                return
            have = have or (k < n and rnd.random() >= gap)
            ctx.set(dut.i_valid, have)
            ctx.set(dut.a, a[k] if have else rnd.getrandbits(32))
            ready = rnd.random() >= stall
            ctx.set(dut.o_ready, ready)
            if ctx.get(dut.o_valid):
                o = ctx.get(dut.o)
                if held is None:
                    lat.append(c - accepted)
                assert held in (None, o), "result changed while o_ready was low"
                held = None if ready else o
                if ready:
                    got.append(o)
                    accepted = None
            if have and ctx.get(dut.i_ready):
                assert accepted is None, "accepted a second operation while one is in flight"
                accepted, k, have = c, k + 1, False
            await ctx.tick()

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    assert len(got) == n, f"hung: {len(got)} of {n} results"
    assert set(lat) == {dut.cycles}, sorted(set(lat))
    return {"o": got}


# -- tests ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(UNITS))
def test_matches_numpy(name):
    """Each unit on its operand mix under amaranth.sim, with bubbles or backpressure."""
    u = UNITS[name]
    rng = np.random.default_rng(sum(map(ord, name)))
    ops = u.cases(rng, u.n_ci)
    dut = u.make()
    got = simulate_handshake(dut, ops) if hasattr(dut, "cycles") else simulate_pipeline(dut, ops)
    with np.errstate(all="ignore"):
        want = u.ref(ops)
    check(name, ops, got, want)


@pytest.mark.rtl
@pytest.mark.slow_rtl
@pytest.mark.parametrize("name", list(UNITS))
def test_sweep_verilator(name):
    """``SWEEP_OPS`` operations of the same mix (fresh random draws) through Verilator."""
    from flightllm.sim.fp32_harness import Sweep

    u = UNITS[name]
    rng = np.random.default_rng(sum(map(ord, name)) + 1)
    ops = u.cases(rng, SWEEP_OPS)
    sweep = Sweep(name, u.make)
    got = sweep.run(ops, bubble=0.2, stall=0.3, seed=7)
    with np.errstate(all="ignore"):
        want = u.ref(ops)
    check(name, ops, got, want)
    print(f"{name}: {len(ops[next(iter(ops))]):,} operations, {sweep.rate:,.0f} per second")


def test_cases_hit_ties():
    """The tie generators make real ties (checked in float64, where the sums and products are exact)."""
    rng = np.random.default_rng(0)
    a, b = (f32(v).astype(np.float64) for v in add_ties(rng, 2000))
    s = a + b
    r = s.astype(np.float32).astype(np.float64)
    other = np.nextafter(r.astype(np.float32), np.where(s > r, np.inf, -np.inf).astype(np.float32)).astype(np.float64)
    assert np.mean(np.abs(s - r) == np.abs(other - s)) > 0.9
    a, b = (f32(v).astype(np.float64) for v in mul_ties(rng, 2000))
    p = a * b
    r = p.astype(np.float32).astype(np.float64)
    other = np.nextafter(r.astype(np.float32), np.where(p > r, np.inf, -np.inf).astype(np.float32)).astype(np.float64)
    assert np.mean((np.abs(p - r) == np.abs(other - p)) & (p != r)) > 0.5


@pytest.mark.parametrize("cls", [I2F, F2I])
def test_width_checked(cls):
    with pytest.raises(TypeError, match="width must be an int"):
        cls(32.0)
    with pytest.raises(TypeError, match="width must be an int"):
        cls(True)
    with pytest.raises(ValueError, match="2..64"):
        cls(1)
    with pytest.raises(ValueError, match="2..64"):
        cls(65)


@pytest.mark.rtl
@pytest.mark.parametrize("make", [FAdd, FMul, FDiv, FCmp, FRound, FSqrt, lambda: I2F(64), lambda: F2I(32)],
                         ids=["fadd", "fmul", "fdiv", "fcmp", "fround", "fsqrt", "i2f64", "f2i32"])
def test_verilator_lint_clean(make, tmp_path):
    """-Wall with only the named, justified waivers of sim/rtl.py."""
    from amaranth.back import verilog

    from flightllm.sim.rtl import verilator_env, waiver_args

    v = tmp_path / "unit.v"
    v.write_text(verilog.convert(make(), name="unit"))
    r = subprocess.run(["verilator", "--lint-only", "-Wall", *waiver_args(), "--top-module", "unit", str(v)],
                       capture_output=True, text=True, env={**os.environ, **verilator_env()})
    assert r.returncode == 0 and "%Warning" not in r.stderr and "%Error" not in r.stderr, r.stderr[-3000:]
