"""amaranth.sim checks of hw/fexp.FExp against runtime/sfu.exp, bit for bit.

The testbench drives inputs with random bubbles (``i_valid`` low, garbage on ``x``) for a
fixed number of cycles, checks that ``o_valid`` is high exactly ``latency`` cycles after
each valid input and never otherwise, and compares each ``y`` with
:func:`flightllm.runtime.sfu.exp` (a NaN input only has to give a NaN). Inputs: the
special values and the edges of the result range, subnormals, tiny values, uniform
values in [-130, 130], random bit patterns, and inputs at which the rounding of the
table-times-polynomial value ``M`` is an exact tie or carries to 2^24; those are found
with the golden algorithm's intermediate ``M`` (transcribed from the docstring of
runtime/sfu.py, used only to choose inputs: the expected values always come from
``sfu.exp``). The ``slow_rtl`` sweep runs millions of inputs (or all 2^32) under Verilator.
"""

import os
import time

import numpy as np
import pytest
from amaranth.back import rtlil

from flightllm.hw.fexp import FExp
from flightllm.sim.pipeline import simulate_pipeline
from flightllm.runtime import sfu
from flightllm.runtime.sfu import EXP_LN2, EXP_LOG2E, EXP_TABLE

F32 = np.float32


def golden_m(x):
    """The golden algorithm's ``M`` (31 bits: 2^frac(t) with 30 fraction bits) and the
    biased exponent of ``x``, straight from the docstring of runtime/sfu.py."""
    b = np.ascontiguousarray(x, F32).view(np.uint32).astype(np.int64)
    neg, e, m = b >> 31, (b >> 23) & 255, (b & 0x7FFFFF) | (1 << 23)
    mag = (m * EXP_LOG2E) >> np.clip(156 - e, 0, 63)
    mag[e == 0] = 0
    t = np.where(neg == 1, -mag, mag)
    j, r = (t >> 18) & 255, t & (2 ** 18 - 1)
    a = (r * EXP_LN2) >> 8
    d = a + (((a >> 10) ** 2) >> 17)
    T = EXP_TABLE[j]
    return T + (((T >> 4) * d) >> 32), e


def rounding_cases(rng):
    """(ties, carries): inputs whose ``M`` ends in exactly half an ulp of the 24-bit
    significand (half of them round up: odd significand), and inputs whose rounding
    carries the significand to 2^24 (``M >> 7`` all ones and rounded up)."""
    # ties: about one input in 128
    y = rng.uniform(-100, 88, 40_000).astype(F32)
    M, _ = golden_m(y)
    tie = (M & 127) == 64
    odd = tie & ((M >> 7) & 1 == 1)
    ties = np.concatenate([y[odd][:24], y[tie & ~odd][:24]])
    # carries need t = -1 or -2 mod 2^26 (j = 255, r = 2^18 - 1: the largest M, or r =
    # 2^18 - 2: a tie with an odd significand): t = -1, -2 for tiny negative x, and a few
    # floats beside -k ln 2
    near = (np.arange(-127, 129) * np.log(2)).astype(F32).view(np.uint32).astype(np.int64)
    tiny = (-(F32(2.0) ** np.arange(-27, -24, dtype=F32))).view(np.uint32).astype(np.int64)
    cand = np.concatenate([(near[:, None] + np.arange(-300, 301)).ravel(),
                           (tiny[:, None] + rng.integers(0, 1 << 23, (3, 200))).ravel()])
    cand = cand[(cand >= 0) & (cand < 1 << 32)].astype(np.uint32).view(F32)
    M, e = golden_m(cand)
    carry = (e < 134) & (M >> 7 == (1 << 24) - 1) & ((M & 127) >= 64)
    return ties, cand[carry]


def edge_inputs(rng):
    """Specials, range edges, subnormals, tiny values and the rounding cases."""
    sub = rng.integers(1, 1 << 23, 64, dtype=np.uint64).astype(np.uint32)
    subnormal = np.concatenate([sub, sub | (1 << 31), [1, 0x807FFFFF]]).astype(np.uint32).view(F32)
    ties, carries = rounding_cases(rng)
    # |x| >= 128 (e >= 134) from both sides of the boundary, the largest finite values,
    # the boundary of the t = 0 class (e = 99, 100), infinities and NaNs (quiet, signalling)
    bits = np.array([0x43000000, 0xC3000000, 0x42FFFFFF, 0xC2FFFFFF, 0x7F7FFFFF, 0xFF7FFFFF,
                     0x31FFFFFF, 0x32000000, 0xB1FFFFFF, 0xB2000000, 0x32800000, 0xB2800000,
                     0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000, 0x7F800001, 0x7FBFFFFF,
                     0xFFFFFFFF], np.uint32).view(F32)
    vals = np.array([0.0, -0.0, 1.0, -1.0, 88.72, 88.73, 88.7228, -87.33, -87.34, -87.3365, 127.99, -127.99,
                     128, -128, 0.5, -0.5, np.log(2), -np.log(2), 1e-45, -1e-45], F32)
    return np.concatenate([vals, bits, subnormal, ties, carries,
                           (rng.uniform(-1e-5, 1e-5, 300)).astype(F32)])


def simulate(xs, seed=0, bubble=0.3):
    """Run FExp on ``xs`` (float32) with random bubbles; returns the output bit patterns
    in order (fails on any ``o_valid`` in a wrong cycle or a missing result)."""
    bits = np.ascontiguousarray(xs, F32).view(np.uint32)
    return np.array(simulate_pipeline(FExp(), {"x": bits}, bubble=bubble, seed=seed)["y"], np.uint32)


def check(xs, ys):
    xs = np.ascontiguousarray(xs, F32)
    want = sfu.exp(xs).view(np.uint32)
    nan = np.isnan(xs)
    ynan = ((ys >> 23) & 0xFF == 0xFF) & (ys & 0x7FFFFF != 0)
    assert np.array_equal(ynan[nan], np.ones(nan.sum(), bool)), "a NaN input gave a non-NaN"
    bad = np.flatnonzero((ys != want) & ~nan)
    assert bad.size == 0, "FExp != sfu.exp at " + ", ".join(
        f"x={xs[i]!r} ({int(xs.view(np.uint32)[i]):#010x}): {int(ys[i]):#010x} != {int(want[i]):#010x}"
        for i in bad[:8])


def test_rounding_cases_exist():
    """The search finds what the edge test is meant to cover (else it would silently
    lose those cases): ties both ways, carries to 2^24, among them the largest ``M``."""
    ties, carries = rounding_cases(np.random.default_rng(1))
    assert len(ties) == 48 and len(carries) >= 100
    assert np.any(carries < -1.0)                    # beside -k ln 2, not only t = -1
    assert np.all(sfu.exp(carries) <= 1.0)
    M, _ = golden_m(carries)
    assert M.max() == golden_m(np.array([-2.0 ** -26], F32))[0][0]      # t = -1: j = 255, r max


def test_fexp_edges():
    rng = np.random.default_rng(1)
    xs = edge_inputs(rng)
    check(xs, simulate(xs, seed=1, bubble=0.5))


@pytest.mark.parametrize("seed", [2])
def test_fexp_random(seed):
    """Uniform in [-130, 130], tiny values and random bit patterns, interleaved."""
    rng = np.random.default_rng(seed)
    xs = np.concatenate([rng.uniform(-130, 130, 60_000).astype(F32),
                         (rng.uniform(-1e-5, 1e-5, 10_000)).astype(F32),
                         rng.integers(0, 1 << 32, 60_000, dtype=np.uint64).astype(np.uint32).view(F32)])
    rng.shuffle(xs)
    check(xs, simulate(xs, seed=seed, bubble=0.25))


def test_fexp_interface():
    dut = FExp()
    assert FExp.latency == dut.latency >= 1
    assert set(dut.signature.members) == {"i_valid", "x", "o_valid", "y"}
    rtlil.convert(dut, name="fexp")                  # elaborates without error


def verilated():
    """FExp under Verilator (sim/fp32_harness.Sweep: random bubbles with garbage on ``x``,
    exact ``o_valid`` timing; rebuilt when the design's Verilog changes)."""
    from flightllm.sim.fp32_harness import Sweep

    return Sweep("fexp", FExp)


@pytest.mark.slow_rtl
def test_fexp_sweep_verilator():
    """Millions of inputs under Verilator: random bit patterns, uniform in [-130, 130], a
    stride through all 2^32 patterns, and every float around the overflow and underflow
    edges. ``FLIGHTLLM_FEXP_SWEEP`` sets the inputs per part (default 2^20, about 15 s);
    ``FLIGHTLLM_FEXP_SWEEP=all`` runs every one of the 2^32 inputs instead (in chunks of
    2^22: about 30 minutes on one core)."""
    sweep = verilated()
    t0 = time.perf_counter()
    n = os.environ.get("FLIGHTLLM_FEXP_SWEEP", str(1 << 20))
    if n == "all":
        chunk = 1 << 22
        for c in range(0, 1 << 32, chunk):
            bits = np.arange(c, c + chunk, dtype=np.int64)
            ys = sweep.run({"x": bits}, bubble=0.01, seed=c + 1)["y"].astype(np.uint32)
            check(bits.astype(np.uint32).view(F32), ys)
        print(f"FExp: all 2^32 inputs in {time.perf_counter() - t0:.0f} s")
        return
    n = int(n)
    rng = np.random.default_rng(7)
    edge = lambda v: np.array([v], F32).view(np.uint32).astype(np.int64) + np.arange(-n // 2, n // 2)
    stride = (1 << 32) // n
    parts = [rng.integers(0, 1 << 32, n, dtype=np.int64),
             rng.uniform(-130, 130, n).astype(F32).view(np.uint32),
             np.arange(n, dtype=np.int64) * stride + rng.integers(0, stride, n),
             edge(88.7228), edge(-87.3365)]
    bits = np.concatenate([p.astype(np.int64) for p in parts]) & 0xFFFFFFFF
    ys = sweep.run({"x": bits}, bubble=0.1)["y"].astype(np.uint32)
    check(bits.astype(np.uint32).view(F32), ys)
    print(f"FExp sweep: {len(bits):,} inputs, Verilator {sweep.rate:,.0f} inputs/s, "
          f"total {time.perf_counter() - t0:.1f} s with the comparison")
