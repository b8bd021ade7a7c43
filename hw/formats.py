"""Packed weight formats: N:M-sparse, group-scaled signed INTb, striped over HBM channels.

This module is the one definition of how a weight matrix is laid out in HBM. The
compiler packs with it, the golden model and the runtime unpack with it, and the
RTL dequant unit takes its widths from :class:`WeightFormat`.

Arithmetic
----------
A weight matrix ``W`` has ``N`` output rows and ``K`` input columns. Its input axis is
cut into *quant groups* of ``G = group_size`` elements; each (row, group) is a
*block*. Inside a block, every window of ``m`` consecutive inputs keeps ``n_keep``
weights (dense is ``n_keep == m``). A kept weight is a signed ``bits``-bit integer
``q`` in ``[-(2**(bits-1) - 1), 2**(bits-1) - 1]`` (symmetric: the most negative code
is never produced). The block has one unsigned ``SCALE_BITS``-bit scale mantissa
``s``; the tensor has one ``shift``, so the real weight is ``q * s * 2**-shift``.

Block payload bit layout (LSB first, little-endian bytes)
---------------------------------------------------------
With ``k = kept_per_group`` and ``ib = index_bits`` (``log2(m)``, 0 when dense)::

    bit  0              : value 0    (bits wide, two's complement)
    bit  bits           : value 1
    ...
    bit  k*bits         : index 0    (ib wide: position of value 0 inside its m-window)
    bit  k*bits + ib    : index 1
    ...                   total block_bits = k * (bits + ib), a whole number of bytes

Kept values are in ascending input position; value ``j`` lies in window ``j // n_keep``
of the block. Pruned positions (and the padding rows below) hold weight 0.

Channel striping
----------------
The matrix engine computes a *row tile* of ``R = chains`` rows at once, one quant
group per step, and weight streamer ``c`` (of ``C`` channels) feeds rows
``j = c, c+C, c+2C, ...`` of every tile. Channel ``c``'s stream is therefore::

    for tile in range(ceil(N / R)):
        for group in range(K // G):
            for j in range(c, R, C):       # rows tile*R + j; rows >= N are zero padding
                block(tile*R + j, group)

Payload blocks and scales are two separate sequential regions of the channel, in
that same order; scales are little-endian ``uint16``. Every channel of a tensor holds
the same number of bytes, so one offset addresses the tensor in all channels.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

__all__ = [
    "SCALE_BITS", "ALIGN", "WeightFormat", "PackedTensor", "stripe_order",
    "quantize_groups", "pack_tensor", "unpack_tensor", "pack_blocks", "unpack_blocks",
]

SCALE_BITS = 16          #: width of a block's unsigned scale mantissa
ALIGN = 64               #: byte alignment of every region in a channel image (one 512-bit beat)

_FORMAT_RE = re.compile(r"^int(\d+)(?:-(\d+):(\d+))?$")


@dataclass(frozen=True)
class WeightFormat:
    """One packed weight format: bit width, N:M pattern and quant group size."""

    bits: int
    n_keep: int
    m: int
    group_size: int = 64

    def __post_init__(self):
        if not 2 <= self.bits <= 8:
            raise ValueError(f"weight format {self.name}: bits must be 2..8, not {self.bits}")
        if not (0 < self.n_keep <= self.m) or self.m & (self.m - 1):
            raise ValueError(f"weight format {self.name}: need 0 < n_keep <= m, m a power of two")
        if self.group_size % self.m:
            raise ValueError(f"weight format {self.name}: m={self.m} must divide group size {self.group_size}")
        if self.block_bits % 8:
            raise ValueError(f"weight format {self.name}: block of {self.block_bits} bits is not whole bytes")

    @classmethod
    def parse(cls, text: str, group_size: int = 64) -> "WeightFormat":
        """Parse ``int8``, ``int4``, ``int4-2:4`` ... into a format."""
        mt = _FORMAT_RE.match(text.strip())
        if not mt:
            raise ValueError(f"bad weight format {text!r}: expected intB or intB-N:M, e.g. int4-2:4")
        bits = int(mt.group(1))
        if mt.group(2) is None:
            return cls(bits, 1, 1, group_size)
        return cls(bits, int(mt.group(2)), int(mt.group(3)), group_size)

    @property
    def dense(self) -> bool:
        return self.n_keep == self.m

    @property
    def name(self) -> str:
        return f"int{self.bits}" if self.dense else f"int{self.bits}-{self.n_keep}:{self.m}"

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    @property
    def kept_per_group(self) -> int:
        return self.group_size * self.n_keep // self.m

    @property
    def index_bits(self) -> int:
        return 0 if self.dense else (self.m - 1).bit_length()

    @property
    def block_bits(self) -> int:
        return self.kept_per_group * (self.bits + self.index_bits)

    @property
    def block_bytes(self) -> int:
        return self.block_bits // 8

    def bits_per_weight(self) -> float:
        """Stored bits per (dense) weight: values, indices and scales."""
        return (self.block_bits + SCALE_BITS) / self.group_size

    def check_shape(self, shape, what="tensor"):
        n, k = shape
        if k % self.group_size:
            raise ValueError(f"{what}: input size {k} is not a multiple of the quant group size {self.group_size}")


def quantize_groups(w: np.ndarray, fmt: WeightFormat, mask: np.ndarray | None = None,
                    clip: np.ndarray | float = 1.0):
    """Quantize a float matrix into this format's integers.

    Parameters
    ----------
    w : ndarray, shape (N, K)
    fmt : WeightFormat
    mask : bool ndarray (N, K), optional
        True for kept weights; must keep exactly ``n_keep`` of every ``m``-window.
        Defaults to all kept (dense formats only).
    clip : float or ndarray (N, K // G)
        Fraction of each block's absolute maximum the scale is set to (<= 1 clips
        outliers; the compressor searches it).

    Returns
    -------
    q : int8 ndarray (N, K), zero where pruned
    scales : uint16 ndarray (N, K // G)
    shift : int
        ``real = q * scales * 2**-shift``.
    """
    w = np.asarray(w, dtype=np.float32)
    n, k = w.shape
    g = fmt.group_size
    fmt.check_shape(w.shape)
    if mask is None:
        if not fmt.dense:
            raise ValueError(f"format {fmt.name} needs a sparsity mask")
        mask = np.ones(w.shape, dtype=bool)
    wm = np.where(mask, w, 0.0).reshape(n, k // g, g)
    absmax = np.abs(wm).max(axis=2) * np.asarray(clip, dtype=np.float32)
    scale = absmax / fmt.qmax                                   # real scale per block
    top = float(scale.max())
    if top <= 0.0 or not np.isfinite(top):
        shift = 0
    else:
        # Largest shift whose mantissas still fit SCALE_BITS (fixed point per tensor).
        shift = int(np.floor(np.log2(((1 << SCALE_BITS) - 1) / top)))
    mant = np.clip(np.rint(scale * np.float64(2.0) ** shift), 0, (1 << SCALE_BITS) - 1).astype(np.uint16)
    real = mant.astype(np.float64) * np.float64(2.0) ** -shift
    with np.errstate(divide="ignore", invalid="ignore"):
        qf = np.where(real[..., None] > 0, wm / real[..., None], 0.0)
    q = np.clip(np.rint(qf), -fmt.qmax, fmt.qmax).astype(np.int8).reshape(n, k)
    q[~mask] = 0
    return q, mant, shift


def _kept_and_indices(q: np.ndarray, mask: np.ndarray, fmt: WeightFormat):
    """Split a dense int matrix with an N:M mask into kept values and window indices."""
    n, k = q.shape
    windows = mask.reshape(n, k // fmt.m, fmt.m)
    counts = windows.sum(axis=2)
    bad = np.argwhere(counts != fmt.n_keep)
    if bad.size:
        r, wdw = bad[0]
        raise ValueError(f"mask keeps {counts[r, wdw]} of window {wdw} in row {r}, "
                         f"format {fmt.name} needs exactly {fmt.n_keep}")
    # Stable argsort puts kept positions first, in ascending order inside each window.
    order = np.argsort(~windows, axis=2, kind="stable")[..., :fmt.n_keep]
    qw = q.reshape(n, k // fmt.m, fmt.m)
    vals = np.take_along_axis(qw, order, axis=2)
    ng = k // fmt.group_size
    return (vals.reshape(n, ng, fmt.kept_per_group),
            order.astype(np.uint8).reshape(n, ng, fmt.kept_per_group))


def _to_bits(v: np.ndarray, width: int) -> np.ndarray:
    u = v.astype(np.int64) & ((1 << width) - 1)
    return ((u[..., None] >> np.arange(width)) & 1).astype(np.uint8).reshape(*v.shape[:-1], -1)


def _from_bits(bits: np.ndarray, count: int, width: int, signed: bool) -> np.ndarray:
    b = bits.reshape(*bits.shape[:-1], count, width).astype(np.int64)
    u = (b << np.arange(width)).sum(axis=-1)
    if signed:
        u = np.where(u >= 1 << (width - 1), u - (1 << width), u)
    return u


def pack_blocks(values: np.ndarray, indices: np.ndarray, fmt: WeightFormat) -> np.ndarray:
    """Pack (..., kept) values and indices into (..., block_bytes) uint8 blocks."""
    if values.shape[-1] != fmt.kept_per_group:
        raise ValueError(f"format {fmt.name}: expected {fmt.kept_per_group} kept values per block, got {values.shape[-1]}")
    if np.any(np.abs(values.astype(np.int64)) > fmt.qmax):
        raise ValueError(f"format {fmt.name}: value outside +-{fmt.qmax}")
    bits = [_to_bits(values, fmt.bits)]
    if fmt.index_bits:
        bits.append(_to_bits(indices, fmt.index_bits))
    return np.packbits(np.concatenate(bits, axis=-1), axis=-1, bitorder="little")


def unpack_blocks(blocks: np.ndarray, fmt: WeightFormat):
    """Inverse of :func:`pack_blocks`: (..., block_bytes) -> (values int8, indices uint8)."""
    bits = np.unpackbits(blocks, axis=-1, bitorder="little")
    k = fmt.kept_per_group
    values = _from_bits(bits[..., :k * fmt.bits], k, fmt.bits, signed=True).astype(np.int8)
    if fmt.index_bits:
        indices = _from_bits(bits[..., k * fmt.bits:], k, fmt.index_bits, signed=False).astype(np.uint8)
    else:
        indices = np.zeros(values.shape, dtype=np.uint8)
    return values, indices


def blocks_to_dense(values: np.ndarray, indices: np.ndarray, fmt: WeightFormat) -> np.ndarray:
    """(N, ngroups, kept) values + indices -> (N, K) int8 with zeros where pruned."""
    n, ng, k = values.shape
    if fmt.dense:
        return values.reshape(n, ng * fmt.group_size).copy()
    nwin = fmt.group_size // fmt.m
    out = np.zeros((n, ng, nwin, fmt.m), dtype=np.int8)
    np.put_along_axis(out, indices.reshape(n, ng, nwin, fmt.n_keep).astype(np.int64),
                      values.reshape(n, ng, nwin, fmt.n_keep), axis=3)
    return out.reshape(n, ng * fmt.group_size)


def stripe_order(n_rows: int, n_groups: int, chains: int, channels: int) -> np.ndarray:
    """Row and group of every block in each channel's stream.

    Returns an int array (channels, blocks_per_channel, 2) of (row, group); rows
    ``>= n_rows`` are padding. See the module docstring for the order.
    """
    if chains % channels:
        raise ValueError(f"chains ({chains}) must be a multiple of channels ({channels})")
    tiles = -(-n_rows // chains)
    t, g, j = np.meshgrid(np.arange(tiles), np.arange(n_groups), np.arange(chains), indexing="ij")
    rows = (t * chains + j).reshape(tiles, n_groups, chains // channels, channels)
    groups = np.broadcast_to(g.reshape(tiles, n_groups, chains // channels, channels), rows.shape)
    # channel c takes rows j = c, c+C, ...: move the channel axis first.
    rows = np.moveaxis(rows, 3, 0).reshape(channels, -1)
    groups = np.moveaxis(groups, 3, 0).reshape(channels, -1)
    return np.stack([rows, groups], axis=-1)


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass
class PackedTensor:
    """A weight matrix in its packed, channel-striped form.

    ``payload[c]`` and ``scales[c]`` are the bytes of channel ``c``; the region sizes
    (``payload_bytes``, ``scale_bytes``) are equal for every channel.
    """

    fmt: WeightFormat
    shape: tuple
    shift: int
    chains: int
    payload: list
    scales: list

    @property
    def channels(self) -> int:
        return len(self.payload)

    @property
    def payload_bytes(self) -> int:
        return len(self.payload[0])

    @property
    def scale_bytes(self) -> int:
        return len(self.scales[0])

    @property
    def channel_bytes(self) -> int:
        """Bytes one channel holds for this tensor (payload then scales, each aligned)."""
        return _align(self.payload_bytes) + _align(self.scale_bytes)

    def stored_bytes(self) -> int:
        """Bytes of values, indices and scales of the real rows (no padding, no alignment)."""
        n, k = self.shape
        return n * (k // self.fmt.group_size) * (self.fmt.block_bytes + SCALE_BITS // 8)

    def channel_image(self, c: int) -> bytes:
        pad = lambda b: bytes(b) + bytes(_align(len(b)) - len(b))
        return pad(self.payload[c]) + pad(self.scales[c])


def pack_tensor(q: np.ndarray, scales: np.ndarray, shift: int, fmt: WeightFormat,
                chains: int, channels: int, mask: np.ndarray | None = None) -> PackedTensor:
    """Pack a quantized matrix (from :func:`quantize_groups`) into channel images."""
    q = np.asarray(q)
    n, k = q.shape
    fmt.check_shape(q.shape)
    if mask is None:
        if not fmt.dense:
            raise ValueError(f"format {fmt.name}: packing a sparse tensor needs its mask "
                             "(a kept weight may quantize to 0)")
        mask = np.ones(q.shape, dtype=bool)
    if fmt.dense:
        vals = q.reshape(n, k // fmt.group_size, fmt.group_size)
        idx = np.zeros(vals.shape, dtype=np.uint8)
    else:
        vals, idx = _kept_and_indices(q, mask, fmt)
    blocks = pack_blocks(vals, idx, fmt)                        # (n, ng, block_bytes)
    ng = k // fmt.group_size
    order = stripe_order(n, ng, chains, channels)
    tiles_rows = -(-n // chains) * chains
    # Padding rows: zero values, scale 0, indices naming the first n_keep positions.
    pad_vals = np.zeros((1, 1, fmt.kept_per_group), dtype=np.int8)
    pad_idx = np.tile(np.arange(fmt.n_keep, dtype=np.uint8), fmt.kept_per_group // fmt.n_keep)[None, None]
    pad_block = pack_blocks(pad_vals, pad_idx if not fmt.dense else np.zeros_like(pad_vals, np.uint8), fmt)[0, 0]
    all_blocks = np.empty((tiles_rows, ng, fmt.block_bytes), dtype=np.uint8)
    all_blocks[:n] = blocks
    all_blocks[n:] = pad_block
    all_scales = np.zeros((tiles_rows, ng), dtype="<u2")
    all_scales[:n] = scales
    payload = [all_blocks[order[c, :, 0], order[c, :, 1]].tobytes() for c in range(channels)]
    scl = [all_scales[order[c, :, 0], order[c, :, 1]].tobytes() for c in range(channels)]
    return PackedTensor(fmt, (n, k), int(shift), chains, payload, scl)


def unpack_tensor(pt: PackedTensor):
    """Channel images -> (q int8 (N, K), scales uint16 (N, K//G), shift)."""
    n, k = pt.shape
    fmt = pt.fmt
    ng = k // fmt.group_size
    order = stripe_order(n, ng, pt.chains, pt.channels)
    rows_p = -(-n // pt.chains) * pt.chains
    vals = np.zeros((rows_p, ng, fmt.kept_per_group), dtype=np.int8)
    idx = np.zeros((rows_p, ng, fmt.kept_per_group), dtype=np.uint8)
    scales = np.zeros((rows_p, ng), dtype=np.uint16)
    nb = order.shape[1]
    for c in range(pt.channels):
        raw = np.frombuffer(bytes(pt.payload[c]), dtype=np.uint8)
        if raw.size < nb * fmt.block_bytes:
            raise ValueError(f"channel {c}: payload has {raw.size} bytes, format {fmt.name} "
                             f"shape {pt.shape} needs {nb * fmt.block_bytes}")
        v, i = unpack_blocks(raw[:nb * fmt.block_bytes].reshape(nb, fmt.block_bytes), fmt)
        r, g = order[c, :, 0], order[c, :, 1]
        vals[r, g], idx[r, g] = v, i
        s = np.frombuffer(bytes(pt.scales[c]), dtype="<u2")
        if s.size < nb:
            raise ValueError(f"channel {c}: scale region has {s.size} entries, needs {nb}")
        scales[r, g] = s[:nb]
    q = blocks_to_dense(vals[:n], idx[:n], fmt)
    return q, scales[:n], pt.shift
