"""ST_KT: int8 K or V rows from an on-chip buffer into the KV cache's raw tensors in HBM.

An ST-unit engine under the unit contract of ``docs/kernel.md`` (issue / done / busy /
abort / fault). The instruction (:class:`~flightllm.hw.isa.KvStFmt`) stores ``T =
R[rows_reg]`` rows (1 if ``rows_reg`` is ``ZERO``) of ``kv_heads * head_dim`` int8 values
of buffer ``src`` (``KQ`` / ``VQ``, from QUANT) as positions ``R[pos_reg] + t`` of the
cache tensors of one layer and kind: head ``g``'s region starts at byte ``64 * (kv_off +
g * head_stride)`` of every weight channel; its values are a raw packed tensor
(``int8r/32`` or ``int4r/32``, ``bits``) of shape ``(cap, head_dim)`` for K (rows =
positions) and ``(head_dim, cap)`` for V (stored transposed). Where each value goes is
:meth:`flightllm.hw.kvcache.KvLayout.write` (through :func:`flightllm.hw.formats.value_bits`):
value ``(row, col)`` of such a tensor is in channel ``j % C`` (``j = row % R``) at bit
``(tile * ng + col // 32) * record_bits + (((col % 32) // L * Rc + j // C) * L + col % L)
* bits`` of the region (``tile = row // R``, ``ng = cols / 32``, ``record_bits = Rc * 32 *
bits``: all powers of two but ``ng``, so the RTL needs one small multiply, ``tile * ng``).

::

  issue --> CHECK --> generator (K: t, g, chunk of E values; V: g, NV consecutive d, t)
             --> S1..S3: addresses --> buffer read (src row t) + meta FIFO
             --> join (meta, data): per channel an entry (beat address, the value(s) replicated
                 over the beat, a nibble mask) --> per channel: a pending beat that merges
                 consecutive entries to the same beat --> beat FIFO (+ a read command when a
                 byte has only one of its nibbles written: read-modify-write)
             --> per channel writer: [RMW: merge the beat read back] -> 1-beat write (wstrb:
                 the bytes written) --> done after every B response

K: the ``head_dim`` values of one (position, head) are one chain's: whole bytes in runs of
``L * bits / 8`` (8 or 4 bytes per chain beat on ``sim``), all in channel ``pos % C``; the
generator takes ``E = min(chain_len, sfu_lanes, 32)`` of them a step (one buffer word).
V: one position's values are one per row ``d``, in channel ``d % C``; a step takes ``NV =
min(sfu_lanes, 32, C)`` consecutive ``d`` (the same record offset in each channel: they
differ only in the channel) of one row ``t``, and ``t`` is the innermost loop, so that
the values of consecutive positions of one ``d`` (adjacent lanes: the same beat, for INT4
the same byte) follow each other into that channel's pending beat and merge.

INT4 (what was found about its granularity): a K row is whole bytes (no byte holds two
positions). A V column is not: positions ``2m`` and ``2m + 1`` of one ``d`` share a byte
(lanes ``l`` and ``l + 1`` of one chain beat). A byte whose two nibbles this instruction
writes is a plain partial write; a byte with only one of them (the first position when it
is odd, the last when it is even: in decode, every V byte) must keep the other nibble,
which an earlier instruction (an earlier run) wrote, so that beat is read back first and
merged (the golden model writes the nibble). No layout avoids it without changing the
streamed V records (the dequant units' lane order). The read of a beat never overtakes a
write to the same byte: within one instruction every byte is written once (its two
nibbles merge in the pending beat first), and instructions run one at a time (the next
starts after the B responses of the previous one). INT8 and K never read.

Faults (``fault`` with the pc, held until ``abort``), before anything is written: an opcode
other than ST_KT, ``bits`` not a KV format of the build, ``head_dim`` or ``cap`` zero or not
a multiple of 32, ``kv_heads`` zero, positions ``R[pos_reg] .. + T - 1`` beyond ``cap``, ``src`` not an int8
buffer or ``T`` / ``kv_heads * head_dim`` beyond its region. A value outside
``[-8, 7]`` in an INT4 store faults when it is met (beats before it may have been
written; the golden model raises before writing). What only the plan knows (that
``kv_off`` / ``head_stride`` name a layer's regions, ``bits`` the cache's format of that
kind) is not checked.

Throughput: one step a cycle (K: ``E`` values into one channel; V: ``NV`` values, one per
channel), a beat write every two cycles per channel (command, then data), an INT4 V beat
after its read-back (``depth`` of them in flight per channel: with HBM latencies of a few
hundred cycles, a decode V store on the u280 wants ``depth`` 32). The golden model's timing
counts the beats of the busiest channel at the channel's rate; a prefill K store of rows
``C`` positions apart writes the beat they share once per row here (disjoint bytes), so on
small builds (``sim``: 2 channels) it writes up to 4x the golden model's beats.

Ports: one buffer client port (``buf``, reads only), per weight channel a write port
(``wr[c]``, :func:`~flightllm.hw.embed.write_port_signature`, for a
:class:`~flightllm.hw.axi.BurstWriter`) and a read port (``rd[c]``, for the INT4 V
read-modify-write; idle in builds without ``int4r/32``). Every write is a 1-beat command
presented with its data at hand.

Resources (Yosys ``synth_xilinx -family xcup``, the flow of ``bench/resources.py``): ``u280``
(32 channels of 512 bits, depth 8) 50.6k LUTs (1.7k LUTRAM: the beat FIFOs), 24.2k FFs,
3 DSP48E2, nearly all of it per channel (the pending beat and its merge, the beat FIFO, the
read-back merge); ``sim`` 2.6k LUTs, 1.6k FFs.

Abort: the generator stops; a beat whose write command was taken gets its data beat; the
other queued beats and read commands are dropped; read data of taken read commands is
drained; then ``busy`` falls once every B response is in.
"""

from __future__ import annotations

from amaranth import Array, Cat, Const, Module, Mux, Signal
from amaranth.lib import data, fifo, stream, wiring
from amaranth.lib.wiring import In, Out
from amaranth.utils import exact_log2

from .buffers import Reach, buf_regions, buffer_map, port_signature
from .embed import _lg, read_port_signature, write_port_signature
from .formats import WeightFormat
from .isa import _FIELDS, Buf, KvStFmt, Opcode
from .kvcache import KV_GROUP
from .params import HwParams

__all__ = ["KvStoreEngine", "ST_KT_SRC"]

#: the buffers ST_KT may read: the int8 ones
ST_KT_SRC = (Buf.HQ, Buf.QQ, Buf.KQ, Buf.VQ, Buf.PQ)


def _fld(word, name):
    off, width, _ = _FIELDS[KvStFmt][name]
    return word[off:off + width]


def _nib_bits(nm):
    """A nibble mask as a bit mask (each bit four times)."""
    return Cat(*(b.replicate(4) for b in nm))


class KvStoreEngine(wiring.Component):
    """The ST_KT engine (module docstring).

    Parameters
    ----------
    params : HwParams
    addr_bits : int
        Width of the command addresses.
    depth : int
        Beats queued per channel between the pending beat and the writer (and read-backs in
        flight per channel); also the buffer reads in flight.

    Attributes
    ----------
    issue : In(stream of :func:`~flightllm.hw.control.entry_layout`)
    done, busy, fault : Out(1)
    fault_pc : Out(32)
    abort : In(1)
    buf : Out(:func:`~flightllm.hw.buffers.port_signature`)
    wr : Out(:func:`~flightllm.hw.embed.write_port_signature`).array(weight_channels)
    rd : Out(:func:`~flightllm.hw.embed.read_port_signature`).array(weight_channels)
    """

    def __init__(self, params: HwParams, *, addr_bits: int = 64, depth: int = 8):
        from .control import PC_BITS, entry_layout

        try:
            self.p = params
            for v, what in ((params.weight_channels, "weight_channels"), (params.chains, "chains"),
                            (params.chain_len, "chain_len"), (params.sfu_lanes, "sfu_lanes"),
                            (params.hbm_port_bits, "hbm_port_bits")):
                _lg(v, what)
            if params.hbm_port_bits < 64:
                raise ValueError(f"KvStoreEngine: hbm_port_bits must be at least 64, not {params.hbm_port_bits}")
            if depth < 2:
                raise ValueError(f"KvStoreEngine: depth must be at least 2, not {depth}")
        except ValueError:
            self._MustUse__silence = True
            raise
        self.addr_bits, self.depth = addr_bits, depth
        self.kv_bits = tuple(sorted({WeightFormat.parse(n).bits for n in params.kv_formats}))
        self.regions = buffer_map(params)
        self.reach = {"buf": Reach(reads=buf_regions(params, ST_KT_SRC))}      #: what ``buf`` touches
        W = params.hbm_port_bits
        C = params.weight_channels
        super().__init__({
            "issue": In(stream.Signature(entry_layout())),
            "done": Out(1), "busy": Out(1), "fault": Out(1), "fault_pc": Out(PC_BITS), "abort": In(1),
            "buf": Out(port_signature(params)),
            "wr": Out(write_port_signature(addr_bits, W)).array(C),
            "rd": Out(read_port_signature(addr_bits, W)).array(C),
        })

    # ------------------------------------------------------------------------------------
    def elaborate(self, platform):
        m = Module()
        p = self.p
        C, R, L, Lb, W = p.weight_channels, p.chains, p.chain_len, p.sfu_lanes, p.hbm_port_bits
        Rc = R // C
        BB = W // 8
        lgC, lgR, lgRc, lgL, lgLb, lgBB = (exact_log2(v) for v in (C, R, Rc, L, Lb, BB))
        E = min(L, Lb, KV_GROUP)                    # K: values a step
        NV = min(Lb, KV_GROUP, C)                   # V: values (channels) a step
        lgE, lgNV = exact_log2(E), exact_log2(NV)
        AI = min(self.addr_bits, 48)                # internal byte addresses
        D = self.depth
        int4 = 4 in self.kv_bits
        regs = self.regions
        by_id = sorted(regs.values(), key=lambda r: r.id)
        nreg = len(by_id)
        wbits = len(self.buf.rd_req.payload.word)

        # ---------------------------------------------------------------- the instruction
        e = self.issue.payload
        word = Signal(128)
        pc = Signal(32)
        rows = Signal(32)
        pos0 = Signal(32)
        src = Signal(5)
        kind = Signal()
        bits = Signal(4)
        nkv = Signal(8)
        hd = Signal(10)
        cap = Signal(16)
        kv_off = Signal(24)
        hstride = Signal(24)
        b8 = Signal()                               # 8-bit values (else 4)
        m.d.comb += b8.eq(bits == 8)
        fault = self.fault
        drain = Signal()

        # ---------------------------------------------------------------- generator
        gen = Signal()                              # stepping
        t = Signal(32)
        g = Signal(8)
        dq = Signal(10)                             # d = dq * (E or NV)
        gbase = Signal(AI)                          # 64 * (kv_off + g * head_stride)
        gx = Signal(18)                             # g * head_dim (the head's first element in a row)
        dq_n = Mux(kind, hd >> lgNV, hd >> lgE)     # steps per head
        last_t = t == rows - 1
        last_g = g == nkv - 1
        last_dq = dq == dq_n - 1
        adv = Signal()                              # the address pipeline moves
        row_words = Array([Const(r.row_words, 16) for r in by_id] + [Const(0, 16)] * (32 - nreg))

        # S1: the step
        s1_v, s2_v, s3_v = Signal(), Signal(), Signal()
        s1_t, s1_pos, s1_d, s1_x = Signal(8), Signal(32), Signal(10), Signal(18)
        s1_gbase = Signal(AI)
        with m.If(adv):
            m.d.sync += [s1_v.eq(gen), s1_t.eq(t), s1_pos.eq(pos0 + t), s1_d.eq(Mux(kind, dq << lgNV, dq << lgE)),
                         s1_x.eq(gx + Mux(kind, dq << lgNV, dq << lgE)), s1_gbase.eq(gbase)]
            with m.If(gen):
                # K: t, g, dq (inner); V: g, dq, t (inner)
                with m.If(kind == 0):
                    with m.If(~last_dq):
                        m.d.sync += dq.eq(dq + 1)
                    with m.Else():
                        m.d.sync += dq.eq(0)
                        with m.If(~last_g):
                            m.d.sync += [g.eq(g + 1), gbase.eq(gbase + (hstride << 6)), gx.eq(gx + hd)]
                        with m.Else():
                            m.d.sync += [g.eq(0), gbase.eq(kv_off << 6), gx.eq(0), t.eq(t + 1)]
                            with m.If(last_t):
                                m.d.sync += gen.eq(0)
                with m.Else():
                    with m.If(~last_t):
                        m.d.sync += t.eq(t + 1)
                    with m.Else():
                        m.d.sync += t.eq(0)
                        with m.If(~last_dq):
                            m.d.sync += dq.eq(dq + 1)
                        with m.Else():
                            m.d.sync += dq.eq(0)
                            with m.If(~last_g):
                                m.d.sync += [g.eq(g + 1), gbase.eq(gbase + (hstride << 6)), gx.eq(gx + hd)]
                            with m.Else():
                                m.d.sync += gen.eq(0)
        # S2: record fields, tile * ng, the buffer word
        rowc, colc = Mux(kind, s1_d, s1_pos), Mux(kind, s1_pos, s1_d)       # tensor (row, column)
        s2_tn, s2_grp, s2_in = Signal(32), Signal(16), Signal(32)
        s2_ch, s2_word, s2_lane = Signal(range(C)), Signal(wbits), Signal(range(Lb))
        s2_gbase = Signal(AI)
        ng = Mux(kind, cap >> 5, hd >> 5)
        jj = rowc[:lgR] if R > 1 else Const(0, 1)
        with m.If(adv):
            e_ = colc[:5]
            b_ = e_ >> lgL
            lane = e_[:lgL] if L > 1 else Const(0, 1)
            i_ = (jj >> lgC) if Rc > 1 else Const(0, 1)
            m.d.sync += [s2_v.eq(s1_v), s2_tn.eq((rowc[:16] >> lgR) * ng), s2_grp.eq(colc >> 5),
                         s2_in.eq((((b_ << lgRc) + i_) << lgL) + lane),
                         s2_ch.eq(jj[:lgC] if C > 1 else 0),
                         s2_word.eq(s1_t * row_words[src] + (s1_x >> lgLb)),
                         s2_lane.eq(s1_x[:lgLb] if Lb > 1 else 0), s2_gbase.eq(s1_gbase)]
        # S3: the byte address (and nibble)
        lg_rb = lgRc + 5 + Mux(b8, 3, 2)
        bitoff = Mux(b8, (((s2_tn + s2_grp) << lg_rb) + (s2_in << 3)), (((s2_tn + s2_grp) << lg_rb) + (s2_in << 2)))
        ml = data.StructLayout({"addr": AI, "nib": 1, "ch": range(C), "lane": range(Lb)})
        s3 = Signal(ml)
        s3_word = Signal(wbits)
        with m.If(adv):
            m.d.sync += [s3_v.eq(s2_v), s3.addr.eq(s2_gbase + (bitoff >> 3)), s3.nib.eq(bitoff[2]),
                         s3.ch.eq(s2_ch), s3.lane.eq(s2_lane), s3_word.eq(s2_word)]
        metaq = m.submodules.meta_fifo = fifo.SyncFIFO(width=ml.size, depth=D)
        dataq = m.submodules.data_fifo = fifo.SyncFIFOBuffered(width=8 * Lb, depth=D)
        rq = self.buf.rd_req
        m.d.comb += [rq.valid.eq(s3_v & metaq.w_rdy & ~drain & ~fault), rq.payload.region.eq(src),
                     rq.payload.word.eq(s3_word),
                     metaq.w_en.eq(rq.valid & rq.ready), metaq.w_data.eq(s3),
                     adv.eq((~s3_v | (rq.valid & rq.ready)) & ~drain & ~fault)]
        m.d.comb += [dataq.w_en.eq(self.buf.rd_data.valid),
                     dataq.w_data.eq(Cat(*(self.buf.rd_data.payload[k][:8] for k in range(Lb)))),
                     self.buf.wr.valid.eq(0)]

        # ---------------------------------------------------------------- join -> entries
        mh = data.View(ml, metaq.r_data)
        dv = [dataq.r_data[8 * k:8 * k + 8] for k in range(Lb)]
        join_ok = metaq.r_rdy & dataq.r_rdy
        bib = mh.addr[:lgBB]                        # byte in beat
        baddr = mh.addr[lgBB:]                      # beat address
        # K: E values from lane mh.lane; V: NV values from lane mh.lane
        # (compound expressions go through signals: a slice of an expression re-emits it)
        kvals, vvals = Signal(8 * E), Signal(8 * NV)
        m.d.comb += [kvals.eq(Array(Cat(*dv[k * E:(k + 1) * E]) for k in range(Lb // E))[mh.lane >> lgE]),
                     vvals.eq(Array(Cat(*dv[k * NV:(k + 1) * NV]) for k in range(Lb // NV))[mh.lane >> lgNV])]
        kv = [kvals[8 * k:8 * k + 8] for k in range(E)]
        vv = [vvals[8 * k:8 * k + 8] for k in range(NV)]
        in4 = lambda v: (v[3:] == 0) | (v[3:] == 0b11111)                    # noqa: E731
        range_bad = Signal()
        if int4:
            m.d.comb += range_bad.eq(~b8 & Mux(kind, ~Cat(*(in4(v) for v in vv)).all(),
                                               ~Cat(*(in4(v) for v in kv)).all()))
        # K data: the chunk replicated over the beat; its nibble mask
        kdata, knm, vnm = Signal(W), Signal(W // 4), Signal(W // 4)
        m.d.comb += [kdata.eq(Mux(b8, Cat(*kv).replicate(W // (8 * E)),
                                  Cat(*(v[:4] for v in kv)).replicate(W // (4 * E)))),
                     knm.eq(Mux(b8, Const((1 << (2 * E)) - 1, W // 4) << (bib << 1),
                                Const((1 << E) - 1, W // 4) << (bib << 1)))]
        # V: per lane j, one byte or nibble replicated
        vdata = [Signal(W, name=f"vdata{j}") for j in range(NV)]
        m.d.comb += [vd.eq(Mux(b8, v.replicate(BB), v[:4].replicate(2 * BB))) for vd, v in zip(vdata, vv)]
        m.d.comb += vnm.eq(Mux(b8, Const(0b11, W // 4) << (bib << 1), Const(1, W // 4) << Cat(mh.nib, bib)))

        can = [Signal(name=f"can{c}") for c in range(C)]
        tgt = [Signal(name=f"tgt{c}") for c in range(C)]
        for c in range(C):
            m.d.comb += tgt[c].eq(Mux(kind, (c >> lgNV) == (mh.ch >> lgNV), mh.ch == c))
        accept = Signal()
        m.d.comb += accept.eq(join_ok & Cat(*(~tgt[c] | can[c] for c in range(C))).all() & ~drain & ~fault
                              & ~range_bad)
        # drain: a meta entry leaves with its read's data (every read taken by the buffers returns)
        m.d.comb += [metaq.r_en.eq(accept | (drain & join_ok)), dataq.r_en.eq(accept | (drain & join_ok))]
        bad_value = Signal()
        m.d.comb += bad_value.eq(join_ok & range_bad & ~drain & ~fault)

        # ---------------------------------------------------------------- per channel
        flush_all = Signal()                        # the generator is done: flush the pending beats
        bl = data.StructLayout({"addr": AI - lgBB, "data": W, "nm": W // 4, "rmw": 1})
        quiet_c = []
        wr_idle = []
        for c in range(C):
            pv = Signal(name=f"pend_v{c}")
            pa = Signal(AI - lgBB, name=f"pend_a{c}")
            pd = Signal(W, name=f"pend_d{c}")
            pn = Signal(W // 4, name=f"pend_nm{c}")
            beatq = fifo.SyncFIFO(width=bl.size, depth=D)
            m.submodules[f"beat_fifo{c}"] = beatq
            rdq = fifo.SyncFIFO(width=AI - lgBB, depth=D) if int4 else None
            if int4:
                m.submodules[f"rdcmd_fifo{c}"] = rdq
            room = beatq.w_rdy & (rdq.w_rdy if int4 else 1)
            m.d.comb += can[c].eq(~pv | room)
            edata = Signal(W, name=f"edata{c}")
            enm = Signal(W // 4, name=f"enm{c}")
            m.d.comb += [edata.eq(Mux(kind, vdata[c % NV], kdata)), enm.eq(Mux(kind, vnm, knm))]
            take = accept & tgt[c]
            flush = Signal(name=f"flush{c}")
            m.d.comb += flush.eq(pv & room & ((take & (pa != baddr)) | (flush_all & ~take)) & ~drain)
            with m.If(take):
                with m.If(pv & (pa == baddr)):
                    x = _nib_bits(enm)
                    m.d.sync += [pd.eq((pd & ~x) | (edata & x)), pn.eq(pn | enm)]
                with m.Else():
                    m.d.sync += [pv.eq(1), pa.eq(baddr), pd.eq(edata), pn.eq(enm)]
            with m.Elif(flush):
                m.d.sync += pv.eq(0)
            with m.If(drain):
                m.d.sync += pv.eq(0)
            even, odd = pn[0::2], pn[1::2]
            rmw = (even ^ odd).any() if int4 else Const(0)
            bw = data.View(bl, beatq.w_data)
            m.d.comb += [beatq.w_en.eq(flush), bw.addr.eq(pa), bw.data.eq(pd), bw.nm.eq(pn), bw.rmw.eq(rmw)]
            if int4:
                m.d.comb += [rdq.w_en.eq(flush & rmw), rdq.w_data.eq(pa)]

            # reads for read-modify-write
            rd, wr = self.rd[c], self.wr[c]
            rd_out = Signal(range(2 * D + 2), name=f"rd_out{c}")
            wr_out = Signal(16, name=f"wr_out{c}")
            if int4:
                m.d.comb += [rd.cmd.valid.eq(rdq.r_rdy & ~drain), rd.cmd.payload.addr.eq(rdq.r_data << lgBB),
                             rd.cmd.payload.beats.eq(1),
                             rdq.r_en.eq((rd.cmd.valid & rd.cmd.ready) | drain)]
            else:
                m.d.comb += rd.cmd.valid.eq(0)
            # the writer: a command when the beat (and its read-back) is at hand, then its data
            bh = data.View(bl, beatq.r_data)
            wst = Signal(name=f"wst{c}")
            ready_h = beatq.r_rdy & (~bh.rmw | rd.data.valid)
            x = _nib_bits(bh.nm)
            merged = Mux(bh.rmw, (rd.data.payload & ~x) | (bh.data & x), bh.data)
            m.d.comb += [wr.cmd.valid.eq(~wst & ready_h & ~drain), wr.cmd.payload.addr.eq(bh.addr << lgBB),
                         wr.cmd.payload.beats.eq(1),
                         wr.data.valid.eq(wst), wr.data.payload.data.eq(merged),
                         wr.data.payload.strb.eq(Cat(*(bh.nm[2 * k] | bh.nm[2 * k + 1] for k in range(BB))))]
            wdone = wr.data.valid & wr.data.ready
            with m.If(wr.cmd.valid & wr.cmd.ready):
                m.d.sync += wst.eq(1)
            with m.If(wdone):
                m.d.sync += wst.eq(0)
            m.d.comb += beatq.r_en.eq(wdone | (drain & ~wst))
            rd_pop = (wdone & bh.rmw) | (drain & ~wst & (rd_out != 0))
            m.d.comb += rd.data.ready.eq(rd_pop)
            m.d.sync += [rd_out.eq(rd_out + (rd.cmd.valid & rd.cmd.ready) - (rd.data.valid & rd.data.ready)),
                         wr_out.eq(wr_out + (wr.cmd.valid & wr.cmd.ready) - wr.done)]
            quiet_c.append(~pv & ~beatq.r_rdy & ~wst & (rd_out == 0) & (wr_out == 0)
                           & (~rdq.r_rdy if int4 else 1))
            wr_idle.append(~wst)
        all_quiet = Cat(*quiet_c).all()

        # ---------------------------------------------------------------- the sequence
        src_rows = Array([Const(regs[b.name].rows if b in ST_KT_SRC and b.name in regs else 0, 16) for b in Buf]
                         + [Const(0, 16)] * (32 - len(Buf)))
        src_width = Array([Const(regs[b.name].width if b in ST_KT_SRC and b.name in regs else 0, 32) for b in Buf]
                          + [Const(0, 32)] * (32 - len(Buf)))
        bits_ok = Const(0)
        for b in self.kv_bits:
            bits_ok = bits_ok | (bits == b)
        pipe_empty = ~s1_v & ~s2_v & ~s3_v & ~metaq.r_rdy & (dataq.level == 0)
        m.d.comb += [self.busy.eq(0), drain.eq(0), flush_all.eq(0)]
        with m.FSM(name="kvstore"):
            with m.State("IDLE"):
                m.d.comb += self.issue.ready.eq(~self.abort & ~fault)
                with m.If(self.issue.valid & self.issue.ready):
                    m.d.sync += [word.eq(e.word), pc.eq(e.pc),
                                 rows.eq(Mux(_fld(e.word, "rows_reg") != 0, e.regs[0], 1)), pos0.eq(e.regs[1])]
                    m.next = "LATCH"
            with m.State("LATCH"):
                m.d.comb += self.busy.eq(1)
                m.d.sync += [src.eq(_fld(word, "src")), kind.eq(_fld(word, "kind")), bits.eq(_fld(word, "bits")),
                             nkv.eq(_fld(word, "kv_heads")), hd.eq(_fld(word, "head_dim")), cap.eq(_fld(word, "cap")),
                             kv_off.eq(_fld(word, "kv_off")), hstride.eq(_fld(word, "head_stride"))]
                m.next = "CHECK"
                with m.If(self.abort):
                    m.next = "DRAIN"
            with m.State("CHECK"):
                m.d.comb += self.busy.eq(1)
                bad = ((word[:6] != Opcode.ST_KT.value) | ~bits_ok | (hd == 0) | (hd[:5] != 0) | (cap == 0)
                       | (cap[:5] != 0) | (nkv == 0)
                       | ((pos0 + rows)[:33] > cap) | (src_rows[src] == 0) | (rows > src_rows[src])
                       | (nkv * hd > src_width[src]))
                m.d.sync += [t.eq(0), g.eq(0), dq.eq(0), gbase.eq(kv_off << 6), gx.eq(0)]
                with m.If(self.abort):
                    m.next = "DRAIN"
                with m.Elif(bad):
                    m.d.sync += [fault.eq(1), self.fault_pc.eq(pc)]
                    m.next = "FAULT"
                with m.Elif(rows == 0):
                    m.next = "DONE"
                with m.Else():
                    m.d.sync += gen.eq(1)
                    m.next = "RUN"
            with m.State("RUN"):
                m.d.comb += self.busy.eq(1)
                m.d.comb += flush_all.eq(~gen & pipe_empty)
                with m.If(self.abort):
                    m.next = "DRAIN"
                with m.Elif(bad_value):
                    m.d.sync += [fault.eq(1), self.fault_pc.eq(pc), gen.eq(0)]
                    m.next = "FAULT"
                with m.Elif(~gen & pipe_empty & all_quiet):
                    m.next = "DONE"
            with m.State("DONE"):
                m.d.comb += [self.busy.eq(1), self.done.eq(1)]
                m.next = "IDLE"
            with m.State("FAULT"):
                # the queued beats keep going out; nothing new is generated
                m.d.comb += self.busy.eq(1)
                with m.If(self.abort):
                    m.d.sync += fault.eq(0)
                    m.next = "DRAIN"
            with m.State("DRAIN"):
                m.d.comb += [self.busy.eq(1), drain.eq(1)]
                m.d.sync += [gen.eq(0), s1_v.eq(0), s2_v.eq(0), s3_v.eq(0)]
                with m.If(all_quiet & pipe_empty & Cat(*wr_idle).all()):
                    m.next = "IDLE"
        return m
