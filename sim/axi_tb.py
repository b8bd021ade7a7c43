"""cocotb testbench of the AXI4 burst reader/writer and muxes (flightllm_axi, sim/axi_top.py),
driven by sim/test_axi.py.

Reads a case from ``$FLIGHTLLM_STIMULI`` (written by :func:`flightllm.sim.test_axi.save_case`).
cocotbext-axi's ``AxiRam`` on ``m_axi_*`` is the memory, loaded with the case's initial
image, with random pauses on every channel (AR, R, AW, W, B). Phase A: both writers write
their commands (random stalls on the command and data streams) while both readers read a
region nobody writes; phase B: the readers read back (and around) what was written. Every
word read is compared with the case's expectation, every writer must give one ``done`` per
command, and at the end the whole memory must equal the case's final image, every unit
be idle and no ``error`` set. A monitor checks every AR/AW (size, INCR, ``max_burst`` of
the widest unit, 4 KiB) and that ``m_axi_rready`` never falls (the readers' credits).
Every wait is bounded in cycles, and each phase in simulated time.
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

from flightllm.hw.axi import AXI_BURST_INCR, AXI_PAGE_BYTES, command_layout, write_data_layout
from flightllm.sim.tb import pauses

PERIOD_NS = 10
#: cycle budget of a wait: per word of the stream, plus slack (a stream of the runs takes
#: about 5 cycles per word: two units share the port, with pauses and stalls)
WAIT_PER_WORD = 20
WAIT_SLACK = 5000



def _rows_int(rows):
    return [int.from_bytes(r.tobytes(), "little") for r in rows]


class Bench:
    def __init__(self, dut, z, meta):
        self.dut, self.z, self.meta = dut, z, meta
        self.rng = random.Random(meta["seed"])
        self.bits = meta["data_bits"]
        self.bb = self.bits // 8
        self.cl = command_layout(meta["addr_bits"])
        self.wl = write_data_layout(self.bits)
        self.stall = meta["stall"]
        self.t = 0
        self.failures = []

    def cmd_value(self, addr, beats):
        return int(addr) << self.cl["addr"].offset | int(beats) << self.cl["beats"].offset

    async def send(self, port, values, p, budget):
        """Offer ``values`` on stream ``port`` (random gaps, a valid held until taken)."""
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

    async def receive(self, port, expect, p, budget):
        """Take stream ``port`` (random ready) and compare each word with ``expect``."""
        valid, ready, payload = (getattr(self.dut, f"{port}__{s}") for s in ("valid", "ready", "payload"))
        i, t0 = 0, self.t
        while i < len(expect):
            await FallingEdge(self.dut.clk)
            assert self.t - t0 < budget, f"{port}: {i} of {len(expect)} words after {budget} cycles"
            r = self.rng.random() < p
            ready.value = int(r)
            await ReadOnly()
            if r and valid.value == 1:
                got = payload.value.to_unsigned()
                assert got == expect[i], f"{port}: word {i} of {len(expect)}: {got:#x} != {expect[i]:#x}"
                i += 1
        await FallingEdge(self.dut.clk)
        ready.value = 0

    async def dones(self, k, n, budget):
        done, c, t0 = getattr(self.dut, f"wr{k}_done"), 0, self.t
        while c < n:
            await FallingEdge(self.dut.clk)
            assert self.t - t0 < budget, f"wr{k}: {c} of {n} done pulses after {budget} cycles"
            await ReadOnly()
            c += int(done.value)
        for _ in range(20):                      # no extra pulses
            await FallingEdge(self.dut.clk)
            await ReadOnly()
            assert done.value == 0, f"wr{k}: more than {n} done pulses"

    async def clock_count(self):
        while True:
            await RisingEdge(self.dut.clk)
            self.t += 1

    async def monitor(self):
        """Every AR/AW the port issues, and rready (never falls: the readers' credits)."""
        d, lg, mb = self.dut, self.bb.bit_length() - 1, self.meta["max_burst"]
        self.bursts = {"ar": 0, "aw": 0}
        while True:
            await FallingEdge(d.clk)
            await ReadOnly()
            if d.m_axi_rready.value != 1:
                self.failures.append(f"m_axi_rready fell at cycle {self.t}")
                return
            for ch in ("ar", "aw"):
                if getattr(d, f"m_axi_{ch}valid").value == 1 and getattr(d, f"m_axi_{ch}ready").value == 1:
                    self.bursts[ch] += 1
                    a = getattr(d, f"m_axi_{ch}addr").value.to_unsigned()
                    n = getattr(d, f"m_axi_{ch}len").value.to_unsigned() + 1
                    size = getattr(d, f"m_axi_{ch}size").value.to_unsigned()
                    burst = getattr(d, f"m_axi_{ch}burst").value.to_unsigned()
                    ok = (size == lg and burst == AXI_BURST_INCR and a % self.bb == 0 and n <= mb
                          and a % AXI_PAGE_BYTES + n * self.bb <= AXI_PAGE_BYTES)
                    if not ok:
                        self.failures.append(f"{ch.upper()} {a:#x} x{n} size {size} burst {burst}: breaks the rules")

    def reads(self, phase, k):
        z = self.z
        cmds = z[f"r{phase}_cmd{k}"]
        return [self.cmd_value(a, n) for a, n in cmds], _rows_int(z[f"r{phase}_exp{k}"])

    def writes(self, k):
        z, wl = self.z, self.wl
        cmds = [self.cmd_value(a, n) for a, n in z[f"w_cmd{k}"]]
        data = _rows_int(z[f"w_data{k}"])
        strb = _rows_int(z[f"w_strb{k}"])
        beats = [d << wl["data"].offset | s << wl["strb"].offset for d, s in zip(data, strb)]
        return cmds, beats, len(z[f"w_cmd{k}"])


@cocotb.test()
async def axi_case(dut):
    path = os.environ["FLIGHTLLM_STIMULI"]
    z = np.load(path)
    meta = json.loads(z["meta"].tobytes().decode())
    b = Bench(dut, z, meta)
    cocotb.start_soon(Clock(dut.clk, PERIOD_NS, unit="ns").start())
    for port in ("rd0_cmd", "rd1_cmd", "wr0_cmd", "wr1_cmd", "wr0_data", "wr1_data"):
        getattr(dut, f"{port}__valid").value = 0
    for port in ("rd0_data", "rd1_data"):
        getattr(dut, f"{port}__ready").value = 0
    dut.rst.value = 1

    ram = AxiRam(AxiBus.from_prefix(dut, "m_axi"), dut.clk, dut.rst, size=meta["mem_bytes"])
    ram.write(0, z["mem0"].tobytes())
    prng = random.Random(meta["seed"] + 1)
    p = meta["pause"]
    for ch in (ram.read_if.ar_channel, ram.read_if.r_channel, ram.write_if.aw_channel, ram.write_if.w_channel,
               ram.write_if.b_channel):
        ch.set_pause_generator(pauses(random.Random(prng.random()), p, 40))

    for _ in range(5):
        await RisingEdge(dut.clk)
    await FallingEdge(dut.clk)
    dut.rst.value = 0
    cocotb.start_soon(b.clock_count())
    cocotb.start_soon(b.monitor())
    s = b.stall

    # -- phase A: both writers, and both readers on the read-only region --------------------
    jobs, beats_a = [], 0
    for k in range(2):
        cmds, data, n = b.writes(k)
        budget = WAIT_PER_WORD * len(data) + WAIT_SLACK
        jobs += [b.send(f"wr{k}_cmd", cmds, 1 - s, budget), b.send(f"wr{k}_data", data, 1 - s, budget),
                 b.dones(k, n, budget)]
        beats_a += len(data)
        cmds, exp = b.reads("a", k)
        budget = WAIT_PER_WORD * len(exp) + WAIT_SLACK
        jobs += [b.send(f"rd{k}_cmd", cmds, 1 - s, budget), b.receive(f"rd{k}_data", exp, 1 - s, budget)]
        beats_a += len(exp)
    await with_timeout(gather(*jobs), (WAIT_PER_WORD * beats_a + 2 * WAIT_SLACK) * PERIOD_NS, "ns")
    dut._log.info("phase A: %d words in %d cycles", beats_a, b.t)

    # -- phase B: read back ----------------------------------------------------------------------
    jobs, beats_b, t0 = [], 0, b.t
    for k in range(2):
        cmds, exp = b.reads("b", k)
        budget = WAIT_PER_WORD * len(exp) + WAIT_SLACK
        jobs += [b.send(f"rd{k}_cmd", cmds, 1 - s, budget), b.receive(f"rd{k}_data", exp, 1 - s, budget)]
        beats_b += len(exp)
    await with_timeout(gather(*jobs), (WAIT_PER_WORD * beats_b + 2 * WAIT_SLACK) * PERIOD_NS, "ns")
    dut._log.info("phase B: %d words in %d cycles", beats_b, b.t - t0)

    for _ in range(50):
        await FallingEdge(dut.clk)
    await ReadOnly()
    n_units = 4
    assert dut.idle.value.to_unsigned() == (1 << n_units) - 1, f"idle = {dut.idle.value} (rd0 rd1 wr0 wr1 from bit 0)"
    assert dut.error.value.to_unsigned() == 0, f"error = {dut.error.value}"
    got = np.frombuffer(ram.read(0, meta["mem_bytes"]), np.uint8)
    want = z["mem_final"]
    if not np.array_equal(got, want):
        bad = np.flatnonzero(got != want)
        b.failures.append(f"memory: {len(bad)} bytes differ, first at {bad[0]:#x}: {got[bad[0]]:#04x} != "
                          f"{want[bad[0]]:#04x}")
    with open(path + ".result.json", "w") as f:
        json.dump({"cycles_a": t0, "cycles_b": b.t - t0, "words_a": beats_a, "words_b": beats_b,
                   "bursts": getattr(b, "bursts", {})}, f)
    assert not b.failures, "\n".join(b.failures)
