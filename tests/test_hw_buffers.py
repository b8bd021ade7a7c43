"""amaranth.sim checks of the on-chip buffers (hw/buffers.py): the layout and the ports.

Three clients write and read random words of several regions at once, with random
stalls; every read returns what the last write to that word left (lane masks
respected, int8 lanes zero-extended), in request order per client, READ_LATENCY cycles
after it was taken when nothing competes. Every wait is bounded.
"""

import dataclasses
from collections import deque

import numpy as np
import pytest
from amaranth.sim import Simulator

from flightllm.hw.buffers import READ_LATENCY, Buffers, buffer_map, capacity
from flightllm.hw.isa import Buf
from flightllm.hw.params import get_preset

P = dataclasses.replace(get_preset("sim"), name="sim-small-buffers", mm_tokens=2, max_seq_len=64, kv_tile=16,
                        buf_hidden=64, buf_ffn=64, buf_vocab=64, buf_heads=2, buf_kv_heads=2, buf_tables=64)
L = P.sfu_lanes


def test_layout_holds_the_capacity_of_every_buffer():
    for name in ("sim", "u280", "vhk158"):
        p = get_preset(name)
        bm, cap = buffer_map(p), capacity(p)
        assert len({r.id for r in bm.values()}) == len(bm) and {r.id for r in bm.values()} == set(range(len(bm)))
        for b, (rows, width) in cap.items():
            r = bm[b.name]
            assert r.id == b.value
            if b in (Buf.KS, Buf.VS):                   # stored transposed
                rows, width = width, rows
            assert r.rows >= rows and r.row_words * p.sfu_lanes >= width, (name, b)
        pq = bm["PQ.factor"]            # a head's factors start at a whole word
        assert pq.row_words % p.buf_heads == 0 and pq.row_words // p.buf_heads * p.sfu_lanes * 32 >= p.max_seq_len
    u = get_preset("u280")
    total = sum(r.words * r.bits * u.sfu_lanes for r in buffer_map(u).values()) / 8 / 2 ** 20
    assert 15 < total < 33.75, total      # LLaMA2-7B's envelope, inside the U280's URAM (960 x 288 Kb)


def test_unknown_region_and_bad_clients():
    with pytest.raises(ValueError, match=r"unknown region\(s\) \['NOPE'\]"):
        Buffers(P, only=["X", "NOPE"])
    with pytest.raises(ValueError, match="distinct"):
        Buffers(P, clients=("a", "a"))


def _run(seed, stall=0.3, n_ops=300):
    """Phase 1: every client writes (its own words: writes to a word are ordered);
    phase 2: every client reads words of every client. Reads and writes are separate
    streams with no order between them, so the phases do not overlap."""
    rng = np.random.default_rng(seed)
    clients = ("host", "a", "b")
    regions = [buffer_map(P)[n] for n in ("X", "HQ", "PQ.factor", "TAB", "S")]
    dut = Buffers(P, clients=clients, only=[r.name for r in regions])
    shadow = {r.id: np.zeros((r.words, L), np.int64) for r in regions}
    writes = {c: deque() for c in clients}
    for k, c in enumerate(clients):
        for _ in range(n_ops):
            r = regions[rng.integers(len(regions))]
            w = int(rng.integers(r.words // 3)) * 3 + k
            vals = rng.integers(0, 1 << r.bits, L)
            mask = int(rng.integers(1, 1 << L))
            writes[c].append((r, w, vals, mask))
            shadow[r.id][w] = np.where([(mask >> i) & 1 for i in range(L)], vals, shadow[r.id][w])
    reads = {c: deque((r, int(rng.integers(r.words))) for r in (regions[i] for i in rng.integers(len(regions), size=n_ops)))
             for c in clients}
    pending = {c: deque() for c in clients}
    lat = []

    async def bench(ctx):
        t = 0
        for phase, todo in (("wr", writes), ("rd", reads)):
            t0 = t
            while any(todo.values()) or any(pending.values()):
                assert t - t0 < 30 * n_ops, f"buffers hung in the {phase} phase"
                for c in clients:
                    port = dut.port(c)
                    if ctx.get(port.rd_data.valid):
                        assert pending[c], f"{c}: read data nobody asked for"
                        r, w, when = pending[c].popleft()
                        v = ctx.get(port.rd_data.payload.as_value())
                        got = [(v >> (32 * i)) & 0xFFFFFFFF for i in range(L)]
                        assert got == shadow[r.id][w].tolist(), (c, r.name, w)
                        lat.append(t - when)
                    s = port.wr if phase == "wr" else port.rd_req
                    valid = bool(todo[c]) and rng.random() >= stall
                    if valid:
                        if phase == "wr":
                            r, w, vals, mask = todo[c][0]
                            ctx.set(s.payload.data.as_value(), sum(int(x) << (32 * i) for i, x in enumerate(vals)))
                            ctx.set(s.payload.mask, mask)
                        else:
                            r, w = todo[c][0]
                        ctx.set(s.payload.region, r.id)
                        ctx.set(s.payload.word, w)
                    ctx.set(s.valid, valid)
                    if valid and ctx.get(s.ready):
                        item = todo[c].popleft()
                        if phase == "rd":
                            pending[c].append((item[0], item[1], t))
                await ctx.tick()
                t += 1
            for c in clients:
                ctx.set(dut.port(c).wr.valid, 0)
                ctx.set(dut.port(c).rd_req.valid, 0)
            for _ in range(4):
                await ctx.tick()
                t += 1

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    assert len(lat) == len(clients) * n_ops
    # taken by the FIFO at t, granted one cycle later at the earliest: data READ_LATENCY after that
    assert min(lat) == READ_LATENCY + 1, min(lat)


@pytest.mark.parametrize("seed", [0, 1])
def test_three_clients_with_stalls(seed):
    _run(seed)


def test_buffers_top_is_a_plain_top():
    """BuffersTop (the synthesis top) converts: every port a signal, one set per client."""
    from amaranth.back import rtlil

    from flightllm.hw.buffers import BuffersTop
    text = rtlil.convert(BuffersTop(P, clients=("host", "sfu")), name="flightllm_buffers")
    for c in ("host", "sfu"):
        for port in ("rd_req__valid", "rd_data__payload", "wr__ready", "wr_done"):
            assert f"\\{c}_{port}" in text, (c, port)


def test_reach_wires_only_the_declared_regions():
    """A client with a Reach reads and writes its regions; outside them a read returns zeros
    and a write changes nothing (the host, reaching everything, sees the words unchanged),
    and neither hangs: every request is taken and every read answered."""
    from flightllm.hw.buffers import Reach
    bm = buffer_map(P)
    regions = ("X", "HQ", "TAB")
    clients = {"host": Reach.every(P), "a": Reach(reads={"X"}, writes={"X"}),
               "b": Reach(reads={"HQ"}, writes=())}
    dut = Buffers(P, clients=clients, only=regions)
    assert dut.reach["host"].reads == frozenset(regions)           # restricted to what is built
    full = (1 << 32) - 1

    def word(r, seed):
        return [(seed * 7919 + 13 * i + 1) & ((1 << bm[r].bits) - 1) for i in range(L)]

    async def do(ctx, c, kind, r, w, vals=None, budget=20):
        port = dut.port(c)
        s = port.wr if kind == "wr" else port.rd_req
        ctx.set(s.payload.region, bm[r].id)
        ctx.set(s.payload.word, w)
        if kind == "wr":
            ctx.set(s.payload.data.as_value(), sum(v << (32 * i) for i, v in enumerate(vals)))
            ctx.set(s.payload.mask, (1 << L) - 1)
        ctx.set(s.valid, 1)
        for _ in range(budget):
            taken = ctx.get(s.ready)
            await ctx.tick()
            if taken:
                break
        else:
            raise AssertionError(f"{c}: {kind} of {r} never taken")
        ctx.set(s.valid, 0)
        for _ in range(budget):
            if kind == "wr" and ctx.get(port.wr_done):
                return None
            if kind == "rd" and ctx.get(port.rd_data.valid):
                v = ctx.get(port.rd_data.payload.as_value())
                return [(v >> (32 * i)) & full for i in range(L)]
            await ctx.tick()
        raise AssertionError(f"{c}: {kind} of {r} never answered")

    async def bench(ctx):
        for k, r in enumerate(regions):
            await do(ctx, "host", "wr", r, 1, word(r, k + 1))
        assert await do(ctx, "a", "rd", "X", 1) == word("X", 1)
        assert await do(ctx, "a", "rd", "HQ", 1) == [0] * L              # outside a's reads
        await do(ctx, "a", "wr", "HQ", 1, word("HQ", 9))                 # outside a's writes: dropped
        await do(ctx, "b", "wr", "X", 1, word("X", 9))                   # b writes nothing
        await do(ctx, "a", "wr", "X", 2, word("X", 5))
        assert await do(ctx, "b", "rd", "HQ", 1) == word("HQ", 2)
        assert await do(ctx, "b", "rd", "TAB", 1) == [0] * L
        assert await do(ctx, "host", "rd", "HQ", 1) == word("HQ", 2)     # unchanged by a
        assert await do(ctx, "host", "rd", "X", 1) == word("X", 1)       # unchanged by b
        assert await do(ctx, "host", "rd", "X", 2) == word("X", 5)       # a's own write

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()


def test_reach_is_checked():
    from flightllm.hw.buffers import Reach
    with pytest.raises(ValueError, match=r"client 'a' reaches unknown region\(s\) \['NOPE'\]"):
        Buffers(P, clients={"a": Reach(reads={"NOPE"})})
    with pytest.raises(TypeError, match="needs a Reach"):
        Buffers(P, clients={"a": {"X"}})
    with pytest.raises(TypeError, match="region names"):
        Reach(reads="X")
