"""Recall reports of one evaluation split: model embeddings or a baseline ranking, per task and surface."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from convcg_cli.metrics.retrieval import (
    exact_topk,
    metric_name,
    recall_at_k,
    recall_at_k_by_group,
)


def _restrict(positives: tuple[np.ndarray, np.ndarray], n_queries: int) -> tuple[np.ndarray, np.ndarray]:
    q, i = positives
    keep = q < n_queries
    return q[keep], i[keep]


def report_from_topk(
    topk_ids: np.ndarray,
    queries,
    ks: Sequence[int],
    split: str,
    tasks: Sequence[str],
    by_surface: bool = False,
) -> dict[str, float]:
    """Recall@k per task (and per surface) of ranked lists ``topk_ids`` (one row per query).

    Tasks with no positive among the scored queries are left out (recall is undefined there).
    """
    out: dict[str, float] = {}
    for task in tasks:
        q, items = _restrict(queries.positives[task], len(topk_ids))
        if len(q) == 0:
            continue
        for k, value in recall_at_k(topk_ids, q, items, ks).items():
            out[metric_name(split, task, k)] = value
        out[f"{split}/{task}/n_positives"] = float(len(q))
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
