"""The benchmark grid: every policy at every budget, plus llama.cpp's own KV types.

For each configuration we measure fidelity (KLD on a long text) and retrieval (a
pass-key grid on the same prompts as the full cache, under each retrieval protocol:
question in prompt, question later, and optionally the multi-question conversation;
see :mod:`.needle`), then write ``report.md`` with tables, needle heatmaps per
configuration and protocol, and a memory-vs-KLD chart. Results are also written as
``results.json`` so a report can be re-rendered without re-running.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

POLICIES = ("streaming", "snapkv", "pyramidkv", "spindle")
BUDGETS = (0.4, 0.25, 0.15)
CACHE_TYPES = ("f16", "q8_0", "q4_0")
PROTOCOLS = ("in-prompt", "later")
# Where a row of results.json keeps each protocol's pass-key grid ("needle": older reports had only this one).
NEEDLE_KEYS = {"in-prompt": "needle", "later": "needle_later", "multi": "needle_multi"}
PROTOCOL_TITLES = {"in-prompt": "question in prompt", "later": "question later", "multi": "multi-question"}


@dataclass
class BenchGrid:
    policies: tuple[str, ...] = POLICIES
    budgets: tuple[float, ...] = BUDGETS
    cache_types: tuple[str, ...] = CACHE_TYPES
    kld_context: int = 4000
    kld_continuation: int = 256
    lengths: tuple[int, ...] = (1000, 3000, 6000)
    depths: tuple[float, ...] = (0.1, 0.5, 0.9)
    samples: int = 2
    seed: int = 0
    protocols: tuple[str, ...] = PROTOCOLS
    extra: dict = field(default_factory=dict)

    def configs(self) -> list[tuple[str, float, str]]:
        """(policy, budget, cache_type) in run order: baselines first."""
        out = [("full", 1.0, ct) for ct in self.cache_types]
        out += [(p, b, "f16") for b in self.budgets for p in self.policies]
        return out


def run_bench(model: str, out_dir: Path, grid: BenchGrid, engine_config, text: str,
              progress: Callable[[str], None] | None = None) -> dict:
    """Run the grid, write results.json, report.md and the PNG plots into ``out_dir``.

    The model is loaded once, the full cache's KLD logits and pass-key answers computed
    once for the whole grid; every row records its :func:`~.provenance.provenance`.
    """
    from spindle_local.eval.kld import reference, run_kld
    from spindle_local.eval.needle import run_needle
    from spindle_local.eval.provenance import provenance

    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    results: list[dict] = []
    full_memo: dict = {}
    loaded = engine_config.load_model(model)
    try:
        ref = reference(model, loaded, text=text, context=grid.kld_context, continuation=grid.kld_continuation,
                        engine_config=engine_config)
        for policy, budget, ctype in grid.configs():
            cfg = replace(engine_config, policy=policy, kv_budget=budget, cache_type=ctype)
            label = f"{policy} {ctype}" if policy == "full" else f"{policy} @{budget}"
            if progress:
                progress(f"{label}: kld")
            kld = run_kld(model, text=text, context=grid.kld_context, continuation=grid.kld_continuation,
                          engine_config=cfg, cache_type=ctype, model=loaded, ref=ref)
            row = {"label": label, "policy": policy, "kv_budget": budget, "cache_type": ctype, "kld": kld}
            for protocol in grid.protocols:
                if progress:
                    progress(f"{label}: needle {protocol}")
                row[NEEDLE_KEYS[protocol]] = run_needle(
                    model, lengths=grid.lengths, depths=grid.depths, samples=grid.samples, seed=grid.seed,
                    engine_config=cfg, haystack=text, full_results=full_memo, protocol=protocol, model=loaded)
            row["provenance"] = provenance(cfg)
            results.append(row)
            (out_dir / "results.json").write_text(json.dumps(
                {"model": model, "grid": grid.__dict__, "started": started, "results": results}, indent=1,
                default=str))
    finally:
        loaded.close()
    meta = {"model": model, "grid": grid.__dict__, "started": started, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
            "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, {_cores()} cores",
            "engine": {k: v for k, v in engine_config.__dict__.items() if k not in ("policy", "kv_budget")}}
    doc = {**meta, "results": results}
    (out_dir / "results.json").write_text(json.dumps(doc, indent=1, default=str))
    write_report(doc, out_dir)
    return doc


def _cores() -> int:
    import os

    return os.cpu_count() or 1


def write_report(doc: dict, out_dir: Path) -> Path:
    """Render report.md and the plots from a results document."""
    results = doc["results"]
    plots = _plots(results, out_dir)
    lines = [f"# spindle-local benchmark", "",
             f"Model: `{doc['model']}`  ", f"Machine: {doc.get('machine', '?')}  ",
             f"Run: {doc['started']} – {doc.get('finished', '…')}  ",
             f"Engine settings: `{json.dumps(doc.get('engine', {}), default=str)}`  ",
             f"Grid: `{json.dumps(doc['grid'], default=str)}`", "",
             "## Fidelity and memory (KLD against the full f16 cache)", "",
             "| configuration | reserve ratio | mean KLD | p99 KLD | top-1 agree | ppl | ppl full |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        k = r["kld"]
        lines.append(f"| {r['label']} | {k['reserve_ratio']:.3f} | {k['mean_kld']:.4f} | {k['p99_kld']:.3f} | "
                     f"{k['top1_agreement']:.3f} | {k['ppl']:.3f} | {k['ppl_full']:.3f} |")
    protocols = [p for p, key in NEEDLE_KEYS.items() if any(key in r for r in results)]
    lines += ["", "## Pass-key retrieval (same prompts as the full cache)", "",
              "Relative accuracy = keys found by both / keys the full cache finds. *Question in prompt*: "
              "haystack and question are one prompt. *Question later*: the same tokens, the haystack read "
              "(and compressed) as one prompt, the question fed afterwards. *Multi-question*: one named "
              "needle per depth in one document, asked in turn in one conversation without re-reading. "
              "Δ log p: mean teacher-forced log-probability of the key, minus the full cache's.", ""]
    head = "| configuration | reserve ratio |"
    rule = "| --- | ---: |"
    for p in protocols:
        t = PROTOCOL_TITLES[p]
        head += f" {t}: accuracy | {t}: full | {t}: relative | {t}: Δ log p |"
        rule += " ---: | ---: | ---: | ---: |"
    lines += [head, rule]
    for r in results:
        grids = [r.get(NEEDLE_KEYS[p]) for p in protocols]
        if not any(grids):
            continue
        ratio = next(g["reserve_ratio"] for g in grids if g)
        line = f"| {r['label']} | {ratio:.3f} |"
        for g in grids:
            if g is None:
                line += " – | – | – | – |"
                continue
            d = g.get("logprob_delta")
            line += (f" {g['accuracy']:.3f} | {g['accuracy_full']:.3f} | {g['relative_accuracy']:.3f} | "
                     f"{'–' if d is None else f'{d:+.2f}'} |")
        lines.append(line)
    lines += [""]
    for title, path in plots:
        lines += [f"### {title}", "", f"![{title}]({path.name})", ""]
    report = out_dir / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def _plots(results: list[dict], out_dir: Path) -> list[tuple[str, Path]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made: list[tuple[str, Path]] = []
    # Memory vs KLD: one marker per configuration, one series per policy.
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[str, list[tuple[float, float]]] = {}
    for r in results:
        name = f"full {r['cache_type']}" if r["policy"] == "full" else r["policy"]
        series.setdefault(name, []).append((r["kld"]["reserve_ratio"], max(r["kld"]["mean_kld"], 1e-6)))
    for name, pts in series.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xlabel("reserve ratio (KV bytes / full f16 bytes)")
    ax.set_ylabel("mean KLD vs full cache (nats, log)")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Memory vs fidelity")
    fig.tight_layout()
    path = out_dir / "memory_vs_kld.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    made.append(("Memory vs KLD", path))
    # Needle heatmaps, one figure per protocol: rows = lengths, columns = depths.
    for protocol, key in NEEDLE_KEYS.items():
        made += _heatmaps(plt, results, key, PROTOCOL_TITLES[protocol], out_dir)
    return made


def _heatmaps(plt, results: list[dict], key: str, title: str, out_dir: Path) -> list[tuple[str, Path]]:
    made: list[tuple[str, Path]] = []
    needle_rows = [r for r in results if key in r]
    if needle_rows:
        lengths = sorted({c["length"] for c in needle_rows[0][key]["cells"]})
        depths = sorted({c["depth"] for c in needle_rows[0][key]["cells"]})
        ncols = min(4, len(needle_rows))
        nrows = (len(needle_rows) + ncols - 1) // ncols
        fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.6 * nrows), squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for ax, r in zip(axes.flat, needle_rows):
            grid = np.full((len(lengths), len(depths)), np.nan)
            for c in r[key]["cells"]:
                grid[lengths.index(c["length"]), depths.index(c["depth"])] = c["correct"] / max(c["n"], 1)
            ax.axis("on")
            ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=7)
            ax.set_yticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
            for i in range(len(lengths)):
                for j in range(len(depths)):
                    if not np.isnan(grid[i, j]):
                        ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7)
            ax.set_title(f"{r['label']} (rel {r[key]['relative_accuracy']:.2f})", fontsize=8)
            ax.set_xlabel("depth", fontsize=7)
            ax.set_ylabel("tokens", fontsize=7)
        fig.suptitle(f"Pass-key accuracy per cell (length × depth), {title}", fontsize=9)
        fig.tight_layout()
        path = out_dir / f"{key.replace('needle', 'needle_heatmaps')}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append((f"Needle heatmaps, {title}", path))
    return made
