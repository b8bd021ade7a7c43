"""amaranth.sim checks of the LD / ST space transfers (hw/ldst.py) against the golden model.

A test top holds the engine (or a unit of engines) and a :class:`~flightllm.hw.buffers.Buffers`
with the regions the instructions use; a Python AXI4 subordinate per kv channel
(:class:`Chan`) answers every read and write with random ready / valid delays and
latencies, checks each burst (4 KiB, length, that it stays inside the spaces) and keeps the
channel buffers, which hold the spaces interleaved as :mod:`flightllm.hw.memmap` says.
Entries go in with random gaps; the expected results come from
:class:`flightllm.runtime.golden.Golden` running the same instructions (LD_KV: the buffer
it loads; ST_KV, ST_OUT: its space images). At each ``done`` the instruction must be
complete (LD: its rows are in the buffer; ST: every burst it asked for has its B), never
in or before its issue cycle, and ``busy`` must hold while anything is undone. Faults and
aborts are checked in phases: the bad entry faults with its pc, ``abort`` empties the engine
with nothing left half-way on AXI, and the next instructions run as if nothing happened.
Every wait has a cycle bound.
"""

from __future__ import annotations

import dataclasses
import random
from collections import deque

import numpy as np
import pytest
from amaranth import Elaboratable, Module, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out
from amaranth.sim import Simulator

from flightllm.hw.axi import AXI_BURST_INCR, AXI_PAGE_BYTES, split_bursts
from flightllm.hw.buffers import Buffers, buffer_map
from flightllm.hw.control import PC_BITS, entry_layout
from flightllm.hw.isa import Buf, Instr, Opcode, Reg, Space, encode, reg_values
from flightllm.hw.ldst import LdUnit, SpaceLoad, SpaceStore, StUnit, UnitMux, mem_op, space_commands, targets
from flightllm.hw.memmap import GRANULE, interleave
from flightllm.hw.params import get_preset
from flightllm.runtime.golden import Golden, GoldenError

F32 = np.float32


def _small(**kw):
    base = dict(name="ldst-small", mm_tokens=4, max_seq_len=64, kv_tile=16, buf_hidden=512, buf_ffn=64,
                buf_vocab=128, buf_heads=2, buf_kv_heads=3, buf_tables=64)
    return dataclasses.replace(get_preset("sim"), **{**base, **kw})


#: 32-byte beats (2 per granule) on one channel; on two with 11 kv heads (KS/VS rows of 8 + 3
#: lanes); 64-byte beats (a granule) with 16 lanes on two; the u280's 64-byte beats and 32 lanes
#: on two; 16-byte beats (4 per granule) on four channels
CONFIGS = {
    "k1": _small(),
    "k2": _small(kv_channels=2, buf_kv_heads=11),
    "w64": _small(kv_channels=2, hbm_port_bits=512, sfu_lanes=16),
    "u280ish": _small(kv_channels=2, hbm_port_bits=512, sfu_lanes=32, buf_kv_heads=32),
    "w16": _small(kv_channels=4, weight_channels=4, hbm_port_bits=128),
}
KV_SPACE, PER_KV, PER_OUT = 4096, 8192, 4096     # each kv channel: KV at 4096, OUT after it, TOK after that
SPACES = dict(kv_space=KV_SPACE, out_space=KV_SPACE + PER_KV, tok_space=KV_SPACE + PER_KV + PER_OUT)
CHAN_BYTES = KV_SPACE + PER_KV + PER_OUT + 4096


def plan_of(p):
    """The golden model's plan; its KV and output bounds are the spaces' room here."""
    K = p.kv_channels
    return {"max_seq": 64, "kv_bytes": PER_KV * K, "out_row_bytes": PER_OUT * K // 64, "kv_heads": 1}


def split_space(img, K):
    """A space image (a multiple of 64 K bytes) -> each kv channel's part of it."""
    g = np.asarray(img, np.uint8).reshape(-1, K, GRANULE)
    return [g[:, c, :].reshape(-1) for c in range(K)]


def join_space(parts):
    return np.stack([q.reshape(-1, GRANULE) for q in parts], axis=1).reshape(-1)


def test_split_space_is_the_memmap_interleave():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, 64 * 4 * 5, dtype=np.uint8)
    parts = split_space(img, 4)
    for a in rng.integers(0, img.size, 200):
        c, off = interleave(int(a), 4, 4)
        assert parts[c][off] == img[a]
    np.testing.assert_array_equal(join_space(parts), img)


# ------------------------------------------------------------------------------ the test top
class Top(Elaboratable):
    """``dut`` (an engine or a unit) and the buffers; ``client``: the engine whose buffer port
    is wired to them (``dut`` itself by default). The buffers' second client, ``noise``, is
    the testbench's (:class:`Noise`)."""

    def __init__(self, dut, p, regions, init, client=None):
        self.dut, self.p, self.client = dut, p, client or dut
        self.bufs = Buffers(p, clients=("u", "noise"), only=regions, init=init)

    def elaborate(self, platform):
        m = Module()
        m.submodules.dut, m.submodules.bufs = self.dut, self.bufs
        wiring.connect(m, self.client.buf, self.bufs.port("u"))
        return m


# ------------------------------------------------------------------------------ models
class Chan:
    """AXI4 subordinate for one kv channel: random readys, valids and latencies, in order
    (no IDs). ``mem``: the channel buffer (numpy uint8); ``allowed``: the byte range every
    burst must stay in."""

    def __init__(self, axi, beat, rng, mem, allowed, max_burst, p_ready=0.6, p_valid=0.7, max_lat=6):
        self.axi, self.bb, self.rng, self.mem, self.allowed = axi, beat, rng, mem, allowed
        self.max_burst, self.p_ready, self.p_valid, self.max_lat = max_burst, p_ready, p_valid, max_lat
        names = axi.signature.members
        self.rd, self.wrt = "arvalid" in names, "awvalid" in names
        self.t = 0
        self.rq, self.r_on, self.ars = deque(), False, 0
        self.aws, self.w_cur, self.w_bursts, self.applied, self.aw_seen = [], [], [], 0, 0
        self.bq, self.b_on, self.b_count = deque(), False, 0

    def _check(self, addr, ln, size, burst):
        assert size == self.bb.bit_length() - 1 and burst == AXI_BURST_INCR
        assert addr % self.bb == 0 and ln + 1 <= self.max_burst
        assert addr % AXI_PAGE_BYTES + (ln + 1) * self.bb <= AXI_PAGE_BYTES, "a burst crosses 4 KiB"
        lo, hi = self.allowed
        assert lo <= addr and addr + (ln + 1) * self.bb <= hi, f"burst {addr:#x}+{ln + 1} outside {lo:#x}..{hi:#x}"

    def drive(self, ctx):
        a, rng = self.axi, self.rng
        if self.rd:
            ctx.set(a.arready, rng.random() < self.p_ready)
            if not self.r_on and self.rq and self.rq[0][3] <= self.t and rng.random() < self.p_valid:
                self.r_on = True
            if self.r_on:
                addr, ln, k, _ = self.rq[0]
                b = addr + k * self.bb
                ctx.set(a.rdata, int.from_bytes(self.mem[b:b + self.bb].tobytes(), "little"))
                ctx.set(a.rlast, k == ln)
            ctx.set(a.rresp, 0)
            ctx.set(a.rvalid, self.r_on)
        if self.wrt:
            ctx.set(a.awready, rng.random() < self.p_ready)
            ctx.set(a.wready, rng.random() < self.p_ready)
            if not self.b_on and self.bq and self.bq[0] <= self.t and rng.random() < self.p_valid:
                self.b_on = True
            ctx.set(a.bresp, 0)
            ctx.set(a.bvalid, self.b_on)

    def sample(self, ctx):
        a, g = self.axi, ctx.get
        if self.rd:
            assert g(a.rready) == 1, "rready fell"
            if g(a.arvalid) and g(a.arready):
                rec = (g(a.araddr), g(a.arlen), g(a.arsize), g(a.arburst))
                self._check(*rec)
                self.ars += 1
                self.rq.append([rec[0], rec[1], 0, self.t + 1 + self.rng.randint(0, self.max_lat)])
            if self.r_on:
                self.r_on = False
                self.rq[0][2] += 1
                if self.rq[0][2] > self.rq[0][1]:
                    self.rq.popleft()
        if self.wrt:
            if g(a.awvalid):
                self.aw_seen = max(self.aw_seen, len(self.aws) + 1)
            if g(a.awvalid) and g(a.awready):
                rec = (g(a.awaddr), g(a.awlen), g(a.awsize), g(a.awburst))
                self._check(*rec)
                self.aws.append((rec[0], rec[1] + 1))
            if g(a.wvalid) and g(a.wready):
                assert self.aw_seen > len(self.w_bursts), "W before its AW was presented"
                self.w_cur.append((g(a.wdata), g(a.wstrb), g(a.wlast)))
                if self.w_cur[-1][2]:
                    self.w_bursts.append(self.w_cur)
                    self.w_cur = []
            while self.applied < min(len(self.aws), len(self.w_bursts)):
                (addr, n), beats = self.aws[self.applied], self.w_bursts[self.applied]
                assert len(beats) == n, f"{len(beats)} W beats for an AW of {n} (wlast misplaced)"
                for k, (d, s, _) in enumerate(beats):
                    for i in range(self.bb):
                        if s >> i & 1:
                            self.mem[addr + k * self.bb + i] = d >> (8 * i) & 0xFF
                self.bq.append(self.t + 1 + self.rng.randint(0, self.max_lat))
                self.applied += 1
            if self.b_on:
                assert g(a.bready), "bready fell"
                self.b_on = False
                self.bq.popleft()
                self.b_count += 1
        self.t += 1

    def quiet(self):
        """Nothing half-way: every read answered, every write burst complete and acknowledged."""
        return (not self.rq and not self.r_on and not self.w_cur and not self.bq and not self.b_on
                and self.applied == len(self.aws) == len(self.w_bursts))


class Noise:
    """Competes for the engine's regions: reads of random words and writes with no lane
    enabled (they take the write port's turn and change nothing)."""

    def __init__(self, top, rng, p=0.5):
        self.port, self.rng, self.p = top.bufs.port("noise"), rng, p
        self.regions = list(top.bufs.regions.values())
        self.rd_on = self.wr_on = False

    def drive(self, ctx):
        for kind in ("rd", "wr"):
            s = self.port.rd_req if kind == "rd" else self.port.wr
            on = getattr(self, kind + "_on")
            if not on and self.rng.random() < self.p:
                r = self.rng.choice(self.regions)
                ctx.set(s.payload.region, r.id)
                ctx.set(s.payload.word, self.rng.randrange(r.words))
                if kind == "wr":
                    ctx.set(s.payload.mask, 0)
                on = True
            ctx.set(s.valid, on)
            setattr(self, kind + "_on", on)

    def sample(self, ctx):
        if self.rd_on and ctx.get(self.port.rd_req.ready):
            self.rd_on = False
        if self.wr_on and ctx.get(self.port.wr.ready):
            self.wr_on = False


class Entries:
    """The issue stream: entries with random gaps (a valid is held until taken)."""

    def __init__(self, items, rng, p=0.5):
        self.items, self.rng, self.p = deque(items), rng, p
        self.on, self.taken = False, 0

    def drive(self, ctx, s):
        if not self.on and self.items and self.rng.random() < self.p:
            self.on = True
        if self.on:
            word, pc, regs = self.items[0]
            ctx.set(s.payload.word, word)
            ctx.set(s.payload.pc, pc)
            for i, v in enumerate(regs):
                ctx.set(s.payload.regs[i], v)
        ctx.set(s.valid, self.on)

    def sample(self, ctx, s):
        if self.on and ctx.get(s.ready):
            self.on = False
            self.items.popleft()
            self.taken += 1
            return True
        return False


def entry(ins, regs, pc):
    return encode(ins), pc, reg_values(ins, regs)


@dataclasses.dataclass
class Phase:
    """Entries to run; the phase ends when they are all done and the engine is idle, or it
    aborts ``abort_at`` cycles in (or ``abort_after_fault`` cycles after a fault) and ends
    when ``busy`` falls. ``on_done(ctx, k)``: at the k-th done of the phase."""
    items: list
    abort_at: int | None = None
    abort_after_fault: int | None = None
    on_done: object = None
    # what the testbench saw
    dones: int = 0
    fault: tuple | None = None
    cycles: int = 0
    inflight_at_abort: bool = False


def run(top, phases, chans, limit, rng, spaces=None, after=None, watch=None, noise=0.5):
    """Run the phases one after the other on ``top.dut``; ``watch(ctx)`` each cycle; ``noise``:
    how often the noise client asks for the buffers."""
    dut = top.dut
    spaces = spaces or dut
    noise = Noise(top, random.Random(rng.random()), noise)

    async def bench(ctx):
        for name, v in SPACES.items():
            ctx.set(getattr(spaces.spaces, name), v)
        t = 0
        for ph in phases:
            ents = Entries([entry(ins, regs, pc) for pc, (ins, regs) in enumerate(ph.items)], rng)
            t0, aborting, abort_t = t, False, None
            while True:
                assert t - t0 < limit, (f"hung: {limit} cycles, {ents.taken} taken, {ph.dones} done, busy "
                                        f"{ctx.get(dut.busy)}, fault {ph.fault}, aborting {aborting}")
                if not aborting and (ph.abort_at is not None and t - t0 >= ph.abort_at or
                                     ph.abort_after_fault is not None and ph.fault is not None and
                                     t - ph.fault[0] >= ph.abort_after_fault):
                    aborting, abort_t = True, t
                    ph.inflight_at_abort = not all(c.quiet() for c in chans)
                    ents.items.clear()
                    ents.on = False
                ctx.set(dut.abort, aborting)
                for c in chans:
                    c.drive(ctx)
                noise.drive(ctx)
                ents.drive(ctx, dut.issue)
                for c in chans:
                    c.sample(ctx)
                noise.sample(ctx)
                if watch:
                    watch(ctx)
                took = ents.sample(ctx, dut.issue)
                if ctx.get(dut.done) and not aborting:
                    assert ph.dones < ents.taken - took, "done before (or with) its issue"
                    if ph.on_done:
                        ph.on_done(ctx, ph.dones)
                    ph.dones += 1
                if ctx.get(dut.fault):
                    if ph.fault is None:
                        ph.fault = (t, ctx.get(dut.fault_pc))
                    assert ctx.get(dut.fault_pc) == ph.fault[1] and not ctx.get(dut.issue.ready)
                elif ph.fault is not None and not aborting:
                    raise AssertionError("fault fell before abort")
                if aborting:
                    if t > abort_t and not ctx.get(dut.busy):
                        break
                else:
                    undone = ents.taken - took - ph.dones
                    assert undone <= 0 or ctx.get(dut.busy), "busy fell with an instruction not done"
                    if not ents.items and not ents.on and ph.dones == ents.taken and not ctx.get(dut.busy):
                        break
                await ctx.tick()
                t += 1
            ph.cycles = t - t0
            await ctx.tick()
            t += 1
            ctx.set(dut.abort, 0)
            ctx.set(dut.issue.valid, 0)
            for _ in range(3):                        # quiet: no done, nothing busy, no fault
                for c in chans:
                    c.drive(ctx)
                    c.sample(ctx)
                assert not ctx.get(dut.done) and not ctx.get(dut.busy) and not ctx.get(dut.fault)
                await ctx.tick()
                t += 1
        if after:
            after(ctx)

    sim = Simulator(top)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    assert all(c.quiet() for c in chans), "an AXI transaction left half-way"


# ------------------------------------------------------------------------------ instructions
def split_addr(rng, A):
    """``A = addr + R[preg] * pmul`` with a random patch: (fields, registers)."""
    regs = [0] * 16
    f = {}
    if rng.random() < 0.6 and A > 0:
        preg = rng.choice([Reg.R10, Reg.TILE, Reg.CPOS])
        pmul = rng.randint(1, max(1, min(A, 300)))
        r = rng.randint(0, A // pmul)
        regs[preg.value] = r
        f.update(preg=preg, pmul=pmul, addr=A - r * pmul)
    else:
        f.update(addr=A, preg=Reg.ZERO, pmul=rng.randint(0, 50))
        if rng.random() < 0.3:
            f["preg"] = Reg.R11                   # a register that reads 0
    return f, regs


def rows_fields(rng, rows, regs):
    """rows from the field, or R[rows_reg] (the field then holds junk the engine must ignore)."""
    if rng.random() < 0.5:
        return {"rows": rows, "rows_reg": Reg.ZERO}
    regs[Reg.CLEN.value] = rows
    return {"rows": rng.randint(0, 1000), "rows_reg": Reg.CLEN}


def pick_addr(rng, room, nbytes, beat):
    hi = room - nbytes
    kind = rng.random()
    if kind < 0.3:
        return rng.randint(0, hi)                            # any byte
    if kind < 0.6:
        return rng.randint(0, hi // beat) * beat             # a beat
    if kind < 0.7:
        return hi                                            # the very end of the space
    return rng.randint(0, hi // 4) * 4


def mem_instrs(rng, p, n, choices):
    """``n`` random instructions: ``choices`` = [(opcode, buffers)]."""
    rooms = {Opcode.LD_KV: PER_KV * p.kv_channels, Opcode.ST_KV: PER_KV * p.kv_channels,
             Opcode.ST_OUT: PER_OUT * p.kv_channels}
    out = []
    for _ in range(n):
        op, bufs = rng.choice(choices)
        b = rng.choice(bufs)
        _, caprows, capw, _ = targets(p, op)[b]
        rows = rng.choice([1, caprows, rng.randint(1, caprows)])
        ne = rng.choice([1, capw, rng.randint(1, capw), min(capw, p.sfu_lanes + 1)])
        ne = min(ne, rooms[op] // (4 * rows))
        if rng.random() < 0.05:
            rows = 0
        A = pick_addr(rng, rooms[op], rows * ne * 4, p.hbm_port_bits // 8)
        f, regs = split_addr(rng, A)
        f.update(rows_fields(rng, rows, regs), buf=b, space=Space.OUT if op == Opcode.ST_OUT else Space.KV,
                 row_bytes=4 * ne)
        out.append((Instr(op, f), regs))
    return out


LD_BUFS = [(Opcode.LD_KV, [Buf.X, Buf.KS, Buf.VS, Buf.LOG])]
ST_BUFS = [(Opcode.ST_KV, [Buf.KQ, Buf.VQ, Buf.QQ]), (Opcode.ST_OUT, [Buf.LOG, Buf.X])]


def region_image(top, ctx, name):
    reg, L = top.bufs.regions[name], top.p.sfu_lanes
    mem = top.bufs.mems[name]
    flat = np.zeros(reg.words * L, np.uint32)
    for w in range(reg.words):
        v = ctx.get(mem.data[w]).as_value().value
        flat[w * L:(w + 1) * L] = [(v >> (32 * l)) & 0xFFFFFFFF for l in range(L)]
    return flat


def positions(p, b, rows, ne):
    """Flat (word * L + lane) indices of elements (r, e) of buffer ``b``'s region."""
    reg = buffer_map(p)[b.name]
    RL = reg.row_words * p.sfu_lanes
    r, e = np.meshgrid(np.arange(rows), np.arange(ne), indexing="ij")
    return e * RL + r if b in (Buf.KS, Buf.VS) else r * RL + e


def random_init(rng_np, p, names):
    L, bm = p.sfu_lanes, buffer_map(p)
    return {n: rng_np.integers(0, 1 << 32, (bm[n].words, L), dtype=np.uint64).astype(np.uint32) for n in names}


def golden(p):
    return Golden(p, [], np.zeros(16, F32), plan_of(p))


def golden_run(g, ins, regs):
    g.run([ins, Instr(Opcode.END)], dict(enumerate(regs)))


# ------------------------------------------------------------------------------ LD_KV
class LdCase:
    """A space KV image, random buffers, the engine and its channels, the golden loads."""

    NAMES = ["KS", "LOG", "VS", "X"]

    def __init__(self, p, seed, p_ready=0.6, max_lat=6, engine=None):
        self.p, self.rng, rng_np = p, random.Random(seed), np.random.default_rng(seed)
        K, W = p.kv_channels, p.hbm_port_bits // 8
        self.init = random_init(rng_np, p, self.NAMES)
        self.space = rng_np.integers(0, 256, PER_KV * K, dtype=np.uint8)
        self.eng = engine or SpaceLoad(p)
        self.mem = []
        for part in split_space(self.space, K):
            mem = rng_np.integers(0, 256, CHAN_BYTES, dtype=np.uint8)
            mem[KV_SPACE:KV_SPACE + PER_KV] = part
            self.mem.append(mem)
        self.chans = [Chan(self.eng.axi[c], W, self.rng, self.mem[c], (KV_SPACE, KV_SPACE + PER_KV),
                           self.eng.readers[c].max_burst, p_ready=p_ready, p_valid=p_ready, max_lat=max_lat)
                      for c in range(K)]

    def expect(self, instrs):
        """[(region, flat positions, uint32 values)] of each instruction (golden)."""
        g = golden(self.p)
        g.kv[:] = self.space
        out = []
        for ins, regs in instrs:
            golden_run(g, ins, regs)
            b = Buf(ins.f["buf"])
            v = np.asarray(g.bufs[b.value], F32)
            out.append((b.name, positions(self.p, b, *v.shape).reshape(-1), v.view(np.uint32).reshape(-1)))
        return out

    def checker(self, top, per):
        def on_done(ctx, k):                         # the rows are in the buffer at the done
            name, pos, vals = per[k]
            later = {q for nm, ps, _ in per[k + 1:] if nm == name for q in ps.tolist()}
            keep = np.array([q not in later for q in pos.tolist()], bool)
            img = region_image(top, ctx, name)
            np.testing.assert_array_equal(img[pos[keep]], vals[keep], err_msg=f"LD_KV {k} into {name} at its done")
        return on_done

    def run(self, phases, limit=6000, **kw):
        top = kw.pop("top", None) or Top(self.eng, self.p, self.NAMES, self.init)
        final = {}

        def after(ctx):
            final.update({nm: region_image(top, ctx, nm) for nm in self.NAMES})
        run(top, phases, self.chans, limit, self.rng, after=after, **kw)
        return final

    def model(self, per):
        exp = {nm: self.init[nm].reshape(-1).copy() for nm in self.NAMES}
        for name, pos, vals in per:
            exp[name][pos] = vals
        return exp


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_ld_kv_matches_golden(cfg, seed):
    p = CONFIGS[cfg]
    case = LdCase(p, seed=sum(map(ord, cfg)) + 10 * seed)
    instrs = mem_instrs(case.rng, p, 10, LD_BUFS)
    per = case.expect(instrs)
    top = Top(case.eng, p, case.NAMES, case.init)
    ph = Phase(instrs, on_done=case.checker(top, per))
    final = case.run([ph], top=top)
    assert ph.fault is None and ph.dones == len(instrs)
    exp = case.model(per)
    for nm in case.NAMES:                           # nothing else written
        np.testing.assert_array_equal(final[nm], exp[nm], err_msg=f"region {nm}")
    # the reads are the bursts of the command model
    W = p.hbm_port_bits // 8
    asked = [0] * p.kv_channels
    for ins, regs in instrs:
        op = mem_op(ins, regs)
        for c, lo, beats in space_commands(op["addr"], op["nbytes"], p.kv_channels, W, case.eng.S):
            asked[c] += len(split_bursts(KV_SPACE + lo * W, beats, p.hbm_port_bits, case.eng.readers[c].max_burst))
    assert [c.ars for c in case.chans] == asked


@pytest.mark.parametrize("cfg,buf,rows,ne,addr,bound", [
    ("k1", Buf.X, 3, 512, 36, 1.15),         # plain rows, an element-aligned start: a beat per cycle
    ("k1", Buf.X, 3, 500, 37, 1.15),         # any byte
    ("u280ish", Buf.X, 2, 512, 4, 1.15),     # 64-byte beats, 32 lanes
    ("u280ish", Buf.KS, 64, 32, 0, 1.6),     # KS: a position (32 kv heads) per 2 beats, blocks while the next collects
    ("k1", Buf.KS, 64, 3, 0, 2.0),           # KS: a position per cycle (12 bytes)
])
def test_ld_kv_rate(cfg, buf, rows, ne, addr, bound):
    """On a memory that never stalls a load streams at about its bound (cycles per beat)."""
    p = CONFIGS[cfg]
    W = p.hbm_port_bits // 8
    case = LdCase(p, 5, p_ready=1.0, max_lat=0)
    ins = Instr(Opcode.LD_KV, dict(buf=buf, space=Space.KV, rows=rows, row_bytes=4 * ne, addr=addr))
    per = case.expect([(ins, [0] * 16)])
    ph = Phase([(ins, [0] * 16)])
    final = case.run([ph], noise=0)
    np.testing.assert_array_equal(final[buf.name], case.model(per)[buf.name])
    beats = -(-rows * ne * 4 // W)
    if buf == Buf.KS:
        beats = max(beats, rows * -(-ne // p.sfu_lanes))        # a position per cycle at most
    assert ph.cycles < beats * bound + 40, (ph.cycles, beats)


def test_ld_kv_pipelines_its_instructions():
    """Back to back small loads overlap (rule 1): far fewer cycles than one at a time."""
    p = CONFIGS["k2"]
    case = LdCase(p, 7, p_ready=1.0, max_lat=20)
    instrs = [(Instr(Opcode.LD_KV, dict(buf=Buf.X, space=Space.KV, rows=1, row_bytes=64, addr=64 * k + 8)),
               [0] * 16) for k in range(8)]
    one = Phase(instrs[:1])
    case.run([one], noise=0)
    many = Phase(instrs)
    final = case.run([many], noise=0)
    np.testing.assert_array_equal(final["X"], case.model(case.expect(instrs))["X"])
    assert many.cycles < 0.5 * len(instrs) * one.cycles, (many.cycles, one.cycles)


# ------------------------------------------------------------------------------ ST_KV, ST_OUT
class StCase:
    """Space images, random buffers, the engine and its channels, the golden stores."""

    NAMES = ["KQ.scale", "LOG", "QQ.scale", "VQ.scale", "X"]

    def __init__(self, p, seed, p_ready=0.6, max_lat=6, engine=None):
        self.p, self.rng, rng_np = p, random.Random(seed), np.random.default_rng(seed)
        K, W = p.kv_channels, p.hbm_port_bits // 8
        self.init = random_init(rng_np, p, self.NAMES)
        self.kv = rng_np.integers(0, 256, PER_KV * K, dtype=np.uint8)
        self.out = rng_np.integers(0, 256, PER_OUT * K, dtype=np.uint8)
        self.eng = engine or SpaceStore(p)
        self.mem = []
        for kv_part, out_part in zip(split_space(self.kv, K), split_space(self.out, K)):
            mem = rng_np.integers(0, 256, CHAN_BYTES, dtype=np.uint8)
            mem[KV_SPACE:KV_SPACE + PER_KV] = kv_part
            mem[KV_SPACE + PER_KV:KV_SPACE + PER_KV + PER_OUT] = out_part
            self.mem.append(mem)
        self.outside = [m.copy() for m in self.mem]
        self.chans = [Chan(self.eng.axi[c], W, self.rng, self.mem[c], (KV_SPACE, KV_SPACE + PER_KV + PER_OUT),
                           self.eng.writers[c].max_burst, p_ready=p_ready, p_valid=p_ready, max_lat=max_lat)
                      for c in range(K)]

    def golden(self, instrs, kv=None, out=None):
        """The golden spaces after ``instrs`` (from ``kv``, ``out``; default the initial images)."""
        g, bm, L = golden(self.p), buffer_map(self.p), self.p.sfu_lanes
        g.kv[:] = self.kv if kv is None else kv
        g.out = (self.out if out is None else out).copy()

        def rows_of(name, width):
            r = bm[name]
            return self.init[name].reshape(r.rows, r.row_words * L)[:, :width].copy()
        for ins, regs in instrs:
            b = Buf(ins.f["buf"])
            ne = ins.f.get("row_bytes", 0) // 4
            if ins.op == Opcode.ST_KV:
                sc = rows_of(b.name + ".scale", ne).view(F32)
                g.bufs[b.value] = (np.zeros((sc.shape[0], bm[b.name].width), np.int8), sc, None)
            else:
                g.bufs[b.value] = rows_of(b.name, ne).view(F32)
            golden_run(g, ins, regs)
        return g.kv, g.out

    def bursts(self, instrs):
        """Cumulative bursts per channel after each instruction (what must have its B at its done)."""
        K, W = self.p.kv_channels, self.p.hbm_port_bits // 8
        cum, tot = [], [0] * K
        for ins, regs in instrs:
            op = mem_op(ins, regs)
            base = KV_SPACE + (PER_KV if ins.op == Opcode.ST_OUT else 0)
            for c, lo, beats in space_commands(op["addr"], op["nbytes"], K, W, self.eng.S):
                tot[c] += len(split_bursts(base + lo * W, beats, self.p.hbm_port_bits, self.eng.writers[c].max_burst))
            cum.append(list(tot))
        return cum

    def checker(self, cum):
        def on_done(ctx, k):
            for c, ch in enumerate(self.chans):
                assert ch.b_count >= cum[k][c], f"ST {k}: done before the B of its bursts on channel {c}"
        return on_done

    def run(self, phases, limit=8000, **kw):
        top = kw.pop("top", None) or Top(self.eng, self.p, self.NAMES, self.init)
        run(top, phases, self.chans, limit, self.rng, **kw)
        for m, o in zip(self.mem, self.outside):      # nothing outside the spaces
            np.testing.assert_array_equal(m[:KV_SPACE], o[:KV_SPACE])
            np.testing.assert_array_equal(m[KV_SPACE + PER_KV + PER_OUT:], o[KV_SPACE + PER_KV + PER_OUT:])
        return (join_space([m[KV_SPACE:KV_SPACE + PER_KV] for m in self.mem]),
                join_space([m[KV_SPACE + PER_KV:KV_SPACE + PER_KV + PER_OUT] for m in self.mem]))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_st_kv_and_out_match_golden(cfg, seed):
    p = CONFIGS[cfg]
    case = StCase(p, seed=sum(map(ord, cfg)) + 1 + 10 * seed)
    instrs = mem_instrs(case.rng, p, 10, ST_BUFS)
    want = case.golden(instrs)
    ph = Phase(instrs, on_done=case.checker(case.bursts(instrs)))
    got = case.run([ph])
    assert ph.fault is None and ph.dones == len(instrs)
    np.testing.assert_array_equal(got[0], want[0], err_msg="space KV")
    np.testing.assert_array_equal(got[1], want[1], err_msg="space OUT")


@pytest.mark.parametrize("cfg,rows,ne,addr", [("k1", 4, 128, 8), ("k1", 3, 127, 5), ("u280ish", 4, 128, 0),
                                              ("k2", 4, 128, 2)])
def test_st_out_rate(cfg, rows, ne, addr):
    """On a memory that never stalls a store streams a space beat per cycle."""
    p = CONFIGS[cfg]
    W = p.hbm_port_bits // 8
    case = StCase(p, 3, p_ready=1.0, max_lat=0)
    ins = Instr(Opcode.ST_OUT, dict(buf=Buf.LOG, space=Space.OUT, rows=rows, row_bytes=4 * ne, addr=addr))
    want = case.golden([(ins, [0] * 16)])
    ph = Phase([(ins, [0] * 16)])
    got = case.run([ph], noise=0)
    np.testing.assert_array_equal(got[1], want[1])
    beats = -(-(addr % W + rows * ne * 4) // W)
    assert ph.cycles < beats * 1.15 + 40, (ph.cycles, beats)


# ------------------------------------------------------------------------------ the command model
@pytest.mark.parametrize("K,W,S", [(1, 32, 16), (2, 32, 3), (4, 16, 2), (32, 64, 32), (2, 64, 1), (8, 4, 5)])
def test_space_commands_cover_the_transfer_once(K, W, S):
    rng = random.Random(K * 1000 + W + S)
    G = GRANULE // W
    for _ in range(300):
        addr = rng.randrange(0, 1 << 20)
        n = rng.choice([0, 1, rng.randrange(1, 5000), rng.randrange(1, 100000)])
        cmds = space_commands(addr, n, K, W, S)
        want = {}
        for sb in range(addr // W, (addr + n - 1) // W + 1) if n else ():
            g = sb // G
            want.setdefault(g % K, []).append((g // K) * G + sb % G)
        got = {}
        for c, lo, beats in cmds:
            assert 1 <= beats <= S * G
            got.setdefault(c, []).extend(range(lo, lo + beats))
        assert got == want
        # issued in granule order: the first beat of each command follows the previous one's
        firsts = [(lo // G) * K + c for c, lo, _ in cmds]
        assert firsts == sorted(firsts)


# ------------------------------------------------------------------------------ faults
def _ld(**f):
    return Instr(Opcode.LD_KV, {"space": Space.KV, "rows": 1, "row_bytes": 16, "buf": Buf.X, **f})


def _st(op=Opcode.ST_OUT, **f):
    space = Space.OUT if op == Opcode.ST_OUT else Space.KV
    return Instr(op, {"space": space, "rows": 1, "row_bytes": 16, "buf": Buf.LOG if op == Opcode.ST_OUT else Buf.KQ,
                      **f})


BIG = [0] * 16
BIG[Reg.R10.value], BIG[Reg.CLEN.value] = 0xFFFFFFFF, 1 << 31
P1 = CONFIGS["k2"]
ROOM_KV, ROOM_OUT = PER_KV * P1.kv_channels, PER_OUT * P1.kv_channels
#: (engine, bad instruction, its registers, the golden model raises too)
FAULTS = [
    ("ld", _ld(space=Space.OUT), BIG, True),                                     # LD_KV from OUT
    ("ld", _ld(addr=ROOM_KV - 15), BIG, True),                                   # one byte past space KV
    ("ld", _ld(preg=Reg.R10, pmul=(1 << 24) - 1), BIG, True),                    # R * pmul far beyond
    ("ld", _ld(rows_reg=Reg.CLEN), BIG, True),                                   # 2**31 rows
    ("ld", _ld(row_bytes=14), BIG, True),                                        # rows of 3.5 floats
    ("ld", _ld(buf=Buf.HQ), BIG, False),                                         # an int8 buffer
    ("ld", _ld(rows=5), BIG, False),                                             # rows beyond X's 4
    ("ld", _ld(row_bytes=4 * 513), BIG, False),                                  # a row beyond X's 512
    ("ld", _ld(buf=Buf.KS, row_bytes=4 * 12), BIG, False),                       # 12 kv heads of KS's 11
    ("ld", _st(), BIG, None),                                                    # not an LD_KV
    ("st", _st(space=Space.KV), BIG, True),                                      # ST_OUT to KV
    ("st", _st(Opcode.ST_KV, space=Space.OUT), BIG, True),                       # ST_KV to OUT
    ("st", _st(addr=ROOM_OUT - 8), BIG, True),                                   # past space OUT
    ("st", _st(Opcode.ST_KV, addr=ROOM_KV - 1), BIG, True),                      # past space KV
    ("st", _st(row_bytes=18), BIG, True),
    ("st", _st(Opcode.ST_KV, buf=Buf.X), BIG, True),                             # ST_KV of a float32 buffer
    ("st", _st(buf=Buf.KS), BIG, False),                                         # ST_OUT of the transposed KS
    ("st", _st(buf=Buf.HQ), BIG, False),                                         # ST_OUT of an int8 buffer
    ("st", _st(Opcode.ST_KV, row_bytes=4 * 17), BIG, False),                     # 17 scales of KQ's 16
    ("st", _ld(), BIG, None),
]


def _golden_raises(kind, ins, regs):
    p = P1
    g = golden(p)
    bm = buffer_map(p)
    rows = 1 << 31 if ins.f.get("rows_reg") else ins.f.get("rows", 1)
    ne = ins.f["row_bytes"] // 4
    b = Buf(ins.f["buf"])
    if ins.op == Opcode.ST_KV and b.name + ".scale" in bm:
        g.bufs[b.value] = (np.zeros((4, 512), np.int8), np.zeros((4, ne), F32), None)
    elif ins.op == Opcode.ST_OUT:
        g.bufs[b.value] = np.zeros((min(rows, 64), ne), F32)
    try:
        golden_run(g, ins, regs)
    except GoldenError:
        return True
    return False


@pytest.mark.parametrize("i", range(len(FAULTS)))
def test_faults(i):
    kind, bad, regs, golden_too = FAULTS[i]
    if golden_too is not None:
        assert _golden_raises(kind, bad, regs) == golden_too
    p = P1
    if kind == "ld":
        case = LdCase(p, 20 + i)
        good = (_ld(addr=100, rows=2, row_bytes=64), [0] * 16)
        per = case.expect([good])
    else:
        case = StCase(p, 20 + i)
        good = (_st(addr=100, rows=2, row_bytes=64), [0] * 16)
        want = case.golden([good])
    first = Phase([good, (bad, regs), good], abort_after_fault=5)
    again = Phase([good])
    res = case.run([first, again])
    assert first.fault is not None and first.fault[1] == 1, first.fault
    assert first.dones <= 1 and again.dones == 1 and again.fault is None
    if kind == "ld":
        np.testing.assert_array_equal(res["X"], case.model(per)["X"])
    else:
        np.testing.assert_array_equal(res[1], want[1])


# ------------------------------------------------------------------------------ abort
@pytest.mark.parametrize("cfg,at", [("k1", 30), ("k2", 60), ("w16", 90), ("u280ish", 15)])
def test_ld_kv_abort(cfg, at):
    """Abort in the middle of long loads: every read the engine asked for is drained, busy
    falls, and the next load is exact (the aborted ones left each element old or new)."""
    p = CONFIGS[cfg]
    case = LdCase(p, at)
    long = [(Instr(Opcode.LD_KV, dict(buf=Buf.X, space=Space.KV, rows=4, row_bytes=4 * 500, addr=8 + k)),
             [0] * 16) for k in range(2)]
    long.append((Instr(Opcode.LD_KV, dict(buf=Buf.KS, space=Space.KV, rows=64, row_bytes=12, addr=3)), [0] * 16))
    nxt = [(Instr(Opcode.LD_KV, dict(buf=Buf.LOG, space=Space.KV, rows=3, row_bytes=4 * 100, addr=4003)), [0] * 16)]
    first, second = Phase(long, abort_at=at), Phase(nxt)
    final = case.run([first, second])
    assert first.dones == 0 and second.dones == 1 and first.inflight_at_abort
    per = case.expect(long + nxt)
    np.testing.assert_array_equal(final["LOG"], case.model(per[3:])["LOG"])
    for name in ("X", "KS"):                        # each element old, or what one of the loads brings
        ok = final[name] == case.init[name].reshape(-1)
        for nm, pos, vals in per[:3]:
            if nm == name:
                ok[pos] |= final[name][pos] == vals
        assert ok.all(), name


@pytest.mark.parametrize("cfg,at", [("k1", 30), ("k2", 50), ("w16", 80), ("u280ish", 20)])
def test_st_abort(cfg, at):
    """Abort in the middle of long stores: every burst asked for gets its beats (with no
    byte enabled after the abort) and its B; each byte is old or new; the next store is exact."""
    p = CONFIGS[cfg]
    case = StCase(p, at)
    K = p.kv_channels
    long = [(Instr(Opcode.ST_OUT, dict(buf=Buf.LOG, space=Space.OUT, rows=4, row_bytes=4 * 100, addr=5)), [0] * 16),
            (Instr(Opcode.ST_KV, dict(buf=Buf.KQ, space=Space.KV, rows=4, row_bytes=64, addr=7900)), [0] * 16)]
    nxt = [(Instr(Opcode.ST_OUT, dict(buf=Buf.X, space=Space.OUT, rows=1, row_bytes=4 * 100,
                                      addr=PER_OUT * K - 400)), [0] * 16)]
    first, second = Phase(long, abort_at=at), Phase(nxt)
    got = case.run([first, second])
    assert first.dones == 0 and second.dones == 1 and first.inflight_at_abort
    kv_new, out_new = case.golden(long)
    _, out_next = case.golden(nxt)
    assert np.all((got[0] == case.kv) | (got[0] == kv_new))
    tail = slice(PER_OUT * K - 400, PER_OUT * K)
    np.testing.assert_array_equal(got[1][tail], out_next[tail])
    head = slice(0, PER_OUT * K - 400)
    assert np.all((got[1][head] == case.out[head]) | (got[1][head] == out_new[head]))


# ------------------------------------------------------------------------------ the units
class DelayEngine(wiring.Component):
    """A stand-in engine: takes an entry, pulses ``done`` ``regs[0]`` cycles later, one at a
    time; ``completed`` counts its dones."""

    def __init__(self, opcodes):
        self.opcodes = opcodes
        super().__init__({"issue": In(stream.Signature(entry_layout())), "done": Out(1), "busy": Out(1),
                          "abort": In(1), "fault": Out(1), "fault_pc": Out(PC_BITS), "completed": Out(16)})

    def elaborate(self, platform):
        m = Module()
        left, on = Signal(32), Signal()
        m.d.comb += [self.issue.ready.eq(~on & ~self.abort), self.busy.eq(on)]
        m.d.sync += self.done.eq(0)
        with m.If(self.issue.valid & self.issue.ready):
            m.d.sync += [on.eq(1), left.eq(self.issue.payload.regs[0])]
        with m.Elif(on):
            m.d.sync += left.eq(left - 1)
            with m.If(left == 0):
                m.d.sync += [on.eq(0), self.done.eq(1), self.completed.eq(self.completed + 1)]
        with m.If(self.abort):
            m.d.sync += [on.eq(0), self.done.eq(0)]
        return m


def _kt(delay):
    regs = [0] * 16
    regs[Reg.CLEN.value] = delay
    return Instr(Opcode.ST_KT, dict(rows_reg=Reg.CLEN)), regs


@pytest.mark.parametrize("unit", ["st", "ld"])
def test_unit_keeps_done_in_issue_order(unit):
    """A unit of a space engine and a stand-in with random delays: ``done`` in issue order,
    each when its instruction is complete; LD holds one engine's work at a time."""
    p = CONFIGS["k2"]
    dummy = DelayEngine((Opcode.ST_KT,) if unit == "st" else (Opcode.EMBED,))
    if unit == "st":
        case = StCase(p, 4)
        u = StUnit(p, engines=[case.eng, dummy])
        mine = mem_instrs(case.rng, p, 8, ST_BUFS)
    else:
        case = LdCase(p, 4)
        u = LdUnit(p, engines=[case.eng, dummy])
        mine = mem_instrs(case.rng, p, 8, LD_BUFS)
    rng = random.Random(9)
    instrs, kinds = [], []
    for ins in mine:
        for _ in range(rng.randint(0, 2)):
            d = _kt(rng.choice([0, 3, 40, 150]))
            instrs.append(d if unit == "st" else (Instr(Opcode.EMBED, {"rows_reg": Reg.CLEN}), d[1]))
            kinds.append(("d", sum(k == "d" for k, _ in kinds)))
        instrs.append(ins)
        kinds.append(("m", sum(k == "m" for k, _ in kinds)))
    cum = case.bursts(mine) if unit == "st" else None
    per = case.expect(mine) if unit == "ld" else None
    top = Top(u, p, case.NAMES, case.init, client=case.eng)
    ld_check = case.checker(top, per) if unit == "ld" else None

    def on_done(ctx, k):
        kind, j = kinds[k]
        if kind == "d":
            assert ctx.get(dummy.completed) > j, f"unit done {k}: the stand-in's {j} is not done"
        elif unit == "st":
            case.checker(cum)(ctx, j)
        else:
            ld_check(ctx, j)
    overlap = []

    def watch(ctx):
        if ctx.get(dummy.busy) and ctx.get(case.eng.busy):
            overlap.append(1)
    ph = Phase(instrs, on_done=on_done)
    case.run([ph], top=top, spaces=case.eng, watch=watch, limit=20000)
    assert ph.dones == len(instrs)
    if unit == "ld":
        assert not overlap, "LD ran both engines at once"
    else:
        assert overlap, "ST never overlapped its engines"


def test_unit_faults_on_an_opcode_no_engine_takes():
    p = CONFIGS["k1"]
    store = SpaceStore(p)
    case = StCase(p, 11, engine=store)
    u = StUnit(p, engines=[store])
    top = Top(u, p, case.NAMES, case.init, client=store)
    good = (_st(addr=64, rows=1, row_bytes=32), [0] * 16)
    ph = Phase([good, (Instr(Opcode.ST_KT, {}), [0] * 16), good], abort_after_fault=3)
    again = Phase([good])
    case.run([ph, again], top=top, spaces=store)
    assert ph.fault[1] == 1 and again.dones == 1


def test_constructor_errors():
    with pytest.raises(ValueError, match="power of two"):
        SpaceLoad(dataclasses.replace(CONFIGS["k1"], kv_channels=3, weight_channels=4))
    engines = [DelayEngine((Opcode.ST_KT,)), DelayEngine((Opcode.ST_KT,))]
    with pytest.raises(ValueError, match="distinct opcodes"):
        UnitMux(engines)
    for e in engines:
        e._MustUse__silence = True
