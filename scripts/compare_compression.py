"""Compression cost of two checkouts of this project, alternated, one process per read.

    git worktree add ../prev HEAD~1
    python scripts/compare_compression.py ../prev . [--tokens 8000] [--threads 2] [--pairs 3]

Each read takes the first ``--tokens`` tokens of the default text with the default policy at
``--kv-budget`` and the installed runtime, importing ``spindle_local`` from the checkout
named; the order alternates (A B, B A, ...) so that a machine's slow phases fall on both.
Prints one JSON line per read (reading and compression seconds, plans, the argmax of the
last logits and a hash of every store's positions: equal hashes mean the same plans) and
the median compression of each checkout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

_READ = r"""
import hashlib, json, sys, time
sys.path.insert(0, sys.argv[1])
import numpy as np
from spindle_local.eval.texts import load_text, prefix_tokens
from spindle_local.runtime.engine import Engine, EngineConfig
from spindle_local.runtime.model_files import default_model_path

n, threads, budget = int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
eng = Engine(str(default_model_path(fetch=False)),
             EngineConfig(policy="spindle", kv_budget=budget, max_tokens=n + 128, n_threads=threads))
toks = prefix_tokens(lambda t: eng.model.tokenize(t, add_special=False), load_text(None), n)
t0 = time.perf_counter()
logits = eng.feed(toks)
read = time.perf_counter() - t0
st = eng.refresh_stats()
stores = json.dumps({il: eng._store_meta[il][1].tolist() for il in sorted(eng._store_meta)})
print(json.dumps(dict(read_s=round(read, 3), compress_s=round(st.compress_seconds, 3),
                      share=round(st.compress_seconds / read, 4), plans=st.compressions,
                      argmax=int(np.argmax(logits)), stores=hashlib.sha1(stores.encode()).hexdigest()[:12])))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a", type=Path, help="a checkout of the project")
    ap.add_argument("b", type=Path, help="another checkout")
    ap.add_argument("--tokens", type=int, default=8000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--kv-budget", type=float, default=0.25)
    args = ap.parse_args()
    trees = [p.resolve() for p in (args.a, args.b)]
    for t in trees:
        if not (t / "spindle_local" / "__init__.py").is_file():
            ap.error(f"{t} is not a checkout of spindle-local")
    times: dict[Path, list[float]] = {t: [] for t in trees}
    for i in range(args.pairs):
        for t in trees if i % 2 == 0 else trees[::-1]:
            r = subprocess.run([sys.executable, "-c", _READ, str(t), str(args.tokens), str(args.threads),
                                str(args.kv_budget)], capture_output=True, text=True)
            if r.returncode != 0:
                print(f"error: the read with {t} failed: {r.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
                return 1
            row = json.loads(r.stdout.strip().splitlines()[-1])
            times[t].append(row["compress_s"])
            print(json.dumps({"tree": str(t), **row}), flush=True)
    for t, xs in times.items():
        print(f"{t}: compression median {statistics.median(xs):.2f} s over {len(xs)} reads")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
