"""Recall reports of one evaluation split: model embeddings or a baseline ranking, per task and surface."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from convcg_cli.index import exact_topk
from convcg_cli.metrics.retrieval import (
    COLD_ITEMS,
    VALUE_RECALL,
    metric_name,
    recall_at_k,
    recall_at_k_by_group,
    value_recall_at_k,
)

COUNTS_PREFIX = "counts"  # counts go under their own prefix: a recall section's first chart is recall


def count_name(split: str, task: str, subset: str | None = None) -> str:
    """The name a count of positives is reported under, apart from the recall metrics, so that the
    MLflow chart view's section of ``<split>/<task>`` opens on the headline recall.

    Example:
        >>> count_name("heldout", "conversion"), count_name("val", "conversion", "cold")
        ('counts/heldout/conversion/n_positives', 'counts/val/conversion/cold/n_positives')
    """
    return "/".join([COUNTS_PREFIX, split, task, *([subset] if subset else []), "n_positives"])


def _restrict(positives: tuple[np.ndarray, np.ndarray], n_queries: int) -> tuple[np.ndarray, np.ndarray]:
    q, i = positives
    keep = q < n_queries
    return q[keep], i[keep]


def value_and_cold_report(
    topk_ids: np.ndarray, queries, ks: Sequence[int], split: str, task: str
) -> dict[str, float]:
    """Value-weighted recall@k of ``task`` (when its positives carry values) and recall@k on the
    positives whose item is new (no training-window impression; when there are any), e.g.
    ``heldout/conversion/value_recall_at_100`` and ``heldout/conversion/cold/recall_at_100`` (their
    count ``counts/heldout/conversion/cold/n_positives``: :func:`count_name`)."""
    q_all, _ = queries.positives[task]
    keep = q_all < len(topk_ids)
    q, items = q_all[keep], queries.positives[task][1][keep]
    out: dict[str, float] = {}
    values = getattr(queries, "positive_values", {}).get(task)
    if values is not None and np.nansum(values[keep]) > 0:
        for k, value in value_recall_at_k(topk_ids, q, items, values[keep], ks).items():
            out[metric_name(split, task, k, VALUE_RECALL)] = value
    new_items = getattr(queries, "new_items", None)
    cold = new_items[items] if new_items is not None else np.zeros(len(items), dtype=bool)
    if cold.any():
        for k, value in recall_at_k(topk_ids, q[cold], items[cold], ks).items():
            out[metric_name(split, task, k, subset=COLD_ITEMS)] = value
        out[count_name(split, task, COLD_ITEMS)] = float(cold.sum())
    return out


def report_from_topk(
    topk_ids: np.ndarray,
    queries,
    ks: Sequence[int],
    split: str,
    tasks: Sequence[str],
    by_surface: bool = False,
) -> dict[str, float]:
    """Recall@k per task (and per surface) of ranked lists ``topk_ids`` (one row per query), with
    value-weighted recall and recall on new items where they apply (:func:`value_and_cold_report`),
    and the number of positives scored per task (:func:`count_name`).

    Tasks with no positive among the scored queries are left out (recall is undefined there).
    """
    out: dict[str, float] = {}
    for task in tasks:
        q, items = _restrict(queries.positives[task], len(topk_ids))
        if len(q) == 0:
            continue
        for k, value in recall_at_k(topk_ids, q, items, ks).items():
            out[metric_name(split, task, k)] = value
        out[count_name(split, task)] = float(len(q))
        out.update(value_and_cold_report(topk_ids, queries, ks, split, task))
        if by_surface:
            groups = recall_at_k_by_group(topk_ids, q, items, queries.surface[q], ks)
            for surface, values in groups.items():
                for k, value in values.items():
                    out[metric_name(f"{split}/by_surface/{surface}", task, k)] = value
    return out


def recall_report(
    query_emb: np.ndarray,
    item_emb: np.ndarray,
    queries,
    ks: Sequence[int],
    split: str,
    tasks: Sequence[str],
    n_queries: int | None = None,
    by_surface: bool = False,
) -> dict[str, float]:
    """Exact inner-product search of the whole corpus (faiss), then recall per task."""
    n = len(query_emb) if n_queries is None else n_queries
    _, ids = exact_topk(query_emb[:n], item_emb, max(ks))
    return report_from_topk(ids, queries, ks, split, tasks, by_surface)
