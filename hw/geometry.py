"""Build-time geometry of the matrix-engine RTL and its run-time format codes.

The dequant units, the sparse DSP chains and the MPE all size themselves from one
:class:`EngineGeometry`, derived from :class:`~flightllm.hw.params.HwParams`. It also
owns the *format code*: the small integer an operation's config carries to choose, at
run time, one of the formats the build decodes (:meth:`HwParams.engine_formats`): the
weight formats (``HwParams.weight_formats``, codes ``0 ..``) and then the KV cache's raw
formats (``HwParams.kv_formats``, the next codes), each list in its own order. The
packed layout itself is :mod:`flightllm.hw.formats`.

Raw formats (``int8r/32``, ``int4r/32``: ``fmt.raw``, instruction kind 3) are how the
attention operations run on the engine: QK is an MM with one kv head's K cache as the
"weight" (rows = positions, K = head_dim) and the queries of the heads sharing it as the
tokens (factors ``u = 1``); PV an MV/MM with the transposed V cache (rows = head_dim,
K = positions) and the quantized attention probabilities as activations. Their records
are the values alone (no scale, no min): the dequant units give every chain the
fixed-point scale 1 and min 0, so ``acc`` is the exact integer dot product (times ``u``).

Terms (``L = chain_len``, ``Rc = chains / weight_channels``)
------------------------------------------------------------
beat
    One cycle's work of a chain: ``L`` kept weights of one row.
beats per group (``bpb``)
    ``kept / L``: a quant group is always whole beats (``HwParams`` checks it), so a
    chain reduces all its lanes into one partial sum per beat and no beat mixes groups.
record
    What one dequant unit reads per (row tile, group): the values, indices, scales
    and mins of its ``Rc`` chains, ``record_bits`` long (a multiple of
    ``RECORD_ALIGN_BITS``); it becomes ``bpb`` beats.
activation span
    The input positions one beat covers: ``L * m / n`` elements, ``span_words = m / n``
    activation-buffer words of ``L`` elements (a power of two, aligned), so the buffer
    is ``act_banks`` word-interleaved banks and one read of all banks returns any span.
"""

from __future__ import annotations

from dataclasses import dataclass

from amaranth import Signal, signed, unsigned
from amaranth.lib import data

from .formats import RECORD_ALIGN_BITS, SCALE_FIXED_BITS, WeightFormat, record_bits, region_bytes
from .params import ACT_MAX, FACTOR_MAX, WEIGHT_MAX, HwParams

__all__ = ["EngineGeometry", "FormatInfo", "delay", "ceil_div", "bits_for", "beat_layout",
           "dequant_cfg_layout", "SPLIT_CHANNELS", "far_channels"]

#: Below this many weight channels the whole kernel fits in SLR0 (the small presets: a few
#: percent of the device, docs/kernel_resources.md); from it on, the upper half of the
#: channels' dequant units and chains sit in SLR1 (:func:`flightllm.hw.vitis.slr_plan`).
SPLIT_CHANNELS = 16


def far_channels(params: HwParams) -> tuple:
    """The weight channels whose dequant unit and chains sit in SLR1, away from their HBM port
    in SLR0: their raw beats cross the SLR boundary (from the reader's data FIFO's output
    register to the dequant unit's input registers)."""
    C = params.weight_channels
    return tuple(range(C // 2, C)) if C >= SPLIT_CHANNELS else ()


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def bits_for(v: int) -> int:
    """Bits of a signed register that holds every integer in ``[-v, v]``."""
    return int(v).bit_length() + 1


def _pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


@dataclass(frozen=True)
class FormatInfo:
    """Everything the RTL needs of one format of the build."""

    code: int
    fmt: WeightFormat
    bpb: int             # beats per quant group
    span_words: int      # activation-buffer words one beat covers (m / n)
    record_bits: int     # bits of one record (Rc chains' share of one group)

    @property
    def bits(self):
        return self.fmt.bits

    @property
    def index_bits(self):
        return self.fmt.index_bits

    @property
    def signed(self):
        return not self.fmt.has_min

    @property
    def has_min(self):
        return self.fmt.has_min

    @property
    def raw(self):
        """No scale and no min in the records: the beat's scale is 1, its min 0."""
        return self.fmt.raw


class EngineGeometry:
    """Sizes and run-time codes of one MPE build.

    Parameters
    ----------
    params : HwParams

    Raises
    ------
    TypeError
        ``params`` is not a :class:`HwParams`.
    ValueError
        The parameters describe a shape this RTL cannot build (the message names the
        field and the rule).
    """

    def __init__(self, params: HwParams):
        if not isinstance(params, HwParams):
            raise TypeError(f"expected HwParams, not {type(params).__name__}")
        p = self.params = params
        self.L, self.D = p.chain_len, p.dsp_group
        self.R, self.C = p.chains, p.weight_channels
        self.Rc = p.chains // p.weight_channels
        self.W = p.hbm_port_bits

        def need(cond, what):
            if not cond:
                raise ValueError(f"HwParams {p.name!r}: the MPE RTL needs {what}")

        need(_pow2(self.W) and self.W % RECORD_ALIGN_BITS == 0,
             f"hbm_port_bits a power of two and a multiple of {RECORD_ALIGN_BITS}, not {self.W}")
        need(_pow2(self.R), f"chains a power of two, not {self.R}")
        need(_pow2(self.Rc), f"chains / weight_channels a power of two, not {self.Rc}")
        need(_pow2(self.L), f"chain_len a power of two, not {self.L}")
        need(p.act_bits == 8, "act_bits == 8")

        infos = []
        for code, fmt in enumerate(p.engine_formats()):      # weight formats, then KV formats
            if not fmt.dense:
                need(self.L % fmt.n_keep == 0, f"chain_len ({self.L}) a multiple of n_keep for {fmt.name}")
                need(fmt.m % fmt.n_keep == 0, f"n_keep to divide m for {fmt.name}")
            infos.append(FormatInfo(code, fmt, fmt.kept_per_group // self.L, fmt.m // fmt.n_keep,
                                    record_bits(fmt, self.Rc, self.L)))
        self.formats = tuple(infos)
        self.fmt_bits = max(1, (len(infos) - 1).bit_length())
        self.index_bits = max(1, max(f.index_bits for f in infos))
        self.m_max = max(f.fmt.m for f in infos)
        self.bpb_max = max(f.bpb for f in infos)
        self.record_bits_max = max(f.record_bits for f in infos)
        self.act_banks = max(f.span_words for f in infos)
        self.has_min = any(f.has_min for f in infos)
        self.act_words = p.act_buf_depth // self.L
        need(self.act_words % self.act_banks == 0 and self.act_words > 0,
             f"act_buf_depth ({p.act_buf_depth}) a multiple of chain_len * {self.act_banks}")
        self.act_rows = self.act_words // self.act_banks
        self.act_addr_bits = max(1, (self.act_words - 1).bit_length())
        # Register widths that never wrap: |psum| <= kept * ACT_MAX * WEIGHT_MAX (a weight may
        # be -128), |xsum| <= G * ACT_MAX, and the factor-scaled forms.
        g_max = max(f.fmt.group_size for f in infos)
        kept_max = max(f.fmt.kept_per_group for f in infos)
        self.psum_w = bits_for(kept_max * ACT_MAX * WEIGHT_MAX)
        self.xsum_w = bits_for(g_max * ACT_MAX)
        self.factor_bits = p.act_factor_bits
        self.psum_u_w = bits_for(kept_max * ACT_MAX * WEIGHT_MAX * FACTOR_MAX)
        self.xsum_u_w = bits_for(g_max * ACT_MAX * FACTOR_MAX)
        self.scale_w = SCALE_FIXED_BITS
        self.acc_w = p.acc_bits
        self.tokens_max = p.mm_tokens
        self.dsp_groups = self.L // self.D

    # -- run-time codes ---------------------------------------------------------
    def info(self, wf: WeightFormat) -> FormatInfo:
        """The build's entry for a format (``ValueError`` naming the preset's set if absent)."""
        if not isinstance(wf, WeightFormat):
            raise TypeError(f"expected WeightFormat, not {type(wf).__name__}")
        for f in self.formats:
            if f.fmt == wf:
                return f
        raise ValueError(f"format {wf.name} is not supported by preset {self.params.name!r} "
                         f"(weight_formats {', '.join(self.params.weight_formats)}; "
                         f"kv_formats {', '.join(self.params.kv_formats) or 'none'})")

    def code(self, wf: WeightFormat) -> int:
        """Format code to put in the operation config."""
        return self.info(wf).code

    def engine_formats(self):
        """Every format the build decodes as a :class:`WeightFormat`, in code order: the
        weight formats, then the KV formats (:meth:`HwParams.engine_formats`)."""
        return [f.fmt for f in self.formats]

    def weight_formats(self):
        """The build's weight formats (``HwParams.weight_formats``: codes ``0 ..``)."""
        return [f.fmt for f in self.formats if not f.raw]

    def kv_formats(self):
        """The build's raw KV-cache formats (``HwParams.kv_formats``: the codes after the
        weight formats)."""
        return [f.fmt for f in self.formats if f.raw]

    def stream_words(self, wf: WeightFormat, n_rows: int, n_in: int) -> int:
        """Words of ``hbm_port_bits`` one channel streams for an operation (the last one partly used)."""
        self.info(wf)                                     # a format outside the build raises
        return ceil_div(region_bytes(wf, (n_rows, n_in), self.params) * 8, self.W)

    def act_stride(self, n_in: int) -> int:
        """Activation-buffer words between the vectors of consecutive MM tokens."""
        return ceil_div(n_in // self.L, self.act_banks) * self.act_banks


def beat_layout(geom: EngineGeometry) -> data.ArrayLayout:
    """One beat of a dequant unit for its ``Rc`` chains: per chain ``L`` INT8-widened
    weights (sign- or zero-extended by format), their window indices, and the group's
    fixed-point scale and min (:func:`flightllm.hw.formats.to_fixed`; the same on every
    beat of a group, min 0 for formats without one; raw formats: scale 1 and min 0 on
    every chain, rows past N included)."""
    chain = data.StructLayout({
        "w": data.ArrayLayout(signed(geom.params.act_bits), geom.L),
        "idx": data.ArrayLayout(unsigned(geom.index_bits), geom.L),
        "scale": signed(geom.scale_w),
        "min": signed(geom.scale_w),
    })
    return data.ArrayLayout(chain, geom.Rc)


def dequant_cfg_layout(geom: EngineGeometry) -> data.StructLayout:
    """Per-operation config of a dequant unit: format code, ``e0`` of the tensor's scales
    (``25 - shift``: a binary16 with exponent field E becomes ``sig << (E - e0)``), the
    records to emit and the words of the stream (both computed on the host). A raw
    format has no scales: its ``e0`` is a don't-care (the host sends ``E0_MAX``, shift 0;
    the unit ignores it)."""
    return data.StructLayout({"fmt": unsigned(geom.fmt_bits), "e0": unsigned(5),
                              "records": unsigned(32), "words": unsigned(32)})


def delay(m, sig, n, en=None, name=None, reset_less=True):
    """``sig`` delayed by ``n`` registers (advancing when ``en`` is high, if given)."""
    cur = sig
    for i in range(n):
        nxt = Signal.like(sig, name=f"{name or 'dly'}_{i}", reset_less=reset_less)
        if en is None:
            m.d.sync += nxt.eq(cur)
        else:
            with m.If(en):
                m.d.sync += nxt.eq(cur)
        cur = nxt
    return cur
