"""amaranth.sim checks of one SFU lane (hw/sfu_lane.py) against the micro-program
interpreter (hw/sfu_program.py), which the tests of test_sfu_program hold to the spec.

Every pass of a program runs through the lane element after element, with random
bubbles, and the passes follow each other without draining the pipeline (the
configuration travels with the elements); each output must equal the interpreter's
pass output bit for bit (any NaN for a NaN) exactly ``latency`` cycles after its input.
"""

import numpy as np
import pytest
from amaranth.sim import Simulator

from flightllm.hw.sfu_lane import LaneConfig, SfuLane
from flightllm.hw.sfu_program import Env, Pass, _pass, lane_words, program
from flightllm.runtime import sfu

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


def check(lane, passes, rng, p_bubble=0.3):
    """Drive ``passes`` = [(cfg, words, want)] back to back; compare every output."""
    sim = Simulator(lane)
    sim.add_clock(1e-8)
    feed = []
    for cfg, words, want in passes:
        n = words["a"].size
        for i in range(n):
            feed.append((cfg, {k: int(v.reshape(-1)[i]) for k, v in words.items()},
                         want.reshape(-1)[i]))
    sent, got = {}, []                                  # input cycle -> feed index; outputs

    async def bench(ctx):
        k, t = 0, 0
        limit = 4 * len(feed) + lane.latency + 100          # a hung lane fails, it does not hang
        while len(got) < len(feed):
            assert t < limit, f"only {len(got)} of {len(feed)} results after {t} cycles"
            if k < len(feed) and rng.random() >= p_bubble:
                cfg, w, _ = feed[k]
                ctx.set(lane.cfg, LaneConfig.const(cfg))
                for name, v in w.items():
                    ctx.set(lane.i_mask if name == "mask" else getattr(lane, name), v)
                ctx.set(lane.i_valid, 1)
                sent[t] = k
                k += 1
            else:
                ctx.set(lane.i_valid, 0)
            if ctx.get(lane.o_valid):
                got.append((sent.get(t - lane.latency), ctx.get(lane.o)))
            await ctx.tick()
            t += 1

    sim.add_testbench(bench)
    sim.run()
    for i, (k, o) in enumerate(got):
        assert k == i, f"result {i} came {'early' if k is None else 'for input %d' % k}: latency is not {lane.latency}"
        cfg, w, want = feed[i]
        if want.dtype == F32:
            ok = (np.isnan(want) and ((o >> 23) & 0xFF) == 0xFF and o & 0x7FFFFF) or \
                o == int(np.array(want, F32).view(np.uint32))
        else:
            ok = o == int(np.array(want).astype(np.uint8))
        assert ok, (i, w, hex(o), want)


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
    check(SfuLane(), passes, rng)
