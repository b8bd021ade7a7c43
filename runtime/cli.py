"""`flightllm generate`, `flightllm chat`, `flightllm serve` and `flightllm disasm` (hooked by :func:`add_cli`)."""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path

from ..compiler.compress import DEFAULT_PRESET

__all__ = ["add_cli", "resolve_artifact", "cache_dir", "chat_prompt_ids"]

# Everything that decides a cached artifact's bytes: it is reused only while these are
# unchanged. The import (weights and native integers), the float reference (calibration
# statistics), the tokenizer (calibration tokens, tokenizer.json), the compressor, the
# packed format, the hardware parameters, the scheduler and the artifact layout; the ISA
# enters through its generated field table (the encoding), and the model file through
# its path, size and modification time.
_SOURCES = ("hw/formats.py", "hw/params.py", "compiler/schedule.py", "compiler/artifact.py",
            "compiler/compress.py", "compiler/obs.py", "compiler/compile.py",
            "compiler/gguf_import.py", "compiler/reference.py", "compiler/tokenizer.py",
            "compiler/data/calibration.txt")


def cache_dir() -> Path:
    return Path(os.environ.get("FLIGHTLLM_CACHE", Path.home() / ".cache" / "flightllm"))


def _code_hash(model=None) -> str:
    root = Path(__file__).resolve().parent.parent
    from ..compiler.gguf_import import default_model_path
    from ..hw.isa import markdown_table

    h = hashlib.sha256(markdown_table().encode())
    path = Path(model) if model else default_model_path()
    st = path.stat()
    h.update(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    for rel in _SOURCES:
        f = root / rel
        h.update(f.read_bytes() if f.is_file() else rel.encode())
    return h.hexdigest()[:12]


def resolve_artifact(artifact: str | None, preset: str, hw: str, quiet: bool = False, model=None,
                     kv: str = "int8", sink: int = 0, window: int = 0) -> Path:
    """The artifact directory to use: the given one, or ``model`` (default SmolLM2)
    compiled with ``preset`` and the KV cache options for hardware ``hw`` into the
    cache (once per code version)."""
    if artifact:
        return Path(artifact)
    from ..compiler.artifact import Artifact, ArtifactError
    from ..compiler.compile import compile_model
    from ..hw.params import get_preset

    params = get_preset(hw)
    tag = "smollm2" if model is None else Path(model).stem + "-" + hashlib.sha256(
        str(Path(model).resolve()).encode()).hexdigest()[:8]
    kv_tag = "" if (kv, sink, window) == ("int8", 0, 0) else f"-kv{kv}s{sink}w{window}"
    out = cache_dir() / f"{tag}-{preset}{kv_tag}-{hw}-{_code_hash(model)}"

    def cached():
        if out.is_dir():
            try:
                return bool(Artifact(out, verify=False).manifest.get("programs"))
            except ArtifactError:
                pass
        return False

    if cached():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # one compile per artifact at a time: a second process (a parallel test worker, another
    # shell) waits for it and uses its result, rather than replacing a directory in use
    import fcntl
    with open(out.with_name(out.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if cached():
            return out
        if not quiet:
            print(f"compiling {tag} with preset {preset} for {hw} into {out} (once) ...", file=sys.stderr)
        compile_model(model, out, preset, params, progress=not quiet, kv=kv, sink=sink, window=window)
    return out


def _driver(args):
    from ..hw.params import get_preset
    from .device import open_device
    from .driver import Driver

    params = get_preset(args.hw) if args.artifact is None or args.hw_given else None
    dev = open_device(args.backend, params)     # a missing backend (no pyxrt, no card) fails before a compile
    path = resolve_artifact(args.artifact, args.preset, args.hw, args.quiet)
    return Driver(path, dev)


def _sampler(args):
    from .driver import Sampler

    return Sampler(args.temperature, args.top_k, args.top_p, args.seed)


def _stream(drv, ids, args, out=None, reuse=False):
    from ..compiler.tokenizer import StreamDecoder

    out = out or sys.stdout
    dec = StreamDecoder(drv.tok, skip_special=True)
    got = []
    t0 = time.perf_counter()
    for tid in drv.generate(ids, args.max_new_tokens, _sampler(args), reuse_cache=reuse):
        got.append(tid)
        out.write(dec.push(tid))
        out.flush()
    out.write(dec.flush())
    dt = time.perf_counter() - t0
    return got, dt


def chat_prompt_ids(tok, messages) -> list:
    """Token ids of ``messages`` in the model's chat template, ready for the reply
    (the template's control tokens parsed; used by `chat` and `serve`)."""
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
    return tok.encode(prompt, add_bos=False, parse_special=True)


def _cmd_generate(args) -> int:
    drv = _driver(args)
    if args.chat:            # one user turn in the model's own chat template
        ids = chat_prompt_ids(drv.tok, [{"role": "user", "content": args.prompt}])
    else:
        ids = drv.tok.encode(args.prompt)
    drv.check_room(len(ids), args.max_new_tokens)
    if args.echo:
        sys.stdout.write(args.prompt)
    got, dt = _stream(drv, ids, args)
    sys.stdout.write("\n")
    sys.stdout.flush()
    if not args.quiet:
        dec = [s for s in drv.stats if s[0] == "decode"]
        cyc = sum(s[2].cycles for s in dec)
        est = (f", modelled {len(dec) * drv.dev.params.clock_mhz * 1e6 / cyc:.1f} tok/s on {drv.dev.params.name}"
               if cyc else "")
        print(f"[{len(ids)} prompt + {len(got)} generated tokens in {dt:.2f} s on {args.backend}{est}]",
              file=sys.stderr)
    return 0


def _cmd_chat(args) -> int:
    drv = _driver(args)
    tty = sys.stdin.isatty()
    messages = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    if tty:
        print("chat with the model; /reset clears the conversation, /exit or Ctrl-D quits", file=sys.stderr)
    while True:
        if tty:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if line == "/exit":
            break
        if line == "/reset":
            messages = messages[:1] if args.system else []
            drv.reset()
            continue
        messages.append({"role": "user", "content": line})
        ids = chat_prompt_ids(drv.tok, messages)
        try:
            drv.check_room(len(ids), args.max_new_tokens)
        except ValueError as e:
            print(f"flightllm chat: {e}; /reset to start over", file=sys.stderr)
            messages.pop()
            continue
        got, _ = _stream(drv, ids, args, reuse=True)
        sys.stdout.write("\n")
        sys.stdout.flush()
        messages.append({"role": "assistant", "content": drv.tok.decode(got, skip_special=True)})
    return 0


def _cmd_serve(args) -> int:
    import socket

    import uvicorn

    from .driver import Sampler
    from .serve import Defaults, create_app

    if args.queue < 0:
        raise ValueError(f"--queue must be >= 0, not {args.queue}")
    Sampler(args.temperature, args.top_k, args.top_p)      # bad defaults fail now, not per request
    drv = _driver(args)             # compile (once) and load before the port opens: errors are one line
    app = create_app(drv, model_name=args.model_name, queue=args.queue, backend=args.backend,
                     defaults=Defaults(args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                                       None if args.seed < 0 else args.seed))
    # bind here rather than in uvicorn, so that --port 0 (any free port) can be reported
    sock = socket.create_server((args.host, args.port), family=socket.AF_INET6 if ":" in args.host
                                else socket.AF_INET)
    host, port = sock.getsockname()[:2]
    print(f"flightllm serve: {args.model_name or drv.artifact.config.name} on {args.backend}, "
          f"http://{'[' + host + ']' if ':' in host else host}:{port}/v1 (queue {args.queue}; Ctrl-C stops)",
          flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning" if args.quiet else "info",
                                           access_log=not args.quiet,
                                           timeout_graceful_shutdown=args.shutdown_timeout))
    try:
        server.run(sockets=[sock])
    finally:                        # a second Ctrl-C skips the app's shutdown: close the device here
        worker = getattr(app.state, "worker", None)
        if worker is not None:
            worker.close()
    return 0


def _cmd_disasm(args) -> int:
    from ..compiler.artifact import Artifact
    from ..hw.isa import WORD_BYTES, disasm
    from .device import artifact_programs

    a = Artifact(args.artifact)
    progs = artifact_programs(a)
    names = [args.program] if args.program else list(progs)
    try:
        for name in names:
            prog = progs[name]
            print(f"; program {name}: {len(prog)} instructions, {len(prog) * WORD_BYTES} bytes")
            print(disasm(prog))
        sys.stdout.flush()
    except BrokenPipeError:                      # `flightllm disasm ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _common(p, with_artifact=True):
    p.add_argument("--artifact", help="compiled artifact directory (default: compile SmolLM2 with --preset)")
    p.add_argument("--preset", default=DEFAULT_PRESET,
                   help=f"compression preset when no --artifact (default {DEFAULT_PRESET}: the GGUF's own formats)")
    p.add_argument("--hw", default=None, help="hardware preset (default: the artifact's, u280 when compiling)")
    from .device import BACKENDS

    p.add_argument("--backend", default="golden", choices=tuple(BACKENDS),
                   help="golden: the bit-exact golden model (default); rtl: the generated kernel under "
                        "Verilator, driven register by register like the board (needs an artifact for a "
                        "small preset such as --hw sim, e.g. from `flightllm tiny-model`; builds the "
                        "simulator once, minutes); xrt: the same driver on a U280 through pyxrt, with the "
                        "xclbin `flightllm flash` loaded (FLIGHTLLM_XRT_DEVICE: card index, default 0; "
                        "FLIGHTLLM_XRT_XCLBIN: load this xclbin first)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--seed", type=int, default=0, help="sampling RNG seed")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress or statistics on stderr")


def _fix_hw(func):
    def run(args):
        args.hw_given = args.hw is not None
        args.hw = args.hw or "u280"
        if args.max_new_tokens < 0:
            raise ValueError(f"--max-new-tokens must be >= 0, not {args.max_new_tokens}")
        return func(args)
    return run


def add_cli(sub) -> None:
    g = sub.add_parser("generate", help="generate text from a prompt on a backend (golden model by default)",
                       description="Tokenize the prompt, prefill it, and decode new tokens, printing them "
                                   "as they are generated.")
    g.add_argument("--prompt", required=True, help="text to continue (or, with --chat, a user message)")
    g.add_argument("--chat", action="store_true",
                   help="wrap the prompt as one user turn of the model's chat template")
    g.add_argument("--echo", action="store_true", help="print the prompt before the continuation")
    _common(g)
    g.set_defaults(func=_fix_hw(_cmd_generate))

    c = sub.add_parser("chat", help="interactive chat with the model's chat template (stdin may be piped)")
    c.add_argument("--system", default=None, help="system message")
    _common(c)
    c.set_defaults(func=_fix_hw(_cmd_chat), max_new_tokens=256)

    s = sub.add_parser(
        "serve", help="OpenAI-compatible HTTP server (chat/completions, streaming) over a backend",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Serve the model over HTTP with the OpenAI API's shapes, so OpenAI clients work unchanged:\n"
                    "  POST /v1/chat/completions  messages in the model's chat template (\"stream\": true: SSE)\n"
                    "  POST /v1/completions       a prompt continued (\"stream\": true: SSE)\n"
                    "  GET  /v1/models            the one model served (--model-name)\n"
                    "  GET  /health               status, backend, requests running and waiting\n"
                    "The device runs one request at a time; --queue more may wait, and further ones are\n"
                    "refused at once with 503 and Retry-After. A bad field is a 400 naming it (max_tokens\n"
                    "beyond the context the prompt leaves, temperature outside 0..2, top_p outside (0, 1]),\n"
                    "an unknown model a 404. SIGINT/SIGTERM: stop accepting, finish the requests in flight\n"
                    "(up to --shutdown-timeout), close the device.",
        epilog="example:\n"
               "  flightllm serve --artifact out/tiny --port 8000 &\n"
               "  curl -s localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\\n"
               "       -d '{\"messages\": [{\"role\": \"user\", \"content\": \"Hello\"}], \"max_tokens\": 16}'")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    s.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 picks a free one, printed)")
    s.add_argument("--queue", type=int, default=4,
                   help="requests that may wait while one runs on the device (default 4); more get 503")
    s.add_argument("--model-name", default=None,
                   help="the model id clients name and /v1/models lists (default: the artifact's model name)")
    s.add_argument("--shutdown-timeout", type=int, default=30, metavar="SECONDS",
                   help="on SIGINT/SIGTERM, wait this long for requests in flight, then cancel them (default 30)")
    _common(s)
    helps = {"max_new_tokens": "max_tokens of requests that give none, capped by the context left (default 256)",
             "seed": "sampling seed of requests that give none (default 0: reproducible; -1: a random one each)"}
    for a in s._actions:            # the sampling options are the defaults of requests that leave them out
        if a.dest in helps:
            a.help = helps[a.dest]
        elif a.dest in ("temperature", "top_k", "top_p"):
            a.help += "; the default of requests that give none"
    s.set_defaults(func=_fix_hw(_cmd_serve), max_new_tokens=256)

    d = sub.add_parser("disasm", help="print an artifact's instruction programs readably")
    d.add_argument("artifact")
    d.add_argument("--program", choices=("decode", "prefill"), help="only this program")
    d.set_defaults(func=_cmd_disasm)
