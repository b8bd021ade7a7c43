"""Two burst readers and two burst writers on one AXI4 port, as one Verilated top for the
cocotb testbench (sim/axi_tb.py).

:class:`AxiTestTop`::

  rd0_cmd -> BurstReader 0 --+                          +--> m_axi_ar*, m_axi_r*
  rd1_cmd -> BurstReader 1 --+--> ReadMux(2) -----------+
  rd{k}_data <---------------+                          |
  wr0_cmd, wr0_data -> BurstWriter 0 --+                |
  wr1_cmd, wr1_data -> BurstWriter 1 --+--> WriteMux(2) +--> m_axi_aw*, m_axi_w*, m_axi_b*
  wr{k}_done <-------------------------+

The AXI port is flattened to top-level ports ``m_axi_<signal>`` (:func:`~flightllm.hw.axi.axi4_top_members`),
as a kernel top names its ``m_axi_<port>_<signal>``. The units differ in burst length
and buffering (:data:`READERS`, :data:`WRITERS`) so the mux sees mixed bursts. The test
top also has 1-bit ``m_axi_arid``/``m_axi_awid`` (constant 0) and ``m_axi_rid``/``m_axi_bid``
(unused) ports only because cocotbext-axi's AXI bus requires the ID signals; the design
has no IDs.
"""

from amaranth import Cat, Module
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from ..hw.axi import (BurstReader, BurstWriter, ReadMux, WriteMux, axi4_top_members, command_layout,
                      connect_axi4_top, write_data_layout)

__all__ = ["AxiTestTop", "READERS", "WRITERS", "ADDR_BITS"]

#: (max_burst, fifo_depth) of each reader
READERS = ((64, 128), (16, 32))
#: (max_burst, outstanding) of each writer
WRITERS = ((64, 8), (16, 4))
ADDR_BITS = 64


class AxiTestTop(wiring.Component):
    """Readers and writers behind a :class:`~flightllm.hw.axi.ReadMux` and a
    :class:`~flightllm.hw.axi.WriteMux` on the flattened port ``m_axi_*`` (module docstring).

    Ports: ``rd{k}_cmd`` (stream of :func:`~flightllm.hw.axi.command_layout`), ``rd{k}_data``
    (stream of ``data_bits``), ``wr{k}_cmd``, ``wr{k}_data`` (stream of
    :func:`~flightllm.hw.axi.write_data_layout`), ``wr{k}_done``; ``idle`` and ``error`` with
    one bit per unit (``rd0, rd1, wr0, wr1``); ``m_axi_*``.
    """

    def __init__(self, data_bits: int, addr_bits: int = ADDR_BITS):
        self.rd = [BurstReader(data_bits, addr_bits, max_burst=mb, fifo_depth=d) for mb, d in READERS]
        self.wr = [BurstWriter(data_bits, addr_bits, max_burst=mb, outstanding=o) for mb, o in WRITERS]
        self.rmux = ReadMux(len(READERS), data_bits, addr_bits)
        self.wmux = WriteMux(len(WRITERS), data_bits, addr_bits)
        cmd = stream.Signature(command_layout(addr_bits))
        members = {}
        for k in range(len(READERS)):
            members[f"rd{k}_cmd"] = In(cmd)
            members[f"rd{k}_data"] = Out(stream.Signature(data_bits))
        for k in range(len(WRITERS)):
            members[f"wr{k}_cmd"] = In(cmd)
            members[f"wr{k}_data"] = In(stream.Signature(write_data_layout(data_bits)))
            members[f"wr{k}_done"] = Out(1)
        n = len(READERS) + len(WRITERS)
        members.update({"idle": Out(n), "error": Out(n), **axi4_top_members("m_axi", addr_bits, data_bits),
                        "m_axi_arid": Out(1), "m_axi_awid": Out(1), "m_axi_rid": In(1), "m_axi_bid": In(1)})
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        m.submodules.rmux, m.submodules.wmux = self.rmux, self.wmux
        for k, r in enumerate(self.rd):
            m.submodules[f"rd{k}"] = r
            wiring.connect(m, wiring.flipped(getattr(self, f"rd{k}_cmd")), r.cmd)
            wiring.connect(m, wiring.flipped(getattr(self, f"rd{k}_data")), r.data)
            wiring.connect(m, r.axi, self.rmux.clients[k])
        for k, w in enumerate(self.wr):
            m.submodules[f"wr{k}"] = w
            wiring.connect(m, wiring.flipped(getattr(self, f"wr{k}_cmd")), w.cmd)
            wiring.connect(m, wiring.flipped(getattr(self, f"wr{k}_data")), w.data)
            wiring.connect(m, w.axi, self.wmux.clients[k])
            m.d.comb += getattr(self, f"wr{k}_done").eq(w.done)
        units = self.rd + self.wr
        m.d.comb += [self.idle.eq(Cat(u.idle for u in units)), self.error.eq(Cat(u.error for u in units))]
        connect_axi4_top(m, self, "m_axi", self.rmux.axi)
        connect_axi4_top(m, self, "m_axi", self.wmux.axi)
        return m
