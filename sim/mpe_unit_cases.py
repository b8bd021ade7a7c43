"""MPE-unit test cases: weight channels, a KV cache, buffers and MPE instructions in; the
golden model's results out, in the RTL's buffer layout.

A case is a start state: per weight channel the bytes the AXI memories hold (packed weight
tensors of every format of the build, laid out with :mod:`flightllm.hw.formats`, and two KV
caches written with :class:`~flightllm.hw.kvcache.KvLayout`), the on-chip buffers in the
golden model's representation, and a list of MPE instructions with the values of their
register fields. :func:`build` runs every instruction on the golden model
(:class:`~flightllm.runtime.golden.Golden`, the specification) from the start state and
writes what it produces into the expected images of the result regions
(:func:`flightllm.hw.buffers.images` layout): MV/MM rows ``0 .. rows-1``, elements ``0 .. N-1``;
QK the scores of its query heads at every position ``< n`` of a row tile the instruction
streams (positions of tiles it does not stream are masked for every row: the unit leaves
them, the golden model writes them; see the report); PV its heads' ``head_dim`` outputs.
:func:`save` writes the case for :mod:`flightllm.sim.mpe_unit_tb`.
"""

from __future__ import annotations

import copy
import json
import pathlib
from dataclasses import dataclass, field

import numpy as np

from ..hw import formats
from ..hw.buffers import buffer_map, images
from ..hw.control import COMPUTE_WAITS, entry_layout
from ..hw.isa import Buf, Instr, Opcode, encode, reg_values
from ..hw.kvcache import K, V, KvLayout
from ..hw.mpe_unit import MpeFault, UnitGeometry, mpe_decode
from ..hw.params import HwParams
from ..runtime import sfu
from ..runtime.golden import Golden

__all__ = ["Case", "build", "save", "Setup"]

F32 = np.float32


@dataclass
class Setup:
    """The memories of a case: weight channel images, the tensors in them, KV caches."""
    params: HwParams
    images: list                                  # per channel: uint8 array
    tensors: dict = field(default_factory=dict)   # name -> (w_off, PackedTensor)
    kv: list = field(default_factory=list)        # KvLayout per cache


@dataclass
class Case:
    setup: Setup
    bufs: dict                                    # Buf value -> golden representation
    prog: list                                    # (Instr, regs (16 ints))
    fault_at: int = -1                            # the entry that faults (abort, then go on)


def place_tensors(p: HwParams, tensors: dict) -> Setup:
    """Pack ``tensors`` (name -> QTensor) one after the other (ALIGN-aligned) in every channel."""
    C = p.weight_channels
    chans = [bytearray() for _ in range(C)]
    placed = {}
    for name, qt in tensors.items():
        pt = formats.pack_tensor(qt, p)
        off = len(chans[0])
        for c in range(C):
            chans[c] += pt.channel_image(c)
        placed[name] = (off, pt)
    return Setup(p, [np.frombuffer(bytes(ch), np.uint8).copy() for ch in chans], placed)


def add_kv(s: Setup, layers, kv_heads, head_dim, cap, fmt_k, fmt_v, rng) -> KvLayout:
    """A KV cache after what the channels hold, every position written with random values."""
    base = formats.align(len(s.images[0]))
    kvl = KvLayout(layers, kv_heads, head_dim, cap, formats.WeightFormat.parse(fmt_k), s.params, base,
                   formats.WeightFormat.parse(fmt_v))
    size = base + kvl.channel_bytes
    for c in range(len(s.images)):
        img = np.zeros(size, np.uint8)
        img[:len(s.images[c])] = s.images[c]
        s.images[c] = img
    for layer in range(layers):
        for kind in (K, V):
            f = kvl.fmt_of(kind)
            vals = rng.integers(f.qmin, f.qmax + 1, (cap, kv_heads, head_dim))
            kvl.write(s.images, layer, kind, 0, vals)
    s.kv.append(kvl)
    return kvl


def _plan(kvl: KvLayout, heads: int) -> dict:
    return {"max_seq": kvl.cap, "kv_bytes": 0, "out_row_bytes": 4, "heads": heads, "kv_heads": kvl.kv_heads,
            "head_dim": kvl.head_dim, "layers": kvl.layers, "kv_format": kvl.fmt.name,
            "kv_format_v": kvl.fmt_v.name, "kv_base": kvl.base}


def _golden(s: Setup, kvl: KvLayout | None, heads: int) -> Golden:
    p = s.params
    if kvl is None:
        g = Golden(p, [bytes(img) for img in s.images], None, {"max_seq": p.max_seq_len, "kv_bytes": 0,
                                                               "out_row_bytes": 4})
        return g
    g = Golden(p, [bytes(img[:kvl.base]) for img in s.images], None, _plan(kvl, heads))
    for c, img in enumerate(s.images):
        n = min(len(g.channels[c]), len(img))
        g.channels[c][:n] = img[:n]
    return g


def _kv_of(s: Setup, ins: Instr):
    off = 64 * ins.f.get("kv_off", 0)
    for kvl in s.kv:
        try:
            kvl.locate(off)
            return kvl
        except ValueError:
            continue
    raise ValueError(f"{ins}: kv_off {off} is in no cache")


def build(case: Case, heads: int) -> dict:
    """Run every instruction on the golden model; the start images, the expected images of
    the result regions, the entries and the ``mpe_tok`` masks the unit must present."""
    s, p = case.setup, case.setup.params
    ug = UnitGeometry(p)
    L = p.sfu_lanes
    bm = buffer_map(p)
    start = {}
    for b, v in case.bufs.items():
        start.update(images(p, Buf(b), v))
    want = {name: img.copy() for name, img in start.items()}
    cover = {name: np.zeros(img.shape, bool) for name, img in start.items()}
    goldens = {}
    entries, toks = [], []
    for k, (ins, regs) in enumerate(case.prog):
        word = encode(ins)
        rv = reg_values(ins, regs)
        entries.append((word, k, rv))
        if k == case.fault_at:
            try:
                mpe_decode(ug, word, rv)
            except MpeFault:
                continue
            raise ValueError(f"entry {k} ({ins}) was meant to fault")
        d = mpe_decode(ug, word, rv)                  # a good entry decodes (or the case is wrong)
        if k < case.fault_at:
            continue                                  # may be dropped by the abort: not checked
        if ins.f.get("wait", 0) & COMPUTE_WAITS:
            toks.append(ins.f["wait"] & COMPUTE_WAITS)
        attn = ins.op in (Opcode.QK, Opcode.PV)
        kvl = _kv_of(s, ins) if attn else None
        key = id(kvl)
        if key not in goldens:
            goldens[key] = _golden(s, kvl, heads)
        g = goldens[key]
        g.bufs = copy.deepcopy(case.bufs)
        if not attn:                                  # golden takes exactly K columns and K / G factors
            src = ins.f.get("src", Buf.HQ).value
            q, sc, u = g.bufs[src]
            kin = ins.f["k_in"]
            g.bufs[src] = (q[:, :kin], sc, u[:, :kin >> ins.f.get("group_log2", 0)])
        gi = ins.with_(wait=0, signal=0)
        regd = {i: v for i, v in enumerate(regs) if i}
        with np.errstate(all="ignore"):
            g.run([gi, Instr(Opcode.END)], regd)
        f = {n_: (v.value if hasattr(v, "value") else v) for n_, v in ins.f.items()}
        dst = f.get("dst", 0)
        name = Buf(dst).name
        reg = bm[name]
        img, cov = want[name], cover[name]
        flat, fcov = img.reshape(reg.rows, reg.row_words * L), cov.reshape(reg.rows, reg.row_words * L)
        out = g.bufs[dst]
        if not attn:
            rows, n = out.shape
            flat[:rows, :n] = out.view(np.uint32)
            fcov[:rows, :n] = True
            continue
        c = d["comp"]
        rows = regs[f.get("rows_reg", 0)] if f.get("rows_reg", 0) else 1
        rep, kvh = f["rep"], f.get("kvh", 0)
        h0 = kvh * rep
        if ins.op == Opcode.QK:
            cap = f["cap"]
            n = regs[f.get("len_reg", 0)] + f.get("len_add", 0) + rows - 1
            tiles = [c["t_s0"] + i for i in range(c["t_n0"])] + [c["t_s1"] + i for i in range(c["tiles"] - c["t_n0"])]
            pos = np.concatenate([np.arange(t * ug.R, (t + 1) * ug.R) for t in tiles])
            pos = pos[pos < n]
            for hh in range(h0, h0 + rep):
                flat[:rows, hh * cap + pos] = out[:rows, hh, pos].view(np.uint32)
                fcov[:rows, hh * cap + pos] = True
        else:
            hd = f["head_dim"]
            flat[:rows, h0 * hd:(h0 + rep) * hd] = out[:rows, h0 * hd:(h0 + rep) * hd].view(np.uint32)
            fcov[:rows, h0 * hd:(h0 + rep) * hd] = True
    load = [(bm[name].id, w, img[w]) for name, img in sorted(start.items()) for w in range(img.shape[0])]
    return {"params": p, "load": load, "entries": entries, "toks": toks, "want": want, "cover": cover,
            "images": s.images, "fault_at": case.fault_at, "names": [ins.op.name for ins, _ in case.prog]}


def save(path, built: dict, check=("S", "A", "Y", "G"), stall: float = 0.25, pause: float = 0.2, seed: int = 0,
         serial: bool = False, contention: bool = True, rate: float | None = None,
         tok_delay: int | None = None) -> pathlib.Path:
    """Write a built case as the testbench's stimuli. ``check``: the result regions read back
    and compared (every word of them); ``serial``: each entry offered after the previous
    one's ``done`` (for latencies); ``contention``: host reads compete for the buffers;
    ``rate``: instead of random pauses, the AXI memories return a beat on that fraction of
    the cycles, evenly (a channel's sustained bandwidth, for cycle counts); ``tok_delay``: each
    ``mpe_tok`` is accepted that many cycles after it is presented."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    p = built["params"]
    L = p.sfu_lanes
    bm = buffer_map(p)
    el = entry_layout()
    ent = []
    for word, pc, rv in built["entries"]:
        v = word << el["word"].offset | pc << el["pc"].offset
        for i, r in enumerate(rv):
            v |= r << (el["regs"].offset + 32 * i)
        ent.append(str(v))
    load = built["load"]
    arrays = {
        "params": np.frombuffer(p.to_json().encode(), np.uint8),
        "load_region": np.array([r for r, _, _ in load], np.int64),
        "load_word": np.array([w for _, w, _ in load], np.int64),
        "load_lanes": np.array([lanes for _, _, lanes in load], np.uint32).reshape(-1, L),
    }
    for c, img in enumerate(built["images"]):
        arrays[f"mem{c}"] = np.asarray(img, np.uint8)
    meta = {"entries": ent, "names": built["names"], "toks": built["toks"], "fault_at": built["fault_at"],
            "stall": stall, "pause": pause, "seed": seed, "serial": serial, "contention": contention, "rate": rate,
            "tok_delay": tok_delay,
            "channels": p.weight_channels, "checks": []}
    for k, name in enumerate(check):
        if name not in built["want"]:
            continue
        meta["checks"].append({"region": bm[name].id, "name": name})
        arrays[f"chk{k}_want"] = built["want"][name]
        arrays[f"chk{k}_cover"] = built["cover"][name]
    meta["checks"] = [dict(c, key=k) for k, c in zip([k for k, n in enumerate(check) if n in built["want"]],
                                                      meta["checks"])]
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)
    return path


def attention_bufs(rng, p: HwParams, T: int, heads: int, hd: int, cap: int, kv_heads: int, prog):
    """QQ, PQ, KS and S as a decode / prefill chunk leaves them for ``prog``'s QK and PV: random
    queries and scores, and probabilities that are 0 where a row does not attend (what
    SOFTMAX writes), for the heads of each PV of ``prog`` by its own mask."""
    qq = rng.integers(-127, 128, (T, heads * hd)).astype(np.int8)
    qs = (rng.standard_normal((T, heads)) * 0.05).astype(F32)
    pq = np.zeros((T, heads, cap), np.int8)
    ps = rng.uniform(1e-4, 1e-2, (T, heads)).astype(F32)
    pu = rng.integers(0, 256, (T, heads, cap // 32)).astype(np.uint8)
    for ins, regs in prog:
        if ins.op != Opcode.PV:
            continue
        f = ins.f
        rows = regs[f["rows_reg"].value] if f.get("rows_reg") else 1
        valid = regs[f["len_reg"].value] + f.get("len_add", 0) + np.arange(rows)
        mask = sfu.attention_mask(valid, cap, f.get("sink", 0), f.get("window", 0))
        h0 = f["kvh"] * f["rep"]
        for hh in range(h0, h0 + f["rep"]):
            pq[:rows, hh] = np.where(mask, rng.integers(0, 128, (rows, cap)), 0)
    ks = rng.uniform(0.001, 0.1, (cap, kv_heads)).astype(F32)
    s = rng.standard_normal((T, heads, cap)).astype(F32)
    return {Buf.QQ.value: (qq, qs, None), Buf.PQ.value: (pq, ps, pu), Buf.KS.value: ks, Buf.S.value: s}
