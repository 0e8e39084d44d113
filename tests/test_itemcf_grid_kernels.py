"""The compiled passes behind ItemCF's tuning grid (convcg_cli.itemcf_kernels): the shrunk cosine's
entries, the neighbour cuts of ranked rows, and the two diagonal choices scored in one pass, each
held to its plain definition; and the grid's candidates scoring the same lists through them."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from convcg_cli.baseline_scores import ItemCFSimilarity, _RankedRows
from convcg_cli.baselines import ItemCF
from convcg_cli.itemcf_kernels import product_topk_with_and_without_diagonal, sparse_product_topk
from tests.test_baseline_scores_blocks import _tied_csr
from tests.test_baselines import _assert_same_entries, _direct_itemcf_weights, _tied_history

DENSE_WORK = [None, 0, 2**62]  # as each row's size picks, every row scanning all N, every row tracking


def test_shrunk_cosine_equals_the_direct_way_for_counts_past_the_table():
    # 5,000 users engage items 0 and 1 (n_01 = 5,000: past the 4,096 tabled factors), few the others
    rng = np.random.default_rng(0)
    users = np.concatenate([np.repeat(np.arange(5000), 2), rng.integers(0, 5000, size=400)])
    items = np.concatenate([np.tile([0, 1], 5000), rng.integers(2, 30, size=400)])
    x = sp.csr_matrix((np.ones(len(users)), (users, items)), shape=(5000, 30))
    x.data[:] = 1.0  # duplicates summed: binary again
    similarity = ItemCFSimilarity(x)
    for shrinkage in (0.5, 10.0, 3000.0):
        _assert_same_entries(
            similarity.weights(True, 0, shrinkage), _direct_itemcf_weights(x, True, 0, shrinkage)
        )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ranked_columns_are_the_transposed_cut(seed):
    m = _tied_csr(seed, n_rows=40, n_cols=40)
    ranked = _RankedRows(m, depth=9)
    for n in (1, 3, 8):
        for include_self in (True, False):
            _assert_same_entries(ranked.columns(n, include_self), ranked.keep_top(n, include_self).T)
    wide = _RankedRows(_tied_csr(seed, n_rows=12, n_cols=50), depth=4)  # not square
    _assert_same_entries(wide.columns(3), wide.keep_top(3).T)
    with pytest.raises(ValueError, match="cannot keep the top 9"):
        ranked.columns(9)


def _square_case(seed: int):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 40))
    profiles = sp.random(30, n, density=rng.uniform(0.0, 0.4), random_state=rng, format="csr")
    profiles.data = rng.integers(1, 3, size=profiles.nnz).astype(np.float64)
    weights = sp.random(n, n, density=rng.uniform(0.0, 0.5), random_state=rng, format="csr")
    weights.data = rng.integers(0, 4, size=weights.nnz) / 4.0  # ties, explicit zeros
    weights.setdiag(rng.integers(1, 5, size=n) / 2.0)  # a diagonal that changes the lists
    return (
        profiles,
        sp.csr_matrix(weights),
        rng.permutation(n),
        rng.integers(0, 30, size=int(rng.integers(0, 40))),
    )


@pytest.mark.parametrize("seed", range(24))
@pytest.mark.parametrize("dense_work", DENSE_WORK)
def test_both_diagonal_choices_in_one_pass_equal_each_scored_alone(seed, dense_work):
    profiles, weights, rank, rows = _square_case(seed)
    n = weights.shape[0]
    for k in (1, 4, n, n + 3):
        with_diagonal, without = product_topk_with_and_without_diagonal(
            profiles, rows, weights, rank, k, dense_work
        )
        np.testing.assert_array_equal(with_diagonal, sparse_product_topk(profiles, rows, weights, rank, k))
        np.testing.assert_array_equal(
            without, sparse_product_topk(profiles, rows, weights, rank, k, skip_diagonal=True)
        )


def test_both_diagonal_choices_refuse_what_sparse_product_topk_refuses():
    profiles = sp.csr_matrix(np.array([[1.0, 1.0]]))
    with pytest.raises(ValueError, match="scores >= 0"):
        product_topk_with_and_without_diagonal(
            profiles, np.array([0]), sp.csr_matrix(-np.eye(2)), np.arange(2), 2
        )
    with pytest.raises(ValueError, match="square"):
        product_topk_with_and_without_diagonal(
            profiles, np.array([0]), sp.csr_matrix((2, 3)), np.arange(3), 2
        )
    with pytest.raises(IndexError):
        product_topk_with_and_without_diagonal(
            profiles, np.array([1]), sp.csr_matrix(np.eye(2)), np.arange(2), 2
        )


def test_a_grid_scores_both_diagonal_choices_of_a_shrinkage_in_one_pass(monkeypatch):
    import convcg_cli.itemcf_kernels as kernels

    history = _tied_history(3, n_users=80, n_items=40, n_rows=600)
    calls = []
    real = kernels.product_topk_with_and_without_diagonal
    monkeypatch.setattr(
        kernels,
        "product_topk_with_and_without_diagonal",
        lambda *a, **kw: calls.append(a[2].nnz) or real(*a, **kw),
    )
    options = [
        {"include_self": s, "neighbours": n, "shrinkage": w}
        for s in (True, False)
        for n in (None, 3)
        for w in (0.0, 5.0)
    ]
    users = np.arange(history.n_users)
    fitted = list(ItemCF.fit_each(options, history))
    lists = [candidate.score_topk(users, 10) for candidate in fitted]
    assert len(calls) == 2  # one pass per shrinkage, for both diagonal choices
    for o, got in zip(options, lists, strict=True):  # each as fitted and scored on its own
        np.testing.assert_array_equal(got, ItemCF(**o).fit(history).score_topk(users, 10))
    again = [c.score_topk(users[:7], 5) for c in fitted if c.neighbours == 0]  # later: each alone
    assert len(calls) == 2
    for got, candidate in zip(again, [c for c in fitted if c.neighbours == 0], strict=True):
        matrix, skip = candidate.scoring
        rank = np.empty(history.n_items, dtype=np.int64)
        rank[candidate.by_popularity] = np.arange(history.n_items)
        np.testing.assert_array_equal(
            got, sparse_product_topk(candidate.profiles, users[:7], matrix, rank, 5, skip_diagonal=skip)
        )


def test_an_unpaired_full_variant_is_scored_alone(monkeypatch):
    import convcg_cli.itemcf_kernels as kernels

    monkeypatch.setattr(kernels, "product_topk_with_and_without_diagonal", None)  # never called
    history = _tied_history(5)
    options = [{"include_self": True, "shrinkage": 0.0}, {"include_self": False, "shrinkage": 1.0}]
    for o, candidate in zip(options, ItemCF.fit_each(options, history), strict=True):
        users = np.arange(history.n_users)
        np.testing.assert_array_equal(
            candidate.score_topk(users, 6), ItemCF(**o).fit(history).score_topk(users, 6)
        )
