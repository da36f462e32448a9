"""The engine's settings, importable without loading llama.cpp (the CLI validates first)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from spindle_local.errors import UsageError
from spindle_local.runtime.memory import CELL_BLOCK

if TYPE_CHECKING:
    from spindle_local.runtime.lowlevel import LlamaModel

POLICIES = ("full", "streaming", "snapkv", "pyramidkv", "spindle")
MIN_SLACK = 16  # fewest generated tokens a plan leaves room for (Engine._slack)


@dataclass
class EngineConfig:
    """How the engine compresses; the CLI's options map onto these one to one."""

    policy: str = "spindle"
    kv_budget: float = 0.25
    window: int = 32
    sinks: int = 4
    keep_start: int = 64  # the conversation's first tokens kept like sinks, within a quarter of the budget
    recent: int = 256
    chunk: int = 512
    decode_slack: int = 128
    codebook_layers: int | str = "auto"
    theta_k: float = 0.98
    theta_v: float = 0.95
    n_threads: int | None = None
    flash_attn: bool = True
    cache_type: str = "f16"  # regular-cache type; quantized types only with policy "full"
    eager_compress: bool = False  # compress after every prompt chunk, not only when the cache is full
    lookahead: bool = True  # mid-prompt plans also score with the prompt's last `window` tokens (a probe)
    lazy_plans: bool = True  # a mid-prompt plan moves only the oldest tokens the rest of the prompt needs room for
    policy_options: dict = field(default_factory=dict)  # further PolicyConfig fields (experiments)
    n_cells: int | None = None  # regular-cache allocation; default recent + 2 * chunk (see cells())
    max_tokens: int | None = None  # longest context; default the model's trained context
    kv_mem: int | None = None  # KV memory cap in bytes (regular cache + store); replaces kv_budget
    rpc: tuple[str, ...] = ()  # ggml RPC servers (HOST:PORT) that hold layers (runtime/rpc.py)
    gpu_layers: int | None = None  # layers on GPUs / RPC servers; None: llama.cpp's default (all of them)

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
        for name in ("theta_k", "theta_v"):
            t = getattr(self, name)
            if not (0.0 < t <= 1.0):
                raise UsageError(f"--{name.replace('_', '-')} must be in (0, 1], got {t}")
        if self.cache_type not in ("f16", "q8_0", "q4_0"):
            raise UsageError(f"--cache-type must be f16, q8_0 or q4_0, got {self.cache_type!r}")
        if self.cache_type != "f16" and self.policy != "full":
            raise UsageError("quantized KV caches (--cache-type q8_0/q4_0) work with --policy full only")
        if self.kv_mem is not None and self.kv_mem <= 0:
            raise UsageError(f"--kv-mem must be positive, got {self.kv_mem}")
        if isinstance(self.codebook_layers, str) and self.codebook_layers != "auto":
            raise UsageError(f"--codebook-layers must be a number or 'auto', got {self.codebook_layers!r}")

    def cells(self, longest: int | None = None) -> int:
        """Regular-cache cells: ``recent + 2·chunk`` in whole blocks, whatever the budget.

        ``longest`` is the longest context when ``max_tokens`` is not set (the model's
        trained context); the allocation never exceeds it. A conversation that fits in
        these cells is not compressed at all (they are allocated anyway: compressing
        would lose information and save no memory); the budget holds from the first
        compression on. A compression leaves ``recent`` tokens and must make room for a
        prompt chunk (and the look-ahead probe's ``window``); the second chunk lets short
        conversations stay exact and spaces plans out.
        """
        if self.n_cells:
            return self.n_cells
        cells = _blocks(self.recent + 2 * self.chunk)
        longest = self.max_tokens or longest
        return min(cells, _blocks(longest)) if longest else cells

    def smallest_budget(self, *, longest: int, n_layer: int, n_head: int, n_head_kv: int, head_dim_k: int,
                        head_dim_v: int) -> float:
        """The smallest ``kv_budget`` a conversation of ``longest`` tokens can ever be held to.

        A plan keeps at least the observation window uncompressed, leaves room for
        ``MIN_SLACK`` generated tokens and keeps the sinks of every layer and KV head
        (:meth:`Engine._min_store_bytes`): with ``t`` bytes per token the budget must
        reach ``window·t + (1 - b)·MIN_SLACK·t + sinks`` at the longest context. Below
        that the budget is never met, however long the conversation grows.
        """
        t = n_layer * n_head_kv * (head_dim_k + head_dim_v) * 2
        per_slot = n_head_kv * (4 + n_head // n_head_kv + 2 * (head_dim_k + head_dim_v))
        store = n_layer * max(self.sinks, 1) * per_slot
        return (self.window + MIN_SLACK + store / t) / (longest + MIN_SLACK)

    def check_budget(self, *, longest: int, model_name: str = "this model", **geometry: int) -> None:
        """Refuse a ``kv_budget`` that can never be met within ``longest`` tokens (one line, the minimum)."""
        if self.policy == "full" or self.kv_mem is not None:
            return
        if longest <= self.cells(longest):
            return  # the whole conversation fits in the regular cache: nothing is ever compressed
        low = self.smallest_budget(longest=longest, **geometry)
        if self.kv_budget < low:
            shown = math.ceil(low * 10_000) / 10_000
            raise UsageError(f"--kv-budget {self.kv_budget:g} is too small for {model_name} with a context of "
                             f"{longest} tokens: the smallest workable value is {shown:g} (a plan keeps the "
                             f"--window of {self.window} tokens, {MIN_SLACK} of headroom and the sinks)")


def budget_geometry(meta) -> dict:
    """The attention shape :meth:`EngineConfig.check_budget` needs, from a GGUF's metadata (gguf_meta.ModelMeta)."""
    return dict(n_layer=meta.n_layer, n_head=meta.n_head, n_head_kv=meta.n_head_kv, head_dim_k=meta.head_dim_k,
                head_dim_v=meta.head_dim_v)


def _blocks(n: int) -> int:
    return -(-int(n) // CELL_BLOCK) * CELL_BLOCK


def _coerce(key: str, text: str, default: object) -> object:
    """``text`` as the type of ``default`` (a dataclass field's default), or a one-line error."""
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
            return int(text)  # fields such as codebook_layers take a number or a word
    except ValueError:
        kind = "a number or none" if default is None else type(default).__name__
        raise UsageError(f"--set {key}={text}: expected {kind}") from None
    return text


def apply_settings(cfg: EngineConfig, pairs: list[str] | tuple[str, ...]) -> EngineConfig:
    """Apply ``KEY=VALUE`` pairs (``--set``) to ``cfg``: an :class:`EngineConfig` field, or a
    field of the policy's :class:`~spindle_local.policy.inputs.PolicyConfig` (kept in
    ``policy_options``). Values take the field's type; unknown keys are a one-line error."""
    from dataclasses import fields

    from spindle_local.policy.inputs import PolicyConfig

    base, pol = EngineConfig(), PolicyConfig()
    engine = {f.name: getattr(base, f.name) for f in fields(EngineConfig) if f.name != "policy_options"}
    policy = {f.name: getattr(pol, f.name) for f in fields(PolicyConfig) if f.name not in ("extra", "threads")}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise UsageError(f"--set expects KEY=VALUE, got {pair!r}")
        if key in engine:
            setattr(cfg, key, _coerce(key, value, engine[key]))
        elif key in policy:
            cfg.policy_options[key] = _coerce(key, value, policy[key])
        else:
            known = ", ".join(sorted(set(engine) | set(policy)))
            raise UsageError(f"--set: unknown setting {key!r}; known: {known}")
    return cfg
