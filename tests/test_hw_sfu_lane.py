"""amaranth.sim checks of one SFU lane (hw/sfu_lane.py) against the micro-program
interpreter (hw/sfu_program.py), which the tests of test_sfu_program hold to the spec.

Every pass of a program runs through the lane element after element, with random
bubbles, and the passes follow each other without draining the pipeline (the
configuration travels with the elements); each output must equal the interpreter's
pass output bit for bit (any NaN for a NaN) exactly ``latency`` cycles after its input.
"""

import numpy as np
import pytest

from flightllm.hw.sfu_lane import LaneConfig, SfuLane
from flightllm.hw.sfu_program import Env, Pass, _pass, lane_words, program
from flightllm.runtime import sfu
from flightllm.sim.pipeline import simulate_pipeline

F32 = np.float32


def cases(rng):
    def rows(r, n):
        x = (rng.standard_normal((r, n)) * 10 ** rng.uniform(-2, 2, (r, 1))).astype(F32)
        x[0, :6] = [0, -0.0, np.inf, np.nan, 1e-40, -3.4e38]
        return x

    x, y = rows(2, 32), rows(2, 32)
    mask = sfu.attention_mask(np.array([20, 27]), 32)
    vs = rng.uniform(0.001, 0.05, 32).astype(F32)
    qs, ss = sfu.requantize(x, 16)
    return [
        ("SILU_MUL", program("SILU_MUL", 32), Env(x=x, s2=y)),
        ("RMSNORM", program("RMSNORM", 32, eps=1e-5), Env(x=x, tab=y[0])),
        ("ROPE", program("ROPE", 32, seg=8), Env(x=x, tab=np.tile(y[0, :8], 4))),
        ("QUANTG", program("QUANTG", 32, group=16), Env(x=x)),
        ("DEQUANT", program("DEQUANT", 32, seg=16), Env(x=qs, vecs={"scale": ss})),
        ("SOFTMAX", program("SOFTMAX", 32, c=0.125), Env(x=rows(2, 32), s2=vs, mask=mask)),
    ]


def check(lane, passes, seed, bubble=0.3):
    """Drive ``passes`` = [(cfg, words, want)] back to back with random bubbles; compare
    every output (the configuration changes while earlier passes are in flight)."""
    cols = {}
    for cfg, words, _ in passes:
        n = words["a"].size
        cols.setdefault("cfg", []).extend([LaneConfig.const(cfg).as_bits()] * n)
        for k, v in words.items():
            cols.setdefault("i_mask" if k == "mask" else k, []).extend(v.reshape(-1).tolist())
    got = simulate_pipeline(lane, cols, bubble=bubble, seed=seed)["o"]
    want = [x for _, _, w in passes for x in w.reshape(-1)]
    assert len(got) == len(want)
    for i, (o, x) in enumerate(zip(got, want)):
        if x.dtype == F32:
            ok = (np.isnan(x) and ((o >> 23) & 0xFF) == 0xFF and o & 0x7FFFFF) or \
                o == int(np.array(x, F32).view(np.uint32))
        else:
            ok = o == int(np.array(x).astype(np.uint8))
        assert ok, (i, hex(o), x)


@pytest.mark.parametrize("name", ["SILU_MUL", "RMSNORM", "ROPE", "QUANTG", "DEQUANT", "SOFTMAX"])
def test_lane_runs_every_pass_of(name):
    rng = np.random.default_rng(11)
    _, steps, env = next(c for c in cases(rng) if c[0] == name)
    env.lanes, env.slots = 8, 4
    passes = []
    for s in steps:
        if isinstance(s, Pass):
            cfg, words = lane_words(s, env)
            passes.append((cfg, words, _pass(s, env)))
        else:
            env.regs[s.dst] = np.sqrt(np.asarray(env.regs[s.src], F32))
    check(SfuLane(), passes, seed=11)
