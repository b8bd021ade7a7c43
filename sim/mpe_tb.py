"""cocotb testbench of the matrix engine (flightllm_mpe), driven by sim/test_mpe.py.

Reads the cases from ``$FLIGHTLLM_STIMULI`` (see :mod:`flightllm.sim.cases`) and runs
them back to back in one simulation: activation writes, then the config beat, the
weight streams of every channel and the output drain together, with random stalls
(valid low on every input, ready low on the output). Every output bit is compared
with the golden result. Cycle counts (config accepted -> last result taken) go to
``$FLIGHTLLM_STIMULI`` with ``.cycles.json`` appended, for the efficiency bench.
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


def pack(layout, **fields) -> int:
    """Integer of a struct layout's bits from field values (LSB-first, as Amaranth)."""
    return pack_fields(layout, fields)


class Cycles:
    """Free-running cycle counter (rising edges)."""

    def __init__(self, clk):
        self.n = 0
        cocotb.start_soon(self._run(clk))

    async def _run(self, clk):
        while True:
            await RisingEdge(clk)
            self.n += 1


async def source(clk, bus, beats, p_stall, rng):
    """Drive ``beats`` on a valid/ready input; each cycle valid is low with ``p_stall``."""
    valid, ready, payload = bus
    i = 0
    while i < len(beats):
        await FallingEdge(clk)
        v = rng.random() >= p_stall
        valid.value = int(v)
        if v:
            payload.value = int(beats[i])
        await ReadOnly()
        if v and ready.value == 1:          # the transfer happens at the coming edge
            i += 1
    await FallingEdge(clk)
    valid.value = 0


async def sink(clk, bus, count, p_stall, rng, got, cycles, stamps):
    valid, ready, payload = bus
    while len(got) < count:
        await FallingEdge(clk)
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
    for name in ["cfg", "act"] + [f"{k}{c}" for c in range(g.C) for k in ("payload", "scales")]:
        getattr(dut, f"{name}__valid").value = 0
    dut.out__ready.value = 0
    dut.rst.value = 1
    for _ in range(3):
        await RisingEdge(dut.clk)
    await FallingEdge(dut.clk)
    dut.rst.value = 0

    report = []
    failures = []
    for i in range(meta["n"]):
        cfg, name = meta["cfg"][i], meta["names"][i]
        # 1. activations into the buffer
        act = [pack(act_l, addr=a) | (int.from_bytes(d.astype(np.int8).tobytes(), "little")
                                      << act_l["data"].offset)
               for a, d in zip(z[f"c{i}_act_addr"], z[f"c{i}_act_data"])]
        await source(dut.clk, bus(dut, "act"), act, stall, rng)
        # 2. config, weight streams and output drain together
        exp = z[f"c{i}_expected"]
        got, stamps = [], []
        cfg_stamp = []
        tasks = [cocotb.start_soon(source(dut.clk, bus(dut, f"payload{c}"), words_to_ints(z[f"c{i}_pay{c}"]), stall, rng))
                 for c in range(g.C)]
        tasks += [cocotb.start_soon(source(dut.clk, bus(dut, f"scales{c}"), words_to_ints(z[f"c{i}_scl{c}"]), stall, rng))
                  for c in range(g.C)]
        drain = cocotb.start_soon(sink(dut.clk, bus(dut, "out"), len(exp), stall, rng, got, cycles, stamps))
        await source(dut.clk, bus(dut, "cfg"), [pack(cfg_l, **cfg)], 0.0, rng)
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
                       "first_out": stamps[0] - cfg_stamp + 1, "kept_macs": meta["kept_macs"][i]})
        dut._log.info("%s: %d cycles%s", name, report[-1]["cycles"], " MISMATCH" if bad else "")
        # wait until the engine is idle before the next case rewrites the buffer
        while dut.busy.value == 1:
            await RisingEdge(dut.clk)
    with open(path + ".cycles.json", "w") as f:
        json.dump(report, f, indent=1)
    assert not failures, f"{len(failures)} case(s) mismatched; first: {failures[0]}"
