"""Build-time geometry of the matrix-engine RTL and its run-time format codes.

The dequant units, the sparse DSP chains and the MPE all size themselves from one
:class:`EngineGeometry`, derived from :class:`~flightllm.hw.params.HwParams`. It also
owns the *format code*: the small integer the operation config carries to choose,
at run time, one packed weight format (bit width x N:M pattern) out of those the
build supports. The packed layout itself is :mod:`flightllm.hw.formats`.

Geometry terms (``L = chain_len``, ``G = group_size``, ``k`` kept weights per block)
-----------------------------------------------------------------------------------
beat
    One cycle's worth of work for a chain: ``L`` kept weights of one row.
beats per block (``bpb``)
    ``k // L`` when ``k >= L``.
groups per beat (``gpb``)
    ``L // k`` when ``k < L`` (e.g. 1:4 with a 32-long chain: 16 kept per group): one
    beat carries ``gpb`` consecutive quant groups of the same row, lane segment ``s``
    (lanes ``[s*k, (s+1)*k)``) holding group ``g + s``. The chain ends a segment at
    the reduction node after lane ``(s+1)*k - 1`` (``emit_nodes``), each with its own
    group scale, so every lane does useful work. Otherwise ``gpb = 1``.
step
    ``gpb`` quant groups of the ``Rc`` rows a dequant unit feeds: ``Rc * gpb`` blocks,
    emitted as ``bpb`` beats. The last step of a row tile has fewer groups when
    ``gpb`` does not divide ``K / G``; its missing segments get scale 0.
blocks per extraction (``P``)
    Blocks the dequant unit cuts from its bit window per cycle: what keeps the
    chains busy (``Rc * gpb / bpb``), or, when one HBM word per cycle cannot supply
    that, the power of two at or above the word rate ``W / block_bits`` (the unit is
    then bandwidth-bound and takes a word every cycle).
activation span
    The input positions one beat covers: ``A = L * m / n`` elements,
    ``span_words = m / n`` activation-buffer words (1, 2 or 4), always a power of
    two and aligned, so the activation buffer is ``act_banks`` word-interleaved
    banks and one read of all banks at one row returns any span.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from amaranth import Signal

from .formats import SCALE_BITS, WeightFormat
from .params import HwParams

__all__ = ["EngineGeometry", "delay"]


def _pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


@dataclass(frozen=True)
class _Fmt:
    code: int
    bits: int
    n: int            # 1 and m 1 for dense: every lane takes its own position
    m: int
    index_bits: int
    kept: int
    block_bits: int
    bpb: int
    span_words: int
    pattern: int      # index into EngineGeometry.patterns
    gpb: int          # quant groups per beat (L // kept when kept < L, else 1)
    P: int            # blocks extracted per cycle (full step)
    P_tail: int       # ... in the short last step of a tile (min(P, Rc))
    links: int        # chain link bits: 0 where a segment ends (between lanes kept*s - 1 and kept*s)

    @property
    def seg(self) -> int:
        """Lanes per chain segment."""
        return self.kept if self.gpb > 1 else 0


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
        p = params
        self.params = p
        self.L, self.D, self.G = p.chain_len, p.dsp_group, p.group_size
        self.R, self.C = p.chains, p.weight_channels
        self.Rc = p.chains // p.weight_channels
        self.W = p.hbm_port_bits

        def need(cond, what):
            if not cond:
                raise ValueError(f"HwParams {p.name!r}: the MPE RTL needs {what}")

        need(_pow2(self.W) and self.W >= SCALE_BITS, f"hbm_port_bits a power of two >= 16, not {self.W}")
        need(_pow2(self.R), f"chains a power of two, not {self.R}")
        need(_pow2(self.Rc), f"chains / weight_channels a power of two, not {self.Rc}")
        need(_pow2(self.G), f"group_size a power of two, not {self.G}")
        need(self.G % self.L == 0, f"chain_len ({self.L}) to divide group_size ({self.G})")
        need(p.scale_bits == SCALE_BITS, f"scale_bits == {SCALE_BITS} (formats.SCALE_BITS)")
        need(p.act_bits == 8, "act_bits == 8")

        # Dense patterns (n == m) share one layout: no indices, every lane its own input.
        pats = []
        for n, m in p.nm_patterns:
            key = (1, 1) if n == m else (n, m)
            if key not in pats:
                pats.append(key)
        if (1, 1) not in pats:
            pats.append((1, 1))          # dense m:m is always allowed (params docstring)
        self.patterns = tuple(pats)
        fmts = []
        ng = self.L // self.D
        for bits in p.weight_bits:
            for pi, (n, m) in enumerate(self.patterns):
                wf = WeightFormat(bits, n, m, self.G)
                k = wf.kept_per_group
                if n != m:
                    need(self.L % n == 0, f"chain_len ({self.L}) a multiple of n_keep ({n}) for {n}:{m}")
                    need(m % n == 0, f"n_keep to divide m for {n}:{m}")
                need(k % self.L == 0 or (self.L % k == 0 and k % self.D == 0),
                     f"kept weights per block ({k} for {wf.name}) a multiple of chain_len ({self.L}), "
                     f"or a divisor of it that is a multiple of dsp_group ({self.D})")
                span = self.L * m // n
                need(_pow2(span // self.L), f"the activation span of {wf.name} ({span}) a power-of-two multiple of chain_len")
                bpb, gpb = max(1, k // self.L), max(1, self.L // k)
                step = self.Rc * gpb
                need_rate = max(1, step // bpb)             # blocks per cycle at full compute
                supply = self.W / wf.block_bits            # blocks per cycle at one word per cycle
                P = need_rate if supply >= need_rate else min(need_rate, 1 << math.ceil(math.log2(supply)) if supply > 1 else 1)
                links = (1 << (ng - 1)) - 1
                if gpb > 1:
                    for sgi in range(1, gpb):
                        links &= ~(1 << (sgi * k // self.D - 1))
                fmts.append(_Fmt(len(fmts), bits, n, m, wf.index_bits, k, wf.block_bits,
                                 bpb, span // self.L, pi, gpb, P, min(P, self.Rc), links))
        self.formats = tuple(fmts)
        self.gpb_max = max(f.gpb for f in fmts)
        self.P_max = max(f.P for f in fmts)
        self.slots = self.Rc * self.gpb_max
        # reduction nodes that may end a segment: after every segment of every format
        self.emit_nodes = tuple(sorted({ng - 1} | {(s + 1) * f.kept // self.D - 1
                                                   for f in fmts if f.gpb > 1 for s in range(f.gpb)}))
        self.fmt_bits = max(1, (len(fmts) - 1).bit_length())
        self.index_bits = max(1, max(f.index_bits for f in fmts))
        self.m_max = max(f.m for f in fmts)
        self.kmax = max(f.kept for f in fmts)
        self.block_bits_max = max(f.block_bits for f in fmts)
        self.act_banks = max(f.span_words for f in fmts)
        self.act_words = p.act_buf_depth // self.L
        need(self.act_words % self.act_banks == 0 and self.act_words > 0,
             f"act_buf_depth ({p.act_buf_depth}) a multiple of chain_len * {self.act_banks}")
        self.act_rows = self.act_words // self.act_banks
        self.act_addr_bits = max(1, (self.act_words - 1).bit_length())
        # |psum| <= G * 128 * 128 even if an activation were -128: this many bits never wrap,
        # so the narrower register equals the golden int32 (and fits the DSP48E2 27-bit A port).
        self.psum_w = min(p.psum_bits, (self.G * 128 * 128).bit_length() + 1)
        self.acc_w = p.acc_bits
        self.tokens_max = p.mm_tokens
        self.dsp_groups = self.L // self.D

    # -- run-time codes ---------------------------------------------------------
    def fmt_of(self, wf: WeightFormat) -> _Fmt:
        """The build's entry for a :class:`WeightFormat` (raises if unsupported)."""
        if not isinstance(wf, WeightFormat):
            raise TypeError(f"expected WeightFormat, not {type(wf).__name__}")
        if wf.group_size != self.G:
            raise ValueError(f"format {wf.name}: group size {wf.group_size} != build's {self.G}")
        key = (1, 1) if wf.dense else (wf.n_keep, wf.m)
        for f in self.formats:
            if f.bits == wf.bits and (f.n, f.m) == key:
                return f
        raise ValueError(f"format {wf.name} is not supported by preset {self.params.name!r} "
                         f"(weight_bits {self.params.weight_bits}, nm_patterns {self.params.nm_patterns})")

    def code(self, wf: WeightFormat) -> int:
        """Format code to put in the operation config."""
        return self.fmt_of(wf).code

    def weight_formats(self):
        """Every supported format as a :class:`WeightFormat` (dense as ``intB``)."""
        return [WeightFormat(f.bits, f.n, f.m, self.G) for f in self.formats]

    def stream_words(self, wf: WeightFormat, n_rows: int, n_in: int):
        """(payload words, scale words) one channel streams for an operation."""
        f = self.fmt_of(wf)
        blocks = -(-n_rows // self.R) * (n_in // self.G) * self.Rc
        return -(-blocks * f.block_bits // self.W), -(-blocks * SCALE_BITS // self.W)

    def act_stride(self, n_in: int) -> int:
        """Activation-buffer words between the vectors of consecutive MM tokens."""
        words = n_in // self.L
        return -(-words // self.act_banks) * self.act_banks


def delay(m, sig, n, en, name=None, reset_less=True):
    """``sig`` delayed by ``n`` registers that advance when ``en`` is high."""
    cur = sig
    for i in range(n):
        nxt = Signal.like(sig, name=f"{name or 'dly'}_{i}", reset_less=reset_less)
        with m.If(en):
            m.d.sync += nxt.eq(cur)
        cur = nxt
    return cur



def word_window(m, name, port, width, nwords, gran, out_bits, busy, words_left):
    """Bit window over a word stream: the next ``out_bits`` bits, consumed in ``gran`` steps.

    Words land whole in a queue of ``nwords`` registers (no bit-level insert shifter);
    the oldest unread bit is ``r`` (a multiple of ``gran``) of word 0. The caller drives
    ``take`` (granules consumed this cycle, only when ``avail >= take``).

    Returns ``(x, avail, take)``: ``x`` the window (LSB = oldest bit), ``avail`` the
    granules held, ``take`` the consumption input.
    """
    from amaranth import Cat, Signal

    gpw = width // gran                                  # granules per word
    lg = int(math.log2(gpw))
    lgran = int(math.log2(gran))
    assert 1 << lgran == gran and 1 << lg == gpw
    words = [Signal(width, name=f"{name}_w{i}", reset_less=True) for i in range(nwords)]
    nw = Signal(range(nwords + 1), name=f"{name}_nw")
    r = Signal(range(gpw), name=f"{name}_r")
    take = Signal(range(out_bits // gran + 1), name=f"{name}_take")
    avail = Signal(range(nwords * gpw + 1), name=f"{name}_avail")
    total = Signal(range(gpw + out_bits // gran + 1), name=f"{name}_total")
    cons = Signal(range(nwords + 1), name=f"{name}_cons")
    m.d.comb += [avail.eq((nw << lg) - r), total.eq(r + take), cons.eq(total >> lg)]
    room = Signal(name=f"{name}_room")
    m.d.comb += room.eq(nw - cons < nwords)
    m.d.comb += port.ready.eq(busy & (words_left != 0) & room)
    word_in = port.valid & port.ready
    base = Signal.like(nw, name=f"{name}_base")
    m.d.comb += base.eq(nw - cons)
    for i in range(nwords):
        with m.If(word_in & (base == i)):
            m.d.sync += words[i].eq(port.payload)
        with m.Else():
            with m.Switch(cons):
                for c in range(1, nwords + 1):
                    if i + c < nwords:
                        with m.Case(c):
                            m.d.sync += words[i].eq(words[i + c])
    m.d.sync += [nw.eq(base + word_in), r.eq(total[:lg] if lg else 0)]
    with m.If(word_in):
        m.d.sync += words_left.eq(words_left - 1)
    x = Signal(out_bits, name=f"{name}_x")
    m.d.comb += x.eq((Cat(*words) >> (r << lgran))[:out_bits])
    return x, avail, take, (nw, r)
