"""Retrieval metrics: recall@k (micro, value-weighted, per group) and top-k overlap of ranked ids.

Every function takes ranked item ids (numpy arrays, best first, as an index of
:mod:`convcg_cli.index` returns them) and returns numbers; nothing here searches, or knows about torch,
MLflow or the config. A positive is "in the top k" when it is among the first k ids of its query's
row, so ties count as the index ordered them (descending score, ties by lower item index).

Metric names are built only through :func:`metric_name`, from the constants below (no ``@``: MLflow
refuses it in metric names).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from convcg_cli.index.checks import check_k

TRAIN = "train"
VAL = "val"
HELDOUT = "heldout"
SPLITS = (TRAIN, VAL, HELDOUT)

RECALL = "recall_at_{k}"
# Share of the positives' value retrieved (each positive weighs its conversion value).
VALUE_RECALL = "value_recall_at_{k}"
# The subset of positives whose item never appeared in the training window (new items).
COLD_ITEMS = "cold"

# The characters MLflow accepts in metric names.
_MLFLOW_NAME = re.compile(r"[\w.\- /:]+")


def metric_name(split: str, task: str, k: int, metric: str = RECALL, subset: str | None = None) -> str:
    """Name of the recall@k metric of ``task`` on ``split``, e.g. ``val/conversion/recall_at_100``.

    Args:
        split: one of ``SPLITS`` (``train``, ``val``, ``heldout``), optionally followed by a sub-path
            for a slice of it, e.g. ``val/by_surface/home``.
        task: task name, e.g. ``conversion``; a single path segment.
        k: cutoff, a positive integer.
        metric: the metric's pattern, :data:`RECALL` or :data:`VALUE_RECALL`.
        subset: a subset of the task's positives, e.g. :data:`COLD_ITEMS`
            (``heldout/conversion/cold/recall_at_100``).

    Raises:
        ValueError: for an unknown split, or a name MLflow would refuse (e.g. one containing ``@``).

    Example:
        >>> metric_name(VAL, "conversion", 100)
        'val/conversion/recall_at_100'
        >>> metric_name(HELDOUT, "conversion", 100, VALUE_RECALL)
        'heldout/conversion/value_recall_at_100'
    """
    if split.split("/")[0] not in SPLITS:
        raise ValueError(f"Unknown split '{split}'; expected one of {SPLITS}, optionally with a sub-path.")
    if not task or "/" in task:
        raise ValueError(f"Task name {task!r} must be a single non-empty path segment.")
    middle = f"{task}/{subset}" if subset else task
    name = f"{split}/{middle}/{metric.format(k=check_k(k))}"
    # Fail here, where the name is built, rather than when MLflow refuses it at logging time.
    if not _MLFLOW_NAME.fullmatch(name) or "" in name.split("/"):
        raise ValueError(
            f"Metric name {name!r} is invalid: use letters, digits, '_', '-', '.', ' ', ':' and "
            "non-empty '/'-separated segments (no '@')."
        )
    return name


def overlap_at_k(approximate_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Mean fraction of each exact top-k row an approximate search also returned (padding never counts).

    Example:
        >>> overlap_at_k(np.array([[0, 1], [2, -1]]), np.array([[1, 0], [2, 3]]))
        0.75
    """
    approximate_ids, exact_ids = np.asarray(approximate_ids), np.asarray(exact_ids)
    if approximate_ids.shape != exact_ids.shape:
        raise ValueError(f"shapes differ: {approximate_ids.shape} vs {exact_ids.shape}.")
    if exact_ids.size == 0:
        return 1.0
    found = [len(np.intersect1d(a[a >= 0], e)) for a, e in zip(approximate_ids, exact_ids, strict=True)]
    return float(np.sum(found) / exact_ids.size)


def recall_at_k(
    topk_ids: np.ndarray,
    query_index: np.ndarray,
    positive_item: np.ndarray,
    ks: Sequence[int],
) -> dict[int, float]:
    """Micro recall@k: the fraction of held-out (query, item) positives found in the query's top k.

    Each unique positive pair counts once, so a query with five held-out items weighs five times a
    query with one; duplicate pairs are counted once.

    Args:
        topk_ids: (Q, K) ranked item ids per query (best first); ``-1`` padding is never a hit.
        query_index: (P,) row of ``topk_ids`` each positive belongs to.
        positive_item: (P,) item id of each positive, >= 0.
        ks: cutoffs. A cutoff larger than K uses the whole list, which is exact only if the lists
            were searched with K >= max(ks) or hold the whole corpus.

    Returns:
        ``{k: recall}`` for every k in ``ks``.

    Raises:
        ValueError: on shape mismatches, out-of-range indices, or no positives at all (callers must
            handle an empty held-out split themselves rather than log a meaningless 0 or NaN).

    Example:
        >>> topk = np.array([[3, 1], [0, 2]])
        >>> recall_at_k(topk, np.array([0, 0, 1]), np.array([1, 4, 0]), ks=[1, 2])
        {1: 0.3333333333333333, 2: 0.6666666666666666}
    """
    ks = [check_k(k) for k in ks]
    _, hits = positive_hits(topk_ids, query_index, positive_item, ks)  # (P_unique, len(ks))
    return {k: float(np.mean(hits[:, j])) for j, k in enumerate(ks)}


def positive_hits(
    topk_ids: np.ndarray, query_index: np.ndarray, positive_item: np.ndarray, ks: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Per-positive hit flags: was each held-out positive in its query's top k, for every k.

    Positives are deduplicated as :func:`recall_at_k` counts them (each unique (query, item) pair
    once), so ``hits.mean(axis=0)`` equals its recall values. The flags are what the bootstrap
    intervals and paired comparisons resample (:mod:`convcg_cli.metrics.bootstrap`).

    Args:
        topk_ids: (Q, K) ranked item ids per query (best first); ``-1`` padding is never a hit.
        query_index: (P,) row of ``topk_ids`` each positive belongs to.
        positive_item: (P,) item id of each positive, >= 0.
        ks: cutoffs.

    Returns:
        ``(pair_query, hits)``: (P',) query index of each unique positive, sorted by (query, item),
        and (P', len(ks)) bool, ``hits[p, j]`` true when positive ``p`` is ranked within ``ks[j]``.

    Example:
        >>> topk = np.array([[3, 1], [0, 2]])
        >>> q, hits = positive_hits(topk, np.array([0, 0, 1]), np.array([1, 4, 0]), ks=[1, 2])
        >>> q.tolist(), hits.tolist()
        ([0, 0, 1], [[False, True], [False, False], [True, True]])
    """
    ks = [check_k(k) for k in ks]
    topk_ids, query_index, positive_item = _check_recall_inputs(topk_ids, query_index, positive_item)
    pairs = np.unique(np.stack([query_index, positive_item], axis=1), axis=0)  # (P', 2)
    rank = _first_hit_rank(topk_ids, pairs[:, 0], pairs[:, 1])  # (P',)
    return pairs[:, 0], rank[:, None] < np.asarray(ks)[None, :]


def value_recall_at_k(
    topk_ids: np.ndarray,
    query_index: np.ndarray,
    positive_item: np.ndarray,
    value: np.ndarray,
    ks: Sequence[int],
) -> dict[int, float]:
    """Value-weighted recall@k: the share of the positives' total value found in their query's top k.

    Positives are deduplicated as :func:`recall_at_k` counts them (each unique (query, item) pair
    once, with the value of its first listing). A positive of unknown value (NaN) weighs 0.

    Args:
        topk_ids, query_index, positive_item, ks: as in :func:`recall_at_k`.
        value: (P,) non-negative value of each positive (e.g. its conversion value), NaN when unknown.

    Returns:
        ``{k: share}`` for every k in ``ks``; NaN when the positives' total value is 0.

    Example:
        >>> topk = np.array([[3, 1], [0, 2]])
        >>> value = np.array([1.0, 2.0, 5.0])
        >>> value_recall_at_k(topk, np.array([0, 0, 1]), np.array([1, 4, 0]), value, [1, 2])
        {1: 0.625, 2: 0.75}
    """
    ks = [check_k(k) for k in ks]
    topk_ids, query_index, positive_item = _check_recall_inputs(topk_ids, query_index, positive_item)
    value = np.asarray(value, dtype=np.float64)
    if value.shape != query_index.shape:
        raise ValueError(f"value has shape {value.shape}, expected {query_index.shape} (one per positive).")
    if (value < 0).any():
        raise ValueError("value must be >= 0 (or NaN when unknown).")
    pairs, first = np.unique(np.stack([query_index, positive_item], axis=1), axis=0, return_index=True)
    weight = np.nan_to_num(value[first], nan=0.0)  # (P',)
    rank = _first_hit_rank(topk_ids, pairs[:, 0], pairs[:, 1])  # (P',)
    total = weight.sum()
    if total == 0:
        return {k: float("nan") for k in ks}
    return {k: float(weight[rank < k].sum() / total) for k in ks}


def recall_at_k_by_group(
    topk_ids: np.ndarray,
    query_index: np.ndarray,
    positive_item: np.ndarray,
    group: np.ndarray,
    ks: Sequence[int],
) -> dict[str, dict[int, float]]:
    """:func:`recall_at_k` computed separately for each group of positives (e.g. each surface).

    Args:
        topk_ids, query_index, positive_item, ks: as in :func:`recall_at_k`.
        group: (P,) label of each positive; any values ``np.unique`` can sort (str, int, ...).
            A (query, item) pair listed under two groups counts once in each.

    Returns:
        ``{str(group value): {k: recall}}``, groups in sorted order.

    Example:
        >>> topk = np.array([[3, 1], [0, 2]])
        >>> recall_at_k_by_group(topk, np.array([0, 1]), np.array([3, 2]), np.array(["a", "b"]), [1])
        {'a': {1: 1.0}, 'b': {1: 0.0}}
    """
    ks = [check_k(k) for k in ks]
    topk_ids, query_index, positive_item = _check_recall_inputs(topk_ids, query_index, positive_item)
    group = np.asarray(group)
    if group.shape != query_index.shape:
        raise ValueError(f"group has shape {group.shape}, expected {query_index.shape} (one per positive).")
    labels, group_code = np.unique(group, return_inverse=True)
    triples = np.unique(np.stack([group_code.ravel(), query_index, positive_item], axis=1), axis=0)
    rank = _first_hit_rank(topk_ids, triples[:, 1], triples[:, 2])
    result: dict[str, dict[int, float]] = {}
    for code, label in enumerate(labels):  # one iteration per group, not per row
        in_group = rank[triples[:, 0] == code]
        result[str(label)] = {k: float(np.mean(in_group < k)) for k in ks}
    return result


def _first_hit_rank(topk_ids: np.ndarray, query_index: np.ndarray, item: np.ndarray) -> np.ndarray:
    """Position of ``item[p]`` in row ``query_index[p]`` of ``topk_ids``; a huge sentinel if absent
    (larger than any cutoff, so a miss is never counted). Compiled: numba is imported on first use."""
    from convcg_cli.metrics.kernels import first_hit_rank

    return first_hit_rank(topk_ids, query_index, item, np.iinfo(np.int64).max)


def _check_recall_inputs(
    topk_ids: np.ndarray, query_index: np.ndarray, positive_item: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate and normalise the arrays shared by the recall functions."""
    topk_ids = np.asarray(topk_ids)
    query_index = np.asarray(query_index)
    positive_item = np.asarray(positive_item)
    if topk_ids.ndim != 2:
        raise ValueError(f"topk_ids must be 2-D (queries x K), got shape {topk_ids.shape}.")
    if query_index.ndim != 1 or positive_item.shape != query_index.shape:
        raise ValueError(
            "query_index and positive_item must be 1-D of equal length, got shapes "
            f"{query_index.shape} and {positive_item.shape}."
        )
    if query_index.size == 0:
        raise ValueError("No positives: recall is undefined; handle an empty held-out split explicitly.")
    for name, arr in (("topk_ids", topk_ids), ("query_index", query_index), ("positive_item", positive_item)):
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{name} must hold integers, got dtype {arr.dtype}.")
    if query_index.min() < 0 or query_index.max() >= topk_ids.shape[0]:
        raise ValueError(f"query_index must lie in [0, {topk_ids.shape[0]}), the rows of topk_ids.")
    if positive_item.min() < 0:
        # A negative id would match the -1 padding.
        raise ValueError("positive_item must hold item ids >= 0.")
    return topk_ids, query_index.astype(np.int64), positive_item.astype(np.int64)
