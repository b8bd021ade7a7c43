"""The control block (hw/control.py) against the dispatcher's specification
(:func:`flightllm.runtime.golden.walk`), in Amaranth simulation.

Random programs (loops nested to the stack's depth, SETR on every register, balanced
tokens between all units) run on the RTL with model units of random latency, a fetch
model that pauses and leaves stale words after a jump, and random backpressure. Checked:
every unit receives the instructions ``walk`` issues, in order, with the same register
values; every token orders its waiter after its signaller's completion; every barrier
holds; and each fault ends the run with the status and pc ``walk`` (or
:func:`flightllm.hw.isa.decode`) gives.
"""

from __future__ import annotations

import numpy as np
import pytest
from amaranth.sim import Simulator

from flightllm.hw.control import COMPUTE_WAITS, UNIT_NAMES, Control
from flightllm.hw.isa import (_FIELDS, LOOP_DEPTH, SfuFmt, NO_LIMIT, TOKEN_UNITS, UNIT_OF, Buf, Instr, IsaError, Opcode, Reg, Unit,
                              decode, encode, reg_values)
from flightllm.hw.regmap import Status
from flightllm.runtime.golden import GoldenError, prepare_control, walk

NU = len(TOKEN_UNITS)
#: unit instructions the programs use (their register fields are random)
UNIT_OPS = {Unit.LD: (Opcode.LD_KV, Opcode.EMBED), Unit.ST: (Opcode.ST_OUT, Opcode.ST_KT),
            Unit.MPE: (Opcode.MV, Opcode.QK), Unit.SFU: (Opcode.FILL, Opcode.SOFTMAX)}
SCRATCH = [r for r in Reg if r.value >= Reg.CPOS.value]


def _unit_op(rng, unit):
    op = UNIT_OPS[unit][rng.integers(2)]
    f = {}
    from flightllm.hw.isa import FORMATS, REG_FIELDS
    for name in REG_FIELDS[FORMATS[op]]:
        f[name] = Reg(int(rng.integers(16)))
    if op == Opcode.FILL:
        f.update(dst=Buf.A, n=int(rng.integers(1, 1000)))
    return Instr(op, f)


def _assign_tokens(rng, ops, density=0.6):
    """Random balanced tokens among the unit instructions ``ops`` (one straight-line region)."""
    n = len(ops)
    for _ in range(int(n * density * 2)):
        if n < 2:
            break
        i, j = sorted(rng.choice(n, 2, replace=False))
        pu, cu = ops[i].unit.value, ops[j].unit.value
        if ops[i].f.get("signal", 0) >> cu & 1 or ops[j].f.get("wait", 0) >> pu & 1:
            continue
        ops[i].f["signal"] = ops[i].f.get("signal", 0) | 1 << cu
        ops[j].f["wait"] = ops[j].f.get("wait", 0) | 1 << pu


def _block(rng, depth, n_items):
    out, region = [], []
    for _ in range(n_items):
        r = rng.random()
        if r < 0.18 and depth < LOOP_DEPTH:
            _assign_tokens(rng, region)
            region = []
            creg = SCRATCH[rng.integers(len(SCRATCH))]
            out.append(Instr(Opcode.SETR, dict(rd=creg, add=int(rng.integers(0, 4 if depth < 2 else 3)),
                                               lim=NO_LIMIT)))
            body = _block(rng, depth + 1, int(rng.integers(0, 5)))
            idx = SCRATCH[rng.integers(len(SCRATCH))] if rng.random() < 0.8 else Reg.ZERO
            out.append(Instr(Opcode.LOOP, dict(rd=idx, ra=creg, add=int(rng.integers(-1, 2)),
                                               shr=int(rng.random() < 0.2), body=len(body))))
            out += body
        elif r < 0.32:
            rd = SCRATCH[rng.integers(len(SCRATCH))] if rng.random() < 0.9 else Reg.ZERO
            out.append(Instr(Opcode.SETR, dict(
                rd=rd, rb=Reg(int(rng.integers(16))), ra=Reg(int(rng.integers(16))),
                mul=int(rng.integers(-2 ** 15, 2 ** 15)) if rng.random() < 0.3 else int(rng.integers(-3, 4)),
                add=int(rng.integers(-2 ** 31, 2 ** 31)) if rng.random() < 0.3 else int(rng.integers(-5, 50)),
                lim=[NO_LIMIT, int(rng.integers(0, 60)), int(rng.integers(0, 2 ** 32))][rng.integers(3)])))
        elif r < 0.36:
            out.append(Instr(Opcode.NOP))
        else:
            ins = _unit_op(rng, TOKEN_UNITS[rng.integers(NU)])
            out.append(ins)
            region.append(ins)
    _assign_tokens(rng, region)
    return out


def expected(prog, regs):
    """What ``walk`` does: the issue sequence [(pc, unit, reg values)], the barriers (count of
    issued instructions at each), and the fault (status name, pc) or None."""
    issued, barriers = [], []
    r = list(regs)

    def issue(pc, ci):
        issued.append((pc, ci.unit, reg_values(prog[pc], r)))

    try:
        walk(prepare_control(prog), r, issue, lambda where: barriers.append(len(issued)))
        fault = None
    except GoldenError as e:
        fault = (e.status, e.pc)
    return issued, barriers, fault


def random_program(rng, max_issued=120):
    while True:
        prog = _block(rng, 0, int(rng.integers(8, 30))) + [Instr(Opcode.END)]
        regs = [0] * 16
        regs[Reg.POS.value], regs[Reg.LEN.value] = int(rng.integers(0, 100)), int(rng.integers(1, 20))
        issued, _, fault = expected(prog, regs)
        if fault is None and 5 <= len(issued) <= max_issued:
            return prog, regs


def run_rtl(words, regs, rng, *, latency=(1, 12), p_fetch=0.7, p_ready=0.7, watchdog=0, hang_unit=None,
            fault_at=None, max_cycles=20000):
    """Run the program image ``words`` (ints) on the control block with model units.

    Returns dict: status, err_pc, cycles, per-unit lists of received instructions
    (pc, reg values, start, compute start, completion)."""
    dut = Control()
    res = {"units": [[] for _ in range(NU)]}
    sim = Simulator(dut)
    sim.add_clock(1e-8)

    async def bench(ctx):
        ctx.set(dut.args.pos, regs[Reg.POS.value])
        ctx.set(dut.args.len, regs[Reg.LEN.value])
        ctx.set(dut.args.prog_words, len(words))
        ctx.set(dut.args.watchdog, watchdog)
        ctx.set(dut.start, 1)
        await ctx.tick()
        ctx.set(dut.start, 0)
        fq = []                       # fetch queue: (pc, word)
        fptr = None
        pend = [[] for _ in range(NU)]          # per unit: records in flight, in order
        comp_q = []                             # MPE records waiting for compute tokens
        last_done = [0] * NU
        for cyc in range(1, max_cycles):
            # the fetch model: a jump restarts the stream (stale words may stay in front)
            if ctx.get(dut.jump):
                fptr = ctx.get(dut.jump_pc)
                if rng.random() < 0.5:
                    fq = []
                fq = fq[:2]
            while fptr is not None and fptr < len(words) and len(fq) < 4:
                fq.append((fptr, words[fptr]))
                fptr += 1
            v = bool(fq) and rng.random() < p_fetch
            ctx.set(dut.ins.valid, v)
            if v:
                ctx.set(dut.ins.payload.pc, fq[0][0])
                ctx.set(dut.ins.payload.word, fq[0][1])
            # units: accept with random readiness, complete in order after a random latency
            for u, name in enumerate(UNIT_NAMES):
                iss = getattr(dut, f"issue_{name}")
                rdy = rng.random() < p_ready
                ctx.set(iss.ready, rdy)
                if rdy and ctx.get(iss.valid):
                    pc = ctx.get(iss.payload.pc)
                    rv = [ctx.get(iss.payload.regs[i]) for i in range(len(iss.payload.regs))]
                    word = ctx.get(iss.payload.word)
                    rec = {"pc": pc, "regs": rv, "start": cyc, "word": word, "done": None, "cstart": None}
                    res["units"][u].append(rec)
                    pend[u].append(rec)
                    cw = (word >> 6) & COMPUTE_WAITS if u == Unit.MPE.value else 0
                    if cw:
                        rec["cmask"] = cw
                        comp_q.append(rec)
                    else:
                        rec["cstart"] = cyc
            # the MPE's compute-phase token requests (in order)
            mv = bool(comp_q) and rng.random() < 0.8
            ctx.set(dut.mpe_tok.valid, mv)
            if mv:
                ctx.set(dut.mpe_tok.payload, comp_q[0]["cmask"])
                if ctx.get(dut.mpe_tok.ready):
                    comp_q.pop(0)["cstart"] = cyc
            for u, name in enumerate(UNIT_NAMES):
                d = 0
                if pend[u] and u != hang_unit:
                    head = pend[u][0]
                    if head["cstart"] is not None:
                        if head.get("due") is None:
                            head["due"] = max(head["cstart"] + int(rng.integers(*latency)), last_done[u] + 1)
                        if cyc >= head["due"]:
                            d = 1
                            head["done"] = cyc
                            last_done[u] = cyc
                            pend[u].pop(0)
                ctx.set(getattr(dut, f"done_{name}"), d)
                ctx.set(getattr(dut, f"busy_{name}"), bool(pend[u]) and not ctx.get(dut.abort))
            if ctx.get(dut.abort):
                for u in range(NU):
                    pend[u] = []
                comp_q = []
            if fault_at is not None:
                hit = any(r["pc"] == fault_at for rs in res["units"] for r in rs)
                ctx.set(dut.fault, hit and not ctx.get(dut.abort))
                ctx.set(dut.fault_pc, fault_at)
            if ctx.get(dut.ins.valid) and ctx.get(dut.ins.ready):
                fq.pop(0)
            if ctx.get(dut.done):
                res.update(status=Status(ctx.get(dut.status.status)), err_pc=ctx.get(dut.status.err_pc), cycles=cyc)
                return
            await ctx.tick()
        res["status"] = None              # the test fails: the run did not end

    sim.add_testbench(bench)
    sim.run()
    return res


def check_against_spec(prog, regs, res, fault=None):
    issued, barriers, exp_fault = expected(prog, regs)
    assert res["status"] is not None, "the run did not end within the cycle bound"
    if exp_fault is None and fault is None:
        assert res["status"] == Status.OK, (res["status"], res["err_pc"])
    got = {u: [(r["pc"], r["regs"]) for r in res["units"][u]] for u in range(NU)}
    want = {u: [(pc, rv) for pc, uu, rv in issued if uu == u] for u in range(NU)}
    for u in range(NU):
        if res["status"] == Status.OK:
            assert got[u] == want[u], f"unit {UNIT_NAMES[u]}: {got[u][:8]} != {want[u][:8]}"
        else:                          # a fault: what reached the unit is a prefix
            assert got[u] == want[u][:len(got[u])], f"unit {UNIT_NAMES[u]}"
    if res["status"] != Status.OK:
        return issued, barriers, exp_fault
    # the RTL times of each issued instance, in walk's order
    k = [0] * NU
    inst = []
    for pc, u, rv in issued:
        inst.append(res["units"][u][k[u]])
        inst[-1]["unit"] = u
        k[u] += 1
    # tokens: the k-th waiter of FIFO P->U starts after the k-th signaller completes
    for p in range(NU):
        for u in range(NU):
            sigs = [r for r in inst if r["unit"] == p and (r["word"] >> (6 + NU + u)) & 1]
            waits = [r for r in inst if r["unit"] == u and (r["word"] >> (6 + p)) & 1]
            assert len(sigs) == len(waits)
            for s, w in zip(sigs, waits):
                t = w["cstart"] if u == Unit.MPE.value and COMPUTE_WAITS >> p & 1 else w["start"]
                assert t > s["done"], (f"pc {w['pc']} ({UNIT_NAMES[u]}) started at {t} before its token from "
                                       f"pc {s['pc']} ({UNIT_NAMES[p]}) completed at {s['done']}")
    # barriers: nothing after one starts before everything before it completes
    for b in barriers:
        if 0 < b < len(inst):
            assert max(r["done"] for r in inst[:b]) < min(r["start"] for r in inst[b:]), f"barrier after {b}"
    return issued, barriers, exp_fault


@pytest.mark.parametrize("seed", range(12))
def test_random_programs_follow_the_spec(seed):
    rng = np.random.default_rng(seed)
    prog, regs = random_program(rng)
    words = [encode(i) for i in prog]
    res = run_rtl(words, regs, rng)
    check_against_spec(prog, regs, res)


def _fault_case(prog, regs, rng, **kw):
    words = [w if isinstance(w, int) else encode(w) for w in prog]
    return run_rtl(words, regs, rng, **kw)


def _walk_fault(prog, regs):
    *_, fault = expected(prog, regs)
    assert fault is not None
    return fault


R = [0] * 16
MV = Instr(Opcode.MV, {})
FILL = Instr(Opcode.FILL, dict(dst=Buf.A, n=4))


@pytest.mark.parametrize("case", ["deadlock", "unbalanced_end", "unbalanced_loop", "loop_past_block",
                                  "loop_too_deep", "past_end", "token_wait_mpe_compute"])
def test_faults_match_the_spec(case):
    rng = np.random.default_rng(1)
    sfu_sig_mpe = FILL.with_(signal=1 << Unit.MPE.value)
    mpe_wait_sfu = MV.with_(wait=1 << Unit.SFU.value)
    progs = {
        "deadlock": [FILL, MV.with_(wait=1 << Unit.LD.value), Instr(Opcode.END)],
        "unbalanced_end": [sfu_sig_mpe, FILL, Instr(Opcode.END)],
        "unbalanced_loop": [sfu_sig_mpe, Instr(Opcode.SETR, dict(rd=Reg.R10, add=2, lim=NO_LIMIT)),
                            Instr(Opcode.LOOP, dict(ra=Reg.R10, body=1)), mpe_wait_sfu, Instr(Opcode.END)],
        "loop_past_block": [Instr(Opcode.SETR, dict(rd=Reg.R10, add=2, lim=NO_LIMIT)),
                            Instr(Opcode.LOOP, dict(ra=Reg.R10, body=2)),
                            Instr(Opcode.LOOP, dict(ra=Reg.R10, body=2)), FILL, FILL, Instr(Opcode.END)],
        "loop_too_deep": [Instr(Opcode.SETR, dict(rd=Reg.R10, add=1, lim=NO_LIMIT))] +
                         [Instr(Opcode.LOOP, dict(ra=Reg.R10, body=LOOP_DEPTH + 1 - i)) for i in range(LOOP_DEPTH + 1)] +
                         [FILL, Instr(Opcode.END)],
        "past_end": [FILL, Instr(Opcode.NOP)],
        "token_wait_mpe_compute": [sfu_sig_mpe, mpe_wait_sfu, Instr(Opcode.END)],
    }
    prog = progs[case]
    res = _fault_case(prog, R, rng)
    if case == "token_wait_mpe_compute":
        check_against_spec(prog, R, res)
        return
    status, pc = _walk_fault(prog, R)
    assert (res["status"], res["err_pc"]) == (Status[status], pc)
    check_against_spec(prog, R, res, fault=True)


@pytest.mark.parametrize("word,code", [
    (0x3F, Status.ILLEGAL_OPCODE),                                           # opcode 63
    (Opcode.FILL.value | 31 << _FIELDS[SfuFmt]["src"][0], Status.BAD_FIELD),    # a Buf field of 31
    (encode(Instr(Opcode.ST_OUT)) | 1 << 126, Status.BAD_FIELD),             # a bit above MemFmt
])
def test_illegal_words(word, code):
    with pytest.raises(IsaError):
        decode(word)                    # what the host-side decoder says of the same word
    rng = np.random.default_rng(2)
    res = _fault_case([FILL, FILL, word, Instr(Opcode.END)], R, rng)
    assert (res["status"], res["err_pc"]) == (code, 2)


def test_watchdog_and_unit_fault_end_the_run():
    rng = np.random.default_rng(3)
    prog = [FILL, MV, Instr(Opcode.END)]
    res = _fault_case(prog, R, rng, watchdog=200, hang_unit=Unit.MPE.value)
    assert res["status"] == Status.WATCHDOG and res["cycles"] < 1000
    res = _fault_case(prog, R, rng, fault_at=1)
    assert (res["status"], res["err_pc"]) == (Status.BAD_FIELD, 1)
    # and a run after a fault starts clean: the same control runs a good program
    # (a new simulation here; the fuzz test of the kernel repeats runs on one instance)
