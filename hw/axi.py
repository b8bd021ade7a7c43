"""The kernel's AXI4 memory ports, manager side: burst reader, burst writer and the muxes
that share one port among several units.

The kernel has one AXI4 manager port per HBM pseudo-channel (``m_axi_chNN``) plus one for
the instructions; several units share a channel's port (the weight streamer and LD read,
ST writes). Structure of one shared port::

  cmd -> [2-FIFO] -> split -> [burst] -credit-> [AR reg] --AR--> ReadMux --AR--> [AR skid] ---> m_axi AR
  data <- [data FIFO, depth D] <---------- R (rready = 1) <--     (RR per    <-R-- [R skid] <--- m_axi R
                                                                  burst, order FIFO)
  cmd -> [2-FIFO] -> split -> [burst] --> [AW reg] --AW--> WriteMux --AW--> [AW skid] ---> m_axi AW
                                   |-> wlen FIFO                (RR per burst; W locked to the
  data -> gate (wlen, beat count) -> [W skid] --W--> ...        granted client until wlast) [W skid] --> W
  done <- bq FIFO (last flag per burst) <--------- B (bready = 1) <--  order FIFO --  [B skid] <-- m_axi B

Port (:func:`axi4_signature`): the manager-side AXI4 signals, lower case without a prefix
(a kernel top flattens them to ``m_axi_<port>_<signal>``, :func:`axi4_top_members`). No
IDs: every response comes back in request order, which the muxes rely on (an HBM
pseudo-channel port of the U280 with one ID does this). ``arsize``/``awsize`` is always the
full data width, ``arburst``/``awburst`` always INCR.

Commands (:func:`command_layout`): ``addr`` a byte address (its bits below the beat size
are ignored: beat-aligned), ``beats`` 1 .. 2**24 - 1 data words; a 0-beat command is
taken and dropped (no burst, and no ``done`` from the writer). Each command is split
into bursts of at most ``max_burst`` beats that never cross a 4 KiB boundary
(:func:`burst_beats`, the one statement of that rule, used by the RTL and by
:func:`split_bursts`); consecutive commands follow each other without a gap.

Reader: a burst's AR is issued only when the data FIFO has room for every beat of it
(the credit is the FIFO depth minus the beats requested and not yet popped), so
``rready`` is a constant 1 and the HBM never sees backpressure on R; any number of bursts
may be outstanding within the credit. Writer: a burst's length goes into the wlen FIFO
when its AW is presented, and its W beats follow (so W never runs ahead of its AW; W of
burst k+1 never goes before burst k's AW); each issued burst's "last of its command" flag
waits in the bq FIFO for its B response (``bready`` a constant 1), and ``done`` pulses
once per command after the B of its last burst. An error response (``rresp`` /
``bresp`` != OKAY) sets a sticky ``error`` (cleared by reset only).

Timing (the design brief's rule): every ready this module drives comes from flip-flops
only: the command FIFOs' ``w_rdy``, the skid buffers' ``~full``, the muxes' registered
grants; ``rready`` and ``bready`` are constants. Every ``valid`` and payload towards AXI
leaves a register. The muxes add one register stage on each channel (a skid buffer:
the second register holds a beat only while the far side stalls).
"""

from __future__ import annotations

from amaranth import Array, Cat, Const, Module, Mux, Shape, Signal, Value, unsigned
from amaranth.lib import data, fifo, stream, wiring
from amaranth.lib.wiring import In, Out
from amaranth.utils import ceil_log2, exact_log2

__all__ = [
    "AXI_MAX_BURST", "AXI_PAGE_BYTES", "AXI_LEN_BITS", "AXI_SIZE_BITS", "AXI_BURST_BITS", "AXI_RESP_BITS",
    "AXI_BURST_INCR", "AXI_RESP_OKAY", "AXI_MAX_DATA_BITS", "BEATS_BITS",
    "axi4_signature", "axi4_top_members", "connect_axi4_top", "burst_beats", "split_bursts",
    "command_layout", "write_data_layout", "SkidBuffer", "BurstSplitter", "BurstReader", "BurstWriter",
    "ReadMux", "WriteMux",
]

#: Beats of the longest AXI4 INCR burst (``AxLEN`` is 8 bits: beats - 1).
AXI_MAX_BURST = 256
#: No burst crosses a boundary of this many bytes (AXI4, A3.4.1).
AXI_PAGE_BYTES = 4096
AXI_LEN_BITS = 8
AXI_SIZE_BITS = 3
AXI_BURST_BITS = 2
AXI_RESP_BITS = 2
AXI_BURST_INCR = 0b01
AXI_RESP_OKAY = 0b00
#: Widest AXI4 data bus.
AXI_MAX_DATA_BITS = 1024
#: Width of a command's ``beats`` field.
BEATS_BITS = 24


# ----------------------------------------------------------------------------- checks
def _int(who, name, v):
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{who}: {name} must be an int, not {v!r}")
    return v


def _check_data_bits(who, data_bits):
    _int(who, "data_bits", data_bits)
    if not 8 <= data_bits <= AXI_MAX_DATA_BITS or data_bits & (data_bits - 1):
        raise ValueError(f"{who}: data_bits must be a power of two in [8, {AXI_MAX_DATA_BITS}], not {data_bits}")


def _check_addr_bits(who, addr_bits):
    _int(who, "addr_bits", addr_bits)
    if not 13 <= addr_bits <= 64:
        raise ValueError(f"{who}: addr_bits must be in [13, 64] (byte addresses above one 4 KiB page), "
                         f"not {addr_bits}")


def _check_max_burst(who, max_burst):
    _int(who, "max_burst", max_burst)
    if not 1 <= max_burst <= AXI_MAX_BURST:
        raise ValueError(f"{who}: max_burst must be in [1, {AXI_MAX_BURST}], not {max_burst}")


def _check_depth(who, name, depth, lo):
    _int(who, name, depth)
    if depth < lo:
        raise ValueError(f"{who}: {name} must be at least {lo}, not {depth}")


def _checked(component, *checks):
    """Run ``checks`` (thunks); on an error silence ``component``'s unused-elaboratable
    warning (it is never built) and raise it."""
    try:
        for check in checks:
            check()
    except (TypeError, ValueError):
        component._MustUse__silence = True
        raise


# ----------------------------------------------------------------------------- the bus
def axi4_signature(addr_bits: int = 64, data_bits: int = 512, *, read: bool = True,
                   write: bool = True) -> wiring.Signature:
    """The AXI4 manager port (``Out(axi4_signature(..))`` on a manager, ``In(..)`` on a
    subordinate), without IDs, as Vitis RTL kernels' ``m_axi`` ports.

    Members (manager's direction), lower-case AXI names: read ``arvalid`` ``arready``\\ (In)
    ``araddr`` ``arlen``\\ (8) ``arsize``\\ (3) ``arburst``\\ (2), ``rvalid``\\ (In) ``rready``
    ``rdata``\\ (In) ``rlast``\\ (In) ``rresp``\\ (In, 2); write ``awvalid`` ``awready``\\ (In)
    ``awaddr`` ``awlen`` ``awsize`` ``awburst``, ``wvalid`` ``wready``\\ (In) ``wdata`` ``wstrb``
    ``wlast``, ``bvalid``\\ (In) ``bready`` ``bresp``\\ (In).

    Parameters
    ----------
    addr_bits : int
        Byte address width, 13..64 (Vitis uses 64).
    data_bits : int
        Data width, a power of two 8..1024 (512 for a U280 HBM port at the kernel clock).
    read, write : bool
        Include the read channels (AR, R) / the write channels (AW, W, B); at least one.

    Raises
    ------
    TypeError
        A width or flag of the wrong type.
    ValueError
        A width out of range, or neither channel set.
    """
    who = "axi4_signature"
    _check_addr_bits(who, addr_bits)
    _check_data_bits(who, data_bits)
    for name, v in (("read", read), ("write", write)):
        if not isinstance(v, bool):
            raise TypeError(f"{who}: {name} must be a bool, not {v!r}")
    if not (read or write):
        raise ValueError(f"{who}: a port needs the read or the write channels (read=False, write=False)")
    members = {}
    if read:
        members.update({
            "arvalid": Out(1), "arready": In(1), "araddr": Out(addr_bits), "arlen": Out(AXI_LEN_BITS),
            "arsize": Out(AXI_SIZE_BITS), "arburst": Out(AXI_BURST_BITS),
            "rvalid": In(1), "rready": Out(1), "rdata": In(data_bits), "rlast": In(1), "rresp": In(AXI_RESP_BITS),
        })
    if write:
        members.update({
            "awvalid": Out(1), "awready": In(1), "awaddr": Out(addr_bits), "awlen": Out(AXI_LEN_BITS),
            "awsize": Out(AXI_SIZE_BITS), "awburst": Out(AXI_BURST_BITS),
            "wvalid": Out(1), "wready": In(1), "wdata": Out(data_bits), "wstrb": Out(data_bits // 8),
            "wlast": Out(1),
            "bvalid": In(1), "bready": Out(1), "bresp": In(AXI_RESP_BITS),
        })
    return wiring.Signature(members)


def axi4_top_members(prefix: str, addr_bits: int = 64, data_bits: int = 512, *, read: bool = True,
                     write: bool = True) -> dict:
    """The manager port as plain top-level members ``<prefix>_<signal>`` (``m_axi_ch00_arvalid``
    ..., what Vitis expects of an RTL kernel); wire them with :func:`connect_axi4_top`."""
    if not isinstance(prefix, str) or not prefix.isidentifier():
        raise ValueError(f"axi4_top_members: prefix must be an identifier, not {prefix!r}")
    sig = axi4_signature(addr_bits, data_bits, read=read, write=write)
    return {f"{prefix}_{name}": member for name, member in sig.members.items()}


def connect_axi4_top(m: Module, top, prefix: str, axi) -> None:
    """Connect the members ``<prefix>_<signal>`` of component ``top`` (:func:`axi4_top_members`)
    to the manager port ``axi`` (e.g. a :class:`ReadMux`'s ``axi``). Only ``axi``'s members
    are wired, so a read-only and a write-only manager may share one top-level port."""
    for name, member in axi.signature.members.items():
        outer, inner = getattr(top, f"{prefix}_{name}"), getattr(axi, name)
        if member.flow == Out:
            m.d.comb += outer.eq(inner)
        else:
            m.d.comb += inner.eq(outer)


# ----------------------------------------------------------------------------- the burst rule
def burst_beats(addr, remaining, beat_bytes: int, max_burst: int):
    """Beats of the next burst of a transfer: at most ``remaining`` and ``max_burst``, and
    no further than the next 4 KiB boundary. The one statement of the rule.

    Parameters
    ----------
    addr : int or Value
        Byte address the burst starts at (bits below ``beat_bytes`` ignored).
    remaining : int or Value
        Beats of the transfer still to request (>= 1).
    beat_bytes : int
        Bytes per beat (a power of two up to 128).
    max_burst : int
        Longest burst, 1..256.

    Returns
    -------
    int, or a Value (``range(max_burst + 1)``) when ``addr`` or ``remaining`` is one.
    """
    lg = exact_log2(beat_bytes)
    page_beats = AXI_PAGE_BYTES // beat_bytes
    if isinstance(addr, int) and isinstance(remaining, int):
        to_page = page_beats - (addr % AXI_PAGE_BYTES) // beat_bytes
        return min(remaining, max_burst, to_page)
    addr, remaining = Value.cast(addr), Value.cast(remaining)
    nb = Shape.cast(range(page_beats + 1)).width
    to_page = (page_beats - addr[lg:12])[:nb]             # 1 .. page_beats
    cap = Mux(to_page < max_burst, to_page, max_burst) if max_burst < page_beats else to_page
    return Mux(remaining < cap, remaining, cap)


def split_bursts(addr: int, beats: int, data_bits: int, max_burst: int) -> list:
    """The bursts ``[(byte address, beats), ...]`` a command of ``beats`` words from ``addr``
    becomes (what :class:`BurstReader` and :class:`BurstWriter` issue)."""
    who = "split_bursts"
    _check_data_bits(who, data_bits)
    _check_max_burst(who, max_burst)
    bb = data_bits // 8
    addr = _int(who, "addr", addr) & ~(bb - 1)
    left = _int(who, "beats", beats)
    out = []
    while left > 0:
        n = burst_beats(addr, left, bb, max_burst)
        out.append((addr, n))
        addr, left = addr + n * bb, left - n
    return out


def command_layout(addr_bits: int = 64) -> data.StructLayout:
    """A read or write command: ``addr`` (byte address, beat-aligned), ``beats`` (words)."""
    _check_addr_bits("command_layout", addr_bits)
    return data.StructLayout({"addr": unsigned(addr_bits), "beats": unsigned(BEATS_BITS)})


def write_data_layout(data_bits: int) -> data.StructLayout:
    """A beat of write data: ``data`` and its byte enables ``strb`` (bit ``i``: byte ``i``)."""
    _check_data_bits("write_data_layout", data_bits)
    return data.StructLayout({"data": unsigned(data_bits), "strb": unsigned(data_bits // 8)})


def _burst_layout(addr_bits):
    return data.StructLayout({"addr": unsigned(addr_bits), "len": unsigned(AXI_LEN_BITS), "last": 1})


# ----------------------------------------------------------------------------- building blocks
class SkidBuffer(wiring.Component):
    """A registered stream stage with a registered ``i.ready``: full rate, one cycle of latency.

    ::

      i --> [o reg] --> o          i.ready = ~skid_full (a register)
       \\--> [skid reg] --/         the skid holds the beat taken while o stalled

    Parameters
    ----------
    shape : ShapeLike
        The payload.

    Attributes
    ----------
    i : In(stream.Signature(shape))
    o : Out(stream.Signature(shape))
    """

    def __init__(self, shape):
        self.shape = shape
        super().__init__({"i": In(stream.Signature(shape)), "o": Out(stream.Signature(shape))})

    def elaborate(self, platform):
        m = Module()
        i, o = self.i, self.o
        ov, sv = Signal(), Signal()
        op = Signal(self.shape, reset_less=True)          # the output register
        sp = Signal(self.shape, reset_less=True)          # the skid register
        m.d.comb += [i.ready.eq(~sv), o.valid.eq(ov), o.payload.eq(op)]
        with m.If(~ov | o.ready):
            with m.If(sv):
                m.d.sync += [op.eq(sp), ov.eq(1), sv.eq(0)]
            with m.Else():
                m.d.sync += ov.eq(i.valid)
                with m.If(i.valid):
                    m.d.sync += op.eq(i.payload)
        with m.Elif(i.valid & ~sv):
            m.d.sync += [sv.eq(1), sp.eq(i.payload)]
        return m


def _arbiter(m: Module, valid: list, can: Value, name: str):
    """Round-robin arbiter with a registered grant.

    ``valid``: the clients' requests (an AXI valid stays high until its handshake).
    ``can``: the shared side takes a request this cycle (from registers). Returns
    ``(ready, fire, sel)``: per-client readys (``grant & can``: from registers only), the
    handshake of the granted client, and the granted index (a register).

    The grant moves when it is unused (none, or its client not valid) or used: to the first
    valid client after it, itself last (so one client alone runs at full rate, and several
    take turns per request).
    """
    n = len(valid)
    if n == 1:
        fire = valid[0] & can
        return [can], fire, Const(0, 1)
    sel = Signal(range(n), name=f"{name}_sel")
    gv = Signal(name=f"{name}_granted")
    v = Cat(valid)
    vsel = v.bit_select(sel, 1)
    fire = Signal(name=f"{name}_fire")
    m.d.comb += fire.eq(gv & vsel & can)
    with m.If(~gv | ~vsel | fire):
        m.d.sync += gv.eq(v.any())
        with m.Switch(sel):
            for start in range(n):
                with m.Case(start):
                    order = [(start + 1 + k) % n for k in range(n)]
                    for k in reversed(order):          # the last assignment wins: order[0] first
                        with m.If(v[k]):
                            m.d.sync += sel.eq(k)
    ready = [gv & (sel == k) & can for k in range(n)]
    return ready, fire, sel


class BurstSplitter(wiring.Component):
    """Commands to bursts (module docstring): at most ``max_burst`` beats, none across 4 KiB.

    ::

      cmd -> [SyncFIFO depth 2] -> state (addr, remaining) -> burst_beats -> [burst reg] -> burst

    ``cmd.ready`` is the FIFO's ``w_rdy`` (a register compare); the state takes the next
    command in the cycle it hands out the last burst of the current one, so commands
    follow each other without a gap; one burst per cycle.

    Parameters
    ----------
    data_bits, addr_bits, max_burst : int

    Attributes
    ----------
    cmd : In(stream of :func:`command_layout`)
    burst : Out(stream of {addr, len (AXI: beats - 1), last (of its command)})
    idle : Out(1)
        No command held, none being split, no burst waiting.
    """

    def __init__(self, data_bits: int, addr_bits: int = 64, max_burst: int = 64):
        who = type(self).__name__
        _checked(self, lambda: _check_data_bits(who, data_bits), lambda: _check_addr_bits(who, addr_bits),
                 lambda: _check_max_burst(who, max_burst))
        self.data_bits, self.addr_bits, self.max_burst = data_bits, addr_bits, max_burst
        super().__init__({
            "cmd": In(stream.Signature(command_layout(addr_bits))),
            "burst": Out(stream.Signature(_burst_layout(addr_bits))),
            "idle": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        bb = self.data_bits // 8
        lg = exact_log2(bb)
        cl = command_layout(self.addr_bits)
        q = m.submodules.cmd_fifo = fifo.SyncFIFO(width=cl.size, depth=2)
        m.d.comb += [q.w_en.eq(self.cmd.valid), q.w_data.eq(self.cmd.payload), self.cmd.ready.eq(q.w_rdy)]
        head = data.View(cl, q.r_data)

        active = Signal()
        addr = Signal(self.addr_bits)
        rem = Signal(BEATS_BITS)
        n = Signal(range(min(self.max_burst, AXI_PAGE_BYTES // bb) + 1))
        m.d.comb += n.eq(burst_beats(addr, rem, bb, self.max_burst))
        last = rem == n
        b = self.burst
        advance = ~b.valid | b.ready
        take = active & advance
        with m.If(advance):
            m.d.sync += b.valid.eq(active)
        with m.If(take):
            m.d.sync += [b.payload.addr.eq(addr), b.payload.len.eq(n - 1), b.payload.last.eq(last),
                         addr.eq(addr + (n << lg)), rem.eq(rem - n)]
        with m.If(~active | (take & last)):
            m.d.comb += q.r_en.eq(1)
            m.d.sync += [active.eq(q.r_rdy & (head.beats != 0)),
                         addr.eq(Cat(Const(0, lg), head.addr[lg:])), rem.eq(head.beats)]
        m.d.comb += self.idle.eq(~q.r_rdy & ~active & ~b.valid)
        return m


# ----------------------------------------------------------------------------- reader
class BurstReader(wiring.Component):
    """Reads commands of words from memory into a stream (module docstring).

    ::

      cmd -> BurstSplitter -> burst -- credit (free >= beats) --> [AR reg] --> axi AR
      data <-- [SyncFIFOBuffered, fifo_depth] <------------- axi R (rready = 1)
               pops return credit: free = fifo_depth - (beats requested, not yet popped)

    Parameters
    ----------
    data_bits : int
        Data width of the port (``HwParams.hbm_port_bits``).
    addr_bits : int
    max_burst : int
        Longest burst in beats (1..256); a burst also ends at every 4 KiB boundary.
    fifo_depth : int
        Words of the data FIFO (block RAM): the beats that may be in flight, at least
        ``max_burst`` (``HwParams.stream_fifo_beats``; it should cover the memory's latency
        times the port's rate for full bandwidth).

    Attributes
    ----------
    cmd : In(stream of :func:`command_layout`)
    data : Out(stream of unsigned(data_bits))
        The words of the commands, in order.
    axi : Out(axi4_signature(addr_bits, data_bits, write=False))
    idle : Out(1)
        Nothing queued, in flight or left in the data FIFO.
    error : Out(1)
        Sticky: an R beat came with ``rresp`` != OKAY (its data is passed on all the same).
    """

    def __init__(self, data_bits: int, addr_bits: int = 64, max_burst: int = 64, fifo_depth: int = 512):
        who = type(self).__name__
        _checked(self, lambda: _check_data_bits(who, data_bits), lambda: _check_addr_bits(who, addr_bits),
                 lambda: _check_max_burst(who, max_burst),
                 lambda: _check_depth(who, "fifo_depth", fifo_depth, max(max_burst, 3)))
        self.data_bits, self.addr_bits, self.max_burst, self.fifo_depth = data_bits, addr_bits, max_burst, fifo_depth
        self._split = BurstSplitter(data_bits, addr_bits, max_burst)
        self._fifo = fifo.SyncFIFOBuffered(width=data_bits, depth=fifo_depth)
        super().__init__({
            "cmd": In(stream.Signature(command_layout(addr_bits))),
            "data": Out(stream.Signature(unsigned(data_bits))),
            "axi": Out(axi4_signature(addr_bits, data_bits, write=False)),
            "idle": Out(1),
            "error": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        sp, df, axi = self._split, self._fifo, self.axi
        m.submodules.split, m.submodules.data_fifo = sp, df
        wiring.connect(m, wiring.flipped(self.cmd), sp.cmd)
        D = self.fifo_depth
        b = sp.burst.payload

        free = Signal(range(D + 1), init=D)
        issue = Signal()
        m.d.comb += issue.eq(sp.burst.valid & (~axi.arvalid | axi.arready) & (free > b.len))
        m.d.comb += sp.burst.ready.eq(issue)
        with m.If(axi.arvalid & axi.arready):
            m.d.sync += axi.arvalid.eq(0)
        with m.If(issue):
            m.d.sync += [axi.arvalid.eq(1), axi.araddr.eq(b.addr), axi.arlen.eq(b.len)]
        pop = self.data.valid & self.data.ready
        m.d.sync += free.eq(free + pop - Mux(issue, b.len + 1, 0))

        m.d.comb += [
            axi.arsize.eq(exact_log2(self.data_bits // 8)), axi.arburst.eq(AXI_BURST_INCR),
            axi.rready.eq(1),
            df.w_en.eq(axi.rvalid), df.w_data.eq(axi.rdata),
            self.data.valid.eq(df.r_rdy), self.data.payload.eq(df.r_data), df.r_en.eq(self.data.ready),
            self.idle.eq(sp.idle & ~axi.arvalid & (free == D)),
        ]
        with m.If(axi.rvalid & (axi.rresp != AXI_RESP_OKAY)):
            m.d.sync += self.error.eq(1)
        return m


# ----------------------------------------------------------------------------- writer
class BurstWriter(wiring.Component):
    """Writes a stream of words to memory by commands (module docstring).

    ::

      cmd -> BurstSplitter -> burst --> [AW reg] -----------------------------> axi AW
                                 |-> wlen FIFO (len)      bq FIFO (last flag)
      data --> gate: a wlen entry, beat count -> wlast --> [W skid] ------------> axi W
      done <-- [reg] <-- pop bq on B: its flag ----------------------------------- axi B (bready = 1)

    Parameters
    ----------
    data_bits, addr_bits, max_burst : int
        As :class:`BurstReader`.
    outstanding : int
        Bursts whose B response may be pending (the depth of the wlen and bq FIFOs).

    Attributes
    ----------
    cmd : In(stream of :func:`command_layout`)
    data : In(stream of :func:`write_data_layout`)
        The words of the commands, in order; ``strb`` per byte.
    axi : Out(axi4_signature(addr_bits, data_bits, read=False))
    done : Out(1)
        One pulse per command, after the B response of its last burst (the data is in
        memory: a read issued afterwards sees it).
    idle : Out(1)
        Nothing queued or in flight (every B received).
    error : Out(1)
        Sticky: a B came with ``bresp`` != OKAY (its command still gets its ``done``).

    An AW may be issued before the burst's data has arrived on ``data``; a shared port
    (:class:`WriteMux`) then holds W for this writer until it comes, so a client should
    present a command when its data is at hand.
    """

    def __init__(self, data_bits: int, addr_bits: int = 64, max_burst: int = 64, outstanding: int = 16):
        who = type(self).__name__
        _checked(self, lambda: _check_data_bits(who, data_bits), lambda: _check_addr_bits(who, addr_bits),
                 lambda: _check_max_burst(who, max_burst), lambda: _check_depth(who, "outstanding", outstanding, 2))
        self.data_bits, self.addr_bits, self.max_burst, self.outstanding = data_bits, addr_bits, max_burst, outstanding
        self._split = BurstSplitter(data_bits, addr_bits, max_burst)
        self._wskid = SkidBuffer(data.StructLayout({"data": data_bits, "strb": data_bits // 8, "last": 1}))
        super().__init__({
            "cmd": In(stream.Signature(command_layout(addr_bits))),
            "data": In(stream.Signature(write_data_layout(data_bits))),
            "axi": Out(axi4_signature(addr_bits, data_bits, read=False)),
            "done": Out(1),
            "idle": Out(1),
            "error": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        sp, sk, axi = self._split, self._wskid, self.axi
        m.submodules.split, m.submodules.w_skid = sp, sk
        wiring.connect(m, wiring.flipped(self.cmd), sp.cmd)
        wlen = m.submodules.wlen_fifo = fifo.SyncFIFO(width=AXI_LEN_BITS, depth=self.outstanding)
        bq = m.submodules.b_fifo = fifo.SyncFIFO(width=1, depth=self.outstanding)
        b = sp.burst.payload

        # -- AW: one register, loaded when the burst's W length and B flag have room
        issue = Signal()
        m.d.comb += issue.eq(sp.burst.valid & (~axi.awvalid | axi.awready) & wlen.w_rdy & bq.w_rdy)
        m.d.comb += [sp.burst.ready.eq(issue),
                     wlen.w_en.eq(issue), wlen.w_data.eq(b.len), bq.w_en.eq(issue), bq.w_data.eq(b.last)]
        with m.If(axi.awvalid & axi.awready):
            m.d.sync += axi.awvalid.eq(0)
        with m.If(issue):
            m.d.sync += [axi.awvalid.eq(1), axi.awaddr.eq(b.addr), axi.awlen.eq(b.len)]
        m.d.comb += [axi.awsize.eq(exact_log2(self.data_bits // 8)), axi.awburst.eq(AXI_BURST_INCR)]

        # -- W: beats pass only for a burst whose AW is presented; wlast from the beat count
        cnt = Signal(AXI_LEN_BITS)
        last = cnt == wlen.r_data
        m.d.comb += [
            self.data.ready.eq(wlen.r_rdy & sk.i.ready),
            sk.i.valid.eq(self.data.valid & wlen.r_rdy),
            sk.i.payload.data.eq(self.data.payload.data), sk.i.payload.strb.eq(self.data.payload.strb),
            sk.i.payload.last.eq(last),
        ]
        with m.If(self.data.valid & self.data.ready):
            m.d.sync += cnt.eq(Mux(last, 0, cnt + 1))
            m.d.comb += wlen.r_en.eq(last)
        m.d.comb += [axi.wvalid.eq(sk.o.valid), axi.wdata.eq(sk.o.payload.data), axi.wstrb.eq(sk.o.payload.strb),
                     axi.wlast.eq(sk.o.payload.last), sk.o.ready.eq(axi.wready)]

        # -- B: in order; the popped flag says whether a command ended
        m.d.comb += [axi.bready.eq(1), bq.r_en.eq(axi.bvalid)]
        m.d.sync += self.done.eq(axi.bvalid & bq.r_rdy & bq.r_data[0])
        with m.If(axi.bvalid & (axi.bresp != AXI_RESP_OKAY)):
            m.d.sync += self.error.eq(1)
        m.d.comb += self.idle.eq(sp.idle & ~axi.awvalid & ~bq.r_rdy)
        return m


# ----------------------------------------------------------------------------- muxes
def _check_mux(who, n, data_bits, addr_bits, depth):
    _int(who, "n", n)
    if n < 1:
        raise ValueError(f"{who}: n must be at least 1, not {n}")
    _check_data_bits(who, data_bits)
    _check_addr_bits(who, addr_bits)
    _check_depth(who, "depth", depth, 2)


def _addr_layout(addr_bits):
    return data.StructLayout({"addr": unsigned(addr_bits), "len": unsigned(AXI_LEN_BITS),
                              "size": unsigned(AXI_SIZE_BITS), "burst": unsigned(AXI_BURST_BITS)})


class ReadMux(wiring.Component):
    """``n`` read managers on one AXI4 read port (in-order responses, no IDs).

    ::

      clients[i] AR --> RR arbiter (registered grant, per burst) --> [AR skid] --> axi AR
                                      \\--> order FIFO (client index) --+
      clients[i] R <-- rvalid to client idx <-- [R skid: beat, idx] <-- axi R  (idx = order head,
                                                                               popped on rlast)

    Parameters
    ----------
    n : int
        Clients.
    data_bits, addr_bits : int
    depth : int
        Bursts that may be in flight through the mux (the order FIFO, LUT RAM).

    Attributes
    ----------
    clients : In(axi4_signature(addr_bits, data_bits, write=False)).array(n)
        The mux is their subordinate (connect a :class:`BurstReader`'s ``axi``).
    base : In(addr_bits)
        Added to every address on its way into the AR skid register, so the port's ``araddr``
        comes from a register (the clients address their buffer from 0; the kernel's pointer
        argument is the buffer's base).
    axi : Out(axi4_signature(addr_bits, data_bits, write=False))

    Every ready it drives is from registers: ``arready[i]`` = grant & room, ``rready`` =
    the R skid's ``~full``. A client that keeps ``rready`` high (a :class:`BurstReader`)
    never lets the skid fill, so the memory sees no backpressure.
    """

    def __init__(self, n: int, data_bits: int, addr_bits: int = 64, depth: int = 32):
        _checked(self, lambda: _check_mux(type(self).__name__, n, data_bits, addr_bits, depth))
        self.n, self.data_bits, self.addr_bits, self.depth = n, data_bits, addr_bits, depth
        self._idx_bits = max(1, ceil_log2(n))
        sig = axi4_signature(addr_bits, data_bits, write=False)
        self._ar = SkidBuffer(_addr_layout(addr_bits))
        self._r = SkidBuffer(data.StructLayout({"data": data_bits, "resp": AXI_RESP_BITS, "last": 1,
                                                "idx": self._idx_bits}))
        super().__init__({"clients": In(sig).array(n), "base": In(addr_bits), "axi": Out(sig)})

    def elaborate(self, platform):
        m = Module()
        cs, axi, ar, r = self.clients, self.axi, self._ar, self._r
        m.submodules.ar_skid, m.submodules.r_skid = ar, r
        order = m.submodules.order = fifo.SyncFIFO(width=self._idx_bits, depth=self.depth)

        can = ar.i.ready & order.w_rdy
        ready, fire, sel = _arbiter(m, [c.arvalid for c in cs], can, "ar")
        for c, rdy in zip(cs, ready):
            m.d.comb += c.arready.eq(rdy)
        pick = Array(cs)
        m.d.comb += [
            ar.i.valid.eq(fire),
            ar.i.payload.addr.eq(pick[sel].araddr + self.base), ar.i.payload.len.eq(pick[sel].arlen),
            ar.i.payload.size.eq(pick[sel].arsize), ar.i.payload.burst.eq(pick[sel].arburst),
            order.w_en.eq(fire), order.w_data.eq(sel),
            axi.arvalid.eq(ar.o.valid), axi.araddr.eq(ar.o.payload.addr), axi.arlen.eq(ar.o.payload.len),
            axi.arsize.eq(ar.o.payload.size), axi.arburst.eq(ar.o.payload.burst), ar.o.ready.eq(axi.arready),
        ]

        m.d.comb += [
            r.i.valid.eq(axi.rvalid), axi.rready.eq(r.i.ready),
            r.i.payload.data.eq(axi.rdata), r.i.payload.resp.eq(axi.rresp), r.i.payload.last.eq(axi.rlast),
            r.i.payload.idx.eq(order.r_data),
            order.r_en.eq(axi.rvalid & axi.rready & axi.rlast),
        ]
        idx = r.o.payload.idx
        for k, c in enumerate(cs):
            m.d.comb += [c.rvalid.eq(r.o.valid & (idx == k)), c.rdata.eq(r.o.payload.data),
                         c.rresp.eq(r.o.payload.resp), c.rlast.eq(r.o.payload.last)]
        m.d.comb += r.o.ready.eq(Array(c.rready for c in cs)[idx])
        return m


class WriteMux(wiring.Component):
    """``n`` write managers on one AXI4 write port (in-order responses, no IDs).

    ::

      clients[i] AW --> RR arbiter (registered grant, per burst) --> [AW skid] --> axi AW
                                      \\--> W order FIFO, B order FIFO (client index)
      clients[w head] W --> [W skid] --> axi W      (W order FIFO popped on wlast: the W beats
                                                     of a burst come from its AW's client)
      clients[i] B <-- bvalid to client idx <-- [B skid: resp, idx] <-- axi B (idx = B order head)

    Parameters
    ----------
    n, data_bits, addr_bits, depth : int
        As :class:`ReadMux` (``depth``: bursts in flight, both order FIFOs).

    Attributes
    ----------
    clients : In(axi4_signature(addr_bits, data_bits, read=False)).array(n)
    base : In(addr_bits)
        Added to every address on its way into the AW skid register (as :class:`ReadMux`).
    axi : Out(axi4_signature(addr_bits, data_bits, read=False))
    """

    def __init__(self, n: int, data_bits: int, addr_bits: int = 64, depth: int = 32):
        _checked(self, lambda: _check_mux(type(self).__name__, n, data_bits, addr_bits, depth))
        self.n, self.data_bits, self.addr_bits, self.depth = n, data_bits, addr_bits, depth
        self._idx_bits = max(1, ceil_log2(n))
        sig = axi4_signature(addr_bits, data_bits, read=False)
        self._aw = SkidBuffer(_addr_layout(addr_bits))
        self._w = SkidBuffer(data.StructLayout({"data": data_bits, "strb": data_bits // 8, "last": 1}))
        self._b = SkidBuffer(data.StructLayout({"resp": AXI_RESP_BITS, "idx": self._idx_bits}))
        super().__init__({"clients": In(sig).array(n), "base": In(addr_bits), "axi": Out(sig)})

    def elaborate(self, platform):
        m = Module()
        cs, axi, aw, w, b = self.clients, self.axi, self._aw, self._w, self._b
        m.submodules.aw_skid, m.submodules.w_skid, m.submodules.b_skid = aw, w, b
        wq = m.submodules.w_order = fifo.SyncFIFO(width=self._idx_bits, depth=self.depth)
        bq = m.submodules.b_order = fifo.SyncFIFO(width=self._idx_bits, depth=self.depth)

        can = aw.i.ready & wq.w_rdy & bq.w_rdy
        ready, fire, sel = _arbiter(m, [c.awvalid for c in cs], can, "aw")
        for c, rdy in zip(cs, ready):
            m.d.comb += c.awready.eq(rdy)
        pick = Array(cs)
        m.d.comb += [
            aw.i.valid.eq(fire),
            aw.i.payload.addr.eq(pick[sel].awaddr + self.base), aw.i.payload.len.eq(pick[sel].awlen),
            aw.i.payload.size.eq(pick[sel].awsize), aw.i.payload.burst.eq(pick[sel].awburst),
            wq.w_en.eq(fire), wq.w_data.eq(sel), bq.w_en.eq(fire), bq.w_data.eq(sel),
            axi.awvalid.eq(aw.o.valid), axi.awaddr.eq(aw.o.payload.addr), axi.awlen.eq(aw.o.payload.len),
            axi.awsize.eq(aw.o.payload.size), axi.awburst.eq(aw.o.payload.burst), aw.o.ready.eq(axi.awready),
        ]

        head = wq.r_data
        for k, c in enumerate(cs):
            m.d.comb += c.wready.eq(wq.r_rdy & (head == k) & w.i.ready)
        m.d.comb += [
            w.i.valid.eq(wq.r_rdy & pick[head].wvalid),
            w.i.payload.data.eq(pick[head].wdata), w.i.payload.strb.eq(pick[head].wstrb),
            w.i.payload.last.eq(pick[head].wlast),
            wq.r_en.eq(w.i.valid & w.i.ready & w.i.payload.last),
            axi.wvalid.eq(w.o.valid), axi.wdata.eq(w.o.payload.data), axi.wstrb.eq(w.o.payload.strb),
            axi.wlast.eq(w.o.payload.last), w.o.ready.eq(axi.wready),
        ]

        m.d.comb += [
            b.i.valid.eq(axi.bvalid), axi.bready.eq(b.i.ready),
            b.i.payload.resp.eq(axi.bresp), b.i.payload.idx.eq(bq.r_data),
            bq.r_en.eq(axi.bvalid & axi.bready),
        ]
        idx = b.o.payload.idx
        for k, c in enumerate(cs):
            m.d.comb += [c.bvalid.eq(b.o.valid & (idx == k)), c.bresp.eq(b.o.payload.resp)]
        m.d.comb += b.o.ready.eq(Array(c.bready for c in cs)[idx])
        return m
