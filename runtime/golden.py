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
evaluated by :func:`~flightllm.runtime.arith.mpe_accumulate`. Everything else is the
float32 SFU of :mod:`flightllm.runtime.sfu` (the spec of each operation is there).

Timing (the first performance model)
------------------------------------
Each instruction occupies its unit for:

* MV/MM: ``max(ceil(T * kept MACs / params.macs), passes * ceil(weight bytes /
  params.hbm_weight_bytes_per_cycle))``, ``passes = ceil(T / mm_tokens)``;
* QK: ``T * heads * tile * head_dim / macs``; PV (SFU): the same over the valid
  (unmasked) positions only, ``/ sfu_lanes``;
* other SFU ops: elements x passes / ``sfu_lanes`` (RMSNORM and QUANT 2 passes,
  SOFTMAX 3);
* LD/ST: bytes / (``kv_channels`` x one channel's bytes per cycle); EMBED: bytes of
  the records holding the gathered rows / one channel's bytes per cycle;

at least one cycle. An instruction starts when its unit is free and the tokens it
waits for have arrived; the four unit timelines are joined only by the tokens and
by barriers (LOOP, loop back edges, END). A wait on an empty token FIFO (no earlier
instruction signalled it) is a deadlock; tokens left over at a barrier are an
error. A hazard check confirms that the tokens order every buffer access: an
instruction must not start before the last writer (and, for a write, the last
readers) of its buffers have finished.

Execution
---------
A program is prepared once per machine (:meth:`Golden.run` caches it by identity):
every instruction becomes a bound handler with its fields resolved to plain ints,
its token FIFOs and hazard resources precomputed, so issuing costs a few Python
operations plus the numpy work; registers are read at issue time only where a field
names one. Weights are unpacked once per offset (and cached on disk when a cache
directory is given) and prepared once for :func:`~flightllm.runtime.arith.mpe_accumulate`.
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

from ..hw.formats import PackedTensor, WeightFormat, align, region_bytes, unpack_tensor
from ..hw.isa import LOOP_DEPTH, TOKEN_UNITS, UNIT_OF, Buf, Opcode, Reg, Space
from ..hw.params import HwParams
from . import sfu
from .arith import mpe_accumulate, prepare_weights

__all__ = ["GoldenError", "DeadlockError", "RunStats", "Golden", "weight_format", "set_blas_threads"]

F32 = np.float32


class GoldenError(ValueError):
    """A program the golden model cannot execute; names the instruction and field."""


class DeadlockError(GoldenError):
    pass


def set_blas_threads(n: int) -> bool:
    """Limit the OpenBLAS threads numpy uses (no threadpoolctl dependency; best effort).

    The golden model's GEMVs are memory bound and its other numpy work is small:
    extra BLAS threads do not help and spin badly on a shared machine, so the golden
    device runs single-threaded unless ``FLIGHTLLM_BLAS_THREADS`` says otherwise.
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
(_NOP, _END, _LOOP, _SETR, _LD_KV, _EMBED, _ST_KV, _ST_OUT, _MV, _MM, _QK, _RMSNORM, _ROPE, _SOFTMAX,
 _SILU_MUL, _ADD, _QUANT, _DEQUANT, _PV, _ARGMAX, _FILL, _QUANTG) = (o.value for o in (
    Opcode.NOP, Opcode.END, Opcode.LOOP, Opcode.SETR, Opcode.LD_KV, Opcode.EMBED, Opcode.ST_KV, Opcode.ST_OUT,
    Opcode.MV, Opcode.MM, Opcode.QK, Opcode.RMSNORM, Opcode.ROPE, Opcode.SOFTMAX, Opcode.SILU_MUL,
    Opcode.ADD, Opcode.QUANT, Opcode.DEQUANT, Opcode.PV, Opcode.ARGMAX, Opcode.FILL, Opcode.QUANTG))
_KV, _OUT = Space.KV.value, Space.OUT.value
_ARGMAX_REG = Reg.ARGMAX.value
# resources of the hazard check: the on-chip buffers (Buf values) and these pseudo-resources
_NBUF = max(b.value for b in Buf) + 1
_TOK, _TAB, _KVR, _OUTR, _REGR = range(_NBUF, _NBUF + 5)
_PSEUDO = {_TOK: "token buffer", _TAB: "tables", _KVR: "KV HBM", _OUTR: "output HBM", _REGR: "ARGMAX register"}
# instruction kinds of the interpreter loop
_K_OP, _K_SETR, _K_LOOP, _K_END, _K_NOP = range(5)


def _rname(r):
    return _PSEUDO.get(r) or Buf(r).name


class _CI:
    """An instruction prepared for execution (see the module docstring, Execution)."""
    __slots__ = ("op", "f", "kind", "unit", "opv", "waits", "sigs", "reads", "writes", "h", "setr", "loop")

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
        self.reads = self.writes = ()
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
                 functional: bool = True, check_hazards: bool = True, weight_cache=None):
        self.p = params
        self.channels = channels
        self.tables = np.asarray(tables, dtype=F32) if tables is not None else None
        self.plan = dict(plan)
        self.functional = functional
        self.check_hazards = check_hazards
        self.by_offset = {t["offset"]: (n, t) for n, t in (tensors or {}).items()}
        self.has_tensors = tensors is not None
        self.weights = {}
        self.weight_cache = None if weight_cache is None else Path(weight_cache)
        self.regs = [0] * 16                 # plain ints: read at issue time by register fields
        self.tokens = np.zeros(self.plan["max_seq"], dtype=np.int64)
        self.kv = np.zeros(self.plan["kv_bytes"] if functional else 0, dtype=np.uint8)
        self.out = np.zeros(0, dtype=np.uint8)
        self.bufs = {}
        self.ch_bpc = params.hbm_channel_bytes_per_cycle
        self._progs = {}

    # -- host interface -------------------------------------------------------------
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
        w = self.weights.get(off)
        if w is not None:
            return w
        n, k = f.get("n_out", 0), f.get("k_in", 0)
        what = f"instruction {i} ({ins.op.name})"
        fmt = weight_format(f, what)
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
            for c, img in enumerate(self.channels):
                if off + region > len(img):
                    raise GoldenError(f"{what}: tensor at w_off={off} ({fmt.name} {n}x{k}) runs past the end "
                                      f"of weights/ch{c:02d}.bin")
                data.append(img[off:off + region])
            qt = unpack_tensor(PackedTensor(fmt, (n, k), w.shift, self.p.chains, self.p.chain_len, data))
            _, S, M = qt.fixed(w.shift)
            w.qt = (qt.q, S, M)
            if cached is not None:
                _save_npz(cached, q=qt.q, S=S, **({"M": M} if M is not None else {}))
        self.weights[off] = w
        return w

    def _prepared(self, w: _Weight):
        if w.wg is None:
            q, S, M = w.qt
            w.wg = prepare_weights(q, S, M, w.fmt.group_size, self.p.act_factor_bits)
        return w.wg

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
    def _prepare(self, prog):
        """The prepared form of ``prog`` for this machine (cached by identity)."""
        hit = self._progs.get(id(prog))
        if hit is not None and hit[0] is prog:
            return hit[1]
        out = []
        for i, ins in enumerate(prog):
            ci = _CI(ins)
            if ci.kind == _K_OP:
                ci.h, ci.reads, ci.writes = self._handler(i, ci)
            out.append(ci)
        if len(self._progs) > 16:
            self._progs.clear()
        self._progs[id(prog)] = (prog, out)
        return out

    def run(self, prog, regs: dict | None = None) -> RunStats:
        """Run ``prog`` from the start with the given host registers; returns timing stats."""
        for k, v in (regs or {}).items():
            self.regs[Reg[k].value if isinstance(k, str) else int(k)] = int(v)
        self.regs[0] = 0
        st = RunStats()
        self._stats = st
        self._free = [0] * _NU
        self._fifo = [deque() for _ in range(_NU * _NU)]
        nres = _NBUF + len(_PSEUDO)
        self._wend, self._rend = [0] * nres, [0] * nres
        self._busy = [0] * _NU
        nop = max(o.value for o in Opcode) + 1
        self._opc, self._opn = [0] * nop, [0] * nop
        self._prog = self._prepare(prog)
        try:
            ended = self._exec(0, len(prog), 0)
        finally:
            for u in range(_NU):
                st.busy[_UNAMES[u]] += self._busy[u]
            for o in Opcode:
                if self._opn[o.value]:
                    st.op_cycles[o.name] = self._opc[o.value]
                    st.op_count[o.name] = self._opn[o.value]
            st.instructions = sum(self._opn)
        if not ended:
            raise GoldenError("program ran past its last instruction without END")
        st.cycles = max(self._free)
        return st

    def _barrier(self, where):
        free = self._free
        free[:] = [max(free)] * _NU
        for idx, q in enumerate(self._fifo):
            if q:
                a, b = divmod(idx, _NU)
                raise DeadlockError(f"{where}: {len(q)} token(s) from {_UNAMES[a]} to {_UNAMES[b]} never "
                                    "consumed before a barrier (unbalanced wait/signal)")

    def _exec(self, lo, hi, depth):
        prog, regs = self._prog, self.regs
        free, fifo, busy, opc, opn = self._free, self._fifo, self._busy, self._opc, self._opn
        wend, rend = self._wend, self._rend
        hz = self.check_hazards
        ceil = math.ceil
        pc = lo
        while pc < hi:
            ci = prog[pc]
            kind = ci.kind
            if kind == _K_OP:
                u = ci.unit
                start = free[u]
                for qi, pu in ci.waits:
                    q = fifo[qi]
                    if not q:
                        raise DeadlockError(f"instruction {pc} ({ci.op.name}) waits for a token from "
                                            f"{_UNAMES[pu]} that no earlier instruction signalled (deadlock)")
                    t = q.popleft()
                    if t > start:
                        start = t
                cycles = ceil(ci.h())
                if cycles < 1:
                    cycles = 1
                end = start + cycles
                if hz:
                    for r in ci.reads:
                        if wend[r] > start:
                            raise GoldenError(f"instruction {pc} ({ci.op.name}) reads {_rname(r)} at cycle {start} "
                                              f"before its writer finishes at {wend[r]} (missing dependency token)")
                    for w in ci.writes:
                        t = wend[w] if wend[w] > rend[w] else rend[w]
                        if t > start:
                            raise GoldenError(f"instruction {pc} ({ci.op.name}) writes {_rname(w)} at cycle "
                                              f"{start} before earlier accesses finish at {t} (missing "
                                              "dependency token)")
                    for r in ci.reads:
                        if rend[r] < end:
                            rend[r] = end
                    for w in ci.writes:
                        wend[w] = end
                free[u] = end
                for qi in ci.sigs:
                    fifo[qi].append(end)
                busy[u] += cycles
                opc[ci.opv] += cycles
                opn[ci.opv] += 1
            elif kind == _K_SETR:
                rb, ra, mul, add, lim, rd = ci.setr
                v = regs[rb] + regs[ra] * mul + add
                v = min(v & 0xFFFFFFFF, lim)
                if rd:
                    regs[rd] = v
            elif kind == _K_LOOP:
                body, ra, add, shr, idx = ci.loop
                if pc + 1 + body > hi:
                    raise GoldenError(f"instruction {pc} (LOOP): body of {body} runs past its enclosing block")
                if depth >= LOOP_DEPTH:
                    raise GoldenError(f"instruction {pc} (LOOP): nesting deeper than the loop stack ({LOOP_DEPTH})")
                self._barrier(f"instruction {pc} (LOOP)")
                trips = max(0, regs[ra] + add) >> shr
                for j in range(trips):
                    if idx:
                        regs[idx] = j
                    if self._exec(pc + 1, pc + 1 + body, depth + 1):
                        return True
                    self._barrier(f"instruction {pc} (LOOP back edge)")
                pc += 1 + body
                continue
            elif kind == _K_END:
                self._barrier(f"instruction {pc} (END)")
                return True
            pc += 1
        return False

    # -- operations: a handler () -> cycles per instruction, with its reads and writes --
    def _handler(self, i, ins):
        op, f, p, regs = ins.opv, ins.f, self.p, self.regs
        fn = self.functional
        bufs = self.bufs
        rr = f.get("rows_reg", 0)
        lanes = p.sfu_lanes
        if op == _MV or op == _MM:
            mv = op == _MV
            src, dst = f.get("src", 0), f.get("dst", 0)
            n, k = f.get("n_out", 0), f.get("k_in", 0)
            acc_bits, mm_tokens, macs, hbm = p.acc_bits, p.mm_tokens, p.macs, p.hbm_weight_bytes_per_cycle
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
                    acc = mpe_accumulate(prep, q, u, acc_bits)
                    bufs[dst] = sfu.mpe_to_float(acc.reshape(rows, n), s[:, 0], w.shift)
                passes = -(-rows // mm_tokens)
                self._stats.weight_bytes += passes * w.nbytes
                return max(rows * kept / macs, passes * w.nbytes / hbm)
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
                return rows * row_bytes / ch_bpc
            return h, (_TOK,), (dst,)
        if op == _LD_KV or op == _ST_KV or op == _ST_OUT:
            rb, addr0, preg, pmul = f.get("row_bytes", 0), f.get("addr", 0), f.get("preg", 0), f.get("pmul", 0)
            space, buf = f.get("space", 0), f.get("buf", 0)
            rows0 = f.get("rows", 0)
            bpc = self.ch_bpc * p.kv_channels
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
                    return nbytes / bpc
                return h, (buf,), (_OUTR,)
            kv_bytes, kv_heads = self.plan["kv_bytes"], self.plan["kv_heads"]

            def common():
                rows = regs[rr] if rr else rows0
                addr = addr0 + regs[preg] * pmul
                nbytes = rows * rb
                if space != _KV:
                    raise GoldenError(f"instruction {i} ({ins.op.name}): space must be KV")
                if addr + nbytes > kv_bytes:
                    raise GoldenError(f"instruction {i} ({ins.op.name}): KV address {addr}+{nbytes} beyond the KV "
                                      f"region of {kv_bytes} bytes")
                self._stats.kv_bytes += nbytes
                return rows, addr, nbytes
            if op == _ST_KV:
                def h():
                    rows, addr, nbytes = common()
                    if fn:
                        q, s, _ = self._i8(i, ins, buf, rows)
                        if q.shape[1] + 4 * s.shape[1] != rb:
                            raise GoldenError(f"instruction {i} (ST_KV): row_bytes {rb} does not match buffer "
                                              f"{Buf(buf).name} ({q.shape[1]} values + {s.shape[1]} scales)")
                        dst = self.kv[addr:addr + nbytes].reshape(rows, rb)
                        dst[:, :q.shape[1]] = q.view(np.uint8)
                        dst[:, q.shape[1]:] = np.ascontiguousarray(s, dtype="<f4").view(np.uint8)
                    return nbytes / bpc
                return h, (buf,), (_KVR,)

            def h():
                rows, addr, nbytes = common()
                if fn:
                    vals = rb - 4 * kv_heads
                    raw = self.kv[addr:addr + nbytes].reshape(rows, rb)
                    bufs[buf] = (raw[:, :vals].copy().view(np.int8), raw[:, vals:].copy().view("<f4"), None)
                return nbytes / bpc
            return h, (_KVR,), (buf,)
        if op == _QK or op == _PV:
            hh, kvh, hd, tile = f.get("heads", 0), f.get("kv_heads", 0), f.get("head_dim", 0), f.get("tile", 0)
            preg, pmul = f.get("preg", 0), f.get("pmul", 0)
            src, kvb, dst = f.get("src", 0), f.get("kv", 0), f.get("dst", 0)
            macs = p.macs
            if op == _QK:
                scale = f.get("scale", 0.0)

                def h():
                    rows = regs[rr] if rr else 1
                    if fn:
                        off = regs[preg] * pmul
                        q, qs, _ = self._i8(i, ins, src, rows)
                        k, ks, _ = self._i8(i, ins, kvb, tile)
                        sc = sfu.qk_scores(q.reshape(rows, hh, hd), qs, k.reshape(tile, kvh, hd), ks, scale)
                        S = self._scores(dst, rows, hh)
                        if off + tile > S.shape[2]:
                            raise GoldenError(f"instruction {i} (QK): tile at {off} beyond the score buffer "
                                              f"({S.shape[2]})")
                        S[:, :, off:off + tile] = sc
                    return rows * hh * tile * hd / macs
                return h, (src, kvb), (dst,)
            len_reg, len_add = f.get("len_reg", 0), f.get("len_add", 0)

            def h():
                rows = regs[rr] if rr else 1
                off = regs[preg] * pmul
                first = regs[len_reg] + len_add - off            # valid positions of row 0 in this tile
                if fn:
                    S = self._scores(src, rows, hh, create=False, i=i, ins=ins)
                    v, vs, _ = self._i8(i, ins, kvb, tile)
                    a = self._f32(i, ins, dst, rows, hh * hd)
                    valid = first + np.arange(rows)
                    out = sfu.pv_accumulate(a.reshape(rows, hh, hd), S[:, :, off:off + tile],
                                            v.reshape(tile, kvh, hd), vs, valid)
                    bufs[dst] = out.reshape(rows, hh * hd)
                used = sum(min(max(first + t, 0), tile) for t in range(rows))
                return used * hh * hd / lanes
            return h, (src, kvb, dst), (dst,)
        # --- SFU element-wise / reductions
        n = f.get("n", 0)
        src, dst, src2 = f.get("src", 0), f.get("dst", 0), f.get("src2", 0)
        if op == _RMSNORM:
            toff, eps = f.get("table", 0), f.get("imm", 0.0)

            def h():
                rows = regs[rr] if rr else 1
                if fn:
                    x = self._f32(i, ins, src, rows, n)
                    bufs[dst] = sfu.rmsnorm(x, self._table(i, ins, toff, n), eps, lanes)
                return 2 * rows * n / lanes
            return h, (src, _TAB), (dst,)
        if op == _QUANT:
            seg = f.get("seg", 0) or n

            def h():
                rows = regs[rr] if rr else 1
                if fn:
                    x = self._f32(i, ins, src, rows, n)
                    if n % seg:
                        raise GoldenError(f"instruction {i} (QUANT): seg {seg} does not divide n {n}")
                    bufs[dst] = (*sfu.requantize(x, seg), None)
                return 2 * rows * n / lanes
            return h, (src,), (dst,)
        if op == _QUANTG:
            grp = f.get("seg", 0)

            def h():
                rows = regs[rr] if rr else 1
                if fn:
                    x = self._f32(i, ins, src, rows, n)
                    if not grp or n % grp:
                        raise GoldenError(f"instruction {i} (QUANTG): group {grp} does not divide n {n}")
                    q, a, u = sfu.requantize_groups(x, grp)
                    bufs[dst] = (q, a[:, None], u)
                return 2 * rows * n / lanes
            return h, (src,), (dst,)
        if op == _DEQUANT:
            def h():
                rows = regs[rr] if rr else 1
                if fn:
                    q, s, u = self._i8(i, ins, src, rows)
                    bufs[dst] = sfu.dequantize(q[:, :n], s, u)
                return rows * n / lanes
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
                return rows * n / lanes
            return h, (src, _TAB), (dst,)
        if op == _SOFTMAX:
            stride, aux, aux_add = f.get("imm", 0), f.get("aux_reg", 0), f.get("aux", 0)

            def h():
                rows = regs[rr] if rr else 1
                v0 = regs[aux] + aux_add
                vmax = max(v0 + rows - 1, 0) if rows > 0 else 0
                if fn:
                    valid = v0 + np.arange(rows)
                    S = self._scores(src, rows, n, create=False, i=i, ins=ins)
                    if vmax > S.shape[2] or (stride and vmax > stride):
                        raise GoldenError(f"instruction {i} (SOFTMAX): length {vmax} beyond the score buffer")
                    S[:, :, :vmax] = sfu.softmax_rows(S[:, :, :vmax], np.broadcast_to(valid[:, None], (rows, n)),
                                                      lanes)
                return 3 * n * (rows * v0 + rows * (rows - 1) // 2) / lanes
            return h, (src,), (dst,)
        if op == _ADD or op == _SILU_MUL:
            kern = np.add if op == _ADD else sfu.silu_mul

            def h():
                rows = regs[rr] if rr else 1
                if fn:
                    bufs[dst] = kern(self._f32(i, ins, src, rows, n), self._f32(i, ins, src2, rows, n))
                return rows * n / lanes
            return h, (src, src2), (dst,)
        if op == _FILL:
            imm = f.get("imm", 0.0)

            def h():
                rows = regs[rr] if rr else 1
                if fn:
                    bufs[dst] = np.full((rows, n), imm, dtype=F32)
                return rows * n / lanes
            return h, (), (dst,)
        if op == _ARGMAX:
            def h():
                rows = regs[rr] if rr else 1
                if fn:
                    x = self._f32(i, ins, src, rows, n)
                    regs[_ARGMAX_REG] = int(sfu.argmax(x[rows - 1]))
                return n / lanes
            return h, (src,), (_REGR,)

        def h():
            raise GoldenError(f"instruction {i}: opcode {ins.op.name} is not executable")
        return h, (), ()
