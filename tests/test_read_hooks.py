"""Read hooks of the spindle-local llama.cpp patch against what llama.cpp computed.

The oracle is llama.cpp itself: the eval callback captures ``Kcur-<il>`` (the keys
right after RoPE, the node that is copied into the cache) and ``Vcur-<il>`` for every
layer; the read hook must return exactly those values after f16 storage, ordered by
position.
"""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest

from spindle_local.errors import RuntimeNotPatchedError
from spindle_local.runtime import native
from spindle_local.runtime.lowlevel import LlamaContext, LlamaModel, TensorCapture
from spindle_local.runtime.model_files import default_model_path
from spindle_local.testing.tiny_gguf import write_tiny_llama


@pytest.fixture(scope="module")
def smollm() -> LlamaModel:
    return LlamaModel(default_model_path())


@pytest.fixture(scope="module")
def tiny_gqa(tmp_path_factory: pytest.TempPathFactory) -> LlamaModel:
    path = Path(tmp_path_factory.mktemp("tiny")) / "gqa.gguf"
    write_tiny_llama(path, n_layer=3, n_embd=96, n_head=6, n_head_kv=2, head_dim=32, seed=3)
    return LlamaModel(path)


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(np.float32)


def _check_all_layers(model: LlamaModel, tokens: list[int], positions: np.ndarray, flash_attn: bool) -> None:
    cap = TensorCapture(lambda name: name.startswith(("Kcur-", "Vcur-")))
    with LlamaContext(model, n_ctx=256, n_batch=64, flash_attn=flash_attn, cb_eval=cap) as ctx:
        ctx.decode(tokens, positions)
        geo = ctx.geometry()
        assert geo.flash_attn == flash_attn
        assert geo.v_trans == (not flash_attn)  # llama.cpp keeps V transposed without FA
        assert ctx.kv_used() == len(tokens)
        for il in range(geo.n_layer):
            lg = geo.layers[il]
            k, v, pos = ctx.read_layer_kv(il)
            n = len(tokens)
            assert k.shape == (n, lg.n_head_kv, lg.head_dim_k)
            assert v.shape == (n, lg.n_head_kv, lg.head_dim_v)
            np.testing.assert_array_equal(pos, np.sort(positions))
            order = np.argsort(positions)
            k_ref = cap.tensors[f"Kcur-{il}"].reshape(n, lg.n_head_kv, lg.head_dim_k)[order]
            v_ref = cap.tensors[f"Vcur-{il}"].reshape(n, lg.n_head_kv, lg.head_dim_v)[order]
            # the cache stores f16: the hook returns exactly the rounded values
            np.testing.assert_allclose(k, _f16(k_ref), rtol=1e-3, atol=1e-6, err_msg=f"K layer {il}")
            np.testing.assert_allclose(v, _f16(v_ref), rtol=1e-3, atol=1e-6, err_msg=f"V layer {il}")


@pytest.mark.model
@pytest.mark.parametrize("flash_attn", [False, True])
def test_read_hooks_smollm2(smollm: LlamaModel, flash_attn: bool) -> None:
    tokens = smollm.tokenize("The quick brown fox jumps over the lazy dog, again and again.")
    positions = np.arange(len(tokens), dtype=np.int32)
    _check_all_layers(smollm, tokens, positions, flash_attn)


@pytest.mark.model
@pytest.mark.parametrize("flash_attn", [False, True])
def test_read_hooks_tiny_gqa(tiny_gqa: LlamaModel, flash_attn: bool) -> None:
    rng = np.random.default_rng(0)
    tokens = [int(t) for t in rng.integers(3, tiny_gqa.n_vocab, size=40)]
    # positions need not start at 0
    positions = np.arange(100, 140, dtype=np.int32)
    _check_all_layers(tiny_gqa, tokens, positions, flash_attn)


@pytest.mark.model
def test_geometry_smollm2(smollm: LlamaModel) -> None:
    with LlamaContext(smollm, n_ctx=256) as ctx:
        geo = ctx.geometry()
    assert (geo.n_layer, geo.n_head, geo.n_head_kv, geo.head_dim_k, geo.head_dim_v) == (30, 9, 3, 64, 64)
    assert geo.n_ctx == 256 and geo.n_ctx_train == 8192
    assert geo.swa_layers() == [] and geo.n_swa == 0
    assert all(lg.n_rot == 64 and lg.has_kv for lg in geo.layers)
    assert geo.freq_base == pytest.approx(100000.0)
    assert geo.type_k == 1 and geo.type_v == 1  # f16


@pytest.mark.model
def test_read_after_seq_rm(smollm: LlamaModel) -> None:
    tokens = smollm.tokenize("one two three four five six seven eight nine ten")
    with LlamaContext(smollm, n_ctx=256) as ctx:
        ctx.decode(tokens)
        k_all, v_all, _ = ctx.read_layer_kv(5)
        assert ctx.seq_rm(0, 4)
        k, v, pos = ctx.read_layer_kv(5)
        np.testing.assert_array_equal(pos, np.arange(4, len(tokens)))
        np.testing.assert_array_equal(k, k_all[4:])
        np.testing.assert_array_equal(v, v_all[4:])


@pytest.mark.model
def test_query_capture_on_and_off(smollm: LlamaModel) -> None:
    """The patch's query capture: rows only while armed (reused graphs included), the last
    ubatch's last rows, and logits that do not depend on it."""
    tokens = smollm.tokenize("one two three four five six seven eight nine ten")
    lg = native.get_geometry
    with LlamaContext(smollm, n_ctx=256) as ctx:
        geo = lg(ctx).layers[0]
        native.capture(ctx, 4)
        ctx.decode(tokens)
        rows = native.capture_read(ctx, 3, 4, geo.n_head, geo.head_dim_k)
        assert rows.shape == (4, geo.n_head, geo.head_dim_k) and np.abs(rows).sum() > 0
        seen = []
        for i, on in enumerate([False, False, True, True, False]):
            native.capture(ctx, 4 if on else 0)
            ctx.decode([tokens[i]])  # one-token graphs: reused while the setting stays
            seen.append(native.capture_read(ctx, 3, 4, geo.n_head, geo.head_dim_k).shape[0])
            if i == 3:
                on_logits = ctx.logits().copy()
        assert seen == [0, 0, 1, 1, 0]
    with LlamaContext(smollm, n_ctx=256) as ref:  # never captured
        ref.decode(tokens)
        for t in tokens[:4]:
            ref.decode([t])
        np.testing.assert_array_equal(ref.logits(), on_logits)


@pytest.mark.model
def test_bad_layer_is_a_clear_error(smollm: LlamaModel) -> None:
    with LlamaContext(smollm, n_ctx=256) as ctx:
        with pytest.raises(native.NativeError, match="layer 30 out of range"):
            native.read_layer_kv(ctx, 30)


def test_unpatched_library_raises() -> None:
    fake = types.SimpleNamespace()  # a stock libllama: no llama_spindle_* symbols
    with pytest.raises(RuntimeNotPatchedError, match="spindle-local setup") as info:
        native.native(fake)
    assert "\n" not in str(info.value)


def test_other_api_version_raises() -> None:
    bad = native.API_VERSION + 1
    # every symbol present, but llama_spindle_api_version() answers another version
    fake = types.SimpleNamespace(**{name: (lambda *args: bad) for name in native._SIGNATURES})
    with pytest.raises(RuntimeNotPatchedError, match="spindle-local setup") as info:
        native.native(fake)
    assert "\n" not in str(info.value)
