"""Counts of positives are reported apart from recall (issue 22): under ``counts/``, so the MLflow
chart view's section of ``<split>/<task>`` holds recall alone and opens on the headline."""

import numpy as np

from convcg_cli.data.features.encodings import QuerySet
from convcg_cli.evaluate import logged_metrics
from convcg_cli.metrics.suite import COUNTS_PREFIX, count_name, report_from_topk


def _queries() -> QuerySet:
    # 4 queries; conversion positives (query, item): (0, 1), (1, 2), (2, 3), (2, 0), (3, 1); the
    # engagement task has 2; items 2 and 3 are new (never shown in training)
    positives = {
        "conversion": (np.array([0, 1, 2, 2, 3]), np.array([1, 2, 3, 0, 1])),
        "engagement": (np.array([0, 3]), np.array([0, 2])),
    }
    new_items = np.array([False, False, True, True])
    return QuerySet({}, positives, np.array(["home_feed"] * 4), (0, 0), {}, new_items)


def test_counts_are_named_under_their_own_prefix():
    assert count_name("heldout", "conversion") == "counts/heldout/conversion/n_positives"
    assert count_name("val", "engagement", "cold") == "counts/val/engagement/cold/n_positives"


def test_a_report_keeps_counts_out_of_the_recall_sections():
    topk = np.array([[1, 0], [0, 3], [3, 2], [2, 1]])
    report = report_from_topk(topk, _queries(), [1, 2], "heldout", ["conversion", "engagement"])
    counts = {name: value for name, value in report.items() if name.startswith(f"{COUNTS_PREFIX}/")}
    assert counts == {
        "counts/heldout/conversion/n_positives": 5.0,
        "counts/heldout/conversion/cold/n_positives": 2.0,  # (1, 2) and (2, 3)
        "counts/heldout/engagement/n_positives": 2.0,
        "counts/heldout/engagement/cold/n_positives": 1.0,  # (3, 2)
    }
    for name in set(report) - set(counts):  # every other metric is a recall
        assert "/recall_at_" in name or "/value_recall_at_" in name, name
    # only the first 3 queries scored: the count follows (query 3's positives are left out)
    partial = report_from_topk(topk[:3], _queries(), [1], "val", ["conversion"])
    assert partial["counts/val/conversion/n_positives"] == 4.0
    assert partial["counts/val/conversion/cold/n_positives"] == 2.0


def test_a_baseline_run_logs_its_counts_under_the_models_names():
    topk = np.array([[1, 0], [0, 3], [3, 2], [2, 1]])
    scored = report_from_topk(topk, _queries(), [1], "heldout/baseline_popularity", ["conversion"])
    logged = logged_metrics(scored, "heldout", "baseline_popularity")
    assert logged["counts/heldout/conversion/n_positives"] == 5.0
    assert logged["counts/heldout/conversion/cold/n_positives"] == 2.0
    recall = scored["heldout/baseline_popularity/conversion/recall_at_1"]
    assert logged["heldout/conversion/recall_at_1"] == recall
    assert not [name for name in logged if "baseline_" in name]
