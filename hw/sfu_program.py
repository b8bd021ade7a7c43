"""The SFU's micro-programs: every SFU opcode as passes over one fixed lane pipeline.

The special-function unit has ``sfu_lanes`` identical lanes. Each lane is one
fixed-latency pipeline of float32 units in a fixed order; a *pass* streams a row (or a
short vector, or one scalar) through it, each element to lane ``element % lanes``, with
every stage either configured or bypassed (a bypassed stage is a delay of the same
length, so the latency never changes)::

    in --CVT--ADD1--MUL1--EXP--MASK--MUL2--ADD2--DIV--MUL3--RND--> out (float32, int8 or uint8)
          |     |     |     |     |     |     |     |     |
        int->f  +-B   *C  exp(+-x) 0 if  *F   +-(D[*D2]) E/x   *G  rint|ceil, clip [lo, hi]
                                 masked                  or x/E
                           taps -> SUM (lane slots + tree) / MAX, AMAX per segment and row / ARGMAX

Operands B..G come from: the pass input itself (delayed to the stage), a second row
stream, the table stream (RMSNORM weights, RoPE cos/sin), a scalar register, a vector
register indexed by ``element // per`` (a segment's or a group's scale), or an
immediate; stream operands can take the element of the pair partner (RoPE). ADD2's
operand may be a product of two operands (its own multiplier: RoPE's second product).
SQRT (one per RMSNORM row) is a separate iterative unit between passes.

So every opcode is a short list of :class:`Pass` and :class:`Sqrt` steps
(:func:`program`): row passes that move ``lanes`` elements per cycle, and scalar passes
(a register or a short vector through the same pipeline) for the per-row and per-group
divisions. SOFTMAX recomputes its probabilities in its last pass instead of storing
them (three row passes: max; exp, sum and group maxima; quantize), RoPE rotates pairs in
one pass. :func:`run` interprets a program in numpy float32, and the tests hold it
bit-exact to :mod:`flightllm.runtime.sfu` (the specification); the RTL sequencer runs
the same programs.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace

import numpy as np

from ..runtime import sfu
from .params import ACT_MAX, FACTOR_MAX

__all__ = ["Src", "Pair", "Opnd", "Red", "Pass", "Sqrt", "template", "sum_passes", "TREE_WIDTH", "bind", "program", "run", "Env",
           "SOFTMAX_GROUP"]

F32 = np.float32


class Src(enum.Enum):
    IN = 0      #: the pass's own input element
    S2 = 1      #: the second row stream (ADD, SILU_MUL's u, SOFTMAX's value scales)
    TAB = 2     #: the table stream (RMSNORM weight, RoPE cos/sin)
    REG = 3     #: a scalar register
    VEC = 4     #: a vector register, element e reads entry e // per
    IMM = 5     #: an immediate


class Pair(enum.Enum):
    SELF = 0    #: element e
    SWAP = 1    #: element e ^ 1 (the other of its pair)
    EVEN = 2    #: element e & ~1
    ODD = 3     #: element e | 1


@dataclass(frozen=True)
class Opnd:
    """A stage operand: ``src`` (with register/vector ``name``, ``per`` or ``imm``), the
    pair element to take and whether to negate it (a sign flip, exact: -(a*b) = a*(-b))."""
    src: Src
    name: str = ""
    per: int = 1
    imm: float = 0.0
    pair: Pair = Pair.SELF
    neg: bool = False
    neg_even: bool = False                  #: negate in even elements only (RoPE's - x1 s)


@dataclass(frozen=True)
class Red:
    """A reduction at a tap: ``SUM`` (the spec's lane order, into register ``reg``),
    ``MAX`` (masked elements left out), ``AMAX`` (max |x| per segment of ``per`` into
    vector ``vec`` and over the row into ``reg``) or ``ARGMAX``."""
    kind: str
    tap: str
    reg: str = ""
    vec: str = ""
    per: int = 0


@dataclass(frozen=True)
class Pass:
    """One trip of ``length`` elements through the lane pipeline (see the module docstring)."""
    inp: Opnd
    length: int
    add1: Opnd | None = None
    mul1: Opnd | None = None
    exp: bool = False
    exp_neg: bool = False
    mask: bool = False
    mul2: Opnd | None = None
    add2: Opnd | None = None
    add2_mul: Opnd | None = None            #: ADD2 adds add2 * add2_mul
    div: Opnd | None = None
    div_num: bool = False                   #: x = E / x (else x / E)
    div_safe: bool = False                  #: a zero divisor gives 0 (not +-inf / NaN)
    mul3: Opnd | None = None
    rnd: str = ""                           #: "", "rint" or "ceil"
    clip: tuple | None = None               #: (lo, hi) after rounding
    out: str = ""                           #: "dst" (row stream), "reg:NAME", "vec:NAME", "scale", "factor"
    out_int: str = ""                       #: "", "i8" or "u8" (F2I of the clipped value)
    reds: tuple = ()


@dataclass(frozen=True)
class Sqrt:
    """``reg[dst] = sqrt(reg[src])`` on the iterative unit."""
    src: str
    dst: str


@dataclass
class Env:
    """What a program reads and writes: the row streams (rows x n), the table stream,
    the mask, and what the passes leave behind."""
    x: np.ndarray                           #: the source row(s): float32, int8 (DEQUANT) or int64
    s2: np.ndarray | None = None
    tab: np.ndarray | None = None
    mask: np.ndarray | None = None
    lanes: int = 8
    slots: int = 1
    regs: dict = field(default_factory=dict)
    vecs: dict = field(default_factory=dict)
    dst: np.ndarray | None = None
    scale: np.ndarray | None = None
    factor: np.ndarray | None = None
    argmax: np.ndarray | None = None


# ----------------------------------------------------------------------------- programs
# Templates name what an instruction supplies at run time, so the RTL holds each opcode's
# steps once (a ROM) and binds them per instruction, as :func:`bind` does here: lengths
# "n", "n/seg", "n/group" (a segment or group count) and immediates "eps", "c", "imm",
# "qmax" (QUANT's level, 0 meaning ACT_MAX) and "n" (the row length as a float).
_QU = float(ACT_MAX * FACTOR_MAX)
SOFTMAX_GROUP = 32                           #: SOFTMAX's probabilities: a factor per 32 positions


def _requant_groups(inp: Opnd, per, quant: dict, scale: list | None = None) -> list:
    """QUANTG's and SOFTMAX's tail: from the group maxima ``G`` and row max ``amax`` the
    factors u, the per-group inverse, the row scale A; then the quantizing pass."""
    ng = "n/group" if per == "group" else f"n/{per}"
    return [
        Pass(Opnd(Src.REG, "amax"), 1, div=Opnd(Src.IMM, imm=float(FACTOR_MAX)), div_num=True, div_safe=True,
             out="reg:r"),
        Pass(Opnd(Src.VEC, "G"), ng, mul1=Opnd(Src.REG, "r"), rnd="ceil", clip=(0.0, float(FACTOR_MAX)),
             out="vec:u"),
        Pass(Opnd(Src.VEC, "u"), ng, mul1=Opnd(Src.REG, "amax"), div=Opnd(Src.IMM, imm=_QU), div_num=True,
             div_safe=True, out="vec:inv"),
        Pass(Opnd(Src.VEC, "u"), ng, out="factor", out_int="u8"),
        Pass(Opnd(Src.REG, "amax"), 1, div=Opnd(Src.IMM, imm=_QU), out="reg:A"),
        *(scale or [Pass(Opnd(Src.REG, "A"), 1, out="scale")]),
        Pass(inp, "n", **quant, mul3=Opnd(Src.VEC, "inv", per=per), rnd="rint",
             clip=(-float(ACT_MAX), float(ACT_MAX)), out="dst", out_int="i8"),
    ]


#: pairs the SFU core's sum tree adds per cycle at its first level: a row's tree takes
#: ``lanes x slots / (2 x TREE_WIDTH)`` cycles (hw/sfu.py; the golden model's timing)
TREE_WIDTH = 4


def sum_passes(op: str) -> int:
    """Passes of ``op`` (an SFU opcode name) with a SUM reduction: each row of them goes
    through the core's pairwise tree (:data:`TREE_WIDTH`)."""
    return sum(1 for st in template(op) if isinstance(st, Pass) for r in st.reds if r.kind == "SUM")


def template(op: str, factors: bool = False) -> list:
    """The steps of SFU opcode ``op`` with run-time lengths and immediates by name
    (``factors``: DEQUANT of a QUANTG buffer, whose factors come per ``group``)."""
    x = Opnd(Src.IN)
    if op == "ADD":
        return [Pass(x, "n", add1=Opnd(Src.S2), out="dst")]
    if op == "FILL":
        return [Pass(Opnd(Src.IMM, imm="imm"), "n", out="dst")]
    if op == "SILU_MUL":                     # (g / (1 + exp(-g))) * u
        return [Pass(x, "n", exp=True, exp_neg=True, add2=Opnd(Src.IMM, imm=1.0), div=x, div_num=True,
                     mul3=Opnd(Src.S2), out="dst")]
    if op == "RMSNORM":                      # r = 1 / sqrt(sum(x*x) / n + eps); (x * r) * w
        return [Pass(x, "n", mul1=x, reds=(Red("SUM", "MUL1", reg="ss"),)),
                Pass(Opnd(Src.REG, "ss"), 1, div=Opnd(Src.IMM, imm="n"), out="reg:ms"),
                Pass(Opnd(Src.REG, "ms"), 1, add1=Opnd(Src.IMM, imm="eps"), out="reg:t"),
                Sqrt("t", "sq"),
                Pass(Opnd(Src.REG, "sq"), 1, div=Opnd(Src.IMM, imm=1.0), div_num=True, out="reg:r"),
                Pass(x, "n", mul1=Opnd(Src.REG, "r"), mul2=Opnd(Src.TAB), out="dst")]
    if op == "ROPE":                         # y0 = x0 c - x1 s, y1 = x1 c + x0 s (tab: c, s per pair)
        return [Pass(x, "n", mul1=Opnd(Src.TAB, pair=Pair.EVEN),
                     add2=Opnd(Src.IN, pair=Pair.SWAP), add2_mul=Opnd(Src.TAB, pair=Pair.ODD, neg_even=True),
                     out="dst")]
    if op == "QUANT":                        # per segment: scale = amax / Q, q = rint(x * (Q / amax))
        a = Opnd(Src.VEC, "amax")
        return [Pass(x, "n", reds=(Red("AMAX", "IN", vec="amax", per="seg"),)),
                Pass(a, "n/seg", div=Opnd(Src.IMM, imm="qmax"), out="scale"),
                Pass(a, "n/seg", div=Opnd(Src.IMM, imm="qmax"), div_num=True, div_safe=True, out="vec:inv"),
                Pass(x, "n", mul1=Opnd(Src.VEC, "inv", per="seg"), rnd="rint", clip=("-qmax", "qmax"),
                     out="dst", out_int="i8")]
    if op == "QUANTG":
        return [Pass(x, "n", reds=(Red("AMAX", "IN", reg="amax", vec="G", per="group"),)),
                *_requant_groups(x, "group", {})]
    if op == "DEQUANT":                      # float32(q [* u]) * scale (per segment)
        return [Pass(x, "n", mul1=Opnd(Src.VEC, "u", per="group") if factors else None,
                     mul2=Opnd(Src.VEC, "scale", per="seg"), out="dst")]
    if op == "ARGMAX":
        return [Pass(x, "n", reds=(Red("ARGMAX", "IN", reg="argmax"),))]
    if op == "SOFTMAX":                      # one (row, head) of n positions (runtime/sfu.py)
        probs = dict(add1=Opnd(Src.REG, "m", neg=True), mul1=Opnd(Src.IMM, imm="c"), exp=True, mask=True,
                     mul2=Opnd(Src.S2))
        g = SOFTMAX_GROUP
        return [Pass(x, "n", mask=True, reds=(Red("MAX", "IN", reg="m"),)),
                Pass(x, "n", **probs, reds=(Red("SUM", "MASK", reg="d"), Red("AMAX", "MUL2", reg="amax", vec="G",
                                                                                 per=g))),
                *_requant_groups(x, g, probs, [Pass(Opnd(Src.REG, "A"), 1, div=Opnd(Src.REG, "d"), out="scale")])]
    raise ValueError(f"SFU program: unknown opcode {op!r}")


def bind(steps: list, **fields) -> list:
    """``steps`` with the run-time names replaced by the instruction's ``fields`` (n, seg,
    group, eps, c, imm, qmax)."""
    f = dict(fields)
    f["qmax"] = float(f.get("qmax") or ACT_MAX)
    f["-qmax"] = -f["qmax"]

    def num(v, what):
        if not isinstance(v, str):
            return v
        if v.startswith("n/"):
            d = f[v[2:]] if v[2:] in f else int(v[2:])
            if not d or f["n"] % d:
                raise ValueError(f"SFU program: {v[2:]} {d} does not divide the row of {f['n']}")
            return f["n"] // d
        if v not in f:
            raise ValueError(f"SFU program: {what} needs the instruction field {v!r}")
        return float(f[v]) if what == "immediate" and v == "n" else f[v]

    def opnd(o):
        return None if o is None else replace(o, imm=num(o.imm, "immediate"), per=num(o.per, "segment"))

    out = []
    for s in steps:
        if isinstance(s, Pass):
            s = replace(s, inp=opnd(s.inp), length=num(s.length, "length"),
                        clip=None if s.clip is None else tuple(float(num(c, "clip")) for c in s.clip),
                        reds=tuple(replace(r, per=num(r.per, "segment")) for r in s.reds),
                        **{k: opnd(getattr(s, k)) for k in ("add1", "mul1", "mul2", "add2", "add2_mul", "div",
                                                            "mul3")})
        out.append(s)
    return out


def program(op: str, n: int, *, seg: int = 0, group: int = 0, qmax: float = 0.0, eps: float = 0.0,
            c: float = 0.0, imm: float = 0.0) -> list:
    """The bound steps of SFU opcode ``op`` on a row of ``n`` elements (instruction fields:
    ``seg`` = QUANT's segment, ROPE's head_dim or the scale segment of DEQUANT's source;
    ``group`` = QUANTG's group or that of DEQUANT's factors (a QUANTG buffer); ``qmax``
    QUANT's level; ``eps`` RMSNORM's; ``c`` SOFTMAX's score scale; ``imm`` FILL's value)."""
    return bind(template(op, factors=bool(group)), n=n, seg=seg or n, group=group, qmax=qmax, eps=eps, c=c,
                imm=imm)


# ----------------------------------------------------------------------------- interpreter
def _opnd(o: Opnd, env: Env, inp: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Operand ``o`` for the elements ``idx`` of a pass whose input values are ``inp``."""
    if o.src == Src.IMM:
        v = np.full(inp.shape, o.imm, F32)
    elif o.src == Src.REG:
        v = np.broadcast_to(np.asarray(env.regs[o.name], F32).reshape(-1, 1), inp.shape)
    elif o.src == Src.VEC:
        v = np.asarray(env.vecs[o.name], F32)[:, idx // o.per]
    else:
        if o.src == Src.IN:
            v = inp
        else:
            v = np.asarray(env.s2 if o.src == Src.S2 else env.tab, F32)
            v = np.broadcast_to(v, inp.shape) if v.ndim == 2 else np.broadcast_to(v[None, :], inp.shape)
        sel = {Pair.SELF: idx, Pair.SWAP: idx ^ 1, Pair.EVEN: idx & ~1, Pair.ODD: idx | 1}[o.pair]
        v = v[:, sel]
    v = np.asarray(v, F32)
    if o.neg_even:
        v = np.where(idx % 2 == 0, -v, v)
    return -v if o.neg else v


def _pass(p: Pass, env: Env) -> np.ndarray:
    """Run one pass; returns its output (float32, or int8/uint8 with ``out_int``)."""
    idx = np.arange(p.length)
    shape = (env.x.shape[0], p.length)
    a = env.x[:, :p.length] if p.inp.src == Src.IN else _opnd(p.inp, env, np.zeros(shape, F32), idx)
    x = np.asarray(a).astype(F32)                                            # CVT
    inp = x
    taps = {"IN": x}
    with np.errstate(all="ignore"):
        if p.add1:
            x = x + _opnd(p.add1, env, inp, idx)
        if p.mul1:
            x = x * _opnd(p.mul1, env, inp, idx)
        taps["MUL1"] = x
        if p.exp:
            x = sfu.exp(-x if p.exp_neg else x)
        mask = env.mask[:, :p.length] if p.mask else None
        if p.mask and p.exp:
            x = np.where(mask, x, F32(0))
        taps["MASK"] = x
        if p.mul2:
            x = x * _opnd(p.mul2, env, inp, idx)
        taps["MUL2"] = x
        if p.add2:
            d = _opnd(p.add2, env, inp, idx)
            if p.add2_mul:
                d = d * _opnd(p.add2_mul, env, inp, idx)
            x = x + d
        if p.div:
            e = _opnd(p.div, env, inp, idx)
            q = e / x if p.div_num else x / e
            if p.div_safe:
                q = np.where((x if p.div_num else e) == 0, F32(0), q).astype(F32)
            x = q
        if p.mul3:
            x = x * _opnd(p.mul3, env, inp, idx)
        if p.rnd:
            x = np.rint(x) if p.rnd == "rint" else np.ceil(x)
        if p.clip:
            x = np.minimum(np.maximum(x, F32(p.clip[0])), F32(p.clip[1]))
    x = np.asarray(x, F32)
    for r in p.reds:
        v = taps[r.tap]
        if r.kind == "SUM":
            env.regs[r.reg] = sfu.lane_sum(v, env.lanes, env.slots)
        elif r.kind == "MAX":
            env.regs[r.reg] = np.where(mask, v, F32(-np.inf)).max(axis=-1) if p.mask else v.max(axis=-1)
        elif r.kind == "AMAX":
            av = np.abs(v)
            env.vecs[r.vec] = np.maximum.reduce(av.reshape(av.shape[0], -1, r.per), axis=-1)
            if r.reg:
                env.regs[r.reg] = np.maximum.reduce(av, axis=-1)
        elif r.kind == "ARGMAX":
            env.argmax = np.argmax(v, axis=-1)
    val = sfu.to_int(x, np.int8 if p.out_int == "i8" else np.uint8) if p.out_int else x
    if not p.out:
        return val
    kind, _, name = p.out.partition(":")
    if kind == "reg":
        env.regs[name] = val[:, 0]
    elif kind == "vec":
        env.vecs[name] = val
    else:
        setattr(env, kind, val)
    return val


def run(steps: list, env: Env) -> Env:
    """Interpret ``steps`` (from :func:`program`) on ``env`` in numpy float32."""
    for s in steps:
        if isinstance(s, Sqrt):
            env.regs[s.dst] = np.sqrt(np.asarray(env.regs[s.src], F32))
        else:
            _pass(s, env)
    return env


# ----------------------------------------------------------------------------- lane encoding
#: the operand that leaves a stage's value unchanged (exact for every input; a NaN stays a NaN)
IDENTITY = {"b": -0.0, "c": 1.0, "d": -0.0, "d2": 1.0, "e": 1.0, "f": 1.0, "g": 1.0}
_PORT = {"add1": "b", "mul1": "c", "add2": "d", "add2_mul": "d2", "div": "e", "mul2": "f", "mul3": "g"}
OUT_CODE = {"": 0, "i8": 1, "u8": 2}


def _bits(v) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(v, F32).reshape(np.shape(v))).view(np.uint32)


def lane_words(p: Pass, env: Env) -> tuple[dict, dict]:
    """What the sequencer presents to the lanes for row pass ``p``: the lane configuration
    (:class:`~flightllm.hw.sfu_lane.LaneConfig` fields) and, per port, the (rows, length)
    uint32 words of every element (unused stages get :data:`IDENTITY`)."""
    idx = np.arange(p.length)
    shape = (env.x.shape[0], p.length)
    int8 = p.inp.src == Src.IN and env.x.dtype == np.int8
    if p.inp.src == Src.IN:
        a = env.x[:, :p.length]
        inp = a.astype(F32)
        words = {"a": a.astype(np.uint8).astype(np.uint32) if int8 else _bits(a)}
    else:
        inp = _opnd(p.inp, env, np.zeros(shape, F32), idx)
        words = {"a": _bits(inp)}
    for stage, port in _PORT.items():
        o = getattr(p, stage)
        v = _opnd(o, env, inp, idx) if o is not None else np.full(shape, IDENTITY[port], F32)
        words[port] = _bits(np.broadcast_to(v, shape))
    words["mask"] = (env.mask[:, :p.length] if p.mask else np.ones(shape, bool)).astype(np.uint32)
    lo, hi = p.clip or (0.0, 0.0)
    cfg = {"cvt_int8": int(int8), "exp": int(p.exp), "exp_neg": int(p.exp_neg), "mask": int(p.mask and p.exp),
           "div_num": int(p.div_num), "div_safe": int(p.div_safe), "rnd": int(bool(p.rnd)),
           "rnd_ceil": int(p.rnd == "ceil"), "clip": int(p.clip is not None), "out": OUT_CODE[p.out_int],
           "lo": int(_bits([lo])[0]), "hi": int(_bits([hi])[0])}
    return cfg, words
