"""Fidelity: next-token KL divergence, top-1 agreement and perplexity against the full cache.

The same yardstick llama.cpp uses for its quantizations: read the first N tokens of a
text (the compressed run compresses as it reads), then score the next M tokens, and
compare each position's next-token distribution with a full-cache run on the same
tokens. ``mean_kld`` is KL(P_full || P_compressed) in nats, averaged over positions.

The full-cache run is the reference (:class:`KldReference`): a grid of configurations
computes it once, and ``eval kld --base FILE`` keeps it in a file for later runs on the
same text, model and lengths (:func:`load_reference` refuses a file made for others).
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from spindle_local.errors import UsageError


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


#: bytes of the model file the identity of a saved reference hashes (header, metadata and more)
IDENTITY_BYTES = 8 << 20
#: format of a --base file
REFERENCE_FORMAT = 1


@dataclass
class KldReference:
    """The full-cache side of a KLD measurement: the tokens read and scored, and the full
    cache's logits at every scored position. One reference serves every configuration of a
    grid and, saved with ``--base``, later runs."""

    context: list[int]
    continuation: list[int]
    logits: np.ndarray
    identity: dict[str, Any]
    loaded_from: str | None = None  # the --base file it was read from; None: computed in this run
    uses: int = 0  # measurements scored against it so far (run_kld)

    def origin(self) -> str:
        """"loaded" (from a --base file), "computed" (for this measurement) or "reused" (computed
        for an earlier configuration of the grid)."""
        if self.loaded_from:
            return "loaded"
        return "computed" if self.uses <= 1 else "reused"


def kld_tokens(model, text: str, *, context: int, continuation: int, offset: int = 0) -> tuple[list[int], list[int]]:
    """The ``context`` tokens read and the ``continuation`` scored: the text's tokens after its
    first ``offset`` ones (the BOS token, when the model adds one, stays first)."""
    toks = model.tokenize(text, add_special=True)
    need = context + continuation
    if offset:
        n_bos = len(model.tokenize("", add_special=True))
        toks = toks[:n_bos] + toks[n_bos + offset:]
    if len(toks) < need:
        after = f" after --offset {offset}" if offset else ""
        raise UsageError(f"the text has {len(toks)} tokens{after}, fewer than --context + --continuation = {need}")
    if model.n_ctx_train and need > model.n_ctx_train:
        raise UsageError(f"--context + --continuation = {need} exceeds the model's trained context "
                         f"({model.n_ctx_train})")
    return toks[:context], toks[context:need]


def model_identity(path: str | Path) -> dict[str, Any]:
    """What tells two model files apart without hashing gigabytes: size and the sha256 of the
    first :data:`IDENTITY_BYTES` (GGUF header, metadata, tokenizer and the first tensors)."""
    p = Path(path)
    h = hashlib.sha256()
    with p.open("rb") as f:
        h.update(f.read(IDENTITY_BYTES))
    return {"name": p.name, "size": p.stat().st_size, "head_sha256": h.hexdigest()}


def _score(eng, ctx_toks: list[int], cont: list[int]) -> np.ndarray:
    """Logits after the context, then after each continuation token but the last."""
    rows = [eng.feed(ctx_toks)[None, :]]
    if len(cont) > 1:
        rows.append(eng.feed(cont[:-1], all_logits=True))
    return np.concatenate(rows)


def _cells(tokens: int) -> int:
    return tokens + 16


def compute_reference(model_path: str, model, *, text: str, context: int, continuation: int, engine_config,
                      offset: int = 0) -> KldReference:
    """Run the full cache over the text's tokens and keep its logits."""
    from spindle_local.runtime.engine import Engine, EngineConfig

    ctx_toks, cont = kld_tokens(model, text, context=context, continuation=continuation, offset=offset)
    cells = _cells(context + continuation)
    eng = Engine(model_path, EngineConfig(policy="full", n_cells=cells, max_tokens=cells,
                                          n_threads=engine_config.n_threads, flash_attn=engine_config.flash_attn),
                 model=model)
    try:
        logits = _score(eng, ctx_toks, cont)
    finally:
        eng.ctx.close()  # the model is shared: close only the context
    identity = {"model": model_identity(model_path), "text_sha256": hashlib.sha256(text.encode()).hexdigest(),
                "context": context, "continuation": continuation, "offset": offset,
                "flash_attn": bool(engine_config.flash_attn)}
    return KldReference(list(ctx_toks), list(cont), logits, identity)


def save_reference(ref: KldReference, path: Path) -> None:
    """Write ``ref`` to ``path`` (npz, whatever the suffix), creating its folder; atomic."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    meta = {"format": REFERENCE_FORMAT, **ref.identity}
    with tmp.open("wb") as f:  # a file object: np.savez would append .npz to a name
        np.savez(f, logits=ref.logits, tokens=np.asarray(ref.context + ref.continuation, dtype=np.int64),
                 meta=np.array(json.dumps(meta)))
    os.replace(tmp, path)


def _describe(identity: dict[str, Any]) -> str:
    m = identity.get("model") or {}
    return (f"model {m.get('name')} ({m.get('size')} bytes), context {identity.get('context')}, "
            f"continuation {identity.get('continuation')}, offset {identity.get('offset')}")


def load_reference(path: Path, *, model_path: str, model, text: str, context: int, continuation: int,
                   engine_config, offset: int = 0) -> KldReference:
    """The reference saved in ``path``, refused in one line unless it was made from this model,
    text, context, continuation, offset and flash-attention setting (the tokens are compared too)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            logits, tokens, meta = f["logits"], f["tokens"].tolist(), json.loads(str(f["meta"]))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise UsageError(f"--base {path} is not a saved KLD reference ({type(e).__name__})") from None
    if not isinstance(meta, dict) or meta.get("format") != REFERENCE_FORMAT:
        raise UsageError(f"--base {path} is not a saved KLD reference (unknown format)")
    ctx_toks, cont = kld_tokens(model, text, context=context, continuation=continuation, offset=offset)
    want = {"model": model_identity(model_path), "text_sha256": hashlib.sha256(text.encode()).hexdigest(),
            "context": context, "continuation": continuation, "offset": offset,
            "flash_attn": bool(engine_config.flash_attn)}
    names = {"model": "model", "text_sha256": "text", "context": "--context", "continuation": "--continuation",
             "offset": "--offset", "flash_attn": "--flash-attn"}
    differ = [names[k] for k in want if not _same(k, want[k], meta.get(k))]
    if not differ and tokens != list(ctx_toks) + list(cont):
        differ = ["tokens"]
    if differ:
        raise UsageError(f"--base {path} was saved for another run (not the same {', '.join(differ)}; it holds "
                         f"{_describe(meta)}): give another file or delete it")
    if logits.shape[0] != continuation:
        raise UsageError(f"--base {path} is damaged: {logits.shape[0]} rows of logits for {continuation} positions")
    identity = {k: meta[k] for k in want}
    return KldReference(list(ctx_toks), list(cont), logits, identity, loaded_from=str(path))


def _same(key: str, now: Any, saved: Any) -> bool:
    if key == "model":  # the file's name may change; its content may not
        return isinstance(saved, dict) and (saved.get("size"), saved.get("head_sha256")) == (
            now["size"], now["head_sha256"])
    return now == saved


def reference(model_path: str, model, *, text: str, context: int, continuation: int, engine_config,
              offset: int = 0, base: Path | None = None) -> KldReference:
    """The full-cache reference: read from ``base`` when that file exists, else computed (and
    written to ``base`` when one is given)."""
    kw = dict(text=text, context=context, continuation=continuation, engine_config=engine_config, offset=offset)
    if base is not None and base.exists():
        return load_reference(base, model_path=model_path, model=model, **kw)
    ref = compute_reference(model_path, model, **kw)
    if base is not None:
        save_reference(ref, base)
    return ref


def run_kld(model_path: str, *, text: str, context: int, continuation: int, engine_config,
            cache_type: str = "f16", offset: int = 0, model=None, ref: KldReference | None = None,
            base: Path | None = None) -> dict:
    """Read ``context`` tokens of ``text``, then score the next ``continuation`` against the full cache.

    ``model``: a loaded model to use (kept open; default: load one for this call). ``ref``:
    the full-cache reference of these tokens (default: :func:`reference`, with ``base``).
    """
    from spindle_local.runtime.engine import Engine, EngineConfig

    own = model is None
    if own:
        model = engine_config.load_model(model_path)
    try:
        if ref is None:
            ref = reference(model_path, model, text=text, context=context, continuation=continuation,
                            engine_config=engine_config, offset=offset, base=base)
        cells = _cells(context + continuation)
        base_kw = dict(n_threads=engine_config.n_threads, flash_attn=engine_config.flash_attn)
        if cache_type != "f16" or engine_config.policy == "full":
            cfg = EngineConfig(policy="full", n_cells=cells, max_tokens=cells, cache_type=cache_type, **base_kw)
        else:
            cfg = replace(engine_config)
        eng = Engine(model_path, cfg, model=model)
        try:
            comp_logits = _score(eng, ref.context, ref.continuation)
            s = eng.refresh_stats()
            # The ratio is taken after the whole continuation has been read (the state at the end).
            res = compare_logits(ref.logits, comp_logits, np.asarray(ref.continuation))
            ref.uses += 1
        finally:
            eng.ctx.close()
        return {
            "model": str(model_path),
            "policy": engine_config.policy if cache_type == "f16" else "full",
            "kv_budget": engine_config.kv_budget if cfg.policy != "full" else 1.0,
            "cache_type": cache_type,
            "context_tokens": context,
            "continuation_tokens": continuation,
            "offset_tokens": offset,
            "reserve_ratio": s.reserve_ratio,  # a quantized cache's bytes in its own type over f16's
            "kv_bytes": s.kv_bytes,
            "kv_bytes_full": s.full_bytes,
            **res.as_dict(),
            "reference": ref.origin(),
            "reference_file": ref.loaded_from or (str(base) if base is not None else None),
        }
    finally:
        if own:
            model.close()
