"""cocotb testbench of the MPE unit on the buffers (flightllm_mpe_unit, sim/mpe_unit_top.py),
driven by sim/test_mpe_unit.py.

Reads a case from ``$FLIGHTLLM_STIMULI`` (:mod:`flightllm.sim.mpe_unit_cases`): loads the
buffers through the host port, puts each weight channel's image into a cocotbext-axi
``AxiRamRead`` (random pauses on AR and R), then offers the queue entries back to back
(random gaps; ``serial``: each after the previous ``done``), accepts ``mpe_tok`` after random
delays (``tok_delay``: after exactly that many cycles) checking each mask against the expected
sequence, stalls the unit's buffer ports
at random and lets the host read random words meanwhile. A case with ``fault_at`` expects
``fault`` with that entry's pc, then holds ``abort`` until ``busy`` falls and goes on with
the entries after it. At the end ``busy`` must be low, every instruction must have had one
``done``, and every word of the checked regions must equal the golden model's (any NaN
equals any NaN). Every wait is bounded in cycles. The cycles of each entry's acceptance and
of each ``done`` and ``mpe_tok`` acceptance go to ``$FLIGHTLLM_STIMULI.cycles.json``.
"""

from __future__ import annotations

import json
import os
import random

import cocotb
import numpy as np
from cocotb.clock import Clock
from cocotb.triggers import FallingEdge, ReadOnly, RisingEdge
from cocotbext.axi import AxiRamRead, AxiReadBus

from flightllm.hw.buffers import buffer_map, port_signature
from flightllm.hw.params import HwParams
from flightllm.sim.sfu_cases import pack
from flightllm.sim.tb import pauses

PERIOD_NS = 10


def _nan(w):
    return ((w & 0x7F800000) == 0x7F800000) & ((w & 0x7FFFFF) != 0)



def _rate(r):
    """Pause so that ``r`` of the cycles carry a beat, evenly spread (a bandwidth limit)."""
    acc = 0.0
    while True:
        acc += r
        if acc >= 1.0:
            acc -= 1.0
            yield False
        else:
            yield True


def lanes_int(lanes) -> int:
    return sum(int(x) << (32 * i) for i, x in enumerate(lanes))


@cocotb.test()
async def mpe_unit_case(dut):
    path = os.environ["FLIGHTLLM_STIMULI"]
    z = np.load(path)
    p = HwParams.from_dict(json.loads(z["params"].tobytes().decode()))
    meta = json.loads(z["meta"].tobytes().decode())
    L = p.sfu_lanes
    rng = random.Random(meta["seed"])
    stall = meta["stall"]
    bm = buffer_map(p)
    sig = port_signature(p)
    rd_l = sig.members["rd_req"].signature.members["payload"].shape
    wr_l = sig.members["wr"].signature.members["payload"].shape

    cocotb.start_soon(Clock(dut.clk, PERIOD_NS, unit="ns").start())
    for s in ("issue__valid", "host_rd_req__valid", "host_wr__valid", "mpe_tok__ready", "abort"):
        getattr(dut, s).value = 0
    dut.stall.value = 0
    dut.host_rd_data__ready.value = 1
    dut.rst.value = 1
    rams = []
    for c in range(meta["channels"]):
        img = z[f"mem{c}"]
        ram = AxiRamRead(AxiReadBus.from_prefix(dut, f"m_axi_ch{c}"), dut.clk, dut.rst,
                         size=max(4096, -(-len(img) // 4096) * 4096))
        ram.write(0, img.tobytes())
        prng = random.Random(meta["seed"] * 7 + c)
        if meta.get("rate") is not None:               # R beats at a steady fraction of the port
            ram.r_channel.set_pause_generator(_rate(meta["rate"]))
        else:
            for ch in (ram.ar_channel, ram.r_channel):
                ch.set_pause_generator(pauses(random.Random(prng.random()), meta["pause"]))
        rams.append(ram)
    for _ in range(3):
        await RisingEdge(dut.clk)
    await FallingEdge(dut.clk)
    dut.rst.value = 0
    t = 0

    async def edge():
        nonlocal t
        await FallingEdge(dut.clk)
        t += 1

    # -- load the buffers through the host port ------------------------------------------------
    regions, words, lanes = z["load_region"], z["load_word"], z["load_lanes"]
    i, t0 = 0, t
    while i < len(regions):
        assert t - t0 < 4 * len(regions) + 100, f"host writes hung: {i} of {len(regions)}"
        dut.host_wr__valid.value = 1
        dut.host_wr__payload.value = pack(wr_l, {"region": int(regions[i]), "word": int(words[i]),
                                                  "data": lanes_int(lanes[i]), "mask": (1 << L) - 1})
        await ReadOnly()
        if dut.host_wr__ready.value == 1:
            i += 1
        await edge()
    dut.host_wr__valid.value = 0
    for _ in range(4):
        await edge()

    # -- the entries ------------------------------------------------------------------------------
    entries = [int(e) for e in meta["entries"]]
    names = meta["names"]
    toks = list(meta["toks"])
    fault_at = meta["fault_at"]
    serial, contention = meta["serial"], meta["contention"]
    n_done_want = len(entries) - (fault_at >= 0) * (fault_at + 1)     # entries up to the fault may be dropped
    dones, accepted, done_at, got_toks = 0, [], [], []
    i, t0 = 0, t
    tok_delay = meta.get("tok_delay")            # hold each mpe_tok this long (latency runs)
    tok_wait = tok_delay or 0
    tok_at = []
    faulted = fault_at < 0
    all_regions = [r for r in bm.values() if r.name in [c["name"] for c in meta["checks"]]] or list(bm.values())
    budget = 200000
    while dones < n_done_want or (not faulted):
        assert t - t0 < budget, (f"MPE unit hung: {dones} of {n_done_want} done, {i} of {len(entries)} "
                                 f"entries taken, after {t - t0} cycles")
        v = i < len(entries) and rng.random() >= stall and (not serial or i == len(done_at)) and \
            (faulted or i <= fault_at)
        dut.issue__valid.value = int(v)
        if v:
            dut.issue__payload.value = entries[i]
        dut.stall.value = rng.getrandbits(3) if rng.random() < stall else 0
        hv = contention and rng.random() < 0.15
        dut.host_rd_req__valid.value = int(hv)
        if hv:
            r = all_regions[rng.randrange(len(all_regions))]
            dut.host_rd_req__payload.value = pack(rd_l, {"region": r.id, "word": rng.randrange(r.words)})
        tr = tok_wait <= 0
        dut.mpe_tok__ready.value = int(tr)
        await ReadOnly()
        if v and dut.issue__ready.value == 1:
            i += 1
            accepted.append(t - t0)
        if dut.mpe_tok__valid.value == 1:
            if tr:
                got_toks.append(dut.mpe_tok__payload.value.to_unsigned())
                tok_at.append(t - t0)
                if tok_delay is not None:
                    tok_wait = tok_delay
                else:
                    tok_wait = rng.randint(0, 30) if rng.random() < 0.5 else 0
            else:
                tok_wait -= 1
        if dut.done.value == 1:
            if faulted:
                dones += 1
                done_at.append(t - t0)
        if not faulted and dut.fault.value == 1:
            assert dut.fault_pc.value.to_unsigned() == fault_at, \
                f"fault at pc {dut.fault_pc.value.to_unsigned()}, expected {fault_at}"
            await edge()
            dut.issue__valid.value = 0
            dut.abort.value = 1
            ta = t
            rbeats = 0
            while True:
                await ReadOnly()
                rbeats += sum(int(getattr(dut, f"m_axi_ch{c}_rvalid").value) for c in range(meta["channels"]))
                if dut.busy.value == 0:
                    break
                assert t - ta < 5000, "busy did not fall under abort"
                await edge()
            dut._log.info("fault at pc %d, cycle %d; %d of %d entries taken; busy fell %d cycles into the "
                          "abort (%d read beats drained)", fault_at, ta - t0 - 1, i, len(entries), t - ta, rbeats)
            await edge()
            dut.abort.value = 0
            assert dut.fault.value == 0, "fault still set after the abort"
            faulted = True
            i = fault_at + 1
            got_toks = []                              # the aborted entries' masks do not count
            continue
        await edge()
    cycles = t - t0
    dut.issue__valid.value = 0
    dut.stall.value = 0
    dut.host_rd_req__valid.value = 0
    dut.mpe_tok__ready.value = 1
    for _ in range(40):
        await edge()
        await ReadOnly()
        assert dut.done.value == 0, "a done pulse too many"
        assert dut.mpe_tok__valid.value == 0, "an mpe_tok too many"
    await edge()
    await ReadOnly()
    assert dut.busy.value == 0, "busy after every instruction is done"
    await edge()
    failures = []
    if got_toks != toks:
        failures.append(f"mpe_tok masks {got_toks}, expected {toks}")

    # -- read back the checked regions ----------------------------------------------------------------
    for chk in meta["checks"]:
        k = chk["key"]
        want, cover = z[f"chk{k}_want"], z[f"chk{k}_cover"]
        nw = want.shape[0]
        got = np.zeros_like(want)
        sent = back = 0
        t1 = t
        while back < nw:
            assert t - t1 < 4 * nw + 100, f"host reads of {chk['name']} hung"
            v = sent < nw
            dut.host_rd_req__valid.value = int(v)
            if v:
                dut.host_rd_req__payload.value = pack(rd_l, {"region": chk["region"], "word": sent})
            await ReadOnly()
            if dut.host_rd_data__valid.value == 1:
                w = dut.host_rd_data__payload.value.to_unsigned()
                got[back] = [(w >> (32 * ln)) & 0xFFFFFFFF for ln in range(L)]
                back += 1
            if v and dut.host_rd_req__ready.value == 1:
                sent += 1
            await edge()
        dut.host_rd_req__valid.value = 0
        ok = (got == want) | (_nan(got) & _nan(want))
        if not ok.all():
            bad = np.argwhere(~ok)
            w, ln = bad[0]
            failures.append(f"region {chk['name']}: {len(bad)} lanes differ ({int((~ok & cover).sum())} written "
                            f"by the golden model, {int((~ok & ~cover).sum())} that should stay); first word {w} "
                            f"lane {ln}: RTL {got[w, ln]:#010x}, expected {want[w, ln]:#010x} "
                            f"({'golden' if cover[w, ln] else 'unchanged'})")
        np.save(path + f".got{k}.npy", got)
    with open(path + ".cycles.json", "w") as f:
        json.dump({"cycles": cycles, "names": names, "accepted": accepted, "done": done_at, "tok": tok_at}, f)
    assert not failures, "\n".join(failures)
