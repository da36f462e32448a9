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
