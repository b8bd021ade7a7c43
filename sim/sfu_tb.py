"""cocotb testbench of the SFU unit on the on-chip buffers (flightllm_sfu, sim/sfu_top.py),
driven by sim/test_sfu.py.

Reads a case from ``$FLIGHTLLM_STIMULI`` (:mod:`flightllm.sim.sfu_cases`): loads the
buffers through the host port, runs the SFU ops back to back (the op stream stalls at
random, the unit's four buffer ports are stalled at random through ``stall``, and the
host reads random words meanwhile, competing for the memories), then reads back every
region the ops changed through the host port and compares it bit for bit with the golden
model's (any NaN equals any NaN). Every wait is bounded in cycles. For cycle counts the
case may ask for no host reads (``contention``) and one op at a time (``serial``: each
op offered after the previous one's ``done``). The cycle of each op's
acceptance and of each ``done`` (from the first op offered) go to
``$FLIGHTLLM_STIMULI.cycles.json``.
"""

from __future__ import annotations

import json
import os
import random

import cocotb
import numpy as np
from cocotb.clock import Clock
from cocotb.triggers import FallingEdge, ReadOnly, RisingEdge

from flightllm.hw.buffers import buffer_map, port_signature
from flightllm.hw.params import HwParams
from flightllm.sim.sfu_cases import pack

PERIOD_NS = 10


def _nan(w):
    return ((w & 0x7F800000) == 0x7F800000) & ((w & 0x7FFFFF) != 0)


def lanes_int(lanes) -> int:
    return sum(int(x) << (32 * i) for i, x in enumerate(lanes))


@cocotb.test()
async def sfu_case(dut):
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
    for s in ("op__valid", "host_rd_req__valid", "host_wr__valid"):
        getattr(dut, s).value = 0
    dut.stall.value = 0
    dut.host_rd_data__ready.value = 1          # (the buffers' read data is always taken)
    dut.rst.value = 1
    for _ in range(3):
        await RisingEdge(dut.clk)
    await FallingEdge(dut.clk)
    dut.rst.value = 0
    t = 0

    async def edge():
        nonlocal t
        await FallingEdge(dut.clk)
        t += 1

    # -- load the buffers through the host port ------------------------------------------
    regions, words, lanes = z["load_region"], z["load_word"], z["load_lanes"]
    i, t0 = 0, t
    while i < len(regions):
        assert t - t0 < 4 * len(regions) + 100, f"host writes hung: {i} of {len(regions)}"
        v = rng.random() >= stall / 4
        dut.host_wr__valid.value = int(v)
        if v:
            dut.host_wr__payload.value = pack(wr_l, {"region": int(regions[i]), "word": int(words[i]),
                                                      "data": lanes_int(lanes[i]), "mask": (1 << L) - 1})
        await ReadOnly()
        if v and dut.host_wr__ready.value == 1:
            i += 1
        await edge()
    dut.host_wr__valid.value = 0
    for _ in range(4):
        await edge()

    # -- the ops, with stalls everywhere and host reads competing ---------------------------
    ops = [int(o) for o in meta["ops"]]
    serial, contention = meta.get("serial", False), meta.get("contention", True)
    names = meta["names"]
    dones, argmax, accepted, done_at = 0, [], [], []
    i, t0 = 0, t
    all_regions = list(bm.values())
    budget = 20000 + 40 * sum(len(z[f"chk{k}_words"]) for k in range(len(meta["checks"]))) * L
    while dones < len(ops):
        assert t - t0 < budget, f"SFU unit hung: {dones} of {len(ops)} ops done ({names[dones]} pending) " \
                                f"after {t - t0} cycles"
        v = i < len(ops) and rng.random() >= stall and (not serial or i == dones)
        dut.op__valid.value = int(v)
        if v:
            dut.op__payload.value = ops[i]
        dut.stall.value = rng.getrandbits(4) if rng.random() < stall else 0
        hv = contention and rng.random() < 0.2
        dut.host_rd_req__valid.value = int(hv)
        if hv:
            r = all_regions[rng.randrange(len(all_regions))]
            dut.host_rd_req__payload.value = pack(rd_l, {"region": r.id, "word": rng.randrange(r.words)})
        await ReadOnly()
        if v and dut.op__ready.value == 1:
            i += 1
            accepted.append(t - t0)
        if dut.done.value == 1:
            dones += 1
            done_at.append(t - t0)
        if dut.argmax_valid.value == 1:
            argmax.append(dut.argmax.value.to_unsigned())
        await edge()
    cycles = t - t0
    dut.op__valid.value = 0
    dut.stall.value = 0
    dut.host_rd_req__valid.value = 0
    for _ in range(8):
        await edge()

    # -- read back what changed ----------------------------------------------------------------
    failures = []
    for k, chk in enumerate(meta["checks"]):
        want_words = z[f"chk{k}_words"]
        want, cover = z[f"chk{k}_want"], z[f"chk{k}_cover"]
        got = np.zeros_like(want)
        sent = back = 0
        t0 = t
        while back < len(want_words):
            assert t - t0 < 4 * len(want_words) + 100, f"host reads of {chk['name']} hung"
            v = sent < len(want_words)
            dut.host_rd_req__valid.value = int(v)
            if v:
                dut.host_rd_req__payload.value = pack(rd_l, {"region": chk["region"], "word": int(want_words[sent])})
            await ReadOnly()
            if dut.host_rd_data__valid.value == 1:
                w = dut.host_rd_data__payload.value.to_unsigned()
                got[back] = [(w >> (32 * ln)) & 0xFFFFFFFF for ln in range(L)]
                back += 1
            if v and dut.host_rd_req__ready.value == 1:
                sent += 1
            await edge()
        dut.host_rd_req__valid.value = 0
        ok = (got == want) | ~cover
        if chk["float"]:
            ok |= _nan(got) & _nan(want)
        if not ok.all():
            bad = np.argwhere(~ok)
            w, ln = bad[0]
            failures.append(f"region {chk['name']}: {len(bad)} lanes differ; first word {int(want_words[w])} "
                            f"lane {ln}: RTL {got[w, ln]:#010x}, golden {want[w, ln]:#010x}")
    if meta["n_argmax"]:
        if len(argmax) != meta["n_argmax"] or argmax[-1] != meta["argmax"]:
            failures.append(f"ARGMAX: RTL {argmax}, golden {meta['argmax']} (of {meta['n_argmax']})")
    with open(path + ".cycles.json", "w") as f:
        json.dump({"cycles": cycles, "ops": names, "accepted": accepted, "done": done_at}, f)
    assert not failures, "\n".join(failures)
