"""SfuDecode (hw/sfu_unit.py): dispatcher queue entries -> SfuOp, against :func:`sfu_op`."""

import numpy as np
from amaranth.lib import data
from amaranth.sim import Simulator

from flightllm.hw.isa import Buf, Instr, Opcode, Reg, encode, reg_values
from flightllm.hw.sfu_unit import SfuDecode, SfuOp, sfu_op

FIELDS = {name: f.width for name, f in data.Layout.cast(SfuOp)}
_OFF = {name: f.offset for name, f in data.Layout.cast(SfuOp)}
_off = _OFF.__getitem__
SFU_OPS = [o for o in Opcode if o.name in ("RMSNORM", "ROPE", "SOFTMAX", "SILU_MUL", "ADD", "QUANT", "DEQUANT",
                                           "ARGMAX", "FILL", "QUANTG")]


def _random(rng):
    op = SFU_OPS[rng.integers(len(SFU_OPS))]
    bufs = list(Buf)
    if op == Opcode.SOFTMAX:
        f = dict(src=Buf.S, dst=Buf.PQ, aux=Buf.VS, rows_reg=Reg(int(rng.integers(16))), len_reg=Reg.CPOS,
                 len_add=int(rng.integers(-3, 3)), kvh=int(rng.integers(8)), rep=int(rng.integers(1, 8)),
                 cap=int(rng.integers(1, 64)) * 16, sink=int(rng.integers(4)), window=int(rng.integers(8)),
                 scale=float(rng.uniform(0.01, 1)), kvn=int(rng.integers(0, 4)))
    else:
        f = dict(src=bufs[rng.integers(len(bufs))], src2=bufs[rng.integers(len(bufs))],
                 dst=bufs[rng.integers(len(bufs))], rows_reg=Reg(int(rng.integers(16))), n=int(rng.integers(1 << 17)),
                 seg=int(rng.integers(1 << 10)), aux_reg=Reg(int(rng.integers(16))), aux=int(rng.integers(-2, 3)),
                 table=int(rng.integers(1 << 24)), imm=int(rng.integers(1 << 32)))
        if op in (Opcode.RMSNORM, Opcode.FILL):
            f["imm"] = float(rng.standard_normal())
    regs = [0] + [int(x) for x in rng.integers(0, 300, 15)]
    if rng.random() < 0.2:
        regs[int(rng.integers(1, 16))] = int(rng.integers(1 << 32))
    return Instr(op, f), regs


def _faulty(ins, regs):
    """The golden model's complaints the decoder can check (rows, attended length, position)."""
    d = sfu_op(ins, regs)
    if not 1 <= d["rows"] <= 255:
        return True
    if ins.op == Opcode.SOFTMAX:
        return not (1 <= d["valid"] and d["valid"] + d["rows"] - 1 <= d["cap"])
    return ins.op == Opcode.ROPE and d["pos"] >= 1 << 16


def test_decode_matches_sfu_op():
    rng = np.random.default_rng(0)
    cases = [_random(rng) for _ in range(300)]
    dut = SfuDecode()
    sim = Simulator(dut)
    sim.add_clock(1e-8)
    got = []

    async def bench(ctx):
        for k, (ins, regs) in enumerate(cases):
            ctx.set(dut.entry.valid, 1)
            ctx.set(dut.entry.payload.word, encode(ins))
            ctx.set(dut.entry.payload.pc, k)
            for i, v in enumerate(reg_values(ins, regs)):
                ctx.set(dut.entry.payload.regs[i], v)
            ctx.set(dut.op.ready, 1)
            for _ in range(10):
                if ctx.get(dut.entry.ready):
                    break
                await ctx.tick()
            else:
                raise AssertionError("entry not taken")
            await ctx.tick()
            ctx.set(dut.entry.valid, 0)
            if ctx.get(dut.fault):
                got.append(("fault", ctx.get(dut.fault_pc)))
                ctx.set(dut.clear, 1)
                await ctx.tick()
                ctx.set(dut.clear, 0)
            else:
                assert ctx.get(dut.op.valid)
                got.append(("op", {name: int(ctx.get(dut.op.payload.as_value()[_off(name):_off(name) + w])) for name, w in FIELDS.items()}))
                await ctx.tick()

    sim.add_testbench(bench)
    sim.run()
    nfault = 0
    for k, ((ins, regs), g) in enumerate(zip(cases, got)):
        if _faulty(ins, regs):
            nfault += 1
            assert g == ("fault", k), (ins, g)
            continue
        assert g[0] == "op", (ins, regs, g)
        want = dict.fromkeys(FIELDS, 0)
        want.update(sfu_op(ins, regs))
        for name, v in want.items():
            v &= (1 << FIELDS[name]) - 1
            assert g[1][name] == v, (ins.op.name, name, g[1][name], v)
    assert 10 < nfault < 200          # both paths exercised
