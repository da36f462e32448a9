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


CACHE_ELEMENT_BYTES = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}


def run_kld(model_path: str, *, text: str, context: int, continuation: int, engine_config,
            cache_type: str = "f16") -> dict:
    """Read ``context`` tokens of ``text``, then score the next ``continuation`` against the full cache."""
    from dataclasses import replace

    from spindle_local.errors import UsageError
    from spindle_local.runtime.engine import Engine, EngineConfig

    model = engine_config.load_model(model_path)
    try:
        toks = model.tokenize(text, add_special=True)
        need = context + continuation
        if len(toks) < need:
            raise UsageError(f"the text has {len(toks)} tokens, fewer than --context + --continuation = {need}")
        if model.n_ctx_train and need > model.n_ctx_train:
            raise UsageError(f"--context + --continuation = {need} exceeds the model's trained context "
                             f"({model.n_ctx_train})")
        ctx_toks, cont = toks[:context], toks[context:need]
        cells = need + 16

        def score(eng: Engine) -> np.ndarray:
            last = eng.feed(ctx_toks)
            rows = [last[None, :]]
            if continuation > 1:
                rows.append(eng.feed(cont[:-1], all_logits=True))
            return np.concatenate(rows)

        base = dict(n_threads=engine_config.n_threads, flash_attn=engine_config.flash_attn)
        full_eng = Engine(model_path, EngineConfig(policy="full", n_cells=cells, max_tokens=cells, **base),
                          model=model)
        try:
            full_logits = score(full_eng)
        finally:
            full_eng.ctx.close()  # the model is shared: close only the context
        if cache_type != "f16" or engine_config.policy == "full":
            cfg = EngineConfig(policy="full", n_cells=cells, max_tokens=cells, cache_type=cache_type, **base)
        else:
            cfg = replace(engine_config)
        eng = Engine(model_path, cfg, model=model)
        try:
            comp_logits = score(eng)
            s = eng.refresh_stats()
            # Quantized caches: same token count, fewer bytes per element.
            factor = CACHE_ELEMENT_BYTES[cache_type] / 2.0
            kv_bytes = int(s.kv_bytes * factor) if cfg.policy == "full" else s.kv_bytes
            # The ratio is taken after the whole continuation has been read (the state at the end).
            res = compare_logits(full_logits, comp_logits, np.asarray(cont))
        finally:
            eng.ctx.close()
        return {
            "model": str(model_path),
            "policy": engine_config.policy if cache_type == "f16" else "full",
            "kv_budget": engine_config.kv_budget if cfg.policy != "full" else 1.0,
            "cache_type": cache_type,
            "context_tokens": context,
            "continuation_tokens": continuation,
            "reserve_ratio": kv_bytes / s.full_bytes if s.full_bytes else 1.0,
            "kv_bytes": kv_bytes,
            "kv_bytes_full": s.full_bytes,
            **res.as_dict(),
        }
    finally:
        model.close()
