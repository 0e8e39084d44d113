"""baseline_scores at its edges, each held to a plain reference: the popularity window's first day,
ItemCFSimilarity's cosine of a weighted (non-binary) profile matrix, its rankings and scored lists
reused (and ranked again) exactly when its docstrings say, the ranked rows of non-square matrices
and at depth 1, and row blocks cut where the running count of entries crosses a multiple of cells."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse as sp

from convcg_cli import baseline_scores, itemcf_kernels
from convcg_cli.baseline_scores import (
    ItemCFSimilarity,
    _RankedRows,
    recent_popularity,
    row_blocks,
    sparse_topk_rows,
)
from convcg_cli.errors import ConfigError

# --- recent_popularity ------------------------------------------------------------------------


def _assert_ranks_like(scores: np.ndarray, keys: list[tuple]) -> None:
    """``scores`` order every pair of items as their ``keys`` do: higher, lower or tied."""
    for i in range(len(keys)):
        for j in range(len(keys)):
            want = int(keys[i] > keys[j]) - int(keys[i] < keys[j])
            got = int(np.sign(scores[i] - scores[j]))
            assert got == want, (i, j, keys[i], keys[j], scores[i], scores[j])


def test_the_window_holds_its_last_days_and_not_the_day_before():
    # last conversion day 10, window 3: days 8, 9 and 10 count, day 7 (= 10 - 3) does not
    items = np.array([0, 0, 0, 1, 2, 3, 3])
    days = np.array([7, 7, 7, 8, 10, 6, 9])
    whole = np.zeros(5)  # no tie-breaker: the counts alone decide
    scores = recent_popularity((items, days), 3, whole)
    recent = [0, 1, 1, 1, 0]  # item 0's three conversions fall on day 7, item 3 keeps day 9 only
    _assert_ranks_like(scores, [(c,) for c in recent])
    # a one-day window: the last day only
    _assert_ranks_like(recent_popularity((items, days), 1, whole), [(c,) for c in [0, 0, 1, 0, 0]])


def test_one_recent_conversion_outranks_any_whole_window_lead_and_ties_follow_the_whole_window():
    # distinct whole-window scores: the dense ranks span 0..N-1, the widest tie-breaker there is
    whole = np.array([50.0, 10.0, 40.0, 20.0, 30.0, 0.5])
    items = np.array([1, 1, 3, 5, 0, 0, 0])
    days = np.array([4, 5, 5, 5, 1, 2, 3])  # item 0's conversions are all before the window
    scores = recent_popularity((items, days), 2, whole)
    counts = [0, 2, 0, 1, 0, 1]
    _assert_ranks_like(scores, list(zip(counts, whole, strict=True)))
    assert scores[5] > scores[0]  # least popular overall, one recent conversion: above the leader
    assert scores.shape == (6,)


def test_whole_window_ties_stay_tied_and_no_events_rank_by_the_whole_window():
    whole = np.array([2.0, 7.0, 2.0, 0.0, 7.0])
    scores = recent_popularity((np.array([3]), np.array([9])), 1, whole)
    _assert_ranks_like(scores, list(zip([0, 0, 0, 1, 0], whole, strict=True)))
    empty = recent_popularity((np.array([], dtype=np.int64), np.array([], dtype=np.int64)), 5, whole)
    _assert_ranks_like(empty, [(w,) for w in whole])
    with pytest.raises(ConfigError, match="window_days needs the training window's conversion days"):
        recent_popularity(None, 3, whole)


# --- ItemCFSimilarity: the cosine of any profile matrix ------------------------------------------


def _dense_cosine(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The product ItemCFSimilarity documents, in dense numpy: columns scaled by 1 / sqrt(column
    sum) (0 for an empty column), then xn.T @ xn."""
    norms = np.sqrt(x.sum(axis=0))
    scale = np.zeros_like(norms)
    scale[norms > 0] = 1.0 / norms[norms > 0]
    xn = x * scale[None, :]
    return xn.T @ xn, norms


@pytest.mark.parametrize(
    "values",
    [
        # weights of 1, 2 and a half: item 3 has a single 1.0 (norm 1), item 4 a single 0.5 (norm < 1)
        np.array(
            [
                [1.0, 2.0, 0.0, 1.0, 0.0, 0.0],
                [2.0, 1.0, 1.0, 0.0, 0.0, 0.0],
                [0.0, 1.0, 2.0, 0.0, 0.5, 0.0],
                [1.0, 0.0, 1.0, 0.0, 0.0, 0.0],
            ]
        ),
        # every weight 2: not binary, though every stored value is the same
        2.0
        * np.array(
            [
                [1.0, 1.0, 0.0, 1.0, 0.0, 0.0],
                [1.0, 1.0, 1.0, 0.0, 0.0, 0.0],
                [0.0, 1.0, 1.0, 0.0, 1.0, 0.0],
            ]
        ),
    ],
    ids=["mixed", "all-two"],
)
def test_a_weighted_profile_matrix_gets_the_cosine_of_its_weights(values):
    expected, norms = _dense_cosine(values)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # item 5, engaged by nobody: no 1 / 0
        similarity = ItemCFSimilarity(sp.csr_matrix(values))
    np.testing.assert_allclose(similarity.norms, norms, rtol=1e-15)
    np.testing.assert_allclose(similarity.cosine.toarray(), expected, rtol=1e-14, atol=0)
    np.testing.assert_allclose(similarity.weights(True, 0, 0.0).toarray(), expected, rtol=1e-14)
    assert similarity.cosine[5].nnz == 0 and similarity.cosine[:, 5].nnz == 0


def test_a_binary_profile_matrix_gets_the_count_cosine():
    x = np.array([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    counts = x.T @ x
    expected = counts / np.sqrt(np.outer(counts.diagonal(), counts.diagonal()))
    similarity = ItemCFSimilarity(sp.csr_matrix(x))
    np.testing.assert_allclose(similarity.cosine.toarray(), expected, rtol=1e-15)


# --- ItemCFSimilarity: rankings cut for every neighbours value ------------------------------------


def _binary_profiles(seed: int, n_users: int = 14, n_items: int = 9) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    dense = (rng.random((n_users, n_items)) < 0.35).astype(np.float64)
    dense[0, :] = 1.0  # every item engaged: no empty row in the cosine
    return sp.csr_matrix(dense)


def _top_per_row(dense: np.ndarray, n: int) -> np.ndarray:
    """Each row's ``n`` largest nonzero entries, ties by lower column; the rest zeroed."""
    out = np.zeros_like(dense)
    for i, row in enumerate(dense):
        best = sorted(np.flatnonzero(row), key=lambda j, row=row: (-row[j], j))[:n]
        out[i, best] = row[best]
    return out


def _expected_neighbour_weights(similarity: ItemCFSimilarity, include_self, neighbours, shrinkage):
    """The docstring's definition: column j holds row j's ``neighbours`` largest entries of the whole
    (shrunk) similarity, with or without the diagonal (its values, bit for bit)."""
    full = similarity.weights(True, 0, shrinkage).toarray()
    if not include_self:
        np.fill_diagonal(full, 0.0)
    return _top_per_row(full, neighbours).T


def test_one_ranking_per_shrinkage_serves_every_neighbours_up_to_max_and_a_longer_list_is_ranked_again(
    monkeypatch,
):
    built: list[int] = []

    class CountedRankedRows(_RankedRows):
        def __init__(self, m, depth):
            built.append(int(depth))
            super().__init__(m, depth)

    monkeypatch.setattr(baseline_scores, "_RankedRows", CountedRankedRows)
    similarity = ItemCFSimilarity(_binary_profiles(0), max_neighbours=2)

    def check(include_self: bool, neighbours: int, shrinkage: float) -> None:
        got = similarity.weights(include_self, neighbours, shrinkage)
        expected = _expected_neighbour_weights(similarity, include_self, neighbours, shrinkage)
        np.testing.assert_array_equal(got.toarray(), expected)
        assert got.nnz == np.count_nonzero(expected)

    for neighbours in (1, 2):
        for include_self in (True, False):
            check(include_self, neighbours, 0.5)
    assert len(built) == 1  # one ranking for both lengths and both diagonal choices
    check(False, 2, 0.0)
    assert len(built) == 2  # another shrinkage: its own ranking
    check(False, 3, 0.5)  # one past max_neighbours: ranked again, deep enough for 3
    check(True, 3, 0.5)
    check(False, 1, 0.5)  # the deeper ranking serves the shorter lists too
    assert len(built) == 3
    check(True, 2, 0.0)
    assert len(built) == 3


# --- ItemCFSimilarity: both diagonal choices scored in one pass -----------------------------------


def _lists(similarity: ItemCFSimilarity, x, users, rank, k, include_self: bool, shrinkage: float):
    """The definition full_topk follows: each user's top k of X_u W, ties by ``rank``."""
    weights = similarity.weights(include_self, 0, shrinkage)
    return sparse_topk_rows(x[users] @ weights, rank, k)


@pytest.fixture
def grid():
    """A similarity, its profiles, users, tie order, k and the two expected lists per shrinkage."""
    x = _binary_profiles(3, n_users=12, n_items=8)
    similarity = ItemCFSimilarity(x)
    users = np.array([0, 2, 3, 5, 7, 11])
    rank = np.random.default_rng(4).permutation(8)
    k = 4
    lists = {
        (include_self, shrinkage): _lists(similarity, x, users, rank, k, include_self, shrinkage)
        for include_self in (True, False)
        for shrinkage in (0.0, 0.5)
    }
    assert not np.array_equal(lists[True, 0.5], lists[False, 0.5])  # the diagonal matters here
    return similarity, x, users, rank, k, lists


@pytest.fixture
def kernel_calls(monkeypatch):
    """How many times both diagonal choices were scored in one pass."""
    calls: list[float] = []
    original = itemcf_kernels.product_topk_with_and_without_diagonal

    def counted(*args, **kwargs):
        calls.append(1.0)
        return original(*args, **kwargs)

    monkeypatch.setattr(itemcf_kernels, "product_topk_with_and_without_diagonal", counted)
    return calls


@pytest.mark.parametrize("first", [True, False])
def test_a_shrinkage_expected_both_ways_is_scored_once_for_both_then_scored_alone(grid, kernel_calls, first):
    similarity, x, users, rank, k, lists = grid
    similarity.expect([(True, 0, 0.5), (False, 0, 0.5), (True, 2, 0.5), (False, 0, 0.0)])
    got = similarity.full_topk(first, 0.5, x, users, rank, k)
    np.testing.assert_array_equal(got, lists[first, 0.5])
    assert len(kernel_calls) == 1
    other = similarity.full_topk(not first, 0.5, x, users, rank, k)  # kept from the same pass
    np.testing.assert_array_equal(other, lists[not first, 0.5])
    assert len(kernel_calls) == 1
    # the pair is used up: a further variant of this shrinkage is scored alone
    assert similarity.full_topk(first, 0.5, x, users, rank, k) is None
    assert similarity.full_topk(not first, 0.5, x, users, rank, k) is None
    assert similarity.full_topk(True, 0.0, x, users, rank, k) is None  # expected one way only
    assert len(kernel_calls) == 1


def test_kept_lists_are_handed_only_for_the_same_users_rank_and_k(grid, kernel_calls):
    similarity, x, users, rank, k, lists = grid
    similarity.expect([(False, 0, 0.5), (True, 0, 0.5)])
    np.testing.assert_array_equal(similarity.full_topk(True, 0.5, x, users, rank, k), lists[True, 0.5])
    assert similarity.full_topk(False, 0.5, x, users[:-1], rank, k) is None
    assert similarity.full_topk(False, 0.5, x, users, rank[::-1].copy(), k) is None
    assert similarity.full_topk(False, 0.5, x, users, rank, k - 1) is None
    assert similarity.full_topk(False, 0.0, x, users, rank, k) is None
    np.testing.assert_array_equal(similarity.full_topk(False, 0.5, x, users, rank, k), lists[False, 0.5])
    assert len(kernel_calls) == 1


@pytest.mark.parametrize(
    "variants",
    [
        [],
        [(True, 0, 0.5)],  # one diagonal choice only
        [(False, 0, 0.5), (False, 0, 0.0)],
        [(True, 2, 0.5), (False, 2, 0.5)],  # with neighbours: cut matrices, not the similarity
        [(True, 0, 0.5), (False, 0, 0.0)],  # both ways, but of different shrinkages
    ],
)
def test_nothing_is_shared_unless_one_shrinkage_is_expected_whole_both_ways(grid, kernel_calls, variants):
    similarity, x, users, rank, k, _ = grid
    if variants:
        similarity.expect(variants)
    for include_self in (True, False):
        for shrinkage in (0.0, 0.5):
            assert similarity.full_topk(include_self, shrinkage, x, users, rank, k) is None
    assert kernel_calls == []


# --- _RankedRows ----------------------------------------------------------------------------------


def _tied_dense(seed: int, n_rows: int, n_cols: int) -> np.ndarray:
    """Positive quarters (many ties) at random places, an empty row and a full one."""
    rng = np.random.default_rng(seed)
    dense = np.where(rng.random((n_rows, n_cols)) < 0.5, rng.integers(1, 4, size=(n_rows, n_cols)) / 4, 0.0)
    dense[1] = 0.0
    dense[-1] = rng.integers(1, 3, size=n_cols) / 4
    return dense


def _ranked_reference(dense: np.ndarray, depth: int):
    """(rows, cols, values) of each row's entries at or above its ``depth``-th largest, ties kept,
    by row, value descending, column."""
    rows, cols, values = [], [], []
    for i, row in enumerate(dense):
        stored = np.flatnonzero(row)
        if len(stored) > depth:
            threshold = np.sort(row[stored])[::-1][depth - 1]
            stored = stored[row[stored] >= threshold]
        for j in sorted(stored, key=lambda j, row=row: (-row[j], j)):
            rows.append(i)
            cols.append(j)
            values.append(row[j])
    return np.array(rows, dtype=np.int64), np.array(cols), np.array(values)


@pytest.mark.parametrize("shape", [(6, 10), (10, 6), (7, 7)])
def test_ranked_rows_of_any_shape_cut_each_rows_top_and_its_transpose(shape):
    dense = _tied_dense(sum(shape), *shape)
    no_diagonal = dense.copy()
    np.fill_diagonal(no_diagonal, 0.0)  # the (i, i) entries, for i below both sides
    ranked = _RankedRows(sp.csr_matrix(dense), depth=4)
    for got, want in zip((ranked.rows, ranked.cols, ranked.values), _ranked_reference(dense, 4), strict=True):
        np.testing.assert_array_equal(got, want)
    for n in (1, 2, 3):
        with_diagonal = _top_per_row(dense, n)
        without = _top_per_row(no_diagonal, n)
        for cut, want in (
            (ranked.keep_top(n), with_diagonal),  # the diagonal kept unless asked
            (ranked.keep_top(n, include_self=True), with_diagonal),
            (ranked.keep_top(n, include_self=False), without),
            (ranked.columns(n), with_diagonal.T),
            (ranked.columns(n, include_self=True), with_diagonal.T),
            (ranked.columns(n, include_self=False), without.T),
        ):
            assert cut.shape == want.shape
            np.testing.assert_array_equal(cut.toarray(), want)
            assert cut.nnz == np.count_nonzero(want)
    with pytest.raises(ValueError, match="Ranked 4 entries per row; cannot keep the top 4"):
        ranked.columns(4)


def test_ranked_rows_at_depth_one_hold_each_rows_largest_with_its_ties():
    dense = np.array([[0.5, 0.25, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.75, 0.25, 0.75]])
    ranked = _RankedRows(sp.csr_matrix(dense), depth=1)
    np.testing.assert_array_equal(ranked.rows, [0, 0, 2, 2])
    np.testing.assert_array_equal(ranked.cols, [0, 2, 1, 3])
    np.testing.assert_array_equal(ranked.values, [0.5, 0.5, 0.75, 0.75])
    assert ranked.keep_top(0).nnz == 0 and ranked.keep_top(0).shape == (3, 4)
    with pytest.raises(ValueError, match="depth must be at least 1, got 0"):
        _RankedRows(sp.csr_matrix(dense), depth=0)


# --- row_blocks -----------------------------------------------------------------------------------


def _blocks_reference(indptr: np.ndarray, cells: int) -> list[tuple[int, int]]:
    """A new block starts at row i when a multiple of ``cells`` below the total falls in
    (indptr[i - 1], indptr[i]]: the row holding the entry that crosses it (or the first row after the
    empty ones before it)."""
    n_rows, total = len(indptr) - 1, int(indptr[-1])
    starts = [0] + [
        i for i in range(1, n_rows) if any(indptr[i - 1] < v <= indptr[i] for v in range(cells, total, cells))
    ]
    return list(zip(starts, starts[1:] + [n_rows], strict=True)) if n_rows else []


def test_row_blocks_pinned_at_the_edges():
    assert row_blocks(np.array([0, 2, 3, 3, 9]), cells=3) == [(0, 2), (2, 4)]
    # the second-to-last pointer exactly on a multiple of cells: the last row is a block of its own
    assert row_blocks(np.array([0, 3, 6]), cells=3) == [(0, 1), (1, 2)]
    assert row_blocks(np.array([0, 3, 6]), cells=None) == [(0, 2)]
    assert row_blocks(np.array([0, 2, 4, 6]), cells=4) == [(0, 2), (2, 3)]
    assert row_blocks(np.array([0, 1, 1, 1, 5]), cells=1) == [(0, 1), (1, 4)]


@pytest.mark.parametrize("seed", range(6))
def test_row_blocks_start_where_the_running_count_crosses_a_multiple_of_cells(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.choice([0, 0, 1, 2, 3, 5, 8], size=int(rng.integers(1, 30)))
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    for cells in (1, 2, 3, 4, 7, int(indptr[-1]) or 1, int(indptr[-1]) + 1):
        assert row_blocks(indptr, cells) == _blocks_reference(indptr, cells), cells
