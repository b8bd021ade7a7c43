"""amaranth.sim checks of the AXI4 manager side (hw/axi.py): burst split, credits, muxes.

A small Python AXI4 subordinate (:class:`Mem`) answers the design under test with random
ready and valid delays and random latencies, in order (no IDs). It checks every burst
it takes (4 KiB rule, ``max_burst``, size, INCR), that W never runs ahead of its AW, that
``wlast`` closes each burst at its length, that its own valids are held until taken,
and writes with ``wstrb``. Client models drive the command and data streams with random
stalls (a valid once raised is held until taken) and compare every word. A probe flips
every ready and valid the design takes from outside within a cycle and checks that no
ready the design drives moves (registered readys). Every simulation has a cycle bound:
a hung design fails with the models' states, it does not hang.
"""

from __future__ import annotations

import random
import re
from collections import deque

import pytest
from amaranth import Elaboratable, Module, Shape
from amaranth.lib import wiring
from amaranth.lib.wiring import In
from amaranth.sim import Simulator

from flightllm.hw.axi import (AXI_BURST_INCR, AXI_MAX_BURST, AXI_PAGE_BYTES, BurstReader, BurstWriter, ReadMux,
                              SkidBuffer, WriteMux, axi4_signature, axi4_top_members, burst_beats,
                              command_layout, connect_axi4_top, split_bursts, write_data_layout)

MEM_BYTES = 1 << 16


# ------------------------------------------------------------------------------ the split rule

def test_split_examples():
    # 256-bit words: 32 bytes, 128 beats per 4 KiB page
    assert split_bursts(0, 200, 256, 64) == [(0, 64), (2048, 64), (4096, 64), (6144, 8)]
    assert split_bursts(4096 - 3 * 32, 10, 256, 64) == [(4000, 3), (4096, 7)]          # crosses one page
    assert split_bursts(4096 - 32, 1, 256, 64) == [(4064, 1)]                            # one beat
    assert split_bursts(0x12345 & ~31, 1, 256, 256) == [(0x12340, 1)]
    assert split_bursts(100, 2, 256, 64) == [(96, 2)]                                   # below a beat: ignored
    # 512-bit words: 64 beats per page, so max_burst 256 is cut at every page
    assert split_bursts(64 * 10, 200, 512, 256) == [(640, 54), (4096, 64), (8192, 64), (12288, 18)]
    assert split_bursts(0, 0, 512, 64) == []
    # max_burst not a power of two, several pages
    b = split_bursts(4096 * 3 - 64 * 5, 1000, 512, 48)
    assert b[0] == (4096 * 3 - 64 * 5, 5) and b[1] == (4096 * 3, 48) and b[2] == (4096 * 3 + 48 * 64, 16)
    assert sum(n for _, n in b) == 1000


@pytest.mark.parametrize("data_bits", [64, 256, 512, 1024])
def test_split_properties(data_bits):
    rng = random.Random(data_bits)
    bb = data_bits // 8
    for _ in range(500):
        mb = rng.choice([1, 3, 16, 64, 100, 256])
        addr = rng.randrange(1 << 40) & ~(bb - 1)
        beats = rng.choice([1, 2, rng.randrange(1, 5000)])
        bursts = split_bursts(addr, beats, data_bits, mb)
        a = addr
        for ba, n in bursts:
            assert ba == a and 1 <= n <= min(mb, AXI_MAX_BURST)
            assert ba // AXI_PAGE_BYTES == (ba + n * bb - 1) // AXI_PAGE_BYTES, "crosses 4 KiB"
            # greedy: a burst is only cut short by the page, max_burst or the end
            assert n == min(mb, beats - (a - addr) // bb, (AXI_PAGE_BYTES - ba % AXI_PAGE_BYTES) // bb)
            a += n * bb
        assert a == addr + beats * bb


def test_split_errors():
    with pytest.raises(TypeError, match="beats must be an int"):
        split_bursts(0, 1.0, 256, 64)
    with pytest.raises(ValueError, match="max_burst must be in"):
        split_bursts(0, 1, 256, 257)
    with pytest.raises(ValueError, match="power of two"):
        split_bursts(0, 1, 96, 64)


# ------------------------------------------------------------------------------ signature

READ = ("arvalid", "arready", "araddr", "arlen", "arsize", "arburst", "rvalid", "rready", "rdata", "rlast", "rresp")
WRITE = ("awvalid", "awready", "awaddr", "awlen", "awsize", "awburst", "wvalid", "wready", "wdata", "wstrb",
         "wlast", "bvalid", "bready", "bresp")


def test_signature_members():
    sig = axi4_signature(64, 512)
    assert tuple(sig.members) == READ + WRITE
    ins = {n for n, mb in sig.members.items() if mb.flow == In}
    assert ins == {"arready", "rvalid", "rdata", "rlast", "rresp", "awready", "wready", "bvalid", "bresp"}
    widths = {n: Shape.cast(mb.shape).width for n, mb in sig.members.items()}
    assert widths["araddr"] == widths["awaddr"] == 64 and widths["rdata"] == widths["wdata"] == 512
    assert widths["wstrb"] == 64 and widths["arlen"] == widths["awlen"] == 8
    assert widths["arsize"] == 3 and widths["arburst"] == 2 and widths["rresp"] == widths["bresp"] == 2
    assert tuple(axi4_signature(33, 256, write=False).members) == READ
    assert tuple(axi4_signature(33, 256, read=False).members) == WRITE
    assert axi4_signature(33, 256, read=False).members["wstrb"].shape == 32


def test_signature_errors():
    with pytest.raises(ValueError, match="read or the write"):
        axi4_signature(64, 256, read=False, write=False)
    with pytest.raises(TypeError, match="read must be a bool"):
        axi4_signature(64, 256, read=1)
    with pytest.raises(TypeError, match="data_bits must be an int"):
        axi4_signature(64, "512")
    with pytest.raises(ValueError, match="data_bits must be a power of two"):
        axi4_signature(64, 2048)
    with pytest.raises(ValueError, match="addr_bits must be in"):
        axi4_signature(12, 256)
    with pytest.raises(ValueError, match="prefix"):
        axi4_top_members("m-axi")


def test_top_members_flatten():
    """A kernel-style top: a read and a write mux on one flattened port ``m_axi_ch00_*``."""
    from amaranth.back import verilog

    class Top(wiring.Component):
        def __init__(self):
            self.rm, self.wm = ReadMux(2, 256, 64), WriteMux(1, 256, 64)
            super().__init__({**axi4_top_members("m_axi_ch00", 64, 256),
                              "c0": In(axi4_signature(64, 256, write=False)),
                              "c1": In(axi4_signature(64, 256, write=False)),
                              "c2": In(axi4_signature(64, 256, read=False))})

        def elaborate(self, platform):
            m = Module()
            m.submodules.rm, m.submodules.wm = self.rm, self.wm
            wiring.connect(m, wiring.flipped(self.c0), self.rm.clients[0])
            wiring.connect(m, wiring.flipped(self.c1), self.rm.clients[1])
            wiring.connect(m, wiring.flipped(self.c2), self.wm.clients[0])
            connect_axi4_top(m, self, "m_axi_ch00", self.rm.axi)
            connect_axi4_top(m, self, "m_axi_ch00", self.wm.axi)
            return m

    text = verilog.convert(Top(), name="top", emit_src=False)
    sig = axi4_signature(64, 256)
    for name, member in sig.members.items():
        direction = "input" if member.flow == In else "output"
        width = Shape.cast(member.shape).width
        decl = f"{direction} {'' if width == 1 else f'[{width - 1}:0] '}m_axi_ch00_{name};"
        assert re.search(rf"^\s*{re.escape(decl)}$", text, re.M), decl


@pytest.mark.parametrize("make, exc, match", [
    (lambda: BurstReader(256, max_burst=0), ValueError, "max_burst"),
    (lambda: BurstReader(256, max_burst=64, fifo_depth=32), ValueError, "fifo_depth must be at least 64"),
    (lambda: BurstReader(200), ValueError, "data_bits"),
    (lambda: BurstReader(256, addr_bits=64.0), TypeError, "addr_bits must be an int"),
    (lambda: BurstWriter(256, outstanding=1), ValueError, "outstanding"),
    (lambda: BurstWriter(True), TypeError, "data_bits"),
    (lambda: ReadMux(0, 256), ValueError, "n must be at least 1"),
    (lambda: WriteMux(2, 256, depth=1), ValueError, "depth"),
    (lambda: WriteMux("2", 256), TypeError, "n must be an int"),
])
def test_constructor_errors(make, exc, match):
    """Bad parameters: the precise error, and no unused-elaboratable warning (warnings are errors)."""
    with pytest.raises(exc, match=match):
        make()


def test_burst_beats_value_matches_int():
    """The RTL form of the rule (an expression) equals the int form on every page offset."""
    from amaranth import Signal

    class T(Elaboratable):
        def __init__(self, bb, mb):
            self.bb, self.mb = bb, mb
            self.addr, self.rem, self.n = Signal(64), Signal(24), Signal(9)

        def elaborate(self, platform):
            m = Module()
            m.d.comb += self.n.eq(burst_beats(self.addr, self.rem, self.bb, self.mb))
            return m

    for bb, mb in ((32, 64), (64, 256), (128, 7), (8, 256)):
        dut = T(bb, mb)
        rng = random.Random(bb * mb)

        async def tb(ctx):
            for _ in range(300):
                a = rng.randrange(1 << 48) & ~(bb - 1)
                r = rng.choice([1, 2, mb - 1, mb, mb + 1, rng.randrange(1, 1 << 24)])
                r = max(r, 1)
                ctx.set(dut.addr, a)
                ctx.set(dut.rem, r)
                assert ctx.get(dut.n) == burst_beats(a, r, bb, mb), (bb, mb, a, r)

        sim = Simulator(dut)
        sim.add_testbench(tb)
        sim.run()


# ------------------------------------------------------------------------------ models

class Mem:
    """AXI4 subordinate on manager port ``axi`` (read and/or write channels as it has).

    Random ``arready``/``awready``/``wready`` (probability ``p_ready``), R/B valid
    (``p_valid``) and a latency of 1..``1 + max_lat`` cycles from an address handshake to
    its first response. ``rd_err`` / ``wr_err``: indices of R beats / bursts answered SLVERR.
    """

    def __init__(self, axi, data_bits, rng, mem: bytearray, *, max_burst=AXI_MAX_BURST, p_ready=0.6, p_valid=0.7,
                 max_lat=8, rd_err=(), wr_err=(), check_rready=False):
        self.axi, self.rng, self.mem = axi, rng, mem
        self.bb = data_bits // 8
        self.max_burst, self.p_ready, self.p_valid, self.max_lat = max_burst, p_ready, p_valid, max_lat
        self.rd_err, self.wr_err, self.check_rready = set(rd_err), set(wr_err), check_rready
        names = axi.signature.members
        self.has_read, self.has_write = "arvalid" in names, "awvalid" in names
        self.t = 0
        self.ars, self.rq, self.r_on, self.r_beats = [], deque(), False, 0       # read side
        self.aws, self.aw_seen, self.w_cur, self.w_bursts = [], 0, [], []       # write side
        self.applied, self.bq, self.b_on, self.b_count = 0, deque(), False, 0
        self.b_at = []                                                           # cycle of each B handshake

    def _check_burst(self, addr, ln, size, burst):
        bb = self.bb
        assert size == bb.bit_length() - 1, f"size {size} for {bb}-byte beats"
        assert burst == AXI_BURST_INCR, f"burst type {burst}"
        assert addr % bb == 0, f"unaligned burst address {addr:#x}"
        assert ln + 1 <= self.max_burst, f"burst of {ln + 1} beats > max_burst {self.max_burst}"
        assert addr % AXI_PAGE_BYTES + (ln + 1) * bb <= AXI_PAGE_BYTES, f"burst {addr:#x}+{ln + 1} crosses 4 KiB"

    def word(self, addr):
        a = addr % len(self.mem)
        return int.from_bytes(self.mem[a:a + self.bb], "little")

    def drive(self, ctx):
        a, rng = self.axi, self.rng
        if self.has_read:
            ctx.set(a.arready, rng.random() < self.p_ready)
            if not self.r_on and self.rq and self.rq[0][3] <= self.t and rng.random() < self.p_valid:
                self.r_on = True
            if self.r_on:
                addr, ln, k, _ = self.rq[0]
                ctx.set(a.rdata, self.word(addr + k * self.bb))
                ctx.set(a.rlast, k == ln)
                ctx.set(a.rresp, 2 if self.r_beats in self.rd_err else 0)
            ctx.set(a.rvalid, self.r_on)
        if self.has_write:
            ctx.set(a.awready, rng.random() < self.p_ready)
            ctx.set(a.wready, rng.random() < self.p_ready)
            if not self.b_on and self.bq and self.bq[0][0] <= self.t and rng.random() < self.p_valid:
                self.b_on = True
            if self.b_on:
                ctx.set(a.bresp, 2 if self.bq[0][1] in self.wr_err else 0)
            ctx.set(a.bvalid, self.b_on)

    def sample(self, ctx):
        a, g = self.axi, ctx.get
        if self.has_read:
            if self.check_rready:
                assert g(a.rready) == 1, "rready fell"
            if g(a.arvalid) and g(a.arready):
                rec = (g(a.araddr), g(a.arlen), g(a.arsize), g(a.arburst))
                self._check_burst(*rec)
                self.ars.append((rec[0], rec[1] + 1))
                self.rq.append([rec[0], rec[1], 0, self.t + 1 + self.rng.randint(0, self.max_lat)])
            if self.r_on and g(a.rready):
                self.r_on = False
                self.r_beats += 1
                self.rq[0][2] += 1
                if self.rq[0][2] > self.rq[0][1]:
                    self.rq.popleft()
        if self.has_write:
            if g(a.awvalid):
                self.aw_seen = max(self.aw_seen, len(self.aws) + 1)
            if g(a.awvalid) and g(a.awready):
                rec = (g(a.awaddr), g(a.awlen), g(a.awsize), g(a.awburst))
                self._check_burst(*rec)
                self.aws.append((rec[0], rec[1] + 1))
            if g(a.wvalid) and not self.w_cur:
                j = len(self.w_bursts)
                assert self.aw_seen >= j + 1, f"W of burst {j} before its AW (AWs presented: {self.aw_seen})"
            if g(a.wvalid) and g(a.wready):
                self.w_cur.append((g(a.wdata), g(a.wstrb), g(a.wlast)))
                if self.w_cur[-1][2]:
                    self.w_bursts.append(self.w_cur)
                    self.w_cur = []
            while self.applied < min(len(self.aws), len(self.w_bursts)):
                (addr, n), beats = self.aws[self.applied], self.w_bursts[self.applied]
                assert len(beats) == n, f"burst {self.applied}: {len(beats)} W beats for AW of {n} (wlast misplaced)"
                for k, (d, s, _) in enumerate(beats):
                    base = (addr + k * self.bb) % len(self.mem)
                    for i in range(self.bb):
                        if s >> i & 1:
                            self.mem[base + i] = d >> (8 * i) & 0xFF
                self.bq.append((self.t + 1 + self.rng.randint(0, self.max_lat), self.applied))
                self.applied += 1
            if self.b_on and g(a.bready):
                self.b_on = False
                self.bq.popleft()
                self.b_count += 1
                self.b_at.append(self.t)
        self.t += 1

    def finished(self):
        return not self.rq and not self.r_on and not self.bq and not self.b_on and not self.w_cur \
            and self.applied == len(self.aws) == len(self.w_bursts)

    def state(self):
        return (f"Mem t={self.t}: ARs {len(self.ars)}, R beats {self.r_beats}, R queue {len(self.rq)}; "
                f"AWs {len(self.aws)}, W bursts {len(self.w_bursts)} (+{len(self.w_cur)} beats), B {self.b_count}")


class Source:
    """Drives a stream with random gaps (``p``: probability of offering); a valid is held until taken."""

    def __init__(self, s, items, rng, p):
        self.s, self.items, self.rng, self.p = s, deque(items), rng, p
        self.on = False
        self.taken = 0

    def drive(self, ctx):
        if not self.on and self.items and self.rng.random() < self.p:
            self.on = True
        if self.on:
            for name, v in self.items[0].items():
                ctx.set(getattr(self.s.payload, name), v)
        ctx.set(self.s.valid, self.on)

    def sample(self, ctx):
        if self.on and ctx.get(self.s.ready):
            self.on = False
            self.items.popleft()
            self.taken += 1

    def finished(self):
        return not self.items


class Sink:
    """Takes a stream with random readiness ``p`` and compares it with ``expect``."""

    def __init__(self, s, expect, rng, p, what):
        self.s, self.expect, self.rng, self.p, self.what = s, deque(expect), rng, p, what
        self.got = 0
        self.hold = 0             # cycles the sink refuses everything (a long stall)

    def drive(self, ctx):
        ctx.set(self.s.ready, self.hold <= 0 and self.rng.random() < self.p)
        self.hold -= 1

    def sample(self, ctx):
        if ctx.get(self.s.valid) and ctx.get(self.s.ready):
            assert self.expect, f"{self.what}: word {self.got} beyond the commands"
            want = self.expect.popleft()
            got = ctx.get(self.s.payload)
            assert got == want, f"{self.what}: word {self.got}: {got:#x} != {want:#x}"
            self.got += 1

    def finished(self):
        return not self.expect


class Pulses:
    """Counts the pulses of ``sig``; ``check(count)`` is called on each."""

    def __init__(self, sig, check=None):
        self.sig, self.check, self.count = sig, check, 0

    def drive(self, ctx):
        pass

    def sample(self, ctx):
        if ctx.get(self.sig):
            self.count += 1
            if self.check:
                self.check(self.count)

    def finished(self):
        return True


class ReadyProbe:
    """Registered readys: flipping the external handshake inputs within a cycle must not
    move any ready the design drives (``outs``)."""

    def __init__(self, ins, outs, rng, p=0.3):
        self.ins, self.outs, self.rng, self.p = ins, outs, rng, p

    def drive(self, ctx):
        pass

    def sample(self, ctx):
        if self.rng.random() >= self.p:
            return
        before = [ctx.get(o) for o in self.outs]
        old = [ctx.get(i) for i in self.ins]
        for i, v in zip(self.ins, old):
            ctx.set(i, 1 - v)
        after = [ctx.get(o) for o in self.outs]
        for i, v in zip(self.ins, old):
            ctx.set(i, v)
        assert before == after, f"a ready follows an input combinationally: {before} -> {after}"

    def finished(self):
        return True


def simulate(dut, models, limit, after=None, settle=8):
    """Run ``models`` (drive all, then sample all, each cycle) until all are finished, at most
    ``limit`` cycles; ``after(ctx)`` runs ``settle`` cycles later. Returns the cycles taken."""
    out = {}

    async def bench(ctx):
        for t in range(limit):
            for o in models:
                o.drive(ctx)
            for o in models:
                o.sample(ctx)
            if all(o.finished() for o in models):
                out["cycles"] = t + 1
                break
            await ctx.tick()
        else:
            states = [o.state() for o in models if isinstance(o, Mem)]
            states += [f"{type(o).__name__}: {len(getattr(o, 'items', getattr(o, 'expect', ())))} left"
                       for o in models if not o.finished()]
            raise AssertionError(f"hung: not finished after {limit} cycles; " + "; ".join(states))
        for o in models:
            if isinstance(o, Source):
                ctx.set(o.s.valid, 0)
        for _ in range(settle):
            for o in models:
                if isinstance(o, Mem):
                    o.drive(ctx)
                    o.sample(ctx)
            await ctx.tick()
        if after:
            after(ctx)

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    return out["cycles"]


def random_commands(rng, n, bb, region, long=600, zero=False):
    """``n`` commands (addr, beats) inside ``region`` = (start, end): 1..3 beats, page-crossing
    ones and long ones up to ``long`` beats; with ``zero``, one 0-beat command."""
    lo, hi = region
    out = []
    for k in range(n):
        kind = rng.random()
        beats = rng.randint(1, 3) if kind < 0.3 else rng.randint(4, 40) if kind < 0.6 else rng.randint(41, long)
        beats = min(beats, (hi - lo) // bb)
        if kind < 0.15:                                 # right before a page boundary
            page = rng.randrange(lo // AXI_PAGE_BYTES + 1, hi // AXI_PAGE_BYTES)
            addr = page * AXI_PAGE_BYTES - rng.randint(1, 4) * bb
        else:
            addr = rng.randrange(lo, hi - beats * bb + 1) // bb * bb
        addr = max(lo, min(addr, hi - beats * bb))
        out.append((addr, beats))
    if zero:
        out.insert(n // 2, (lo, 0))
    return out


def words(mem, addr, beats, bb):
    return [int.from_bytes(mem[addr + k * bb: addr + (k + 1) * bb], "little") for k in range(beats)]


def bursts_of(cmds, data_bits, max_burst):
    return [b for a, n in cmds for b in split_bursts(a, n, data_bits, max_burst)]


# ------------------------------------------------------------------------------ skid buffer

def test_skid_buffer_order_rate_and_registered_ready():
    dut = SkidBuffer(16)
    rng = random.Random(3)
    vals = [rng.randrange(1 << 16) for _ in range(400)]

    class Src(Source):
        def drive(self, ctx):
            if not self.on and self.items and self.rng.random() < self.p:
                self.on = True
            if self.on:
                ctx.set(self.s.payload, self.items[0])
            ctx.set(self.s.valid, self.on)

    src, snk = Src(dut.i, vals, rng, 0.8), Sink(dut.o, vals, rng, 0.7, "skid")
    simulate(dut, [src, snk, ReadyProbe([dut.o.ready, dut.i.valid], [dut.i.ready], rng, 1.0)], 4000)
    # full rate when nothing stalls: 200 words in 200 + 2 cycles
    dut = SkidBuffer(16)
    src, snk = Src(dut.i, vals[:200], rng, 1.0), Sink(dut.o, vals[:200], rng, 1.0, "skid")
    assert simulate(dut, [src, snk], 400) <= 202


# ------------------------------------------------------------------------------ reader

def cmd_items(cmds):
    return [{"addr": a, "beats": n} for a, n in cmds]


class CreditCheck:
    """Beats requested (AR handshakes) minus beats popped never exceed the FIFO; the data
    FIFO is never written while full. Records the largest number in flight."""

    def __init__(self, rdr, mem, sink):
        self.rdr, self.mem, self.sink = rdr, mem, sink
        self.peak = 0
        self.peak_bursts = 0

    def drive(self, ctx):
        pass

    def sample(self, ctx):
        req = sum(n for _, n in self.mem.ars)
        popped = self.sink.got
        assert req - popped <= self.rdr.fifo_depth, f"{req - popped} beats in flight > FIFO {self.rdr.fifo_depth}"
        if ctx.get(self.rdr.axi.rvalid):
            assert ctx.get(self.rdr._fifo.w_rdy), "R beat into a full data FIFO"
        self.peak = max(self.peak, req - popped)
        self.peak_bursts = max(self.peak_bursts, len(self.mem.rq))

    def finished(self):
        return True


@pytest.mark.parametrize("data_bits, max_burst, depth, seed", [
    (256, 64, 128, 0), (256, 16, 16, 1), (512, 64, 64, 2), (512, 256, 300, 3), (64, 7, 9, 4)])
def test_reader_random(data_bits, max_burst, depth, seed):
    """Random commands (1-beat, page-crossing, long, one 0-beat) with stalls everywhere: the
    AR sequence is the split of the commands, the words are memory's, credits hold."""
    rng = random.Random(seed)
    bb = data_bits // 8
    mem = bytearray(rng.randbytes(MEM_BYTES))
    dut = BurstReader(data_bits, 64, max_burst=max_burst, fifo_depth=depth)
    cmds = random_commands(rng, 14, bb, (0, MEM_BYTES), long=400, zero=True)
    expect = [w for a, n in cmds for w in words(mem, a, n, bb)]
    m = Mem(dut.axi, data_bits, rng, mem, max_burst=max_burst, max_lat=12, check_rready=True)
    src = Source(dut.cmd, cmd_items(cmds), rng, 0.5)
    snk = Sink(dut.data, expect, rng, 0.6, "reader")
    cc = CreditCheck(dut, m, snk)
    probe = ReadyProbe([dut.axi.arready, dut.axi.rvalid, dut.data.ready, dut.cmd.valid], [dut.cmd.ready], rng)

    def after(ctx):
        assert ctx.get(dut.idle) == 1 and ctx.get(dut.error) == 0

    simulate(dut, [m, src, snk, cc, probe], 40 * len(expect) + 2000, after)
    assert m.ars == bursts_of(cmds, data_bits, max_burst)


def test_reader_credit_fills_the_fifo():
    """The sink holds off for a long time: the reader keeps requesting until the FIFO's room
    is used (several bursts outstanding), never more; then every word arrives in order."""
    rng = random.Random(7)
    bb = 32
    mem = bytearray(rng.randbytes(MEM_BYTES))
    dut = BurstReader(256, 64, max_burst=16, fifo_depth=100)
    cmds = [(4096 - 5 * bb, 300), (0, 1), (8192, 77)]
    expect = [w for a, n in cmds for w in words(mem, a, n, bb)]
    m = Mem(dut.axi, 256, rng, mem, max_burst=16, p_ready=1.0, p_valid=1.0, max_lat=30, check_rready=True)
    snk = Sink(dut.data, expect, rng, 1.0, "reader")
    snk.hold = 300
    cc = CreditCheck(dut, m, snk)
    simulate(dut, [m, Source(dut.cmd, cmd_items(cmds), rng, 1.0), snk, cc], 3000)
    assert 100 - 16 < cc.peak <= 100, cc.peak         # the FIFO filled up to less than one burst
    assert cc.peak_bursts >= 3                         # several bursts outstanding at once


@pytest.mark.parametrize("lengths", [[1] * 40, [1, 2, 3, 1, 300, 1, 1, 64, 65, 1]], ids=["1-beat", "mixed"])
def test_reader_back_to_back(lengths):
    """Without stalls, the commands' words leave one per cycle: no gap between commands."""
    rng = random.Random(1)
    bb = 32
    mem = bytearray(rng.randbytes(MEM_BYTES))
    dut = BurstReader(256, 64, max_burst=64, fifo_depth=256)
    cmds, a = [], 4096 - 3 * bb
    for n in lengths:
        cmds.append((a, n))
        a += n * bb
    expect = [w for a, n in cmds for w in words(mem, a, n, bb)]
    m = Mem(dut.axi, 256, rng, mem, p_ready=1.0, p_valid=1.0, max_lat=0, check_rready=True)
    cycles = simulate(dut, [m, Source(dut.cmd, cmd_items(cmds), rng, 1.0), Sink(dut.data, expect, rng, 1.0, "rd")],
                      2000)
    assert cycles <= len(expect) + 8, (cycles, len(expect))


def test_reader_error_is_sticky():
    rng = random.Random(2)
    mem = bytearray(rng.randbytes(MEM_BYTES))
    dut = BurstReader(256, 64, max_burst=8, fifo_depth=32)
    cmds = [(0, 20), (4096, 20)]
    m = Mem(dut.axi, 256, rng, mem, max_burst=8, rd_err={13})
    errs = []

    class Watch(Pulses):
        def sample(self, ctx):
            errs.append((m.r_beats, ctx.get(dut.error)))

    expect = [w for a, n in cmds for w in words(mem, a, n, 32)]

    def after(ctx):
        assert ctx.get(dut.error) == 1 and ctx.get(dut.idle) == 1

    simulate(dut, [m, Source(dut.cmd, cmd_items(cmds), rng, 1.0), Sink(dut.data, expect, rng, 0.8, "rd"),
                   Watch(dut.error)], 2000, after)
    assert all(e == 0 for n, e in errs if n <= 13) and all(e == 1 for n, e in errs if n >= 15)


# ------------------------------------------------------------------------------ writer

def write_job(rng, cmds, bb, mem, p_partial=0.2):
    """Data items for ``cmds`` and the memory they leave (applied in order)."""
    after = bytearray(mem)
    items = []
    for a, n in cmds:
        for k in range(n):
            d = rng.getrandbits(8 * bb)
            s = (1 << bb) - 1 if rng.random() >= p_partial else rng.getrandbits(bb)
            items.append({"data": d, "strb": s})
            for i in range(bb):
                if s >> i & 1:
                    after[a + k * bb + i] = d >> (8 * i) & 0xFF
    return items, after


class DoneCheck(Pulses):
    """``done`` number c comes only after the B of command c's last burst."""

    def __init__(self, sig, mem, cmds, data_bits, max_burst):
        super().__init__(sig)
        self.mem = mem
        self.need, total = [], 0
        for a, n in cmds:
            total += len(split_bursts(a, n, data_bits, max_burst))
            if n:
                self.need.append(total)

    def sample(self, ctx):
        if ctx.get(self.sig):
            self.count += 1
            assert self.count <= len(self.need), "more done pulses than commands"
            assert self.mem.b_count >= self.need[self.count - 1], \
                f"done {self.count} before its last B ({self.mem.b_count} of {self.need[self.count - 1]})"

    def finished(self):
        return self.count == len(self.need)


@pytest.mark.parametrize("data_bits, max_burst, seed", [(256, 64, 0), (256, 16, 1), (512, 64, 2), (64, 5, 3)])
def test_writer_random(data_bits, max_burst, seed):
    """Random commands and partial strobes with stalls everywhere: the AW sequence is the
    split, W follows AW with wlast at each burst's end, memory ends as written, one done per
    command after its last B."""
    rng = random.Random(100 + seed)
    bb = data_bits // 8
    mem = bytearray(rng.randbytes(MEM_BYTES))
    cmds = random_commands(rng, 12, bb, (0, MEM_BYTES), long=400, zero=True)
    items, want = write_job(rng, cmds, bb, mem)
    dut = BurstWriter(data_bits, 64, max_burst=max_burst, outstanding=4)
    m = Mem(dut.axi, data_bits, rng, mem, max_burst=max_burst, max_lat=10)
    dc = DoneCheck(dut.done, m, cmds, data_bits, max_burst)
    probe = ReadyProbe([dut.axi.awready, dut.axi.wready, dut.axi.bvalid, dut.data.valid, dut.cmd.valid],
                       [dut.cmd.ready, dut.data.ready], rng)

    def after(ctx):
        assert ctx.get(dut.idle) == 1 and ctx.get(dut.error) == 0 and ctx.get(dut.axi.bready) == 1

    simulate(dut, [m, Source(dut.cmd, cmd_items(cmds), rng, 0.5), Source(dut.data, items, rng, 0.6), dc, probe],
             40 * len(items) + 2000, after)
    assert m.aws == bursts_of(cmds, data_bits, max_burst)
    assert m.mem == want


def test_writer_back_to_back():
    """Without stalls the words go out one per cycle across command boundaries."""
    rng = random.Random(5)
    bb = 64
    mem = bytearray(MEM_BYTES)
    cmds, a = [], 4096 - 2 * bb
    for n in [1] * 20 + [3, 100, 1, 64, 1]:
        cmds.append((a, n))
        a += n * bb
    items, want = write_job(rng, cmds, bb, mem)
    dut = BurstWriter(512, 64, max_burst=64, outstanding=8)
    m = Mem(dut.axi, 512, rng, mem, p_ready=1.0, p_valid=1.0, max_lat=0)
    cycles = simulate(dut, [m, Source(dut.cmd, cmd_items(cmds), rng, 1.0), Source(dut.data, items, rng, 1.0),
                            DoneCheck(dut.done, m, cmds, 512, 64)], 2000)
    assert m.mem == want
    assert cycles <= len(items) + 12, (cycles, len(items))


def test_writer_error_is_sticky():
    rng = random.Random(6)
    mem = bytearray(MEM_BYTES)
    cmds = [(0, 10), (4096, 30)]
    items, want = write_job(rng, cmds, 32, mem)
    dut = BurstWriter(256, 64, max_burst=8)
    m = Mem(dut.axi, 256, rng, mem, max_burst=8, wr_err={2})

    def after(ctx):
        assert ctx.get(dut.error) == 1 and ctx.get(dut.idle) == 1

    simulate(dut, [m, Source(dut.cmd, cmd_items(cmds), rng, 1.0), Source(dut.data, items, rng, 0.8),
                   DoneCheck(dut.done, m, cmds, 256, 8)], 2000, after)
    assert m.mem == want


# ------------------------------------------------------------------------------ muxes

class MuxTop(Elaboratable):
    def __init__(self, readers=(), writers=(), data_bits=256, depth=8):
        self.readers, self.writers = list(readers), list(writers)
        self.rmux = ReadMux(len(self.readers), data_bits, 64, depth=depth) if self.readers else None
        self.wmux = WriteMux(len(self.writers), data_bits, 64, depth=depth) if self.writers else None

    def elaborate(self, platform):
        m = Module()
        for mux, units, kind in ((self.rmux, self.readers, "rd"), (self.wmux, self.writers, "wr")):
            if mux is None:
                continue
            m.submodules[f"{kind}_mux"] = mux
            for i, u in enumerate(units):
                m.submodules[f"{kind}{i}"] = u
                wiring.connect(m, u.axi, mux.clients[i])
        return m


@pytest.mark.parametrize("seed", [0, 1])
def test_read_mux_three_readers(seed):
    """Three readers (different bursts and FIFOs) on one port: each gets its own words;
    every burst obeys the rules."""
    rng = random.Random(20 + seed)
    bb = 32
    mem = bytearray(rng.randbytes(MEM_BYTES))
    rds = [BurstReader(256, 64, max_burst=mb, fifo_depth=d) for mb, d in ((64, 128), (16, 32), (8, 8))]
    top = MuxTop(readers=rds, depth=6)
    m = Mem(top.rmux.axi, 256, rng, mem, max_burst=64, max_lat=10)
    models = [m]
    region = MEM_BYTES // 3 // AXI_PAGE_BYTES * AXI_PAGE_BYTES
    cmds = []
    for i, r in enumerate(rds):
        c = [(region * i, 70)] + random_commands(rng, 8, bb, (region * i, region * (i + 1)), long=300)
        cmds.append(c)
        models += [Source(r.cmd, cmd_items(c), rng, 1.0 if i == 0 else 0.5),
                   Sink(r.data, [w for a, n in c for w in words(mem, a, n, bb)], rng, 0.7, f"reader {i}")]
    models.append(ReadyProbe([top.rmux.axi.arready, top.rmux.axi.rvalid] + [r.data.ready for r in rds],
                             [top.rmux.axi.rready] + [c.arready for c in top.rmux.clients], rng))
    simulate(top, models, 30000)
    per = [[(a, n) for a, n in m.ars if region * i <= a < region * (i + 1)] for i in range(3)]
    for i, r in enumerate(rds):
        assert per[i] == bursts_of(cmds[i], 256, r.max_burst), i


@pytest.mark.parametrize("kind", ["read", "write"])
def test_mux_round_robin(kind):
    """Clients that always have a burst waiting are granted in turn, one burst each, at full rate."""
    rng = random.Random(11)
    mem = bytearray(rng.randbytes(MEM_BYTES))
    region = 16384
    models = []
    if kind == "read":
        units = [BurstReader(256, 64, max_burst=8, fifo_depth=128) for _ in range(3)]
        top = MuxTop(readers=units, depth=32)
        axi = top.rmux.axi
        for i, u in enumerate(units):
            models += [Source(u.cmd, cmd_items([(region * i, 96)]), rng, 1.0),
                       Sink(u.data, words(mem, region * i, 96, 32), rng, 1.0, f"rd{i}")]
    else:
        units = [BurstWriter(256, 64, max_burst=8, outstanding=16) for _ in range(3)]
        top = MuxTop(writers=units, depth=32)
        axi = top.wmux.axi
        for i, u in enumerate(units):
            items, _ = write_job(rng, [(region * i, 96)], 32, mem)
            models += [Source(u.cmd, cmd_items([(region * i, 96)]), rng, 1.0), Source(u.data, items, rng, 1.0)]
    m = Mem(axi, 256, rng, mem, p_ready=1.0, p_valid=1.0, max_lat=40)
    simulate(top, [m] + models, 3000)
    addrs = [a for a, _ in (m.ars if kind == "read" else m.aws)]
    order = [a // region for a in addrs[:12]]
    assert order == [1, 2, 0] * 4, order


def test_read_mux_back_to_back():
    """One active client of a mux still gets a word every cycle."""
    rng = random.Random(9)
    mem = bytearray(rng.randbytes(MEM_BYTES))
    rds = [BurstReader(256, 64, max_burst=64, fifo_depth=128), BurstReader(256, 64, max_burst=64, fifo_depth=128)]
    top = MuxTop(readers=rds)
    cmds = [(4096 - 64, 1)] * 30 + [(100 * 32, 200)]
    expect = [w for a, n in cmds for w in words(mem, a, n, 32)]
    m = Mem(top.rmux.axi, 256, rng, mem, p_ready=1.0, p_valid=1.0, max_lat=0, check_rready=True)
    cycles = simulate(top, [m, Source(rds[1].cmd, cmd_items(cmds), rng, 1.0),
                            Sink(rds[1].data, expect, rng, 1.0, "rd1")], 2000)
    assert cycles <= len(expect) + 10, (cycles, len(expect))


@pytest.mark.parametrize("seed", [0, 1])
def test_write_mux_two_writers(seed):
    """Two writers on one port (their own regions): W beats of each burst come from the
    client whose AW was granted (memory ends as each wrote), B goes back to it."""
    rng = random.Random(40 + seed)
    bb = 32
    mem = bytearray(rng.randbytes(MEM_BYTES))
    wrs = [BurstWriter(256, 64, max_burst=mb, outstanding=o) for mb, o in ((64, 4), (8, 16))]
    top = MuxTop(writers=wrs, depth=4)
    region = MEM_BYTES // 2
    models, want, cmds = [], bytearray(mem), []
    m = Mem(top.wmux.axi, 256, rng, mem, max_burst=64, max_lat=10)
    models.append(m)
    for i, w in enumerate(wrs):
        c = random_commands(rng, 8, bb, (region * i, region * (i + 1)), long=300)
        cmds.append(c)
        items, want = write_job(rng, c, bb, want)
        models += [Source(w.cmd, cmd_items(c), rng, 0.6), Source(w.data, items, rng, 0.7),
                   DoneCheck(w.done, m, c, 256, w.max_burst)]
    models.append(ReadyProbe([top.wmux.axi.awready, top.wmux.axi.wready, top.wmux.axi.bvalid]
                             + [w.data.valid for w in wrs],
                             [top.wmux.axi.bready] + [c.awready for c in top.wmux.clients]
                             + [c.wready for c in top.wmux.clients] + [w.data.ready for w in wrs], rng))

    def after(ctx):
        for w in wrs:
            assert ctx.get(w.idle) == 1 and ctx.get(w.error) == 0

    simulate(top, models, 30000, after)
    assert m.mem == want
    for i, w in enumerate(wrs):
        assert [x for x in m.aws if region * i <= x[0] < region * (i + 1)] == bursts_of(cmds[i], 256, w.max_burst)
    assert [p.count for p in models if type(p) is DoneCheck] == [len(c) for c in cmds]


def test_layouts():
    assert command_layout(64).size == 64 + 24
    assert write_data_layout(512).size == 512 + 64
