"""amaranth.sim driver for the fixed-latency pipelines (``i_valid`` ... ``o_valid`` exactly
``latency`` cycles later, no ready): the FP units, FExp, the SFU lane, the MPE output
conversion."""

from __future__ import annotations

import random

from amaranth.hdl import Shape, Value
from amaranth.lib.wiring import Out
from amaranth.sim import Simulator

__all__ = ["ports", "garbage", "simulate_pipeline"]

_CONTROL = ("i_valid", "i_ready", "o_valid", "o_ready")


def ports(dut):
    """``(inputs, outputs)``: the data ports of ``dut``'s signature as ``(name, shape)``."""
    m = dut.signature.members
    data = lambda flow: [(n, Shape.cast(m[n].shape)) for n in m if (m[n].flow == Out) == flow and n not in _CONTROL]
    return data(False), data(True)


def garbage(rnd, shape):
    v = rnd.getrandbits(shape.width)
    return v - (1 << shape.width) if shape.signed and v >> (shape.width - 1) else v


def simulate_pipeline(dut, ops, bubble=0.3, seed=0):
    """Issue ``ops`` (input port name -> int values, one per operation; every data input)
    one a cycle with random bubbles (garbage on the data ports); every ``o_valid`` must
    come exactly ``latency`` cycles after its operation's issue. Returns output port name
    -> values in order. The run is bounded: a hung unit fails."""
    ins, outs = ports(dut)
    n = len(ops[ins[0][0]])
    rnd = random.Random(seed)
    issue, cyc = [], 0
    for _ in range(n):
        while rnd.random() < bubble:
            cyc += 1
        issue.append(cyc)
        cyc += 1
    issued = dict(zip(issue, range(n)))
    cols = {name: [int(v) for v in ops[name]] for name, _ in ins}
    got = {name: [] for name, _ in outs}
    seen = []
    # struct-typed ports (data.View) as their plain bits: values and garbage are ints
    port = {name: Value.cast(getattr(dut, name)) for name, _ in ins + outs}

    async def bench(ctx):
        for c in range(issue[-1] + dut.latency + 3):
            i = issued.get(c)
            ctx.set(dut.i_valid, i is not None)
            for name, shape in ins:
                ctx.set(port[name], cols[name][i] if i is not None else garbage(rnd, shape))
            if ctx.get(dut.o_valid):
                seen.append(c)
                for name, _ in outs:
                    got[name].append(ctx.get(port[name]))
            await ctx.tick()

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    assert seen == [c + dut.latency for c in issue], "o_valid not exactly `latency` cycles after each operation"
    return got
