"""The SFU unit: the SFU core (:mod:`flightllm.hw.sfu`) on the on-chip buffers.

It executes the SFU instructions of :mod:`flightllm.hw.isa` (``SfuFmt``: ADD, SILU_MUL,
RMSNORM, ROPE, QUANT, QUANTG, DEQUANT, FILL, ARGMAX; ``SoftFmt``: SOFTMAX) as the
dispatcher hands them over: an :class:`SfuOp` is an instruction with its register
fields already read (:func:`sfu_op` is that step in Python, for testbenches and the
golden comparison). The unit turns it into an :class:`~flightllm.hw.sfu.SfuCmd`, serves
the core's read requests from the buffers and writes its results back, with the
addresses of :func:`~flightllm.hw.buffers.buffer_map`::

  op --> cmd --> SfuCore --req--> R1 (row, beat) -> R2 (t, h) -> R3 (addresses) -> addr FIFO
                    ^                                     port x (src, its scales / factors),
                    |                                     port s2 (src2; SOFTMAX: VS), port tab
                    +--rd-- join <-- data FIFOs x, s2, tab <------------------ read data
                 out --> W1 -> W2 (t, h) -> W3 (region, word, lanes, mask) -> wr FIFO --> port wr
                 done -> count FIFO: the unit's ``done`` when that many out beats have landed

Rows. A row of the core is a token row; for SOFTMAX (kv heads ``g .. g + kvn - 1``) a
(token ``t``, query head ``h``) row ``t * rep * kvn + h`` (``t``, ``h`` and the kv head
``g + h // rep`` from multiplies by 16-bit reciprocals from a ROM, exact for ``rows <
256`` and ``rep * kvn < 64``). Element ``e`` of token row ``t`` of
buffer ``B`` is word ``t * row_words(B) + e // L``; SOFTMAX's head ``g * rep + h`` of a
score or probability row starts ``(g * rep + h) * cap / L`` words in, its factors
``(g * rep + h) * ceil(cap / 32 / L)`` words into the factor row, its scale is entry
``g * rep + h`` of the scale row (one lane written); the value scales of kv head ``g``
are row ``g`` of the transposed VS. RMSNORM's weights are the words from ``table / L``;
ROPE's cos/sin of row ``t`` the ``seg / L`` words from ``(table + (pos + t) * seg) / L``.
ARGMAX scans the last row only (what the ARGMAX register gets).

Preconditions (the compiler's layout meets them): ``table`` a multiple of ``L``; ROPE's
``seg`` a power of two and a multiple of ``L``; ``cap`` a multiple of ``L``; SOFTMAX's
``rows * rep * kvn < 256``.

Scoreboard: an op that reads (``src``; ``src2`` of ADD, SILU_MUL, SOFTMAX) a buffer an
op still in flight writes is held until that op is done (the ISA's rule 1); independent
ops follow each other back to back.

Completion: ``done`` pulses when every result of the operation is in the buffers (the
core's ``done`` gives the count of ``out`` beats; the unit counts its writes landed,
``wr_done``), so the next reader (another unit, after a token) sees them. ARGMAX's
index of the last row leaves on ``argmax`` (for the ARGMAX register).
"""


from amaranth import Array, Const, Module, Mux, Shape, Signal, signed, unsigned
from amaranth.lib import data, fifo, stream, wiring
from amaranth.lib.wiring import In, Out

from .buffers import TABLES, Reach, buf_regions, buffer_map, port_signature
from .isa import Buf, Opcode
from .params import HwParams
from .sfu import ARGMAX, DST, FACTOR, OUT_COUNT_BITS, SCALE, S2, TAB, X, XF, XS, SfuCore

__all__ = ["SfuOp", "SfuUnit", "sfu_op", "SfuDecode", "SfuKernelUnit", "sfu_reach"]

_RECIP_BITS = 16
_BUF = Shape.cast(Buf)


def sfu_reach(params: HwParams) -> dict:
    """Port -> the regions it may touch: ``x`` reads any buffer with its scales and factors
    (``src``), ``s2`` any buffer (``src2``; SOFTMAX's VS), ``tab`` the tables, ``wr`` writes any
    buffer with its scales and factors (``dst``)."""
    every, own = buf_regions(params, Buf, sides=True), buf_regions(params, Buf)
    return {"x": Reach(reads=every), "s2": Reach(reads=own), "tab": Reach(reads={TABLES}), "wr": Reach(writes=every)}


class SfuOp(data.Struct):
    """An SFU instruction with its registers read (the dispatcher's queue entry)."""
    op: unsigned(6)         #: :class:`~flightllm.hw.isa.Opcode` value
    src: _BUF               #: :class:`~flightllm.hw.isa.Buf` values
    src2: _BUF              #: ADD/SILU_MUL: second operand; SOFTMAX: the value scales (aux)
    dst: _BUF
    rows: unsigned(8)       #: token rows
    n: unsigned(17)         #: elements per row (unused by SOFTMAX)
    seg: unsigned(10)       #: SfuFmt.seg
    grouped: unsigned(1)    #: DEQUANT: the source holds QUANTG's result
    table: unsigned(24)
    imm: unsigned(32)       #: float32 bits (SOFTMAX: the score scale)
    pos: unsigned(16)       #: ROPE: position of row 0
    valid: unsigned(17)     #: SOFTMAX: positions row 0 attends
    kvh: unsigned(8)
    rep: unsigned(6)
    cap: unsigned(16)
    sink: unsigned(4)
    window: unsigned(8)
    kvn: unsigned(6)        #: SOFTMAX: kv heads kvh .. kvh + kvn - 1 (>= 1)


def sfu_op(ins, regs) -> dict:
    """The :class:`SfuOp` fields of SFU instruction ``ins`` (an :class:`~flightllm.hw.isa.Instr`)
    with registers ``regs`` (a sequence of 16 ints), as the dispatcher reads them."""
    from .isa import f32_bits
    f, op = ins.f, ins.op

    def v(name):
        x = f.get(name, 0)
        return x.value if hasattr(x, "value") else x

    def fbits(name):
        x = f.get(name, 0.0)
        return f32_bits(x) if isinstance(x, float) else int(x)

    rows = regs[v("rows_reg")] if v("rows_reg") else 1
    if op == Opcode.SOFTMAX:
        return dict(op=op.value, src=v("src"), src2=v("aux"), dst=v("dst"), rows=rows,
                    valid=regs[v("len_reg")] + v("len_add"), kvh=v("kvh"), rep=v("rep"), cap=v("cap"),
                    sink=v("sink"), window=v("window"), imm=fbits("scale"), kvn=max(v("kvn"), 1))
    return dict(op=op.value, src=v("src"), src2=v("src2"), dst=v("dst"), rows=rows, n=v("n"), seg=v("seg"),
                grouped=int(v("aux") == 1), table=v("table"), imm=fbits("imm"),
                pos=regs[v("aux_reg")] if op == Opcode.ROPE else 0)


class SfuUnit(wiring.Component):
    """The SFU on the buffers (module docstring).

    Parameters
    ----------
    params : HwParams
    rd_depth : int
        Read requests in flight (the core's read-data FIFO and the unit's data FIFOs).

    Attributes
    ----------
    op : In(stream of SfuOp)
    x, s2, tab, wr : Out(:func:`~flightllm.hw.buffers.port_signature`)
        Buffer client ports (``x``, ``s2``, ``tab`` read; ``wr`` writes).
    done : Out(1)
    argmax : Out(stream of 32 bits, always ready)
    """

    def __init__(self, params: HwParams, *, rd_depth: int = 16):
        self.params = params
        self.core = SfuCore(params, rd_depth=rd_depth)
        self.rd_depth = rd_depth
        self.regions = buffer_map(params)
        sig = port_signature(params)
        super().__init__({
            "op": In(stream.Signature(SfuOp)),
            "x": Out(sig), "s2": Out(sig), "tab": Out(sig), "wr": Out(sig),
            "done": Out(1),
            "argmax": Out(stream.Signature(32, always_ready=True)),
        })

    def elaborate(self, platform):
        m = Module()
        p, core = self.params, self.core
        m.submodules.core = core
        L = p.sfu_lanes
        LB = L.bit_length() - 1
        regs = self.regions
        nreg = len(regs)
        by_id = sorted(regs.values(), key=lambda r: r.id)
        row_words = Array(Const(r.row_words, 16) for r in by_id)
        scale_of = Array(Const(regs[b.name + ".scale"].id if b.name + ".scale" in regs else 0, range(nreg))
                         for b in Buf)
        factor_of = Array(Const(regs[b.name + ".factor"].id if b.name + ".factor" in regs else 0, range(nreg))
                          for b in Buf)
        recip = Array(Const(-(-(1 << _RECIP_BITS) // max(r, 1)), _RECIP_BITS + 1) for r in range(64))
        tab_id = regs[TABLES].id
        wbits = len(self.x.rd_req.payload.word)

        # -- ops: to the core, and into the queue of ops whose results are coming --------------
        ol = data.Layout.cast(SfuOp)
        # scoreboard (the ISA's rule 1): an op reading a buffer that an op still in flight
        # writes waits until that one's results are in the buffers
        busy = [Signal(3, name=f"busy_{b.name}") for b in Buf]
        hazard = Signal()
        o0 = self.op.payload
        reads2 = ((o0.op == Opcode.ADD.value) | (o0.op == Opcode.SILU_MUL.value)
                  | (o0.op == Opcode.SOFTMAX.value))
        reads1 = o0.op != Opcode.FILL.value
        m.d.comb += hazard.eq((reads1 & Array(busy)[o0.src].any()) | (reads2 & Array(busy)[o0.src2].any()))
        opq = m.submodules.opq = fifo.SyncFIFO(width=ol.size, depth=4)
        o = self.op.payload
        is_sm = o.op == Opcode.SOFTMAX.value
        is_am = o.op == Opcode.ARGMAX.value       # the last row's only: one row, from row rows - 1
        qh = Signal(6)                          # SOFTMAX: query heads per token row (rep x kvn)
        m.d.comb += qh.eq(o.rep * o.kvn)
        n32 = Signal(17)
        m.d.comb += n32.eq(((o.valid + o.rows - 1 + 31) >> 5) << 5)
        c = core.cmd.payload
        m.d.comb += [
            c.op.eq(o.op), c.rows.eq(Mux(is_sm, o.rows * qh, Mux(is_am, 1, o.rows))),
            c.n.eq(Mux(is_sm, n32, o.n)),
            c.seg.eq(Mux((o.op == Opcode.QUANT.value) | (o.op == Opcode.ROPE.value)
                         | ((o.op == Opcode.DEQUANT.value) & ~o.grouped), o.seg, 0)),
            c.group.eq(Mux((o.op == Opcode.QUANTG.value) | ((o.op == Opcode.DEQUANT.value) & o.grouped), o.seg, 0)),
            c.imm.eq(o.imm), c.valid.eq(o.valid), c.rep.eq(qh), c.sink.eq(o.sink), c.window.eq(o.window),
            core.cmd.valid.eq(self.op.valid & opq.w_rdy & ~hazard),
            self.op.ready.eq(core.cmd.ready & opq.w_rdy & ~hazard),
            opq.w_en.eq(self.op.valid & self.op.ready), opq.w_data.eq(o.as_value()),
        ]
        rq = Signal(SfuOp)                      # the op whose requests the core is making
        lg_seg = Signal(range(32))
        with m.If(self.op.valid & self.op.ready):
            m.d.sync += rq.eq(o)
            for k in range(10):
                with m.If(o.seg[k]):
                    m.d.sync += lg_seg.eq(k)

        def split(row, q, name):
            """(t, h, g) of core row ``row`` of op ``q``: token row, query head in the op and its
            kv head offset (SOFTMAX; else (row, 0, 0)), one register."""
            t, h, g = Signal(8, name=f"{name}_t"), Signal(6, name=f"{name}_h"), Signal(6, name=f"{name}_g")
            per = Signal(6, name=f"{name}_per")
            m.d.comb += per.eq(q.rep * q.kvn)
            tt = ((row * recip[per]) >> _RECIP_BITS)[:8]
            hh = (row - tt * per)[:6]
            sm = q.op == Opcode.SOFTMAX.value
            m.d.sync += [t.eq(Mux(sm, tt, row)), h.eq(Mux(sm, hh, 0)),
                         g.eq(Mux(sm, ((hh * recip[q.rep]) >> _RECIP_BITS)[:6], 0))]
            return t, h, g

        # -- requests: R1 -> R2 -> R3 -> addr FIFO -> ports --------------------------------------
        al = data.StructLayout({"need": 3, "xr": range(nreg), "xw": wbits, "sr": range(nreg), "sw": wbits,
                                "tw": wbits})
        aq = m.submodules.addr_fifo = fifo.SyncFIFO(width=al.size, depth=8)
        r1_v, r2_v = Signal(), Signal()
        r1 = Signal(core.req.payload.shape())
        m.d.comb += core.req.ready.eq(aq.level < 8 - 3)
        m.d.sync += [r1_v.eq(core.req.valid & core.req.ready), r1.eq(core.req.payload), r2_v.eq(r1_v)]
        t2, h2, g2 = split(r1.row, rq, "rq")
        r2 = Signal.like(r1)
        m.d.sync += r2.eq(r1)
        hh = Signal(14)
        m.d.comb += hh.eq(rq.kvh * rq.rep + h2)
        capw = rq.cap >> LB
        xr = Mux(r2.streams & XS, scale_of[rq.src], Mux(r2.streams & XF, factor_of[rq.src], rq.src))
        sm = rq.op == Opcode.SOFTMAX.value
        t2x = t2 + Mux(rq.op == Opcode.ARGMAX.value, rq.rows - 1, 0)
        xw = Mux(sm, t2 * row_words[rq.src] + hh * capw, t2x * row_words[xr]) + r2.beat
        sr = Mux(sm, Buf.VS.value, rq.src2)
        sw = Mux(sm, (rq.kvh + g2) * row_words[Buf.VS.value], t2 * row_words[rq.src2]) + r2.beat
        segw_m1 = (rq.seg >> LB) - 1
        tw = Mux(rq.op == Opcode.ROPE.value,
                 (rq.table >> LB) + ((rq.pos + t2) << lg_seg >> LB) + (r2.beat & segw_m1),
                 (rq.table >> LB) + r2.beat)
        a3 = Signal(al)
        m.d.sync += [a3.need.eq(Mux(r2.streams & (X | XS | XF), 1, 0) | Mux(r2.streams & S2, 2, 0)
                                | Mux(r2.streams & TAB, 4, 0)),
                     a3.xr.eq(xr), a3.xw.eq(xw), a3.sr.eq(sr), a3.sw.eq(sw), a3.tw.eq(tw)]
        a3_v = Signal()
        m.d.sync += a3_v.eq(r2_v)
        m.d.comb += [aq.w_en.eq(a3_v), aq.w_data.eq(a3)]
        ah = data.View(al, aq.r_data)
        sent = Signal(3)
        needq = m.submodules.need_fifo = fifo.SyncFIFO(width=3, depth=self.rd_depth + 8)
        ports = (self.x, self.s2, self.tab)
        fire = Signal(3)
        for k, (port, reg, word) in enumerate(zip(ports, (ah.xr, ah.sr, Const(tab_id)), (ah.xw, ah.sw, ah.tw))):
            m.d.comb += [port.rd_req.valid.eq(aq.r_rdy & ah.need[k] & ~sent[k]),
                         port.rd_req.payload.region.eq(reg), port.rd_req.payload.word.eq(word),
                         fire[k].eq(port.rd_req.valid & port.rd_req.ready), port.wr.valid.eq(0)]
        all_sent = (sent | fire | ~ah.need) == 0b111
        m.d.comb += [aq.r_en.eq(aq.r_rdy & all_sent & needq.w_rdy), needq.w_en.eq(aq.r_en),
                     needq.w_data.eq(ah.need)]
        with m.If(aq.r_en):
            m.d.sync += sent.eq(0)
        with m.Else():
            m.d.sync += sent.eq(sent | fire)

        # -- join: one rd beat when every stream it needs has its word ---------------------------
        dq = []
        for k, port in enumerate(ports):
            q = fifo.SyncFIFOBuffered(width=32 * L, depth=self.rd_depth + 8)
            m.submodules[f"data_fifo{k}"] = q
            m.d.comb += [q.w_en.eq(port.rd_data.valid), q.w_data.eq(port.rd_data.payload.as_value())]
            dq.append(q)
        nh = needq.r_data
        ok = needq.r_rdy
        for k in range(3):
            ok = ok & (~nh[k] | dq[k].r_rdy)
        m.d.comb += [core.rd.valid.eq(ok), needq.r_en.eq(ok),
                     core.rd.payload.x.eq(dq[0].r_data), core.rd.payload.s2.eq(dq[1].r_data),
                     core.rd.payload.tab.eq(dq[2].r_data)]
        for k in range(3):
            m.d.comb += dq[k].r_en.eq(ok & nh[k])

        # -- results: W1 -> W2 -> W3 -> wr FIFO -> port wr -------------------------------------------
        oo = data.View(ol, opq.r_data)          # the op whose results are coming
        doneq = m.submodules.done_fifo = fifo.SyncFIFO(width=OUT_COUNT_BITS, depth=4)
        m.d.comb += [doneq.w_en.eq(core.done), doneq.w_data.eq(core.out_count)]
        popped = Signal(OUT_COUNT_BITS)
        landed = Signal(OUT_COUNT_BITS)
        wl = data.StructLayout({"region": range(nreg), "word": wbits, "data": data.ArrayLayout(32, L), "mask": L})
        wq = m.submodules.wr_fifo = fifo.SyncFIFO(width=wl.size, depth=8)
        mine = ~doneq.r_rdy | (popped != doneq.r_data)       # the next beat is the head op's
        m.d.comb += core.out.ready.eq(mine & (wq.level < 8 - 3))
        w1_v, w2_v, w3_v = Signal(), Signal(), Signal()
        w1 = Signal(core.out.payload.shape())
        take = core.out.valid & core.out.ready
        m.d.sync += [w1_v.eq(take), w1.eq(core.out.payload), popped.eq(popped + take)]
        tw2, hw2, _ = split(w1.row, oo, "wo")
        w2 = Signal.like(w1)
        m.d.sync += [w2.eq(w1), w2_v.eq(w1_v)]
        osm = oo.op == Opcode.SOFTMAX.value
        ohh = Signal(14)
        m.d.comb += ohh.eq(oo.kvh * oo.rep + hw2)
        fcw = (oo.cap + 32 * L - 1) >> (5 + LB)
        region = Mux(w2.kind == SCALE, scale_of[oo.dst], Mux(w2.kind == FACTOR, factor_of[oo.dst], oo.dst))
        word = Mux(osm,
                   tw2 * row_words[region] + Mux(w2.kind == DST, ohh * (oo.cap >> LB),
                                                 Mux(w2.kind == FACTOR, ohh * fcw, ohh >> LB)),
                   tw2 * row_words[region]) + w2.beat
        one_lane = osm & (w2.kind == SCALE)
        w3 = Signal(wl)
        w3_am = Signal()
        m.d.sync += [w3.region.eq(region), w3.word.eq(word),
                     w3.mask.eq(Mux(one_lane, Const(1, L) << ohh[:LB], w2.valid)),
                     w3_v.eq(w2_v & (w2.kind != ARGMAX)), w3_am.eq(w2_v & (w2.kind == ARGMAX))]
        for lane in range(L):
            m.d.sync += w3.data[lane].eq(Mux(one_lane, w2.data[0], w2.data[lane]))
        m.d.comb += [self.argmax.valid.eq(w3_am), self.argmax.payload.eq(w3.data[0])]
        m.d.comb += [wq.w_en.eq(w3_v), wq.w_data.eq(w3)]
        wh = data.View(wl, wq.r_data)
        m.d.comb += [self.wr.wr.valid.eq(wq.r_rdy), self.wr.wr.payload.eq(wh), wq.r_en.eq(self.wr.wr.ready),
                     self.wr.rd_req.valid.eq(0)]
        m.d.sync += landed.eq(landed + self.wr.wr_done + w3_am)
        fin = doneq.r_rdy & (popped == doneq.r_data) & (landed == doneq.r_data)
        m.d.comb += [doneq.r_en.eq(fin), opq.r_en.eq(fin)]
        acc = self.op.valid & self.op.ready
        for b in Buf:
            inc = acc & (o0.dst == b.value) & (o0.op != Opcode.ARGMAX.value)
            dec = fin & (oo.dst == b.value) & (oo.op != Opcode.ARGMAX.value)
            m.d.sync += busy[b.value].eq(busy[b.value] + inc - dec)
        m.d.sync += self.done.eq(fin)
        return m


class SfuDecode(wiring.Component):
    """A dispatcher queue entry (:func:`flightllm.hw.control.entry_layout`) of an SFU
    instruction -> :class:`SfuOp`: :func:`sfu_op` in RTL, one register stage.

    Entries whose registers do not fit the op (``rows`` outside 1..255, SOFTMAX's attended
    length outside 1..``cap``, a ROPE position beyond 16 bits) leave as a ``fault`` with their
    pc instead of an op (the golden model raises for the same instructions).

    Attributes
    ----------
    entry : In(stream of entry_layout())
    op : Out(stream of SfuOp)
    fault : Out(1), fault_pc : Out(32)
        Held until ``clear``.
    clear : In(1)
    """

    def __init__(self):
        from .control import PC_BITS, entry_layout
        super().__init__({
            "entry": In(stream.Signature(entry_layout())),
            "op": Out(stream.Signature(SfuOp)),
            "fault": Out(1), "fault_pc": Out(PC_BITS), "clear": In(1),
        })

    def elaborate(self, platform):
        from .isa import _FIELDS, SfuFmt, SoftFmt

        m = Module()
        e = self.entry.payload
        w = e.word

        def fld(fmt, name):
            off, width, _ = _FIELDS[fmt][name]
            return w[off:off + width]

        op = w[:6]
        is_sm = op == Opcode.SOFTMAX.value
        rows_reg = fld(SfuFmt, "rows_reg")          # the same bits in SoftFmt
        assert _FIELDS[SfuFmt]["rows_reg"][:2] == _FIELDS[SoftFmt]["rows_reg"][:2]
        rows = Signal(32)
        m.d.comb += rows.eq(Mux(rows_reg != 0, e.regs[0], 1))
        valid = Signal(signed(34))
        m.d.comb += valid.eq(e.regs[1] + fld(SoftFmt, "len_add").as_signed())
        cap = fld(SoftFmt, "cap")
        kvn = fld(SoftFmt, "kvn")
        bad = Signal()
        m.d.comb += bad.eq((rows == 0) | (rows > 255)
                           | (is_sm & ((valid < 1) | (valid + rows - 1 > cap)))
                           | ((op == Opcode.ROPE.value) & (e.regs[1] >> 16 != 0)))
        o = Signal(SfuOp)
        with m.If(is_sm):
            m.d.comb += [o.src.eq(fld(SoftFmt, "src")), o.src2.eq(fld(SoftFmt, "aux")), o.dst.eq(fld(SoftFmt, "dst")),
                         o.valid.eq(valid), o.kvh.eq(fld(SoftFmt, "kvh")), o.rep.eq(fld(SoftFmt, "rep")),
                         o.cap.eq(cap), o.sink.eq(fld(SoftFmt, "sink")), o.window.eq(fld(SoftFmt, "window")),
                         o.imm.eq(fld(SoftFmt, "scale")), o.kvn.eq(Mux(kvn == 0, 1, kvn))]
        with m.Else():
            m.d.comb += [o.src.eq(fld(SfuFmt, "src")), o.src2.eq(fld(SfuFmt, "src2")), o.dst.eq(fld(SfuFmt, "dst")),
                         o.n.eq(fld(SfuFmt, "n")), o.seg.eq(fld(SfuFmt, "seg")),
                         o.grouped.eq(fld(SfuFmt, "aux") == 1), o.table.eq(fld(SfuFmt, "table")),
                         o.imm.eq(fld(SfuFmt, "imm")),
                         o.pos.eq(Mux(op == Opcode.ROPE.value, e.regs[1], 0))]
        m.d.comb += [o.op.eq(op), o.rows.eq(rows)]

        # one register stage: the entry is taken when the output register is free
        m.d.comb += self.entry.ready.eq(~self.op.valid & ~self.fault)
        with m.If(self.op.valid & self.op.ready):
            m.d.sync += self.op.valid.eq(0)
        with m.If(self.entry.valid & self.entry.ready):
            with m.If(bad):
                m.d.sync += [self.fault.eq(1), self.fault_pc.eq(e.pc)]
            with m.Else():
                m.d.sync += [self.op.payload.eq(o), self.op.valid.eq(1)]
        with m.If(self.clear):
            m.d.sync += [self.fault.eq(0), self.op.valid.eq(0)]
        return m


class SfuKernelUnit(wiring.Component):
    """The SFU unit under the kernel's unit contract (``docs/kernel.md``): queue entries in
    through :class:`SfuDecode`, :class:`SfuUnit` on the buffers.

    ``abort`` holds the unit in reset, and ``busy`` stays up for :data:`ABORT_HOLD` cycles of
    it, so that buffer reads still on their way land in a unit that is in reset before control
    lets go of ``abort``.

    Attributes
    ----------
    issue : In(stream of entry_layout())
    done, busy, fault : Out(1)
    fault_pc : Out(32)
    abort : In(1)
    x, s2, tab, wr : Out(buffer port)
    argmax : Out(stream of 32 bits, always ready)
    """

    ABORT_HOLD = 32

    def __init__(self, params: HwParams):
        from .control import PC_BITS, entry_layout
        self.params = params
        self.reach = sfu_reach(params)          #: port -> the regions it may touch
        sig = port_signature(params)
        super().__init__({
            "issue": In(stream.Signature(entry_layout())),
            "done": Out(1), "busy": Out(1), "fault": Out(1), "fault_pc": Out(PC_BITS), "abort": In(1),
            "x": Out(sig), "s2": Out(sig), "tab": Out(sig), "wr": Out(sig),
            "argmax": Out(stream.Signature(32, always_ready=True)),
        })

    def elaborate(self, platform):
        from amaranth import ResetInserter

        m = Module()
        hold = Signal(range(self.ABORT_HOLD + 1))
        was = Signal()
        in_reset = Signal()
        m.d.comb += in_reset.eq(self.abort | (hold != 0))
        m.d.sync += was.eq(self.abort)
        with m.If(self.abort & ~was):
            m.d.sync += hold.eq(self.ABORT_HOLD)     # counts under abort: busy until it has run out
        with m.Elif(hold != 0):
            m.d.sync += hold.eq(hold - 1)
        dec, unit = SfuDecode(), SfuUnit(self.params)
        m.submodules.decode = ResetInserter(in_reset)(dec)
        m.submodules.unit = ResetInserter(in_reset)(unit)
        wiring.connect(m, wiring.flipped(self.issue), dec.entry)
        wiring.connect(m, dec.op, unit.op)
        for name in ("x", "s2", "tab", "wr"):
            wiring.connect(m, wiring.flipped(getattr(self, name)), getattr(unit, name))
        wiring.connect(m, wiring.flipped(self.argmax), unit.argmax)
        # instructions taken and not yet done
        inflight = Signal(8)
        took = self.issue.valid & self.issue.ready & ~in_reset
        with m.If(in_reset):
            m.d.sync += inflight.eq(0)
        with m.Elif(took & ~unit.done):
            m.d.sync += inflight.eq(inflight + 1)
        with m.Elif(unit.done & ~took):
            m.d.sync += inflight.eq(inflight - 1)
        m.d.comb += [self.done.eq(unit.done & ~in_reset), self.busy.eq((inflight != 0) | (hold != 0)),
                     self.fault.eq(dec.fault), self.fault_pc.eq(dec.fault_pc), dec.clear.eq(self.abort)]
        return m
