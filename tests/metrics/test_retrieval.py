"""Retrieval metrics against brute force on seeded synthetic data, with ties and k beyond the corpus.

The ranked lists come from the exact search of :mod:`convcg_cli.index` (tested in tests/index)."""

import numpy as np
import pytest

from convcg_cli.index import exact_topk
from convcg_cli.metrics.retrieval import (
    RECALL,
    SPLITS,
    VAL,
    metric_name,
    overlap_at_k,
    recall_at_k,
    recall_at_k_by_group,
)
from tests.index.test_exact import QUERY_COUNTS, random_embeddings


def brute_recall(topk_ids, query_index, positive_item, k):
    """Reference recall: a plain loop over the set of unique positive pairs."""
    pairs = set(zip(query_index.tolist(), positive_item.tolist(), strict=True))
    hits = sum(item in topk_ids[q, :k].tolist() for q, item in pairs)
    return hits / len(pairs)


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


# --- overlap of an approximate search with the exact one -------------------------------------------


def test_overlap_at_k_counts_shared_ids_per_row_and_never_padding():
    exact = np.array([[1, 0, 2], [2, 3, 4]])
    assert overlap_at_k(np.array([[0, 1, 2], [2, 3, 4]]), exact) == 1.0  # order does not matter
    assert overlap_at_k(np.array([[0, 5, -1], [4, -1, -1]]), exact) == pytest.approx(2 / 6)
    assert overlap_at_k(np.empty((0, 3), np.int64), np.empty((0, 3), np.int64)) == 1.0
    with pytest.raises(ValueError, match="shapes differ"):
        overlap_at_k(np.zeros((2, 3)), np.zeros((2, 2)))
