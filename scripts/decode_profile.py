#!/usr/bin/env python
"""Decode time per token after a long prompt, for engine/policy variants (A/B in one process).

Reads the first --context tokens of the default text with each configuration (JSON
EngineConfig overrides; `policy_options` for PolicyConfig fields), then times --gen
greedy steps. Configurations share the loaded model and alternate over --reps rounds.
Unlike `spindle-local eval speed` there is no stock run and no RSS (one process): this is
for finding where a configuration's decode time goes (codebook layers, store size).

    .venv/bin/python scripts/decode_profile.py --context 6000 '{}' '{"codebook_layers": 0}' \\
        '{"policy": "full", "n_cells": 1700, "context": 1500}'

A `"context"` key in a configuration overrides --context for it (e.g. a full cache of
the store's size).
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import numpy as np  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=6000)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--budget", type=float, default=0.25)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=2, help="alternating rounds over the configurations")
    ap.add_argument("configs", nargs="+", help="JSON EngineConfig overrides, one per configuration")
    args = ap.parse_args()

    from spindle_local.eval.texts import load_text
    from spindle_local.runtime.engine import Engine, EngineConfig
    from spindle_local.runtime.loader import load_llama_cpp
    from spindle_local.runtime.lowlevel import LlamaModel
    from spindle_local.runtime.model_files import resolve_model

    path = str(resolve_model(None, quiet=True))
    load_llama_cpp()
    model = LlamaModel(path)
    text_tokens = model.tokenize(load_text(None), add_special=False)
    for rep in range(args.reps):
        for spec in args.configs:
            opts = json.loads(spec)
            n = int(opts.pop("context", args.context))
            cfg = EngineConfig(**{"policy": "spindle", "kv_budget": args.budget, "n_threads": args.threads, **opts})
            eng = Engine(path, cfg, model=model)
            t0 = time.perf_counter()
            logits = eng.feed(text_tokens[:n])
            prefill = time.perf_counter() - t0
            t0 = time.perf_counter()
            for _ in range(args.gen):
                logits = eng.step(int(np.argmax(logits)))
            decode = time.perf_counter() - t0
            s = eng.refresh_stats()
            eng.ctx.close()  # the model is shared by every configuration
            print(json.dumps({"rep": rep, "config": json.loads(spec), "context": n,
                              "prefill_tps": round(n / prefill, 1),
                              "decode_ms_per_token": round(1000 * decode / args.gen, 2),
                              "compress_seconds": round(s.compress_seconds, 2),
                              "reserve_ratio": round(s.reserve_ratio, 3)}), flush=True)


if __name__ == "__main__":
    main()
