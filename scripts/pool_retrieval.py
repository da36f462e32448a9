#!/usr/bin/env python3
"""Pool the rows of several ``eval needle`` / ``eval ruler`` draws into one table.

The retrieval targets are judged over several draws (seeds), while each ``eval`` run
writes one row per configuration and draw. This script reads those rows (``--out`` JSONL
files or ``--json`` output, any mix) and prints, per configuration and protocol:

* pass keys (``eval needle``): keys found by both the policy and the full cache, the full
  cache's keys, their ratio (the relative accuracy), keys the policy found on its own
  count, the same per prompt length, and the draws' seeds with their own counts;
* RULER-style tasks (``eval ruler``): per task, the policy's and the full cache's scores
  pooled over every prompt of every draw (weighted by prompts), their difference in
  points, and the draws whose own difference is more than ``--points`` below.

Rows written at different source commits are flagged: a pooled figure is only a figure
of one version of the code when every row comes from the same commit.

    python scripts/pool_retrieval.py runs/multi_*.jsonl
    python scripts/pool_retrieval.py --points 5 runs/ruler_*.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path


def read_rows(path: Path) -> list[dict]:
    """Every result row in ``path``: one JSON value (a row or a list of rows) or JSON lines."""
    text = path.read_text(encoding="utf-8").strip()
    if not text:
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = [json.loads(line) for line in text.splitlines() if line.strip()]
    rows = data if isinstance(data, list) else [data]
    return [r for r in rows if isinstance(r, dict) and ("cells" in r or "summary" in r)]


def config_key(r: dict) -> tuple:
    """(configuration, protocol) of a row: its label, with the stage settings it ran with
    (``--set``) when the label does not name them (a run of one configuration)."""
    label = r.get("label") or f"{r.get('policy')} @{r.get('kv_budget')}"
    stages = ((r.get("provenance") or {}).get("engine") or {}).get("stages") or {}
    named = [f"{k}={v}" for k, v in sorted(stages.items()) if f"{k}=" not in label]
    return (" ".join([label, *named]), r.get("protocol", "ruler"))


def commit_of(r: dict) -> str:
    src = (r.get("provenance") or {}).get("source") or {}
    c = str(src.get("commit", "?"))[:8]
    return c + ("+dirty" if src.get("dirty") else "")


def _by_length(rs: list[dict]) -> list[str]:
    """One ``LENGTH: both/full, dlogp D`` entry per prompt length, over every draw (Δlogp
    weighted by the answers it averages)."""
    acc: dict[int, list[float]] = defaultdict(lambda: [0, 0, 0.0, 0])
    for r in rs:
        for c in r["cells"]:
            a = acc[c["length"]]
            a[0] += c["correct_both"]
            a[1] += c["correct_full"]
            n = c.get("logprob_n", 0)
            if n:
                a[2] += c["logprob_delta"] * n
                a[3] += n
    return [f"{n}: {a[0]}/{a[1]}" + (f", dlogp {a[2] / a[3]:+.2f}" if a[3] else "") for n, a in sorted(acc.items())]


def pool_needle(rows: list[dict]) -> None:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[config_key(r)].append(r)
    for (label, protocol), rs in sorted(groups.items()):
        both = sum(c["correct_both"] for r in rs for c in r["cells"])
        full = sum(c["correct_full"] for r in rs for c in r["cells"])
        alone = sum(c["correct"] for r in rs for c in r["cells"])
        rel = both / full if full else float("nan")
        commits = sorted({commit_of(r) for r in rs})
        print(f"{label} [{protocol}]: {both} of the full cache's {full} keys ({rel:.3f}); "
              f"found {alone} keys in all; {len(rs)} draws; commit {', '.join(commits)}"
              + ("  ** rows from several commits **" if len(commits) > 1 else ""))
        print("  by length: " + "; ".join(_by_length(rs)))
        for r in sorted(rs, key=lambda r: r.get("seed", 0)):
            b = sum(c["correct_both"] for c in r["cells"])
            f = sum(c["correct_full"] for c in r["cells"])
            lost = [f"{c['length']}/{c['depth']}" for c in r["cells"] if c["correct_full"] > c["correct_both"]]
            print(f"  seed {r.get('seed')}: {b}/{f}, found {sum(c['correct'] for c in r['cells'])}, "
                  f"dlogp {r.get('logprob_delta', float('nan')):+.2f}" + (f", lost at {' '.join(lost)}" if lost else ""))


def pool_ruler(rows: list[dict], points: float) -> None:
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        groups[config_key(r)[0]].append(r)
    for label, rs in sorted(groups.items()):
        commits = sorted({commit_of(r) for r in rs})
        print(f"{label}: {len(rs)} draws (seeds {', '.join(str(r.get('seed')) for r in rs)}); commit "
              f"{', '.join(commits)}" + ("  ** rows from several commits **" if len(commits) > 1 else ""))
        tasks = sorted({t for r in rs for t in r["summary"]})
        protocols = sorted({p for r in rs for t in r["summary"].values() for p in t})
        below = 0
        cells = 0
        for t in tasks:
            for p in protocols:
                n = s = sf = 0.0
                low = []
                for r in rs:
                    c = r["summary"].get(t, {}).get(p)
                    if not c:
                        continue
                    cells += 1
                    n += c["n"]
                    s += c["score"] * c["n"]
                    sf += c["score_full"] * c["n"]
                    d = 100.0 * (c["score"] - c["score_full"])
                    if d < -points:
                        below += 1
                        low.append(f"seed {r.get('seed')} {d:+.1f}")
                if n:
                    print(f"  {t:16s} {p:9s} {s / n:.3f} vs full {sf / n:.3f} ({100 * (s - sf) / n:+.1f} points, "
                          f"{int(n)} prompts)" + (f"; draws below by more than {points:g}: {', '.join(low)}" if low else ""))
        print(f"  cells more than {points:g} points below the full cache: {below} of {cells}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--points", type=float, default=5.0, help="per-draw shortfall flagged, in points (RULER)")
    args = ap.parse_args(argv)
    rows = []
    for f in args.files:
        if not f.is_file():
            print(f"error: no such file: {f}", file=sys.stderr)
            return 2
        try:
            rows += read_rows(f)
        except json.JSONDecodeError as e:
            print(f"error: {f} is not JSON or JSON lines ({e})", file=sys.stderr)
            return 2
    needle = [r for r in rows if "cells" in r]
    ruler = [r for r in rows if "summary" in r]
    if not rows:
        print("error: no eval needle or eval ruler rows in the files given", file=sys.stderr)
        return 2
    if needle:
        pool_needle(needle)
    if ruler:
        pool_ruler(ruler, args.points)
    return 0


if __name__ == "__main__":
    sys.exit(main())
