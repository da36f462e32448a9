"""Where an engine's time goes: a prompt read and tokens generated under cProfile.

    python scripts/profile_engine.py [--model PATH] [--context 8000] [--gen 64] [--policy spindle]
                                     [--kv-budget 0.25] [--no-flash-attn] [--top 25] [--json]

Prints, for the prefill and for the generated tokens, the seconds spent in the runtime's calls
(``llama_decode`` through ``LlamaContext.decode``, compressions, the look-ahead probe, reading
captured queries, statistics, copying logits out) and what is left for Python; then the
functions with the most cumulative time. The parts nest (a compression's probe decodes too):
read them as cumulative times, not as a partition. Useful on a GPU, where a step of a small
model takes a millisecond and the host's share decides the speed.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

#: (file name, function name) -> label of the calls reported
PARTS = {
    ("lowlevel.py", "decode"): "llama_decode",
    ("engine.py", "_compress"): "compress",
    ("engine.py", "_probe"): "lookahead_probe",
    ("window.py", "collect"): "capture_read",
    ("engine.py", "refresh_stats"): "refresh_stats",
    ("lowlevel.py", "logits"): "logits_copy",
}


def _parts(prof: cProfile.Profile) -> dict[str, float]:
    st = pstats.Stats(prof)
    out = {label: 0.0 for label in PARTS.values()}
    for (fname, _line, func), (_cc, _nc, _tt, ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
        label = PARTS.get((os.path.basename(fname), func))
        if label:
            out[label] += ct
    return out


def _top(prof: cProfile.Profile, n: int) -> str:
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(n)
    return buf.getvalue()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="GGUF file (default: the default model)")
    ap.add_argument("--text", default=None, help="text file to read (default: the bench text)")
    ap.add_argument("--context", type=int, default=8000)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--policy", default="spindle")
    ap.add_argument("--kv-budget", type=float, default=0.25)
    ap.add_argument("--no-flash-attn", action="store_true")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--json", action="store_true", help="one JSON line only")
    a = ap.parse_args()

    import numpy as np

    from spindle_local.eval.texts import load_text, prefix_tokens
    from spindle_local.runtime.engine import Engine, EngineConfig
    from spindle_local.runtime.model_files import default_model_path

    model_path = a.model or str(default_model_path(fetch=False))
    cfg = EngineConfig(policy=a.policy, kv_budget=a.kv_budget, flash_attn=not a.no_flash_attn,
                       max_tokens=a.context + a.gen + 64)
    eng = Engine(model_path, cfg)
    toks = prefix_tokens(lambda t: eng.model.tokenize(t, add_special=False), load_text(a.text), a.context)
    if len(toks) < a.context:
        print(f"error: the text has only {len(toks)} tokens", file=sys.stderr)
        return 2

    res: dict = {"model": os.path.basename(model_path), "policy": a.policy, "kv_budget": a.kv_budget,
                 "flash_attn": not a.no_flash_attn, "context": a.context, "gen": a.gen}
    tops = []
    for phase in ("prefill", "decode"):
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        if phase == "prefill":
            logits = eng.feed(toks)
        else:
            for _ in range(a.gen):
                logits = eng.step(int(np.argmax(logits)))
        prof.disable()
        total = time.perf_counter() - t0
        parts = _parts(prof)
        res[phase] = {"seconds": round(total, 4), **{k: round(v, 4) for k, v in parts.items()}}
        tops.append((phase, _top(prof, a.top)))
    s = eng.refresh_stats()
    res["compressions"] = s.compressions
    res["reserve_ratio"] = round(s.reserve_ratio, 4)
    eng.close()
    if not a.json:
        for phase, text in tops:
            print(f"==== {phase}\n{text}")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
