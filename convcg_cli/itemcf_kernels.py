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
  with the columns it does not score, in ``rank`` order.

Ranking (:func:`ranked_row_entries`, for :class:`~convcg_cli.baseline_scores.ItemCFSimilarity`'s
``neighbours`` cuts): each similarity row's entries at or above its ``depth``-th largest value,
sorted by value, then column, one row at a time, instead of numpy's passes over the whole matrix.

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

# The k-th largest of many candidates is found among those at or above a threshold read off a strided
# sample of this many of them (the threshold is checked: at least k candidates pass it, else all count).
_SAMPLE = 1024
# A row whose sums touch at least N / _DENSE_DIVISOR stored weights is summed without tracking which
# columns it touches, then all N sums are scanned: cheaper than tracking when it touches many.
_DENSE_DIVISOR = 4


@compiled()
def best_first(vals: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """The positions 0..m-1 of ``vals`` by descending value, ties by ascending ``ranks`` (distinct):
    ``np.lexsort((ranks, -vals))``, by a bottom-up merge sort (numba compiles it in a fraction of
    the time it takes for ``np.argsort``)."""
    m = vals.shape[0]
    order = np.arange(m)
    merged = np.empty(m, dtype=np.int64)
    width = 1
    while width < m:
        for lo in range(0, m, 2 * width):
            mid, hi = min(lo + width, m), min(lo + 2 * width, m)
            i, j = lo, mid
            for t in range(lo, hi):
                if j == hi:
                    take_right = False
                elif i == mid:
                    take_right = True
                else:
                    a, b = order[i], order[j]
                    take_right = vals[b] > vals[a] or (vals[b] == vals[a] and ranks[b] < ranks[a])
                if take_right:
                    merged[t] = order[j]
                    j += 1
                else:
                    merged[t] = order[i]
                    i += 1
        order, merged = merged, order
        width *= 2
    return order


@compiled()
def kth_smallest(a: np.ndarray, k: int) -> float:
    """The k-th smallest value of ``a`` (0-based; ``np.partition(a, k)[k]``), no NaN among them;
    ``a`` is reordered. Hoare's selection with median-of-three pivots: compiles in a fraction of the
    time numba takes for ``np.partition``."""
    lo, hi = 0, a.shape[0] - 1
    while lo < hi:
        x, y, z = a[lo], a[(lo + hi) // 2], a[hi]
        pivot = max(min(x, y), min(max(x, y), z))
        i, j = lo, hi
        while i <= j:
            while a[i] < pivot:
                i += 1
            while pivot < a[j]:
                j -= 1
            if i <= j:
                a[i], a[j] = a[j], a[i]
                i += 1
                j -= 1
        # a[lo..j] <= pivot <= a[i..hi], and what lies between equals the pivot
        if k <= j:
            hi = j
        elif k >= i:
            lo = i
        else:
            break
    return a[k]


@compiled()
def _keep_from(cols: np.ndarray, vals: np.ndarray, m: int, threshold: float) -> int:
    """Move the entries of ``cols[:m]``, ``vals[:m]`` whose value is at least ``threshold`` to the
    front, in order; returns how many there are."""
    kept = 0
    for t in range(m):  # without a branch: each entry written, kept by advancing past it
        value, col = vals[t], cols[t]
        cols[kept] = col
        vals[kept] = value
        kept += value >= threshold
    return kept


@compiled()
def _keep_top(cols: np.ndarray, vals: np.ndarray, k: int) -> int:
    """Move the candidates at or above the k-th largest of ``vals`` (k < len(vals): the k best and
    the rest of the k-th's ties) to the front of ``cols`` and ``vals``; returns how many there are.

    With many candidates, a threshold at most the k-th largest is read off a strided sample first
    and only the candidates passing it are partitioned: every one at or above the k-th largest passes
    a threshold that at least k candidates pass, so the result is the same.
    """
    m = vals.shape[0]
    if m >= 4 * _SAMPLE and m >= 8 * k:
        stride = m // _SAMPLE
        sample = np.empty(_SAMPLE, dtype=vals.dtype)
        for t in range(_SAMPLE):
            sample[t] = vals[t * stride]
        # about twice the sample's share of the k best, so that k candidates pass it
        q = min(_SAMPLE, 2 * (k * _SAMPLE // m + 1) + 8)
        threshold = kth_smallest(sample, _SAMPLE - q)
        passing = 0
        for t in range(m):
            passing += vals[t] >= threshold
        if passing >= k:
            m = _keep_from(cols, vals, m, threshold)
    kth = kth_smallest(vals[:m].copy(), m - k)
    return _keep_from(cols, vals, m, kth)


@compiled()
def _write_best(cols: np.ndarray, vals: np.ndarray, rank: np.ndarray, out_row: np.ndarray) -> int:
    """Write into ``out_row`` (length k) the columns ``cols`` of the ``len(out_row)`` largest positive
    ``vals``, by descending value, ties by ascending ``rank``; ``cols`` and ``vals`` are overwritten
    (used as scratch). Returns how many were written: min(k, len(cols))."""
    k = out_row.shape[0]
    m = cols.shape[0]
    if m > k:  # keep the entries at or above the k-th largest value: the k best and the rest of its ties
        m = _keep_top(cols, vals, k)
    ranks = np.empty(m, dtype=np.int64)
    for t in range(m):
        ranks[t] = rank[cols[t]]
    order = best_first(vals[:m], ranks)
    n_best = min(m, k)
    for t in range(n_best):
        out_row[t] = cols[order[t]]
    return n_best


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
    k = out.shape[1]
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
        n_best = _write_best(cols[:n_scored], vals[:n_scored], rank, out_row)
        if n_best < k:  # the unscored columns tie at 0: in rank order
            for t in range(n_best):
                seen[out_row[t]] = True
            t = n_best
            for f in range(fill.shape[0]):
                if t == k:
                    break
                if not seen[fill[f]]:
                    out_row[t] = fill[f]
                    t += 1
            for t in range(n_best):
                seen[out_row[t]] = False
    return -1


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

    Returns:
        (C, min(k, N)) int64 column ids, best first.

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
    out = np.empty((len(rows), max(k, 0)), dtype=np.int64)
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
    """(rows, cols, values) of the stored entries of the CSR matrix (``indptr``, ``indices``,
    ``data``; no NaN) at or above their row's ``depth``-th largest stored value (repeats counted; a
    row of ``depth`` entries or fewer keeps them all), by row ascending, then value descending, then
    column ascending (ties by stored order): int64 rows, the matrix's index and value dtypes.

    Two passes over the rows: the first finds each longer row's ``depth``-th largest value
    (:func:`kth_smallest` of a copy) and counts the entries at or above it, sizing the outputs; the
    second sorts each row's kept entries (:func:`best_first`, the column as the rank) into them.
    """
    n_rows = indptr.shape[0] - 1
    longest = 0
    for r in range(n_rows):
        longest = max(longest, indptr[r + 1] - indptr[r])
    scratch = np.empty(longest, dtype=data.dtype)
    kth = np.zeros(n_rows, dtype=data.dtype)  # each row longer than depth: its depth-th largest value
    starts = np.zeros(n_rows + 1, dtype=np.int64)  # where each row's kept entries go
    for r in range(n_rows):
        a, n = indptr[r], indptr[r + 1] - indptr[r]
        kept = n
        if n > depth:
            for t in range(n):
                scratch[t] = data[a + t]
            # the depth-th largest lands at n - depth, the larger ones (and some ties) after it
            value = kth_smallest(scratch[:n], n - depth)
            kth[r] = value
            kept = depth
            for t in range(n - depth):
                kept += scratch[t] >= value
        starts[r + 1] = starts[r] + kept
    total = starts[n_rows]
    rows = np.empty(total, dtype=np.int64)
    cols = np.empty(total, dtype=indices.dtype)
    values = np.empty(total, dtype=data.dtype)
    row_cols = np.empty(longest, dtype=indices.dtype)
    for r in range(n_rows):
        a, n = indptr[r], indptr[r + 1] - indptr[r]
        kept = 0
        if n <= depth:
            for t in range(n):
                scratch[t] = data[a + t]
                row_cols[t] = indices[a + t]
            kept = n
        else:  # a branch taken by few entries of a long row: well predicted, unlike a branchless copy
            threshold = kth[r]
            for t in range(n):
                if data[a + t] >= threshold:
                    scratch[kept] = data[a + t]
                    row_cols[kept] = indices[a + t]
                    kept += 1
        order = best_first(scratch[:kept], row_cols[:kept])
        out = starts[r]
        for t in range(kept):
            rows[out + t] = r
            cols[out + t] = row_cols[order[t]]
            values[out + t] = scratch[order[t]]
    return rows, cols, values
