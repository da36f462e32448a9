"""Named policies as compositions of :mod:`.stages`, and settings that change one stage field.

``--set stage.field=value`` changes a field (``--set salient.share=0.1``); ``--set
stage=kind`` swaps or drops a stage (``--set allocator=pyramid``, ``--set salient=off``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Callable

from .stages import (
    ALLOCATORS,
    Allocator,
    Codebooks,
    CopySpans,
    EvictedMass,
    FlatShares,
    GroupSelect,
    MassShares,
    PyramidShares,
    Recency,
    SalientRuns,
    WindowScorer,
    stage_help,
)


@dataclass
class Stages:
    """One policy: a scorer, boosters, an allocator, codebook roles, a GQA selector and the
    evicted mass (run in that order, see :mod:`.stages`). None: the stage is off."""

    scorer: WindowScorer | Recency
    allocator: Allocator
    selector: GroupSelect
    copy_spans: CopySpans | None = None
    salient: SalientRuns | None = None
    codebooks: Codebooks | None = None
    mass: EvictedMass | None = None

    def __post_init__(self) -> None:
        if self.codebooks is not None and not isinstance(self.scorer, WindowScorer):
            raise ValueError("codebook layers need the window scorer (scorer=window)")

    def settings(self) -> dict[str, Any]:
        """Every setting as ``{"stage": kind, "stage.field": value}`` (what results record)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            stage = getattr(self, f.name)
            out[f.name] = _kind_name(f.name, stage)
            if stage is not None:
                out.update({f"{f.name}.{k.name}": getattr(stage, k.name) for k in fields(stage)})
        return out


#: ``--set stage=kind``: the stage classes each stage slot takes ("off": none).
KINDS: dict[str, dict[str, type | None]] = {
    "scorer": {"window": WindowScorer, "recency": Recency},
    "allocator": dict(ALLOCATORS),
    "selector": {"group": GroupSelect},
    "copy_spans": {"on": CopySpans, "off": None},
    "salient": {"on": SalientRuns, "off": None},
    "codebooks": {"on": Codebooks, "off": None},
    "mass": {"on": EvictedMass, "off": None},
}


def _kind_name(slot: str, stage: object) -> str:
    for name, cls in KINDS[slot].items():
        if (cls is None and stage is None) or (cls is not None and type(stage) is cls):
            return name
    raise AssertionError(f"{slot}: {type(stage).__name__} is not a known kind")


PRESETS: dict[str, Callable[[], Stages]] = {
    # StreamingLLM: sinks plus the newest tokens, the same count in every layer
    "streaming": lambda: Stages(Recency(), FlatShares(), GroupSelect()),
    # SnapKV: window scores averaged over the GQA group, the same budget in every layer
    "snapkv": lambda: Stages(WindowScorer(), FlatShares(), GroupSelect()),
    # PyramidKV: SnapKV's scores with pyramid budgets
    "pyramidkv": lambda: Stages(WindowScorer(), PyramidShares(), GroupSelect()),
    # the default: measured on SmolLM2-135M, see docs/benchmarks.md ("How the defaults were chosen");
    # no codebook layers: they lost pass keys under both question protocols at equal KLD
    # (`--set codebooks=on` adds them back); the deep layers' kept slots stand for the tokens
    # evicted beside them: later questions keep more keys at the same KLD ("Slots that stand
    # for the tokens evicted beside them")
    "spindle": lambda: Stages(WindowScorer(value_weight=True), MassShares(), GroupSelect(),
                              CopySpans(), SalientRuns(), mass=EvictedMass()),
    # SpindleKV as published: pyramid budgets, per-query-head round-robin with own masks, codebooks
    "spindle-paper": lambda: Stages(WindowScorer(), PyramidShares(), GroupSelect(rule="union", masks="own"),
                                    codebooks=Codebooks()),
}


def preset(name: str) -> Stages:
    """A fresh copy of the preset called ``name``."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; valid names: full, {', '.join(PRESETS)}") from None


def setting_keys() -> dict[str, str]:
    """Every key ``--set`` accepts for a stage, with its help: ``stage`` and ``stage.field``."""
    out: dict[str, str] = {}
    for slot, kinds in KINDS.items():
        if len(kinds) > 1:
            out[slot] = "one of " + ", ".join(kinds)
        for cls in kinds.values():
            if cls is not None:
                for name, text in stage_help(cls).items():
                    out.setdefault(f"{slot}.{name}", text)
    return out


def parse_value(text: str, default: object) -> object:
    """``text`` as the type of ``default`` (a field's default); ValueError names what was expected."""
    low = text.strip().lower()
    if low in ("none", "null") and default is None:
        return None
    try:
        if isinstance(default, bool):
            if low in ("1", "true", "on", "yes"):
                return True
            if low in ("0", "false", "off", "no"):
                return False
            raise ValueError
        if isinstance(default, int) or default is None:
            try:
                return int(text)
            except ValueError:
                if default is None:
                    return float(text)
                raise
        if isinstance(default, float):
            return float(text)
        if isinstance(default, str) and text.strip().lstrip("-").isdigit():
            return int(text)  # fields such as codebooks.layers take a number or a word
    except ValueError:
        kind = "a number or none" if default is None else type(default).__name__
        raise ValueError(f"expected {kind}, got {text!r}") from None
    return text.strip()


def apply_settings(stages: Stages, settings: dict[str, object]) -> Stages:
    """``stages`` with ``settings`` applied: kinds (``"allocator": "pyramid"``) first, then fields
    (``"allocator.beta": 10``; strings are parsed as the field's type). ValueError on unknown keys."""
    kinds = {k: v for k, v in settings.items() if "." not in k}
    values = {k: v for k, v in settings.items() if "." in k}
    out = replace(stages)
    for slot, kind in kinds.items():
        if slot not in KINDS:
            raise ValueError(f"unknown stage {slot!r}; stages: {', '.join(KINDS)}")
        choice = str(kind).strip().lower()
        if choice not in KINDS[slot]:
            raise ValueError(f"{slot}={kind}: choose from {', '.join(KINDS[slot])}")
        cls = KINDS[slot][choice]
        current = getattr(out, slot)
        keep = cls is not None and type(current) is cls
        setattr(out, slot, current if keep else (cls() if cls is not None else None))
    for key, value in values.items():
        slot, _, name = key.partition(".")
        if slot not in KINDS:
            raise ValueError(f"unknown stage {slot!r} in {key!r}; stages: {', '.join(KINDS)}")
        stage = getattr(out, slot)
        if stage is None:
            raise ValueError(f"{key}: the {slot} stage is off in this policy (--set {slot}=on first)")
        known = {f.name: f for f in fields(stage)}
        if name not in known:
            raise ValueError(f"{key}: {type(stage).__name__} has no setting {name!r}"
                             + (f"; it has {', '.join(known)}" if known else ""))
        if isinstance(value, str):
            value = parse_value(value, getattr(stage, name) if getattr(stage, name) is not None
                                else known[name].default)
        setattr(out, slot, replace(stage, **{name: value}))
    Stages.__post_init__(out)
    return out
