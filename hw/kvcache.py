"""The KV cache in HBM: one definition of where every key, value and scale lives.

The matrix engine computes attention by streaming the cache like a weight tensor
(``QK`` and ``PV`` in :mod:`flightllm.hw.isa`), so the values are stored as *raw*
packed tensors (:mod:`flightllm.hw.formats`, ``int8r/32`` or ``int4r/32``: signed
integers, no scales in the records) in the weight channels, after the weights, and
stream through the same streamers and dequant units, over every weight channel.

Values (weight channels, from ``base``; one region per layer, kind and kv head)
------------------------------------------------------------------------------
``K[l, g]``
    rows = positions ``0 .. cap-1``, columns = the ``head_dim`` elements of kv head
    ``g``: QK is a matrix-vector (or, for the query heads sharing ``g``, matrix-matrix)
    product with it, streaming its first ``ceil(length / chains)`` row tiles.
``V[l, g]``
    stored transposed: rows = the ``head_dim`` elements, columns = positions: PV is a
    matrix-vector product with it, streaming of every row tile the first
    ``ceil(length / 32)`` groups (groups of :data:`KV_GROUP` positions; the
    probabilities are quantized per group of the same size).

A layer holds the K regions of its kv heads, then their V regions
(:meth:`KvLayout.head_offset`); every region is padded to ``ALIGN`` bytes and has the
same offset in every channel, like a weight tensor.

ST_KT writes the rows of new positions into these tensors. A K row of one position is
``head_dim`` consecutive values of one chain (whole bytes, also for INT4); a V column
is one value per row: for INT4 two positions share a byte, so the store unit
read-modify-writes the byte (the golden model writes the nibble).

Scales (space ``KV`` of LD/ST)
------------------------------
One float32 per (position, kv head), written by ST_KV from QUANT's per-head scales and
read back by LD_KV before attention: row ``(2 * l + kind) * cap + pos`` of
``4 * kv_heads`` bytes (:meth:`KvLayout.scale_addr`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .formats import ALIGN, WeightFormat, align, region_bytes, value_bits

__all__ = ["KV_GROUP", "KvLayout", "K", "V"]

KV_GROUP = 32       #: positions per V group (the probabilities' quantization group) and
                    #: head elements per K group: the group size of every KV format
K, V = 0, 1         #: the two kinds


@dataclass(frozen=True)
class KvLayout:
    """The KV cache of one model on one build.

    Parameters
    ----------
    layers, kv_heads, head_dim : int
        The model's attention shape.
    cap : int
        Positions the cache holds (the programs' ``max_seq``).
    fmt : WeightFormat
        ``int8r/32`` or ``int4r/32``: the keys' format, and the values' unless ``fmt_v``.
    params : HwParams
        The build (chains, weight channels, chain length).
    base : int
        Byte offset of the cache in every weight channel (after the weights).
    fmt_v : WeightFormat, optional
        The values' format when it differs from the keys' (INT8 K with INT4 V: keys
        carry outlier channels that 4 bits per (position, head) cannot hold, values do not).
    """

    layers: int
    kv_heads: int
    head_dim: int
    cap: int
    fmt: WeightFormat
    params: object
    base: int = 0
    fmt_v: WeightFormat | None = None

    def __post_init__(self):
        if self.fmt_v is None:
            object.__setattr__(self, "fmt_v", self.fmt)     # frozen: set once, here
        for f in (self.fmt, self.fmt_v):
            if not isinstance(f, WeightFormat) or not f.raw or f.group_size != KV_GROUP:
                raise ValueError(f"KV cache format must be a raw format with groups of {KV_GROUP} "
                                 f"(int8r/32, int4r/32), not {getattr(f, 'name', f)!r}")
            self.params.check_kv_format(f)
        if self.head_dim % KV_GROUP or self.cap % KV_GROUP:
            raise ValueError(f"KV cache: head_dim {self.head_dim} and capacity {self.cap} must be "
                             f"multiples of {KV_GROUP}")
        if self.base % ALIGN:
            raise ValueError(f"KV cache: base {self.base} is not a multiple of {ALIGN}")

    # -- geometry ---------------------------------------------------------------
    def fmt_of(self, kind: int) -> WeightFormat:
        return self.fmt if kind == K else self.fmt_v

    def shape(self, kind: int) -> tuple:
        """(rows, columns) of one head's tensor: K (cap, head_dim), V (head_dim, cap)."""
        return (self.cap, self.head_dim) if kind == K else (self.head_dim, self.cap)

    def head_bytes(self, kind: int) -> int:
        """Bytes of one head's region in every channel (aligned)."""
        return align(region_bytes(self.fmt_of(kind), self.shape(kind), self.params))

    @property
    def layer_bytes(self) -> int:
        return self.kv_heads * (self.head_bytes(K) + self.head_bytes(V))

    @property
    def channel_bytes(self) -> int:
        """Bytes of the whole cache in every weight channel."""
        return self.layers * self.layer_bytes

    def head_offset(self, layer: int, kind: int, g: int) -> int:
        """Byte offset of region ``(layer, kind, g)`` in every channel."""
        return (self.base + layer * self.layer_bytes + (self.kv_heads * self.head_bytes(K) if kind else 0)
                + g * self.head_bytes(kind))

    def locate(self, off: int) -> tuple:
        """``(layer, kind, g)`` of the region starting at byte ``off`` (inverse of
        :meth:`head_offset`); ``ValueError`` if no region starts there."""
        layer, rem = divmod(off - self.base, self.layer_bytes)
        kb = self.kv_heads * self.head_bytes(K)
        kind = K if rem < kb else V
        g, r = divmod(rem - (kb if kind else 0), self.head_bytes(kind))
        if not 0 <= layer < self.layers or r:
            raise ValueError(f"KV cache: no head region starts at byte {off}")
        return layer, kind, g

    def stream(self, kind: int, attended) -> tuple:
        """``(records, bytes)`` one channel streams for one head: ``attended`` is the number
        of positions attended (``0 .. n-1``) or a bool mask of them (block-sparse).

        K: the row tiles (``chains`` positions) holding an attended position, ``head_dim /
        32`` records each; V: of every row tile, the groups of 32 positions holding one
        (strided by ``cap / 32``)."""
        p = self.params
        att = np.asarray(attended)
        pos = np.nonzero(att)[0] if att.dtype == bool else np.arange(int(att))
        if kind == K:
            recs = np.unique(pos // p.chains).size * (self.head_dim // KV_GROUP)
        else:
            recs = -(-self.head_dim // p.chains) * np.unique(pos // KV_GROUP).size
        return recs, recs * region_bytes(self.fmt_of(kind), (p.chains, KV_GROUP), p)

    # -- scales -------------------------------------------------------------------
    @property
    def scale_row_bytes(self) -> int:
        return 4 * self.kv_heads

    def scale_addr(self, layer: int, kind: int) -> int:
        """Byte address (space KV) of position 0's scale row of ``(layer, kind)``."""
        return (2 * layer + kind) * self.cap * self.scale_row_bytes

    @property
    def scale_bytes(self) -> int:
        return 2 * self.layers * self.cap * self.scale_row_bytes

    # -- values: row writes and reads ---------------------------------------------------
    def _where(self, kind, pos, d):
        """(channel, bit offset in the head region) of values at positions ``pos``, elements ``d``."""
        rows, cols = (pos, d) if kind == K else (d, pos)
        return value_bits(self.fmt_of(kind), self.shape(kind), self.params, rows, cols)

    def write(self, channels, layer: int, kind: int, pos0: int, values: np.ndarray) -> int:
        """Store ``values`` (T, kv_heads, head_dim) int8 as positions ``pos0 ..`` of
        ``(layer, kind)`` into ``channels`` (list of writable uint8 arrays); returns
        :meth:`write_beats`."""
        v = np.asarray(values)
        t = v.shape[0]
        if v.shape != (t, self.kv_heads, self.head_dim):
            raise ValueError(f"KV write: values {v.shape}, expected (T, {self.kv_heads}, {self.head_dim})")
        if pos0 < 0 or pos0 + t > self.cap:
            raise ValueError(f"KV write: positions {pos0}..{pos0 + t - 1} beyond the cache ({self.cap})")
        f = self.fmt_of(kind)
        bits, lo, hi = f.bits, f.qmin, f.qmax
        if v.size and (v.min() < lo or v.max() > hi):
            raise ValueError(f"KV write: a value lies outside [{lo}, {hi}] of {f.name}")
        ch, bit = self._positions(kind, pos0, t)
        for g in range(self.kv_heads):
            off = 8 * self.head_offset(layer, kind, g)
            for c in np.unique(ch):
                m = ch == c
                b = off + bit[m]
                img = channels[c]
                byte = b >> 3
                if bits == 8:
                    img[byte] = v[:, g][m].astype(np.int8).view(np.uint8)
                else:
                    sh = (b & 7).astype(np.uint8)
                    mask = np.uint8((1 << bits) - 1)
                    val = (v[:, g][m].astype(np.int64) & int(mask)).astype(np.uint8)
                    np.bitwise_and.at(img, byte, ~(mask << sh))      # .at: two nibbles may share a byte
                    np.bitwise_or.at(img, byte, val << sh)
        return self._beats(ch, bit)

    def _positions(self, kind, pos0, rows):
        return self._where(kind, pos0 + np.arange(rows)[:, None], np.arange(self.head_dim)[None, :])

    def _beats(self, ch, bit) -> int:
        # head regions are ALIGN-aligned, so every head touches the same beats of its region
        per_head = [np.unique(bit[ch == c] // (8 * ALIGN)).size for c in range(self.params.weight_channels)]
        return self.kv_heads * max(per_head, default=0)

    def write_beats(self, kind: int, pos0: int, rows: int) -> int:
        """64-byte beats a write of ``rows`` positions from ``pos0`` touches in its busiest
        channel (the store's cost: every channel writes in parallel)."""
        return self._beats(*self._positions(kind, pos0, rows)) if rows > 0 else 0

    def read(self, channels, layer: int, kind: int, g: int, length: int) -> np.ndarray:
        """Positions ``0 .. length-1`` of head ``g`` as int8 (length, head_dim)."""
        pos = np.arange(length)[:, None]
        d = np.arange(self.head_dim)[None, :]
        ch, bit = self._where(kind, pos, d)
        bit = bit + 8 * self.head_offset(layer, kind, g)
        out = np.zeros((length, self.head_dim), np.int64)
        bits = self.fmt_of(kind).bits
        for c in np.unique(ch):
            m = ch == c
            img = np.asarray(channels[c])
            b = bit[m]
            val = (img[b >> 3].astype(np.int64) >> (b & 7)) & ((1 << bits) - 1)
            out[m] = np.where(val >= 1 << (bits - 1), val - (1 << bits), val)
        return out.astype(np.int8)
