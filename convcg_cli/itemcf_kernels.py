"""The compiled loops of ItemCF (numba): its scoring and the ranking of its similarity rows.

Scoring (:func:`sparse_product_topk`): each user's scores X_u W summed into a dense buffer and its
top k chosen from them at once, one user at a time. It replaces scipy's sparse product (two passes
over the same entries: one to size the result, one to fill it, then a sparse matrix built) and the
per-row Python loop choosing the lists (:func:`~convcg_cli.baseline_scores.sparse_topk_rows`), with
the same lists:

* each score is summed in the order of scipy's ``csr_matmat``: for each stored entry (i, v) of the
  user's profile row, in stored order, for each stored entry (j, w) of W's row i, in stored order,
  ``sums[j] += v * w`` from 0, so each is bit for bit the product's entry;
* only the scores above 0 count as scored (scipy drops a sum of exactly 0 from the product), ranked
  by descending score, ties by ascending ``rank``; a row scoring fewer than k items is completed
  with the columns it does not score, in ``rank`` order. The selection and the order of the best
  ones are :mod:`convcg_cli.itemcf_select`'s;
* the lists are written as they are chosen, int64 or int32 (a query's lists: no copy to narrow).

A tuning grid scores the whole similarity both with and without its diagonal
(:func:`product_topk_with_and_without_diagonal`): one pass over it serves both, the two differing
only in each user's own profile columns, whose sums without the diagonal are kept apart.

Ranking (:func:`ranked_row_entries`, for :class:`~convcg_cli.baseline_scores.ItemCFSimilarity`'s
``neighbours`` cuts): each similarity row's entries at or above its ``depth``-th largest value,
sorted by value, then column, one row at a time, instead of numpy's passes over the whole matrix;
each cut is then built as the CSR matrix scoring reads (:func:`cut_ranked`, transposed directly).
The cosine itself and its shrunk entries are computed in :mod:`convcg_cli.itemcf_cosine`.

Imported by :meth:`convcg_cli.baselines.ItemCF.score_topk` and ``_RankedRows`` when first needed
(numba takes ~0.2 s to import); the compiled code is cached on disk
(:func:`~convcg_cli.index.kernels.compiled`), so later processes skip the compilation. The kernels
are generic over the index and value dtypes (numba compiles one version per signature), so neither
matrix is copied to call them.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from convcg_cli.index.kernels import compiled
from convcg_cli.index.pages import empty_ordinary
from convcg_cli.itemcf_select import _row_top, _write_best, best_first

# A row whose sums touch at least N / _DENSE_DIVISOR stored weights is summed without tracking which
# columns it touches, then all N sums are scanned: cheaper than tracking when it touches many.
_DENSE_DIVISOR = 4
# The flags of a column while a user is scored by product_topk_both.
_TOUCHED = np.uint8(1)
_OWN = np.uint8(2)


@compiled()
def product_topk(
    p_indptr: np.ndarray,
    p_indices: np.ndarray,
    p_data: np.ndarray,
    rows: np.ndarray,
    w_indptr: np.ndarray,
    w_indices: np.ndarray,
    w_data: np.ndarray,
    rank: np.ndarray,
    fill: np.ndarray,
    sums: np.ndarray,
    out: np.ndarray,
    dense_work: int,
    skip_diagonal: bool,
) -> int:
    """Write into ``out[r]`` the top ``out.shape[1]`` columns of the product of row ``rows[r]`` of the
    CSR matrix P (``p_indptr``, ``p_indices``, ``p_data``) with the CSR matrix W (``w_*``), for each r.

    Each row's sums go into ``sums`` (zeros of length N, the product's dtype; left zeroed), in
    scipy's ``csr_matmat`` order, so they are the sparse product's entries bit for bit. The columns
    scoring above 0 are ranked by descending score, ties by ascending ``rank`` (N distinct ints); a
    row with fewer than k of them is completed from ``fill`` (the first k columns by ``rank``),
    skipping the scored ones. A row whose sums read at least ``dense_work`` stored weights scans all
    N sums for its scores; a shorter one tracks the columns it touches and reads only those. With
    ``skip_diagonal`` (W square), W's diagonal entries are left out of the sums, as if not stored.

    Returns -1 when done, or the first row r holding a negative or NaN score (``out[r:]`` unwritten).
    """
    n = sums.shape[0]
    seen = np.zeros(n, dtype=np.bool_)  # the columns touched by this row (then: the ones it scores)
    touched = np.empty(n, dtype=np.int64)
    cols = np.empty(n, dtype=np.int64)
    vals = np.empty(n, dtype=sums.dtype)
    for r in range(rows.shape[0]):
        u = rows[r]
        work = 0
        for jj in range(p_indptr[u], p_indptr[u + 1]):
            work += w_indptr[p_indices[jj] + 1] - w_indptr[p_indices[jj]]
        n_scored = 0
        bad = False
        if work >= dense_work:  # most columns touched: no tracking, then every sum read
            for jj in range(p_indptr[u], p_indptr[u + 1]):
                i = p_indices[jj]
                v = p_data[jj]
                for kk in range(w_indptr[i], w_indptr[i + 1]):
                    if skip_diagonal and w_indices[kk] == i:
                        continue
                    sums[w_indices[kk]] += v * w_data[kk]
            for j in range(n):  # without a branch: each column written, kept when it scores
                s = sums[j]
                sums[j] = 0
                cols[n_scored] = j
                vals[n_scored] = s
                n_scored += s > 0
                bad |= not (s >= 0)  # negative or NaN (-0.0 is a zero, dropped like scipy drops it)
        else:
            n_touched = 0
            for jj in range(p_indptr[u], p_indptr[u + 1]):
                i = p_indices[jj]
                v = p_data[jj]
                for kk in range(w_indptr[i], w_indptr[i + 1]):
                    j = w_indices[kk]
                    if skip_diagonal and j == i:
                        continue
                    sums[j] += v * w_data[kk]
                    if not seen[j]:
                        seen[j] = True
                        touched[n_touched] = j
                        n_touched += 1
            for t in range(n_touched):
                j = touched[t]
                s = sums[j]
                sums[j] = 0
                seen[j] = False
                cols[n_scored] = j
                vals[n_scored] = s
                n_scored += s > 0
                bad |= not (s >= 0)
        if bad:
            return r
        out_row = out[r]
        _complete(out_row, _write_best(cols[:n_scored], vals[:n_scored], rank, out_row), fill, seen)
    return -1


@compiled()
def _complete(out_row: np.ndarray, n_best: int, fill: np.ndarray, marks: np.ndarray) -> None:
    """Complete a list that scored ``n_best`` < k columns (``out_row[:n_best]``) with the columns of
    ``fill`` (the first k in tie order) it does not hold: the unscored columns tie at 0, in rank
    order. ``marks``: zeros of length N, marking the held columns meanwhile (left zero)."""
    k = out_row.shape[0]
    if n_best >= k:
        return
    for t in range(n_best):
        marks[out_row[t]] = 1
    t = n_best
    for f in range(fill.shape[0]):
        if t == k:
            break
        if not marks[fill[f]]:
            out_row[t] = fill[f]
            t += 1
    for t in range(n_best):
        marks[out_row[t]] = 0


@compiled()
def product_topk_both(
    p_indptr: np.ndarray,
    p_indices: np.ndarray,
    p_data: np.ndarray,
    rows: np.ndarray,
    w_indptr: np.ndarray,
    w_indices: np.ndarray,
    w_data: np.ndarray,
    rank: np.ndarray,
    fill: np.ndarray,
    out: np.ndarray,
    dense_work: int,
) -> int:
    """:func:`product_topk` of a square W with its diagonal (into ``out[0]``) and without it
    (``out[1]``) at once, reading W once.

    The two differ only in the user's own profile columns: their sums without the diagonal terms
    are kept apart, in the same order as the others. So both lists are the ones :func:`product_topk`
    gives, from the same floats. Returns -1 when done, or the first row r holding a negative or NaN
    score (``out[:, r:]`` unwritten).
    """
    n = w_indptr.shape[0] - 1
    longest = 0
    for r in range(rows.shape[0]):
        longest = max(longest, p_indptr[rows[r] + 1] - p_indptr[rows[r]])
    sums = np.zeros(n, dtype=np.float64)
    apart = np.zeros(max(longest, 1), dtype=np.float64)  # the profile columns' sums without the diagonal
    slot = np.zeros(n, dtype=np.int64)  # a profile column's place in the profile row
    flags = np.zeros(n, dtype=np.uint8)  # TOUCHED: a tracked column summed into; OWN: a profile column
    touched = np.empty(n, dtype=np.int64)
    cols = np.empty(n, dtype=np.int64)
    vals = np.empty(n, dtype=np.float64)
    written = np.zeros(2, dtype=np.int64)
    for r in range(rows.shape[0]):
        u = rows[r]
        first, last = p_indptr[u], p_indptr[u + 1]
        work = 0
        for jj in range(first, last):
            slot[p_indices[jj]] = jj - first
            flags[p_indices[jj]] = _OWN
            work += w_indptr[p_indices[jj] + 1] - w_indptr[p_indices[jj]]
        dense = work >= dense_work  # most columns touched: none tracked, all N scanned
        usual = 0 if dense else _TOUCHED  # the flags of a column needing nothing more
        n_touched = 0
        for jj in range(first, last):
            i = p_indices[jj]
            v = p_data[jj]
            for kk in range(w_indptr[i], w_indptr[i + 1]):
                j = w_indices[kk]
                term = v * w_data[kk]
                sums[j] += term
                f = flags[j]
                if f != usual:  # first touched (tracked), or one of the user's own columns
                    if f & _OWN and j != i:
                        apart[slot[j]] += term
                    if not dense and not f & _TOUCHED:
                        flags[j] = f | _TOUCHED
                        touched[n_touched] = j
                        n_touched += 1
        scanned = n if dense else n_touched
        for variant in range(2):
            n_scored = 0
            bad = False
            for t in range(scanned):
                j = t if dense else touched[t]
                value = apart[slot[j]] if variant == 1 and flags[j] & _OWN else sums[j]
                cols[n_scored] = j
                vals[n_scored] = value
                n_scored += value > 0
                bad |= not (value >= 0)
            if bad:
                return r
            written[variant] = _write_best(cols[:n_scored], vals[:n_scored], rank, out[variant, r])
        for t in range(scanned):
            j = t if dense else touched[t]
            sums[j] = 0
            flags[j] = 0
        for jj in range(first, last):
            flags[p_indices[jj]] = 0
            apart[jj - first] = 0
        for variant in range(2):  # a list scoring fewer than k: the unscored columns in rank order
            _complete(out[variant, r], written[variant], fill, flags)
    return -1


def product_topk_with_and_without_diagonal(
    profiles: sp.csr_matrix,
    rows: np.ndarray,
    weights: sp.csr_matrix,
    rank: np.ndarray,
    k: int,
    dense_work: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(with_diagonal, without_diagonal)``: what ``sparse_product_topk(profiles, rows, weights,
    rank, k, skip_diagonal=s)`` returns for s = False and s = True (the same lists), with
    ``weights`` read once for both (:func:`product_topk_both`; ``dense_work`` as there). ``weights``
    square; values summed in float64 (the dtype of the cosine they serve)."""
    profiles, weights = _csr(profiles), _csr(weights)
    n = weights.shape[1]
    if weights.shape[0] != n or profiles.shape[1] != n or np.shape(rank) != (n,):
        raise ValueError(
            f"needs square (N, N) weights, (U, N) profiles and (N,) rank, got {weights.shape}, "
            f"{profiles.shape} and {np.shape(rank)}."
        )
    rows = np.asarray(rows, dtype=np.int64).ravel()
    if len(rows) and (rows.min() < 0 or rows.max() >= profiles.shape[0]):
        raise IndexError(f"row index out of range for {profiles.shape[0]} rows.")
    k = min(int(k), n)
    out = np.empty((2, len(rows), max(k, 0)), dtype=np.int64)
    if k >= 1 and len(rows):
        bad = product_topk_both(
            profiles.indptr,
            profiles.indices,
            profiles.data.astype(np.float64, copy=False),
            rows,
            weights.indptr,
            weights.indices,
            weights.data.astype(np.float64, copy=False),
            np.asarray(rank, dtype=np.int64),
            np.argsort(rank)[:k].astype(np.int64),
            out,
            -(-n // _DENSE_DIVISOR) if dense_work is None else int(dense_work),
        )
        if bad >= 0:
            raise ValueError(f"product_topk_both needs scores >= 0 without NaN (row {int(rows[bad])}).")
    return out[0], out[1]


def _csr(m: sp.spmatrix | sp.sparray) -> sp.csr_matrix:
    """``m`` in CSR format, without a copy when it already is."""
    return m if sp.issparse(m) and m.format == "csr" else sp.csr_matrix(m)


def sparse_product_topk(
    profiles: sp.csr_matrix,
    rows: np.ndarray,
    weights: sp.csr_matrix,
    rank: np.ndarray,
    k: int,
    *,
    dense_work: int | None = None,
    skip_diagonal: bool = False,
    dtype: type = np.int64,
) -> np.ndarray:
    """Each row's top k of ``profiles[rows] @ weights``: the same lists as
    ``sparse_topk_rows(profiles[rows] @ weights, rank, k)``
    (:func:`~convcg_cli.baseline_scores.sparse_topk_rows`), from the same scores bit for bit, without
    building the sparse product (:func:`product_topk`, one user at a time, memory O(N + len(rows) k)).

    Args:
        profiles: (U, M) CSR matrix (any index dtype, not copied).
        rows: (C,) rows of ``profiles`` to score (negative ones count from the end, as in numpy).
        weights: (M, N) CSR matrix (any index dtype, not copied).
        rank: (N,) a permutation of 0..N-1: column j's place in the tie order.
        k: list length.
        dense_work: from how many stored weights read a row scans all N sums instead of tracking
            the columns it touches (:func:`product_topk`; the same lists either way). None: N / 4.
        skip_diagonal: score with ``weights`` without its diagonal (square), not copying the rest.
        dtype: of the result, int64 or int32 (when N fits: written as they are found, no copy).

    Returns:
        (C, min(k, N)) column ids, best first.

    Raises:
        ValueError: a requested row has a negative or NaN score (the scores must be >= 0).

    Example:
        >>> profiles = sp.csr_matrix(np.array([[1.0, 0.0], [0.0, 0.0]]))
        >>> weights = sp.csr_matrix(np.array([[0.0, 0.5, 0.0, 0.5], [1.0, 0.0, 0.0, 0.0]]))
        >>> sparse_product_topk(profiles, np.array([0, 1]), weights, np.array([3, 2, 0, 1]), 3).tolist()
        [[3, 1, 2], [2, 3, 1]]
    """
    profiles, weights = _csr(profiles), _csr(weights)
    n_users, n_inner = profiles.shape
    if weights.shape[0] != n_inner:
        raise ValueError(f"inconsistent shapes {profiles.shape} and {weights.shape}")
    n = weights.shape[1]
    if skip_diagonal and weights.shape[0] != n:
        raise ValueError(f"skip_diagonal needs square weights, got {weights.shape}.")
    rank = np.asarray(rank, dtype=np.int64)
    if rank.shape != (n,):
        raise ValueError(f"rank must have shape ({n},), got {rank.shape}.")
    rows = np.asarray(rows, dtype=np.int64).ravel()
    if len(rows) and (rows.min() < -n_users or rows.max() >= n_users):
        raise IndexError(f"row index out of range for {n_users} rows.")
    rows = np.where(rows < 0, rows + n_users, rows)
    k = min(int(k), n)
    # written once, row by row: ordinary pages (convcg_cli.index.pages; 263 MB for bench-large's
    # 32,928 held-out users at k=1000)
    if np.dtype(dtype) not in (np.dtype(np.int64), np.dtype(np.int32)) or n > np.iinfo(dtype).max + 1:
        raise ValueError(f"dtype must be int64, or int32 for at most 2**31 columns, got {dtype}.")
    out = empty_ordinary((len(rows), max(k, 0)), dtype)
    if k < 1 or not len(rows):
        return out
    dtype = np.result_type(profiles.data, weights.data)  # the product's dtype, as scipy upcasts
    sums = np.zeros(n, dtype=dtype if dtype.kind == "f" else np.float64)
    fill = np.argsort(rank)[:k].astype(np.int64)  # the first k columns in tie order
    bad = product_topk(
        profiles.indptr,
        profiles.indices,
        profiles.data,
        rows,
        weights.indptr,
        weights.indices,
        weights.data,
        rank,
        fill,
        sums,
        out,
        -(-n // _DENSE_DIVISOR) if dense_work is None else int(dense_work),
        bool(skip_diagonal),
    )
    if bad >= 0:
        raise ValueError(f"sparse_product_topk needs scores >= 0 without NaN (row {int(rows[bad])}).")
    return out


@compiled()
def ranked_row_entries(
    indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, depth: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(starts, cols, values) of the stored entries of the CSR matrix (``indptr``, ``indices``,
    ``data``; no NaN) at or above their row's ``depth``-th largest stored value (repeats counted; a
    row of ``depth`` entries or fewer keeps them all), by row ascending, then value descending, then
    column ascending: row r's entries at ``starts[r]:starts[r + 1]`` (int64), the matrix's index and
    value dtypes.

    One pass over the rows: each longer row's kept entries are found by :func:`_row_top` (on a
    long row, a threshold read off a sample first, so only the few passing it are copied and
    partitioned), then sorted (:func:`best_first`, the column as the rank) onto the outputs, which
    grow as needed.
    """
    n_rows = indptr.shape[0] - 1
    longest = 0
    for r in range(n_rows):
        longest = max(longest, indptr[r + 1] - indptr[r])
    vals = np.empty(longest, dtype=data.dtype)
    row_cols = np.empty(longest, dtype=indices.dtype)
    capacity = max(16, min(indptr[n_rows], n_rows * (depth + 1)))  # grown (doubled) if ties need more
    starts = np.zeros(n_rows + 1, dtype=np.int64)
    cols = np.empty(capacity, dtype=indices.dtype)
    values = np.empty(capacity, dtype=data.dtype)
    size = 0
    for r in range(n_rows):
        a, n = indptr[r], indptr[r + 1] - indptr[r]
        kept = _row_top(indices[a : a + n], data[a : a + n], depth, row_cols, vals)
        order = best_first(vals[:kept], row_cols[:kept])
        if size + kept > capacity:
            while size + kept > capacity:
                capacity *= 2
            cols, values = _grown(cols, capacity), _grown(values, capacity)
        for t in range(kept):
            cols[size + t] = row_cols[order[t]]
            values[size + t] = vals[order[t]]
        size += kept
        starts[r + 1] = size
    return starts, cols[:size], values[:size]


@compiled()
def _grown(a: np.ndarray, capacity: int) -> np.ndarray:
    """``a`` copied to the front of a new array of ``capacity``."""
    out = np.empty(capacity, dtype=a.dtype)
    out[: a.shape[0]] = a
    return out


@compiled()
def cut_ranked(
    starts: np.ndarray,
    cols: np.ndarray,
    values: np.ndarray,
    n_out: int,
    n: int,
    include_self: bool,
    transpose: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indptr, indices, data) of the CSR matrix holding each row's first ``n`` entries of
    :func:`ranked_row_entries`' output (``cols``, ``values``; row r's entries at
    ``starts[r]:starts[r + 1]``), without the diagonal ones (column = row) unless ``include_self``;
    with ``transpose``, of its transpose (row j holds the entries (i, j) of the cut, by ascending i).
    ``n_out``: the result's rows. int64 pointers, the indices' and values' dtypes. Only the entries
    kept and the diagonal ones skipped are read."""
    n_rows = starts.shape[0] - 1
    counts = np.zeros(n_out + 1, dtype=np.int64)
    for r in range(n_rows):
        taken, e = 0, starts[r]
        while taken < n and e < starts[r + 1]:
            c = cols[e]
            if include_self or c != r:
                counts[(c if transpose else r) + 1] += 1
                taken += 1
            e += 1
    indptr = np.cumsum(counts)
    indices = np.empty(indptr[n_out], dtype=cols.dtype)
    data = np.empty(indptr[n_out], dtype=values.dtype)
    fill = indptr[:n_out].copy()
    for r in range(n_rows):
        taken, e = 0, starts[r]
        while taken < n and e < starts[r + 1]:
            c = cols[e]
            if include_self or c != r:
                at = c if transpose else r
                indices[fill[at]] = r if transpose else c
                data[fill[at]] = values[e]
                fill[at] += 1
                taken += 1
            e += 1
    return indptr, indices, data
