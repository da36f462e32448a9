"""Whole-process memory of reading one prompt: the full cache against a compressed one.

Each (tokens, mode) pair runs in its own process, so that its peak RSS is its own. A
worker loads the model, reads a text (default: a licence text, repeated to length) as one
prompt through the engine and reports:

* ``rss_model``: RSS after loading the model, before any context exists;
* ``rss_peak``: the process's peak RSS after the prompt is read (``ru_maxrss``);
* ``kv_held``: bytes llama.cpp holds for KV at the end (regular allocation + store);
* ``full_kv``: what an f16 cache of every token costs (the reserve-ratio denominator);
* ``compress_s`` / ``prefill_s``: seconds spent compressing, and reading in all.

The target of issue 18 is printed next to each compressed row: the full cache's peak
RSS minus half of the full-cache KV bytes, both from the same run.

    .venv/bin/python scripts/bench_memory.py --tokens 2000,4000,8000 [--budget 0.25] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_TEXT = "/usr/share/common-licenses/GPL-3"


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(args: argparse.Namespace) -> dict:
    from spindle_local.eval.texts import load_text
    from spindle_local.policy.plan import full_cache_bytes
    from spindle_local.runtime.engine import Engine, EngineConfig
    from spindle_local.runtime.lowlevel import LlamaModel
    from spindle_local.runtime.model_files import resolve_model

    path = resolve_model(args.model)
    model = LlamaModel(str(path))
    rss_model = _rss_now()
    text = load_text(args.text if Path(args.text).exists() else None)
    ids = model.tokenize(text, add_special=False)
    while len(ids) < args.tokens:
        ids = ids + ids
    ids = ids[: args.tokens]
    if args.mode == "full":
        cells = args.tokens + 64
        cfg = EngineConfig(policy="full", n_cells=cells, max_tokens=cells, n_threads=args.threads)
    elif args.mode == "kvmem":
        cfg = EngineConfig(kv_mem=args.kv_mem, n_threads=args.threads)
    else:
        cfg = EngineConfig(policy=args.mode, kv_budget=args.budget, n_threads=args.threads)
    eng = Engine(path, cfg, model=model)
    t0 = time.perf_counter()
    eng.feed(ids)
    prefill = time.perf_counter() - t0
    st = eng.refresh_stats()
    geo = eng.pgeo
    return dict(mode=args.mode, tokens=args.tokens, rss_model=rss_model,
                rss_peak=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                kv_held=int(eng.kv_memory()[0]),
                full_kv=full_cache_bytes(args.tokens, geo.n_layer, geo.n_head_kv, geo.head_dim_k, geo.head_dim_v),
                compressions=st.compressions, compress_s=round(st.compress_seconds, 3),
                prefill_s=round(prefill, 3))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="2000,4000,8000")
    ap.add_argument("--modes", default="full,spindle")
    ap.add_argument("--budget", type=float, default=0.25)
    ap.add_argument("--kv-mem", type=int, default=40 * 2**20)
    ap.add_argument("--text", default=DEFAULT_TEXT)
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="full", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.tokens = int(args.tokens)
        print(json.dumps(worker(args)))
        return
    mib = 2**20
    rows = []
    for n in (int(x) for x in args.tokens.split(",")):
        full = None
        for mode in args.modes.split(","):
            cmd = [sys.executable, __file__, "--worker", "--mode", mode, "--tokens", str(n),
                   "--budget", str(args.budget), "--kv-mem", str(args.kv_mem), "--text", args.text,
                   "--threads", str(args.threads)]
            cmd += ["--model", args.model] if args.model else []
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                print(f"{mode} at {n} tokens failed:\n{out.stderr[-2000:]}", file=sys.stderr)
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(r)
            if mode == "full":
                full = r
            target = f"{(full['rss_peak'] - full['full_kv'] / 2) / mib:7.0f}" if full and mode != "full" else "      -"
            print(f"{n:6d} {mode:9s} model {r['rss_model'] / mib:6.0f} MiB  peak {r['rss_peak'] / mib:6.0f} MiB"
                  f"  (target {target})  KV held {r['kv_held'] / mib:6.1f} MiB  full KV {r['full_kv'] / mib:6.1f} MiB"
                  f"  compress {r['compress_s']:6.2f} s in {r['compressions']}  prefill {r['prefill_s']:6.1f} s",
                  flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
