"""Dequant unit: one HBM weight channel's packed bytes in, chain beats out.

One unit per weight channel. It takes the channel's two regions exactly as
:func:`flightllm.hw.formats.pack_tensor` writes them, as two streams of
``hbm_port_bits``-wide words (byte 0 of the region in bits ``[7:0]`` of the first
word): ``payload`` (the blocks) and ``scales`` (little-endian uint16, one per
block, same order). Per operation the streamer sends exactly
``ceil(blocks * block_bits / W)`` payload words and ``ceil(blocks * 16 / W)`` scale
words (:meth:`EngineGeometry.stream_words`); the unused tail of the last word is
dropped. The format and the counts come per operation on ``cfg`` (computed by the
host-side packer :func:`flightllm.hw.mpe.mpe_config`: no multiplier in the RTL).

Pipeline::

    payload words -> word window (whole words queued, read offset r) --> P extractors --+
                                                                                        +-> next step slots -> current step -> lane unpack -> beat
    scale words   -> word window (16-bit granules)                   --> P scales -----+

Blocks arrive in :func:`~flightllm.hw.formats.stripe_order`: per quant group one
block for each of the ``Rc`` chains this unit feeds. A *step* is ``gpb`` groups
(``EngineGeometry``: ``gpb > 1`` when a block holds fewer kept weights than the chain
has lanes, so one beat carries several groups in separate chain segments), i.e.
``Rc * gpb`` blocks, emitted in lockstep as ``bpb`` beats. Each cycle the unit cuts
``P`` whole blocks (a per-format constant: enough for one beat per cycle, or the
most one HBM word per cycle can supply) from the window into the *next* step's
slots, still packed (values and indices split); a full step moves to *current*
(or straight there, bypassing *next*, when the cut completing it happens while the
last beat of the current step leaves). Weights are widened to INT8 only at the
output, per lane from the *current* registers (a small mux per lane over bit width,
beat and segment): the per-bit format crossbar is never built ``Rc`` times.
"""

from __future__ import annotations

import math

from amaranth import Cat, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from .geometry import EngineGeometry, word_window
from .params import HwParams

__all__ = ["DequantUnit", "beat_layout", "dequant_cfg_layout"]


def beat_layout(geom: EngineGeometry) -> data.ArrayLayout:
    """One beat for the ``Rc`` chains of a unit: per chain ``L`` weights, indices and one
    scale per segment (``gpb_max``; segment ``s`` = lanes ``[s*kept, (s+1)*kept)``)."""
    chain = data.StructLayout({
        "w": data.ArrayLayout(signed(8), geom.L),
        "idx": data.ArrayLayout(unsigned(geom.index_bits), geom.L),
        "scale": data.ArrayLayout(unsigned(16), geom.gpb_max),
    })
    return data.ArrayLayout(chain, geom.Rc)


def dequant_cfg_layout(geom: EngineGeometry) -> data.StructLayout:
    """Per-operation config: format code, row tiles, quant groups, stream word counts."""
    return data.StructLayout({"fmt": unsigned(geom.fmt_bits), "tiles": unsigned(20),
                              "groups": unsigned(16), "pay_words": unsigned(32),
                              "scale_words": unsigned(32)})


class DequantUnit(wiring.Component):
    """Unpacks one weight channel into lockstep beats for ``chains // weight_channels`` chains.

    Parameters
    ----------
    params : HwParams

    Attributes
    ----------
    cfg : In(stream)
        :func:`dequant_cfg_layout`; accepted only when the previous operation's last
        beat has left. The unit emits ``tiles * ceil(groups / gpb) * bpb`` beats.
    payload, scales : In(stream of hbm_port_bits)
        The channel's payload and scale regions.
    beat : Out(stream)
        :func:`beat_layout`; weights are INT8-widened (sign-extended). In the short
        last step of a tile the missing segments carry scale 0.
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
        L, IB, Rc, W, S = g.L, g.index_bits, g.Rc, g.W, g.slots
        F = g.formats
        lrc = int(math.log2(Rc))

        busy = self.busy
        fmt = Signal(g.fmt_bits)
        tiles = Signal(20)
        groups = Signal(16)
        pw_left = Signal(32)
        sw_left = Signal(32)

        # -- per-format constants, selected by the latched code ----------------------
        gran = math.gcd(W, *[f.block_bits for f in F])
        E = max(f.P * f.block_bits for f in F)
        P = Signal(range(g.P_max + 1))
        Pt = Signal(range(g.P_max + 1))
        u_full = Signal(range(E // gran + 1))          # granules of a P-block cut
        u_tail = Signal(range(E // gran + 1))          # ... of a P_tail-block cut
        gpb = Signal(range(g.gpb_max + 1))
        bpb = Signal(range(max(f.bpb for f in F) + 1))
        with m.Switch(fmt):
            for f in F:
                with m.Case(f.code):
                    m.d.comb += [P.eq(f.P), Pt.eq(f.P_tail), gpb.eq(f.gpb), bpb.eq(f.bpb),
                                 u_full.eq(f.P * f.block_bits // gran),
                                 u_tail.eq(f.P_tail * f.block_bits // gran)]

        # -- word windows -----------------------------------------------------------
        x, avail, take, (p_nw, p_r) = word_window(m, "pay", self.payload, W, -(-(W - gran + E) // W),
                                                  gran, E, busy, pw_left)
        Es = g.P_max * 16
        xs, savail, stake, (s_nw, s_r) = word_window(m, "scl", self.scales, W, -(-(W - 16 + Es) // W),
                                                     16, Es, busy, sw_left)

        # -- step assembly state -------------------------------------------------------
        e_tile = Signal(20)
        e_grp = Signal(16)
        pos = Signal(range(S + 1))
        next_full = Signal()
        nxt_ng = Signal(range(g.gpb_max + 1))
        ext_done = e_tile == tiles
        rem = Signal(17)
        m.d.comb += rem.eq(groups - e_grp)
        ng = Signal(range(g.gpb_max + 1))
        m.d.comb += ng.eq(Mux(rem < gpb, rem, gpb))
        step_blocks = Signal(range(S + 1))
        m.d.comb += step_blocks.eq(ng << lrc)
        n_take = Signal(range(g.P_max + 1))
        units = Signal.like(u_full)
        tail = Signal()
        m.d.comb += [tail.eq(step_blocks - pos < P),
                     n_take.eq(Mux(tail, Pt, P)), units.eq(Mux(tail, u_tail, u_full))]

        cur_valid = Signal()
        bcnt = Signal.like(bpb)
        fire = self.beat.valid & self.beat.ready
        last_beat = bcnt == bpb - 1
        cur_free = Signal()
        m.d.comb += cur_free.eq(~cur_valid | (fire & last_beat))

        ext_go = Signal()
        m.d.comb += ext_go.eq(busy & ~ext_done & (avail >= units) & (savail >= n_take)
                              & (~next_full | cur_free))
        m.d.comb += [take.eq(Mux(ext_go, units, 0)), stake.eq(Mux(ext_go, n_take, 0))]
        completing = Signal()
        m.d.comb += completing.eq(ext_go & (pos + n_take == step_blocks))
        xfer = Signal()
        bypass = Signal()
        m.d.comb += [xfer.eq(cur_free & (next_full | completing)), bypass.eq(xfer & ~next_full)]

        # -- extractors: P whole blocks from the window, values and indices split ------
        def vbits(f):
            return f.kept * f.bits

        def ibits(f):
            return f.kept * f.index_bits

        ext_v, ext_x, ext_s = [], [], []
        for i in range(g.P_max):
            fs = [f for f in F if f.P > i]
            vw = max(vbits(f) for f in fs)
            iw = max(1, max(ibits(f) for f in fs))
            ev = Signal(vw, name=f"ext{i}_v")
            ex = Signal(iw, name=f"ext{i}_x")
            with m.Switch(fmt):
                for f in fs:
                    with m.Case(f.code):
                        o = i * f.block_bits
                        m.d.comb += ev.eq(x[o:o + vbits(f)])
                        if f.index_bits:
                            m.d.comb += ex.eq(x[o + vbits(f):o + f.block_bits])
            ext_v.append(ev)
            ext_x.append(ex)
            ext_s.append(xs[16 * i:16 * (i + 1)])

        # -- next / current step slots (packed values, packed indices, scale) ----------
        # which (pos, n_take) pairs occur, hence which extractor can write slot s
        pairs = set()
        for f in F:
            for ngr in range(1, f.gpb + 1):
                sb, p0 = ngr * Rc, 0
                while p0 < sb:
                    n = f.P if sb - p0 >= f.P else f.P_tail
                    pairs.add((p0, n))
                    p0 += n
        nxt, cur = [], []
        wval, wen = [], []
        for s in range(S):
            fs = [f for f in F if s < Rc * f.gpb]
            vw = max(vbits(f) for f in fs)
            iw = max(1, max(ibits(f) for f in fs))
            nv = Signal(vw, name=f"nxt{s}_v", reset_less=True)
            nx = Signal(iw, name=f"nxt{s}_x", reset_less=True)
            ns = Signal(16, name=f"nxt{s}_s", reset_less=True)
            cv = Signal(vw, name=f"cur{s}_v", reset_less=True)
            cx = Signal(iw, name=f"cur{s}_x", reset_less=True)
            cs = Signal(16, name=f"cur{s}_s", reset_less=True)
            wv = Signal(vw, name=f"w{s}_v")
            wx = Signal(iw, name=f"w{s}_x")
            ws = Signal(16, name=f"w{s}_s")
            we = Signal(name=f"w{s}_en")
            srcs = sorted({p0 for p0, n in pairs if 0 <= s - p0 < n})
            with m.Switch(pos):
                for p0 in srcs:
                    i = s - p0
                    with m.Case(p0):
                        m.d.comb += [wv.eq(ext_v[i]), wx.eq(ext_x[i]), ws.eq(ext_s[i]),
                                     we.eq(ext_go & (i < n_take))]
            with m.If(we):
                m.d.sync += [nv.eq(wv), nx.eq(wx), ns.eq(ws)]
            with m.If(xfer):
                byp = bypass & we
                m.d.sync += [cv.eq(Mux(byp, wv, nv)), cx.eq(Mux(byp, wx, nx)), cs.eq(Mux(byp, ws, ns))]
            nxt.append((nv, nx, ns))
            cur.append((cv, cx, cs))
        cur_ng = Signal.like(nxt_ng)

        # step bookkeeping
        with m.If(completing):
            m.d.sync += [pos.eq(0), nxt_ng.eq(ng)]
            with m.If(rem <= gpb):
                m.d.sync += [e_grp.eq(0), e_tile.eq(e_tile + 1)]
            with m.Else():
                m.d.sync += e_grp.eq(e_grp + gpb)
        with m.Elif(ext_go):
            m.d.sync += pos.eq(pos + n_take)
        m.d.sync += next_full.eq((completing & ~bypass) | (next_full & ~xfer))
        with m.If(xfer):
            m.d.sync += [cur_valid.eq(1), bcnt.eq(0), cur_ng.eq(Mux(bypass, ng, nxt_ng))]
        with m.Elif(fire):
            with m.If(last_beat):
                m.d.sync += [cur_valid.eq(0), bcnt.eq(0)]
            with m.Else():
                m.d.sync += bcnt.eq(bcnt + 1)

        # -- lane unpack: INT8-widened weights and indices of this beat -----------------
        m.d.comb += self.beat.valid.eq(cur_valid)
        for j in range(Rc):
            bt = self.beat.payload[j]
            for l in range(L):
                # per format and beat: (slot, value bit offset, bits, index bit offset, ib)
                keys = {}
                for f in F:
                    key = []
                    for t in range(f.bpb):
                        if f.gpb > 1:
                            sg, e = l // f.kept, l % f.kept
                            slot = sg * Rc + j
                        else:
                            slot, e = j, t * L + l
                        key.append((slot, e * f.bits, f.bits, e * f.index_bits, f.index_bits))
                    keys.setdefault(tuple(key), []).append(f.code)
                with m.Switch(fmt):
                    for key, codes in keys.items():
                        with m.Case(*codes):
                            # the last beat's wiring is the default; earlier beats override it
                            order = [len(key) - 1] + list(range(len(key) - 1))
                            for t in order:
                                slot, vo, b, io, ib = key[t]
                                cv, cx, _ = cur[slot]
                                with m.If((bcnt == t) if t != len(key) - 1 else 1):
                                    m.d.comb += bt.w[l].eq(cv[vo:vo + b].as_signed())
                                    if ib:
                                        m.d.comb += bt.idx[l].eq(cx[io:io + ib])
            for sg in range(g.gpb_max):
                s = sg * Rc + j
                m.d.comb += bt.scale[sg].eq(Mux(sg < cur_ng, cur[s][2], 0))

        # -- operation control ----------------------------------------------------------
        with m.If(fire & last_beat & ext_done & ~next_full & ~xfer):
            m.d.sync += busy.eq(0)
        m.d.comb += self.cfg.ready.eq(~busy)
        with m.If(self.cfg.valid & self.cfg.ready):
            c = self.cfg.payload
            m.d.sync += [fmt.eq(c.fmt), tiles.eq(c.tiles), groups.eq(c.groups),
                         pw_left.eq(c.pay_words), sw_left.eq(c.scale_words),
                         busy.eq((c.tiles != 0) & (c.groups != 0)),
                         e_tile.eq(0), e_grp.eq(0), pos.eq(0), next_full.eq(0),
                         cur_valid.eq(0), bcnt.eq(0),
                         p_nw.eq(0), p_r.eq(0), s_nw.eq(0), s_r.eq(0)]
        return m
