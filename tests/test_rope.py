"""RoPE (spindle_local/policy/rope.py): the rotation the runtime, the synthetic inputs and
the reference forward share, and the rotation read back off data. Model-free."""

from __future__ import annotations

import numpy as np
import pytest

from spindle_local.policy.rope import (
    ROPE_TYPE_NEOX,
    ROPE_TYPE_NORM,
    infer_rope,
    pair_layout,
    rope_angles,
    rope_supported,
    rotate,
)
from spindle_local.policy.synthetic import apply_rope
from spindle_local.testing.reference import rope, unrope


def test_rope_roundtrip_and_properties() -> None:
    rng = np.random.default_rng(9)
    for d, n_rot in ((16, None), (64, None), (32, 16)):
        x = rng.standard_normal((12, 3, d))
        pos = rng.integers(0, 8000, 12)
        y = rope(x, pos, 10000.0, n_rot)
        np.testing.assert_allclose(unrope(y, pos, 10000.0, n_rot), x, atol=1e-12)
        np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-12)
        if n_rot is not None:
            np.testing.assert_array_equal(y[..., n_rot:], x[..., n_rot:])
    x = rng.standard_normal((1, 1, 16))
    np.testing.assert_allclose(rope(x, [0], 10000.0), x, atol=0)
    # Adjacent-pair (NORM) convention: pair 0 rotates by pos radians.
    e = np.zeros((1, 1, 4))
    e[0, 0, 0] = 1.0
    y = rope(e, [1], 10000.0)
    np.testing.assert_allclose(y[0, 0], [np.cos(1.0), np.sin(1.0), 0.0, 0.0], atol=1e-12)
    # Relative property: <rope(q,m), rope(k,n)> depends on m-n only (up to f32 angles).
    q, k = rng.standard_normal((1, 1, 16)), rng.standard_normal((1, 1, 16))
    s1 = np.sum(rope(q, [50], 1e4) * rope(k, [40], 1e4))
    s2 = np.sum(rope(q, [1010], 1e4) * rope(k, [1000], 1e4))
    assert abs(s1 - s2) < 1e-3
    th = rope_angles(np.array([2.0]), 10000.0, 8)
    np.testing.assert_allclose(th[0], 2.0 * 10000.0 ** (-np.arange(4) * 2 / 8), rtol=1e-6)


def test_angles_are_ggml_float32_steps_unless_asked_for_exact() -> None:
    pos = np.array([0, 1, 70_000, 131_071])
    ggml = rope_angles(pos, 500_000.0, 128)
    exact = rope_angles(pos, 500_000.0, 128, float32_steps=False)
    np.testing.assert_array_equal(exact, pos[:, None] * 500_000.0 ** (-np.arange(0, 128, 2) / 128))
    # float32 steps drift from the exact angles at large positions, by more than f16 key precision
    assert 1e-4 < np.abs(ggml[-1] - exact[-1]).max() < 1e-1
    assert np.abs(ggml[1] - exact[1]).max() < 1e-6
    # freq_scale scales positions; factors divide each pair's frequency
    np.testing.assert_allclose(rope_angles(pos, 1e4, 8, freq_scale=0.25), rope_angles(pos / 4, 1e4, 8), rtol=1e-6)
    f = np.array([1.0, 2.0, 4.0, 8.0], np.float32)
    np.testing.assert_allclose(rope_angles(pos, 1e4, 8, factors=f), rope_angles(pos, 1e4, 8) / f, rtol=1e-6)


def test_pair_layouts() -> None:
    a, b = pair_layout(8, ROPE_TYPE_NORM)
    assert a.tolist() == [0, 2, 4, 6] and b.tolist() == [1, 3, 5, 7]
    a, b = pair_layout(8, ROPE_TYPE_NEOX)
    assert a.tolist() == [0, 1, 2, 3] and b.tolist() == [4, 5, 6, 7]
    # NEOX over a partial rotation: the halves of the rotated dims, the rest untouched
    x = np.random.default_rng(1).standard_normal((5, 2, 12)).astype(np.float32)
    y = rotate(x, np.arange(5) + 3, base=1e4, n_rot=8, rope_type=ROPE_TYPE_NEOX)
    np.testing.assert_array_equal(y[..., 8:], x[..., 8:])
    np.testing.assert_allclose(y[..., 0] ** 2 + y[..., 4] ** 2, x[..., 0] ** 2 + x[..., 4] ** 2, rtol=1e-5)


@pytest.mark.parametrize("rope_type", [ROPE_TYPE_NORM, ROPE_TYPE_NEOX])
def test_float32_rotation_is_the_float64_one_rounded(rope_type: int) -> None:
    """The runtime's float32 result is the float64 turn stored once: host un-RoPE stays exact."""
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((64, 3, 64)) * 4).astype(np.float32)
    pos = rng.integers(0, 100_000, 64)
    kw = dict(base=500_000.0, n_rot=64, rope_type=rope_type, freq_scale=0.5,
              factors=rng.uniform(1, 8, 32).astype(np.float32))
    for inverse in (False, True):
        y32 = rotate(x, pos, inverse=inverse, **kw)
        y64 = rotate(x, pos, inverse=inverse, dtype=np.float64, **kw)
        assert y32.dtype == np.float32 and y64.dtype == np.float64
        np.testing.assert_array_equal(y32, y64.astype(np.float32))
    back = rotate(rotate(x, pos, **kw), pos, inverse=True, **kw)
    np.testing.assert_allclose(back, x, atol=2e-5 * np.abs(x).max())


def test_rotate_refuses_bad_shapes() -> None:
    x = np.zeros((3, 1, 8), np.float32)
    with pytest.raises(ValueError, match="expected x"):
        rotate(x, [0, 1], base=1e4)
    with pytest.raises(ValueError, match="n_rot"):
        rotate(x, [0, 1, 2], base=1e4, n_rot=10)


def test_supported_variants() -> None:
    assert rope_supported(ROPE_TYPE_NORM, 0.0) and rope_supported(ROPE_TYPE_NEOX, 0.0)
    assert not rope_supported(ROPE_TYPE_NORM, 1.0)  # YaRN extrapolation
    assert not rope_supported(8, 0.0)  # M-RoPE


@pytest.mark.parametrize("rope_type", [ROPE_TYPE_NORM, ROPE_TYPE_NEOX])
def test_inferred_rotation_is_the_applied_one(rope_type: int) -> None:
    rng = np.random.default_rng(3)
    pre = rng.standard_normal((40, 2, 16)).astype(np.float32)
    pos = np.arange(40)
    post = rotate(pre, pos, base=1e4, rope_type=rope_type)
    rm = infer_rope(pre, post)
    assert rm is not None
    ia, ib = pair_layout(16, rope_type)
    assert rm.idx_a.tolist() == ia.tolist() and rm.idx_b.tolist() == ib.tolist()
    theta = rope_angles(pos, 1e4, 16)
    np.testing.assert_allclose(rm.cos, np.cos(theta), atol=1e-5)
    np.testing.assert_allclose(rm.sin, np.sin(theta), atol=1e-5)
    np.testing.assert_allclose(rm.rotate(pre[:, 1]), post[:, 1], atol=1e-5)
    np.testing.assert_allclose(rm.rotate(pre[5:9, 0], np.arange(5, 9)), post[5:9, 0], atol=1e-5)


def test_synthetic_keys_carry_a_norm_rotation() -> None:
    rng = np.random.default_rng(4)
    x = rng.standard_normal((30, 3, 64)).astype(np.float32)
    pos = np.arange(100, 130)
    y = apply_rope(x, pos)
    assert y.dtype == np.float32
    exact = pos[:, None] * 10000.0 ** (-np.arange(0, 64, 2) / 64)
    np.testing.assert_allclose(y[..., 0::2], x[..., 0::2] * np.cos(exact)[:, None] - x[..., 1::2] * np.sin(exact)[:, None],
                               atol=1e-5)
