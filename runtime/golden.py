"""The golden model: a bit-exact interpreter of flightllm instruction programs.

Memory model
------------
* **Weight HBM** is the artifact's channel images (``weights/chNN.bin``) exactly as
  written: an MV/MM/EMBED names its tensor by the byte offset ``w_off`` (the same in
  every channel), its shape, format (bits, n_keep, m, group, min) and shift; the golden
  model reads the record streams from those bytes and unpacks them with
  :func:`flightllm.hw.formats.unpack_tensor`. Unpacked, prepared weights are cached per
  offset.
* **KV HBM** (space ``KV``) and the **output region** (space ``OUT``) are byte arrays;
  LD/ST move rows of bytes in the layout of :mod:`flightllm.compiler.schedule`.
* **SFU tables** are ``tables.bin`` as float32 (norm weights, RoPE cos/sin).
* **Token buffer**: one int32 token id per sequence position, written by the host.
* **On-chip buffers** (:class:`~flightllm.hw.isa.Buf`): float32 rows, or int8 rows
  with one float32 scale per segment (QUANT, LD_KV), or int8 rows with one float32
  scale per row and an 8-bit factor per group (QUANTG, the matrix engine's input).

Arithmetic
----------
MPE: exactly :mod:`flightllm.runtime.arith` (INT8 activations with group factors x
INT8-widened weights, exact group sums x fixed-point scales and mins, wrapping int64),
evaluated in integers on weights kept packed by :func:`~flightllm.runtime.native.mpe_float`
(numba; :func:`~flightllm.runtime.arith.mpe_reference` is the oracle). Everything else is the
float32 SFU of :mod:`flightllm.runtime.sfu` (the spec of each operation is there).

Timing (the performance model)
------------------------------
Every instruction is scheduled by the overlap rules of :mod:`flightllm.hw.isa` (unit
pipelines, the MPE's fetch and compute phases with the stream FIFOs, the shared HBM,
tokens and barriers) with the durations of :mod:`flightllm.runtime.timing`
(:meth:`Golden._issue`). The work each instruction brings:

* MV/MM: compute ``T * kept MACs / params.macs``; fetch ``passes * region bytes`` per
  channel at the sustained channel rate, ``passes = ceil(T / mm_tokens)``;
* QK / PV: the same with ``T * rep`` query rows over the kv head's streamed cache
  records (:meth:`flightllm.hw.kvcache.KvLayout.stream`);
* SFU ops: elements x passes / ``sfu_lanes`` (RMSNORM, QUANT, QUANTG 2 passes,
  SOFTMAX 3 over the attended positions);
* LD/ST: bytes over the ``kv_channels`` the spaces are interleaved on; ST_KT: the
  beats it touches in its busiest channel; EMBED: the records holding the gathered rows.

A wait on an empty token FIFO (no earlier instruction signalled it) is a deadlock;
tokens left over at a barrier are an error. A hazard check confirms that the tokens
order every access: an instruction must not start before the last writer (and, for a
write, the last readers) of its buffers or HBM regions has completed (an MPE
instruction's HBM reads are checked at its fetch).

Execution
---------
A program is prepared once per machine (:meth:`Golden.run` caches it by identity):
every instruction becomes a bound handler with its fields resolved to plain ints,
its token FIFOs and hazard resources precomputed, so issuing costs a few Python
operations plus the numpy work; registers are read at issue time only where a field
names one. Weights are unpacked once per offset (and cached on disk when a cache
directory is given) and packed once for :func:`~flightllm.runtime.native.mpe_float`.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from amaranth.lib import enum

from ..hw.sfu_program import TREE_WIDTH, sum_passes
from ..hw.formats import ALIGN, PackedTensor, WeightFormat, align, region_bytes, unpack_tensor
from ..hw.isa import LOOP_DEPTH, PER_HEAD, TOKEN_UNITS, UNIT_OF, Buf, Opcode, Reg, Space, loop_trips, setr_value
from ..hw.kvcache import KV_GROUP, K as _KIND_K, KvLayout
from ..hw.params import HwParams
from . import sfu
from . import native
from .timing import Timing, act_cycles, tables_cycles, timing_for

__all__ = ["GoldenError", "DeadlockError", "RunStats", "Golden", "weight_format", "set_blas_threads", "walk",
           "prepare_control"]

F32 = np.float32


class GoldenError(ValueError):
    """A program the golden model cannot execute; names the instruction and field.

    ``status``: the kernel's status code for the same fault (a name of
    :class:`flightllm.hw.regmap.Status`), ``pc``: the instruction (None if neither applies).
    """

    def __init__(self, msg, status: str = "BAD_FIELD", pc: int | None = None):
        super().__init__(msg)
        self.status, self.pc = status, pc


class DeadlockError(GoldenError):
    def __init__(self, msg, status: str = "DEADLOCK", pc: int | None = None):
        super().__init__(msg, status, pc)


def set_blas_threads(n: int) -> bool:
    """Limit the OpenBLAS threads numpy uses (no threadpoolctl dependency; best effort).

    The golden model's matrix products run in its own native kernels (threads:
    ``FLIGHTLLM_THREADS``, :mod:`flightllm.runtime.native`) and its numpy work is small:
    BLAS threads would only spin on a shared machine, so the golden device keeps numpy
    single-threaded unless ``FLIGHTLLM_BLAS_THREADS`` says otherwise.
    """
    import ctypes

    done = False
    try:
        with open("/proc/self/maps") as fh:
            libs = {ln.split()[-1] for ln in fh if "openblas" in ln.lower() and ".so" in ln.split()[-1]}
    except OSError:
        return False
    for lib in libs:
        try:
            dll = ctypes.CDLL(lib)
        except OSError:
            continue
        for name in ("scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_",
                     "scipy_openblas_set_num_threads", "openblas_set_num_threads"):
            fn = getattr(dll, name, None)
            if fn is not None:
                fn(int(n))
                done = True
                break
    return done


def _save_npz(path: Path, **arrays):
    """Best-effort atomic write of a cache file (a failure only costs speed)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".npz")
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
        os.replace(tmp, path)
    except OSError:
        pass


def weight_format(f: dict, what: str) -> WeightFormat:
    """The :class:`WeightFormat` a weight instruction's fields name (GoldenError if none)."""
    try:
        return WeightFormat.from_fields(f.get("bits", 0), f.get("n_keep", 0), f.get("m", 0),
                                        f.get("group_log2", 0), f.get("kind", 0))
    except ValueError as e:
        raise GoldenError(f"{what}: bad weight format fields: {e}") from None


_NU = len(TOKEN_UNITS)
_UNAMES = [u.name for u in TOKEN_UNITS]
(_NOP, _END, _LOOP, _SETR, _LD_KV, _EMBED, _ST_KV, _ST_OUT, _ST_KT, _MV, _MM, _QK, _RMSNORM, _ROPE, _SOFTMAX,
 _SILU_MUL, _ADD, _QUANT, _DEQUANT, _PV, _ARGMAX, _FILL, _QUANTG) = (o.value for o in (
    Opcode.NOP, Opcode.END, Opcode.LOOP, Opcode.SETR, Opcode.LD_KV, Opcode.EMBED, Opcode.ST_KV, Opcode.ST_OUT,
    Opcode.ST_KT, Opcode.MV, Opcode.MM, Opcode.QK, Opcode.RMSNORM, Opcode.ROPE, Opcode.SOFTMAX, Opcode.SILU_MUL,
    Opcode.ADD, Opcode.QUANT, Opcode.DEQUANT, Opcode.PV, Opcode.ARGMAX, Opcode.FILL, Opcode.QUANTG))
_LD, _ST, _MPE, _SFU = (u.value for u in TOKEN_UNITS)
_FETCH_UNITS = (_LD, _ST)          # tokens from these gate an MPE instruction's fetch (overlap rule 2)
_KV, _OUT = Space.KV.value, Space.OUT.value
_ARGMAX_REG = Reg.ARGMAX.value
# resources of the hazard check: the on-chip buffers (Buf values) and these pseudo-resources
# (Buf values; (Buf, kv head) for the per-head parts of S, PQ, A; ("KVT", offset) for a kv
# head's cache region and ("KVS", address) for a layer's scale rows in HBM)
_NBUF = max(b.value for b in Buf) + 1
_TOK, _TAB, _OUTR, _REGR = range(_NBUF, _NBUF + 4)
_PSEUDO = {_TOK: "token buffer", _TAB: "tables", _OUTR: "output HBM", _REGR: "ARGMAX register"}
_PER_HEAD = {b.value for b in PER_HEAD}
# instruction kinds of the interpreter loop
_K_OP, _K_SETR, _K_LOOP, _K_END, _K_NOP = range(5)


def _attended(cols) -> int:
    """The positions of the groups of ``KV_GROUP`` that hold an attended one (``cols``: a
    bool per position, a multiple of ``KV_GROUP``): what SOFTMAX passes over and PV loads."""
    return int(cols.reshape(-1, KV_GROUP).any(axis=1).sum()) * KV_GROUP


def _memo(table: dict, key, make, limit: int = 4096):
    """``table[key]``, made by ``make()`` on a miss; the table starts over past ``limit`` keys."""
    hit = table.get(key)
    if hit is None:
        if len(table) >= limit:
            table.clear()
        hit = table[key] = make()
    return hit


def _rname(r):
    if isinstance(r, tuple):
        if r[0] == "KVT":
            return f"KV cache region at {r[1]}"
        if r[0] == "KVS":
            return f"KV scale rows at {r[1]}"
        return f"{Buf(r[0]).name}[kv head {r[1]}]"
    return _PSEUDO.get(r) or Buf(r).name


class _CI:
    """An instruction prepared for execution (see the module docstring, Execution)."""
    __slots__ = ("op", "f", "kind", "unit", "opv", "waits", "sigs", "reads", "writes", "hreads", "h", "setr",
                 "loop")

    def __init__(self, ins):
        self.op = ins.op
        self.opv = ins.op.value
        self.f = {k: (v.value if isinstance(v, enum.Enum) else v) for k, v in ins.f.items()}
        self.unit = UNIT_OF[ins.op].value
        f = self.f
        self.kind = {_END: _K_END, _LOOP: _K_LOOP, _SETR: _K_SETR, _NOP: _K_NOP}.get(self.opv, _K_OP)
        u = self.unit
        w, sg = f.get("wait", 0), f.get("signal", 0)
        self.waits = tuple((pu * _NU + u, pu) for pu in range(_NU) if w >> pu & 1)
        self.sigs = tuple(u * _NU + cu for cu in range(_NU) if sg >> cu & 1)
        self.setr = (f.get("rb", 0), f.get("ra", 0), f.get("mul", 0), f.get("add", 0), f.get("lim", 0),
                     f.get("rd", 0))
        self.loop = (f.get("body", 0), f.get("ra", 0), f.get("add", 0), f.get("shr", 0), f.get("rd", 0))
        self.reads = self.writes = self.hreads = ()
        self.h = None


@dataclass
class RunStats:
    cycles: int = 0
    busy: dict = field(default_factory=lambda: {u.name: 0 for u in TOKEN_UNITS})
    op_cycles: dict = field(default_factory=dict)
    op_count: dict = field(default_factory=dict)
    weight_bytes: int = 0
    kv_bytes: int = 0
    out_bytes: int = 0
    instructions: int = 0

    @property
    def hbm_bytes(self):
        return self.weight_bytes + self.kv_bytes + self.out_bytes

    def to_dict(self):
        return {"cycles": self.cycles, "busy": self.busy, "op_cycles": self.op_cycles,
                "op_count": self.op_count, "weight_bytes": self.weight_bytes,
                "kv_bytes": self.kv_bytes, "out_bytes": self.out_bytes,
                "instructions": self.instructions}


class _Weight:
    __slots__ = ("qt", "S", "M", "shift", "fmt", "wg", "nbytes", "region")


def walk(prog, regs, issue, barrier=None):
    """The dispatcher: run ``prog``'s SYS instructions and hand every unit instruction, in
    program order, to ``issue(pc, ci)``; the specification of ``hw/control.py``.

    ``prog``: prepared instructions (:class:`_CI`, :func:`prepare_control`); ``regs``: the
    16 registers (a list, updated in place). ``barrier(where)`` is called at every barrier
    (``LOOP`` entry, each back edge, ``END``). Dependency tokens are counted as they are
    dispatched: a wait on a token FIFO no earlier instruction has signalled is a deadlock,
    a token left at a barrier is unbalanced. Faults raise :class:`GoldenError` with the
    kernel's status code and the instruction index.
    """
    tok = [0] * (_NU * _NU)
    stack = []                          # open loops: [loop pc, body start, body end, trips, j, idx]
    pc, n = 0, len(prog)

    def bar(where, at):
        if barrier is not None:
            barrier(where)
        for q, c in enumerate(tok):
            if c:
                a, b = divmod(q, _NU)
                raise DeadlockError(f"{where}: {c} token(s) from {_UNAMES[a]} to {_UNAMES[b]} never "
                                    "consumed before a barrier (unbalanced wait/signal)", "UNBALANCED_TOKENS", at)

    while True:
        while stack and pc == stack[-1][2]:
            lp = stack[-1]
            bar(f"instruction {lp[0]} (LOOP back edge)", lp[0])
            lp[4] += 1
            if lp[4] < lp[3]:
                if lp[5]:
                    regs[lp[5]] = lp[4]
                pc = lp[1]
            else:
                stack.pop()
        if pc >= n:
            raise GoldenError("program ran past its last instruction without END", "PAST_END", pc)
        ci = prog[pc]
        kind = ci.kind
        if kind == _K_OP:
            for qi, pu in ci.waits:
                if not tok[qi]:
                    raise DeadlockError(f"instruction {pc} ({ci.op.name}) waits for a token from "
                                        f"{_UNAMES[pu]} that no earlier instruction signalled (deadlock)", "DEADLOCK", pc)
                tok[qi] -= 1
            for qi in ci.sigs:
                tok[qi] += 1
            issue(pc, ci)
        elif kind == _K_SETR:
            rb, ra, mul, add, lim, rd = ci.setr
            if rd:
                regs[rd] = setr_value(regs, rb, ra, mul, add, lim)
        elif kind == _K_LOOP:
            body, ra, add, shr, idx = ci.loop
            hi = stack[-1][2] if stack else n
            if pc + 1 + body > hi:
                raise GoldenError(f"instruction {pc} (LOOP): body of {body} runs past its enclosing block",
                                  "LOOP_ERROR", pc)
            if len(stack) >= LOOP_DEPTH:
                raise GoldenError(f"instruction {pc} (LOOP): nesting deeper than the loop stack ({LOOP_DEPTH})",
                                  "LOOP_ERROR", pc)
            bar(f"instruction {pc} (LOOP)", pc)
            trips = loop_trips(regs, ra, add, shr)
            if trips:
                if idx:
                    regs[idx] = 0
                stack.append([pc, pc + 1, pc + 1 + body, trips, 0, idx])
            else:
                pc += body
        elif kind == _K_END:
            bar(f"instruction {pc} (END)", pc)
            return
        pc += 1


def prepare_control(prog) -> list:
    """``prog`` (:class:`~flightllm.hw.isa.Instr` list) prepared for :func:`walk` alone."""
    return [_CI(ins) for ins in prog]


class Golden:
    """The machine state and interpreter.

    Parameters
    ----------
    params : HwParams
    channels : list of bytes
        Weight channel images (``None`` entries for timing-only runs).
    tables : float32 ndarray
    plan : dict
        The manifest's ``programs.plan`` (max_seq, kv_bytes, ...).
    tensors : dict, optional
        The manifest's tensor table, to check that every weight operation names a
        real tensor (offset, shape, format, shift).
    functional : bool
        False: registers, loops and timing only (no data), e.g. to model LLaMA2-7B.
    """

    def __init__(self, params: HwParams, channels, tables, plan: dict, tensors: dict | None = None,
                 functional: bool = True, check_hazards: bool = True, weight_cache=None,
                 timing: Timing | None = None):
        self.p = params
        self.timing = timing or timing_for(params)
        self.tables = np.asarray(tables, dtype=F32) if tables is not None else None
        self.plan = dict(plan)
        self.functional = functional
        self.check_hazards = check_hazards
        #: a list to record every issued instruction's (pc, opcode, unit, start, done) cycles
        #: in (the cycle model's per-instruction trace), or None
        self.trace = None
        self.by_offset = {t["offset"]: (n, t) for n, t in (tensors or {}).items()}
        self.has_tensors = tensors is not None
        self.weights = {}
        self.weight_cache = None if weight_cache is None else Path(weight_cache)
        self.regs = [0] * 16                 # plain ints: read at issue time by register fields
        self.tokens = np.zeros(self.plan["max_seq"], dtype=np.int64)
        pl = self.plan
        self.kvl = None                      # a plan without a KV cache: no attention operations
        if "kv_format" in pl:
            self.kvl = KvLayout(pl["layers"], pl["kv_heads"], pl["head_dim"], pl["max_seq"],
                                WeightFormat.parse(pl["kv_format"]), params, pl["kv_base"],
                                WeightFormat.parse(pl.get("kv_format_v") or pl["kv_format"]))
        self._channels = None
        self._kv_pending = []                # ST_KT row writes not yet packed into the images
        # memos (_memo): what every layer of a step computes again
        self._kv_beats = {}                  # (kind, pos0, rows) -> ST_KT's beats
        self._streams = {}                   # see _stream
        self._masks = {}                     # attention masks: see _attention's rows_and_mask
        if functional:
            # weight HBM: the images, then the KV cache's values (written by ST_KT)
            base = self.kvl.base if self.kvl else max((len(c) for c in channels), default=0)
            size = base + (self.kvl.channel_bytes if self.kvl else 0)
            self._channels = []
            for c, img in enumerate(channels):
                if len(img) > base:
                    raise GoldenError(f"weights/ch{c:02d}.bin: {len(img)} bytes run into the KV cache at {base}")
                a = np.zeros(size, np.uint8)
                a[:len(img)] = np.frombuffer(img, np.uint8)
                self._channels.append(a)
        self.kvm = {}                        # KV region offset -> int8 (cap, head_dim): what ST_KT wrote
        self.kv = np.zeros(pl["kv_bytes"] if functional else 0, dtype=np.uint8)    # LD/ST space KV
        self.out = np.zeros(0, dtype=np.uint8)
        self.bufs = {}
        eff = self.timing.hbm_efficiency
        self.ch_bpc = params.hbm_channel_bytes_per_cycle * eff         # sustained bytes/cycle/channel
        self.ldst_bpc = self.ch_bpc * params.kv_channels               # LD/ST spaces: interleaved
        self.fifo_cycles = params.stream_fifo_beats * params.hbm_port_bits / 8 / self.ch_bpc
        self._progs = {}
        self._sfu_ovh = {Opcode[name].value: (fixed, per_row) for name, fixed, per_row in self.timing.sfu_overhead}
        self._sum_passes = {o.value: sum_passes(o.name) for o in Opcode if UNIT_OF[o] == UNIT_OF[Opcode.ADD]}

    # -- host interface -------------------------------------------------------------
    @property
    def channels(self):
        """The weight HBM images (uint8 arrays, writable), with every ST_KT so far in them.

        ST_KT keeps its rows in :attr:`kvm` (what QK and PV read) and packs them into the
        images only when the images are looked at: the packing is the layout's
        (:meth:`flightllm.hw.kvcache.KvLayout.write`) and costs more than the rest of a
        decode step."""
        if self._kv_pending:
            pending, self._kv_pending = self._kv_pending, []
            for layer, kind, pos0, vals in pending:
                self.kvl.write(self._channels, layer, kind, pos0, vals)
        return self._channels

    def write_tokens(self, pos: int, ids):
        ids = np.asarray(ids, dtype=np.int64)
        if pos < 0 or pos + ids.size > self.tokens.size:
            raise GoldenError(f"token buffer: positions {pos}..{pos + ids.size - 1} beyond max_seq {self.tokens.size}")
        self.tokens[pos:pos + ids.size] = ids

    def read_out(self, row: int, rows: int) -> np.ndarray:
        rb = self.plan["out_row_bytes"]
        need = (row + rows) * rb
        if need > self.out.size:
            raise GoldenError(f"output region: rows {row}..{row + rows - 1} were never written")
        return self.out[row * rb:need].view("<f4").reshape(rows, rb // 4).copy()

    # -- weights -----------------------------------------------------------------
    def weight(self, i, ins) -> _Weight:
        f = ins.f
        off = f.get("w_off", 0)
        n, k = f.get("n_out", 0), f.get("k_in", 0)
        what = f"instruction {i} ({ins.op.name})"
        fmt = weight_format(f, what)
        # keyed by every field that reads the tensor: an instruction at a known offset with
        # another shape, format or shift gets the checks below, not the cached tensor
        wkey = (off, fmt.name, n, k, f.get("shift", 0))
        w = self.weights.get(wkey)
        if w is not None:
            return w
        if n <= 0 or k <= 0 or k % fmt.group_size:
            raise GoldenError(f"{what}: bad shape n_out={n} k_in={k}")
        if self.has_tensors:
            hit = self.by_offset.get(off)
            if hit is None:
                raise GoldenError(f"{what}: no tensor at w_off={off}")
            name, t = hit
            if list(t["shape"]) != [n, k] or t["format"] != fmt.name or t["shift"] != f.get("shift", 0):
                raise GoldenError(f"{what}: fields (shape {n}x{k}, {fmt.name}, shift {f.get('shift', 0)}) "
                                  f"do not match tensor {name!r} at w_off={off}")
        try:
            self.p.check_format(fmt, what)
            region = region_bytes(fmt, (n, k), self.p)
        except ValueError as e:
            raise GoldenError(str(e)) from None
        w = _Weight()
        w.fmt, w.shift, w.region = fmt, f.get("shift", 0), region
        w.nbytes = align(region) * self.p.weight_channels
        w.qt = w.S = w.M = w.wg = None
        key = f"w{off}-{fmt.name.replace('/', 'g').replace(':', '_')}-{n}x{k}-s{w.shift}.npz"
        cached = self.weight_cache / key if self.weight_cache else None
        if self.functional and cached is not None and cached.is_file():
            with np.load(cached) as z:
                w.qt = (z["q"], z["S"], z["M"] if fmt.has_min else None)
        elif self.functional:
            data = []
            for c, img in enumerate(self._channels):      # weights: below the KV cache
                if off + region > len(img):
                    raise GoldenError(f"{what}: tensor at w_off={off} ({fmt.name} {n}x{k}) runs past the end "
                                      f"of weights/ch{c:02d}.bin")
                data.append(img[off:off + region])
            qt = unpack_tensor(PackedTensor(fmt, (n, k), w.shift, self.p.chains, self.p.chain_len, data))
            _, S, M = qt.fixed(w.shift)
            w.qt = (qt.q, S, M)
            if cached is not None:
                _save_npz(cached, q=qt.q, S=S, **({"M": M} if M is not None else {}))
        self.weights[wkey] = w
        return w

    def _prepared(self, w: _Weight):
        if w.wg is None:
            q, S, M = w.qt
            w.wg = native.pack_mpe(q, S, M, w.fmt.group_size)
        return w.wg

    def _sfu_cost(self, op, rows, work, n=0):
        """Issue cycles of an SFU operation of ``rows`` rows of ``n`` elements: the elements'
        beats, the sum tree's ``lanes x slots / (2 x TREE_WIDTH)`` cycles per row of each
        SUM pass where a row has fewer beats (:func:`flightllm.hw.sfu_program.sum_passes`), and the RTL's
        measured overhead for the opcode (its dependent passes: runtime/timing.py)."""
        fixed, per_row = self._sfu_ovh.get(op, (0.0, 0.0))
        return work + rows * self._sfu_tree(op, n) + fixed + per_row * rows

    def _sfu_tree(self, op, n):
        p = self.p
        k = self._sum_passes.get(op, 0)
        return k * max(0, p.sfu_lanes * p.sfu_acc_slots // (2 * TREE_WIDTH) - -(-n // p.sfu_lanes)) if k and n else 0

    # -- buffers -----------------------------------------------------------------
    def _f32(self, i, ins, b, rows, n=None):
        v = self.bufs.get(b)
        if v is None or isinstance(v, tuple):
            raise GoldenError(f"instruction {i} ({ins.op.name}): buffer {Buf(b).name} holds no float32 data")
        if v.shape[0] < rows or (n is not None and v.shape[1] < n):
            raise GoldenError(f"instruction {i} ({ins.op.name}): buffer {Buf(b).name} is {v.shape}, "
                              f"needs {rows} x {n}")
        if n is None or v.shape[1] == n:
            return v if v.shape[0] == rows else v[:rows]
        return v[:rows, :n]

    def _i8(self, i, ins, b, rows):
        v = self.bufs.get(b)
        if not isinstance(v, tuple):
            raise GoldenError(f"instruction {i} ({ins.op.name}): buffer {Buf(b).name} holds no int8 data")
        if v[0].shape[0] < rows:
            raise GoldenError(f"instruction {i} ({ins.op.name}): buffer {Buf(b).name} has {v[0].shape[0]} "
                              f"rows, needs {rows}")
        if v[0].shape[0] == rows:
            return v
        return v[0][:rows], v[1][:rows], None if v[2] is None else v[2][:rows]

    def _scores(self, b, rows, heads, create=True, i=None, ins=None):
        S = self.bufs.get(b)
        shape_ok = isinstance(S, np.ndarray) and S.ndim == 3 and S.shape[0] >= rows and S.shape[1] == heads
        if not shape_ok:
            if not create:
                raise GoldenError(f"instruction {i} ({ins.op.name}): score buffer {Buf(b).name} was not written")
            S = np.zeros((rows, heads, self.plan["max_seq"]), dtype=F32)
            self.bufs[b] = S
        return S if S.shape[0] == rows else S[:rows]

    def _table(self, i, ins, off, n):
        if off + n > self.tables.size:
            raise GoldenError(f"instruction {i} ({ins.op.name}): table range {off}+{n} beyond tables.bin")
        return self.tables[off:off + n]

    # -- execution ---------------------------------------------------------------
    def _res(self, names) -> tuple:
        """Hazard resources: a whole-buffer access of a per-head buffer is every head's part."""
        out = []
        heads = self.kvl.kv_heads if self.kvl else 1
        for r in names:
            if isinstance(r, int) and r in _PER_HEAD:
                out.extend((r, g) for g in range(heads))
            else:
                out.append(r)
        return tuple(out)

    def _prepare(self, prog):
        """The prepared form of ``prog`` for this machine (cached by identity)."""
        hit = self._progs.get(id(prog))
        if hit is not None and hit[0] is prog:
            return hit[1]
        out = []
        for i, ins in enumerate(prog):
            ci = _CI(ins)
            if ci.kind == _K_OP:
                h = self._handler(i, ci)
                ci.h, ci.reads, ci.writes = h[0], self._res(h[1]), self._res(h[2])
                ci.hreads = tuple(h[3]) if len(h) > 3 else ()
            out.append(ci)
        if len(self._progs) > 16:
            self._progs.clear()
        self._progs[id(prog)] = (prog, out)
        return out

    def run(self, prog, regs: dict | None = None, tables: bool = False) -> RunStats:
        """Run ``prog`` from the start with the given host registers; returns timing stats.

        The run starts when its first instruction is fetched (``fetch_latency`` after the
        start); ``tables`` charges loading the SFU tables before it, as the kernel does on
        the first run after an artifact is loaded (:func:`~flightllm.runtime.timing.tables_cycles`)."""
        for k, v in (regs or {}).items():
            self.regs[Reg[k].value if isinstance(k, str) else int(k)] = int(v)
        self.regs[0] = 0
        st = RunStats()
        self._stats = st
        t0 = float(self.timing.fetch_latency)
        if tables and self.tables is not None:
            t0 += tables_cycles(self.p, self.timing, self.tables.size)
        self._free = [t0] * _NU             # when each unit can issue its next instruction
        self._done = t0                     # when everything issued so far has completed
        self._fetch_free = t0               # the weight streamers (MPE fetch phase)
        self._hbm_free = t0                 # the shared HBM channels
        self._load_free = t0                # the MPE's activation loader
        self._fifo = [deque() for _ in range(_NU * _NU)]
        self._wend, self._wunit, self._rend = {}, {}, {}
        self._busy = [0.0] * _NU
        self._stream_busy = 0.0
        nop = max(o.value for o in Opcode) + 1
        self._opc, self._opn = [0.0] * nop, [0] * nop
        self._prog = self._prepare(prog)
        try:
            self._exec()
        finally:
            for u in range(_NU):
                st.busy[_UNAMES[u]] += math.ceil(self._busy[u])
            st.busy["STREAM"] = math.ceil(self._stream_busy)
            for o in Opcode:
                if self._opn[o.value]:
                    st.op_cycles[o.name] = math.ceil(self._opc[o.value])
                    st.op_count[o.name] = self._opn[o.value]
            st.instructions = sum(self._opn)
        st.cycles = math.ceil(self._done)
        return st

    def _barrier(self, where):
        t = self._done
        self._free = [t] * _NU
        self._fetch_free = self._hbm_free = t

    def _issue(self, pc, ci):
        """Schedule one instruction by the ISA's overlap rules (hw/isa.py) and run it."""
        u = ci.unit
        tm = self.timing
        t_fetch = t_comp = 0.0
        for qi, pu in ci.waits:
            q = self._fifo[qi]
            if not q:
                raise DeadlockError(f"instruction {pc} ({ci.op.name}) waits for a token from "
                                    f"{_UNAMES[pu]} that no earlier instruction signalled (deadlock)")
            t = q.popleft()
            if pu in _FETCH_UNITS:
                t_fetch = max(t_fetch, t)
            else:
                t_comp = max(t_comp, t)
        # the unit's own scoreboard: wait for an incomplete earlier instruction of this unit
        # whose output this one reads (rule 1)
        wend, wunit, rend = self._wend, self._wunit, self._rend
        sb = 0.0
        for r in ci.reads:
            if wunit.get(r) == u and wend[r] > sb:
                sb = wend[r]
        r = ci.h()              # issue cycles; (issue, HBM) cycles; MPE: (issue, HBM, activation load, passes)
        if u == _MPE:
            work, hbm, act, passes = r
            fs = max(self._fetch_free, self._hbm_free, t_fetch, self._free[u] - self.fifo_cycles)
            first = fs + tm.hbm_latency
            # the loader reads the first pass's activations once its inputs are there (and it
            # has handed the previous instruction's last pass to the engine)
            loaded = max(t_comp, sb, self._load_free) + act
            cs = max(self._free[u], loaded, first)
            per_pass = work / passes if passes else 0.0         # an MM of 0 rows: no pass
            ce = max(cs + work, first + hbm, cs + max(passes - 1, 0) * max(act, per_pass) + per_pass)
            self._load_free = ce - per_pass
            self._fetch_free = max(fs + hbm, ce - tm.hbm_latency - self.fifo_cycles)
            self._hbm_free = fs + hbm
            self._stream_busy += hbm
            start, free, done = cs, ce, ce + tm.mpe_latency + tm.mpe_out_latency
            hstart = fs
        elif u == _SFU:
            work = r
            start = max(self._free[u], t_fetch, t_comp, sb)
            free = start + work
            done = free + tm.sfu_latency
            hstart = start
        else:                                   # LD / ST: a transfer on the shared channels
            work, hbm = r
            start = max(self._free[u], t_fetch, t_comp, sb)
            hs = max(start, self._hbm_free)
            self._hbm_free = hs + hbm
            free = max(start + work, hs + hbm)
            done = free + (tm.hbm_latency if u == _LD else tm.store_latency)
            hstart = hs
        if self.check_hazards:
            for r in ci.reads:
                w = wend.get(r, 0.0)
                if w > start and wunit.get(r) != u:
                    raise GoldenError(f"instruction {pc} ({ci.op.name}) reads {_rname(r)} at cycle {start:.0f} "
                                      f"before its writer completes at {w:.0f} (missing dependency token)")
            for r in ci.hreads:
                w = wend.get(r, 0.0)
                if w > hstart:
                    raise GoldenError(f"instruction {pc} ({ci.op.name}) streams {_rname(r)} at cycle {hstart:.0f} "
                                      f"before its writer completes at {w:.0f} (missing dependency token)")
            for r in ci.writes:
                if wunit.get(r) == u:
                    continue                    # in-order unit: writes land in order
                t = max(wend.get(r, 0.0), rend.get(r, 0.0))
                if t > start:
                    raise GoldenError(f"instruction {pc} ({ci.op.name}) writes {_rname(r)} at cycle {start:.0f} "
                                      f"before earlier accesses complete at {t:.0f} (missing dependency token)")
        for r in ci.reads + ci.hreads:
            if rend.get(r, 0.0) < done:
                rend[r] = done
        for r in ci.writes:
            wend[r] = done
            wunit[r] = u
        self._free[u] = free
        if done > self._done:
            self._done = done
        for qi in ci.sigs:
            self._fifo[qi].append(done)
        self._busy[u] += work if u >= _MPE else free - start
        self._opc[ci.opv] += free - start
        self._opn[ci.opv] += 1
        if self.trace is not None:
            self.trace.append((pc, ci.op.name, u, start, done))

    def _exec(self):
        return walk(self._prog, self.regs, self._issue, self._barrier)

    # -- attention ------------------------------------------------------------------
    def _kv_check(self, i, ins, kind, bits, head_dim, cap):
        kv = self.kvl
        f = kv.fmt_of(kind)
        if (bits, head_dim, cap) != (f.bits, kv.head_dim, kv.cap):
            raise GoldenError(f"instruction {i} ({ins.op.name}): KV fields (bits {bits}, head_dim {head_dim}, "
                              f"cap {cap}) do not match the cache ({f.name}, head_dim {kv.head_dim}, "
                              f"cap {kv.cap})")

    def _kv_values(self, off, kind):
        """The int8 (cap, head_dim) values of the region at byte ``off`` (positions x elements)."""
        v = self.kvm.get(off)
        if v is None:
            layer, _, g = self.kvl.locate(off)
            v = self.kvm[off] = self.kvl.read(self.channels, layer, kind, g, self.kvl.cap)
        return v

    def _stream(self, kind, cols):
        """:meth:`~flightllm.hw.kvcache.KvLayout.stream` of the attended positions ``cols``
        (bool), memoized: every layer and head of a step attends the same positions."""
        return _memo(self._streams, (kind, cols.size, np.packbits(cols).tobytes()),
                     lambda: self.kvl.stream(kind, cols))

    def _st_kt(self, i, ins):
        f, regs, kv = ins.f, self.regs, self.kvl
        if kv is None:
            raise GoldenError(f"instruction {i} (ST_KT): the plan has no KV cache")
        src, rr, preg = f.get("src", 0), f.get("rows_reg", 0), f.get("pos_reg", 0)
        kind, nkv, hd = f.get("kind", 0), f.get("kv_heads", 0), f.get("head_dim", 0)
        self._kv_check(i, ins, kind, f.get("bits", 0), hd, f.get("cap", 0))
        if nkv != kv.kv_heads:
            raise GoldenError(f"instruction {i} (ST_KT): kv_heads {nkv} != the cache's {kv.kv_heads}")
        offs = [ALIGN * (f.get("kv_off", 0) + g * f.get("head_stride", 0)) for g in range(nkv)]
        try:
            layer, _, _ = kv.locate(offs[0])
        except ValueError:
            layer = None
        if layer is None or any(o != kv.head_offset(layer, kind, g) for g, o in enumerate(offs)):
            raise GoldenError(f"instruction {i} (ST_KT): regions at {offs[0]} (stride {ALIGN * f.get('head_stride', 0)}) "
                              f"are not a layer's {'V' if kind else 'K'} cache")
        port = self.p.hbm_port_bits / 8
        fn = self.functional
        lo, hi = kv.fmt_of(kind).qmin, kv.fmt_of(kind).qmax

        def h():
            rows = regs[rr] if rr else 1
            pos0 = regs[preg]
            if pos0 < 0 or pos0 + rows > kv.cap:
                raise GoldenError(f"instruction {i} (ST_KT): positions {pos0}..{pos0 + rows - 1} beyond the cache "
                                  f"({kv.cap})")
            if fn:
                q, _, _ = self._i8(i, ins, src, rows)
                if q.ndim != 2 or q.shape[1] < nkv * hd:
                    raise GoldenError(f"instruction {i} (ST_KT): buffer {Buf(src).name} is {q.shape}, needs rows of "
                                      f"{nkv} x {hd} int8 values")
                vals = q[:, :nkv * hd].reshape(rows, nkv, hd)
                if vals.size and (vals.min() < lo or vals.max() > hi):
                    raise GoldenError(f"instruction {i} (ST_KT): a value of buffer {Buf(src).name} lies outside "
                                      f"[{lo}, {hi}] of {kv.fmt_of(kind).name}")
                self._kv_pending.append((layer, kind, pos0, vals.copy()))
                for g, off in enumerate(offs):
                    m = self.kvm.get(off)
                    if m is not None:
                        m[pos0:pos0 + rows] = vals[:, g]
            beats = _memo(self._kv_beats, (kind, pos0, rows), lambda: kv.write_beats(kind, pos0, rows))
            self._stats.kv_bytes += rows * nkv * hd * kv.fmt_of(kind).bits // 8
            return 0, beats * port / self.ch_bpc
        return h, (src,), tuple(("KVT", o) for o in offs)

    def _attention(self, i, ins):
        """QK, PV (MPE) and SOFTMAX (SFU) of one kv head (hw/isa.py AttnFmt, SoftFmt)."""
        op, f, p, regs, bufs, kv = ins.opv, ins.f, self.p, self.regs, self.bufs, self.kvl
        if kv is None:
            raise GoldenError(f"instruction {i} ({ins.op.name}): the plan has no KV cache")
        src, dst, aux, rr = f.get("src", 0), f.get("dst", 0), f.get("aux", 0), f.get("rows_reg", 0)
        len_reg, len_add = f.get("len_reg", 0), f.get("len_add", 0)
        g, rep, cap = f.get("kvh", 0), f.get("rep", 0), f.get("cap", 0)
        sink, window = f.get("sink", 0), f.get("window", 0)
        fn = self.functional
        what = f"instruction {i} ({ins.op.name})"
        if cap != kv.cap or rep <= 0 or g >= kv.kv_heads or (g + 1) * rep > self.plan.get("heads", 1 << 30):
            raise GoldenError(f"{what}: cap {cap}, kv head {g}, rep {rep} do not fit the cache "
                              f"({kv.kv_heads} kv heads of {kv.cap} positions)")
        h0 = g * rep
        hd = kv.head_dim
        macs, mm_tokens, lanes = p.macs, p.mm_tokens, p.sfu_lanes
        R = p.chains
        if op != _SOFTMAX:
            kind = _KIND_K if op == _QK else 1
            self._kv_check(i, ins, kind, f.get("bits", 0), f.get("head_dim", 0), cap)
            off = ALIGN * f.get("kv_off", 0)
            try:
                where = kv.locate(off)
            except ValueError:
                where = None
            if where is None or where[1:] != (kind, g):
                raise GoldenError(f"{what}: kv_off {off} is not kv head {g}'s {'K' if kind == _KIND_K else 'V'} "
                                  "cache region")

        masks = self._masks

        def rows_and_mask():
            """(rows, n, n32, mask, attended columns, _attended of them), memoized: every
            layer's attention of a step attends the same positions."""
            rows = regs[rr] if rr else 1
            v0 = regs[len_reg] + len_add

            def make():
                n = v0 + rows - 1 if rows > 0 else 0
                if rows <= 0 or v0 < 1 or n > cap:
                    raise GoldenError(f"{what}: rows {rows} attending up to {n} positions: outside 1..{cap}")
                n32 = -(-n // KV_GROUP) * KV_GROUP
                mask = sfu.attention_mask(v0 + np.arange(rows), n32, sink, window)
                cols = mask.any(axis=0)
                return rows, n, n32, mask, cols, _attended(cols)
            return _memo(masks, (rows, v0, sink, window), make, 1024)

        if op == _SOFTMAX:
            c = f.get("scale", 0.0)
            kvn = max(f.get("kvn", 0), 1)                  # kv heads g .. g + kvn - 1
            if g + kvn > kv.kv_heads:
                raise GoldenError(f"{what}: kv heads {g}..{g + kvn - 1} beyond the cache's {kv.kv_heads}")

            def h():
                rows, n, n32, mask, _, used = rows_and_mask()
                if fn:
                    S = self._scores(src, rows, self.plan["heads"], create=False, i=i, ins=ins)
                    vs = self._f32(i, ins, aux, n)
                    P = bufs.get(dst)
                    H = self.plan["heads"]
                    if not (isinstance(P, tuple) and len(P) == 3 and P[0].ndim == 3 and P[0].shape[0] >= rows):
                        P = bufs[dst] = (np.zeros((rows, H, cap), np.int8), np.zeros((rows, H), F32),
                                         np.zeros((rows, H, cap // KV_GROUP), np.uint8))
                    if vs.shape[1] < g + kvn:
                        raise GoldenError(f"{what}: buffer {Buf(aux).name} holds {vs.shape[1]} value scales per "
                                          f"position, needs kv heads {g}..{g + kvn - 1}")
                    # each kv head's query heads by its value scales
                    native.softmax_into(S, mask, vs, g, kvn, rep, n, c, lanes, p.sfu_acc_slots,
                                        P[0][:rows], P[1][:rows], P[2][:rows])
                return self._sfu_cost(op, rows * rep * kvn, 3 * rows * rep * kvn * used / lanes, n32)
            return h, tuple((src, gg) for gg in range(g, g + kvn)) + (aux,), tuple((dst, gg) for gg in range(g, g + kvn))

        if op == _QK:
            def h():
                rows, n, n32, mask, cols, _ = rows_and_mask()
                recs, nbytes = self._stream(_KIND_K, cols)
                t2 = rows * rep
                if fn:
                    q, qs, _ = self._i8(i, ins, src, rows)
                    if q.shape[1] < (h0 + rep) * hd or qs.shape[1] < h0 + rep:
                        raise GoldenError(f"{what}: buffer {Buf(src).name} holds {q.shape[1]} values with "
                                          f"{qs.shape[1]} scales per row, needs query heads {h0}..{h0 + rep - 1}")
                    ks = self._f32(i, ins, aux, n)[:n, g]
                    S = self._scores(dst, rows, self.plan["heads"])
                    native.qk_into(q, qs, h0, rep, hd, self._kv_values(off, _KIND_K), n, ks, S)
                passes = -(-t2 // mm_tokens)
                self._stats.kv_bytes += passes * nbytes * p.weight_channels
                kept = recs // (hd // KV_GROUP) * R * hd                          # row tiles x chains x head_dim
                return t2 * kept / macs, passes * nbytes / self.ch_bpc, act_cycles(p, min(t2, mm_tokens), hd), passes
            return h, (src, aux), ((dst, g),), (("KVT", off),)

        def h():                                                            # PV
            rows, n, n32, mask, cols, used = rows_and_mask()
            recs, nbytes = self._stream(1, cols)
            t2 = rows * rep
            if fn:
                P = bufs.get(src)
                if not (isinstance(P, tuple) and P[0].ndim == 3 and P[0].shape[0] >= rows):
                    raise GoldenError(f"{what}: buffer {Buf(src).name} holds no probabilities (SOFTMAX first)")
                A = bufs.get(dst)
                H = self.plan["heads"]
                if not (isinstance(A, np.ndarray) and A.shape == (rows, H * hd)):
                    A = bufs[dst] = np.zeros((rows, H * hd), F32)
                native.pv_into(P[0][:rows], P[2][:rows], P[1][:rows], h0, rep, self._kv_values(off, 1), n, A)
            passes = -(-t2 // mm_tokens)
            self._stats.kv_bytes += passes * nbytes * p.weight_channels
            return (t2 * recs * R * KV_GROUP / macs, passes * nbytes / self.ch_bpc,    # recs x (chains x 32) MACs
                    act_cycles(p, min(t2, mm_tokens), used, KV_GROUP), passes)
        return h, ((src, g),), ((dst, g),), (("KVT", off),)

    # -- operations: a handler () -> cycles per instruction, with its reads and writes --
    def _handler(self, i, ins):
        op, f, p, regs = ins.opv, ins.f, self.p, self.regs
        fn = self.functional
        bufs = self.bufs
        rr = f.get("rows_reg", 0)
        lanes, slots = p.sfu_lanes, p.sfu_acc_slots
        if op == _MV or op == _MM:
            mv = op == _MV
            src, dst = f.get("src", 0), f.get("dst", 0)
            n, k = f.get("n_out", 0), f.get("k_in", 0)
            acc_bits, mm_tokens, macs, ch_bpc = p.acc_bits, p.mm_tokens, p.macs, self.ch_bpc
            cell = []

            def h():
                rows = regs[rr] if rr else 1
                if mv and rows != 1:
                    raise GoldenError(f"instruction {i} (MV): rows_reg gives {rows} rows, MV takes 1")
                if not cell:
                    w = self.weight(i, ins)
                    kept = n * k * w.fmt.n_keep // w.fmt.m
                    cell[:] = [w, kept, None]
                w, kept, prep = cell
                if fn:
                    q, s, u = self._i8(i, ins, src, rows)
                    ng = k // w.fmt.group_size
                    if q.shape[1] != k or s.shape[1] != 1 or u is None or u.shape[1] != ng:
                        raise GoldenError(f"instruction {i} ({ins.op.name}): input {Buf(src).name} is "
                                          f"{q.shape[1]} wide with {s.shape[1]} scales and "
                                          f"{'no' if u is None else u.shape[1]} group factors; tensor needs "
                                          f"k_in={k}, one scale, {ng} factors (QUANTG with seg "
                                          f"{w.fmt.group_size})")
                    if prep is None:
                        prep = cell[2] = self._prepared(w)
                    bufs[dst] = native.mpe_float(prep, q, u, s[:, 0], w.shift, acc_bits)
                passes = -(-rows // mm_tokens)
                self._stats.weight_bytes += passes * w.nbytes
                return (rows * kept / macs, passes * align(w.region) / ch_bpc,
                        act_cycles(p, min(rows, mm_tokens), k, w.fmt.group_size), passes)
            return h, (src,), (dst,)
        if op == _EMBED:
            n, k = f.get("n_out", 0), f.get("k_in", 0)
            dst, preg = f.get("dst", 0), f.get("pos_reg", 0)
            ch_bpc = self.ch_bpc

            def h():
                rows = regs[rr] if rr else 1
                w = self.weight(i, ins)
                base = regs[preg]
                if base + rows > self.tokens.size:
                    raise GoldenError(f"instruction {i} (EMBED): token positions {base}..{base + rows - 1} "
                                      f"beyond the token buffer ({self.tokens.size})")
                if fn:
                    toks = self.tokens[base:base + rows]
                    if toks.min(initial=0) < 0 or toks.max(initial=0) >= n:
                        raise GoldenError(f"instruction {i} (EMBED): token id out of range 0..{n - 1}")
                    q, S, M = w.qt
                    g = w.fmt.group_size
                    v = q[toks].astype(np.int64).reshape(rows, k // g, g) * S[toks][..., None]
                    if M is not None:
                        v += M[toks][..., None]
                    bufs[dst] = np.ldexp(v.reshape(rows, k).astype(F32), -w.shift).astype(F32)
                # a row's values lie in one record per group (the records of its channel)
                row_bytes = w.region // (-(-n // p.chains))
                self._stats.weight_bytes += rows * row_bytes
                return 0, rows * row_bytes / ch_bpc
            return h, (_TOK,), (dst,)
        if op == _LD_KV or op == _ST_KV or op == _ST_OUT:
            rb, addr0, preg, pmul = f.get("row_bytes", 0), f.get("addr", 0), f.get("preg", 0), f.get("pmul", 0)
            space, buf = f.get("space", 0), f.get("buf", 0)
            rows0 = f.get("rows", 0)
            bpc = self.ldst_bpc
            if op == _ST_OUT:
                def h():
                    rows = regs[rr] if rr else rows0
                    addr = addr0 + regs[preg] * pmul
                    nbytes = rows * rb
                    if space != _OUT:
                        raise GoldenError(f"instruction {i} (ST_OUT): space must be OUT")
                    if fn:
                        x = self._f32(i, ins, buf, rows)
                        if x.shape[1] * 4 != rb:
                            raise GoldenError(f"instruction {i} (ST_OUT): row_bytes {rb} != {x.shape[1]} x 4")
                        if addr + nbytes > self.out.size:
                            limit = self.plan["max_seq"] * self.plan["out_row_bytes"]
                            if addr + nbytes > limit:
                                raise GoldenError(f"instruction {i} (ST_OUT): address {addr}+{nbytes} beyond "
                                                  "the output region")
                            grown = np.zeros(addr + nbytes, dtype=np.uint8)
                            grown[:self.out.size] = self.out
                            self.out = grown
                        self.out[addr:addr + nbytes] = np.ascontiguousarray(x, dtype="<f4").view(np.uint8).reshape(-1)
                    self._stats.out_bytes += nbytes
                    return 0, nbytes / bpc
                return h, (buf,), (_OUTR,)
            kv_bytes = self.plan["kv_bytes"]

            def common():
                rows = regs[rr] if rr else rows0
                addr = addr0 + regs[preg] * pmul
                nbytes = rows * rb
                if space != _KV:
                    raise GoldenError(f"instruction {i} ({ins.op.name}): space must be KV")
                if addr + nbytes > kv_bytes:
                    raise GoldenError(f"instruction {i} ({ins.op.name}): KV address {addr}+{nbytes} beyond the KV "
                                      f"scale region of {kv_bytes} bytes")
                self._stats.kv_bytes += nbytes
                return rows, addr, nbytes
            if op == _ST_KV:
                def h():
                    rows, addr, nbytes = common()
                    if fn:
                        _, sc, _ = self._i8(i, ins, buf, rows)
                        if 4 * sc.shape[1] != rb:
                            raise GoldenError(f"instruction {i} (ST_KV): row_bytes {rb} is not the {sc.shape[1]} "
                                              f"float32 scales of a row of buffer {Buf(buf).name}")
                        self.kv[addr:addr + nbytes] = np.ascontiguousarray(sc, dtype="<f4").view(np.uint8).reshape(-1)
                    return 0, nbytes / bpc
                return h, (buf,), (("KVS", addr0),)

            def h():
                rows, addr, nbytes = common()
                if rb <= 0 or rb % 4:
                    raise GoldenError(f"instruction {i} (LD_KV): row_bytes {rb} is not whole float32 scales")
                if fn:
                    bufs[buf] = self.kv[addr:addr + nbytes].copy().view("<f4").reshape(rows, rb // 4)
                return 0, nbytes / bpc
            return h, (("KVS", addr0),), (buf,)
        if op == _ST_KT:
            return self._st_kt(i, ins)
        if op == _QK or op == _PV or op == _SOFTMAX:
            return self._attention(i, ins)
        # --- SFU element-wise / reductions
        n = f.get("n", 0)
        src, dst, src2 = f.get("src", 0), f.get("dst", 0), f.get("src2", 0)
        if op == _RMSNORM:
            toff, eps = f.get("table", 0), f.get("imm", 0.0)

            def h():
                rows = regs[rr] if rr else 1
                if fn:
                    x = self._f32(i, ins, src, rows, n)
                    bufs[dst] = native.rmsnorm(x, self._table(i, ins, toff, n), eps, lanes, slots)
                return self._sfu_cost(op, rows, 2 * rows * n / lanes, n)
            return h, (src, _TAB), (dst,)
        if op == _QUANT:
            seg, qmax = f.get("seg", 0) or n, f.get("imm", 0.0)

            def h():
                rows = regs[rr] if rr else 1
                if fn:
                    x = self._f32(i, ins, src, rows, n)
                    if n % seg:
                        raise GoldenError(f"instruction {i} (QUANT): seg {seg} does not divide n {n}")
                    if not 0 <= qmax <= sfu.ACT_MAX:
                        raise GoldenError(f"instruction {i} (QUANT): largest level {qmax} outside 0..{sfu.ACT_MAX}")
                    bufs[dst] = (*native.requantize(x, seg, qmax), None)
                return self._sfu_cost(op, rows, 2 * rows * n / lanes)
            return h, (src,), (dst,)
        if op == _QUANTG:
            grp = f.get("seg", 0)

            def h():
                rows = regs[rr] if rr else 1
                if fn:
                    x = self._f32(i, ins, src, rows, n)
                    if not grp or n <= 0 or n % grp:
                        raise GoldenError(f"instruction {i} (QUANTG): group {grp} does not divide n {n} (n > 0)")
                    q, a, u = native.requantize_groups(x, grp)
                    bufs[dst] = (q, a[:, None], u)
                return self._sfu_cost(op, rows, 2 * rows * n / lanes)
            return h, (src,), (dst,)
        if op == _DEQUANT:
            seg, grouped = f.get("seg", 0), f.get("aux", 0)

            def h():
                rows = regs[rr] if rr else 1
                if fn:
                    q, s, u = self._i8(i, ins, src, rows)
                    held = f"groups of {n // u.shape[1]}" if u is not None else f"segments of {n // s.shape[1]}"
                    if (u is not None) != (grouped == 1) or (seg or n) != (n // (u.shape[1] if u is not None
                                                                                   else s.shape[1])):
                        raise GoldenError(f"instruction {i} (DEQUANT): seg {seg}, aux {grouped} do not describe "
                                          f"buffer {Buf(src).name}, which holds {held}")
                    bufs[dst] = sfu.dequantize(q[:, :n], s, u)
                return self._sfu_cost(op, rows, rows * n / lanes)
            return h, (src,), (dst,)
        if op == _ROPE:
            seg, toff, aux = f.get("seg", 0), f.get("table", 0), f.get("aux_reg", 0)
            pair = 2 * np.arange(seg // 2) if seg > 0 else None

            def h():
                rows = regs[rr] if rr else 1
                if fn:
                    if not seg or seg % 2 or n % seg:
                        raise GoldenError(f"instruction {i} (ROPE): bad head_dim seg={seg} for n={n}")
                    x = self._f32(i, ins, src, rows, n)
                    pos = regs[aux] + np.arange(rows)
                    idx = toff + pos[:, None] * seg + pair[None, :]
                    if idx.max() + 1 >= self.tables.size:
                        raise GoldenError(f"instruction {i} (ROPE): position {pos.max()} beyond the RoPE table")
                    y = sfu.rope(x.reshape(rows, n // seg, seg), self.tables[idx], self.tables[idx + 1])
                    bufs[dst] = y.reshape(rows, n)
                return self._sfu_cost(op, rows, rows * n / lanes)
            return h, (src, _TAB), (dst,)
        if op == _ADD or op == _SILU_MUL:
            kern = np.add if op == _ADD else native.silu_mul

            def h():
                rows = regs[rr] if rr else 1
                if fn:
                    bufs[dst] = kern(self._f32(i, ins, src, rows, n), self._f32(i, ins, src2, rows, n))
                return self._sfu_cost(op, rows, rows * n / lanes)
            return h, (src, src2), (dst,)
        if op == _FILL:
            imm = f.get("imm", 0.0)

            def h():
                rows = regs[rr] if rr else 1
                if fn:
                    bufs[dst] = np.full((rows, n), imm, dtype=F32)
                return self._sfu_cost(op, rows, rows * n / lanes)
            return h, (), (dst,)
        if op == _ARGMAX:
            def h():
                rows = regs[rr] if rr else 1
                if rows <= 0:
                    raise GoldenError(f"instruction {i} (ARGMAX): rows {rows}: no row to scan")
                if fn:
                    x = self._f32(i, ins, src, rows, n)
                    regs[_ARGMAX_REG] = int(sfu.argmax(x[rows - 1]))
                return self._sfu_cost(op, 1, n / lanes)
            return h, (src,), (_REGR,)

        def h():
            raise GoldenError(f"instruction {i}: opcode {ins.op.name} is not executable")
        return h, (), ()
