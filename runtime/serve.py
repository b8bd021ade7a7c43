"""`flightllm serve`: an OpenAI-compatible HTTP server over any backend.

Endpoints (the OpenAI API's shapes, so its clients work unchanged)::

    POST /v1/chat/completions   messages in the model's chat template; "stream": true -> SSE
    POST /v1/completions        a prompt string (or token ids) continued; "stream": true -> SSE
    GET  /v1/models             the one model this server runs
    GET  /health                status, backend, queue depth

One device runs one sequence at a time, so every generation runs on a single worker
thread (:class:`DeviceWorker`) that owns the :class:`~flightllm.runtime.driver.Driver`.
In front of it is a bounded queue: at most ``1 + queue`` requests are admitted (one on
the device, ``queue`` waiting); one more is refused at once with 503 and a Retry-After
header instead of piling up behind the device. The event loop never blocks on the
device; tokens reach it through an :class:`asyncio.Queue` per request.

Errors have the OpenAI shape ``{"error": {"message", "type", "param", "code"}}``: a bad
field is a 400 naming it (``param``), an unknown model a 404 ``model_not_found``, a full
queue a 503 ``server_busy``. A client that goes away (a dropped stream, a stop string
met) stops its generation after the current token, so the device moves on to the next
request. On shutdown (SIGINT/SIGTERM) uvicorn stops accepting, lets the requests in
flight finish (up to its graceful-shutdown timeout, after which they are cancelled), and
then the worker stops and the device is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from .driver import Driver, GenerationError, Sampler

__all__ = ["create_app", "DeviceWorker", "ApiError", "Defaults"]

log = logging.getLogger("uvicorn.error")      # printed like uvicorn's own lines

#: seconds a refused client is told to wait (Retry-After) before trying again
RETRY_AFTER = 1
#: stop strings per request (OpenAI's limit)
MAX_STOP = 4


class ApiError(Exception):
    """An error answered as ``{"error": {...}}`` with ``status``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


@dataclass
class Defaults:
    """What a request that leaves a field out gets (the CLI's --temperature etc.).

    ``max_tokens`` is capped by the context the prompt leaves.
    """

    max_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = 0             # None: a random seed per request


# ----------------------------------------------------------------- request bodies
# Fields an OpenAI client may send that do not change what this server does (user,
# logit_bias of {}, ...) are accepted and ignored; fields that would change the result
# and are not supported (n > 1, penalties, logprobs) are refused with a 400 naming them.

class _StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=0)           # not OpenAI's, but llama.cpp's and vLLM's
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: _StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: bool | int | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v):
        if v != 1:
            raise ValueError(f"only n=1 is supported (one sequence on the device at a time), not {v}")
        return v

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, v):
        if v != 0:
            raise ValueError(f"repetition penalties are not supported (must be 0, not {v})")
        return v

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v):
        if v:
            raise ValueError("logprobs are not supported")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or ())
        if len(stops) > MAX_STOP or any(not s for s in stops):
            raise ValueError(f"at most {MAX_STOP} non-empty stop strings")
        return stops


class _ContentPart(BaseModel):
    type: str
    text: str | None = None


class _Message(BaseModel):
    role: str
    content: str | list[_ContentPart] | None = None

    @field_validator("content")
    @classmethod
    def _text_only(cls, v):
        if isinstance(v, list):         # [{"type": "text", "text": ...}, ...]
            if any(p.type != "text" or p.text is None for p in v):
                raise ValueError("only text content parts are supported")
            return "".join(p.text for p in v)
        return v or ""


class ChatRequest(_Sampling):
    messages: list[_Message] = Field(min_length=1)


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list) and v and isinstance(v[0], str):
            if len(v) != 1:
                raise ValueError(f"one prompt per request, not {len(v)}")
            return v[0]
        return v


# ----------------------------------------------------------------- the device side

class _Job:
    """One admitted generation: the worker puts ("token", id) / ("error", exc) / ("end",
    None) on ``events``; setting ``cancel`` stops it after the current token."""

    def __init__(self, ids, max_tokens: int, sampler: Sampler):
        self.ids, self.max_tokens, self.sampler = ids, max_tokens, sampler
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancel = threading.Event()

    def put(self, kind, value=None):            # from the worker thread
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:                    # the loop is closed: nobody listens any more
            self.cancel.set()


class DeviceWorker:
    """The driver on one thread, behind a queue of at most ``queue`` waiting requests.

    :meth:`submit` is called on the event loop; the generation runs on the worker
    thread, which is the only thread that touches the driver and its device.
    """

    def __init__(self, driver: Driver, queue: int):
        if queue < 0:
            raise ValueError(f"--queue must be >= 0, not {queue}")
        self.driver = driver
        self.queue = queue
        self.admitted = 0               # on the device + waiting for it
        self.served = 0
        self.closing = False
        self._closed = False
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flightllm-device")
        self._jobs: set[_Job] = set()

    @property
    def waiting(self) -> int:
        return max(self.admitted - 1, 0)

    def submit(self, ids, max_tokens: int, sampler: Sampler) -> _Job:
        if self.closing:
            raise ApiError(503, "the server is shutting down", code="server_shutting_down",
                           type="server_error")
        if self.admitted >= 1 + self.queue:
            raise ApiError(503, f"the device is busy and {self.waiting} request(s) already wait for it "
                                f"(queue size {self.queue}); retry after {RETRY_AFTER} s", code="server_busy",
                           type="server_error", headers={"Retry-After": str(RETRY_AFTER)})
        job = _Job(ids, max_tokens, sampler)
        self.admitted += 1
        self._jobs.add(job)
        fut = job.loop.run_in_executor(self._pool, self._run, job)
        fut.add_done_callback(lambda _: self._finished(job))
        return job

    def _finished(self, job):
        # when the worker is done with it, not when its response ends: a stream whose
        # client left keeps its place until the device has actually stopped
        self.admitted -= 1
        self.served += 1
        self._jobs.discard(job)

    def _run(self, job: _Job):
        if job.cancel.is_set():         # its client left while it waited
            job.put("end")
            return
        try:
            for tid in self.driver.generate(job.ids, job.max_tokens, job.sampler):
                job.put("token", tid)
                if job.cancel.is_set():
                    break
        except Exception as e:          # reported to the client, the worker carries on
            log.exception("generation failed")
            job.put("error", e)
        job.put("end")

    def run_on_device(self, fn):
        """``fn()`` on the worker thread (an awaitable), e.g. to build the driver there."""
        return asyncio.get_running_loop().run_in_executor(self._pool, fn)

    def close(self):
        """Refuse new work, stop the generations still running, close the device (idempotent)."""
        self.closing = True
        if self._closed:
            return
        self._closed = True
        for job in list(self._jobs):
            job.cancel.set()
        self._pool.shutdown(wait=True, cancel_futures=True)
        dev = getattr(self.driver, "dev", None)
        if hasattr(dev, "close"):
            dev.close()
        log.info("device closed")


# ----------------------------------------------------------------- text out

def _cut_at_stop(text: str, stops, final: bool):
    """Split ``text`` at the first stop string: (text to send, text held back, stop met).

    While more text may come, the longest tail that could begin a stop string is held
    back, so a stop string split over tokens is still caught and never sent.
    """
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    if hits:
        return text[:min(hits)], "", True
    if final:
        return text, "", False
    hold = 0
    for s in stops:
        hold = max(hold, next((k for k in range(min(len(s) - 1, len(text)), 0, -1)
                               if text.endswith(s[:k])), 0))
    return text[:len(text) - hold], text[len(text) - hold:], False


@dataclass
class _Outcome:
    completion_tokens: int = 0
    finish_reason: str | None = None


async def _texts(job: _Job, tok, stops, out: _Outcome):
    """Text pieces of ``job``'s tokens as they arrive; ``out`` gets the counts at the end.

    Closing this generator early (a dropped client) cancels the job.
    """
    from ..compiler.tokenizer import StreamDecoder

    dec = StreamDecoder(tok, skip_special=True)
    held = ""
    try:
        while True:
            kind, value = await job.events.get()
            if kind == "error":
                raise value
            final = kind == "end"
            if not final:
                out.completion_tokens += 1
            piece, held, hit = _cut_at_stop(held + (dec.flush() if final else dec.push(value)), stops, final)
            if piece:
                yield piece
            if hit or final:
                out.finish_reason = "stop" if hit or out.completion_tokens < job.max_tokens else "length"
                return
    finally:
        job.cancel.set()


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


# ----------------------------------------------------------------- the app

def create_app(driver, *, model_name: str | None = None, queue: int = 4, defaults: Defaults | None = None,
               backend: str | None = None) -> FastAPI:
    """The ASGI app (run it with uvicorn).

    Parameters
    ----------
    driver : Driver or callable
        The driver to serve, or a function returning it (called once at startup, on the
        device thread).
    model_name : str, optional
        The id clients ask for (default: the artifact's model name).
    queue : int
        Requests that may wait while one runs; one more gets 503.
    defaults : Defaults, optional
        Sampling and length for fields a request leaves out (default: greedy, 256 tokens).
    backend : str, optional
        Backend name /health reports (default: the device's ``name``).
    """
    defaults = defaults or Defaults()
    state = {}

    def setup(drv):
        state["drv"] = drv
        state["model"] = model_name or drv.artifact.config.name
        state["backend"] = backend or getattr(drv.dev, "name", type(drv.dev).__name__)

    if isinstance(driver, Driver) or not callable(driver):
        setup(driver)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        worker = DeviceWorker(state.get("drv"), queue)
        state["worker"] = app.state.worker = worker
        if "drv" not in state:
            setup(await worker.run_on_device(driver))
            worker.driver = state["drv"]
        try:
            yield
        finally:
            await asyncio.to_thread(worker.close)

    app = FastAPI(title="flightllm", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        err = exc.errors()[0]
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            return ApiError(400, f"the body is not valid JSON: {err.get('msg')}").response()
        # pydantic's union members add their type to the location; the field is the first part
        param = loc[0] if loc else None
        msg = err.get("msg", "invalid value").removeprefix("Value error, ")
        if err.get("type") == "missing":
            msg = "a required field is missing"
        return ApiError(400, f"{'.'.join(loc) or 'body'}: {msg}", param=param, code="invalid_value").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code,
                        headers=getattr(exc, "headers", None)).response()

    def check_model(req: _Sampling):
        if req.model is not None and req.model != state["model"]:
            raise ApiError(404, f"the model {req.model!r} does not exist; this server runs {state['model']!r}",
                           param="model", code="model_not_found")

    def budget(req: _Sampling, n_prompt: int, prompt_field: str) -> int:
        """The max_tokens to use: the request's, checked against the context left, or the default."""
        max_seq = state["drv"].max_seq
        left = max_seq - n_prompt
        if n_prompt == 0:
            raise ApiError(400, "the prompt is empty", param=prompt_field, code="invalid_value")
        if left < 1:
            raise ApiError(400, f"the prompt has {n_prompt} tokens, which leaves no room to generate in the "
                                f"model's context of {max_seq} tokens", param=prompt_field,
                           code="context_length_exceeded")
        field, asked = ("max_completion_tokens", req.max_completion_tokens) if req.max_tokens is None \
            else ("max_tokens", req.max_tokens)
        if asked is None:
            return min(defaults.max_tokens, left)
        if asked > left:
            raise ApiError(400, f"{field} is {asked}, but the prompt has {n_prompt} tokens and the model's context "
                                f"is {max_seq}: at most {left} new tokens fit", param=field,
                           code="context_length_exceeded")
        return asked

    def sampler(req: _Sampling) -> Sampler:
        pick = lambda v, d: d if v is None else v      # noqa: E731
        seed = pick(req.seed, defaults.seed)
        return Sampler(pick(req.temperature, defaults.temperature), pick(req.top_k, defaults.top_k),
                       pick(req.top_p, defaults.top_p), secrets.randbits(63) if seed is None else seed)

    def usage(n_prompt, out: _Outcome):
        return {"prompt_tokens": n_prompt, "completion_tokens": out.completion_tokens,
                "total_tokens": n_prompt + out.completion_tokens}

    async def respond(req: _Sampling, ids, prompt_field, kind: str):
        """Run ``ids`` and answer as a chat completion (``kind`` "chat") or a text completion
        (the endpoint has checked the model)."""
        n = budget(req, len(ids), prompt_field)
        drv = state["drv"]
        if max(ids) >= drv.vocab or min(ids) < 0:
            raise ApiError(400, f"token id out of range 0..{drv.vocab - 1}", param=prompt_field,
                           code="invalid_value")
        job = state["worker"].submit(ids, n, sampler(req))
        out = _Outcome()
        texts = _texts(job, drv.tok, req.stop or (), out)
        chat = kind == "chat"
        head = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex, "created": int(time.time()),
                "model": state["model"]}

        def choice(text, finish, delta=None):
            c = {"index": 0, "logprobs": None, "finish_reason": finish}
            if not chat:
                c["text"] = text
            elif delta is None:
                c["message"] = {"role": "assistant", "content": text}
            else:
                c["delta"] = delta
            return c

        if not req.stream:
            try:
                async with contextlib.aclosing(texts):
                    text = "".join([piece async for piece in texts])
            except GenerationError as e:
                raise ApiError(400, str(e), param=prompt_field) from None
            except Exception as e:
                raise ApiError(500, f"generation failed on the device: {e}", type="server_error") from None
            return {**head, "object": "chat.completion" if chat else "text_completion",
                    "choices": [choice(text, out.finish_reason)], "usage": usage(len(ids), out)}

        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text, finish=None, delta=None):
            if chat and delta is None:
                delta = {"content": text} if finish is None else {}
            return _sse({**head, "object": obj, "choices": [choice(text, finish, delta)]})

        async def events():
            async with contextlib.aclosing(texts):
                if chat:
                    yield chunk("", delta={"role": "assistant", "content": ""})
                try:
                    async for piece in texts:
                        yield chunk(piece)
                except Exception as e:      # the headers are sent: the error goes in the stream
                    yield _sse(ApiError(500, f"generation failed on the device: {e}", type="server_error").body())
                    return
                yield chunk("", out.finish_reason)
                if req.stream_options and req.stream_options.include_usage:
                    yield _sse({**head, "object": obj, "choices": [], "usage": usage(len(ids), out)})
                yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest):
        from .cli import chat_prompt_ids

        check_model(req)
        try:
            ids = chat_prompt_ids(state["drv"].tok, [m.model_dump() for m in req.messages])
        except ValueError as e:         # the template refused the conversation (e.g. a role)
            raise ApiError(400, str(e), param="messages", code="invalid_value") from None
        return await respond(req, ids, "messages", "chat")

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        check_model(req)
        ids = req.prompt if isinstance(req.prompt, list) else state["drv"].tok.encode(req.prompt)
        return await respond(req, ids, "prompt", "text")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": state["model"], "object": "model", "created": 0,
                                            "owned_by": "flightllm"}]}

    @app.get("/health")
    async def health():
        w = state["worker"]
        return {"status": "shutting_down" if w.closing else "ok", "model": state["model"],
                "backend": state["backend"], "max_seq": state["drv"].max_seq,
                "running": min(w.admitted, 1), "waiting": w.waiting, "queue": w.queue, "served": w.served}

    return app
