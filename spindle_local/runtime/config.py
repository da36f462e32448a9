"""The engine's settings, importable without loading llama.cpp (the CLI validates first)."""

from __future__ import annotations

from dataclasses import dataclass, field

from spindle_local.errors import UsageError

POLICIES = ("full", "streaming", "snapkv", "pyramidkv", "spindle")


@dataclass
class EngineConfig:
    """How the engine compresses; the CLI's options map onto these one to one."""

    policy: str = "spindle"
    kv_budget: float = 0.25
    window: int = 32
    sinks: int = 4
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
    spill: bool = True  # keep rows evicted mid-prompt on the host until the prompt is read (runtime/spill.py)
    lazy_plans: bool = True  # a mid-prompt plan moves only the oldest tokens the rest of the prompt needs room for
    policy_options: dict = field(default_factory=dict)  # further PolicyConfig fields (experiments)
    n_cells: int | None = None  # regular-cache allocation; default recent + 2 * chunk
    max_tokens: int | None = None  # longest context; default the model's trained context
    kv_mem: int | None = None  # KV memory cap in bytes (regular cache + store); replaces kv_budget

    def validate(self) -> None:
        if self.policy not in POLICIES:
            raise UsageError(f"unknown policy {self.policy!r}; choose from {', '.join(POLICIES)}")
        if not (0.0 < self.kv_budget <= 1.0):
            raise UsageError(f"--kv-budget must be in (0, 1], got {self.kv_budget}")
        if self.window < 1 or self.sinks < 0 or self.chunk < 1:
            raise UsageError("--window and --chunk must be >= 1 and --sinks >= 0")
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

    def cells(self) -> int:
        """Regular-cache cells: enough to reach the first compression the budget can pay for.

        Below n = (recent + (1 - b)·chunk) / b tokens no store fits the budget (the recent
        part alone exceeds it), so the regular cache must hold that many plus one chunk;
        compressing earlier would only lose information and still be over budget.
        """
        if self.n_cells:
            return self.n_cells
        b = self.kv_budget
        first = int((self.recent + (1.0 - b) * self.chunk) / b) + 1
        cells = first + self.chunk + 64
        if self.max_tokens:
            cells = min(cells, self.max_tokens)
        return max(cells, self.recent + self.chunk + 64)
