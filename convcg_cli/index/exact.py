"""Exact top-k: maximum-inner-product search over the whole corpus with ties broken by lower item id,
and the ranking of a non-personalised score vector.

Every function takes and returns numpy arrays; nothing here knows about MLflow or the config.
Rows follow the package's ranking convention (:mod:`convcg_cli.index`): descending score, ties by
ascending item index.

How :class:`ExactIndex` keeps up with the arithmetic: the scores are computed by blocks of queries
and tiles of items (torch's GEMM, on (512 x 256) tiles that stay in the core's L2 cache), and each
tile is only *compared* with a per-query threshold, in one compiled pass over it
(:func:`~convcg_cli.index.kernels.keep_passing`, under a fifth of a nanosecond a score): the few items
at or above the threshold are kept as 64-bit sort keys (score, then id), and the top k is selected
among them. The threshold comes from a strided sample of the corpus, set so that a few more than k
items pass (1.7 k at k=1000); a query left with fewer than k is searched again with a threshold that
cannot be too high. Nothing is lost: every item scoring at least the k-th score is kept, so ties at
the cutoff are complete.
:func:`faiss_exact_topk` (faiss ``IndexFlatIP``, re-sorted) is the previous path, kept as the
reference the tests and the benchmark compare with.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from convcg_cli.index.checks import as_float32_matrix, check_k
from convcg_cli.index.pages import empty_ordinary

if TYPE_CHECKING:
    import faiss

# Queries per block and scores per tile: (512 x 256) float32 tiles (512 KiB) keep the GEMM at its
# peak and stay in L2 for the threshold pass. With the sample below: 1.34 s against 1.51 s for
# (512 x 2048) tiles and every 16th item sampled (10k queries, 100k trained items, k=1000, one
# thread; medians of 12 interleaved rounds on the bench machine), the bare GEMM as fast either way.
QUERY_BLOCK = 512
TILE_CELLS = 1 << 17
# Blocks of queries are padded to a multiple of 16 rows: MKL then rounds an inner product the same
# way whatever the block, so a query's scores do not depend on the queries searched with it. Fewer
# queries are searched one at a time (a matrix-vector product: a GEMM with so few rows would first
# copy the whole corpus), whose scores may differ from a block's in the last bit.
_ROW_ALIGN = 16
# The threshold sample: every 32nd item (at least 2048 of them). The sample's score of rank
# j = k' * S / N estimates the k'-th best score of the corpus within about 1/sqrt(j) (relative, in
# rank), so k' = k * (1 + 4 / sqrt(k * S / N)) keeps at least k items for all but a tiny share of the
# queries (those are searched again); and at least 1/4096 of the corpus (a floor for tiny k). A
# sparser sample costs less to score and select in than the few more items it lets pass (1.7 k
# instead of 1.5 k at k=1000 on 100k items).
_SAMPLE_STRIDE = 32
_MIN_SAMPLE = 2048
_PASS_SIGMAS = 4.0
_PASS_SHARE = 1 / 4096
# Below every finite score: the threshold of "keep everything" (NaN and -inf are never kept).
_LOWEST = np.float32(np.finfo(np.float32).min)
_NO_KEY = np.iinfo(np.uint64).max  # padding of a row's keys: after every real key
# Extra candidates the faiss reference fetches per query so that a tie group straddling the k-th
# place is usually complete after one search; rows where it is not are searched again with more.
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
        batch_size: queries searched per block at most (blocks hold at most 512 queries anyway).

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
    generation all rank through an index of this interface (``search(query_emb, k)``). The corpus is
    copied once (padded to a multiple of 16 rows) with a strided sample of it; queries are searched
    by blocks (see the module's docstring), so memory stays bounded by a few tiles plus the output.

    Scores are float32 GEMM results: exact ties (e.g. small-integer embeddings) are always broken by
    id; two different inner products that round to the same float32 count as tied, as in any
    float32 search.

    Args:
        item_emb: (N, d) item embeddings; row i is item id i.

    Example:
        >>> index = ExactIndex(np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32))
        >>> index.search(np.array([[0.0, 2.0]]), k=1)[1].tolist()
        [[1]]
    """

    description = "exact (blocked GEMM + threshold top-k, ties by id)"

    def __init__(self, item_emb: np.ndarray) -> None:
        item_emb = as_float32_matrix(item_emb, "item_emb")
        self.ntotal, self.dim = item_emb.shape
        if self.ntotal >= 2**32:
            raise ValueError(f"ExactIndex holds at most 2**32 - 1 items, got {self.ntotal}.")
        self.items = _padded(item_emb)  # (N', d), N' a multiple of 16; rows past N are 0
        sample = item_emb[:: max(1, min(_SAMPLE_STRIDE, self.ntotal // _MIN_SAMPLE))]
        self.n_sample = len(sample)
        self.sample = _padded(sample)

    def search(self, query_emb: np.ndarray, k: int, batch_size: int = 65536) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, ids)`` of shape (Q, min(k, N)), best first (see :func:`exact_topk`)."""
        from convcg_cli.index.kernels import decode_keys

        k = check_k(k)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        query_emb = as_float32_matrix(query_emb, "query_emb")
        if query_emb.shape[1] != self.dim:
            raise ValueError(
                f"Embedding dims differ: query_emb has d={query_emb.shape[1]}, item_emb has d={self.dim}."
            )
        n_queries, k_out = query_emb.shape[0], min(k, self.ntotal)
        # Filled once, front to back: ordinary pages (see convcg_cli.index.pages: fresh huge pages
        # cost far more at first touch on a VM that backs memory on demand).
        scores = empty_ordinary((n_queries, k_out), np.float32)
        ids = empty_ordinary((n_queries, k_out), np.int64)
        if n_queries == 0 or k_out == 0:
            return scores, ids
        block, scratch = min(batch_size, QUERY_BLOCK), _Scratch()
        for start in range(0, n_queries, block):
            part = query_emb[start : start + block]
            if len(part) >= _ROW_ALIGN:
                keys = self._search_block(part, k_out, _ROW_ALIGN, scratch)
            else:
                keys = np.concatenate(
                    [self._search_block(part[i : i + 1], k_out, 1, scratch) for i in range(len(part))]
                )
            decode_keys(keys, scores[start : start + len(part)], ids[start : start + len(part)])
        return scores, ids

    def _search_block(self, queries: np.ndarray, k: int, align: int, scratch: _Scratch) -> np.ndarray:
        """(B, k) sorted keys of the top k of a block of queries, padded to a multiple of ``align``
        rows. The rows that kept fewer than k items are searched again with a threshold that cannot
        be too high (the sample's k-th score), then with none."""
        block = _padded(queries, align)
        share = self.n_sample / self.ntotal
        wanted = max(k * (1 + _PASS_SIGMAS / math.sqrt(k * share)), _PASS_SHARE * self.ntotal)
        if self.n_sample == self.ntotal or 4 * wanted > self.ntotal:
            threshold = np.full(len(block), _LOWEST, dtype=np.float32)  # few items next to k: all
        else:
            threshold = self._sample_score(block, math.ceil(wanted * share), scratch)
        top = self._top(block, threshold, len(queries), k, scratch, capacity=int(2 * wanted))
        short = np.flatnonzero(top[:, k - 1] == _NO_KEY)
        if short.size and self.n_sample >= k:
            retry = _padded(queries[short], align)
            top[short] = self._top(retry, self._sample_score(retry, k, scratch), short.size, k, scratch)
            short = short[top[short, k - 1] == _NO_KEY]
        if short.size:
            retry = _padded(queries[short], align)
            lowest = np.full(len(retry), _LOWEST, np.float32)
            top[short] = self._top(retry, lowest, short.size, k, scratch)
            short = short[top[short, k - 1] == _NO_KEY]
        if short.size:
            # Only a score that is NaN or -inf (an overflowing inner product) is never kept.
            raise ValueError("Inner products overflow float32 or are NaN; cannot rank the items.")
        return top

    def _top(
        self,
        block: np.ndarray,
        threshold: np.ndarray,
        n_rows: int,
        k: int,
        scratch: _Scratch,
        capacity: int = 256,
    ) -> np.ndarray:
        """(n_rows, k) sorted keys of the first ``n_rows`` rows of ``block``, among the items scoring
        at least the row's ``threshold`` (a row keeping fewer than k ends in ``_NO_KEY``)."""
        threshold[n_rows:] = np.inf  # the padding rows keep nothing
        return _select(*self._passing(block, threshold, capacity, scratch), k)[:n_rows]

    def _sample_score(self, block: np.ndarray, rank: int, scratch: _Scratch) -> np.ndarray:
        """(B,) the ``rank``-th best score of each row of ``block`` over the sample (at least the
        lowest finite float: a threshold of -inf would keep what can never be ranked)."""
        import torch

        s = self.n_sample
        out = np.empty(len(block), dtype=np.float32)
        rows = min(len(block), max(_ROW_ALIGN, TILE_CELLS // len(self.sample) // _ROW_ALIGN * _ROW_ALIGN))
        sample = torch.from_numpy(self.sample)
        for start in range(0, len(block), rows):
            part = block[start : start + rows]
            scores = scratch.array("sample", (len(part), len(self.sample)), np.float32)
            torch.mm(torch.from_numpy(part), sample.T, out=torch.from_numpy(scores))
            scores = scores[:, :s]
            scores.partition(s - rank, axis=1)  # in place: scratch, rewritten by the next product
            out[start : start + rows] = scores[:, s - rank]
        return np.maximum(out, _LOWEST)

    def _passing(
        self, block: np.ndarray, threshold: np.ndarray, capacity: int, scratch: _Scratch
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(keys, counts)``: each row's items scoring at least its ``threshold``, as sort keys
        (rows padded with ``_NO_KEY`` to the longest, room for ``capacity`` made at first), and how
        many. Rows of ``block``: a multiple of 16, or one."""
        import torch

        from convcg_cli.index.kernels import keep_passing, pad_rows

        n_rows = len(block)
        queries = torch.from_numpy(block)
        keys = scratch.array("keys", (n_rows, max(1, capacity)), np.uint64)
        counts = np.zeros(n_rows, dtype=np.int64)
        for start, n_valid, items, scores, out in scratch.tiles(self.items, self.ntotal, n_rows):
            torch.mm(queries, items, out=out)
            row = 0
            while (row := keep_passing(scores, threshold, n_valid, start, keys, counts, row)) >= 0:
                grown = np.empty((n_rows, 2 * keys.shape[1]), np.uint64)  # a row is full: double
                grown[:, : keys.shape[1]] = keys
                keys = grown
        pad_rows(keys, counts, int(counts.max()), _NO_KEY)
        return keys, counts


def tile_width(n_rows: int, n_items: int) -> int:
    """Items per tile when ``n_rows`` queries are scored together over ``n_items`` (padded) items:
    about ``TILE_CELLS`` scores a tile, a multiple of 16 items, at most the corpus.

    Example:
        >>> tile_width(512, 100_000), tile_width(1, 1_000)
        (256, 1000)
    """
    return min(n_items, max(_ROW_ALIGN, TILE_CELLS // n_rows // _ROW_ALIGN * _ROW_ALIGN))


class _Scratch:
    """Arrays the blocks of one search reuse, by name and shape: writing to fresh memory (its first
    touch) costs about as much as the threshold pass over it. One per ``search`` call, so concurrent
    searches of one index share nothing."""

    def __init__(self) -> None:
        self._arrays: dict[tuple, np.ndarray] = {}
        self._tiles: dict[int, list[tuple]] = {}

    def array(self, name: str, shape: tuple[int, int], dtype: type) -> np.ndarray:
        """An uninitialised array ``name`` of ``shape``: the same one each time it is asked for."""
        key = (name, shape, dtype)
        if key not in self._arrays:
            self._arrays[key] = np.empty(shape, dtype=dtype)
        return self._arrays[key]

    def tiles(self, items: np.ndarray, n_items: int, n_rows: int) -> list[tuple]:
        """The tiles of blocks of ``n_rows`` queries over ``items`` (padded; the first ``n_items``
        are real), made once a search: ``(first id, real columns, the items' transposed torch view,
        the tile's scores as an array, and as the tensor the GEMM writes)``. Slicing, viewing and
        looking the buffer up again for each of the ~200 tiles of a block cost ~5% of the search."""
        import torch

        if n_rows not in self._tiles:
            width, corpus, tiles = tile_width(n_rows, len(items)), torch.from_numpy(items), []
            for start in range(0, len(items), width):
                w = min(width, len(items) - start)  # a multiple of 16
                scores = self.array("tile", (n_rows, w), np.float32)
                tiles.append(
                    (
                        start,
                        min(w, n_items - start),
                        corpus[start : start + w].T,
                        scores,
                        torch.from_numpy(scores),
                    )
                )
            self._tiles[n_rows] = tiles
        return self._tiles[n_rows]


def faiss_exact_topk(
    query_emb: np.ndarray, item_emb: np.ndarray, k: int, batch_size: int = 65536
) -> tuple[np.ndarray, np.ndarray]:
    """The previous exact path, kept as the reference :class:`ExactIndex` is tested and benchmarked
    against: faiss ``IndexFlatIP`` with a few extra candidates, each row re-sorted by (-score, id).

    faiss 1.15.1 does not break exact ties by index, on any of its search paths (per-query loop,
    BLAS, database-parallel): tied items come out in descending index order, and for k >= 100 its
    reservoir selection may even keep higher-index tied items at the cutoff instead of lower ones.
    So a few extra candidates are fetched, each row re-sorted by ``(-score, id)`` and, for the rare
    rows whose tie group at the cutoff may be incomplete, searched again with more candidates.
    Same arguments and results as :func:`exact_topk`.
    """
    import faiss

    k = check_k(k)
    query_emb = as_float32_matrix(query_emb, "query_emb")
    item_emb = as_float32_matrix(item_emb, "item_emb")
    if query_emb.shape[1] != item_emb.shape[1]:
        raise ValueError(
            f"Embedding dims differ: query_emb has d={query_emb.shape[1]}, "
            f"item_emb has d={item_emb.shape[1]}."
        )
    index = faiss.IndexFlatIP(item_emb.shape[1])
    index.add(item_emb)
    n_queries, n_items = query_emb.shape[0], item_emb.shape[0]
    k_out = min(k, n_items)
    scores = np.empty((n_queries, k_out), dtype=np.float32)
    ids = np.empty((n_queries, k_out), dtype=np.int64)
    if n_queries == 0 or k_out == 0:
        return scores, ids
    k_search = min(n_items, k_out + max(_TIE_MARGIN_MIN, k_out // 8))
    for start in range(0, n_queries, batch_size):
        stop = min(start + batch_size, n_queries)
        scores[start:stop], ids[start:stop] = _search_ties_by_id(
            index, query_emb[start:stop], k_out, k_search
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


def _padded(x: np.ndarray, align: int = _ROW_ALIGN) -> np.ndarray:
    """A float32 copy of ``x`` (n, d) with zero rows appended up to a multiple of ``align`` (>= 1)."""
    rows = max(align, -(-len(x) // align) * align)
    out = np.zeros((rows, x.shape[1]), dtype=np.float32)
    out[: len(x)] = x
    return out


def _select(keys: np.ndarray, counts: np.ndarray, k: int) -> np.ndarray:
    """(B, k) the k smallest keys of each row, ascending; a row holding fewer ends in ``_NO_KEY``.
    ``keys`` is reordered in place."""
    width = int(counts.max(initial=0))
    if width <= k:
        top = np.full((len(keys), k), _NO_KEY, dtype=np.uint64)
        top[:, :width] = keys[:, :width]
    else:
        held = keys[:, :width]
        held.partition(k - 1, axis=1)
        top = held[:, :k].copy()
    top.sort(axis=1)
    return top


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
