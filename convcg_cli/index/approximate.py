"""Approximate top-k: faiss inverted-file (IVF) and graph (HNSW) indexes over inner products.

:class:`IVFIndex` is the approximate index a model can serve (``serve.index=ivf``): built at once,
searched like :class:`~convcg_cli.index.exact.ExactIndex` (``search(query_emb, k)``, rows ordered by
descending score, ties by id). :class:`IVFFlat` and :class:`HNSW` are what the benchmark's retrieval
step compares with exact search (chosen by ``retrieval.ann`` in conf/bench.yaml): each has
``build(items)``, ``search(queries, k, effort)`` returning faiss's raw id rows, ``efforts`` (the values
of its search knob to try), ``effort_name`` and, once built, ``description``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from convcg_cli.index.checks import as_float32_matrix, check_k

# faiss wants at least this many training points per k-means cell; fewer cells are made otherwise.
_POINTS_PER_CELL = 39


def _ivf_flat(items: np.ndarray, nlist: int, seed: int | None = None) -> tuple[Any, Any]:
    """``(quantizer, index)``: a trained faiss ``IndexIVFFlat`` over ``items`` (N, d) float32 with
    ``nlist`` cells (capped so that each gets enough training points) holding every item; k-means
    seeded by ``seed`` (faiss's own default when None). The quantizer must be kept alive: the index
    only points at it."""
    import faiss

    nlist = max(1, min(int(nlist), len(items) // _POINTS_PER_CELL))
    quantizer = faiss.IndexFlatIP(items.shape[1])
    index = faiss.IndexIVFFlat(quantizer, items.shape[1], nlist, faiss.METRIC_INNER_PRODUCT)
    if seed is not None:
        index.cp.seed = int(seed)
    index.train(items)
    index.add(items)
    return quantizer, index


class IVFIndex:
    """Approximate search: a faiss inverted-file index (k-means cells, exact inner products inside
    the ``nprobe`` cells nearest the query), for corpora where exact search is too slow.

    Rows are ordered like :class:`~convcg_cli.index.exact.ExactIndex`'s (descending score, ties by
    id); a query whose probed cells hold fewer than k items gets
    :data:`~convcg_cli.index.checks.PADDING_ID` (-1) with score ``-inf`` at the end of its row.

    Args:
        item_emb: (N, d) item embeddings; row i is item id i.
        nlist: number of cells, capped so that each gets >= 39 training points (as faiss wants).
        nprobe: cells visited per query: more is closer to exact and slower.
        seed: k-means seed, so the same corpus gives the same cells.

    Example:
        >>> items = np.eye(40, dtype=np.float32)
        >>> IVFIndex(items, nlist=1).search(items[[2]], k=1)[1].tolist()
        [[2]]
    """

    def __init__(self, item_emb: np.ndarray, nlist: int = 1024, nprobe: int = 16, seed: int = 0) -> None:
        item_emb = as_float32_matrix(item_emb, "item_emb")
        self.dim, self.ntotal = item_emb.shape[1], item_emb.shape[0]
        self.quantizer, self.index = _ivf_flat(item_emb, nlist, seed)
        self.nlist = self.index.nlist
        self.index.nprobe = min(max(1, int(nprobe)), self.nlist)
        self.description = f"IVF-Flat, nlist={self.nlist}, nprobe={self.index.nprobe}"

    def search(self, query_emb: np.ndarray, k: int, batch_size: int = 65536) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, ids)`` of shape (Q, min(k, N)), best first; ``-1`` / ``-inf`` where fewer found."""
        k_out = min(check_k(k), self.ntotal)
        query_emb = as_float32_matrix(query_emb, "query_emb")
        scores = np.empty((query_emb.shape[0], k_out), dtype=np.float32)
        ids = np.empty((query_emb.shape[0], k_out), dtype=np.int64)
        for start in range(0, query_emb.shape[0], batch_size):
            stop = min(start + batch_size, query_emb.shape[0])
            dist, found = self.index.search(query_emb[start:stop], k_out)
            padded = found < 0  # faiss's PADDING_ID
            dist = np.where(padded, -np.inf, dist).astype(np.float32)
            order = np.lexsort((np.where(padded, np.iinfo(np.int64).max, found), -dist), axis=-1)
            scores[start:stop] = np.take_along_axis(dist, order, axis=-1)
            ids[start:stop] = np.take_along_axis(found, order, axis=-1)
        return scores, ids


class IVFFlat:
    """The benchmark's IVF index: k-means cells, exact inner products inside the ``nprobe`` nearest,
    searched at each of ``efforts``.

    Args:
        nlist: number of cells (capped so that each gets >= 39 training points, as faiss wants).
        efforts: the ``nprobe`` values to search with (cells visited per query): more is closer to
            exact and slower.
    """

    effort_name = "nprobe"

    def __init__(self, nlist: int = 1024, efforts: Sequence[int] = (16, 64, 256)) -> None:
        self.nlist, self.efforts = nlist, [int(e) for e in efforts]

    def build(self, items: np.ndarray) -> None:
        """Train the cells on ``items`` (N, d) float32 and add them."""
        self.quantizer, self.index = _ivf_flat(items, self.nlist)
        self.description = f"IVF-Flat, nlist={self.index.nlist}"

    def search(self, queries: np.ndarray, k: int, effort: int) -> np.ndarray:
        """(Q, k) item ids, best first; -1 where the probed cells hold fewer than k items."""
        self.index.nprobe = min(effort, self.index.nlist)
        return self.index.search(queries, k)[1]


class HNSW:
    """The benchmark's faiss HNSW graph index over inner products, searched at each of ``efforts``.

    Args:
        m: graph degree. ef_construction: build-time beam.
        efforts: the ``efSearch`` values (search beam) to search with; each is raised to at least k.
    """

    effort_name = "efSearch"

    def __init__(
        self, m: int = 32, ef_construction: int = 100, efforts: Sequence[int] = (1000, 2000)
    ) -> None:
        self.m, self.ef_construction, self.efforts = m, ef_construction, [int(e) for e in efforts]

    def build(self, items: np.ndarray) -> None:
        """Insert ``items`` (N, d) float32 into the graph."""
        import faiss

        self.index = faiss.IndexHNSWFlat(items.shape[1], self.m, faiss.METRIC_INNER_PRODUCT)
        self.index.hnsw.efConstruction = self.ef_construction
        self.index.add(items)
        self.description = f"HNSW-Flat, M={self.m}, efConstruction={self.ef_construction}"

    def search(self, queries: np.ndarray, k: int, effort: int) -> np.ndarray:
        """(Q, k) item ids, best first."""
        self.index.hnsw.efSearch = max(effort, k)
        return self.index.search(queries, k)[1]
