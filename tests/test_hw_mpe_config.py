"""Host-side MPE config packer: counts against what the packer writes, packing, validation."""

import numpy as np
import pytest

from flightllm.hw import formats
from flightllm.hw.formats import E0_MAX, WeightFormat
from flightllm.hw.geometry import EngineGeometry
from flightllm.hw.mpe import act_layout, mpe_cfg_layout, mpe_config, pack_fields
from flightllm.hw.params import get_preset
from flightllm.sim.cases import channel_words, random_qtensor

G = EngineGeometry(get_preset("sim"))
INT4 = WeightFormat.parse("int4/32")


@pytest.mark.parametrize("preset", ["sim", "sim-mc", "u280-2ch"])
def test_counts_match_the_packed_streams(preset):
    """records / words / tiles / groups / stride of every format (the raw KV formats
    included) against the bytes formats.pack_tensor actually writes and the words the
    testbench streams."""
    geom = EngineGeometry(get_preset(preset))
    rng = np.random.default_rng(0)
    assert any(wf.raw for wf in geom.engine_formats())
    for wf in geom.engine_formats():
        for n, groups in ((1, 1), (geom.R + 1, 3), (3 * geom.R, 2)):
            k = groups * wf.group_size
            qt = random_qtensor(wf, n, k, rng)
            pt = formats.pack_tensor(qt, geom.params)
            c = mpe_config(geom, wf, n, k, tokens=1, act_base=0, shift=pt.shift)
            for ch in range(geom.C):
                data = bytes(pt.data[ch])
                assert len(channel_words(data, geom.W)) == c["words"], (wf.name, n, k, ch)
                assert len(data) * 8 == wf.header_bits + c["records"] * pt.record_bits, (wf.name, n, k, ch)
            assert (c["tiles"] - 1) * geom.R < n <= c["tiles"] * geom.R
            assert c["groups"] * wf.group_size == k
            assert c["fmt"] == geom.engine_formats().index(wf)
            assert c["e0"] == E0_MAX - pt.shift and (pt.shift == 0 or not wf.raw)


def test_stride_separates_tokens():
    """Token vectors at act_base + t * stride never overlap and start on a bank boundary."""
    for k in (32, 64, 96, 128, 192, 4096):
        c = mpe_config(G, INT4, 4, k, tokens=2)
        assert c["stride"] >= k // G.L and c["stride"] % G.act_banks == 0
        assert c["stride"] < k // G.L + G.act_banks


def test_e0_is_the_scale_exponent_origin():
    """A binary16 of exponent field E becomes sig << (E - e0) (formats.to_fixed)."""
    for shift in (0, 7, E0_MAX):
        e0 = mpe_config(G, INT4, 4, 32, shift=shift)["e0"]
        for e in range(max(1, e0), min(31, e0 + 16)):
            h = np.array([(e << 10) | 0x155], np.uint16).view(np.float16)
            assert formats.to_fixed(h, shift)[0] == (0x555 << (e - e0))


def test_pack_fields_matches_amaranth_layout():
    """pack_fields gives the integer Amaranth's own layout constant has."""
    lay = mpe_cfg_layout(G)
    c = mpe_config(G, WeightFormat.parse("int4-2:4/64"), 13, 192, tokens=3, act_base=8, shift=9)
    assert pack_fields(lay, c) == lay.const(c).as_value().value
    a = act_layout(G)
    f = {"addr": 77, "u": 255}
    assert pack_fields(a, f) == a.const(f).as_value().value


@pytest.mark.parametrize("kw, msg", [
    (dict(tokens=G.tokens_max + 1), r"tokens must be in 1\.\.mm_tokens \(16\), got 17"),
    (dict(tokens=0), r"tokens must be in 1\.\.mm_tokens"),
    (dict(act_base=1), r"act_base \(1\) must be a non-negative multiple of the bank count 2"),
    (dict(act_base=-2), r"act_base \(-2\) must be a non-negative multiple"),
    (dict(n_rows=0), r"N \(n_rows\) must be in 1\.\."),
    (dict(n_rows=(1 << 20) * G.R), r"N \(n_rows\) must be in 1\.\.4194300 \(1048575 row tiles of 4\)"),
    (dict(n_in=0), r"K \(n_in\) must be a positive multiple of the group size 32 of int4/32, got 0"),
    (dict(n_in=100), r"K \(n_in\) must be a positive multiple of the group size 32"),
    (dict(n_in=G.params.act_buf_depth + 32), r"K \(n_in\) = 8224 exceeds the activation buffer \(8192 elements\)"),
    (dict(n_in=4096, tokens=3), r"activations end at word 1536, past the buffer's 1024 words"),
    (dict(shift=E0_MAX + 1), r"shift must be in 0\.\.25"),
    (dict(shift=-1), r"shift must be in 0\.\.25"),
    (dict(n_rows=4.0), r"n_rows must be an int, not float"),
    (dict(tokens=True), r"tokens must be an int, not bool"),
])
def test_rejects_out_of_range(kw, msg):
    args = dict(n_rows=8, n_in=128, tokens=1, act_base=0, shift=0) | kw
    with pytest.raises(ValueError, match=msg):
        mpe_config(G, INT4, **args)


def test_rejects_unsupported_format_and_bad_fields():
    with pytest.raises(ValueError, match="int4-1:4/32 is not supported by preset 'sim'"):
        mpe_config(G, WeightFormat.parse("int4-1:4/32"), 8, 128)
    with pytest.raises(ValueError, match=r"int2r/32 is not supported by preset 'sim' .*kv_formats int8r/32, int4r/32"):
        mpe_config(G, WeightFormat.parse("int2r/32"), 8, 128)
    with pytest.raises(ValueError, match="a raw format has no scales: shift must be 0, got 3"):
        mpe_config(G, WeightFormat.parse("int8r/32"), 8, 128, shift=3)
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['n_rows'\]"):
        pack_fields(mpe_cfg_layout(G), {"n_rows": 3})
    with pytest.raises(ValueError, match="field tokens = 1024 does not fit 5 bits"):
        pack_fields(mpe_cfg_layout(G), {"tokens": 1 << 10})
