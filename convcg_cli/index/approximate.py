"""Approximate top-k: faiss inverted-file (IVF) and graph (HNSW) indexes over inner products.

:class:`IVFIndex` is the approximate index a model can serve (``serve.index=ivf``): built at once,
searched like :class:`~convcg_cli.index.exact.ExactIndex` (``search(query_emb, k)``, rows ordered by
descending score, ties by id). The benchmark compares it with the other kinds along their search knob
(``retrieval.ann`` and ``corpus.ann`` in conf/bench.yaml): :class:`IVFFlat`, :class:`HNSW`, and IVF
over compressed vectors with an exact re-ranking of a shortlist, :class:`IVFScalarRefine` (8-bit
scalar codes) and :class:`IVFPQFastScanRefine` (4-bit product-quantizer codes, faiss's fast scan).
Each has ``build(items)``, ``search(queries, k, effort)`` returning faiss's raw id rows, ``efforts``
(the values of its search knob to try), ``effort_name`` and, once built, ``description`` and
``nbytes`` (what the index holds in memory, as faiss serialises it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from convcg_cli.index.checks import as_float32_matrix, check_k

# faiss wants at least this many training points per k-means cell; fewer cells are made otherwise.
_POINTS_PER_CELL = 39
# And at most 4 sqrt(N) cells (faiss's guideline starts there): more cells of fewer items each only
# make every probe cheaper to miss. So one nlist (say 4096) suits 100k items (1,265 cells) and 1M (4,000).
_CELLS_PER_SQRT_N = 4


def ivf_cells(nlist: int, n_items: int) -> int:
    """The cells an IVF index over ``n_items`` makes when asked for ``nlist``: at most ``nlist``,
    ``4 sqrt(N)`` and ``N / 39`` (enough training points per cell), at least one.

    Example:
        >>> ivf_cells(4096, 100_000), ivf_cells(4096, 1_000_000), ivf_cells(1024, 400)
        (1265, 4000, 10)
    """
    by_sqrt = round(_CELLS_PER_SQRT_N * math.sqrt(n_items))
    return max(1, min(int(nlist), n_items // _POINTS_PER_CELL, by_sqrt))


def _ivf_flat(items: np.ndarray, nlist: int, seed: int | None = None) -> tuple[Any, Any]:
    """``(quantizer, index)``: a trained faiss ``IndexIVFFlat`` over ``items`` (N, d) float32 with
    :func:`ivf_cells` cells holding every item; k-means seeded by ``seed`` (faiss's own default when
    None). The quantizer must be kept alive: the index only points at it."""
    import faiss

    nlist = ivf_cells(nlist, len(items))
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
        nlist: number of cells, capped at 4 sqrt(N) and so that each gets >= 39 training points
            (:func:`ivf_cells`).
        nprobe: cells visited per query: more is closer to exact and slower.
        seed: k-means seed, so the same corpus gives the same cells.

    Example:
        >>> items = np.eye(40, dtype=np.float32)
        >>> IVFIndex(items, nlist=1).search(items[[2]], k=1)[1].tolist()
        [[2]]
    """

    def __init__(self, item_emb: np.ndarray, nlist: int = 1024, nprobe: int = 16, seed: int = 0) -> None:
        item_emb = as_float32_matrix(item_emb, "item_emb")
        self._hold(*_ivf_flat(item_emb, nlist, seed), nprobe)

    @classmethod
    def from_trained(cls, index: Any, nprobe: int = 16) -> IVFIndex:
        """The IVFIndex of a trained faiss ``IndexIVFFlat`` over inner products holding its items (one
        read back by :func:`~convcg_cli.index.stored.read_index`): nothing is trained again."""
        import faiss

        ivf = cls.__new__(cls)
        ivf._hold(faiss.downcast_index(index.quantizer), index, nprobe)
        return ivf

    def _hold(self, quantizer: Any, index: Any, nprobe: int) -> None:
        """Serve ``index`` (the quantizer kept alive beside it) with ``nprobe`` probes."""
        self.quantizer, self.index = quantizer, index
        self.dim, self.ntotal, self.nlist = index.d, index.ntotal, index.nlist
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


def index_nbytes(index: Any) -> int:
    """Bytes of a faiss index as faiss serialises it: its vectors, codes, cells or graph."""
    import faiss

    return int(faiss.serialize_index(index).nbytes)


class IVFFlat:
    """The benchmark's IVF index: k-means cells, exact inner products inside the ``nprobe`` nearest,
    searched at each of ``efforts``.

    Args:
        nlist: number of cells (capped by :func:`ivf_cells`).
        efforts: the ``nprobe`` values to search with (cells visited per query): more is closer to
            exact and slower.
    """

    effort_name = "nprobe"

    def __init__(self, nlist: int = 1024, efforts: Sequence[int] = (16, 64, 256)) -> None:
        self.nlist, self.efforts = nlist, [int(e) for e in efforts]

    def build(self, items: np.ndarray) -> None:
        """Train the cells on ``items`` (N, d) float32 and add them."""
        self.quantizer, self.index = _ivf_flat(items, self.nlist, seed=0)
        self.description = f"IVF-Flat, nlist={self.index.nlist}"
        self.nbytes = index_nbytes(self.index)

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
        self.nbytes = index_nbytes(self.index)

    def search(self, queries: np.ndarray, k: int, effort: int) -> np.ndarray:
        """(Q, k) item ids, best first."""
        self.index.hnsw.efSearch = max(effort, k)
        return self.index.search(queries, k)[1]


class _IVFRefine:
    """IVF over compressed codes, then the ``k_factor * k`` best by code re-scored exactly (faiss
    ``IndexRefineFlat``, which keeps the float vectors for it); searched at each ``nprobe``."""

    effort_name = "nprobe"
    kind = "IVF"  # the code's name in ``description``

    def __init__(self, nlist: int, k_factor: int, efforts: Sequence[int]) -> None:
        self.nlist, self.k_factor, self.efforts = int(nlist), int(k_factor), [int(e) for e in efforts]

    def _coarse(self, quantizer: Any, dim: int, nlist: int) -> Any:
        raise NotImplementedError  # pragma: no cover - interface

    def build(self, items: np.ndarray) -> None:
        """Train the cells and the codes on ``items`` (N, d) float32 and add them."""
        import faiss

        nlist = ivf_cells(self.nlist, len(items))
        self.quantizer = faiss.IndexFlatIP(items.shape[1])
        self.ivf = self._coarse(self.quantizer, items.shape[1], nlist)
        self.ivf.cp.seed = 0
        self.index = faiss.IndexRefineFlat(self.ivf)
        self.index.k_factor = float(self.k_factor)
        self.index.train(items)
        self.index.add(items)
        self.description = f"{self.kind}, nlist={self.ivf.nlist}, exact re-rank of {self.k_factor}k"
        self.nbytes = index_nbytes(self.index)

    def search(self, queries: np.ndarray, k: int, effort: int) -> np.ndarray:
        """(Q, k) item ids, best first; -1 where the probed cells hold fewer than k items."""
        self.ivf.nprobe = min(effort, self.ivf.nlist)
        return self.index.search(queries, k)[1]


class IVFScalarRefine(_IVFRefine):
    """The benchmark's IVF over 8-bit scalar codes (a quarter of float32's bytes to scan) with an
    exact re-ranking of the ``k_factor * k`` best.

    Args:
        nlist: number of cells (capped by :func:`ivf_cells`).
        k_factor: shortlist length per result re-scored exactly.
        efforts: the ``nprobe`` values to search with.
    """

    kind = "IVF-SQ8"

    def __init__(self, nlist: int = 1024, k_factor: int = 2, efforts: Sequence[int] = (16, 32, 64)) -> None:
        super().__init__(nlist, k_factor, efforts)

    def _coarse(self, quantizer: Any, dim: int, nlist: int) -> Any:
        import faiss

        return faiss.IndexIVFScalarQuantizer(
            quantizer, dim, nlist, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
        )


class IVFPQFastScanRefine(_IVFRefine):
    """The benchmark's IVF over 4-bit product-quantizer codes scanned by faiss's SIMD fast scan, with
    an exact re-ranking of the ``k_factor * k`` best.

    Args:
        nlist: number of cells (capped by :func:`ivf_cells`).
        m: sub-quantizers (the dimension must be a multiple of it); ``m / 2`` bytes per item.
        k_factor: shortlist length per result re-scored exactly.
        efforts: the ``nprobe`` values to search with.
    """

    kind = "IVF-PQ fast scan"

    def __init__(
        self, nlist: int = 1024, m: int = 32, k_factor: int = 16, efforts: Sequence[int] = (16, 32, 64)
    ) -> None:
        super().__init__(nlist, k_factor, efforts)
        self.m = int(m)

    def _coarse(self, quantizer: Any, dim: int, nlist: int) -> Any:
        import faiss

        return faiss.IndexIVFPQFastScan(quantizer, dim, nlist, self.m, 4, faiss.METRIC_INNER_PRODUCT)
