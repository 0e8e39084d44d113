"""The helpers behind ItemCF's tuning grid (row blocks, the ranked rows' cuts) against plain
references, and ItemCFSimilarity computed in many small blocks equal, bit for bit, to the direct fit."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from convcg_cli import baseline_scores
from convcg_cli.baseline_scores import (
    ItemCFSimilarity,
    _RankedRows,
    keep_top_per_row,
    row_blocks,
)
from tests.test_baselines import _assert_same_entries, _direct_itemcf_weights, _tied_history


def _tied_csr(seed: int, n_rows: int = 40, n_cols: int = 300) -> sp.csr_matrix:
    """Rows of very different lengths (empty ones too), few distinct values: many ties."""
    rng = np.random.default_rng(seed)
    lengths = np.minimum(rng.choice([0, 1, 3, 8, 17, 40, 120, 300], size=n_rows), n_cols)
    dense = np.zeros((n_rows, n_cols))
    for r, n in enumerate(lengths):
        cols = rng.choice(n_cols, size=n, replace=False)
        dense[r, cols] = rng.integers(1, 6, size=n) / 4.0
    m = sp.csr_matrix(dense)
    # scramble the column order inside each row, as a sparse product leaves it
    perm = np.concatenate(
        [a + rng.permutation(b - a) for a, b in zip(m.indptr[:-1], m.indptr[1:], strict=True)]
    )
    return sp.csr_matrix((m.data[perm], m.indices[perm], m.indptr), shape=m.shape)


@pytest.mark.parametrize("cells", [1, 5, 64, 1 << 20])
def test_row_blocks_cover_every_row_once_in_blocks_of_about_cells(cells):
    m = _tied_csr(0)
    blocks = row_blocks(m.indptr, cells)
    assert blocks[0][0] == 0 and blocks[-1][1] == m.shape[0]
    assert all(a < b for a, b in blocks) and all(
        b == c for (_, b), (c, _) in zip(blocks[:-1], blocks[1:], strict=True)
    )
    for a, b in blocks:  # no more than cells, unless one long row is alone
        assert m.indptr[b] - m.indptr[a] <= cells or b - a == 1 or m.indptr[b - 1] - m.indptr[a] < cells


@pytest.mark.parametrize("seed", [0, 1])
def test_ranked_rows_cut_equals_keep_top_per_row_of_the_whole_matrix(seed, monkeypatch):
    monkeypatch.setattr(baseline_scores, "_BLOCK_CELLS", 16)  # many blocks (the diagonal's passes)
    m = _tied_csr(seed, n_rows=40, n_cols=40)  # square: its diagonal is dropped too
    ranked = _RankedRows(m, depth=9)
    no_diagonal = m.copy()
    no_diagonal.setdiag(0.0)
    no_diagonal.eliminate_zeros()
    for n in (1, 3, 8):
        _assert_same_entries(ranked.keep_top(n), keep_top_per_row(m, n))
        _assert_same_entries(ranked.keep_top(n, include_self=False), keep_top_per_row(no_diagonal, n))
    with pytest.raises(ValueError, match="cannot keep the top 9"):
        ranked.keep_top(9)


@pytest.mark.parametrize("cells", [3, 50])
def test_itemcf_similarity_in_small_blocks_equals_the_direct_fit(cells, monkeypatch):
    monkeypatch.setattr(baseline_scores, "_BLOCK_CELLS", cells)
    x = _tied_history(4).matrix()
    similarity = ItemCFSimilarity(x, max_neighbours=5)
    for include_self in (True, False):
        for neighbours in (0, 2, 5):
            for shrinkage in (0.0, 0.5, 10.0):
                _assert_same_entries(
                    similarity.weights(include_self, neighbours, shrinkage),
                    _direct_itemcf_weights(x, include_self, neighbours, shrinkage),
                )
