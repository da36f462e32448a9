#!/usr/bin/env python
"""Time policy planning on synthetic arrays with SmolLM2-135M shapes (30 layers, 9/3 heads, d=64).

Usage: .venv/bin/python scripts/bench_policy.py [--n 6000] [--budgets 0.4 0.25 0.15] [--policies ...]
                                                [--set salient.share=0.1 ...]
Prints the configuration, then per policy and budget the planning time, the bytes used
against the target, the layer roles and (spindle) how many layers were codebooked.
``--codebook-layers`` and ``--set`` are stage settings (``spindle-local policies`` lists
them), applied to the policies whose stages have them.
The first call of each kernel compiles or loads the numba cache; a warm-up plan on a
small context runs first so the figures are steady-state times.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

from spindle_local.policy import POLICY_NAMES, full_cache_bytes, layer_store_bytes, make_policy, preset
from spindle_local.policy.synthetic import SMOLLM2, make_layers


def stage_settings(name: str, pairs: dict[str, str]) -> dict[str, str]:
    """The settings of ``pairs`` whose stage ``name``'s preset has (codebook layers mean nothing to snapkv)."""
    if name == "full":
        return {}
    have = preset(name).settings()  # a stage's fields are listed only when the stage is on
    return {k: v for k, v in pairs.items() if "." not in k or k in have}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=6000, help="old tokens per layer")
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--recent", type=int, default=64, help="uncompressed recent tokens")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.4, 0.25, 0.15])
    ap.add_argument("--policies", nargs="+", default=list(POLICY_NAMES))
    ap.add_argument("--codebook-layers", default="auto", help="codebooks.layers: a number or 'auto'")
    ap.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                    help="a stage setting (repeatable), as `spindle-local ... --set`")
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    pairs = {"codebooks.layers": args.codebook_layers}
    for pair in args.settings:
        key, sep, value = pair.partition("=")
        if not sep:
            ap.error(f"--set expects KEY=VALUE, got {pair!r}")
        pairs[key.strip()] = value.strip()
    settings = {name: stage_settings(name, pairs) for name in args.policies}
    geo = SMOLLM2
    print(f"bench_policy: {geo}, n={args.n}, window={args.window}, recent={args.recent}")
    print(f"settings: {settings}")
    print(f"machine: {platform.processor() or platform.machine()}, cpus={os.cpu_count()}, "
          f"python {platform.python_version()}")
    warm = make_layers(geo, n=300, w=args.window, r=args.recent)
    for name in args.policies:
        make_policy(name, settings[name]).plan(warm, geo, full_cache_bytes(300, 30, 3, 64, 64) // 4)
    t0 = time.perf_counter()
    layers = make_layers(geo, n=args.n, w=args.window, r=args.recent)
    print(f"synthetic data: {time.perf_counter() - t0:.2f}s (not part of planning)")
    full = full_cache_bytes(args.n, geo.n_layer, geo.n_head_kv, geo.head_dim_k, geo.head_dim_v)
    print(f"{'policy':10s} {'budget':>6s} {'plan_s':>7s} {'bytes/target':>12s}  roles")
    for name in args.policies:
        for frac in args.budgets:
            target = int(full * frac)
            best = float("inf")
            for _ in range(args.repeat):
                pol = make_policy(name, settings[name])
                t = time.perf_counter()
                stores = pol.plan(layers, geo, target)
                best = min(best, time.perf_counter() - t)
            used = sum(layer_store_bytes(s, geo.head_dim_k, geo.head_dim_v) for s in stores)
            roles: dict[str, int] = {}
            for s in stores:
                roles[s.role] = roles.get(s.role, 0) + 1
            print(f"{name:10s} {frac:6.2f} {best:7.2f} {used / target:12.4f}  {roles}")


if __name__ == "__main__":
    main()
