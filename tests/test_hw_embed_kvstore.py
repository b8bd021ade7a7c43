"""amaranth.sim checks of the EMBED (hw/embed.py) and ST_KT (hw/kvstore.py) engines.

Each engine runs under the unit contract (docs/kernel.md) in a test top with a small
:class:`~flightllm.hw.buffers.Buffers`, a :class:`~flightllm.hw.axi.BurstReader` (and for ST_KT
a :class:`~flightllm.hw.axi.BurstWriter`) per weight channel, and a Python AXI4 memory per
channel (:class:`ChannelMem`: random ready / valid and latencies, in-order responses, every
burst checked) holding the channel buffer of :func:`flightllm.hw.memmap.memory_map`. The
results are compared bit for bit with the golden model's own: EMBED's destination rows with
``Golden.bufs``, ST_KT's channel bytes with ``Golden.channels`` (over a KV cache filled with
random bytes first, so every byte and nibble it must keep is checked too). Instructions come
from compiled tiny models (``write_tiny_model`` + ``compile_model``) or are built from
packed random tensors of every format. Every wait has a cycle bound: a hung design fails.
"""

from __future__ import annotations

import dataclasses
import random
import zlib
from collections import deque
from pathlib import Path

import numpy as np
import pytest
from amaranth import Elaboratable, Module
from amaranth.lib import wiring
from amaranth.sim import Simulator

from flightllm.hw.axi import AXI_BURST_INCR, AXI_PAGE_BYTES, BurstReader, BurstWriter
from flightllm.hw.buffers import Buffers, buffer_map, images
from flightllm.hw.embed import EmbedEngine, embed_formats, row_fields
from flightllm.hw.formats import QTensor, WeightFormat, pack_tensor, record_bits
from flightllm.hw.isa import Buf, Instr, Opcode, Reg, encode, reg_values
from flightllm.hw.kvstore import KvStoreEngine
from flightllm.hw.memmap import memory_map
from flightllm.hw.params import get_preset
from flightllm.runtime.golden import Golden, GoldenError

END = Instr(Opcode.END)

#: geometries the presets do not have: a K chunk narrower than a buffer word (sfu_lanes 16 >
#: chain_len 8), and V steps of fewer lanes than channels (sfu_lanes 4 < 8 channels, one chain each)
GEO = {"geoA": dataclasses.replace(get_preset("sim"), name="geoA", sfu_lanes=16),
       "geoB": dataclasses.replace(get_preset("sim"), name="geoB", chains=8, weight_channels=8, sfu_lanes=4)}


def hw_params(name):
    return GEO[name] if name in GEO else get_preset(name)


# ------------------------------------------------------------------------------ memory model

class ChannelMem:
    """One channel buffer (``mem``) behind a BurstReader's ``axi`` and/or a BurstWriter's ``axi``
    (AXI4 subordinate): random ``arready`` / ``awready`` / ``wready``, R and B valid with
    probability ``p_valid`` after 1 .. ``1 + max_lat`` cycles, in order. Checks every burst
    (INCR, full-width, aligned, inside 4 KiB and the buffer), W after its AW, ``wlast``."""

    def __init__(self, mem: bytearray, bb: int, rng, rd=None, wr=None, p_ready=0.6, p_valid=0.7, max_lat=8):
        self.mem, self.bb, self.rng, self.rd, self.wr = mem, bb, rng, rd, wr
        self.p_ready, self.p_valid, self.max_lat = p_ready, p_valid, max_lat
        self.t = 0
        self.rq, self.r_on = deque(), False
        self.aws, self.aw_seen, self.w_cur, self.w_bursts, self.applied = [], 0, [], [], 0
        self.bq, self.b_on = deque(), False
        self.reads = self.writes = 0

    def _check(self, addr, ln, size, burst):
        bb = self.bb
        assert size == bb.bit_length() - 1 and burst == AXI_BURST_INCR
        assert addr % bb == 0, f"unaligned burst {addr:#x}"
        assert addr % AXI_PAGE_BYTES + (ln + 1) * bb <= AXI_PAGE_BYTES, f"burst {addr:#x}+{ln + 1} crosses 4 KiB"
        assert addr + (ln + 1) * bb <= len(self.mem), f"burst {addr:#x}+{ln + 1} beyond the buffer ({len(self.mem)})"

    def drive(self, ctx):
        rng = self.rng
        if self.rd is not None:
            a = self.rd
            ctx.set(a.arready, rng.random() < self.p_ready)
            if not self.r_on and self.rq and self.rq[0][3] <= self.t and rng.random() < self.p_valid:
                self.r_on = True
            if self.r_on:
                addr, ln, k, _ = self.rq[0]
                base = addr + k * self.bb
                ctx.set(a.rdata, int.from_bytes(self.mem[base:base + self.bb], "little"))
                ctx.set(a.rlast, k == ln)
                ctx.set(a.rresp, 0)
            ctx.set(a.rvalid, self.r_on)
        if self.wr is not None:
            a = self.wr
            ctx.set(a.awready, rng.random() < self.p_ready)
            ctx.set(a.wready, rng.random() < self.p_ready)
            if not self.b_on and self.bq and self.bq[0] <= self.t and rng.random() < self.p_valid:
                self.b_on = True
            ctx.set(a.bresp, 0)
            ctx.set(a.bvalid, self.b_on)

    def sample(self, ctx):
        g = ctx.get
        if self.rd is not None:
            a = self.rd
            if g(a.arvalid) and g(a.arready):
                rec = (g(a.araddr), g(a.arlen), g(a.arsize), g(a.arburst))
                self._check(*rec)
                self.rq.append([rec[0], rec[1], 0, self.t + 1 + self.rng.randint(0, self.max_lat)])
                self.reads += 1
            if self.r_on and g(a.rready):
                self.r_on = False
                self.rq[0][2] += 1
                if self.rq[0][2] > self.rq[0][1]:
                    self.rq.popleft()
        if self.wr is not None:
            a = self.wr
            if g(a.awvalid):
                self.aw_seen = max(self.aw_seen, len(self.aws) + 1)
            if g(a.awvalid) and g(a.awready):
                rec = (g(a.awaddr), g(a.awlen), g(a.awsize), g(a.awburst))
                self._check(*rec)
                self.aws.append((rec[0], rec[1] + 1))
            if g(a.wvalid) and not self.w_cur:
                assert self.aw_seen >= len(self.w_bursts) + 1, "W before its AW"
            if g(a.wvalid) and g(a.wready):
                self.w_cur.append((g(a.wdata), g(a.wstrb), g(a.wlast)))
                if self.w_cur[-1][2]:
                    self.w_bursts.append(self.w_cur)
                    self.w_cur = []
            while self.applied < min(len(self.aws), len(self.w_bursts)):
                (addr, n), beats = self.aws[self.applied], self.w_bursts[self.applied]
                assert len(beats) == n, "wlast misplaced"
                for k, (d, s, _) in enumerate(beats):
                    for i in range(self.bb):
                        if s >> i & 1:
                            self.mem[addr + k * self.bb + i] = d >> (8 * i) & 0xFF
                self.bq.append(self.t + 1 + self.rng.randint(0, self.max_lat))
                self.applied += 1
                self.writes += 1
            if self.b_on and g(a.bready):
                self.b_on = False
                self.bq.popleft()
        self.t += 1

    def quiet(self):
        return not self.rq and not self.r_on and not self.bq and not self.b_on and not self.w_cur \
            and self.applied == len(self.aws) == len(self.w_bursts)


# ------------------------------------------------------------------------------ test top

class Top(Elaboratable):
    """An engine with a BurstReader (and BurstWriter, if it writes HBM) per channel and Buffers."""

    def __init__(self, params, engine, regions, init=None):
        self.p, self.eng = params, engine
        C, W = params.weight_channels, params.hbm_port_bits
        self.bufs = Buffers(params, clients=("eng",), only=regions, init=init)
        self.readers = [BurstReader(W, 64, max_burst=16, fifo_depth=32) for _ in range(C)]
        self.writers = [BurstWriter(W, 64, max_burst=16, outstanding=4) for _ in range(C)] \
            if hasattr(engine, "wr") else []

    def elaborate(self, platform):
        m = Module()
        m.submodules.eng, m.submodules.bufs = self.eng, self.bufs
        wiring.connect(m, self.eng.buf, self.bufs.port("eng"))
        for c, r in enumerate(self.readers):
            m.submodules[f"rd{c}"] = r
            wiring.connect(m, self.eng.rd[c].cmd, r.cmd)
            wiring.connect(m, r.data, self.eng.rd[c].data)
        for c, w in enumerate(self.writers):
            m.submodules[f"wr{c}"] = w
            wiring.connect(m, self.eng.wr[c].cmd, w.cmd)
            wiring.connect(m, self.eng.wr[c].data, w.data)
            m.d.comb += self.eng.wr[c].done.eq(w.done)
        return m


class Bench:
    """Drives a :class:`Top`: the memories, the issue stream and abort; counts done / fault."""

    def __init__(self, ctx, top, mems, seed, **mem_kw):
        self.ctx, self.top = ctx, top
        rng = random.Random(seed)
        bb = top.p.hbm_port_bits // 8
        self.mems = [ChannelMem(mems[c], bb, rng, top.readers[c].axi,
                                top.writers[c].axi if top.writers else None, **mem_kw)
                     for c in range(top.p.weight_channels)]
        self.entries = deque()
        self.dones = self.faults = 0
        self.fault_pc = None
        self.abort = False
        self.t = 0

    async def cycle(self):
        ctx, eng = self.ctx, self.top.eng
        for mm in self.mems:
            mm.drive(ctx)
        ctx.set(eng.abort, self.abort)
        if self.entries:
            word, pc, regs = self.entries[0]
            ctx.set(eng.issue.valid, 1)
            ctx.set(eng.issue.payload.word, word)
            ctx.set(eng.issue.payload.pc, pc)
            for k, v in enumerate(regs):
                ctx.set(eng.issue.payload.regs[k], v)
        else:
            ctx.set(eng.issue.valid, 0)
        for mm in self.mems:
            mm.sample(ctx)
        if self.entries and ctx.get(eng.issue.ready):
            self.entries.popleft()
        self.dones += ctx.get(eng.done)
        if ctx.get(eng.fault):
            self.faults += 1
            self.fault_pc = ctx.get(eng.fault_pc)
        await ctx.tick()
        self.t += 1

    def issue(self, ins, regs, pc=7):
        self.entries.append((encode(ins), pc, reg_values(ins, regs)))

    async def until(self, cond, limit, what):
        for _ in range(limit):
            if cond():
                return
            await self.cycle()
        raise AssertionError(f"hung: {what} not reached in {limit} cycles (t={self.t})")

    async def run(self, ins, regs, limit=20000, pc=7):
        """Issue ``ins`` and wait for its done (or a fault); then for the memories to be quiet."""
        d0 = self.dones
        self.issue(ins, regs, pc)
        await self.until(lambda: self.dones > d0 or self.faults, limit, f"{ins.op.name} done")
        await self.until(lambda: all(mm.quiet() for mm in self.mems), 2000, "AXI quiet")
        return "fault" if self.faults else "done"

    async def recover(self, limit=3000):
        """Abort after a fault (as control does): the fault clears and busy falls."""
        assert self.ctx.get(self.top.eng.fault)
        self.abort = True
        await self.cycle()
        await self.until(lambda: not self.ctx.get(self.top.eng.busy), limit, "busy low after abort")
        for _ in range(4):
            await self.cycle()
            assert not self.ctx.get(self.top.eng.busy) and not self.ctx.get(self.top.eng.fault)
        self.abort = False
        self.faults = 0
        await self.until(lambda: all(mm.quiet() for mm in self.mems), 2000, "AXI quiet after abort")


def simulate(top, bench_fn):
    sim = Simulator(top)
    sim.add_clock(1e-8)
    sim.add_testbench(bench_fn)
    sim.run()


def regs16(**kw):
    r = [0] * 16
    for k, v in kw.items():
        r[Reg[k].value] = v
    return r


def buffer_rows(ctx, top, region, rows, n):
    """The float32 bits of ``rows`` x ``n`` elements of ``region`` in the simulated Buffers."""
    reg = buffer_map(top.p)[region]
    L = top.p.sfu_lanes
    mem = top.bufs.mems[region]
    out = np.zeros((rows, n), np.uint32)
    for r in range(rows):
        for w in range(-(-n // L)):
            lanes = list(ctx.get(mem.data[r * reg.row_words + w]))
            for lane, v in enumerate(lanes):
                e = w * L + lane
                if e < n:
                    out[r, e] = v
    return out


# ------------------------------------------------------------------------------ artifacts

_ARTS = {}


@pytest.fixture(scope="module")
def art_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("arts")


def artifact(art_dir: Path, hw: str, kv: str = "int8", preset: str = "native", **model):
    """A tiny model compiled for ``hw`` (cached per module)."""
    from flightllm.compiler.artifact import Artifact
    from flightllm.compiler.compile import compile_model
    from flightllm.compiler.tiny import write_tiny_model

    key = (hw, kv, preset, tuple(sorted(model.items())))
    if key not in _ARTS:
        tag = f"{len(_ARTS)}"
        gguf = art_dir / f"tiny{tag}.gguf"
        write_tiny_model(gguf, **model)
        out = art_dir / f"art{tag}"
        compile_model(gguf, out, preset, hw_params(hw), progress=False, kv=kv)
        _ARTS[key] = Artifact(out)
    return _ARTS[key]


def golden_of(art):
    p = art.params
    chans = [art.read(f"weights/ch{c:02d}.bin") for c in range(p.weight_channels)]
    tables = np.frombuffer(art.read("tables.bin"), "<f4")
    return Golden(p, chans, tables, art.manifest["programs"]["plan"], art.manifest["tensors"])


def program(art, name="decode"):
    from flightllm.runtime.device import artifact_programs
    return artifact_programs(art)[name]


def channel_buffers(p, plan, chans):
    """The memory map and a bytearray per channel buffer with the weight images at 0."""
    mm = memory_map(p, plan, max(len(c) for c in chans))
    bufs = []
    for c in range(p.weight_channels):
        b = bytearray(mm.channel_size(c))
        b[:len(chans[c])] = bytes(chans[c])
        bufs.append(b)
    return mm, bufs


def put_tokens(mm, bufs, pos, ids):
    for k, t in enumerate(ids):
        for j, byte in enumerate(int(t & 0xFFFFFFFF).to_bytes(4, "little")):
            c, off = mm.locate("TOK", 4 * (pos + k) + j)
            bufs[c][off] = byte


# ------------------------------------------------------------------------------ EMBED

def embed_case(p, ins, chans, plan, tensors, pos, ids, seed, abort_at=None):
    """Run EMBED ``ins`` (rows_reg LEN, pos_reg POS) on the RTL and the golden model and compare."""
    rows = len(ids)
    g = Golden(p, chans, None, plan, tensors)
    g.write_tokens(pos, ids)
    g.run([ins, END], {"POS": pos, "LEN": rows})
    want = g.bufs[Buf(ins.f.get("dst", Buf.X)).value]
    mm, bufs = channel_buffers(p, plan, chans)
    put_tokens(mm, bufs, pos, ids)
    dst = Buf(ins.f.get("dst", Buf.X)).name
    top = Top(p, EmbedEngine(p), [dst])
    out = {}

    async def bench(ctx):
        ctx.set(top.eng.tok_space, mm.tok_space)
        ctx.set(top.eng.max_seq, plan["max_seq"])
        b = Bench(ctx, top, bufs, seed)
        if abort_at is not None:
            # start, abort part-way, then the instruction again from the top
            b.issue(ins, regs16(POS=pos, LEN=rows))
            for _ in range(abort_at):
                await b.cycle()
            assert ctx.get(top.eng.busy)
            b.abort = True
            await b.cycle()
            await b.until(lambda: not ctx.get(top.eng.busy), 3000, "busy low after abort")
            b.abort = False
            await b.until(lambda: all(mm_.quiet() for mm_ in b.mems), 2000, "AXI quiet after abort")
            assert b.dones == 0
        assert await b.run(ins, regs16(POS=pos, LEN=rows)) == "done"
        out["rows"] = buffer_rows(ctx, top, dst, rows, want.shape[1])
        out["cycles"] = b.t

    simulate(top, bench)
    np.testing.assert_array_equal(out["rows"], want.view(np.uint32))
    return out


@pytest.mark.parametrize("hw", ["sim", "u280-2ch"])
def test_embed_tiny_model_decode_instruction(art_dir, hw):
    """The decode program's EMBED of a compiled tiny model (native: Q8_0 -> int8/32), several
    rows, the first and last token ids, bit-exact with the golden model."""
    art = artifact(art_dir, hw)
    p = art.params
    ins = next(i for i in program(art) if i.op == Opcode.EMBED)
    assert embed_formats(p)[0] == WeightFormat.parse(art.manifest["tensors"]["token_embd.weight"]["format"])
    ins = ins.with_(rows_reg=Reg.LEN, pos_reg=Reg.POS, wait=0, signal=0)
    n = ins.f["n_out"]
    chans = [art.read(f"weights/ch{c:02d}.bin") for c in range(p.weight_channels)]
    plan = art.manifest["programs"]["plan"]
    rng = np.random.default_rng(1)
    ids = [n - 1, 0, *rng.integers(0, n, 3), n - 2]
    embed_case(p, ins, chans, plan, art.manifest["tensors"], pos=13, ids=ids, seed=2)


def _random_qtensor(fmt, n, k, rng):
    g = fmt.group_size
    shape_s = (n, k // g)
    if fmt.two_level:
        q = rng.integers(0, 16, (n, k))
        return QTensor(fmt, q, rng.integers(0, 256, shape_s), rng.integers(0, 256, shape_s),
                       tensor_scale=np.float16(0.0123), tensor_min=np.float16(-0.0071))
    scale = (rng.uniform(0.5, 2.0, shape_s) * 2.0 ** rng.integers(-12, -6, shape_s)).astype(np.float16)
    scale[0, 0] = 0                                            # a zero scale
    if fmt.has_min:
        q = rng.integers(0, 16, (n, k))
        mn = (-rng.uniform(0.5, 2.0, shape_s) * 2.0 ** rng.integers(-10, -6, shape_s)).astype(np.float16)
        return QTensor(fmt, q, scale, mn)
    lo, hi = fmt.qmin, fmt.qmax
    q = rng.integers(lo, hi + 1, (n, k))
    q[1, :4] = lo
    return QTensor(fmt, q, -scale if rng.random() < 0.5 else scale)


def packed_case(p, fmt_name, n, k, seed, w_off=128):
    """Channel images holding a packed random tensor at ``w_off``; its EMBED instruction."""
    rng = np.random.default_rng(seed)
    fmt = WeightFormat.parse(fmt_name)
    qt = _random_qtensor(fmt, n, k, rng)
    pt = pack_tensor(qt, p)
    chans = [bytes(w_off) + pt.channel_image(c) for c in range(p.weight_channels)]
    ins = Instr(Opcode.EMBED, dict(dst=Buf.X, rows_reg=Reg.LEN, pos_reg=Reg.POS, bits=fmt.bits,
                                   n_keep=fmt.n_keep, m=fmt.m, group_log2=fmt.group_size.bit_length() - 1,
                                   kind=fmt.kind, shift=pt.shift, n_out=n, k_in=k, w_off=w_off))
    plan = {"max_seq": 64, "kv_bytes": 0, "out_row_bytes": 4}
    return ins, chans, plan


@pytest.mark.parametrize("hw, fmt, n, k", [
    ("sim", "int8/32", 37, 96),
    ("sim", "int4/32", 19, 64),
    ("sim", "int4m/32", 22, 64),
    ("sim", "int4k/32", 21, 96),
    ("sim-mc", "int8/32", 29, 64),
    ("sim-mc", "int4m/32", 17, 64),
    ("u280-2ch", "int4/32", 23, 64),
    ("u280-2ch", "int4k/32", 18, 64),
    ("geoA", "int4/32", 21, 64),
    ("geoB", "int4k/32", 19, 64),
    ("geoB", "int8/32", 20, 64),
])
def test_embed_every_format(hw, fmt, n, k):
    """Random packed tensors of every format EMBED gathers (n_out not a multiple of the
    chains; a zero scale, negative scales and mins, -2**(b-1) values), rows across channels,
    chains and tiles, the last id."""
    p = hw_params(hw)
    assert WeightFormat.parse(fmt) in embed_formats(p)
    ins, chans, plan = packed_case(p, fmt, n, k, seed=zlib.crc32(f"{hw}{fmt}".encode()))
    rng = np.random.default_rng(5)
    ids = [n - 1, 1, *rng.integers(0, n, 2)]
    embed_case(p, ins, chans, plan, None, pos=int(rng.integers(0, 40)), ids=[int(i) for i in ids], seed=3)


def test_row_fields_match_the_packer():
    """row_fields (what the RTL computes) finds each value, scale and min where pack_tensor put it."""
    for hw in ("sim", "sim-mc", "u280-2ch", "geoB"):
        p = hw_params(hw)
        for fmt in embed_formats(p):
            n, k = 2 * p.chains + 3, 2 * fmt.group_size
            qt = _random_qtensor(fmt, n, k, np.random.default_rng(0))
            pt = pack_tensor(qt, p)
            for r in (0, 1, p.chains - 1, p.chains + 2, n - 1):
                rf = row_fields(fmt, p, r, k)
                raw = np.frombuffer(pt.data[rf["channel"]], np.uint8)
                bits = np.unpackbits(raw, bitorder="little")
                assert rf["row_bytes"] * 8 == (k // fmt.group_size) * record_bits(fmt, p.chains // p.weight_channels,
                                                                                    p.chain_len)
                for grp in range(k // fmt.group_size):
                    r0 = rf["start"] * 8 + grp * rf["record_bits"]
                    got = []
                    for vb in rf["values"]:
                        for lane in range(p.chain_len):
                            o = r0 + vb + lane * fmt.bits
                            v = int(sum(int(bits[o + j]) << j for j in range(fmt.bits)))
                            if not fmt.has_min and v >= 1 << (fmt.bits - 1):
                                v -= 1 << fmt.bits
                            got.append(v)
                    want = qt.q[r, grp * fmt.group_size:(grp + 1) * fmt.group_size]
                    assert got == list(want), (hw, fmt.name, r, grp)
                    fb = fmt.scale_field_bits
                    sc = int(sum(int(bits[r0 + rf["scale"] + j]) << j for j in range(fb)))
                    ref = qt.scale[r, grp]
                    assert sc == (int(ref) if fmt.two_level else int(np.float16(ref).view(np.uint16)))


@pytest.mark.parametrize("case", ["format_sparse", "format_raw", "format_not_built", "token_id", "negative_id",
                                  "positions", "positions_default", "rows", "dst_int8", "k_zero", "k_group",
                                  "w_off"])
def test_embed_faults(case):
    """Instructions the engine cannot execute fault with their pc (the golden model raises for
    the same ones, where it can know), nothing is written, and after abort the engine runs
    the next instruction."""
    p = get_preset("sim")
    ins, chans, plan = packed_case(p, "int8/32", 20, 64, seed=11)
    pos, ids = 3, [1, 2, 3]
    n = 20
    mod = {"format_sparse": dict(bits=4, n_keep=2, m=4, group_log2=6), "format_raw": dict(kind=3),
           "format_not_built": dict(bits=6), "dst_int8": dict(dst=Buf.KQ), "k_zero": dict(k_in=0),
           "k_group": dict(k_in=48), "w_off": dict(w_off=130)}.get(case, {})
    bad = ins.with_(**mod)
    if case == "token_id":
        ids = [1, n, 2]
    if case == "negative_id":
        ids = [1, -1, 2]
    if case == "positions":
        pos = plan["max_seq"] - 2
    if case == "positions_default":                      # max_seq port 0: HwParams.max_seq_len
        pos = p.max_seq_len - 2
    if case == "rows":
        ids = [1] * (p.mm_tokens + 1)
    if case in ("token_id", "negative_id", "format_sparse", "format_raw", "format_not_built", "k_zero", "k_group",
                "positions"):
        g = Golden(p, chans, None, plan, None)             # the golden model rejects these too
        if case != "positions":
            g.write_tokens(pos, ids)
        with pytest.raises((GoldenError, ValueError)):
            g.run([bad, END], {"POS": pos, "LEN": len(ids)})
    mm, bufs = channel_buffers(p, plan, chans)
    if not case.startswith("positions"):
        put_tokens(mm, bufs, pos, ids)
    good_ids = [19, 0]
    put_tokens(mm, bufs, 40, good_ids)
    top = Top(p, EmbedEngine(p), ["X"])
    out = {}

    async def bench(ctx):
        ctx.set(top.eng.tok_space, mm.tok_space)
        ctx.set(top.eng.max_seq, 0 if case == "positions_default" else plan["max_seq"])
        b = Bench(ctx, top, bufs, 9)
        assert await b.run(bad, regs16(POS=pos, LEN=len(ids)), pc=1234) == "fault"
        assert b.fault_pc == 1234 and b.dones == 0
        assert all(not any(w) for w in buffer_rows(ctx, top, "X", 2, 64))   # nothing written
        await b.recover()
        assert await b.run(ins, regs16(POS=40, LEN=2)) == "done"
        out["rows"] = buffer_rows(ctx, top, "X", 2, 64)

    simulate(top, bench)
    g = Golden(p, chans, None, plan, None)
    g.write_tokens(40, good_ids)
    g.run([ins, END], {"POS": 40, "LEN": 2})
    np.testing.assert_array_equal(out["rows"], g.bufs[Buf.X.value].view(np.uint32))


@pytest.mark.parametrize("abort_at", [3, 40, 120])
def test_embed_abort_midway(abort_at):
    """Abort while the token reads, the row reads or the output are in flight: every AXI
    transaction completes, busy falls, no done; the instruction then runs again correctly."""
    p = get_preset("sim")
    ins, chans, plan = packed_case(p, "int4m/32", 30, 96, seed=4)
    embed_case(p, ins, chans, plan, None, pos=5, ids=[29, 3, 17, 0, 8, 12], seed=abort_at, abort_at=abort_at)


def test_embed_zero_rows():
    """rows = R[rows_reg] = 0: done without a read or a write (the golden model does nothing)."""
    p = get_preset("sim")
    ins, chans, plan = packed_case(p, "int8/32", 20, 64, seed=1)
    mm, bufs = channel_buffers(p, plan, chans)
    top = Top(p, EmbedEngine(p), ["X"])

    async def bench(ctx):
        ctx.set(top.eng.tok_space, mm.tok_space)
        b = Bench(ctx, top, bufs, 1)
        assert await b.run(ins, regs16(POS=4, LEN=0)) == "done"
        assert all(mm_.reads == 0 for mm_ in b.mems)

    simulate(top, bench)


# ------------------------------------------------------------------------------ ST_KT

TINY2 = dict(hidden=128, heads=4, kv_heads=2)          # two kv heads of 32
TINY64 = dict(hidden=128, heads=2, kv_heads=2)         # two kv heads of 64


def st_kt_of(art, kind, layer=0):
    """The decode program's ST_KT of ``kind`` for ``layer``, reading rows / positions from LEN / POS."""
    sts = [i for i in program(art) if i.op == Opcode.ST_KT and i.f.get("kind", 0) == kind]
    return sts[layer].with_(rows_reg=Reg.LEN, pos_reg=Reg.POS, wait=0, signal=0)


def kt_setup(art, ins, rows, seed, values=None):
    """Golden model and channel buffers with the same random KV cache bytes, and the source rows."""
    p = art.params
    plan = art.manifest["programs"]["plan"]
    rng = np.random.default_rng(seed)
    src = Buf(ins.f["src"])
    width = buffer_map(p)[src.name].width
    bits = ins.f["bits"]
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    q = rng.integers(lo, hi + 1, (rows, width)).astype(np.int8) if values is None else values
    s = np.ones((rows, width // 32), np.float32)
    g = golden_of(art)
    kvb, kvn = plan["kv_base"], plan["kv_channel_bytes"]
    chans = [art.read(f"weights/ch{c:02d}.bin") for c in range(p.weight_channels)]
    mm, bufs = channel_buffers(p, plan, chans)
    for c in range(p.weight_channels):
        noise = rng.integers(0, 256, kvn, dtype=np.uint8)
        g.channels[c][kvb:kvb + kvn] = noise
        bufs[c][kvb:kvb + kvn] = noise.tobytes()
    g.bufs[src.value] = (q, s, None)
    init = {src.name: images(p, src, (q, s, None))[src.name]}
    return g, mm, bufs, init, src


def kt_compare(g, bufs):
    for c, want in enumerate(g.channels):
        got = np.frombuffer(bytes(bufs[c][:want.size]), np.uint8)
        bad = np.nonzero(got != want)[0]
        assert bad.size == 0, f"channel {c}: {bad.size} bytes differ, first at {bad[:8]}"


def kt_case(art, kind, pos, rows, seed, layer=0, abort_at=None):
    p = art.params
    ins = st_kt_of(art, kind, layer)
    g, mm, bufs, init, src = kt_setup(art, ins, rows, seed)
    before = [bytes(b) for b in bufs]
    g.run([ins, END], {"POS": pos, "LEN": rows})
    top = Top(p, KvStoreEngine(p), [src.name], init=init)
    out = {}

    async def bench(ctx):
        b = Bench(ctx, top, bufs, seed)
        if abort_at is not None:
            b.issue(ins, regs16(POS=pos, LEN=rows))
            for _ in range(abort_at):
                await b.cycle()
            assert ctx.get(top.eng.busy)
            b.abort = True
            await b.cycle()
            await b.until(lambda: not ctx.get(top.eng.busy), 3000, "busy low after abort")
            b.abort = False
            await b.until(lambda: all(mm_.quiet() for mm_ in b.mems), 2000, "AXI quiet after abort")
            assert b.dones == 0
        assert await b.run(ins, regs16(POS=pos, LEN=rows)) == "done"
        out["cycles"] = b.t
        out["reads"] = sum(mm_.reads for mm_ in b.mems)
        out["writes"] = sum(mm_.writes for mm_ in b.mems)

    simulate(top, bench)
    kt_compare(g, bufs)
    assert any(bytes(bufs[c]) != before[c] for c in range(p.weight_channels)) or rows == 0
    return out


@pytest.mark.parametrize("hw, kv, model, kind, pos, rows", [
    ("sim", "int8", TINY2, 0, 5, 3),          # K, two heads, rows across channels and chains
    ("sim", "int8", TINY2, 1, 30, 4),         # V, positions across a group of 32
    ("sim", "int4", TINY2, 1, 7, 1),          # decode, odd position: read-modify-write
    ("sim", "int4", TINY2, 1, 8, 1),          # decode, even position: read-modify-write
    ("sim", "int4", TINY2, 1, 3, 6),          # both ends partial
    ("sim", "int4", TINY2, 0, 61, 4),         # K INT4: whole bytes
    ("sim", "k8v4", TINY64, 0, 12, 3),        # head_dim 64: two groups per K row
    ("sim", "k8v4", TINY64, 1, 31, 2),        # V across a group boundary
    ("sim-mc", "int4", TINY2, 1, 9, 3),       # chain_len 16 > sfu_lanes 8
    ("sim-mc", "int8", TINY64, 0, 2, 2),
    ("u280-2ch", "int4", TINY2, 1, 7, 5),     # 512-bit beats, chain_len 32
    ("u280-2ch", "int8", TINY64, 0, 100, 2),
    ("geoA", "k8v4", TINY64, 0, 5, 3),
    ("geoA", "k8v4", TINY64, 1, 7, 4),
    ("geoB", "k8v4", TINY64, 0, 5, 3),
    ("geoB", "k8v4", TINY64, 1, 8, 1),
])
def test_st_kt_tiny_model(art_dir, hw, kv, model, kind, pos, rows):
    """The decode program's ST_KT (K and V, INT8 and INT4 caches) of compiled tiny models:
    every channel byte equals the golden model's after the store, over random cache bytes."""
    art = artifact(art_dir, hw, kv, **model)
    out = kt_case(art, kind, pos, rows, seed=zlib.crc32(f"{hw}{kv}{kind}{pos}".encode()), layer=1)
    bits = st_kt_of(art, kind).f["bits"]
    if bits == 8 or kind == 0:
        assert out["reads"] == 0                  # no read-modify-write
    else:
        assert out["reads"] > 0


def test_st_kt_int4_decode_sequence(art_dir):
    """INT4 V over consecutive decode steps (one position each, odd and even): each keeps
    the nibble the previous one wrote."""
    art = artifact(art_dir, "sim", "int4", **TINY2)
    p = art.params
    ins = st_kt_of(art, 1)
    g, mm, bufs, init, src = kt_setup(art, ins, 1, seed=3)
    rng = np.random.default_rng(4)
    steps = []
    for pos in (4, 5, 6, 7):
        q = rng.integers(-8, 8, (1, buffer_map(p)[src.name].width)).astype(np.int8)
        steps.append((pos, q))
    top = Top(p, KvStoreEngine(p), [src.name], init=init)

    async def bench(ctx):
        b = Bench(ctx, top, bufs, 5)
        mem = top.bufs.mems[src.name]
        L = p.sfu_lanes
        for pos, q in steps:
            for w in range(-(-q.shape[1] // L)):
                ctx.set(mem.data[w], [int(v) & 0xFF for v in q[0, w * L:(w + 1) * L]])
            assert await b.run(ins, regs16(POS=pos, LEN=1)) == "done"

    simulate(top, bench)
    for pos, q in steps:
        g.bufs[src.value] = (q, np.ones((1, q.shape[1] // 32), np.float32), None)
        g.run([ins, END], {"POS": pos, "LEN": 1})
    kt_compare(g, bufs)


@pytest.mark.parametrize("case", ["positions", "bits", "head_dim", "cap", "kv_heads", "src_float", "rows",
                                  "width", "int4_value"])
def test_st_kt_faults(art_dir, case):
    """Fields the engine cannot execute fault with their pc (the golden model raises for the
    same ones, where it can know); after abort the engine stores the next instruction right."""
    art = artifact(art_dir, "sim", "int4", **TINY2)
    p = art.params
    ins = st_kt_of(art, 1)
    pos, rows = 5, 2
    mod = {"bits": dict(bits=2), "head_dim": dict(head_dim=48), "cap": dict(cap=100), "kv_heads": dict(kv_heads=0),
           "src_float": dict(src=Buf.X), "width": dict(kv_heads=200)}.get(case, {})
    bad = ins.with_(**mod)
    if case == "positions":
        pos = ins.f["cap"] - 1
    if case == "rows":
        rows = p.mm_tokens + 1
    g, mm, bufs, init, src = kt_setup(art, ins, 2, seed=8)
    values = None
    if case == "int4_value":
        values = g.bufs[src.value][0].copy()
        values[1, 40] = 8
        g.bufs[src.value] = (values, g.bufs[src.value][1], None)
        init = {src.name: images(p, src, g.bufs[src.value])[src.name]}
    if case in ("positions", "bits", "head_dim", "cap", "kv_heads", "int4_value"):
        g2 = golden_of(art)
        g2.bufs[src.value] = g.bufs[src.value]
        with pytest.raises((GoldenError, ValueError)):
            g2.run([bad, END], {"POS": pos, "LEN": rows})
    top = Top(p, KvStoreEngine(p), [src.name], init=init)

    async def bench(ctx):
        b = Bench(ctx, top, bufs, 6)
        assert await b.run(bad, regs16(POS=pos, LEN=rows), pc=99) == "fault"
        assert b.fault_pc == 99 and b.dones == 0
        await b.recover()
        if case == "int4_value":                 # the good instruction stores the first row only
            return
        assert await b.run(ins, regs16(POS=9, LEN=2)) == "done"

    simulate(top, bench)
    if case != "int4_value":
        g.run([ins, END], {"POS": 9, "LEN": 2})
        kt_compare(g, bufs)


@pytest.mark.parametrize("kind, abort_at", [(1, 6), (1, 60), (0, 30)])
def test_st_kt_abort_midway(art_dir, kind, abort_at):
    """Abort while reads, read-backs and writes are in flight: every AXI transaction
    completes (a write command's data beat is sent), busy falls, no done; the instruction
    then runs again and the cache equals the golden model's."""
    art = artifact(art_dir, "sim", "int4", **TINY2)
    kt_case(art, kind, pos=3, rows=7, seed=abort_at, abort_at=abort_at)


def test_embed_tokens_interleaved_over_channels():
    """kv_channels = 2: the token buffer's 64-byte granules alternate between the channels;
    rows whose positions cross a granule and a beat boundary."""
    import dataclasses

    p = dataclasses.replace(get_preset("sim"), name="sim-kv2", kv_channels=2)
    ins, chans, plan = packed_case(p, "int8/32", 26, 64, seed=6)
    embed_case(p, ins, chans, plan, None, pos=13, ids=[25, 0, 7, 19, 3, 11, 24], seed=7)


def test_wrong_opcode_faults():
    """An entry of another opcode of the unit (LD_KV, ST_KV) given to these engines faults."""
    p = get_preset("sim")
    for eng, op in ((EmbedEngine(p), Opcode.LD_KV), (KvStoreEngine(p), Opcode.ST_KV)):
        ins = Instr(op, dict(buf=Buf.KS, rows=1, row_bytes=4))
        mm, bufs = channel_buffers(p, {"max_seq": 64, "kv_bytes": 0, "out_row_bytes": 4}, [bytes(64)] * 2)
        top = Top(p, eng, ["X"])

        async def bench(ctx):
            b = Bench(ctx, top, bufs, 1)
            assert await b.run(ins, regs16(), pc=5) == "fault" and b.fault_pc == 5
            await b.recover()

        simulate(top, bench)
