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

from ..hw.buffers import Buffers, connect_top_port, top_port_members
from ..hw.params import HwParams
from ..hw.sfu_unit import SfuOp, SfuUnit

__all__ = ["SfuTestTop", "PORTS"]

PORTS = ("x", "s2", "tab", "wr")


class SfuTestTop(wiring.Component):
    def __init__(self, params: HwParams, init=None):
        self.unit = SfuUnit(params)
        self.bufs = Buffers(params, clients=("host",) + PORTS, init=init)
        super().__init__({
            "op": In(stream.Signature(SfuOp)),
            "done": Out(1),
            "argmax_valid": Out(1), "argmax": Out(32),
            **top_port_members(params, "host"),
            "stall": In(len(PORTS)),
        })

    def elaborate(self, platform):
        m = Module()
        m.submodules.unit, m.submodules.bufs = self.unit, self.bufs
        wiring.connect(m, wiring.flipped(self.op), self.unit.op)
        connect_top_port(m, self, "host", self.bufs.port("host"))
        m.d.comb += [self.done.eq(self.unit.done), self.argmax_valid.eq(self.unit.argmax.valid),
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
