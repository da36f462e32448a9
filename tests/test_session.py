"""Saved sessions: exact resume, and refusal of files that cannot be trusted.

The engine tests run SmolLM2 with a small allocation so that a 1,400-token conversation
has been compressed (store in every layer) when it is saved.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from spindle_local.runtime import session as S
from tests.conftest import run_cli

pytestmark = pytest.mark.model  # every test here loads a model (or the patched library)


def _config():
    from spindle_local.runtime.config import EngineConfig

    return EngineConfig(kv_budget=0.25, recent=64, chunk=256, decode_slack=32)


@pytest.fixture(scope="module")
def saved(default_model: Path, tmp_path_factory: pytest.TempPathFactory):
    """An engine that read 1,200 tokens and generated 40, saved to a file; then 20 more tokens fed."""
    from spindle_local.eval.texts import pydoc_text
    from spindle_local.runtime.engine import Engine

    eng = Engine(default_model, _config())
    toks = eng.model.tokenize(pydoc_text()[:30000], add_special=True)
    eng.feed(toks[:1200])
    for t in toks[1200:1240]:
        eng.step(t)
    path = tmp_path_factory.mktemp("session") / "conv.spl"
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]
    size = S.save(path, eng, messages=messages, system_prompt="be brief", model_path=default_model)
    last = eng.ctx.logits().copy()
    after = [eng.feed(toks[1240:1260]).copy()] + [eng.step(t).copy() for t in toks[1260:1400]]
    info = dict(compressions=eng.stats.compressions, store_layers=len(eng._store_layers), n_past=eng.n_past)
    eng.close()
    return dict(path=path, size=size, last=last, after=after, toks=toks, messages=messages, info=info)


def test_resume_reproduces_logits(saved, default_model: Path) -> None:
    from spindle_local.runtime.engine import Engine

    ses = S.read_session(saved["path"])
    assert ses.messages == saved["messages"] and ses.system_prompt == "be brief"
    assert saved["path"].stat().st_size == saved["size"]
    eng = Engine(default_model, ses.config())
    try:
        S.restore(eng, ses)
        assert eng.n_past == 1240 and len(eng._store_layers) == eng.geometry.n_layer  # it was compressed
        np.testing.assert_array_equal(eng.ctx.logits(), saved["last"])
        toks = saved["toks"]
        got = [eng.feed(toks[1240:1260])] + [eng.step(t) for t in toks[1260:1400]]
        # the resumed engine compresses again on the same schedule, with the same window queries
        assert eng.stats.compressions == saved["info"]["compressions"] > 1
        for a, b in zip(saved["after"], got):
            np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)
    finally:
        eng.close()


def test_corrupted_truncated_and_foreign_files_are_refused(saved, tmp_path: Path) -> None:
    data = saved["path"].read_bytes()
    bad = bytearray(data)
    bad[len(bad) // 2] ^= 0x40
    (tmp_path / "flip.spl").write_bytes(bytes(bad))
    with pytest.raises(S.SessionError, match="corrupted"):
        S.read_session(tmp_path / "flip.spl")
    for n in (10, len(data) // 3, len(data) - 1):
        (tmp_path / "cut.spl").write_bytes(data[:n])
        with pytest.raises(S.SessionError, match="truncated|not a spindle-local session"):
            S.read_session(tmp_path / "cut.spl")
    (tmp_path / "other.spl").write_bytes(b"GGUF" + data[4:])
    with pytest.raises(S.SessionError, match="not a spindle-local session"):
        S.read_session(tmp_path / "other.spl")
    ses = S.read_session(saved["path"])
    (tmp_path / "v2.spl").write_bytes(b"".join(S.encode(ses.header, ses.arrays, version=S.FORMAT_VERSION + 1)))
    with pytest.raises(S.SessionError, match=f"format version {S.FORMAT_VERSION + 1}"):
        S.read_session(tmp_path / "v2.spl")


def test_cli_refuses_bad_sessions_and_other_models(saved, tmp_path: Path) -> None:
    from spindle_local.testing.tiny_gguf import write_tiny_llama

    data = saved["path"].read_bytes()
    corrupt = tmp_path / "corrupt.spl"
    corrupt.write_bytes(data[:-40] + bytes(b ^ 1 for b in data[-40:]))
    before = corrupt.read_bytes()
    r = run_cli("chat", "--resume", str(corrupt), "--prompt", "hi")
    assert r.returncode != 0 and r.stderr.strip().startswith("error:") and "corrupted" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert corrupt.read_bytes() == before  # a failed resume changes nothing

    tiny = tmp_path / "tiny.gguf"
    write_tiny_llama(tiny)
    r = run_cli("chat", str(tiny), "--resume", str(saved["path"]), "--prompt", "hi")
    assert r.returncode != 0 and "different model" in r.stderr and "Traceback" not in r.stderr


def test_chat_save_then_resume(default_model: Path, tmp_path: Path) -> None:
    path = tmp_path / "chat.spl"
    r = run_cli("chat", "--temperature", "0", "--max-tokens", "8", input=f"Name a color.\n/save {path}\n")
    assert r.returncode == 0, r.stderr
    assert "[saved" in r.stderr and path.exists()
    r2 = run_cli("chat", "--resume", str(path), "--temperature", "0", "--max-tokens", "8",
                 input="/stats\n")
    assert r2.returncode == 0, r2.stderr
    assert "[resumed chat.spl: 2 messages" in r2.stderr and "messages: 2" in r2.stderr


def test_failed_save_keeps_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "keep.spl"
    path.write_bytes(b"previous contents")

    def pieces():
        yield b"new data, part one"
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        S.write_atomic(path, pieces())
    assert path.read_bytes() == b"previous contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.spl"]  # no temp file left behind


def test_killed_save_keeps_previous_file(tmp_path: Path) -> None:
    """A process killed in the middle of a save (SIGKILL: no cleanup at all) leaves the old file."""
    path = tmp_path / "keep.spl"
    path.write_bytes(b"previous contents")
    code = textwrap.dedent(f"""
        import sys, time
        from spindle_local.runtime.session import write_atomic
        def pieces():
            yield b"x" * 1000000
            print("writing", flush=True)
            time.sleep(60)
            yield b"y"
        write_atomic({str(path)!r}, pieces())
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    try:
        assert proc.stdout.readline().strip() == "writing"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert path.read_bytes() == b"previous contents"
    time.sleep(0.1)
    leftovers = [p for p in tmp_path.iterdir() if p.name != "keep.spl"]
    assert all(p.name.startswith(".keep.spl.tmp-") for p in leftovers)  # only an unfinished temp file
