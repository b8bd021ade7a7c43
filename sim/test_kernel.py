"""The whole kernel (hw/kernel.py) under Verilator, driven by the host's register-level driver
(runtime/kernel.py through runtime/rtl.py: the path ``--backend rtl`` takes), against the
golden model.

A tiny random model (``flightllm tiny-model``) compiled for the ``sim`` preset is loaded
into the simulated HBM (random pauses on every AXI channel). Programs built from its own
instructions run on the kernel and on the golden model; the registers the host reads
must agree, and every fault must end the run with the status and pc the specification
gives.
"""

from __future__ import annotations

import numpy as np
import pytest

from flightllm.hw.isa import Buf, Instr, Opcode, Reg, Unit, encode, encode_program
from flightllm.hw.regmap import Status

pytestmark = pytest.mark.rtl

#: cycles a run of these tests may take (their programs take thousands; the watchdog ends a
#: stuck one long before)
MAX_CYCLES = 2_000_000
#: random programs of the fuzz test
FUZZ_RUNS = 60


@pytest.fixture(scope="module")
def tiny_sim(tmp_path_factory):
    from flightllm.compiler.compile import compile_model
    from flightllm.compiler.tiny import write_tiny_model
    from flightllm.hw.params import get_preset

    d = tmp_path_factory.mktemp("kernel")
    g = write_tiny_model(d / "tiny.gguf", tokenizer_from=None)
    compile_model(g, d / "art", "native", get_preset("sim"), progress=False)
    return d / "art"


def _load_both(path):
    from flightllm.compiler.artifact import Artifact
    from flightllm.runtime.device import GoldenDevice
    from flightllm.runtime.rtl import RtlDevice

    art = Artifact(path)
    rtl = RtlDevice()
    rtl.load(art)
    gold = GoldenDevice(weight_cache=False)
    gold.load(art)
    return rtl, gold


@pytest.fixture(scope="module")
def devices(tiny_sim):
    rtl, gold = _load_both(tiny_sim)
    yield rtl, gold
    rtl.close()


def _kv_golden(gold):
    """The golden model's KV state as the kernel's read_kv() gives it."""
    m, plan = gold.machine, gold.plan
    base, n = plan["kv_base"], plan["kv_channel_bytes"]
    return [bytes(ch[base:base + n]) for ch in m.channels], m.kv.tobytes()


def _same(a, b):
    return np.array_equal(np.asarray(a, np.float32).view(np.uint32), np.asarray(b, np.float32).view(np.uint32))


def _generate_both(rtl, gold, prompt, steps):
    """Prefill ``prompt`` then ``steps`` greedy decode steps on both devices, comparing the
    logits (bit for bit), the ARGMAX register and the KV state after every run."""
    ids = []
    for d in (rtl, gold):
        d.write_tokens(0, prompt)
        d.write_reg("POS", 0)
        d.write_reg("LEN", len(prompt))
        d.start("prefill_last")
        d.wait()
    assert _same(rtl.read_logits(0, 1), gold.read_logits(0, 1)), "prefill logits differ"
    assert rtl.read_reg("ARGMAX") == gold.read_reg("ARGMAX")
    assert rtl.read_kv() == _kv_golden(gold), "KV state differs after prefill"
    tok = gold.read_reg("ARGMAX")
    for k in range(steps):
        pos = len(prompt) + k
        for d in (rtl, gold):
            d.write_tokens(pos, [tok])
            d.write_reg("POS", pos)
            d.write_reg("LEN", 1)
            d.start("decode")
            d.wait()
        assert _same(rtl.read_logits(0, 1), gold.read_logits(0, 1)), f"decode logits differ at position {pos}"
        assert rtl.read_reg("ARGMAX") == gold.read_reg("ARGMAX")
        ids.append(tok)
        tok = gold.read_reg("ARGMAX")
    assert rtl.read_kv() == _kv_golden(gold), "KV state differs after decode"
    return ids + [tok]


def test_tiny_model_prefill_and_decode_are_bit_identical(devices):
    """The artifact's own programs: prefill (one chunk) and decode at the next positions."""
    rtl, gold = devices
    prompt = [int(t) for t in np.random.default_rng(3).integers(0, gold.plan["vocab"], 6)]
    ids = _generate_both(rtl, gold, prompt, steps=3)
    assert len(ids) == 4


def test_tiny_model_sparse_preset_is_bit_identical(tmp_path_factory):
    """The same on a 2:4-sparse compile (N:M-sparse INT4 layers, the sparse MUX path)."""
    from flightllm.compiler.compile import compile_model
    from flightllm.compiler.tiny import write_tiny_model
    from flightllm.hw.params import get_preset

    d = tmp_path_factory.mktemp("sparse")
    compile_model(write_tiny_model(d / "tiny.gguf", seed=1), d / "art", "w4-2:4", get_preset("sim"), progress=False)
    rtl, gold = _load_both(d / "art")
    try:
        prompt = [int(t) for t in np.random.default_rng(4).integers(0, gold.plan["vocab"], 5)]
        _generate_both(rtl, gold, prompt, steps=2)
    finally:
        rtl.close()


def _first(prog, op):
    return next(i for i in prog if i.op == op)


def _norm_argmax_program(gold, row_value=1.0):
    """FILL X; RMSNORM X -> H with the first norm weights of the decode program; ARGMAX H."""
    rms = _first(gold.programs["decode"], Opcode.RMSNORM)
    n = rms.f["n"]
    return [Instr(Opcode.FILL, dict(dst=Buf.X, n=n, imm=row_value)),
            rms.with_(src=Buf.X, dst=Buf.H, rows_reg=Reg.ZERO, wait=0, signal=0),
            Instr(Opcode.ARGMAX, dict(src=Buf.H, n=n)),
            Instr(Opcode.END)]


def test_sfu_program_through_the_host_path(devices):
    """Tables loaded from the instr buffer, SFU ops on the buffers, ARGMAX read back by the host."""
    rtl, gold = devices
    for value in (1.0, -2.5):
        prog = _norm_argmax_program(gold, value)
        gold.machine.run(prog)
        want = gold.machine.regs[Reg.ARGMAX.value]
        st = rtl.run_program(encode_program(prog), max_cycles=MAX_CYCLES)
        assert Status(st["status"]) == Status.OK, st
        assert st["argmax"] == want
        assert st["cycles"] > 0


def _ldst_program(gold, k_value, logit_value):
    """The decode program's own QUANT / ST_KV / LD_KV / ST_OUT on filled buffers: a key row
    quantized and its scale stored at position POS, the scales of positions <= POS loaded
    back, a logits row stored (tokens between the units as the program needs them)."""
    dec = gold.programs["decode"]
    quant = next(i for i in dec if i.op == Opcode.QUANT and i.f.get("dst") == Buf.KQ)
    st_kv = _first(dec, Opcode.ST_KV)
    ld_kv = _first(dec, Opcode.LD_KV)
    st_out = _first(dec, Opcode.ST_OUT)
    vocab = gold.plan["vocab"]
    sfu, st, ld = (1 << u.value for u in (Unit.SFU, Unit.ST, Unit.LD))
    return [Instr(Opcode.SETR, dict(rd=Reg.CPOS, rb=Reg.POS, lim=0xFFFFFFFF)),
            Instr(Opcode.SETR, dict(rd=Reg.CLEN, add=1, lim=0xFFFFFFFF)),
            Instr(Opcode.SETR, dict(rd=Reg.KVLEN, rb=Reg.POS, add=1, lim=0xFFFFFFFF)),
            Instr(Opcode.SETR, dict(rd=Reg.OUTROW, lim=0xFFFFFFFF)),
            Instr(Opcode.FILL, dict(dst=Buf.K, n=quant.f["n"], imm=k_value, rows_reg=Reg.CLEN)),
            quant.with_(wait=0, signal=st),
            st_kv.with_(wait=sfu, signal=ld),
            ld_kv.with_(wait=st, signal=0),
            Instr(Opcode.FILL, dict(dst=Buf.LOG, n=vocab, imm=logit_value, rows_reg=Reg.CLEN, signal=st)),
            st_out.with_(wait=sfu, signal=0),
            Instr(Opcode.END)]


def test_ld_st_spaces_through_the_host_path(devices):
    """ST_KV and ST_OUT into the interleaved spaces, LD_KV back: the KV space bytes and the
    logits the host reads equal the golden model's."""
    rtl, gold = devices
    for pos, kv, lg in ((0, 0.5, -1.25), (3, -3.0, 7.0), (1, 1e-3, 0.0)):
        prog = _ldst_program(gold, kv, lg)
        for d in (rtl, gold):
            d.write_reg("POS", pos)
            d.write_reg("LEN", 1)
        gold.machine.run(prog)
        st = rtl.run_program(encode_program(prog), max_cycles=MAX_CYCLES)
        assert Status(st["status"]) == Status.OK, st
        _, space = rtl.read_kv()
        assert space == gold.machine.kv.tobytes()
        assert np.array_equal(rtl.read_logits(0, 1).view(np.uint32), gold.read_logits(0, 1).view(np.uint32))


def test_faults_end_the_run_with_their_status(devices):
    rtl, gold = devices
    good = _norm_argmax_program(gold)
    fill = good[0]
    cases = [
        ([fill, fill, 0x3F, Instr(Opcode.END)], Status.ILLEGAL_OPCODE, 2),
        ([fill, fill.with_(wait=1 << Unit.MPE.value), Instr(Opcode.END)], Status.DEADLOCK, 1),
        ([fill.with_(signal=1 << Unit.MPE.value), Instr(Opcode.END)], Status.UNBALANCED_TOKENS, 1),
        ([fill, Instr(Opcode.NOP)], Status.PAST_END, 2),
        # SOFTMAX attending no position: the SFU's decoder rejects it
        ([fill, _first(gold.programs["decode"], Opcode.SOFTMAX).with_(len_reg=Reg.ZERO, len_add=0, wait=0,
                                                                      signal=0), Instr(Opcode.END)],
         Status.BAD_FIELD, 1),
    ]
    for prog, status, pc in cases:
        image = b"".join((w if isinstance(w, int) else encode(w)).to_bytes(16, "little") for w in prog)
        st = rtl.run_program(image, max_cycles=MAX_CYCLES)
        assert (Status(st["status"]), st["err_pc"]) == (status, pc), prog
        # and the kernel is clean afterwards: the good program runs as before
        gold.machine.run(good)
        st = rtl.run_program(encode_program(good), max_cycles=MAX_CYCLES)
        assert Status(st["status"]) == Status.OK and st["argmax"] == gold.machine.regs[Reg.ARGMAX.value]


def test_watchdog_ends_a_stuck_run(devices):
    """With a watchdog shorter than the SFU's latency, the END barrier waits longer than it
    allows: the run ends with WATCHDOG while the SFU still works, the unit is aborted, and
    the next run (default watchdog) is clean."""
    rtl, gold = devices
    good = _norm_argmax_program(gold)
    rtl.drv.set_args(watchdog=50)
    try:
        st = rtl.run_program(encode_program(good), max_cycles=MAX_CYCLES)
    finally:
        rtl.drv.set_args(watchdog=0)
    assert (Status(st["status"]), st["err_pc"]) == (Status.WATCHDOG, len(good) - 1)
    gold.machine.run(good)
    st = rtl.run_program(encode_program(good), max_cycles=MAX_CYCLES)
    assert Status(st["status"]) == Status.OK and st["argmax"] == gold.machine.regs[Reg.ARGMAX.value]


# ------------------------------------------------------------------------------------ fuzz
def _spec_status(words, regs):
    """What the specification says a program image does: (status, pc) of its first fault,
    or (OK, None). Undecodable words fault where the dispatcher reaches them (ILLEGAL_OPCODE
    for an unknown opcode, BAD_FIELD for a bad field, as :func:`flightllm.hw.isa.decode`
    rejects them); the rest is :func:`flightllm.runtime.golden.walk`."""
    from flightllm.hw.isa import IsaError, Opcode as Op, decode
    from flightllm.runtime.golden import GoldenError, prepare_control, walk

    prog, bad = [], {}
    never = 1 << Unit.LD.value            # no instruction of these programs signals LD
    for pc, w in enumerate(words):
        try:
            prog.append(decode(w))
        except IsaError:
            bad[pc] = Status.ILLEGAL_OPCODE if (w & 0x3F) not in {o.value for o in Op} else Status.BAD_FIELD
            prog.append(Instr(Op.FILL, dict(dst=Buf.A, n=1, wait=never)))     # faults when reached
    try:
        walk(prepare_control(prog), list(regs), lambda pc, ci: None)
    except GoldenError as e:
        return (bad[e.pc], e.pc) if e.pc in bad else (Status[e.status], e.pc)
    return Status.OK, None


def _fuzz_words(rng, fill, n):
    """SYS instructions (bounded loops), harmless FILLs, and bad words: random, bit-flipped
    and out-of-range fields. Every word that decodes is SYS or ``fill`` itself (what a unit
    makes of other fields is the units' tests' business); the scratch registers start at 0."""
    from flightllm.hw.isa import UNIT_OF, IsaError, decode

    def harmless(w):
        try:
            ins = decode(w)
        except IsaError:
            return True
        return UNIT_OF[ins.op] == Unit.SYS or w == encode(fill)

    regs = [Reg(r) for r in (0, 1, 2, *range(4, 16))]          # not ARGMAX: the last run's
    out = [encode(Instr(Opcode.SETR, dict(rd=Reg(r), lim=0))) for r in range(4, 16)]
    for _ in range(n):
        while True:
            r = rng.random()
            if r < 0.15:
                w = int.from_bytes(rng.bytes(16), "little")
            elif r < 0.25:
                w = encode(fill) ^ (1 << int(rng.integers(0, 128)))
            elif r < 0.45:
                w = encode(Instr(Opcode.SETR, dict(rd=Reg(int(rng.integers(4, 16))), rb=regs[rng.integers(len(regs))],
                                                   add=int(rng.integers(-3, 4)), lim=int(rng.integers(0, 4)))))
            elif r < 0.6:
                w = encode(Instr(Opcode.LOOP, dict(rd=Reg(int(rng.integers(0, 16))), ra=Reg(int(rng.integers(4, 16))),
                                                   add=int(rng.integers(-1, 3)), body=int(rng.integers(0, 6)))))
            elif r < 0.65:
                w = encode(Instr(Opcode.NOP))
            else:
                w = encode(fill)
            if harmless(w):
                break
        out.append(w)
    if rng.random() < 0.7:
        out.append(encode(Instr(Opcode.END)))
    return out


def test_fuzz_always_ends_with_the_status_the_spec_gives(devices):
    """Random programs of SYS instructions, FILLs and bad words: every run reaches ap_done,
    with exactly the status and pc the specification gives; the kernel is clean afterwards."""
    rtl, gold = devices
    good = _norm_argmax_program(gold)
    fill = good[0]
    rng = np.random.default_rng(7)
    counts = {}
    for k in range(FUZZ_RUNS):
        words = _fuzz_words(rng, fill, int(rng.integers(3, 24)))
        want = _spec_status(words, [0, 0, 1] + [0] * 13)
        image = b"".join(w.to_bytes(16, "little") for w in words)
        rtl.write_reg("POS", 0)
        rtl.write_reg("LEN", 1)
        st = rtl.run_program(image, max_cycles=MAX_CYCLES)
        got = (Status(st["status"]), st["err_pc"] if st["status"] else None)
        assert got == want, (k, [hex(w) for w in words])
        counts[want[0].name] = counts.get(want[0].name, 0) + 1
    gold.machine.run(good)
    st = rtl.run_program(encode_program(good), max_cycles=MAX_CYCLES)
    assert Status(st["status"]) == Status.OK and st["argmax"] == gold.machine.regs[Reg.ARGMAX.value]
    print("fuzz outcomes:", counts)
    assert len(counts) >= 4             # the fuzz reaches several kinds of ending
