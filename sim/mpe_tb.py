"""cocotb testbench of the matrix engine (flightllm_mpe), driven by sim/test_mpe.py.

Reads the cases from ``$FLIGHTLLM_STIMULI`` (see :mod:`flightllm.sim.cases`) and runs
them back to back in one simulation: per case the activation writes (with their group
factors), then the config beat, every channel's record stream and the output drain
together, with random stalls (valid low on every input, ready low on the output). Every
output bit is compared with the golden result. Every wait is bounded in cycles, so a
hung design fails instead of hanging. Cycle counts (config accepted -> last result taken)
go to ``$FLIGHTLLM_STIMULI`` with ``.cycles.json`` appended, for the efficiency bench.
"""

from __future__ import annotations

import json
import os
import random

import cocotb
import numpy as np
from cocotb.clock import Clock
from cocotb.triggers import FallingEdge, ReadOnly, RisingEdge

from flightllm.hw.geometry import EngineGeometry
from flightllm.hw.mpe import act_layout, mpe_cfg_layout, pack_fields
from flightllm.hw.params import HwParams

PERIOD_NS = 10


class Hang(AssertionError):
    """A stream did not complete within its cycle budget."""


class Cycles:
    """Free-running cycle counter (rising edges)."""

    def __init__(self, clk):
        self.n = 0
        cocotb.start_soon(self._run(clk))

    async def _run(self, clk):
        while True:
            await RisingEdge(clk)
            self.n += 1


async def source(clk, bus, beats, p_stall, rng, deadline, cycles, what):
    """Drive ``beats`` on a valid/ready input; each cycle valid is low with ``p_stall``."""
    valid, ready, payload = bus
    i = 0
    while i < len(beats):
        await FallingEdge(clk)
        if cycles.n > deadline:
            valid.value = 0
            raise Hang(f"{what}: {i} of {len(beats)} beats taken by cycle {cycles.n}")
        v = rng.random() >= p_stall
        valid.value = int(v)
        if v:
            payload.value = int(beats[i])
        await ReadOnly()
        if v and ready.value == 1:          # the transfer happens at the coming edge
            i += 1
    await FallingEdge(clk)
    valid.value = 0


async def sink(clk, bus, count, p_stall, rng, got, stamps, deadline, cycles):
    """Take ``count`` beats from a valid/ready output; ready is low with ``p_stall``."""
    valid, ready, payload = bus
    while len(got) < count:
        await FallingEdge(clk)
        if cycles.n > deadline:
            ready.value = 0
            raise Hang(f"out: {len(got)} of {count} results by cycle {cycles.n}")
        r = rng.random() >= p_stall
        ready.value = int(r)
        await ReadOnly()
        if r and valid.value == 1:
            got.append(payload.value.to_unsigned())
            stamps.append(cycles.n)
    await FallingEdge(clk)
    ready.value = 0


def bus(dut, name):
    return (getattr(dut, f"{name}__valid"), getattr(dut, f"{name}__ready"),
            getattr(dut, f"{name}__payload"))


def words_to_ints(arr: np.ndarray):
    """(count, bytes) uint8 words -> little-endian ints."""
    return [int.from_bytes(row.tobytes(), "little") for row in arr]


def act_beats(layout, addr, data, u):
    """Activation writes as integers of :func:`act_layout`."""
    off = layout["data"].offset
    return [pack_fields(layout, {"addr": int(a), "u": int(f)})
            | (int.from_bytes(d.astype(np.int8).tobytes(), "little") << off)
            for a, d, f in zip(addr, data, u)]


@cocotb.test()
async def mpe_cases(dut):
    """Every case of the stimuli file, bit-exact against the golden model."""
    path = os.environ["FLIGHTLLM_STIMULI"]
    z = np.load(path)
    params = HwParams.from_dict(json.loads(z["params"].tobytes().decode()))
    meta = json.loads(z["meta"].tobytes().decode())
    g = EngineGeometry(params)
    rng = random.Random(meta["seed"])
    stall = meta["stall"]
    cfg_l, act_l = mpe_cfg_layout(g), act_layout(g)

    cocotb.start_soon(Clock(dut.clk, PERIOD_NS, unit="ns").start())
    cycles = Cycles(dut.clk)
    for name in ["cfg", "act"] + [f"words{c}" for c in range(g.C)]:
        getattr(dut, f"{name}__valid").value = 0
    dut.out__ready.value = 0
    dut.rst.value = 1
    for _ in range(3):
        await RisingEdge(dut.clk)
    await FallingEdge(dut.clk)
    dut.rst.value = 0

    report, failures = [], []
    for i in range(meta["n"]):
        cfg, name = meta["cfg"][i], meta["names"][i]
        exp = z[f"c{i}_expected"]
        chan = [words_to_ints(z[f"c{i}_words{c}"]) for c in range(g.C)]
        # a generous budget: every stream at the stall rate, plus fill and drain
        budget = int((max(len(w) for w in chan) + len(exp) + cfg["records"] * 16 * cfg["tokens"])
                     / (1 - stall) ** 2) + 2000
        # 1. activations into the buffer
        act = act_beats(act_l, z[f"c{i}_act_addr"], z[f"c{i}_act_data"], z[f"c{i}_act_u"])
        await source(dut.clk, bus(dut, "act"), act, stall, rng, cycles.n + 4 * len(act) + 100, cycles, "act")
        # 2. config, weight streams and output drain together
        deadline = cycles.n + budget
        got, stamps = [], []
        tasks = [cocotb.start_soon(source(dut.clk, bus(dut, f"words{c}"), chan[c], stall, rng, deadline,
                                          cycles, f"words{c}"))
                 for c in range(g.C)]
        drain = cocotb.start_soon(sink(dut.clk, bus(dut, "out"), len(exp), stall, rng, got, stamps,
                                       deadline, cycles))
        await source(dut.clk, bus(dut, "cfg"), [pack_fields(cfg_l, cfg)], stall, rng, deadline, cycles, "cfg")
        cfg_stamp = cycles.n
        for t in tasks:
            await t
        await drain
        mask = (1 << g.acc_w) - 1
        bad = None
        for b, (word, row) in enumerate(zip(got, exp)):
            vals = [((word >> (g.acc_w * j)) & mask) for j in range(g.R)]
            vals = [v - (1 << g.acc_w) if v >> (g.acc_w - 1) else v for v in vals]
            if vals != [int(v) for v in row]:
                bad = f"{name}: output beat {b} (tile {b // cfg['tokens']}, token {b % cfg['tokens']}): " \
                      f"got {vals} expected {[int(v) for v in row]}"
                break
        if bad:
            dut._log.error(bad)
            failures.append(bad)
        report.append({"name": name, "cfg": cfg, "cycles": stamps[-1] - cfg_stamp + 1,
                       "first_out": stamps[0] - cfg_stamp + 1, "kept_macs": meta["kept_macs"][i],
                       "words": max(len(w) for w in chan)})
        dut._log.info("%s: %d cycles%s", name, report[-1]["cycles"], " MISMATCH" if bad else "")
        # wait until the engine is idle before the next case rewrites the buffer
        idle_by = cycles.n + 1000
        while dut.busy.value == 1:
            await RisingEdge(dut.clk)
            if cycles.n > idle_by:
                raise Hang(f"{name}: busy for 1000 cycles after its last result")
    with open(path + ".cycles.json", "w") as f:
        json.dump(report, f, indent=1)
    assert not failures, f"{len(failures)} case(s) mismatched; first: {failures[0]}"
