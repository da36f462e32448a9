"""Codebook invariants: cosine guarantee, error bound, lossless theta=1, reconstruction."""

from __future__ import annotations

import numpy as np
import pytest

from spindle_local.policy.codebook import (
    build_codebook,
    distinct_prefix_counts,
    split_magnitude,
    subset_codebook,
)


def clustered(rng, n, d, n_clusters, noise):
    c = rng.standard_normal((n_clusters, d)).astype(np.float32)
    x = c[rng.integers(0, n_clusters, n)] + noise * rng.standard_normal((n, d)).astype(np.float32)
    return x * rng.uniform(0.5, 2.0, (n, 1)).astype(np.float32)


def cosines(cb, x):
    _, u = split_magnitude(x)
    return np.einsum("nd,nd->n", u.astype(np.float64), cb.entries[cb.index].astype(np.float64))


@pytest.mark.parametrize("theta", [0.8, 0.95, 0.98])
@pytest.mark.parametrize("noise", [0.05, 0.2, 0.6])
def test_cover_guarantees(theta, noise):
    rng = np.random.default_rng(int(theta * 100 + noise * 10))
    x = clustered(rng, 600, 32, 25, noise)
    cb = build_codebook(x, theta)
    assert cb.index.shape == (600,) and cb.magnitude.shape == (600,)
    assert cb.index.min() >= 0 and cb.index.max() < cb.n_entries
    np.testing.assert_allclose(np.linalg.norm(cb.entries, axis=1), 1.0, atol=1e-5)
    assert np.all(cosines(cb, x) > theta - 1e-6)
    rel = np.linalg.norm(cb.reconstruct() - x, axis=1) / np.linalg.norm(x, axis=1)
    assert np.all(rel <= np.sqrt(2 - 2 * theta) + 1e-5)
    # every entry is used and is the direction of one of its own members
    assert len(np.unique(cb.index)) == cb.n_entries


def test_redundancy_is_found():
    rng = np.random.default_rng(1)
    x = clustered(rng, 1000, 32, 10, 0.02)
    cb = build_codebook(x, 0.95)
    assert cb.n_entries <= 20


def test_greedy_takes_highest_degree_first():
    # a star: centre 0 is similar to 1..3, which are not similar to each other
    d = 8
    base = np.zeros((4, d), np.float32)
    base[0, 0] = 1
    for i in range(1, 4):
        base[i, 0] = 1
        base[i, i] = 0.45
    cb = build_codebook(base, 0.9)
    assert cb.n_entries == 1 and np.all(cb.index == 0)
    np.testing.assert_allclose(cb.entries[0], base[0] / np.linalg.norm(base[0]))


def test_theta_one_is_lossless():
    rng = np.random.default_rng(2)
    x = clustered(rng, 300, 16, 5, 1e-4)
    x[10] = x[11]  # exact duplicate
    cb = build_codebook(x, 1.0)
    np.testing.assert_allclose(cb.reconstruct(), x, rtol=1e-6, atol=1e-6)


def test_zero_vectors_survive():
    x = np.zeros((5, 8), np.float32)
    x[2] = 1.0
    cb = build_codebook(x, 0.95)
    np.testing.assert_allclose(cb.reconstruct(), x, atol=1e-7)


def test_reconstruct_is_entry_times_magnitude():
    rng = np.random.default_rng(3)
    x = clustered(rng, 200, 16, 6, 0.05)
    cb = build_codebook(x, 0.95)
    assert cb.n_entries < 100
    expect = cb.entries[cb.index].astype(np.float64) * cb.magnitude[:, None]
    out = cb.reconstruct()
    assert out.dtype == np.float32 and out.shape == x.shape
    np.testing.assert_allclose(out, expect, rtol=1e-6)
    # within the cosine guarantee of the originals, scaled by their norms
    err = np.linalg.norm(out - x, axis=1) / np.linalg.norm(x, axis=1)
    assert err.max() < np.sqrt(2 - 2 * 0.95) + 1e-5


def test_subset_and_prefix_counts():
    rng = np.random.default_rng(5)
    x = clustered(rng, 200, 16, 15, 0.05)
    cb = build_codebook(x, 0.95)
    order = rng.permutation(200)
    counts = distinct_prefix_counts(cb.index, order)
    for s in (0, 1, 17, 100, 200):
        sub = subset_codebook(cb, order[:s])
        assert sub.n_entries == counts[s] == len(np.unique(cb.index[order[:s]]))
        np.testing.assert_allclose(sub.reconstruct(), cb.reconstruct()[order[:s]], rtol=1e-6)


def test_block_size_does_not_change_result():
    rng = np.random.default_rng(6)
    x = clustered(rng, 500, 16, 30, 0.2)
    a = build_codebook(x, 0.95, block=7)
    b = build_codebook(x, 0.95, block=512)
    c = build_codebook(x, 0.95, block=1)  # forces the recompute path
    assert np.array_equal(a.index, b.index) and np.array_equal(a.index, c.index)
