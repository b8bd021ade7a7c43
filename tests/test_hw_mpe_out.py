"""amaranth.sim checks of the MPE output conversion (hw/mpe_out.py) against runtime/sfu.py:
``mpe_to_float`` (MV/MM with a tensor's shift, PV) and ``qk_scores``, bit for bit."""

import numpy as np
import pytest

from flightllm.hw.mpe_out import MpeOutLane, pow2_bits
from flightllm.runtime import sfu
from flightllm.sim.pipeline import simulate_pipeline

F32 = np.float32


def bits(v):
    return int(np.array(v, F32).view(np.uint32))


def run(lane, items):
    """items: (acc, s1_bits, s2_bits) -> output bits, with random bubbles and the latency checked."""
    acc, s1, s2 = zip(*items)
    return simulate_pipeline(lane, {"acc": acc, "s1": s1, "s2": s2}, seed=len(items))["y"]


def test_pow2_bits_is_ldexp():
    """2^k's bits, and a float32 product with it rounds exactly as ldexp (subnormals too):
    why the sequencer may form ldexp(A, -shift) on an FMul."""
    rng = np.random.default_rng(3)
    a = (rng.uniform(1, 2, 20000) * 2.0 ** rng.integers(-126, 127, 20000)).astype(F32)
    for k in range(-149, 128):
        assert pow2_bits(k) == bits(np.ldexp(F32(1), k))
    for k in range(0, 150, 7):
        p = np.array(pow2_bits(-k), np.uint32).view(F32)
        with np.errstate(under="ignore"):
            np.testing.assert_array_equal((a * p).view(np.uint32), np.ldexp(a, -k).astype(F32).view(np.uint32))
    with pytest.raises(ValueError, match="2\\^-150 is not a float32"):
        pow2_bits(-150)


def test_mv_pv_and_qk_conversions():
    rng = np.random.default_rng(4)
    n = 400
    acc = np.concatenate([rng.integers(-2 ** 62, 2 ** 62, n // 2), rng.integers(-2 ** 20, 2 ** 20, n // 2)])
    acc[:6] = [0, -1, 2 ** 63 - 1, -2 ** 63, 2 ** 24 + 1, -(2 ** 53) - 3]
    A = (rng.uniform(0.5, 2, n) * 10.0 ** rng.integers(-30, 10, n)).astype(F32)
    A[6:9] = [0, 1e-40, np.inf]
    shift = rng.integers(0, 40, n)
    ks = rng.uniform(-0.1, 0.1, n).astype(F32)
    lane = MpeOutLane(64)
    # MV/MM: the sequencer's s1 = A * 2^-shift on an FMul = float32(ldexp(A, -shift))
    s1 = np.array([np.ldexp(a, -int(s)) for a, s in zip(A, shift)], F32)
    got = run(lane, [(int(a), bits(s), bits(1.0)) for a, s in zip(acc, s1)])
    want = [sfu.mpe_to_float(np.array([[a]], np.int64), np.array([x], F32), int(s))[0, 0]
            for a, x, s in zip(acc, A, shift)]
    assert got == [bits(w) if not np.isnan(w) else got[i] for i, w in enumerate(want)]
    # QK: (float32(acc) * q_scale) * k_scale
    got = run(lane, [(int(a), bits(q), bits(k)) for a, q, k in zip(acc, A, ks)])
    for i, (a, q, k) in enumerate(zip(acc, A, ks)):
        with np.errstate(invalid="ignore"):
            w = sfu.qk_scores(np.array([[[a]]]), np.array([[q]]), np.array([k]))[0, 0, 0]
        assert got[i] == bits(w) or (np.isnan(w) and (got[i] >> 23) & 0xFF == 0xFF), (i, hex(got[i]), w)
