"""The engine's settings, importable without loading llama.cpp (the CLI validates first)."""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

from spindle_local.errors import UsageError
from spindle_local.policy.presets import PRESETS
from spindle_local.runtime.memory import CELL_BLOCK

if TYPE_CHECKING:
    from spindle_local.policy.inputs import Geometry
    from spindle_local.runtime.lowlevel import LlamaModel

POLICIES = ("full", *PRESETS)
MIN_SLACK = 16  # fewest generated tokens a plan leaves room for (Engine._slack)


def opt(flag: str, help: str, **click_kw):  # noqa: A002 - the option table's word
    """Field metadata of a setting with a command-line flag (read by :mod:`spindle_local.options`).

    ``click_kw`` holds what the flag needs beyond the field's type: ``choices``, ``min``,
    ``metavar``, ``negatable`` (``--x/--no-x`` for booleans).
    """
    return {"flag": flag, "help": help, **click_kw}


def setting(default, flag: str | None = None, help: str = "", **click_kw):  # noqa: A002
    """A dataclass field with its default and (optional) flag and help."""
    meta = opt(flag, help, **click_kw) if flag else {"help": help}
    if isinstance(default, (dict, list)):  # mutable: a fresh copy per instance
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class EngineConfig:
    """How the engine runs and compresses. Fields with a flag are command-line options of
    every model-running command (generated from this table); all are reachable with
    ``--set NAME=VALUE``, and the policy's stage settings with ``--set stage.field=VALUE``."""

    policy: str = setting("spindle", "--policy", "KV-cache policy; 'full' keeps everything.", choices=POLICIES)
    kv_budget: float = setting(0.25, "--kv-budget", "Reserve ratio: KV bytes held / full f16 cache bytes, in (0, 1].")
    kv_mem: int | None = setting(None, "--kv-mem", "KV memory cap instead of --kv-budget, e.g. 64MiB (KiB/MiB/GiB): "
                                 "llama.cpp's regular cache and the compressed store together never allocate more.",
                                 metavar="SIZE", size=True)
    window: int = setting(32, "--window", "Observation window: recent queries that score older tokens.", min=1)
    sinks: int = setting(4, "--sinks", "First tokens that are never evicted (attention sinks).", min=0)
    keep_start: int = setting(64, help="the conversation's first tokens kept like sinks, within a quarter of the budget")
    recent: int = setting(256, "--recent", "Newest tokens kept uncompressed in the regular cache.", min=1)
    chunk: int = setting(512, "--chunk", "Prefill chunk size in tokens (compression runs between chunks).", min=16)
    decode_slack: int = setting(128, help="generated tokens a plan leaves room for before the next one")
    stages: dict = setting({}, help="stage settings of the policy ({'salient.share': 0.1}, see policy/presets.py)")
    n_threads: int | None = setting(None, "--threads", "CPU threads (default: the physical cores this process may use).", min=1)
    flash_attn: bool = setting(True, "--flash-attn", "Use llama.cpp's flash-attention kernels.", negatable=True)
    cache_type: str = setting("f16", help="regular-cache type f16, q8_0 or q4_0; quantized types only with policy full")
    eager_compress: bool = setting(False, help="compress after every prompt chunk, not only when the cache is full")
    lookahead: bool = setting(True, "--lookahead", "Plans made while a long prompt is read also score with the "
                              "prompt's last --window tokens (its question), probed ahead of time.", negatable=True)
    lookahead_reuse: bool = setting(False, help="a mid-prompt plan reuses the prompt's last look-ahead probe "
                                    "until the tokens read have doubled since it was made (fewer probes: each is a "
                                    "forward pass of --window tokens)")
    lazy_plans: bool = setting(True, help="a mid-prompt plan moves only the oldest tokens the rest of the prompt "
                                          "needs room for")
    fill_cells: bool = setting(False, help="a long prompt is planned when the regular cells are full (the chunk "
                                           "before a plan cut to fill them), not when a whole chunk no longer fits: "
                                           "fewer, faster plans; off by default (fewer multi-question keys kept)")
    n_cells: int | None = setting(None, help="regular-cache allocation; default recent + 2 * chunk (see cells())")
    max_tokens: int | None = setting(None, help="longest context; default the model's trained context")
    rpc: tuple[str, ...] = setting((), "--rpc", "Place layers on ggml RPC servers (started with "
                                   "`spindle-local rpc-server`).", metavar="HOST:PORT[,...]", endpoints=True)
    gpu_layers: int | None = setting(None, "--gpu-layers", "Layers on GPUs or RPC servers (default: all of them "
                                     "when there are any).", min=0)

    def load_model(self, path: str | Path) -> LlamaModel:
        """The model at ``path`` placed as ``rpc`` and ``gpu_layers`` say."""
        from spindle_local.runtime.lowlevel import LlamaModel

        if self.rpc:
            from spindle_local.runtime import rpc

            rpc.add_servers(list(self.rpc))
        return LlamaModel(path, n_gpu_layers=self.gpu_layers)

    def validate(self) -> None:
        if self.gpu_layers is not None and self.gpu_layers < 0:
            raise UsageError(f"--gpu-layers must be >= 0, got {self.gpu_layers}")
        if self.policy not in POLICIES:
            raise UsageError(f"unknown policy {self.policy!r}; choose from {', '.join(POLICIES)}")
        if not (0.0 < self.kv_budget <= 1.0):
            raise UsageError(f"--kv-budget must be in (0, 1], got {self.kv_budget}")
        if self.window < 1 or self.sinks < 0 or self.chunk < 1:
            raise UsageError("--window and --chunk must be >= 1 and --sinks >= 0")
        if self.keep_start < 0:
            raise UsageError(f"keep_start must be >= 0, got {self.keep_start}")
        if self.recent < self.window:
            raise UsageError(f"--recent ({self.recent}) must be at least --window ({self.window})")
        if self.cache_type not in ("f16", "q8_0", "q4_0"):
            raise UsageError(f"--cache-type must be f16, q8_0 or q4_0, got {self.cache_type!r}")
        if self.cache_type != "f16" and self.policy != "full":
            raise UsageError("quantized KV caches (--cache-type q8_0/q4_0) work with --policy full only")
        if self.kv_mem is not None and self.kv_mem <= 0:
            raise UsageError(f"--kv-mem must be positive, got {self.kv_mem}")
        self.resolved_stages()

    def resolved_stages(self):
        """The policy's :class:`~spindle_local.policy.presets.Stages` with ``stages`` applied
        (None for ``full``); a one-line UsageError names a bad setting."""
        from spindle_local.policy.presets import apply_settings, preset

        if self.policy == "full":
            if self.stages:
                raise UsageError(f"--policy full has no stage settings (got {', '.join(self.stages)})")
            return None
        try:
            return apply_settings(preset(self.policy), self.stages)
        except ValueError as e:
            raise UsageError(f"--set {e}") from None

    def cells(self, longest: int | None = None) -> int:
        """Regular-cache cells: ``recent + 2·chunk`` in whole blocks, whatever the budget.

        ``longest`` is the longest context when ``max_tokens`` is not set (the model's
        trained context); the allocation never exceeds it. A conversation that fits in
        these cells is not compressed at all (they are allocated anyway: compressing
        would lose information and save no memory); the budget holds from the first
        compression on. A compression leaves ``recent`` tokens and must make room for a
        prompt chunk (and the look-ahead probe's ``window``); the second chunk lets short
        conversations stay exact and spaces plans out while generating. While a long prompt
        is read the probe's cells leave room for one chunk after the recent part, so it is
        planned once per chunk (``fill_cells``: once per ``cells - recent - window`` tokens).
        """
        if self.n_cells:
            return self.n_cells
        cells = _blocks(self.recent + 2 * self.chunk)
        longest = self.max_tokens or longest
        return min(cells, _blocks(longest)) if longest else cells

    def smallest_budget(self, *, longest: int, geometry: Geometry) -> float:
        """The smallest ``kv_budget`` a conversation of ``longest`` tokens can ever be held to.

        A plan keeps at least the observation window uncompressed, leaves room for
        ``MIN_SLACK`` generated tokens and keeps the sinks of every layer and KV head
        (:meth:`Engine._min_store_bytes`): with ``t`` bytes per token the budget must
        reach ``window·t + (1 - b)·MIN_SLACK·t + sinks`` at the longest context. Below
        that the budget is never met, however long the conversation grows.
        """
        g = geometry
        t = g.n_layer * g.n_head_kv * (g.head_dim_k + g.head_dim_v) * 2
        per_slot = g.n_head_kv * (4 + g.g + 2 * (g.head_dim_k + g.head_dim_v))
        store = g.n_layer * max(self.sinks, 1) * per_slot
        return (self.window + MIN_SLACK + store / t) / (longest + MIN_SLACK)

    def check_budget(self, *, longest: int, geometry: Geometry, model_name: str = "this model") -> None:
        """Refuse a ``kv_budget`` that can never be met within ``longest`` tokens (one line, the minimum)."""
        if self.policy == "full" or self.kv_mem is not None:
            return
        if longest <= self.cells(longest):
            return  # the whole conversation fits in the regular cache: nothing is ever compressed
        low = self.smallest_budget(longest=longest, geometry=geometry)
        if self.kv_budget < low:
            shown = math.ceil(low * 10_000) / 10_000
            raise UsageError(f"--kv-budget {self.kv_budget:g} is too small for {model_name} with a context of "
                             f"{longest} tokens: the smallest workable value is {shown:g} (a plan keeps the "
                             f"--window of {self.window} tokens, {MIN_SLACK} of headroom and the sinks)")


def _blocks(n: int) -> int:
    return -(-int(n) // CELL_BLOCK) * CELL_BLOCK


def apply_settings(cfg: EngineConfig, pairs: list[str] | tuple[str, ...]) -> EngineConfig:
    """Apply ``KEY=VALUE`` pairs (``--set``) to ``cfg``: an :class:`EngineConfig` field, or a stage
    setting of the policy (``stage.field`` or ``stage``, kept in ``cfg.stages`` and checked by
    :meth:`EngineConfig.validate`). Values take the field's type; unknown keys are a one-line error."""
    from spindle_local.policy.presets import parse_value, setting_keys

    defaults = {f.name: getattr(EngineConfig(), f.name) for f in fields(EngineConfig) if f.name != "stages"}
    stage_keys = setting_keys()
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise UsageError(f"--set expects KEY=VALUE, got {pair!r}")
        try:
            if key in defaults:
                setattr(cfg, key, parse_value(value, defaults[key]))
            elif key in stage_keys:
                cfg.stages[key] = value.strip()
            else:
                close = difflib.get_close_matches(key, [*defaults, *stage_keys], n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise UsageError(f"--set: unknown setting {key!r}; {hint}`spindle-local policies` lists them all")
        except ValueError as e:
            raise UsageError(f"--set {key}={value}: {e}") from None
    return cfg
