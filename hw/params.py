"""Hardware parameters: the one definition every other part of flightllm takes.

The RTL generator sizes its modules from a :class:`HwParams`, the compiler tiles and
stripes weights by it, the golden model counts cycles with it and the runtime checks
that an artifact was built for the device it is about to drive. Every build writes
the parameters it used beside its output as JSON (:meth:`HwParams.to_json`).

Terms
-----
MAC
    One multiply-accumulate lane: an INT8 activation times an INT8-widened weight.
    Each maps onto one DSP48E2 (A*B+PCIN).
chain
    ``chain_len`` MACs that together reduce one output row; ``chains`` of them work
    on ``chains`` different output rows at once (a *row tile*).
DSP group
    ``dsp_group`` consecutive MACs of a chain joined by the fixed PCOUT->PCIN
    cascade. Between groups a configurable link either continues the sum or ends a
    segment at a reduction node, so one chain can serve several N:M patterns.
quant group
    ``group_size`` consecutive input elements of a weight row that share one
    fixed-point scale.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

__all__ = ["HwParams", "PRESETS", "get_preset"]


@dataclass(frozen=True)
class HwParams:
    """Every parameter of one accelerator build.

    Parameters
    ----------
    name : str
        Preset name, written into artifacts.
    clock_mhz : float
        Kernel clock the performance model assumes.
    chains : int
        Sparse DSP chains in the matrix engine (output rows computed in parallel).
    chain_len : int
        MACs per chain (kept weights consumed per chain per cycle).
    dsp_group : int
        MACs per DSP cascade group; ``chain_len`` is a multiple of it.
    group_size : int
        Input elements sharing one weight scale (G).
    weight_bits : tuple of int
        Signed weight widths the dequant units accept.
    nm_patterns : tuple of (int, int)
        ``(n_keep, m)`` sparsity patterns the sparse MUX supports; ``(m, m)`` is dense
        and always allowed for the widest ``m`` that divides ``group_size``.
    act_bits : int
        Width of activations entering the matrix engine.
    psum_bits : int
        Width of the per-quant-group partial sum (int32 in the golden model).
    scale_bits : int
        Width of the unsigned fixed-point group scale mantissa.
    acc_bits : int
        Width of the scaled accumulator (the DSP48E2 P register is 48 bits).
    weight_channels : int
        HBM pseudo-channels that stream weights (one streamer and dequant unit each);
        ``chains`` must be a multiple of it.
    kv_channels : int
        Pseudo-channels (the last ones of the weight channels) that also hold the KV
        cache.
    hbm_port_bits : int
        Data width of one AXI4 master port at the kernel clock.
    hbm_channel_gbps : float
        Sustained bandwidth of one pseudo-channel (GB/s) for the performance model.
    act_buf_depth : int
        Elements per row of each on-chip buffer (the MPE's INT8 activation buffer and
        the SFU's float32 buffers). The attention-score row of a decode step needs
        ``heads * max_seq_len`` (131072 for LLaMA2-7B at 4096), which sets the large presets.
    kv_tile : int
        KV-cache positions moved per LD/ST and processed per attention loop trip.
    sfu_lanes : int
        Elements the special-function unit handles per cycle.
    max_seq_len : int
        Longest sequence the instruction programs and KV cache are sized for.
    mm_tokens : int
        Most activation vectors (tokens) one MM operation of the matrix engine takes:
        each weight beat is held for that many cycles, and every chain keeps that many
        partial sums and accumulators (SRL delay lines).
    """

    name: str
    clock_mhz: float
    chains: int
    chain_len: int
    dsp_group: int
    group_size: int = 64
    weight_bits: tuple = (8, 4, 3, 2)
    nm_patterns: tuple = ((1, 4), (2, 4), (2, 8), (4, 8), (8, 16), (4, 4), (8, 8), (16, 16))
    act_bits: int = 8
    psum_bits: int = 32
    scale_bits: int = 16
    acc_bits: int = 48
    weight_channels: int = 2
    kv_channels: int = 1
    hbm_port_bits: int = 512
    hbm_channel_gbps: float = 14.375
    act_buf_depth: int = 8192
    kv_tile: int = 64
    sfu_lanes: int = 16
    max_seq_len: int = 2048
    mm_tokens: int = 16

    def __post_init__(self):
        def need(cond, what):
            if not cond:
                raise ValueError(f"HwParams {self.name!r}: {what}")

        for f in ("chains", "chain_len", "dsp_group", "group_size", "weight_channels",
                  "kv_channels", "hbm_port_bits", "act_buf_depth", "kv_tile",
                  "sfu_lanes", "max_seq_len", "mm_tokens"):
            need(isinstance(getattr(self, f), int) and getattr(self, f) > 0,
                 f"{f} must be a positive int, not {getattr(self, f)!r}")
        need(self.chain_len % self.dsp_group == 0,
             f"chain_len ({self.chain_len}) must be a multiple of dsp_group ({self.dsp_group})")
        # Each weight streamer feeds a fixed set of chains (see formats.stripe_order).
        need(self.chains % self.weight_channels == 0,
             f"chains ({self.chains}) must be a multiple of weight_channels ({self.weight_channels})")
        for n, m in self.nm_patterns:
            need(0 < n <= m and m & (m - 1) == 0,
                 f"N:M pattern {n}:{m} needs 0 < n <= m and m a power of two")
            need(self.group_size % m == 0,
                 f"N:M pattern {n}:{m}: m must divide group_size {self.group_size}")
        for b in self.weight_bits:
            need(2 <= b <= self.act_bits, f"weight width {b} must be in 2..{self.act_bits}")
        need(self.max_seq_len % self.kv_tile == 0,
             f"max_seq_len ({self.max_seq_len}) must be a multiple of kv_tile ({self.kv_tile})")

    # -- derived quantities -------------------------------------------------------
    @property
    def macs(self) -> int:
        """MAC lanes in the matrix engine."""
        return self.chains * self.chain_len

    @property
    def hbm_weight_bytes_per_cycle(self) -> float:
        """Weight bytes the streamers deliver per kernel cycle (bandwidth-bound)."""
        per_channel = min(self.hbm_channel_gbps * 1e9 / (self.clock_mhz * 1e6),
                          self.hbm_port_bits / 8)
        return per_channel * self.weight_channels

    def supports(self, n_keep: int, m: int, bits: int) -> bool:
        return (n_keep, m) in self.nm_patterns and bits in self.weight_bits

    # -- serialisation ------------------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["weight_bits"] = list(self.weight_bits)
        d["nm_patterns"] = [list(p) for p in self.nm_patterns]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "HwParams":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"HwParams: unknown field(s) {sorted(unknown)}")
        d = dict(d)
        if "weight_bits" in d:
            d["weight_bits"] = tuple(d["weight_bits"])
        if "nm_patterns" in d:
            d["nm_patterns"] = tuple(tuple(p) for p in d["nm_patterns"])
        return cls(**d)


PRESETS = {
    # Alveo U280: all 32 HBM pseudo-channels stream weights; the KV cache shares the
    # last 4 of them (attention and weight streaming do not overlap in decode).
    # 128 chains x 32 MACs = 4096 MAC lanes, enough to keep up with ~2 KB/cycle of
    # INT4 weights at 225 MHz (FlightLLM's clock).
    "u280": HwParams(name="u280", clock_mhz=225.0, chains=128, chain_len=32, dsp_group=8,
                     weight_channels=32, kv_channels=4, hbm_port_bits=512,
                     hbm_channel_gbps=14.375, act_buf_depth=131072, kv_tile=64,
                     sfu_lanes=32, max_seq_len=4096),
    # Versal HBM VHK158: 819 GB/s HBM2e in 64 pseudo-channels of ~12.8 GB/s.
    "vhk158": HwParams(name="vhk158", clock_mhz=300.0, chains=128, chain_len=64, dsp_group=8,
                       weight_channels=64, kv_channels=8, hbm_port_bits=512,
                       hbm_channel_gbps=12.8, act_buf_depth=131072, kv_tile=64,
                       sfu_lanes=64, max_seq_len=4096),
    # Small enough to simulate in seconds under Verilator.
    "sim": HwParams(name="sim", clock_mhz=100.0, chains=4, chain_len=8, dsp_group=4,
                    weight_channels=2, kv_channels=1, hbm_port_bits=256,
                    hbm_channel_gbps=1.6, act_buf_depth=8192, kv_tile=16,
                    sfu_lanes=8, max_seq_len=512),
}


def get_preset(name: str) -> HwParams:
    """Return the named preset, with a clear error for an unknown name."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown hardware preset {name!r}; choose one of {sorted(PRESETS)}") from None
