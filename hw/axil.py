"""``s_axi_control``: the kernel's AXI4-Lite subordinate with the ``ap_ctrl_hs`` protocol.

:class:`ControlSlave` holds the registers of :mod:`flightllm.hw.regmap` (nothing here
writes an offset): the host writes the kernel arguments and CTRL over the bus, the
kernel's control block gets a one-cycle ``start`` pulse and the arguments (``args``),
and answers with a ``done`` pulse and its status (``status_in``). The slave counts the
run's cycles itself (the ``cycles`` register).

Bus
---
:func:`axil_signature` is the AXI4-Lite port seen from the subordinate (``awaddr`` In,
``awready`` Out, ...; flip it for a manager); member names are the AXI signal names in
lower case (the kernel top flattens them to ``s_axi_control_<name>``:
:func:`axil_top_members`). Data is 32 bits, the address ``regmap.addr_bits``; the low two
address bits are ignored. There are no ``awprot``/``arprot`` (Vitis RTL kernels have none).

Every ready comes from a flip-flop (no combinational path from a valid or a ready to a
ready, the timing rule of the design brief): AW and W each have a one-entry holding
register (``awready = ~aw_full``, ``wready = ~w_full``) and may arrive in either order or
together; when both are held and the B channel is free (or being emptied) the write
takes effect and ``bvalid`` rises the next cycle, held until ``bready``. A read takes the
address (``arready = ~(pending | rvalid)``), looks it up the next cycle into the
registered ``rdata`` with ``rvalid``, held until ``rready``. Writes honour ``wstrb`` per
byte; unmapped and reserved words read 0 and ignore writes, status registers ignore
writes, every response is OKAY (as the Vitis HLS slave does). Best case a write takes 3
cycles from AW/W to B, a read 2 from AR to R.

ap_ctrl_hs (the register map's docs)
-------------------------------------
A host write of CTRL with bit 0 (``wstrb[0]`` set) while ``ap_idle``: ``ap_start`` and the
``start`` pulse (the next cycle), ``ap_idle`` falls, a stale ``ap_done``/``ap_ready`` is
cleared. A write of ``ap_start`` while running is ignored. ``done`` (while running) ends the
run: ``ap_done`` and ``ap_ready`` set (ap_ctrl_hs lets ap_ready come with ap_done; the
kernel holds its arguments for the whole run), ``ap_start`` cleared and ``ap_idle`` set;
with ``auto_restart`` set instead ``ap_start`` stays, ``ap_idle`` stays 0 and ``start``
pulses again. A read of CTRL clears ``ap_done`` and ``ap_ready`` (a ``done`` in the same
cycle wins: that read returned 0 and the next returns 1). IP_ISR bit 0 (1) is set by
``done`` if IP_IER bit 0 (1) is set, and a host write toggles the bits written 1 (the event
wins). ``interrupt`` = GIER & |(IP_ISR & IP_IER), registered. ``done`` while idle is
ignored.
"""

from amaranth import Cat, Module, Signal, Value
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from .regmap import (AP_DONE, AP_IDLE, AP_READY, AP_START, AUTO_RESTART, CTRL, DATA_BITS, GIE, GIER, IP_IER,
                     IP_ISR, IRQ_DONE, IRQ_READY, SLAVE_COUNTED, RegisterMap)

__all__ = ["axil_signature", "axil_top_members", "connect_axil_top", "ControlSlave", "AXIL_MEMBERS"]

#: The AXI4-Lite signals (lower case), with their direction seen from the subordinate.
AXIL_MEMBERS = ("awaddr", "awvalid", "awready", "wdata", "wstrb", "wvalid", "wready", "bresp", "bvalid",
                "bready", "araddr", "arvalid", "arready", "rdata", "rresp", "rvalid", "rready")


def _check_addr_bits(addr_bits):
    if isinstance(addr_bits, bool) or not isinstance(addr_bits, int):
        raise TypeError(f"addr_bits must be an int, not {addr_bits!r}")
    if not 3 <= addr_bits <= 64:
        raise ValueError(f"addr_bits must be in [3, 64] (byte addresses of 32-bit words), not {addr_bits}")


def axil_signature(addr_bits: int, data_bits: int = DATA_BITS) -> wiring.Signature:
    """The AXI4-Lite port seen from the subordinate (``Out(axil_signature(..))`` on a
    subordinate, ``In(..)`` or ``.flip()`` on a manager).

    Parameters
    ----------
    addr_bits : int
        Width of ``awaddr`` / ``araddr`` (byte addresses).
    data_bits : int
        32 (the only width AXI4-Lite control slaves of Vitis kernels use) or 64.
    """
    _check_addr_bits(addr_bits)
    if data_bits not in (32, 64):
        raise ValueError(f"AXI4-Lite data_bits must be 32 or 64, not {data_bits!r}")
    return wiring.Signature({
        "awaddr": In(addr_bits), "awvalid": In(1), "awready": Out(1),
        "wdata": In(data_bits), "wstrb": In(data_bits // 8), "wvalid": In(1), "wready": Out(1),
        "bresp": Out(2), "bvalid": Out(1), "bready": In(1),
        "araddr": In(addr_bits), "arvalid": In(1), "arready": Out(1),
        "rdata": Out(data_bits), "rresp": Out(2), "rvalid": Out(1), "rready": In(1),
    })


def axil_top_members(addr_bits: int, prefix: str = "s_axi_control") -> dict:
    """The AXI4-Lite subordinate port as plain top-level members ``<prefix>_<name>`` (how
    Vitis names an RTL kernel's ports); wire them with :func:`connect_axil_top`."""
    if not isinstance(prefix, str) or not prefix.isidentifier():
        raise ValueError(f"prefix must be an identifier, not {prefix!r}")
    return {f"{prefix}_{name}": m for name, m in axil_signature(addr_bits).members.items()}


def connect_axil_top(m: Module, top, prefix: str, bus) -> None:
    """Connect the :func:`axil_top_members` ``prefix`` of component ``top`` to the subordinate
    port ``bus`` (``Out(axil_signature(..))`` of a submodule)."""
    for name, member in bus.signature.members.items():
        outer, inner = getattr(top, f"{prefix}_{name}"), getattr(bus, name)
        if member.flow == In:
            m.d.comb += inner.eq(outer)
        else:
            m.d.comb += outer.eq(inner)


class ControlSlave(wiring.Component):
    """The ``s_axi_control`` AXI4-Lite subordinate with ap_ctrl_hs (module docstring).

    Parameters
    ----------
    regmap : RegisterMap
        The map to implement (:func:`flightllm.hw.regmap.register_map`).

    Attributes
    ----------
    bus : Out(axil_signature(regmap.addr_bits))
        The AXI4-Lite port.
    start : Out(1)
        One-cycle pulse: a run begins (sample ``args`` now; they do not change during a
        run unless the host misbehaves).
    done : In(1)
        One-cycle pulse from the kernel: the run has ended (also its ap_ready).
    args : Out(regmap.args_layout())
        The host-written arguments (registered).
    status_in : In(regmap.status_layout())
        The kernel's status registers, shown on reads (``cycles`` is the slave's own).
    interrupt : Out(1)
        ``GIER & |(IP_ISR & IP_IER)``, registered.
    """

    def __init__(self, regmap: RegisterMap):
        self._MustUse__silence = True           # never built if the checks below raise
        if not isinstance(regmap, RegisterMap):
            hint = " (build one with flightllm.hw.regmap.register_map(params))" \
                if type(regmap).__name__ == "HwParams" else ""
            raise TypeError(f"ControlSlave needs a RegisterMap, not {type(regmap).__name__}{hint}")
        for r in regmap.registers:
            if r.offset % 4 or r.bits % DATA_BITS:
                raise ValueError(f"register {r.name!r}: offset 0x{r.offset:X} / {r.bits} bits are not whole "
                                 f"32-bit words")
            if r.access == "ctrl" and r.name not in ("CTRL", "GIER", "IP_IER", "IP_ISR"):
                raise ValueError(f"register {r.name!r}: unknown control register")
        if regmap.end > 1 << regmap.addr_bits:
            raise ValueError(f"register map ends at 0x{regmap.end:X}, past its {regmap.addr_bits}-bit address")
        self.regmap = regmap
        self._MustUse__silence = False
        super().__init__({
            "bus": Out(axil_signature(regmap.addr_bits)),
            "start": Out(1),
            "done": In(1),
            "args": Out(regmap.args_layout()),
            "status_in": In(regmap.status_layout()),
            "interrupt": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        rm, bus = self.regmap, self.bus
        wb = rm.addr_bits - 2                    # word address bits

        # -- control state -------------------------------------------------------------
        ap_start, ap_done, ap_ready = Signal(), Signal(), Signal()
        ap_idle = Signal(init=1)
        auto_restart, gie = Signal(), Signal()
        ier, isr = Signal(2), Signal(2)
        cnt = Signal(64)                          # cycles of the run in progress
        cycles = Signal(64)                       # of the last run

        # -- write channel: AW and W holding registers, then the write, then B ------------
        aw_full, w_full, bvalid = Signal(), Signal(), Signal()
        aw_word, w_data, w_strb = Signal(wb), Signal(DATA_BITS), Signal(DATA_BITS // 8)
        m.d.comb += [bus.awready.eq(~aw_full), bus.wready.eq(~w_full),
                     bus.bvalid.eq(bvalid), bus.bresp.eq(0)]
        with m.If(bus.awvalid & ~aw_full):
            m.d.sync += [aw_full.eq(1), aw_word.eq(bus.awaddr[2:])]
        with m.If(bus.wvalid & ~w_full):
            m.d.sync += [w_full.eq(1), w_data.eq(bus.wdata), w_strb.eq(bus.wstrb)]
        commit = Signal()
        m.d.comb += commit.eq(aw_full & w_full & (~bvalid | bus.bready))
        with m.If(commit):
            m.d.sync += [aw_full.eq(0), w_full.eq(0), bvalid.eq(1)]
        with m.Elif(bus.bready):
            m.d.sync += bvalid.eq(0)

        def wr(word):
            return commit & (aw_word == word)

        # the arguments: byte writes into their words
        args = self.args.as_value()
        layout = rm.args_layout()
        for r in rm.args:
            base = layout[r.name].offset
            for k in range(r.nwords):
                with m.If(wr((r.offset >> 2) + k)):
                    for j in range(DATA_BITS // 8):
                        with m.If(w_strb[j]):
                            lo = base + 32 * k + 8 * j
                            m.d.sync += args[lo:lo + 8].eq(w_data[8 * j:8 * j + 8])

        wr_ctrl, wr_isr = Signal(), Signal()
        m.d.comb += [wr_ctrl.eq(wr(CTRL >> 2) & w_strb[0]), wr_isr.eq(wr(IP_ISR >> 2) & w_strb[0])]
        with m.If(wr_ctrl):
            m.d.sync += auto_restart.eq((w_data & AUTO_RESTART).any())
        with m.If(wr(GIER >> 2) & w_strb[0]):
            m.d.sync += gie.eq((w_data & GIE).any())
        with m.If(wr(IP_IER >> 2) & w_strb[0]):
            m.d.sync += ier.eq(Cat((w_data & IRQ_DONE).any(), (w_data & IRQ_READY).any()))

        # -- read channel: address, lookup into rdata, R -----------------------------------
        r_pend, rvalid = Signal(), Signal()
        r_word, rdata = Signal(wb), Signal(DATA_BITS)
        m.d.comb += [bus.arready.eq(~(r_pend | rvalid)), bus.rvalid.eq(rvalid), bus.rdata.eq(rdata),
                     bus.rresp.eq(0)]
        with m.If(bus.arvalid & ~(r_pend | rvalid)):
            m.d.sync += [r_pend.eq(1), r_word.eq(bus.araddr[2:])]
        with m.If(r_pend):
            m.d.sync += [r_pend.eq(0), rvalid.eq(1)]
        with m.Elif(bus.rready):
            m.d.sync += rvalid.eq(0)

        def bits_of(mask):
            assert mask & (mask - 1) == 0
            return mask.bit_length() - 1

        ctrl_word = Signal(DATA_BITS)
        ctrl_bits = {AP_START: ap_start, AP_DONE: ap_done, AP_IDLE: ap_idle, AP_READY: ap_ready,
                     AUTO_RESTART: auto_restart}
        m.d.comb += [ctrl_word.eq(0)] + [ctrl_word[bits_of(b)].eq(s) for b, s in ctrl_bits.items()]
        sources = {"CTRL": ctrl_word, "GIER": gie, "IP_IER": ier, "IP_ISR": isr, "cycles": cycles}
        for r in rm.args:
            sources[r.name] = self.args[r.name]
        for r in rm.status:
            if r.name not in SLAVE_COUNTED:
                sources[r.name] = self.status_in[r.name]
        with m.If(r_pend):
            with m.Switch(r_word):
                for off, name, k in rm.words():
                    v = Value.cast(sources[name])
                    with m.Case(off >> 2):
                        m.d.sync += rdata.eq(v[32 * k:32 * k + 32])
                with m.Default():
                    m.d.sync += rdata.eq(0)
        rd_ctrl = Signal()
        m.d.comb += rd_ctrl.eq(r_pend & (r_word == CTRL >> 2))

        # -- ap_ctrl_hs ------------------------------------------------------------------
        host_start, done_now = Signal(), Signal()
        m.d.comb += [host_start.eq(wr_ctrl & (w_data & AP_START).any() & ap_idle),
                     done_now.eq(self.done & ~ap_idle)]
        m.d.sync += self.start.eq(host_start | (done_now & auto_restart))
        with m.If(host_start):
            m.d.sync += [ap_start.eq(1), ap_idle.eq(0)]
        with m.If(done_now):
            m.d.sync += [ap_done.eq(1), ap_ready.eq(1), cycles.eq(cnt)]
            with m.If(~auto_restart):
                m.d.sync += [ap_start.eq(0), ap_idle.eq(1)]
        with m.Elif(rd_ctrl | host_start):
            m.d.sync += [ap_done.eq(0), ap_ready.eq(0)]
        with m.If(self.start):
            m.d.sync += cnt.eq(1)
        with m.Elif(~ap_idle):
            m.d.sync += cnt.eq(cnt + 1)

        for b, mask in enumerate((IRQ_DONE, IRQ_READY)):
            assert mask == 1 << b
            with m.If(done_now & ier[b]):
                m.d.sync += isr[b].eq(1)
            with m.Elif(wr_isr & w_data[b]):
                m.d.sync += isr[b].eq(~isr[b])
        m.d.sync += self.interrupt.eq(gie & (isr & ier).any())
        return m
