"""The accelerator as one Vitis RTL kernel: ``flightllm_kernel``.

Top-level ports as Vitis expects of an RTL kernel: ``ap_clk``, ``ap_rst_n`` (active low,
synchronous), ``s_axi_control_*`` (AXI4-Lite, :mod:`flightllm.hw.regmap`), ``m_axi_instr_*``
(the program and the SFU tables, one instruction per 128-bit beat), ``m_axi_chNN_*`` (one per
weight channel / HBM pseudo-channel) and ``interrupt``. ``docs/kernel.md`` is the contract
between the blocks::

  s_axi_control -> ControlSlave --start--> [TableLoader, if tab_words] --> Control.start
                                <--done--- Control.done (status, err_pc, argmax)
  m_axi_instr <-- ReadMux <-- Fetch (program), TableLoader (tables)
  Control --issue_U--> unit U (LD, ST, MPE, SFU) --done/busy/fault--> Control
  units <--> Buffers (one client port per unit stream)
  units (LD, ST, MPE) <--> ReadMux / WriteMux per channel --(+ chNN base)--> m_axi_chNN

Every unit slot is filled; :class:`MissingUnit` (every instruction sent to it ends the run
with ``BAD_FIELD`` at its pc) stands in for a unit a variant leaves out.
"""

from __future__ import annotations

from amaranth import Cat, ClockDomain, Const, Module, Mux
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from .axi import BurstReader, BurstWriter, ReadMux, WriteMux, axi4_top_members, connect_axi4_top
from .axil import ControlSlave, axil_top_members, connect_axil_top
from .buffers import Buffers
from .control import PC_BITS, UNIT_NAMES, Control, entry_layout
from .fetch import Fetch
from .geometry import EngineGeometry
from .embed import EmbedEngine
from .isa import WORD_BITS, Opcode
from .kvstore import KvStoreEngine
from .mpe_unit import MpeUnit
from .ldst import LdUnit, SpaceLoad, SpaceStore, StUnit
from .params import HwParams
from .regmap import register_map
from .sfu_unit import SfuKernelUnit
from .tables import TableLoader

__all__ = ["Kernel", "KERNEL_NAME", "MissingUnit"]

KERNEL_NAME = "flightllm_kernel"


class MissingUnit(wiring.Component):
    """A unit slot without its unit: takes every entry and faults with its pc."""

    def __init__(self):
        super().__init__({"issue": In(stream.Signature(entry_layout())), "done": Out(1), "busy": Out(1),
                          "fault": Out(1), "fault_pc": Out(PC_BITS), "abort": In(1)})

    def elaborate(self, platform):
        m = Module()
        m.d.comb += self.issue.ready.eq(~self.fault)
        with m.If(self.issue.valid & self.issue.ready):
            m.d.sync += [self.fault.eq(1), self.fault_pc.eq(self.issue.payload.pc)]
        with m.If(self.abort):
            m.d.sync += self.fault.eq(0)
        return m


class Kernel(wiring.Component):
    """``flightllm_kernel`` for ``params`` (module docstring).

    Parameters
    ----------
    params : HwParams
    trace : bool
        Simulation only: outputs ``trace_issue``, ``trace_done`` (one bit per unit: an
        instruction handed to / completed by unit ``UNIT_NAMES[i]`` this cycle) and
        ``trace_pc_<unit>`` (the pc of the instruction handed over), from which a testbench
        records every instruction's cycles. Not part of the Vitis kernel.
    """

    def __init__(self, params: HwParams, *, trace: bool = False):
        self._MustUse__silence = True           # never built if the checks below raise
        if not isinstance(params, HwParams):
            raise TypeError(f"Kernel needs HwParams, not {type(params).__name__}")
        EngineGeometry(params)                  # a shape the RTL cannot build: ValueError now
        self._MustUse__silence = False
        self.params = params
        self.regmap = register_map(params)
        C = params.weight_channels
        members = {"ap_clk": In(1), "ap_rst_n": In(1), "interrupt": Out(1)}
        members.update(axil_top_members(self.regmap.addr_bits))
        for port, bits in self.ports():
            members.update(axi4_top_members(f"m_axi_{port}", 64, bits))
            # one ID (responses in order): constant 0 out, ignored in; memory models such as
            # cocotbext-axi's AxiRam expect the ID signals on a full AXI4 port
            members.update({f"m_axi_{port}_arid": Out(1), f"m_axi_{port}_awid": Out(1),
                            f"m_axi_{port}_rid": In(1), f"m_axi_{port}_bid": In(1)})
        self.trace = trace
        if trace:
            members.update({"trace_issue": Out(len(UNIT_NAMES)), "trace_done": Out(len(UNIT_NAMES))})
            members.update({f"trace_pc_{n}": Out(PC_BITS) for n in UNIT_NAMES})
        super().__init__(members)

    def ports(self) -> list:
        """The m_axi ports: (name, data bits), in the register map's pointer order."""
        return [(r.port, WORD_BITS if r.port == "instr" else self.params.hbm_port_bits) for r in self.regmap.pointers]

    def elaborate(self, platform):
        m = Module()
        p = self.params
        C = p.weight_channels
        m.domains.sync = cd = ClockDomain("sync")
        m.d.comb += [cd.clk.eq(self.ap_clk), cd.rst.eq(~self.ap_rst_n)]

        slave = m.submodules.slave = ControlSlave(self.regmap)
        connect_axil_top(m, self, "s_axi_control", slave.bus)
        m.d.comb += self.interrupt.eq(slave.interrupt)
        args = slave.args

        ctl = m.submodules.control = Control()
        fetch = m.submodules.fetch = Fetch()
        tabs = m.submodules.tables = TableLoader(p)
        sfu = SfuKernelUnit(p)
        ld_space, st_space = SpaceLoad(p), SpaceStore(p)
        embed, kvstore = EmbedEngine(p), KvStoreEngine(p)
        mpe = MpeUnit(p)
        units = {"sfu": sfu, "mpe": mpe,
                 "ld": LdUnit(p, [ld_space, ((Opcode.EMBED,), embed)]),
                 "st": StUnit(p, [st_space, ((Opcode.ST_KT,), kvstore)])}
        for name in UNIT_NAMES:
            if name not in units:
                units[name] = MissingUnit()
            m.submodules[f"unit_{name}"] = units[name]
        # one client port per unit stream, each wired to the regions its unit can touch
        ports = {f"sfu_{k}": (sfu, k) for k in ("x", "s2", "tab", "wr")}
        ports.update({"tables": (tabs, "wr"), "ld_space": (ld_space, "buf"), "st_space": (st_space, "buf"),
                      "embed": (embed, "buf"), "kvstore": (kvstore, "buf"), "mpe_ld": (mpe, "ld"),
                      "mpe_out": (mpe, "out")})
        bufs = m.submodules.buffers = Buffers(p, clients={c: u.reach[k] for c, (u, k) in ports.items()})

        # start: the tables first when asked for, then the program
        m.d.comb += [tabs.start.eq(slave.start), tabs.base.eq(args.instr + args.tab_offset),
                     tabs.words.eq(args.tab_words)]
        m.d.comb += [ctl.start.eq(tabs.done),
                     ctl.args.pos.eq(args.pos), ctl.args.len.eq(args.len),
                     ctl.args.prog_words.eq(args.prog_words), ctl.args.watchdog.eq(args.watchdog)]
        m.d.comb += [slave.done.eq(ctl.done), slave.status_in.status.eq(ctl.status.status),
                     slave.status_in.err_pc.eq(ctl.status.err_pc), slave.status_in.argmax.eq(ctl.status.argmax)]

        # instruction fetch and the tables share m_axi_instr
        m.d.comb += [fetch.base.eq(args.instr), fetch.prog_words.eq(args.prog_words),
                     fetch.jump.eq(ctl.jump), fetch.jump_pc.eq(ctl.jump_pc)]
        wiring.connect(m, fetch.ins, ctl.ins)
        imux = m.submodules.instr_mux = ReadMux(2, WORD_BITS, 64)
        wiring.connect(m, fetch.axi, imux.clients[0])
        wiring.connect(m, tabs.axi, imux.clients[1])
        connect_axi4_top(m, self, "m_axi_instr", imux.axi)
        m.d.comb += [getattr(self, f"m_axi_instr_{s}").eq(0) for s in ("awvalid", "wvalid")]
        m.d.comb += getattr(self, "m_axi_instr_bready").eq(1)

        # the units under the control block
        faults = []
        for name in UNIT_NAMES:
            u = units[name]
            wiring.connect(m, getattr(ctl, f"issue_{name}"), u.issue)
            m.d.comb += [getattr(ctl, f"done_{name}").eq(u.done), getattr(ctl, f"busy_{name}").eq(u.busy),
                         u.abort.eq(ctl.abort)]
            if self.trace:
                k = UNIT_NAMES.index(name)
                iss = getattr(ctl, f"issue_{name}")
                m.d.comb += [self.trace_issue[k].eq(iss.valid & iss.ready), self.trace_done[k].eq(u.done),
                             getattr(self, f"trace_pc_{name}").eq(iss.payload.pc)]
            faults.append(u)
        fault_pc = Const(0, PC_BITS)
        for u in reversed(faults):                  # the first faulting unit's pc
            fault_pc = Mux(u.fault, u.fault_pc, fault_pc)
        m.d.comb += [ctl.fault.eq(Cat(*(u.fault for u in faults)).any()), ctl.fault_pc.eq(fault_pc)]
        m.d.comb += [ctl.argmax_valid.eq(sfu.argmax.valid), ctl.argmax_value.eq(sfu.argmax.payload)]
        wiring.connect(m, mpe.mpe_tok, ctl.mpe_tok)

        for c, (u, k) in ports.items():
            wiring.connect(m, getattr(u, k), bufs.port(c))
        m.d.comb += [embed.tok_space.eq(args.tok_space), embed.max_seq.eq(args.max_seq)]
        for e in (ld_space, st_space):
            m.d.comb += [e.spaces.kv_space.eq(args.kv_space), e.spaces.out_space.eq(args.out_space),
                         e.spaces.tok_space.eq(args.tok_space)]

        # each weight channel's port: the readers and writers of the units that use it, behind
        # a ReadMux and a WriteMux, at the channel's base address (the pointer argument)
        readers = {c: [] for c in range(C)}
        writers = {c: [] for c in range(C)}
        K = p.kv_channels
        for i in range(K):                      # the LD/ST spaces: the last kv_channels channels
            readers[C - K + i].append(ld_space.axi[i])
            writers[C - K + i].append(st_space.axi[i])
        W = p.hbm_port_bits
        for c in range(C):
            readers[c].append(getattr(mpe, f"axi{c}"))      # the weight streamers first
        for c in range(C):
            # EMBED's row gathers and token reads, ST_KT's stores (and its INT4 read-backs):
            # command streams on a BurstReader / BurstWriter of their own per channel
            for name, port in (("embed", embed.rd[c]), ("kvstore", kvstore.rd[c])):
                rd = m.submodules[f"{name}_rd{c:02d}"] = BurstReader(W, 64, max_burst=32, fifo_depth=64)
                wiring.connect(m, port.cmd, rd.cmd)
                wiring.connect(m, rd.data, port.data)
                readers[c].append(rd.axi)
            wr = m.submodules[f"kvstore_wr{c:02d}"] = BurstWriter(W, 64, max_burst=32)
            wiring.connect(m, kvstore.wr[c].cmd, wr.cmd)
            wiring.connect(m, kvstore.wr[c].data, wr.data)
            m.d.comb += kvstore.wr[c].done.eq(wr.done)
            writers[c].append(wr.axi)
        for c in range(C):
            pre = f"m_axi_ch{c:02d}"
            base = getattr(args, f"ch{c:02d}")
            for kind, clients, mux_cls in (("read", readers[c], ReadMux), ("write", writers[c], WriteMux)):
                if not clients:
                    sigs = ("arvalid",) if kind == "read" else ("awvalid", "wvalid")
                    m.d.comb += [getattr(self, f"{pre}_{x}").eq(0) for x in sigs]
                    m.d.comb += getattr(self, f"{pre}_{'rready' if kind == 'read' else 'bready'}").eq(1)
                    continue
                mux = m.submodules[f"{kind}_mux_ch{c:02d}"] = mux_cls(len(clients), p.hbm_port_bits, 64)
                for k, client in enumerate(clients):
                    wiring.connect(m, client, mux.clients[k])
                connect_axi4_top(m, self, pre, mux.axi)
                m.d.comb += mux.base.eq(base)           # units address the buffer from 0
        return m

