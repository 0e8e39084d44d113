"""ItemCF's compiled cosine (convcg_cli.itemcf_cosine): the same stored entries as scipy's product
``xn.T @ xn``, each value bit for bit, and the same norms."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from convcg_cli import itemcf_cosine
from convcg_cli.itemcf_cosine import binary_cosine


def _reference(x: sp.csr_matrix) -> tuple[sp.csr_matrix, np.ndarray]:
    """The scipy code the kernel replaces (ItemCFSimilarity.__init__)."""
    norms = np.sqrt(np.asarray(x.sum(axis=0)).ravel())
    inv = sp.diags(np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0))
    xn = (x @ inv).tocsc()
    return (xn.T @ xn).tocsr(), norms


def _triples(m: sp.csr_matrix) -> np.ndarray:
    """(3, nnz) int64: row, column and float bits of every stored entry, sorted by (row, column)."""
    coo = m.tocoo()
    order = np.lexsort((coo.col, coo.row))
    return np.stack([coo.row[order], coo.col[order], coo.data[order].view(np.int64)]).astype(np.int64)


def _binary(dense: np.ndarray, index_dtype=np.int32) -> sp.csr_matrix:
    """The CSR of a 0/1 array with 1.0 stored, its index arrays cast to ``index_dtype`` after
    construction (scipy would narrow int64 indices that fit in int32)."""
    x = sp.csr_matrix(dense.astype(np.float64))
    x.indices, x.indptr = x.indices.astype(index_dtype), x.indptr.astype(index_dtype)
    assert x.indices.dtype == index_dtype and x.has_canonical_format
    return x


def _assert_same(x: sp.csr_matrix) -> sp.csr_matrix:
    expected, expected_norms = _reference(x)
    cosine, norms = binary_cosine(x)
    assert isinstance(cosine, sp.csr_matrix) and cosine.shape == expected.shape
    assert cosine.indices.dtype == expected.indices.dtype and cosine.indptr.dtype == expected.indptr.dtype
    assert cosine.data.dtype == np.float64 and cosine.data.size == cosine.indices.size == cosine.nnz
    assert np.array_equal(cosine.indptr, expected.indptr)  # each row holds as many entries
    assert np.array_equal(_triples(cosine), _triples(expected))
    assert norms.dtype == expected_norms.dtype and np.array_equal(norms, expected_norms)
    return expected


@pytest.mark.parametrize("seed", range(60))
@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
def test_random_binary_matrices_give_scipys_cosine_bit_for_bit(seed, index_dtype):
    rng = np.random.default_rng(seed)
    n_users, n_items = int(rng.integers(0, 80)), int(rng.integers(1, 60))
    dense = rng.random((n_users, n_items)) < rng.choice([0.0, 0.02, 0.1, 0.4, 0.9])
    dense[rng.random(n_users) < 0.2] = False  # users with no item
    dense[:, rng.random(n_items) < 0.2] = False  # items with no user
    _assert_same(_binary(dense, index_dtype))


@pytest.mark.parametrize(
    "dense",
    [
        np.zeros((0, 5), dtype=bool),  # no users
        np.zeros((4, 3), dtype=bool),  # no entries
        np.ones((7, 1), dtype=bool),  # one item
        np.zeros((3, 1), dtype=bool),  # one item nobody engages
        np.ones((1, 9), dtype=bool),  # one user engaging everything
        np.ones((50, 40), dtype=bool),  # everybody engaging everything: n_ij = 50 everywhere
        np.vstack([np.ones((1, 30), dtype=bool), np.eye(30, dtype=bool), np.zeros((5, 30), dtype=bool)]),
    ],
    ids=[
        "no-users",
        "no-entries",
        "one-item",
        "one-empty-item",
        "one-full-user",
        "all-ones",
        "full-user+eye",
    ],
)
@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
def test_edge_cases(dense, index_dtype):
    _assert_same(_binary(dense, index_dtype))


def test_large_counts_summed_one_by_one_not_multiplied():
    """n_ij copies of c added one after another round differently from n_ij * c: this case tells
    the two apart (else it could not catch a kernel that multiplies)."""
    rng = np.random.default_rng(7)
    dense = rng.random((400, 25)) < rng.uniform(0.2, 1.0, size=25)  # n_ij from ~20 to ~400
    x = _binary(dense)
    expected = _assert_same(x)
    together = (x.T @ x).tocsr()  # integer-valued n_ij, exact in float64
    together.sort_indices()
    expected.sort_indices()
    assert np.array_equal(together.indices, expected.indices)
    inv = 1.0 / np.sqrt(dense.sum(axis=0))
    rows = np.repeat(np.arange(x.shape[1]), np.diff(expected.indptr))
    multiplied = together.data * (inv[rows] * inv[expected.indices])
    assert np.count_nonzero(multiplied != expected.data) > 10


def test_the_output_arrays_grow_when_the_first_allocation_is_short(monkeypatch):
    """Past the first allocation the kernel stops, the arrays grow, and it goes on from that row."""
    monkeypatch.setattr(itemcf_cosine, "_FIRST_CAPACITY", 1)
    rng = np.random.default_rng(3)
    for density in (0.05, 0.3, 1.0):
        _assert_same(_binary(rng.random((60, 45)) < density))
