"""The on-chip buffers: one memory per region, word-addressed ports for every unit.

The buffers of :class:`~flightllm.hw.isa.Buf` (and the SFU tables) as they are laid out
in the RTL. :func:`buffer_map` is the one definition of that layout: the RTL
(:class:`Buffers`, the SFU unit), the testbenches and the compiler's capacity check
(:func:`capacity`, used by :func:`flightllm.compiler.schedule.check_buffers`) all read it.

Regions
-------
A *region* is one memory of ``words`` words of ``L = sfu_lanes`` lanes; element ``e`` of
row ``r`` is lane ``e % L`` of word ``r * row_words + e // L``. Every buffer is one region
of its elements (float32, or int8 in the low byte of a lane); an int8 buffer has two
more: its float32 scales (one per segment of 32 or more, or one per row) and its uint8
group factors (one per group of 32 or more), each ``width / 32`` entries per row. The
SFU tables (norm weights, the RoPE table) are one more float32 region of one row.

Sizes (``T = mm_tokens`` rows, widths from the model envelope in :class:`HwParams`):

=================================  ===========================  =====================
buffers                            row (elements)               rows
=================================  ===========================  =====================
X H Q K V A Y (float32)            ``buf_hidden``               ``T``
G U (float32)                      ``buf_ffn``                  ``T``
LOG (float32)                      ``buf_vocab``                ``T``
S (float32), PQ (int8)             ``buf_heads x max_seq_len``  ``T``
HQ (int8)                          ``max(buf_hidden, buf_ffn)`` ``T``
QQ KQ VQ (int8)                    ``buf_hidden``               ``T``
KS VS (float32, transposed)        ``max_seq_len``              ``buf_kv_heads``
tables (float32)                   ``buf_tables``               1
=================================  ===========================  =====================

The KV scale buffers are logically ``positions x kv heads`` (what LD_KV loads) but are
stored transposed, one row per kv head, so that one head's scales over the positions
(what QK and SOFTMAX read) are consecutive words. The score and probability rows hold
the heads one after the other, ``cap`` elements each; a head's probability factors
start at a whole word (``ceil(cap / 32 / L)`` words per head), so every SFU access is
word-aligned.

Placement: regions of at least :data:`URAM_MIN_WORDS` words carry ``ram_style = "ultra"``
(UltraRAM), the others ``"block"`` (:func:`ram_style`).

Ports
-----
:class:`Buffers` has one :func:`port_signature` port per client (the SFU's streams, a
testbench or host loader, the matrix engine and LD/ST): a read-request stream
(region, word), an always-ready read-data stream (clients issue only what they can
take: credit-based), and a write stream (region, word, L lanes, lane mask). Each
request enters a two-entry FIFO (a registered ``ready``); each region serves one read
and one write per cycle, round-robin between the clients asking for it. Read data
returns ``READ_LATENCY`` cycles after the request leaves the client's FIFO, in request
order per client. Int8 and uint8 lanes read back zero-extended.

Reach. A client may declare the regions it reads and writes (:class:`Reach`, which each
unit derives from the buffers its own decode accepts: ``reach`` of the MPE, SFU, LD/ST
engines and the tables loader). Only those regions are wired to it: a region arbitrates
between the clients that reach it, and a client's read-data mux spans only the regions
it reads. At u280 size the crossbar is most of the buffers' logic, and most units touch
few regions (the tables loader one, the MPE's output only the float32 rows), so this is
where its LUTs go down. A request outside the client's reach is taken and dropped: a
read returns zeros, a write changes nothing (and still pulses ``wr_done``), so a unit
that errs cannot hang the buffers. A client given by name only reaches every region.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from amaranth import Cat, Const, Module, Signal, unsigned
from amaranth.lib import data, fifo, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from .isa import Buf
from .params import HwParams

__all__ = ["Region", "Reach", "buf_regions", "buffer_map", "capacity", "port_signature", "Buffers", "READ_LATENCY",
           "SIDE_SEGMENT", "TABLES", "images", "ram_style", "URAM_MIN_WORDS", "BuffersTop", "top_port_members",
           "connect_top_port"]

SIDE_SEGMENT = 32               #: smallest segment / group with its own scale / factor
READ_LATENCY = 2                #: request accepted from a client's FIFO -> read data valid

_HIDDEN = (Buf.X, Buf.H, Buf.Q, Buf.K, Buf.V, Buf.A, Buf.Y)
_INT8 = (Buf.HQ, Buf.QQ, Buf.KQ, Buf.VQ, Buf.PQ)
TABLES = "TAB"                  #: the name of the SFU tables' region


@dataclass(frozen=True)
class Region:
    """One memory: ``rows`` rows of ``row_words`` words of ``L`` lanes of ``bits`` bits."""
    id: int
    name: str                   #: ``X``, ``HQ``, ``HQ.scale``, ``HQ.factor``, ``TAB``
    bits: int                   #: 32 (float32) or 8 (int8, uint8)
    rows: int
    row_words: int
    width: int                  #: elements per row (before rounding to words)

    @property
    def words(self) -> int:
        return self.rows * self.row_words


def _ceil(a, b):
    return -(-a // b)


def capacity(p: HwParams) -> dict:
    """Buf -> (rows, elements per row) the buffers hold, in the golden model's terms
    (the KV scales: positions x kv heads)."""
    T = p.mm_tokens
    cap = {b: (T, p.buf_hidden) for b in _HIDDEN + (Buf.QQ, Buf.KQ, Buf.VQ)}
    cap.update({Buf.G: (T, p.buf_ffn), Buf.U: (T, p.buf_ffn), Buf.HQ: (T, max(p.buf_hidden, p.buf_ffn)),
                Buf.LOG: (T, p.buf_vocab), Buf.S: (T, p.buf_heads * p.max_seq_len),
                Buf.PQ: (T, p.buf_heads * p.max_seq_len),
                Buf.KS: (p.max_seq_len, p.buf_kv_heads), Buf.VS: (p.max_seq_len, p.buf_kv_heads)})
    return dict(sorted(cap.items(), key=lambda kv: kv[0].value))


def buffer_map(p: HwParams) -> dict:
    """Region name -> :class:`Region` for hardware ``p`` (module docstring); ids are the
    :class:`Buf` values for the buffers' elements, then the side arrays and the tables."""
    L = p.sfu_lanes
    out, nid = {}, len(Buf)
    cap = capacity(p)
    for b, (rows, width) in cap.items():
        if b in (Buf.KS, Buf.VS):
            rows, width = width, rows                   # stored transposed: a row per kv head
        out[b.name] = Region(b.value, b.name, 8 if b in _INT8 else 32, rows, _ceil(width, L), width)
    for b in _INT8:
        rows, width = cap[b]
        side = width // SIDE_SEGMENT
        fw, fside = _ceil(side, L), side
        if b == Buf.PQ:                                 # a head's factors start at a whole word
            fw = p.buf_heads * _ceil(p.max_seq_len // SIDE_SEGMENT, L)
            fside = fw * L
        sside = p.buf_heads if b == Buf.PQ else side    # PQ: a scale per (row, head)
        out[b.name + ".scale"] = Region(nid, b.name + ".scale", 32, rows, _ceil(sside, L), sside)
        out[b.name + ".factor"] = Region(nid + 1, b.name + ".factor", 8, rows, fw, fside)
        nid += 2
    out[TABLES] = Region(nid, TABLES, 32, 1, _ceil(p.buf_tables, L), p.buf_tables)
    return out


@dataclass(frozen=True)
class Reach:
    """The regions (names of :func:`buffer_map`) one client port reads and writes."""
    reads: frozenset = frozenset()
    writes: frozenset = frozenset()

    def __post_init__(self):
        for kind in ("reads", "writes"):
            v = getattr(self, kind)
            if isinstance(v, str) or not all(isinstance(n, str) for n in v):
                raise TypeError(f"Reach.{kind} must be region names, not {v!r}")
            object.__setattr__(self, kind, frozenset(v))

    @classmethod
    def every(cls, params: HwParams) -> "Reach":
        """Every region, both ways (a testbench's or host loader's port)."""
        names = frozenset(buffer_map(params))
        return cls(names, names)


def buf_regions(params: HwParams, bufs, sides: bool = False) -> frozenset:
    """The region names of buffers ``bufs`` (:class:`Buf` members or values), with their
    ``.scale`` and ``.factor`` regions if ``sides`` (int8 buffers have them)."""
    bm = buffer_map(params)
    out = set()
    for b in bufs:
        name = Buf(b).name
        out.add(name)
        if sides:
            out.update(n for n in (name + ".scale", name + ".factor") if n in bm)
    return frozenset(out)


#: a region at least this deep (words) goes to UltraRAM (4K x 72 per URAM288); shallower ones
#: to block RAM, where they waste less (a 2K-deep URAM column is half empty)
URAM_MIN_WORDS = 4096


def ram_style(reg: Region, lanes: int) -> dict:
    """The synthesis attribute placing region ``reg``: ``ram_style = "ultra"`` for deep
    regions (the scores, probabilities, logits, tables, KV scales and FFN buffers on the big
    presets), ``"block"`` otherwise (Vivado and Yosys both read it)."""
    return {"ram_style": "ultra" if reg.words >= URAM_MIN_WORDS else "block"}


def port_signature(p: HwParams) -> wiring.Signature:
    """A client's port (client side): ``rd_req`` (Out), ``rd_data`` (In, always ready),
    ``wr`` (Out), ``wr_done`` (In: a pulse when one of the client's writes is in its
    memory: a read requested after it returns the new data)."""
    regs = buffer_map(p)
    rid = range(len(regs))
    word = unsigned(max(1, (max(r.words for r in regs.values()) - 1).bit_length()))
    lanes = data.ArrayLayout(32, p.sfu_lanes)
    return wiring.Signature({
        "rd_req": Out(stream.Signature(data.StructLayout({"region": rid, "word": word}))),
        "rd_data": In(stream.Signature(lanes, always_ready=True)),
        "wr": Out(stream.Signature(data.StructLayout({"region": rid, "word": word, "data": lanes,
                                                      "mask": p.sfu_lanes}))),
        "wr_done": In(1),
    })


def _zext(d, l, L):
    v = d.as_value()
    bits = len(v) // L
    return Cat(v[l * bits:(l + 1) * bits], Const(0, 32 - bits)) if bits < 32 else v[l * bits:(l + 1) * bits]


class Buffers(wiring.Component):
    """The on-chip buffers (module docstring).

    Parameters
    ----------
    params : HwParams
        ``sfu_lanes``, ``mm_tokens``, ``max_seq_len`` and the ``buf_*`` envelope size
        the regions (:func:`buffer_map`).
    clients : tuple of str, or dict of str to Reach
        One port per name, attribute ``port_<name>`` (flipped :func:`port_signature`). A
        name alone reaches every region; a :class:`Reach` wires only its regions (module
        docstring).
    only : iterable of str, optional
        Build only these regions (a unit test's or a resource estimate's subset); an
        access to another region is dropped (reads return zeros).
    init : dict, optional
        Region name -> initial contents (``words x L`` lane values, e.g. from
        :func:`images`), for simulation.
    """

    def __init__(self, params: HwParams, clients=("host",), only=None, init=None):
        self._MustUse__silence = True           # never built if the checks below raise
        names = tuple(clients)
        if not names or len(set(names)) != len(names):
            raise ValueError(f"Buffers: clients must be distinct names, not {names!r}")
        every = buffer_map(params)
        reach = {}
        for c in names:
            r = clients[c] if isinstance(clients, dict) else Reach.every(params)
            if not isinstance(r, Reach):
                raise TypeError(f"Buffers: client {c!r} needs a Reach, not {type(r).__name__}")
            unknown = (r.reads | r.writes) - set(every)
            if unknown:
                raise ValueError(f"Buffers: client {c!r} reaches unknown region(s) {sorted(unknown)}")
            reach[c] = r
        self.params, self.clients = params, names
        self.regions = every
        if only is not None:
            unknown = set(only) - set(self.regions)
            if unknown:
                raise ValueError(f"Buffers: unknown region(s) {sorted(unknown)}; regions are "
                                 f"{', '.join(self.regions)}")
            self.regions = {k: v for k, v in self.regions.items() if k in set(only)}
        #: client -> the Reach it is wired with (restricted to the regions built)
        self.reach = {c: Reach(r.reads & set(self.regions), r.writes & set(self.regions)) for c, r in reach.items()}
        L = params.sfu_lanes
        #: region name -> its Memory (a testbench may load ``mem.data`` directly)
        init = init or {}
        unknown = set(init) - set(self.regions)
        if unknown:
            raise ValueError(f"Buffers: init for region(s) {sorted(unknown)} that are not built")
        self.mems = {name: Memory(shape=data.ArrayLayout(reg.bits, L), depth=reg.words,
                                  init=[[int(v) for v in w] for w in np.asarray(init[name])] if name in init else [],
                                  attrs=ram_style(reg, L))
                     for name, reg in self.regions.items()}
        sig = port_signature(params)
        self._MustUse__silence = False
        super().__init__({f"port_{c}": In(sig) for c in self.clients})

    def port(self, client: str):
        return getattr(self, f"port_{client}")

    def elaborate(self, platform):
        m = Module()
        L = self.params.sfu_lanes
        none = len(buffer_map(self.params))             # a read region id no case matches: zeros
        # per client: the read it issued READ_LATENCY - 1 cycles ago comes from this region
        rd_valid = [Signal(name=f"rdv_{c}") for c in self.clients]
        rd_region = [Signal(range(none + 1), name=f"rdr_{c}") for c in self.clients]
        rd_out = [self.port(c).rd_data for c in self.clients]
        reqs, wrs = [], []
        for i, c in enumerate(self.clients):
            port, reach = self.port(c), self.reach[c]
            for kind, s, lst, names in (("rd", port.rd_req, reqs, reach.reads), ("wr", port.wr, wrs, reach.writes)):
                if not names:                   # nothing to reach: take and drop, no FIFO
                    m.d.comb += s.ready.eq(1)
                    lst.append(None)
                    if kind == "rd":
                        m.d.sync += [rd_valid[i].eq(s.valid), rd_region[i].eq(none)]
                    else:
                        m.d.sync += port.wr_done.eq(s.valid)
                    continue
                q = fifo.SyncFIFO(width=len(s.payload.as_value()), depth=2)
                m.submodules[f"{c}_{kind}_q"] = q
                m.d.comb += [q.w_en.eq(s.valid), q.w_data.eq(s.payload.as_value()), s.ready.eq(q.w_rdy)]
                v = data.View(s.payload.shape(), q.r_data)
                ids = sorted(self.regions[n].id for n in names)
                miss = Signal(name=f"{c}_{kind}_miss")          # outside the reach: dropped
                m.d.comb += miss.eq(q.r_rdy & ~Cat(v.region == rid for rid in ids).any())
                with m.If(miss):
                    m.d.comb += q.r_en.eq(1)
                    if kind == "rd":
                        m.d.sync += [rd_valid[i].eq(1), rd_region[i].eq(none)]
                lst.append((q, v))
                if kind == "wr":
                    m.d.sync += port.wr_done.eq(q.r_en)
                else:                           # no grant and no miss this cycle: nothing to return
                    with m.If(~q.r_en):
                        m.d.sync += rd_valid[i].eq(0)
        region_data = {}
        for name, reg in self.regions.items():
            mem = self.mems[name]
            m.submodules[f"mem_{name.replace('.', '_')}"] = mem
            rp = mem.read_port()
            wp = mem.write_port(granularity=1)            # one enable per lane
            region_data[reg.id] = rp.data
            for kind, lst, port, attr in (("rd", reqs, rp, "reads"), ("wr", wrs, wp, "writes")):
                who = [i for i, c in enumerate(self.clients) if name in getattr(self.reach[c], attr)]
                if not who:
                    continue
                want = Signal(len(who), name=f"{name.replace('.', '_')}_{kind}_want")
                m.d.comb += want.eq(Cat(lst[i][0].r_rdy & (lst[i][1].region == reg.id) for i in who))
                grant = self._round_robin(m, want, f"{name.replace('.', '_')}_{kind}")
                for k, i in enumerate(who):
                    q, v = lst[i]
                    with m.If(grant[k]):
                        m.d.comb += [port.addr.eq(v.word), q.r_en.eq(1)]
                        if kind == "rd":
                            m.d.comb += port.en.eq(1)
                            m.d.sync += [rd_valid[i].eq(1), rd_region[i].eq(reg.id)]
                        else:
                            m.d.comb += port.data.eq(Cat(v.data[l][:reg.bits] for l in range(L)))
                            m.d.comb += port.en.eq(v.mask)
        for i, c in enumerate(self.clients):
            # one register after the memory: READ_LATENCY = 2; only the regions the client reads
            with m.Switch(rd_region[i]):
                for n in sorted(self.reach[c].reads, key=lambda n: self.regions[n].id):
                    rid = self.regions[n].id
                    with m.Case(rid):
                        m.d.sync += rd_out[i].payload.eq(Cat(_zext(region_data[rid], l, L) for l in range(L)))
                with m.Default():
                    m.d.sync += rd_out[i].payload.eq(0)
            m.d.sync += rd_out[i].valid.eq(rd_valid[i])
        return m

    @staticmethod
    def _round_robin(m, want, name):
        """One-hot grant among the bits of ``want``, starting after the last granted."""
        n = len(want)
        grant = Signal(n, name=f"{name}_grant")
        if n == 1:
            m.d.comb += grant.eq(want)
            return grant
        last = Signal(range(n), name=f"{name}_last")
        for start in range(n):
            with m.If(last == start):
                order = [(start + 1 + k) % n for k in range(n)]
                with m.If(want != 0):
                    cond = None
                    for k in order:
                        c = want[k]
                        if cond is None:
                            with m.If(c):
                                m.d.comb += grant.eq(1 << k)
                                m.d.sync += last.eq(k)
                            cond = True
                        else:
                            with m.Elif(c):
                                m.d.comb += grant.eq(1 << k)
                                m.d.sync += last.eq(k)
        return grant


# ------------------------------------------------------------------------ host-side images
def _f32_words(a) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype == np.float32:
        return a.view(np.uint32)
    return a.astype(np.int64).astype(np.uint8).astype(np.uint32)     # int8 / uint8: the low byte


def _place(img: np.ndarray, reg: Region, rows: np.ndarray, L: int, pad_to: int | None = None):
    """Write ``rows`` (rows x entries, uint32 words) into region image ``img`` (words x L);
    ``pad_to``: entries per sub-row (PQ's factors: each head starts at a whole word)."""
    rows = np.asarray(rows)
    if pad_to is not None:                       # (rows, heads, k) -> heads padded to pad_to entries
        r, h, k = rows.shape
        padded = np.zeros((r, h, pad_to), rows.dtype)
        padded[:, :, :k] = rows
        rows = padded
    rows = rows.reshape(rows.shape[0], -1)
    r, n = rows.shape
    if r > reg.rows or n > reg.row_words * L:
        raise ValueError(f"buffer region {reg.name}: {r} rows x {n} entries exceed its {reg.rows} x "
                         f"{reg.row_words * L}")
    flat = img.reshape(reg.rows, reg.row_words * L)
    flat[:r, :n] = rows


def images(p: HwParams, buf: Buf, value) -> dict:
    """The region images (region name -> uint32 array of ``words x L`` lanes) that hold
    ``value``, a buffer in the golden model's representation: float32 rows (``rows x n``,
    or ``rows x heads x cap`` scores; the KV scales ``positions x kv_heads``), or an int8
    tuple ``(q, scales, factors or None)`` (PQ: ``q`` and ``factors`` per head). Unused
    words are zero."""
    L, regs = p.sfu_lanes, buffer_map(p)
    out = {}

    def img(name):
        r = regs[name]
        out[name] = np.zeros((r.words, L), np.uint32)
        return out[name], r

    if isinstance(value, tuple):
        q, s, u = value
        a, r = img(buf.name)
        _place(a, r, _f32_words(q).reshape(q.shape[0], -1), L)
        a, r = img(buf.name + ".scale")
        _place(a, r, _f32_words(np.asarray(s, np.float32)), L)
        if u is not None:
            a, r = img(buf.name + ".factor")
            per_head = -(-u.shape[-1] // L) * L if u.ndim == 3 else None
            _place(a, r, _f32_words(u), L, per_head)
        return out
    v = np.asarray(value, np.float32)
    if buf in (Buf.KS, Buf.VS):
        v = v.T
    a, r = img(buf.name)
    _place(a, r, _f32_words(v).reshape(v.shape[0], -1), L)
    return out


def top_port_members(params: HwParams, prefix: str) -> dict:
    """A client port as plain top-level members ``<prefix>_rd_req``, ``<prefix>_rd_data`` (its
    ``ready`` unused), ``<prefix>_wr``, ``<prefix>_wr_done``: the always-ready read data's
    constant ``ready`` cannot be a top-level port. Wire them with :func:`connect_top_port`."""
    h = port_signature(params).members
    return {f"{prefix}_rd_req": In(h["rd_req"].signature),
            f"{prefix}_rd_data": Out(stream.Signature(h["rd_data"].signature.members["payload"].shape)),
            f"{prefix}_wr": In(h["wr"].signature),
            f"{prefix}_wr_done": Out(1)}


def connect_top_port(m, top, prefix: str, port) -> None:
    """Connect the :func:`top_port_members` ``prefix`` of component ``top`` to buffer port ``port``."""
    wiring.connect(m, wiring.flipped(getattr(top, f"{prefix}_rd_req")), port.rd_req)
    wiring.connect(m, wiring.flipped(getattr(top, f"{prefix}_wr")), port.wr)
    d = getattr(top, f"{prefix}_rd_data")
    m.d.comb += [d.valid.eq(port.rd_data.valid), d.payload.eq(port.rd_data.payload),
                 getattr(top, f"{prefix}_wr_done").eq(port.wr_done)]


class BuffersTop(wiring.Component):
    """:class:`Buffers` with each client's port as plain top-level streams (``<client>_rd_req``,
    ``<client>_rd_data`` with an unused ``ready``, ``<client>_wr``, ``<client>_wr_done``): a
    top for synthesis, where the always-ready read data's constant ``ready`` cannot be a port."""

    def __init__(self, params: HwParams, clients=("host", "x", "s2", "tab", "wr")):
        self.buffers = Buffers(params, clients=clients)
        self.clients = tuple(clients)
        sig = {}
        for c in self.clients:
            sig.update(top_port_members(params, c))
        super().__init__(sig)

    def elaborate(self, platform):
        m = Module()
        m.submodules.buffers = self.buffers
        for c in self.clients:
            connect_top_port(m, self, c, self.buffers.port(c))
        return m
