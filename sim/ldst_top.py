"""LD_KV and ST_KV / ST_OUT on the on-chip buffers and one AXI4 port per kv channel, as one
Verilated top for the cocotb testbench (sim/ldst_tb.py) and the lint test.

:class:`LdStTestTop`::

  ld_issue --> SpaceLoad  --buffer port "ld"--+                +-- BurstReader[i] --+
  st_issue --> SpaceStore --buffer port "st"--+--> Buffers     +-- BurstWriter[i] --+--> m_axi_kv<i>_*
  host_rd_req, host_wr --> buffer port "host" -+   (host_rd_data, host_wr_done out)

Each kv channel's reader (LD) and writer (ST) share one flattened AXI4 port
``m_axi_kv<i>_*`` (:func:`~flightllm.hw.axi.connect_axi4_top`: a read-only and a write-only
manager on one port), as the kernel puts them on one HBM pseudo-channel (there behind the
ReadMux / WriteMux it shares with the weight streamer). The 1-bit ``..._arid`` / ``..._awid``
(constant 0) and ``..._rid`` / ``..._bid`` (unused) ports are there only because
cocotbext-axi's AXI bus requires the ID signals; the design has no IDs. ``abort`` goes to
both engines (top port ``abort_units``: Verilator rejects a port named like the C
function); the spaces' offsets (kernel arguments) are the ``spaces`` input.
"""

from amaranth import Module
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from ..hw.axi import axi4_top_members, connect_axi4_top
from ..hw.buffers import Buffers, connect_top_port, top_port_members
from ..hw.control import PC_BITS, entry_layout
from ..hw.ldst import SpaceLoad, SpaceStore, space_args_layout
from ..hw.params import HwParams

__all__ = ["LdStTestTop", "ADDR_BITS"]

ADDR_BITS = 64


class LdStTestTop(wiring.Component):
    """Both space engines on one set of buffers and per-kv-channel AXI ports (module docstring).

    Ports: ``ld_issue``, ``st_issue`` (streams of :func:`~flightllm.hw.control.entry_layout`),
    ``ld_done``, ``ld_busy``, ``ld_fault``, ``ld_fault_pc``, ``ld_axi_error`` and the same for
    ``st_``; ``abort_units`` (both engines' ``abort``); ``spaces``; the buffers' ``host`` port
    (:func:`~flightllm.hw.buffers.top_port_members`); ``m_axi_kv<i>_*`` per kv channel.
    """

    def __init__(self, params: HwParams):
        self.params = params
        self.ld = SpaceLoad(params, addr_bits=ADDR_BITS)
        self.st = SpaceStore(params, addr_bits=ADDR_BITS)
        self.bufs = Buffers(params, clients=("ld", "st", "host"))
        members = {"abort_units": In(1), "spaces": In(space_args_layout())}
        for u in ("ld", "st"):
            members.update({f"{u}_issue": In(stream.Signature(entry_layout())), f"{u}_done": Out(1),
                            f"{u}_busy": Out(1), f"{u}_fault": Out(1), f"{u}_fault_pc": Out(PC_BITS),
                            f"{u}_axi_error": Out(1)})
        members.update(top_port_members(params, "host"))
        for i in range(params.kv_channels):
            pre = f"m_axi_kv{i}"
            members.update(axi4_top_members(pre, ADDR_BITS, params.hbm_port_bits))
            members.update({f"{pre}_arid": Out(1), f"{pre}_awid": Out(1), f"{pre}_rid": In(1), f"{pre}_bid": In(1)})
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        m.submodules.ld, m.submodules.st, m.submodules.bufs = self.ld, self.st, self.bufs
        for name, e in (("ld", self.ld), ("st", self.st)):
            wiring.connect(m, wiring.flipped(getattr(self, f"{name}_issue")), e.issue)
            wiring.connect(m, e.buf, self.bufs.port(name))
            m.d.comb += [e.abort.eq(self.abort_units), e.spaces.eq(self.spaces)]
            for sig in ("done", "busy", "fault", "fault_pc", "axi_error"):
                m.d.comb += getattr(self, f"{name}_{sig}").eq(getattr(e, sig))
        connect_top_port(m, self, "host", self.bufs.port("host"))
        for i in range(self.params.kv_channels):
            connect_axi4_top(m, self, f"m_axi_kv{i}", self.ld.axi[i])
            connect_axi4_top(m, self, f"m_axi_kv{i}", self.st.axi[i])
        return m
