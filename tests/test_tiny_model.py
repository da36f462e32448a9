"""Tiny random-weight GGUF models: they load in llama.cpp, and the numpy reference
forward matches llama.cpp's logits.

Observed max |reference - llama.cpp| on logits (logit std ~3, f16 KV cache, 2 layers),
with the reference flags each llama.cpp kernel calls for (``_ref_flags``):

* flash attention on (llama.cpp's CPU default), batches >= 32 tokens (ggml's tiled
  f32 kernel), ``kv_f16=True``: 7e-5 .. 2.4e-3 (without K/V f16 rounding: 5e-3 .. 9e-3);
* flash attention on, batches < 32 tokens (ggml's vector kernel, f16 accumulator),
  ``flash_vec=True``: prompts 2e-6 .. 3e-3, one-token decode over < 256 cached
  tokens 2e-6 .. 1.4e-3 (with exact attention instead: 4e-3 .. 1.1e-2);
* flash attention off, ``q_f16=p_f16=True``: 2e-6 .. 4.3e-3 (plain: 3e-3 .. 1e-2);
* decode over >= 512 KV cells (llama.cpp splits the keys across threads, not
  replayed): ~5e-3 .. 8e-3 either way.

``LOGIT_ATOL`` leaves headroom for SIMD differences and is far below the effect of
masking a single token (> 5e-2, asserted in ``test_prefix_masks``).
"""

from __future__ import annotations

import numpy as np
import pytest

from spindle_local.testing.reference import PrefixKV, ReferenceModel, rope, unrope
from spindle_local.testing.tiny_gguf import TinySpec, write_tiny_llama

pytestmark = pytest.mark.model  # every test here loads a model (or the patched library)

llama_cpp = pytest.importorskip("llama_cpp")
from spindle_local.testing.llama_oracle import LlamaOracle  # noqa: E402

LOGIT_ATOL = 1e-2

CONFIGS = {
    "mha-d16": dict(n_head=4, n_head_kv=4, head_dim=16),
    "gqa-d16": dict(n_head=4, n_head_kv=2, head_dim=16),
    "gqa3-d32": dict(n_head=6, n_head_kv=2, head_dim=32, n_embd=96, seed=1),
    "mqa-d64-embd96": dict(n_head=4, n_head_kv=1, head_dim=64, n_embd=96, seed=2),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[TinySpec, ReferenceModel]]:
    d = tmp_path_factory.mktemp("tiny")
    out = {}
    for name, cfg in CONFIGS.items():
        spec = write_tiny_llama(d / f"{name}.gguf", **cfg)
        out[name] = (spec, ReferenceModel.load(spec.path))
    return out


def _tokens(n: int, n_vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n_vocab, n)


def _ref_flags(flash_attn: bool, n: int) -> dict[str, bool]:
    """Reference rounding flags mimicking llama.cpp's CPU kernel for an ``n``-token batch."""
    if flash_attn:
        # ggml-cpu as patched: tiled f32 kernel for >= 32 queries (ggml: 64), f16-accumulating
        # vector kernel below.
        return dict(kv_f16=True, flash_vec=n < 32)
    # Without flash attention mul_mat rounds Q and the softmax weights to f16.
    return dict(kv_f16=True, q_f16=True, p_f16=True)


def test_spec_roundtrip(models: dict[str, tuple[TinySpec, ReferenceModel]]) -> None:
    for spec, ref in models.values():
        assert (ref.n_layer, ref.n_embd, ref.n_head, ref.n_head_kv) == (
            spec.n_layer, spec.n_embd, spec.n_head, spec.n_head_kv)
        assert (ref.head_dim, ref.head_dim_v, ref.n_rot, ref.n_ff, ref.n_vocab) == (
            spec.head_dim, spec.head_dim, spec.head_dim, spec.n_ff, spec.n_vocab)
        assert ref.rope_base == spec.rope_base and ref.rms_eps == pytest.approx(spec.rms_eps)
        assert ref.layers[0].wq.shape == (spec.n_head * spec.head_dim, spec.n_embd)
        assert ref.layers[0].wk.shape == (spec.n_head_kv * spec.head_dim, spec.n_embd)


def test_loads_in_llama_cpp(models: dict[str, tuple[TinySpec, ReferenceModel]]) -> None:
    for spec, _ in models.values():
        with LlamaOracle(spec.path, n_ctx=64) as o:
            assert o.n_vocab == spec.n_vocab
            # Ids fed directly, including the control ids and the last id; no BOS added.
            logits = o.decode([1, 2, 0, spec.n_vocab - 1, 5])
            assert logits.shape == (5, spec.n_vocab) and np.isfinite(logits).all()


@pytest.mark.parametrize("flash_attn", [True, False], ids=["fa", "nofa"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_llama_cpp(models: dict[str, tuple[TinySpec, ReferenceModel]], name: str,
                                flash_attn: bool) -> None:
    spec, ref = models[name]
    with LlamaOracle(spec.path, n_ctx=128, flash_attn=flash_attn) as o:
        for n in (1, 7, 64):
            o.clear()
            toks = _tokens(n, spec.n_vocab, seed=n)
            got = o.decode(toks)
            want = ref.forward(toks, **_ref_flags(flash_attn, n)).logits
            diff = np.abs(got - want).max()
            assert diff < LOGIT_ATOL, f"{name} n={n}: max abs diff {diff:.2e}"


@pytest.mark.parametrize("name", ["gqa-d16", "mqa-d64-embd96"])
def test_large_positions_match(models: dict[str, tuple[TinySpec, ReferenceModel]], name: str) -> None:
    """Positions far from 0 check the RoPE angles (ggml builds them in f32)."""
    spec, ref = models[name]
    toks = _tokens(16, spec.n_vocab, seed=3)
    pos = np.arange(3000, 3016)
    with LlamaOracle(spec.path, n_ctx=64, flash_attn=True) as o:
        got = o.decode(toks, pos)
    want = ref.forward(toks, positions=pos, flash_vec=True).logits
    assert np.abs(got - want).max() < LOGIT_ATOL


@pytest.mark.parametrize("name", ["gqa-d16", "gqa3-d32"])
def test_continuation_matches_prefix_forward(models: dict[str, tuple[TinySpec, ReferenceModel]],
                                             name: str) -> None:
    """llama.cpp decoding B after A (A in its cache) == reference forward(B, prefix=K/V of A)."""
    spec, ref = models[name]
    a, b = _tokens(20, spec.n_vocab, seed=4), _tokens(9, spec.n_vocab, seed=5)
    with LlamaOracle(spec.path, n_ctx=64, flash_attn=True) as o:
        o.decode(a)
        got = o.decode(b, start=len(a))
    out_a = ref.forward(a, flash_vec=True)
    want = ref.forward(b, prefix=out_a.prefix(ref.n_head), flash_vec=True).logits  # positions 20..
    assert np.abs(got - want).max() < LOGIT_ATOL


@pytest.mark.parametrize("flash_attn", [True, False], ids=["fa", "nofa"])
@pytest.mark.parametrize("name", ["mha-d16", "gqa3-d32", "mqa-d64-embd96"])
def test_decode_steps_match(models: dict[str, tuple[TinySpec, ReferenceModel]], name: str,
                            flash_attn: bool) -> None:
    """One-token decode steps over a cache (the case the KV patch serves most)."""
    spec, ref = models[name]
    a, b = _tokens(40, spec.n_vocab, seed=10), _tokens(4, spec.n_vocab, seed=11)
    with LlamaOracle(spec.path, n_ctx=128, flash_attn=flash_attn) as o:
        o.decode(a)
        got = np.stack([o.decode([t], start=len(a) + i)[0] for i, t in enumerate(b)])
    out = ref.forward(a, **_ref_flags(flash_attn, len(a)))
    ks, vs = list(out.k), list(out.v)
    want = []
    for t in b:
        step = ref.forward([t], prefix=[PrefixKV.all_visible(k, v, ref.n_head) for k, v in zip(ks, vs)],
                           **_ref_flags(flash_attn, 1))
        want.append(step.logits[0])
        ks = [np.concatenate([k, k1]) for k, k1 in zip(ks, step.k)]
        vs = [np.concatenate([v, v1]) for v, v1 in zip(vs, step.v)]
    diff = np.abs(got - np.stack(want)).max()
    assert diff < (3e-3 if flash_attn else LOGIT_ATOL), f"max abs diff {diff:.2e}"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefix_all_visible_equals_concatenated_forward(
        models: dict[str, tuple[TinySpec, ReferenceModel]], name: str) -> None:
    spec, ref = models[name]
    toks = _tokens(30, spec.n_vocab, seed=6)
    full = ref.forward(toks)
    head = ref.forward(toks[:18])
    tail = ref.forward(toks[18:], prefix=[PrefixKV.all_visible(k, v, ref.n_head)
                                          for k, v in zip(head.k, head.v)])
    np.testing.assert_allclose(tail.logits, full.logits[18:], rtol=0, atol=1e-9)
    for il in range(ref.n_layer):
        np.testing.assert_allclose(tail.k[il], full.k[il][18:], atol=1e-12)
        np.testing.assert_allclose(tail.q[il], full.q[il][18:], atol=1e-12)
        np.testing.assert_allclose(tail.v[il], full.v[il][18:], atol=1e-12)
    assert np.array_equal(tail.positions, np.arange(18, 30))


def test_prefix_masks(models: dict[str, tuple[TinySpec, ReferenceModel]]) -> None:
    """Hiding a slot from all heads == dropping it; hiding from one head changes logits."""
    spec, ref = models["gqa-d16"]
    toks = _tokens(24, spec.n_vocab, seed=7)
    head = ref.forward(toks[:16])
    tail_toks, tail_pos = toks[16:], np.arange(16, 24)
    base = ref.forward(tail_toks, tail_pos, head.prefix(ref.n_head), return_attn=True)

    drop = [3, 4, 10]
    keep = np.setdiff1d(np.arange(16), drop)
    masked = []
    for k, v in zip(head.k, head.v):
        vis = np.ones((ref.n_head, 16), dtype=bool)
        vis[:, drop] = False
        masked.append(PrefixKV(k, v, vis))
    dropped = [PrefixKV.all_visible(k[keep], v[keep], ref.n_head) for k, v in zip(head.k, head.v)]
    lm = ref.forward(tail_toks, tail_pos, masked, return_attn=True)
    ld = ref.forward(tail_toks, tail_pos, dropped).logits
    np.testing.assert_allclose(lm.logits, ld, atol=1e-10)
    assert np.abs(lm.logits - base.logits).max() > 0.05  # attention is peaky enough to matter
    assert np.all(lm.attn[0][:, :, drop] == 0)
    np.testing.assert_allclose(base.attn[0].sum(axis=2), 1.0, atol=1e-12)

    # Per-query-head visibility: hide the prefix from query head 1 only (GQA group 0).
    one = []
    for k, v in zip(head.k, head.v):
        vis = np.ones((ref.n_head, 16), dtype=bool)
        vis[1] = False
        one.append(PrefixKV(k, v, vis))
    lo = ref.forward(tail_toks, tail_pos, one, return_attn=True)
    assert np.abs(lo.logits - base.logits).max() > 0.05
    assert np.all(lo.attn[0][1, :, :16] == 0)
    np.testing.assert_allclose(lo.attn[0][[0, 2, 3]], base.attn[0][[0, 2, 3]], atol=1e-12)


def test_kv_outputs_shapes_and_rope(models: dict[str, tuple[TinySpec, ReferenceModel]]) -> None:
    spec, ref = models["gqa3-d32"]
    toks = _tokens(10, spec.n_vocab, seed=8)
    pos = np.arange(100, 110)
    out = ref.forward(toks, pos, kv_f16=False)
    for il in range(ref.n_layer):
        assert out.q[il].shape == (10, 6, 32)
        assert out.k[il].shape == out.k_pre[il].shape == out.v[il].shape == (10, 2, 32)
        np.testing.assert_allclose(unrope(out.k[il], pos, ref.rope_base), out.k_pre[il], atol=1e-12)
    # With kv_f16 the stored K is the f16 rounding of rope(k_pre).
    out16 = ref.forward(toks, pos)
    k16 = rope(out16.k_pre[0], pos, ref.rope_base).astype(np.float16).astype(np.float64)
    np.testing.assert_array_equal(out16.k[0], k16)


def test_flash_vec_replay_consistent(models: dict[str, tuple[TinySpec, ReferenceModel]]) -> None:
    """The f16-accumulator replay stays near exact attention and skips masked slots exactly."""
    spec, ref = models["gqa-d16"]
    toks = _tokens(20, spec.n_vocab, seed=12)
    head = ref.forward(toks[:14])
    exact = ref.forward(toks[14:], prefix=head.prefix(ref.n_head))
    fv = ref.forward(toks[14:], prefix=head.prefix(ref.n_head), flash_vec=True)
    assert 0 < np.abs(fv.logits - exact.logits).max() < 2e-2
    drop = [2, 7]
    keep = np.setdiff1d(np.arange(14), drop)
    masked = []
    for k, v in zip(head.k, head.v):
        vis = np.ones((ref.n_head, 14), dtype=bool)
        vis[:, drop] = False
        masked.append(PrefixKV(k, v, vis))
    dropped = [PrefixKV.all_visible(k[keep], v[keep], ref.n_head) for k, v in zip(head.k, head.v)]
    pos = np.arange(14, 20)  # explicit: the default would start at the prefix length
    a = ref.forward(toks[14:], pos, prefix=masked, flash_vec=True).logits
    b = ref.forward(toks[14:], pos, prefix=dropped, flash_vec=True).logits
    np.testing.assert_array_equal(a, b)
