"""Codebook replacement of one KV head's K (pre-RoPE) or V vectors (DESIGN.md section 1).

Each vector is split into a magnitude ``m_i = ||x_i||`` and a direction ``u_i = x_i / m_i``.
Nodes ``i``, ``j`` are joined when ``cos(u_i, u_j) > theta``; a greedy cover repeatedly
takes the node with the highest *remaining* degree as an entry, maps it and its remaining
neighbours to it and removes them (updating their neighbours' degrees); nodes left with
no neighbours become their own entries. ``x~_i = entries[index_i] * m_i``, so the
relative error of every vector is ``||u_i - c|| = sqrt(2 - 2 cos) < sqrt(2 - 2 theta)``.

Memory is O(n * block): the n x n graph is never materialised. ``_greedy_cover_nb``
computes all degrees in one pass over the pairs (a numba loop, four rows at a time),
and keeps the edges themselves only while they fit in a buffer of ``n * block`` pairs
(typical: redundancy is clustered, edges are few). With the edges kept, the cover runs
on adjacency lists in O(edges). When they do not fit, the cover *recomputes* similarities instead: the chosen entry scans the live nodes for its
neighbours, and every removed node scans the live nodes that still have a neighbour to
decrement their degrees (about one more pass over the pairs; nodes without live
neighbours leave the scans early). Both paths are the exact greedy of the definition,
not an approximation, and give the same cover.

``theta >= 1`` is lossless by construction: no graph, every token is its own entry
(floating-point cosines of distinct but very close directions can round to 1.0, so a
graph at ``theta = 1`` would not be exact).

A codebook's vectors come back with :meth:`.plan.Codebook.reconstruct`.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .plan import Codebook


@njit(cache=True, fastmath=True, inline="always")
def _dot(a: np.ndarray, i: int, b: np.ndarray, j: int) -> float:
    s = np.float32(0.0)
    for t in range(a.shape[1]):
        s += a[i, t] * b[j, t]
    return s


@njit(cache=True, fastmath=True, inline="always")
def _edge(deg, pair_i, pair_j, n_pairs, cap, i, j):
    deg[i] += 1
    deg[j] += 1
    if n_pairs < cap:
        pair_i[n_pairs] = i
        pair_j[n_pairs] = j
    return n_pairs + 1


@njit(cache=True, fastmath=True, nogil=True)
def _degree_pass(u: np.ndarray, th: np.float32, cap: int):
    """Degrees of the similarity graph; the first ``cap`` edges are kept as pairs.

    Four rows ``i`` at a time against every later row ``j`` (one load of ``u_j`` serves
    four dot products): about twice the speed of one pair at a time.
    """
    n, d = u.shape
    deg = np.zeros(n, dtype=np.int64)
    pair_i = np.empty(cap, dtype=np.int32)
    pair_j = np.empty(cap, dtype=np.int32)
    n_pairs = 0
    i0 = 0
    while i0 + 4 <= n:
        for j in range(i0 + 1, n):
            s0 = np.float32(0.0)
            s1 = np.float32(0.0)
            s2 = np.float32(0.0)
            s3 = np.float32(0.0)
            for t in range(d):
                x = u[j, t]
                s0 += u[i0, t] * x
                s1 += u[i0 + 1, t] * x
                s2 += u[i0 + 2, t] * x
                s3 += u[i0 + 3, t] * x
            if s0 > th:
                n_pairs = _edge(deg, pair_i, pair_j, n_pairs, cap, i0, j)
            if j > i0 + 1 and s1 > th:
                n_pairs = _edge(deg, pair_i, pair_j, n_pairs, cap, i0 + 1, j)
            if j > i0 + 2 and s2 > th:
                n_pairs = _edge(deg, pair_i, pair_j, n_pairs, cap, i0 + 2, j)
            if j > i0 + 3 and s3 > th:
                n_pairs = _edge(deg, pair_i, pair_j, n_pairs, cap, i0 + 3, j)
        i0 += 4
    for i in range(i0, n):
        for j in range(i + 1, n):
            if _dot(u, i, u, j) > th:
                n_pairs = _edge(deg, pair_i, pair_j, n_pairs, cap, i, j)
    return deg, pair_i, pair_j, n_pairs


@njit(cache=True, fastmath=True, nogil=True)
def _greedy_cover_nb(u: np.ndarray, theta: float, block: int) -> tuple[np.ndarray, np.ndarray]:
    n = u.shape[0]
    th = np.float32(theta)
    # Pass 1: degrees; the edges are kept only while they fit in n * block pairs.
    cap = n * block
    deg, pair_i, pair_j, n_pairs = _degree_pass(u, th, cap)
    stored = n_pairs <= cap
    # adjacency lists (CSR) when the edges fit
    ptr = np.zeros(n + 1, dtype=np.int64)
    nbr = np.empty(2 * n_pairs if stored else 0, dtype=np.int32)
    if stored:
        for i in range(n):
            ptr[i + 1] = ptr[i] + deg[i]
        fill = ptr[:-1].copy()
        for p in range(n_pairs):
            a = pair_i[p]
            b = pair_j[p]
            nbr[fill[a]] = b
            fill[a] += 1
            nbr[fill[b]] = a
            fill[b] += 1
    assign = np.full(n, -1, dtype=np.int64)
    centres = np.empty(n, dtype=np.int64)
    n_entries = 0
    active = np.empty(n, dtype=np.int64)  # live nodes with a live neighbour, ascending
    na = 0
    for i in range(n):
        if deg[i] > 0:
            active[na] = i
            na += 1
    removed = np.empty(n, dtype=np.int64)
    while na > 0:
        c = active[0]
        for t in range(1, na):
            if deg[active[t]] > deg[c]:
                c = active[t]
        e = n_entries
        n_entries += 1
        centres[e] = c
        assign[c] = e
        removed[0] = c
        nr = 1
        if stored:
            for p in range(ptr[c], ptr[c + 1]):
                j = nbr[p]
                if assign[j] < 0:
                    assign[j] = e
                    removed[nr] = j
                    nr += 1
            for q in range(nr):
                r = removed[q]
                for p in range(ptr[r], ptr[r + 1]):
                    j = nbr[p]
                    if assign[j] < 0:
                        deg[j] -= 1
        else:
            for t in range(na):
                j = active[t]
                if assign[j] < 0 and _dot(u, c, u, j) > th:
                    assign[j] = e
                    removed[nr] = j
                    nr += 1
            for q in range(nr):
                r = removed[q]
                for t in range(na):
                    j = active[t]
                    if assign[j] < 0 and deg[j] > 0 and _dot(u, r, u, j) > th:
                        deg[j] -= 1
        m = 0
        for t in range(na):
            j = active[t]
            if assign[j] < 0 and deg[j] > 0:
                active[m] = j
                m += 1
        na = m
    for i in range(n):
        if assign[i] < 0:
            centres[n_entries] = i
            assign[i] = n_entries
            n_entries += 1
    return assign, centres[:n_entries].copy()


def greedy_cover_ref(u: np.ndarray, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """Numpy reference of ``_greedy_cover_nb`` with the full n x n graph (tests only)."""
    n = u.shape[0]
    adj = (u.astype(np.float32) @ u.astype(np.float32).T) > np.float32(theta)
    np.fill_diagonal(adj, False)
    alive = np.ones(n, dtype=bool)
    deg = adj.sum(axis=1).astype(np.int64)
    assign = np.full(n, -1, dtype=np.int64)
    centres: list[int] = []
    while True:
        cand = alive & (deg > 0)
        if not cand.any():
            break
        c = int(np.argmax(np.where(cand, deg, -1)))
        members = alive & adj[c]
        members[c] = True
        assign[members] = len(centres)
        centres.append(c)
        alive &= ~members
        deg -= adj[:, members].sum(axis=1)
    for i in np.nonzero(assign < 0)[0]:
        assign[i] = len(centres)
        centres.append(int(i))
    return assign, np.array(centres, dtype=np.int64)


def split_magnitude(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(magnitudes float32 [n], unit directions float32 [n, d]); zero vectors get direction e_0."""
    x = np.asarray(x, dtype=np.float32)
    m = np.sqrt(np.einsum("nd,nd->n", x.astype(np.float64), x.astype(np.float64))).astype(np.float32)
    u = np.empty_like(x)
    nz = m > 0
    u[nz] = x[nz] / m[nz, None]
    if (~nz).any():
        u[~nz] = 0.0
        u[~nz, 0] = 1.0
    return m, u


def build_codebook(x: np.ndarray, theta: float, block: int = 256, use_numba: bool = True) -> Codebook:
    """Greedy-cover codebook of the rows of ``x`` [n, d] (see module doc)."""
    x = np.asarray(x, dtype=np.float32)
    n, d = x.shape
    m, u = split_magnitude(x)
    if n == 0:
        return Codebook(np.zeros((0, d), np.float32), np.zeros(0, np.int32), np.zeros(0, np.float32))
    if theta >= 1.0:
        return Codebook(u.copy(), np.arange(n, dtype=np.int32), m)
    if use_numba:
        assign, centres = _greedy_cover_nb(np.ascontiguousarray(u), float(theta), int(max(1, block)))
    else:
        assign, centres = greedy_cover_ref(u, theta)
    return Codebook(np.ascontiguousarray(u[centres]), assign.astype(np.int32), m)


def subset_codebook(codebook: Codebook, rows: np.ndarray) -> Codebook:
    """The codebook restricted to slots ``rows``, dropping entries no kept slot uses.

    Every kept slot keeps its entry, so the cosine guarantee still holds.
    """
    idx = codebook.index[rows]
    used, new_idx = np.unique(idx, return_inverse=True)
    return Codebook(
        np.ascontiguousarray(codebook.entries[used]),
        new_idx.astype(np.int32).reshape(-1),
        codebook.magnitude[rows].astype(np.float32),
    )


def distinct_prefix_counts(index: np.ndarray, order: np.ndarray) -> np.ndarray:
    """``out[s]`` = number of distinct entries used by the first ``s`` slots of ``order``.

    Lets a codebook built on many tokens be trimmed to the best ``s`` of them with the byte
    cost of every ``s`` known in one pass.
    """
    seq = index[order]
    first = np.zeros(len(seq), dtype=bool)
    _, first_pos = np.unique(seq, return_index=True)
    first[first_pos] = True
    return np.concatenate([[0], np.cumsum(first)]).astype(np.int64)
