"""Exact top-k against brute force on seeded synthetic data: ties at the cutoff (for the faiss
reference on every faiss search path), k beyond the corpus, batching, empty and bad inputs; the
blocked path against the faiss reference it replaced, through its sampled threshold and both
retries; the popularity ranking; lazy faiss."""

import contextlib
import subprocess
import sys

import faiss
import numpy as np
import pytest

from convcg_cli.index import ExactIndex, check_k, exact_topk, popularity_topk
from convcg_cli.index.exact import _Scratch, faiss_exact_topk

# faiss 1.15.1 IndexFlatIP picks its kernel from the query block, not from a query count: the per-query
# SIMD loop while n_queries * d < distance_compute_blas_threshold (128000), BLAS above it, and a
# database-parallel loop when n_queries < threads and N >= 10000. The heap keeps k < 100 results, a
# reservoir k >= 100. The tests force each path, since default thresholds would never reach BLAS here.
# (They steer the faiss reference; ExactIndex does not use faiss, and is checked under both alike.)
# 50 queries: one padded block (GEMM); 1: a query searched alone (a matrix-vector product).
QUERY_COUNTS = [1, 50]
SEARCH_PATHS = ["simd-loop", "blas"]
SEARCHES = {"blocked": exact_topk, "faiss": faiss_exact_topk}


@contextlib.contextmanager
def faiss_search_path(path, threads=None):
    """Temporarily steer faiss onto one search path; restores faiss's global settings afterwards."""
    old_threshold, old_threads = faiss.cvar.distance_compute_blas_threshold, faiss.omp_get_max_threads()
    faiss.cvar.distance_compute_blas_threshold = {"simd-loop": 2**30, "blas": 1}[path]
    if threads is not None:
        faiss.omp_set_num_threads(threads)
    try:
        yield
    finally:
        faiss.cvar.distance_compute_blas_threshold = old_threshold
        faiss.omp_set_num_threads(old_threads)


def brute_topk(query_emb, item_emb, k):
    """Reference top-k: full float64 score matrix, rows sorted by (-score, id)."""
    scores = np.asarray(query_emb, np.float64) @ np.asarray(item_emb, np.float64).T  # (Q, N)
    n = scores.shape[1]
    ids = np.array([np.lexsort((np.arange(n), -row))[:k] for row in scores], dtype=np.int64)
    ids = ids.reshape(len(scores), min(k, n))
    return np.take_along_axis(scores, ids, axis=1), ids


def random_embeddings(rng, n, d, integer):
    """Float embeddings, or values in {-1, 0, 1} so that many scores tie exactly."""
    if integer:
        return rng.integers(-1, 2, size=(n, d)).astype(np.float32)
    return rng.standard_normal((n, d)).astype(np.float32)


def tied_corpus():
    """Items 0..199 score 1 and items 200..209 score 2 against the query (1, 0)."""
    items = np.zeros((210, 2), np.float32)
    items[:200, 0] = 1.0
    items[200:, 0] = 2.0
    return items


# --- exact_topk -------------------------------------------------------------------------------------


@pytest.mark.parametrize("search", SEARCHES.values(), ids=SEARCHES.keys())
@pytest.mark.parametrize("path", SEARCH_PATHS)
@pytest.mark.parametrize("n_queries", QUERY_COUNTS)
@pytest.mark.parametrize("integer", [False, True], ids=["float", "tied-integer"])
@pytest.mark.parametrize("k", [7, 150, 301, 400], ids=["k<N-heap", "k<N-reservoir", "k==N", "k>N"])
def test_exact_topk_matches_brute_force(search, path, n_queries, integer, k):
    rng = np.random.default_rng(1000 * n_queries + k + integer)
    items = random_embeddings(rng, 301, 4, integer)
    queries = random_embeddings(rng, n_queries, 4, integer)
    with faiss_search_path(path):
        scores, ids = search(queries, items, k)
    ref_scores, ref_ids = brute_topk(queries, items, k)
    assert ids.shape == scores.shape == (n_queries, min(k, 301))
    assert ids.dtype == np.int64 and scores.dtype == np.float32
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)
    assert (ids >= 0).all()


@pytest.mark.parametrize("search", SEARCHES.values(), ids=SEARCHES.keys())
@pytest.mark.parametrize("k", [7, 150])
def test_exact_topk_matches_brute_force_on_database_parallel_path(search, k):
    # One query, 4 threads and N >= 10000 send faiss to its database-parallel loop.
    rng = np.random.default_rng(k)
    items = random_embeddings(rng, 10_000, 2, integer=True)
    query = random_embeddings(rng, 1, 2, integer=True)
    with faiss_search_path("simd-loop", threads=4):
        _, ids = search(query, items, k)
    np.testing.assert_array_equal(ids, brute_topk(query, items, k)[1])


@pytest.mark.parametrize("search", SEARCHES.values(), ids=SEARCHES.keys())
@pytest.mark.parametrize("path", SEARCH_PATHS)
@pytest.mark.parametrize("n_queries", QUERY_COUNTS)
def test_exact_topk_all_items_tied_keeps_lowest_ids(search, path, n_queries):
    # A tie group far larger than the extra candidates fetched: forces faiss's re-search.
    items = np.ones((500, 3), np.float32)
    with faiss_search_path(path):
        scores, ids = search(np.ones((n_queries, 3)), items, k=5)
    np.testing.assert_array_equal(ids, np.tile(np.arange(5), (n_queries, 1)))
    np.testing.assert_array_equal(scores, np.full((n_queries, 5), 3.0))


@pytest.mark.parametrize("search", SEARCHES.values(), ids=SEARCHES.keys())
@pytest.mark.parametrize("path", SEARCH_PATHS)
@pytest.mark.parametrize("n_queries", QUERY_COUNTS)
@pytest.mark.parametrize("k", [15, 120])
def test_exact_topk_tie_at_cutoff_after_better_items(search, path, n_queries, k):
    # The ten 2s come first, then the tied 1s by ascending id.
    queries = np.tile([[1.0, 0.0]], (n_queries, 1))
    with faiss_search_path(path):
        _, ids = search(queries, tied_corpus(), k=k)
    expected = np.concatenate([np.arange(200, 210), np.arange(k - 10)])
    np.testing.assert_array_equal(ids, np.tile(expected, (n_queries, 1)))


@pytest.mark.parametrize("path", SEARCH_PATHS)
@pytest.mark.parametrize("n_queries", QUERY_COUNTS)
def test_raw_faiss_does_not_break_ties_by_id(path, n_queries):
    """Why exact_topk re-sorts (pins faiss 1.15.1 behaviour; if this fails, faiss changed, not us).

    faiss fills its heap with the first k items seen (ids 0..14, all scoring 1); each of the ten
    better items then evicts the *lowest* tied id, and equal scores never enter a full heap. So the
    survivors at the cutoff are ids 10..14 instead of 0..4, and every tie group comes out in
    descending id order. The same on both paths, for the heap (k < 100) and the reservoir (k >= 100).
    """
    index = faiss.IndexFlatIP(2)
    index.add(tied_corpus())
    queries = np.tile(np.array([[1.0, 0.0]], np.float32), (n_queries, 1))
    with faiss_search_path(path):
        _, heap_ids = index.search(queries, 15)
        _, reservoir_ids = index.search(queries, 120)
    expected = list(range(209, 199, -1)) + [14, 13, 12, 11, 10]
    np.testing.assert_array_equal(heap_ids, np.tile(expected, (n_queries, 1)))
    assert sorted(reservoir_ids[0, 10:].tolist()) != list(range(110))
    with faiss_search_path(path):
        _, ids = exact_topk(queries, tied_corpus(), 15)
    np.testing.assert_array_equal(ids[0], list(range(200, 210)) + [0, 1, 2, 3, 4])


def test_exact_topk_batching_does_not_change_results():
    rng = np.random.default_rng(3)
    items = random_embeddings(rng, 120, 3, integer=True)
    queries = random_embeddings(rng, 45, 3, integer=True)
    one_batch = exact_topk(queries, items, 20)
    small_batches = exact_topk(queries, items, 20, batch_size=7)
    np.testing.assert_array_equal(one_batch[1], small_batches[1])
    np.testing.assert_array_equal(one_batch[0], small_batches[0])


def test_exact_topk_empty_inputs():
    items = np.ones((4, 2), np.float32)
    scores, ids = exact_topk(np.empty((0, 2)), items, k=10)
    assert scores.shape == ids.shape == (0, 4)
    scores, ids = exact_topk(np.ones((3, 2)), np.empty((0, 2)), k=10)
    assert scores.shape == ids.shape == (3, 0)


def test_exact_topk_validates_inputs():
    with pytest.raises(ValueError, match="dims differ"):
        exact_topk(np.ones((2, 3)), np.ones((5, 4)), k=2)
    with pytest.raises(ValueError, match="2-D"):
        exact_topk(np.ones(3), np.ones((5, 3)), k=2)
    with pytest.raises(ValueError, match="positive integer"):
        exact_topk(np.ones((2, 3)), np.ones((5, 3)), k=0)
    with pytest.raises(ValueError, match="NaN"):
        exact_topk(np.full((2, 3), np.nan), np.ones((5, 3)), k=2)
    with pytest.raises(ValueError, match="batch_size"):
        exact_topk(np.ones((2, 3)), np.ones((5, 3)), k=2, batch_size=0)


def test_exact_index_searches_like_exact_topk():
    rng = np.random.default_rng(3)
    items, queries = rng.standard_normal((400, 8)), rng.standard_normal((30, 8))
    index = ExactIndex(items)
    assert index.ntotal == 400 and index.dim == 8
    for k in (1, 17, 400, 1000):
        assert all(
            np.array_equal(a, b)
            for a, b in zip(index.search(queries, k), exact_topk(queries, items, k), strict=True)
        )


# --- the blocked path against the faiss reference it replaced -----------------------------------------


def dyadic_embeddings(rng, n, d):
    """Values j/64, |j| <= 256: every product and sum of up to 64 of them is exact in float32, so any
    summation order gives the same scores, with few ties (unlike the {-1, 0, 1} embeddings)."""
    return (rng.integers(-256, 257, size=(n, d)) / 64).astype(np.float32)


EMBEDDINGS = {
    "exact-float": lambda rng, n, d: dyadic_embeddings(rng, n, d),
    "tied-integer": lambda rng, n, d: random_embeddings(rng, n, 4, integer=True),  # 81 distinct items
}


@pytest.mark.parametrize("kind", EMBEDDINGS)
@pytest.mark.parametrize(
    ("n_items", "n_queries", "k"),
    [
        (300, 40, 1000),  # k > N: every item, rows just shorter
        (9000, 600, 1),  # sampled threshold (every 2nd item); a full block of 512 and a padded one
        (9000, 600, 100),
        (20000, 520, 1000),  # a block of 512, then 8 queries searched one at a time
        (70000, 20, 250),  # every 16th item sampled
        (20000, 3, 1000),  # queries searched one at a time only
    ],
)
def test_blocked_search_equals_the_faiss_reference(kind, n_items, n_queries, k):
    rng = np.random.default_rng(n_items + n_queries + k)
    items, queries = EMBEDDINGS[kind](rng, n_items, 16), EMBEDDINGS[kind](rng, n_queries, 16)
    scores, ids = ExactIndex(items).search(queries, k)
    ref_scores, ref_ids = faiss_exact_topk(queries, items, k)
    assert ids.shape == (n_queries, min(k, n_items)) and ids.dtype == np.int64
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(scores, ref_scores)


def test_blocked_search_on_gaussian_floats_differs_from_faiss_only_by_rounding():
    # faiss (OpenBLAS) and torch (MKL) may round an inner product differently in its last bit: two
    # items whose scores are that close may swap, and nothing else may differ.
    rng = np.random.default_rng(8)
    items, queries = rng.standard_normal((20000, 16)), rng.standard_normal((520, 16))
    scores, ids = ExactIndex(items).search(queries, 1000)
    ref_scores, ref_ids = faiss_exact_topk(queries, items, 1000)
    swapped = ids != ref_ids
    assert swapped.mean() < 0.001
    np.testing.assert_allclose(scores[swapped], ref_scores[swapped], rtol=1e-6)
    assert (np.diff(scores, axis=1) <= 0).all()  # its own scores, best first


def _sample_holds_the_best(n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """1-d items scored by the query (1,): every 16th item (a superset of the strided sample, every
    32nd) scores above all the others, so the sample's estimate of the k-th best score is far too
    high."""
    rng = np.random.default_rng(0)
    items = rng.random((n_items, 1)).astype(np.float32)
    items[::16, 0] += 10.0
    return items, np.ones((20, 1), np.float32)


@pytest.mark.parametrize(
    ("k", "second_threshold"),
    [(250, "sample k-th"), (5000, "everything")],  # the 70000-item sample holds 2188 items
)
def test_rows_short_of_k_are_searched_again(monkeypatch, k, second_threshold):
    items, queries = _sample_holds_the_best(70_000)
    index = ExactIndex(items)
    assert index.n_sample == 2188  # every 32nd item: all of them among the best
    thresholds = []
    passing = ExactIndex._passing

    def spy(self, block, threshold, *args):
        thresholds.append(threshold[0])
        return passing(self, block, threshold, *args)

    monkeypatch.setattr(ExactIndex, "_passing", spy)
    scores, ids = index.search(queries, k)
    monkeypatch.undo()
    assert len(thresholds) == 2 and thresholds[0] > thresholds[1]
    lowest = np.finfo(np.float32).min
    assert (thresholds[1] == lowest) == (second_threshold == "everything")
    np.testing.assert_array_equal(ids, brute_topk(queries, items, k)[1])
    np.testing.assert_array_equal(ids, faiss_exact_topk(queries, items, k)[1])


def test_negative_zero_ties_with_zero():
    # -1 * 0 = -0.0 and 1 * 0 = +0.0 are equal scores: lower id first, as for any tie.
    items = np.array([[1.0], [-1.0], [1.0]], np.float32)
    for n_queries in (1, 20):  # one at a time and a block
        scores, ids = exact_topk(np.zeros((n_queries, 1)), items, k=3)
        np.testing.assert_array_equal(ids, np.tile([0, 1, 2], (n_queries, 1)))
        assert (scores == 0).all()


def test_overflowing_inner_products_are_refused():
    # Item 0 scores -2 * 3e38 * 2 = -inf, which cannot be ranked; the 30 others score -4.
    items = np.vstack([np.full((1, 2), 3e38), np.ones((30, 2))]).astype(np.float32)
    for n_queries in (1, 20):
        queries = np.full((n_queries, 2), -2.0)
        for search in SEARCHES.values():
            with pytest.raises(ValueError, match="overflow"):
                search(queries, items, k=31)
        # The blocked path ranks whatever does not need the unrankable item.
        np.testing.assert_array_equal(
            exact_topk(queries, items, k=5)[1], np.tile(np.arange(1, 6), (n_queries, 1))
        )


def test_exact_index_keeps_its_own_copy_of_the_items():
    rng = np.random.default_rng(4)
    items, queries = rng.standard_normal((50, 4)).astype(np.float32), rng.standard_normal((3, 4))
    index = ExactIndex(items)
    before = index.search(queries, 10)[1]
    items[:] = 0.0
    np.testing.assert_array_equal(index.search(queries, 10)[1], before)


def test_check_k_accepts_positive_integers_only():
    assert check_k(np.int64(3)) == 3 and type(check_k(np.int64(3))) is int
    for bad in (0, -1, 2.0, True, "3"):
        with pytest.raises(ValueError, match="positive integer"):
            check_k(bad)


def test_importing_the_index_package_does_not_import_faiss_or_torch():
    code = "import sys, convcg_cli.index; print(sorted(m for m in ('faiss', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --- popularity baseline ----------------------------------------------------------------------------


def test_popularity_topk_orders_by_score_then_lower_index():
    scores = np.array([3, 7, 3, 7, 0, 3], dtype=np.uint32)  # unsigned: negation would wrap
    np.testing.assert_array_equal(popularity_topk(scores, 4), [1, 3, 0, 2])
    np.testing.assert_array_equal(popularity_topk(scores, 100), [1, 3, 0, 2, 5, 4])
    rng = np.random.default_rng(5)
    float_scores = rng.integers(0, 4, size=50).astype(np.float64)
    expected = np.lexsort((np.arange(50), -float_scores))[:20]
    np.testing.assert_array_equal(popularity_topk(float_scores, 20), expected)


def test_popularity_topk_rejects_nan():
    with pytest.raises(ValueError, match="NaN"):
        popularity_topk(np.array([1.0, np.nan]), 1)


def test_kept_keys_grow_past_their_first_capacity():
    # Room for one key a row at first: every tile's kept items make the rows grow, and the result is
    # the same as with room to spare.
    rng = np.random.default_rng(3)
    items, queries = dyadic_embeddings(rng, 5000, 16), dyadic_embeddings(rng, 32, 16)
    index = ExactIndex(items)
    block = queries.copy()
    lowest = np.full(len(block), np.finfo(np.float32).min, np.float32)
    tight = index._top(block, lowest.copy(), len(block), 50, _Scratch(), capacity=1)
    roomy = index._top(block, lowest.copy(), len(block), 50, _Scratch(), capacity=6000)
    np.testing.assert_array_equal(tight, roomy)
    np.testing.assert_array_equal(tight & np.uint64(0xFFFFFFFF), brute_topk(queries, items, 50)[1])  # ids
