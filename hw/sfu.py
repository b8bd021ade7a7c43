"""The SFU core: the micro-programs of :mod:`flightllm.hw.sfu_program` on ``sfu_lanes`` lanes.

One operation at a time, in order: an operation (:class:`SfuCmd`) selects one of
:data:`PROGRAMS`, whose steps come from :func:`~flightllm.hw.sfu_program.template` at
elaboration time: each step is one entry of a ROM (``_Step``: its length, streams, lane
configuration, operand sources, reductions and outputs), indexed by a step id that
travels with every beat, so a change of a template changes the RTL. Run-time lengths
("n", "n/seg", "n/group", "n/32") and immediates ("eps", "c", "imm", "qmax", "n") are
bound from the command's fields in hardware. Results are bit-exact with the interpreter
(:func:`~flightllm.hw.sfu_program.run`) and so with :mod:`flightllm.runtime.sfu`.

Pipeline (``L`` lanes; cycles counted from the issue of a beat, S0)::

  cmd -> SETUP (log2 of seg/group, counts, float(n))
  request walker --req (streams, row, beat)--> buffers --rd (x, s2, tab: L words)--> rd FIFO
  issue walker (step ROM, rows, beats) -S0-> S1: operands (streams, scalar regs, vector regs,
        immediates, pair partners) + LaneConfig --> L x SfuLane (latency ``lat`` = 115)
             taps IN, MUL1, MASK, MUL2 -- aligned at S1 + 53 --> SUM unit / MAX unit
             lane outputs @ S1 + lat + 1 (W) --> out FIFO (dst, scale, factor) | scalar regs | vector regs

A *pass* streams ``rows`` rows of ``length`` elements, element ``e`` of a row to lane
``e % L`` in beat ``e // L``; passes run pass-major (step k for every row, then step
k + 1), so independent rows stream back to back. A step that reads a register or vector
written since the last wait, or writes a vector memory written since then, first waits
until those writes are done (``drain``: cycles since the last issue, and the SUM tree
empty); the waits are computed from the templates at elaboration. SQRT steps run the
iterative :class:`~flightllm.hw.fp32.FSqrt` row after row.

Operands. Streams x, s2, tab come in the read beat (a pair's partner is the neighbouring
lane: ``L`` is even); a scalar register (``Src.REG``) is one LUTRAM per name slot, read at
the beat's row; a vector register (``Src.VEC``) is one of ``vec_mems`` memories of
``L``-entry words (names whose lives overlap get different memories), row ``r`` of a
vector of ``c`` entries at words ``r * ceil(c / L)``; a beat reads one word and lane
``l`` takes entry ``slot0 + (l >> log2(per))``, so a segment may span several beats or
part of one (per a power of two). Unused stages get the identity operand. Vectors a
program reads before writing them are the source's side arrays (DEQUANT's segment scales
``scale`` and group factors ``u``): a Load step per row fetches them (streams XS, XF).

Reductions, outside the lanes, at one point (S1 + 53: the MUL2 tap; the IN, MUL1 and
MASK taps are delayed to it):

* SUM (the spec's order, :func:`flightllm.runtime.sfu.lane_sum`): per lane one FAdd and
  ``S`` accumulator slots (beat ``b`` to slot ``b % S``, each from +0.0 in arrival
  order), in two banks (rows alternate, so a row's slots wait for the tree while the
  next row accumulates). FAdd's latency (9) exceeds ``S`` (8) by one, so a SUM pass
  issues ``9 - S`` bubbles after every ``S`` beats of a row: ``floor((beats - 1) / S)``
  bubbles per row (1/9 of the throughput of a long row). Then the pairwise tree
  (index ``lane * S + slot``, slots of a lane first) with one pipelined FAdd per tree
  level, the first adding ``tree_width`` (:data:`~flightllm.hw.sfu_program.TREE_WIDTH`,
  4) pairs a cycle: ``L*S/(2 tree_width)`` cycles per row (shorter rows are tree-bound).
* MAX / ARGMAX / AMAX: a registered compare tree over the lanes on order keys (NaN
  above everything, -0 as +0, masked and absent elements as -inf; ties keep the lower
  index, so ARGMAX gives np.argmax's first maximum or first NaN and MAX propagates NaN
  like np.max), then running maxima per row and per segment; AMAX of segments of
  ``per < L`` elements takes tree level ``log2(per)`` (``L / per`` entries per beat).

Interfaces (streams: :mod:`amaranth.lib.stream`):

* ``cmd`` (In, :class:`SfuCmd`): accepted when the previous operation is issued.
* ``req`` (Out, :func:`req_layout`): one request per beat: the stream bits (X, S2, TAB,
  XS, XF), row, beat. ``rd`` (In, :func:`rd_layout`): the answers in request order;
  XS / XF beats (``L`` entries of the source's scales, float32, / factors, uint8 in the
  low byte) come in ``x``. The core requests only when its rd FIFO has room for the
  answer (credits), so ``rd.ready`` is a constant 1.
* ``out`` (Out, :func:`out_layout`): (kind, row, beat, element-valid mask, ``L`` words):
  kind DST (float32 bits, or int8 / uint8 in the low byte), SCALE (QUANT: one per
  segment; QUANTG, SOFTMAX: one per row), FACTOR (uint8, one per group), ARGMAX (the
  row's index in word 0). A beat is issued only with a credit for its output FIFO entry,
  so the lanes never stall.
* ``done`` (Out(1)): a pulse per operation, in order, when all its results are in the
  output FIFO; ``out_count`` (Out(16)): the ``out`` beats written into that FIFO so far
  (wrapping, this cycle's included), so a consumer knows at ``done`` how many beats to
  take before the operation's results have all left.

Timing rules: ``cmd.ready`` is a register (the FSM state), ``rd.ready`` a constant,
``req`` and ``out`` leave FIFOs; the lanes and reductions never stall.

Capacity. Rows per operation: ``max_rows`` (default ``8 * mm_tokens``: a prefill block's
tokens times up to 8 query heads per kv head for SOFTMAX); elements per row: ``n <=
act_buf_depth``. Vector memories: ``mm_tokens * act_buf_depth / 32`` entries each (a
block's rows with segments of 32 or more), ``rows * ceil(n / per / L) * L`` must fit.
Segments and groups are powers of two (or the whole row); ``L`` a power of two.

Cycles (no stalls; ``lat`` = 115, ``B`` = beats of a row, ``R`` = rows):

* command accepted -> first issue: 12 (SETUP 9, START, DRAIN) + the first read's round trip;
* a pass: ``R * B`` (a Load: ``R * ceil(entries / L)``), plus in a SUM pass
  ``floor((B - 1) / S) * (9 - S)`` bubbles per row, and a SUM row may start only when
  the tree has read the row two before: about ``lat / 2 + 8 + L*S/(2 tree_width)`` after it ends
  (rows shorter than that are tree-bound: 66 cycles per row of 32 beats on ``sim``);
* between steps 3; a step that waits for lane results starts ``lat + 5`` = 120 after the
  previous step's last issue, for MAX/AMAX results 62, for a sum the tree (~150 on ``sim``);
* SQRT: 32 per row; ``done``: ``lat + 4`` = 119 after the last issue.

Measured on ``sim`` (read latency 2): a single-pass operation takes ``R B + 136``, QUANT
``2 R B + ~320``, QUANTG ``2 R B + ~570``, RMSNORM (three dependent scalar passes and a
SQRT) ``2 R B + ~650 + 40 R``, SOFTMAX ``3 R B + ~750`` plus its tree-bound SUM rows
(tests/test_hw_sfu.py prints them beside runtime/golden.py's estimates). Independent
operations overlap: the next command is taken two cycles after the last issue.
"""


from dataclasses import dataclass, field

import numpy as np
from amaranth import Array, Cat, Const, Module, Mux, Signal, unsigned
from amaranth.lib import data, fifo, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from ..runtime import sfu as spec
from .fp32 import QNAN, FAdd, FSqrt, I2F
from .geometry import delay
from .isa import Opcode
from .params import ACT_MAX, HwParams
from .sfu_lane import LaneConfig, SfuLane
from .sfu_program import IDENTITY, OUT_CODE, TREE_WIDTH, Pair, Pass, Sqrt, Src, template

__all__ = ["SfuCore", "SfuCmd", "sfu_max_rows", "req_layout", "rd_layout", "out_layout", "PROGRAMS",
           "X", "S2", "TAB", "XS", "XF", "DST", "SCALE", "FACTOR", "ARGMAX"]

X, S2, TAB, XS, XF = (1 << i for i in range(5))     #: request stream bits
DST, SCALE, FACTOR, ARGMAX = range(4)               #: kinds of ``out`` beats
#: the programs the core holds: (opcode, DEQUANT with QUANTG factors)
PROGRAMS = (("ADD", False), ("FILL", False), ("SILU_MUL", False), ("RMSNORM", False), ("ROPE", False),
            ("QUANT", False), ("QUANTG", False), ("DEQUANT", False), ("DEQUANT", True), ("ARGMAX", False),
            ("SOFTMAX", False))
_SIDE = {"scale": XS, "u": XF}          #: vectors a program reads but never writes: the source's
_PORTS = (("a", "inp"), ("b", "add1"), ("c", "mul1"), ("d", "add2"), ("d2", "add2_mul"), ("e", "div"),
          ("f", "mul2"), ("g", "mul3"))
_TAPS = ("IN", "MUL1", "MASK", "MUL2")
_TAP_STAGE = {"IN": "ADD1", "MUL1": "EXP", "MASK": "MUL2", "MUL2": "ADD2"}   # a tap is its stage's input
OUT_COUNT_BITS = 16                     #: width of ``out_count`` (wraps)
_WHOLE = 31                             #: log2(per) meaning "the whole row is one segment"
_NEG_INF_KEY = 0x007FFFFF               #: order key of -inf


def sfu_max_rows(params: HwParams) -> int:
    """Rows one SFU operation may have (SOFTMAX: token rows x query heads): ``8 x
    mm_tokens``, at most 255 (the row fields are 8 bits)."""
    return min(255, 8 * params.mm_tokens)


def _f32(v) -> int:
    return int(np.float32(v).view(np.uint32))


class SfuCmd(data.Struct):
    """One SFU operation."""
    op: unsigned(6)         #: :class:`~flightllm.hw.isa.Opcode` value
    rows: unsigned(8)       #: rows (SOFTMAX: token rows x query heads, head-minor), >= 1
    n: unsigned(17)         #: elements per row
    seg: unsigned(17)       #: QUANT's / DEQUANT's scale segment (0 or n: the whole row)
    group: unsigned(17)     #: QUANTG's group; DEQUANT: its factors' group (0: no factors)
    imm: unsigned(32)       #: float32 bits: FILL's value, RMSNORM's eps, QUANT's level (0: 127), SOFTMAX's c
    valid: unsigned(17)     #: SOFTMAX: positions the first token row attends (row t: valid + t)
    rep: unsigned(6)        #: SOFTMAX: query heads per token row
    sink: unsigned(4)       #: SOFTMAX block-sparse: leading blocks always attended
    window: unsigned(8)     #: SOFTMAX block-sparse: blocks up to the row's own (0: dense)


def _beat_bits(params):
    return max(1, (-(-params.act_buf_depth // params.sfu_lanes) - 1).bit_length())


def req_layout(params: HwParams) -> data.StructLayout:
    return data.StructLayout({"streams": 5, "row": 8, "beat": _beat_bits(params)})


def rd_layout(params: HwParams) -> data.StructLayout:
    w = data.ArrayLayout(32, params.sfu_lanes)
    return data.StructLayout({"x": w, "s2": w, "tab": w})


def out_layout(params: HwParams) -> data.StructLayout:
    return data.StructLayout({"kind": 2, "row": 8, "beat": _beat_bits(params), "valid": params.sfu_lanes,
                              "data": data.ArrayLayout(32, params.sfu_lanes)})


# ----------------------------------------------------------------------------- the step ROM
@dataclass(frozen=True)
class _Load:
    """Fill vector ``name`` from the source's side array (one row of it per row)."""
    name: str


@dataclass
class _Step:
    """What the hardware needs of one step (compiled from the template at elaboration)."""
    prog: int
    obj: object
    length: tuple = ("n",)                  # ("n",), ("one",) or ("cnt", key)
    streams: int = 0
    drain: int = 0                          # quiet cycles to wait for before the step (0: none)
    last: bool = False
    slots: dict = field(default_factory=dict)   # scalar register name -> slot (the program's)
    mems: dict = field(default_factory=dict)    # vector name -> memory
    keys: dict = field(default_factory=dict)    # vector name -> count key (its entries: n / key)
    outf: int | None = None                 # out FIFO kind (DST, SCALE, FACTOR)
    oreg: int | None = None                 # scalar slot the lane output goes to
    ovec: int | None = None                 # vector memory the lane output goes to
    wkey: object = None                     # count key of the vector the step writes (row base)
    sum: tuple | None = None                # (tap, slot)
    cmp: tuple | None = None                # (kind, tap, slot | None, memory | None, key)
    vrd: dict = field(default_factory=dict)     # memory -> (per key or None for per 1, count key)
    load: int | None = None                 # memory a Load fills
    sqrt: tuple | None = None               # (src slot, dst slot)

    @property
    def kind(self):
        return "load" if isinstance(self.obj, _Load) else "sqrt" if isinstance(self.obj, Sqrt) else "pass"


def _key(v):
    """The count key of a length ``n/x`` or a segment ``x`` (None for 1)."""
    if v == 1:
        return None
    if isinstance(v, int):
        return v
    v = v[2:] if v.startswith("n/") else v
    return int(v) if v.isdigit() else v


def _opnds(s: Pass):
    return [(port, getattr(s, f)) for port, f in _PORTS if getattr(s, f) is not None]


def _names(s):
    """(reads, writes) of a step: register names as "r:NAME", vectors as "v:NAME"."""
    if isinstance(s, _Load):
        return set(), {"v:" + s.name}
    if isinstance(s, Sqrt):
        return {"r:" + s.src}, {"r:" + s.dst}
    rd = {("r:" if o.src == Src.REG else "v:") + o.name for _, o in _opnds(s) if o.src in (Src.REG, Src.VEC)}
    wr = set()
    kind, _, name = s.out.partition(":")
    if kind in ("reg", "vec"):
        wr.add(kind[0] + ":" + name)
    for r in s.reds:                        # (ARGMAX's result goes to ``out``, not to its register)
        wr |= {"r:" + r.reg} if r.reg and r.kind != "ARGMAX" else set()
        wr |= {"v:" + r.vec} if r.vec else set()
    return rd, wr


def compile_program(pi: int, lat: dict) -> list:
    """The ``_Step`` records of program ``PROGRAMS[pi]``; ``lat``: the drain depth after
    each kind of write ("out": lane outputs, "cmp": MAX/AMAX, "sum", "load", "sqrt")."""
    op, factors = PROGRAMS[pi]
    tmpl = template(op, factors=factors)
    written, loads = set(), []
    for s in tmpl:
        rd, wr = _names(s)
        loads += [n[2:] for n in sorted(rd) if n[0] == "v" and n not in written and n[2:] not in loads]
        written |= wr
    seq = [_Load(n) for n in loads] + tmpl
    if not isinstance(seq[-1], Pass):
        raise ValueError(f"SFU core: {op} must end with a pass")
    slots, keys, span = {}, {}, {}
    for i, s in enumerate(seq):
        for n in sorted(set().union(*_names(s))):
            if n[0] == "r":
                slots.setdefault(n[2:], len(slots))
            else:
                a, b = span.get(n[2:], (i, i))
                span[n[2:]] = (min(a, i), max(b, i))

    def note(name, k):
        if keys.setdefault(name, k) != k:
            raise ValueError(f"SFU core: {op}'s vector {name} has entries per {keys[name]} and per {k}")

    for s in seq:
        if isinstance(s, Pass):
            for _, o in _opnds(s):
                if o.src == Src.VEC:
                    note(o.name, _key(o.per) if o.per != 1 else _key(s.length))
            if s.out.startswith("vec:"):
                note(s.out[4:], _key(s.length))
            for r in s.reds:
                if r.vec:
                    note(r.vec, _key(r.per))
    mems = {}                               # names whose lives overlap get different memories
    for n in sorted(span, key=lambda n: span[n]):
        taken = {mems[o] for o in mems if not (span[o][1] < span[n][0] or span[n][1] < span[o][0])}
        mems[n] = min(set(range(len(span) + 1)) - taken)

    steps, dirty = [], {}                   # resource -> drain depth of its pending write
    for i, s in enumerate(seq):
        st = _Step(pi, s, slots=slots, mems=mems, keys=keys, last=i == len(seq) - 1)
        rd, wr = _names(s)
        phys = {f"m:{mems[n[2:]]}" for n in wr if n[0] == "v"}
        pend = {}
        if isinstance(s, _Load):
            st.length, st.streams, st.load, st.wkey = ("cnt", keys[s.name]), _SIDE[s.name], mems[s.name], keys[s.name]
            pend = dict.fromkeys(wr | phys, lat["load"])
        elif isinstance(s, Sqrt):
            st.sqrt = (slots[s.src], slots[s.dst])
            pend = dict.fromkeys(wr, lat["sqrt"])
        else:
            st.length = ("n",) if s.length == "n" else ("one",) if s.length == 1 else ("cnt", _key(s.length))
            used = [o for _, o in _opnds(s)]
            st.streams = (X if any(o.src == Src.IN for o in used) else 0) | \
                (S2 if any(o.src == Src.S2 for o in used) else 0) | (TAB if any(o.src == Src.TAB for o in used) else 0)
            if s.inp.src == Src.IN and op == "DEQUANT" and any(o.src == Src.IN for o in used[1:]):
                raise ValueError("SFU core: an int8 input cannot be an operand")
            for _, o in _opnds(s):
                if o.src == Src.VEC:
                    if o.pair != Pair.SELF or mems[o.name] in st.vrd:
                        raise ValueError(f"SFU core: {op} reads vector memory {mems[o.name]} twice in a pass")
                    st.vrd[mems[o.name]] = (_key(o.per), keys[o.name])
            kind, _, name = s.out.partition(":")
            if kind in ("dst", "scale", "factor"):
                st.outf = {"dst": DST, "scale": SCALE, "factor": FACTOR}[kind]
            elif kind == "reg":
                st.oreg = slots[name]
            elif kind == "vec":
                st.ovec, st.wkey = mems[name], keys[name]
            pend = dict.fromkeys(wr | phys, lat["out"])
            for r in s.reds:
                if r.kind == "SUM":
                    if st.sum:
                        raise ValueError(f"SFU core: {op} has two sums in a pass")
                    st.sum = (r.tap, slots[r.reg])
                    pend["r:" + r.reg] = lat["sum"]
                    if not any("r:" + r.reg in _names(t)[0] for t in seq[i + 1:]):
                        raise ValueError(f"SFU core: {op}'s sum {r.reg} is never read")
                else:
                    if st.cmp:
                        raise ValueError(f"SFU core: {op} has two maxima in a pass")
                    reg = slots[r.reg] if r.reg and r.kind != "ARGMAX" else None
                    st.cmp = (r.kind, r.tap, reg, mems[r.vec] if r.vec else None, _key(r.per) if r.vec else None)
                    if r.vec:
                        st.wkey = keys[r.vec]
                    for n in ({"r:" + r.reg} if st.cmp[2] is not None else set()) | ({"v:" + r.vec, f"m:{mems[r.vec]}"}
                                                                        if r.vec else set()):
                        pend[n] = lat["cmp"]
            if st.cmp and st.cmp[0] == "ARGMAX" and (st.outf is not None or st.oreg is not None or st.ovec is not None):
                raise ValueError("SFU core: an ARGMAX pass has no lane output")
            if (st.outf is not None) + (st.oreg is not None) + (st.ovec is not None) + (st.load is not None) > 1:
                raise ValueError("SFU core: one output per pass")
        if (rd | phys) & dirty.keys():
            st.drain, dirty = max(dirty.values()), {}
        for k, v in pend.items():
            dirty[k] = max(dirty.get(k, 0), v)
        steps.append(st)
    # across operations: a program's first steps (up to its first wait) must not write a
    # memory while the previous program's last ones (after its last wait) still do
    steps[0].head_writes = any(_names(t.obj)[1] for t in steps[:next((k for k, t in enumerate(steps)
                                                                      if t.drain and k), len(steps))])
    steps[0].tail = max([v for k, v in dirty.items()], default=0)
    return steps


# ----------------------------------------------------------------------------- the core
class SfuCore(wiring.Component):
    """The SFU (module docstring).

    Parameters
    ----------
    params : HwParams
        ``sfu_lanes`` (a power of two >= 2), ``sfu_acc_slots``, ``mm_tokens`` and
        ``act_buf_depth`` size the core.
    max_rows : int, optional
        Rows per operation (default ``min(255, 8 * mm_tokens)``).
    rd_depth : int
        Entries of the read-data FIFO (= requests in flight).
    tree_width : int
        Pairs the sum tree's first level adds per cycle (a power of two): a row's tree
        takes ``lanes x slots / (2 x tree_width)`` cycles.
    out_depth : int, optional
        Entries of the output FIFO (= credits); default ``latency + 6``, enough for one
        beat a cycle (a smaller one throttles the issue: tests).

    Attributes
    ----------
    cmd : In(stream of SfuCmd)
    req : Out(stream of req_layout)
    rd : In(stream of rd_layout)
    out : Out(stream of out_layout)
    done : Out(1)
    out_count : Out(16)
    latency : int
        The lanes' latency.
    """

    def __init__(self, params: HwParams, *, max_rows: int | None = None, rd_depth: int = 16,
                 out_depth: int | None = None, tree_width: int = TREE_WIDTH):
        L, S = params.sfu_lanes, params.sfu_acc_slots
        if L < 2 or L & (L - 1) or L * S < 4:
            self._MustUse__silence = True
            raise ValueError(f"SFU core: sfu_lanes must be a power of two >= 2 (and lanes x slots >= 4), not {L}")
        self.params, self.L, self.S, self.LB = params, L, S, L.bit_length() - 1
        self.max_rows = max_rows or sfu_max_rows(params)
        self.rd_depth = rd_depth
        if tree_width < 1 or tree_width & (tree_width - 1) or 2 * tree_width > L * S:
            self._MustUse__silence = True
            raise ValueError(f"SFU core: tree_width must be a power of two, at most lanes x slots / 2, "
                             f"not {tree_width}")
        self.tree_width = tree_width
        lane = SfuLane()
        lane._MustUse__silence = True           # a template for the stage latencies
        self.lane_start = {t: lane.start(_TAP_STAGE[t]) for t in _TAPS}
        self.latency = lat = lane.latency
        self.t_red = self.lane_start["MUL2"]   # S1 -> the reductions' input
        # drain depths (cycles after the last issue before a reader may issue), from the
        # cycle after S0 in which each kind of write lands, plus one
        e_out = 1 + lat + 1                     # W: the registered lane outputs
        e_cmp = 1 + self.t_red + 1 + self.LB + 1   # compare tree, running maxima, write register
        self.drain_lat = {"out": e_out + 1, "cmp": e_cmp + 1, "sum": 2, "load": 2, "sqrt": 1}
        self.done_lat = e_out + 1
        self.beat_bits = _beat_bits(params)
        self.vec_words = max(4, params.mm_tokens * params.act_buf_depth // (32 * L))
        self.out_depth = out_depth or e_out + 4     # covers issue -> FIFO -> credit back at full rate
        self.steps, self.first = [], []
        for pi in range(len(PROGRAMS)):
            self.first.append(len(self.steps))
            self.steps += compile_program(pi, self.drain_lat)
        self.n_slots = max(len(s.slots) for s in self.steps)
        self.n_mems = max([len(set(s.mems.values())) for s in self.steps])
        self.keys = sorted({s.length[1] for s in self.steps if s.length[0] == "cnt"} |
                           {k for s in self.steps for k in s.keys.values()} |
                           {v[0] for s in self.steps for v in s.vrd.values() if v[0] is not None} |
                           {s.cmp[4] for s in self.steps if s.cmp and s.cmp[4] is not None}, key=str)
        super().__init__({
            "cmd": In(stream.Signature(SfuCmd)),
            "req": Out(stream.Signature(req_layout(params))),
            "rd": In(stream.Signature(rd_layout(params))),
            "out": Out(stream.Signature(out_layout(params))),
            "done": Out(1),
            "out_count": Out(OUT_COUNT_BITS),
        })

    # -- helpers -------------------------------------------------------------------
    def _rom(self, m, sid, fn, shape=1, name=None):
        """A signal decoded from step id ``sid``: ``fn(step)`` (an int, or a Value)."""
        sig = Signal(shape, name=name)
        consts, vals = {}, {}
        for i, st in enumerate(self.steps):
            v = fn(st)
            if v is None or v is False or (isinstance(v, int) and v == 0):
                continue
            if isinstance(v, (int, bool)):
                consts.setdefault(int(v), []).append(i)
            else:
                vals[i] = v
        if consts or vals:
            with m.Switch(sid):
                for v, ids in consts.items():
                    with m.Case(*ids):
                        m.d.comb += sig.eq(v)
                for i, v in vals.items():
                    with m.Case(i):
                        m.d.comb += sig.eq(v)
        return sig

    def elaborate(self, platform):
        m = Module()
        L, S, LB = self.L, self.S, self.LB
        SB = (S - 1).bit_length()
        BB, NS = self.beat_bits, len(self.steps)
        VW = self.vec_words
        vwb = (VW - 1).bit_length()
        keys = self.keys
        ones = (1 << L) - 1

        # -- the operation and what SETUP derives from it ------------------------------
        op = Signal(SfuCmd)
        lg = {}
        for k in keys:
            if isinstance(k, int):
                lg[k] = Const(k.bit_length() - 1, 5)
            else:
                v = op.seg if k == "seg" else op.group
                fl = Signal(5, name=f"flog_{k}")
                for i in range(len(v)):
                    with m.If(v[i]):
                        m.d.comb += fl.eq(i)
                lg[k] = Signal(5, name=f"lg_{k}")
                whole = ((v == 0) | (v == op.n)) if k == "seg" else (v == op.n)
                m.d.sync += lg[k].eq(Mux(whole, _WHOLE, fl))
        cnt, wpr = {}, {}
        for k in keys:
            cnt[k] = Signal(17, name=f"cnt_{k}")
            wpr[k] = Signal(17, name=f"wpr_{k}")
            m.d.sync += [cnt[k].eq(Mux(lg[k] == _WHOLE, 1, op.n >> lg[k])), wpr[k].eq((cnt[k] + L - 1) >> LB)]
        i2f = m.submodules.n_to_float = I2F(18)
        m.d.comb += [i2f.i_valid.eq(1), i2f.a.eq(op.n)]
        nflt = i2f.o
        qmax = Signal(32)
        m.d.comb += qmax.eq(Mux(op.imm[:31] == 0, _f32(ACT_MAX), op.imm))
        imms = {"eps": op.imm, "c": op.imm, "imm": op.imm, "qmax": qmax, "n": nflt}

        pid = Signal(range(len(PROGRAMS)))
        known = Signal()
        for pi, (name, factors) in enumerate(PROGRAMS):
            hit = op.op == Opcode[name].value
            if name == "DEQUANT":
                hit &= (op.group != 0) if factors else (op.group == 0)
            with m.If(hit):
                m.d.comb += [pid.eq(pi), known.eq(1)]
        first_sid = Signal(range(NS))
        head_writes = Signal()
        tail_new = Signal(8)
        with m.Switch(pid):
            for pi, f in enumerate(self.first):
                with m.Case(pi):
                    m.d.comb += [first_sid.eq(f), head_writes.eq(self.steps[f].head_writes),
                                 tail_new.eq(self.steps[f].tail)]

        def length(sid, name):
            def fn(st):
                return op.n if st.length[0] == "n" else 1 if st.length[0] == "one" else cnt[st.length[1]]
            return self._rom(m, sid, fn, 17, name)

        # -- FIFOs and credits -------------------------------------------------------------
        rdl, reql, outl = rd_layout(self.params), req_layout(self.params), out_layout(self.params)
        # (a SyncFIFOBuffered of depth 2 refuses the second write of a burst while the first
        # moves to its output register; from depth 3 on it takes as many as it holds)
        rdf = m.submodules.rd_fifo = fifo.SyncFIFOBuffered(width=rdl.size, depth=max(3, self.rd_depth))
        rd_v, rd_d = Signal(), Signal(rdl.size)
        m.d.comb += self.rd.ready.eq(1)           # every request has its FIFO entry reserved
        m.d.sync += [rd_v.eq(self.rd.valid), rd_d.eq(self.rd.payload.as_value())]
        m.d.comb += [rdf.w_en.eq(rd_v), rdf.w_data.eq(rd_d)]
        rqf = m.submodules.req_fifo = fifo.SyncFIFOBuffered(width=reql.size, depth=4)
        m.d.comb += [self.req.valid.eq(rqf.r_rdy), self.req.payload.eq(rqf.r_data), rqf.r_en.eq(self.req.ready)]
        outf = m.submodules.out_fifo = fifo.SyncFIFOBuffered(width=outl.size, depth=max(3, self.out_depth))
        m.d.comb += [self.out.valid.eq(outf.r_rdy), self.out.payload.eq(outf.r_data), outf.r_en.eq(self.out.ready)]

        def credits(name, depth, take, give):
            c = Signal(range(depth + 1), name=name, init=depth)
            nz = Signal(name=f"{name}_nz", init=1)
            nxt = Signal.like(c, name=f"{name}_next")
            m.d.comb += nxt.eq(c - take + give)
            m.d.sync += [c.eq(nxt), nz.eq(nxt != 0)]
            return nz

        go = Signal()                             # S0: a beat (or a Load beat) issues
        pop_rd = Signal()
        push_req = Signal()
        take_out = Signal()
        out_pop = Signal()
        m.d.sync += out_pop.eq(self.out.valid & self.out.ready)
        rd_cr = credits("rd_credit", self.rd_depth, push_req, pop_rd)
        out_cr = credits("out_credit", self.out_depth, take_out, out_pop)

        # -- request walker: the same (step, row, beat) order as the issue, ahead of it --------
        rsid = Signal(range(NS))
        rrow, rbeat, rnb_m1 = Signal(8), Signal(BB), Signal(BB)
        rlen = length(rsid, "rlen")
        rstreams = self._rom(m, rsid, lambda st: st.streams, 5, "rstreams")
        rlast = self._rom(m, rsid, lambda st: st.last, 1, "rlast")
        r_start = Signal()
        rows_m1 = Signal(8)
        req = Signal(reql)
        m.d.comb += [req.streams.eq(rstreams), req.row.eq(rrow), req.beat.eq(rbeat),
                     rqf.w_data.eq(req.as_value()), rqf.w_en.eq(push_req)]
        r_idle = Signal()
        with m.FSM(name="req_walker"):
            with m.State("IDLE"):
                m.d.comb += r_idle.eq(1)
                with m.If(r_start):
                    m.d.sync += rsid.eq(first_sid)
                    m.next = "STEP"
            with m.State("STEP"):
                m.d.sync += [rnb_m1.eq(((rlen + L - 1) >> LB) - 1), rrow.eq(0), rbeat.eq(0)]
                m.next = "RUN"
                with m.If(rstreams == 0):
                    m.next = "NEXT"
            with m.State("RUN"):
                m.d.comb += push_req.eq(rqf.w_rdy & rd_cr)
                with m.If(push_req):
                    m.d.sync += rbeat.eq(rbeat + 1)
                    with m.If(rbeat == rnb_m1):
                        m.d.sync += [rbeat.eq(0), rrow.eq(rrow + 1)]
                        with m.If(rrow == rows_m1):
                            m.next = "NEXT"
            with m.State("NEXT"):
                m.d.sync += rsid.eq(rsid + 1)
                m.next = "STEP"
                with m.If(rlast):
                    m.next = "IDLE"

        # -- issue walker ------------------------------------------------------------------
        sid = Signal(range(NS))
        row, beat, nb_m1 = Signal(8), Signal(BB), Signal(BB)
        lastmask = Signal(L)
        vbase = {k: Signal(vwb, name=f"vbase_{k}") for k in keys}
        hcnt, vt = Signal(6), Signal(18)         # SOFTMAX: head within the token row, its valid count
        ilen = length(sid, "ilen")
        R = lambda fn, shape=1, name=None: self._rom(m, sid, fn, shape, name)       # noqa: E731
        is_sqrt = R(lambda st: st.kind == "sqrt", name="is_sqrt")
        is_load = R(lambda st: st.kind == "load", name="is_load")
        streams = R(lambda st: st.streams, 5, "streams")
        mask_on = R(lambda st: st.kind == "pass" and st.obj.mask, name="mask_on")
        need_out = R(lambda st: st.outf is not None, name="need_out")
        is_argmax = R(lambda st: st.cmp is not None and st.cmp[0] == "ARGMAX", name="is_argmax")
        is_sum = R(lambda st: st.sum is not None, name="is_sum")
        is_last = R(lambda st: st.last, name="is_last")
        drain_of = R(lambda st: st.drain, 8, "drain_of")
        vbase_w = R(lambda st: vbase[st.wkey] if st.wkey is not None else 0, vwb, "vbase_w")
        lg_r = R(lambda st: lg[st.cmp[4]] if st.cmp and st.cmp[4] is not None else 0, 5, "lg_r")

        last_beat, last_row = beat == nb_m1, row == rows_m1
        vmask = Signal(L)
        m.d.comb += vmask.eq(Mux(last_beat, lastmask, ones))
        # SOFTMAX's mask (runtime/sfu.attention_mask): row t attends p < valid_t, and with a
        # window only the sink blocks and the blocks after its own block - window
        kvb = spec.KV_BLOCK.bit_length() - 1
        emask = Signal(L)
        own = (vt - 1) >> kvb
        for l in range(L):
            p = Cat(Const(l, LB), beat)
            blk = p >> kvb
            att = (p < vt) & ((op.window == 0) | (blk < op.sink) | (blk + op.window > own))
            m.d.comb += emask[l].eq(~mask_on | att)

        sum_bank = Signal()
        busy = Signal(2)                          # a SUM bank holds a row the tree has not read
        busy_clr = Signal(2)
        sum_open = Signal(9)                      # SUM rows issued and not yet written
        sum_done = Signal()
        bubble = Signal(range(max(2, FAdd.latency)))
        quiet = Signal(8, init=255)               # cycles since the last issue (saturating)
        ddepth = Signal(8)
        prev_tail = Signal(8)
        m.d.sync += quiet.eq(Mux(go, 0, Mux(quiet == 255, 255, quiet + 1)))
        sum_first = is_sum & (beat == 0)
        need_rd = streams != 0
        need_cr = need_out | (is_argmax & last_beat)
        in_run = Signal()
        m.d.comb += [go.eq(in_run & (~need_rd | rdf.r_rdy) & (~need_cr | out_cr) & (bubble == 0) &
                           (~sum_first | ~busy.bit_select(sum_bank, 1))),
                     pop_rd.eq(go & need_rd), rdf.r_en.eq(pop_rd), take_out.eq(go & need_cr)]
        m.d.sync += sum_open.eq(sum_open + (go & sum_first) - sum_done)
        with m.If(go & is_sum & last_beat):      # the next row takes the other bank
            m.d.sync += sum_bank.eq(~sum_bank)
        for b in range(2):
            with m.If(go & sum_first & (sum_bank == b)):
                m.d.sync += busy[b].eq(1)
            with m.Elif(busy_clr[b]):
                m.d.sync += busy[b].eq(0)
        # FAdd's latency exceeds S: a slot's next beat must wait for its previous sum
        gap = FAdd.latency - S
        if gap > 0:
            with m.If(go & is_sum & ((beat[:SB] == S - 1) if S > 1 else 1) & ~last_beat):
                m.d.sync += bubble.eq(gap)
            with m.Elif(bubble != 0):
                m.d.sync += bubble.eq(bubble - 1)

        # SQRT
        sqrt = m.submodules.sqrt = FSqrt()
        sq_src = R(lambda st: st.sqrt[0] if st.sqrt else 0, range(max(2, self.n_slots)), "sq_src")
        sq_dst = R(lambda st: st.sqrt[1] if st.sqrt else 0, range(max(2, self.n_slots)), "sq_dst")
        sq_we = Signal()
        in_sqrt = Signal()

        # S1 registers
        tag_l = data.StructLayout({"sid": range(NS), "row": 8, "beat": BB, "vmask": L, "emask": L, "first": 1,
                                   "last": 1, "bank": 1, "vbw": vwb, "lgr": 5})
        s1 = Signal(tag_l)
        s1_v, s1_ld = Signal(), Signal()
        s1_rd = Signal(rdl)
        m.d.sync += [s1_v.eq(go & ~is_load), s1_ld.eq(go & is_load)]
        with m.If(go):
            m.d.sync += [s1.sid.eq(sid), s1.row.eq(row), s1.beat.eq(beat), s1.vmask.eq(vmask), s1.emask.eq(emask),
                         s1.first.eq(beat == 0), s1.last.eq(last_beat), s1.bank.eq(sum_bank), s1.vbw.eq(vbase_w),
                         s1.lgr.eq(lg_r), s1_rd.eq(rdf.r_data)]

        done_mark = Signal()
        with m.FSM(name="issue"):
            with m.State("IDLE"):
                m.d.comb += self.cmd.ready.eq(1)
                with m.If(self.cmd.valid):
                    m.d.sync += [op.eq(self.cmd.payload), ddepth.eq(I2F.latency + 2)]
                    m.next = "SETUP"
            with m.State("SETUP"):                # lg, counts, float(n): a few registers deep
                with m.If(ddepth != 0):
                    m.d.sync += ddepth.eq(ddepth - 1)
                with m.If((ddepth == 0) & r_idle):   # (the walker is ahead: idle by now)
                    m.d.sync += [sid.eq(first_sid), rows_m1.eq(op.rows - 1)]
                    m.d.comb += r_start.eq(known)
                    m.next = "START"
                    with m.If(~known):
                        m.d.comb += done_mark.eq(1)
                        m.next = "IDLE"
            with m.State("START"):
                rem = ilen[:LB]                   # elements in the last beat (0: a full one)
                m.d.sync += [nb_m1.eq(((ilen + L - 1) >> LB) - 1), row.eq(0), beat.eq(0), hcnt.eq(0),
                             vt.eq(op.valid), lastmask.eq(Mux(rem == 0, ones, (Const(1, L + 1) << rem) - 1)),
                             ddepth.eq(drain_of)]
                with m.If((sid == first_sid) & head_writes & (prev_tail > drain_of)):
                    m.d.sync += ddepth.eq(prev_tail)
                m.d.sync += [vbase[k].eq(0) for k in keys]
                m.next = "DRAIN"
            with m.State("DRAIN"):
                with m.If((ddepth == 0) | ((quiet >= ddepth) & (sum_open == 0))):
                    m.next = "RUN"
                    with m.If(is_sqrt):
                        m.next = "SQRT"
            with m.State("RUN"):
                m.d.comb += in_run.eq(1)
                with m.If(go):
                    m.d.sync += beat.eq(beat + 1)
                    with m.If(last_beat):
                        m.d.sync += [beat.eq(0), row.eq(row + 1)]
                        m.d.sync += [vbase[k].eq(vbase[k] + wpr[k]) for k in keys]
                        m.d.sync += [hcnt.eq(hcnt + 1)]
                        with m.If((hcnt == op.rep - 1) | (op.rep <= 1)):
                            m.d.sync += [hcnt.eq(0), vt.eq(vt + 1)]
                        with m.If(last_row):
                            m.next = "NEXT"
            with m.State("SQRT"):
                m.d.comb += [in_sqrt.eq(1), sqrt.i_valid.eq(1)]
                with m.If(sqrt.i_ready):
                    m.next = "SQRT_WAIT"
            with m.State("SQRT_WAIT"):
                m.d.comb += [in_sqrt.eq(1), sqrt.o_ready.eq(1), sq_we.eq(sqrt.o_valid)]
                with m.If(sqrt.o_valid):
                    m.d.sync += row.eq(row + 1)
                    m.next = "SQRT"
                    with m.If(last_row):
                        m.next = "NEXT"
            with m.State("NEXT"):
                m.d.sync += sid.eq(sid + 1)
                m.next = "START"
                with m.If(is_last):
                    m.d.comb += done_mark.eq(1)
                    m.d.sync += prev_tail.eq(tail_new)
                    m.next = "IDLE"
        m.d.comb += self.done.eq(delay(m, done_mark, self.done_lat, name="done_line", reset_less=False))

        # -- register files ------------------------------------------------------------------
        rd_addr = Mux(in_sqrt, row, s1.row)
        slot_w = []                               # per slot: [(enable, address, data)] by priority
        rv = []
        for j in range(self.n_slots):
            mem = Memory(shape=32, depth=self.max_rows, init=[])
            m.submodules[f"reg{j}"] = mem
            rp = mem.read_port(domain="comb")
            m.d.comb += rp.addr.eq(rd_addr)
            rv.append(rp.data)
            slot_w.append((mem.write_port(), []))
        m.d.comb += sqrt.a.eq(Array(rv)[sq_src])
        for j in range(self.n_slots):
            slot_w[j][1].append((sq_we & (sq_dst == j), row, sqrt.o))

        vec_w, vv = [], []
        for j in range(self.n_mems):
            mem = Memory(shape=unsigned(32 * L), depth=VW, init=[])
            m.submodules[f"vec{j}"] = mem
            rp = mem.read_port(transparent_for=())
            key_lg = R(lambda st, j=j: lg[st.vrd[j][0]] if j in st.vrd and st.vrd[j][0] is not None else 0, 5,
                       f"vrd_lg{j}")
            base = R(lambda st, j=j: vbase[st.vrd[j][1]] if j in st.vrd else 0, vwb, f"vrd_base{j}")
            k0 = Signal(BB + LB, name=f"vrd_k0_{j}")
            m.d.comb += [k0.eq(Cat(Const(0, LB), beat) >> key_lg), rp.addr.eq(base + (k0 >> LB))]
            lg1, sl1 = Signal(5, name=f"vrd_lg1_{j}"), Signal(LB, name=f"vrd_slot1_{j}")
            m.d.sync += [lg1.eq(key_lg), sl1.eq(k0[:LB])]
            word = data.View(data.ArrayLayout(32, L), rp.data)
            vv.append([word[(sl1 + (Const(l, LB) >> lg1))[:LB]] for l in range(L)])
            vec_w.append((mem.write_port(granularity=32), []))

        # -- S1: operands and configuration into the lanes -------------------------------
        lanes = []
        for l in range(L):
            ln = SfuLane()
            m.submodules[f"lane{l}"] = ln
            lanes.append(ln)
        cfg = Signal(LaneConfig)
        ports = {p: [Signal(32, name=f"{p}{l}") for l in range(L)] for p, _ in _PORTS}
        xw = [s1_rd.x[l] for l in range(L)]
        srcw = {Src.S2: [s1_rd.s2[l] for l in range(L)], Src.TAB: [s1_rd.tab[l] for l in range(L)]}

        def imm(st, v):
            return Const(_f32(v), 32) if not isinstance(v, str) else \
                (qmax ^ 0x80000000) if v == "-qmax" else imms[v]

        def opnd(st, o, l):
            sel = {Pair.SELF: l, Pair.SWAP: l ^ 1, Pair.EVEN: l & ~1, Pair.ODD: l | 1}[o.pair]
            if o.src == Src.IN:
                v = opnd(st, st.obj.inp, sel) if st.obj.inp.src != Src.IN else xw[sel]
            elif o.src in srcw:
                v = srcw[o.src][sel]
            elif o.src == Src.REG:
                v = rv[st.slots[o.name]]
            elif o.src == Src.VEC:
                v = vv[st.mems[o.name]][l]
            else:
                v = imm(st, o.imm)
            flip = o.neg ^ (o.neg_even and l % 2 == 0)
            return v ^ 0x80000000 if flip else v

        with m.Switch(s1.sid):
            for i, st in enumerate(self.steps):
                if st.kind != "pass":
                    continue
                p = st.obj
                with m.Case(i):
                    lo, hi = p.clip or (0.0, 0.0)
                    m.d.comb += [cfg.cvt_int8.eq(p.inp.src == Src.IN and PROGRAMS[st.prog][0] == "DEQUANT"),
                                 cfg.exp.eq(p.exp), cfg.exp_neg.eq(p.exp_neg), cfg.mask.eq(p.mask and p.exp),
                                 cfg.div_num.eq(p.div_num), cfg.div_safe.eq(p.div_safe), cfg.rnd.eq(bool(p.rnd)),
                                 cfg.rnd_ceil.eq(p.rnd == "ceil"), cfg.clip.eq(p.clip is not None),
                                 cfg.out.eq(OUT_CODE[p.out_int]), cfg.lo.eq(imm(st, lo)), cfg.hi.eq(imm(st, hi))]
                    for port, f in _PORTS:
                        o = getattr(p, f)
                        for l in range(L):
                            m.d.comb += ports[port][l].eq(opnd(st, o, l) if o is not None else
                                                          _f32(IDENTITY[port]))
        for l, ln in enumerate(lanes):
            m.d.comb += [ln.cfg.eq(cfg), ln.i_valid.eq(s1_v & s1.vmask[l]), ln.i_mask.eq(s1.emask[l])]
            m.d.comb += [getattr(ln, p).eq(ports[p][l]) for p, _ in _PORTS]
        # Load beats: the source's side array into its vector memory; factors (XF) are
        # uint8 in the buffer and float32 operands here (exact: 8 significant bits)
        ld_mem = self._rom(m, s1.sid, lambda st: st.load or 0, range(max(2, self.n_mems)), "ld_mem")
        ld_u8 = self._rom(m, s1.sid, lambda st: st.streams == XF, name="ld_u8")
        ld_data = Signal(data.ArrayLayout(32, L))
        for l in range(L):
            v, f = s1_rd.x[l][:8], Const(0, 32)
            for e in range(8):                    # the leading one: exponent 127 + e
                f = Mux(v[e], Cat(Const(0, 23 - e), v[:e], Const(127 + e, 8), Const(0, 1)), f)
            m.d.comb += ld_data[l].eq(Mux(ld_u8, f, s1_rd.x[l]))
        for j in range(self.n_mems):
            vec_w[j][1].append((s1_ld & (ld_mem == j), s1.vbw + s1.beat, s1.vmask, ld_data.as_value()))

        # -- reductions: every used tap delayed to one point, S1 + t_red ---------------------
        TR = self.t_red
        tagR = data.View(tag_l, delay(m, s1.as_value(), TR, name="tagR"))
        vR = delay(m, s1_v, TR, name="vR", reset_less=False)
        used_taps = {st.sum[0] for st in self.steps if st.sum} | {st.cmp[1] for st in self.steps if st.cmp}
        taps = {t: [delay(m, getattr(ln, f"tap_{t.lower()}"), TR - self.lane_start[t], name=f"tap_{t}{l}")
                    for l, ln in enumerate(lanes)] for t in _TAPS if t in used_taps}
        tap_code = {t: i for i, t in enumerate(_TAPS)}

        def tap_sel(tap, l):
            v = Signal(32, name=f"tapsel{l}")
            with m.Switch(tap):
                for t in taps:
                    with m.Case(tap_code[t]):
                        m.d.comb += v.eq(taps[t][l])
            return v

        # SUM: per lane an FAdd over S slots in two banks, then the pairwise tree
        RR = lambda sig, fn, shape=1, name=None: self._rom(m, sig, fn, shape, name)      # noqa: E731
        sum_en = RR(tagR.sid, lambda st: st.sum is not None, name="sum_en")
        sum_tap = RR(tagR.sid, lambda st: tap_code[st.sum[0]] if st.sum else 0, 2, "sum_tap")
        sum_slot = RR(tagR.sid, lambda st: st.sum[1] if st.sum else 0, range(max(2, self.n_slots)), "sum_slot")
        slot = tagR.beat[:SB] if S > 1 else Const(0, 1)
        firstuse = (tagR.beat >> SB) == 0
        acc = [[[Signal(32, name=f"acc{b}_{l}_{s}") for s in range(S)] for l in range(L)] for b in range(2)]
        meta_row = Array(Signal(8, name=f"meta_row{b}") for b in range(2))
        meta_slot = Array(Signal(range(max(2, self.n_slots)), name=f"meta_slot{b}") for b in range(2))
        meta_nb = Array(Signal(SB + 1, name=f"meta_nb{b}") for b in range(2))
        ready = Signal(2)
        ready_clr = Signal(2)
        sidx = Cat(slot, tagR.bank)
        add_v = vR & sum_en
        oidx = Signal(len(sidx))
        olast = Signal()
        m.d.comb += Cat(oidx, olast).eq(delay(m, Cat(sidx, tagR.last), FAdd.latency, name="sum_meta"))
        adders = []
        for l in range(L):
            fa = m.submodules[f"sum_add{l}"] = FAdd()
            adders.append(fa)
            accl = Array(acc[b][l][s] for b in range(2) for s in range(S))
            # a slot's first beat in a row adds to +0.0; its previous sum may leave the adder in
            # the very cycle its next beat enters (the bubbles space them FAdd.latency apart)
            fwd = fa.o_valid & (oidx == sidx)
            m.d.comb += [fa.i_valid.eq(add_v), fa.a.eq(Mux(firstuse, 0, Mux(fwd, fa.o, accl[sidx]))),
                         fa.b.eq(Mux(tagR.vmask[l], tap_sel(sum_tap, l), 0))]     # absent: +0.0
            with m.If(fa.o_valid):
                m.d.sync += accl[oidx].eq(fa.o)
        with m.If(add_v & (tagR.beat == 0)):
            m.d.sync += [meta_row[tagR.bank].eq(tagR.row), meta_slot[tagR.bank].eq(sum_slot)]
        with m.If(add_v & tagR.last):
            m.d.sync += meta_nb[tagR.bank].eq(Mux(tagR.beat >= S - 1, S, tagR.beat + 1))
        for b in range(2):
            with m.If(adders[0].o_valid & olast & (oidx[-1] == b)):     # the row's last sums are in
                m.d.sync += ready[b].eq(1)
            with m.Elif(ready_clr[b]):
                m.d.sync += ready[b].eq(0)
        # the tree: level 1 reads a finished bank TW pairs a cycle (TW FAdds), level k + 1
        # adds the neighbouring results of level k's adders (half as many), and from a single
        # adder on each level adds consecutive results of the one before; the pairing is the
        # spec's pairwise tree, whatever TW
        LS = L * S
        TW = self.tree_width
        NP = LS // (2 * TW)                       # level-1 reads per row
        t_act, t_bank, t_i = Signal(), Signal(), Signal(range(max(2, NP)))
        meta_l = data.StructLayout({"row": 8, "slot": range(max(2, self.n_slots))})
        t_meta, t_nb = Signal(meta_l), Signal(SB + 1)
        with m.If(~t_act & ready.bit_select(t_bank, 1)):
            m.d.sync += [t_act.eq(1), t_i.eq(0), t_meta.row.eq(meta_row[t_bank]),
                         t_meta.slot.eq(meta_slot[t_bank]), t_nb.eq(meta_nb[t_bank])]
        with m.If(t_act):
            m.d.sync += t_i.eq(t_i + 1)
            with m.If(t_i == NP - 1):
                m.d.sync += [t_act.eq(0), t_bank.eq(~t_bank)]
                m.d.comb += [ready_clr.bit_select(t_bank, 1).eq(1), busy_clr.bit_select(t_bank, 1).eq(1)]
        flat = [Mux(s < t_nb, acc[b][l][s], 0) for b in range(2) for l in range(L) for s in range(S)]
        # level-1 operands: pair j of read i is entries 2 (i TW + j), 2 (i TW + j) + 1, indexed by
        # every value of Cat(t_i, t_bank): a full case (no latch)
        half = len(flat) // 2                     # per bank
        ops_a = [Array(flat[b * LS + 2 * (i * TW + j)] for b in range(2) for i in range(NP)) for j in range(TW)]
        ops_b = [Array(flat[b * LS + 2 * (i * TW + j) + 1] for b in range(2) for i in range(NP)) for j in range(TW)]
        assert half == LS
        lv_v, lv_xs, lv_meta = t_act, None, t_meta.as_value()
        for k in range(LS.bit_length() - 1):
            width = max(1, TW >> k)
            fas = [FAdd() for _ in range(width)]
            for j, fa in enumerate(fas):
                m.submodules[f"tree_add{k}_{j}"] = fa
            if k == 0:
                for j, fa in enumerate(fas):
                    m.d.comb += [fa.i_valid.eq(t_act), fa.a.eq(ops_a[j][Cat(t_i, t_bank)]),
                                 fa.b.eq(ops_b[j][Cat(t_i, t_bank)])]
            elif len(lv_xs) > 1:                 # neighbours of the level before, the same cycle
                for j, fa in enumerate(fas):
                    m.d.comb += [fa.i_valid.eq(lv_v), fa.a.eq(lv_xs[2 * j]), fa.b.eq(lv_xs[2 * j + 1])]
            else:                                 # consecutive results of the single adder before
                fa = fas[0]
                have, hold = Signal(name=f"tree_have{k}"), Signal(32, name=f"tree_hold{k}")
                with m.If(lv_v):
                    m.d.sync += [have.eq(~have), hold.eq(lv_xs[0])]
                m.d.comb += [fa.i_valid.eq(lv_v & have), fa.a.eq(hold), fa.b.eq(lv_xs[0])]
            lv_v, lv_xs = fas[0].o_valid, [fa.o for fa in fas]
            lv_meta = delay(m, lv_meta, FAdd.latency, name=f"tree_meta{k}")
        lv_x = lv_xs[0]
        tmeta = data.View(meta_l, lv_meta)
        m.d.comb += sum_done.eq(lv_v)
        for j in range(self.n_slots):
            slot_w[j][1].append((lv_v & (tmeta.slot == j), tmeta.row, lv_x))

        # MAX / ARGMAX / AMAX: a compare tree over the lanes, then running maxima
        cmp_abs = RR(tagR.sid, lambda st: st.cmp is not None and st.cmp[0] == "AMAX", name="cmp_abs")
        cmp_mask = RR(tagR.sid, lambda st: st.cmp is not None and st.cmp[0] == "MAX" and st.obj.mask,
                      name="cmp_mask")
        cmp_tap = RR(tagR.sid, lambda st: tap_code[st.cmp[1]] if st.cmp else 0, 2, "cmp_tap")
        node_l = data.StructLayout({"idx": LB + BB, "key": 32, "nan": 1})

        def better(a, b):
            """b (later elements) replaces a only if strictly greater (NaN above all, first NaN kept)."""
            take = (b.nan & ~a.nan) | (~a.nan & ~b.nan & (b.key > a.key))
            r = Signal(node_l)
            m.d.comb += r.eq(Mux(take, b.as_value(), a.as_value()))
            return r

        def value(nd):
            return Mux(nd.nan, QNAN, Mux(nd.key[31], nd.key ^ 0x80000000, ~nd.key))

        lvl = [[]]
        for l in range(L):
            x = tap_sel(cmp_tap, l)
            xx = Mux(cmp_abs, x & 0x7FFFFFFF, Mux(x == 0x80000000, 0, x))
            excl = ~tagR.vmask[l] | (cmp_mask & ~tagR.emask[l])
            nd = Signal(node_l, name=f"cmp0_{l}")
            m.d.sync += [nd.idx.eq(l), nd.nan.eq(~excl & (xx[23:31] == 0xFF) & xx[:23].any()),
                         nd.key.eq(Mux(excl, _NEG_INF_KEY, Mux(xx[31], ~xx, xx | 0x80000000)))]
            lvl[0].append(nd)
        for k in range(1, LB + 1):
            lvl.append([])
            for j in range(L >> k):
                nd = Signal(node_l, name=f"cmp{k}_{j}")
                m.d.sync += nd.eq(better(lvl[k - 1][2 * j], lvl[k - 1][2 * j + 1]))
                lvl[k].append(nd)
        # every level aligned to TC = TR + 1 + LB
        lvl = [[data.View(node_l, delay(m, nd.as_value(), LB - k, name=f"cmpal{k}_{j}")) for j, nd in enumerate(ns)]
               for k, ns in enumerate(lvl)]
        tagC = data.View(tag_l, delay(m, tagR.as_value(), 1 + LB, name="tagC"))
        vC = delay(m, vR, 1 + LB, name="vC", reset_less=False)
        cC = lambda fn, shape=1, name=None: self._rom(m, tagC.sid, fn, shape, name)     # noqa: E731
        c_en = cC(lambda st: st.cmp is not None, name="c_en")
        c_reg = cC(lambda st: st.cmp is not None and st.cmp[2] is not None, name="c_reg")
        c_slot = cC(lambda st: st.cmp[2] if st.cmp and st.cmp[2] is not None else 0, range(max(2, self.n_slots)),
                    "c_slot")
        c_vec = cC(lambda st: st.cmp is not None and st.cmp[3] is not None, name="c_vec")
        c_mem = cC(lambda st: st.cmp[3] if st.cmp and st.cmp[3] is not None else 0, range(max(2, self.n_mems)),
                   "c_mem")
        c_arg = cC(lambda st: st.cmp is not None and st.cmp[0] == "ARGMAX", name="c_arg")
        top = Signal(node_l)
        m.d.comb += [top.eq(lvl[LB][0]), top.idx.eq(Cat(lvl[LB][0].idx[:LB], tagC.beat))]
        q = (tagC.lgr - LB)[:5]
        big = tagC.lgr >= LB
        segmask = Cat(*(q > i for i in range(BB)))
        first_seg = (tagC.beat & segmask) == 0
        last_seg = ((tagC.beat & segmask) == segmask) | tagC.last
        seg_run, row_run = Signal(node_l), Signal(node_l)
        seg_new = Mux(first_seg, top.as_value(), better(seg_run, top).as_value())
        row_new = data.View(node_l, Mux(tagC.first, top.as_value(), better(row_run, top).as_value()))
        cv = vC & c_en
        with m.If(cv):
            m.d.sync += [seg_run.eq(seg_new), row_run.eq(row_new)]
        # writes, registered: a segment's maximum into its vector entry, the row's into its register
        cw_v, cw_mem, cw_addr = Signal(), Signal(range(max(2, self.n_mems))), Signal(vwb)
        cw_en, cw_data = Signal(L), Signal(data.ArrayLayout(32, L))
        segv = value(data.View(node_l, seg_new))
        k_big = tagC.beat >> q
        small_en, small_data = Signal(L), Signal(data.ArrayLayout(32, L))
        with m.Switch(tagC.lgr):
            for s in range(LB):
                with m.Case(s):
                    for t in range(L):
                        j = t & ((L >> s) - 1)
                        hit = (t >> (LB - s)) == (tagC.beat[:s] if s else 0)
                        m.d.comb += [small_en[t].eq(hit & tagC.vmask[j << s]), small_data[t].eq(value(lvl[s][j]))]
        m.d.sync += [cw_v.eq(cv & c_vec & (~big | last_seg)), cw_mem.eq(c_mem),
                     cw_addr.eq(tagC.vbw + Mux(big, k_big >> LB, tagC.beat >> tagC.lgr)),
                     cw_en.eq(Mux(big, Const(1, L) << k_big[:LB], small_en)),
                     cw_data.eq(Mux(big, segv.replicate(L), small_data.as_value()))]
        for j in range(self.n_mems):
            vec_w[j][1].append((cw_v & (cw_mem == j), cw_addr, cw_en, cw_data.as_value()))
        cr_v, cr_slot, cr_row, cr_data = Signal(), Signal.like(c_slot), Signal(8), Signal(32)
        m.d.sync += [cr_v.eq(cv & c_reg & tagC.last), cr_slot.eq(c_slot), cr_row.eq(tagC.row),
                     cr_data.eq(value(row_new))]
        for j in range(self.n_slots):
            slot_w[j][1].append((cr_v & (cr_slot == j), cr_row, cr_data))
        am_v, am_idx = Signal(), Signal(LB + BB)
        m.d.sync += [am_v.eq(cv & c_arg & tagC.last), am_idx.eq(row_new.idx)]

        # -- W: the lanes' results (S1 + latency + 1) ------------------------------------
        lat = self.latency
        tagW = data.View(tag_l, delay(m, s1.as_value(), lat + 1, name="tagW"))
        vW = delay(m, s1_v, lat + 1, name="vW", reset_less=False)
        w_data = Signal(data.ArrayLayout(32, L))
        m.d.sync += [w_data[l].eq(ln.o) for l, ln in enumerate(lanes)]
        wR = lambda fn, shape=1, name=None: self._rom(m, tagW.sid, fn, shape, name)      # noqa: E731
        w_outf = wR(lambda st: st.outf is not None, name="w_outf")
        w_kind = wR(lambda st: st.outf or 0, 2, "w_kind")
        w_reg = wR(lambda st: st.oreg is not None, name="w_reg")
        w_slot = wR(lambda st: st.oreg or 0, range(max(2, self.n_slots)), "w_slot")
        w_vec = wR(lambda st: st.ovec is not None, name="w_vec")
        w_mem = wR(lambda st: st.ovec or 0, range(max(2, self.n_mems)), "w_mem")
        dT = lat + 1 - (TR + 1 + LB + 1)          # the ARGMAX result waits for its beat's W
        amW = delay(m, am_v, dT, name="amW", reset_less=False)
        amW_idx = delay(m, am_idx, dT, name="amW_idx")
        for j in range(self.n_slots):
            slot_w[j][1].append((vW & w_reg & (w_slot == j), tagW.row, w_data[0]))
        for j in range(self.n_mems):
            vec_w[j][1].append((vW & w_vec & (w_mem == j), tagW.vbw + tagW.beat, tagW.vmask, w_data.as_value()))
        ow = Signal(outl)
        m.d.comb += [ow.kind.eq(Mux(amW, ARGMAX, w_kind)), ow.row.eq(tagW.row), ow.beat.eq(tagW.beat),
                     ow.valid.eq(Mux(amW, 1, tagW.vmask)), ow.data.eq(Mux(amW, amW_idx, w_data.as_value())),
                     outf.w_data.eq(ow.as_value()), outf.w_en.eq((vW & w_outf) | amW)]
        written = Signal(OUT_COUNT_BITS)
        m.d.sync += written.eq(self.out_count)
        m.d.comb += self.out_count.eq(written + outf.w_en)

        # -- write ports: one source at a time (the drains keep them apart) ----------------
        for wp, srcs in slot_w:
            for en, addr, val in reversed(srcs):
                with m.If(en):
                    m.d.comb += [wp.en.eq(1), wp.addr.eq(addr), wp.data.eq(val)]
        for wp, srcs in vec_w:
            for en, addr, msk, val in reversed(srcs):
                with m.If(en):
                    m.d.comb += [wp.en.eq(msk), wp.addr.eq(addr), wp.data.eq(val)]
        return m
