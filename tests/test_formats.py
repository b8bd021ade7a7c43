"""Packed weight formats: bit layout, round trips, striping, quantization bounds."""

import numpy as np
import pytest

from flightllm.hw.formats import (SCALE_BITS, WeightFormat, pack_blocks, pack_tensor,
                                  quantize_groups, stripe_order, unpack_blocks, unpack_tensor)
from flightllm.hw.params import PRESETS

FORMATS = ["int8", "int4", "int3", "int2", "int8-2:4", "int4-2:4", "int4-1:4", "int4-4:8",
           "int4-2:8", "int4-8:16", "int3-2:4", "int2-2:4"]


def random_nm_mask(rng, shape, n_keep, m):
    n, k = shape
    score = rng.random((n, k // m, m))
    keep = np.argsort(score, axis=2)[..., :n_keep]
    mask = np.zeros(score.shape, bool)
    np.put_along_axis(mask, keep, True, axis=2)
    return mask.reshape(n, k)


def test_golden_bytes_hand_checked():
    # int4-2:4, G=8: values 1,-2,3,-7 at positions 0,3 | 5,6 of the two 4-windows.
    fmt = WeightFormat(4, 2, 4, group_size=8)
    q = np.array([[1, 0, 0, -2, 0, 3, -7, 0]], dtype=np.int8)
    mask = q != 0
    pt = pack_tensor(q, np.array([[0x1234]], np.uint16), 5, fmt, chains=1, channels=1, mask=mask)
    # values LSB first: 0x1 | 0xE<<4, 0x3 | 0x9<<4; indices 0,3,1,2 -> 0 | 3<<2 | 1<<4 | 2<<6
    assert pt.payload[0] == bytes([0xE1, 0x93, 0x9C])
    assert pt.scales[0] == bytes([0x34, 0x12])
    q2, s2, sh = unpack_tensor(pt)
    assert (q2 == q).all() and s2[0, 0] == 0x1234 and sh == 5


@pytest.mark.parametrize("name", FORMATS)
def test_block_round_trip_extremes(name):
    fmt = WeightFormat.parse(name)
    rng = np.random.default_rng(1)
    vals = rng.integers(-fmt.qmax, fmt.qmax + 1, size=(5, 3, fmt.kept_per_group)).astype(np.int8)
    vals[0, 0, :] = fmt.qmax
    vals[0, 1, :] = -fmt.qmax
    idx = rng.integers(0, fmt.m, size=vals.shape).astype(np.uint8) if not fmt.dense else np.zeros_like(vals, np.uint8)
    blocks = pack_blocks(vals, idx, fmt)
    assert blocks.shape[-1] == fmt.block_bytes
    v2, i2 = unpack_blocks(blocks, fmt)
    assert (v2 == vals).all() and (i2 == idx).all()


def test_pack_rejects_out_of_range_value():
    fmt = WeightFormat.parse("int4")
    with pytest.raises(ValueError, match=r"outside \+-7"):
        pack_blocks(np.full((1, 64), -8, np.int8), np.zeros((1, 64), np.uint8), fmt)


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("chains,channels", [(1, 1), (4, 2), (8, 8), (16, 4)])
def test_tensor_round_trip(name, chains, channels):
    fmt = WeightFormat.parse(name)
    rng = np.random.default_rng(hash((name, chains, channels)) % 2**32)
    n, k = 13, 192                      # 13 rows: exercises row-tile padding
    w = rng.standard_normal((n, k)).astype(np.float32)
    mask = None if fmt.dense else random_nm_mask(rng, (n, k), fmt.n_keep, fmt.m)
    q, s, sh = quantize_groups(w, fmt, mask)
    pt = pack_tensor(q, s, sh, fmt, chains, channels, mask)
    assert len(pt.payload) == channels
    assert len({len(p) for p in pt.payload}) == 1          # equal bytes per channel
    q2, s2, sh2 = unpack_tensor(pt)
    assert (q2 == q).all() and (s2 == s).all() and sh2 == sh
    if mask is not None:
        assert ((q2 != 0) <= mask).all()


def test_sparse_pack_needs_mask_and_exact_n():
    fmt = WeightFormat.parse("int4-2:4")
    q = np.zeros((1, 64), np.int8)
    with pytest.raises(ValueError, match="needs its mask"):
        pack_tensor(q, np.zeros((1, 1), np.uint16), 0, fmt, 1, 1)
    bad = np.zeros((1, 64), bool)
    bad[0, :3] = True
    with pytest.raises(ValueError, match="window 0 in row 0"):
        pack_tensor(q, np.zeros((1, 1), np.uint16), 0, fmt, 1, 1, mask=bad)


def test_stripe_order_covers_every_block_once():
    order = stripe_order(n_rows=10, n_groups=3, chains=4, channels=2)
    rows_p = 12
    seen = {(int(r), int(g)) for c in range(2) for r, g in order[c]}
    assert seen == {(r, g) for r in range(rows_p) for g in range(3)}
    # channel 0 serves rows 0 and 2 of each tile, group-major inside a tile
    assert [tuple(x) for x in order[0][:4]] == [(0, 0), (2, 0), (0, 1), (2, 1)]


@pytest.mark.parametrize("bits", [8, 4, 3])
def test_quantization_error_bound(bits):
    fmt = WeightFormat.parse(f"int{bits}")
    rng = np.random.default_rng(bits)
    w = (rng.standard_normal((32, 256)) * rng.uniform(0.01, 3, size=(32, 1))).astype(np.float32)
    q, s, sh = quantize_groups(w, fmt)
    scale = np.repeat(s.astype(np.float64) * 2.0 ** -sh, 64, axis=1)
    err = np.abs(q * scale - w)
    # rounding error is at most half a step (plus the scale mantissa's own rounding)
    assert (err <= 0.5 * scale * (1 + 1e-3) + 1e-7).all()
    assert s.max() >= 1 << (SCALE_BITS - 1)                 # the shift uses the mantissa range
    assert np.abs(q).max() <= fmt.qmax


@pytest.mark.parametrize("text,bits,n,m,bpw", [("int8", 8, 1, 1, 8.25), ("int4-2:4", 4, 2, 4, 3.25),
                                               ("int4-1:4", 4, 1, 4, 1.75), ("int3", 3, 1, 1, 3.25)])
def test_parse_and_cost(text, bits, n, m, bpw):
    fmt = WeightFormat.parse(text)
    assert (fmt.bits, fmt.n_keep, fmt.m) == (bits, n, m)
    assert fmt.name == text
    assert fmt.bits_per_weight() == bpw


@pytest.mark.parametrize("text", ["int9", "int4-3:4x", "fp8", "int4-2:3"])
def test_parse_rejects(text):
    with pytest.raises(ValueError):
        WeightFormat.parse(text)


def test_group_size_check():
    with pytest.raises(ValueError, match="not a multiple of the quant group size 64"):
        quantize_groups(np.zeros((2, 100), np.float32), WeightFormat.parse("int8"))


def test_presets_serialise():
    from flightllm.hw.params import HwParams

    for p in PRESETS.values():
        assert HwParams.from_dict(p.to_dict()) == p
    with pytest.raises(ValueError, match="chain_len"):
        HwParams(name="bad", clock_mhz=1, chains=4, chain_len=6, dsp_group=4)
