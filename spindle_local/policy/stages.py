"""The stages a compression policy is built from, each a small dataclass with its own knobs.

A plan runs them in this order (:class:`~.policies.StagedPolicy`):

1. a **scorer** rates every old token per query head (:class:`WindowScorer`, :class:`Recency`);
2. **boosters** name positions to keep whatever their score (:class:`CopySpans`,
   :class:`SalientRuns`);
3. an **allocator** gives every layer its slots (:class:`FlatShares`, :class:`PyramidShares`,
   :class:`MassShares`);
4. **codebook roles** turn shallow layers into codebook layers (:class:`Codebooks`);
5. a **GQA selector** picks each KV head's tokens and query-head masks (:class:`GroupSelect`);
6. **evicted mass** lets deep layers' kept slots stand for the tokens evicted beside them
   (:class:`EvictedMass`).

Named presets of these (``snapkv``, ``spindle``, ...) are in :mod:`.presets`. Stages hold
settings only; the functions that do the work live in the modules named in each docstring.
Every field carries ``metadata["help"]``: the option table (``--set stage.field=value``)
and its help text are generated from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from .mass import SPREADS

Pooling = str  # "max", "avg" or "none"


def knob(default, help: str):  # noqa: A002 - the option table's word
    """A stage field with its one-line help (read by the option table)."""
    return field(default=default, metadata={"help": help})


@dataclass
class WindowScorer:
    """Attention of the last ``window`` queries to every old token, pooled along positions
    (SnapKV, Li et al. 2024, arXiv:2404.14469; max-pooling over 7 as in PyramidKV's runners).
    Work: :mod:`.scores`."""

    pooling: Pooling = knob("max", "pooling of scores along positions: max, avg or none")
    kernel: int = knob(7, "pooling width in tokens")
    value_weight: bool = knob(False, "weight attention by the token's value norm over its KV head's mean")
    include_recent: bool = knob(True, "normalise window attention over the recent keys too")

    def __post_init__(self) -> None:
        if self.pooling not in ("max", "avg", "none"):
            raise ValueError(f"scorer.pooling must be max, avg or none, not {self.pooling!r}")
        if self.kernel < 1:
            raise ValueError("scorer.kernel must be >= 1")


@dataclass
class Recency:
    """The newest old tokens first (StreamingLLM, Xiao et al. 2023, arXiv:2309.17453)."""


@dataclass
class CopySpans:
    """The run after each token a deep head attends to strongly: what a retrieval copies
    from (a key's digits, a name's continuation). Work: :mod:`.anchors`."""

    span: int = knob(24, "tokens kept after each anchor (0: none)")
    share: float = knob(0.25, "at most this share of a layer's mean slot count")
    tokens: int | None = knob(None, "at most this many tokens (none: no absolute cap)")
    from_layer: int | None = knob(None, "first layer with copy spans (none: half the stack)")
    min_share: float = knob(0.1, "an anchor holds at least this share of some deep head's window attention")

    def __post_init__(self) -> None:
        if self.span < 0 or not (0.0 <= self.share <= 1.0) or self.min_share < 0:
            raise ValueError("copy_spans.span must be >= 0, copy_spans.share in [0, 1], "
                             "copy_spans.min_share >= 0")
        if self.tokens is not None and self.tokens < 0:
            raise ValueError("copy_spans.tokens must be >= 0 or none")


@dataclass
class SalientRuns:
    """Runs of rare tokens (numbers, names) with the words that introduce them, kept in every
    layer whatever the window says: what a later question may ask for. Work: :mod:`.salience`."""

    share: float = knob(0.25, "at most this share of the smallest layer's slots (0: none)")
    tokens: int = knob(96, "... or this many tokens where the share is fewer, at most half of those slots")
    before: int = knob(8, "tokens kept before each run (what introduces a number or name)")
    after: int = knob(2, "tokens kept after each run")
    echo: int = knob(32, "a copy of a run at most this many tokens after it ranks with it (0: none)")
    opening: int = knob(8, "a run that opens its sentence keeps the words after it to the sentence's end, "
                           "at most this many (0: after only)")
    sentence: bool = knob(True, "a run's before and after tokens stay within its sentence (full stops and "
                                "line breaks bound it)")
    widen: bool = knob(True, "with sentence: once every run holds its context within its sentence, runs widen "
                             "(same order) to the context they keep without the bound, while the share allows")
    echo_last: bool = knob(False, "restatements (copies within echo tokens) are kept after every other run, "
                                  "before any run widens: each fact once before any fact twice")

    def __post_init__(self) -> None:
        if not (0.0 <= self.share <= 1.0) or min(self.tokens, self.before, self.after, self.echo, self.opening) < 0:
            raise ValueError("salient.share must be in [0, 1], salient.tokens, salient.before, salient.after, "
                             "salient.echo and salient.opening >= 0")


@dataclass
class FlatShares:
    """Every layer the same number of slots (SnapKV)."""


@dataclass
class PyramidShares:
    """Shallow layers keep more: slots fall linearly with depth, the deepest layer getting
    ``1/beta`` of the mean (PyramidKV, Cai et al. 2024, arXiv:2406.02069; SpindleKV's paper)."""

    beta: float = knob(20.0, "mean share over the deepest layer's share (1 = flat)")

    def __post_init__(self) -> None:
        if self.beta < 1.0:
            raise ValueError("allocator.beta must be >= 1 (1 = flat)")


@dataclass
class MassShares:
    """Flat byte shares; then every eviction layer keeps ``floor`` of its flat share (at least
    ``min_slots``, at most that share) and each further slot goes where it keeps the most
    window attention mass, a top-k over all layers. Concentrated layers need few slots; the
    floor keeps the neighbours a short prompt's retrieval copies from."""

    floor: float = knob(0.5, "share of the flat per-layer slots every eviction layer keeps")
    min_slots: int = knob(128, "... and at least this many slots (at most its flat share)")
    min_cap: float = knob(1.0, "... min_slots binds up to this share of the flat share (1: all of it)")

    def __post_init__(self) -> None:
        if not (0.0 <= self.floor <= 1.0) or self.min_slots < 0 or not (0.0 <= self.min_cap <= 1.0):
            raise ValueError("allocator.floor and allocator.min_cap must be in [0, 1] and allocator.min_slots >= 0")


Allocator = FlatShares | PyramidShares | MassShares
ALLOCATORS: dict[str, type] = {"flat": FlatShares, "pyramid": PyramidShares, "mass": MassShares}


@dataclass
class GroupSelect:
    """Which tokens a KV head keeps for its GQA group of query heads, and which query heads
    see them. Work: :mod:`.select`.

    ``rule``: ``mean`` keeps the best mean score over the group (SnapKV); ``max`` the best
    single-head score (a flattened top-k: broad heads claim more slots than sharp ones);
    ``union`` a round-robin over per-query-head top-k (SpindleKV's paper). ``masks``:
    ``union`` lets every query head see every kept slot; ``own`` (the paper) masks each
    query head to its own top-k (same bytes, more attention mass missing).
    """

    rule: str = knob("mean", "tokens of a GQA group: mean, max or union (round-robin)")
    masks: str = knob("union", "query heads see every kept slot (union) or their own top-k (own)")

    def __post_init__(self) -> None:
        if self.rule not in ("mean", "max", "union"):
            raise ValueError(f"selector.rule must be mean, max or union, not {self.rule!r}")
        if self.masks not in ("union", "own"):
            raise ValueError(f"selector.masks must be union or own, not {self.masks!r}")


@dataclass
class EvictedMass:
    """Kept slots of deep eviction layers stand for the tokens evicted beside them: each
    adds ``log`` of its share of its head's tokens to its attention logit, so the document
    keeps its weight against the recent tokens after eviction (docs/benchmarks.md, "Slots
    that stand for the tokens evicted beside them"). On in the ``spindle`` preset
    (``--set mass=off`` removes it), off in the others.
    Work: :mod:`.mass`."""

    from_layer: int | None = knob(None, "first layer whose slots stand for evicted tokens (none: two thirds of the stack)")
    # 1 gives the kept slots all of the evicted tokens' attention, which they never had (they
    # scored lower): measured, it overweights the document against the recent tokens (KLD
    # up by two thirds at 0.15); half of it keeps the KLD and most of the later answers' gain
    share: float = knob(0.5, "each kept slot stands for this share of its equal part of the tokens")
    spread: str = knob("equal", "how the tokens are shared: 'equal' parts, or 'nearest' (each evicted "
                                "token to the kept slot nearest in position)")

    def __post_init__(self) -> None:
        if self.share <= 0 or (self.from_layer is not None and self.from_layer < 0):
            raise ValueError("mass.share must be > 0 and mass.from_layer >= 0 or none")
        if self.spread not in SPREADS:
            raise ValueError(f"mass.spread must be one of {', '.join(SPREADS)}")

    def first_layer(self, n_layer: int) -> int:
        return -(-2 * n_layer // 3) if self.from_layer is None else int(self.from_layer)


@dataclass
class Codebooks:
    """Codebook replacement in shallow layers (SpindleKV): evicted layers whose similar keys
    (pre-RoPE) and values share one entry, so more tokens fit the same bytes.
    Work: :mod:`.codebook`, :mod:`.layer_plans`, :mod:`.roles`.

    ``layers``: the first N layers, or ``auto``: each of the first ``max_layers`` layers
    (none: a tenth of the stack, rounded up) becomes a codebook layer when its measured
    attention-output error beats eviction at equal bytes, shallowest first, stopping at the
    first layer where eviction wins (deeper layers are sparser still).
    """

    layers: int | str = knob("auto", "codebook layers: a number, or auto to measure per layer")
    theta_k: float = knob(0.98, "cosine threshold for sharing a key codebook entry")
    theta_v: float = knob(0.95, "cosine threshold for sharing a value codebook entry")
    max_layers: int | None = knob(None, "auto examines at most this many leading layers (none: a tenth)")

    def __post_init__(self) -> None:
        if isinstance(self.layers, str) and self.layers.strip().isdigit():
            self.layers = int(self.layers)
        if isinstance(self.layers, str) and self.layers != "auto":
            raise ValueError(f"codebooks.layers must be a number or auto, not {self.layers!r}")
        if isinstance(self.layers, int) and self.layers < 0:
            raise ValueError("codebooks.layers must be >= 0")
        for name in ("theta_k", "theta_v"):
            t = getattr(self, name)
            if not (0.0 < t <= 1.0):
                raise ValueError(f"codebooks.{name} must be in (0, 1], got {t}")

    @property
    def auto(self) -> bool:
        return self.layers == "auto"

    def candidates(self, n_layer: int) -> int:
        """How many leading layers may become codebook layers (the only ones that read ``k_pre``)."""
        if not self.auto:
            return min(int(self.layers), n_layer)
        if self.max_layers is not None:
            return min(int(self.max_layers), n_layer)
        return min(max(1, math.ceil(n_layer / 10)), n_layer)


@dataclass
class PlanContext:
    """What the engine knows of a conversation, not a policy setting: tokens protected like
    sinks (the conversation's start), the model's softmax scale, planning threads."""

    sinks: int = 4
    scale: float | None = None  # None: 1/sqrt(head_dim_k)
    threads: int | None = None  # None: the CPUs this process may use
    # for the passes that call the runtime layer by layer (scoring, installing) while other
    # threads plan: the cores its own threads leave (parallel.planning_threads); None: threads
    beside_runtime: int | None = None

    def runtime_pass_threads(self) -> int | None:
        return self.beside_runtime if self.beside_runtime is not None else self.threads

    def attn_scale(self, head_dim_k: int) -> float:
        return float(self.scale) if self.scale is not None else 1.0 / math.sqrt(head_dim_k)


def stage_help(cls: type) -> dict[str, str]:
    """``{field: help}`` of a stage class."""
    return {f.name: f.metadata.get("help", "") for f in fields(cls)}
