"""Retrieval metrics against brute force on seeded synthetic data, with ties and k beyond the corpus."""

import contextlib

import faiss
import numpy as np
import pytest

from convcg_cli.metrics.retrieval import (
    RECALL,
    SPLITS,
    VAL,
    exact_topk,
    metric_name,
    popularity_topk,
    recall_at_k,
    recall_at_k_by_group,
)

# faiss 1.15.1 IndexFlatIP picks its kernel from the query block, not from a query count: the per-query
# SIMD loop while n_queries * d < distance_compute_blas_threshold (128000), BLAS above it, and a
# database-parallel loop when n_queries < threads and N >= 10000. The heap keeps k < 100 results, a
# reservoir k >= 100. The tests force each path, since default thresholds would never reach BLAS here.
QUERY_COUNTS = [1, 50]
SEARCH_PATHS = ["simd-loop", "blas"]


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


def brute_recall(topk_ids, query_index, positive_item, k):
    """Reference recall: a plain loop over the set of unique positive pairs."""
    pairs = set(zip(query_index.tolist(), positive_item.tolist(), strict=True))
    hits = sum(item in topk_ids[q, :k].tolist() for q, item in pairs)
    return hits / len(pairs)


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


@pytest.mark.parametrize("path", SEARCH_PATHS)
@pytest.mark.parametrize("n_queries", QUERY_COUNTS)
@pytest.mark.parametrize("integer", [False, True], ids=["float", "tied-integer"])
@pytest.mark.parametrize("k", [7, 150, 301, 400], ids=["k<N-heap", "k<N-reservoir", "k==N", "k>N"])
def test_exact_topk_matches_brute_force(path, n_queries, integer, k):
    rng = np.random.default_rng(1000 * n_queries + k + integer)
    items = random_embeddings(rng, 301, 4, integer)
    queries = random_embeddings(rng, n_queries, 4, integer)
    with faiss_search_path(path):
        scores, ids = exact_topk(queries, items, k)
    ref_scores, ref_ids = brute_topk(queries, items, k)
    assert ids.shape == scores.shape == (n_queries, min(k, 301))
    assert ids.dtype == np.int64 and scores.dtype == np.float32
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)
    assert (ids >= 0).all()


@pytest.mark.parametrize("k", [7, 150])
def test_exact_topk_matches_brute_force_on_database_parallel_path(k):
    # One query, 4 threads and N >= 10000 send faiss to its database-parallel loop.
    rng = np.random.default_rng(k)
    items = random_embeddings(rng, 10_000, 2, integer=True)
    query = random_embeddings(rng, 1, 2, integer=True)
    with faiss_search_path("simd-loop", threads=4):
        _, ids = exact_topk(query, items, k)
    np.testing.assert_array_equal(ids, brute_topk(query, items, k)[1])


@pytest.mark.parametrize("path", SEARCH_PATHS)
@pytest.mark.parametrize("n_queries", QUERY_COUNTS)
def test_exact_topk_all_items_tied_keeps_lowest_ids(path, n_queries):
    # A tie group far larger than the extra candidates fetched: forces the re-search.
    items = np.ones((500, 3), np.float32)
    with faiss_search_path(path):
        scores, ids = exact_topk(np.ones((n_queries, 3)), items, k=5)
    np.testing.assert_array_equal(ids, np.tile(np.arange(5), (n_queries, 1)))
    np.testing.assert_array_equal(scores, np.full((n_queries, 5), 3.0))


@pytest.mark.parametrize("path", SEARCH_PATHS)
@pytest.mark.parametrize("n_queries", QUERY_COUNTS)
@pytest.mark.parametrize("k", [15, 120])
def test_exact_topk_tie_at_cutoff_after_better_items(path, n_queries, k):
    # The ten 2s come first, then the tied 1s by ascending id.
    queries = np.tile([[1.0, 0.0]], (n_queries, 1))
    with faiss_search_path(path):
        _, ids = exact_topk(queries, tied_corpus(), k=k)
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


# --- recall_at_k ------------------------------------------------------------------------------------


def test_recall_pinned_small_example():
    # 3 queries, 5 items, lists of length 2.
    topk = np.array([[4, 2], [0, 1], [3, -1]])
    query_index = np.array([0, 0, 1, 2, 2])
    positive_item = np.array([2, 3, 0, 3, 1])
    # Hits: (0,2) at rank 1, (0,3) miss, (1,0) at rank 0, (2,3) at rank 0, (2,1) miss.
    assert recall_at_k(topk, query_index, positive_item, ks=[1, 2, 10]) == {1: 2 / 5, 2: 3 / 5, 10: 3 / 5}


def test_recall_pinned_two_thirds_with_duplicates():
    topk = np.array([[0, 1], [2, 3], [4, 0]])
    # (0,1) is listed twice and counts once; (2,3) is never retrieved.
    result = recall_at_k(topk, np.array([0, 0, 1, 2]), np.array([1, 1, 2, 3]), ks=[1, 2])
    assert result == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3)}


def test_recall_matches_brute_force_on_random_data():
    rng = np.random.default_rng(7)
    n_queries, n_items = 40, 60
    queries = random_embeddings(rng, n_queries, 3, integer=True)
    items = random_embeddings(rng, n_items, 3, integer=True)
    _, topk = exact_topk(queries, items, k=25)
    # Several positives per query, with duplicates and items beyond the list.
    query_index = rng.integers(0, n_queries, size=300)
    positive_item = rng.integers(0, n_items, size=300)
    query_index = np.concatenate([query_index, query_index[:50]])
    positive_item = np.concatenate([positive_item, positive_item[:50]])
    ks = [1, 5, 10, 25, 100]
    result = recall_at_k(topk, query_index, positive_item, ks)
    for k in ks:
        assert result[k] == pytest.approx(brute_recall(topk, query_index, positive_item, k))
    assert 0 < result[1] < result[25] < 1
    assert result[100] == result[25]  # k > K uses the whole list


def test_recall_with_k_beyond_small_corpus_is_one():
    # Corpus of 3 items, so every list is the whole corpus: every positive is found for k >= 3.
    rng = np.random.default_rng(11)
    _, topk = exact_topk(rng.standard_normal((4, 2)), rng.standard_normal((3, 2)), k=100)
    assert topk.shape == (4, 3)
    result = recall_at_k(topk, np.array([0, 1, 2, 3, 3]), np.array([0, 1, 2, 0, 2]), ks=[3, 100])
    assert result == {3: 1.0, 100: 1.0}


def test_recall_padding_is_never_a_hit():
    topk = np.array([[5, -1, -1], [-1, -1, -1]])
    assert recall_at_k(topk, np.array([0, 1]), np.array([5, 0]), ks=[3]) == {3: 0.5}


def test_recall_tie_at_cutoff_follows_lower_index_convention():
    # Items 1..4 all score 1 for the query; item 0 scores 2. Top 3 = [0, 1, 2]: the tied
    # positive 2 is in, the equally scored positive 4 is out because its index is higher.
    items = np.array([[2.0], [1.0], [1.0], [1.0], [1.0]], np.float32)
    for n_queries in QUERY_COUNTS:
        _, topk = exact_topk(np.ones((n_queries, 1)), items, k=3)
        np.testing.assert_array_equal(topk[0], [0, 1, 2])
        assert recall_at_k(topk, np.array([0, 0]), np.array([2, 4]), ks=[3]) == {3: 0.5}


def test_recall_validates_inputs():
    topk = np.array([[0, 1]])
    with pytest.raises(ValueError, match="No positives"):
        recall_at_k(topk, np.array([], np.int64), np.array([], np.int64), ks=[1])
    with pytest.raises(ValueError, match="equal length"):
        recall_at_k(topk, np.array([0, 0]), np.array([1]), ks=[1])
    with pytest.raises(ValueError, match="query_index"):
        recall_at_k(topk, np.array([1]), np.array([1]), ks=[1])
    with pytest.raises(ValueError, match=">= 0"):
        recall_at_k(topk, np.array([0]), np.array([-1]), ks=[1])
    with pytest.raises(ValueError, match="positive integer"):
        recall_at_k(topk, np.array([0]), np.array([1]), ks=[0])


# --- recall_at_k_by_group ---------------------------------------------------------------------------


def test_recall_by_group_pinned_and_matches_per_group_recall():
    topk = np.array([[0, 1], [2, 3], [4, 0]])
    query_index = np.array([0, 1, 2, 0, 2, 2])
    positive_item = np.array([1, 2, 3, 0, 0, 0])
    group = np.array(["home", "home", "home", "search", "search", "search"])
    result = recall_at_k_by_group(topk, query_index, positive_item, group, ks=[1, 2])
    assert result == {
        "home": {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3)},
        "search": {1: 0.5, 2: 1.0},  # (2, 0) is listed twice and counts once
    }
    for label in ("home", "search"):
        mask = group == label
        assert result[label] == recall_at_k(topk, query_index[mask], positive_item[mask], ks=[1, 2])


def test_recall_by_group_validates_group_length():
    with pytest.raises(ValueError, match="group"):
        recall_at_k_by_group(np.array([[0]]), np.array([0]), np.array([0]), np.array(["a", "b"]), ks=[1])


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


# --- metric names -----------------------------------------------------------------------------------


def test_metric_name_format():
    assert metric_name(VAL, "conversion", 100) == "val/conversion/recall_at_100"
    assert (
        metric_name("heldout/by_surface/home", "engagement", 5)
        == "heldout/by_surface/home/engagement/recall_at_5"
    )
    assert RECALL.format(k=5) == "recall_at_5"
    for split in SPLITS:
        assert "@" not in metric_name(split, "engagement", 10)


def test_metric_name_rejects_bad_parts():
    with pytest.raises(ValueError, match="split"):
        metric_name("validation", "conversion", 10)
    with pytest.raises(ValueError, match="no '@'"):
        metric_name(VAL, "conv@x", 10)
    with pytest.raises(ValueError, match="invalid"):
        metric_name("val//home", "conversion", 10)
    with pytest.raises(ValueError, match="single"):
        metric_name(VAL, "a/b", 10)
    with pytest.raises(ValueError, match="positive integer"):
        metric_name(VAL, "conversion", 0)


# --- ExactIndex / IVFIndex ---------------------------------------------------------------------------


def test_exact_index_searches_like_exact_topk_and_ivf_with_every_cell_is_exact():
    from convcg_cli.metrics.retrieval import ExactIndex, IVFIndex, overlap_at_k

    rng = np.random.default_rng(3)
    items, queries = rng.standard_normal((400, 8)), rng.standard_normal((30, 8))
    index = ExactIndex(items)
    for k in (1, 17, 400, 1000):
        assert all(
            np.array_equal(a, b)
            for a, b in zip(index.search(queries, k), exact_topk(queries, items, k), strict=True)
        )
    ivf = IVFIndex(items, nlist=4, nprobe=4)  # every cell probed: the exact result
    _, exact = index.search(queries, 20)
    _, approx = ivf.search(queries, 20)
    assert np.array_equal(approx, exact)
    assert overlap_at_k(approx, exact) == 1.0
    assert 0.0 < overlap_at_k(IVFIndex(items, nlist=8, nprobe=1).search(queries, 20)[1], exact) <= 1.0
