"""ItemCF's compiled scoring (convcg_cli.itemcf_kernels): the same lists as scipy's sparse product
ranked by ``sparse_topk_rows``, from the same scores bit for bit."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.sparse as sp

from convcg_cli.baseline_scores import sparse_topk_rows
from convcg_cli.baselines import ItemCF, TrainHistory
from convcg_cli.itemcf_kernels import sparse_product_topk


def _expected(profiles: sp.csr_matrix, rows: np.ndarray, weights: sp.csr_matrix, rank, k: int) -> np.ndarray:
    """The reference: scipy's product, each row's list chosen by ``sparse_topk_rows``."""
    if not len(rows):
        return np.zeros((0, min(k, weights.shape[1])), dtype=np.int64)
    return sparse_topk_rows(profiles[rows] @ weights, rank, k)


def _with_index_dtype(m: sp.csr_matrix, dtype) -> sp.csr_matrix:
    """A copy of ``m`` with its index arrays cast to ``dtype`` (set after construction: scipy would
    shrink int64 indices that fit in int32)."""
    out = m.copy()
    out.indices, out.indptr = m.indices.astype(dtype), m.indptr.astype(dtype)
    assert out.indices.dtype == dtype and out.indptr.dtype == dtype
    return out


def _random_case(rng: np.random.Generator, dyadic: bool):
    """Seeded random (profiles, weights, rank, rows): small-integer/dyadic values make exact score ties;
    some weights stored as explicit zeros, some profile rows and weight rows empty."""
    n_users, n_inner, n = (int(x) for x in rng.integers(1, 40, size=3))
    profiles = sp.random(n_users, n_inner, density=rng.uniform(0.0, 0.4), random_state=rng, format="csr")
    weights = sp.random(n_inner, n, density=rng.uniform(0.0, 0.4), random_state=rng, format="csr")
    if dyadic:
        profiles.data = rng.integers(1, 3, size=profiles.nnz).astype(np.float64)
        weights.data = rng.integers(0, 4, size=weights.nnz) / 4.0  # explicit zeros among them
    else:
        profiles.data[:] = 1.0
        weights.data[rng.random(weights.nnz) < 0.2] = 0.0
    rows = rng.integers(0, n_users, size=int(rng.integers(0, 50)))
    return profiles, weights, rng.permutation(n), rows


# Each row summed the way its size picks (None), every row scanning all N sums (0), every row
# tracking the columns it touches (2**62): the same lists.
DENSE_WORK = [None, 0, 2**62]


@pytest.mark.parametrize("seed", range(40))
@pytest.mark.parametrize("index_dtypes", [(np.int32, np.int32), (np.int64, np.int64), (np.int32, np.int64)])
def test_same_lists_as_the_sparse_product_ranked_by_sparse_topk_rows(seed, index_dtypes):
    rng = np.random.default_rng(seed)
    profiles, weights, rank, rows = _random_case(rng, dyadic=seed % 2 == 0)
    p = _with_index_dtype(profiles, index_dtypes[0])
    w = _with_index_dtype(weights, index_dtypes[1])
    for k in (1, 2, 5, 17, weights.shape[1], weights.shape[1] + 7):  # k > N included
        expected = _expected(profiles, rows, weights, rank, k)
        for dense_work in DENSE_WORK:
            got = sparse_product_topk(p, rows, w, rank, k, dense_work=dense_work)
            assert got.dtype == np.int64
            np.testing.assert_array_equal(got, expected)
        narrow = sparse_product_topk(p, rows, w, rank, k, dtype=np.int32)  # written as int32 directly
        assert narrow.dtype == np.int32
        np.testing.assert_array_equal(narrow, expected)


def test_lists_are_int64_or_int32_only():
    profiles, weights = sp.csr_matrix(np.ones((1, 2))), sp.csr_matrix(np.ones((2, 3)))
    for dtype in (np.int16, np.uint32, np.float64):
        with pytest.raises(ValueError, match="dtype"):
            sparse_product_topk(profiles, [0], weights, np.arange(3), 2, dtype=dtype)


@pytest.mark.parametrize("dense_work", DENSE_WORK)
def test_many_candidates_per_row(dense_work):
    """Rows scoring thousands of columns (the k-th largest found among a sampled threshold's passers),
    with many ties, including a row whose strided sample holds only its largest scores (the threshold
    read off it lets fewer than k pass: all candidates count)."""
    rng = np.random.default_rng(11)
    n = 8192
    weights = sp.random(40, n, density=0.3, random_state=rng, format="csr")
    weights.data = rng.integers(1, 9, size=weights.nnz) / 8.0
    spiky = np.where(np.arange(n) % 8 == 0, 2.0 + np.arange(n) / n, 1.0)  # every 8th column higher
    weights = sp.vstack([weights, sp.csr_matrix(spiky)]).tocsr()
    profiles = sp.csr_matrix((rng.random((30, 41)) < 0.2).astype(np.float64))
    profiles = sp.vstack([profiles, sp.csr_matrix(np.eye(41)[[40]])]).tocsr()  # row 30: the spiky one
    rank, rows = rng.permutation(n), np.arange(31)
    for k in (1, 10, 100, 1500, 2000, n):
        np.testing.assert_array_equal(
            sparse_product_topk(profiles, rows, weights, rank, k, dense_work=dense_work),
            _expected(profiles, rows, weights, rank, k),
        )


def test_ties_rows_without_scores_and_rows_scoring_fewer_than_k():
    # user 0: every item scores 0.5 (one long run of ties, ordered by rank); user 1: two items;
    # user 2: no engagement; user 3: engages an item whose weights are all explicit zeros.
    n = 40
    weights = sp.csr_matrix(
        (
            np.r_[np.full(n, 0.5), [0.25, 0.25], np.zeros(3)],
            np.r_[np.arange(n), [3, 7], [1, 2, 3]],
            [0, n, n + 2, n + 5],
        ),
        shape=(3, n),
    )
    profiles = sp.csr_matrix(np.array([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 0], [0, 0, 1.0]]))
    rank = np.random.default_rng(0).permutation(n)
    by_rank = np.argsort(rank)
    rows = np.array([0, 1, 2, 3, 1])
    for k, dense_work in itertools.product((1, 3, 20, n, n + 5), DENSE_WORK):
        got = sparse_product_topk(profiles, rows, weights, rank, k, dense_work=dense_work)
        np.testing.assert_array_equal(got, _expected(profiles, rows, weights, rank, k))
        kk = min(k, n)
        np.testing.assert_array_equal(got[0], by_rank[:kk])  # all tied: rank order
        np.testing.assert_array_equal(got[2], by_rank[:kk])  # nothing scored: rank order
        np.testing.assert_array_equal(got[3], by_rank[:kk])  # only zeros: nothing scored
        two = sorted([3, 7], key=lambda j: rank[j])[:kk]
        assert got[1, : len(two)].tolist() == two  # the scored ones first, then the rest by rank
        assert got[1, len(two) :].tolist() == [j for j in by_rank if j not in (3, 7)][: kk - len(two)]


def test_scores_are_summed_in_scipys_order_bit_for_bit():
    # (0.1 + 0.2) + 0.3 = 0.6000000000000001 but (0.3 + 0.2) + 0.1 = 0.6: columns 0 (summed 0.1, 0.2,
    # 0.3), 1 (0.6 once) and 2 (summed 0.3, 0.2, 0.1) rank by the order of the sums alone. The rank
    # prefers 2, then 1, then 0, so a score summed in another order shows as a different list.
    assert (0.1 + 0.2) + 0.3 > 0.6 == (0.3 + 0.2) + 0.1
    weights = sp.csr_matrix(np.array([[0.1, 0.6, 0.3], [0.2, 0.0, 0.2], [0.3, 0.0, 0.1]]))
    rank = np.array([2, 1, 0])
    profiles = sp.csr_matrix(np.array([[1.0, 1.0, 1.0]]))
    assert (profiles @ weights).toarray().tolist() == [[(0.1 + 0.2) + 0.3, 0.6, 0.6]]
    assert sparse_product_topk(profiles, np.array([0]), weights, rank, 3).tolist() == [[0, 2, 1]]
    # the profile row stored in reverse order (unsorted indices): scipy sums in stored order, so do we
    reverse = sp.csr_matrix((np.ones(3), np.array([2, 1, 0]), np.array([0, 3])), shape=(1, 3))
    assert not reverse.has_sorted_indices
    assert (reverse @ weights).toarray().tolist() == [[0.6, 0.6, (0.1 + 0.2) + 0.3]]
    got = sparse_product_topk(reverse, np.array([0]), weights, rank, 3)
    np.testing.assert_array_equal(got, _expected(reverse, np.array([0]), weights, rank, 3))
    assert got.tolist() == [[2, 1, 0]]
    # duplicate entries of a weights row (not canonical) are summed in stored order too
    dup = sp.csr_matrix(
        (np.array([0.1, 0.2, 0.3, 0.3, 0.2, 0.1, 0.6]), [0, 0, 0, 2, 2, 2, 1], [0, 7]), shape=(1, 3)
    )
    assert not dup.has_canonical_format
    one = sp.csr_matrix(np.array([[1.0]]))
    assert sparse_product_topk(one, np.array([0]), dup, rank, 3).tolist() == [[0, 2, 1]]
    np.testing.assert_array_equal(
        sparse_product_topk(one, np.array([0]), dup, rank, 3), _expected(one, np.array([0]), dup, rank, 3)
    )


def test_random_float_scores_rank_like_the_product():
    """Non-binary profiles and weights (products v * w rounded, long sums): every list equal."""
    rng = np.random.default_rng(7)
    profiles = sp.random(60, 300, density=0.1, random_state=rng, format="csr")
    weights = sp.random(300, 500, density=0.05, random_state=rng, format="csr")
    profiles.data = rng.uniform(0.0, 3.0, size=profiles.nnz)
    rank, rows = rng.permutation(500), np.arange(60)
    for k, dense_work in itertools.product((1, 10, 100, 500), DENSE_WORK):
        np.testing.assert_array_equal(
            sparse_product_topk(profiles, rows, weights, rank, k, dense_work=dense_work),
            _expected(profiles, rows, weights, rank, k),
        )
    p32, w32 = profiles.astype(np.float32), weights.astype(np.float32)  # summed in float32, as scipy does
    np.testing.assert_array_equal(
        sparse_product_topk(p32, rows, w32, rank, 50), _expected(p32, rows, w32, rank, 50)
    )


def test_negative_or_nan_scores_are_refused():
    profiles = sp.csr_matrix(np.array([[1.0, 0.0], [0.0, 1.0]]))
    for bad, dense_work in itertools.product((-0.5, np.nan), DENSE_WORK):
        weights = sp.csr_matrix(np.array([[1.0, 0.5], [bad, 1.0]]))
        got = sparse_product_topk(profiles, np.array([0]), weights, np.arange(2), 2, dense_work=dense_work)
        assert got.tolist() == [[0, 1]]  # only the requested rows' scores are checked, as before
        with pytest.raises(ValueError, match="scores >= 0 without NaN"):
            sparse_product_topk(profiles, np.array([0, 1]), weights, np.arange(2), 2, dense_work=dense_work)


def test_empty_requests_and_bad_arguments():
    profiles = sp.csr_matrix(np.eye(3))
    weights = sp.csr_matrix(np.ones((3, 4)))
    assert sparse_product_topk(profiles, np.array([], dtype=np.int64), weights, np.arange(4), 2).shape == (
        0,
        2,
    )
    np.testing.assert_array_equal(
        sparse_product_topk(profiles, np.array([-1]), weights, np.arange(4), 2),
        sparse_product_topk(profiles, np.array([2]), weights, np.arange(4), 2),
    )
    with pytest.raises(IndexError):
        sparse_product_topk(profiles, np.array([3]), weights, np.arange(4), 2)
    with pytest.raises(ValueError, match="shapes"):
        sparse_product_topk(profiles, np.array([0]), sp.csr_matrix(np.ones((2, 4))), np.arange(4), 2)
    with pytest.raises(ValueError, match="rank"):
        sparse_product_topk(profiles, np.array([0]), weights, np.arange(3), 2)


@pytest.mark.parametrize("options", [{}, {"include_self": False}, {"neighbours": 3}, {"shrinkage": 2.0}])
def test_itemcf_score_topk_is_the_chunked_sparse_product(options):
    """ItemCF's lists equal the former implementation: the sparse product of chunks of users, each
    row ranked by ``sparse_topk_rows`` with the popularity rank as tie order."""
    rng = np.random.default_rng(3)
    n_users, n_items, n_rows = 80, 50, 600
    item_pos = np.minimum(rng.zipf(1.5, size=n_rows) - 1, n_items - 1)  # power-law popularity
    history = TrainHistory(
        user_pos=rng.integers(0, n_users - 5, size=n_rows),  # the last users are cold
        item_pos=item_pos,
        n_users=n_users,
        n_items=n_items,
        popularity=np.bincount(item_pos, minlength=n_items).astype(np.float64),
    )
    model = ItemCF(**options).fit(history)
    rank = np.empty(n_items, dtype=np.int64)
    rank[model.by_popularity] = np.arange(n_items)
    users = rng.permutation(n_users)
    for k in (1, 10, n_items + 1):
        expected = np.concatenate(
            [
                sparse_topk_rows(model.profiles[users[s : s + 16]] @ model.weights, rank, k)
                for s in range(0, n_users, 16)
            ]
        )
        np.testing.assert_array_equal(model.score_topk(users, k), expected)


def test_kth_smallest_is_numpys_partition():
    from convcg_cli.itemcf_select import kth_smallest

    rng = np.random.default_rng(5)
    for size in (1, 2, 3, 10, 100, 1000):
        for values in (rng.random(size), rng.integers(0, 4, size=size) / 4.0, np.sort(rng.random(size))):
            for k in {0, size // 3, size // 2, size - 1}:
                assert kth_smallest(values.copy(), k) == np.partition(values, k)[k]
    assert kth_smallest(np.full(50, 0.5), 17) == 0.5


def test_best_first_is_lexsort_by_descending_value_then_rank():
    from convcg_cli.itemcf_select import best_first

    rng = np.random.default_rng(6)
    for size in (0, 1, 2, 3, 7, 16, 17, 100, 699, 700, 701, 1000, 3000):  # merged, then radix passes
        signed_zeros = np.where(rng.random(size) < 0.5, 0.0, -0.0)  # equal: their order is the ranks'
        for values in (
            rng.random(size),
            rng.integers(0, 4, size=size) / 4.0,
            np.full(size, 0.5),
            signed_zeros,
            rng.standard_normal(size) * np.where(rng.random(size) < 0.5, 1e-300, 1e300),
            np.where(rng.random(size) < 0.3, -rng.integers(0, 3, size=size) / 2.0, rng.random(size)),
        ):
            for ranks in (rng.permutation(size), rng.choice(2**31 - 1, size=size, replace=False)):
                for dtype in (np.int64, np.int32):
                    got = best_first(values, ranks.astype(dtype))
                    np.testing.assert_array_equal(got, np.lexsort((ranks, -values)))


def _ranked_reference(m: sp.csr_matrix, depth: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each row's entries at or above its ``depth``-th largest stored value (all of a row of ``depth``
    or fewer), by row, then value descending, then column: row by row in numpy."""
    rows, cols, values = [], [], []
    for r in range(m.shape[0]):
        c, v = m.indices[m.indptr[r] : m.indptr[r + 1]], m.data[m.indptr[r] : m.indptr[r + 1]]
        order = np.lexsort((c, -v))
        c, v = c[order], v[order]
        if len(v) > depth:
            keep = v >= v[depth - 1]  # v[depth - 1]: the depth-th largest
            c, v = c[keep], v[keep]
        rows.append(np.full(len(v), r, dtype=np.int64))
        cols.append(c)
        values.append(v)
    return np.concatenate(rows), np.concatenate(cols), np.concatenate(values)


def _ranked_case(rng: np.random.Generator, dyadic: bool, dtype) -> sp.csr_matrix:
    """Rows of very different lengths (empty ones too), with exact ties (dyadic values) and explicit
    zeros (-0.0 among them), column indices shuffled within each row."""
    n_rows, n_cols = int(rng.integers(1, 40)), int(rng.integers(1, 400))
    lengths = np.minimum(rng.choice([0, 1, 2, 5, 16, 17, 40, 150, 400], size=n_rows), n_cols)
    cols = [rng.choice(n_cols, size=n, replace=False) for n in lengths]
    if dyadic:
        data = rng.integers(0, 6, size=lengths.sum()) / 4.0
        data[rng.random(len(data)) < 0.05] = -0.0
    else:
        data = rng.random(lengths.sum())
        data[rng.random(len(data)) < 0.1] = 0.0
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    m = sp.csr_matrix(
        (data.astype(dtype), np.concatenate([[], *cols]).astype(np.int64), indptr), (n_rows, n_cols)
    )
    assert m.nnz == lengths.sum()  # the explicit zeros stay stored
    return m


@pytest.mark.parametrize("seed", range(30))
@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
def test_ranked_rows_are_each_rows_entries_down_to_its_depth_th_largest(seed, index_dtype):
    from convcg_cli.baseline_scores import _RankedRows

    rng = np.random.default_rng(seed)
    dtype = np.float32 if seed % 3 == 2 else np.float64
    m = _with_index_dtype(_ranked_case(rng, dyadic=seed % 2 == 0, dtype=dtype), index_dtype)
    assert not m.has_sorted_indices or m.nnz < 2
    for depth in (1, 2, 5, 16, 17, 40, 399, 401):
        ranked = _RankedRows(m, depth)
        expected = _ranked_reference(m, depth)
        assert ranked.rows.dtype == np.int64
        assert ranked.cols.dtype == index_dtype and ranked.values.dtype == dtype
        for got, want in zip((ranked.rows, ranked.cols, ranked.values), expected, strict=True):
            np.testing.assert_array_equal(got, want)


def test_ranked_rows_keep_every_tie_at_the_cut_and_long_rows():
    from convcg_cli.baseline_scores import _RankedRows

    rng = np.random.default_rng(12)
    n = 9000  # a row of thousands of entries, most of them tied
    long_row = np.where(rng.random(n) < 0.9, 0.5, rng.integers(0, 4, size=n) / 4.0)
    tied = np.full(7, 0.25)  # every entry ties with the depth-th largest
    dense = np.zeros((4, n))
    dense[0] = long_row
    dense[2, rng.choice(n, size=7, replace=False)] = tied
    m = sp.csr_matrix(dense)  # row 1 and row 3 empty
    perm = rng.permutation(m.indptr[1])  # row 0's indices stored in a random order
    m.indices[: m.indptr[1]], m.data[: m.indptr[1]] = m.indices[perm], m.data[perm]
    for depth in (1, 3, 7, 100, 5000):
        ranked = _RankedRows(m, depth)
        for got, want in zip(
            (ranked.rows, ranked.cols, ranked.values), _ranked_reference(m, depth), strict=True
        ):
            np.testing.assert_array_equal(got, want)
        assert (ranked.rows == 2).sum() == 7  # all ties kept, whatever the depth
    empty = _RankedRows(sp.csr_matrix((3, 5)), 2)
    assert empty.rows.dtype == np.int64 and len(empty.rows) == len(empty.cols) == len(empty.values) == 0
    with pytest.raises(ValueError, match="depth"):
        _RankedRows(m, 0)


def _without_diagonal(m: sp.csr_matrix) -> sp.csr_matrix:
    """``m`` without its diagonal entries, every other stored entry (explicit zeros too) kept in order."""
    rows = np.repeat(np.arange(m.shape[0]), np.diff(m.indptr))
    off = m.indices != rows
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows[off], minlength=m.shape[0]))])
    return sp.csr_matrix((m.data[off], m.indices[off], indptr), shape=m.shape)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("dense_work", DENSE_WORK)
def test_skipping_the_diagonal_is_the_product_with_the_matrix_without_it(seed, dense_work):
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(2, 40))
    profiles = sp.random(30, n, density=0.3, random_state=rng, format="csr")
    profiles.data = rng.integers(1, 3, size=profiles.nnz).astype(np.float64)
    weights = sp.random(n, n, density=0.4, random_state=rng, format="csr")
    weights.data = rng.integers(0, 4, size=weights.nnz) / 4.0  # ties, explicit zeros
    weights.setdiag(rng.integers(1, 5, size=n) / 2.0)  # a diagonal that would change the lists
    weights = sp.csr_matrix(weights)
    rank, rows = rng.permutation(n), rng.integers(0, 30, size=25)
    for k in (1, 5, n + 3):
        got = sparse_product_topk(profiles, rows, weights, rank, k, dense_work=dense_work, skip_diagonal=True)
        np.testing.assert_array_equal(got, _expected(profiles, rows, _without_diagonal(weights), rank, k))
    with pytest.raises(ValueError, match="square"):
        sparse_product_topk(profiles, rows, sp.csr_matrix((n, n + 1)), rank, 3, skip_diagonal=True)


def test_itemcf_without_self_scores_without_copying_the_similarity():
    # include_self=False and no neighbours: scored from the similarity with its diagonal skipped;
    # the weights without the diagonal are built only when read, equal to the direct way's.
    rng = np.random.default_rng(8)
    n_users, n_items = 60, 40
    item_pos = np.minimum(rng.zipf(1.4, size=500) - 1, n_items - 1)
    history = TrainHistory(
        user_pos=rng.integers(0, n_users, size=500),
        item_pos=item_pos,
        n_users=n_users,
        n_items=n_items,
        popularity=np.bincount(item_pos, minlength=n_items).astype(np.float64),
    )
    options = [{"include_self": False}, {"include_self": False, "shrinkage": 3.0}, {"include_self": True}]
    for fitted in [*ItemCF.fit_each(options, history), ItemCF(include_self=False).fit(history)]:
        matrix, skip = fitted.scoring
        assert skip == (not fitted.include_self)
        assert (fitted._built is None) == skip  # not built yet
        ranked = fitted.score_topk(np.arange(n_users), 10)
        weights = fitted.weights  # built now
        assert weights.diagonal().tolist() == [0.0] * n_items or not skip
        if skip:
            assert weights.nnz == matrix.nnz - np.count_nonzero(matrix.diagonal())
            assert fitted.weights is weights  # built once
        rank = np.empty(n_items, dtype=np.int64)
        rank[fitted.by_popularity] = np.arange(n_items)
        np.testing.assert_array_equal(ranked, sparse_topk_rows(fitted.profiles @ weights, rank, 10))
    with pytest.raises(AttributeError, match="fit the baseline first"):
        _ = ItemCF().weights
