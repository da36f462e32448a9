"""``spindle-local serve``: an OpenAI-compatible HTTP server over one compressed-KV engine.

One model, one sequence: every request takes its turn on the single long-lived engine,
so a client that resends its whole history (as chat clients do) only pays for the new
part of the prompt — the engine keeps the longest common prefix it still holds exactly.

Concurrency: llama.cpp calls block, so each request's work runs on one dedicated engine
thread and hands its text to the event loop through an asyncio queue. A FIFO lock,
taken before the work is submitted and released only when the engine thread is done
with it, makes requests queue in arrival order. A client that goes away sets its job's
cancel flag; the engine thread checks it between tokens (and between prefill chunks) and
the next request starts right after.

Shutdown: the first SIGINT or SIGTERM cancels every job (running or queued), answers the
clients still waiting with a 503, and stops; a second signal stops waiting for clients at
once. The socket is bound before the model loads, so a busy port is one error line.

Errors use OpenAI's format (``{"error": {...}}``); tracebacks go to the server log only.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from spindle_local.errors import SpindleError, UsageError
from spindle_local.server_schema import (ApiError, ChatRequest, CompletionRequest, clean_text, internal_error,
                                         parse_body)

if TYPE_CHECKING:
    from spindle_local.runtime.config import EngineConfig
    from spindle_local.runtime.engine_chat import CompletionResult, CompletionSettings, ServingChatModel

log = logging.getLogger("spindle_local.server")


class FifoLock:
    """An asyncio lock that is handed to waiters strictly in arrival order."""

    def __init__(self) -> None:
        self._locked = False
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return sum(1 for w in self._waiters if not w.done())

    @property
    def locked(self) -> bool:
        return self._locked

    async def acquire(self) -> None:
        if not self._locked and not self._waiters:
            self._locked = True
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # the lock was handed to us just as we were cancelled: pass it on
            else:
                self._waiters.remove(fut)
            raise

    def release(self) -> None:
        """Hand the lock to the oldest live waiter (it stays locked), or unlock."""
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self._locked = False


@dataclass(eq=False)  # compared (and hashed) by identity: ServerState.jobs is a set
class Job:
    """One request's work on the engine thread, and the channel its output comes back on."""

    loop: asyncio.AbstractEventLoop
    prompt: list[dict[str, str]] | str | list[int]  # chat messages, completion text, or token ids
    param: str  # the request field the prompt came from ("messages" or "prompt"), for errors
    settings: CompletionSettings
    max_tokens_given: bool
    result: CompletionResult
    cancel: threading.Event = field(default_factory=threading.Event)
    events: asyncio.Queue[tuple[str, Any]] = field(default_factory=asyncio.Queue)

    def emit(self, kind: str, value: Any = None) -> None:
        """From the engine thread: queue an event for the request's coroutine."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed (the server has stopped): nobody listens
            self.cancel.set()

    async def next(self, stopping: asyncio.Event) -> tuple[str, Any]:
        """The next event, or ``("stop", None)`` once shutdown has begun and none is queued.

        Why not wait for the engine thread's final event after a shutdown: the thread stops
        only between tokens, and on a loaded machine one token can outlast the grace period
        the responses get, so a waiting client would be cut off without its 503.
        """
        return await _first_or_stop(self.events.get(), stopping, ("stop", None))


async def _first_or_stop(aw: Any, stopping: asyncio.Event, stopped: Any) -> Any:
    """``await aw``, unless ``stopping`` is set first: then ``aw`` is cancelled and ``stopped`` returned."""
    task = asyncio.ensure_future(aw)
    try:
        if stopping.is_set() and not task.done():
            await asyncio.sleep(0)  # let an already queued result come through first
        if not task.done():
            stop = asyncio.ensure_future(stopping.wait())
            try:
                await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stop.cancel()
    except BaseException:  # we were cancelled: so is ``aw`` (a lock waiter must not outlive us)
        task.cancel()
        raise
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return stopped


class ServerState:
    """The one model, its engine thread, the request lock and the last stats snapshot."""

    def __init__(self, model: ServingChatModel, model_path: Path, *, display_name: str | None = None,
                 default_max_tokens: int = 512) -> None:
        self.model = model
        self.model_path = Path(model_path)
        self.model_id = self.model_path.stem
        self.display_name = display_name or self.model_id
        self.created = int(self.model_path.stat().st_mtime) if self.model_path.exists() else int(time.time())
        self.default_max_tokens = default_max_tokens
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spindle-engine")
        self.lock = FifoLock()
        self.requests_done = 0
        self.last_finish: str | None = None
        self.jobs: set[Job] = set()  # submitted and not finished (queued or running)
        self.running = False  # the engine thread is working on a job (cleared before its final event)
        self.stopping = asyncio.Event()  # set (on the event loop) when shutdown begins
        self.shutting_down = False
        self._closed = False
        self.stats: dict[str, Any] = self.executor.submit(model.stats_dict).result()

    @classmethod
    def load(cls, model_path: Path, config: EngineConfig, *, default_max_tokens: int = 512) -> ServerState:
        """Load ``model_path`` with ``config`` (checks the patched runtime first)."""
        from spindle_local.runtime.gguf_meta import read_meta
        from spindle_local.runtime.loader import load_llama_cpp

        meta = read_meta(model_path)
        load_llama_cpp()
        from spindle_local.runtime.engine_chat import ServingChatModel

        return cls(ServingChatModel(model_path, config), model_path, display_name=meta.name,
                   default_max_tokens=default_max_tokens)

    def begin_shutdown(self) -> None:
        """Refuse new requests and cancel every queued or running job (they stop between tokens)."""
        self.shutting_down = True
        for job in list(self.jobs):
            job.cancel.set()
        with contextlib.suppress(RuntimeError):  # (called again by close(), after the loop has ended)
            self.stopping.set()

    def close(self, timeout: float | None = None) -> bool:
        """Stop the engine thread and free the model; False if the thread was still busy after ``timeout``.

        The engine thread ends its current job at the next token or prefill chunk once the
        job is cancelled (:meth:`begin_shutdown`), so this is quick; on False the model is
        left loaded (freeing it under a running decode would crash) and the caller should exit.
        """
        if self._closed:
            return True
        self.begin_shutdown()
        try:
            self.executor.submit(lambda: None).result(timeout)  # runs once the current job is done
        except FutureTimeout:
            return False
        self._closed = True
        self.executor.shutdown(wait=True)
        self.model.close()
        return True

    # -- model names --------------------------------------------------------------------

    def is_model_name(self, name: str) -> bool:
        """The file stem or the GGUF's own name, in any case."""
        return name.casefold() in (self.model_id.casefold(), self.display_name.casefold())

    def check_model(self, name: str) -> None:
        """For ``GET /v1/models/{name}``: 404 unless ``name`` is this model's.

        Completions do not check: like llama-server, they serve the one model whatever
        name the request gives, and report the real one in the response.
        """
        if not self.is_model_name(name):
            raise ApiError(404, f"The model '{name}' does not exist; this server serves '{self.model_id}'.",
                           param="model", code="model_not_found")

    # -- jobs ---------------------------------------------------------------------------

    async def submit(self, job: Job) -> None:
        """Wait for our turn (FIFO), then run ``job`` on the engine thread; the turn ends with it."""
        if self.shutting_down:
            raise shutdown_error()
        self.jobs.add(job)
        try:
            turn = await _first_or_stop(self.lock.acquire(), self.stopping, "stop")
        except BaseException:
            self.jobs.discard(job)
            raise
        if turn == "stop":  # shutdown began while we queued: never run
            self.jobs.discard(job)
            raise shutdown_error()
        if self.shutting_down:
            job.cancel.set()  # shutdown began while we queued: _run returns at once
        try:
            fut = asyncio.get_running_loop().run_in_executor(self.executor, self._run, job)
        except BaseException:
            self.jobs.discard(job)
            self.lock.release()
            raise

        def done(_: object) -> None:
            self.jobs.discard(job)
            self.lock.release()

        fut.add_done_callback(done)

    def _run(self, job: Job) -> None:
        """On the engine thread: tokenize, check the context, generate, report.

        The final event ("end" or "error") goes out only after the stats snapshot is
        taken, so a client that reads /spindle/stats after its response sees its request.
        """
        model = self.model
        final: tuple[str, Any] = ("end", None)
        self.running = True
        try:
            if job.cancel.is_set():  # the client left while queued
                job.result.finish_reason = "cancelled"
                return
            if isinstance(job.prompt, str):
                prompt = model.text_prompt_tokens(job.prompt)
            elif job.prompt and isinstance(job.prompt[0], dict):
                prompt = model.chat_prompt_tokens(job.prompt)  # type: ignore[arg-type]
            else:
                prompt = list(job.prompt)  # type: ignore[arg-type]
            self._check_context(job, prompt)
            job.emit("start", len(prompt))
            for piece in model.stream_tokens(prompt, job.settings, job.result, job.cancel):
                job.emit("text", piece)
        except ApiError as e:
            final = ("error", e)
        except SpindleError as e:
            log.warning("request failed: %s", e)
            self._reset_engine()
            final = ("error", ApiError(400, str(e), param=job.param))
        except Exception:
            log.exception("internal error while generating")
            self._reset_engine()
            final = ("error", internal_error())
        finally:
            self.requests_done += 1
            self.last_finish = job.result.finish_reason
            try:
                self.stats = model.stats_dict()
            except Exception:
                log.exception("could not read the engine's stats")
            self.running = False
            job.emit(*final)

    def _check_context(self, job: Job, prompt: list[int]) -> None:
        limit = self.model.context_limit()
        n_vocab = self.model.engine.model.n_vocab
        if not prompt:
            raise ApiError(400, "The prompt is empty.", param=job.param, code="invalid_value")
        if any(not 0 <= t < n_vocab for t in prompt):
            raise ApiError(400, f"Token ids must be in 0..{n_vocab - 1}.", param=job.param, code="invalid_value")
        if len(prompt) >= limit or (job.max_tokens_given and len(prompt) + job.settings.max_tokens > limit):
            asked = len(prompt) + (job.settings.max_tokens if job.max_tokens_given else 1)
            raise ApiError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                                f"{asked} tokens ({len(prompt)} in the {job.param}"
                                + (f", {job.settings.max_tokens} in the completion" if job.max_tokens_given else "")
                                + "). Please reduce the length of the prompt or completion.",
                           param=job.param, code="context_length_exceeded")
        if not job.max_tokens_given:
            job.settings.max_tokens = min(job.settings.max_tokens, limit - len(prompt))

    def _reset_engine(self) -> None:
        """After a failure mid-request the held state may be partial: start clean next time."""
        try:
            self.model.engine.reset()
        except Exception:
            log.exception("engine reset failed")

    def stats_response(self) -> dict[str, Any]:
        return {"object": "spindle.stats", "model": self.model_id, **self.stats,
                "queue": {"busy": self.running, "waiting": self.lock.waiting},
                "requests_done": self.requests_done, "last_finish_reason": self.last_finish}


# -- request handling ---------------------------------------------------------------------


def _settings_for(state: ServerState, req: ChatRequest | CompletionRequest) -> tuple[CompletionSettings, bool]:
    from spindle_local.runtime.engine_chat import CompletionSettings

    limit = state.model.context_limit()
    asked = req.requested_max_tokens()
    if asked is not None and not 1 <= asked <= limit:
        raise ApiError(400, f"max_tokens must be between 1 and {limit} (the context limit), got {asked}.",
                       param="max_completion_tokens" if getattr(req, "max_completion_tokens", None) is not None
                       else "max_tokens", code="invalid_value")
    settings = CompletionSettings(
        max_tokens=asked if asked is not None else state.default_max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=40 if req.top_k is None else req.top_k,
        seed=req.seed,
        stop=req.stop_strings(),
        logit_bias=req.bias(state.model.engine.model.n_vocab),
    )
    return settings, asked is not None


async def _watch_disconnect(request: Request, job: Job) -> None:
    """Set the job's cancel flag when the client goes away (the body is already read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancel.set()
            return


async def _read_body(state: ServerState, request: Request) -> bytes:
    """The request body; 503 at once if shutdown begins first (a slow client must not hold it up).

    A client gone before the whole body came raises ``ClientDisconnect`` (see create_app).
    """
    if state.shutting_down:
        raise shutdown_error()
    body = asyncio.ensure_future(request.body())
    stop = asyncio.ensure_future(state.stopping.wait())
    try:
        await asyncio.wait({body, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
        if not body.done():
            body.cancel()
    if body.done() and not body.cancelled():
        return body.result()
    raise shutdown_error()


def shutdown_error() -> ApiError:
    return ApiError(503, "The server is shutting down; the request was not completed.", type="server_error",
                    code="server_shutting_down")


def _usage(result: CompletionResult) -> dict[str, int]:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


def _sse(obj: dict[str, Any] | str) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


async def _handle(state: ServerState, request: Request, *, chat: bool) -> Any:
    from spindle_local.runtime.engine_chat import CompletionResult

    raw = await _read_body(state, request)
    req = parse_body(ChatRequest if chat else CompletionRequest, raw)
    if chat and req.logprobs:
        raise ApiError(400, "logprobs are not supported by this server.", param="logprobs", code="unsupported")
    if not chat and req.logprobs:
        raise ApiError(400, "logprobs are not supported by this server.", param="logprobs", code="unsupported")
    settings, given = _settings_for(state, req)
    if chat:
        prompt: Any = [m.as_template_message() for m in req.messages]
        param = "messages"
    else:
        p = req.prompt
        if isinstance(p, list) and p and isinstance(p[0], str):
            if len(p) != 1:
                raise ApiError(400, "This server completes one prompt per request.", param="prompt",
                               code="invalid_value")
            p = p[0]
        prompt = clean_text(p) if isinstance(p, str) else list(p)
        param = "prompt"
    echo = "" if chat or not req.echo or not isinstance(prompt, str) else prompt
    job = Job(loop=asyncio.get_running_loop(), prompt=prompt, param=param, settings=settings,
              max_tokens_given=given, result=CompletionResult())
    watcher = asyncio.create_task(_watch_disconnect(request, job))
    try:
        await state.submit(job)
        kind, value = await job.next(state.stopping)
        if kind == "error":
            raise value
        if kind == "stop":
            raise shutdown_error()
    except BaseException:
        job.cancel.set()
        watcher.cancel()
        raise
    if kind == "end":  # cancelled before it began (client gone, or shutdown): no text comes
        job.events.put_nowait((kind, value))  # the loops below see the end at once
        if state.shutting_down:
            watcher.cancel()
            raise shutdown_error()
    ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(_stream(state, job, watcher, ident, created, chat, echo, include_usage),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        pieces = [echo]
        while True:
            kind, value = await job.next(state.stopping)
            if kind == "text":
                pieces.append(value)
            elif kind == "error":
                raise value
            elif kind == "stop":
                raise shutdown_error()
            else:
                break
    finally:
        job.cancel.set()
        watcher.cancel()
    finish = job.result.finish_reason
    if finish == "cancelled" and state.shutting_down:
        raise shutdown_error()  # (a client that left is not answered at all)
    text = "".join(pieces)
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    return {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": state.model_id, "system_fingerprint": None, "choices": [choice],
            "usage": _usage(job.result)}


async def _stream(state: ServerState, job: Job, watcher: asyncio.Task, ident: str, created: int, chat: bool,
                  echo: str, include_usage: bool) -> AsyncIterator[bytes]:
    """Server-sent events for one streamed completion; cancels the job if the client leaves."""
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text: str | None, finish: str | None, *, role: bool = False) -> dict[str, Any]:
        if chat:
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        out = {"id": ident, "object": obj, "created": created, "model": state.model_id,
               "system_fingerprint": None, "choices": [choice]}
        if include_usage:
            out["usage"] = None
        return out

    try:
        if chat:
            yield _sse(chunk("", None, role=True))
        elif echo:
            yield _sse(chunk(echo, None))
        while True:
            kind, value = await job.next(state.stopping)
            if kind == "text":
                yield _sse(chunk(value, None))
            elif kind == "error":  # after the first event only internal errors can come
                yield _sse(value.body())
                break
            elif kind == "stop" or (job.result.finish_reason == "cancelled" and state.shutting_down):
                yield _sse(shutdown_error().body())
                break
            else:
                yield _sse(chunk(None if chat else "", job.result.finish_reason))
                if include_usage:
                    yield _sse({"id": ident, "object": obj, "created": created, "model": state.model_id,
                                "system_fingerprint": None, "choices": [], "usage": _usage(job.result)})
                break
        yield _sse("[DONE]")
    finally:
        job.cancel.set()
        watcher.cancel()


def _error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


def create_app(state: ServerState) -> FastAPI:
    """The FastAPI application serving ``state``'s model."""
    app = FastAPI(title="spindle-local", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.spindle = state

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found" if exc.status_code == 404 else "method_not_allowed" if exc.status_code == 405 else None
        msg = f"Unknown request URL: {request.method} {request.url.path}." if exc.status_code in (404, 405) \
            else str(exc.detail)
        return _error_response(ApiError(exc.status_code, msg, code=kind))

    @app.exception_handler(ClientDisconnect)
    async def _client_gone(request: Request, exc: ClientDisconnect) -> Response:
        # Not an error of ours: one line, no traceback. Nobody is left to read the answer.
        peer = f"{request.client.host}:{request.client.port}" if request.client else "a client"
        log.info("%s went away before sending the whole request (%s %s)", peer, request.method,
                 request.url.path)
        return Response(status_code=400)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        return _error_response(internal_error())

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": state.model_id}

    def model_card() -> dict[str, Any]:
        return {"id": state.model_id, "object": "model", "created": state.created, "owned_by": "spindle-local"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        state.check_model(name)
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await _handle(state, request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await _handle(state, request, chat=False)

    @app.get("/spindle/stats")
    async def stats() -> dict[str, Any]:
        return state.stats_response()

    return app


# -- listening and stopping ---------------------------------------------------------------

GRACE_SECONDS = 3.0  # after a signal: how long responses (already cancelled) get to go out
ENGINE_STOP_SECONDS = 5.0  # then: how long the engine thread gets to finish its token, chunk or plan


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind and listen on ``host:port`` now, so that a busy port is a clean error before the model loads."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UsageError(f"cannot listen on {where}: unknown host ({e.strerror})") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: restarts despite TIME_WAIT
        sock.bind(addr)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        why = {errno.EADDRINUSE: "the address is already in use (another server? choose another --port)",
               errno.EACCES: "permission denied (ports below 1024 need privileges)",
               errno.EADDRNOTAVAIL: "the address is not one of this machine's (see --host)"}.get(
                   e.errno, e.strerror or str(e))
        raise UsageError(f"cannot listen on {where}: {why}") from None
    sock.setblocking(False)
    return sock


def _make_uvicorn_server(app: FastAPI, state: ServerState, log_level: str):
    """A uvicorn server that stops on the first SIGINT or SIGTERM, whatever its clients do.

    uvicorn alone waits for every request to finish (forever for one that never ends),
    forces nothing on SIGTERM, and re-raises the signal after shutting down. Here the first
    signal cancels every job (:meth:`ServerState.begin_shutdown`) before uvicorn's graceful
    shutdown, which is bounded by ``GRACE_SECONDS``; a second signal of either kind stops
    waiting at once; the command then exits normally.
    """
    import uvicorn

    class Server(uvicorn.Server):
        signalled: int | None = None

        def handle_exit(self, sig: int, frame: Any) -> None:  # a Python signal handler: main thread
            if self.should_exit:
                self.force_exit = True
            self.should_exit = True
            self.signalled = self.signalled or sig

        @contextlib.contextmanager
        def capture_signals(self):  # uvicorn's, without re-raising the signal afterwards
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            saved = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in saved.items():
                    signal.signal(sig, handler)

        async def shutdown(self, sockets: Any = None) -> None:
            state.begin_shutdown()  # on the event loop, before uvicorn waits for the requests
            await super().shutdown(sockets=sockets)

    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=GRACE_SECONDS, lifespan="off")
    return Server(config)


@contextlib.contextmanager
def _signals_exit_at_once():
    """While stopping: SIGINT or SIGTERM ends the process at once (status 130)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.signal(sig, lambda *_: os._exit(130)) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


# -- running it -----------------------------------------------------------------------------


def run_server(path: Path, cfg: EngineConfig, *, host: str, port: int, default_max_tokens: int,
               log_level: str) -> None:
    """Bind ``host:port``, load the model, serve until SIGINT/SIGTERM (the ``serve`` command's body).

    A busy port fails before the model loads. Status lines go to stderr.
    """
    import sys

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    sock = bind_socket(host, port)  # a busy port fails here, before the model loads
    try:
        state = ServerState.load(path, cfg, default_max_tokens=default_max_tokens)
    except BaseException:
        sock.close()
        raise
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s: %(message)s")
    budget = f"kv mem {cfg.kv_mem / 2**20:.1f} MiB" if cfg.kv_mem else f"kv budget {cfg.kv_budget}"
    bound = sock.getsockname()[1]
    url_host = f"[{host}]" if ":" in host else host
    say(f"serving {state.model_id} on http://{url_host}:{bound}/v1 (policy {cfg.policy}, "
        f"{budget}, context {state.model.context_limit()} tokens)")
    server = _make_uvicorn_server(create_app(state), state, log_level)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        with _signals_exit_at_once():  # a further signal while the engine stops ends the process
            if not state.close(timeout=ENGINE_STOP_SECONDS):
                say(f"error: the engine did not stop within {ENGINE_STOP_SECONDS:.0f} s; exiting without cleanup")
                os._exit(1)
    if server.signalled is not None:
        say(f"stopped ({signal.Signals(server.signalled).name})")
