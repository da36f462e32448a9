"""Inputs that once hung or were accepted: a FIFO as model, truncated GGUFs, broken sessions."""

from __future__ import annotations

import os
from pathlib import Path

from conftest import run_cli

from spindle_local.runtime.session import write_atomic


def test_fifo_model_is_refused_not_hung(tmp_path: Path) -> None:
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    for args in (("info", str(fifo)), ("chat", str(fifo), "--prompt", "hi")):
        proc = run_cli(*args, timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().splitlines() == [f"error: model path is not a regular file (a pipe or device?): {fifo}"]


def test_truncated_gguf_is_refused_by_info(tmp_path: Path, default_model: Path) -> None:
    data = default_model.read_bytes()
    for keep in (len(data) // 2, len(data) - 1):
        cut = tmp_path / f"cut{keep}.gguf"
        cut.write_bytes(data[:keep])
        proc = run_cli("info", str(cut), timeout=60)
        assert proc.returncode == 2, proc.stdout
        assert proc.stderr.startswith("error: truncated GGUF file") and "Traceback" not in proc.stderr
    ok = run_cli("info", str(default_model), timeout=60)
    assert ok.returncode == 0 and "KV bytes/token" in ok.stdout


def test_missing_and_corrupt_sessions_exit_2(tmp_path: Path) -> None:
    junk = tmp_path / "junk.spl"
    junk.write_bytes(b"SPINDLE?" + os.urandom(64))
    for path in (junk, tmp_path / "missing.spl"):
        proc = run_cli("chat", "--resume", str(path), "--prompt", "hi", timeout=60)
        assert proc.returncode == 2, (path, proc.returncode, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error:")


def test_save_removes_temporaries_of_dead_saves(tmp_path: Path) -> None:
    target = tmp_path / "chat.spl"
    dead = tmp_path / ".chat.spl.tmp-999999999"  # no such process
    dead.write_bytes(b"x" * 100)
    mine = tmp_path / f".chat.spl.tmp-{os.getppid()}"  # a live process: left alone
    mine.write_bytes(b"y")
    write_atomic(target, [b"data"])
    assert target.read_bytes() == b"data"
    assert not dead.exists() and mine.exists()
