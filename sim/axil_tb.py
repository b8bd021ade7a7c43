"""cocotb testbench of the ``s_axi_control`` slave (flightllm_axil, sim/axil_top.py), driven
by sim/test_axil.py, with ``cocotbext.axi.AxiLiteMaster`` as the host.

Reads ``$FLIGHTLLM_STIMULI`` (JSON: ``params``, ``seed``, ``stall``). Every offset comes
from :func:`flightllm.hw.regmap.register_map`. Random pauses on all five AXI-Lite
channels; a core model answers each ``start`` pulse with ``done`` ``run_len`` cycles later.
Every bus operation and every wait is bounded in time.
"""

from __future__ import annotations

import json
import os
import pathlib
import random

import cocotb
from amaranth import Shape
from cocotb.clock import Clock
from cocotb.triggers import ClockCycles, FallingEdge, ReadOnly, RisingEdge, with_timeout
from cocotbext.axi import AxiLiteBus, AxiLiteMaster

from flightllm.hw import regmap as R
from flightllm.hw.params import HwParams
from flightllm.hw.regmap import Status, register_map

PERIOD_NS = 10
OP_TIMEOUT_NS = 200 * PERIOD_NS


def _pauses(rng, p):
    while True:
        yield rng.random() < p


class Core:
    """Counts ``start`` pulses and answers each with ``done`` ``run_len`` cycles later."""

    def __init__(self, dut, run_len):
        self.dut, self.run_len, self.starts, self.dones = dut, run_len, 0, 0

    async def run(self):
        dut, due, t = self.dut, None, 0
        while True:
            await RisingEdge(dut.clk)           # cycle t begins
            t += 1
            await ReadOnly()
            start = dut.start.value == 1
            await FallingEdge(dut.clk)          # drive done for the rest of cycle t
            dut.done.value = 0
            if start:
                assert due is None, "start during a run"
                self.starts += 1
                due = t + self.run_len
            if due is not None and t == due:
                dut.done.value = 1
                self.dones += 1
                due = None


@cocotb.test()
async def axil_regs(dut):
    cfg = json.loads(pathlib.Path(os.environ["FLIGHTLLM_STIMULI"]).read_text())
    p = HwParams.from_dict(cfg["params"])
    rm = register_map(p)
    rng = random.Random(cfg["seed"])
    cocotb.start_soon(Clock(dut.clk, PERIOD_NS, unit="ns").start())
    dut.done.value = 0
    dut.status_in.value = 0
    dut.rst.value = 1
    host = AxiLiteMaster(AxiLiteBus.from_prefix(dut, "s_axi_control"), dut.clk, dut.rst)
    for ch in (host.write_if.aw_channel, host.write_if.w_channel, host.write_if.b_channel,
               host.read_if.ar_channel, host.read_if.r_channel):
        ch.set_pause_generator(_pauses(random.Random(rng.random()), cfg["stall"]))
    await ClockCycles(dut.clk, 4)
    dut.rst.value = 0
    await ClockCycles(dut.clk, 2)
    core = Core(dut, run_len=37)
    cocotb.start_soon(core.run())

    async def rd(addr):
        return await with_timeout(host.read_dword(addr), OP_TIMEOUT_NS, "ns")

    async def wr(addr, value):
        await with_timeout(host.write_dword(addr, value), OP_TIMEOUT_NS, "ns")

    async def wr_bytes(addr, data: bytes):
        await with_timeout(host.write(addr, data), OP_TIMEOUT_NS, "ns")

    async def until(cond, what, cycles=1000):
        for _ in range(cycles):
            if cond():
                return
            await RisingEdge(dut.clk)
        raise AssertionError(f"timed out waiting for {what}")

    def args_out(name):
        f = rm.args_layout()[name]
        v = dut.args.value.to_unsigned()
        return (v >> f.offset) & ((1 << Shape.cast(f.shape).width) - 1)

    # -- arguments: whole words, then single bytes (wstrb), read back and on `args` -----------
    want = {}
    for r in rm.args:
        want[r.name] = rng.getrandbits(r.bits)
        for off, word in r.encode(want[r.name]):
            await wr(off, word)
    for r in rm.args:
        for _ in range(2):
            j = rng.randrange(r.bits // 8)
            b = rng.getrandbits(8)
            await wr_bytes(r.offset + j, bytes([b]))
            want[r.name] = want[r.name] & ~(0xFF << 8 * j) | b << 8 * j
    for r in rm.args:
        got = r.decode([await rd(r.offset + 4 * k) for k in range(r.nwords)])
        assert got == want[r.name], (r.name, hex(got), hex(want[r.name]))
        assert args_out(r.name) == want[r.name], r.name
        if r.size > 4 * r.nwords:
            assert await rd(r.offset + 4 * r.nwords) == 0, f"{r.name}: reserved word"
    for a in (rm.end, (1 << rm.addr_bits) - 4):
        await wr(a, 0xFFFFFFFF)
        assert await rd(a) == 0, hex(a)

    # -- a run: ap_start, start pulse, ap_done clear on read, interrupt, status -------------
    await wr(R.GIER, R.GIE)
    await wr(R.IP_IER, R.IRQ_DONE)
    assert await rd(R.CTRL) == R.AP_IDLE
    await wr(R.CTRL, R.AP_START)
    assert await rd(R.CTRL) == R.AP_START
    await wr(R.CTRL, R.AP_START)                # ignored while running
    await until(lambda: core.dones == 1, "done")
    await ClockCycles(dut.clk, 3)
    assert core.starts == 1
    assert dut.interrupt.value == 1
    assert await rd(R.IP_ISR) == R.IRQ_DONE
    layout = rm.status_layout()
    values = {"status": Status.DEADLOCK.value, "err_pc": 1234, "argmax": 31999}
    dut.status_in.value = sum(v << layout[n].offset for n, v in values.items())
    assert await rd(R.CTRL) == R.AP_DONE | R.AP_IDLE | R.AP_READY
    assert await rd(R.CTRL) == R.AP_IDLE
    for n, v in values.items():
        assert await rd(rm[n].offset) == v, n
    cyc = rm["cycles"]
    assert cyc.decode([await rd(cyc.offset), await rd(cyc.offset + 4)]) == core.run_len
    await wr(R.IP_ISR, R.IRQ_DONE)              # toggle: clears
    await ClockCycles(dut.clk, 2)
    assert await rd(R.IP_ISR) == 0 and dut.interrupt.value == 0

    # -- auto_restart ---------------------------------------------------------------------------
    await wr(R.CTRL, R.AP_START | R.AUTO_RESTART)
    await until(lambda: core.dones >= 4, "three auto-restarted runs", 2000)
    await wr(R.CTRL, 0)
    n = core.starts
    await ClockCycles(dut.clk, 3 * core.run_len)
    assert core.starts == n == core.dones
    assert await rd(R.CTRL) == R.AP_DONE | R.AP_IDLE | R.AP_READY
    assert await rd(R.CTRL) == R.AP_IDLE
