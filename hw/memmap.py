"""Where the kernel's data lives in HBM: the one definition of every channel buffer's layout.

Each weight channel ``c`` (``C = weight_channels``) is one buffer (one HBM pseudo-channel on
the U280, one ``m_axi_chNN`` port, the pointer argument ``chNN``)::

  0 ............ weights image (weights/chNN.bin)
  kv_base ...... the KV cache's raw values (hw/kvcache.py; kv_channel_bytes)
  kv_space ..... \\
  out_space .....  > the LD/ST spaces and the token buffer, on the last ``kv_channels``
  tok_space ..... /  channels only (the others end after the KV cache)

The spaces (:class:`~flightllm.hw.isa.Space` ``KV`` and ``OUT``, and the token buffer of one
little-endian int32 id per position) are byte arrays interleaved over the last
``kv_channels`` channels in :data:`GRANULE`-byte granules: byte ``a`` of a space is in
channel ``C - kv_channels + (a // GRANULE) % kv_channels`` at
``space offset + (a // GRANULE // kv_channels) * GRANULE + a % GRANULE``
(:meth:`MemoryMap.locate`). The space offsets are kernel arguments (``kv_space``,
``out_space``, ``tok_space`` in :mod:`flightllm.hw.regmap`), the same in every channel,
set by the host from :func:`memory_map`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .params import HwParams

__all__ = ["GRANULE", "PAGE", "MemoryMap", "memory_map", "interleave"]

GRANULE = 64            #: bytes of a space on one channel before the next channel takes over
PAGE = 4096             #: every region starts on a page (an AXI burst never crosses one)


def _up(n: int, a: int) -> int:
    return -(-n // a) * a


def interleave(addr: int, kv_channels: int, channels: int) -> tuple[int, int]:
    """Space byte ``addr`` -> (channel, byte offset from the space's start in that channel)."""
    g, b = divmod(addr, GRANULE)
    return channels - kv_channels + g % kv_channels, (g // kv_channels) * GRANULE + b


@dataclass(frozen=True)
class MemoryMap:
    """Byte offsets of the regions in every channel buffer and the buffers' sizes."""
    channels: int
    kv_channels: int
    kv_base: int
    kv_space: int
    out_space: int
    tok_space: int
    size: int               #: bytes of each of the last kv_channels buffers
    size_plain: int         #: bytes of the other buffers (weights and KV cache only)

    def locate(self, space: str, addr: int) -> tuple[int, int]:
        """(channel, byte offset in its buffer) of byte ``addr`` of ``space`` ('KV', 'OUT', 'TOK')."""
        base = {"KV": self.kv_space, "OUT": self.out_space, "TOK": self.tok_space}[space]
        c, off = interleave(addr, self.kv_channels, self.channels)
        return c, base + off

    def channel_size(self, c: int) -> int:
        return self.size if c >= self.channels - self.kv_channels else self.size_plain

    def space_bytes(self, nbytes: int) -> int:
        """Bytes one channel holds of a space of ``nbytes``."""
        return _up(-(-nbytes // GRANULE), self.kv_channels) // self.kv_channels * GRANULE

    def args(self) -> dict:
        """The kernel arguments this map sets (:mod:`flightllm.hw.regmap`)."""
        return {"kv_space": self.kv_space, "out_space": self.out_space, "tok_space": self.tok_space}


def memory_map(params: HwParams, plan: dict, weights_bytes: int) -> MemoryMap:
    """The layout for an artifact: ``plan`` is its manifest's ``programs.plan`` (KV cache
    base and sizes, ``max_seq``, ``out_row_bytes``), ``weights_bytes`` the largest channel image."""
    C, kv = params.weight_channels, params.kv_channels
    kv_base = plan.get("kv_base", weights_bytes)
    if weights_bytes > kv_base:
        raise ValueError(f"weights of {weights_bytes} bytes run into the KV cache at {kv_base}")
    end = kv_base + plan.get("kv_channel_bytes", 0)
    per = lambda n: _up(-(-n // GRANULE), kv) // kv * GRANULE           # noqa: E731
    kv_space = _up(end, PAGE)
    out_space = _up(kv_space + per(plan.get("kv_bytes", 0)), PAGE)
    tok_space = _up(out_space + per(plan["max_seq"] * plan["out_row_bytes"]), PAGE)
    size = _up(tok_space + per(4 * plan["max_seq"]), PAGE)
    return MemoryMap(C, kv, kv_base, kv_space, out_space, tok_space, size, _up(end, PAGE))
