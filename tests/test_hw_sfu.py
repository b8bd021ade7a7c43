"""amaranth.sim checks of the SFU core (hw/sfu.py) on the ``sim`` preset (8 lanes, 8 slots).

A testbench serves the core's read requests from numpy arrays and collects its outputs,
with random stalls on every stream (command valid, request ready, read-data valid and
latency, output ready); operations run back to back and every result (dst rows, scales,
factors, argmax) must equal runtime/sfu.py bit for bit (any NaN equals any NaN). Every
wait is bounded. The cycles of each operation (command accepted -> done) are measured
without stalls and set against runtime/golden.py's SFU estimates.
"""

from collections import deque
from dataclasses import replace

import numpy as np
import pytest
from amaranth.lib import data
from amaranth.sim import Simulator

from flightllm.hw import sfu as core
from flightllm.hw.isa import Opcode
from flightllm.hw.params import get_preset
from flightllm.hw.sfu_program import Opnd, Src
from flightllm.runtime import sfu
from flightllm.runtime.timing import Timing

F32 = np.float32
PARAMS = get_preset("sim")
L, S = PARAMS.sfu_lanes, PARAMS.sfu_acc_slots
SPECIAL = np.array([0, -0.0, np.inf, -np.inf, np.nan, 3.4e38, -3.4e38, 1.1754944e-38, 1e-45, -1e-45, 1e-40,
                    1, -1, 2.5, 65504, 7], F32)


def bits(v):
    return np.ascontiguousarray(np.asarray(v, F32)).view(np.uint32)


class Op:
    """One operation: its command fields, the streams it reads (rows x elements) and the
    spec's results (``want``: kind -> array)."""

    def __init__(self, name, rows, n, *, x=None, s2=None, tab=None, xs=None, xf=None, seg=0, group=0, imm=0.0,
                 valid=0, rep=1, sink=0, window=0, want=None, golden=0.0):
        self.name, self.rows, self.n = name, rows, n
        self.cmd = dict(op=Opcode[name].value, rows=rows, n=n, seg=seg, group=group, imm=int(bits([imm])[0]),
                        valid=valid, rep=rep, sink=sink, window=window)
        self.streams = {core.X: x, core.S2: s2, core.TAB: tab, core.XS: xs, core.XF: xf}
        self.want, self.golden = want, golden

    def words(self, stream, row, beat):
        a = self.streams[stream]
        if a is None:
            return [0] * L
        r = a[row] if a.ndim == 2 else a
        v = r[beat * L:(beat + 1) * L]
        w = (v.astype(np.uint8).astype(np.int64) if v.dtype.kind in "iu" else bits(v).astype(np.int64)).tolist()
        return w + [0] * (L - len(w))

    def entries(self):
        """How many ``out`` beats the operation sends."""
        return sum(self.rows * (1 if k == core.ARGMAX else -(-a.shape[-1] // L)) for k, a in self.want.items())


def rand_rows(rng, r, n, spread=3.0, special=False):
    """Random rows; ``special``: consecutive rows of consecutive kinds (from a random one):
    the special values mixed, zeros of both signs, all equal, subnormals only, normals with
    one +-inf, with one NaN, with the extreme normals."""
    x = (rng.standard_normal((r, n)) * 10 ** rng.uniform(-spread, spread, (r, 1))).astype(F32)
    if special:
        k0 = rng.integers(7)
        for i in range(r):
            k = (k0 + i) % 7
            if k == 0:
                x[i] = np.resize(rng.permutation(SPECIAL), n)
            elif k == 1:
                x[i] = np.where(rng.random(n) < 0.5, F32(0), F32(-0.0))
            elif k == 2:
                x[i] = F32(-3.25)
            elif k == 3:
                x[i] = rng.uniform(-1, 1, n).astype(F32) * F32(1e-39)
            else:
                x[i, rng.integers(n, size=3)] = {4: [np.inf, -np.inf, 1], 5: [np.nan, 1, 2],
                                                 6: [3.4e38, -3.4e38, 1.1754944e-38]}[k]
    return x


#: (opcode, rows, n, fields): every opcode; n not a multiple of L (a partial last beat),
#: segments and groups of half a beat, one beat, several beats and the whole row
SPECS = [("ADD", 2, 64, {}), ("ADD", 1, 37, {}), ("FILL", 3, 40, {"imm": -2.5}), ("SILU_MUL", 2, 45, {}),
         ("RMSNORM", 2, 64, {}), ("RMSNORM", 1, 100, {}), ("ROPE", 3, 128, {"seg": 16}),
         ("QUANT", 1, 32, {"seg": 16}), ("QUANT", 2, 64, {"seg": 4, "imm": 7.0}), ("QUANT", 3, 100, {"seg": 0}),
         ("QUANTG", 1, 32, {"group": 32}), ("QUANTG", 2, 64, {"group": 4}), ("QUANTG", 3, 128, {"group": 64}),
         ("ARGMAX", 3, 300, {}),
         ("SOFTMAX", 3, 64, {"t": 1, "valid": 40}), ("SOFTMAX", 2, 128, {"t": 2, "valid": 100}),
         ("SOFTMAX", 2, 256, {"t": 1, "valid": 250, "sink": 1, "window": 2})]
#: one operation per opcode, for the cycle counts
CYCLE_SPECS = [("ADD", 1, 256, {}), ("FILL", 1, 256, {"imm": 1.0}), ("SILU_MUL", 1, 256, {}),
               ("RMSNORM", 1, 256, {}), ("ROPE", 1, 256, {"seg": 64}), ("QUANT", 1, 256, {"seg": 64}),
               ("QUANTG", 1, 256, {"group": 32}), ("ARGMAX", 1, 256, {}),
               ("SOFTMAX", 4, 256, {"t": 1, "valid": 256}), ("RMSNORM", 4, 256, {}), ("QUANTG", 4, 256, {"group": 32})]


def make_ops(rng, specs=SPECS, special=False):
    """The operations of ``specs`` on random rows (``special``: special values); QUANT and
    QUANTG are followed by the DEQUANT of their results. ``golden``: runtime/golden.py's
    cycles (work + sfu_latency)."""
    with np.errstate(all="ignore"):          # the spec on special values (dequantize: 0 * inf)
        return _make_ops(rng, specs, special)


def _make_ops(rng, specs, special):
    lat = Timing().sfu_latency                  # the old estimate (32): no RTL calibration
    ops = []

    def rows(r, n, spread=3.0):
        return rand_rows(rng, r, n, spread, special)

    for name, r, n, kw in specs:
        work = r * n / L
        if name in ("ADD", "SILU_MUL"):
            x, y = rows(r, n), rows(r, n)
            want = x + y if name == "ADD" else sfu.silu_mul(x, y)
            ops.append(Op(name, r, n, x=x, s2=y, want={core.DST: want}, golden=work + lat))
        elif name == "FILL":
            ops.append(Op(name, r, n, imm=kw["imm"], want={core.DST: np.full((r, n), kw["imm"], F32)},
                          golden=work + lat))
        elif name == "RMSNORM":
            x, w = rows(r, n), rand_rows(rng, 1, n, 1.0, special)[0]
            ops.append(Op(name, r, n, x=x, tab=w, imm=1e-5, want={core.DST: sfu.rmsnorm(x, w, 1e-5, L, S)},
                          golden=2 * work + lat))
        elif name == "ROPE":
            hd = kw["seg"]
            x = rows(r, n)
            cs = rng.uniform(-1, 1, (2, r, hd // 2)).astype(F32)
            tab = np.empty((r, hd), F32)
            tab[:, 0::2], tab[:, 1::2] = cs
            want = sfu.rope(x.reshape(r, n // hd, hd), cs[0], cs[1]).reshape(r, n)
            ops.append(Op(name, r, n, x=x, tab=np.tile(tab, n // hd), seg=hd, want={core.DST: want},
                          golden=work + lat))
        elif name == "QUANT":
            seg, qmax = kw["seg"], kw.get("imm", 0.0)
            x = rows(r, n)
            if r > 1:
                x[1, :max(seg, 1)] = 0              # an all-zero segment
            q, sc = sfu.requantize(x, seg, qmax)
            ops.append(Op(name, r, n, x=x, seg=seg, imm=qmax, want={core.DST: q, core.SCALE: sc},
                          golden=2 * work + lat))
            ops.append(Op("DEQUANT", r, n, x=q, xs=sc, seg=seg, want={core.DST: sfu.dequantize(q, sc)},
                          golden=work + lat))
        elif name == "QUANTG":
            g = kw["group"]
            x = rows(r, n)
            if r > 2:
                x[2] = 0
            q, a, u = sfu.requantize_groups(x, g)
            ops.append(Op(name, r, n, x=x, group=g, want={core.DST: q, core.SCALE: a[:, None], core.FACTOR: u},
                          golden=2 * work + lat))
            ops.append(Op("DEQUANT", r, n, x=q, xs=a[:, None], xf=u, group=g,
                          want={core.DST: sfu.dequantize(q, a[:, None], u)}, golden=work + lat))
        elif name == "ARGMAX":
            x = rows(r, n)
            x[-1, 3] = x[-1, n - 2] = 1e30              # a tie: the lowest index
            ops.append(Op(name, r, n, x=x, want={core.ARGMAX: sfu.argmax(x)[:, None]}, golden=n / L + lat))
        elif name == "SOFTMAX":                         # r rows: t token rows x rep query heads
            t, sink, window = kw["t"], kw.get("sink", 0), kw.get("window", 0)
            rep = r // t
            sc = rows(r, n, 1.0).reshape(t, rep, n)
            vs = rng.uniform(0.001, 0.05, n).astype(F32)
            if special:
                vs[:3] = [0, np.inf, 1e-40]
            c = sfu.score_scale(64)
            mask = sfu.attention_mask(kw["valid"] + np.arange(t), n, sink, window)
            q, scale, u = sfu.softmax_probs(sc, mask, vs, c, L, S)
            used = int(mask.any(axis=0).reshape(-1, 32).any(axis=1).sum()) * 32
            ops.append(Op(name, r, n, x=sc.reshape(r, n), s2=vs, imm=c, valid=kw["valid"], rep=rep, sink=sink,
                          window=window, want={core.DST: q.reshape(r, n), core.SCALE: scale.reshape(-1, 1),
                                               core.FACTOR: u.reshape(r, -1)},
                          golden=3 * r * used / L + lat))
    return ops


def field(layout, v, name):
    f = layout[name]
    w = f.width
    return (v >> f.offset) & ((1 << w) - 1)


def simulate(ops, seed=0, stall=0.3, rd_latency=(1, 6), probe=None, **kw):
    """Run ``ops`` back to back on a fresh core (``kw``: its options); returns (out
    entries per op, cycles per op from the command handshake to ``done``)."""
    dut = core.SfuCore(PARAMS, **kw)
    rng = np.random.default_rng(seed)
    cmd_l = data.Layout.cast(core.SfuCmd)
    req_l, rd_l = core.req_layout(PARAMS), core.rd_layout(PARAMS)
    outs, accept, done = [], [], []

    def cmd_word(op):
        v = 0
        for name, val in op.cmd.items():
            f = cmd_l[name]
            v |= (int(val) & ((1 << f.width) - 1)) << f.offset
        return v

    def answer(op, req):
        streams, row, beat = (field(req_l, req, k) for k in ("streams", "row", "beat"))
        v = 0
        prim = next((s for s in (core.X, core.XS, core.XF) if streams & s), None)
        for name, s in (("x", prim), ("s2", core.S2), ("tab", core.TAB)):
            if s is not None and streams & s:
                for i, w in enumerate(op.words(s, row, beat)):
                    v |= w << (rd_l[name].offset + 32 * i)
        return v

    async def bench(ctx):
        pend = deque()
        t, ci, last = 0, 0, 0
        while len(done) < len(ops):
            op = ops[len(done)]                 # a hung core fails: no operation may take longer
            assert t - last < 2500 + 60 * op.rows * -(-op.n // L), f"hung in operation {len(done)} ({op.name})"
            cv = ci < len(ops) and rng.random() >= stall
            ctx.set(dut.cmd.valid, cv)
            if cv:
                ctx.set(dut.cmd.payload.as_value(), cmd_word(ops[ci]))
            qr = rng.random() >= stall
            ctx.set(dut.req.ready, qr)
            rv = bool(pend) and pend[0][0] <= t and rng.random() >= stall
            ctx.set(dut.rd.valid, rv)
            if rv:
                ctx.set(dut.rd.payload.as_value(), pend[0][1])
            orr = rng.random() >= stall
            ctx.set(dut.out.ready, orr)
            if cv and ctx.get(dut.cmd.ready):
                accept.append(t)
                ci += 1
            if qr and ctx.get(dut.req.valid):
                when = max(t + int(rng.integers(*rd_latency)), pend[-1][0] if pend else 0)
                pend.append((when, answer(ops[ci - 1], ctx.get(dut.req.payload.as_value()))))
            if rv and ctx.get(dut.rd.ready):
                pend.popleft()
            if orr and ctx.get(dut.out.valid):
                outs.append(ctx.get(dut.out.payload.as_value()))
            if ctx.get(dut.done):
                done.append(t)
                last = t
            if probe:
                probe(dut, ctx, t)
            await ctx.tick()
            t += 1
        for _ in range(50):                          # nothing more may come
            ctx.set(dut.out.ready, 1)
            if ctx.get(dut.out.valid):
                outs.append(ctx.get(dut.out.payload.as_value()))
            assert not ctx.get(dut.done), "a done pulse too many"
            await ctx.tick()

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    per_op, k = [], 0
    for op in ops:
        per_op.append(outs[k:k + op.entries()])
        k += op.entries()
    assert k == len(outs), f"{len(outs) - k} output beats too many"
    return per_op, [d - a for a, d in zip(accept, done)]


def collect(op, entries):
    """The out beats of ``op`` as arrays shaped like ``op.want``."""
    out_l = core.out_layout(PARAMS)
    got = {k: np.zeros(a.shape, np.int64) for k, a in op.want.items()}
    seen = {k: np.zeros(a.shape, bool) for k, a in op.want.items()}
    for v in entries:
        kind, row, beat, valid = (field(out_l, v, f) for f in ("kind", "row", "beat", "valid"))
        assert kind in got, f"{op.name}: unexpected output kind {kind}"
        words = [(v >> (out_l["data"].offset + 32 * i)) & 0xFFFFFFFF for i in range(L)]
        if kind == core.ARGMAX:
            assert valid == 1
            got[kind][row, 0], seen[kind][row, 0] = words[0], True
            continue
        for i in range(L):
            e = beat * L + i
            assert bool(valid >> i & 1) == (e < got[kind].shape[1]), (op.name, kind, row, beat, valid)
            if valid >> i & 1:
                assert not seen[kind][row, e], f"{op.name}: element ({kind}, {row}, {e}) twice"
                got[kind][row, e], seen[kind][row, e] = words[i], True
    res = {}
    for k, a in op.want.items():
        assert seen[k].all(), f"{op.name}: missing outputs of kind {k}"
        g = got[k]
        if a.dtype == F32:
            res[k] = g.astype(np.uint32).view(F32)
        elif a.dtype == np.int8:
            res[k] = g.astype(np.uint8).view(np.int8)
        else:
            res[k] = g.astype(a.dtype)
    return res


def same(a, b, what):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype, (what, a.shape, b.shape, a.dtype, b.dtype)
    if a.dtype == F32:
        ok = (a.view(np.uint32) == b.view(np.uint32)) | (np.isnan(a) & np.isnan(b))
    else:
        ok = a == b
    assert ok.all(), f"{what}: {np.argwhere(~ok)[:5].tolist()} got {a[~ok][:5]} want {b[~ok][:5]}"


def check(ops, **kw):
    per_op, cycles = simulate(ops, **kw)
    for i, (op, entries) in enumerate(zip(ops, per_op)):
        got = collect(op, entries)
        for k, want in op.want.items():
            same(got[k], want, f"op {i} {op.name} rows {op.rows} n {op.n} kind {k}")
    return cycles


def test_every_opcode_random_rows_with_stalls():
    check(make_ops(np.random.default_rng(1)), seed=1)


def test_special_values_with_stalls():
    check(make_ops(np.random.default_rng(2), special=True), seed=2)


def test_small_fifos_and_long_stalls():
    """A 3-entry output FIFO and 2 read credits make the issue wait for credits all the
    time, and output stalls fill the FIFO."""
    specs = [("ADD", 2, 64, {}), ("QUANTG", 2, 64, {"group": 4}), ("ARGMAX", 2, 100, {}),
             ("SOFTMAX", 3, 64, {"t": 1, "valid": 40})]
    check(make_ops(np.random.default_rng(5), specs, special=True), seed=5, stall=0.5, out_depth=3, rd_depth=2)


@pytest.mark.slow_rtl
def test_cycles_against_golden_estimates():
    """No stalls (read latency 2): the measured cycles per operation beside golden.py's
    old estimate (work + 32); printed with -s. The golden model's timing is calibrated on
    the whole unit by bench/sfu_cycles.py (docs/sfu_cycles.md)."""
    ops = make_ops(np.random.default_rng(3), CYCLE_SPECS)
    cycles = check(ops, seed=3, stall=0.0, rd_latency=(2, 3))
    print(f"\n{'op':9} {'rows':>4} {'n':>4} {'RTL':>6} {'golden':>7}")
    for op, c in zip(ops, cycles):
        print(f"{op.name:9} {op.rows:4} {op.n:4} {c:6} {op.golden:7.0f}")
        assert c < 3 * op.golden + 1200, (op.name, c)


def test_a_template_change_changes_the_rtl(monkeypatch):
    """The core compiles hw/sfu_program.template at elaboration: ADD made (x + s2) * 3
    there is (x + s2) * 3 in the simulated RTL."""
    orig = core.template

    def template(op, factors=False):
        steps = orig(op, factors=factors)
        return [replace(steps[0], mul1=Opnd(Src.IMM, imm=3.0))] if op == "ADD" else steps

    monkeypatch.setattr(core, "template", template)
    rng = np.random.default_rng(4)
    x, y = rand_rows(rng, 2, 20), rand_rows(rng, 2, 20)
    check([Op("ADD", 2, 20, x=x, s2=y, want={core.DST: (x + y) * F32(3)})], seed=4)


@pytest.mark.slow_rtl
@pytest.mark.parametrize("seed", range(4))
def test_sweep(seed):
    """Bigger rows and operations, specials on odd seeds, heavy stalls."""
    rng = np.random.default_rng(100 + seed)
    scale = {"valid": 4, "t": 2}                    # rows x 2, n x 4 (SOFTMAX: token rows x 2)
    specs = [(name, 2 * r, 4 * n, {k: v * scale.get(k, 1) for k, v in kw.items()}) for name, r, n, kw in SPECS]
    check(make_ops(rng, specs, special=seed % 2 == 1), seed=seed, stall=0.5)
