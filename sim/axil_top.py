"""The ``s_axi_control`` slave as a Verilated top for the cocotb testbench (sim/axil_tb.py).

:class:`ControlTestTop`: :class:`~flightllm.hw.axil.ControlSlave` with its bus flattened
to ``s_axi_control_<name>`` ports (:func:`~flightllm.hw.axil.axil_top_members`, as the
kernel top names them, so ``cocotbext.axi.AxiLiteBus.from_prefix(dut, "s_axi_control")``
finds them), and the core side as plain ports: ``start``, ``done``, ``interrupt``,
``args`` (the :meth:`~flightllm.hw.regmap.RegisterMap.args_layout` bits) and
``status_in`` (the :meth:`~flightllm.hw.regmap.RegisterMap.status_layout` bits).
"""

from amaranth import Module
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from ..hw.axil import ControlSlave, axil_top_members, connect_axil_top
from ..hw.params import HwParams
from ..hw.regmap import register_map

__all__ = ["ControlTestTop", "PREFIX"]

PREFIX = "s_axi_control"


class ControlTestTop(wiring.Component):
    def __init__(self, params: HwParams):
        self.regmap = register_map(params)
        self.slave = ControlSlave(self.regmap)
        super().__init__({
            **axil_top_members(self.regmap.addr_bits, PREFIX),
            "start": Out(1), "done": In(1), "interrupt": Out(1),
            "args": Out(self.regmap.args_layout().size),
            "status_in": In(self.regmap.status_layout().size),
        })

    def elaborate(self, platform):
        m = Module()
        s = m.submodules.slave = self.slave
        connect_axil_top(m, self, PREFIX, s.bus)
        m.d.comb += [self.start.eq(s.start), s.done.eq(self.done), self.interrupt.eq(s.interrupt),
                     self.args.eq(s.args.as_value()), s.status_in.as_value().eq(self.status_in)]
        return m
