"""The SFU unit on the on-chip buffers as one Verilated top, for the cocotb testbench.

:class:`SfuTestTop`: :class:`~flightllm.hw.buffers.Buffers` with a ``host`` client port
(the testbench loads and reads the buffers through it, and reads at random while the
unit runs, for contention) and the four ports of :class:`~flightllm.hw.sfu_unit.SfuUnit`;
between the unit and the buffers, a stall gate per port (``stall`` bit ``k`` holds off
the handshakes of port :data:`PORTS` ``[k]``), so the testbench stalls every stream.
"""

from amaranth import Module
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from ..hw.buffers import Buffers, port_signature
from ..hw.params import HwParams
from ..hw.sfu_unit import SfuOp, SfuUnit

__all__ = ["SfuTestTop", "PORTS"]

PORTS = ("x", "s2", "tab", "wr")


class SfuTestTop(wiring.Component):
    def __init__(self, params: HwParams, init=None):
        self.unit = SfuUnit(params)
        self.bufs = Buffers(params, clients=("host",) + PORTS, init=init)
        host = port_signature(params).members         # as top-level ports: no constant readys
        super().__init__({
            "op": In(stream.Signature(SfuOp)),
            "done": Out(1),
            "argmax_valid": Out(1), "argmax": Out(32),
            "host_rd_req": In(host["rd_req"].signature),
            "host_rd_data": Out(stream.Signature(host["rd_data"].signature.members["payload"].shape)),
            "host_wr": In(host["wr"].signature),
            "host_wr_done": Out(1),
            "stall": In(len(PORTS)),
        })

    def elaborate(self, platform):
        m = Module()
        m.submodules.unit, m.submodules.bufs = self.unit, self.bufs
        wiring.connect(m, wiring.flipped(self.op), self.unit.op)
        h = self.bufs.port("host")
        wiring.connect(m, wiring.flipped(self.host_rd_req), h.rd_req)
        wiring.connect(m, wiring.flipped(self.host_wr), h.wr)
        m.d.comb += [self.host_rd_data.valid.eq(h.rd_data.valid), self.host_rd_data.payload.eq(h.rd_data.payload),
                     self.host_wr_done.eq(h.wr_done),
                     self.done.eq(self.unit.done), self.argmax_valid.eq(self.unit.argmax.valid),
                     self.argmax.eq(self.unit.argmax.payload)]
        for k, name in enumerate(PORTS):
            u, b = getattr(self.unit, name), self.bufs.port(name)
            go = ~self.stall[k]
            for s in ("rd_req", "wr"):
                us, bs = getattr(u, s), getattr(b, s)
                m.d.comb += [bs.valid.eq(us.valid & go), us.ready.eq(bs.ready & go), bs.payload.eq(us.payload)]
            m.d.comb += [u.rd_data.valid.eq(b.rd_data.valid), u.rd_data.payload.eq(b.rd_data.payload),
                         u.wr_done.eq(b.wr_done)]
        return m
