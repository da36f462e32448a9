"""Speed and memory: prefill / decode tokens per second and peak RSS, against stock llama.cpp.

Every measurement runs in its own process (so peak RSS means something), and the
stock and spindle-local runs alternate within one invocation: ``reps`` rounds, each
measuring every configuration of a grid once (:func:`measure_speed`); we report
medians. "Stock" is the unpatched llama-cpp-python library when one has been built
(``spindle-local setup --stock``), driven by the same decoding loop; otherwise it is our
library with no compression (the patch leaves the graph exactly stock while the store is
empty) and ``stock_library`` in the result says so.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from spindle_local.errors import SpindleError


def _worker(args: dict) -> dict:
    """Runs inside the child process: one measurement, printed as JSON."""
    import numpy as np

    from spindle_local.eval.texts import load_text, prefix_tokens
    from spindle_local.runtime.lowlevel import LlamaContext, LlamaModel

    if args["mode"] == "stock":
        model = LlamaModel(args["model"])
    else:
        from spindle_local.runtime.config import EngineConfig

        model = EngineConfig(**args["engine"]).load_model(args["model"])
    toks = prefix_tokens(lambda t: model.tokenize(t, add_special=False), load_text(args.get("text")), args["context"])
    if len(toks) < args["context"]:
        raise SpindleError(f"the text has only {len(toks)} tokens, fewer than --context {args['context']}")
    gen = args["gen"]
    out: dict = {"mode": args["mode"]}
    if args["mode"] == "stock":
        ctx = LlamaContext(model, n_ctx=args["context"] + gen + 16, n_batch=512, n_ubatch=512,
                           n_threads=args.get("threads"), flash_attn=args["flash_attn"],
                           type_k=args.get("cache_type", "f16"), type_v=args.get("cache_type", "f16"))
        t0 = time.perf_counter()
        ctx.decode(toks)
        out["prefill_seconds"] = time.perf_counter() - t0
        logits = ctx.logits()
        t0 = time.perf_counter()
        for _ in range(gen):
            ctx.decode([int(np.argmax(logits))])
            logits = ctx.logits()
        out["decode_seconds"] = time.perf_counter() - t0
        out["compress_seconds"] = out["probe_seconds"] = 0.0
        ctx.close()
    else:
        from spindle_local.runtime.engine import Engine, EngineConfig

        cfg = EngineConfig(**args["engine"])
        eng = Engine(args["model"], cfg, model=model)
        t0 = time.perf_counter()
        logits = eng.feed(toks)
        out["prefill_seconds"] = time.perf_counter() - t0
        prefill_compress = eng.stats.compress_seconds
        t0 = time.perf_counter()
        for _ in range(gen):
            logits = eng.step(int(np.argmax(logits)))
        out["decode_seconds"] = time.perf_counter() - t0
        s = eng.refresh_stats()
        out["compress_seconds"] = prefill_compress  # the look-ahead probes included
        out["probe_seconds"] = s.probe_seconds
        out["compress_seconds_decode"] = s.compress_seconds - prefill_compress
        out["reserve_ratio"] = s.reserve_ratio
        out["kv_bytes"] = s.kv_bytes
        out["kv_bytes_full"] = s.full_bytes
        eng.ctx.close()
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def stock_library_dir() -> Path | None:
    """Folder with an unpatched libllama built by ``spindle-local setup --stock``, if any."""
    from spindle_local.runtime.build import stock_lib_dir

    d = stock_lib_dir()
    return d if d is not None and (d / "libllama.so").exists() else None


def _run_child(args: dict, env_extra: dict[str, str] | None = None) -> dict:
    env = dict(os.environ)
    env.update(env_extra or {})
    proc = subprocess.run([sys.executable, "-m", "spindle_local.eval.speed", json.dumps(args)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise SpindleError(f"speed measurement ({args['mode']}) failed: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_speed(*, model: str, context: int, gen: int, engines: list[dict], reps: int = 3,
                  text: str | None = None, progress=None) -> list[dict]:
    """Median prefill/decode speed of each configuration in ``engines`` against stock llama.cpp.

    The measurements run in ``reps`` rounds. A round measures every configuration in turn,
    each one preceded by stock llama.cpp when no configuration before it in the round had
    the same threads and flash-attention setting. Why rounds: a shared machine's speed
    drifts (other work, clocks), and generation speed on it varies by a third from one
    process to the next. Repeating one configuration ``reps`` times before the next puts
    that drift between the rows of a grid; rounds spread it over every row alike, so the
    rows (and each row's ratio to stock) compare like with like. Stock is measured once a
    round per setting and shared by the rows with that setting (``stock_reused`` on all but
    the first).
    """
    stock_dir = stock_library_dir()
    common = dict(model=model, context=context, gen=gen, text=text)

    def setting(engine: dict) -> tuple:
        return engine.get("n_threads"), engine.get("flash_attn", True)

    stock: dict[tuple, list[dict]] = {setting(e): [] for e in engines}
    runs: list[list[dict]] = [[] for _ in engines]
    env = {"LLAMA_CPP_LIB_PATH": str(stock_dir)} if stock_dir else None
    for i in range(reps):
        seen: set[tuple] = set()
        for k, engine in enumerate(engines):
            threads, flash_attn = key = setting(engine)
            args = dict(common, engine=engine, threads=threads, flash_attn=flash_attn)
            if key not in seen:
                seen.add(key)
                stock[key].append(_run_child(dict(args, mode="stock"), env))
                if progress:
                    progress("stock", i)
            runs[k].append(_run_child(dict(args, mode="spindle")))
            if progress:
                progress("spindle", i)
    return [_summary(runs[k], stock[setting(e)], context=context, gen=gen, reps=reps, stock_dir=stock_dir,
                     reused=setting(e) in map(setting, engines[:k])) for k, e in enumerate(engines)]


def _summary(spindle: list[dict], stock: list[dict], *, context: int, gen: int, reps: int,
             stock_dir: Path | None, reused: bool) -> dict:
    """One configuration's medians over its runs and those of the stock runs it is compared with."""

    def med(runs: list[dict], key: str) -> float:
        return float(statistics.median(r[key] for r in runs))

    prefill_tps = context / med(spindle, "prefill_seconds")
    decode_tps = gen / med(spindle, "decode_seconds") if gen else 0.0
    prefill_tps_stock = context / med(stock, "prefill_seconds")
    decode_tps_stock = gen / med(stock, "decode_seconds") if gen else 0.0
    return {
        "context_tokens": context,
        "gen_tokens": gen,
        "reps": reps,
        "stock_library": str(stock_dir) if stock_dir else "patched library, empty store",
        "stock_reused": reused,
        "prefill_tps": prefill_tps,
        "decode_tps": decode_tps,
        "decode_tps_runs": [round(gen / r["decode_seconds"], 2) for r in spindle] if gen else [],
        "compress_seconds": med(spindle, "compress_seconds"),
        "compress_seconds_decode": med(spindle, "compress_seconds_decode"),
        "probe_seconds": med(spindle, "probe_seconds"),
        "prefill_seconds": med(spindle, "prefill_seconds"),
        "prefill_tps_stock": prefill_tps_stock,
        "decode_tps_stock": decode_tps_stock,
        "prefill_ratio": prefill_tps / prefill_tps_stock,
        "decode_ratio": decode_tps / decode_tps_stock if decode_tps_stock else 0.0,
        "compress_fraction_of_prefill": med(spindle, "compress_seconds") / med(spindle, "prefill_seconds"),
        "reserve_ratio": med(spindle, "reserve_ratio"),
        "peak_rss_bytes": int(med(spindle, "peak_rss_bytes")),
        "peak_rss_bytes_stock": int(med(stock, "peak_rss_bytes")),
    }


if __name__ == "__main__":  # the child-process entry point
    try:
        print(json.dumps(_worker(json.loads(sys.argv[1]))))
    except SpindleError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
