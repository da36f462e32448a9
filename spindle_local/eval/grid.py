"""One evaluation over a grid of configurations in one process.

The model is loaded once per placement (``rpc``, ``gpu_layers``), the full cache's
results are computed once per reference setting and shared by every configuration
(:meth:`SharedModels.memo`), and each configuration's result becomes one row with its
provenance (:func:`result_row`), appended to a JSON-lines file when one is given.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

from spindle_local.errors import UsageError


class SharedModels:
    """Loaded models of one GGUF by placement, and the full-cache memos of a grid."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._models: dict[tuple, Any] = {}
        self._memos: dict[tuple, dict] = {}

    @staticmethod
    def placement(cfg) -> tuple:
        return tuple(cfg.rpc), cfg.gpu_layers

    def get(self, cfg):
        """The model placed as ``cfg`` says, loaded on first use."""
        key = self.placement(cfg)
        if key not in self._models:
            self._models[key] = cfg.load_model(self.path)
        return self._models[key]

    def memo(self, cfg) -> dict:
        """A dict for the full cache's results under ``cfg``'s reference settings (placement and
        flash attention: what the reference runs with), shared by the configurations that agree."""
        return self._memos.setdefault((*self.placement(cfg), cfg.flash_attn), {})

    def close(self) -> None:
        for m in self._models.values():
            m.close()
        self._models.clear()

    def __enter__(self) -> SharedModels:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _flat(cfg) -> dict[str, Any]:
    d = asdict(cfg)
    stages = d.pop("stages")
    d.update({f"stages.{k}": v for k, v in stages.items()})
    return d


def labels(cfgs: Sequence[Any]) -> list[str]:
    """A short name per configuration: policy @ budget, then the settings that vary in the grid."""
    flat = [_flat(c) for c in cfgs]
    keys = sorted({k for f in flat for k in f if k not in ("policy", "kv_budget")
                   and len({repr(g.get(k)) for g in flat}) > 1})
    out = []
    for c, f in zip(cfgs, flat):
        name = "full" if c.policy == "full" else f"{c.policy} @{c.kv_budget:g}"
        out.append(" ".join([name, *(f"{k.removeprefix('stages.')}={f.get(k)}" for k in keys)]))
    return out


def result_row(result: dict, cfg, label: str) -> dict:
    """``result`` with its configuration's label and :func:`~.provenance.provenance`."""
    from spindle_local.eval.provenance import provenance

    return {**result, "label": label, "provenance": provenance(cfg)}


def check_out(path: Path) -> None:
    """Fail in one line, before anything runs, when ``path`` cannot be appended to (its folder is made)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8"):
            pass
    except OSError as e:
        raise UsageError(f"cannot write --out {path}: {e.strerror or e}") from None


def append_row(path: Path, row: dict) -> None:
    """Append ``row`` as one JSON line."""
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(row, default=str) + "\n")
