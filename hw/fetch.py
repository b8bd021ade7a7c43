"""Instruction fetch: the program image from memory into the control block, prefetched.

::

  jump (pc) --> next_pc --cmd (CHUNK words)--> BurstReader --AXI (m_axi_instr, 128-bit)
                                                   | words, in order
                out_pc (the pc of the next word) --+--> drop while ``discard`` --> ins (pc, word)

The instruction port is one word (:data:`~flightllm.hw.isa.WORD_BITS`) wide, so a beat is
an instruction. The unit requests the program in commands of :data:`CHUNK` words ahead of
the dispatcher, as long as at most ``PREFETCH`` words are requested and not yet taken
(the reader's FIFO holds them: bursts are issued only into room, so the memory never sees
backpressure). A ``jump`` (the control block's loop back edges and skipped loops, and the
start of a run) makes every word still in flight stale: their number is dropped as they
arrive, and fetching restarts at the new pc. Nothing is requested at or past
``prog_words`` (running past the program is the control block's ``PAST_END``).
"""

from __future__ import annotations

from amaranth import Module, Mux, Signal, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from .axi import BurstReader, axi4_signature
from .control import PC_BITS
from .isa import WORD_BITS, WORD_BYTES

__all__ = ["Fetch", "CHUNK", "PREFETCH"]

CHUNK = 32          #: words per read command
PREFETCH = 128      #: words requested ahead of the dispatcher (the reader's FIFO)


class Fetch(wiring.Component):
    """The instruction prefetcher (module docstring).

    Attributes
    ----------
    base : In(64)
        Byte address of the program image (the ``instr`` pointer argument).
    prog_words : In(32)
    jump : In(1), jump_pc : In(PC_BITS)
        Restart at ``jump_pc`` (a pulse).
    ins : Out(stream of {pc, word})
    axi : Out(axi4_signature(64, WORD_BITS, write=False))
    idle : Out(1)
        Nothing requested and not yet delivered or dropped.
    """

    def __init__(self, *, max_burst: int = 32):
        self._reader = BurstReader(WORD_BITS, 64, max_burst=max_burst, fifo_depth=PREFETCH)
        super().__init__({
            "base": In(64),
            "prog_words": In(32),
            "jump": In(1),
            "jump_pc": In(PC_BITS),
            "ins": Out(stream.Signature(data.StructLayout({"pc": unsigned(PC_BITS), "word": unsigned(WORD_BITS)}))),
            "axi": Out(axi4_signature(64, WORD_BITS, write=False)),
            "idle": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        rd = m.submodules.reader = self._reader
        wiring.connect(m, rd.axi, wiring.flipped(self.axi))

        next_pc = Signal(PC_BITS)           # first word of the next command
        out_pc = Signal(PC_BITS)            # pc of the next word delivered
        outstanding = Signal(range(PREFETCH + CHUNK + 1))      # requested, not yet popped
        discard = Signal.like(outstanding)  # stale words still to drop
        active = Signal()                   # a jump has given a valid stream

        left = Signal(PC_BITS)
        m.d.comb += left.eq(Mux(next_pc < self.prog_words, self.prog_words - next_pc, 0))
        beats = Signal(range(CHUNK + 1))
        m.d.comb += beats.eq(Mux(left < CHUNK, left, CHUNK))
        m.d.comb += [
            rd.cmd.payload.addr.eq(self.base + next_pc * WORD_BYTES),
            rd.cmd.payload.beats.eq(beats),
            rd.cmd.valid.eq(active & ~self.jump & (beats != 0) & (outstanding + CHUNK <= PREFETCH)),
        ]
        issue = rd.cmd.valid & rd.cmd.ready

        drop = discard != 0
        m.d.comb += [
            self.ins.valid.eq(rd.data.valid & ~drop & ~self.jump),
            self.ins.payload.pc.eq(out_pc),
            self.ins.payload.word.eq(rd.data.payload),
            rd.data.ready.eq(drop | (self.ins.ready & ~self.jump)),
        ]
        pop = rd.data.valid & rd.data.ready
        m.d.sync += outstanding.eq(outstanding + Mux(issue, beats, 0) - pop)
        with m.If(self.jump):
            # everything requested and not yet taken is stale (a word popped in this cycle
            # was dropped or is not delivered: ins.valid is low during a jump)
            m.d.sync += [discard.eq(outstanding - pop), next_pc.eq(self.jump_pc), out_pc.eq(self.jump_pc),
                         active.eq(1)]
        with m.Else():
            with m.If(issue):
                m.d.sync += next_pc.eq(next_pc + beats)
            with m.If(pop & drop):
                m.d.sync += discard.eq(discard - 1)
            with m.If(self.ins.valid & self.ins.ready):
                m.d.sync += out_pc.eq(out_pc + 1)
        m.d.comb += self.idle.eq((outstanding == 0) & rd.idle)
        return m
