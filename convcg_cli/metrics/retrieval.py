"""Retrieval metrics for the two-tower model: exact top-k search (faiss) and recall@k.

Every function takes and returns numpy arrays; nothing here knows about torch, MLflow or the config.

Ranking convention, used by every function in this module: items are ordered by descending score,
and equal scores by *ascending item index*. So a positive tied with the k-th item counts as retrieved
exactly when its index is lower than the indices of the tied items it would displace.

Metric names are built only through :func:`metric_name`, from the constants below (no ``@``: MLflow
refuses it in metric names).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import faiss
import numpy as np

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

# faiss pads rows with -1 when k > N; we never return that padding, but recall accepts it.
PADDING_ID = -1

# Extra candidates fetched per query so that a tie group straddling the k-th place is usually
# complete after one search; rows where it is not are searched again with more (see exact_topk).
_TIE_MARGIN_MIN = 16

# Bounds the (positives x K) comparison matrix built by recall to about 16M cells at a time.
_RECALL_CHUNK_CELLS = 1 << 24


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


def exact_topk(
    query_emb: np.ndarray, item_emb: np.ndarray, k: int, batch_size: int = 65536
) -> tuple[np.ndarray, np.ndarray]:
    """Exact maximum-inner-product top-k of every query over all items, with deterministic ties.

    One-shot form of :class:`ExactIndex` (which see): builds the index over ``item_emb`` and searches
    ``query_emb`` in it.

    Args:
        query_emb: (Q, d) query embeddings.
        item_emb: (N, d) item embeddings; row i is item id i.
        k: number of results per query, >= 1.
        batch_size: queries searched per faiss call.

    Returns:
        ``(scores, ids)``, float32 and int64 arrays of shape (Q, k') with ``k' = min(k, N)``: when the
        corpus is smaller than ``k`` the rows are just shorter, never padded with faiss's ``-1``.
        No queries gives arrays of shape (0, k').

    Example:
        >>> items = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], dtype=np.float32)
        >>> scores, ids = exact_topk(np.array([[1.0, 0.0]]), items, k=5)
        >>> ids.tolist(), scores.tolist()
        ([[0, 2, 1]], [[1.0, 1.0, 0.0]])
    """
    k = check_k(k)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    query_emb = _as_float32_matrix(query_emb, "query_emb")
    return ExactIndex(item_emb).search(query_emb, k, batch_size)


class ExactIndex:
    """Exact maximum-inner-product search over a fixed item corpus, ties broken by lower item id.

    The one top-k search of convcg: evaluation, the served model's ``predict`` and batch candidate
    generation all rank through an index of this interface (``search(query_emb, k)``). The faiss
    ``IndexFlatIP`` (brute force, float32) is built once; queries are searched ``batch_size`` at a
    time so memory stays bounded by ``batch_size * k``.

    faiss 1.15.1 does not break exact ties by index, on any of its search paths (per-query loop,
    BLAS, database-parallel): tied items come out in descending index order, and for k >= 100 its
    reservoir selection may even keep higher-index tied items at the cutoff instead of lower ones.
    So we fetch a few extra candidates, re-sort each row by ``(-score, id)`` and, for the rare rows
    whose tie group at the cutoff may be incomplete, search again with more candidates. The only
    thing relied on is that faiss returns *a* correct top set by score; the result follows this
    module's convention: descending score, ties by lower item index.

    Args:
        item_emb: (N, d) item embeddings; row i is item id i.

    Example:
        >>> index = ExactIndex(np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32))
        >>> index.search(np.array([[0.0, 2.0]]), k=1)[1].tolist()
        [[1]]
    """

    description = "exact (faiss IndexFlatIP, ties by id)"

    def __init__(self, item_emb: np.ndarray) -> None:
        item_emb = _as_float32_matrix(item_emb, "item_emb")
        self.dim = item_emb.shape[1]
        self.ntotal = item_emb.shape[0]
        self.index = faiss.IndexFlatIP(self.dim)
        self.index.add(item_emb)

    def search(self, query_emb: np.ndarray, k: int, batch_size: int = 65536) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, ids)`` of shape (Q, min(k, N)), best first (see :func:`exact_topk`)."""
        k = check_k(k)
        query_emb = _as_float32_matrix(query_emb, "query_emb")
        if query_emb.shape[1] != self.dim:
            raise ValueError(
                f"Embedding dims differ: query_emb has d={query_emb.shape[1]}, item_emb has d={self.dim}."
            )
        n_queries, n_items = query_emb.shape[0], self.ntotal
        k_out = min(k, n_items)
        scores = np.empty((n_queries, k_out), dtype=np.float32)
        ids = np.empty((n_queries, k_out), dtype=np.int64)
        if n_queries == 0 or k_out == 0:
            return scores, ids
        k_search = min(n_items, k_out + max(_TIE_MARGIN_MIN, k_out // 8))
        for start in range(0, n_queries, batch_size):
            stop = min(start + batch_size, n_queries)
            scores[start:stop], ids[start:stop] = _search_ties_by_id(
                self.index, query_emb[start:stop], k_out, k_search
            )
        return scores, ids


class IVFIndex:
    """Approximate search: a faiss inverted-file index (k-means cells, exact inner products inside
    the ``nprobe`` cells nearest the query), for corpora where :class:`ExactIndex` is too slow.

    Rows are ordered like :class:`ExactIndex`'s (descending score, ties by id); a query whose probed
    cells hold fewer than k items gets ``PADDING_ID`` (-1) with score ``-inf`` at the end of its row.

    Args:
        item_emb: (N, d) item embeddings; row i is item id i.
        nlist: number of cells, capped so that each gets >= 39 training points (as faiss wants).
        nprobe: cells visited per query: more is closer to exact and slower.
        seed: k-means seed, so the same corpus gives the same cells.
    """

    def __init__(self, item_emb: np.ndarray, nlist: int = 1024, nprobe: int = 16, seed: int = 0) -> None:
        item_emb = _as_float32_matrix(item_emb, "item_emb")
        self.dim, self.ntotal = item_emb.shape[1], item_emb.shape[0]
        self.nlist = max(1, min(int(nlist), self.ntotal // 39))
        self.quantizer = faiss.IndexFlatIP(self.dim)  # kept: the index only points at it
        self.index = faiss.IndexIVFFlat(self.quantizer, self.dim, self.nlist, faiss.METRIC_INNER_PRODUCT)
        self.index.cp.seed = int(seed)
        self.index.train(item_emb)
        self.index.add(item_emb)
        self.index.nprobe = min(max(1, int(nprobe)), self.nlist)
        self.description = f"IVF-Flat, nlist={self.nlist}, nprobe={self.index.nprobe}"

    def search(self, query_emb: np.ndarray, k: int, batch_size: int = 65536) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, ids)`` of shape (Q, min(k, N)), best first; ``-1`` / ``-inf`` where fewer found."""
        k_out = min(check_k(k), self.ntotal)
        query_emb = _as_float32_matrix(query_emb, "query_emb")
        scores = np.empty((query_emb.shape[0], k_out), dtype=np.float32)
        ids = np.empty((query_emb.shape[0], k_out), dtype=np.int64)
        for start in range(0, query_emb.shape[0], batch_size):
            stop = min(start + batch_size, query_emb.shape[0])
            dist, found = self.index.search(query_emb[start:stop], k_out)
            dist = np.where(found < 0, -np.inf, dist).astype(np.float32)
            order = np.lexsort((np.where(found < 0, np.iinfo(np.int64).max, found), -dist), axis=-1)
            scores[start:stop] = np.take_along_axis(dist, order, axis=-1)
            ids[start:stop] = np.take_along_axis(found, order, axis=-1)
        return scores, ids


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


def _search_ties_by_id(
    index: faiss.IndexFlatIP, queries: np.ndarray, k: int, k_search: int
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of ``queries`` ordered by (-score, id), fetching ``k_search >= k`` candidates."""
    n_items = index.ntotal
    dist, ids = index.search(queries, k_search)  # (B, k_search)
    if (ids < 0).any():
        # k_search <= N, so faiss only pads when a score is NaN or below -FLT_MAX.
        raise ValueError("Inner products overflow float32 or are NaN; cannot rank the items.")
    order = np.lexsort((ids, -dist), axis=-1)
    dist = np.take_along_axis(dist, order, axis=-1)
    ids = np.take_along_axis(ids, order, axis=-1)
    if k_search < n_items:
        # If the last candidate ties the k-th score, items of that tie group with lower ids may have
        # been left out by faiss; fetch more for those rows until the group is provably complete.
        unresolved = dist[:, k_search - 1] == dist[:, k - 1]
        if unresolved.any():
            dist_u, ids_u = _search_ties_by_id(index, queries[unresolved], k, min(n_items, 2 * k_search))
            dist[unresolved, :k] = dist_u
            ids[unresolved, :k] = ids_u
    return dist[:, :k], ids[:, :k]


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


def popularity_topk(item_scores: np.ndarray, k: int) -> np.ndarray:
    """Ranked list of a non-personalised baseline: item ids by descending score, ties by lower id.

    Args:
        item_scores: (N,) a popularity score per item (e.g. training conversions); any real dtype.
        k: list length, >= 1.

    Returns:
        (k',) int64 item ids with ``k' = min(k, N)``.

    Example:
        >>> popularity_topk(np.array([1, 5, 5, 0]), k=3).tolist()
        [1, 2, 0]
    """
    k = check_k(k)
    item_scores = np.asarray(item_scores)
    if item_scores.ndim != 1:
        raise ValueError(f"item_scores must be 1-D, got shape {item_scores.shape}.")
    if np.issubdtype(item_scores.dtype, np.floating) and np.isnan(item_scores).any():
        raise ValueError("item_scores contains NaN; cannot rank the items.")
    n = item_scores.shape[0]
    # Stable ascending sort of the reversed array, read backwards, is a descending sort that keeps
    # lower ids first among ties; unlike sorting -scores it also works for unsigned and bool dtypes.
    descending = (n - 1) - np.argsort(item_scores[::-1], kind="stable")[::-1]
    return descending[:k].astype(np.int64)


def _first_hit_rank(topk_ids: np.ndarray, query_index: np.ndarray, item: np.ndarray) -> np.ndarray:
    """Position of ``item[p]`` in row ``query_index[p]`` of ``topk_ids``; a huge sentinel if absent."""
    n_pos, list_len = query_index.shape[0], topk_ids.shape[1]
    never = np.iinfo(np.int64).max  # larger than any cutoff, so a miss is never counted
    rank = np.full(n_pos, never, dtype=np.int64)
    chunk = max(1, _RECALL_CHUNK_CELLS // max(1, list_len))
    for start in range(0, n_pos, chunk):  # chunks bound memory; each chunk is fully vectorised
        stop = min(start + chunk, n_pos)
        match = topk_ids[query_index[start:stop]] == item[start:stop, None]  # (chunk, K)
        found = match.any(axis=1)
        rank[start:stop][found] = match.argmax(axis=1)[found]
    return rank


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


def _as_float32_matrix(x: np.ndarray, name: str) -> np.ndarray:
    """``x`` as a C-contiguous float32 (n, d) array with d >= 1 and finite values (faiss needs all)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] == 0:
        raise ValueError(f"{name} must be 2-D with at least one column, got shape {x.shape}.")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values.")
    return x


def check_k(k: int) -> int:
    """``k`` as a positive Python int, or ValueError: the one check of a cutoff, for every metric.

    Example:
        >>> check_k(np.int64(10))
        10
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}.")
    return int(k)
