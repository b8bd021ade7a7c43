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
    consecutive input elements of a weight row that share one scale (and min); its
    size is part of the weight format (:mod:`flightllm.hw.formats`), 32 for GGUF's
    Q8_0 / Q4_0 / Q4_1. One group is ``bpb`` whole beats of a chain.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from .formats import WeightFormat

__all__ = ["HwParams", "PRESETS", "get_preset", "DEFAULT_FORMATS", "DEFAULT_KV_FORMATS", "ACT_MAX", "WEIGHT_MAX", "FACTOR_MAX"]

#: The matrix engine's number ranges (every build: ``act_bits`` 8, ``act_factor_bits`` 8).
ACT_MAX = 127        #: activations are INT8 in [-ACT_MAX, ACT_MAX] (the requantizers never emit -128)
WEIGHT_MAX = 128     #: largest |weight| of an INT8-widened lane (two's complement -128)
FACTOR_MAX = 255     #: largest per-group activation factor (8 bits unsigned)

#: GGUF's Q8_0, Q4_0 and Q4_1 as they are (``native``), the two-level 4.5-bit
#: ``int4k/32`` of ``w4k``, and the 2:4 / 4:8-sparse INT4 formats of the sparse presets,
#: with groups of 64 so a group's 32 kept weights fill one 32-lane beat. Dropped from v1: 8:16 (a 16:1 sparse MUX on every
#: lane), 1:4 and 2:8 (8 kept per 32-group: chain segments with their own scales) and
#: INT2/INT3 and 2:4 INT8 (no preset within the quality targets used them; int8-2:4/64
#: would also grow the largest record, the aligner's width, from 1088 to 1344 bits).
DEFAULT_FORMATS = ("int8/32", "int4/32", "int4m/32", "int4k/32", "int4-2:4/64", "int4-4:8/64")

#: The KV cache's formats (:mod:`flightllm.hw.kvcache`): raw signed INT8 or INT4 values in
#: groups of 32 positions (PV) or 32 head dimensions (QK), with no scales in the records.
DEFAULT_KV_FORMATS = ("int8r/32", "int4r/32")


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
    weight_formats : tuple of str
        The packed weight formats this build runs (:class:`~flightllm.hw.formats.WeightFormat`
        names such as ``int4m/32``); the compiler refuses any other. Each adds a case
        to the dequant unit's lane muxes, and the largest ``m`` sets every lane's sparse MUX.
    kv_formats : tuple of str
        The raw formats the KV cache may be stored in (``int8r/32``, ``int4r/32``): the
        dequant units decode them too (:meth:`engine_formats`); a compile chooses one.
    act_bits : int
        Width of activations entering the matrix engine (INT8, in [-127, 127]).
    act_factor_bits : int
        Width of the unsigned per-group activation factor ``u`` (the requantizer's
        group scale relative to the vector's: :func:`flightllm.runtime.sfu.requantize_groups`).
    acc_bits : int
        Width of the wrapping per-row accumulator of the scaled group sums.
    weight_channels : int
        HBM pseudo-channels that stream weights (one streamer and dequant unit each);
        ``chains`` must be a multiple of it.
    kv_channels : int
        Pseudo-channels the LD/ST address spaces (the KV cache's scales, the logits) are
        interleaved over, in 64-byte granules (the last ``kv_channels`` weight channels).
        The KV cache's values live in every weight channel (:mod:`flightllm.hw.kvcache`).
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
    sfu_acc_slots : int
        Accumulators per SFU lane in a sum (a power of two at least the float adder's
        latency): consecutive beats of a lane go to consecutive slots, so a pipelined
        adder accumulates every cycle. Part of the SFU's reduction order (the spec).
    max_seq_len : int
        Longest sequence the instruction programs and KV cache are sized for.
    stream_fifo_beats : int
        Depth, in ``hbm_port_bits`` words, of each weight channel's stream FIFO between
        the AXI read master and the dequant unit: how far weights and KV records stream
        ahead of compute (the ISA's overlap rule 2).
    buf_hidden, buf_ffn, buf_vocab, buf_heads, buf_kv_heads, buf_tables : int
        The model envelope the on-chip buffers are sized for (:func:`flightllm.hw.buffers.buffer_map`):
        elements per row of the model-width buffers (residual, queries, keys, values,
        attention output), of the FFN-width ones (gate, up, the int8 FFN input), of the
        logits; query heads (score and probability rows hold ``buf_heads x max_seq_len``)
        and kv heads (the KV scale buffers hold ``max_seq_len x buf_kv_heads``); float32
        elements of the SFU tables (norm weights, the RoPE table). Every buffer holds
        ``mm_tokens`` rows (the KV scales ``max_seq_len``). The compiler refuses a model
        whose programs need more (:func:`flightllm.compiler.schedule.check_buffers`).
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
    weight_formats: tuple = DEFAULT_FORMATS
    kv_formats: tuple = DEFAULT_KV_FORMATS
    act_bits: int = 8
    act_factor_bits: int = 8
    acc_bits: int = 64
    weight_channels: int = 2
    kv_channels: int = 1
    hbm_port_bits: int = 512
    hbm_channel_gbps: float = 14.375
    act_buf_depth: int = 8192
    kv_tile: int = 64
    sfu_lanes: int = 16
    sfu_acc_slots: int = 8
    max_seq_len: int = 2048
    mm_tokens: int = 16
    stream_fifo_beats: int = 512
    buf_hidden: int = 1024
    buf_ffn: int = 4096
    buf_vocab: int = 8192
    buf_heads: int = 16
    buf_kv_heads: int = 8
    buf_tables: int = 65536

    def __post_init__(self):
        def need(cond, what):
            if not cond:
                raise ValueError(f"HwParams {self.name!r}: {what}")

        for f in ("chains", "chain_len", "dsp_group", "weight_channels",
                  "kv_channels", "hbm_port_bits", "act_buf_depth", "kv_tile",
                  "sfu_lanes", "sfu_acc_slots", "max_seq_len", "mm_tokens", "stream_fifo_beats",
                  "buf_hidden", "buf_ffn", "buf_vocab", "buf_heads", "buf_kv_heads", "buf_tables"):
            need(isinstance(getattr(self, f), int) and getattr(self, f) > 0,
                 f"{f} must be a positive int, not {getattr(self, f)!r}")
        need(self.chain_len % self.dsp_group == 0,
             f"chain_len ({self.chain_len}) must be a multiple of dsp_group ({self.dsp_group})")
        # Each weight streamer feeds a fixed set of chains (see formats.stripe_order).
        need(self.chains % self.weight_channels == 0,
             f"chains ({self.chains}) must be a multiple of weight_channels ({self.weight_channels})")
        need(isinstance(self.weight_formats, tuple) and self.weight_formats,
             "weight_formats must be a non-empty tuple of format names")
        need(len(set(self.weight_formats)) == len(self.weight_formats), "weight_formats lists a format twice")
        for field_name, names, raw in (("weight_formats", self.weight_formats, False),
                                       ("kv_formats", self.kv_formats, True)):
            need(isinstance(names, tuple), f"{field_name} must be a tuple of format names")
            for name in names:
                try:
                    fmt = WeightFormat.parse(name)
                except ValueError as e:
                    need(False, f"{field_name}: {e}")
                need(fmt.name == name, f"{field_name}: write {name!r} as {fmt.name!r}")
                need(fmt.raw == raw, f"{field_name}: {name} is {'not ' if raw else ''}a raw format")
                need(fmt.kept_per_group % self.chain_len == 0,
                     f"format {name} keeps {fmt.kept_per_group} weights per group, not a multiple of "
                     f"chain_len {self.chain_len} (a beat never splits a group's lanes)")
        need(self.act_bits == 8 and self.act_factor_bits == 8,
             "act_bits and act_factor_bits must be 8 (ACT_MAX, FACTOR_MAX and the SFU's requantizers assume it)")
        need(self.sfu_acc_slots & (self.sfu_acc_slots - 1) == 0,
             f"sfu_acc_slots ({self.sfu_acc_slots}) must be a power of two (the reduction tree pairs them)")
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
        return self.hbm_channel_bytes_per_cycle * self.weight_channels

    @property
    def hbm_channel_bytes_per_cycle(self) -> float:
        """Bytes one pseudo-channel delivers per kernel cycle (bandwidth- or port-bound)."""
        return min(self.hbm_channel_gbps * 1e9 / (self.clock_mhz * 1e6), self.hbm_port_bits / 8)

    def formats(self) -> tuple:
        """The build's :class:`~flightllm.hw.formats.WeightFormat` set, in ``weight_formats`` order."""
        return tuple(WeightFormat.parse(n) for n in self.weight_formats)

    def engine_formats(self) -> tuple:
        """Every format the dequant units decode: the weight formats, then the KV formats."""
        return self.formats() + tuple(WeightFormat.parse(n) for n in self.kv_formats)

    def check_kv_format(self, fmt: WeightFormat, what: str = "KV cache") -> None:
        """Raise ``ValueError`` naming ``what`` if the build does not store its KV cache in ``fmt``."""
        if fmt.name not in self.kv_formats:
            raise ValueError(f"{what}: format {fmt.name} is not in hardware preset {self.name!r}'s KV "
                             f"formats ({', '.join(self.kv_formats)})")

    def check_format(self, fmt: WeightFormat, what: str = "tensor") -> None:
        """Raise ``ValueError`` naming ``what`` if the build does not run ``fmt``."""
        if fmt.name not in self.weight_formats:
            raise ValueError(f"{what}: format {fmt.name} is not in hardware preset {self.name!r}'s "
                             f"set ({', '.join(self.weight_formats)})")

    # -- serialisation ------------------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["weight_formats"] = list(self.weight_formats)
        d["kv_formats"] = list(self.kv_formats)
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
        for key in ("weight_formats", "kv_formats"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)


#: The on-chip buffers of the big presets hold LLaMA2-7B (hidden 4096, FFN 11008, 32 heads of
#: 128, 4096 positions) and SmolLM2's 49152 logits: about 17 MiB of activations, scores and KV
#: scales and 3.1 MiB of tables (norm weights and the RoPE table); the small presets' defaults
#: hold the test models (and SmolLM2's layers, but not its logits).
LLAMA2_7B_BUFFERS = dict(buf_hidden=4096, buf_ffn=11008, buf_vocab=49152, buf_heads=32, buf_kv_heads=32,
                         buf_tables=4096 * 128 + 65 * 4096)

PRESETS = {
    # Alveo U280: all 32 HBM pseudo-channels stream weights and the KV cache; the LD/ST
    # spaces (KV scales, logits) are interleaved over all of them too, so no channel
    # carries more than its share. 512-word stream FIFOs (8 BRAM36 per channel).
    # 128 chains x 32 MACs = 4096 MAC lanes, enough to keep up with ~2 KB/cycle of
    # INT4 weights at 225 MHz (FlightLLM's clock).
    "u280": HwParams(name="u280", clock_mhz=225.0, chains=128, chain_len=32, dsp_group=8,
                     weight_channels=32, kv_channels=32, hbm_port_bits=512,
                     hbm_channel_gbps=14.375, act_buf_depth=131072, kv_tile=64,
                     sfu_lanes=32, max_seq_len=4096, **LLAMA2_7B_BUFFERS),
    # Versal HBM VHK158: 819 GB/s HBM2e in 64 pseudo-channels of ~12.8 GB/s.
    "vhk158": HwParams(name="vhk158", clock_mhz=300.0, chains=256, chain_len=32, dsp_group=8,
                       weight_channels=64, kv_channels=64, hbm_port_bits=512,
                       hbm_channel_gbps=12.8, act_buf_depth=131072, kv_tile=64,
                       sfu_lanes=64, max_seq_len=4096, **LLAMA2_7B_BUFFERS),
    # Small enough to simulate in seconds under Verilator.
    "sim": HwParams(name="sim", clock_mhz=100.0, chains=4, chain_len=8, dsp_group=4,
                    weight_channels=2, kv_channels=1, hbm_port_bits=256,
                    hbm_channel_gbps=1.6, act_buf_depth=8192, kv_tile=16,
                    sfu_lanes=8, max_seq_len=512),
    # The sim preset at the u280's per-channel ratios: 4 chains per weight channel and an
    # HBM port whose sustained rate equals its width at the clock (as on the u280).
    "sim-mc": HwParams(name="sim-mc", clock_mhz=100.0, chains=8, chain_len=16, dsp_group=4,
                       weight_channels=2, kv_channels=1, hbm_port_bits=256,
                       hbm_channel_gbps=3.2, act_buf_depth=8192, kv_tile=16,
                       sfu_lanes=8, max_seq_len=512),
    # The u280's own per-channel geometry (4 chains of 32 lanes per 512-bit channel,
    # dsp_group 8) with 2 of its 32 channels: what the RTL tests simulate of the u280.
    "u280-2ch": HwParams(name="u280-2ch", clock_mhz=225.0, chains=8, chain_len=32, dsp_group=8,
                         weight_channels=2, kv_channels=1, hbm_port_bits=512,
                         hbm_channel_gbps=14.375, act_buf_depth=8192, kv_tile=64,
                         sfu_lanes=32, max_seq_len=512),
}


def get_preset(name: str) -> HwParams:
    """The named preset, or the parameters of a ``params.json`` file (what every build
    writes beside its output); a clear error for an unknown name or a bad file."""
    if name in PRESETS:
        return PRESETS[name]
    if str(name).endswith(".json"):
        from pathlib import Path

        path = Path(name)
        try:
            return HwParams.from_dict(json.loads(path.read_text()))
        except OSError as e:
            raise ValueError(f"{path}: cannot read hardware parameters ({e.strerror})") from None
        except (json.JSONDecodeError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: bad hardware parameters ({e})") from None
    raise ValueError(f"unknown hardware preset {name!r}; choose one of {sorted(PRESETS)} or a params.json file")
