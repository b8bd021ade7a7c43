"""Host-side MPE config packer: counts, packing and validation of operation fields."""

import pytest

from flightllm.hw.formats import WeightFormat
from flightllm.hw.geometry import EngineGeometry
from flightllm.hw.mpe import mpe_cfg_layout, mpe_config, pack_fields
from flightllm.hw.params import get_preset

G = EngineGeometry(get_preset("sim"))
INT4 = WeightFormat(4, 1, 1, G.G)


def test_counts_and_pack():
    c = mpe_config(G, INT4, 13, 192, tokens=3, act_base=8)
    assert c["tiles"] == 4 and c["groups"] == 3 and c["stride"] == G.act_stride(192)
    assert (c["pay_words"], c["scale_words"]) == G.stream_words(INT4, 13, 192)
    v = pack_fields(mpe_cfg_layout(G), c)
    lay = mpe_cfg_layout(G)
    for name, f in lay:
        w = f.shape.width if hasattr(f.shape, "width") else f.width
        assert (v >> f.offset) & ((1 << w) - 1) == c[name]


@pytest.mark.parametrize("kw, msg", [
    (dict(tokens=G.tokens_max + 1), r"tokens must be in 1\.\.mm_tokens \(16\), got 17"),
    (dict(tokens=0), r"tokens must be in 1\.\.mm_tokens"),
    (dict(act_base=2), r"act_base \(2\) must be a non-negative multiple of the bank count 4"),
    (dict(act_base=-4), r"act_base \(-4\) must be a non-negative multiple"),
    (dict(n_rows=0), r"N \(n_rows\) must be in 1\.\."),
    (dict(n_rows=(1 << 20) * G.R), r"N \(n_rows\) must be in"),
    (dict(n_in=0), r"K \(n_in\) must be a positive multiple of group_size 64, got 0"),
    (dict(n_in=100), r"K \(n_in\) must be a positive multiple of group_size 64, got 100"),
    (dict(n_in=G.params.act_buf_depth + 64), r"K \(n_in\) = 8256 exceeds the activation buffer"),
    (dict(n_in=4096, tokens=3), r"activations end at word .* past the buffer's 1024 words"),
    (dict(n_rows=4.0), r"n_rows must be an int, not float"),
])
def test_rejects_out_of_range(kw, msg):
    args = dict(n_rows=8, n_in=128, tokens=1, act_base=0) | kw
    with pytest.raises(ValueError, match=msg):
        mpe_config(G, INT4, **args)


def test_rejects_unsupported_format_and_bad_fields():
    with pytest.raises(ValueError, match="not supported"):
        mpe_config(G, WeightFormat(4, 3, 4, G.G), 8, 128)
    with pytest.raises(ValueError, match="unknown field"):
        pack_fields(mpe_cfg_layout(G), {"n_rows": 3})
    with pytest.raises(ValueError, match="does not fit"):
        pack_fields(mpe_cfg_layout(G), {"tokens": 1 << 10})
