"""Dequant unit: one HBM weight channel's packed bytes in, chain beats out.

One unit per weight channel. It takes the channel's two regions exactly as
:func:`flightllm.hw.formats.pack_tensor` writes them, as two streams of
``hbm_port_bits``-wide words (byte 0 of the region in bits ``[7:0]`` of the first
word): ``payload`` (the blocks) and ``scales`` (little-endian uint16, one per
block, same order). Per operation the streamer sends exactly
``ceil(blocks * block_bits / W)`` payload words and ``ceil(blocks * 16 / W)`` scale
words (:meth:`EngineGeometry.stream_words`); the unused tail of the last word is
dropped. The format is chosen per operation on ``cfg``.

Pipeline (each arrow a valid/ready handshake or a full flag)::

    payload words -> gearbox (bit buffer, 1 block/cycle) --+
                                                            +-> unpack reg -> next slots (one per chain) -> current (shift L lanes per beat)
    scale words   -> scale word register (1 scale/cycle) --+

Blocks arrive in :func:`~flightllm.hw.formats.stripe_order`: for one quant group,
row ``c``, ``c+C``, ... of the tile, i.e. one block for each of the ``Rc`` chains
this unit feeds. Those chains run in lockstep, so the unit collects ``Rc`` blocks in
the *next* slots, moves them to *current* together and emits ``bpb = k / L`` beats
from them; the next group's blocks load meanwhile. Throughput is one block per
cycle, enough to keep the chains busy whenever ``Rc <= bpb`` (every format of the
``sim`` preset) and the HBM word rate allows.
"""

from __future__ import annotations

import math

from amaranth import Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from .geometry import EngineGeometry
from .params import HwParams

__all__ = ["DequantUnit", "beat_layout", "dequant_cfg_layout"]


def beat_layout(geom: EngineGeometry) -> data.ArrayLayout:
    """One beat for the ``Rc`` chains of a unit: per chain ``L`` weights, indices, a scale."""
    chain = data.StructLayout({
        "w": data.ArrayLayout(signed(8), geom.L),
        "idx": data.ArrayLayout(unsigned(geom.index_bits), geom.L),
        "scale": unsigned(16),
    })
    return data.ArrayLayout(chain, geom.Rc)


def dequant_cfg_layout(geom: EngineGeometry) -> data.StructLayout:
    """Per-operation config: format code and block steps (row tiles x quant groups)."""
    return data.StructLayout({"fmt": unsigned(geom.fmt_bits), "steps": unsigned(32)})


class DequantUnit(wiring.Component):
    """Unpacks one weight channel into lockstep beats for ``chains // weight_channels`` chains.

    Parameters
    ----------
    params : HwParams

    Attributes
    ----------
    cfg : In(stream)
        :func:`dequant_cfg_layout`; accepted only when the previous operation's last
        beat has left. ``steps`` = row tiles x quant groups; the unit emits
        ``steps * bpb`` beats.
    payload, scales : In(stream of hbm_port_bits)
        The channel's payload and scale regions.
    beat : Out(stream)
        :func:`beat_layout`; weights are INT8-widened (sign-extended), lanes past the
        block's kept weights carry weight 0.
    busy : Out(1)
        An operation is in progress.
    """

    def __init__(self, params: HwParams):
        try:
            self.geom = g = EngineGeometry(params)
        except (TypeError, ValueError):
            self._MustUse__silence = True      # never elaborated: no unused-elaboratable warning
            raise
        super().__init__({
            "cfg": In(stream.Signature(dequant_cfg_layout(g))),
            "payload": In(stream.Signature(unsigned(g.W))),
            "scales": In(stream.Signature(unsigned(g.W))),
            "beat": Out(stream.Signature(beat_layout(g))),
            "busy": Out(1),
        })

    def elaborate(self, platform):
        g = self.geom
        m = Module()
        L, IB, K, Rc, W = g.L, g.index_bits, g.kmax, g.Rc, g.W
        # Index lanes only as far as a sparse block (or one beat) reaches.
        KI = max([L] + [f.kept for f in g.formats if f.index_bits])
        lw = int(math.log2(W))

        fmt = Signal(g.fmt_bits)
        busy = self.busy
        beats_left = Signal(40)
        blk_left = Signal(40)
        pw_left = Signal(48)
        sw_left = Signal(40)

        # Per-format constants, selected by the latched code.
        bb = Signal(range(g.block_bits_max + 1))
        bpb = Signal(range(g.kmax + 1))
        with m.Switch(fmt):
            for f in g.formats:
                with m.Case(f.code):
                    m.d.comb += [bb.eq(f.block_bits), bpb.eq(f.bpb)]

        # -- gearbox: bit buffer, LSB = oldest bit ------------------------------
        gran = math.gcd(W, *[f.block_bits for f in g.formats])   # fill moves in these steps
        cap = W + g.block_bits_max
        buf = Signal(cap, reset_less=True)
        fill = Signal(range(cap // gran + 1))                     # in units of gran bits
        blk_avail = (fill * gran >= bb) & (blk_left != 0)
        take_blk = Signal()
        buf_sh = Signal(cap)
        with m.Switch(fmt):
            for f in g.formats:
                with m.Case(f.code):
                    m.d.comb += buf_sh.eq(buf >> f.block_bits)
        fill_after = Signal.like(fill)
        # bb is a multiple of gran by construction: subtract the per-format constant.
        with m.Switch(fmt):
            for f in g.formats:
                with m.Case(f.code):
                    m.d.comb += fill_after.eq(fill - take_blk * (f.block_bits // gran))
        m.d.comb += self.payload.ready.eq(busy & (pw_left != 0) & (fill_after * gran + W <= cap))
        word_in = self.payload.valid & self.payload.ready
        shamt = Signal(range(cap // gran + 1))
        m.d.comb += shamt.eq(fill_after)
        ins = Signal(cap)
        # Byte/granule-aligned insert position: the only data-dependent shifter here.
        m.d.comb += ins.eq((self.payload.payload << (shamt * gran))[:cap])
        kept = Signal(cap)
        m.d.comb += kept.eq(Mux(take_blk, buf_sh, buf))
        with m.If(word_in):
            m.d.sync += [buf.eq(kept | ins), fill.eq(fill_after + W // gran), pw_left.eq(pw_left - 1)]
        with m.Else():
            m.d.sync += [buf.eq(kept), fill.eq(fill_after)]

        # -- scale words --------------------------------------------------------
        sreg = Signal(W, reset_less=True)
        scnt = Signal(range(W // 16 + 1))
        take_sc = Signal()
        sc_avail = scnt != 0
        sc_next = Signal.like(scnt)
        m.d.comb += sc_next.eq(scnt - take_sc)
        m.d.comb += self.scales.ready.eq(busy & (sw_left != 0) & (sc_next == 0))
        with m.If(self.scales.valid & self.scales.ready):
            m.d.sync += [sreg.eq(self.scales.payload), scnt.eq(W // 16), sw_left.eq(sw_left - 1)]
        with m.Else():
            m.d.sync += scnt.eq(sc_next)
            with m.If(take_sc):
                m.d.sync += sreg.eq(sreg >> 16)

        # -- unpack: block bits -> K lanes of (int8, index), registered ----------
        uw = Signal(data.ArrayLayout(signed(8), K))
        ui = Signal(data.ArrayLayout(unsigned(IB), KI))
        with m.Switch(fmt):
            for f in g.formats:
                with m.Case(f.code):
                    for i in range(f.kept):
                        m.d.comb += uw[i].eq(buf[i * f.bits:(i + 1) * f.bits].as_signed())
                        if f.index_bits:
                            o = f.kept * f.bits + i * f.index_bits
                            m.d.comb += ui[i].eq(buf[o:o + f.index_bits])
        u_full = Signal()
        u_w = Signal(K * 8, reset_less=True)
        u_i = Signal(KI * IB, reset_less=True)
        u_s = Signal(16, reset_less=True)
        u_take = Signal()
        load_u = blk_avail & sc_avail & (~u_full | u_take)
        m.d.comb += [take_blk.eq(load_u), take_sc.eq(load_u)]
        with m.If(load_u):
            m.d.sync += [u_w.eq(uw.as_value()), u_i.eq(ui.as_value()), u_s.eq(sreg[:16]),
                         u_full.eq(1), blk_left.eq(blk_left - 1)]
        with m.Elif(u_take):
            m.d.sync += u_full.eq(0)

        # -- next slots and current beat registers -------------------------------
        nxt_w = [Signal(K * 8, name=f"nxt_w{j}", reset_less=True) for j in range(Rc)]
        nxt_i = [Signal(KI * IB, name=f"nxt_i{j}", reset_less=True) for j in range(Rc)]
        nxt_s = [Signal(16, name=f"nxt_s{j}", reset_less=True) for j in range(Rc)]
        cur_w = [Signal(K * 8, name=f"cur_w{j}", reset_less=True) for j in range(Rc)]
        cur_i = [Signal(KI * IB, name=f"cur_i{j}", reset_less=True) for j in range(Rc)]
        cur_s = [Signal(16, name=f"cur_s{j}", reset_less=True) for j in range(Rc)]
        fj = Signal(range(Rc + 1))
        cur_valid = Signal()
        bcnt = Signal(range(g.kmax + 1))
        fire = self.beat.valid & self.beat.ready
        last_beat = bcnt == bpb - 1
        full_now = fj == Rc
        bypass = (fj == Rc - 1) & u_full
        xfer = Signal()
        m.d.comb += xfer.eq(busy & (~cur_valid | (fire & last_beat)) & (full_now | bypass))
        m.d.comb += u_take.eq(u_full & (~full_now | xfer))

        with m.If(u_take):
            slot = Signal.like(fj)
            m.d.comb += slot.eq(Mux(full_now, 0, fj))
            for j in range(Rc):
                with m.If(slot == j):
                    m.d.sync += [nxt_w[j].eq(u_w), nxt_i[j].eq(u_i), nxt_s[j].eq(u_s)]
            with m.If(xfer):
                m.d.sync += fj.eq(Mux(full_now, 1, 0))
            with m.Else():
                m.d.sync += fj.eq(fj + 1)
        with m.Elif(xfer):
            m.d.sync += fj.eq(0)

        with m.If(xfer):
            for j in range(Rc):
                last_from_u = bypass & (j == Rc - 1)
                m.d.sync += [cur_w[j].eq(Mux(last_from_u, u_w, nxt_w[j])),
                             cur_i[j].eq(Mux(last_from_u, u_i, nxt_i[j])),
                             cur_s[j].eq(Mux(last_from_u, u_s, nxt_s[j]))]
            m.d.sync += [cur_valid.eq(1), bcnt.eq(0)]
        with m.Elif(fire):
            with m.If(last_beat):
                m.d.sync += [cur_valid.eq(0), bcnt.eq(0)]
            with m.Else():
                m.d.sync += bcnt.eq(bcnt + 1)
                for j in range(Rc):
                    m.d.sync += [cur_w[j].eq(cur_w[j] >> (L * 8)), cur_i[j].eq(cur_i[j] >> (L * IB))]

        m.d.comb += self.beat.valid.eq(cur_valid)
        for j in range(Rc):
            m.d.comb += [self.beat.payload[j].w.eq(cur_w[j][:L * 8]),
                         self.beat.payload[j].idx.eq(cur_i[j][:L * IB]),
                         self.beat.payload[j].scale.eq(cur_s[j])]

        # -- operation control ----------------------------------------------------
        with m.If(fire):
            m.d.sync += beats_left.eq(beats_left - 1)
            with m.If(beats_left == 1):
                m.d.sync += busy.eq(0)
        m.d.comb += self.cfg.ready.eq(~busy)
        with m.If(self.cfg.valid & self.cfg.ready):
            steps = self.cfg.payload.steps
            m.d.sync += [fmt.eq(self.cfg.payload.fmt), busy.eq(steps != 0),
                         fill.eq(0), scnt.eq(0), u_full.eq(0), fj.eq(0), cur_valid.eq(0)]
            with m.Switch(self.cfg.payload.fmt):
                for f in g.formats:
                    with m.Case(f.code):
                        blocks = steps * Rc
                        m.d.sync += [beats_left.eq(steps * f.bpb), blk_left.eq(blocks),
                                     pw_left.eq((blocks * f.block_bits + W - 1) >> lw),
                                     sw_left.eq((blocks * 16 + W - 1) >> lw)]
        return m
