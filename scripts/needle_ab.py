#!/usr/bin/env python
"""Engine/policy options A/B on chosen pass-key prompts of the bench grid.

Rebuilds the exact prompts `spindle-local bench --seed S --lengths 1500,3500,6000
--depths 0.1,0.5,0.9 --samples 2` draws, keeps the cells given, and answers them with
each configuration (EngineConfig fields as JSON; `policy_options` for PolicyConfig).
One JSON line per configuration: which prompts found their key.

    .venv/bin/python scripts/needle_ab.py --cells 3500:0.1,6000:0.1,6000:0.5 --budget 0.25 \\
        '{}' '{"policy_options": {"anchor_span": 0}}' '{"policy": "full", "n_cells": 6100}'
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import numpy as np  # noqa: E402

LENGTHS, DEPTHS, SAMPLES = (1500, 3500, 6000), (0.1, 0.5, 0.9), 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", default="3500:0.1,6000:0.1", help="length:depth,... of the grid")
    ap.add_argument("--budget", type=float, default=0.25)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="the bench's --seed (which keys are drawn)")
    ap.add_argument("configs", nargs="+", help="JSON EngineConfig overrides, one per configuration")
    args = ap.parse_args()

    from spindle_local.eval.needle import NeedleBuilder, key_found, random_key
    from spindle_local.eval.runner import greedy_answer
    from spindle_local.eval.texts import load_text
    from spindle_local.runtime.engine import Engine, EngineConfig
    from spindle_local.runtime.loader import load_llama_cpp
    from spindle_local.runtime.lowlevel import LlamaModel
    from spindle_local.runtime.model_files import resolve_model

    path = str(resolve_model(None, quiet=True))
    load_llama_cpp()
    model = LlamaModel(path)
    builder = NeedleBuilder(lambda t: model.tokenize(t, add_special=False), model.token_to_piece, load_text(None))
    rng = np.random.default_rng(args.seed)  # run_needle draws the keys cell by cell (length, then depth)
    keys = {(n, d): [random_key(rng) for _ in range(SAMPLES)] for n in LENGTHS for d in DEPTHS}
    cells = [(int(a), float(b)) for a, b in (c.split(":") for c in args.cells.split(","))]
    prompts = [builder.build(n, d, k) for n, d in cells for k in keys[(n, d)]]
    for spec in args.configs:
        opts = json.loads(spec)
        t0 = time.time()
        cfg = EngineConfig(**{"policy": "spindle", "kv_budget": args.budget, "n_threads": args.threads, **opts})
        eng = Engine(path, cfg, model=model)
        answers = [greedy_answer(eng, p.tokens) for p in prompts]
        eng.ctx.close()
        print(json.dumps({"budget": args.budget, "seed": args.seed, "config": opts,
                          "prompts": [f"{p.length}:{p.depth}:{p.key}" for p in prompts],
                          "found": [key_found(a, p.key) for a, p in zip(answers, prompts)],
                          "answers": answers, "seconds": round(time.time() - t0, 1)}), flush=True)
    model.close()


if __name__ == "__main__":
    main()
