"""The golden model: a bit-exact interpreter of flightllm instruction programs.

Memory model
------------
* **Weight HBM** is the artifact's channel images (``weights/chNN.bin``) exactly as
  written: an MV/MM/EMBED names its tensor by the byte offset ``w_off`` (the same in
  every channel), its shape, format (bits, n_keep, m) and shift; the golden model
  reads the payload and scale regions from those bytes and unpacks them with
  :func:`flightllm.hw.formats.unpack_tensor` (the scale region starts at the next
  64-byte boundary after the payload). Unpacked, prepared weights are cached per
  offset.
* **KV HBM** (space ``KV``) and the **output region** (space ``OUT``) are byte arrays;
  LD/ST move rows of bytes in the layout of :mod:`flightllm.compiler.schedule`.
* **SFU tables** are ``tables.bin`` as float32 (norm weights, RoPE cos/sin).
* **Token buffer**: one int32 token id per sequence position, written by the host.
* **On-chip buffers** (:class:`~flightllm.hw.isa.Buf`): float32 rows, or int8 rows
  with one float32 scale per segment.

Arithmetic
----------
MPE: exactly :mod:`flightllm.runtime.arith` (INT8 activations x INT8-widened
weights, int32 per quant group, x uint16 scale, wrapping int48), evaluated by the
exact fast path :func:`~flightllm.runtime.arith.mpe_matmul`. Everything else is the
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
  the gathered rows / one channel's bytes per cycle;

at least one cycle. An instruction starts when its unit is free and the tokens it
waits for have arrived; the four unit timelines are joined only by the tokens and
by barriers (LOOP, loop back edges, END). A wait on an empty token FIFO (no earlier
instruction signalled it) is a deadlock; tokens left over at a barrier are an
error. A hazard check confirms that the tokens order every buffer access: an
instruction must not start before the last writer (and, for a write, the last
readers) of its buffers have finished.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..hw.formats import ALIGN, PackedTensor, WeightFormat, unpack_tensor
from amaranth.lib import enum

from ..hw.isa import LOOP_DEPTH, TOKEN_UNITS, UNIT_OF, Buf, Opcode, Reg, Space
from ..hw.params import HwParams
from . import sfu
from .arith import mpe_matmul, prepare_weights, wrap_signed

__all__ = ["GoldenError", "DeadlockError", "RunStats", "Golden", "weight_region"]

F32 = np.float32



def _ri(v) -> int:
    """A register field (enum member or int) as an int."""
    return v.value if hasattr(v, "value") else int(v)

class GoldenError(ValueError):
    """A program the golden model cannot execute; names the instruction and field."""


class DeadlockError(GoldenError):
    pass


def _align(n):
    return -(-n // ALIGN) * ALIGN


def set_blas_threads(n: int) -> bool:
    """Limit the OpenBLAS threads numpy uses (no threadpoolctl dependency; best effort).

    The golden model's GEMMs are many small per-quant-group products: extra BLAS
    threads do not help them and spin badly on a shared machine, so the golden device
    runs single-threaded unless ``FLIGHTLLM_BLAS_THREADS`` says otherwise.
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


def mpe_matmul_fast(wg: np.ndarray, scales: np.ndarray, x: np.ndarray, acc_bits: int = 48) -> np.ndarray:
    """:func:`flightllm.runtime.arith.mpe_matmul` with the activation operand made contiguous
    first, so numpy's stacked matmul uses BLAS (~7x faster for MM). Same exact result
    (tests/test_golden.py checks it against ``mpe_matmul``); TODO(arith owner): fold the
    ``ascontiguousarray`` into ``mpe_matmul`` and drop this."""
    ng, n, g = wg.shape
    if ng > 1 << 13:
        return mpe_matmul(wg, scales, x, acc_bits)
    single = x.ndim == 1
    xt = np.ascontiguousarray(np.asarray(x, dtype=np.float32).reshape(-1, ng, g).transpose(1, 2, 0))
    ps = np.matmul(wg, xt)                                                   # (ng, N, T), exact
    acc = np.einsum("gnt,ng->tn", ps.astype(np.float64), scales.astype(np.float64))   # exact < 2**53
    out = wrap_signed(acc.astype(np.int64), acc_bits)
    return out[0] if single else out


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


def weight_region(params: HwParams, fmt: WeightFormat, n: int, k: int):
    """(payload bytes, scale bytes) one channel holds for an (n, k) tensor of ``fmt``."""
    blocks = -(-n // params.chains) * (k // fmt.group_size) * (params.chains // params.weight_channels)
    return blocks * fmt.block_bytes, blocks * 2


_NU = len(TOKEN_UNITS)
_UNAMES = [u.name for u in TOKEN_UNITS]
(_NOP, _END, _LOOP, _SETR, _LD_KV, _EMBED, _ST_KV, _ST_OUT, _MV, _MM, _QK, _RMSNORM, _ROPE, _SOFTMAX,
 _SILU_MUL, _ADD, _QUANT, _DEQUANT, _PV, _ARGMAX, _FILL) = (o.value for o in (
    Opcode.NOP, Opcode.END, Opcode.LOOP, Opcode.SETR, Opcode.LD_KV, Opcode.EMBED, Opcode.ST_KV, Opcode.ST_OUT,
    Opcode.MV, Opcode.MM, Opcode.QK, Opcode.RMSNORM, Opcode.ROPE, Opcode.SOFTMAX, Opcode.SILU_MUL,
    Opcode.ADD, Opcode.QUANT, Opcode.DEQUANT, Opcode.PV, Opcode.ARGMAX, Opcode.FILL))
_KV, _OUT = Space.KV.value, Space.OUT.value
_ARGMAX_REG = Reg.ARGMAX.value
# pseudo-resources of the hazard check besides the on-chip buffers (ints 0..31)
_TOK, _TAB, _KVR, _OUTR, _REGR = "token buffer", "tables", "KV HBM", "output HBM", "ARGMAX register"


def _rname(r):
    return Buf(r).name if isinstance(r, int) else r


class _CI:
    """An instruction prepared for execution: plain-int fields (enums resolved once)."""
    __slots__ = ("op", "opv", "unit", "wait", "signal", "f", "name")

    def __init__(self, ins):
        self.op = ins.op
        self.opv = ins.op.value
        self.unit = UNIT_OF[ins.op].value
        self.f = {k: (v.value if isinstance(v, enum.Enum) else v) for k, v in ins.f.items()}
        self.wait = self.f.get("wait", 0)
        self.signal = self.f.get("signal", 0)
        self.name = None


_CACHE = {}


def _compiled(prog):
    key = id(prog)
    hit = _CACHE.get(key)
    if hit is not None and hit[0] is prog:
        return hit[1]
    out = [_CI(i) for i in prog]
    if len(_CACHE) > 64:
        _CACHE.clear()
    _CACHE[key] = (prog, out)
    return out


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
    __slots__ = ("q", "scales", "shift", "fmt", "wg", "nbytes")


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
        self.regs = np.zeros(16, dtype=np.int64)
        self.tokens = np.zeros(self.plan["max_seq"], dtype=np.int64)
        self.kv = np.zeros(self.plan["kv_bytes"] if functional else 0, dtype=np.uint8)
        self.out = np.zeros(0, dtype=np.uint8)
        self.bufs = {}
        ch = min(params.hbm_channel_gbps * 1e9 / (params.clock_mhz * 1e6), params.hbm_port_bits / 8)
        self.ch_bpc = ch

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
        try:
            fmt = WeightFormat(f.get("bits", 0), f.get("n_keep", 0), f.get("m", 0), self.p.group_size)
        except ValueError as e:
            raise GoldenError(f"instruction {i} ({ins.op.name}): bad weight format fields: {e}") from None
        if n <= 0 or k <= 0 or k % fmt.group_size:
            raise GoldenError(f"instruction {i} ({ins.op.name}): bad shape n_out={n} k_in={k}")
        if self.has_tensors:
            hit = self.by_offset.get(off)
            if hit is None:
                raise GoldenError(f"instruction {i} ({ins.op.name}): no tensor at w_off={off}")
            name, t = hit
            if (list(t["shape"]) != [n, k] or t["format"] != fmt.name or t["shift"] != f.get("shift", 0)
                    or t["group_size"] != fmt.group_size):
                raise GoldenError(f"instruction {i} ({ins.op.name}): fields (shape {n}x{k}, {fmt.name}, "
                                  f"shift {f.get('shift', 0)}) do not match tensor {name!r} at w_off={off}")
        pay, sc = weight_region(self.p, fmt, n, k)
        w = _Weight()
        w.fmt, w.shift = fmt, f.get("shift", 0)
        w.nbytes = (_align(pay) + _align(sc)) * self.p.weight_channels
        w.q = w.scales = w.wg = None
        cached = self.weight_cache / f"w{off}-{fmt.name}-{n}x{k}.npz" if self.weight_cache else None
        if self.functional and cached is not None and cached.is_file():
            with np.load(cached) as z:
                w.q, w.scales = z["q"], z["scales"]
        elif self.functional:
            soff = off + _align(pay)
            payload, scales = [], []
            for c, img in enumerate(self.channels):
                if soff + sc > len(img):
                    raise GoldenError(f"instruction {i} ({ins.op.name}): tensor at w_off={off} "
                                      f"({fmt.name} {n}x{k}) runs past the end of weights/ch{c:02d}.bin")
                payload.append(img[off:off + pay])
                scales.append(img[soff:soff + sc])
            q, s, _ = unpack_tensor(PackedTensor(fmt, (n, k), w.shift, self.p.chains, payload, scales))
            w.q, w.scales = q, s
            if cached is not None:
                _save_npz(cached, q=q, scales=s)
        self.weights[off] = w
        return w

    def _prepared(self, w: _Weight):
        if w.wg is None:
            w.wg = prepare_weights(w.q, w.fmt.group_size)
        return w.wg

    # -- buffers -----------------------------------------------------------------
    def _f32(self, i, ins, b, rows, n=None):
        v = self.bufs.get(b)
        if v is None or isinstance(v, tuple):
            raise GoldenError(f"instruction {i} ({ins.op.name}): buffer {Buf(b).name} holds no float32 data")
        if v.shape[0] < rows or (n is not None and v.shape[1] < n):
            raise GoldenError(f"instruction {i} ({ins.op.name}): buffer {Buf(b).name} is {v.shape}, "
                              f"needs {rows} x {n}")
        return v[:rows] if n is None else v[:rows, :n]

    def _i8(self, i, ins, b, rows):
        v = self.bufs.get(b)
        if not isinstance(v, tuple):
            raise GoldenError(f"instruction {i} ({ins.op.name}): buffer {Buf(b).name} holds no int8 data")
        if v[0].shape[0] < rows:
            raise GoldenError(f"instruction {i} ({ins.op.name}): buffer {Buf(b).name} has {v[0].shape[0]} "
                              f"rows, needs {rows}")
        return v[0][:rows], v[1][:rows]

    # -- execution ---------------------------------------------------------------
    def run(self, prog, regs: dict | None = None) -> RunStats:
        """Run ``prog`` from the start with the given host registers; returns timing stats."""
        for k, v in (regs or {}).items():
            self.regs[Reg[k].value if isinstance(k, str) else int(k)] = int(v)
        self.regs[0] = 0
        st = RunStats()
        self._free = [0] * _NU
        self._fifo = [deque() for _ in range(_NU * _NU)]
        self._wend, self._rend = {}, {}
        self._stats = st
        self._busy = [0] * _NU
        self._prog = _compiled(prog)
        try:
            ended = self._exec(0, len(prog), 0)
        finally:
            for u in range(_NU):
                st.busy[_UNAMES[u]] += self._busy[u]
        if not ended:
            raise GoldenError("program ran past its last instruction without END")
        st.cycles = max(self._free)
        return st

    def _barrier(self, where):
        t = max(self._free)
        self._free = [t] * _NU
        for idx, q in enumerate(self._fifo):
            if q:
                a, b = divmod(idx, _NU)
                raise DeadlockError(f"{where}: {len(q)} token(s) from {_UNAMES[a]} to {_UNAMES[b]} never "
                                    "consumed before a barrier (unbalanced wait/signal)")

    def _exec(self, lo, hi, depth):
        prog, pc, regs = self._prog, lo, self.regs
        while pc < hi:
            ins = prog[pc]
            op, f = ins.opv, ins.f
            if op == _END:
                self._barrier(f"instruction {pc} (END)")
                return True
            if op == _LOOP:
                body = f.get("body", 0)
                if pc + 1 + body > hi:
                    raise GoldenError(f"instruction {pc} (LOOP): body of {body} runs past its enclosing block")
                if depth >= LOOP_DEPTH:
                    raise GoldenError(f"instruction {pc} (LOOP): nesting deeper than the loop stack ({LOOP_DEPTH})")
                self._barrier(f"instruction {pc} (LOOP)")
                trips = max(0, int(regs[f.get("ra", 0)]) + f.get("add", 0)) >> f.get("shr", 0)
                idx = f.get("rd", 0)
                for j in range(trips):
                    if idx:
                        regs[idx] = j
                    if self._exec(pc + 1, pc + 1 + body, depth + 1):
                        return True
                    self._barrier(f"instruction {pc} (LOOP back edge)")
                pc += 1 + body
                continue
            if op == _SETR:
                v = int(regs[f.get("rb", 0)]) + int(regs[f.get("ra", 0)]) * f.get("mul", 0) + f.get("add", 0)
                v = min(v & 0xFFFFFFFF, f.get("lim", 0))
                if f.get("rd", 0):
                    regs[f["rd"]] = v
            elif op != _NOP:
                self._issue(pc, ins)
            pc += 1
        return False

    def _issue(self, i, ins):
        u = ins.unit
        start = self._free[u]
        wait = ins.wait
        if wait:
            for pu in range(_NU):
                if wait >> pu & 1:
                    q = self._fifo[pu * _NU + u]
                    if not q:
                        raise DeadlockError(f"instruction {i} ({ins.op.name}) waits for a token from "
                                            f"{_UNAMES[pu]} that no earlier instruction signalled (deadlock)")
                    t = q.popleft()
                    if t > start:
                        start = t
        cycles, reads, writes = self._do(i, ins)
        cycles = max(1, int(math.ceil(cycles)))
        if self.check_hazards:
            wend, rend = self._wend, self._rend
            for r in reads:
                if wend.get(r, 0) > start:
                    raise GoldenError(f"instruction {i} ({ins.op.name}) reads {_rname(r)} at cycle {start} "
                                      f"before its writer finishes at {wend[r]} (missing dependency token)")
            for w in writes:
                t = max(wend.get(w, 0), rend.get(w, 0))
                if t > start:
                    raise GoldenError(f"instruction {i} ({ins.op.name}) writes {_rname(w)} at cycle {start} "
                                      f"before earlier accesses finish at {t} (missing dependency token)")
            end = start + cycles
            for r in reads:
                if rend.get(r, 0) < end:
                    rend[r] = end
            for w in writes:
                wend[w] = end
        end = start + cycles
        self._free[u] = end
        sig = ins.signal
        if sig:
            for cu in range(_NU):
                if sig >> cu & 1:
                    self._fifo[u * _NU + cu].append(end)
        self._busy[u] += cycles
        st = self._stats
        name = ins.op.name if ins.name is None else ins.name
        st.op_cycles[name] = st.op_cycles.get(name, 0) + cycles
        st.op_count[name] = st.op_count.get(name, 0) + 1
        st.instructions += 1

    # -- operations: return (cycles, reads, writes) --------------------------------
    def _do(self, i, ins):
        op, f, p, regs = ins.opv, ins.f, self.p, self.regs
        fn = self.functional
        rr = f.get("rows_reg", 0)
        rows = int(regs[rr]) if rr else 1
        if op == _MV or op == _MM:
            if op == _MV and rows != 1:
                raise GoldenError(f"instruction {i} (MV): rows_reg gives {rows} rows, MV takes 1")
            w = self.weight(i, ins)
            n, k = f["n_out"], f["k_in"]
            src, dst = f.get("src", 0), f.get("dst", 0)
            if fn:
                q, s = self._i8(i, ins, src, rows)
                if q.shape[1] != k or s.shape[1] != 1:
                    raise GoldenError(f"instruction {i} ({ins.op.name}): input {Buf(src).name} is {q.shape[1]} "
                                      f"wide with {s.shape[1]} scales, tensor needs k_in={k}, one scale")
                acc = mpe_matmul_fast(self._prepared(w), w.scales, q, p.acc_bits)
                self.bufs[dst] = sfu.mpe_to_float(acc.reshape(rows, n), s[:, 0], w.shift)
            kept = n * k * w.fmt.n_keep // w.fmt.m
            passes = -(-rows // p.mm_tokens)
            self._stats.weight_bytes += passes * w.nbytes
            cyc = max(rows * kept / p.macs, passes * w.nbytes / p.hbm_weight_bytes_per_cycle)
            return cyc, (src,), (dst,)
        if op == _EMBED:
            w = self.weight(i, ins)
            n, k = f["n_out"], f["k_in"]
            dst = f.get("dst", 0)
            base = int(regs[f.get("pos_reg", 0)])
            if base + rows > self.tokens.size:
                raise GoldenError(f"instruction {i} (EMBED): token positions {base}..{base + rows - 1} "
                                  f"beyond the token buffer ({self.tokens.size})")
            if fn:
                toks = self.tokens[base:base + rows]
                if toks.min(initial=0) < 0 or toks.max(initial=0) >= n:
                    raise GoldenError(f"instruction {i} (EMBED): token id out of range 0..{n - 1}")
                g = w.fmt.group_size
                sc = np.ldexp(w.scales[toks].astype(F32), -w.shift).astype(F32)
                self.bufs[dst] = (w.q[toks].astype(F32).reshape(rows, k // g, g) * sc[..., None]).reshape(rows, k)
            row_bytes = k // w.fmt.group_size * (w.fmt.block_bytes + 2)
            self._stats.weight_bytes += rows * row_bytes
            return rows * row_bytes / self.ch_bpc, (_TOK,), (dst,)
        if op == _LD_KV or op == _ST_KV or op == _ST_OUT:
            if not rr:
                rows = f.get("rows", 0)
            rb = f.get("row_bytes", 0)
            addr = f.get("addr", 0) + int(regs[f.get("preg", 0)]) * f.get("pmul", 0)
            nbytes = rows * rb
            space = f.get("space", 0)
            buf = f.get("buf", 0)
            if op == _ST_OUT:
                if space != _OUT:
                    raise GoldenError(f"instruction {i} (ST_OUT): space must be OUT")
                if fn:
                    x = self._f32(i, ins, buf, rows)
                    if x.shape[1] * 4 != rb:
                        raise GoldenError(f"instruction {i} (ST_OUT): row_bytes {rb} != {x.shape[1]} x 4")
                    if addr + nbytes > self.out.size:
                        limit = self.plan["max_seq"] * self.plan["out_row_bytes"]
                        if addr + nbytes > limit:
                            raise GoldenError(f"instruction {i} (ST_OUT): address {addr}+{nbytes} beyond the "
                                              "output region")
                        grown = np.zeros(addr + nbytes, dtype=np.uint8)
                        grown[:self.out.size] = self.out
                        self.out = grown
                    self.out[addr:addr + nbytes] = np.ascontiguousarray(x, dtype="<f4").view(np.uint8).reshape(-1)
                self._stats.out_bytes += nbytes
                return nbytes / (self.ch_bpc * p.kv_channels), (buf,), (_OUTR,)
            if space != _KV:
                raise GoldenError(f"instruction {i} ({ins.op.name}): space must be KV")
            if addr + nbytes > self.plan["kv_bytes"]:
                raise GoldenError(f"instruction {i} ({ins.op.name}): KV address {addr}+{nbytes} beyond the KV "
                                  f"region of {self.plan['kv_bytes']} bytes")
            self._stats.kv_bytes += nbytes
            cyc = nbytes / (self.ch_bpc * p.kv_channels)
            if op == _ST_KV:
                if fn:
                    q, s = self._i8(i, ins, buf, rows)
                    if q.shape[1] + 4 * s.shape[1] != rb:
                        raise GoldenError(f"instruction {i} (ST_KV): row_bytes {rb} does not match buffer "
                                          f"{Buf(buf).name} ({q.shape[1]} values + {s.shape[1]} scales)")
                    raw = np.concatenate([np.ascontiguousarray(q).view(np.uint8),
                                          np.ascontiguousarray(s, dtype="<f4").view(np.uint8)], axis=1)
                    self.kv[addr:addr + nbytes] = raw.reshape(-1)
                return cyc, (buf,), (_KVR,)
            if fn:
                vals = rb - 4 * self.plan["kv_heads"]
                raw = self.kv[addr:addr + nbytes].reshape(rows, rb)
                self.bufs[buf] = (raw[:, :vals].copy().view(np.int8), raw[:, vals:].copy().view("<f4"))
            return cyc, (_KVR,), (buf,)
        if op == _QK or op == _PV:
            h, kvh, hd, tile = f["heads"], f["kv_heads"], f["head_dim"], f["tile"]
            off = int(regs[f.get("preg", 0)]) * f.get("pmul", 0)
            src, kvb, dst = f.get("src", 0), f.get("kv", 0), f.get("dst", 0)
            if op == _QK:
                if fn:
                    q, qs = self._i8(i, ins, src, rows)
                    k, ks = self._i8(i, ins, kvb, tile)
                    sc = sfu.qk_scores(q.reshape(rows, h, hd), qs, k.reshape(tile, kvh, hd), ks, f.get("scale", 0.0))
                    S = self._scores(dst, rows, h)
                    if off + tile > S.shape[2]:
                        raise GoldenError(f"instruction {i} (QK): tile at {off} beyond the score buffer ({S.shape[2]})")
                    S[:, :, off:off + tile] = sc
                return rows * h * tile * hd / p.macs, (src, kvb), (dst,)
            if fn:
                S = self._scores(src, rows, h, create=False, i=i, ins=ins)
                v, vs = self._i8(i, ins, kvb, tile)
                a = self._f32(i, ins, dst, rows, h * hd)
                valid = int(regs[f.get("len_reg", 0)]) + f.get("len_add", 0) + np.arange(rows) - off
                out = sfu.pv_accumulate(a.reshape(rows, h, hd), S[:, :, off:off + tile], v.reshape(tile, kvh, hd),
                                        vs, valid)
                self.bufs[dst] = out.reshape(rows, h * hd)
            used = np.clip(int(regs[f.get("len_reg", 0)]) + f.get("len_add", 0) + np.arange(rows) - off, 0, tile)
            return int(used.sum()) * h * hd / p.sfu_lanes, (src, kvb, dst), (dst,)
        # --- SFU element-wise / reductions
        n = f.get("n", 0)
        src, dst, src2 = f.get("src", 0), f.get("dst", 0), f.get("src2", 0)
        lanes = p.sfu_lanes
        if op == _RMSNORM:
            if fn:
                x = self._f32(i, ins, src, rows, n)
                self.bufs[dst] = sfu.rmsnorm(x, self._table(i, ins, f.get("table", 0), n), f.get("imm", 0.0), lanes)
            return 2 * rows * n / lanes, (src, _TAB), (dst,)
        if op == _QUANT:
            if fn:
                x = self._f32(i, ins, src, rows, n)
                seg = f.get("seg", 0) or n
                if n % seg:
                    raise GoldenError(f"instruction {i} (QUANT): seg {seg} does not divide n {n}")
                self.bufs[dst] = sfu.requantize(x, seg)
            return 2 * rows * n / lanes, (src,), (dst,)
        if op == _DEQUANT:
            if fn:
                q, s = self._i8(i, ins, src, rows)
                self.bufs[dst] = sfu.dequantize(q[:, :n], s)
            return rows * n / lanes, (src,), (dst,)
        if op == _ROPE:
            seg = f.get("seg", 0)
            if fn:
                if not seg or seg % 2 or n % seg:
                    raise GoldenError(f"instruction {i} (ROPE): bad head_dim seg={seg} for n={n}")
                x = self._f32(i, ins, src, rows, n)
                pos = int(regs[f.get("aux_reg", 0)]) + np.arange(rows)
                idx = f.get("table", 0) + pos[:, None] * seg + 2 * np.arange(seg // 2)[None, :]
                if idx.max() + 1 >= self.tables.size:
                    raise GoldenError(f"instruction {i} (ROPE): position {pos.max()} beyond the RoPE table")
                y = sfu.rope(x.reshape(rows, n // seg, seg), self.tables[idx], self.tables[idx + 1])
                self.bufs[dst] = y.reshape(rows, n)
            return rows * n / lanes, (src, _TAB), (dst,)
        if op == _SOFTMAX:
            stride = f.get("imm", 0)
            valid = int(regs[f.get("aux_reg", 0)]) + f.get("aux", 0) + np.arange(rows)
            vmax = int(valid.max(initial=0))
            if fn:
                S = self._scores(src, rows, n, create=False, i=i, ins=ins)
                if vmax > S.shape[2] or (stride and vmax > stride):
                    raise GoldenError(f"instruction {i} (SOFTMAX): length {vmax} beyond the score buffer")
                S[:, :, :vmax] = sfu.softmax_rows(S[:, :, :vmax], np.broadcast_to(valid[:, None], (rows, n)), lanes)
            return 3 * n * int(valid.sum()) / lanes, (src,), (dst,)
        if op == _ADD:
            if fn:
                self.bufs[dst] = self._f32(i, ins, src, rows, n) + self._f32(i, ins, src2, rows, n)
            return rows * n / lanes, (src, src2), (dst,)
        if op == _SILU_MUL:
            if fn:
                self.bufs[dst] = sfu.silu_mul(self._f32(i, ins, src, rows, n), self._f32(i, ins, src2, rows, n))
            return rows * n / lanes, (src, src2), (dst,)
        if op == _FILL:
            if fn:
                self.bufs[dst] = np.full((rows, n), f.get("imm", 0.0), dtype=F32)
            return rows * n / lanes, (), (dst,)
        if op == _ARGMAX:
            if fn:
                x = self._f32(i, ins, src, rows, n)
                regs[_ARGMAX_REG] = int(sfu.argmax(x[rows - 1]))
            return n / lanes, (src,), (_REGR,)
        raise GoldenError(f"instruction {i}: opcode {ins.op.name} is not executable")

    def _scores(self, b, rows, heads, create=True, i=None, ins=None):
        S = self.bufs.get(b)
        shape_ok = isinstance(S, np.ndarray) and S.ndim == 3 and S.shape[0] >= rows and S.shape[1] == heads
        if not shape_ok:
            if not create:
                raise GoldenError(f"instruction {i} ({ins.op.name}): score buffer {b.name} was not written")
            S = np.zeros((rows, heads, self.plan["max_seq"]), dtype=F32)
            self.bufs[b] = S
        return S if S.shape[0] == rows else S[:rows]

    def _table(self, i, ins, off, n):
        if off + n > self.tables.size:
            raise GoldenError(f"instruction {i} ({ins.op.name}): table range {off}+{n} beyond tables.bin")
        return self.tables[off:off + n]
