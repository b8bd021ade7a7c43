"""cocotb RTL test of the LD / ST space transfers (hw/ldst.py) against cocotbext-axi's AxiRam,
bit-exact against the golden model.

One Verilated build (``sim_build/ldst-rtl-ldst-<hash>``) of
:class:`flightllm.sim.ldst_top.LdStTestTop` for :data:`PARAMS`: the ``sim`` preset's 256-bit
ports and 8 lanes with two kv channels (each an AxiRam holding its share of the spaces, as
:mod:`flightllm.hw.memmap` interleaves them) and small buffers. The case (:func:`make_case`):
random LD_KV into X, KS, VS and random ST_KV / ST_OUT (unaligned addresses and lengths,
rows from a register or the field, ``preg * pmul`` patches), LD and ST running at once on
disjoint data (LD reads the first half of space KV, ST_KV writes the second); then one bad
entry per engine, which must fault with its pc until ``abort``. The expected buffers and
spaces come from :class:`~flightllm.runtime.golden.Golden` running the same instructions.
The testbench (sim/ldst_tb.py) loads the buffers through the host port, pauses every AXI
channel at random, stalls the issue streams, and bounds every wait.
"""

from __future__ import annotations

import dataclasses
import json
import random

import numpy as np
import pytest

from flightllm.hw.buffers import buffer_map
from flightllm.hw.isa import Buf, Instr, Opcode, Reg, Space, encode, reg_values
from flightllm.hw.ldst import targets
from flightllm.hw.memmap import GRANULE
from flightllm.hw.params import get_preset
from flightllm.runtime.golden import Golden
from flightllm.sim import rtl

F32 = np.float32
PARAMS = dataclasses.replace(get_preset("sim"), name="ldst-rtl", kv_channels=2, mm_tokens=4, max_seq_len=64,
                             kv_tile=16, buf_hidden=256, buf_ffn=64, buf_vocab=128, buf_heads=2, buf_kv_heads=3,
                             buf_tables=64)
KV_SPACE, PER_KV, PER_OUT = 4096, 8192, 4096
SPACES = dict(kv_space=KV_SPACE, out_space=KV_SPACE + PER_KV, tok_space=KV_SPACE + PER_KV + PER_OUT)
CHAN_BYTES = KV_SPACE + PER_KV + PER_OUT + 4096
LD_REGIONS = ("X", "KS", "VS")
ST_REGIONS = ("LOG", "KQ.scale", "VQ.scale")


def _make(params):
    from flightllm.sim.ldst_top import LdStTestTop
    return LdStTestTop(params)


LDST = rtl.Design("ldst", "flightllm_ldst", _make, lambda: rtl._import_closure("sim/ldst_top.py"),
                  waivers=())


def _split(img, K):
    g = np.asarray(img, np.uint8).reshape(-1, K, GRANULE)
    return [g[:, c, :].reshape(-1) for c in range(K)]


def _instr(rng, p, op, buf, room, lo=0):
    _, caprows, capw, _ = targets(p, op)[buf]
    rows = rng.choice([1, caprows, rng.randint(1, caprows)])
    ne = min(rng.choice([1, capw, rng.randint(1, capw)]), room // (8 * rows))
    n = rows * ne * 4
    A = lo + rng.choice([rng.randint(0, room // 2 - n), rng.randint(0, (room // 2 - n) // 32) * 32])
    regs = [0] * 16
    f = dict(buf=buf, space=Space.OUT if op == Opcode.ST_OUT else Space.KV, row_bytes=4 * ne)
    if rng.random() < 0.5:
        f.update(rows=rows)
    else:
        regs[Reg.CLEN.value] = rows
        f.update(rows_reg=Reg.CLEN, rows=rng.randint(0, 500))
    if rng.random() < 0.5 and A:
        pmul = rng.randint(1, min(A, 200))
        regs[Reg.R10.value] = rng.randint(0, A // pmul)
        f.update(preg=Reg.R10, pmul=pmul, addr=A - regs[Reg.R10.value] * pmul)
    else:
        f.update(addr=A)
    return Instr(op, f), regs


def make_case(seed, n=12):
    """Stimuli and expectations (arrays; module docstring)."""
    p, K, L = PARAMS, PARAMS.kv_channels, PARAMS.sfu_lanes
    rng, rng_np = random.Random(seed), np.random.default_rng(seed)
    bm = buffer_map(p)
    plan = {"max_seq": 64, "kv_bytes": PER_KV * K, "out_row_bytes": PER_OUT * K // 64, "kv_heads": 1}
    regions = {nm: rng_np.integers(0, 1 << 32, (bm[nm].words, L), dtype=np.uint64).astype(np.uint32)
               for nm in LD_REGIONS + ST_REGIONS}
    kv = rng_np.integers(0, 256, PER_KV * K, dtype=np.uint8)
    out = rng_np.integers(0, 256, PER_OUT * K, dtype=np.uint8)
    chans = []
    for kv_part, out_part in zip(_split(kv, K), _split(out, K)):
        mem = rng_np.integers(0, 256, CHAN_BYTES, dtype=np.uint8)
        mem[KV_SPACE:KV_SPACE + PER_KV], mem[KV_SPACE + PER_KV:KV_SPACE + PER_KV + PER_OUT] = kv_part, out_part
        chans.append(mem)
    ld = [_instr(rng, p, Opcode.LD_KV, rng.choice([Buf.X, Buf.KS, Buf.VS]), PER_KV * K) for _ in range(n)]
    st = [_instr(rng, p, Opcode.ST_OUT, Buf.LOG, PER_OUT * K) if rng.random() < 0.5 else
          _instr(rng, p, Opcode.ST_KV, rng.choice([Buf.KQ, Buf.VQ]), PER_KV * K, lo=PER_KV * K // 2)
          for _ in range(n)]
    g = Golden(p, [], np.zeros(16, F32), plan)
    g.kv[:] = kv
    g.out = out.copy()
    want = {nm: regions[nm].reshape(-1).copy() for nm in LD_REGIONS}
    for ins, regs in ld:
        g.run([ins, Instr(Opcode.END)], dict(enumerate(regs)))
        b = Buf(ins.f["buf"])
        v = np.asarray(g.bufs[b.value], F32)
        RL = bm[b.name].row_words * L
        r, e = np.meshgrid(np.arange(v.shape[0]), np.arange(v.shape[1]), indexing="ij")
        want[b.name][e * RL + r if b in (Buf.KS, Buf.VS) else r * RL + e] = v.view(np.uint32)
    for ins, regs in st:
        b = Buf(ins.f["buf"])
        ne = ins.f["row_bytes"] // 4
        if ins.op == Opcode.ST_KV:
            r = bm[b.name + ".scale"]
            sc = regions[b.name + ".scale"].reshape(r.rows, r.row_words * L)[:, :ne].copy().view(F32)
            g.bufs[b.value] = (np.zeros((r.rows, bm[b.name].width), np.int8), sc, None)
        else:
            r = bm[b.name]
            g.bufs[b.value] = regions[b.name].reshape(r.rows, r.row_words * L)[:, :ne].copy().view(F32)
        g.run([ins, Instr(Opcode.END)], dict(enumerate(regs)))
    want_chans = []
    for c, (kv_part, out_part) in enumerate(zip(_split(g.kv, K), _split(g.out, K))):
        mem = chans[c].copy()
        mem[KV_SPACE:KV_SPACE + PER_KV], mem[KV_SPACE + PER_KV:KV_SPACE + PER_KV + PER_OUT] = kv_part, out_part
        want_chans.append(mem)
    arrays = {f"chan{c}": m for c, m in enumerate(chans)}
    arrays.update({f"chan{c}_final": m for c, m in enumerate(want_chans)})
    arrays.update({f"region_{nm}": regions[nm] for nm in regions})
    arrays.update({f"want_{nm}": want[nm] for nm in want})

    def entries(prog):
        return np.array([[encode(ins), pc, *reg_values(ins, regs)] for pc, (ins, regs) in enumerate(prog)],
                        dtype=object)
    bad_ld = (Instr(Opcode.LD_KV, dict(buf=Buf.X, space=Space.OUT, rows=1, row_bytes=16)), [0] * 16)
    bad_st = (Instr(Opcode.ST_OUT, dict(buf=Buf.LOG, space=Space.OUT, rows=1, row_bytes=16,
                                        addr=PER_OUT * K - 8)), [0] * 16)
    arrays["ld_entries"], arrays["st_entries"] = entries(ld), entries(st)
    arrays["bad_entries"] = entries([bad_ld, bad_st])
    return arrays


def save_case(path, arrays, seed, stall=0.3, pause=0.25):
    meta = {"params": PARAMS.to_dict(), "spaces": SPACES, "chan_bytes": CHAN_BYTES, "seed": seed,
            "stall": stall, "pause": pause, "ld_regions": LD_REGIONS, "st_regions": ST_REGIONS}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    packed = {k: (np.array([[str(x) for x in row] for row in v]) if v.dtype == object else v)
              for k, v in arrays.items()}
    np.savez(tmp, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), **packed)
    tmp.replace(path)
    return path


@pytest.mark.rtl
def test_ldst_on_axiram():
    """LD and ST at once on two kv channels of AxiRam (random pauses, stalled issue streams):
    every buffer word and every channel byte as the golden model says; a bad entry faults."""
    tag, seed = "random", 5
    stim = rtl.build_dir(PARAMS, LDST) / f"run-{tag}" / "stimuli.npz"
    save_case(stim, make_case(seed), seed)
    rtl.run(PARAMS, "ldst_case", stim, tag, test_module="flightllm.sim.ldst_tb", seed=seed, design=LDST)
    res = json.loads(stim.with_name(stim.name + ".result.json").read_text())
    assert res["ld_done"] == res["st_done"] == 12, res


@pytest.mark.rtl
def test_ldst_verilator_lint_clean():
    """The test top's Verilog under ``verilator --lint-only -Wall`` with only the named waivers."""
    import os
    import subprocess

    env = rtl.verilator_env()
    vfile = rtl.verilog(PARAMS, LDST)
    r = subprocess.run(["verilator", "--lint-only", "-Wall", *rtl.waiver_args(), "--top-module", LDST.top,
                        str(vfile)], capture_output=True, text=True, env={**os.environ, **env})
    assert r.returncode == 0 and "%Warning" not in r.stderr and "%Error" not in r.stderr, r.stderr[-3000:]
