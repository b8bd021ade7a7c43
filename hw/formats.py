"""Packed weight formats: GGUF-native groups, N:M sparsity, lane-domain records per HBM channel.

The one definition of how a weight matrix is laid out in HBM. The compiler packs with
it, the golden model unpacks with it, and the RTL dequant unit takes its widths and
offsets from it (through :class:`~flightllm.hw.geometry.EngineGeometry`).

Formats
-------
A weight matrix ``W`` has ``N`` output rows and ``K`` input columns, cut along the
input axis into *quant groups* of ``G = group_size``. Every ``m``-window of a group
keeps ``n_keep`` weights (dense: all). A kept weight is a ``bits``-wide integer ``q``:

* signed formats (``intB``): two's complement, ``q`` in ``[-2**(B-1), 2**(B-1) - 1]``;
  the real weight is ``d * q`` (GGUF Q8_0; Q4_0 with its offset 8 folded into ``q``);
* formats with a min (``intBm``, dense only, ``B < 8``): unsigned ``q`` in
  ``[0, 2**B - 1]``, real weight ``d * q + mn`` (GGUF Q4_1);
* raw formats (``intBr``, dense, signed): no scale and no min in the records: the
  value is the integer itself (the hardware's fixed-point scale is 1, ``shift`` 0).
  The KV cache is stored in them (:mod:`flightllm.hw.kvcache`): its scales live
  beside it in float32, applied by the SFU;
* two-level formats (``intBk``, a min too): per group an 8-bit unsigned sub-scale
  ``sc`` and sub-min ``sm``, per tensor one binary16 ``D`` and ``Mn``:
  ``d = D * sc``, ``mn = Mn * sm`` (both exact in float32), so a 4-bit format costs
  4.5 bits per weight with a min in every group (K-quants' idea, with one super-block
  per tensor).

``d`` (and ``mn``) are otherwise IEEE binary16, one per (row, group), exactly as GGUF
stores them. Names: ``int8/32``, ``int4/32``, ``int4m/32``, ``int4k/32``, ``int4-2:4/64``, ``int8r/32``
(bits, ``m`` for a min, ``k`` for two-level, ``r`` for raw, the N:M pattern, ``/G``); :data:`GGUF_NATIVE`
maps GGUF block types onto them.

Scales in the hardware
----------------------
The dequant unit turns each binary16 into a signed ``SCALE_FIXED_BITS`` (27, the
DSP48E2 A port) fixed-point integer ``S = d * 2**shift`` with one ``shift`` per tensor:
for ``d = (-1)**s * sig * 2**(E - 25)`` (``sig`` = 11-bit significand with the hidden
bit, ``E`` = the exponent field, 1 for subnormals) it is ``sig << (E - e0)`` with
``e0 = 25 - shift``. That is exact whenever every nonzero scale and min of the tensor
has ``E - e0`` in ``[0, SCALE_EXP_SPAN]`` (15): the binary16 exponents of one tensor
may span 16 binades. :func:`scale_shift` picks ``e0 = min(25, smallest E)`` and raises
:class:`ScaleRangeError` beyond that (SmolLM2's Q4_1 tensors span at most 11). A
two-level format's scale is ``(sig(D) * sc) << (E(D) - e0)`` (a 19-bit product), its min
likewise from ``Mn``: exact when ``E(D)`` and ``E(Mn)`` lie within ``SUB_EXP_SPAN`` (7)
of each other.

Lane-domain records
-------------------
The matrix engine computes a *row tile* of ``R = chains`` rows; chain ``j`` takes row
``tile*R + j`` and is fed by weight channel ``j % C`` (``C`` channels, ``Rc = R / C``
chains each). A chain has ``L = chain_len`` lanes and consumes ``L`` kept weights per
cycle (a *beat*), so a group takes ``bpb = kept / L`` beats (``kept`` must be a
multiple of ``L``). Channel ``c`` streams one *record* per (tile, group)::

    for tile in range(ceil(N / R)):
        for group in range(K // G):
            record(tile, group)        # rows tile*R + i*C + c, i = 0 .. Rc-1

A record lays its fields out in the order the lanes consume them (LSB first,
little-endian bytes), with ``e = b*L + l`` the kept-weight index of lane ``l`` in beat
``b`` (kept weights in ascending input position; pruned positions weigh 0)::

    values : for b < bpb, for i < Rc, for l < L:  q of row i, kept weight e   (bits each)
    indices: same order, position of the weight inside its m-window     (log2 m each; sparse only)
    scales : for i < Rc: d of row i (binary16; two-level: the 8-bit sc; raw: none)
    mins   : for i < Rc: mn of row i (binary16; two-level: the 8-bit sm; formats with a min only)
    zero padding to a multiple of RECORD_ALIGN_BITS

A two-level tensor's region starts with a ``TENSOR_HEADER_BITS`` (64) header in every
channel: ``D`` and ``Mn`` (binary16), then zeros.

so lane ``l`` of local chain ``i`` always finds its value at bit ``((b*Rc + i)*L + l) * bits``:
the dequant unit is an aligner (records start on ``RECORD_ALIGN_BITS`` boundaries of the
word stream) and a per-lane width mux. Rows past ``N`` are zero (scale and min 0,
indices naming the first ``n_keep`` positions). A tensor's records are contiguous in
each channel; every channel holds the same number of bytes, and the region is padded
to ``ALIGN`` bytes, so one offset addresses the tensor in all channels.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

__all__ = [
    "SCALE_STORE_BITS", "SCALE_FIXED_BITS", "SCALE_EXP_SPAN", "SIG_BITS", "SUB_BITS", "SUB_EXP_SPAN",
    "TENSOR_HEADER_BITS", "RECORD_ALIGN_BITS", "ALIGN",
    "align", "WeightFormat", "QTensor", "ScaleRangeError", "scale_shift", "to_fixed", "fit_scales",
    "scale_floor",
    "GGUF_NATIVE", "gguf_block_bytes", "gguf_to_qtensor", "record_bits", "record_count",
    "region_bytes", "PackedTensor",
    "pack_tensor", "unpack_tensor", "nm_mask", "value_bits",
]

SCALE_STORE_BITS = 16       #: binary16 scale (and min) per group in HBM
SCALE_FIXED_BITS = 27       #: signed fixed-point scale in the hardware (DSP48E2 A port)
SIG_BITS = 11               #: binary16 significand with the hidden bit
SCALE_EXP_SPAN = SCALE_FIXED_BITS - 1 - SIG_BITS   #: largest E - e0 the fixed point holds (15)
SUB_BITS = 8                #: two-level formats: sub-scale and sub-min width
SUB_EXP_SPAN = SCALE_EXP_SPAN - SUB_BITS           #: ... largest E - e0 of D and Mn (7)
TENSOR_HEADER_BITS = 64     #: two-level formats: D, Mn (binary16) and zeros before the records
E0_MAX = 25                 #: e0 = 25 - shift, so shift >= 0
RECORD_ALIGN_BITS = 64      #: every record starts at a multiple of this in its channel stream
ALIGN = 64                  #: byte alignment of every region in a channel image (one 512-bit beat)

_FORMAT_RE = re.compile(r"^int(\d+)([mkr]?)(?:-(\d+):(\d+))?(?:/(\d+))?$")


def align(n: int, to: int = ALIGN) -> int:
    """``n`` rounded up to a multiple of ``to`` (bytes, unless told otherwise)."""
    return -(-n // to) * to


class ScaleRangeError(ValueError):
    """Group scales the hardware's fixed-point scale cannot hold exactly."""


@dataclass(frozen=True)
class WeightFormat:
    """One packed weight format: bit width, N:M pattern, quant group size, min or not."""

    bits: int
    n_keep: int = 1
    m: int = 1
    group_size: int = 32
    has_min: bool = False
    two_level: bool = False
    raw: bool = False

    def __post_init__(self):
        if self.n_keep == self.m:              # every dense pattern is the same format
            object.__setattr__(self, "n_keep", 1)
            object.__setattr__(self, "m", 1)
        if not 2 <= self.bits <= 8:
            raise ValueError(f"weight format {self.name}: bits must be 2..8, not {self.bits}")
        if not (0 < self.n_keep <= self.m) or self.m & (self.m - 1):
            raise ValueError(f"weight format {self.name}: need 0 < n_keep <= m, m a power of two")
        if self.group_size <= 0 or self.group_size % self.m or self.group_size & (self.group_size - 1):
            raise ValueError(f"weight format {self.name}: the group size must be a power of two "
                             f"that m={self.m} divides")
        if self.has_min and (not self.dense or self.bits >= 8):
            raise ValueError(f"weight format {self.name}: a min needs a dense format of fewer than 8 bits "
                             "(pruned weights would weigh the min; 8-bit unsigned values do not fit a lane)")
        if self.two_level and not self.has_min:
            raise ValueError(f"weight format {self.name}: two-level scales come with a min")
        if self.raw and (self.has_min or not self.dense):
            raise ValueError(f"weight format {self.name}: raw formats are dense and signed (no scale, no min)")

    @classmethod
    def parse(cls, text: str, group_size: int | None = None) -> "WeightFormat":
        """``int8/32``, ``int4m/32``, ``int4-2:4/64`` ...; ``group_size`` if the text has no ``/G``."""
        mt = _FORMAT_RE.match(str(text).strip())
        if not mt:
            raise ValueError(f"bad weight format {text!r}: expected intB[m|k|r][-N:M][/G], e.g. int4/32, "
                             "int4m/32, int4-2:4/64, int8r/32")
        bits, kind, n, m, g = mt.groups()
        if g is None and group_size is None:
            raise ValueError(f"weight format {text!r} names no group size (/G)")
        return cls(int(bits), int(n or 1), int(m or 1), int(g) if g else int(group_size), kind in ("m", "k"),
                   kind == "k", kind == "r")

    @property
    def kind(self) -> int:
        """0: signed values; 1: unsigned with a binary16 min; 2: two-level; 3: raw (instruction field ``kind``)."""
        return 3 if self.raw else 2 if self.two_level else 1 if self.has_min else 0

    @classmethod
    def from_fields(cls, bits: int, n_keep: int, m: int, group_log2: int, kind: int) -> "WeightFormat":
        """The format an instruction's fields name (inverse of ``kind`` and ``log2(group_size)``)."""
        if kind not in (0, 1, 2, 3):
            raise ValueError(f"format kind {kind} is not 0 (signed), 1 (min), 2 (two-level) or 3 (raw)")
        return cls(bits, n_keep, m, 1 << group_log2, kind in (1, 2), kind == 2, kind == 3)

    @property
    def dense(self) -> bool:
        return self.n_keep == self.m

    @property
    def name(self) -> str:
        nm = "" if self.n_keep == self.m else f"-{self.n_keep}:{self.m}"
        kind = "k" if self.two_level else "m" if self.has_min else "r" if self.raw else ""
        return f"int{self.bits}{kind}{nm}/{self.group_size}"

    @property
    def qmin(self) -> int:
        return 0 if self.has_min else -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1 if self.has_min else (1 << (self.bits - 1)) - 1

    @property
    def kept_per_group(self) -> int:
        return self.group_size * self.n_keep // self.m

    @property
    def index_bits(self) -> int:
        return 0 if self.dense else (self.m - 1).bit_length()

    @property
    def scale_fields(self) -> int:
        """Scale fields per (row, group): the scale, and the min if any (raw: none)."""
        return 0 if self.raw else 2 if self.has_min else 1

    @property
    def scale_field_bits(self) -> int:
        """Width of each: binary16, or the 8-bit sub-fields of two-level formats."""
        return SUB_BITS if self.two_level else SCALE_STORE_BITS

    @property
    def header_bits(self) -> int:
        """Bits before the records in every channel (the two-level tensor header)."""
        return TENSOR_HEADER_BITS if self.two_level else 0

    def bits_per_weight(self) -> float:
        """Stored bits per (dense) weight: values, indices, scales and mins (not the header)."""
        return (self.kept_per_group * (self.bits + self.index_bits)
                + self.scale_field_bits * self.scale_fields) / self.group_size

    def check_shape(self, shape, what="tensor"):
        n, k = shape
        if k % self.group_size:
            raise ValueError(f"{what}: input size {k} is not a multiple of the group size {self.group_size} "
                             f"of {self.name}")


# -- scales: binary16 in HBM, fixed point in the hardware ----------------------------

def _f16_fields(a: np.ndarray):
    """(sign, effective exponent E (1 for subnormals), 11-bit significand) of binary16 values."""
    b = np.ascontiguousarray(a, dtype=np.float16).view(np.uint16).astype(np.int64)
    e = (b >> 10) & 31
    sig = (b & 1023) | np.where(e > 0, 1024, 0)
    return b >> 15, np.maximum(e, 1), sig, e


def scale_shift(*arrays, span: int = SCALE_EXP_SPAN) -> int:
    """The tensor ``shift`` that makes every nonzero binary16 of ``arrays`` an exact
    ``SCALE_FIXED_BITS`` fixed-point integer (module docstring), or :class:`ScaleRangeError`.
    ``span``: the largest exponent spread allowed (``SUB_EXP_SPAN`` for two-level heads)."""
    es, emax = [], None
    for a in arrays:
        if a is None:
            continue
        s, e, sig, efield = _f16_fields(a)
        if (efield == 31).any():
            raise ScaleRangeError("a binary16 scale or min is infinite or NaN")
        nz = sig != 0
        if nz.any():
            es.append(int(e[nz].min()))
            emax = max(emax or 0, int(e[nz].max()))
    if not es:
        return 0
    e0 = min(E0_MAX, min(es))
    if emax - e0 > span:
        raise ScaleRangeError(
            f"binary16 scales/mins span exponents {e0 - 15}..{emax - 15} ({emax - e0 + 1} binades); the "
            f"{SCALE_FIXED_BITS}-bit fixed-point scale holds {span + 1}")
    return E0_MAX - e0


def to_fixed(a: np.ndarray, shift: int, span: int = SCALE_EXP_SPAN) -> np.ndarray:
    """binary16 values as the hardware's fixed-point integers ``a * 2**shift`` (int64, exact);
    ``span`` as in :func:`scale_shift`."""
    s, e, sig, _ = _f16_fields(a)
    sh = e - (E0_MAX - shift)
    if ((sh < 0) & (sig != 0)).any():
        raise ScaleRangeError(f"a scale is below the fixed-point range of shift {shift}")
    if ((sh > span) & (sig != 0)).any():
        raise ScaleRangeError(f"a scale exceeds the {SCALE_FIXED_BITS}-bit fixed point at shift {shift}")
    v = sig << np.maximum(sh, 0)
    return np.where(s == 1, -v, v)


def scale_floor(top: float) -> float:
    """The smallest scale magnitude a tensor whose largest scale is ``top`` can hold
    exactly next to it (what :func:`fit_scales` raises smaller scales to)."""
    _, e, sig, _ = _f16_fields(np.array([top], np.float32).astype(np.float16))
    if not sig[0]:
        return 0.0
    return 2.0 ** (max(int(e[0]) - SCALE_EXP_SPAN, 1) - 15)


def fit_scales(scale: np.ndarray) -> np.ndarray:
    """float scales -> binary16 whose exponents span at most ``SCALE_EXP_SPAN + 1`` binades.

    For the compiler's own quantization: nonzero magnitudes below the floor the largest
    scale allows are raised to it (such groups then use fewer integer levels)."""
    s = np.asarray(scale, dtype=np.float32).astype(np.float16)
    if not np.isfinite(s).all():
        raise ScaleRangeError("a scale does not fit binary16 (infinite or NaN)")
    if not (s != 0).any():
        return s
    floor = np.float16(scale_floor(float(np.abs(s).max())))
    small = (np.abs(s) < floor) & (s != 0)
    return np.where(small, np.copysign(floor, s), s).astype(np.float16)


# -- the quantized tensor (what compression produces and unpacking returns) ----------

@dataclass
class QTensor:
    """A quantized weight matrix in the integers and scales of its format.

    ``q`` int8 (N, K), 0 where pruned; ``scale`` (and ``min``) (N, K // G): float16, or
    for two-level formats the uint8 sub-scales (sub-mins) of the float16 ``tensor_scale``
    (``tensor_min``); ``mask`` bool (N, K) for sparse formats (a kept weight may be 0).
    """

    fmt: WeightFormat
    q: np.ndarray
    scale: np.ndarray
    min: np.ndarray | None = None
    mask: np.ndarray | None = None
    tensor_scale: float | None = None
    tensor_min: float | None = None

    def __post_init__(self):
        f = self.fmt
        self.q = np.asarray(self.q)
        n, k = self.q.shape
        f.check_shape((n, k))
        ng = k // f.group_size
        sdt = np.uint8 if f.two_level else np.float16
        if f.two_level:
            for name in ("scale", "min"):
                a = np.asarray(getattr(self, name) if getattr(self, name) is not None else -1)
                if a.min() < 0 or a.max() > (1 << SUB_BITS) - 1:
                    raise ValueError(f"{f.name}: sub-{name}s must be integers in [0, {(1 << SUB_BITS) - 1}]")
            if self.tensor_scale is None or self.tensor_min is None:
                raise ValueError(f"{f.name}: a two-level tensor needs tensor_scale and tensor_min")
            self.tensor_scale = np.float16(self.tensor_scale)
            self.tensor_min = np.float16(self.tensor_min)
        elif self.tensor_scale is not None or self.tensor_min is not None:
            raise ValueError(f"{f.name}: only two-level formats have a tensor scale")
        if f.raw:
            if self.scale is not None:
                raise ValueError(f"{f.name}: a raw tensor has no scales (pass scale=None)")
            self.scale = np.ones((n, ng), np.float16)        # the implied scale 1
        self.scale = np.asarray(self.scale).astype(sdt)
        if self.scale.shape != (n, ng):
            raise ValueError(f"{f.name}: scales {self.scale.shape}, expected {(n, ng)}")
        if f.has_min != (self.min is not None):
            raise ValueError(f"{f.name}: {'needs' if f.has_min else 'has no'} per-group mins")
        if self.min is not None:
            self.min = np.asarray(self.min).astype(sdt)
            if self.min.shape != (n, ng):
                raise ValueError(f"{f.name}: mins {self.min.shape}, expected {(n, ng)}")
        qi = self.q.astype(np.int64)
        if qi.size and (qi.min() < f.qmin or qi.max() > f.qmax):
            raise ValueError(f"{f.name}: a value lies outside [{f.qmin}, {f.qmax}]")
        self.q = qi.astype(np.int8)
        if not f.dense:
            if self.mask is None:
                raise ValueError(f"{f.name}: a sparse tensor needs its mask (a kept weight may be 0)")
            w = np.asarray(self.mask, bool).reshape(n, k // f.m, f.m).sum(axis=2)
            bad = np.argwhere(w != f.n_keep)
            if bad.size:
                r, c = bad[0]
                raise ValueError(f"{f.name}: mask keeps {w[r, c]} of window {c} in row {r}, needs {f.n_keep}")
            if (self.q[~np.asarray(self.mask, bool)] != 0).any():
                raise ValueError(f"{f.name}: a pruned position holds a nonzero value")
        else:
            self.mask = None

    @property
    def shape(self):
        return self.q.shape

    def group_scales(self):
        """Each group's (d, mn) as float32 (exact: binary16, or binary16 x 8 bits); mn None without."""
        if self.fmt.two_level:
            return (np.float32(self.tensor_scale) * self.scale.astype(np.float32),
                    np.float32(self.tensor_min) * self.min.astype(np.float32))
        return self.scale.astype(np.float32), None if self.min is None else self.min.astype(np.float32)

    def dequantize(self) -> np.ndarray:
        """float32 weights, as GGUF dequantizes (``d * q``, then ``+ mn``, in float32)."""
        g = self.fmt.group_size
        d, mn = self.group_scales()
        w = self.q.astype(np.float32) * np.repeat(d, g, axis=1)
        if mn is not None:
            w = w + np.repeat(mn, g, axis=1)
        return w

    def fixed(self, shift: int | None = None):
        """``(shift, S, M)``: the hardware's fixed-point group scales and mins (int64 (N, K//G),
        ``M`` None without a min), exact, for ``shift`` (default: :func:`scale_shift`'s)."""
        if self.fmt.raw:
            return 0, np.ones(self.scale.shape, np.int64), None
        if not self.fmt.two_level:
            if shift is None:
                shift = scale_shift(self.scale, self.min)
            return shift, to_fixed(self.scale, shift), None if self.min is None else to_fixed(self.min, shift)
        heads = np.array([self.tensor_scale, self.tensor_min], np.float16)
        if shift is None:
            shift = scale_shift(heads, span=SUB_EXP_SPAN)
        base = to_fixed(heads, shift, span=SUB_EXP_SPAN)
        return (shift, base[0] * self.scale.astype(np.int64), base[1] * self.min.astype(np.int64))

    @property
    def nbytes(self) -> float:
        n, k = self.q.shape
        return n * k * self.fmt.bits_per_weight() / 8


# -- GGUF blocks (gguf-py quants.py layouts) -----------------------------------------

#: GGUF block type -> (format, block bytes); values of element j of a block: Q8_0 int8 at
#: byte 2 + j; Q4_0 / Q4_1 nibble (low of byte j for j < 16, high of byte j - 16 otherwise)
#: after the binary16 d (and m), Q4_0's nibble offset by 8.
GGUF_NATIVE = {
    "Q8_0": (WeightFormat(8, group_size=32), 34),
    "Q4_0": (WeightFormat(4, group_size=32), 18),
    "Q4_1": (WeightFormat(4, group_size=32, has_min=True), 20),
}


def gguf_block_bytes(type_name: str) -> int:
    return GGUF_NATIVE[type_name][1]


def gguf_to_qtensor(type_name: str, raw: np.ndarray, shape) -> QTensor:
    """A GGUF tensor's raw blocks (uint8) as a :class:`QTensor`, integers and scales untouched."""
    if type_name not in GGUF_NATIVE:
        raise ValueError(f"GGUF type {type_name} has no native format (native: {', '.join(GGUF_NATIVE)})")
    fmt, bb = GGUF_NATIVE[type_name]
    n, k = shape
    blk = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1)
    if blk.size != n * k // 32 * bb:
        raise ValueError(f"{type_name} data of {blk.size} bytes does not hold a {n}x{k} tensor")
    blk = blk.reshape(n, k // 32, bb)
    d = blk[..., 0:2].copy().view(np.float16)[..., 0]
    mn = None
    if type_name == "Q8_0":
        q = blk[..., 2:].view(np.int8)
    else:
        off = 4 if type_name == "Q4_1" else 2
        nib = blk[..., off:off + 16]
        q = np.concatenate([nib & 15, nib >> 4], axis=-1).astype(np.int16)
        if type_name == "Q4_0":
            q = q - 8
        else:
            mn = blk[..., 2:4].copy().view(np.float16)[..., 0]
    return QTensor(fmt, q.reshape(n, k).astype(np.int8), d, mn)


# -- records ----------------------------------------------------------------------------

def record_bits(fmt: WeightFormat, rc: int, lanes: int) -> int:
    """Bits of one record (module docstring) for ``rc`` chains of ``lanes`` lanes."""
    kept = fmt.kept_per_group
    if kept % lanes:
        raise ValueError(f"format {fmt.name} keeps {kept} weights per group, not a multiple of "
                         f"chain_len {lanes}")
    raw = rc * kept * (fmt.bits + fmt.index_bits) + rc * fmt.scale_field_bits * fmt.scale_fields
    return align(raw, RECORD_ALIGN_BITS)


def record_count(fmt: WeightFormat, shape, chains: int) -> int:
    """Records one channel streams for an (N, K) tensor: row tiles x groups."""
    n, k = shape
    return -(-n // chains) * (k // fmt.group_size)


def _region_bytes(fmt: WeightFormat, shape, chains: int, rc: int, lanes: int) -> int:
    return (fmt.header_bits + record_count(fmt, shape, chains) * record_bits(fmt, rc, lanes)) // 8


def region_bytes(fmt: WeightFormat, shape, params) -> int:
    """Bytes of a tensor's header and records in one channel (before the ``ALIGN`` padding);
    a whole number of ``RECORD_ALIGN_BITS`` granules."""
    gm = _geom(params)
    return _region_bytes(fmt, shape, gm.chains, gm.rc, gm.lanes)


def nm_mask(score: np.ndarray, n_keep: int, m: int) -> np.ndarray:
    """Boolean mask keeping the ``n_keep`` highest ``score`` of every ``m``-window (ties: earlier)."""
    n, k = score.shape
    if k % m:
        raise ValueError(f"input size {k} is not a multiple of m={m}")
    sw = score.reshape(n, k // m, m)
    keep = np.argsort(-sw, axis=2, kind="stable")[..., :n_keep]
    mask = np.zeros(sw.shape, dtype=bool)
    np.put_along_axis(mask, keep, True, axis=2)
    return mask.reshape(n, k)


@dataclass(frozen=True)
class _Geom:
    chains: int
    channels: int
    lanes: int

    @property
    def rc(self):
        return self.chains // self.channels


def _geom(params) -> _Geom:
    g = _Geom(int(params.chains), int(params.weight_channels), int(params.chain_len))
    if g.chains % g.channels:
        raise ValueError(f"chains ({g.chains}) must be a multiple of weight_channels ({g.channels})")
    return g


@dataclass
class PackedTensor:
    """A weight matrix as per-channel record streams (``data[c]``: the bytes of channel ``c``)."""

    fmt: WeightFormat
    shape: tuple
    shift: int
    chains: int
    lanes: int
    data: list

    @property
    def channels(self) -> int:
        return len(self.data)

    @property
    def records(self) -> int:
        """Records per channel: row tiles x groups."""
        return record_count(self.fmt, self.shape, self.chains)

    @property
    def record_bits(self) -> int:
        return record_bits(self.fmt, self.chains // self.channels, self.lanes)

    @property
    def region_bytes(self) -> int:
        return _region_bytes(self.fmt, self.shape, self.chains, self.chains // self.channels, self.lanes)

    @property
    def channel_bytes(self) -> int:
        """Bytes one channel holds for this tensor (the region, aligned)."""
        return align(self.region_bytes)

    def stored_bytes(self) -> int:
        """Bytes of values, indices and scales of the real rows (no padding, no alignment)."""
        n, k = self.shape
        return int(n * k * self.fmt.bits_per_weight() / 8)

    def channel_image(self, c: int) -> bytes:
        b = bytes(self.data[c])
        return b + bytes(align(len(b)) - len(b))


def value_bits(fmt: WeightFormat, shape, params, rows, cols):
    """Where the values of a dense tensor lie: ``(channel, bit offset in the channel's
    region)`` of elements ``(rows, cols)`` (broadcast int arrays), per the record layout
    of the module docstring. What a writer of single rows (the KV cache's ST_KT) needs."""
    if not fmt.dense:
        raise ValueError(f"value_bits: {fmt.name} is sparse (a value's place depends on the mask)")
    gm = _geom(params)
    n, k = shape
    R, C, Rc, L = gm.chains, gm.channels, gm.rc, gm.lanes
    rows, cols = np.broadcast_arrays(np.asarray(rows, np.int64), np.asarray(cols, np.int64))
    ng = k // fmt.group_size
    tile, j = rows // R, rows % R
    grp, e = cols // fmt.group_size, cols % fmt.group_size
    b, lane = e // L, e % L
    rec = tile * ng + grp
    bit = fmt.header_bits + rec * record_bits(fmt, Rc, L) + ((b * Rc + j // C) * L + lane) * fmt.bits
    return j % C, bit


def _bits(v: np.ndarray, width: int) -> np.ndarray:
    """(..., count) ints -> (..., count * width) bits, LSB first."""
    u = v.astype(np.int64) & ((1 << width) - 1)
    return ((u[..., None] >> np.arange(width)) & 1).astype(np.uint8).reshape(*v.shape[:-1], -1)


def _ints(bits: np.ndarray, count: int, width: int, signed: bool) -> np.ndarray:
    b = bits.reshape(*bits.shape[:-1], count, width).astype(np.int64)
    u = (b << np.arange(width)).sum(axis=-1)
    if signed:
        u = np.where(u >= 1 << (width - 1), u - (1 << width), u)
    return u


def _kept(qt: QTensor):
    """(N, ng, kept) values and window indices of the kept weights, ascending positions."""
    f = qt.fmt
    n, k = qt.q.shape
    ng = k // f.group_size
    if f.dense:
        return qt.q.reshape(n, ng, f.group_size), None
    win = qt.mask.reshape(n, k // f.m, f.m)
    order = np.argsort(~win, axis=2, kind="stable")[..., :f.n_keep]
    vals = np.take_along_axis(qt.q.reshape(n, k // f.m, f.m), order, axis=2)
    return vals.reshape(n, ng, f.kept_per_group), order.reshape(n, ng, f.kept_per_group)


def pack_tensor(qt: QTensor, params, shift: int | None = None) -> PackedTensor:
    """Pack a :class:`QTensor` into the record streams of ``params`` (an
    :class:`~flightllm.hw.params.HwParams`: chains, weight_channels, chain_len).

    Raises :class:`ScaleRangeError` when its scales do not fit the fixed point."""
    gm = _geom(params)
    f = qt.fmt
    n, k = qt.q.shape
    ng, kept, R, C, Rc, L = k // f.group_size, f.kept_per_group, gm.chains, gm.channels, gm.rc, gm.lanes
    rb = record_bits(f, Rc, L)
    shift, _, _ = qt.fixed(shift)                          # raises if out of range
    tiles = -(-n // R)
    rows = tiles * R
    vals, idx = _kept(qt)
    V = np.zeros((rows, ng, kept), np.int64)
    V[:n] = vals
    if idx is not None:
        I = np.tile(np.arange(f.n_keep, dtype=np.int64), kept // f.n_keep)[None, None].repeat(rows, 0).repeat(ng, 1)
        I[:n] = idx
    fb = f.scale_field_bits
    raw_of = (lambda a: a.astype(np.uint16)) if f.two_level else (lambda a: a.view(np.uint16))
    S = np.zeros((rows, ng), np.uint16)
    S[:n] = raw_of(qt.scale)
    M = None
    if qt.min is not None:
        M = np.zeros((rows, ng), np.uint16)
        M[:n] = raw_of(qt.min)
    head = []
    if f.two_level:
        hv = np.array([qt.tensor_scale, qt.tensor_min], np.float16).view(np.uint16)
        head = [_bits(hv[None], SCALE_STORE_BITS).reshape(-1),
                np.zeros(TENSOR_HEADER_BITS - 2 * SCALE_STORE_BITS, np.uint8)]
    bpb = kept // L

    data = []
    for c in range(C):
        r = np.arange(tiles)[:, None] * R + np.arange(Rc)[None, :] * C + c            # (tiles, Rc)
        v = V[r]                                                                    # (tiles, Rc, ng, kept)
        v = v.reshape(tiles, Rc, ng, bpb, L).transpose(0, 2, 3, 1, 4).reshape(tiles, ng, -1)
        parts = [_bits(v, f.bits)]
        if idx is not None:
            ii = I[r].reshape(tiles, Rc, ng, bpb, L).transpose(0, 2, 3, 1, 4).reshape(tiles, ng, -1)
            parts.append(_bits(ii, f.index_bits))
        if not f.raw:
            parts.append(_bits(S[r].transpose(0, 2, 1), fb))
        if M is not None:
            parts.append(_bits(M[r].transpose(0, 2, 1), fb))
        bits = np.concatenate(parts, axis=-1)
        pad = rb - bits.shape[-1]
        if pad:
            bits = np.concatenate([bits, np.zeros(bits.shape[:-1] + (pad,), np.uint8)], axis=-1)
        data.append(np.packbits(np.concatenate(head + [bits.reshape(-1)]), bitorder="little").tobytes())
    return PackedTensor(f, (n, k), int(shift), R, L, data)


def unpack_tensor(pt: PackedTensor) -> QTensor:
    """Inverse of :func:`pack_tensor`: the record streams back to a :class:`QTensor`."""
    f = pt.fmt
    n, k = pt.shape
    R, C, L = pt.chains, pt.channels, pt.lanes
    Rc = R // C
    ng, kept = k // f.group_size, f.kept_per_group
    bpb = kept // L
    tiles = -(-n // R)
    rb = pt.record_bits
    rows = tiles * R
    V = np.zeros((rows, ng, kept), np.int64)
    I = np.zeros((rows, ng, kept), np.int64)
    S = np.zeros((rows, ng), np.uint16)
    M = np.zeros((rows, ng), np.uint16)
    nv, ni = Rc * kept * f.bits, Rc * kept * f.index_bits
    fb, hb = f.scale_field_bits, f.header_bits // 8
    heads = []
    for c in range(C):
        raw = np.frombuffer(bytes(pt.data[c]), np.uint8)
        need = hb + tiles * ng * rb // 8
        if raw.size < need:
            raise ValueError(f"channel {c}: {raw.size} bytes, format {f.name} shape {pt.shape} needs {need}")
        if hb:
            heads.append(bytes(raw[:4]))
        bits = np.unpackbits(raw[hb:need], bitorder="little").reshape(tiles, ng, rb)
        r = np.arange(tiles)[:, None] * R + np.arange(Rc)[None, :] * C + c
        v = _ints(bits[..., :nv], Rc * kept, f.bits, signed=not f.has_min)
        V[r] = v.reshape(tiles, ng, bpb, Rc, L).transpose(0, 3, 1, 2, 4).reshape(tiles, Rc, ng, kept)
        o = nv
        if f.index_bits:
            ii = _ints(bits[..., o:o + ni], Rc * kept, f.index_bits, signed=False)
            I[r] = ii.reshape(tiles, ng, bpb, Rc, L).transpose(0, 3, 1, 2, 4).reshape(tiles, Rc, ng, kept)
            o += ni
        if not f.raw:
            S[r] = _ints(bits[..., o:o + Rc * fb], Rc, fb, False).astype(np.uint16).transpose(0, 2, 1)
            o += Rc * fb
        if f.has_min:
            M[r] = _ints(bits[..., o:o + Rc * fb], Rc, fb, False).astype(np.uint16).transpose(0, 2, 1)
    if heads and any(h != heads[0] for h in heads):
        raise ValueError(f"format {f.name}: the tensor headers of the channels differ")
    V, I, S, M = V[:n], I[:n], S[:n], M[:n]
    if f.dense:
        q, mask = V.reshape(n, k), None
    else:
        nwin = f.group_size // f.m
        q = np.zeros((n, ng, nwin, f.m), np.int64)
        mask = np.zeros((n, ng, nwin, f.m), bool)
        ii = I.reshape(n, ng, nwin, f.n_keep)
        np.put_along_axis(q, ii, V.reshape(n, ng, nwin, f.n_keep), axis=3)
        np.put_along_axis(mask, ii, True, axis=3)
        q, mask = q.reshape(n, k), mask.reshape(n, k)
    if f.two_level:
        ts, tm = np.frombuffer(heads[0], np.float16)
        return QTensor(f, q.astype(np.int8), S.astype(np.uint8), M.astype(np.uint8), mask, ts, tm)
    if f.raw:
        return QTensor(f, q.astype(np.int8), None)
    return QTensor(f, q.astype(np.int8), S.view(np.float16), M.view(np.float16) if f.has_min else None, mask)
