#!/usr/bin/env python3
"""Decode speed with an empty spindle store vs stock llama.cpp, and store bytes per token.

Each library runs in its own process (``LLAMA_CPP_LIB_PATH`` picks the libllama that
llama-cpp-python loads): prefill the same ~1500-token prompt, then time greedy one-token
decodes; the median over several runs is reported. On the patched library a store is
installed and cleared first, so the decode graphs go through the (empty) store hooks.
It also prints the bytes per token of a raw-row store vs the regular f16 cache.

    python scripts/bench_empty_store.py --stock-lib /path/to/stock/lib [--patched-lib DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def _prompt_tokens(model, n: int) -> list[int]:
    from pydoc_data.topics import topics

    text = "\n".join(topics[k] for k in sorted(topics))
    return model.tokenize(text)[:n]


def worker(args: argparse.Namespace) -> None:
    import numpy as np

    from spindle_local.runtime.lowlevel import LlamaContext, LlamaModel
    from spindle_local.runtime.model_files import default_model_path

    model = LlamaModel(args.model or default_model_path())
    prompt = _prompt_tokens(model, args.prompt_tokens)
    speeds = []
    info: dict[str, object] = {}
    for _ in range(args.runs):
        with LlamaContext(model, n_ctx=args.n_ctx, n_batch=512, n_threads=args.threads, flash_attn=args.flash_attn) as ctx:
            ctx.decode(prompt)
            if args.empty_store:
                from spindle_local.runtime import native

                # install one slot in layer 0 and clear it: the store exists, every layer is empty
                k, v, pos = ctx.read_layer_kv(0)
                from spindle_local.policy.plan import HeadStore, LayerStore

                g = ctx.geometry().layers[0].group_size
                heads = [HeadStore(positions=pos[:1], qmask=np.ones((g, 1), bool), k_raw=k[:1, h], v_raw=v[:1, h])
                         for h in range(k.shape[1])]
                ctx.store_set(0, LayerStore(layer=0, heads=heads))
                ctx.store_clear()
                info["patched"] = native.is_patched()
            tok = int(ctx.logits().argmax())
            t0 = time.perf_counter()
            for _ in range(args.decode_tokens):
                ctx.decode([tok])
                tok = int(ctx.logits().argmax())
            speeds.append(args.decode_tokens / (time.perf_counter() - t0))
    info["tok_s"] = speeds
    print(json.dumps(info))


def bytes_per_token(args: argparse.Namespace) -> dict[str, float]:
    """Store (raw rows, all query heads visible) vs regular cache bytes per token, measured."""
    from spindle_local.runtime.lowlevel import LlamaContext, LlamaModel
    from spindle_local.runtime.model_files import default_model_path

    model = LlamaModel(args.model or default_model_path())
    prompt = _prompt_tokens(model, 600)
    with LlamaContext(model, n_ctx=1024, n_batch=512) as ctx:
        ctx.decode(prompt)
        used0, alloc = ctx.cache_bytes()
        n0 = ctx.kv_used()
        ctx.move_to_store(0, 500)
        used1, _ = ctx.cache_bytes()
        store = ctx.store_bytes()
    return {
        "cache_bytes_per_token": used0 / n0,
        "store_raw_bytes_per_token": store / 500,
        "cache_freed_bytes": used0 - used1,
        "cache_alloc_bytes": alloc,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stock-lib", help="directory with the stock libllama.so")
    ap.add_argument("--patched-lib", help="directory with the patched libllama.so (default: the installed one)")
    ap.add_argument("--model", help="GGUF (default: SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--prompt-tokens", type=int, default=1500)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--n-ctx", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--flash-attn", action="store_true")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--empty-store", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return

    print(f"config: prompt={args.prompt_tokens} decode={args.decode_tokens} runs={args.runs} "
          f"n_ctx={args.n_ctx} threads={args.threads} flash_attn={args.flash_attn}")
    common = ["--prompt-tokens", str(args.prompt_tokens), "--decode-tokens", str(args.decode_tokens),
              "--runs", str(args.runs), "--n-ctx", str(args.n_ctx), "--threads", str(args.threads)]
    if args.model:
        common += ["--model", args.model]
    if args.flash_attn:
        common.append("--flash-attn")
    runs = [("patched, empty store", args.patched_lib, ["--empty-store"])]
    if args.stock_lib:
        runs.append(("stock", args.stock_lib, []))
    for label, lib, extra in runs:
        env = dict(os.environ)
        if lib:
            env["LLAMA_CPP_LIB_PATH"] = lib
        else:
            env.pop("LLAMA_CPP_LIB_PATH", None)
        out = subprocess.run([sys.executable, __file__, "--worker", *common, *extra], env=env,
                             capture_output=True, text=True, check=True)
        res = json.loads(out.stdout.strip().splitlines()[-1])
        speeds = res["tok_s"]
        print(f"{label:22s} decode tok/s median {statistics.median(speeds):7.1f}  runs {[round(s, 1) for s in speeds]}")
    env = dict(os.environ)
    if args.patched_lib:
        env["LLAMA_CPP_LIB_PATH"] = args.patched_lib
    code = "import json,sys; sys.argv=['x']; import runpy; m=runpy.run_path(%r); " % __file__
    code += "import argparse; print(json.dumps(m['bytes_per_token'](argparse.Namespace(model=%r))))" % (args.model,)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    print("bytes:", out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
