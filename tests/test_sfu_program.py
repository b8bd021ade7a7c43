"""The SFU's micro-programs (hw/sfu_program.py) reproduce the specification (runtime/sfu.py)
bit for bit on every opcode: the passes the RTL will run are the spec's arithmetic."""

import numpy as np
import pytest

from flightllm.hw.sfu_program import Env, Pass, program, run
from flightllm.runtime import sfu

F32 = np.float32
LANES, SLOTS = 8, 4


SPECIAL = np.array([0, -0.0, np.inf, -np.inf, np.nan, 3.4e38, -3.4e38, 1.1754944e-38, 1e-45, -1e-45, 1e-40,
                    1, -1, 2.5, 65504, 7], F32)


def rows(rng, r, n, spread=3.0, special=False):
    """Random rows; ``special``: the first rows hold the special values, all zeros, all
    equal, an inf among normals, a NaN among normals and subnormals only."""
    x = (rng.standard_normal((r, n)) * 10 ** rng.uniform(-spread, spread, (r, 1))).astype(F32)
    if special:
        x[0] = np.resize(rng.permutation(SPECIAL), n)
        x[1], x[2] = 0, F32(-3.25)
        x[3, rng.integers(n)] = np.inf
        x[4, rng.integers(n)] = np.nan
        x[5] = rng.uniform(-1, 1, n).astype(F32) * F32(1e-39)
    return x


def same(a, b):
    """Bit-identical (any NaN equals any NaN)."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    if a.dtype.kind == "f":
        bits = np.dtype(f"u{a.dtype.itemsize}")
        ok = (a.view(bits) == b.view(bits)) | (np.isnan(a) & np.isnan(b))
        assert ok.all(), np.argwhere(~ok)[:5]
    else:
        np.testing.assert_array_equal(a, b)


def env(x, **kw):
    return Env(x=x, lanes=LANES, slots=SLOTS, **kw)


@pytest.fixture
def rng():
    return np.random.default_rng(7)


def test_add_fill_silu(rng):
    x, y = rows(rng, 3, 64), rows(rng, 3, 64)
    same(run(program("ADD", 64), env(x, s2=y)).dst, x + y)
    same(run(program("FILL", 64, imm=-2.5), env(x)).dst, np.full((3, 64), -2.5, F32))
    same(run(program("SILU_MUL", 64), env(x, s2=y)).dst, sfu.silu_mul(x, y))


@pytest.mark.parametrize("n", [8, 64, 576, 1000])
def test_rmsnorm(rng, n):
    x, w = rows(rng, 3, n), rows(rng, 1, n, 1)[0]
    same(run(program("RMSNORM", n, eps=1e-5), env(x, tab=w)).dst, sfu.rmsnorm(x, w, 1e-5, LANES, SLOTS))


def test_rope(rng):
    hd, heads, r = 16, 3, 2
    x = rows(rng, r, hd * heads)
    pos = np.array([5, 6])
    cos, sin = rng.uniform(-1, 1, (2, r, hd // 2)).astype(F32)
    tab = np.empty((r, hd), F32)                             # the table row of each position: c, s per pair
    tab[:, 0::2], tab[:, 1::2] = cos, sin
    want = sfu.rope(x.reshape(r, heads, hd), cos, sin).reshape(r, -1)
    got = run(program("ROPE", hd * heads, seg=hd), env(x, tab=np.tile(tab, heads))).dst
    same(got, want)
    assert pos.size == r


@pytest.mark.parametrize("seg,qmax", [(16, 127), (64, 127), (16, 7)])
def test_quant(rng, seg, qmax):
    x = rows(rng, 3, 64)
    x[1, :seg] = 0                                           # an all-zero segment: scale 0, q 0
    e = run(program("QUANT", 64, seg=seg, qmax=qmax if qmax != 127 else 0), env(x))
    q, s = sfu.requantize(x, seg, qmax if qmax != 127 else 0)
    same(e.dst, q)
    same(e.scale, s)


@pytest.mark.parametrize("g", [32, 64])
def test_quantg_and_dequant(rng, g):
    x = rows(rng, 3, 256)
    x[2] = 0
    x[1, :g] = 0
    e = run(program("QUANTG", 256, group=g), env(x))
    q, a, u = sfu.requantize_groups(x, g)
    same(e.dst, q)
    same(e.scale[:, 0], a)
    same(e.factor, u)
    d = run(program("DEQUANT", 256, seg=256, group=g), env(q, vecs={"u": u, "scale": a[:, None]}))
    same(d.dst, sfu.dequantize(q, a[:, None], u))
    qs, ss = sfu.requantize(x, 32)
    d = run(program("DEQUANT", 256, seg=32), env(qs, vecs={"scale": ss}))
    same(d.dst, sfu.dequantize(qs, ss))


def test_argmax(rng):
    x = rows(rng, 2, 300)
    x[1, 17] = x[1, 200] = 1e30                              # ties: the lowest index
    assert run(program("ARGMAX", 300), env(x)).argmax.tolist() == sfu.argmax(x).tolist()


@pytest.mark.parametrize("n,valid,sink,window", [(64, 40, 0, 0), (256, 256, 0, 0), (512, 500, 1, 2)])
def test_softmax(rng, n, valid, sink, window):
    s = (rng.standard_normal((1, 3, n)) * 4).astype(F32)     # one token row, 3 query heads of a kv head
    vs = rng.uniform(0.001, 0.05, n).astype(F32)
    mask = sfu.attention_mask(np.array([valid]), n, sink, window)
    c = sfu.score_scale(64)
    q, scale, u = sfu.softmax_probs(s, mask, vs, c, LANES, SLOTS)
    e = run(program("SOFTMAX", n, c=c), env(s[0], s2=vs, mask=np.repeat(mask, 3, axis=0)))
    same(e.dst, q[0])
    same(e.scale[:, 0], scale[0])
    same(e.factor, u[0])


def test_every_pass_is_a_pass_of_known_length():
    for op, kw in [("ADD", {}), ("RMSNORM", {}), ("QUANT", {"seg": 32}), ("QUANTG", {"group": 32}),
                   ("SOFTMAX", {"c": 0.125}), ("ROPE", {"seg": 64})]:
        for s in program(op, 128, **kw):
            assert not isinstance(s, Pass) or s.length in (1, 4, 128), (op, s)
    with pytest.raises(ValueError, match="unknown opcode 'NOPE'"):
        program("NOPE", 8)
    with pytest.raises(ValueError, match="group 0 does not divide the row of 64"):
        program("QUANTG", 64)
    with pytest.raises(ValueError, match="seg 24 does not divide the row of 64"):
        program("QUANT", 64, seg=24)


@pytest.mark.parametrize("op", ["ADD", "SILU_MUL", "RMSNORM", "QUANT", "QUANTG", "QUANT4", "ARGMAX", "ROPE"])
def test_special_values(rng, op):
    """Zeros, all-equal rows, +-inf, NaN, the extreme normals, subnormals, -0.0."""
    n = 64
    x, y = rows(rng, 8, n, special=True), rows(rng, 8, n, special=True)[::-1].copy()
    if op in ("ADD", "SILU_MUL"):
        e = run(program(op, n), env(x, s2=y))
        same(e.dst, x + y if op == "ADD" else sfu.silu_mul(x, y))
    elif op == "RMSNORM":
        same(run(program(op, n, eps=1e-5), env(x, tab=y[0])).dst, sfu.rmsnorm(x, y[0], 1e-5, LANES, SLOTS))
    elif op in ("QUANT", "QUANT4"):
        qmax = 7 if op == "QUANT4" else 0
        e = run(program("QUANT", n, seg=16, qmax=qmax), env(x))
        q, s = sfu.requantize(x, 16, qmax)
        same(e.dst, q)
        same(e.scale, s)
    elif op == "QUANTG":
        e = run(program(op, n, group=32), env(x))
        q, a, u = sfu.requantize_groups(x, 32)
        same(e.dst, q)
        same(e.scale[:, 0], a)
        same(e.factor, u)
    elif op == "ARGMAX":
        assert run(program(op, n), env(x)).argmax.tolist() == sfu.argmax(x).tolist()
    else:
        tab = np.resize(y[0], 16)
        want = sfu.rope(x.reshape(8, 4, 16), np.tile(tab[0::2], (8, 1)), np.tile(tab[1::2], (8, 1)))
        same(run(program(op, n, seg=16), env(x, tab=np.tile(tab, 4))).dst, want.reshape(8, n))


def test_softmax_special_values(rng):
    n = 64
    s = rows(rng, 8, n, spread=1, special=True)[None]                # rows of one token x 8 heads
    vs = rng.uniform(0, 0.05, n).astype(F32)
    vs[:3] = [0, np.inf, 1e-40]
    mask = sfu.attention_mask(np.array([50]), n)
    q, scale, u = sfu.softmax_probs(s, mask, vs, 0.125, LANES, SLOTS)
    e = run(program("SOFTMAX", n, c=0.125), env(s[0], s2=vs, mask=np.repeat(mask, 8, axis=0)))
    same(e.dst, q[0])
    same(e.scale[:, 0], scale[0])
    same(e.factor, u[0])
