"""Fidelity: next-token KL divergence, top-1 agreement and perplexity against the full cache.

The same yardstick llama.cpp uses for its quantizations: read the first N tokens of a
text (the compressed run compresses as it reads), then score the next M tokens, and
compare each position's next-token distribution with a full-cache run on the same
tokens. ``mean_kld`` is KL(P_full || P_compressed) in nats, averaged over positions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


@dataclass
class FidelityResult:
    mean_kld: float
    p99_kld: float
    top1_agreement: float
    ppl: float
    ppl_full: float
    positions: int

    def as_dict(self) -> dict:
        return asdict(self)


def compare_logits(full: np.ndarray, comp: np.ndarray, targets: np.ndarray) -> FidelityResult:
    """Compare logits ``[M, vocab]`` of both runs; ``targets[i]`` is the token after position i."""
    if full.shape != comp.shape or full.shape[0] != len(targets):
        raise ValueError(f"shape mismatch: full {full.shape}, compressed {comp.shape}, targets {len(targets)}")
    lp_full = log_softmax(full)
    lp_comp = log_softmax(comp)
    kld = (np.exp(lp_full) * (lp_full - lp_comp)).sum(axis=-1)
    kld = np.maximum(kld, 0.0)  # rounding can give -1e-12
    idx = np.arange(len(targets))
    nll_full = -lp_full[idx, targets]
    nll_comp = -lp_comp[idx, targets]
    return FidelityResult(
        mean_kld=float(kld.mean()),
        p99_kld=float(np.percentile(kld, 99)),
        top1_agreement=float((full.argmax(-1) == comp.argmax(-1)).mean()),
        ppl=float(np.exp(nll_comp.mean())),
        ppl_full=float(np.exp(nll_full.mean())),
        positions=int(len(targets)),
    )
