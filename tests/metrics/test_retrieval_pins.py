"""Recall's arithmetic pinned against plain loops: lists shorter and longer than the compiled scan's
blocks, integer dtypes and broadcast lists, boundaries at k, validation edges.

Written to kill mutants (``make mutate``): every expected value is computed here independently of
:mod:`convcg_cli.metrics.retrieval`.
"""

from __future__ import annotations

import numpy as np
import pytest

from convcg_cli.metrics.retrieval import (
    overlap_at_k,
    positive_hits,
    recall_at_k,
    recall_at_k_by_group,
    value_recall_at_k,
)


def _rank(topk: np.ndarray, q: int, item: int) -> float:
    row = topk[q].tolist()
    return row.index(item) if item in row else np.inf


def _random_case(seed: int, n_queries: int = 9, list_len: int = 5, n_pos: int = 47):
    rng = np.random.default_rng(seed)
    n_items = max(12, list_len + 7)
    topk = np.stack([rng.permutation(n_items)[:list_len] for _ in range(n_queries)])
    topk[rng.random(topk.shape) < 0.1] = -1  # some padding
    query = rng.integers(0, n_queries, n_pos)
    item = rng.integers(0, n_items, n_pos)
    return topk, np.r_[query, query[:6]], np.r_[item, item[:6]]  # duplicate pairs count once


# The compiled scan compares 16 cells at a time: lists within one block, ending on a block's last
# cell, one past it, and over several blocks; the lists as int64, int32 and one broadcast row.
@pytest.mark.parametrize("list_len", [5, 16, 17, 40])
@pytest.mark.parametrize("form", ["int64", "int32", "broadcast"])
def test_recall_is_the_loop_whatever_the_list(list_len, form):
    topk, query, item = _random_case(3 + list_len, list_len=list_len)
    if form == "int32":
        topk = topk.astype(np.int32)
    elif form == "broadcast":
        topk = np.broadcast_to(topk[:1], topk.shape)  # a popularity list: one row for every query
    value = np.random.default_rng(4).random(len(query)) * 3
    group = np.array(["a", "b", "c"])[np.arange(len(query)) % 3]
    ks = [1, 2, 4, 5, 9, 16, 17, 41]
    pairs = sorted(set(zip(query.tolist(), item.tolist(), strict=True)))
    ranks = np.array([_rank(topk, q, i) for q, i in pairs])
    assert recall_at_k(topk, query, item, ks) == pytest.approx({k: float(np.mean(ranks < k)) for k in ks})
    pair_query, hits = positive_hits(topk, query, item, ks)
    assert pair_query.tolist() == [q for q, _ in pairs]
    assert hits.tolist() == [[r < k for k in ks] for r in ranks]
    # Value recall: the value of each pair's first listing.
    first = {}
    for q, i, v in zip(query.tolist(), item.tolist(), value.tolist(), strict=True):
        first.setdefault((q, i), v)
    weight = np.array([first[p] for p in pairs])
    expected = {k: float(weight[ranks < k].sum() / weight.sum()) for k in ks}
    assert value_recall_at_k(topk, query, item, value, ks) == pytest.approx(expected)
    by_group = recall_at_k_by_group(topk, query, item, group, ks)
    for g in "abc":
        mine = sorted(
            {(q, i) for q, i, gg in zip(query.tolist(), item.tolist(), group, strict=True) if gg == g}
        )
        r = np.array([_rank(topk, q, i) for q, i in mine])
        assert by_group[g] == pytest.approx({k: float(np.mean(r < k)) for k in ks})


def test_a_positive_at_the_last_place_of_the_list_counts_at_k_equal_to_the_list_length():
    topk = np.array([[5, 6, 7], [7, 6, 5]])
    # (0, 7) at rank 2: a hit at k=3, not at k=2; (1, 9) is absent: never a hit.
    assert recall_at_k(topk, np.array([0, 1]), np.array([7, 9]), [2, 3, 4]) == {2: 0.0, 3: 0.5, 4: 0.5}
    value = np.array([3.0, 1.0])
    assert value_recall_at_k(topk, np.array([0, 1]), np.array([7, 9]), value, [2, 3]) == {2: 0.0, 3: 0.75}
    assert recall_at_k_by_group(topk, np.array([0, 1]), np.array([7, 5]), np.array([1, 2]), [2, 3]) == {
        "1": {2: 0.0, 3: 1.0},
        "2": {2: 0.0, 3: 1.0},
    }


def test_recall_is_a_mean_not_a_count_and_value_recall_a_share():
    topk = np.array([[0, 1], [2, 3], [4, 5], [6, 7]])
    query, item = np.arange(4), np.array([0, 9, 9, 9])
    assert recall_at_k(topk, query, item, [1]) == {1: 0.25}
    assert value_recall_at_k(topk, query, item, np.array([2.0, 2.0, 4.0, 0.0]), [1]) == {1: 0.25}
    # A NaN value weighs 0; only unknown values: NaN, not 0.
    assert value_recall_at_k(topk, query, item, np.array([np.nan, 1.0, 1.0, 2.0]), [1]) == {1: 0.0}
    assert np.isnan(value_recall_at_k(topk, query, item, np.full(4, np.nan), [1])[1])
    assert value_recall_at_k(topk, query, item, np.array([0.0, 1.0, 0.0, 0.0]), [1]) == {1: 0.0}


def test_item_zero_and_query_zero_are_valid_and_the_last_query_row_is_in_range():
    topk = np.array([[0, 1], [1, 0]])
    assert recall_at_k(topk, np.array([0, 1]), np.array([0, 0]), [1]) == {1: 0.5}
    with pytest.raises(ValueError, match="query_index must lie"):
        recall_at_k(topk, np.array([0, 2]), np.array([0, 0]), [1])
    with pytest.raises(ValueError, match="query_index must lie"):
        recall_at_k(topk, np.array([-1, 1]), np.array([0, 0]), [1])
    with pytest.raises(ValueError, match="positive_item must hold"):
        recall_at_k(topk, np.array([0, 1]), np.array([-1, 3]), [1])
    with pytest.raises(ValueError, match="must be 2-D"):
        recall_at_k(topk[0], np.array([0]), np.array([0]), [1])
    with pytest.raises(ValueError, match="1-D of equal length"):
        recall_at_k(topk, np.array([[0]]), np.array([[0]]), [1])
    with pytest.raises(ValueError, match="1-D of equal length"):
        recall_at_k(topk, np.array([0, 1]), np.array([0]), [1])
    with pytest.raises(ValueError, match="must hold integers"):
        recall_at_k(topk, np.array([0.0]), np.array([0]), [1])
    with pytest.raises(ValueError, match="value must be >= 0"):
        value_recall_at_k(topk, np.array([0, 1]), np.array([0, 1]), np.array([1.0, -0.5]), [1])
    with pytest.raises(ValueError, match="one per positive"):
        value_recall_at_k(topk, np.array([0, 1]), np.array([0, 1]), np.array([1.0]), [1])
    # A value of exactly 0 is allowed.
    assert value_recall_at_k(topk, np.array([0, 1]), np.array([0, 1]), np.array([0.0, 1.0]), [1]) == {1: 1.0}


def test_overlap_is_a_share_of_all_exact_slots():
    assert overlap_at_k(np.array([[3, 1, 2]]), np.array([[1, 2, 3]])) == 1.0
    assert overlap_at_k(np.array([[0, 5], [6, 7]]), np.array([[0, 1], [2, 3]])) == 0.25
    assert overlap_at_k(np.zeros((0, 3), dtype=int), np.zeros((0, 3), dtype=int)) == 1.0
    with pytest.raises(ValueError, match="shapes differ"):
        overlap_at_k(np.zeros((1, 2), dtype=int), np.zeros((1, 3), dtype=int))
