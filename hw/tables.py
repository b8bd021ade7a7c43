"""The SFU tables' loader: the float32 tables image from memory into the on-chip tables.

The tables (norm weights, the RoPE table: ``tables.bin`` of an artifact) live on chip in
the buffers' tables region (:data:`flightllm.hw.buffers.TABLES`). The host puts their image
in the instruction buffer (at the ``tab_offset`` argument) and sets ``tab_words`` for the
first run after loading an artifact; the kernel then runs this loader before the
program::

  start --> BurstReader (m_axi instr, 4 floats a beat) --> L/4 beats per word --> wr (TAB region)
                                                     done <-- every write landed (wr_done)
"""

from __future__ import annotations

from amaranth import Module, Mux, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from .axi import BurstReader, axi4_signature
from .buffers import TABLES, Reach, buffer_map, port_signature
from .isa import WORD_BITS
from .params import HwParams

__all__ = ["TableLoader"]

_PER_BEAT = WORD_BITS // 32


class TableLoader(wiring.Component):
    """Loads ``words`` float32 values from byte address ``base`` into the tables region.

    Attributes
    ----------
    start : In(1)
        A pulse (``base`` and ``words`` sampled).
    base : In(64)
    words : In(32)
    done : Out(1)
        A pulse when every value is in the tables region (also for 0 words).
    axi : Out(axi4_signature(64, WORD_BITS, write=False))
    wr : Out(buffer port) (writes only)
    """

    def __init__(self, params: HwParams):
        L = params.sfu_lanes
        if L % _PER_BEAT:
            self._MustUse__silence = True       # never built
            raise ValueError(f"TableLoader: sfu_lanes {L} is not a multiple of {_PER_BEAT} (floats per beat)")
        self.params = params
        self._reader = BurstReader(WORD_BITS, 64, max_burst=64, fifo_depth=128)
        self.reach = {"wr": Reach(writes={TABLES})}                             #: what ``wr`` touches
        super().__init__({
            "start": In(1), "base": In(64), "words": In(32), "done": Out(1),
            "axi": Out(axi4_signature(64, WORD_BITS, write=False)),
            "wr": Out(port_signature(params)),
        })

    def elaborate(self, platform):
        m = Module()
        p = self.params
        L = p.sfu_lanes
        per_word = L // _PER_BEAT
        rd = m.submodules.reader = self._reader
        wiring.connect(m, rd.axi, wiring.flipped(self.axi))
        region = buffer_map(p)[TABLES]

        total = Signal(32)          # values to load
        beat = Signal(32)           # beats received
        word = Signal(32)           # buffer words written
        landed = Signal(32)
        nwords = Signal(32)
        running = Signal()
        issued = Signal()
        m.d.comb += nwords.eq((total + L - 1) // L)
        m.d.comb += [rd.cmd.payload.addr.eq(self.base), rd.cmd.payload.beats.eq((total + _PER_BEAT - 1) // _PER_BEAT),
                     rd.cmd.valid.eq(running & ~issued & (total != 0))]
        with m.If(rd.cmd.valid & rd.cmd.ready):
            m.d.sync += issued.eq(1)

        # assemble L floats from L / 4 beats, then write the word (lanes past the end masked)
        acc = [Signal(32, name=f"lane{i}") for i in range(L)]
        slot = Signal(range(per_word))
        full = Signal()
        wr = self.wr.wr
        # a beat is taken while the assembled word is written: one beat per cycle
        m.d.comb += rd.data.ready.eq(~full | wr.ready)
        with m.If(wr.valid & wr.ready):
            m.d.sync += [full.eq(0), word.eq(word + 1)]
        with m.If(rd.data.valid & rd.data.ready):
            for s in range(per_word):
                with m.If(slot == s):
                    for k in range(_PER_BEAT):
                        m.d.sync += acc[s * _PER_BEAT + k].eq(rd.data.payload[32 * k:32 * (k + 1)])
            m.d.sync += [beat.eq(beat + 1), slot.eq(Mux(slot == per_word - 1, 0, slot + 1))]
            with m.If((slot == per_word - 1) | ((beat + 1) * _PER_BEAT >= total)):
                m.d.sync += [full.eq(1), slot.eq(0)]
        first = Signal(32)
        m.d.comb += first.eq(word * L)
        mask = Signal(L)
        for i in range(L):
            m.d.comb += mask[i].eq(first + i < total)
        m.d.comb += [wr.valid.eq(full), wr.payload.region.eq(region.id), wr.payload.word.eq(word),
                     wr.payload.mask.eq(mask)]
        for i in range(L):
            m.d.comb += wr.payload.data[i].eq(acc[i])
        m.d.sync += landed.eq(landed + self.wr.wr_done)
        m.d.comb += self.wr.rd_req.valid.eq(0)

        m.d.comb += self.done.eq(0)
        with m.If(self.start):
            m.d.sync += [total.eq(self.words), beat.eq(0), word.eq(0), landed.eq(0), running.eq(1), issued.eq(0),
                         slot.eq(0), full.eq(0)]
        with m.Elif(running & (landed == nwords) & (word == nwords)):
            m.d.comb += self.done.eq(1)
            m.d.sync += running.eq(0)
        return m
