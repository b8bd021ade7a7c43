"""Instruction fetch (hw/fetch.py): prefetching, jumps dropping stale words, the program's end."""

import numpy as np
import pytest
from amaranth.sim import Simulator

from flightllm.hw.fetch import PREFETCH, Fetch
from flightllm.hw.isa import WORD_BYTES

BASE = 0x10000


def run(seed, n_words=300, jumps=8, p_r=0.6, p_ready=0.7, max_cycles=30000):
    rng = np.random.default_rng(seed)
    mem = [int(x) | int(y) << 64 for x, y in zip(rng.integers(0, 2 ** 63, n_words), rng.integers(0, 2 ** 63, n_words))]
    dut = Fetch()
    sim = Simulator(dut)
    sim.add_clock(1e-8)
    log = []                # ("jump", pc) and ("word", pc, word)
    stats = {"max_outstanding": 0}

    async def bench(ctx):
        ctx.set(dut.base, BASE)
        ctx.set(dut.prog_words, n_words)
        ars, beats = [], []
        inflight = 0
        jump_at = sorted(rng.choice(np.arange(5, 2500), jumps, replace=False).tolist())
        targets = [0] + [int(t) for t in rng.integers(0, n_words + 2, jumps)]
        ctx.set(dut.jump, 1)
        ctx.set(dut.jump_pc, 0)
        log.append(("jump", 0))
        await ctx.tick()
        ctx.set(dut.jump, 0)
        for cyc in range(max_cycles):
            if jump_at and cyc == jump_at[0]:
                jump_at.pop(0)
                t = targets.pop(1)
                ctx.set(dut.jump, 1)
                ctx.set(dut.jump_pc, t)
                log.append(("jump", t))
            else:
                ctx.set(dut.jump, 0)
            # AXI read subordinate: AR accepted at random, beats returned with gaps, in order
            ar_ready = rng.random() < 0.5
            ctx.set(dut.axi.arready, ar_ready)
            if ar_ready and ctx.get(dut.axi.arvalid):
                addr, n = ctx.get(dut.axi.araddr), ctx.get(dut.axi.arlen) + 1
                assert (addr - BASE) % WORD_BYTES == 0 and (addr - BASE) // WORD_BYTES + n <= n_words, (addr, n)
                assert addr // 4096 == (addr + n * WORD_BYTES - 1) // 4096, "burst crosses 4 KiB"
                ars.append((addr, n))
                inflight += n
                stats["max_outstanding"] = max(stats["max_outstanding"], inflight)
            if not beats and ars and rng.random() < 0.3:
                addr, n = ars.pop(0)
                beats = [((addr - BASE) // WORD_BYTES + i, i == n - 1) for i in range(n)]
            v = bool(beats) and rng.random() < p_r
            ctx.set(dut.axi.rvalid, v)
            if v:
                w, last = beats[0]
                ctx.set(dut.axi.rdata, mem[w])
                ctx.set(dut.axi.rlast, last)
                ctx.set(dut.axi.rresp, 0)
                assert ctx.get(dut.axi.rready)
                beats.pop(0)
                inflight -= 1
            rdy = rng.random() < p_ready
            ctx.set(dut.ins.ready, rdy)
            if rdy and ctx.get(dut.ins.valid):
                log.append(("word", ctx.get(dut.ins.payload.pc), ctx.get(dut.ins.payload.word)))
            await ctx.tick()
            if not jump_at and not beats and not ars and ctx.get(dut.idle) and cyc > 2600:
                break
        stats["idle"] = ctx.get(dut.idle)

    sim.add_testbench(bench)
    sim.run()
    return mem, log, stats


@pytest.mark.parametrize("seed", range(4))
def test_fetch_delivers_the_program_from_each_jump(seed):
    n = 300
    mem, log, stats = run(seed, n)
    assert stats["idle"]
    assert stats["max_outstanding"] <= PREFETCH
    expect = None
    segments = []
    for e in log:
        if e[0] == "jump":
            expect = e[1]
            segments.append([e[1], 0])
        else:
            _, pc, word = e
            assert pc == expect, f"after a jump to {segments[-1][0]}: pc {pc}, expected {expect}"
            assert word == mem[pc]
            expect += 1
            segments[-1][1] += 1
    # the last stream ran to the program's end, and no word past it was delivered
    start, got = segments[-1]
    assert got == max(n - start, 0)
