"""Smoke test of the installed runtime in a child process, and what to do when it dies.

Why a child: an instruction the CPU refuses (SIGILL) or a bad access kills the process
that runs it, with no Python exception to catch. ``spindle-local setup`` runs this
module as ``python -m spindle_local.runtime.smoke`` after every build and the first time
a build is used on a CPU (recorded per CPU, see :mod:`.cpu_features`): it loads a tiny
random-weight GGUF and, when cached, the default model (quantized weights take other
kernels), and decodes with and without a compressed store. A child killed by a signal
makes :func:`decide` choose the next, smaller instruction-set tier to rebuild with.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from spindle_local.runtime.cpu_features import IsaTier, next_tier

#: Signals that mean "this build does not run on this CPU" (or crashes in native code).
FATAL_SIGNALS = (signal.SIGILL, signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE)
SMOKE_TIMEOUT_S = 600


@dataclass(frozen=True)
class SmokeResult:
    returncode: int
    signal: int | None  # the fatal signal the child died of, if any
    detail: str  # last line of the child's output

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def describe(self) -> str:
        if self.signal is not None:
            return f"died with {signal.Signals(self.signal).name}"
        if self.returncode == 124:
            return "timed out"
        return f"failed (exit {self.returncode}): {self.detail}"


def fatal_signal(returncode: int) -> int | None:
    """The fatal signal behind a child's return code: -N (killed) or 128+N (our crash handler)."""
    for sig in FATAL_SIGNALS:
        if returncode in (-int(sig), 128 + int(sig)):
            return int(sig)
    return None


def smoke_command() -> list[str]:
    return [sys.executable, "-m", "spindle_local.runtime.smoke"]


def run_smoke(cmd: Sequence[str] | None = None, timeout: float = SMOKE_TIMEOUT_S) -> SmokeResult:
    """Run the smoke test (or ``cmd``) in a child process and classify how it ended."""
    env = dict(os.environ)
    env["SPINDLE_CRASH_HANDLER"] = "0"  # die by the signal itself, so the parent sees it
    try:
        proc = subprocess.run(list(cmd or smoke_command()), capture_output=True, text=True,
                              timeout=timeout, env=env, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return SmokeResult(124, None, f"no answer within {timeout:.0f} s")
    lines = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
    return SmokeResult(proc.returncode, fatal_signal(proc.returncode), lines[-1] if lines else "")


@dataclass(frozen=True)
class Decision:
    action: str  # "ok", "rebuild" (with ``tier``) or "fail"
    tier: IsaTier | None
    message: str


def decide(result: SmokeResult, current: IsaTier, tiers: list[IsaTier]) -> Decision:
    """What ``setup`` does after a smoke test of a build for ``current``."""
    if result.ok:
        return Decision("ok", current, f"runtime smoke test passed (CPU instruction sets: {current.name})")
    if result.signal is None:
        return Decision("fail", None, f"the runtime smoke test {result.describe()}")
    nxt = next_tier(current.name, tiers)
    sig = signal.Signals(result.signal).name
    if nxt is None:
        return Decision("fail", None, f"the runtime died with {sig} in its smoke test even with the most "
                                      f"portable build ({current.name}); this CPU cannot run it")
    return Decision("rebuild", nxt, f"the runtime built for {current.name} died with {sig} in its smoke test "
                                    f"on this CPU; rebuilding for {nxt.name}")


def verify(current: IsaTier, tiers: list[IsaTier], rebuild: Callable[[IsaTier], None], *,
           record: dict, smoke: Callable[[], SmokeResult] = run_smoke,
           log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)) -> IsaTier:
    """Smoke-test the build for ``current``; on a fatal signal record it and rebuild smaller.

    ``record`` is the CPU's record (``cpu_features.load_record``): faulted tiers go into
    ``record["faulted_tiers"]`` so that later builds on this CPU skip them. Returns the
    tier that passed; raises BuildError when none does.
    """
    from spindle_local.errors import BuildError

    while True:
        result = smoke()
        d = decide(result, current, tiers)
        if d.action == "ok":
            return current
        if d.action == "fail":
            raise BuildError(d.message)
        record["faulted_tiers"][current.name] = signal.Signals(result.signal).name
        log(d.message)
        assert d.tier is not None
        current = d.tier
        rebuild(current)


# -- the child ------------------------------------------------------------------------------------


def _exercise(path: Path, n_tokens: int, n_vocab: int) -> None:
    """Decode with a full cache, then compress into the store and decode against it."""
    import numpy as np

    from spindle_local.runtime.config import EngineConfig
    from spindle_local.runtime.engine import Engine

    tokens = [int(t) for t in np.random.default_rng(0).integers(3, n_vocab, n_tokens)]
    for policy in ("full", "spindle"):
        cfg = EngineConfig(policy=policy, kv_budget=0.5, window=8, sinks=2, recent=32, chunk=64,
                           n_cells=n_tokens + 128, max_tokens=n_tokens + 128, n_threads=1)
        with Engine(path, cfg) as engine:
            logits = engine.feed(tokens)
            if policy != "full":
                engine.maybe_compress(growth=16, force=True)
                if not engine._store_layers:
                    raise RuntimeError("the compressed store stayed empty")
            for _ in range(4):
                logits = engine.step(int(np.argmax(logits)))
            if not np.all(np.isfinite(logits)):
                raise RuntimeError(f"non-finite logits with policy {policy}")


def main() -> int:
    from spindle_local.runtime.model_files import default_model_path
    from spindle_local.testing.tiny_gguf import write_tiny_llama

    with tempfile.TemporaryDirectory(prefix="spindle-smoke-") as tmp:
        spec = write_tiny_llama(Path(tmp) / "tiny.gguf", n_layer=2, n_head=4, n_head_kv=2, head_dim=16)
        _exercise(spec.path, 192, spec.n_vocab)
    try:
        model = default_model_path(fetch=False)
    except Exception:
        model = None
    if model is not None:
        _exercise(model, 256, 1000)
    print("smoke test passed" + ("" if model else " (tiny model only: default model not fetched yet)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
