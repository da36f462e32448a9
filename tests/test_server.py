"""The OpenAI-compatible server, live on loopback with the real default model.

One server for the module (uvicorn in a background thread of this process, so the tests
can also look at the engine object); the command's own behaviour (busy port, signals,
its log) is tested on ``spindle-local serve`` subprocesses. Every request loop here is bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, state: Any, port: int) -> None:
        self.state = state
        self.base = f"http://127.0.0.1:{port}"
        self.http = httpx.Client(base_url=self.base, timeout=120)
        self.client = openai.OpenAI(base_url=f"{self.base}/v1", api_key="not-needed", max_retries=0, timeout=120)

    def stats(self) -> dict[str, Any]:
        r = self.http.get("/spindle/stats")
        assert r.status_code == 200
        return r.json()


@pytest.fixture(scope="module")
def server(default_model: Path) -> Iterator[LiveServer]:
    from spindle_local.runtime.config import EngineConfig

    with _live_server(default_model, EngineConfig()) as live:
        yield live


@pytest.fixture(scope="module")
def exact_server(default_model: Path) -> Iterator[LiveServer]:
    """A server that never compresses (``--policy full``), small chunks: answers comparable token for token."""
    from spindle_local.runtime.config import EngineConfig

    with _live_server(default_model, EngineConfig(policy="full", n_cells=1024, max_tokens=1024, chunk=32)) as live:
        yield live


@contextlib.contextmanager
def _live_server(model: Path, config: Any) -> Iterator[LiveServer]:
    from spindle_local.server import ServerState, create_app

    state = ServerState.load(model, config, default_max_tokens=8)
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(state), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    live = LiveServer(state, port)
    try:
        yield live
    finally:
        live.http.close()
        srv.should_exit = True
        thread.join(timeout=30)
        state.close()


def _assert_openai_error(r: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert "Traceback" not in r.text
    if code is not None:
        assert err["code"] == code
    return err


# -- the official client ----------------------------------------------------------------------


def test_openai_client_chat_stream_completion_models(server: LiveServer) -> None:
    c = server.client
    models = c.models.list()
    ids = [m.id for m in models.data]
    assert ids == [server.state.model_id]

    msgs = [{"role": "user", "content": "Name a colour."}]
    chat = c.chat.completions.create(model=ids[0], messages=msgs, max_tokens=12, temperature=0)
    assert chat.object == "chat.completion"
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content
    assert chat.choices[0].finish_reason in ("stop", "length")
    assert chat.usage.completion_tokens <= 12
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens

    # The same request streamed (the name is also accepted case-insensitively) gives the same text.
    stream = c.chat.completions.create(model=ids[0].lower(), messages=msgs, max_tokens=12, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    parts, finish, usage = [], None, None
    for ev in stream:
        if ev.usage is not None:
            usage = ev.usage
        for ch in ev.choices:
            parts.append(ch.delta.content or "")
            finish = ch.finish_reason or finish
    assert "".join(parts) == chat.choices[0].message.content
    assert finish == chat.choices[0].finish_reason
    assert usage is not None and usage.completion_tokens == chat.usage.completion_tokens

    comp = c.completions.create(model=ids[0], prompt="The capital of France is", max_tokens=6, temperature=0)
    assert comp.object == "text_completion"
    assert comp.choices[0].text
    assert comp.usage.completion_tokens <= 6


def test_stop_strings_are_not_returned(server: LiveServer) -> None:
    r = server.http.post("/v1/completions", json={"prompt": "1, 2, 3, 4, 5,", "max_tokens": 40,
                                                    "temperature": 0, "stop": [" 8"]})
    assert r.status_code == 200, r.text
    body = r.json()
    text = body["choices"][0]["text"]
    assert " 8" not in text
    assert body["choices"][0]["finish_reason"] == "stop"
    assert text.startswith(" 6, 7,")


# -- prefix reuse -------------------------------------------------------------------------------


def test_follow_up_prefills_only_the_new_tokens(server: LiveServer) -> None:
    c = server.client
    msgs = [{"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": "What is the largest planet of the solar system?"}]
    first = c.chat.completions.create(model=server.state.model_id, messages=msgs, max_tokens=24, temperature=0)
    rereads = server.stats()["reuse"]["rereads"]
    msgs += [{"role": "assistant", "content": first.choices[0].message.content},
             {"role": "user", "content": "And the smallest?"}]
    second = c.chat.completions.create(model=server.state.model_id, messages=msgs, max_tokens=8, temperature=0)
    reuse = server.stats()["reuse"]
    assert reuse["last_prompt_tokens"] == second.usage.prompt_tokens
    assert reuse["last_reused_tokens"] >= first.usage.prompt_tokens
    assert reuse["last_prefilled_tokens"] == second.usage.prompt_tokens - reuse["last_reused_tokens"]
    assert reuse["last_prefilled_tokens"] <= second.usage.prompt_tokens - first.usage.prompt_tokens
    assert reuse["rereads"] == rereads
    # The engine object agrees with the endpoint.
    assert server.state.model.reuse.last_prefilled_tokens == reuse["last_prefilled_tokens"]


# -- errors -------------------------------------------------------------------------------------


def test_errors_in_openai_format(server: LiveServer) -> None:
    h = server.http
    ok_msgs = [{"role": "user", "content": "Hi"}]
    _assert_openai_error(h.post("/v1/chat/completions", content=b"{not json",
                                headers={"content-type": "application/json"}), 400)
    _assert_openai_error(h.post("/v1/chat/completions", json={"model": server.state.model_id}), 400,
                         "missing_required_parameter")
    err = _assert_openai_error(h.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": 3}]}),
                               400)
    assert err["param"] == "messages[0].content"
    for bad in (0, -5, 10**9):
        err = _assert_openai_error(h.post("/v1/chat/completions", json={"messages": ok_msgs, "max_tokens": bad}),
                                   400)
        assert err["param"] == "max_tokens"
    _assert_openai_error(h.post("/v1/chat/completions", json={"messages": ok_msgs, "temperature": "hot"}), 400)
    limit = server.state.model.context_limit()
    long_text = "lorem ipsum dolor sit amet " * (limit // 2)
    _assert_openai_error(h.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": long_text}]}),
                         400, "context_length_exceeded")
    _assert_openai_error(h.post("/v1/completions", json={"prompt": "Hello", "max_tokens": limit}), 400,
                         "context_length_exceeded")
    _assert_openai_error(h.get("/v1/nowhere"), 404)
    _assert_openai_error(h.get("/v1/models/no-such-model"), 404, "model_not_found")  # a look-up stays exact
    assert h.get("/health").json()["status"] == "ok"


def _fuzz_body(rng: random.Random, model: str) -> bytes:
    junk: list[Any] = [None, True, False, 0, -1, 3, 2**63, 1.5, -0.0, "", "x", "Hi", [], [1, "a"], {}, {"a": 1},
                       [{"role": "user"}], [{"role": "wizard", "content": "x"}], [{"content": "x"}],
                       [{"role": "user", "content": [{"type": "image", "url": "x"}]}], "\u00e9\u4e2d\U0001f600"]
    chat = rng.random() < 0.6
    body: dict[str, Any] = {"model": model, "max_tokens": 2, "temperature": 0}
    if chat:
        body["messages"] = [{"role": "user", "content": f"Say {rng.randint(0, 99)}"}]
    else:
        body["prompt"] = f"Count: {rng.randint(0, 99)}"
    fields = ["model", "max_tokens", "temperature", "top_p", "top_k", "n", "stream", "stop", "seed", "logit_bias",
              "messages", "prompt", "stream_options", "echo", "max_completion_tokens", "frequency_penalty"]
    for _ in range(rng.randint(0, 3)):
        key = rng.choice(fields)
        choice = rng.random()
        if choice < 0.15:
            body.pop(key, None)
        elif key in ("max_tokens", "max_completion_tokens") and choice < 0.6:
            body[key] = rng.choice([-1, 0, 1, 3, 10**7, "4", 2.5])
        else:
            body[key] = rng.choice(junk)
    raw = json.dumps(body).encode()
    shape = rng.random()
    if shape < 0.1:
        raw = raw[: rng.randint(0, len(raw))]  # truncated JSON
    elif shape < 0.15:
        raw = bytes(rng.randrange(256) for _ in range(rng.randint(0, 40)))  # noise
    elif shape < 0.2:
        raw = json.dumps(rng.choice(junk)).encode()  # JSON, but not an object
    return raw


def _check_fuzz_response(r: httpx.Response, stream: bool) -> None:
    assert r.status_code != 500 and "Traceback" not in r.text, r.text
    if r.status_code != 200:
        _assert_openai_error(r, r.status_code)
        assert r.status_code in (400, 404)
        return
    if r.headers["content-type"].startswith("text/event-stream"):
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        for e in events[:-1]:
            assert "choices" in json.loads(e)
        return
    body = r.json()
    assert body["object"] in ("chat.completion", "text_completion")
    assert body["choices"][0]["finish_reason"] in ("stop", "length")
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]


def test_fuzz_then_still_serving(server: LiveServer) -> None:
    rng = random.Random(1234)
    model = server.state.model_id
    statuses: dict[int, int] = {}
    t0 = time.monotonic()
    for i in range(300):
        path = rng.choice(["/v1/chat/completions", "/v1/completions"])
        raw = _fuzz_body(rng, model)
        r = server.http.post(path, content=raw, headers={"content-type": rng.choice(
            ["application/json", "text/plain", "application/x-www-form-urlencoded"])})
        _check_fuzz_response(r, stream=False)
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
    assert time.monotonic() - t0 < 90
    assert statuses.get(400, 0) > 50 and statuses.get(200, 0) > 10, statuses
    assert server.http.get("/health").json()["status"] == "ok"
    ok = server.client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hello"}],
                                               max_tokens=4, temperature=0)
    assert ok.choices[0].message.content


# -- concurrency --------------------------------------------------------------------------------


def _repeat_messages(n: int) -> list[dict[str, str]]:
    return [{"role": "system", "content": "Repeat the user's number exactly, nothing else."},
            {"role": "user", "content": "Number: 314"}, {"role": "assistant", "content": "314"},
            {"role": "user", "content": "Number: 2718"}, {"role": "assistant", "content": "2718"},
            {"role": "user", "content": f"Number: {n}"}]


def _stream_chat(base: str, messages: list[dict[str, str]], max_tokens: int) -> tuple[str, str | None, list[str]]:
    """Stream one chat completion by hand; return its text, finish reason and the raw events."""
    events: list[str] = []
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=180) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events and events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len({c["id"] for c in chunks}) == 1, "chunks from different completions"
    assert chunks[0]["choices"][0]["delta"].get("role") == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    return text, chunks[-1]["choices"][0]["finish_reason"], events


def test_ten_concurrent_streams_each_get_their_own_answer(server: LiveServer) -> None:
    numbers = [4711 + 1111 * i for i in range(10)]
    with ThreadPoolExecutor(max_workers=10) as pool:
        futures = [pool.submit(_stream_chat, server.base, _repeat_messages(n), 8) for n in numbers]
        results = [f.result(timeout=300) for f in futures]
    for n, (text, finish, _) in zip(numbers, results):
        assert finish in ("stop", "length")
        found = set(int(x) for x in re.findall(r"\d+", text))
        assert str(n) in text, (n, text)
        assert found <= {n}, (n, text)  # nothing from another request
    stats = server.stats()
    assert stats["queue"] == {"busy": False, "waiting": 0}
    mem = stats["memory"]  # what the conversation holds, per part
    assert mem["regular_cache_bytes"] >= stats["regular_bytes"] > 0
    # host copies between plans: the window queries (w x layers x heads x d floats) and slot positions
    assert mem["store_bytes"] >= 0 and 0 < mem["host_copies_bytes"] < mem["regular_cache_bytes"] / 4
    assert stats["kv_allocated_bytes"] == mem["regular_cache_bytes"] + mem["store_bytes"]


def test_disconnect_mid_stream_frees_the_turn(server: LiveServer) -> None:
    eog = {str(t): -100 for t in server.state.model.stop}  # never stop early: a long generation
    body = {"prompt": "Once upon a time", "max_tokens": 3000, "temperature": 0, "stream": True, "logit_bias": eog}
    with httpx.stream("POST", f"{server.base}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        seen = 0
        for line in r.iter_lines():
            if line.startswith("data: "):
                seen += 1
            if seen >= 5:
                break  # leave mid-stream: the connection closes here
    t0 = time.monotonic()
    ok = server.client.chat.completions.create(model=server.state.model_id,
                                               messages=[{"role": "user", "content": "Hello"}],
                                               max_tokens=4, temperature=0)
    waited = time.monotonic() - t0
    assert ok.choices[0].message.content
    # Cancellation takes effect between tokens, so at worst after one running compression
    # (seconds on a busy CPU); the 3,000 tokens with their compressions would take minutes.
    assert waited < 30, f"the next request waited {waited:.1f} s"
    assert server.state.model.engine.n_past < 1500


# -- model names ----------------------------------------------------------------------------------


def test_any_model_name_is_served_under_the_real_name(server: LiveServer) -> None:
    real = server.state.model_id
    msgs = [{"role": "user", "content": "Hi"}]
    r = server.http.post("/v1/chat/completions", json={"model": "default", "messages": msgs, "max_tokens": 3,
                                                        "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == real
    r = server.http.post("/v1/completions", json={"model": "gpt-4", "prompt": "Hi", "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == real
    stream = server.client.chat.completions.create(model="default", messages=msgs, max_tokens=3, stream=True)
    assert {ev.model for ev in stream} == {real}


# -- a client that leaves ----------------------------------------------------------------------


def _raw_post(port: int, path: str, body: dict[str, Any] | bytes, *, declared: int | None = None) -> socket.socket:
    """Send a POST by hand and return the open socket (the caller closes it without reading)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {declared if declared is not None else len(data)}\r\n\r\n").encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(head + data)
    return sock


def _port(server: LiveServer) -> int:
    return int(server.base.rsplit(":", 1)[1])


def test_abandoned_request_stops_between_tokens_and_the_next_reuses_the_prompt(server: LiveServer) -> None:
    eng = server.state.model.engine
    msgs = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}]
    ref = server.http.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 8, "temperature": 0})
    assert ref.status_code == 200
    n_prompt = ref.json()["usage"]["prompt_tokens"]
    rereads = server.stats()["reuse"]["rereads"]

    eog = {str(t): -100 for t in server.state.model.stop}  # a generation that would run for minutes
    sock = _raw_post(_port(server), "/v1/chat/completions",
                     {"messages": msgs, "max_tokens": 3000, "temperature": 0, "logit_bias": eog})
    deadline = time.monotonic() + 60
    while eng.n_past < n_prompt + 10:  # it is generating
        assert time.monotonic() < deadline, "the abandoned request never started generating"
        time.sleep(0.02)
    sock.close()  # the client leaves without reading
    t0 = time.monotonic()
    while server.stats()["queue"]["busy"]:
        assert time.monotonic() - t0 < 30, "the abandoned generation did not stop"
        time.sleep(0.05)
    held = eng.n_past
    assert n_prompt + 10 <= held < n_prompt + 1500
    assert server.stats()["last_finish_reason"] == "cancelled"

    # The same request again: the prompt is reused (the abandoned answer cut off), and the answer
    # is the one a clean engine state gives.
    again = server.http.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 8, "temperature": 0})
    assert again.status_code == 200
    assert again.json()["choices"][0]["message"]["content"] == ref.json()["choices"][0]["message"]["content"]
    reuse = server.stats()["reuse"]
    assert reuse["last_reused_tokens"] == n_prompt - 1 and reuse["last_prefilled_tokens"] == 1
    assert reuse["rereads"] == rereads


def test_client_gone_while_the_prompt_is_read_keeps_the_chunks_read(exact_server: LiveServer) -> None:
    server = exact_server
    eng = server.state.model.engine
    chunk = eng.chunk
    words = " ".join(f"w{i % 97}" for i in range(100))  # about 300 tokens: several chunks
    body = {"prompt": f"List: {words}. The end.", "max_tokens": 4, "temperature": 0}
    ref = server.http.post("/v1/completions", json=body)  # on a fresh engine: the reference
    assert ref.status_code == 200
    n_prompt = ref.json()["usage"]["prompt_tokens"]
    assert n_prompt > 4 * chunk
    prompt_ids = list(eng.tokens[:n_prompt])
    server.state.executor.submit(eng.reset).result()  # (nothing runs now) forget it

    sock = _raw_post(_port(server), "/v1/completions", {**body, "max_tokens": 600})
    deadline = time.monotonic() + 60
    while eng.n_past < chunk:  # the first chunk is in
        assert time.monotonic() < deadline, "the prompt was never read"
        time.sleep(0.005)
    sock.close()  # the client leaves while the prompt is read
    while server.stats()["queue"]["busy"]:
        assert time.monotonic() < deadline, "reading did not stop"
        time.sleep(0.02)
    held = eng.n_past
    assert chunk <= held < n_prompt and held % chunk == 0  # stopped between chunks, none half read
    assert eng.tokens == prompt_ids[:held]
    assert server.stats()["last_finish_reason"] == "cancelled"

    again = server.http.post("/v1/completions", json=body)
    assert again.status_code == 200
    reuse = server.stats()["reuse"]
    assert reuse["last_reused_tokens"] == held and reuse["last_prefilled_tokens"] == n_prompt - held
    assert again.json()["choices"][0]["text"] == ref.json()["choices"][0]["text"]


# -- the command, as a subprocess ------------------------------------------------------------


ROOT = Path(__file__).resolve().parents[1]
SERVING = re.compile(r"^serving (\S+) on http://127\.0\.0\.1:(\d+)/v1 ")


class CliServer:
    """``spindle-local serve --port 0`` in a subprocess; its stderr is collected as it comes."""

    def __init__(self, model: Path, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "spindle_local.cli", "serve", str(model),
                                      "--port", "0", "--max-tokens", "8", *args],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, cwd=ROOT, env=dict(os.environ))
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + 120
        self.port = 0
        while not self.port:
            assert time.monotonic() < deadline and self.proc.poll() is None, "".join(self.lines)
            for line in list(self.lines):
                m = SERVING.match(line)
                if m:
                    self.port = int(m.group(2))
            time.sleep(0.05)
        self.base = f"http://127.0.0.1:{self.port}"
        self.http = httpx.Client(base_url=self.base, timeout=60)
        deadline = time.monotonic() + 30
        while True:  # the "serving" line comes just before uvicorn starts
            try:
                if self.http.get("/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "".join(self.lines)
            time.sleep(0.05)

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def stop(self, sig: int = signal.SIGINT, timeout: float = 60) -> tuple[int, float]:
        """Send ``sig`` once; return the exit status and the seconds it took to exit."""
        self.http.close()
        t0 = time.monotonic()
        self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"the server did not exit within {timeout} s of {signal.Signals(sig).name}:\n{self.log}")
        self._reader.join(timeout=10)
        return rc, time.monotonic() - t0

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def test_busy_port_is_one_error_line(default_model: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "spindle_local.cli", "serve", str(default_model),
                            "--port", str(port)], capture_output=True, text=True, timeout=120, cwd=ROOT,
                           stdin=subprocess.DEVNULL)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"error: cannot listen on 127.0.0.1:{port}: the address is already in use "
        "(another server? choose another --port)"], r.stderr
    assert r.stdout == ""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_shutdown_after_abandoned_requests(default_model: Path, server: LiveServer, sig: int) -> None:
    eog = {str(t): -100 for t in server.state.model.stop}  # (the in-process model, for its ids)
    long = {"messages": [{"role": "user", "content": "Write a long story."}], "max_tokens": 3000,
            "temperature": 0, "logit_bias": eog}
    srv = CliServer(default_model)
    try:
        for i in range(5):  # sent, and the sockets closed without reading
            _raw_post(srv.port, "/v1/chat/completions", {**long, "seed": i}).close()
        waiting: list[httpx.Response | Exception] = []

        def wait_for_answer() -> None:
            try:
                waiting.append(httpx.post(f"{srv.base}/v1/chat/completions", json=long, timeout=60))
            except Exception as e:  # noqa: BLE001  (reported by the assertion below)
                waiting.append(e)

        client = threading.Thread(target=wait_for_answer)
        client.start()  # a client still connected, waiting for its long answer
        slow = _raw_post(srv.port, "/v1/chat/completions", b'{"messages": [', declared=300)  # body half sent
        idle = socket.create_connection(("127.0.0.1", srv.port), timeout=10)  # connected, sends nothing
        deadline = time.monotonic() + 60
        while True:  # all five abandoned ones went through, and the sixth one is generating
            s = srv.http.get("/spindle/stats").json()
            if s["requests_done"] >= 5 and s["queue"]["busy"]:
                break
            assert time.monotonic() < deadline, s
            time.sleep(0.05)
        rc, took = srv.stop(sig)
        client.join(timeout=30)
        slow_answer = slow.recv(4096)
        idle_answer = idle.recv(4096)
        slow.close()
        idle.close()
    finally:
        srv.kill()
    assert rc == 0, srv.log
    assert took < 8, f"{signal.Signals(sig).name}: exit took {took:.1f} s\n{srv.log}"
    assert "Traceback" not in srv.log and "ERROR" not in srv.log, srv.log
    assert f"stopped ({signal.Signals(sig).name})" in srv.log
    assert len(waiting) == 1 and isinstance(waiting[0], httpx.Response), waiting
    assert waiting[0].status_code == 503
    assert waiting[0].json()["error"]["code"] == "server_shutting_down"
    assert slow_answer.startswith(b"HTTP/1.1 503 ") and b"server_shutting_down" in slow_answer
    assert idle_answer == b""  # closed


def test_client_gone_mid_body_is_one_quiet_log_line(default_model: Path) -> None:
    srv = CliServer(default_model)
    try:
        sock = _raw_post(srv.port, "/v1/chat/completions", b'{"messages": [{"role": "us', declared=500)
        time.sleep(0.2)
        sock.close()
        deadline = time.monotonic() + 30
        while "went away" not in srv.log:
            assert time.monotonic() < deadline, srv.log
            time.sleep(0.05)
        ok = srv.http.post("/v1/chat/completions", json={"model": "default", "max_tokens": 2,
                                                         "messages": [{"role": "user", "content": "Hi"}]})
        assert ok.status_code == 200
        rc, _ = srv.stop()
    finally:
        srv.kill()
    assert rc == 0
    gone = [line for line in srv.lines if "went away" in line]
    assert len(gone) == 1 and gone[0].startswith("INFO: 127.0.0.1:"), srv.log
    assert "(POST /v1/chat/completions)" in gone[0]
    assert "Traceback" not in srv.log and "ERROR" not in srv.log, srv.log


# -- stop strings, cancel and finish reasons, on a fake engine (no model) -----------------------


def _complete(m, prompt: list[int], cancel: threading.Event | None = None, on_piece=None, **settings):
    from spindle_local.runtime.engine_chat import CompletionResult, CompletionSettings

    result = CompletionResult()
    pieces = []
    for piece in m.stream_tokens(prompt, CompletionSettings(**settings), result, cancel):
        pieces.append(piece)
        if on_piece is not None:
            on_piece(piece)
    return pieces, result


def test_stop_strings_held_back_and_cut() -> None:
    from spindle_local.runtime.engine_chat import StopStrings

    s = StopStrings(("</s>", "", "END"))
    assert s.push("abc<") == ("abc", False)  # "<" may start "</s>"
    assert s.push("/") == ("", False)
    assert s.push("x") == ("</x", False)
    assert s.push("E") == ("", False)
    assert s.push("ND tail") == ("", True)
    s = StopStrings(("END",))
    assert s.push("xxE") == ("xx", False) and s.flush() == "E" and s.flush() == ""
    assert StopStrings().push("E") == ("E", False)  # no stop strings: nothing held


def test_stop_string_across_tokens_never_streams(fake_chat) -> None:
    m = fake_chat(["Hel", "lo ", "wor", "ld"], [0, 1, 2, 3], stop=set())
    pieces, result = _complete(m, [7, 8], max_tokens=10, stop=("lo w",))
    assert "".join(pieces) == "Hel" and result.finish_reason == "stop"
    assert (result.prompt_tokens, result.completion_tokens) == (2, 3)


@pytest.mark.parametrize("script, limit, finish", [([0, 1, 2], 1 << 30, "stop"),  # 2: end of generation
                                                   ([0, 1, 0, 1, 0, 1], 1 << 30, "length"),  # max_tokens
                                                   ([0, 1, 0, 1, 0, 1], 4, "length")])  # context full
def test_finish_reasons_in_openai_terms(fake_chat, script: list[int], limit: int, finish: str) -> None:
    m = fake_chat(["x", "E", "<eog>"], script, stop={2}, limit=limit)
    pieces, result = _complete(m, [7, 8], max_tokens=4, stop=("EE",))
    assert result.finish_reason == finish and m.last.finish == {4: "context"}.get(limit, finish)
    assert "".join(pieces) == "xExE"[:result.completion_tokens]  # a trailing "E" held back comes out at the end


def test_cancel_between_tokens_and_between_chunks(fake_chat) -> None:
    from spindle_local.errors import UsageError

    cancel = threading.Event()
    m = fake_chat(["a", "b"], [0, 1, 0, 1])
    pieces, result = _complete(m, [7, 8, 9], cancel, on_piece=lambda p: cancel.set(), max_tokens=10)
    assert pieces == ["a"] and result.finish_reason == "cancelled" and result.completion_tokens == 1
    # cancelled while the prompt is read: the chunks read stay (no rollback), nothing is generated
    m = fake_chat(["a"], [0])
    pieces, result = _complete(m, [1, 2, 3, 4, 5], cancel, max_tokens=10)
    assert pieces == [] and result.finish_reason == "cancelled" and result.completion_tokens == 0
    assert m.engine.tokens == [1, 2] and m.engine.rolled_back == 0
    with pytest.raises(UsageError, match="empty"):
        _complete(m, [], max_tokens=10)


def test_a_waiting_response_ends_at_shutdown_without_the_engine_thread() -> None:
    """After a shutdown begins, a request waiting for its next token (or for its turn) is
    answered from the event loop: a busy engine thread (a slow token on a loaded machine)
    cannot hold it past the grace period. Events already queued still come first."""
    import asyncio

    from spindle_local.server import FifoLock, _first_or_stop

    async def scenario() -> list[Any]:
        stopping = asyncio.Event()
        events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        events.put_nowait(("text", "a"))
        got = [await _first_or_stop(events.get(), stopping, ("stop", None))]
        waiter = asyncio.ensure_future(_first_or_stop(events.get(), stopping, ("stop", None)))
        lock = FifoLock()
        await lock.acquire()  # the engine thread's turn, never released here
        gone = asyncio.ensure_future(_first_or_stop(lock.acquire(), stopping, "stop"))
        await asyncio.sleep(0.01)
        gone.cancel()  # a request cancelled while it queued leaves no waiter behind
        with contextlib.suppress(asyncio.CancelledError):
            await gone
        await asyncio.sleep(0)
        assert lock.waiting == 0
        queued = asyncio.ensure_future(_first_or_stop(lock.acquire(), stopping, "stop"))
        await asyncio.sleep(0.01)
        assert not waiter.done() and not queued.done() and lock.waiting == 1
        stopping.set()
        got += [await asyncio.wait_for(waiter, 1), await asyncio.wait_for(queued, 1)]
        assert lock.waiting == 0  # the cancelled turn left the queue
        events.put_nowait(("text", "b"))  # nothing was consumed by the cancelled wait
        events.put_nowait(("end", None))
        got += [await _first_or_stop(events.get(), stopping, ("stop", None)) for _ in range(2)]
        got.append(await _first_or_stop(events.get(), stopping, ("stop", None)))
        return got

    assert asyncio.run(scenario()) == [("text", "a"), ("stop", None), "stop", ("text", "b"), ("end", None),
                                       ("stop", None)]
