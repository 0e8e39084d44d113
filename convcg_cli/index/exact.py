"""Exact top-k: maximum-inner-product search over the whole corpus (faiss ``IndexFlatIP``) with ties
broken by lower item id, and the ranking of a non-personalised score vector.

Every function takes and returns numpy arrays; nothing here knows about torch, MLflow or the config.
Rows follow the package's ranking convention (:mod:`convcg_cli.index`): descending score, ties by
ascending item index.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from convcg_cli.index.checks import as_float32_matrix, check_k

if TYPE_CHECKING:
    import faiss

# Extra candidates fetched per query so that a tie group straddling the k-th place is usually
# complete after one search; rows where it is not are searched again with more (see ExactIndex).
_TIE_MARGIN_MIN = 16


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
    query_emb = as_float32_matrix(query_emb, "query_emb")
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
    thing relied on is that faiss returns *a* correct top set by score; the result follows the
    package's convention: descending score, ties by lower item index.

    Args:
        item_emb: (N, d) item embeddings; row i is item id i.

    Example:
        >>> index = ExactIndex(np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32))
        >>> index.search(np.array([[0.0, 2.0]]), k=1)[1].tolist()
        [[1]]
    """

    description = "exact (faiss IndexFlatIP, ties by id)"

    def __init__(self, item_emb: np.ndarray) -> None:
        import faiss

        item_emb = as_float32_matrix(item_emb, "item_emb")
        self.dim = item_emb.shape[1]
        self.ntotal = item_emb.shape[0]
        self.index = faiss.IndexFlatIP(self.dim)
        self.index.add(item_emb)

    def search(self, query_emb: np.ndarray, k: int, batch_size: int = 65536) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, ids)`` of shape (Q, min(k, N)), best first (see :func:`exact_topk`)."""
        k = check_k(k)
        query_emb = as_float32_matrix(query_emb, "query_emb")
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
