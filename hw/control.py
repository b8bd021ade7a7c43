"""The control block: decode, dispatch, registers, loops, barriers and dependency tokens.

It executes the SYS instructions of a program and hands every unit instruction, in
program order, to the unit's queue, exactly as the ISA (:mod:`flightllm.hw.isa`, its
module docstring) defines; :func:`flightllm.runtime.golden.walk` is the same dispatcher
in Python and the specification this block is tested against::

  fetch --ins (pc, word)--> IR --> decode --+-- SETR / LOOP / END / NOP (registers, loop stack,
      ^                                     |       barriers)
      +-- jump (pc) <-----------------------+-- unit op: dispatch-time token check, register
                                                 fields read --> queue U --> gate --> issue_U
                                                                             ^          |
   tokens P->U (counters) --- decremented at the gate (waits) ---------------+          |
            ^                                                                          v
            +---- incremented by done_U with the signal mask of U's oldest instruction in flight

Dispatch. One instruction at a time: the word whose ``pc`` is the expected one (words of
a stale prefetch stream after a ``jump`` are dropped by that comparison) is latched,
decoded from the :mod:`~flightllm.hw.isa` layouts and checked: an unknown opcode is
``ILLEGAL_OPCODE``; an enum field outside its enum or a bit above the format's size is
``BAD_FIELD`` (what :func:`~flightllm.hw.isa.decode` rejects). A unit instruction's
waits are checked against the *dispatched* token counts (signals dispatched minus waits
dispatched per FIFO): a wait no earlier instruction signalled is ``DEADLOCK`` at once,
not a hang. Its register fields (:data:`~flightllm.hw.isa.REG_FIELDS`) are read into
the queue entry (:func:`entry_layout`), so a queued instruction no longer depends on the
registers.

Issue. Each unit has an in-order queue; its head goes to the unit (``issue_U``) when
the tokens it waits for have arrived (runtime counters, one per ordered unit pair,
counted up when the signalling instruction *completes*: ``done_U`` pulses once per
instruction in order, and the signal masks of the instructions in flight wait in a
small FIFO per unit). The matrix engine's waits on SFU and MPE tokens gate its compute
phase, not its fetch (the ISA's rule 2): its issue waits only for LD and ST tokens, and
the engine asks for the others through ``mpe_tok`` when its compute starts.

Barriers (LOOP entry, each back edge, END): dispatch stops until every queue is empty
and every unit has completed what it was given; tokens left then are
``UNBALANCED_TOKENS``. Loops: ``LOOP_DEPTH`` stack entries (body start and end, trips,
index); a body past its enclosing block or a stack overflow is ``LOOP_ERROR``; reaching
``prog_words`` without END is ``PAST_END``.

Faults. A fault (also ``fault`` from a unit, ``BAD_FIELD``, or the watchdog: no
dispatch, issue, completion or compute grant for ``watchdog`` cycles) latches the
status and the pc, drops the queued instructions and holds ``abort`` until no unit is
``busy`` (or the watchdog runs out again), then ends the run: ``done`` pulses in every
case, with ``status`` saying why.
"""

from __future__ import annotations

from amaranth import Array, Cat, Const, Module, Mux, ResetInserter, Signal, signed, unsigned
from amaranth.lib import data, enum, fifo, stream, wiring
from amaranth.lib.wiring import In, Out

from .isa import (_FIELDS, FORMATS, LOOP_DEPTH, MAX_REG_FIELDS, REG_BITS, REG_FIELDS, TOKEN_UNITS, UNIT_OF,
                  WORD_BITS, Opcode, Reg, SysFmt, Unit)
from .regmap import WATCHDOG_DEFAULT, Status

__all__ = ["Control", "entry_layout", "PC_BITS", "TOKEN_BITS", "QUEUE_DEPTH", "INFLIGHT_DEPTH", "UNIT_NAMES",
           "COMPUTE_WAITS"]

PC_BITS = 32            #: instruction index width (``prog_words`` is a 32-bit argument)
TOKEN_BITS = 16         #: token counter width (dispatched-but-unconsumed tokens per FIFO)
QUEUE_DEPTH = 8         #: per-unit instruction queue
INFLIGHT_DEPTH = 16     #: instructions a unit may have been given and not completed
UNIT_NAMES = tuple(u.name.lower() for u in TOKEN_UNITS)
_NU = len(TOKEN_UNITS)
#: The MPE's waits that gate its compute phase (requested through ``mpe_tok``), not its issue.
COMPUTE_WAITS = (1 << Unit.SFU.value) | (1 << Unit.MPE.value)


def entry_layout() -> data.StructLayout:
    """A unit queue entry: the instruction word, its pc and its register fields' values
    (in :data:`~flightllm.hw.isa.REG_FIELDS` order)."""
    return data.StructLayout({
        "word": unsigned(WORD_BITS),
        "pc": unsigned(PC_BITS),
        "regs": data.ArrayLayout(unsigned(REG_BITS), MAX_REG_FIELDS),
    })


def _field(word, fmt, name):
    off, width, _ = _FIELDS[fmt][name]
    return word[off:off + width]


def _enum_ok(value, shape) -> "Value":
    members = [m.value for m in shape]
    if len(members) == 1 << enum.Shape.cast(shape).width:
        return Const(1)
    ok = Const(0)
    for v in members:
        ok = ok | (value == v)
    return ok


def _format_ok(word, fmt):
    """The word is a valid instance of ``fmt``: enum fields in range, no bits above its size."""
    ok = Const(1)
    for name, (off, width, shape) in _FIELDS[fmt].items():
        if name == "opcode":
            continue
        if isinstance(shape, type) and issubclass(shape, enum.Enum):
            ok = ok & _enum_ok(word[off:off + width], shape)
    size = data.Layout.cast(fmt).size
    if size < WORD_BITS:
        ok = ok & (word[size:] == 0)
    return ok


class Control(wiring.Component):
    """Decode and dispatch (module docstring).

    Attributes
    ----------
    start : In(1)
        Pulse: begin a run at pc 0 with ``args`` (sampled now).
    args : In(struct pos, len, prog_words, watchdog)
    done : Out(1)
        Pulse: the run has ended; ``status`` holds how.
    status : Out(struct status, err_pc, argmax)
    jump : Out(1), jump_pc : Out(PC_BITS)
        Pulse: the fetch unit restarts its stream at ``jump_pc``.
    ins : In(stream of {pc, word})
        Fetched instructions.
    issue_ld, issue_st, issue_mpe, issue_sfu : Out(stream of :func:`entry_layout`)
    done_ld, done_st, done_mpe, done_sfu : In(1)
        One pulse per completed instruction, in the unit's order.
    busy_ld, busy_st, busy_mpe, busy_sfu : In(1)
        The unit holds work (drained after a fault).
    mpe_tok : In(stream of unsigned(4))
        The MPE's compute-phase waits (a mask of :data:`COMPUTE_WAITS` bits); accepted
        when the tokens are there, which consumes them.
    argmax_valid : In(1), argmax_value : In(32)
        The SFU's ARGMAX result for the ARGMAX register.
    fault : In(1), fault_pc : In(PC_BITS)
        A unit rejected the instruction at ``fault_pc`` (``BAD_FIELD``).
    abort : Out(1)
        Units drop their work (held from a fault until none is busy).
    running : Out(1)
    """

    def __init__(self):
        members = {
            "start": In(1),
            "args": In(data.StructLayout({"pos": unsigned(32), "len": unsigned(32), "prog_words": unsigned(32),
                                           "watchdog": unsigned(32)})),
            "done": Out(1),
            "status": Out(data.StructLayout({"status": Status, "err_pc": unsigned(PC_BITS),
                                             "argmax": unsigned(REG_BITS)})),
            "jump": Out(1),
            "jump_pc": Out(PC_BITS),
            "ins": In(stream.Signature(data.StructLayout({"pc": unsigned(PC_BITS),
                                                          "word": unsigned(WORD_BITS)}))),
            "mpe_tok": In(stream.Signature(unsigned(_NU))),
            "argmax_valid": In(1),
            "argmax_value": In(REG_BITS),
            "fault": In(1),
            "fault_pc": In(PC_BITS),
            "abort": Out(1),
            "running": Out(1),
        }
        for n in UNIT_NAMES:
            members[f"issue_{n}"] = Out(stream.Signature(entry_layout()))
            members[f"done_{n}"] = In(1)
            members[f"busy_{n}"] = In(1)
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()

        regs = Array(Signal(REG_BITS, name=f"r{i}") for i in range(16))
        pc = Signal(PC_BITS)
        ir = Signal(WORD_BITS)
        ir_pc = Signal(PC_BITS)
        prog_words = Signal(PC_BITS)
        wd_limit = Signal(32)
        wd = Signal(32)
        progress = Signal()
        status = Signal(Status)
        err_pc = Signal(PC_BITS)
        m.d.comb += [self.status.status.eq(status), self.status.err_pc.eq(err_pc),
                     self.status.argmax.eq(regs[Reg.ARGMAX.value])]

        # -- the loop stack --------------------------------------------------------------
        depth = Signal(range(LOOP_DEPTH + 1))
        l_start = Array(Signal(PC_BITS, name=f"l_start{i}") for i in range(LOOP_DEPTH))
        l_end = Array(Signal(PC_BITS, name=f"l_end{i}") for i in range(LOOP_DEPTH))
        l_trips = Array(Signal(REG_BITS + 1, name=f"l_trips{i}") for i in range(LOOP_DEPTH))
        l_j = Array(Signal(REG_BITS + 1, name=f"l_j{i}") for i in range(LOOP_DEPTH))
        l_idx = Array(Signal(4, name=f"l_idx{i}") for i in range(LOOP_DEPTH))
        top = Signal(range(LOOP_DEPTH))
        m.d.comb += top.eq(depth - 1)
        at_loop_end = Signal()
        m.d.comb += at_loop_end.eq((depth != 0) & (pc == l_end[top]))
        block_end = Signal(PC_BITS)
        m.d.comb += block_end.eq(Mux(depth != 0, l_end[top], prog_words))

        # -- decode -------------------------------------------------------------------
        opcode = Signal(6)
        m.d.comb += opcode.eq(ir[:6])
        legal = Signal()
        fmt_ok = Signal()
        unit_of = Signal(3)
        with m.Switch(opcode):
            for op in Opcode:
                with m.Case(op.value):
                    m.d.comb += [legal.eq(1), unit_of.eq(UNIT_OF[op].value),
                                 fmt_ok.eq(_format_ok(ir, FORMATS[op]))]
        wait = Signal(_NU)
        sig = Signal(_NU)
        m.d.comb += [wait.eq(ir[6:6 + _NU]), sig.eq(ir[6 + _NU:6 + 2 * _NU])]

        # register fields of the instruction's format, read at dispatch
        reg_sel = [Signal(4, name=f"reg_sel{i}") for i in range(MAX_REG_FIELDS)]
        with m.Switch(opcode):
            for op in Opcode:
                fmt = FORMATS[op]
                if fmt is SysFmt:
                    continue
                with m.Case(op.value):
                    for i, name in enumerate(REG_FIELDS[fmt]):
                        m.d.comb += reg_sel[i].eq(_field(ir, fmt, name))

        # SYS fields
        def sys_field(name):
            return _field(ir, SysFmt, name)
        s_rd, s_ra, s_rb = sys_field("rd"), sys_field("ra"), sys_field("rb")
        s_mul = sys_field("mul").as_signed()
        s_add = sys_field("add").as_signed()
        s_lim, s_shr, s_body = sys_field("lim"), sys_field("shr"), sys_field("body")

        # -- tokens -------------------------------------------------------------------
        # dispatched counts (the dispatch-time deadlock and balance checks) and runtime
        # counts (what has been signalled by completions and not yet consumed)
        tok_disp = [Signal(TOKEN_BITS, name=f"tokd_{UNIT_NAMES[p]}_{UNIT_NAMES[u]}")
                    for p in range(_NU) for u in range(_NU)]
        tok = [Signal(TOKEN_BITS, name=f"tok_{UNIT_NAMES[p]}_{UNIT_NAMES[u]}")
               for p in range(_NU) for u in range(_NU)]
        disp_any = Signal()
        m.d.comb += disp_any.eq(Cat(*(t != 0 for t in tok_disp)).any())
        # waits of the decoded instruction that no dispatched signal can satisfy, and
        # signals that would overflow a counter
        starved = Signal()
        overflow = Signal()
        full = (1 << TOKEN_BITS) - 1
        with m.Switch(unit_of):
            for u in range(_NU):
                with m.Case(u):
                    m.d.comb += [
                        starved.eq(Cat(*(wait[p] & (tok_disp[p * _NU + u] == 0) for p in range(_NU))).any()),
                        overflow.eq(Cat(*(sig[c] & (tok_disp[u * _NU + c] == full) for c in range(_NU))).any()),
                    ]

        # -- per-unit queues, gates and in-flight signal masks -----------------------
        flush = Signal()
        queues, pends = [], []
        tok_inc = [Signal(name=f"tinc{i}") for i in range(_NU * _NU)]
        tok_dec = [Signal(name=f"tdec{i}") for i in range(_NU * _NU)]
        quiet = Signal()
        quiet_terms = []
        enq = Signal(_NU)                # this cycle: dispatch into queue u
        entry = Signal(entry_layout())
        for u, name in enumerate(UNIT_NAMES):
            q = fifo.SyncFIFOBuffered(width=len(entry.as_value()) + _NU, depth=QUEUE_DEPTH)
            pend = fifo.SyncFIFO(width=_NU, depth=INFLIGHT_DEPTH)     # read the cycle after a write
            m.submodules[f"q_{name}"] = ResetInserter(flush)(q)
            m.submodules[f"pend_{name}"] = ResetInserter(flush)(pend)
            queues.append(q)
            pends.append(pend)
            m.d.comb += [q.w_data.eq(Cat(entry.as_value(), sig)), q.w_en.eq(enq[u])]
            head = data.View(entry_layout(), q.r_data[:len(entry.as_value())])
            head_sig = q.r_data[len(entry.as_value()):]
            head_wait = head.word[6:6 + _NU]
            gate_mask = ((1 << _NU) - 1) & ~(COMPUTE_WAITS if u == Unit.MPE.value else 0)
            have = Const(1)
            for p in range(_NU):
                if gate_mask >> p & 1:
                    have = have & (~head_wait[p] | (tok[p * _NU + u] != 0))
            iss = getattr(self, f"issue_{name}")
            m.d.comb += [iss.payload.eq(head), iss.valid.eq(q.r_rdy & have & pend.w_rdy & ~flush)]
            fire = Signal(name=f"fire_{name}")
            m.d.comb += [fire.eq(iss.valid & iss.ready), q.r_en.eq(fire),
                         pend.w_data.eq(head_sig), pend.w_en.eq(fire)]
            for p in range(_NU):
                if gate_mask >> p & 1:
                    m.d.comb += tok_dec[p * _NU + u].eq(fire & head_wait[p])
            dn = getattr(self, f"done_{name}")
            m.d.comb += pend.r_en.eq(dn)
            for c in range(_NU):
                m.d.comb += tok_inc[u * _NU + c].eq(dn & pend.r_rdy & pend.r_data[c])
            quiet_terms.append((q.level == 0) & (pend.level == 0) & ~enq[u])
            with m.If(fire | dn):
                m.d.comb += progress.eq(1)
        m.d.comb += quiet.eq(Cat(*quiet_terms).all())

        # the MPE's compute-phase waits
        mt = self.mpe_tok
        mpe = Unit.MPE.value
        mt_have = Const(1)
        for p in range(_NU):
            mt_have = mt_have & (~mt.payload[p] | (tok[p * _NU + mpe] != 0))
        m.d.comb += mt.ready.eq(mt_have & ~flush)
        for p in range(_NU):
            if COMPUTE_WAITS >> p & 1:
                m.d.comb += tok_dec[p * _NU + mpe].eq(mt.valid & mt.ready & mt.payload[p])
        with m.If(mt.valid & mt.ready):
            m.d.comb += progress.eq(1)

        for i in range(_NU * _NU):
            with m.If(flush):
                m.d.sync += tok[i].eq(0)
            with m.Elif(tok_inc[i] & ~tok_dec[i]):
                m.d.sync += tok[i].eq(tok[i] + 1)
            with m.Elif(tok_dec[i] & ~tok_inc[i]):
                m.d.sync += tok[i].eq(tok[i] - 1)

        with m.If(self.argmax_valid):
            m.d.sync += regs[Reg.ARGMAX.value].eq(self.argmax_value)

        # -- the dispatcher ----------------------------------------------------------------
        prod = Signal(signed(REG_BITS + 17))
        count = Signal(signed(REG_BITS + 2))
        trips = Signal(REG_BITS + 1)
        m.d.comb += [count.eq(regs[s_ra] + s_add)]
        m.d.comb += trips.eq(Mux(count[-1], 0, count.as_unsigned()[:REG_BITS + 1] >> s_shr))
        after = Signal(2)                # what follows the barrier: 0 END, 1 LOOP entry, 2 back edge
        A_END, A_LOOP, A_BACK = 0, 1, 2

        failing = Signal()

        def fail(code, at):
            m.d.sync += [status.eq(code), err_pc.eq(at)]
            m.d.comb += failing.eq(1)           # the drain gets a watchdog period of its own
            m.next = "ABORT"

        # a unit's fault (held until abort) or the watchdog, seen in the states the
        # dispatcher can wait in (it passes one of them at least every third cycle)
        ext_fault = Signal()
        m.d.comb += ext_fault.eq(self.fault | (wd >= wd_limit))
        ext_code = Mux(self.fault, Status.BAD_FIELD, Status.WATCHDOG)
        ext_pc = Mux(self.fault, self.fault_pc, pc)

        ins = self.ins
        m.d.sync += self.jump.eq(0)             # a pulse (the states below set it for one cycle)
        with m.FSM() as fsm:
            with m.State("IDLE"):
                with m.If(self.start):
                    m.d.sync += [pc.eq(0), depth.eq(0), status.eq(Status.OK), err_pc.eq(0),
                                 prog_words.eq(self.args.prog_words),
                                 wd_limit.eq(Mux(self.args.watchdog != 0, self.args.watchdog, WATCHDOG_DEFAULT)),
                                 regs[Reg.POS.value].eq(self.args.pos), regs[Reg.LEN.value].eq(self.args.len),
                                 self.jump.eq(1), self.jump_pc.eq(0)]
                    m.next = "FETCH"
            with m.State("FETCH"):
                with m.If(ext_fault):
                    fail(ext_code, ext_pc)
                with m.Elif(at_loop_end):
                    m.d.sync += after.eq(A_BACK)
                    m.next = "BARRIER"
                with m.Elif(pc >= prog_words):
                    fail(Status.PAST_END, pc)
                with m.Else():
                    m.d.comb += ins.ready.eq(1)
                    with m.If(ins.valid & (ins.payload.pc == pc)):
                        m.d.sync += [ir.eq(ins.payload.word), ir_pc.eq(pc)]
                        m.d.comb += progress.eq(1)
                        m.next = "DECODE"
            with m.State("DECODE"):
                with m.If(~legal):
                    fail(Status.ILLEGAL_OPCODE, ir_pc)
                with m.Elif(~fmt_ok):
                    fail(Status.BAD_FIELD, ir_pc)
                with m.Elif(opcode == Opcode.NOP.value):
                    m.d.sync += pc.eq(pc + 1)
                    m.next = "FETCH"
                with m.Elif(opcode == Opcode.END.value):
                    m.d.sync += after.eq(A_END)
                    m.next = "BARRIER"
                with m.Elif(opcode == Opcode.SETR.value):
                    m.d.sync += prod.eq(regs[s_ra] * s_mul)
                    m.next = "SETR"
                with m.Elif(opcode == Opcode.LOOP.value):
                    with m.If(ir_pc + 1 + s_body > block_end):
                        fail(Status.LOOP_ERROR, ir_pc)
                    with m.Elif(depth == LOOP_DEPTH):
                        fail(Status.LOOP_ERROR, ir_pc)
                    with m.Else():
                        m.d.sync += after.eq(A_LOOP)
                        m.next = "BARRIER"
                with m.Elif(starved):
                    fail(Status.DEADLOCK, ir_pc)
                with m.Elif(overflow):
                    fail(Status.UNBALANCED_TOKENS, ir_pc)
                with m.Else():
                    m.next = "ENQ"
            with m.State("SETR"):
                v = Signal(REG_BITS)
                m.d.comb += v.eq(regs[s_rb] + prod[:REG_BITS] + s_add[:REG_BITS])
                with m.If(s_rd != 0):
                    m.d.sync += regs[s_rd].eq(Mux(v > s_lim, s_lim, v))
                m.d.sync += pc.eq(pc + 1)
                m.d.comb += progress.eq(1)
                m.next = "FETCH"
            with m.State("ENQ"):
                m.d.comb += [entry.word.eq(ir), entry.pc.eq(ir_pc)]
                for i in range(MAX_REG_FIELDS):
                    m.d.comb += entry.regs[i].eq(regs[reg_sel[i]])
                with m.If(ext_fault):
                    fail(ext_code, ext_pc)
                with m.Else():
                    with m.Switch(unit_of):
                        for u in range(_NU):
                            with m.Case(u):
                                with m.If(queues[u].w_rdy):
                                    m.d.comb += [enq[u].eq(1), progress.eq(1)]
                                    # FIFO (p -> u) loses a token per wait and (u -> c) gains one per signal;
                                    # (u -> u) may do both at once
                                    for i in range(_NU * _NU):
                                        p, c = divmod(i, _NU)
                                        if c == u or p == u:
                                            dec = wait[p] if c == u else Const(0)
                                            inc = sig[c] if p == u else Const(0)
                                            m.d.sync += tok_disp[i].eq(tok_disp[i] + inc - dec)
                                    m.d.sync += pc.eq(pc + 1)
                                    m.next = "FETCH"
            with m.State("BARRIER"):
                with m.If(ext_fault):
                    fail(ext_code, ext_pc)
                with m.Elif(quiet):
                    with m.If(disp_any):
                        fail(Status.UNBALANCED_TOKENS, Mux(after == A_BACK, l_start[top] - 1, ir_pc))
                    with m.Elif(after == A_END):
                        m.next = "FINISH"
                    with m.Elif(after == A_LOOP):
                        m.d.comb += progress.eq(1)
                        with m.If(trips == 0):
                            m.d.sync += [pc.eq(ir_pc + 1 + s_body), self.jump.eq(1),
                                         self.jump_pc.eq(ir_pc + 1 + s_body)]
                        with m.Else():
                            m.d.sync += [l_start[depth].eq(ir_pc + 1), l_end[depth].eq(ir_pc + 1 + s_body),
                                         l_trips[depth].eq(trips), l_j[depth].eq(0), l_idx[depth].eq(s_rd),
                                         depth.eq(depth + 1), pc.eq(ir_pc + 1)]
                            with m.If(s_rd != 0):
                                m.d.sync += regs[s_rd].eq(0)
                        m.next = "FETCH"
                    with m.Else():                          # back edge
                        m.d.comb += progress.eq(1)
                        with m.If(l_j[top] + 1 < l_trips[top]):
                            m.d.sync += [l_j[top].eq(l_j[top] + 1), pc.eq(l_start[top]),
                                         self.jump.eq(1), self.jump_pc.eq(l_start[top])]
                            with m.If(l_idx[top] != 0):
                                m.d.sync += regs[l_idx[top]].eq(l_j[top] + 1)
                        with m.Else():
                            m.d.sync += depth.eq(depth - 1)
                        m.next = "FETCH"
            with m.State("ABORT"):
                # drop what is queued; hold abort until no unit has work (or the watchdog ends it)
                m.d.comb += [flush.eq(1), self.abort.eq(1)]
                busy = Cat(*(getattr(self, f"busy_{n}") for n in UNIT_NAMES)).any()
                with m.If(~busy | (wd >= wd_limit)):
                    m.next = "FINISH"
            with m.State("FINISH"):
                m.d.comb += [self.done.eq(1), flush.eq(1)]
                for t in tok_disp:
                    m.d.sync += t.eq(0)
                m.next = "IDLE"

        active = Signal()
        m.d.comb += [active.eq(~fsm.ongoing("IDLE")),
                     self.running.eq(active & ~fsm.ongoing("ABORT") & ~fsm.ongoing("FINISH"))]
        # the watchdog: cycles without progress while running or draining
        with m.If(progress | failing | ~active):
            m.d.sync += wd.eq(0)
        with m.Elif(wd < wd_limit):
            m.d.sync += wd.eq(wd + 1)
        return m
