"""The command-line option table, generated from :class:`~spindle_local.runtime.config.EngineConfig`.

Every field of EngineConfig with a ``flag`` in its metadata becomes an option of every
model-running command, with the field's help and its dataclass default shown; the
codebook stage's thresholds have flags of their own (:data:`STAGE_FLAGS`); everything
else is reachable with ``--set KEY=VALUE``. Options default to None, so a value not
given on the command line is the dataclass default and defaults live in one place.

Evaluation commands take lists (``--policy snapkv,spindle --kv-budget 0.25,0.15 --set
salient.share=0,0.25``): :func:`engine_grid` expands them into one configuration per
combination, in the order given.
"""

from __future__ import annotations

import itertools
from dataclasses import MISSING, Field, fields
from typing import Any, Callable

import click

from spindle_local.errors import UsageError
from spindle_local.runtime.config import EngineConfig, apply_settings

#: Stage settings with a flag of their own: (flag, help, default, click type).
STAGE_FLAGS: dict[str, tuple[str, str, object, Any]] = {
    "codebooks.layers": ("--codebook-layers", "Shallow layers that use codebook replacement: a number, or 'auto' "
                         "to measure per layer. Any codebook flag turns the codebook stage on (off in the "
                         "default policy).", "auto", str),
    "codebooks.theta_k": ("--theta-k", "Cosine threshold for sharing a key codebook entry.", 0.98,
                          click.FloatRange(0, 1, min_open=True)),
    "codebooks.theta_v": ("--theta-v", "Cosine threshold for sharing a value codebook entry.", 0.95,
                          click.FloatRange(0, 1, min_open=True)),
}
#: fields an evaluation command may give as comma-separated lists.
GRID_FIELDS = ("policy", "kv_budget")
SET_HELP = ("Any engine or stage setting by name (repeatable): an EngineConfig field (--set keep_start=32) or a "
            "stage setting of the policy (--set salient.share=0.1, --set allocator=pyramid); "
            "`spindle-local policies` lists them.")


def _default(f: Field) -> object:
    if f.default is not MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def flagged_fields() -> list[Field]:
    """EngineConfig's fields that have a command-line flag, in table order."""
    return [f for f in fields(EngineConfig) if f.metadata.get("flag")]


def _shown(value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return "none" if value is None or value == () else str(value)


def _option(f: Field, grid: bool) -> Callable:
    meta, default = f.metadata, _default(f)
    text = f"{meta['help']}  [default: {_shown(default)}]"
    if isinstance(default, bool) and meta.get("negatable"):
        flag = meta["flag"]
        return click.option(f"{flag}/--no-{flag[2:]}", f.name, default=None, help=text)
    kind: Any = None
    if grid and f.name in GRID_FIELDS:
        kind, text = str, text.replace("  [default", " Comma-separated for a grid.  [default")
    elif meta.get("choices"):
        kind = click.Choice(list(meta["choices"]))
    elif "min" in meta:
        kind = click.IntRange(min=meta["min"])
    elif isinstance(default, float):
        kind = float
    return click.option(meta["flag"], f.name, type=kind, default=None, metavar=meta.get("metavar"), help=text)



def engine_options(f: Callable | None = None, *, grid: bool = False) -> Callable:
    """Decorate a command with the option table (``grid``: list-valued policy, budget and --set)."""

    def wrap(fn: Callable) -> Callable:
        opts = [_option(fl, grid) for fl in flagged_fields()]
        for key, (flag, text, default, kind) in STAGE_FLAGS.items():
            opts.append(click.option(flag, key.replace(".", "__"), type=kind, default=None,
                                     help=f"{text}  [default: {default}]"))
        set_help = SET_HELP + (" Comma-separated values make a grid." if grid else "")
        opts.append(click.option("--set", "settings", multiple=True, metavar="KEY=VALUE", help=set_help))
        for o in reversed(opts):
            fn = o(fn)
        return fn

    return wrap(f) if f is not None else wrap


def engine_config(*, settings: tuple[str, ...] = (), **given: Any) -> EngineConfig:
    """An EngineConfig from the option table's values (None: not given, the dataclass default),
    ``--set`` pairs last; validated. Extra keywords are EngineConfig fields set by a command
    (``max_tokens`` from ``--ctx``)."""
    from spindle_local.runtime.memory import parse_size

    if given.get("kv_mem") is not None and given.get("kv_budget") is not None:
        raise UsageError("give either --kv-budget (a share of the full cache) or --kv-mem (bytes), not both")
    cfg = EngineConfig()
    names = {f.name for f in fields(EngineConfig)}
    for name, value in given.items():
        if value is None:
            continue
        if name.replace("__", ".") in STAGE_FLAGS:
            cfg.stages[name.replace("__", ".")] = value
            cfg.stages.setdefault("codebooks", "on")  # a codebook flag asks for codebook layers
        elif name == "kv_mem":
            cfg.kv_mem = parse_size(value) if isinstance(value, str) else int(value)
        elif name == "rpc":
            from spindle_local.runtime.rpc import parse_endpoints

            cfg.rpc = tuple(parse_endpoints(value)) if isinstance(value, str) else tuple(value)
        elif name in names:
            setattr(cfg, name, value)
        else:
            raise TypeError(f"engine_config: unknown option {name!r}")
    apply_settings(cfg, settings)
    cfg.validate()
    return cfg


def _split(text: str) -> list[str]:
    items = [x.strip() for x in str(text).split(",") if x.strip()]
    if not items:
        raise UsageError(f"empty list: {text!r}")
    return items


def engine_grid(*, settings: tuple[str, ...] = (), **given: Any) -> list[EngineConfig]:
    """One validated EngineConfig per combination of the list-valued options, in the order given:
    ``--policy`` and ``--kv-budget`` as comma-separated lists, and each ``--set KEY=V1,V2``."""
    axes: list[list[tuple[str, Any]]] = []
    for name in GRID_FIELDS:
        if given.get(name) is not None:
            values = _split(given.pop(name))
            if name == "kv_budget":
                try:
                    values = [float(v) for v in values]  # type: ignore[misc]
                except ValueError:
                    raise UsageError(f"--kv-budget expects numbers, got {','.join(values)!r}") from None
            axes.append([(name, v) for v in values])
    for pair in settings:
        key, sep, value = pair.partition("=")
        if not sep:
            raise UsageError(f"--set expects KEY=VALUE, got {pair!r}")
        axes.append([("set", f"{key}={v}") for v in _split(value)])
    out = []
    for combo in itertools.product(*axes):
        kw = dict(given)
        pairs = []
        for name, value in combo:
            if name == "set":
                pairs.append(value)
            else:
                kw[name] = value
        out.append(engine_config(settings=tuple(pairs), **kw))
    return out
