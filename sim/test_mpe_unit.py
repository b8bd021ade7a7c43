"""cocotb RTL tests of the MPE unit (hw/mpe_unit.py) on the on-chip buffers and AXI memories,
bit-exact against the golden model.

Verilated builds (``sim_build/<name>-mpe_unit-<hash>``) of
:class:`flightllm.sim.mpe_unit_top.MpeUnitTestTop` for the parameter sets of
:data:`~flightllm.sim.mpe_unit_top.VARIANTS` (the ``sim`` engine with small buffers, and two
other geometries of engine and SFU lanes). Each test runs its MPE instructions back to back
in one simulation (random gaps between entries, random delays on ``mpe_tok``, random
stalls on the unit's buffer ports and random pauses on every AXI read channel, host reads
competing for the memories) and compares every word of the result regions with the
golden model's (:mod:`flightllm.sim.mpe_unit_cases`). :func:`test_cycles` times MVs, MMs,
QKs and PVs back to back at the golden model's channel rate against its cycle model.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from flightllm.hw.formats import WeightFormat
from flightllm.hw.isa import Buf, Instr, Opcode, Reg
from flightllm.hw.kvcache import K, V
from flightllm.hw.params import get_preset
from flightllm.runtime.golden import Golden
from flightllm.runtime.timing import timing_for
from flightllm.sim import rtl
from flightllm.sim.cases import random_qtensor
from flightllm.sim.mpe_unit_cases import Case, add_kv, attention_bufs, build, place_tensors, save
from flightllm.sim.mpe_unit_top import DESIGN, PARAMS, U280_2CH, VARIANTS

HD = 64                                     # head_dim of the test caches
F32 = np.float32
SFU_TOK, MPE_TOK = 8, 4                     # wait bits of the compute-phase tokens


def run(p, tag, built, seed=0, **kw):
    stim = save(rtl.build_dir(p, DESIGN) / f"run-{tag}" / "stimuli.npz", built, seed=seed, **kw)
    rtl.run(p, "mpe_unit_case", stim, tag, test_module="flightllm.sim.mpe_unit_tb", seed=seed + 1, design=DESIGN)
    return json.loads(stim.with_name(stim.name + ".cycles.json").read_text())


def regs_with(**kv):
    r = [0] * 16
    for k, v in kv.items():
        r[Reg[k].value] = v
    return r


def hq_buf(p, rng):
    """QUANTG's result: int8 rows, a float32 scale per row, a uint8 factor per 32 elements."""
    T, width = p.mm_tokens, p.buf_ffn
    q = rng.integers(-127, 128, (T, width)).astype(np.int8)
    a = (rng.uniform(0.5, 2.0, (T, 1)) * 10.0 ** rng.integers(-3, 1, (T, 1))).astype(F32)
    a[0, 0] = F32(0.0123)
    u = rng.integers(0, 256, (T, width // 32)).astype(np.uint8)
    u[0, 0], u[-1, -1] = 0, 255
    return (q, a, u)


def weight_setup(p, rng, shapes):
    """A tensor per (format, shape) (random values and scales), packed one after the other."""
    tensors = {}
    for i, (wf, n, k) in enumerate(shapes):
        tensors[f"w{i}"] = random_qtensor(wf, n, k, rng, ("typical", "wide", "subnormal", "large")[i % 4])
    return place_tensors(p, tensors)


def weight_instr(s, name, op, dst, rows_reg=Reg.ZERO, wait=0):
    off, pt = s.tensors[name]
    wf = pt.fmt
    n, k = pt.shape
    return Instr(op, dict(src=Buf.HQ, dst=dst, rows_reg=rows_reg, bits=wf.bits, n_keep=wf.n_keep, m=wf.m,
                          group_log2=wf.group_size.bit_length() - 1, kind=wf.kind, shift=pt.shift, n_out=n,
                          k_in=k, w_off=off, wait=wait, signal=4))


def weight_bufs(p, rng):
    T = p.mm_tokens
    return {Buf.HQ.value: hq_buf(p, rng), Buf.Y.value: rng.standard_normal((T, p.buf_hidden)).astype(F32),
            Buf.G.value: rng.standard_normal((T, p.buf_ffn)).astype(F32)}


def weights_case(p, rng):
    """Every weight format of the build, MV and MM (1..4 rows; K = 512 takes all of half the
    activation buffer, so such an MM runs a pass per row), ragged row tiles, one and many
    quant groups, outputs to Y and G, compute waits on some; and an MM of no rows."""
    R, T = p.chains, p.mm_tokens
    shapes = []
    for i, name in enumerate(p.weight_formats):
        wf = WeightFormat.parse(name)
        g = wf.group_size
        shapes += [(wf, 2 * R + 1 + i, max(g, 64)), (wf, 3 * R - 1, 4 * g if g < 64 else 256), (wf, 1, g),
                   (wf, 25 * R + i, 512)]
    s = weight_setup(p, rng, shapes)
    prog = []
    for i in range(len(shapes)):
        op = Opcode.MV if i % 4 in (0, 2) else Opcode.MM
        rows = [1, T, 2, 3][(i // 4 + i) % 4] if op == Opcode.MM else 1
        dst = (Buf.Y, Buf.G)[i % 2]
        wait = (0, SFU_TOK, SFU_TOK | MPE_TOK, 1)[i % 4]
        ins = weight_instr(s, f"w{i}", op, dst, Reg.CLEN if op == Opcode.MM else Reg.ZERO, wait)
        prog.append((ins, regs_with(CLEN=rows)))
    # an MM of no rows (nothing to do, but done, and its token)
    prog.append((weight_instr(s, "w0", Opcode.MM, Buf.Y, Reg.CLEN, SFU_TOK), regs_with(CLEN=0)))
    return Case(s, weight_bufs(p, rng), prog)


def attn_instr(op, kvl, kvh, rep, rows, length, sink=0, window=0, wait=0, len_add=0):
    """QK / PV of kv head ``kvh`` of ``kvl``: ``rows`` token rows, the last attending ``length``."""
    kind = K if op == Opcode.QK else V
    f = kvl.fmt_of(kind)
    fields = dict(src=Buf.QQ if op == Opcode.QK else Buf.PQ, dst=Buf.S if op == Opcode.QK else Buf.A,
                  rows_reg=Reg.CLEN, len_reg=Reg.KVLEN, len_add=len_add, kvh=kvh, rep=rep, head_dim=kvl.head_dim,
                  bits=f.bits, cap=kvl.cap, sink=sink, window=window, kv_off=kvl.head_offset(0, kind, kvh) // 64,
                  wait=wait, signal=4)
    if op == Opcode.QK:
        fields["aux"] = Buf.KS
    return Instr(op, fields), regs_with(CLEN=rows, KVLEN=length - rows + 1 - len_add)


def attn_bufs(p, rng, prog):
    T, heads = p.mm_tokens, p.buf_heads
    bufs = attention_bufs(rng, p, T, heads, HD, p.max_seq_len, p.buf_kv_heads, prog)
    bufs[Buf.A.value] = rng.standard_normal((T, heads * HD)).astype(F32)
    return bufs


def attention_case(p, rng, variant):
    """QK and PV of every kv head over two caches (INT8 keys / INT4 values and the reverse):
    decode (1 row) and prefill chunks (2-4 rows, several passes), dense and block-sparse
    (sink and window blocks of 64 positions, one or two streamed ranges), lengths from 1 to
    the capacity."""
    kvh_n, cap = p.buf_kv_heads, p.max_seq_len
    s = place_tensors(p, {})
    kvs = [add_kv(s, 1, kvh_n, HD, cap, "int8r/32", "int4r/32", rng),
           add_kv(s, 1, kvh_n, HD, cap, "int4r/32", "int8r/32", rng)]
    rep = p.buf_heads // kvh_n
    prog = []
    # (rows, length, sink, window) per kv head, QK and PV alike
    shapes = [[(1, 1, 0, 0), (3, 130, 0, 0), (1, 256, 1, 1), (4, 211, 1, 2)],
              [(2, 64, 0, 0), (1, 200, 0, 1), (3, 250, 2, 1), (1, 97, 0, 0)]][variant]
    for g in range(kvh_n):
        rows, length, sink, window = shapes[g]
        kvl = kvs[(g + variant) % 2]
        prog.append(attn_instr(Opcode.QK, kvl, g, rep, rows, length, sink, window, wait=(0, SFU_TOK)[g % 2]))
    for g in range(kvh_n):
        rows, length, sink, window = shapes[(g + 1) % kvh_n]
        kvl = kvs[(g + variant + 1) % 2]
        prog.append(attn_instr(Opcode.PV, kvl, g, rep, rows, length, sink, window, wait=SFU_TOK,
                               len_add=(g % 3) - 1))
    return Case(s, attn_bufs(p, rng, prog), prog)


#: CI builds the sim variant; the chunked-output and wide variants' builds run in the slow set
#: (sim/test_mpe.py covers the u280 geometry's engine in CI)
VARIANTS_CI = [n if n == "sim-mpeu" else pytest.param(n, marks=pytest.mark.slow_rtl) for n in VARIANTS]


@pytest.mark.rtl
@pytest.mark.parametrize("name", VARIANTS_CI)
def test_weights(name):
    """MV and MM in every weight format of the build, back to back, bit-exact."""
    p = VARIANTS[name]
    built = build(weights_case(p, np.random.default_rng(11)), p.buf_heads)
    run(p, "weights", built, seed=1)


@pytest.mark.rtl
@pytest.mark.parametrize("variant", [0, 1])
@pytest.mark.parametrize("name", VARIANTS_CI)
def test_attention(name, variant):
    """QK and PV (INT8 and INT4 caches, dense and block-sparse, 1..4 rows, several lengths),
    back to back, bit-exact with the golden model's S and A."""
    p = VARIANTS[name]
    built = build(attention_case(p, np.random.default_rng(20 + variant), variant), p.buf_heads)
    run(p, f"attention{variant}", built, seed=3 + variant)


@pytest.mark.rtl
@pytest.mark.parametrize("bad", ["mv", "qk"])
def test_fault_and_abort(bad):
    """An entry the unit rejects (an MV of 2 rows; a QK attending past its capacity) faults
    with its pc while earlier instructions stream and compute; under abort the unit drains
    its reads and drops its work (busy falls), then runs the next instructions bit-exactly."""
    p = PARAMS
    rng = np.random.default_rng(31 + (bad == "qk"))
    base = weights_case(p, rng)
    s = base.setup
    kvl = add_kv(s, 1, p.buf_kv_heads, HD, p.max_seq_len, "int8r/32", "int4r/32", rng)
    rep = p.buf_heads // p.buf_kv_heads
    big = [k for k, (ins, _) in enumerate(base.prog) if ins.f.get("k_in", 0) == 512]
    pre = [(base.prog[k][0].with_(dst=Buf.G), regs_with(CLEN=1)) for k in big[:3]]
    if bad == "mv":
        wrong = (Instr(Opcode.MV, {**base.prog[big[0]][0].f, "rows_reg": Reg.CLEN}), regs_with(CLEN=2))
    else:
        wrong = attn_instr(Opcode.QK, kvl, 1, rep, 2, p.max_seq_len + 1)
    post = [(base.prog[big[1]][0].with_(dst=Buf.Y), regs_with(CLEN=1)),
            attn_instr(Opcode.QK, kvl, 2, rep, 2, 77, wait=SFU_TOK),
            attn_instr(Opcode.PV, kvl, 3, rep, 1, 150, 1, 1, wait=SFU_TOK | MPE_TOK),
            (base.prog[big[2]][0].with_(dst=Buf.Y), regs_with(CLEN=1))]
    prog = pre + [wrong] + post
    bufs = attn_bufs(p, rng, prog)
    bufs.update(weight_bufs(p, rng))
    built = build(Case(s, bufs, prog, fault_at=len(pre)), p.buf_heads)
    run(p, f"fault-{bad}", built, seed=5 + (bad == "qk"), check=("S", "A", "Y"))


# -- cycles -------------------------------------------------------------------------------------
def timing_groups(p):
    """(name, case) of operations repeated back to back, for :func:`measure`."""
    R = p.chains
    groups = []
    for fmt, n, k, op, rows, count in (("int4/32", 25 * R, 512, Opcode.MV, 1, 5),
                                       ("int8/32", 25 * R, 512, Opcode.MV, 1, 5),
                                       ("int4/32", 8 * R, 256, Opcode.MV, 1, 8),
                                       ("int4/32", 2 * R + 1, 64, Opcode.MV, 1, 8),
                                       ("int4m/32", 25 * R, 128, Opcode.MM, 4, 4)):
        wf = WeightFormat.parse(fmt)
        rng = np.random.default_rng(5)
        s = weight_setup(p, rng, [(wf, n, k)] * count)
        prog = [(weight_instr(s, f"w{i}", op, Buf.Y, Reg.CLEN if op == Opcode.MM else Reg.ZERO).with_(signal=0),
                 regs_with(CLEN=rows)) for i in range(count)]
        groups.append((f"{op.name} {fmt} {n}x{k}" + (f" T={rows}" if rows > 1 else ""),
                       Case(s, weight_bufs(p, rng), prog)))
    rep = p.buf_heads // p.buf_kv_heads
    for op, rows, length in ((Opcode.QK, 1, 200), (Opcode.PV, 1, 200), (Opcode.QK, 4, 256), (Opcode.PV, 4, 256)):
        rng = np.random.default_rng(6)
        s = place_tensors(p, {})
        kvl = add_kv(s, 1, p.buf_kv_heads, HD, p.max_seq_len, "int8r/32", "int8r/32", rng)
        prog = [attn_instr(op, kvl, g, rep, rows, length) for g in range(p.buf_kv_heads)]
        prog = [(ins.with_(signal=0), r) for ins, r in prog]
        groups.append((f"{op.name} int8r hd={HD} rep={rep} T={rows} len={length}", Case(s, attn_bufs(p, rng, prog), prog)))
    return groups


def golden_cycles(p, case: Case, proxy: str):
    """The golden cycle model on ``case``'s program (the MPE latency measured for ``proxy``):
    the total (the unit alone: no instruction fetch), the issue cycles per operation (``free -
    start``: max(compute, fetch)), the compute and the activation-load cycles per operation."""
    s = case.setup
    tm = timing_for(get_preset(proxy), fetch_latency=0)
    kvl = s.kv[0] if s.kv else None
    plan = {"max_seq": p.max_seq_len, "kv_bytes": 0, "out_row_bytes": 4}
    if kvl is not None:
        plan.update(heads=p.buf_heads, kv_heads=kvl.kv_heads, head_dim=kvl.head_dim, layers=kvl.layers,
                    kv_format=kvl.fmt.name, kv_format_v=kvl.fmt_v.name, kv_base=kvl.base)
    g = Golden(p, [bytes(img[:kvl.base] if kvl else img) for img in s.images], None, plan, timing=tm)
    if kvl is not None:
        for c, img in enumerate(s.images):
            g.channels[c][:] = img[:len(g.channels[c])]
    bufs = dict(case.bufs)
    ins0 = case.prog[0][0]
    if ins0.op in (Opcode.MV, Opcode.MM):
        q, a, u = bufs[Buf.HQ.value]
        k = ins0.f["k_in"]
        bufs[Buf.HQ.value] = (q[:, :k], a, u[:, :k >> ins0.f["group_log2"]])
    g.bufs = bufs
    regs = {i: v for i, v in enumerate(case.prog[0][1]) if i}
    prog = [ins for ins, _ in case.prog] + [Instr(Opcode.END)]
    st = g.run(prog, regs)
    op = ins0.op.name
    costs = [ci.h() for ci in g._prepare(prog)[:-1]]           # (compute, fetch, activation load, passes)
    work, act = (float(np.mean([c[k] for c in costs])) for k in (0, 2))
    return st.cycles, st.op_cycles[op] / st.op_count[op], work, act


def measure(p, groups, proxy):
    """Each group back to back (no stalls, the AXI memories at the golden model's sustained
    channel rate) and one at a time (each entry after the previous done): RTL cycles against
    the golden cycle model's."""
    rate = p.hbm_channel_bytes_per_cycle * timing_for(p).hbm_efficiency / (p.hbm_port_bits / 8)
    out = {}
    for name, case in groups:
        built = build(case, p.buf_heads)
        tag = "t-" + "".join(ch if ch.isalnum() else "_" for ch in name)
        kw = dict(stall=0.0, pause=0.0, contention=False, rate=rate, check=())
        b2b = run(p, tag + "-b2b", built, seed=1, **kw)
        ser = run(p, tag + "-serial", built, seed=1, serial=True, **kw)
        # each instruction waits for an SFU token, held until its weights are fetched: the
        # compute phase's latency, token -> results in the buffers (the model: work + mpe_latency)
        dcase = Case(case.setup, case.bufs, [(ins.with_(wait=SFU_TOK), r) for ins, r in case.prog])
        dep = run(p, tag + "-dep", build(dcase, p.buf_heads), seed=1, serial=True, tok_delay=400, **kw)
        total, issue, work, act = golden_cycles(p, case, proxy)
        tm = timing_for(get_preset(proxy))
        d = b2b["done"]
        out[name] = {"ops": len(d), "golden_issue": issue, "rtl_interval": (d[-1] - d[0]) / (len(d) - 1),
                     "golden_total": total, "rtl_total": d[-1] - b2b["accepted"][0],
                     "rtl_latency": float(np.mean([dn - ac for ac, dn in zip(ser["accepted"], ser["done"])])),
                     "golden_work": work, "golden_act": act,
                     "golden_token_to_done": work + act + tm.mpe_latency + tm.mpe_out_latency,
                     "rtl_token_to_done": float(np.mean([dn - tk for tk, dn in zip(dep["tok"], dep["done"])]))}
    return out


def check_cycles(p, proxy):
    res = measure(p, timing_groups(p), proxy)
    (rtl.build_dir(p, DESIGN) / "cycles.json").write_text(json.dumps(res, indent=1))
    for name, r in res.items():
        over = r["rtl_interval"] - r["golden_issue"]
        # large operations: within 2%; small ones: a fixed overhead (the dequant units' refill,
        # the engine's row tiles padded to `chains` rows, activation loads)
        assert over <= max(0.02 * r["golden_issue"], 40), (name, r)
        # after its compute-phase token: the activation load, the work and the engine's and
        # the unit's output latencies (runtime/timing.py's mpe_out_latency is measured here)
        miss = r["rtl_token_to_done"] - r["golden_token_to_done"]
        assert abs(miss) <= max(0.05 * r["golden_token_to_done"], 16), (name, r)
    return res


@pytest.mark.rtl
def test_cycles():
    """Back to back, an operation occupies the unit about as long as the golden model's issue
    time (max(compute, fetch)); the unit's own overhead per operation stays small. Writes
    ``cycles.json`` in the build dir (the report's table)."""
    check_cycles(PARAMS, "sim")


@pytest.mark.rtl
@pytest.mark.slow_rtl
def test_cycles_u280_geometry():
    """The same on the u280's per-channel geometry (an own build)."""
    check_cycles(U280_2CH, "u280-2ch")
