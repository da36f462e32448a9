"""Ctrl-C at any point of an answer or a read leaves a conversation that continues exactly.

The engine tests run a tiny random GGUF with a small regular cache, so that a read of a
few hundred tokens compresses (moves tokens into the store) and an interrupted read must
be undone from the in-memory snapshot, not by truncation. The CLI tests send a real
SIGINT to ``spindle-local chat`` with the default model.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.model  # every test here loads a model (or the patched library)

CFG = dict(policy="spindle", kv_budget=0.5, window=8, recent=16, chunk=16, sinks=2, n_threads=1)
VOCAB = 512


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from spindle_local.testing.tiny_gguf import write_tiny_llama

    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    write_tiny_llama(path, n_layer=2, n_vocab=VOCAB, n_ctx_train=4096, seed=3)
    return path


def _replay(path: Path, model, ops: list[tuple[str, list[int]]]):
    """A fresh engine (sharing the loaded weights) fed ``ops`` the way the tested engine was."""
    from spindle_local.runtime.engine import Engine, EngineConfig

    eng = Engine(path, EngineConfig(**CFG), model=model)
    for kind, toks in ops:
        if kind == "feed":
            eng.feed(toks)
        else:
            for t in toks:
                eng.step(t)
    return eng


class _Sigint:
    """Sends SIGINT to this process after ``delay`` seconds, from another thread (lands anywhere)."""

    def __init__(self, delay: float) -> None:
        self.timer = threading.Timer(delay, os.kill, (os.getpid(), signal.SIGINT))

    def __enter__(self) -> _Sigint:
        self.timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.timer.cancel()
        self.timer.join()
        time.sleep(0.002)  # a signal already sent is handled here, inside the interruptible region


def test_interrupts_at_random_points_leave_an_exact_state(tiny: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """50 interrupts (the cancel flag at a random chunk or token, or a real SIGINT at a random
    time) of a document read or an answer; after each, a normal turn's logits equal those of a
    fresh engine fed the same accepted tokens in the same way."""
    from spindle_local.runtime.engine import Engine, EngineConfig, Sampler
    from spindle_local.runtime.interrupt import Interrupted

    rng = np.random.default_rng(16)
    eng = Engine(tiny, EngineConfig(**CFG))
    counts = dict(read=0, answer=0, interrupted=0, after_compression=0, signal=0, signal_interrupted=0)
    try:
        for it in range(50):
            eng.reset()
            ops: list[tuple[str, list[int]]] = []
            prefix = rng.integers(3, VOCAB, int(rng.integers(20, 200))).tolist()
            logits = eng.feed(prefix)
            ops.append(("feed", prefix))
            if rng.random() < 0.5:  # some generated tokens before, so that the window comes from steps
                steps = rng.integers(3, VOCAB, int(rng.integers(1, 20))).tolist()
                for t in steps:
                    logits = eng.step(t)
                ops.append(("step", steps))
            before = list(eng.tokens)
            by_signal = bool(rng.random() < 0.5)
            counts["signal"] += by_signal
            kind = "read" if rng.random() < 0.5 else "answer"
            counts[kind] += 1
            interrupted = False
            with eng.interruptible():
                if kind == "read":
                    doc = rng.integers(3, VOCAB, int(rng.integers(40, 700))).tolist()
                    chunks = -(-len(doc) // CFG["chunk"])
                    at = int(rng.integers(1, chunks + 1))
                    seen = {"compressions": eng.stats.compressions, "grew": False}

                    def progress(done: int, total: int, stats) -> None:
                        seen["grew"] = stats.compressions > seen["compressions"]
                        if not by_signal and done >= at * CFG["chunk"]:
                            eng.cancel.set()

                    try:
                        with _Sigint(float(rng.uniform(0, 0.08))) if by_signal else _nothing():
                            with eng.transaction():
                                eng.feed(doc, progress=progress)
                    except Interrupted:
                        interrupted = True
                    if interrupted:
                        # README: an interrupted read leaves the document out, exactly
                        assert eng.tokens == before
                        counts["after_compression"] += seen["grew"]
                    else:
                        ops.append(("feed", doc))
                else:
                    question = rng.integers(3, VOCAB, int(rng.integers(4, 40))).tolist()
                    logits = eng.feed(question)
                    ops.append(("feed", question))
                    before = list(eng.tokens)
                    at = int(rng.integers(0, 40))
                    shown: list[int] = []
                    gen = eng.generate(logits, max_tokens=48, sampler=Sampler(0.9, seed=it), stop=set())
                    try:
                        with _Sigint(float(rng.uniform(0, 0.03))) if by_signal else _nothing():
                            for j, tok in enumerate(gen):
                                shown.append(tok)
                                if not by_signal and j == at:
                                    eng.cancel.set()
                    except Interrupted:
                        interrupted = True
                    accepted = eng.tokens[len(before):]
                    assert eng.tokens[:len(before)] == before
                    # every shown token was fed, except possibly the last one (shown, then stopped)
                    assert accepted == shown[:len(accepted)] and len(shown) - len(accepted) in (0, 1)
                    assert interrupted or len(accepted) == len(shown) == 48
                    ops.append(("step", accepted))
            counts["interrupted"] += interrupted
            counts["signal_interrupted"] += interrupted and by_signal
            assert not eng.cancel.is_set()
            nxt = rng.integers(3, VOCAB, int(rng.integers(5, 40))).tolist()
            got = eng.feed(nxt)
            ref = _replay(tiny, eng.model, ops)
            try:
                want = ref.feed(nxt)
                assert ref.tokens == eng.tokens
                np.testing.assert_array_equal(got, want, err_msg=f"iteration {it} ({kind}, signal={by_signal})")
            finally:
                ref.ctx.close()
    finally:
        eng.close()
    assert counts["read"] >= 10 and counts["answer"] >= 10 and counts["signal"] >= 10, counts
    assert counts["interrupted"] >= 25 and counts["signal_interrupted"] >= 5, counts  # most landed mid-work
    assert counts["after_compression"] >= 3, counts  # the snapshot path (truncation impossible) ran
    err = capfd.readouterr().err
    assert "Exception ignored" not in err and "KeyboardInterrupt" not in err, err


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def test_sigint_outside_a_region_is_answered_after_the_call(tiny: Path) -> None:
    """Without a chat around it (eval commands), a Ctrl-C during a decode still never lands in the
    callback: the call finishes its work and then raises Interrupted (a KeyboardInterrupt)."""
    from spindle_local.runtime.engine import Engine, EngineConfig
    from spindle_local.runtime.interrupt import Interrupted

    eng = Engine(tiny, EngineConfig(**CFG))
    try:
        doc = list(range(3, 403))

        def progress(done: int, total: int, stats) -> None:
            if done == 64:
                os.kill(os.getpid(), signal.SIGINT)

        with pytest.raises(KeyboardInterrupt) as info:
            eng.feed(doc, progress=progress)
        assert isinstance(info.value, Interrupted)
        assert eng.n_past == 64  # the chunks read before the next clean point
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        eng.feed([5, 6, 7])  # and it goes on
    finally:
        eng.close()


def test_context_limit_names_the_real_limit(tiny: Path) -> None:
    from spindle_local.errors import UsageError
    from spindle_local.runtime.engine import Engine, EngineConfig

    with Engine(tiny, EngineConfig(**CFG, max_tokens=100)) as eng:
        with pytest.raises(UsageError, match=r"beyond --ctx 100$"):
            eng.feed(list(range(3, 120)))
        assert eng.n_past == 0
        eng.feed(list(range(3, 98)))
        from spindle_local.runtime.engine import Sampler
        out = list(eng.generate(eng.ctx.logits(), max_tokens=50, sampler=Sampler(0.0), stop=set()))
        assert eng.finish_reason == "context" and eng.n_past == 100 and len(out) == 5
    with Engine(tiny, EngineConfig(**CFG)) as eng:
        with pytest.raises(UsageError, match=r"beyond the model's trained context of 4,096 tokens$"):
            eng.feed(list(range(3, 500)) * 9)


# -- the chat, with a real SIGINT -------------------------------------------------------------------


class _Chat:
    """``spindle-local chat`` with piped stdin; stdout and stderr drained while it runs."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "spindle_local.cli", "chat", *args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, cwd=ROOT, env={**os.environ, "SPINDLE_THREADS": "1"})
        self.out: list[str] = []
        self.err: list[str] = []
        self._threads = [threading.Thread(target=self._drain, args=(s, b), daemon=True)
                         for s, b in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for t in self._threads:
            t.start()

    @staticmethod
    def _drain(stream, buf: list[str]) -> None:
        while True:
            c = stream.read(1)
            if not c:
                return
            buf.append(c)

    def send(self, text: str) -> None:
        self.proc.stdin.write(text)
        self.proc.stdin.flush()

    def wait_for(self, what: str, where: str = "err", timeout: float = 120) -> None:
        end = time.time() + timeout
        buf = self.err if where == "err" else self.out
        while what not in "".join(buf):
            if time.time() > end or self.proc.poll() is not None:
                raise AssertionError(f"never saw {what!r}; stdout={''.join(self.out)!r} stderr={''.join(self.err)!r}")
            time.sleep(0.05)

    def sigint(self) -> None:
        self.proc.send_signal(signal.SIGINT)

    def finish(self, timeout: float = 180) -> tuple[int, str, str]:
        self.proc.stdin.close()
        rc = self.proc.wait(timeout=timeout)
        for t in self._threads:
            t.join(timeout=10)
        return rc, "".join(self.out), "".join(self.err)


def _clean(err: str) -> None:
    assert "Traceback" not in err and "Exception ignored" not in err and "llama_decode failed" not in err, err


def test_chat_sigint_during_an_answer_keeps_the_chat(default_model: Path) -> None:
    chat = _Chat(str(default_model), "--temperature", "0", "--max-tokens", "400", "--seed", "1")
    chat.wait_for("allocated")  # the banner: the model is loaded
    chat.send("Tell me a long story about a dragon and a knight.\n")
    chat.wait_for(" ", where="out")
    time.sleep(0.5)
    chat.sigint()
    chat.wait_for("[stopped]")
    chat.send("Say hello.\n/stats\n/bye\n")
    rc, out, err = chat.finish()
    _clean(err)
    assert rc == 0, err
    assert "messages: 4" in err  # the stopped answer is kept, then one more turn
    assert len([line for line in out.splitlines() if line.strip()]) >= 2


def test_chat_sigint_during_a_read_leaves_the_document_out(default_model: Path, tmp_path: Path) -> None:
    from spindle_local.eval.texts import pydoc_text

    doc = tmp_path / "big.txt"
    doc.write_text(pydoc_text()[:20_000])
    chat = _Chat(str(default_model), "--temperature", "0", "--max-tokens", "8", "--recent", "64", "--chunk", "256")
    chat.wait_for("allocated")
    chat.send(f"/read {doc}\n")
    time.sleep(2.5)
    chat.sigint()
    chat.wait_for("[reading stopped")
    chat.send("/stats\nSay hello.\n/stats\n/bye\n")
    rc, out, err = chat.finish()
    _clean(err)
    assert rc == 0, err
    stats = [line for line in err.splitlines() if line.startswith("messages:")]
    assert stats[0].startswith("messages: 0  tokens seen: 0 "), stats
    assert stats[1].startswith("messages: 2 "), stats
    assert out.strip()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes")
def test_chat_sigint_while_a_named_pipe_blocks_keeps_the_chat(default_model: Path, tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    chat = _Chat(str(default_model), "--temperature", "0", "--max-tokens", "4")
    chat.wait_for("allocated")
    chat.send(f"/read {fifo}\n")
    time.sleep(1.5)  # blocked in open(): nobody writes to the pipe
    chat.sigint()
    chat.wait_for("[reading stopped")
    chat.send("/stats\n/bye\n")
    rc, out, err = chat.finish()
    _clean(err)
    assert rc == 0, err
    assert "messages: 0" in err
