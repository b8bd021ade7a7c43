"""cocotb side of the ``rtl`` backend: the Verilated kernel served to a host process.

The host (:class:`flightllm.runtime.rtl.RtlBus`) listens on a
:mod:`multiprocessing.connection` address given in ``$FLIGHTLLM_KERNEL_SERVER``; this test
connects, receives the setup (memory sizes per m_axi port, pause probability, seed) and
then serves requests until ``quit``:

=====================  =======================================================
``("w32", off, v)``    AXI4-Lite write through ``cocotbext.axi.AxiLiteMaster``
``("r32", off)``       AXI4-Lite read
``("wmem", p, a, b)``  bytes into port ``p``'s memory (an ``AxiRam``), no bus time
``("rmem", p, a, n)``  bytes out of it
``("wait", cycles)``   run until ``interrupt`` rises (reply True) or ``cycles`` pass (False)
``("cycle",)``         the current cycle count
``("trace", on)``      start (clearing) or stop recording the kernel's trace outputs
``("trace_get",)``     the records: (cycle, "issue"/"done", unit index, pc or None)
=====================  =======================================================

Every m_axi port is an ``AxiRam`` with random pauses on all five channels when asked for
(latency and backpressure), so the host's runs see a memory that is neither ideal nor fixed.
Every wait is bounded: a host that vanishes or a kernel that never interrupts ends the test.
"""

from __future__ import annotations

import os
import random
from multiprocessing.connection import Client

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import ClockCycles, First, RisingEdge
from cocotbext.axi import AxiBus, AxiLiteBus, AxiLiteMaster, AxiRam
from flightllm.sim.tb import pauses

PERIOD_NS = 10



@cocotb.test()
async def serve(dut):
    addr, key = os.environ["FLIGHTLLM_KERNEL_SERVER"].rsplit("|", 1)
    host, port = addr.rsplit(":", 1)
    conn = Client((host, int(port)), authkey=key.encode())
    setup = conn.recv()
    rng = random.Random(setup.get("seed", 0))
    cocotb.start_soon(Clock(dut.ap_clk, PERIOD_NS, unit="ns").start())
    dut.ap_rst_n.value = 0
    host = AxiLiteMaster(AxiLiteBus.from_prefix(dut, "s_axi_control"), dut.ap_clk, dut.ap_rst_n,
                         reset_active_level=False)
    rams = {}
    for port, size in setup["ports"].items():
        ram = AxiRam(AxiBus.from_prefix(dut, f"m_axi_{port}"), dut.ap_clk, dut.ap_rst_n, reset_active_level=False,
                     size=size)
        p = setup.get("pause", 0.0)
        if p:
            for ch in (ram.write_if.aw_channel, ram.write_if.w_channel, ram.write_if.b_channel,
                       ram.read_if.ar_channel, ram.read_if.r_channel):
                ch.set_pause_generator(pauses(random.Random(rng.random()), p))
        rams[port] = ram
    await ClockCycles(dut.ap_clk, 8)
    dut.ap_rst_n.value = 1
    await ClockCycles(dut.ap_clk, 4)
    cycle = 0

    async def count():
        nonlocal cycle
        while True:
            await RisingEdge(dut.ap_clk)
            cycle += 1
    cocotb.start_soon(count())
    trace = {"on": False, "rec": []}
    units = setup.get("units", ())

    async def record():
        # one coroutine for the whole run; reads the trace outputs only while asked to
        while True:
            await RisingEdge(dut.ap_clk)
            if not trace["on"]:
                continue
            iss, dn = dut.trace_issue.value.to_unsigned(), dut.trace_done.value.to_unsigned()
            for k, name in enumerate(units):
                if iss >> k & 1:
                    trace["rec"].append((cycle, "issue", k, getattr(dut, f"trace_pc_{name}").value.to_unsigned()))
                if dn >> k & 1:
                    trace["rec"].append((cycle, "done", k, None))
    if units:
        cocotb.start_soon(record())
    conn.send(("ready", cycle))
    while True:
        if not conn.poll(600):
            raise TimeoutError("the host sent nothing for 10 minutes")
        req = conn.recv()
        op = req[0]
        if op == "quit":
            conn.send(("ok", cycle))
            break
        if op == "w32":
            await host.write_dword(req[1], req[2])
            conn.send(("ok", None))
        elif op == "r32":
            conn.send(("ok", await host.read_dword(req[1])))
        elif op == "wmem":
            rams[req[1]].write(req[2], req[3])
            conn.send(("ok", None))
        elif op == "rmem":
            conn.send(("ok", bytes(rams[req[1]].read(req[2], req[3]))))
        elif op == "wait":
            if dut.interrupt.value == 1:
                conn.send(("ok", True))
                continue
            t0 = cycle
            await First(RisingEdge(dut.interrupt), ClockCycles(dut.ap_clk, req[1]))
            conn.send(("ok", dut.interrupt.value == 1 and cycle - t0 <= req[1]))
        elif op == "cycle":
            conn.send(("ok", cycle))
        elif op == "trace":
            trace["on"], trace["rec"] = bool(req[1]), [] if req[1] else trace["rec"]
            conn.send(("ok", None))
        elif op == "trace_get":
            conn.send(("ok", trace["rec"]))
        else:
            conn.send(("error", f"unknown request {op!r}"))
    conn.close()
