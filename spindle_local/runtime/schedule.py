"""The compression schedule: what stays regular, how many bytes a plan may keep, when one is due.

Pure arithmetic over a handful of numbers (no model, no llama.cpp), so that every rule is
tested by a table (``tests/test_schedule.py``). The engine builds a :class:`Schedule`
from its configuration and state each time it asks.

With ``b`` the KV budget, ``t`` bytes per token of the full f16 cache, ``n`` tokens seen
and ``R`` recent tokens left regular, a plan made for ``growth`` more tokens keeps the
store at ``b·n·t - R·t - (1 - b)·growth·t`` bytes: after ``j`` more tokens the reserve
ratio is ``(store + (R + j)·t) / ((n + j)·t)``, which grows with ``j`` when ``b < 1``, so
that store keeps it within ``b`` up to ``j = growth``. Bytes ``F`` that every policy holds
alike (a sliding-window model's window layers) count on both sides of the ratio, so the
store gives up ``(1 - b)·F`` more. Under a byte cap (``--kv-mem``,
:mod:`.memory`) the layout fixes the recent part and the store instead.
"""

from __future__ import annotations

from dataclasses import dataclass

from spindle_local.runtime.config import MIN_SLACK


@dataclass(frozen=True)
class Schedule:
    """One moment of a conversation, as the schedule sees it."""

    n_past: int  # tokens seen
    kv_budget: float
    bytes_per_token: int  # full f16 cache, all layers
    window: int
    recent: int  # --recent
    sinks: int
    keep_start: int
    decode_slack: int
    prompt_end: int | None = None  # while a prompt is read: the position after it
    layout_recent: int | None = None  # under --kv-mem: the layout's recent part ...
    layout_store_cap: int | None = None  # ... and store bytes
    fixed_bytes: int = 0  # held alike by every policy and the full cache (window layers' cache)

    @property
    def capped(self) -> bool:
        return self.layout_store_cap is not None

    def recent_tokens(self) -> int:
        """Tokens a compression leaves uncompressed: ``--recent``, but at most a quarter of the budget.

        At short contexts a fixed recent part would eat most of the budget and leave the
        policy nothing to choose with; the window queries always stay uncompressed.
        """
        if self.capped:
            return int(self.layout_recent)  # type: ignore[arg-type]
        return max(self.window, min(self.recent, int(0.25 * self.kv_budget * self.n_past)))

    def protected_start(self) -> int:
        """Leading tokens every plan keeps in every layer and KV head (sinks and ``keep_start``),
        as far as a quarter of the budget at this length allows (``sinks`` always)."""
        if self.capped:
            share = int(self.layout_store_cap) // (4 * self.bytes_per_token)  # type: ignore[arg-type]
        else:
            share = int(0.25 * self.kv_budget * self.n_past)
        return max(self.sinks, min(self.keep_start, share))

    def slack(self) -> int:
        """Tokens generation may add before the next compression (headroom a plan leaves)."""
        return max(MIN_SLACK, min(self.decode_slack, int(0.25 * self.kv_budget * self.n_past)))

    def target_bytes(self, growth: int) -> int:
        """Store bytes that keep the reserve ratio within budget now and for ``growth`` more tokens.

        Mid-prompt, the plan is made for the length the prompt will have: the store may then
        be as large as the one the end-of-prompt plan will keep (never more), which leaves
        that plan, made with the question in its window, more tokens to choose from.
        """
        if self.capped:
            return int(self.layout_store_cap)  # type: ignore[arg-type]
        b, t = self.kv_budget, self.bytes_per_token
        n = max(self.n_past, self.prompt_end or 0)
        return int(b * n * t - self.recent_tokens() * t - (1.0 - b) * growth * t - (1.0 - b) * self.fixed_bytes)


def needs_compress(*, regular: int, incoming: int, allowance: int | None, capped: bool) -> bool:
    """Would ``incoming`` more tokens take the regular part past what the last plan allows?

    Before the conversation's first plan (``allowance`` None), and under a byte cap,
    nothing is due until the regular cache is full (:func:`compress_due`): its cells are
    allocated anyway, so compressing what fits in them would save no memory and only lose
    information. A conversation that fits is held exactly (reserve ratio 1.0).
    """
    if capped or allowance is None:
        return False
    return regular + incoming > allowance


def compress_due(*, regular: int, incoming: int, cells: int, allowance: int | None, capped: bool) -> bool:
    """Must a compression come before ``incoming`` more tokens (cache full, or the plan's allowance)?"""
    return regular + incoming > cells or needs_compress(regular=regular, incoming=incoming,
                                                        allowance=allowance, capped=capped)
