"""Golden model: MPE and SFU arithmetic, tiny-model decode vs the float reference,
scheduler consistency, timing/tokens, and bad inputs."""

import json
import math
import shutil

import numpy as np
import pytest

from flightllm.compiler.artifact import Artifact, ArtifactError
from flightllm.compiler.compile import compile_model
from flightllm.compiler.gguf_import import load_gguf
from flightllm.compiler.reference import FloatLlama, rms_norm
from flightllm.compiler.schedule import (build_programs, manifest_preview, shape_manifest, unroll,
                                         unrolled_counts)
from flightllm.hw.formats import QTensor, WeightFormat, nm_mask, pack_tensor, to_fixed
from flightllm.hw.isa import Buf, Instr, Opcode, Reg, Unit
from flightllm.hw.params import get_preset
from flightllm.runtime import sfu
from flightllm.runtime.arith import mpe_reference
from flightllm.runtime.device import GoldenDevice
from flightllm.runtime.driver import Driver, GenerationError, Sampler
from flightllm.runtime.golden import DeadlockError, Golden, GoldenError

from conftest import write_tiny_gguf

CALIB = "the quick brown fox jumps over the lazy dog. " * 20
F32 = np.float32


pytestmark = pytest.mark.usefixtures("isolated_cache")


@pytest.fixture(scope="module")
def tiny_art(tmp_path_factory):
    d = tmp_path_factory.mktemp("golden")
    g = write_tiny_gguf(d / "tiny.gguf")
    compile_model(g, d / "art", "w8", get_preset("sim"), calib_text=CALIB, progress=False)
    return d / "tiny.gguf", d / "art"


# --------------------------------------------------------------------------- MPE
def _machine(params, pt, plan_extra=None):
    plan = {"max_seq": 64, "kv_bytes": 0, "out_row_bytes": 4, "kv_heads": 1, **(plan_extra or {})}
    chans = [pt.channel_image(c) for c in range(params.weight_channels)]
    return Golden(params, chans, np.zeros(16, F32), plan)


@pytest.mark.parametrize("fmt,op,rows", [("int8/32", Opcode.MV, 1), ("int4m/32", Opcode.MV, 1),
                                         ("int4-2:4/64", Opcode.MM, 3), ("int4/32", Opcode.MM, 5)])
def test_mv_mm_match_arith_reference(fmt, op, rows):
    """MV/MM through the golden machine equal the plain-integer oracle, then the SFU conversion."""
    p = get_preset("sim")
    rng = np.random.default_rng(1)
    wf = WeightFormat.parse(fmt)
    n, k = 12, 128
    q = rng.integers(wf.qmin, wf.qmax + 1, (n, k))
    mask = None
    if not wf.dense:
        mask = nm_mask(rng.random((n, k)), wf.n_keep, wf.m)
        q = np.where(mask, q, 0)
    ng = k // wf.group_size
    sc = (rng.standard_normal((n, ng)) * 0.02).astype(np.float16)
    mn = (rng.standard_normal((n, ng)) * 0.02).astype(np.float16) if wf.has_min else None
    pt = pack_tensor(QTensor(wf, q, sc, mn, mask), p)
    g = _machine(p, pt)
    xf = (rng.standard_normal((rows, k)) * np.where(rng.random(k) < 0.05, 30, 1)).astype(F32)
    x, a, u = sfu.requantize_groups(xf, wf.group_size)
    g.bufs[Buf.HQ.value] = (x, a[:, None], u)
    g.regs[Reg.CLEN.value] = rows
    ins = Instr(op, dict(src=Buf.HQ, dst=Buf.Y, rows_reg=Reg.CLEN, bits=wf.bits, n_keep=wf.n_keep, m=wf.m,
                         group_log2=wf.group_size.bit_length() - 1, kind=wf.kind,
                         shift=pt.shift, n_out=n, k_in=k, w_off=0))
    st = g.run([ins, Instr(Opcode.END)])
    S, M = to_fixed(sc, pt.shift), None if mn is None else to_fixed(mn, pt.shift)
    acc = mpe_reference(q, S, M, x, u, wf.group_size)                                 # (rows, n)
    want = acc.astype(F32) * np.ldexp(a, -pt.shift).astype(F32)[:, None]
    np.testing.assert_array_equal(g.bufs[Buf.Y.value], want)
    # and the result is the float product of the dequantized operands, up to float32 rounding
    wd = QTensor(wf, q, sc, mn, mask).dequantize().astype(np.float64)
    xd = sfu.dequantize(x, a[:, None], u).astype(np.float64)
    np.testing.assert_allclose(want, xd @ wd.T, rtol=1e-5, atol=1e-5 * np.abs(xd @ wd.T).max())
    assert st.cycles >= math.ceil(pt.channel_bytes * p.weight_channels / p.hbm_weight_bytes_per_cycle)


def test_requantize_groups_is_the_documented_formula():
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((3, 96)) * np.where(rng.random(96) < 0.1, 50, 1)).astype(F32)
    x[2, 32:64] = 0.0
    q, a, u = sfu.requantize_groups(x, 32)
    for r in range(3):
        amax = np.abs(x[r]).max()
        assert a[r] == F32(amax / F32(32385))
        for gi in range(3):
            seg = x[r, gi * 32:(gi + 1) * 32]
            ag = np.abs(seg).max()
            uu = min(255.0, float(np.ceil(F32(ag * F32(F32(255) / amax)))))
            assert u[r, gi] == uu
            if uu:
                inv = F32(F32(32385) / F32(F32(uu) * amax))
                assert np.array_equal(q[r, gi * 32:(gi + 1) * 32], np.clip(np.rint(seg * inv), -127, 127))
            else:
                assert not q[r, gi * 32:(gi + 1) * 32].any()
    assert np.abs(q).max() <= 127 and u[2, 1] == 0
    # the groups keep their precision next to an outlier: error per element ~ u * A / 2
    err = np.abs(sfu.dequantize(q, a[:, None], u) - x)
    assert (err <= 0.5001 * np.repeat(u.astype(F32), 32, axis=1) * a[:, None]).all()
    z = sfu.requantize_groups(np.zeros((1, 64), F32), 32)
    assert not z[0].any() and z[1][0] == 0 and not z[2].any()


# --------------------------------------------------------------------------- SFU
def test_lane_sum_is_the_documented_order():
    rng = np.random.default_rng(2)
    for n, lanes, slots in ((1, 8, 1), (7, 8, 4), (64, 8, 1), (100, 16, 2), (33, 6, 4), (300, 8, 8)):
        x = (rng.standard_normal(n) * 10 ** rng.uniform(-3, 3, n)).astype(F32)
        acc = [[F32(0.0)] * slots for _ in range(lanes)]
        for i, v in enumerate(x):
            lane, beat = i % lanes, i // lanes
            acc[lane][beat % slots] = F32(acc[lane][beat % slots] + v)
        flat = [a for lane in acc for a in lane]                      # lane * slots + slot
        flat += [F32(0.0)] * (((1 << (lanes - 1).bit_length()) - lanes) * slots)
        while len(flat) > 1:
            flat = [F32(flat[2 * i] + flat[2 * i + 1]) for i in range(len(flat) // 2)]
        assert sfu.lane_sum(x, lanes, slots) == flat[0]
        assert sfu.lane_sum(np.stack([x, x]), lanes, slots)[1] == flat[0]


def test_exp_is_the_documented_fixed_point():
    """exp against a plain-integer transcription of the docstring's algorithm, and within
    0.8 ulp of the true exp wherever the result is a normal float."""
    def one(x):
        b = int(np.array(x, F32).view(np.uint32))
        s, e, m = b >> 31, (b >> 23) & 255, (b & 0x7FFFFF) | (1 << 23)
        if np.isnan(x):
            return x
        if e >= 134:
            return F32(0.0) if s else F32(np.inf)
        mag = 0 if e == 0 else (m * round(math.log2(math.e) * 2 ** 32)) >> (156 - e)
        t = -mag if s else mag
        k, j, r = t >> 26, (t >> 18) & 255, t & (2 ** 18 - 1)
        a = (r * round(math.log(2) * 2 ** 18)) >> 8
        d = a + (((a >> 10) ** 2) >> 17)
        T = round(2 ** (j / 256) * 2 ** 30)
        M = T + (((T >> 4) * d) >> 32)
        sig, rem = M >> 7, M & 127
        sig += rem > 64 or (rem == 64 and sig & 1)
        if sig == 1 << 24:
            sig, k = sig >> 1, k + 1
        if k + 127 <= 0:
            return F32(0.0)
        if k + 127 >= 255:
            return F32(np.inf)
        return np.array(((k + 127) << 23) | (sig - (1 << 23)), np.uint32).view(F32)

    rng = np.random.default_rng(3)
    x = np.concatenate([rng.uniform(-100, 100, 3000).astype(F32), (rng.standard_normal(500) * 1e-6).astype(F32),
                        rng.integers(0, 2 ** 32, 500, dtype=np.uint64).astype(np.uint32).view(F32),
                        np.array([0, -0.0, 1, -1, 88.72, 88.73, -87.33, -87.34, 128, -128, np.inf, -np.inf,
                                  np.nan, 1e-45], F32)])
    got = sfu.exp(x)
    for xi, g in zip(x, got):
        want = one(xi)
        assert (np.isnan(g) and np.isnan(want)) or g.view(np.uint32) == F32(want).view(np.uint32), (xi, g, want)
    x = rng.uniform(-87, 88, 200_000).astype(F32)
    ref = np.exp(x.astype(np.float64))
    ok = ref >= 2.0 ** -126
    ulp = np.abs(sfu.exp(x)[ok] - ref[ok]) / np.spacing(ref[ok].astype(F32))
    assert ulp.max() < 0.81, ulp.max()


def test_sfu_ops_against_numpy():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 96)).astype(F32)
    w = rng.standard_normal(96).astype(F32)
    np.testing.assert_allclose(sfu.rmsnorm(x, w, 1e-5, 8), rms_norm(x, w, 1e-5), rtol=2e-6, atol=1e-6)
    y = np.linspace(-87, 88, 200001, dtype=F32)
    ref = np.exp(y.astype(np.float64))
    ok = ref > 2.0 ** -126
    assert np.max(np.abs(sfu.exp(y)[ok] - ref[ok]) / ref[ok]) < 2.5e-7           # ~2 ulp
    assert sfu.exp(F32([-100, 100, np.nan, 0]))[:2].tolist() == [0.0, np.inf]
    assert sfu.exp(F32([0.0]))[0] == 1.0
    g, u = x, x[::-1].copy()
    np.testing.assert_allclose(sfu.silu_mul(g, u), g / (1 + np.exp(-g.astype(np.float64))) * u, rtol=1e-6, atol=1e-7)
    # requantize: the exact formula
    q, s = sfu.requantize(x, 32)
    xs = x.reshape(3, 3, 32)
    am = np.abs(xs).max(-1)
    assert np.array_equal(s, (am / F32(127)).astype(F32))
    assert np.array_equal(q.reshape(3, 3, 32), np.clip(np.rint(xs * (F32(127) / am)[..., None]), -127, 127))
    q0, s0 = sfu.requantize(np.zeros((1, 8), F32))
    assert not q0.any() and s0[0, 0] == 0


def test_attention_kernels_against_plain_loops():
    """qk_scores, attention_mask and softmax_probs against element-by-element loops of the spec."""
    rng = np.random.default_rng(5)
    acc = rng.integers(-2 ** 20, 2 ** 20, (2, 3, 64))
    qs = rng.uniform(0.01, 0.1, (2, 3)).astype(F32)
    ks = rng.uniform(0.01, 0.1, 64).astype(F32)
    got = sfu.qk_scores(acc, qs, ks)
    for t, r, p in np.ndindex(acc.shape):
        assert got[t, r, p] == (F32(acc[t, r, p]) * qs[t, r]) * ks[p]
    # the block-sparse mask: sink blocks, the window up to the row's own block
    m = sfu.attention_mask(np.array([1, 200, 300]), 320, sink=1, window=2)
    for t, v in enumerate((1, 200, 300)):
        for p in range(320):
            b, own = p // sfu.KV_BLOCK, (v - 1) // sfu.KV_BLOCK
            assert m[t, p] == (p < v and (b < 1 or b > own - 2)), (t, p)
    assert sfu.attention_mask(np.array([7]), 64).sum() == 7
    # softmax_probs: q * u * scale ~ softmax(s * c) * vs, exactly as specified
    s = (rng.standard_normal((2, 3, 64)) * 4).astype(F32)
    mask = sfu.attention_mask(np.array([40, 41]), 64)
    vs = rng.uniform(0.001, 0.05, 64).astype(F32)
    c = sfu.score_scale(64)
    q, scale, u = sfu.softmax_probs(s, mask, vs, c, 8)
    for t, r in np.ndindex(2, 3):
        n = int(mask[t].sum())
        m0 = max(s[t, r, :n])
        e = [sfu.exp(np.array([(s[t, r, p] - m0) * F32(c)], F32))[0] for p in range(n)] + [F32(0)] * (64 - n)
        d = sfu.lane_sum(np.array(e, F32)[None], 8)[0]
        w = np.array([F32(e[p]) * vs[p] for p in range(64)], F32)
        q1, a1, u1 = sfu.requantize_groups(w[None], 32)
        assert np.array_equal(q[t, r], q1[0]) and np.array_equal(u[t, r], u1[0])
        assert scale[t, r] == F32(a1[0] / d)
        assert not q[t, r, n:].any()
        ref = np.exp((s[t, r, :n].astype(np.float64) - m0) * c)
        ref = ref / ref.sum() * vs[:n]
        deq = q[t, r, :n] * np.repeat(u[t, r], 32)[:n] * float(scale[t, r])
        assert np.abs(deq - ref).max() < ref.max() / 100


def test_softmax_of_a_group_of_kv_heads_is_each_heads_softmax():
    """SOFTMAX with kvn = 3 writes what three one-head SOFTMAXes write, bit for bit, and
    costs less than them (one wait for the SFU's lanes per operation)."""
    from flightllm.hw.params import get_preset
    from flightllm.runtime.timing import timing_for
    p = get_preset("sim")
    plan = {"max_seq": 128, "kv_bytes": 0, "out_row_bytes": 4, "heads": 6, "kv_heads": 3, "head_dim": 32,
            "layers": 1, "kv_format": "int8r/32", "kv_base": 0}
    rng = np.random.default_rng(8)
    S = (rng.standard_normal((2, 6, 128)) * 3).astype(F32)
    VS = rng.uniform(0.001, 0.05, (128, 3)).astype(F32)
    common = dict(src=Buf.S, dst=Buf.PQ, aux=Buf.VS, rows_reg=Reg.CLEN, len_reg=Reg.LEN, rep=2, cap=128,
                  scale=0.17)
    out = []
    for prog in ([Instr(Opcode.SOFTMAX, dict(kvh=0, kvn=3, **common))],
                 [Instr(Opcode.SOFTMAX, dict(kvh=g, **common)) for g in range(3)]):
        g = Golden(p, [], np.zeros(16, F32), plan, timing=timing_for(p))
        g.bufs = {Buf.S.value: S.copy(), Buf.VS.value: VS.copy()}
        g.regs[Reg.CLEN.value], g.regs[Reg.LEN.value] = 2, 70
        st = g.run(prog + [Instr(Opcode.END)])
        out.append((g.bufs[Buf.PQ.value], st.cycles))
    (a, ca), (b, cb) = out
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert a[0][:, :, :70].any() and ca < cb
    with pytest.raises(GoldenError, match=r"kv heads 2\.\.3 beyond"):
        Golden(p, [], np.zeros(16, F32), plan).run([Instr(Opcode.SOFTMAX, dict(kvh=2, kvn=2, **common)),
                                                    Instr(Opcode.END)])


# --------------------------------------------------------------------------- model
def test_tiny_decode_matches_reference_and_prefill_is_bit_identical(tiny_art):
    gguf, art = tiny_art
    a = Artifact(art)
    m = load_gguf(gguf)
    ref = FloatLlama(m.with_tensors({n: a.dequantized(n) for n in a.tensor_names()}))
    toks = [40, 41, 50, 60, 70, 80, 33, 90, 91, 92, 93, 94, 95, 96, 97, 98, 99, 100, 101, 35]
    r = ref.forward(toks)
    drv = Driver(a)
    full = drv.prefill(toks, all_logits=True)                       # 2 chunks of mm_tokens=16
    drv.reset()
    rows = [drv.prefill(toks[:3], all_logits=True)]
    for t in toks[3:]:
        rows.append(drv.step(t)[None])
    inc = np.concatenate(rows)
    np.testing.assert_array_equal(full, inc)                        # MM == MV, chunking exact
    err = np.abs(full - r).max()
    assert err < 0.05 * np.abs(r).max(), err
    assert (np.argmax(full, 1) == np.argmax(r, 1)).mean() >= 0.9


def test_generation_deterministic_and_sampling_seeded(tiny_art):
    _, art = tiny_art
    drv = Driver(art)
    a = list(drv.generate([40, 41, 42], 8, stop_ids=()))
    b = list(drv.generate([40, 41, 42], 8, stop_ids=()))
    assert a == b and len(a) == 8
    s1 = list(drv.generate([40, 41], 6, Sampler(0.8, 20, 0.9, seed=5), stop_ids=()))
    s2 = list(drv.generate([40, 41], 6, Sampler(0.8, 20, 0.9, seed=5), stop_ids=()))
    assert s1 == s2
    with pytest.raises(ValueError, match="top-p"):
        Sampler(1.0, 0, 0.0)


def test_timing_stats_and_hazard_free(tiny_art):
    _, art = tiny_art
    drv = Driver(art)
    drv.prefill([40, 41, 42])
    st = drv.stats[-1][2]
    p = drv.dev.params
    assert st.cycles >= max(st.busy.values()) > 0
    assert st.weight_bytes > 0 and st.kv_bytes > 0
    # decode cycles at a later position include more attention
    drv.step(50)
    c1 = drv.stats[-1][2].op_cycles["PV"]
    for t in range(40):
        drv.step(50)
    assert drv.stats[-1][2].op_cycles["PV"] > c1
    assert p.name == "sim"


# --------------------------------------------------------------------------- schedule
def test_manifest_preview_matches_written_manifest(tiny_art):
    _, art = tiny_art
    a = Artifact(art)
    progs = build_programs(a.manifest)
    from flightllm.compiler.schedule import PROGRAM_FILES
    from flightllm.hw.isa import encode_program
    for k in progs:
        assert encode_program(progs[k]) == a.read(PROGRAM_FILES[k])


def test_unrolled_counts_match_unroll():
    from flightllm.compiler.gguf_import import ModelConfig
    cfg = ModelConfig(name="t", n_layers=2, hidden=128, ffn=256, n_heads=4, n_kv_heads=2, vocab=128,
                      context_length=128, rope_theta=1e4, rms_eps=1e-5, tied_embeddings=False)
    m = shape_manifest(cfg, get_preset("sim"), "int8/32")
    progs = build_programs(m)
    lengths = [1, 2, 15, 16, 17, 40, 128]
    pre = unrolled_counts(progs["prefill"], lengths)
    dec = unrolled_counts(progs["decode"], lengths, pos=np.array(lengths) - 1)
    for L, cp, cd in zip(lengths, pre, dec):
        assert len(unroll(progs["prefill"], 0, L)) == cp
        assert len(unroll(progs["decode"], L - 1, 1)) == cd


# --------------------------------------------------------------------------- bad input
def test_deadlock_and_unbalanced_tokens():
    p = get_preset("sim")
    g = Golden(p, [], np.zeros(4, F32), {"max_seq": 16, "kv_bytes": 0, "out_row_bytes": 4, "kv_heads": 1},
               functional=False)
    wait_mpe = Instr(Opcode.FILL, dict(dst=Buf.A, n=4, wait=1 << Unit.MPE.value))
    with pytest.raises(DeadlockError, match="no earlier instruction signalled"):
        g.run([wait_mpe, Instr(Opcode.END)])
    sig = Instr(Opcode.FILL, dict(dst=Buf.A, n=4, signal=1 << Unit.MPE.value))
    with pytest.raises(DeadlockError, match="never consumed"):
        g.run([sig, Instr(Opcode.END)])
    with pytest.raises(GoldenError, match="without END"):
        g.run([Instr(Opcode.NOP)])


def test_missing_token_is_a_hazard(tiny_art):
    _, art = tiny_art
    dev = GoldenDevice()
    dev.load(Artifact(art))
    prog = [Instr(i.op, {k: v for k, v in i.f.items() if k not in ("wait", "signal")})
            for i in dev.programs["decode"]]
    dev.machine.write_tokens(0, [40])
    with pytest.raises(GoldenError, match="missing dependency token"):
        dev.machine.run(prog, {"POS": 0})


def _copy(art, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(art, dst)
    return dst


def _rewrite(dst, rel, data):
    (dst / rel).write_bytes(data)
    mf = json.loads((dst / "manifest.json").read_text())
    import hashlib
    mf["images"][rel] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (dst / "manifest.json").write_text(json.dumps(mf))


def test_bad_artifacts(tiny_art, tmp_path):
    _, art = tiny_art
    dst = _copy(art, tmp_path)
    img = (dst / "programs/decode.bin").read_bytes()
    (dst / "programs/decode.bin").write_bytes(img[:-5])
    with pytest.raises(ArtifactError, match=r"decode.bin: .*truncated"):
        Driver(dst)
    _rewrite(dst, "programs/decode.bin", img[:16 * 5] + (62).to_bytes(16, "little") + img[16 * 6:])
    with pytest.raises(ArtifactError, match=r"decode.bin\[5\]: illegal opcode 62"):
        Driver(dst)
    _rewrite(dst, "programs/decode.bin", img)
    w = (dst / "weights/ch00.bin").read_bytes()
    (dst / "weights/ch00.bin").write_bytes(w[:100])
    with pytest.raises(ArtifactError, match=r"ch00.bin: .*truncated"):
        Driver(dst)
    with pytest.raises(ArtifactError, match="built for hardware 'sim'.*'u280'"):
        Driver(art, "golden", get_preset("u280"))
    with pytest.raises(ValueError, match="unknown backend"):
        Driver(art, "fpga")


def test_wrong_tensor_reference_and_long_prompt(tiny_art):
    _, art = tiny_art
    drv = Driver(art)
    with pytest.raises(GenerationError, match="exceeds the artifact's maximum sequence length of 128"):
        list(drv.generate(list(range(40, 120)), 60))
    with pytest.raises(GenerationError, match="exceed"):
        drv.prefill([40] * 129)
    prog = drv.dev.programs["decode"]
    bad = [i.with_(w_off=i.f.get("w_off", 0) + 64) if i.op == Opcode.MV else i for i in prog]
    drv.dev.machine.write_tokens(0, [40])
    with pytest.raises(GoldenError, match="no tensor at w_off"):
        drv.dev.machine.run(bad, {"POS": 0})


# --------------------------------------------------------------------------- prefill_last
def test_prefill_last_is_the_last_row_of_prefill(tiny_art):
    _, art = tiny_art
    drv = Driver(art)
    vocab = drv.vocab
    toks = [40, 41, 50, 60, 70, 80, 33, 90, 91, 92, 93, 94, 95, 96, 97, 98, 99, 100, 101, 35] * 2
    for n in (1, 2, 15, 16, 17, 33):
        drv.reset()
        full = drv.prefill(toks[:n], all_logits=True)
        am_full, st_full = drv.last_argmax, drv.stats[-1][2]
        drv.reset()
        last = drv.prefill(toks[:n])
        st_last = drv.stats[-1][2]
        np.testing.assert_array_equal(last, full[-1])
        assert drv.last_argmax == am_full == int(np.argmax(full[-1]))
        assert st_last.out_bytes == 4 * vocab and st_full.out_bytes == 4 * vocab * n
        assert st_last.op_count["ARGMAX"] == 1
    # the KV cache it leaves behind is the same: the next decode step matches
    drv.reset()
    drv.prefill(toks[:17], all_logits=True)
    a = drv.step(44)
    drv.reset()
    drv.prefill(toks[:17])
    np.testing.assert_array_equal(drv.step(44), a)


# --------------------------------------------------------------------------- buffers
def test_buffer_bounds_are_checked():
    import dataclasses
    from flightllm.compiler.gguf_import import ModelConfig
    from flightllm.compiler.schedule import ScheduleError, check_buffers
    cfg = ModelConfig(name="t", n_layers=1, hidden=128, ffn=256, n_heads=4, n_kv_heads=2, vocab=128,
                      context_length=128, rope_theta=1e4, rms_eps=1e-5, tied_embeddings=False)
    sim = get_preset("sim")
    sizes = check_buffers(shape_manifest(cfg, sim, "int8/32"))
    assert sizes[Buf.S] == (sim.mm_tokens, 4 * 128) and sizes[Buf.PQ] == (sim.mm_tokens, 4 * 128)
    assert sizes[Buf.KS] == (128, 2) and sizes[Buf.A] == (sim.mm_tokens, 4 * 32)
    small = dataclasses.replace(sim, act_buf_depth=256)
    with pytest.raises(ValueError, match=r"buffer S: 16 rows x 512 elements \(heads x max_seq scores\) per row "
                                         r"exceed act_buf_depth = 256"):
        build_programs(shape_manifest(cfg, small, "int8/32"))
    big_vocab = dataclasses.replace(cfg, vocab=9000)
    with pytest.raises(ScheduleError, match="buffer LOG: 16 rows x 9000 elements per row exceed act_buf_depth = 8192"):
        build_programs(shape_manifest(big_vocab, sim, "int8/32"))
    wide = dataclasses.replace(sim, buf_ffn=128)         # the RTL's buffers (hw/buffers.py) are checked too
    with pytest.raises(ScheduleError, match=r"buffer G: 16 rows x 256 elements exceed its 16 x 128 on hw 'sim'"):
        build_programs(shape_manifest(cfg, wide, "int8/32"))
    assert set(build_programs(shape_manifest(big_vocab, sim, "int8/32"), check=False)) == {
        "decode", "prefill", "prefill_last"}


def test_writer_layout_is_the_written_manifest(tmp_path):
    from flightllm.compiler.artifact import ArtifactWriter
    from flightllm.compiler.gguf_import import ModelConfig
    p = get_preset("sim")
    cfg = ModelConfig(name="t", n_layers=1, hidden=128, ffn=256, n_heads=4, n_kv_heads=2, vocab=128,
                      context_length=128, rope_theta=1e4, rms_eps=1e-5, tied_embeddings=False)
    w = ArtifactWriter(p, cfg, "w8")
    rng = np.random.default_rng(4)
    for name, shape in (("a", (12, 128)), ("b", (5, 64))):
        wf = WeightFormat.parse("int8/32")
        w.add_tensor(name, QTensor(wf, rng.integers(-127, 128, shape), rng.random((shape[0], shape[1] // 32))))
    w.add_table("t1", np.ones(7))
    w.add_table("t2", np.ones((3, 2)))
    lay = manifest_preview(w)
    m = Artifact(w.write(tmp_path / "art")).manifest
    assert lay == {k: m[k] for k in ("model", "hw", "tensors", "tables")}
    assert lay["tensors"]["b"]["offset"] > 0 and lay["tables"]["t2"]["offset"] == 28


def test_kv_options_int4_and_block_sparse(tiny_art, tmp_path):
    """INT4 KV and block-sparse attention end to end: compiled, run on the golden model,
    and held to the float reference that attends the same positions."""
    gguf = write_tiny_gguf(tmp_path / "long.gguf", context=256)
    arts = {}
    for name, kw in (("int8", {}), ("int4", {"kv": "int4"}), ("k8v4", {"kv": "k8v4"}),
                     ("sparse", {"sink": 1, "window": 1})):
        compile_model(gguf, tmp_path / name, "w8", get_preset("sim"), calib_text=CALIB, progress=False, **kw)
        arts[name] = tmp_path / name
    assert Driver(arts["int4"]).dev.plan["kv_format"] == "int4r/32"
    plan = Driver(arts["k8v4"]).dev.plan
    assert (plan["kv_format"], plan["kv_format_v"]) == ("int8r/32", "int4r/32")
    toks = list(np.random.default_rng(1).integers(3, 120, 150))
    out = {n: Driver(a).prefill(toks, all_logits=True) for n, a in arts.items()}
    a = Artifact(arts["int8"])
    m = load_gguf(gguf).with_tensors({n: a.dequantized(n) for n in a.tensor_names()})
    ref = FloatLlama(m).forward(toks)
    ref_sparse = FloatLlama(m, sink=1, window=1).forward(toks)
    scale = np.abs(ref).max()
    # sink 1 + window 1: positions < 128 see blocks 0 and 1 (all they have): bit-identical to dense
    blk = sfu.KV_BLOCK
    np.testing.assert_array_equal(out["sparse"][:2 * blk], out["int8"][:2 * blk])
    late = slice(2 * blk, None)
    assert not np.array_equal(out["sparse"][late], out["int8"][late])
    # ... and later rows follow the sparse reference, not the dense one
    e_sparse = np.abs(out["sparse"][late] - ref_sparse[late]).max()
    assert e_sparse < 0.05 * scale, e_sparse
    assert e_sparse < np.abs(out["sparse"][late] - ref[late]).max()
    # INT4 values: coarser than INT8, and the golden model is nearer the float reference
    # that rounds K and V the same way than the plain one (INT4 rounding flips a step
    # on small upstream differences, so not as near as INT8 is to float)
    ref4 = FloatLlama(m, kv_levels=7).forward(toks)
    e4, e4_ref4, e8 = (np.abs(out[n] - r).mean() for n, r in (("int4", ref), ("int4", ref4), ("int8", ref)))
    assert e8 < e4 and e4_ref4 < 0.6 * e4, (e8, e4, e4_ref4)
    # INT8 keys with INT4 values: between the two
    e84 = np.abs(out["k8v4"] - ref).mean()
    assert e8 < e84 < e4, (e8, e84, e4)


def test_bad_operands_are_golden_errors(tiny_art):
    """Operands the unit fuzz (sim/test_kernel.py) found failing inside numpy raise a
    GoldenError naming the instruction: ARGMAX of 0 rows, QUANTG of n = 0, LD_KV of a
    row_bytes that is not whole float32 values, ST_KT from a probability buffer, PV with more
    query heads than the model has."""
    from flightllm.compiler.artifact import Artifact
    from flightllm.runtime.device import GoldenDevice

    dev = GoldenDevice(weight_cache=False)
    dev.load(Artifact(tiny_art[1]))
    dev.write_tokens(0, [1, 2])
    dev.write_reg("POS", 0)
    dev.write_reg("LEN", 2)
    dev.start("prefill_last")
    dev.wait()
    prog = dev.programs["decode"]
    first = {}
    for ins in prog:
        first.setdefault(ins.op, ins)
    heads = dev.plan["heads"]
    bad = [(first[Opcode.ARGMAX].with_(rows_reg=Reg.CLEN, wait=0, signal=0), r"\(ARGMAX\): rows 0"),
           (first[Opcode.QUANTG].with_(n=0, wait=0, signal=0), r"\(QUANTG\): group \d+ does not divide n 0"),
           (first[Opcode.LD_KV].with_(row_bytes=6, wait=0, signal=0), r"\(LD_KV\): row_bytes 6 is not whole"),
           (first[Opcode.ST_KT].with_(src=Buf.PQ, wait=0, signal=0), r"\(ST_KT\): buffer PQ is \("),
           (first[Opcode.PV].with_(rep=heads + 1, kvh=0, wait=0, signal=0), r"\(PV\): .* rep \d+ do not fit")]
    for ins, msg in bad:
        with pytest.raises(GoldenError, match=r"instruction 0 " + msg):
            dev.machine.run([ins, Instr(Opcode.END)], regs={"POS": 2, "LEN": 1, "CLEN": 0})
