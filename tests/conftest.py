"""Shared fixtures: the default model, a way to run the CLI as a user does, a fake engine;
the ``model`` marker of tests that need a model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

# A shell without job control starts background jobs with SIGINT ignored, and exec keeps
# an ignored signal ignored: the interrupt tests (in this process and in the chats they
# start) need Ctrl-C's usual disposition, whatever started the suite.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

ROOT = Path(__file__).resolve().parents[1]

# Fixtures that hand a test the default model (its path, or text tokenized by it): a test
# whose fixtures reach one of them gets the ``model`` marker (see pyproject.toml), so that
# ``pytest -m "not model"`` leaves it out. Modules that load models or the patched library
# otherwise (tiny GGUFs, the CLI in a subprocess) mark themselves or their tests.
MODEL_FIXTURES = frozenset({"default_model", "pydoc_tokens"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if MODEL_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.model)


def _start_rpc_server() -> tuple[subprocess.Popen, str]:
    """A ``spindle-local rpc-server`` on a free loopback port, once it accepts connections."""
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    proc = subprocess.Popen([sys.executable, "-m", "spindle_local.cli", "rpc-server", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.time() + 60
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc, f"127.0.0.1:{port}"
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"rpc-server did not start: {proc.stderr.read() if proc.stderr else ''}")
            time.sleep(0.2)


@pytest.fixture(scope="session", autouse=True)
def layers_on_rpc():
    """With ``SPINDLE_TEST_RPC=1``, every model this process loads has all its layers on an RPC
    server on loopback (registering a server is process-wide in llama.cpp): the store,
    engine and session suites then run on the RPC backend unchanged
    (``SPINDLE_TEST_RPC=1 pytest tests/test_store.py tests/test_engine.py tests/test_session.py``)."""
    if os.environ.get("SPINDLE_TEST_RPC") != "1":
        yield None
        return
    from spindle_local.runtime import rpc

    proc, endpoint = _start_rpc_server()
    try:
        rpc.add_servers([endpoint])
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="session")
def default_model() -> Path:
    from spindle_local.runtime.model_files import default_model_path

    return default_model_path(quiet=True)


@pytest.fixture(scope="session")
def pydoc_tokens(default_model: Path) -> list[int]:
    """The first 60,000 characters of the pydoc topics text, tokenized for the default model."""
    from spindle_local.eval.texts import pydoc_text
    from spindle_local.runtime.lowlevel import LlamaModel

    with LlamaModel(default_model) as m:
        return m.tokenize(pydoc_text()[:60_000], add_special=False)


def run_cli(*args: str, input: str | None = None, env: dict[str, str] | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``spindle-local ARGS`` in a fresh interpreter, capturing output."""
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    return subprocess.run([sys.executable, "-m", "spindle_local.cli", *args], input=input,
                          capture_output=True, text=True, env=full_env, timeout=timeout, cwd=ROOT)


class FakeEngine:
    """Just enough of :class:`~spindle_local.runtime.engine.Engine` for the chat/server
    generation loop (``EngineChatModel._answer``), without a model: token ``t`` reads as
    ``pieces[t]``; ``generate`` yields ``script`` (-1: Ctrl-C there) and ends as the real one does."""

    def __init__(self, script: list[int], stop: set[int] = frozenset(), limit: int = 1 << 30) -> None:
        self.script, self.stop, self.limit = script, set(stop), limit
        self.tokens: list[int] = []
        self.model = None
        self.finish_reason: str | None = None
        self.fed: list[list[int]] = []
        self.rolled_back = 0

    def truncate(self, n: int) -> bool:
        del self.tokens[n:]
        return True

    def reset(self) -> None:
        self.tokens = []

    def transaction(self):
        import contextlib

        @contextlib.contextmanager
        def tx():
            before = list(self.tokens)
            try:
                yield
            except BaseException:
                self.tokens, self.rolled_back = before, self.rolled_back + 1
                raise
        return tx()

    def feed(self, tokens, *, progress=None):
        for i in range(0, len(tokens), 2):  # chunks of two tokens
            self.tokens += list(tokens[i:i + 2])
            self.fed.append(list(tokens[i:i + 2]))
            if progress is not None:
                progress(min(i + 2, len(tokens)), len(tokens), None)
        return None

    def generate(self, logits, *, max_tokens, sampler, stop):
        self.finish_reason = "length"
        it = iter(self.script)
        for _ in range(max_tokens):
            tok = next(it, None)
            if tok == -1:
                raise KeyboardInterrupt  # as Engine.generate raises Interrupted on Ctrl-C
            if tok is None or tok in stop:
                self.finish_reason = "stop"
                return
            if len(self.tokens) + 1 > self.limit:
                self.finish_reason = "context"
                return
            yield tok
            self.tokens.append(tok)


@pytest.fixture
def fake_chat(monkeypatch):
    """``fake_chat(pieces, script, **engine_kw)``: a ServingChatModel on a :class:`FakeEngine`
    whose tokens read as ``pieces`` (token ids index it). Imports llama_cpp (the bindings),
    loads no model and binds no patched function."""
    from spindle_local.runtime import engine_chat

    def make(pieces: list[str], script: list[int], **kw):
        class Detok:
            def __init__(self, model) -> None:
                pass

            def push(self, tok: int) -> str:
                return pieces[tok]

            def flush(self) -> str:
                return ""

        monkeypatch.setattr(engine_chat, "Detokenizer", Detok)
        m = engine_chat.ServingChatModel.__new__(engine_chat.ServingChatModel)
        m.engine = FakeEngine(script, **kw)
        m.stop = m.engine.stop
        m.reuse = engine_chat.ReuseCounters()
        m.last = engine_chat.TurnStats()
        return m

    return make
