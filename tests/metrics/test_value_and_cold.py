"""Value-weighted recall and recall on new items, against brute force, and how the suite reports them."""

import numpy as np
import pytest

from convcg_cli.data.features.encodings import QuerySet
from convcg_cli.metrics.retrieval import (
    COLD_ITEMS,
    HELDOUT,
    VALUE_RECALL,
    metric_name,
    recall_at_k,
    value_recall_at_k,
)
from convcg_cli.metrics.suite import report_from_topk

HELDOUT_CONVERSION_VALUE_RECALL_AT_2 = metric_name(HELDOUT, "conversion", 2, VALUE_RECALL)
HELDOUT_CONVERSION_COLD_RECALL_AT_2 = metric_name(HELDOUT, "conversion", 2, subset=COLD_ITEMS)


def brute_force_value_recall(topk, query, item, value, k):
    """Per unique (query, item) pair, first listing's value; share of value whose item is in the top k."""
    seen, found, total = set(), 0.0, 0.0
    for q, i, v in zip(query.tolist(), item.tolist(), value.tolist(), strict=True):
        if (q, i) in seen:
            continue
        seen.add((q, i))
        v = 0.0 if np.isnan(v) else v
        total += v
        found += v if i in topk[q, :k].tolist() else 0.0
    return found / total


def test_metric_names():
    assert HELDOUT_CONVERSION_VALUE_RECALL_AT_2 == "heldout/conversion/value_recall_at_2"
    assert HELDOUT_CONVERSION_COLD_RECALL_AT_2 == "heldout/conversion/cold/recall_at_2"


def test_value_recall_matches_brute_force_on_random_data():
    rng = np.random.default_rng(0)
    n_queries, n_items, n_pos = 40, 30, 200
    topk = np.stack([rng.permutation(n_items)[:12] for _ in range(n_queries)])
    query, item = rng.integers(0, n_queries, n_pos), rng.integers(0, n_items, n_pos)
    value = rng.lognormal(3.0, 1.0, n_pos)
    value[rng.random(n_pos) < 0.1] = np.nan  # unknown values weigh 0
    got = value_recall_at_k(topk, query, item, value, [1, 5, 12, 50])
    for k in (1, 5, 12, 50):
        assert got[k] == pytest.approx(brute_force_value_recall(topk, query, item, value, k))


def test_equal_values_give_plain_recall():
    rng = np.random.default_rng(1)
    topk = np.stack([rng.permutation(20)[:5] for _ in range(10)])
    query, item = rng.integers(0, 10, 60), rng.integers(0, 20, 60)
    assert value_recall_at_k(topk, query, item, np.full(60, 3.0), [2, 5]) == pytest.approx(
        recall_at_k(topk, query, item, [2, 5])
    )


def test_value_recall_validates_inputs():
    topk = np.array([[0, 1]])
    with pytest.raises(ValueError, match="one per positive"):
        value_recall_at_k(topk, np.array([0]), np.array([1]), np.array([1.0, 2.0]), [1])
    with pytest.raises(ValueError, match=">= 0"):
        value_recall_at_k(topk, np.array([0]), np.array([1]), np.array([-1.0]), [1])
    assert np.isnan(value_recall_at_k(topk, np.array([0]), np.array([1]), np.array([np.nan]), [1])[1])


def _queries(values=None, new_items=None):
    # 3 queries; conversion positives (query, item): (0, 1), (1, 2), (2, 3)
    positives = {"conversion": (np.array([0, 1, 2]), np.array([1, 2, 3]))}
    surface = np.array(["home_feed"] * 3)
    return QuerySet({}, positives, surface, (0, 0), values or {}, new_items)


def test_suite_reports_value_and_cold_recall_only_when_they_apply():
    topk = np.array([[1, 0], [0, 3], [3, 2]])  # hits: query 0 and query 2
    plain = report_from_topk(topk, _queries(), [2], HELDOUT, ["conversion"])
    assert HELDOUT_CONVERSION_VALUE_RECALL_AT_2 not in plain
    assert HELDOUT_CONVERSION_COLD_RECALL_AT_2 not in plain
    new_items = np.array([False, False, True, True])  # items 2 and 3 are new
    report = report_from_topk(
        topk, _queries({"conversion": np.array([10.0, 30.0, 60.0])}, new_items), [2], HELDOUT, ["conversion"]
    )
    assert report[HELDOUT_CONVERSION_VALUE_RECALL_AT_2] == pytest.approx(70 / 100)
    assert report[HELDOUT_CONVERSION_COLD_RECALL_AT_2] == pytest.approx(1 / 2)
    assert report["counts/heldout/conversion/cold/n_positives"] == 2
    assert report["heldout/conversion/recall_at_2"] == pytest.approx(2 / 3)
