"""Packed weight formats: names, GGUF blocks, binary16 -> fixed point, lane-domain records."""

import numpy as np
import pytest

from flightllm.hw import formats as F
from flightllm.hw.formats import (GGUF_NATIVE, QTensor, ScaleRangeError, WeightFormat, fit_scales,
                                  gguf_to_qtensor, nm_mask, pack_tensor, record_bits, scale_shift,
                                  to_fixed, unpack_tensor)
from flightllm.hw.params import DEFAULT_FORMATS
from flightllm.sim.cases import random_qtensor as sim_random_qtensor


class Geo:
    """The three parameters the packer reads (duck-typed HwParams)."""

    def __init__(self, chains, channels, lanes):
        self.chains, self.weight_channels, self.chain_len = chains, channels, lanes


def random_qtensor(rng, fmt, n, k):
    """The RTL testbenches' random tensors (every value, N:M mask, 16-binade scales)."""
    return sim_random_qtensor(fmt, n, k, rng, "wide")


@pytest.mark.parametrize("text", ["int8/32", "int4m/32", "int4-2:4/64", "int3/32", "int4-4:8/64"])
def test_names_round_trip(text):
    f = WeightFormat.parse(text)
    assert f.name == text and WeightFormat.parse(f.name) == f


def test_name_errors():
    with pytest.raises(ValueError, match="expected intB"):
        WeightFormat.parse("q4_1")
    with pytest.raises(ValueError, match="names no group size"):
        WeightFormat.parse("int4")
    with pytest.raises(ValueError, match="a min needs a dense format"):
        WeightFormat.parse("int4m-2:4/64")
    with pytest.raises(ValueError, match="fewer than 8 bits"):
        WeightFormat.parse("int8m/32")
    assert WeightFormat(4, 4, 4, 32) == WeightFormat(4, 1, 1, 32)        # every dense N:N is one format


def test_bits_per_weight_match_gguf_blocks():
    # Q8_0 is 34 bytes per 32 weights, Q4_0 18, Q4_1 20
    for t, (fmt, bb) in GGUF_NATIVE.items():
        assert fmt.bits_per_weight() == bb * 8 / 32, t


@pytest.mark.parametrize("fmt", sorted(set(DEFAULT_FORMATS) | {"int4k/32"}))
@pytest.mark.parametrize("geo", [(4, 2, 8), (8, 2, 16), (8, 2, 32), (16, 4, 32)])
def test_pack_unpack_round_trip(fmt, geo):
    rng = np.random.default_rng(hash((fmt, geo)) & 0xFFFF)
    f = WeightFormat.parse(fmt)
    chains, channels, lanes = geo
    qt = random_qtensor(rng, f, 13, 4 * f.group_size)          # ragged last row tile
    pt = pack_tensor(qt, Geo(*geo))
    assert pt.channels == channels and all(len(d) == pt.region_bytes for d in pt.data)
    assert pt.record_bits % F.RECORD_ALIGN_BITS == 0
    back = unpack_tensor(pt)
    assert np.array_equal(back.q, qt.q)
    assert np.array_equal(back.scale.view(np.uint16), qt.scale.view(np.uint16))
    if f.has_min:
        assert np.array_equal(back.min.view(np.uint8), qt.min.view(np.uint8))
    if not f.dense:
        assert np.array_equal(back.mask, qt.mask)
    if f.two_level:
        assert (back.tensor_scale, back.tensor_min) == (qt.tensor_scale, qt.tensor_min)
    assert np.array_equal(back.dequantize(), qt.dequantize())


def test_golden_bytes_int4():
    """One row, one group of int4/32 on one 32-lane chain, checked by hand."""
    q = np.array([[-8, -7, 1, 2] + [0] * 27 + [7]])
    qt = QTensor(WeightFormat.parse("int4/32"), q, np.array([[1.5]], np.float16))
    pt = pack_tensor(qt, Geo(1, 1, 32))
    b = pt.data[0]
    assert pt.record_bits == 192 and len(b) == 24                 # 128 value bits + 16 scale, padded to 64s
    assert b[0] == 0x98 and b[1] == 0x21 and b[15] == 0x70        # -8 = 0x8, -7 = 0x9; 1, 2; 7 high nibble
    assert b[16:18] == np.float16(1.5).tobytes() and b[18:] == bytes(6)


def test_golden_bytes_sparse_lane_major():
    """2:4 on a 2-chain unit: values of chain 0 then chain 1, then indices, then scales."""
    f = WeightFormat.parse("int4-2:4/8")
    q = np.array([[1, 0, 2, 0, 0, 3, 0, 4], [0, 5, 6, 0, 7, 0, 0, -1]])
    mask = q != 0
    qt = QTensor(f, q, np.array([[1.0], [2.0]], np.float16), None, mask)
    pt = pack_tensor(qt, Geo(2, 1, 4))                              # kept 4 = one beat of 4 lanes
    b = pt.data[0]
    assert b[0:4] == bytes([0x21, 0x43, 0x65, 0xF7])              # values: row 0 (1,2,3,4), row 1 (5,6,7,-1)
    # indices (2 bits): row 0 (0,2,1,3), row 1 (1,2,0,3) -> 0b11_01_10_00, 0b11_00_10_01
    assert b[4] == 0b11011000 and b[5] == 0b11001001
    assert b[6:8] == np.float16(1.0).tobytes() and b[8:10] == np.float16(2.0).tobytes()


def test_two_level_golden_bytes_and_fixed_point():
    """int4k/32: the tensor header, then values, 8-bit sub-scales and sub-mins; S = D * sc exactly."""
    f = WeightFormat.parse("int4k/32")
    assert f.bits_per_weight() == 4.5 and f.header_bits == 64
    q = np.zeros((2, 32), int)
    q[0, 0], q[1, 31] = 15, 9
    qt = QTensor(f, q, np.array([[3], [200]]), np.array([[255], [0]]), None, np.float16(0.75), np.float16(-2 ** -6))
    pt = pack_tensor(qt, Geo(2, 1, 32))
    b = pt.data[0]
    assert pt.record_bits == 320 and len(b) == 8 + 40                      # 2x128 value bits + 4 bytes, padded
    assert b[0:2] == np.float16(0.75).tobytes() and b[2:4] == np.float16(-2 ** -6).tobytes() and b[4:8] == bytes(4)
    assert b[8] == 0x0F and b[8 + 31] == 0x90                               # row 0 lane 0; row 1 lane 31
    assert list(b[8 + 32:8 + 36]) == [3, 200, 255, 0]                       # sc of rows 0, 1; sm of rows 0, 1
    shift, S, M = qt.fixed()
    d, mn = qt.group_scales()
    assert np.array_equal(np.ldexp(S.astype(np.float64), -shift), d.astype(np.float64))
    assert np.array_equal(np.ldexp(M.astype(np.float64), -shift), mn.astype(np.float64))
    assert np.abs(S).max() < 1 << 26 and np.abs(M).max() < 1 << 26
    with pytest.raises(ScaleRangeError, match="holds 8"):                   # D and Mn 2**9 apart
        QTensor(f, q, np.ones((2, 1)), np.ones((2, 1)), None, np.float16(1.0), np.float16(2 ** -9)).fixed()


@pytest.mark.parametrize("gtype", sorted(GGUF_NATIVE))
def test_gguf_blocks_dequantize_like_gguf(gtype):
    """Our QTensor of a GGUF tensor dequantizes bit for bit like gguf-py's own dequantizer."""
    import gguf
    from gguf.quants import dequantize, quantize

    rng = np.random.default_rng(7)
    w = (rng.standard_normal((6, 128)) * 0.1).astype(np.float32)
    w[0, :32] += 0.5                                                  # a block with an offset (min)
    t = gguf.GGMLQuantizationType[gtype]
    raw = np.asarray(quantize(w, t)).view(np.uint8)
    qt = gguf_to_qtensor(gtype, raw, w.shape)
    assert qt.fmt == GGUF_NATIVE[gtype][0]
    ref = np.asarray(dequantize(raw, t), np.float32).reshape(w.shape)
    assert np.array_equal(qt.dequantize(), ref)


def test_gguf_bad_size():
    with pytest.raises(ValueError, match="does not hold a 2x64 tensor"):
        gguf_to_qtensor("Q4_1", np.zeros(41, np.uint8), (2, 64))
    with pytest.raises(ValueError, match="no native format"):
        gguf_to_qtensor("Q6_K", np.zeros(210, np.uint8), (1, 256))


def test_fixed_point_is_exact():
    rng = np.random.default_rng(3)
    # binary16 values spanning 16 binades, subnormals included
    for lo in (-24, -14, -6):
        v = rng.choice([-1, 1], 4000) * (1 + rng.random(4000)) * 2.0 ** rng.integers(lo, lo + 15, 4000)
        a = v.astype(np.float16)
        sh = scale_shift(a)
        fx = to_fixed(a, sh)
        assert np.abs(fx).max() < 1 << (F.SCALE_FIXED_BITS - 1)
        assert np.array_equal(np.ldexp(fx.astype(np.float64), -sh), a.astype(np.float64))


def test_scale_range_errors():
    with pytest.raises(ScaleRangeError, match="17 binades"):
        scale_shift(np.array([2.0 ** -10, 2.0 ** 6], np.float16))
    with pytest.raises(ScaleRangeError, match="infinite or NaN"):
        scale_shift(np.array([np.inf], np.float16))
    qt = QTensor(WeightFormat.parse("int8/32"), np.ones((1, 64)), np.array([[2.0 ** -12, 2.0 ** 8]], np.float16))
    with pytest.raises(ScaleRangeError):
        pack_tensor(qt, Geo(1, 1, 32))


def test_fit_scales_bounds_the_span():
    s = fit_scales(np.array([[1.0, 2.0 ** -20, -2.0 ** -17, 0.0, 3e-3]]))
    assert scale_shift(s) >= 0                                     # no ScaleRangeError
    assert s[0, 3] == 0 and s[0, 2] < 0 and s[0, 4] == np.float16(3e-3)


def test_qtensor_rejects_bad_values():
    f = WeightFormat.parse("int4m/32")
    with pytest.raises(ValueError, match=r"outside \[0, 15\]"):
        QTensor(f, -np.ones((1, 32)), np.ones((1, 1)), np.zeros((1, 1)))
    with pytest.raises(ValueError, match="needs per-group mins"):
        QTensor(f, np.ones((1, 32)), np.ones((1, 1)))
    g = WeightFormat.parse("int4-2:4/32")
    bad = np.zeros((1, 32), bool)
    bad[0, :3] = True
    with pytest.raises(ValueError, match="keeps 3 of window 0 in row 0"):
        QTensor(g, np.zeros((1, 32)), np.ones((1, 1)), None, bad)


def test_record_needs_whole_beats():
    with pytest.raises(ValueError, match="not a multiple of chain_len 32"):
        record_bits(WeightFormat.parse("int4-2:4/32"), 4, 32)


@pytest.mark.model
def test_smollm2_scales_fit_the_fixed_point():
    """Every binary16 scale and min of the shipped model is exact in the hardware's fixed point."""
    from flightllm.compiler.compress import model_tensor_names
    from flightllm.compiler.gguf_import import GGUFError, default_model_path, native_tensors, load_gguf

    try:
        path = default_model_path()
    except GGUFError as e:
        pytest.skip(str(e))
    import gguf
    names = [t.name for t in gguf.GGUFReader(str(path)).tensors if t.name.endswith(".weight")
             and gguf.GGMLQuantizationType(t.tensor_type).name in GGUF_NATIVE]
    spans = []
    for name, qt in native_tensors(path, names).items():
        sh = scale_shift(qt.scale, qt.min)
        for a in (qt.scale, qt.min):
            if a is not None:
                fx = to_fixed(a, sh)
                assert np.array_equal(np.ldexp(fx.astype(np.float64), -sh), a.astype(np.float64)), name
        e = (qt.scale.view(np.uint16) >> 10) & 31
        spans.append(int(e[e > 0].max() - e[e > 0].min()))
    assert len(names) == 211 and max(spans) <= F.SCALE_EXP_SPAN
