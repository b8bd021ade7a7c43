"""The MPE unit's decode (hw/mpe_unit.py): queue entries -> fetch and compute descriptors.

:class:`MpeDecode` (RTL, amaranth.sim) against :func:`mpe_decode` (its Python model) on
random MV / MM / QK / PV entries, valid and faulty; and the model against the single
sources it must agree with: :func:`flightllm.hw.mpe.mpe_config` (the engine's cfg fields),
:meth:`flightllm.hw.kvcache.KvLayout.stream` and ``runtime/sfu.attention_mask`` (the KV
records attention streams, as the golden model counts them), and the golden model's
rejections (every entry golden rejects, the unit rejects).
"""

import numpy as np
import pytest
from amaranth import ResetInserter, Signal
from amaranth.lib import data
from amaranth.sim import Simulator

from flightllm.hw.formats import WeightFormat, region_bytes
from flightllm.hw.geometry import EngineGeometry
from flightllm.hw.isa import Buf, Instr, Opcode, Reg, encode, reg_values
from flightllm.hw.kvcache import K, V, KvLayout
from flightllm.hw.mpe import mpe_config
from flightllm.hw.mpe_unit import (KIND_PV, KIND_QK, MpeDecode, MpeFault, UnitGeometry, comp_layout,
                                   fetch_layout, mpe_decode)
from flightllm.hw.params import get_preset
from flightllm.runtime import sfu
from flightllm.sim.mpe_unit_top import PARAMS

SMALL = PARAMS                 #: the cocotb test's build (sim/mpe_unit_top.py)


def _weight_fields(rng, p, good):
    fmts = [WeightFormat.parse(n) for n in p.weight_formats]
    wf = fmts[rng.integers(len(fmts))]
    f = dict(bits=wf.bits, n_keep=wf.n_keep, m=wf.m, group_log2=wf.group_size.bit_length() - 1, kind=wf.kind)
    if not good:
        k = rng.integers(5)
        if k == 0:
            f["bits"] = int(rng.integers(16))
        elif k == 1:
            f["kind"] = int(rng.integers(4))
        elif k == 2:
            f["n_keep"], f["m"] = int(rng.integers(32)), int(rng.integers(32))
        elif k == 3:
            f["group_log2"] = int(rng.integers(16))
        elif k == 4 and wf.dense:
            f["n_keep"] = f["m"] = int(rng.integers(32))          # any n == m is dense
    return wf, f


def random_entry(rng, p):
    """An MPE instruction and registers: mostly well-formed, with random faults."""
    good = rng.random() < 0.7
    regs = [0] + [int(x) for x in rng.integers(0, 6, 15)]
    op = [Opcode.MV, Opcode.MM, Opcode.QK, Opcode.PV][rng.integers(4)]
    wait, signal = int(rng.integers(16)), int(rng.integers(16))
    bufs = list(Buf)
    if op in (Opcode.MV, Opcode.MM):
        wf, f = _weight_fields(rng, p, good or rng.random() < 0.5)
        g = wf.group_size
        f.update(src=Buf.HQ, dst=[Buf.Y, Buf.G, Buf.U, Buf.LOG, Buf.A][rng.integers(5)],
                 rows_reg=Reg.CLEN if op == Opcode.MM else Reg(int(rng.integers(3)) * (rng.random() < 0.2)),
                 shift=int(rng.integers(0, 26)), n_out=int(rng.integers(1, 3 * p.chains * 4)),
                 k_in=int(rng.integers(1, 9)) * g, w_off=int(rng.integers(0, 1 << 20)) * 64)
        regs[Reg.CLEN.value] = int(rng.integers(0, p.mm_tokens + 1))
        if not good:
            k = rng.integers(8)
            if k == 0:
                f["shift"] = int(rng.integers(26, 32))
            elif k == 1:
                f["k_in"] = int(rng.integers(0, 1 << 13))
            elif k == 2:
                f["n_out"] = int(rng.integers(0, 1 << 20)) * (rng.random() < 0.5)
            elif k == 3:
                f["src"], f["dst"] = bufs[rng.integers(len(bufs))], bufs[rng.integers(len(bufs))]
            elif k == 4:
                regs[Reg.CLEN.value] = int(rng.integers(0, 1 << 32))
            elif k == 5:
                f["w_off"] += int(rng.integers(1, 64))
            elif k == 6:
                f["rows_reg"] = Reg.CLEN
        return Instr(op, dict(wait=wait, signal=signal, **f)), regs
    kvf = [WeightFormat.parse(n) for n in p.kv_formats]
    hd = 32 * int(rng.integers(1, 3))
    cap = 32 * int(rng.integers(1, p.max_seq_len // 32 + 1))
    rep = int(rng.integers(1, 3))
    kvh = int(rng.integers(0, max(1, p.buf_heads // rep)))
    rows = int(rng.integers(1, p.mm_tokens + 1))
    regs[Reg.CLEN.value] = rows
    regs[Reg.CPOS.value] = int(rng.integers(0, cap - rows + 1))
    window = int(rng.integers(0, 4)) * (rng.random() < 0.6)
    f = dict(src=Buf.QQ if op == Opcode.QK else Buf.PQ, dst=Buf.S if op == Opcode.QK else Buf.A, aux=Buf.KS,
             rows_reg=Reg.CLEN, len_reg=Reg.CPOS, len_add=1, kvh=kvh, rep=rep, head_dim=hd,
             bits=kvf[rng.integers(len(kvf))].bits, cap=cap, sink=int(rng.integers(0, 3)), window=window,
             kv_off=int(rng.integers(0, 1 << 16)))
    if not good:
        k = rng.integers(9)
        if k == 0:
            f["bits"] = int(rng.integers(16))
        elif k == 1:
            f["len_add"] = int(rng.integers(-32, 32))
        elif k == 2:
            regs[Reg.CLEN.value] = int(rng.integers(0, 40))
        elif k == 3:
            f["rep"] = int(rng.integers(0, 64))
        elif k == 4:
            f["head_dim"] = int(rng.integers(0, 1024))
        elif k == 5:
            f["cap"] = int(rng.integers(0, 1 << 16))
        elif k == 6:
            f["src"], f["dst"], f["aux"] = (bufs[rng.integers(len(bufs))] for _ in range(3))
        elif k == 7:
            f["kvh"] = int(rng.integers(0, 256))
        elif k == 8:
            regs[Reg.CPOS.value] = int(rng.integers(0, 1 << 32))
    return Instr(op, dict(wait=wait, signal=signal, **f)), regs


def _model(p, ins, regs):
    try:
        return mpe_decode(p, encode(ins), reg_values(ins, regs))
    except MpeFault:
        return None


@pytest.mark.parametrize("preset", ["sim-mpeu", "sim-mc"])
def test_decode_matches_model(preset):
    """The RTL decode gives the model's descriptors (every field) or faults with the pc."""
    p = SMALL if preset == "sim-mpeu" else get_preset(preset)
    ug = UnitGeometry(p)
    rng = np.random.default_rng(1)
    cases = [random_entry(rng, p) for _ in range(250)]
    dut = MpeDecode(p)
    fl, cl = data.Layout.cast(fetch_layout(ug)), data.Layout.cast(comp_layout(ug))
    rst = Signal()
    sim = Simulator(ResetInserter(rst)(dut))
    sim.add_clock(1e-8)
    got = []

    def unpack(layout, v):
        return {name: (v >> f.offset) & ((1 << f.width) - 1) for name, f in layout}

    async def bench(ctx):
        for k, (ins, regs) in enumerate(cases):
            ctx.set(dut.issue.valid, 1)
            ctx.set(dut.issue.payload.word, encode(ins))
            ctx.set(dut.issue.payload.pc, k)
            for i, v in enumerate(reg_values(ins, regs)):
                ctx.set(dut.issue.payload.regs[i], v)
            await ctx.tick().until(dut.issue.ready)
            ctx.set(dut.issue.valid, 0)
            fetch = comp = None
            for _ in range(40):
                if ctx.get(dut.fault):
                    break
                ctx.set(dut.fetch.ready, k % 3 != 0 or comp is not None)
                ctx.set(dut.comp.ready, k % 3 != 1 or fetch is not None)
                f_ok = ctx.get(dut.fetch.valid) and ctx.get(dut.fetch.ready)
                c_ok = ctx.get(dut.comp.valid) and ctx.get(dut.comp.ready)
                if f_ok:
                    fetch = unpack(fl, ctx.get(dut.fetch.payload.as_value()))
                if c_ok:
                    comp = unpack(cl, ctx.get(dut.comp.payload.as_value()))
                await ctx.tick()
                if fetch is not None and comp is not None:
                    break
            ctx.set(dut.fetch.ready, 0)
            ctx.set(dut.comp.ready, 0)
            if ctx.get(dut.fault):
                got.append(("fault", ctx.get(dut.fault_pc)))
                ctx.set(rst, 1)
                await ctx.tick()
                ctx.set(rst, 0)
            else:
                assert fetch is not None and comp is not None, (k, ins)
                got.append(("ok", {"fetch": fetch, "comp": comp}))

    sim.add_testbench(bench)
    sim.run()
    nfault = 0
    for k, ((ins, regs), g) in enumerate(zip(cases, got)):
        want = _model(p, ins, regs)
        if want is None:
            nfault += 1
            assert g == ("fault", k), (ins, regs, g)
            continue
        assert g[0] == "ok", (k, ins, regs, g)
        for part, layout in (("fetch", fl), ("comp", cl)):
            for name, f in layout:
                v = want[part].get(name, 0) & ((1 << f.width) - 1)
                assert g[1][part][name] == v, (k, ins.op.name, part, name, g[1][part][name], v, ins, regs)
    assert 30 < nfault < 200, nfault


@pytest.mark.parametrize("preset", ["sim-mpeu", "sim", "u280"])
def test_model_matches_the_single_sources(preset):
    """Every descriptor the model accepts: the cfg fields are mpe_config's, the KV records
    and bytes are KvLayout.stream's over attention_mask's positions, the fetch's beats are
    those bytes; every entry the golden model's checks reject is rejected."""
    p = SMALL if preset == "sim-mpeu" else get_preset(preset)
    ug = UnitGeometry(p)
    geom = EngineGeometry(p)
    rng = np.random.default_rng(2)
    accepted = 0
    for _ in range(600):
        ins, regs = random_entry(rng, p)
        d = _model(p, ins, regs)
        f = {k: (v.value if hasattr(v, "value") else v) for k, v in ins.f.items()}
        rows = regs[f.get("rows_reg", 0)] if f.get("rows_reg", 0) else 1
        if ins.op in (Opcode.MV, Opcode.MM):
            try:
                wf = WeightFormat.from_fields(f.get("bits", 0), f.get("n_keep", 0), f.get("m", 0),
                                              f.get("group_log2", 0), f.get("kind", 0))
                p.check_format(wf)
                golden_ok = (f.get("n_out", 0) > 0 and f.get("k_in", 0) > 0 and f.get("k_in", 0) % wf.group_size == 0
                             and (ins.op == Opcode.MM or rows == 1))
            except ValueError:
                golden_ok = False
            if not golden_ok:
                assert d is None, ins
            if d is None:
                continue
            accepted += 1
            c = d["comp"]
            cfg = mpe_config(geom, wf, f["n_out"], f["k_in"], 1, 0, f.get("shift", 0))
            for k in ("fmt", "e0", "tiles", "groups", "stride", "records", "words"):
                assert c[k] == cfg[k], (k, ins)
            assert d["fetch"]["beats0"] * geom.W == -(-region_bytes(wf, (f["n_out"], f["k_in"]), p) * 8 // geom.W) * geom.W
            assert c["tpp"] == min(p.mm_tokens, geom.act_words // 2 // cfg["stride"])
            continue
        valid0 = regs[f.get("len_reg", 0)] + f.get("len_add", 0)
        n = valid0 + rows - 1
        cap, hd = f.get("cap", 0), f.get("head_dim", 0)
        golden_ok = (rows > 0 and valid0 >= 1 and n <= cap and f.get("rep", 0) > 0
                     and f.get("bits", 0) in (WeightFormat.parse(x).bits for x in p.kv_formats))
        if not golden_ok:
            assert d is None, (ins, regs)
        if d is None:
            continue
        accepted += 1
        c, fe = d["comp"], d["fetch"]
        kind = K if ins.op == Opcode.QK else V
        wf = WeightFormat.parse(f"int{f['bits']}r/32")
        kvl = KvLayout(1, 1, hd, cap, wf, p)
        n32 = -(-n // 32) * 32
        mask = sfu.attention_mask(valid0 + np.arange(rows), n32, f.get("sink", 0), f.get("window", 0))
        recs, nbytes = kvl.stream(kind, mask.any(axis=0))
        assert c["records"] == recs, (ins, regs, c["records"], recs)
        assert (fe["beats0"] + fe["beats1"]) * fe["outer"] * geom.W // 8 == nbytes
        assert c["kind"] == (KIND_QK if kind == K else KIND_PV)
        ns = c["t_n0"] + (c["tiles"] - c["t_n0"]) if kind == K else c["groups"]
        if kind == K:
            cfg = mpe_config(geom, wf, ns * geom.R, hd, 1, 0, 0)
        else:
            cfg = mpe_config(geom, wf, hd, ns * 32, 1, 0, 0)
        for k in ("fmt", "e0", "tiles", "groups", "stride", "records", "words"):
            assert c[k] == cfg[k], (k, ins)
        assert c["ntok"] == rows * f["rep"]
        # the streamed positions cover every attended one, and only tiles holding one
        unit = geom.R if kind == K else 32
        held = np.zeros(-(-cap // unit) + 1, bool)
        held[c["t_s0"] if kind == K else c["e_off0"] // 32:][:c["t_n0"] if kind == K else c["e_len0"] // 32] = True
        if kind == K and c["tiles"] > c["t_n0"]:
            held[c["t_s1"]:c["t_s1"] + c["tiles"] - c["t_n0"]] = True
        if kind == V and c["e_len1"]:
            held[c["e_off1"] // 32:(c["e_off1"] + c["e_len1"]) // 32] = True
        att = np.zeros(held.size * unit, bool)
        att[:n32] = mask.any(axis=0)
        want = att.reshape(-1, unit).any(axis=1)
        assert (held == want).all(), (ins, regs)
    assert accepted > 150
