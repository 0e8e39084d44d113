"""ANN index wrappers searched by the retrieval step, chosen by ``retrieval.ann`` in conf/bench.yaml.

Each has ``build(items)``, ``search(queries, k, effort)``, ``efforts`` (the values of its search knob
to try), ``effort_name`` and, once built, ``description``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class IVFFlat:
    """faiss inverted-file index: k-means cells, exact inner products inside the ``nprobe`` nearest.

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
        import faiss

        nlist = max(1, min(self.nlist, len(items) // 39))
        self.quantizer = faiss.IndexFlatIP(items.shape[1])  # kept: the index only points at it
        self.index = faiss.IndexIVFFlat(self.quantizer, items.shape[1], nlist, faiss.METRIC_INNER_PRODUCT)
        self.index.train(items)
        self.index.add(items)
        self.description = f"IVF-Flat, nlist={nlist}"

    def search(self, queries: np.ndarray, k: int, effort: int) -> np.ndarray:
        """(Q, k) item ids, best first; -1 where the probed cells hold fewer than k items."""
        self.index.nprobe = min(effort, self.index.nlist)
        return self.index.search(queries, k)[1]


class HNSW:
    """faiss HNSW graph index over inner products.

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
