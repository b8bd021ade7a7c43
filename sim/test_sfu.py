"""cocotb RTL tests of the SFU unit on the on-chip buffers, bit-exact against the golden model.

One Verilated build (``sim_build/sim-sfu-sfu-<hash>``) of :class:`flightllm.sim.sfu_top.SfuTestTop`
for :data:`PARAMS`: the ``sim`` preset's 8 lanes with buffers sized for SmolLM2-135M (so
its real activations fit) and 4 token rows. Each test runs its SFU instructions back to
back in one simulation (random stalls on the op stream and on every buffer port, host
reads competing for the memories) and compares every buffer region they change with
the golden model's result (:mod:`flightllm.sim.sfu_cases`).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from flightllm.hw.isa import Buf, Instr, Opcode, Reg, UNIT_OF, Unit
from flightllm.hw.params import get_preset
from flightllm.runtime import sfu
from flightllm.sim import rtl
from flightllm.sim.sfu_cases import make_case, save

F32 = np.float32
#: SmolLM2-135M's envelope (hidden 576, FFN 1536, 49152 logits, 9 heads, 3 kv heads, 4096
#: positions) on 8 lanes, 4 token rows
PARAMS = dataclasses.replace(get_preset("sim"), name="sim-sfu", mm_tokens=4, max_seq_len=4096,
                             act_buf_depth=65536, buf_hidden=576, buf_ffn=1536, buf_vocab=49152, buf_heads=9,
                             buf_kv_heads=3, buf_tables=300_000)
SPECIAL = np.array([0, -0.0, np.inf, -np.inf, np.nan, 3.4e38, -3.4e38, 1.1754944e-38, 1e-45, -1e-45, 1e-40,
                    1, -1, 2.5, 65504, 7], F32)


def run_case(tag, case, stall=0.25, seed=0, **kw):
    """Run ``case`` on the build; returns the testbench's cycle stamps (``kw``: see
    :func:`flightllm.sim.sfu_cases.save`)."""
    stim = save(rtl.build_dir(PARAMS, rtl.SFU) / f"run-{tag}" / "stimuli.npz", case, stall, seed, **kw)
    rtl.run(PARAMS, "sfu_case", stim, tag, test_module="flightllm.sim.sfu_tb", seed=seed + 1, design=rtl.SFU)
    return json.loads(stim.with_name(stim.name + ".cycles.json").read_text())


def _rows(rng, r, n, special=False):
    x = (rng.standard_normal((r, n)) * 10 ** rng.uniform(-2, 2, (r, 1))).astype(F32)
    if special:
        x[0, :len(SPECIAL)] = SPECIAL[:n]
        if r > 1:
            x[1] = F32(-3.25)
        if r > 2:
            x[2, ::3] = rng.uniform(-1, 1, x[2, ::3].shape).astype(F32) * F32(1e-39)     # subnormals
    return x


def random_case(rng, special, T=3, n=256):
    tables = rng.uniform(-1, 1, 4096).astype(F32)
    regs = [0] * 16
    regs[Reg.CLEN.value], regs[Reg.POS.value], regs[Reg.LEN.value] = T, 5, 40
    S = (rng.standard_normal((T, 8, 128)) * 3).astype(F32)
    special = special and T >= 3
    if special:
        S[0, 2, :4] = [np.inf, -np.inf, np.nan, 0]
        S[1, 5] = F32(2.0)                                   # an all-equal row
    bufs = {Buf.X.value: _rows(rng, T, n, special), Buf.Y.value: _rows(rng, T, n),
            Buf.G.value: _rows(rng, T, n, special), Buf.U.value: _rows(rng, T, n, special),
            Buf.S.value: S, Buf.VS.value: rng.uniform(0.001, 0.05, (128, 2)).astype(F32)}
    plan = {"max_seq": 128, "kv_bytes": 0, "out_row_bytes": 4, "heads": 8, "kv_heads": 2, "head_dim": 32,
            "layers": 1, "kv_format": "int8r/32", "kv_base": 0}
    c = dict(rows_reg=Reg.CLEN)
    prog = [
        Instr(Opcode.RMSNORM, dict(src=Buf.X, dst=Buf.H, n=n, table=64, imm=1e-5, **c)),
        Instr(Opcode.ADD, dict(src=Buf.X, src2=Buf.Y, dst=Buf.A, n=n, **c)),
        Instr(Opcode.SILU_MUL, dict(src=Buf.G, src2=Buf.U, dst=Buf.K, n=n, **c)),
        Instr(Opcode.ROPE, dict(src=Buf.Y, dst=Buf.Q, n=n, seg=32, table=512, aux_reg=Reg.POS, **c)),
        Instr(Opcode.QUANT, dict(src=Buf.H, dst=Buf.QQ, n=n, seg=32, **c)),       # reads RMSNORM's result
        Instr(Opcode.QUANTG, dict(src=Buf.A, dst=Buf.HQ, n=n, seg=32, **c)),
        Instr(Opcode.DEQUANT, dict(src=Buf.HQ, dst=Buf.V, n=n, seg=32, aux=1, **c)),
        Instr(Opcode.QUANT, dict(src=Buf.K, dst=Buf.KQ, n=n, seg=0, imm=7.0, **c)),
        Instr(Opcode.DEQUANT, dict(src=Buf.KQ, dst=Buf.Y, n=n, seg=0, **c)),
        Instr(Opcode.SOFTMAX, dict(src=Buf.S, dst=Buf.PQ, aux=Buf.VS, rows_reg=Reg.CLEN, len_reg=Reg.LEN,
                                   len_add=-3, kvh=1, rep=4, cap=128, scale=float(sfu.score_scale(32)))),
        Instr(Opcode.SOFTMAX, dict(src=Buf.S, dst=Buf.PQ, aux=Buf.VS, rows_reg=Reg.CLEN, len_reg=Reg.LEN,
                                   kvh=0, rep=3, cap=128, sink=1, window=2, scale=0.125)),   # block-sparse
        Instr(Opcode.SOFTMAX, dict(src=Buf.S, dst=Buf.PQ, aux=Buf.VS, rows_reg=Reg.CLEN, len_reg=Reg.LEN,
                                   kvh=0, kvn=2, rep=3, cap=128, scale=0.2)),            # two kv heads
        Instr(Opcode.FILL, dict(dst=Buf.G, n=n, imm=-1.5, **c)),
        Instr(Opcode.ARGMAX, dict(src=Buf.X, n=n, **c)),
    ]
    case = make_case(PARAMS, bufs, tables, plan, prog, regs)
    case.update(prog=prog, plan=plan, regs=regs)
    return case


@pytest.mark.rtl
@pytest.mark.parametrize("special", [False, True], ids=["random", "special"])
def test_every_sfu_instruction(special):
    """Every SFU opcode (SOFTMAX dense and block-sparse, QUANT per segment and per row with a
    smaller level, DEQUANT of both) on random rows or special values (zeros, +-inf, NaN,
    extreme normals, subnormals, -0.0, all-equal rows); several ops read the one before."""
    run_case("special" if special else "random", random_case(np.random.default_rng(7 + special), special),
             seed=int(special))


def smollm2_cases():
    """The SFU instructions of the last layer of SmolLM2's prefill and decode programs on
    the buffers the golden model holds after a prefill of 20 tokens (the program's last
    chunk: 4 token rows) and after the decode step that follows."""
    from flightllm.runtime.cli import resolve_artifact
    from flightllm.runtime.driver import Driver

    art = resolve_artifact(None, "native", "u280", quiet=True)
    drv = Driver(art)
    dev = drv.dev
    ids = drv.tok.encode("The capital of France is Paris, the capital of Italy is Rome, and the capital of "
                         "Spain is Madrid. The capital of Germany is")[:20]
    assert len(ids) == 20
    cases = []
    for mode in ("prefill", "decode"):
        if mode == "prefill":
            drv.prefill(ids, all_logits=True)     # the "prefill" program: every row to the logits
        else:
            drv.step(int(ids[-1]))
        g = dev.machine
        prog = dev.programs[mode]
        sfu_ins = [ins for ins in prog if UNIT_OF[ins.op] == Unit.SFU]
        tail = [ins.with_(wait=0, signal=0) for ins in sfu_ins[-14:]]   # the last layer and the head; no tokens
        rows = PARAMS.mm_tokens                 # the last chunk's rows (its CLEN <= 4): crop the rest

        def crop(b, a):
            return None if a is None else (a.copy() if b in (Buf.KS.value, Buf.VS.value) else a[:rows].copy())

        bufs = {b: (tuple(crop(b, a) for a in v) if isinstance(v, tuple) else crop(b, v)) for b, v in g.bufs.items()}
        case = make_case(PARAMS, bufs, g.tables, dev.plan, tail, list(g.regs))
        case.update(prog=tail, plan=dev.plan, regs=list(g.regs))
        cases.append((mode, case))
    return cases


@pytest.mark.rtl
@pytest.mark.model
def test_smollm2_activations():
    """Real activations: SmolLM2-135M's own SFU instructions on its buffers after a prefill
    chunk (4 token rows) and after a decode step, including SOFTMAX over its 9 heads and
    ARGMAX over the 49152 logits."""
    from flightllm.compiler.gguf_import import GGUFError, default_model_path
    try:
        default_model_path()
    except GGUFError as e:
        pytest.skip(str(e))
    for mode, case in smollm2_cases():
        run_case(f"smollm2-{mode}", case, seed=11)
