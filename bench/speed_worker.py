"""One timed path of ``bench/speed.py``, as a long-lived worker process.

The orchestrator (``bench/speed.py``) starts one worker per path, so every model lives in
its own process and only one of them computes at a time. A worker loads its model once,
prints one JSON line ``{"ready": ...}`` (load time, package versions, threads), then
answers each ``{"cmd": "run", ...}`` line on stdin with one JSON line of timings until
stdin closes. Paths:

``golden``
    flightllm's bit-exact golden model through :class:`flightllm.runtime.driver.Driver`
    on the default artifact (``--preset``/``--hw``, compiled into the flightllm cache).
``reference``
    flightllm's float32 numpy reference (:class:`flightllm.compiler.reference.FloatLlama`).
``transformers``
    HF transformers, float32 on the torch CPU, loading the same GGUF (dequantized at load).
``llama.cpp``
    llama-cpp-python on the same GGUF.

The peer paths (transformers, llama.cpp) run under the bench's own virtual environment,
which has no flightllm: this file imports only the standard library and numpy at the top,
and takes the GGUF path and the token ids from the orchestrator.

Run by hand (normally ``bench/speed.py`` does it)::

    python bench/speed_worker.py llama.cpp --gguf MODEL.gguf --threads 2
    {"cmd": "run", "prompt": [504, 3575], "tokens": 8, "long": [504, 3575, ...]}
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from importlib import metadata

import numpy as np

PATHS = ("golden", "reference", "transformers", "llama.cpp")

# the distributions whose versions each path reports (besides Python)
PACKAGES = {"golden": ("flightllm", "numpy", "numba"), "reference": ("flightllm", "numpy"),
            "transformers": ("torch", "transformers", "gguf", "numpy"),
            "llama.cpp": ("llama_cpp_python", "numpy")}


def versions(names) -> dict:
    out = {"python": sys.version.split()[0]}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    return out


class Golden:
    """The golden model via the Driver; greedy tokens come from the device's ARGMAX."""

    def __init__(self, args):
        from flightllm.runtime.cli import resolve_artifact
        from flightllm.runtime.driver import Driver

        self.drv = Driver(resolve_artifact(None, args.preset, args.hw, quiet=True))
        self.threads = {"FLIGHTLLM_BLAS_THREADS": os.environ.get("FLIGHTLLM_BLAS_THREADS", "1 (default)")}
        if "numba" in sys.modules:
            self.threads["numba"] = sys.modules["numba"].get_num_threads()

    def prefill(self, ids) -> int:
        self.drv.reset()
        self.drv.stats.clear()                    # only this run's steps (extra() reads them)
        self.drv.prefill(ids)                     # prefill_last: the last row's logits only
        return self.drv.last_argmax

    def step(self, tok) -> int:
        self.drv.step(tok, need_logits=False)
        return self.drv.last_argmax

    def extra(self) -> dict:
        """The performance model's cycles per decode token of this run (the FPGA's speed)."""
        cyc = [s[2].cycles for s in self.drv.stats if s[0] == "decode"]
        return {"modelled_cycles_per_token": float(np.mean(cyc)) if cyc else None,
                "clock_mhz": self.drv.dev.params.clock_mhz}


class Reference:
    """The float32 numpy reference; numpy's BLAS threads are set by the orchestrator's environment."""

    def __init__(self, args):
        from flightllm.compiler.gguf_import import load_gguf
        from flightllm.compiler.reference import FloatLlama

        self.ref = FloatLlama(load_gguf(args.gguf), max_seq=args.max_seq)
        self.threads = {"OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS", "all cores (default)")}

    def prefill(self, ids) -> int:
        self.ref.reset()
        return int(np.argmax(self.ref.forward(ids)[-1]))

    def step(self, tok) -> int:
        return int(np.argmax(self.ref.forward([tok])[-1]))


class Transformers:
    """HF transformers on the same GGUF: float32 weights (dequantized at load), torch CPU, KV cache."""

    def __init__(self, args):
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(args.threads)
        d, f = os.path.split(os.path.abspath(args.gguf))
        try:
            self.model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
        except TypeError:                         # transformers < 4.56 names it torch_dtype
            self.model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32)
        self.model.eval()
        self.torch = torch
        self.threads = {"torch": torch.get_num_threads(), "torch_interop": torch.get_num_interop_threads()}

    def _forward(self, ids, past):
        t = self.torch
        with t.inference_mode():
            out = self.model(input_ids=t.tensor([list(ids)], dtype=t.long), past_key_values=past,
                             use_cache=True, logits_to_keep=1)    # generation needs the last row only
        self.past = out.past_key_values
        return int(out.logits[0, -1].argmax())

    def prefill(self, ids) -> int:
        return self._forward(ids, None)

    def step(self, tok) -> int:
        return self._forward([tok], self.past)


class LlamaCpp:
    """llama-cpp-python on the same GGUF (its own quantized kernels), ``--threads`` threads."""

    def __init__(self, args):
        import llama_cpp

        self.lib = llama_cpp
        self.llm = llama_cpp.Llama(model_path=args.gguf, n_ctx=args.max_seq, n_batch=args.max_seq,
                                   n_threads=args.threads, n_threads_batch=args.threads,
                                   logits_all=False, verbose=False)
        self.threads = {"n_threads": args.threads, "n_threads_batch": args.threads}
        # which SIMD the build uses: shows whether it was built for the native CPU
        self.system_info = llama_cpp.llama_print_system_info().decode(errors="replace").strip()

    def _eval(self, ids) -> int:
        self.llm.eval(list(ids))
        # with logits_all=False, eval() keeps no scores: read the last output row from the context
        row = self.lib.llama_get_logits_ith(self.llm.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(row, shape=(self.llm.n_vocab(),))))

    def prefill(self, ids) -> int:
        self.llm.reset()
        return self._eval(ids)

    def step(self, tok) -> int:
        return self._eval([tok])


WORKERS = {"golden": Golden, "reference": Reference, "transformers": Transformers, "llama.cpp": LlamaCpp}


def timed_run(w, prompt, n_tokens: int, long) -> dict:
    """Greedy: prefill ``prompt`` (its argmax is the first token), then ``n_tokens`` decode
    steps; then a prefill of ``long`` into an empty cache. Wall and CPU (all threads) seconds."""
    t0, c0 = time.perf_counter(), time.process_time()
    toks = [w.prefill(prompt)]
    t1, c1 = time.perf_counter(), time.process_time()
    for _ in range(n_tokens):
        toks.append(w.step(toks[-1]))
    t2, c2 = time.perf_counter(), time.process_time()
    extra = w.extra() if hasattr(w, "extra") else {}
    w.prefill(long)
    t3, c3 = time.perf_counter(), time.process_time()
    return {"tokens": toks, "prompt_s": t1 - t0, "decode_s": t2 - t1, "decode_cpu_s": c2 - c1,
            "prefill_s": t3 - t2, "prefill_cpu_s": c3 - c2, **extra}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("path", choices=PATHS)
    ap.add_argument("--gguf", required=True, help="the model file (all paths load the same one)")
    ap.add_argument("--threads", type=int, default=2, help="threads of the peer paths (torch, llama.cpp)")
    ap.add_argument("--max-seq", type=int, default=256)
    ap.add_argument("--preset", default="native")
    ap.add_argument("--hw", default="u280")
    args = ap.parse_args(argv)
    # the protocol gets its own copy of stdout; fd 1 then goes to stderr, so libraries
    # that print (Python or C) cannot break the one-JSON-line-per-answer protocol
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    t0 = time.perf_counter()
    try:
        w = WORKERS[args.path](args)
    except Exception as e:           # reported to the orchestrator, which skips the path
        out.write(json.dumps({"ready": False, "error": f"{type(e).__name__}: {e}"}) + "\n")
        out.flush()
        return 1
    ready = {"ready": True, "load_s": time.perf_counter() - t0, "versions": versions(PACKAGES[args.path]),
             "threads": w.threads, "pid": os.getpid()}
    if hasattr(w, "system_info"):
        ready["system_info"] = w.system_info
    out.write(json.dumps(ready) + "\n")
    out.flush()
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("cmd") != "run":
            raise SystemExit(f"speed_worker: unknown command {cmd!r}")
        try:
            res = timed_run(w, cmd["prompt"], int(cmd["tokens"]), cmd["long"])
        except Exception as e:
            res = {"error": f"{type(e).__name__}: {e}"}
        out.write(json.dumps(res) + "\n")
        out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
