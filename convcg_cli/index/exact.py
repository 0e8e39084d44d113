"""Exact top-k: maximum-inner-product search over the whole corpus with ties broken by lower item id,
and the ranking of a non-personalised score vector.

Every function takes and returns numpy arrays; nothing here knows about MLflow or the config.
Rows follow the package's ranking convention (:mod:`convcg_cli.index`): descending score, ties by
ascending item index.

How :class:`ExactIndex` keeps up with the arithmetic: the scores are computed by blocks of queries
and tiles of items (torch's GEMM, at its peak on (512 x 2048) tiles), and each tile is only
*compared* with a per-query threshold (numpy, a fraction of a nanosecond a score): the few items at
or above it are found through the mask packed 8 to a byte, kept as 64-bit sort keys (score, then
id), and the top k is selected among them. The threshold comes from a strided sample of the corpus,
set so that a few more than k items pass (1.5 k at k=1000); a query left with fewer than k is
searched again with a threshold that cannot be too high. Nothing is lost: every item scoring at least
the k-th score is kept, so ties at the cutoff are complete.
:func:`faiss_exact_topk` (faiss ``IndexFlatIP``, re-sorted) is the previous path, kept as the
reference the tests and the benchmark compare with.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from convcg_cli.index.checks import as_float32_matrix, check_k

if TYPE_CHECKING:
    import faiss

# Queries per block and scores per tile: (512 x 2048) float32 tiles (4 MiB) keep the GEMM at its
# peak, and the tile close to the core for the threshold pass and the gather of the kept scores
# (measured on the bench machine, one thread: 10% faster searches than (512 x 8192) tiles).
QUERY_BLOCK = 512
TILE_CELLS = 1 << 20
# Blocks of queries are padded to a multiple of 16 rows: MKL then rounds an inner product the same
# way whatever the block, so a query's scores do not depend on the queries searched with it. Fewer
# queries are searched one at a time (a matrix-vector product: a GEMM with so few rows would first
# copy the whole corpus), whose scores may differ from a block's in the last bit.
_ROW_ALIGN = 16
# The threshold sample: every 16th item (at least 4096 of them). The sample's score of rank
# j = k' * S / N estimates the k'-th best score of the corpus within about 1/sqrt(j) (relative, in
# rank), so k' = k * (1 + 4 / sqrt(k * S / N)) keeps at least k items for all but a tiny share of the
# queries (those are searched again); and at least 1/4096 of the corpus (a floor for tiny k).
_SAMPLE_STRIDE = 16
_MIN_SAMPLE = 4096
_PASS_SIGMAS = 4.0
_PASS_SHARE = 1 / 4096
# Below every finite score: the threshold of "keep everything" (NaN and -inf are never kept).
_LOWEST = np.float32(np.finfo(np.float32).min)
_NO_KEY = np.iinfo(np.uint64).max  # padding of a row's keys: after every real key
_ID_BITS = np.uint64(32)
_ID_MASK = np.uint64(0xFFFFFFFF)
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
        k = check_k(k)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        query_emb = as_float32_matrix(query_emb, "query_emb")
        if query_emb.shape[1] != self.dim:
            raise ValueError(
                f"Embedding dims differ: query_emb has d={query_emb.shape[1]}, item_emb has d={self.dim}."
            )
        n_queries, k_out = query_emb.shape[0], min(k, self.ntotal)
        scores = np.empty((n_queries, k_out), dtype=np.float32)
        ids = np.empty((n_queries, k_out), dtype=np.int64)
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
            scores[start : start + len(part)], ids[start : start + len(part)] = _decode(keys)
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
            threshold = self._sample_score(block, math.ceil(wanted * share))
        top = self._top(block, threshold, len(queries), k, scratch, capacity=int(2 * wanted))
        short = np.flatnonzero(top[:, k - 1] == _NO_KEY)
        if short.size and self.n_sample >= k:
            retry = _padded(queries[short], align)
            top[short] = self._top(retry, self._sample_score(retry, k), short.size, k, scratch)
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

    def _sample_score(self, block: np.ndarray, rank: int) -> np.ndarray:
        """(B,) the ``rank``-th best score of each row of ``block`` over the sample (at least the
        lowest finite float: a threshold of -inf would keep what can never be ranked)."""
        import torch

        s = self.n_sample
        out = np.empty(len(block), dtype=np.float32)
        rows = max(_ROW_ALIGN, TILE_CELLS // len(self.sample) // _ROW_ALIGN * _ROW_ALIGN)
        sample = torch.from_numpy(self.sample)
        for start in range(0, len(block), rows):
            scores = (torch.from_numpy(block[start : start + rows]) @ sample.T).numpy()[:, :s]
            scores.partition(s - rank, axis=1)  # in place: the product is ours
            out[start : start + rows] = scores[:, s - rank]
        return np.maximum(out, _LOWEST)

    def _passing(
        self, block: np.ndarray, threshold: np.ndarray, capacity: int, scratch: _Scratch
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(keys, counts)``: each row's items scoring at least its ``threshold``, as sort keys
        (rows padded with ``_NO_KEY``, room for ``capacity`` made at first), and how many. Rows of
        ``block``: a multiple of 16, or one."""
        import torch

        n_rows, n = len(block), self.ntotal
        width = tile_width(n_rows, len(self.items))
        queries, items = torch.from_numpy(block), torch.from_numpy(self.items)
        kept = _KeptKeys(n_rows, capacity, scratch)
        above = threshold[:, None]
        for start in range(0, n, width):
            w = min(width, len(self.items) - start)  # a multiple of 16
            scores = scratch.array("tile", (n_rows, w), np.float32)
            torch.mm(queries, items[start : start + w].T, out=torch.from_numpy(scores))
            if start + w > n:
                scores[:, n - start :] = -np.inf  # the padding rows of the corpus: never kept
            mask = scratch.array("mask", (n_rows, w), np.bool_)
            np.greater_equal(scores, above, out=mask)
            kept.add(scores, _flat_true(mask, scratch), start)
        return kept.keys, kept.counts


def tile_width(n_rows: int, n_items: int) -> int:
    """Items per tile when ``n_rows`` queries are scored together over ``n_items`` (padded) items:
    about ``TILE_CELLS`` scores a tile, a multiple of 16 items, at most the corpus.

    Example:
        >>> tile_width(512, 100_000), tile_width(1, 1_000)
        (2048, 1000)
    """
    return min(n_items, max(_ROW_ALIGN, TILE_CELLS // n_rows // _ROW_ALIGN * _ROW_ALIGN))


def _flat_true(mask: np.ndarray, scratch: _Scratch) -> np.ndarray:
    """``np.flatnonzero(mask)``, in about 0.6 of its time when few cells are true (a few in a
    hundred, as in a tile): the mask is packed 8 cells to a byte, only the non-zero bytes are found
    (one cell in eight to look at), then unpacked back to their cells."""
    packed = np.packbits(mask.ravel(), bitorder="little")  # byte j holds cells 8j .. 8j+7
    some = scratch.array("some", (1, packed.size), np.bool_)[0]
    np.not_equal(packed, 0, out=some)
    byte = np.flatnonzero(some)
    bits = np.unpackbits(packed[byte], bitorder="little").view(np.bool_)  # (8 * bytes,) cells
    cell = np.flatnonzero(bits)
    flat = byte[cell >> 3]
    flat <<= 3
    flat |= cell & 7
    return flat


class _Scratch:
    """Arrays the blocks of one search reuse, by name and shape: writing to fresh memory (its first
    touch) costs about as much as the threshold pass over it. One per ``search`` call, so concurrent
    searches of one index share nothing."""

    def __init__(self) -> None:
        self._arrays: dict[tuple, np.ndarray] = {}

    def array(self, name: str, shape: tuple[int, int], dtype: type) -> np.ndarray:
        """An uninitialised array ``name`` of ``shape``: the same one each time it is asked for."""
        key = (name, shape, dtype)
        if key not in self._arrays:
            self._arrays[key] = np.empty(shape, dtype=dtype)
        return self._arrays[key]


class _KeptKeys:
    """Per row, the sort keys of the items kept so far, in a (rows, capacity) array padded with
    ``_NO_KEY`` that grows as needed; ``counts`` says how many each row holds."""

    def __init__(self, n_rows: int, capacity: int, scratch: _Scratch) -> None:
        self.keys = scratch.array("keys", (n_rows, max(1, capacity)), np.uint64)
        self.keys.fill(_NO_KEY)
        self.counts = np.zeros(n_rows, dtype=np.int64)

    def add(self, scores: np.ndarray, flat: np.ndarray, first_id: int) -> None:
        """Keep the cells ``flat`` (ascending flat positions) of a (rows, w) tile of ``scores``
        whose column 0 is item ``first_id``."""
        n_rows, w = scores.shape
        if flat.size == 0:
            return
        bounds = np.searchsorted(flat, np.arange(n_rows + 1, dtype=np.int64) * w)  # flat is row-major
        passed = np.diff(bounds)
        total = self.counts + passed
        if total.max() > self.keys.shape[1]:
            grown = np.full((n_rows, max(int(total.max()), 2 * self.keys.shape[1])), _NO_KEY, np.uint64)
            grown[:, : self.keys.shape[1]] = self.keys
            self.keys = grown
        # The i-th kept cell of a row (ascending id) goes to column counts[row] + i of the row.
        slot = np.repeat(np.arange(n_rows) * self.keys.shape[1] + self.counts - bounds[:-1], passed)
        slot += np.arange(flat.size, dtype=np.int64)
        ids = flat - np.repeat(np.arange(n_rows, dtype=np.int64) * w - first_id, passed)
        self.keys.ravel()[slot] = _sort_keys(scores.ravel()[flat], ids)
        self.counts = total


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


def _flip_order(bits: np.ndarray) -> np.ndarray:
    """float32 bits (as int32) <-> a uint32 code whose ascending order is the descending order of the
    floats: non-negative floats keep their sign bit (0) and have the rest flipped, negative ones are
    kept as they are (sign bit 1, larger magnitude first). Its own inverse; in place."""
    bits ^= ~(bits >> 31) & np.int32(0x7FFFFFFF)
    return bits.view(np.uint32)


def _sort_keys(scores: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """uint64 keys whose ascending order is descending score, then ascending id: the score's
    :func:`_flip_order` code in the high 32 bits, the id in the low 32."""
    codes = _flip_order((scores + np.float32(0.0)).view(np.int32))  # + 0.0: -0.0 becomes 0.0, its tie
    keys = codes.astype(np.uint64)
    keys <<= _ID_BITS
    keys |= ids.view(np.uint64) if ids.dtype == np.int64 else ids.astype(np.uint64)  # ids >= 0
    return keys


def _decode(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(scores float32, ids int64)`` of keys made by :func:`_sort_keys`."""
    bits = _flip_order((keys >> _ID_BITS).astype(np.uint32).view(np.int32))
    return bits.view(np.float32), (keys & _ID_MASK).astype(np.int64)


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
