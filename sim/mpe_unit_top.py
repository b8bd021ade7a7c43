"""The MPE unit on the on-chip buffers and its weight channels, as one Verilated top for the
cocotb testbench (sim/mpe_unit_tb.py).

:class:`MpeUnitTestTop`::

  issue (entries), abort ------> MpeUnit --axi{c}--> m_axi_ch{c}_* (cocotbext-axi AxiRamRead each)
  done busy fault fault_pc <----   |  ^ mpe_tok
                                   ld, out (stall gates) --> Buffers <-- host (the testbench)

:class:`~flightllm.hw.buffers.Buffers` holds :data:`REGIONS` only, with a ``host`` port for the
testbench (load, read back) and the unit's ``ld`` and ``out`` ports behind stall gates
(``stall`` bit 0: ``ld`` reads, 1: ``out`` reads, 2: ``out`` writes). The weight ports are
flattened to ``m_axi_ch{c}_<signal>`` with 1-bit ``arid``/``rid`` only because cocotbext-axi's
bus wants the ID signals (the design has none).
"""

import dataclasses

from amaranth import Module
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from ..hw.axi import axi4_top_members, connect_axi4_top
from ..hw.buffers import Buffers, connect_top_port, top_port_members
from ..hw.control import PC_BITS, entry_layout
from ..hw.mpe_unit import MpeUnit
from ..hw.params import HwParams, get_preset

__all__ = ["MpeUnitTestTop", "REGIONS", "ADDR_BITS", "PARAMS", "VARIANTS", "U280_2CH", "DESIGN"]

#: The RTL tests' build: the ``sim`` preset's engine (4 chains of 8 lanes, 2 channels, every
#: format; 8 SFU lanes, so a row tile is half a buffer word) with small buffers (8 heads of
#: 64, 256 positions, 4 token rows) and a 1024-element activation buffer (so MM, QK and PV
#: run several passes), 256-word stream FIFOs.
PARAMS = dataclasses.replace(get_preset("sim"), name="sim-mpeu", mm_tokens=4, act_buf_depth=1024,
                             max_seq_len=256, buf_hidden=512, buf_ffn=512, buf_vocab=512, buf_heads=8,
                             buf_kv_heads=4, buf_tables=64, stream_fifo_beats=256)
#: The same buffers on other geometries: ``mc-mpeu`` the ``sim-mc`` engine (8 chains of 16 lanes)
#: with 4 SFU lanes, so a row tile is two output chunks (as on the u280) and an activation word
#: four buffer words; ``wide-mpeu`` the ``sim`` engine with 16 SFU lanes (a buffer word holds two
#: activation words and four row tiles' results).
VARIANTS = {
    "sim-mpeu": PARAMS,
    "mc-mpeu": dataclasses.replace(get_preset("sim-mc"), name="mc-mpeu", sfu_lanes=4, mm_tokens=4,
                                   act_buf_depth=1024, max_seq_len=256, buf_hidden=512, buf_ffn=512, buf_vocab=512,
                                   buf_heads=8, buf_kv_heads=4, buf_tables=64, stream_fifo_beats=256),
    "wide-mpeu": dataclasses.replace(PARAMS, name="wide-mpeu", sfu_lanes=16),
}
#: The u280's per-channel geometry (``u280-2ch``: 4 chains of 32 lanes per 512-bit channel, 32 SFU
#: lanes, 225 MHz) with the small buffers: the cycle counts of the report.
U280_2CH = dataclasses.replace(get_preset("u280-2ch"), name="u280-mpeu", mm_tokens=4, max_seq_len=256,
                               buf_hidden=512, buf_ffn=512, buf_vocab=512, buf_heads=8, buf_kv_heads=4,
                               buf_tables=64)

#: the buffer regions the tests use (operands and results of MV, MM, QK, PV)
REGIONS = ("HQ", "HQ.scale", "HQ.factor", "QQ", "QQ.scale", "PQ", "PQ.scale", "PQ.factor", "KS",
           "S", "A", "Y", "G")
ADDR_BITS = 32
STALLS = (("ld", "rd_req"), ("out", "rd_req"), ("out", "wr"))


class MpeUnitTestTop(wiring.Component):
    def __init__(self, params: HwParams):
        self.unit = MpeUnit(params, addr_bits=ADDR_BITS)
        self.bufs = Buffers(params, clients=("host", "ld", "out"), only=REGIONS)
        self.channels = params.weight_channels
        members = {
            "issue": In(stream.Signature(entry_layout())),
            "done": Out(1), "busy": Out(1), "fault": Out(1), "fault_pc": Out(PC_BITS), "abort": In(1),
            "mpe_tok": Out(stream.Signature(4)),
            **top_port_members(params, "host"),
            "stall": In(len(STALLS)),
        }
        for c in range(self.channels):
            members.update(axi4_top_members(f"m_axi_ch{c}", ADDR_BITS, params.hbm_port_bits, write=False))
            members[f"m_axi_ch{c}_arid"] = Out(1)
            members[f"m_axi_ch{c}_rid"] = In(1)
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        u = self.unit
        m.submodules.unit, m.submodules.bufs = u, self.bufs
        wiring.connect(m, wiring.flipped(self.issue), u.issue)
        wiring.connect(m, u.mpe_tok, wiring.flipped(self.mpe_tok))
        m.d.comb += [self.done.eq(u.done), self.busy.eq(u.busy), self.fault.eq(u.fault),
                     self.fault_pc.eq(u.fault_pc), u.abort.eq(self.abort)]
        connect_top_port(m, self, "host", self.bufs.port("host"))
        for pn in ("ld", "out"):
            up, bp = getattr(u, pn), self.bufs.port(pn)
            for s in ("rd_req", "wr"):
                k = STALLS.index((pn, s)) if (pn, s) in STALLS else None
                go = ~self.stall[k] if k is not None else 1
                us, bs = getattr(up, s), getattr(bp, s)
                m.d.comb += [bs.valid.eq(us.valid & go), us.ready.eq(bs.ready & go), bs.payload.eq(us.payload)]
            m.d.comb += [up.rd_data.valid.eq(bp.rd_data.valid), up.rd_data.payload.eq(bp.rd_data.payload),
                         up.wr_done.eq(bp.wr_done)]
        for c in range(self.channels):
            connect_axi4_top(m, self, f"m_axi_ch{c}", getattr(u, f"axi{c}"))
        return m


def _make(params):
    return MpeUnitTestTop(params)


def _design():
    from .rtl import Design
    return Design("mpe_unit", "flightllm_mpe_unit", _make,
                  ("hw/params.py", "hw/isa.py", "hw/formats.py", "hw/geometry.py", "hw/dequant.py", "hw/chain.py",
                   "hw/mpe.py", "hw/fp32.py", "hw/mpe_out.py", "hw/axi.py", "hw/buffers.py", "hw/control.py",
                   "hw/mpe_unit.py", "sim/mpe_unit_top.py"),
                  waivers=(("SYMRSVDWORD", "the kernel contract names the unit's input `abort`, a C library "
                                           "word Verilator renames"),))


#: the Verilated design of :class:`MpeUnitTestTop` (``sim/rtl.py``'s machinery)
DESIGN = _design()
