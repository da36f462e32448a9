"""Reading a long document in bounded KV memory vs the full cache (issue 6 figures).

For one document (pydoc text with a pass key, default 7,000 tokens) this measures, each
mode in its own process so that peak RSS is its own:

* ``kvmem``: ``EngineConfig(kv_mem=...)`` (default: memory for 1,500 uncompressed tokens);
* ``full``: the full f16 cache sized for the document (stock behaviour).

Reported per mode (median over ``--reps`` for times): ingestion seconds and tokens/s,
peak KV bytes llama.cpp held (regular allocation + store buffers, sampled after every
chunk), peak RSS, whether the pass key was answered, the session file size (spindle's
/save) and llama.cpp's own per-sequence state size (what a stock state save writes).

    .venv/bin/python scripts/bench_long_document.py --tokens 7000 --reps 3 [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time


def worker(args: argparse.Namespace) -> dict:
    import numpy as np

    from spindle_local.eval.needle import NeedleBuilder, key_found, random_key
    from spindle_local.eval.runner import greedy_answer
    from spindle_local.eval.texts import pydoc_text
    from spindle_local.runtime import session
    from spindle_local.runtime.engine import Engine, EngineConfig
    from spindle_local.runtime.gguf_meta import read_meta
    from spindle_local.runtime.lowlevel import LlamaModel
    from spindle_local.runtime.model_files import resolve_model

    path = resolve_model(args.model)
    meta = read_meta(path)
    model = LlamaModel(str(path))
    if args.mode == "full":
        cells = args.tokens + 64
        cfg = EngineConfig(policy="full", n_cells=cells, max_tokens=cells, n_threads=args.threads)
    else:
        cfg = EngineConfig(kv_mem=args.kv_mem_tokens * meta.kv_bytes_per_token_f16, n_threads=args.threads)
    eng = Engine(path, cfg, model=model)
    builder = NeedleBuilder(lambda t: model.tokenize(t, add_special=False), model.token_to_piece, pydoc_text())
    prompt = builder.build(args.tokens, args.depth, random_key(np.random.default_rng(args.seed)))
    peak = [0]

    def sample(*_: object) -> None:
        peak[0] = max(peak[0], eng.kv_memory()[0])

    times = []
    for _ in range(args.reps):
        eng.reset()
        t0 = time.perf_counter()
        eng.feed(prompt.tokens, progress=sample)
        times.append(time.perf_counter() - t0)
    stats = eng.refresh_stats()
    import llama_cpp.llama_cpp as C

    state_bytes = int(C.llama_state_seq_get_size(eng.ctx.ctx, 0))
    with tempfile.TemporaryDirectory() as d:
        session_bytes = session.save(os.path.join(d, "s.spl"), eng, messages=[], system_prompt=None,
                                     model_path=path)
    found = key_found(greedy_answer(eng, prompt.tokens), prompt.key)
    sample()
    return {
        "mode": args.mode,
        "tokens": len(prompt.tokens),
        "kv_mem": cfg.kv_mem,
        "ingest_seconds": statistics.median(times),
        "ingest_seconds_all": times,
        "ingest_tps": len(prompt.tokens) / statistics.median(times),
        "compressions": stats.compressions,
        "compress_seconds": stats.compress_seconds,
        "peak_kv_bytes": peak[0],
        "kv_bytes_end": stats.kv_bytes,
        "full_cache_bytes": stats.full_bytes,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "llama_state_bytes": state_bytes,
        "session_file_bytes": session_bytes,
        "pass_key_found": bool(found),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--tokens", type=int, default=7000)
    ap.add_argument("--kv-mem-tokens", type=int, default=1500, help="KV memory cap in uncompressed tokens")
    ap.add_argument("--depth", type=float, default=0.97)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--mode", choices=["kvmem", "full"], default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode:
        print(json.dumps(worker(args)))
        return
    out = {}
    for mode in ("full", "kvmem"):
        cmd = [sys.executable, __file__, "--mode", mode, "--tokens", str(args.tokens), "--depth", str(args.depth),
               "--kv-mem-tokens", str(args.kv_mem_tokens), "--seed", str(args.seed), "--reps", str(args.reps)]
        if args.model:
            cmd += ["--model", args.model]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"{mode} worker failed:\n{r.stderr[-2000:]}")
        out[mode] = json.loads(r.stdout.strip().splitlines()[-1])
    f, k = out["full"], out["kvmem"]
    out["ratios"] = {
        "peak_kv_bytes": k["peak_kv_bytes"] / f["peak_kv_bytes"],
        "peak_rss_bytes": k["peak_rss_bytes"] / f["peak_rss_bytes"],
        "ingest_seconds": k["ingest_seconds"] / f["ingest_seconds"],
        "session_vs_full_state": k["session_file_bytes"] / f["llama_state_bytes"],
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
