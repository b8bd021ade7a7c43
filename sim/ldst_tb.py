"""cocotb testbench of the LD / ST space transfers (flightllm_ldst, sim/ldst_top.py), driven by
sim/test_ldst.py.

Reads a case from ``$FLIGHTLLM_STIMULI`` (:func:`flightllm.sim.test_ldst.save_case`). One
cocotbext-axi ``AxiRam`` per kv channel (``m_axi_kv<i>``), loaded with the case's channel
images, random pauses on every channel. The buffer regions are loaded through the host
port; then the LD and ST entries go in at once (random gaps on both issue streams) and
every ``done`` is counted; then the channel memories and the buffer regions (read back
through the host port) must equal the case's. Last, one bad entry per engine: each
faults with its pc, takes nothing more, and ``abort_units`` clears it. Every wait is
bounded in cycles.
"""

from __future__ import annotations

import json
import os
import random

import cocotb
import numpy as np
from cocotb.clock import Clock
from cocotb.triggers import FallingEdge, ReadOnly, RisingEdge, gather, with_timeout
from cocotbext.axi import AxiBus, AxiRam

from flightllm.hw.buffers import buffer_map, port_signature
from flightllm.hw.control import entry_layout
from flightllm.hw.params import HwParams
from flightllm.sim.tb import pauses

PERIOD_NS = 10
BUDGET = 20000          #: cycles for each phase



def _pack(layout, **fields):
    v = 0
    for name, x in fields.items():
        v |= int(x) << layout[name].offset
    return v


class Bench:
    def __init__(self, dut, z, meta):
        self.dut, self.z, self.meta = dut, z, meta
        self.p = HwParams.from_dict(meta["params"])
        self.rng = random.Random(meta["seed"])
        self.el = entry_layout()
        h = port_signature(self.p).members
        self.wl = h["wr"].signature.members["payload"].shape
        self.rl = h["rd_req"].signature.members["payload"].shape
        self.regions = buffer_map(self.p)
        self.t = 0

    async def clock_count(self):
        while True:
            await RisingEdge(self.dut.clk)
            self.t += 1

    def entry(self, row):
        word, pc, *regs = (int(x) for x in row)
        v = word << self.el["word"].offset | pc << self.el["pc"].offset
        for i, r in enumerate(regs):
            v |= r << (self.el["regs"].offset + 32 * i)
        return v

    async def send(self, port, values, p, budget=BUDGET):
        valid, ready, payload = (getattr(self.dut, f"{port}__{s}") for s in ("valid", "ready", "payload"))
        i, on, t0 = 0, False, self.t
        while i < len(values):
            await FallingEdge(self.dut.clk)
            assert self.t - t0 < budget, f"{port}: {i} of {len(values)} taken after {budget} cycles"
            if not on and self.rng.random() < p:
                on = True
                payload.value = values[i]
            valid.value = int(on)
            await ReadOnly()
            if on and ready.value == 1:
                i, on = i + 1, False
        await FallingEdge(self.dut.clk)
        valid.value = 0

    async def count(self, unit, n, budget=BUDGET):
        d, c, t0 = self.dut, 0, self.t
        while c < n:
            await FallingEdge(d.clk)
            assert self.t - t0 < budget, f"{unit}: {c} of {n} done after {budget} cycles"
            await ReadOnly()
            assert getattr(d, f"{unit}_fault").value == 0, f"{unit}: fault at pc {getattr(d, f'{unit}_fault_pc').value}"
            c += int(getattr(d, f"{unit}_done").value)
        return c

    async def load_region(self, name):
        reg, L = self.regions[name], self.p.sfu_lanes
        img = self.z[f"region_{name}"]
        words = []
        for w in range(reg.words):
            data = 0
            for l in range(L):
                data |= int(img[w, l]) << (32 * l)
            words.append(_pack(self.wl, region=reg.id, word=w, data=data, mask=(1 << L) - 1))
        await self.send("host_wr", words, 1.0)
        for _ in range(8):
            await FallingEdge(self.dut.clk)

    async def read_region(self, name):
        reg, L, d = self.regions[name], self.p.sfu_lanes, self.dut
        got, w, t0 = [], 0, self.t
        while len(got) < reg.words:
            await FallingEdge(d.clk)
            assert self.t - t0 < 20 * reg.words + 100, f"reading {name}: stuck"
            on = w < reg.words
            if on:
                d.host_rd_req__payload.value = _pack(self.rl, region=reg.id, word=w)
            d.host_rd_req__valid.value = int(on)
            await ReadOnly()
            if d.host_rd_data__valid.value == 1:
                v = d.host_rd_data__payload.value.to_unsigned()
                got.append([(v >> (32 * l)) & 0xFFFFFFFF for l in range(L)])
            if on and d.host_rd_req__ready.value == 1:
                w += 1
        await FallingEdge(d.clk)
        d.host_rd_req__valid.value = 0
        return np.array(got, np.uint32).reshape(-1)


@cocotb.test()
async def ldst_case(dut):
    path = os.environ["FLIGHTLLM_STIMULI"]
    z = np.load(path)
    meta = json.loads(z["meta"].tobytes().decode())
    b = Bench(dut, z, meta)
    K = b.p.kv_channels
    cocotb.start_soon(Clock(dut.clk, PERIOD_NS, unit="ns").start())
    for port in ("ld_issue", "st_issue", "host_wr", "host_rd_req"):
        getattr(dut, f"{port}__valid").value = 0
    dut.host_rd_data__ready.value = 1
    dut.abort_units.value = 0
    sp = meta["spaces"]
    dut.spaces.value = sp["kv_space"] | sp["out_space"] << 32 | sp["tok_space"] << 64
    for i in range(K):
        getattr(dut, f"m_axi_kv{i}_rid").value = 0
        getattr(dut, f"m_axi_kv{i}_bid").value = 0
    dut.rst.value = 1
    rams = []
    prng = random.Random(meta["seed"] + 1)
    for i in range(K):
        ram = AxiRam(AxiBus.from_prefix(dut, f"m_axi_kv{i}"), dut.clk, dut.rst, size=meta["chan_bytes"])
        ram.write(0, z[f"chan{i}"].tobytes())
        for ch in (ram.read_if.ar_channel, ram.read_if.r_channel, ram.write_if.aw_channel, ram.write_if.w_channel,
                   ram.write_if.b_channel):
            ch.set_pause_generator(pauses(random.Random(prng.random()), meta["pause"]))
        rams.append(ram)
    for _ in range(5):
        await RisingEdge(dut.clk)
    await FallingEdge(dut.clk)
    dut.rst.value = 0
    cocotb.start_soon(b.clock_count())

    for name in meta["ld_regions"] + meta["st_regions"]:
        await b.load_region(name)

    # -- LD and ST at once -------------------------------------------------------------------
    ld = [b.entry(r) for r in z["ld_entries"]]
    st = [b.entry(r) for r in z["st_entries"]]
    go = 1 - meta["stall"]
    t0 = b.t
    n_ld, n_st, *_ = await with_timeout(gather(b.count("ld", len(ld)), b.count("st", len(st)),
                                               b.send("ld_issue", ld, go), b.send("st_issue", st, go)),
                                        BUDGET * 2 * PERIOD_NS, "ns")
    cycles = b.t - t0
    for _ in range(200):
        await FallingEdge(dut.clk)
        await ReadOnly()
        if dut.ld_busy.value == 0 and dut.st_busy.value == 0:
            break
    else:
        raise AssertionError("busy after every done")
    assert dut.ld_axi_error.value == 0 and dut.st_axi_error.value == 0
    failures = []
    for i, ram in enumerate(rams):
        got = np.frombuffer(ram.read(0, meta["chan_bytes"]), np.uint8)
        want = z[f"chan{i}_final"]
        if not np.array_equal(got, want):
            bad = np.flatnonzero(got != want)
            failures.append(f"kv channel {i}: {len(bad)} bytes differ, first at {bad[0]:#x}")
    for name in meta["ld_regions"]:
        got = await b.read_region(name)
        want = z[f"want_{name}"]
        if not np.array_equal(got, want):
            bad = np.flatnonzero(got != want)
            failures.append(f"region {name}: {len(bad)} elements differ, first at {bad[0]}")

    # -- a bad entry each: fault with its pc until abort -----------------------------------------
    bad_ld, bad_st = (b.entry(r) for r in z["bad_entries"])
    await gather(b.send("ld_issue", [bad_ld], 1.0), b.send("st_issue", [bad_st], 1.0))
    for _ in range(30):
        await FallingEdge(dut.clk)
    await ReadOnly()
    for u, pc in (("ld", 0), ("st", 1)):
        if getattr(dut, f"{u}_fault").value != 1 or getattr(dut, f"{u}_fault_pc").value != pc:
            failures.append(f"{u}: no fault at pc {pc}")
        if getattr(dut, f"{u}_issue__ready").value != 0:
            failures.append(f"{u}: takes entries while faulted")
    await FallingEdge(dut.clk)
    dut.abort_units.value = 1
    for _ in range(50):
        await FallingEdge(dut.clk)
        await ReadOnly()
        if dut.ld_busy.value == 0 and dut.st_busy.value == 0:
            break
    await FallingEdge(dut.clk)
    dut.abort_units.value = 0
    await FallingEdge(dut.clk)
    await ReadOnly()
    if dut.ld_fault.value or dut.st_fault.value or dut.ld_busy.value or dut.st_busy.value:
        failures.append("abort did not clear the faults")
    with open(path + ".result.json", "w") as f:
        json.dump({"ld_done": n_ld, "st_done": n_st, "cycles": cycles}, f)
    assert not failures, "\n".join(failures)
