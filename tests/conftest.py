"""Shared fixtures: the default model and a way to run the CLI as a user does."""

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
