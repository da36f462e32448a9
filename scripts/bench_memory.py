"""Whole-process memory of reading one prompt: the full cache against a compressed one.

Each (tokens, mode) pair runs in its own process, so that its peak RSS is its own. A
worker loads the model, reads a text (default: a licence text, repeated to length) as one
prompt through the engine and reports:

* ``rss_model``: RSS after loading the model, before any context exists;
* ``rss_peak``: the process's peak RSS after the prompt is read (``ru_maxrss``);
* ``kv_held``: bytes llama.cpp holds for KV at the end (regular allocation + store);
* ``full_kv``: what an f16 cache of every token costs (the reserve-ratio denominator);
* ``compress_s`` / ``prefill_s``: seconds spent compressing (the look-ahead probes
  included; ``probe_s`` alone), and reading in all;
* ``plans``: per compression, its seconds, the tokens read by then and the tokens held
  before and after it (regular cells plus the store's mean slots per KV head). The summary
  line gives one plan's seconds per 1,000 tokens held when it starts (median, first plan
  left out), the figure that is constant when a compression costs in proportion to what
  it holds.

The target of issue 18 is printed next to each compressed row: the full cache's peak
RSS minus half of the full-cache KV bytes, both from the same run.

Modes: ``full`` (``--policy full``), ``q4_0`` (``--policy full --cache-type q4_0``),
``kvmem`` (``--kv-mem``) and a policy name (``--kv-budget``), optionally with stage
settings as ``--set`` takes them, joined by ``+``: ``spindle:codebooks=off``. ``full`` allocates the KV
cache as stock llama.cpp does (a sliding-window model's window layers get ``n_swa +
ubatch`` cells, as llama-server and llama-cli give them). ``--kv-mem-frac F`` sets the
``kvmem`` cap at each length to F times the full cache's KV bytes at that length, or
the smallest workable cap when that is less.

    .venv/bin/python scripts/bench_memory.py --tokens 2000,4000,8000 [--budget 0.25] [--threads 2]
    .venv/bin/python scripts/bench_memory.py --model gemma3 --tokens 4000,8000 --modes full,kvmem --kv-mem-frac 0.25
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_TEXT = "/usr/share/common-licenses/GPL-3"


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def stock_kv_bytes(meta, tokens: int, chunk: int) -> int:
    """KV bytes of a stock f16 cache of ``tokens`` cells: every global layer full, the window
    layers' ``n_swa + ubatch`` cells (a full cache reads ``chunk`` per ubatch)."""
    from spindle_local.runtime.memory import kv_shape

    return kv_shape(meta, ubatch=chunk).cost(tokens)


def kv_mem_for(meta, tokens: int, frac: float, cfg) -> int:
    """``frac`` of the stock cache at ``tokens``, raised to the smallest workable cap."""
    from spindle_local.runtime.memory import STORE_UBATCH, kv_shape, smallest_kv_mem

    shape = kv_shape(meta, ubatch=min(cfg.chunk, STORE_UBATCH))
    low = smallest_kv_mem(shape.bytes_per_token, shape.n_layer, shape.window_cache)
    return max(int(frac * stock_kv_bytes(meta, tokens, cfg.chunk)), low)


def _store_slots(eng) -> float:
    """Tokens the store holds, per layer and KV head on average (slots)."""
    meta = list(eng._store_meta.values())
    return float(sum(float(slots.mean()) for slots, _ in meta) / len(meta)) if meta else 0.0


def worker(args: argparse.Namespace) -> dict:
    from spindle_local.eval.texts import load_text
    from spindle_local.policy.plan import full_cache_bytes
    from spindle_local.runtime.config import apply_settings
    from spindle_local.runtime.engine import Engine, EngineConfig
    from spindle_local.runtime.gguf_meta import read_meta
    from spindle_local.runtime.lowlevel import LlamaModel
    from spindle_local.runtime.model_files import resolve_model

    path = resolve_model(args.model)
    meta = read_meta(path)
    model = LlamaModel(str(path))
    rss_model = _rss_now()
    text = load_text(args.text if Path(args.text).exists() else None)
    ids = model.tokenize(text, add_special=False)
    while len(ids) < args.tokens:
        ids = ids + ids
    ids = ids[: args.tokens]
    if args.mode in ("full", "q4_0"):
        cells = args.tokens + 64
        cfg = EngineConfig(policy="full", n_cells=cells, max_tokens=cells, n_threads=args.threads,
                           cache_type="q4_0" if args.mode == "q4_0" else "f16")
    elif args.mode == "kvmem":
        cfg = EngineConfig(kv_mem=args.kv_mem, n_threads=args.threads)
        if args.kv_mem_frac:
            cfg.kv_mem = kv_mem_for(meta, args.tokens, args.kv_mem_frac, cfg)
    else:
        policy, _, settings = args.mode.partition(":")
        cfg = EngineConfig(policy=policy, kv_budget=args.budget, n_threads=args.threads)
        apply_settings(cfg, [p for p in settings.split("+") if p])
    eng = Engine(path, cfg, model=model)
    first = [0.0, 0]  # the first plan's seconds (it loads the policy's compiled kernels), tokens read by then

    def progress(*_: object) -> None:
        if not first[1] and eng.stats.compressions:
            first[:] = [eng.stats.compress_seconds, eng.n_past]

    # per compression: seconds, tokens read, tokens held before it (what it scores) and after it
    plans: list[tuple[float, int, float, float]] = []
    compress = eng._compress

    def timed_compress(**kw: object) -> None:
        before = eng.regular_count() + _store_slots(eng)
        t = time.perf_counter()
        compress(**kw)
        plans.append((time.perf_counter() - t, eng.n_past, before, eng.regular_count() + _store_slots(eng)))

    eng._compress = timed_compress  # type: ignore[method-assign]

    t0 = time.perf_counter()
    eng.feed(ids, progress=progress)
    prefill = time.perf_counter() - t0
    st = eng.refresh_stats()
    geo = eng.pgeo
    parts = eng.memory_parts()
    held = eng.regular_count() + _store_slots(eng)
    return dict(mode=args.mode, tokens=args.tokens, rss_model=rss_model,
                rss_peak=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                kv_held=int(eng.kv_memory()[0]), kv_mem=cfg.kv_mem, window_cache=parts["window_cache_bytes"],
                store_bytes=parts["store_bytes"],
                full_kv=full_cache_bytes(args.tokens, geo.n_layer, geo.n_head_kv, geo.head_dim_k, geo.head_dim_v),
                stock_kv=stock_kv_bytes(meta, args.tokens, cfg.chunk), tokens_held=round(held, 1),
                compressions=st.compressions, compress_s=round(st.compress_seconds, 3),
                probe_s=round(st.probe_seconds, 3),
                first_plan_s=round(first[0], 3), first_plan_at=first[1],
                plans=[[round(s, 4), n, round(b, 1), round(a, 1)] for s, n, b, a in plans],
                prefill_s=round(prefill, 3))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="2000,4000,8000")
    ap.add_argument("--modes", default="full,spindle")
    ap.add_argument("--budget", type=float, default=0.25)
    ap.add_argument("--kv-mem", type=int, default=40 * 2**20)
    ap.add_argument("--kv-mem-frac", type=float, default=None,
                    help="kvmem cap: this fraction of the stock cache's KV bytes at each length")
    ap.add_argument("--out", default=None, help="also write the rows as JSON to this file")
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
            cmd += ["--kv-mem-frac", str(args.kv_mem_frac)] if args.kv_mem_frac else []
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                print(f"{mode} at {n} tokens failed:\n{out.stderr[-2000:]}", file=sys.stderr)
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(r)
            if mode == "full":
                full = r
            target = f"{(full['rss_peak'] - full['full_kv'] / 2) / mib:7.0f}" if full and mode != "full" else "      -"
            per_read = 1e3 * r["compress_s"] / n
            per_held = 1e3 * r["compress_s"] / max(r["tokens_held"], 1)
            later = 1e3 * (r["compress_s"] - r["first_plan_s"]) / max(n - r["first_plan_at"], 1)
            # one compression's seconds per 1,000 tokens held when it starts (median over the read's
            # plans, the first one left out: it loads the policy's compiled kernels)
            each = [1e6 * p[0] / max(p[2], 1) for p in r.get("plans", [])[1:]]
            per_plan = f"{statistics.median(each):.2f}" if each else "-"
            print(f"{n:6d} {mode:9s} model {r['rss_model'] / mib:6.0f} MiB  peak {r['rss_peak'] / mib:6.0f} MiB"
                  f"  (target {target})  KV held {r['kv_held'] / mib:6.1f} MiB  full KV {r['full_kv'] / mib:6.1f} MiB"
                  f"  compress {r['compress_s']:6.2f} s in {r['compressions']}  prefill {r['prefill_s']:6.1f} s"
                  f"  ({per_read:.2f} ms/token read, {per_held:.2f} ms/token held of {r['tokens_held']:.0f};"
                  f" first plan {r['first_plan_s']:.2f} s, then {later:.2f} ms/token read;"
                  f" one plan {per_plan} ms per 1K tokens held)",
                  flush=True)
            if args.out:
                Path(args.out).write_text(json.dumps(rows, indent=1))
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
