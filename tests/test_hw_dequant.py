"""amaranth.sim checks of the dequant unit against formats.pack_tensor / unpack_tensor / QTensor.fixed.

The expected beats come from the *meaning* of a record (formats module docstring): beat
``b`` of record (tile, group) gives local chain ``i`` (row ``tile*R + i*C + c``) kept
weights ``b*L .. b*L + L - 1`` of that group in ascending input position, their
positions inside their ``m``-window, and the group's scale and min as the fixed-point
integers of :meth:`formats.QTensor.fixed` (binary16 scales; for two-level formats the
tensor's D and Mn times the 8-bit sub-scales and sub-mins). The values, masks and
scales come from :func:`formats.unpack_tensor` of the packed bytes (checked against the
packed QTensor), never from the bit offsets the RTL uses. Raw formats (``int8r/32``,
``int4r/32``, the KV cache: no scale or min in the records) mean scale 1 and min 0 on
every chain, rows past N included, whatever the operation's ``e0`` (random for them).

Every preset is simulated with the two-level ``int4k/32`` added to its formats (if a
preset has none, its build without the two-level path is run too) and with its KV
formats (``HwParams.kv_formats``: the format codes after the weight formats).
"""

import dataclasses
import random

import numpy as np
import pytest
from amaranth.hdl import Fragment
from amaranth.sim import Simulator

from flightllm.hw import formats
from flightllm.hw.dequant import DequantUnit
from flightllm.hw.geometry import EngineGeometry
from flightllm.hw.params import HwParams, get_preset

PRESETS = ("sim", "sim-mc", "u280-2ch")
K_FMT = "int4k/32"          #: the two-level format every simulated preset must run


def k_params(name):
    """Preset ``name``, with the two-level format added to its weight formats if absent."""
    p = get_preset(name)
    if K_FMT in p.weight_formats:
        return p
    return dataclasses.replace(p, weight_formats=p.weight_formats + (K_FMT,))


def plain_params(name):
    """Preset ``name`` without two-level formats."""
    p = get_preset(name)
    return dataclasses.replace(p, weight_formats=tuple(f for f in p.weight_formats
                                                       if not formats.WeightFormat.parse(f).two_level))


# -- stimulus ------------------------------------------------------------------------------

def rand_f16(rng, shape, mode):
    """binary16 scales (as float16) whose nonzero exponents span at most 16 binades.

    ``mode``: ``wide`` (the full 16-binade span at a random place, both ends present),
    ``sub`` (subnormals and small normals: e0 = 1), ``high`` (exponents up to 30: e0 =
    25, shift 0), ``narrow`` (one binade) or ``zero`` (all +-0). About 10 % of the
    values are +-0 and the signs are random."""
    n = int(np.prod(shape))
    if mode == "zero":
        bits = rng.integers(0, 2, n) << 15
        return bits.astype(np.uint16).view(np.float16).reshape(shape)
    lo, hi = {"wide": (lambda e: (e, e + 15))(int(rng.integers(1, 16))),
              "sub": (0, 16), "high": (25, 30),
              "narrow": (lambda e: (e, e))(int(rng.integers(1, 31)))}[mode]
    e = rng.integers(lo, hi + 1, n)
    frac = rng.integers(0, 1024, n)
    sgn = rng.integers(0, 2, n)
    zero = rng.random(n) < 0.1
    if n >= 4:
        zero[:3] = False
        e[0], e[1], frac[1] = lo, hi, 1023               # both ends of the span, the largest value
        zero[2], sgn[2] = True, 1                        # -0
    bits = np.where(zero, sgn << 15, (sgn << 15) | (e << 10) | frac)
    bits = rng.permutation(bits)
    return bits.astype(np.uint16).view(np.float16).reshape(shape)


def rand_heads(rng, mode):
    """A two-level tensor's D and Mn (float16) whose nonzero exponents lie within
    ``SUB_EXP_SPAN`` (7) of each other.

    ``mode`` as for :func:`rand_f16`: ``wide`` (exponents exactly 7 apart, either one
    the larger), ``sub`` (one subnormal, the other up to 7 binades above: e0 = 1),
    ``high`` (exponents 25 .. 30: e0 = 25), ``narrow`` (one binade) or ``zero`` (D, Mn
    or both +-0). Mn is mostly negative (Q4_1-style mins), D's sign is random."""
    span = formats.SUB_EXP_SPAN
    e = {"wide": (lambda a: [a, a + span])(int(rng.integers(1, 31 - span))),
         "sub": [0, int(rng.integers(1, span + 2))],
         "high": list(rng.integers(25, 31, 2)),
         "narrow": [int(rng.integers(1, 31))] * 2,
         "zero": list(rng.integers(1, 31, 2))}[mode]
    e = [int(x) for x in rng.permutation(e)]
    frac = [int(x) for x in rng.integers(0, 1024, 2)]
    if mode == "sub":
        frac = [f or 1 if x == 0 else f for f, x in zip(frac, e)]     # a subnormal, not 0
    sgn = [int(rng.random() < 0.3), int(rng.random() < 0.8)]
    bits = [(s << 15) | (x << 10) | f for s, x, f in zip(sgn, e, frac)]
    if mode == "zero":
        for j in [[0], [1], [0, 1]][int(rng.integers(0, 3))]:
            bits[j] = sgn[j] << 15                                     # +-0
    return np.array(bits, np.uint16).view(np.float16)


def rand_qtensor(rng, wf, n, k, mode="wide"):
    """A random QTensor of ``wf``: q over the full [qmin, qmax], N:M masks, random scales
    (two-level: sub-scales and sub-mins over all of 0 .. 255, :func:`rand_heads`)."""
    q = rng.integers(wf.qmin, wf.qmax + 1, (n, k))
    q.flat[:2] = wf.qmin, wf.qmax
    if wf.raw:                                           # the values alone
        return formats.QTensor(wf, q.astype(np.int8), None)
    mask = None
    if not wf.dense:
        mask = formats.nm_mask(rng.random((n, k)), wf.n_keep, wf.m)
        q[~mask] = 0
    ng = k // wf.group_size
    if wf.two_level:
        top = (1 << formats.SUB_BITS) - 1
        sc, sm = rng.integers(0, top + 1, (2, n, ng))
        sc.flat[:2] = 0, top
        sm.flat[:2] = top, 0
        d, mn = rand_heads(rng, mode)
        return formats.QTensor(wf, q.astype(np.int8), sc.astype(np.uint8), sm.astype(np.uint8), mask,
                               tensor_scale=d, tensor_min=mn)
    both = rand_f16(rng, (n, 2 * ng), mode)              # scale and min share one span
    mn = both[:, ng:] if wf.has_min else None
    return formats.QTensor(wf, q.astype(np.int8), both[:, :ng], mn, mask)


def expected_beats(geom, pt, c):
    """Beats channel ``c`` must emit for ``pt``: a list of per-chain (w[L], idx[L], scale, min)."""
    qt = formats.unpack_tensor(pt)
    wf = pt.fmt
    f = geom.info(wf)
    n, k = pt.shape
    R, C, Rc, L, G = geom.R, geom.C, geom.Rc, geom.L, wf.group_size
    _, scale, mn = qt.fixed(pt.shift)
    if mn is None:
        mn = np.zeros_like(scale)
    beats = []
    for tile in range(-(-n // R)):
        for grp in range(k // G):
            cols = np.arange(grp * G, (grp + 1) * G)
            for b in range(f.bpb):
                beat = []
                for i in range(Rc):
                    row = tile * R + i * C + c
                    e = np.arange(b * L, (b + 1) * L)          # kept weights of this beat
                    if row < n:
                        kept = cols if wf.dense else cols[qt.mask[row, cols]]
                        w = [int(v) for v in qt.q[row, kept[e]]]
                        idx = [0] * L if wf.dense else [int(p) % wf.m for p in kept[e]]
                        s, mi = int(scale[row, grp]), int(mn[row, grp])
                    else:                                       # rows past N: zero, first positions
                        w = [0] * L
                        idx = [0] * L if wf.dense else [int(v) % wf.n_keep for v in e]
                        s = mi = 0
                        if wf.raw:                              # a raw format's scale is 1 everywhere
                            s = 1
                    beat.append((w, idx, s, mi))
                beats.append(beat)
    return beats


def make_op(geom, wf, n, k, c, rng, mode="wide", e0=None):
    """One operation: (cfg fields, stream words, expected beats) for channel ``c``.

    ``e0``: the config's, default ``E0_MAX - shift``; for a raw format (whose ``e0`` must
    not matter) a random 5-bit value by default."""
    qt = rand_qtensor(rng, wf, n, k, mode)
    pt = formats.pack_tensor(qt, geom.params)
    back = formats.unpack_tensor(pt)                    # the unpacker returns what was packed
    assert np.array_equal(back.q, qt.q)
    raw = (lambda a: a) if wf.two_level else (lambda a: a.view(np.uint16))
    for a, b in ((back.scale, qt.scale), (back.min, qt.min)):
        assert (a is None and b is None) or np.array_equal(raw(a), raw(b))
    if wf.two_level:
        heads = [np.array([x.tensor_scale, x.tensor_min], np.float16).view(np.uint16) for x in (back, qt)]
        assert np.array_equal(*heads)
    nw = geom.stream_words(wf, n, k)
    nb = geom.W // 8
    region = bytes(pt.data[c])
    # the host's word count covers the two-level header: the region, header included
    assert len(region) == pt.region_bytes == formats.region_bytes(wf, (n, k), geom.params)
    assert -(-len(region) // nb) == nw
    # random bytes after the last record: the unit must drop the tail of the last word
    raw = region + rng.integers(0, 256, nw * nb - len(region)).astype(np.uint8).tobytes()
    words = [int.from_bytes(raw[j * nb:(j + 1) * nb], "little") for j in range(nw)]
    if e0 is None:
        e0 = int(rng.integers(0, 32)) if wf.raw else formats.E0_MAX - pt.shift
    cfg = dict(fmt=geom.code(wf), e0=e0, records=pt.records, words=nw)
    return cfg, words, expected_beats(geom, pt, c)


# -- the bench -----------------------------------------------------------------------------

def run_ops(params, ops, *, in_stall=0.3, out_stall=0.3, cfg_gap=0.3, seed=0, max_idle=200):
    """Drive ``ops`` back to back through one unit and check every beat.

    The word stream runs on across operations (the next operation's words are offered
    as soon as the last one's are taken) and the next cfg is offered as soon as the
    previous one is taken: the unit must take neither early. Stalls are random on both
    streams. Returns, per operation with beats, a dict: ``cycles`` from its cfg to its
    last beat and ``starved``, the cycles between its first and last beat in which
    ``beat.ready`` was high but no beat was there.
    """
    dut = DequantUnit(params)
    g = dut.geom
    rnd = random.Random(seed)
    all_words = [w for _, ws, _ in ops for w in ws]
    exp = [b for _, _, bs in ops for b in bs]
    ends = np.cumsum([len(bs) for _, _, bs in ops]).tolist()
    res = []

    def beat_tuple(v):
        return [([int(x) for x in v[i].w], [int(x) for x in v[i].idx], int(v[i].scale), int(v[i].min))
                for i in range(g.Rc)]

    async def bench(ctx):
        oi = 0                  # next cfg to offer
        wi = 0                  # next word to offer
        words_allowed = 0       # words of the operations whose cfg was taken
        got = 0
        t_cfg = {}
        starved = 0
        cycle = idle = 0
        while got < len(exp) or oi < len(ops) or wi < len(all_words):
            cycle += 1
            idle += 1
            assert idle < max_idle, (f"no progress for {max_idle} cycles: cfg {oi}/{len(ops)}, words "
                                     f"{wi}/{len(all_words)}, beats {got}/{len(exp)}")
            cv = oi < len(ops) and rnd.random() >= cfg_gap
            if cv:
                for key, val in ops[oi][0].items():
                    ctx.set(dut.cfg.payload[key], val)
            ctx.set(dut.cfg.valid, cv)
            wv = wi < len(all_words) and rnd.random() >= in_stall
            ctx.set(dut.words.valid, wv)
            ctx.set(dut.words.payload, all_words[wi] if wi < len(all_words) else 0)
            # beat.ready must not reach words.ready, cfg.ready or the beat itself combinationally
            probe = []
            for rdy in (0, 1):
                ctx.set(dut.beat.ready, rdy)
                probe.append((ctx.get(dut.words.ready), ctx.get(dut.cfg.ready), ctx.get(dut.beat.valid),
                              ctx.get(dut.beat.payload.as_value())))
            assert probe[0] == probe[1], f"cycle {cycle}: beat.ready reaches an output combinationally"
            br = rnd.random() >= out_stall
            ctx.set(dut.beat.ready, br)
            if cv and ctx.get(dut.cfg.ready):
                assert got == (ends[oi - 1] if oi else 0), \
                    f"cfg {oi} taken after {got} beats, before the previous operation finished"
                words_allowed += len(ops[oi][1])
                t_cfg[oi] = cycle
                oi += 1
                idle = 0
            if wv and ctx.get(dut.words.ready):
                assert wi < words_allowed, f"word {wi} taken before its operation's cfg"
                wi += 1
                idle = 0
            if br and not ctx.get(dut.beat.valid) and got < len(exp):
                op = int(np.searchsorted(ends, got, side="right"))
                starved += got > (ends[op - 1] if op else 0)      # after this op's first beat
            if br and ctx.get(dut.beat.valid):
                assert got < len(exp), "more beats than records * bpb"
                bt = beat_tuple(ctx.get(dut.beat.payload))
                op = int(np.searchsorted(ends, got, side="right"))
                if bt != exp[got]:
                    first = next(i for i in range(g.Rc) if bt[i] != exp[got][i])
                    raise AssertionError(f"operation {op} beat {got - (ends[op - 1] if op else 0)} "
                                         f"chain {first}: got {bt[first]}, expected {exp[got][first]}")
                got += 1
                idle = 0
                if got == ends[op]:
                    res.append(dict(cycles=cycle - t_cfg[op] + 1, starved=starved))
                    starved = 0
            await ctx.tick()
        # drained: no stray beat, back to idle
        ctx.set(dut.cfg.valid, 0)
        ctx.set(dut.words.valid, 0)
        ctx.set(dut.beat.ready, 1)
        for _ in range(4):
            assert not ctx.get(dut.beat.valid), "a beat after the last operation"
            await ctx.tick()
        assert not ctx.get(dut.busy) and ctx.get(dut.cfg.ready)

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    return res


def shapes_for(geom, wf):
    """A few (N, K): ragged row counts (N not a multiple of chains), one and several groups."""
    R, G = geom.R, wf.group_size
    return [(R + 3, 2 * G), (1, G), (2 * R - 1, 3 * G)]


N_CODES = 8                 #: test_format's codes


def test_formats_covered():
    """test_format's codes cover every format of the simulated presets, int4k/32 and the
    raw KV formats included; the KV formats take the codes after the weight formats."""
    for name in PRESETS:
        p = k_params(name)
        g = EngineGeometry(p)
        fmts = g.engine_formats()
        assert 1 <= len(fmts) <= N_CODES and formats.WeightFormat.parse(K_FMT) in fmts
        names = [f.name for f in fmts]
        assert names == list(p.weight_formats) + list(p.kv_formats)
        assert {"int8r/32", "int4r/32"} <= set(names)
        assert [f.name for f in g.kv_formats()] == list(p.kv_formats)
        assert [g.code(formats.WeightFormat.parse(f)) for f in p.kv_formats] == \
            list(range(len(p.weight_formats), len(names)))
        assert unit(k_params(name)).two_level and not unit(plain_params(name)).two_level


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("code", range(N_CODES))
def test_format(preset, code):
    """Every format of the preset (and int4k/32, and the raw KV formats): ragged shapes,
    several operations, random stalls, scales of every kind (wide span, subnormal, high
    exponents, zero; raw formats: none, and a random e0)."""
    p = k_params(preset)
    g = EngineGeometry(p)
    if code >= len(g.formats):
        pytest.skip(f"{preset} has {len(g.formats)} formats")
    wf = g.formats[code].fmt
    rng = np.random.default_rng(100 * code + len(preset))
    modes = ["wide", "sub", "high", "zero", "narrow"]
    ops = [make_op(g, wf, n, k, c=i % g.C, rng=rng, mode=modes[(i + code) % len(modes)])
           for i, (n, k) in enumerate(shapes_for(g, wf))]
    run_ops(p, ops, seed=code)


def mixed_ops(g, rng, rnd, copies=2):
    """Operations of every format of ``g`` (``copies`` each), shuffled, random shapes,
    channels and scale modes."""
    wfs = [f.fmt for f in g.formats] * copies
    rnd.shuffle(wfs)
    modes = ["wide", "sub", "high", "zero", "narrow"]
    ops = []
    for i, wf in enumerate(wfs):
        n = int(rng.integers(1, 2 * g.R + 1))
        k = wf.group_size * int(rng.integers(1, 3))
        ops.append(make_op(g, wf, n, k, c=int(rng.integers(0, g.C)), rng=rng, mode=modes[i % len(modes)]))
    return ops


@pytest.mark.parametrize("preset", PRESETS)
def test_mixed_back_to_back(preset):
    """Operations of every format, shuffled, back to back; heavier stalls on the output."""
    p = k_params(preset)
    g = EngineGeometry(p)
    ops = mixed_ops(g, np.random.default_rng(7), random.Random(3))
    run_ops(p, ops, in_stall=0.2, out_stall=0.5, cfg_gap=0.5, seed=11)


@pytest.mark.parametrize("preset", PRESETS)
def test_without_two_level(preset):
    """The presets without their two-level format (no header reader, no rec_in stage,
    no multipliers: what a build without one generates): every format, shuffled, back to back."""
    p = plain_params(preset)
    g = EngineGeometry(p)
    ops = mixed_ops(g, np.random.default_rng(17), random.Random(13), copies=1)
    run_ops(p, ops, in_stall=0.3, out_stall=0.4, cfg_gap=0.3, seed=12)


@pytest.mark.parametrize("preset", PRESETS)
def test_two_level_headers(preset):
    """Two-level operations back to back, alone and between other formats: each one's
    header (D, Mn, and e0 with them) must be read anew. Heads of every kind (zero D or
    Mn, subnormal, negative, 7 binades apart), one-record and multi-record operations,
    both channels."""
    p = k_params(preset)
    g = EngineGeometry(p)
    wk = formats.WeightFormat.parse(K_FMT)
    others = [f.fmt for f in g.formats if not f.fmt.two_level]
    rng = np.random.default_rng(31)
    rnd = random.Random(32)
    modes = ["zero", "sub", "wide", "high", "narrow", "zero", "wide"]
    ops = []
    for i, mode in enumerate(modes):
        n, kg = [(1, 1), (g.R + 1, 2), (2 * g.R, 1)][i % 3]
        ops.append(make_op(g, wk, n, kg * wk.group_size, c=i % g.C, rng=rng, mode=mode))
        if i >= 3:                                           # then alternate with other formats
            wf = rnd.choice(others)
            ops.append(make_op(g, wf, g.R - 1, wf.group_size, c=(i + 1) % g.C, rng=rng))
    shifts = {op[0]["e0"] for op in ops if op[0]["fmt"] == g.code(wk)}
    assert len(shifts) >= 3, shifts
    run_ops(p, ops, in_stall=0.4, out_stall=0.4, cfg_gap=0.4, seed=33)


@pytest.mark.parametrize("preset", PRESETS)
def test_raw_between_scaled(preset):
    """Raw (KV-cache) operations back to back with each other and between scaled formats
    (the signed format of the same width, one with a min, the two-level one): the
    scale register switches between 1 and the binary16 / two-level scales, the min
    between 0 and the mins, whatever e0 the raw operation's config carries (0, 31 and
    random ones). Ragged rows (past N: values 0, scale 1) and several groups."""
    p = k_params(preset)
    g = EngineGeometry(p)
    raws = g.kv_formats()
    assert raws and all(wf.raw for wf in raws)
    scaled = [formats.WeightFormat.parse(n) for n in ("int8/32", "int4/32", "int4m/32", K_FMT)]
    assert all(wf in g.engine_formats() for wf in scaled)
    rng = np.random.default_rng(41)
    rnd = random.Random(42)
    ops = []
    for i, e0 in enumerate((0, 31, None, None, 25, None)):
        wr = raws[i % len(raws)]
        n, kg = [(g.R - 1, 2), (2 * g.R + 1, 3), (1, 1)][i % 3]
        ops.append(make_op(g, wr, n, kg * wr.group_size, c=i % g.C, rng=rng, e0=e0))
        if i % 2:                                            # two raw operations in a row
            continue
        wf = rnd.choice(scaled)
        ops.append(make_op(g, wf, g.R + 1, wf.group_size, c=(i + 1) % g.C, rng=rng,
                           mode=["wide", "high", "sub"][i % 3]))
    assert any(op[0]["e0"] != formats.E0_MAX for op in ops if op[0]["fmt"] >= len(p.weight_formats))
    run_ops(p, ops, in_stall=0.3, out_stall=0.3, cfg_gap=0.2, seed=43)


@pytest.mark.parametrize("preset", PRESETS)
def test_rate(preset):
    """No stalls: an operation takes max(records * bpb, words) cycles plus a small latency
    that does not grow with the operation (one beat a cycle, or one word a cycle when the
    stream is the bound: records of 576 bits and more on 512-bit words)."""
    p = k_params(preset)
    g = EngineGeometry(p)
    rng = np.random.default_rng(5)
    ops, bounds = [], []
    for f in g.formats:
        # 32 records (16 with 4 beats each): a loss of a cycle per 8 records shows
        n, k = 2 * g.R, 16 * f.fmt.group_size // (2 if f.bpb > 2 else 1)
        cfg, words, beats = make_op(g, f.fmt, n, k, c=0, rng=rng)
        ops.append((cfg, words, beats))
        bounds.append(max(len(beats), len(words)))
        assert len(beats) == cfg["records"] * f.bpb
    assert any(f.record_bits % g.W for f in g.formats), "want records that straddle words"
    stats = run_ops(p, ops, in_stall=0, out_stall=0, cfg_gap=0)
    # latency: the first words fall through the window's slots, then aligner, (rec_in,)
    # FIFO, output
    lat = latency(p)
    for f, st, bound in zip(g.formats, stats, bounds):
        assert st["cycles"] <= bound + lat, f"{f.fmt.name}: {st['cycles']} cycles for a bound of {bound}"
        if f.record_bits <= f.bpb * g.W:                 # beat-bound: not one empty cycle
            assert st["starved"] == 0, f"{f.fmt.name}: starved {st['starved']} cycles"


def test_rate_output_bound():
    """When the stream is faster than the beats (sim: 4 beats per record of at most 2.25
    words), a consumer with random stalls sets the pace alone: once an operation's beats
    have started, a beat is there whenever beat.ready is high."""
    p = k_params("sim")
    g = EngineGeometry(p)
    rng = np.random.default_rng(9)
    assert all(f.record_bits <= f.bpb * g.W for f in g.formats)
    ops = [make_op(g, f.fmt, 4 * g.R, 4 * f.fmt.group_size, c=1, rng=rng) for f in g.formats]
    for f, st in zip(g.formats, run_ops(p, ops, in_stall=0, out_stall=0.6, cfg_gap=0, seed=4)):
        assert st["starved"] == 0, f"{f.fmt.name}: starved {st['starved']} cycles"


@pytest.mark.parametrize("preset", ["sim", "u280-2ch"])
def test_beyond_exact_counts(preset):
    """Past what the host normally sends: operations without records (a two-level one
    with its header word, a raw one), streams with more words past the last record than
    the window and skid register hold (taken and dropped, raw records too), and a format
    code past the build's set (acts as code 0; one KV format only, so that a code is free)."""
    p = dataclasses.replace(k_params(preset), kv_formats=("int8r/32",))
    g = EngineGeometry(p)
    rng = np.random.default_rng(21)
    rnd = random.Random(22)
    f0, f1 = g.formats[0].fmt, g.formats[1].fmt
    wk = formats.WeightFormat.parse(K_FMT)
    junk = [rnd.getrandbits(g.W) for _ in range(sizes(p)[2] + 3)]
    cfg, ws, bs = make_op(g, f0, g.R + 2, 2 * f0.group_size, c=1, rng=rng)
    extra = (dict(cfg, words=cfg["words"] + len(junk)), ws + junk, bs)
    cfg, ws, bs = make_op(g, wk, g.R + 2, wk.group_size, c=0, rng=rng, mode="sub")
    extra_k = (dict(cfg, words=cfg["words"] + len(junk)), ws + junk, bs)
    empty = (dict(fmt=1, e0=3, records=0, words=0), [], [])
    empty_k = (dict(fmt=g.code(wk), e0=20, records=0, words=1), [rnd.getrandbits(g.W)], [])
    wr = formats.WeightFormat.parse("int8r/32")
    empty_r = (dict(fmt=g.code(wr), e0=7, records=0, words=0), [], [])
    cfg, ws, bs = make_op(g, wr, g.R + 1, 2 * wr.group_size, c=1, rng=rng)
    extra_r = (dict(cfg, words=cfg["words"] + len(junk)), ws + junk, bs)
    bad_code = (1 << g.fmt_bits) - 1
    assert bad_code >= len(g.formats)
    cfg, ws, bs = make_op(g, f0, g.R - 1, f0.group_size, c=0, rng=rng)
    unknown = (dict(cfg, fmt=bad_code), ws, bs)
    ops = [make_op(g, f1, g.R + 1, 2 * f1.group_size, c=0, rng=rng), empty, extra, empty, unknown,
           empty_k, make_op(g, wk, 3, wk.group_size, c=1, rng=rng, mode="high"), extra_k, empty_k,
           make_op(g, wk, g.R, wk.group_size, c=1, rng=rng, mode="wide"),
           make_op(g, f1, 3, f1.group_size, c=1, rng=rng), empty_r, extra_r, empty_r,
           make_op(g, f0, g.R, f0.group_size, c=0, rng=rng)]
    run_ops(p, ops, seed=23)


def unit(params):
    dut = DequantUnit(params)
    Fragment.get(dut, None)                              # elaborated: no unused-elaboratable warning
    return dut


def sizes(params):
    dut = unit(params)
    return dut.granules, dut.step, dut.span, dut.rec_granules


def latency(params):
    """Cycles an unstalled operation may take past its bound: the first words fall
    through the window's slots, then the aligner, rec_in (builds with two-level formats),
    the FIFO and the output register."""
    dut = unit(params)
    return dut.span + 3 + dut.two_level


def test_sizes():
    """The aligner reads whole words at granule offsets (G / step of them); the window
    holds the most words a record touches. int4k/32 (records of 9 granules on the u280,
    after a one-granule header) and the raw KV formats (int8r/32: 16 granules, shorter
    than int8/32's 17) change none of the presets' sizes."""
    for name in ("u280", "sim", "sim-mc", "u280-2ch"):
        assert sizes(k_params(name)) == sizes(get_preset(name))
        assert sizes(dataclasses.replace(get_preset(name), kv_formats=())) == sizes(get_preset(name))
    assert sizes(get_preset("u280")) == (8, 1, 3, 17)
    assert sizes(get_preset("sim")) == (4, 1, 3, 9)
    assert sizes(get_preset("sim-mc")) == (4, 1, 5, 17)
    # 10-granule int4m/32 records alone: 2 words at 4 positions; int8r/32's 16 granules
    # (even too) touch 3 words at an odd position of the step
    assert sizes(dataclasses.replace(ODD["even"], kv_formats=())) == (8, 2, 2, 10)
    assert sizes(ODD["even"]) == (8, 2, 3, 16)
    # the header granule breaks the even step: 10-granule records, 1 of header
    assert sizes(dataclasses.replace(ODD["even"], weight_formats=("int4m/32", K_FMT), kv_formats=())) == \
        (8, 1, 3, 10)
    assert sizes(ODD["narrow"]) == (1, 1, 9, 9)
    assert sizes(ODD["two-level"]) == (4, 1, 3, 9)


#: Builds off the presets' paths: every record a multiple of 2 granules (the aligner has
#: half the positions), a 64-bit port (one granule a word: no aligner mux at all; the
#: two-level header is a whole word), one chain per channel, only two-level weight formats
#: (no binary16 scales; two sub-scale offsets; unknown codes act as int4k/32), only raw
#: formats beside a two-level one, and no KV formats.
ODD = {
    "even": dataclasses.replace(get_preset("u280-2ch"), name="even", weight_formats=("int4m/32",)),
    "narrow": dataclasses.replace(k_params("sim"), name="narrow", hbm_port_bits=64),
    "rc1": dataclasses.replace(k_params("sim"), name="rc1", weight_channels=4),
    "two-level": dataclasses.replace(get_preset("sim"), name="two-level",
                                     weight_formats=(K_FMT, "int3k/32", "int4k/64")),
    "raw": dataclasses.replace(get_preset("u280-2ch"), name="raw", weight_formats=(K_FMT,),
                               kv_formats=("int4r/32", "int8r/32")),
    "no-kv": dataclasses.replace(get_preset("sim-mc"), name="no-kv", kv_formats=()),
}


@pytest.mark.parametrize("name", sorted(ODD))
def test_odd_builds(name):
    """Every format of the off-preset builds, with random stalls."""
    p = ODD[name]
    g = EngineGeometry(p)
    rng = np.random.default_rng(4)
    modes = ["wide", "zero", "sub", "high"]
    ops = [make_op(g, f.fmt, n, f.fmt.group_size * kg, c=1, rng=rng, mode=modes[(f.code + kg) % 4])
           for f in g.formats for n, kg in ((g.R + 1, 2), (1, 1))]
    run_ops(p, ops, seed=2)


@pytest.mark.parametrize("bad, match", [
    (dict(chains=6, weight_channels=2), "chains a power of two"),
    (dict(hbm_port_bits=96), "hbm_port_bits"),
    (dict(chain_len=16, weight_formats=("int4-3:4/64",)), "multiple of n_keep"),
    (dict(chain_len=16, weight_formats=("int4/32", "int4-3:4/64")), "n_keep"),
    (dict(act_bits=4), "act_bits"),
])
def test_config_errors(bad, match):
    """Parameters the RTL cannot build: ValueError naming the rule, and no
    unused-elaboratable warning from the half-built component (warnings are errors)."""
    kw = dict(name="t", clock_mhz=100.0, chains=4, chain_len=8, dsp_group=4, weight_channels=2,
              hbm_port_bits=256)
    kw.update(bad)
    with pytest.raises(ValueError, match=match):         # HwParams itself may refuse some
        DequantUnit(HwParams(**kw))


def test_type_error():
    """Not an HwParams: TypeError."""
    with pytest.raises(TypeError):
        DequantUnit("sim")
