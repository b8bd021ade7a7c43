"""The scheduler: manifest -> length-adaptive instruction programs (prefill, decode).

Three programs per artifact, each valid for every position and length:

``decode``
    One token at position ``POS`` (host register), token id in the token buffer at
    ``POS``. Prologue ``CPOS = POS, CLEN = 1, KVLEN = POS + 1, OUTROW = 0``, then the
    model body with matrix-vector (MV) operations.
``prefill``
    ``LEN`` tokens at positions ``POS .. POS+LEN-1``, in a hardware loop over chunks
    of ``C = params.mm_tokens`` tokens (``CPOS = POS + i*C``, ``CLEN = min(LEN - i*C, C)``,
    ``KVLEN = CPOS + CLEN``, ``OUTROW = i*C``), the body with MM operations; logits of
    every token (output rows ``0 .. LEN-1``: what perplexity needs).
``prefill_last``
    The same ``LEN`` tokens, logits of the last one only (what generation needs):
    the chunk loop over the first ``LEN - 1`` tokens runs the body without the LM
    head (final norm, output projection, ST_OUT, ARGMAX), then the last token runs
    the decode body at ``CPOS = POS + LEN - 1`` (output row 0). Rows are independent
    and MM equals MV row by row, so its logits equal row ``LEN - 1`` of ``prefill``.

Every QUANTG (the matrix engine's input: a scale per row, an 8-bit factor per group)
groups by the quant group size of the tensors that consume it; tensors sharing an
input must share that group size (:class:`ScheduleError` otherwise).

The body keeps every activation on chip; only weights, the KV cache and the logits
cross HBM. Per layer (``X`` is the residual stream)::

    RMSNORM X->H; QUANTG H->HQ; MV k,v,q HQ->K,V,Q   (k and v first: their stores overlap q)
    ROPE K; QUANT K->KQ, V->VQ per kv head; ST_KT KQ,VQ -> KV cache rows CPOS..;
    ST_KV their scales; LD_KV the scales of positions < KVLEN -> KS, VS
    ROPE Q; QUANT Q->QQ per head
    per group of kv heads (ATTN_GROUP or fewer), software-pipelined (the next group's QKs
    before this group's PVs): QK g: QQ x K cache -> S per head; SOFTMAX of the group:
    S, VS -> PQ; PV g: PQ x V cache -> A per head
    QUANTG A->HQ; MV o -> Y; ADD X += Y
    RMSNORM X->H; QUANTG; MV gate->G, up->U; SILU_MUL G,U->G; QUANTG G->HQ; MV down->Y; ADD X += Y

then ``RMSNORM (output_norm); QUANTG; MV token_embd -> LOG; ST_OUT LOG -> OUT row OUTROW;
ARGMAX LOG -> R[ARGMAX]``. QK, SOFTMAX and PV read the attended length from the
runtime registers (row ``t`` attends positions ``< CPOS + 1 + t``), so attention cost
follows the real length (length-adaptive) without loops.

Dependency tokens are assigned automatically per straight-line region (loops and
their back edges are barriers, see :mod:`flightllm.hw.isa`): an instruction waits
for the latest earlier instruction of another unit it depends on (read after
write, write after read/write of an on-chip buffer or an HBM region) unless an
earlier wait already covers it; that instruction signals it. The per-head parts of
the attention buffers (:data:`flightllm.hw.isa.PER_HEAD`) are separate resources.

The KV cache (:class:`Plan`, :mod:`flightllm.hw.kvcache`): values in the weight
channels after the weights, scales in space ``KV``. Output space ``OUT``: logits row
r at byte ``r * vocab * 4`` (float32).

On-chip buffers: every buffer region the programs write is checked against the
hardware (:func:`check_buffers`, sizes read from the instructions by
:func:`buffer_sizes`): a buffer holds ``rows x width`` elements (``rows`` =
``mm_tokens`` in prefill, 1 in decode, ``max_seq`` for the KV scales; the score and
probability buffers ``heads x max_seq`` per row) and every row must fit
``params.act_buf_depth`` elements and the buffer's capacity in the RTL
(:func:`flightllm.hw.buffers.capacity`, from the ``buf_*`` model envelope of the
hardware parameters). A buffer that does not fit is a
:class:`ScheduleError` naming the buffer and both sizes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
from amaranth.lib import data

from ..hw.buffers import capacity
from ..hw.formats import ALIGN, WeightFormat, align, region_bytes
from ..hw.isa import (NO_LIMIT, PER_HEAD, AttnFmt, TOKEN_UNITS, UNIT_OF, Buf, Instr, Opcode, Reg, Space, Unit,
                      encode_program, loop_trips, setr_value)
from ..hw.kvcache import KV_GROUP, K, V, KvLayout
from ..hw.params import HwParams
from ..hw.sfu import sfu_max_rows
from ..runtime.sfu import KV_BLOCK, score_scale
from .gguf_import import LINEARS, ModelConfig

__all__ = ["ScheduleError", "Plan", "plan_from_manifest", "KV_FORMATS", "build_programs", "rope_table",
           "manifest_preview", "shape_manifest", "unrolled_counts", "unroll", "PROGRAM_FILES",
           "add_programs", "buffer_sizes", "check_buffers"]

PROGRAM_FILES = {"decode": "programs/decode.bin", "prefill": "programs/prefill.bin",
                 "prefill_last": "programs/prefill_last.bin"}



def _ri(v) -> int:
    """A register field (enum member or int) as an int."""
    return v.value if hasattr(v, "value") else int(v)


class ScheduleError(ValueError):
    pass


def rope_table(head_dim: int, max_seq: int, theta: float) -> np.ndarray:
    """(max_seq, head_dim/2, 2) float32 [cos, sin], computed in float64 then rounded."""
    inv = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    ang = np.arange(max_seq, dtype=np.float64)[:, None] * inv[None, :]
    return np.stack([np.cos(ang), np.sin(ang)], axis=-1).astype(np.float32)


#: the KV cache options a compile chooses from (``flightllm compile --kv``): (K, V) formats.
#: k8v4 keeps the keys in 8 bits: their outlier channels cost SmolLM2 +43% perplexity in
#: 4 bits per (position, head), the values' 4 bits +0.6% (docs/kv_quality.md)
KV_FORMATS = {"int8": ("int8r/32", "int8r/32"), "int4": ("int4r/32", "int4r/32"), "k8v4": ("int8r/32", "int4r/32")}
#: kv heads per SOFTMAX (at most; the SFU's rows per operation limit it too): the next
#: group's QK is issued before this group's PV, so the MPE streams while the SFU runs
#: the group's softmax (software pipelining)
ATTN_GROUP = 16


@dataclass
class Plan:
    """What the programs assume about memory; stored in the manifest as ``programs``.

    The KV cache: values in the weight channels from ``kv_base`` (:mod:`flightllm.hw.kvcache`,
    format ``kv_format``), scales in space KV (``kv_row_bytes`` per row, ``kv_bytes`` in
    all); block-sparse attention when ``window`` > 0 (``sink`` leading blocks and the last
    ``window`` blocks of 64 positions)."""
    max_seq: int
    chunk: int
    kv_row_bytes: int
    kv_bytes: int
    vocab: int
    out_row_bytes: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    kv_format: str
    kv_base: int
    kv_channel_bytes: int
    sink: int = 0
    window: int = 0
    kv_format_v: str = ""                   #: the values' format if not ``kv_format``

    def layout(self, params: HwParams) -> KvLayout:
        return KvLayout(self.layers, self.kv_heads, self.head_dim, self.max_seq,
                        WeightFormat.parse(self.kv_format), params, self.kv_base,
                        WeightFormat.parse(self.kv_format_v or self.kv_format))

    def to_dict(self):
        return dict(self.__dict__)


def _weights_end(m: dict) -> int:
    """Bytes of the weights in every channel: where the KV cache starts."""
    ends = [t["offset"] + align(t["region_bytes"]) for t in m["tensors"].values()]
    return max(ends, default=0)


def check_kv_options(kv: str, sink: int, window: int) -> None:
    """Raise :class:`ScheduleError` unless ``kv`` is a KV cache option and ``sink``/``window``
    fit the attention instructions' fields (block-sparse needs a window)."""
    if kv not in KV_FORMATS:
        raise ScheduleError(f"unknown KV cache option {kv!r}; choose one of {', '.join(KV_FORMATS)}")
    fields = data.Layout.cast(AttnFmt)       # the instruction fields bound sink and window
    max_sink, max_window = (2 ** fields[f].shape.width - 1 for f in ("sink", "window"))
    if not (0 <= sink <= max_sink and 0 <= window <= max_window) or (sink and not window):
        raise ScheduleError(f"block-sparse attention: sink {sink} (0..{max_sink} blocks) needs a window "
                            f"(1..{max_window} blocks of {KV_BLOCK} positions), got window {window}")


def plan_from_manifest(m: dict, kv: str | None = None, sink: int | None = None,
                       window: int | None = None) -> Plan:
    """The plan of manifest ``m``: its own (``m['programs']['plan']``) if it has one, else
    a new one with KV cache options ``kv`` (``int8`` / ``int4``), ``sink``, ``window``."""
    old = (m.get("programs") or {}).get("plan")
    if old and kv is None and sink is None and window is None:
        return Plan(**old)
    cfg = ModelConfig.from_dict(m["model"])
    p = HwParams.from_dict(m["hw"])
    max_seq = min(p.max_seq_len, cfg.context_length) // p.kv_tile * p.kv_tile
    if max_seq <= 0:
        raise ScheduleError(f"model context {cfg.context_length} is shorter than one KV tile ({p.kv_tile})")
    kv, sink, window = kv or "int8", sink or 0, window or 0
    check_kv_options(kv, sink, window)
    if cfg.head_dim % KV_GROUP or max_seq % KV_GROUP:
        raise ScheduleError(f"{cfg.name}: head_dim {cfg.head_dim} is not a multiple of {KV_GROUP} "
                            "(the KV cache's group)")
    base = align(_weights_end(m))
    try:
        fk, fv = (WeightFormat.parse(f) for f in KV_FORMATS[kv])
        lay = KvLayout(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, max_seq, fk, p, base, fv)
    except ValueError as e:
        raise ScheduleError(str(e)) from None
    row = lay.scale_row_bytes
    return Plan(max_seq=max_seq, chunk=p.mm_tokens, kv_row_bytes=row, kv_bytes=lay.scale_bytes,
                vocab=cfg.vocab, out_row_bytes=4 * cfg.vocab, layers=cfg.n_layers, heads=cfg.n_heads,
                kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, kv_format=lay.fmt.name, kv_base=base,
                kv_format_v=lay.fmt_v.name if lay.fmt_v != lay.fmt else "",
                kv_channel_bytes=lay.channel_bytes, sink=sink, window=window)


# ---------------------------------------------------------------------------------
# program construction

@dataclass
class _Op:
    ins: Instr
    reads: tuple = ()
    writes: tuple = ()


@dataclass
class _Loop:
    idx: Reg
    count: Reg
    add: int
    shr: int
    body: list = field(default_factory=list)


class _Builder:
    def __init__(self, m: dict, mode: str, plan: Plan):
        self.m = m
        self.cfg = ModelConfig.from_dict(m["model"])
        self.p = HwParams.from_dict(m["hw"])
        self.plan = plan
        self.mode = mode
        self.mv = mode == "decode"
        self.stack = [[]]
        c = self.cfg
        if c.n_heads % c.n_kv_heads or c.head_dim % 2:
            raise ScheduleError(f"{c.name}: heads {c.n_heads}/{c.n_kv_heads}, head_dim {c.head_dim} unsupported")
        t = self.p.kv_tile
        if t & (t - 1):
            raise ScheduleError(f"kv_tile {t} must be a power of two")
        if self.plan.chunk & (self.plan.chunk - 1):
            raise ScheduleError(f"mm_tokens {self.plan.chunk} must be a power of two")

    def emit(self, op, reads=(), writes=(), **f):
        self.stack[-1].append(_Op(Instr(op, f), tuple(reads), tuple(writes)))

    def loop(self, idx, count, add, shr):
        lp = _Loop(idx, count, add, shr)
        self.stack[-1].append(lp)
        self.stack.append(lp.body)
        return lp

    def end_loop(self):
        self.stack.pop()

    # -- helpers ----------------------------------------------------------------
    def tensor(self, name):
        t = self.m["tensors"].get(name)
        if t is None:
            raise ScheduleError(f"manifest: no tensor {name!r}")
        fmt = WeightFormat.parse(t["format"])
        try:
            self.p.check_format(fmt, f"tensor {name!r}")
        except ValueError as e:
            raise ScheduleError(str(e)) from None
        n, k = t["shape"]
        return dict(bits=fmt.bits, n_keep=fmt.n_keep, m=fmt.m, group_log2=fmt.group_size.bit_length() - 1,
                    kind=fmt.kind, shift=t["shift"], n_out=n, k_in=k, w_off=t["offset"])

    def quant_for(self, src, n, *names):
        """QUANTG src -> HQ grouped for the tensors ``names`` that read it."""
        groups = {WeightFormat.parse(self.m["tensors"][nm]["format"]).group_size
                  for nm in names if nm in self.m["tensors"]}
        if len(groups) != 1:
            raise ScheduleError(f"tensors {', '.join(names)} share an input but have group sizes "
                                f"{sorted(groups) or 'none'}; give them formats with one group size")
        self.sfu(Opcode.QUANTG, src, Buf.HQ, n, seg=groups.pop())

    def table(self, name):
        t = self.m["tables"].get(name)
        if t is None:
            raise ScheduleError(f"manifest: no table {name!r}")
        return t["offset"] // 4

    def matmul(self, name, src, dst):
        op = Opcode.MV if self.mv else Opcode.MM
        self.emit(op, [src, "W"], [dst], src=src, dst=dst, rows_reg=Reg.CLEN, **self.tensor(name))

    def sfu(self, op, src, dst, n, src2=None, **f):
        reads = [src] + ([src2] if src2 is not None else [])
        if "table" in f:
            reads.append("TAB")
        if src2 is not None:
            f["src2"] = src2
        self.emit(op, reads, [dst], src=src, dst=dst, n=n, rows_reg=Reg.CLEN, **f)

    # -- the model ----------------------------------------------------------------
    def body(self, head: bool = True):
        c, p, pl = self.cfg, self.p, self.plan
        hd, nh, nkv = c.head_dim, c.n_heads, c.n_kv_heads
        eps = float(np.float32(c.rms_eps))
        emb = self.tensor("token_embd.weight")
        self.emit(Opcode.EMBED, ["W", "TOK"], [Buf.X], dst=Buf.X, rows_reg=Reg.CLEN, pos_reg=Reg.CPOS, **emb)
        for i in range(c.n_layers):
            L = f"blk.{i}."
            self.sfu(Opcode.RMSNORM, Buf.X, Buf.H, c.hidden, table=self.table(L + "attn_norm"), imm=eps)
            self.quant_for(Buf.H, c.hidden, *(L + f"attn_{x}.weight" for x in "qkv"))
            self.matmul(L + "attn_k.weight", Buf.HQ, Buf.K)
            self.matmul(L + "attn_v.weight", Buf.HQ, Buf.V)
            self.matmul(L + "attn_q.weight", Buf.HQ, Buf.Q)
            rope = self.table("rope")
            lay = pl.layout(p)
            # K and V first: their stores run while q streams (the QK fetch needs them in HBM)
            self.sfu(Opcode.ROPE, Buf.K, Buf.K, c.kv_dim, seg=hd, aux_reg=Reg.CPOS, table=rope)
            # to the cache format's levels: +-127 (INT8) or +-7 (INT4)
            self.sfu(Opcode.QUANT, Buf.K, Buf.KQ, c.kv_dim, seg=hd, imm=float(lay.fmt_of(K).qmax))
            self.sfu(Opcode.QUANT, Buf.V, Buf.VQ, c.kv_dim, seg=hd, imm=float(lay.fmt_of(V).qmax))
            for kind, buf in ((K, Buf.KQ), (V, Buf.VQ)):
                off = lay.head_offset(i, kind, 0)
                self.emit(Opcode.ST_KT, [buf], [("KVT", i, kind)], src=buf, rows_reg=Reg.CLEN, pos_reg=Reg.CPOS,
                          kind=kind, bits=lay.fmt_of(kind).bits, kv_heads=nkv, head_dim=hd, cap=pl.max_seq,
                          kv_off=off // ALIGN, head_stride=lay.head_bytes(kind) // ALIGN)
                self.emit(Opcode.ST_KV, [buf], [("KVS", i, kind)], buf=buf, space=Space.KV, rows_reg=Reg.CLEN,
                          row_bytes=pl.kv_row_bytes, preg=Reg.CPOS, pmul=pl.kv_row_bytes,
                          addr=lay.scale_addr(i, kind))
            for kind, buf in ((K, Buf.KS), (V, Buf.VS)):
                self.emit(Opcode.LD_KV, [("KVS", i, kind)], [buf], buf=buf, space=Space.KV, rows_reg=Reg.KVLEN,
                          row_bytes=pl.kv_row_bytes, addr=lay.scale_addr(i, kind))
            self.sfu(Opcode.ROPE, Buf.Q, Buf.Q, nh * hd, seg=hd, aux_reg=Reg.CPOS, table=rope)
            self.sfu(Opcode.QUANT, Buf.Q, Buf.QQ, nh * hd, seg=hd)
            rep = nh // nkv
            span = dict(rows_reg=Reg.CLEN, len_reg=Reg.CPOS, len_add=1, rep=rep, cap=pl.max_seq,
                        sink=pl.sink, window=pl.window)
            kvf = {kind: dict(head_dim=hd, bits=lay.fmt_of(kind).bits, **span) for kind in (K, V)}

            def qk(g):
                self.emit(Opcode.QK, [Buf.QQ, Buf.KS, ("KVT", i, K)], [(Buf.S, g)], src=Buf.QQ, dst=Buf.S,
                          aux=Buf.KS, kvh=g, kv_off=lay.head_offset(i, K, g) // ALIGN, **kvf[K])
            # SOFTMAX takes a group of kv heads at once (its dependent passes wait for the
            # SFU's lanes once per group), as many as the SFU's rows allow
            rows_t = 1 if self.mode == "decode" else pl.chunk
            kvn = max(1, min(ATTN_GROUP, nkv, sfu_max_rows(p) // (rows_t * rep)))
            groups = [range(a, min(a + kvn, nkv)) for a in range(0, nkv, kvn)]
            for g in groups[0]:
                qk(g)
            for j, grp in enumerate(groups):
                self.emit(Opcode.SOFTMAX, [(Buf.S, g) for g in grp] + [Buf.VS], [(Buf.PQ, g) for g in grp],
                          src=Buf.S, dst=Buf.PQ, aux=Buf.VS, kvh=grp[0], kvn=len(grp), scale=score_scale(hd),
                          **span)
                for g in groups[j + 1] if j + 1 < len(groups) else ():
                    qk(g)
                for g in grp:
                    self.emit(Opcode.PV, [(Buf.PQ, g), ("KVT", i, V)], [(Buf.A, g)], src=Buf.PQ, dst=Buf.A,
                              kvh=g, kv_off=lay.head_offset(i, V, g) // ALIGN, **kvf[V])
            self.quant_for(Buf.A, c.hidden, L + "attn_output.weight")
            self.matmul(L + "attn_output.weight", Buf.HQ, Buf.Y)
            self.sfu(Opcode.ADD, Buf.X, Buf.X, c.hidden, src2=Buf.Y)
            self.sfu(Opcode.RMSNORM, Buf.X, Buf.H, c.hidden, table=self.table(L + "ffn_norm"), imm=eps)
            self.quant_for(Buf.H, c.hidden, L + "ffn_gate.weight", L + "ffn_up.weight")
            self.matmul(L + "ffn_gate.weight", Buf.HQ, Buf.G)
            self.matmul(L + "ffn_up.weight", Buf.HQ, Buf.U)
            self.sfu(Opcode.SILU_MUL, Buf.G, Buf.G, c.ffn, src2=Buf.U)
            self.quant_for(Buf.G, c.ffn, L + "ffn_down.weight")
            self.matmul(L + "ffn_down.weight", Buf.HQ, Buf.Y)
            self.sfu(Opcode.ADD, Buf.X, Buf.X, c.hidden, src2=Buf.Y)
        if not head:
            return
        self.sfu(Opcode.RMSNORM, Buf.X, Buf.H, c.hidden, table=self.table("output_norm"), imm=eps)
        head = "token_embd.weight" if c.tied_embeddings else "output.weight"
        self.quant_for(Buf.H, c.hidden, head)
        self.matmul(head, Buf.HQ, Buf.LOG)
        self.emit(Opcode.ST_OUT, [Buf.LOG], ["OUT"], buf=Buf.LOG, space=Space.OUT, rows_reg=Reg.CLEN,
                  row_bytes=pl.out_row_bytes, preg=Reg.OUTROW, pmul=pl.out_row_bytes, addr=0)
        self.emit(Opcode.ARGMAX, [Buf.LOG], ["REG"], src=Buf.LOG, dst=Buf.LOG, n=c.vocab,
                  rows_reg=Reg.CLEN)

    def program(self):
        C = self.plan.chunk
        setr = lambda rd, rb, ra=Reg.ZERO, mul=0, add=0, lim=NO_LIMIT: self.emit(
            Opcode.SETR, rd=rd, rb=rb, ra=ra, mul=mul, add=add, lim=lim)
        if self.mode == "decode":
            setr(Reg.CPOS, Reg.POS)
            setr(Reg.CLEN, Reg.ZERO, add=1)
            setr(Reg.KVLEN, Reg.POS, add=1)
            setr(Reg.OUTROW, Reg.ZERO)
            self.body()
        else:
            # prefill: all LEN tokens with the head; prefill_last: the first LEN - 1 without it
            skip = 0 if self.mode == "prefill" else 1
            self.loop(Reg.CHUNK, Reg.LEN, C - 1 - skip, C.bit_length() - 1)
            setr(Reg.CPOS, Reg.POS, Reg.CHUNK, C)
            setr(Reg.CLEN, Reg.LEN, Reg.CHUNK, -C, add=-skip, lim=C)
            setr(Reg.KVLEN, Reg.CPOS, Reg.CLEN, 1)
            setr(Reg.OUTROW, Reg.ZERO, Reg.CHUNK, C)
            self.body(head=not skip)
            self.end_loop()
            if skip:                                    # the last token, as in decode
                setr(Reg.CPOS, Reg.POS, Reg.LEN, 1, add=-1)
                setr(Reg.CLEN, Reg.ZERO, add=1)
                setr(Reg.KVLEN, Reg.CPOS, add=1)
                setr(Reg.OUTROW, Reg.ZERO)
                self.mv = True
                self.body()
        self.emit(Opcode.END)
        return self.stack[0]


def _expand(names, kv_heads):
    out = []
    for r in names:
        out.extend([(r, g) for g in range(kv_heads)] if r in PER_HEAD else [r])
    return out


def _assign_tokens(region, kv_heads):
    """Dependency tokens inside one straight-line region (list of _Op)."""
    for op in region:
        op.reads, op.writes = _expand(op.reads, kv_heads), _expand(op.writes, kv_heads)
    last_w, readers = {}, {}
    synced = {}
    for b, op in enumerate(region):
        u = UNIT_OF[op.ins.op]
        if u == Unit.SYS:
            continue
        need = {}

        def dep(a):
            pu = UNIT_OF[region[a].ins.op]
            if pu != u:
                need[pu] = max(need.get(pu, -1), a)
        for r in op.reads:
            if r in last_w:
                dep(last_w[r])
        for w in op.writes:
            if w in last_w:
                dep(last_w[w])
            for a in readers.get(w, ()):
                dep(a)
        for pu, a in need.items():
            if a > synced.get((pu, u), -1):
                src = region[a].ins
                src.f["signal"] = src.f.get("signal", 0) | 1 << u.value
                op.ins.f["wait"] = op.ins.f.get("wait", 0) | 1 << pu.value
                synced[(pu, u)] = a
        for r in op.reads:
            readers.setdefault(r, []).append(b)
        for w in op.writes:
            last_w[w] = b
            readers[w] = []


def _flatten(items, out, kv_heads):
    """Nested ops/loops -> flat list of Instr, assigning tokens per region."""
    region = []

    def close():
        _assign_tokens(region, kv_heads)
        region.clear()
    for it in items:
        if isinstance(it, _Loop):
            close()
            loop_ins = Instr(Opcode.LOOP, dict(rd=it.idx, ra=it.count, add=it.add, shr=it.shr))
            out.append(loop_ins)
            start = len(out)
            _flatten(it.body, out, kv_heads)
            loop_ins.f["body"] = len(out) - start
        else:
            region.append(it)
            out.append(it.ins)
    close()
    return out


def buffer_sizes(progs: dict, plan: Plan) -> dict:
    """On-chip buffer -> (rows, elements per row): the most any instruction of ``progs``
    puts in it, read from the instructions themselves.

    Rows: ``mm_tokens`` where ``CLEN`` gives the row count (a prefill chunk; 1 in
    ``decode``), ``max_seq`` for the KV scale rows LD_KV loads (``KVLEN``). Elements:
    ``n_out`` of MV/MM, ``k_in`` of EMBED, ``n`` of the SFU ops, ``heads x max_seq`` of
    the scores and probabilities, ``heads x head_dim`` of PV's output, ``kv_heads`` of
    an LD_KV row.
    """
    out = {}
    for name, prog in progs.items():
        crows = 1 if name == "decode" else plan.chunk
        for ins in prog:
            f, op = ins.f, ins.op
            rows = crows if f.get("rows_reg") else f.get("rows", 1)
            if op in (Opcode.MV, Opcode.MM):
                buf, width = f["dst"], f["n_out"]
            elif op == Opcode.EMBED:
                buf, width = f["dst"], f["k_in"]
            elif op in (Opcode.QK, Opcode.SOFTMAX):
                buf, width = f["dst"], plan.heads * plan.max_seq
            elif op == Opcode.PV:
                buf, width = f["dst"], plan.heads * f["head_dim"]
            elif op == Opcode.LD_KV:
                buf, width, rows = f["buf"], f["row_bytes"] // 4, plan.max_seq
            elif UNIT_OF[op] == Unit.SFU and op != Opcode.ARGMAX:
                buf, width = f["dst"], f["n"]
            else:
                continue
            buf = Buf(_ri(buf))
            r0, w0 = out.get(buf, (0, 0))
            out[buf] = (max(r0, rows), max(w0, width))
    return dict(sorted(out.items(), key=lambda kv: kv[0].value))


def check_buffers(m: dict, progs: dict | None = None, plan: Plan | None = None) -> dict:
    """:func:`buffer_sizes` of the programs for manifest ``m`` (built unless given),
    checked against ``params.act_buf_depth`` elements per row.

    Raises :class:`ScheduleError` (a ValueError) naming the first buffer that does not fit.
    """
    p = HwParams.from_dict(m["hw"])
    plan = plan or plan_from_manifest(m)
    if progs is None:
        progs = build_programs(m, check=False, plan=plan)
    sizes = buffer_sizes(progs, plan)
    cap = capacity(p)
    for b, (rows, width) in sizes.items():
        what = " (heads x max_seq scores)" if b in (Buf.S, Buf.PQ) else ""
        if width > p.act_buf_depth:
            raise ScheduleError(f"on-chip buffer {b.name}: {rows} rows x {width} elements{what} per row exceed "
                                f"act_buf_depth = {p.act_buf_depth} elements per row of hw {p.name!r}")
        if rows > cap[b][0] or width > cap[b][1]:
            raise ScheduleError(f"on-chip buffer {b.name}: {rows} rows x {width} elements{what} exceed its "
                                f"{cap[b][0]} x {cap[b][1]} on hw {p.name!r} (the buf_* envelope of HwParams, "
                                "hw/buffers.py)")
    return sizes


def build_programs(manifest: dict, check: bool = True, plan: Plan | None = None) -> dict:
    """{'decode', 'prefill', 'prefill_last': [Instr]} for an artifact manifest.

    ``plan``: the memory plan (default: the manifest's, or INT8 KV, dense attention).
    ``check=False`` skips the on-chip buffer check (performance modelling of a shape
    that does not fit the preset; see :func:`check_buffers`).
    """
    plan = plan or plan_from_manifest(manifest)
    progs = {mode: _flatten(_Builder(manifest, mode, plan).program(), [], plan.kv_heads) for mode in PROGRAM_FILES}
    if check:
        check_buffers(manifest, progs, plan)
    return progs


def add_programs(writer, kv: str = "int8", sink: int = 0, window: int = 0) -> dict:
    """Schedule an :class:`ArtifactWriter` before it is written (compile.py's hook).

    Adds the RoPE table, the program images and the ``programs`` manifest entry (its
    plan: the KV cache in format ``kv``, block-sparse attention if ``window``); returns
    that entry.
    """
    cfg, p = writer.config, writer.params
    plan_max = min(p.max_seq_len, cfg.context_length) // p.kv_tile * p.kv_tile
    writer.add_table("rope", rope_table(cfg.head_dim, max(plan_max, 1), cfg.rope_theta))
    m = manifest_preview(writer)
    t0 = time.perf_counter()
    plan = plan_from_manifest(m, kv, sink, window)
    progs = build_programs(m, plan=plan)
    entry = {"plan": plan.to_dict(), "files": {}}
    for name, prog in progs.items():
        writer.files[PROGRAM_FILES[name]] = encode_program(prog)
        entry["files"][name] = {"file": PROGRAM_FILES[name], "instructions": len(prog)}
    entry["schedule_seconds"] = time.perf_counter() - t0
    writer.extra["programs"] = entry
    return entry


def manifest_preview(writer) -> dict:
    """The manifest sections (model, hw, tensors, tables) ``ArtifactWriter.write`` will
    produce, before writing (:meth:`ArtifactWriter.layout`)."""
    return writer.layout()


def shape_manifest(cfg: ModelConfig, params: HwParams, fmt: str = "int4/32", embed_fmt: str = "int8/32") -> dict:
    """A manifest-like description without weights (offsets from the packed sizes),
    for scheduling and performance modelling of models we do not hold (LLaMA2-7B)."""
    tensors, off = {}, 0
    names = [(f"blk.{i}.{n}.weight", cfg.linear_shapes()[n], fmt) for i in range(cfg.n_layers) for n in LINEARS]
    names.append(("token_embd.weight", (cfg.vocab, cfg.hidden), embed_fmt))
    if not cfg.tied_embeddings:
        names.append(("output.weight", (cfg.vocab, cfg.hidden), embed_fmt))
    for name, (n, k), f in names:
        wf = WeightFormat.parse(f)
        region = region_bytes(wf, (n, k), params)
        tensors[name] = {"format": wf.name, "shape": [n, k], "shift": 20, "offset": off,
                         "region_bytes": region}
        off += align(region)
    tables, toff = {}, 0
    for i in range(cfg.n_layers):
        for nm in ("attn_norm", "ffn_norm"):
            tables[f"blk.{i}.{nm}"] = {"offset": toff, "shape": [cfg.hidden]}
            toff += 4 * cfg.hidden
    tables["output_norm"] = {"offset": toff, "shape": [cfg.hidden]}
    toff += 4 * cfg.hidden
    ms = min(params.max_seq_len, cfg.context_length)
    tables["rope"] = {"offset": toff, "shape": [ms, cfg.head_dim // 2, 2]}
    return {"model": cfg.to_dict(), "hw": params.to_dict(), "tensors": tensors, "tables": tables,
            "channel_bytes": off}


# ---------------------------------------------------------------------------------
# per-length (unrolled) programs: the baseline the length-adaptive scheme is measured against

def _setr(regs, ins):
    f = ins.f
    return setr_value(regs, _ri(f.get("rb", 0)), _ri(f.get("ra", 0)), f.get("mul", 0), f.get("add", 0),
                      f.get("lim", 0))


def _trips(regs, ins):
    f = ins.f
    return loop_trips(regs, _ri(f.get("ra", 0)), f.get("add", 0), f.get("shr", 0))


def unroll(prog, pos: int, length: int) -> list:
    """The per-length program: loops expanded and registers resolved for one (POS, LEN).

    SYS instructions disappear and every register-read field becomes an immediate
    (patch registers folded into addresses / offsets): what a compiler without
    loops or runtime registers would emit for this length.
    """
    regs = np.zeros(16, dtype=np.int64)
    regs[Reg.POS.value], regs[Reg.LEN.value] = pos, length
    out = []

    def resolve(ins):
        f = dict(ins.f)
        for key in ("rows_reg", "pos_reg", "aux_reg", "len_reg"):
            if key in f:
                f[key] = Reg.ZERO
        if "preg" in f:
            shift = int(regs[_ri(f.pop("preg"))]) * f.pop("pmul", 0)
            if "addr" in f or ins.op in (Opcode.LD_KV, Opcode.ST_KV, Opcode.ST_OUT):
                f["addr"] = f.get("addr", 0) + shift
        out.append(Instr(ins.op, f))

    def run(lo, hi):
        pc = lo
        while pc < hi:
            ins = prog[pc]
            if ins.op == Opcode.LOOP:
                body = ins.f.get("body", 0)
                for j in range(int(_trips(regs, ins))):
                    regs[_ri(ins.f.get("rd", 0))] = j
                    run(pc + 1, pc + 1 + body)
                pc += 1 + body
                continue
            if ins.op == Opcode.SETR:
                regs[_ri(ins.f["rd"])] = int(_setr(regs, ins))
            elif ins.op != Opcode.NOP:
                resolve(ins)
            pc += 1
    run(0, len(prog))
    return out


def unrolled_counts(prog, lengths, pos=None) -> np.ndarray:
    """Instructions of :func:`unroll` for many lengths at once (vectorised over lengths).

    ``pos`` (array like ``lengths``) is the POS register; default 0 (prefill) — for
    decode pass ``pos = length - 1`` (the token at position L-1 attends to L positions).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    regs = np.zeros((16, lengths.size), dtype=np.int64)
    regs[Reg.LEN.value] = lengths
    regs[Reg.POS.value] = 0 if pos is None else np.asarray(pos, dtype=np.int64)
    count = np.zeros(lengths.size, dtype=np.int64)

    def run(lo, hi, active):
        nonlocal count
        pc = lo
        static = 0
        while pc < hi:
            ins = prog[pc]
            if ins.op == Opcode.LOOP:
                body = ins.f.get("body", 0)
                trips = _trips(regs, ins)
                sub = prog[pc + 1: pc + 1 + body]
                if not any(s.op in (Opcode.LOOP, Opcode.SETR) for s in sub):
                    count += active * trips * sum(s.op != Opcode.NOP for s in sub)
                else:
                    for j in range(int((trips * active).max(initial=0))):
                        regs[_ri(ins.f.get("rd", 0))] = j
                        run(pc + 1, pc + 1 + body, active & (j < trips))
                pc += 1 + body
                continue
            if ins.op == Opcode.SETR:
                regs[_ri(ins.f["rd"])] = np.where(active, _setr(regs, ins), regs[_ri(ins.f["rd"])])
            elif ins.op != Opcode.NOP:
                static += 1
            pc += 1
        count += active * static
    run(0, len(prog), np.ones(lengths.size, dtype=bool))
    return count
