"""SFU-unit test cases: buffers and instructions in, the golden model's buffers out.

A case is a start state of the on-chip buffers (the golden model's representation:
``{Buf value: array or (q, scales, factors)}``), the SFU tables, a KV plan (for SOFTMAX),
registers and a list of SFU instructions. :func:`make_case` runs the instructions on the
golden model (the specification) and turns everything into what the RTL testbench
(:mod:`flightllm.sim.sfu_tb`) drives and checks, in the buffers' RTL layout
(:func:`flightllm.hw.buffers.images`): the words to load, the :class:`SfuOp` words,
and for every region the instructions changed, the words, their expected lanes and
which lanes the result covers. :func:`save` writes a case as the testbench's ``.npz``.
"""

from __future__ import annotations

import copy
import json
import pathlib

import numpy as np
from amaranth.lib import data

from ..hw.buffers import TABLES, buffer_map, images
from ..hw.isa import Buf, Instr, Opcode, Reg
from ..hw.params import HwParams
from ..hw.sfu_unit import SfuOp, sfu_op
from ..runtime.golden import Golden

__all__ = ["make_case", "save", "pack"]

F32 = np.float32


def pack(layout, fields: dict) -> int:
    """An integer holding ``fields`` at their offsets in ``layout``."""
    v = 0
    for name, val in fields.items():
        f = layout[name]
        v |= (int(val) & ((1 << f.width) - 1)) << f.offset
    return v


def _ones_like(v):
    if isinstance(v, tuple):
        return tuple(None if a is None else np.ones_like(a) for a in v)
    return np.ones_like(v)


def _same(a, b):
    if isinstance(a, tuple) != isinstance(b, tuple):
        return False
    if isinstance(a, tuple):
        return all((x is None) == (y is None) and (x is None or (x.shape == y.shape and np.array_equal(
            np.ascontiguousarray(x).view(np.uint8), np.ascontiguousarray(y).view(np.uint8)))) for x, y in zip(a, b))
    return a.shape == b.shape and np.array_equal(np.ascontiguousarray(a).view(np.uint8),
                                                 np.ascontiguousarray(b).view(np.uint8))


def make_case(p: HwParams, bufs0: dict, tables, plan: dict, prog: list, regs) -> dict:
    """Run ``prog`` on the golden model from ``bufs0`` and describe the RTL's task."""
    tables = np.asarray(tables, F32)
    g = Golden(p, [], tables, plan)
    g.bufs = copy.deepcopy(bufs0)
    g.regs = list(regs)
    with np.errstate(all="ignore"):
        st = g.run(list(prog) + [Instr(Opcode.END)])
    bm = buffer_map(p)
    L = p.sfu_lanes
    init = {}
    for b, v in bufs0.items():
        init.update(images(p, Buf(b), v))
    tab = np.zeros((bm[TABLES].words, L), np.uint32)
    if tables.size > tab.size:
        raise ValueError(f"tables: {tables.size} floats exceed the {tab.size} of buf_tables")
    tab.reshape(-1)[:tables.size] = tables.view(np.uint32)
    init[TABLES] = tab
    load = [(bm[name].id, w, img[w]) for name, img in sorted(init.items()) for w in np.flatnonzero(img.any(axis=1))]
    checks = []
    for b, v in sorted(g.bufs.items()):
        if b in bufs0 and _same(bufs0[b], v):
            continue
        ones = images(p, Buf(b), _ones_like(v))
        for name, img in images(p, Buf(b), v).items():
            cover = ones[name] != 0
            words = np.flatnonzero(cover.any(axis=1))
            checks.append((bm[name].id, name, bm[name].bits == 32, words, img[words], cover[words]))
    lay = data.Layout.cast(SfuOp)
    ops = [pack(lay, sfu_op(ins, regs)) for ins in prog]
    am = [ins for ins in prog if ins.op == Opcode.ARGMAX]
    return {"params": p, "load": load, "ops": ops, "names": [ins.op.name for ins in prog], "checks": checks,
            "argmax": g.regs[Reg.ARGMAX.value] if am else -1, "n_argmax": len(am),
            "golden_cycles": st.op_cycles}


def save(path, case: dict, stall: float = 0.25, seed: int = 0, serial: bool = False,
         contention: bool = True) -> pathlib.Path:
    """Write ``case`` as the testbench's stimuli (ints as decimal strings where they are
    wider than 64 bits); ``serial`` and ``contention``: see :mod:`flightllm.sim.sfu_tb`."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    p = case["params"]
    L = p.sfu_lanes
    load = case["load"]
    arrays = {
        "params": np.frombuffer(p.to_json().encode(), np.uint8),
        "load_region": np.array([r for r, _, _ in load], np.int64),
        "load_word": np.array([w for _, w, _ in load], np.int64),
        "load_lanes": np.array([lanes for _, _, lanes in load], np.uint32).reshape(-1, L),
    }
    meta = {"ops": [str(o) for o in case["ops"]], "names": case["names"], "argmax": case["argmax"],
            "n_argmax": case["n_argmax"], "stall": stall, "seed": seed, "serial": serial,
            "contention": contention, "checks": []}
    for k, (rid, name, fl, words, want, cover) in enumerate(case["checks"]):
        meta["checks"].append({"region": rid, "name": name, "float": fl})
        arrays[f"chk{k}_words"] = np.asarray(words, np.int64)
        arrays[f"chk{k}_want"] = np.asarray(want, np.uint32)
        arrays[f"chk{k}_cover"] = np.asarray(cover, bool)
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)
    return path
