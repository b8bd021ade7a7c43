"""The KV cache layout: row writes agree with the packer, reads invert writes, bad input is refused."""

import numpy as np
import pytest

from flightllm.hw.formats import QTensor, WeightFormat, pack_tensor, value_bits
from flightllm.hw.kvcache import KV_GROUP, K, V, KvLayout
from flightllm.hw.params import get_preset


@pytest.mark.parametrize("preset", ["sim", "sim-mc", "u280-2ch"])
@pytest.mark.parametrize("fmt", ["int8r/32", "int4r/32"])
def test_row_writes_equal_the_packed_tensor(preset, fmt):
    """Writing every position one chunk at a time gives the bytes pack_tensor gives the whole
    head (K as positions x head_dim, V transposed), and reading returns the values."""
    p = get_preset(preset)
    wf = WeightFormat.parse(fmt)
    lay = KvLayout(2, 2, 64, 128, wf, p, base=256)
    rng = np.random.default_rng(7)
    chans = [np.zeros(lay.base + lay.channel_bytes, np.uint8) for _ in range(p.weight_channels)]
    vals = rng.integers(wf.qmin, wf.qmax + 1, (2, 128, 2, 64))          # kind, pos, head, d
    for kind in (K, V):
        for t0 in range(0, 128, 5):
            lay.write(chans, 1, kind, t0, vals[kind, t0:t0 + 5])
    for kind in (K, V):
        for g in range(2):
            head = vals[kind, :, g]
            qt = QTensor(wf, head if kind == K else head.T, None)
            pt = pack_tensor(qt, p)
            off = lay.head_offset(1, kind, g)
            for c in range(p.weight_channels):
                img = pt.channel_image(c)
                assert bytes(chans[c][off:off + len(img)]) == img, (kind, g, c)
            assert np.array_equal(lay.read(chans, 1, kind, g, 100), head[:100])
    assert not any(c[:lay.head_offset(1, K, 0)].any() for c in chans)          # layer 0 untouched


def test_value_bits_locate_every_value():
    p = get_preset("sim")
    rng = np.random.default_rng(2)
    for name in ("int8/32", "int4m/32", "int4r/32"):
        wf = WeightFormat.parse(name)
        n, k = 11, 64
        q = rng.integers(wf.qmin, wf.qmax + 1, (n, k))
        sc = None if wf.raw else np.full((n, 2), 0.5, np.float16)
        mn = np.full((n, 2), 0.25, np.float16) if wf.has_min else None
        pt = pack_tensor(QTensor(wf, q, sc, mn), p)
        r, c = np.meshgrid(np.arange(n), np.arange(k), indexing="ij")
        ch, bit = value_bits(wf, (n, k), p, r, c)
        for chan in range(p.weight_channels):
            m = ch == chan
            raw = np.unpackbits(np.frombuffer(pt.data[chan], np.uint8), bitorder="little")
            v = sum(raw[bit[m] + i].astype(np.int64) << i for i in range(wf.bits))
            if wf.qmin < 0:
                v = np.where(v >= 1 << (wf.bits - 1), v - (1 << wf.bits), v)
            assert np.array_equal(v, q[m]), name


def test_stream_sizes_and_bad_input():
    p = get_preset("u280")
    lay = KvLayout(1, 32, 128, 4096, WeightFormat.parse("int8r/32"), p)
    rec = p.chains // p.weight_channels * KV_GROUP                   # bytes of one int8 record
    assert lay.stream(K, 1) == (4, 4 * rec)                           # one row tile of 128 positions
    assert lay.stream(K, 129) == (8, 8 * rec)
    assert lay.stream(V, 1) == (1, rec) and lay.stream(V, 4096) == (128, 128 * rec)
    # every position's K and V bytes, over all channels, equal the INT8 cache it holds
    assert lay.stream(K, 4096)[1] * p.weight_channels == 4096 * 128
    with pytest.raises(ValueError, match="raw format"):
        KvLayout(1, 1, 64, 64, WeightFormat.parse("int8/32"), p)
    with pytest.raises(ValueError, match="multiples of 32"):
        KvLayout(1, 1, 48, 64, WeightFormat.parse("int8r/32"), p)
    chans = [np.zeros(lay.channel_bytes, np.uint8) for _ in range(p.weight_channels)]
    with pytest.raises(ValueError, match="beyond the cache"):
        lay.write(chans, 0, K, 4095, np.zeros((2, 32, 128), np.int8))
    with pytest.raises(ValueError, match="outside"):
        KvLayout(1, 1, 64, 64, WeightFormat.parse("int4r/32"), p).write(
            chans, 0, V, 0, np.full((1, 1, 64), 9))
