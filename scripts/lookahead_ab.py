#!/usr/bin/env python
"""Look-ahead on/off on the depth-0.1 pass-key prompts of the 2026-11-30 bench grid.

Rebuilds the exact prompts `spindle-local bench --seed 0 --lengths 1500,3500,6000
--depths 0.1,0.5,0.9 --samples 2` uses for length 3,500 and 6,000 at depth 0.1 and
answers them with spindle at budgets 0.25 and 0.4, with and without the look-ahead
probe. Prints one JSON line per (budget, look-ahead). About 10 minutes at 2 threads.
"""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import numpy as np  # noqa: E402


def main() -> None:
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
    # run_needle draws the keys cell by cell (length, then depth), `samples` per cell
    rng = np.random.default_rng(0)
    keys = {(n, d): [random_key(rng) for _ in range(2)] for n in (1500, 3500, 6000) for d in (0.1, 0.5, 0.9)}
    prompts = [builder.build(n, 0.1, k) for n in (3500, 6000) for k in keys[(n, 0.1)]]
    for budget in (0.25, 0.4):
        for look in (True, False):
            eng = Engine(path, EngineConfig(policy="spindle", kv_budget=budget, n_threads=2, lookahead=look),
                         model=model)
            found = [key_found(greedy_answer(eng, p.tokens), p.key) for p in prompts]
            eng.ctx.close()
            print(json.dumps({"budget": budget, "lookahead": look, "found": found}), flush=True)


if __name__ == "__main__":
    main()
