#!/usr/bin/env python
"""Policy tuning harness: KLD and needle for policies with non-default PolicyConfig settings.

Usage examples (always one thread: the machine is shared):

    python scripts/tune_policy.py kld --policies snapkv pyramidkv spindle \
        --budgets 0.4 0.25 0.15 --offsets 0 20000 --context 2000
    python scripts/tune_policy.py kld --policies spindle --opts '{"query_masks": "union"}'
    python scripts/tune_policy.py needle --policies spindle --budgets 0.25 --lengths 2000,4000

``--offsets`` are token offsets into the pydoc corpus (0 is what ``eval kld`` reads).
Full-cache logits are memoised under /tmp/spindle_tune (per model, offset, lengths), so
each configuration costs one compressed run. Prints one JSON line per run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("SPINDLE_THREADS", "1")

import numpy as np  # noqa: E402

CACHE = Path("/tmp/spindle_tune")


def _model_path() -> str:
    from spindle_local.runtime.loader import load_llama_cpp
    from spindle_local.runtime.model_files import resolve_model

    path = resolve_model(None, quiet=True)
    load_llama_cpp()
    return str(path)


def _tokens(model, text: str) -> list[int]:
    CACHE.mkdir(exist_ok=True)
    f = CACHE / f"tokens_{hashlib.sha1(text.encode()).hexdigest()[:12]}.npy"
    if f.exists():
        return np.load(f).tolist()
    toks = model.tokenize(text, add_special=True)
    np.save(f, np.asarray(toks, dtype=np.int32))
    return toks


ENGINE_FIELDS = ("window", "sinks", "codebook_layers", "theta_k", "theta_v", "recent", "chunk", "decode_slack",
                 "lookahead", "eager_compress", "lazy_plans")


def _engine_config(policy: str, budget: float, opts: dict, threads: int = 1, engine_kw: dict | None = None):
    """EngineConfig for ``opts``: fields the engine owns go to it, the rest to policy_options."""
    from spindle_local.runtime.engine import EngineConfig

    kw = dict(engine_kw or {})
    po = {}
    for k, v in opts.items():
        (kw if k in ENGINE_FIELDS else po)[k] = v
    return EngineConfig(policy=policy, kv_budget=budget, n_threads=int(os.environ.get("TUNE_THREADS", threads)),
                        policy_options=po, **kw)


def kld_run(model_path: str, model, toks: list[int], *, offset: int, context: int, continuation: int,
            policy: str, budget: float, opts: dict, threads: int = 1, engine_kw: dict | None = None,
            engine_cls=None) -> dict:
    """One compressed run scored against memoised full-cache logits (same tokens)."""
    from spindle_local.eval.kld import compare_logits
    from spindle_local.runtime.engine import Engine, EngineConfig

    engine_cls = engine_cls or Engine
    bos = toks[:1]
    seq = bos + toks[1 + offset: 1 + offset + context - 1 + continuation] if offset else toks[: context + continuation]
    ctx_toks, cont = seq[:context], seq[context:context + continuation]
    cells = context + continuation + 16

    def score(eng) -> np.ndarray:
        last = eng.feed(ctx_toks)
        rows = [last[None, :]]
        if continuation > 1:
            rows.append(eng.feed(cont[:-1], all_logits=True))
        return np.concatenate(rows)

    CACHE.mkdir(exist_ok=True)
    key = hashlib.sha1(f"{model_path}|{seq[:8]}|{offset}|{context}|{continuation}".encode()).hexdigest()[:16]
    f = CACHE / f"full_{key}.npy"
    if f.exists():
        full_logits = np.load(f)
    else:
        eng = Engine(model_path, EngineConfig(policy="full", n_cells=cells, max_tokens=cells, n_threads=threads),
                     model=model)
        try:
            full_logits = score(eng)
        finally:
            eng.ctx.close()
        np.save(f, full_logits)
    cfg = _engine_config(policy, budget, opts, threads, engine_kw)
    t0 = time.perf_counter()
    eng = engine_cls(model_path, cfg, model=model)
    try:
        comp = score(eng)
        s = eng.refresh_stats()
        report = getattr(eng.policy, "last_report", [])
    finally:
        eng.ctx.close()
    res = compare_logits(full_logits, comp, np.asarray(cont))
    roles = [r["role"] for r in report]
    return {"policy": policy, "budget": budget, "opts": opts, "offset": offset, "context": context,
            "mean_kld": round(res.mean_kld, 4), "top1": round(res.top1_agreement, 4),
            "reserve_ratio": round(s.reserve_ratio, 4), "compressions": s.compressions,
            "codebook_layers": [r["layer"] for r in report if r["role"] != "evict"],
            "n_roles": len(roles), "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    k = sub.add_parser("kld")
    k.add_argument("--policies", nargs="+", default=["snapkv", "pyramidkv", "spindle"])
    k.add_argument("--budgets", type=float, nargs="+", default=[0.25])
    k.add_argument("--offsets", type=int, nargs="+", default=[0])
    k.add_argument("--context", type=int, default=2000)
    k.add_argument("--continuation", type=int, default=128)
    k.add_argument("--opts", default="{}", help="JSON PolicyConfig fields (applied to every policy)")
    k.add_argument("--configs", default=None,
                   help="JSON list of {name, policy, opts} run instead of --policies/--opts")
    n = sub.add_parser("needle")
    n.add_argument("--policies", nargs="+", default=["snapkv", "pyramidkv", "spindle"])
    n.add_argument("--budgets", type=float, nargs="+", default=[0.25])
    n.add_argument("--lengths", default="2000,4000")
    n.add_argument("--depths", default="0.1,0.5,0.9")
    n.add_argument("--samples", type=int, default=2)
    n.add_argument("--seed", type=int, default=1)
    n.add_argument("--opts", default="{}")
    n.add_argument("--configs", default=None)
    args = ap.parse_args()

    from spindle_local.eval.texts import pydoc_text
    from spindle_local.runtime.lowlevel import LlamaModel

    mp = _model_path()
    if args.configs:
        configs = json.loads(args.configs)
    else:
        configs = [{"name": p, "policy": p, "opts": json.loads(args.opts)} for p in args.policies]
    text = pydoc_text()
    if args.cmd == "kld":
        model = LlamaModel(mp)
        toks = _tokens(model, text)
        for b in args.budgets:
            for c in configs:
                for off in args.offsets:
                    r = kld_run(mp, model, toks, offset=off, context=args.context,
                                continuation=args.continuation, policy=c["policy"], budget=b, opts=c["opts"])
                    r["name"] = c.get("name", c["policy"])
                    print(json.dumps(r), flush=True)
    else:
        from spindle_local.eval.needle import run_needle
        from spindle_local.runtime.engine import EngineConfig

        memo_f = CACHE / f"needle_full_{args.seed}.json"
        CACHE.mkdir(exist_ok=True)
        memo = {}
        if memo_f.exists():
            memo = {tuple(json.loads(k)): v for k, v in json.loads(memo_f.read_text()).items()}
        lengths = [int(x) for x in args.lengths.split(",")]
        depths = [float(x) for x in args.depths.split(",")]
        for b in args.budgets:
            for c in configs:
                t0 = time.perf_counter()
                cfg = _engine_config(c["policy"], b, c["opts"])
                r = run_needle(mp, lengths=lengths, depths=depths, samples=args.samples, seed=args.seed,
                               engine_config=cfg, haystack=text, full_results=memo)
                memo_f.write_text(json.dumps({json.dumps(list(k)): v for k, v in memo.items()}))
                out = {"name": c.get("name", c["policy"]), "budget": b,
                       "seconds": round(time.perf_counter() - t0, 1)}
                out.update({k2: r[k2] for k2 in r if k2 not in ("cells",)})
                out["misses"] = [f"{c['length']}:{c['depth']}" for c in r["cells"]
                                 for _ in range(max(0, c["correct_full"] - c["correct"]))]
                print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
