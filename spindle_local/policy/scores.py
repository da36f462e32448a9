"""Window attention scores: how much attention each old token receives from the window.

For query head ``q`` with window queries ``Q`` (post-RoPE) the policy forms
``A = softmax(Q K^T * scale + causal mask)`` over *all* keys the window queries see: the
old tokens being compressed and, when given, the recent uncompressed keys (which include
the window itself). Normalising over the recent keys too is deliberate: it is the real
attention distribution, so a window query that looks mostly at recent tokens contributes
little to old-token scores, instead of having its leftover mass renormalised onto them.
An old token's score is its attention averaged over the window queries whose position
lets them see it.

The Q K^T products (``_logits_nb`` / :func:`attention_logits_ref`), the masked softmax
and the column average are numba kernels, loaded at their first call (:mod:`.jit`): only
layers read to the host need them; the latter two are fused in ``_softmax_colmean_nb``
(reference :func:`softmax_colmean_ref`). Pooling (max or average over ``kernel``
neighbouring positions, 'same' padding, SnapKV style) is vectorised numpy,
:func:`pool_scores` (reference :func:`pool_ref`), since every layer's scores pass
through it, including the layers scored in the patch.
"""

from __future__ import annotations

import math

import numpy as np

from .inputs import Geometry, LayerInput
from .jit import lazy_njit
from .stages import WindowScorer

# Logit of a (token, KV head) pair the store no longer holds. Finite on purpose: the
# kernels use fastmath, which assumes no infinities; exp() of it underflows to 0.
UNAVAILABLE_LOGIT = np.float32(-1e30)


@lazy_njit(cache=True, fastmath=True, nogil=True)
def _softmax_colmean_nb(
    logits_old: np.ndarray,  # f32 [H, w, n]
    logits_rec: np.ndarray,  # f32 [H, w, r]
    q_pos: np.ndarray,  # i64 [w]
    pos_old: np.ndarray,  # i64 [n]
    pos_rec: np.ndarray,  # i64 [r]
) -> np.ndarray:
    n_h, w, n = logits_old.shape
    r = logits_rec.shape[2]
    out = np.zeros((n_h, n), dtype=np.float32)
    count = np.zeros(n, dtype=np.float32)
    for i in range(w):
        p = q_pos[i]
        for a in range(n):
            if pos_old[a] <= p:
                count[a] += 1.0
    for h in range(n_h):
        acc = np.zeros(n, dtype=np.float64)
        for i in range(w):
            p = q_pos[i]
            m = -np.inf
            for a in range(n):
                if pos_old[a] <= p and logits_old[h, i, a] > m:
                    m = logits_old[h, i, a]
            for b in range(r):
                if pos_rec[b] <= p and logits_rec[h, i, b] > m:
                    m = logits_rec[h, i, b]
            if m == -np.inf:
                continue
            z = 0.0
            row = np.empty(n, dtype=np.float32)
            for a in range(n):
                if pos_old[a] <= p:
                    e = math.exp(logits_old[h, i, a] - m)
                    row[a] = e
                    z += e
                else:
                    row[a] = 0.0
            for b in range(r):
                if pos_rec[b] <= p:
                    z += math.exp(logits_rec[h, i, b] - m)
            inv = 1.0 / z
            for a in range(n):
                acc[a] += row[a] * inv
        for a in range(n):
            if count[a] > 0:
                out[h, a] = acc[a] / count[a]
    return out


def softmax_colmean_ref(
    logits_old: np.ndarray,
    logits_rec: np.ndarray,
    q_pos: np.ndarray,
    pos_old: np.ndarray,
    pos_rec: np.ndarray,
) -> np.ndarray:
    """Plain-numpy reference of ``_softmax_colmean_nb``: masked softmax, mean over seeing queries."""
    lo = logits_old.astype(np.float64)
    lr = logits_rec.astype(np.float64)
    vis_o = pos_old[None, :] <= q_pos[:, None]  # [w, n]
    vis_r = pos_rec[None, :] <= q_pos[:, None]  # [w, r]
    lo = np.where(vis_o[None], lo, -np.inf)
    lr = np.where(vis_r[None], lr, -np.inf)
    full = np.concatenate([lo, lr], axis=2)
    m = full.max(axis=2, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(full - m)
    z = e.sum(axis=2, keepdims=True)
    z = np.where(z > 0, z, 1.0)
    a = (e / z)[:, :, : lo.shape[2]]
    count = vis_o.sum(axis=0)
    return (a.sum(axis=1) / np.maximum(count, 1)[None, :]).astype(np.float32)


def pool_ref(scores: np.ndarray, kernel: int, mode: str) -> np.ndarray:
    """Loop reference of :func:`pool_scores`: 'same'-size 1-D pooling, the window
    ``[a - kernel // 2, a - kernel // 2 + kernel)`` of each position clipped to the valid part."""
    n_h, n = scores.shape
    out = np.empty_like(scores)
    half = kernel // 2
    for h in range(n_h):
        for a in range(n):
            win = scores[h, max(0, a - half): min(n, a - half + kernel)]
            out[h, a] = win.max() if mode == "max" else win.astype(np.float64).mean()
    return out


def pool_scores(scores: np.ndarray, kernel: int, mode: str | None) -> np.ndarray:
    """Pool [H, n] scores over neighbouring positions (array order = position order).

    Vectorised numpy over ``H x n`` floats (reference :func:`pool_ref`): the maximum over
    ``kernel`` shifted views of the ``-inf``-padded scores; the average from running sums.
    """
    if mode in (None, "none") or kernel <= 1 or scores.shape[1] == 0:
        return scores
    n_h, n = scores.shape
    half = kernel // 2
    pad_l, pad_r = half, kernel - 1 - half
    if mode == "max":
        padded = np.pad(scores, ((0, 0), (pad_l, pad_r)), constant_values=-np.inf)
        out = padded[:, :n].copy()
        for k in range(1, kernel):  # kernel - 1 elementwise passes
            np.maximum(out, padded[:, k:k + n], out=out)
        return out
    csum = np.zeros((n_h, n + 1))
    np.cumsum(scores, axis=1, dtype=np.float64, out=csum[:, 1:])
    a = np.arange(n)
    lo, hi = np.maximum(0, a - half), np.minimum(n, a - half + kernel)
    return ((csum[:, hi] - csum[:, lo]) / (hi - lo)[None, :]).astype(scores.dtype)


@lazy_njit(cache=True, fastmath=True, nogil=True)
def _logits_nb(q: np.ndarray, k: np.ndarray, g: int, scale: np.float32) -> np.ndarray:
    w, n_h, d = q.shape
    n = k.shape[0]
    out = np.empty((n_h, w, n), dtype=np.float32)
    for a in range(n):
        for hq in range(n_h):
            h = hq // g
            for i in range(w):
                s = np.float32(0.0)
                for t in range(d):
                    s += q[i, hq, t] * k[a, h, t]
                out[hq, i, a] = s * scale
    return out


def attention_logits_ref(q: np.ndarray, k: np.ndarray, g: int, scale: float) -> np.ndarray:
    """Numpy reference of ``_logits_nb``: scaled logits [H, w, n]; query head ``hq`` uses KV head ``hq // g``."""
    kk = np.repeat(k.astype(np.float64), g, axis=1)  # [n, H, d]
    return (np.einsum("whd,nhd->hwn", q.astype(np.float64), kk) * scale).astype(np.float32)


def attention_logits(q: np.ndarray, k: np.ndarray, g: int, scale: float) -> np.ndarray:
    """Scaled logits [H, w, n] of queries [w, H, d] against keys [n, Hkv, d] (GQA aware).

    A numba loop rather than BLAS on purpose: these are thin products (w = 32 rows) and
    multithreaded OpenBLAS on a small shared machine was measured 20x slower than one
    thread; the loop reads K in its native [n, Hkv, d] layout without copies.
    """
    q = np.ascontiguousarray(q, dtype=np.float32)
    k = np.ascontiguousarray(k, dtype=np.float32)
    return _logits_nb(q, k, int(g), np.float32(scale))


def window_scores(
    inp: LayerInput,
    geometry: Geometry,
    scorer: WindowScorer,
    *,
    sinks: int,
    scale: float,
    use_numba: bool = True,
    logits: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Per-query-head scores float32 [H, n] of the old tokens (pooled, sinks *not* protected;
    with pooling, the sinks' own scores are zeroed before pooling): :func:`pool_window_scores`
    of :func:`raw_window_scores`."""
    raw = raw_window_scores(inp, geometry, scorer, scale=scale, use_numba=use_numba, logits=logits)
    return pool_window_scores(raw, inp, scorer, sinks=sinks)


def raw_window_scores(
    inp: LayerInput,
    geometry: Geometry,
    scorer: WindowScorer,
    *,
    scale: float,
    use_numba: bool = True,
    logits: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Per-query-head window attention float32 [H, n] of the old tokens, before pooling.

    ``scorer.value_weight`` multiplies each token's attention by the norm of its value vector
    (relative to the KV head's mean value norm): what a token adds to the attention
    output is its weight times its value, so a token with a tiny value contributes
    little however much attention it gets (value-aware token pruning).
    """
    n = inp.n
    value_weight = scorer.value_weight
    if n == 0:
        return np.zeros((geometry.n_head, 0), dtype=np.float32)
    if inp.attn is not None:  # computed by the runtime where the KV lives
        s = np.array(inp.attn, dtype=np.float32, copy=True)
        return s * value_norm_weights(inp, geometry) if value_weight else s
    if inp.q_window.shape[0] == 0:
        # no observation window (nothing to score with): fall back to recency, so that
        # selection degrades to StreamingLLM instead of keeping the oldest tokens
        pos = np.asarray(inp.positions, dtype=np.float64)
        rec = (pos - pos.min() + 1.0) / (pos.max() - pos.min() + 1.0)
        return np.tile(rec.astype(np.float32) * 1e-3, (geometry.n_head, 1))
    pos_old = np.asarray(inp.positions, dtype=np.int64)
    rec_pos = inp.resolved_recent_positions()
    if rec_pos is None or not scorer.include_recent:
        rec_pos = np.zeros(0, dtype=np.int64)
    q_pos = np.asarray(inp.q_positions, dtype=np.int64)
    fn = _softmax_colmean_nb if use_numba else softmax_colmean_ref
    if logits is not None:
        s = fn(logits[0], logits[1], q_pos, pos_old, rec_pos.astype(np.int64))
    else:
        # one GQA group at a time: the logits of a group are g·w·n floats, where the whole
        # layer's would be H·w·n (the largest transient of a plan at long contexts)
        s = np.concatenate([fn(*group_logits(inp, geometry, scorer, scale, h), q_pos, pos_old, rec_pos.astype(np.int64))
                            for h in range(geometry.n_head_kv)])
    if value_weight:
        s = s * value_norm_weights(inp, geometry)
    return s


def pool_window_scores(raw: np.ndarray, inp: LayerInput, scorer: WindowScorer, *, sinks: int) -> np.ndarray:
    """``raw`` [H, n] pooled along positions (``scorer.pooling``; a copy, ``raw`` is kept).

    Tokens are scored in the order of ``inp.positions``; pooling assumes that order is the
    position order (the engine passes old tokens sorted; otherwise they are sorted here).
    """
    if raw.shape[1] == 0 or inp.q_window.shape[0] == 0 or scorer.pooling == "none" or scorer.kernel <= 1:
        return raw.copy()
    pos_old = np.asarray(inp.positions, dtype=np.int64)
    # sinks are kept regardless; zero them first so that pooling does not spread
    # token 0's large score (a sink even without BOS) onto its neighbours
    s = raw.copy()
    s[:, pos_old < sinks] = 0.0
    order = np.argsort(pos_old, kind="stable")
    sorted_already = bool(np.all(order == np.arange(len(pos_old))))
    ss = s if sorted_already else s[:, order]
    ss = pool_scores(ss, scorer.kernel, scorer.pooling)
    if sorted_already:
        return ss
    out = np.empty_like(ss)
    out[:, order] = ss
    return out


def value_norm_weights(inp: LayerInput, geometry: Geometry) -> np.ndarray:
    """float32 [H, n]: each token's value norm over its KV head's mean value norm
    (placeholder rows of absent pairs excluded from the mean)."""
    if inp.v_norm is not None:
        vn = np.asarray(inp.v_norm, dtype=np.float32)
    else:
        vn = np.linalg.norm(np.asarray(inp.v, dtype=np.float32), axis=2)  # [n, Hkv]
    avail = inp.available_mask()
    ok = np.ones_like(vn, dtype=bool) if avail is None else avail
    mean = np.array([vn[ok[:, h], h].mean() if ok[:, h].any() else 1.0 for h in range(vn.shape[1])])
    w = vn / np.maximum(mean, 1e-12)[None, :]
    return np.repeat(w.T, geometry.g, axis=0).astype(np.float32)


def _logits_for(inp: LayerInput, geometry: Geometry, scorer: WindowScorer, scale: float,
                heads: slice, kv_heads: slice) -> tuple[np.ndarray, np.ndarray]:
    g = geometry.g
    q = inp.q_window[:, heads]
    lo = attention_logits(q, inp.k[:, kv_heads], g, scale)
    avail = inp.available_mask()
    if avail is not None:  # absent (token, KV head) pairs get no attention
        av = avail[:, kv_heads]
        for j in range(lo.shape[0]):
            lo[j][:, ~av[:, j // g]] = UNAVAILABLE_LOGIT
    if inp.k_recent is not None and scorer.include_recent and inp.k_recent.shape[0] > 0:
        lr = attention_logits(q, inp.k_recent[:, kv_heads], g, scale)
    else:
        lr = np.zeros((lo.shape[0], inp.q_window.shape[0], 0), dtype=np.float32)
    return lo, lr


def layer_logits(
    inp: LayerInput, geometry: Geometry, scorer: WindowScorer, scale: float
) -> tuple[np.ndarray, np.ndarray]:
    """(old-token logits [H, w, n], recent-key logits [H, w, r]) of the window queries."""
    return _logits_for(inp, geometry, scorer, scale, slice(None), slice(None))


def group_logits(
    inp: LayerInput, geometry: Geometry, scorer: WindowScorer, scale: float, h: int
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`layer_logits` of the ``g`` query heads of KV head ``h`` only ([g, w, n], [g, w, r])."""
    g = geometry.g
    return _logits_for(inp, geometry, scorer, scale, slice(h * g, (h + 1) * g), slice(h, h + 1))
