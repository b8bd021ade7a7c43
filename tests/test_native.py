"""The golden model's native MPE kernel (runtime/native.py) against the oracle
(runtime/arith.mpe_reference) on every weight format a build accepts."""

import zlib

import numpy as np
import pytest

from flightllm.hw.formats import SCALE_FIXED_BITS, WeightFormat
from flightllm.hw.params import DEFAULT_FORMATS, DEFAULT_KV_FORMATS
from flightllm.runtime import native, sfu
from flightllm.runtime.arith import mpe_reference
from flightllm.runtime.native import mpe_acc, mpe_float, pack_mpe

SMAX = (1 << (SCALE_FIXED_BITS - 1)) - 1


def _tensor(rng, fmt: WeightFormat, n: int, k: int, extreme: bool):
    """Values of ``fmt`` (pruned N:M positions 0), 27-bit scales and mins."""
    lo, hi = fmt.qmin, fmt.qmax
    q = np.full((n, k), hi) if extreme else rng.integers(lo, hi + 1, (n, k))
    if not fmt.dense:                                    # keep n_keep of every m
        blocks = q.reshape(n, k // fmt.m, fmt.m)
        order = rng.permuted(np.tile(np.arange(fmt.m), (n, k // fmt.m, 1)), axis=-1)
        blocks[order >= fmt.n_keep] = 0
    ng = k // fmt.group_size
    S = np.full((n, ng), SMAX) if extreme else rng.integers(-SMAX, SMAX + 1, (n, ng))
    M = None
    if fmt.has_min:
        M = np.full((n, ng), -SMAX) if extreme else rng.integers(-SMAX, SMAX + 1, (n, ng))
    return q.astype(np.int8), S, M


@pytest.mark.parametrize("name", DEFAULT_FORMATS + DEFAULT_KV_FORMATS)
@pytest.mark.parametrize("extreme", [False, True], ids=["random", "extreme"])
def test_kernel_equals_oracle(name, extreme):
    fmt = WeightFormat.parse(name)
    rng = np.random.default_rng(zlib.crc32(f"{name} {extreme}".encode()))
    n, k = 300, 2 * fmt.group_size                         # 300 rows: a partial second block
    q, S, M = _tensor(rng, fmt, n, k, extreme)
    w = pack_mpe(q, S, M, fmt.group_size)
    assert w.nibbles == (fmt.bits <= 4)                   # the packed width is the format's
    for t in (1, 3):
        x = np.full((t, k), -127) if extreme else rng.integers(-127, 128, (t, k))
        u = np.full((t, k // fmt.group_size), 255) if extreme else rng.integers(0, 256, (t, k // fmt.group_size))
        got = mpe_acc(w, x, u)
        ref = mpe_reference(q, S, M, x, u, fmt.group_size)
        assert got.dtype == np.int64 and got.shape == (t, n)
        assert np.array_equal(got, ref)
        a = rng.random(t).astype(np.float32) * 1e-3                     # the float32 output, fused
        assert _same(mpe_float(w, x, u, a, 7), sfu.mpe_to_float(ref, a, 7))


def test_threads_split_the_rows_exactly(monkeypatch):
    """A product split over threads (block ranges) gives every row once, in place."""
    monkeypatch.setattr(native, "_SPLIT_MACS", 0)
    monkeypatch.setenv("FLIGHTLLM_THREADS", "3")
    rng = np.random.default_rng(2)
    fmt = WeightFormat.parse("int4m/32")
    q, S, M = _tensor(rng, fmt, 1000, 64, False)
    x, u = rng.integers(-127, 128, (2, 64)), rng.integers(0, 256, (2, 2))
    w, ref = pack_mpe(q, S, M, 32), mpe_reference(q, S, M, x, u, 32)
    assert np.array_equal(mpe_acc(w, x, u), ref)
    a = np.array([0.5, 3e-5], np.float32)
    assert _same(mpe_float(w, x, u, a, 3), sfu.mpe_to_float(ref, a, 3))


def test_wide_groups_take_the_int64_path():
    """Groups so large that u * psum overflows int32 (int8, G = 1024) use 64-bit products."""
    g = 1024
    q = np.full((3, 2 * g), -128)
    q[1] = 127
    S, M = np.full((3, 2), SMAX), None
    x, u = np.full((2, 2 * g), -127), np.full((2, 2), 255)
    w = pack_mpe(q, S, M, g)
    assert not w.narrow
    assert np.array_equal(mpe_acc(w, x, u), mpe_reference(q, S, M, x, u, g))
    assert pack_mpe(q, np.full((3, 64), SMAX), M, 32).narrow


def test_narrow_register_wraps():
    g = 32
    q, S = np.full((1, g), 127), np.full((1, 1), SMAX)
    x, u = np.full((1, g), 127), np.full((1, 1), 255)
    w = pack_mpe(q, S, None, g)
    for bits in (40, 48):
        ref = mpe_reference(q, S, None, x, u, g, bits)
        assert abs(int(ref[0, 0])) < 1 << (bits - 1)
        assert np.array_equal(mpe_acc(w, x, u, bits), ref)
        assert _same(mpe_float(w, x, u, np.ones(1, np.float32), 0, bits), sfu.mpe_to_float(ref, np.ones(1), 0))


def test_bad_shapes_are_named(monkeypatch):
    q = np.zeros((4, 64), np.int8)
    with pytest.raises(ValueError, match="scales"):
        pack_mpe(q, np.zeros((4, 3)), None, 32)
    with pytest.raises(ValueError, match="32 bits"):
        pack_mpe(q, np.full((4, 2), 1 << 40), None, 32)
    w = pack_mpe(q, np.zeros((4, 2)), None, 32)
    with pytest.raises(ValueError, match="activations"):
        mpe_acc(w, np.zeros((1, 32)), np.zeros((1, 1)))
    monkeypatch.setenv("FLIGHTLLM_THREADS", "0")
    with pytest.raises(ValueError, match="FLIGHTLLM_THREADS"):
        native.threads()


# -- SFU kernels: bit for bit the numpy specification of runtime/sfu.py -------------------
def _special(rng, shape):
    """float32 of every magnitude class: subnormal to huge, NaN, +-inf, +-0."""
    x = (rng.standard_normal(shape) * rng.choice([1e-40, 1e-3, 1.0, 30.0, 200.0, 1e30], shape)).astype(np.float32)
    m = rng.random(shape)
    x[m < 0.01] = np.nan
    x[(m >= 0.01) & (m < 0.02)] = np.inf
    x[(m >= 0.02) & (m < 0.03)] = -np.inf
    x[(m >= 0.03) & (m < 0.05)] = 0.0
    x[(m >= 0.05) & (m < 0.06)] = -0.0
    return x


def _same(a, b):
    """Equal bit patterns (NaN payloads and the sign of zero included), dtype and shape."""
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.fixture
def quiet():
    with np.errstate(all="ignore"):      # the numpy spec's own NaN/inf warnings
        yield


def test_exp_on_every_exponent(quiet):
    rng = np.random.default_rng(3)
    bits = np.arange(0, 1 << 32, 4099, dtype=np.uint64).astype(np.uint32).view(np.float32)
    for x in (bits, np.linspace(-130, 130, 100_001, dtype=np.float32), _special(rng, (40, 64))):
        assert _same(native.exp(x), sfu.exp(x))


@pytest.mark.parametrize("lanes,slots", [(16, 1), (12, 2), (64, 4)])
def test_lane_sum_order(quiet, lanes, slots):
    rng = np.random.default_rng(lanes + slots)
    for n in (1, 31, 96, 200, 577):
        for x in (_special(rng, (5, n)), rng.standard_normal((5, n)).astype(np.float32) * 1e4):
            assert _same(native.lane_sum(x, lanes, slots), sfu.lane_sum(x, lanes, slots))


def test_requantize_groups(quiet):
    rng = np.random.default_rng(4)
    for _ in range(4):
        x = _special(rng, (9, 128))
        x[3] = 0.0
        x[4, :64] = -0.0
        x[5] = rng.standard_normal(128).astype(np.float32) * 1e-39     # subnormal row: 255/amax overflows
        for a, b in zip(native.requantize_groups(x, 32), sfu.requantize_groups(x, 32)):
            assert _same(a, b)
        y = rng.standard_normal((3, 576)).astype(np.float32)
        for a, b in zip(native.requantize_groups(y, 32), sfu.requantize_groups(y, 32)):
            assert _same(a, b)
    with pytest.raises(ValueError, match="group 32"):
        native.requantize_groups(np.zeros((1, 40), np.float32), 32)


@pytest.mark.parametrize("window", [0, 1])
def test_softmax_probs(quiet, window):
    rng = np.random.default_rng(5 + window)
    for t, rep, n in ((1, 3, 64), (4, 3, 160), (2, 1, 32)):
        valid = np.arange(t) + n - t + 1 - int(rng.integers(0, 5))
        mask = sfu.attention_mask(valid, n, sink=1 if window else 0, window=window)
        vs = np.abs(rng.standard_normal(n)).astype(np.float32)
        for s in ((rng.standard_normal((t, rep, n)) * 10).astype(np.float32), _special(rng, (t, rep, n))):
            for a, b in zip(native.softmax_probs(s, mask, vs, 0.125, 16, 2),
                            sfu.softmax_probs(s, mask, vs, 0.125, 16, 2)):
                assert _same(a, b)


def test_rmsnorm_silu_requantize(quiet):
    rng = np.random.default_rng(6)
    for n in (64, 576, 224):
        x = _special(rng, (4, n))
        x[1] = rng.standard_normal(n).astype(np.float32)
        x[2] = 0.0
        w = rng.standard_normal(n).astype(np.float32)
        for lanes, slots in ((16, 1), (12, 2)):
            assert _same(native.rmsnorm(x, w, 1e-5, lanes, slots), sfu.rmsnorm(x, w, 1e-5, lanes, slots))
        y = _special(rng, (4, n))
        assert _same(native.silu_mul(x, y), sfu.silu_mul(x, y))
        for seg in (None, 32, n // 2):
            for qmax in (0.0, 7.0):
                for a, b in zip(native.requantize(x, seg, qmax), sfu.requantize(x, seg, qmax)):
                    assert _same(a, b)


def test_attention_kernels_equal_the_spec():
    """QK and PV: exact integer sums, then sfu.qk_scores / sfu.mpe_to_float; stale cache
    rows past the attended length must not count."""
    rng = np.random.default_rng(7)
    T, H, hd, cap, n, h0, rep = 3, 6, 64, 96, 70, 2, 3
    q = rng.integers(-127, 128, (T, H * hd)).astype(np.int8)
    qs = rng.random((T, H)).astype(np.float32)
    K = rng.integers(-127, 128, (cap, hd)).astype(np.int8)            # rows >= n: stale data
    ks = rng.random(n).astype(np.float32) * 1e-3
    S = np.full((T, H, cap), 7.0, np.float32)
    native.qk_into(q, qs, h0, rep, hd, K, n, ks, S)
    acc = q.reshape(T, H, hd)[:, h0:h0 + rep].astype(np.int64) @ K[:n].astype(np.int64).T
    assert _same(S[:, h0:h0 + rep, :n], sfu.qk_scores(acc, qs[:, h0:h0 + rep], ks))
    assert (S[:, :h0] == 7.0).all() and (S[:, h0:h0 + rep, n:] == 7.0).all()

    pq = rng.integers(-127, 128, (T, H, cap)).astype(np.int8)
    u = rng.integers(0, 256, (T, H, cap // 32)).astype(np.uint8)
    sc = rng.random((T, H)).astype(np.float32)
    V = rng.integers(-127, 128, (cap, hd)).astype(np.int8)
    out = np.full((T, H * hd), 7.0, np.float32)
    native.pv_into(pq, u, sc, h0, rep, V, n, out)
    n32 = -(-n // 32) * 32
    Vz = np.zeros((n32, hd), np.int64)
    Vz[:n] = V[:n]
    ps = np.einsum("thgk,gkd->thgd", pq[:, h0:h0 + rep, :n32].astype(np.int64).reshape(T, rep, n32 // 32, 32),
                   Vz.reshape(n32 // 32, 32, hd))
    acc = np.einsum("thgd,thg->thd", ps, u[:, h0:h0 + rep, :n32 // 32].astype(np.int64))
    want = sfu.mpe_to_float(acc.reshape(T * rep, hd), sc[:, h0:h0 + rep].reshape(-1), 0).reshape(T, rep * hd)
    assert _same(out[:, h0 * hd:(h0 + rep) * hd], want)
    assert (out[:, :h0 * hd] == 7.0).all()
