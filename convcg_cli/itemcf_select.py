"""ItemCF's compiled selection (numba): the k best of a list of candidates, in order.

* :func:`kth_smallest`: Hoare's selection, for the value at the cut;
* :func:`_keep_top`: the candidates at or above the k-th largest, a threshold read off a strided
  sample first when there are many (only the few passing it are partitioned); :func:`_row_top` the
  same of one row of a sparse matrix, read once;
* :func:`best_first`: their order, by descending value, ties by ascending rank: merged when short,
  radix-sorted from ``_RADIX_FROM`` entries on (no branch mispredicted: about twice as fast at 1,000);
* :func:`_write_best`: the k best columns of a row's candidates, in that order.

Used by :mod:`convcg_cli.itemcf_kernels` (scoring users, ranking similarity rows). A leaf module: it
imports only numpy and the index package's ``compiled``.
"""

from __future__ import annotations

import numpy as np

from convcg_cli.index.kernels import compiled

# The k-th largest of many candidates is found among those at or above a threshold read off a strided
# sample of this many of them (the threshold is checked: at least k candidates pass it, else all count).
_SAMPLE = 1024
# From this many entries on, :func:`best_first` sorts by radix passes instead of merging.
_RADIX_FROM = 700


@compiled()
def best_first(vals: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """The positions 0..m-1 of ``vals`` (no NaN) by descending value, ties by ascending ``ranks``
    (distinct, >= 0): ``np.lexsort((ranks, -vals))``. A list of ``_RADIX_FROM`` or more float64 values
    by radix passes (:func:`_radix_best_first`), a shorter one by merging (:func:`_merge_best_first`)."""
    if vals.shape[0] >= _RADIX_FROM and vals.itemsize == 8:
        return _radix_best_first(vals, ranks)
    return _merge_best_first(vals, ranks)


@compiled()
def _merge_best_first(vals: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """:func:`best_first` by a bottom-up merge sort (numba compiles it in a fraction of the time it
    takes for ``np.argsort``)."""
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


@compiled(inline="always")
def _descending_key(bits: np.uint64) -> np.uint64:
    """The bits of a float64 (no NaN) as an unsigned key that sorts ascending where the value
    sorts descending; -0.0 keyed as 0.0 (equal values: their order is left to the ranks)."""
    if bits == np.uint64(1 << 63):
        bits = np.uint64(0)
    if bits >> np.uint64(63):  # negative: larger magnitude, smaller value
        return bits
    return ~(bits | np.uint64(1 << 63))


@compiled()
def _radix_best_first(vals: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """:func:`best_first` of float64 ``vals`` by a least-significant-digit radix sort, a byte a pass:
    first by ``ranks`` ascending, then (stable) by value descending, so equal values keep the rank
    order. Every pass's counts are taken in one read; a byte that all entries share is not moved.
    About twice as fast as merging from a few hundred entries on (no branch mispredicted)."""
    m = vals.shape[0]
    bits = vals.view(np.uint64)
    top = 0
    for t in range(m):
        top = max(top, ranks[t])
    n_rank = 0  # the rank bytes that vary: those below the highest rank's top byte
    while top >> (8 * n_rank):
        n_rank += 1
    counts = np.zeros((n_rank + 8, 256), dtype=np.int64)
    for t in range(m):
        r = ranks[t]
        for d in range(n_rank):
            counts[d, (r >> (8 * d)) & 0xFF] += 1
        key = _descending_key(bits[t])
        for d in range(8):
            counts[n_rank + d, np.int64((key >> np.uint64(8 * d)) & np.uint64(0xFF))] += 1
    order = np.arange(m)
    moved = np.empty(m, dtype=np.int64)
    for d in range(n_rank + 8):
        at = counts[d]
        shared = False
        for b in range(256):
            shared |= at[b] == m
        if shared:
            continue
        total = 0
        for b in range(256):
            c = at[b]
            at[b] = total
            total += c
        for t in range(m):
            e = order[t]
            if d < n_rank:
                b = np.int64((ranks[e] >> (8 * d)) & 0xFF)
            else:
                b = np.int64((_descending_key(bits[e]) >> np.uint64(8 * (d - n_rank))) & np.uint64(0xFF))
            moved[at[b]] = e
            at[b] += 1
        order, moved = moved, order
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


@compiled(inline="always")
def _sampled(m: int, k: int) -> bool:
    """Whether the k best of ``m`` candidates are looked for above a sample's threshold first."""
    return m >= 4 * _SAMPLE and m >= 8 * k


@compiled()
def _sample_threshold(values: np.ndarray, k: int) -> float:
    """A threshold read off a strided sample of ``_SAMPLE`` of ``values``: about twice the sample's
    share of the k best pass it, so that usually k of ``values`` do (the callers check)."""
    m = values.shape[0]
    stride = m // _SAMPLE
    sample = np.empty(_SAMPLE, dtype=values.dtype)
    for t in range(_SAMPLE):
        sample[t] = values[t * stride]
    q = min(_SAMPLE, 2 * (k * _SAMPLE // m + 1) + 8)
    return kth_smallest(sample, _SAMPLE - q)


@compiled()
def _keep_top(cols: np.ndarray, vals: np.ndarray, k: int) -> int:
    """Move the candidates at or above the k-th largest of ``vals`` (k < len(vals): the k best and
    the rest of the k-th's ties) to the front of ``cols`` and ``vals``; returns how many there are.

    With many candidates, a threshold at most the k-th largest is read off a strided sample first
    and only the candidates passing it are partitioned: every one at or above the k-th largest passes
    a threshold that at least k candidates pass, so the result is the same.
    """
    m = vals.shape[0]
    if _sampled(m, k):
        threshold = _sample_threshold(vals, k)
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
def _row_top(
    row_indices: np.ndarray, row_data: np.ndarray, k: int, cols: np.ndarray, vals: np.ndarray
) -> int:
    """Copy to the front of ``cols`` and ``vals`` the entries of one row (``row_indices``,
    ``row_data``) at or above its k-th largest value, in stored order (all of a row of k or fewer);
    returns how many there are. The entries :func:`_keep_top` keeps of a copy of the row, reading
    the row once: on a long row the sample's threshold is applied while copying, and only the
    entries passing it are partitioned."""
    n = row_data.shape[0]
    if n > k and _sampled(n, k):
        threshold = _sample_threshold(row_data, k)  # as _keep_top's
        passing = 0
        for t in range(n):  # without a branch: each entry written, kept by advancing past it
            value = row_data[t]
            cols[passing] = row_indices[t]
            vals[passing] = value
            passing += value >= threshold
        if passing >= k:
            kth = kth_smallest(vals[:passing].copy(), passing - k)
            return _keep_from(cols, vals, passing, kth)
    for t in range(n):
        cols[t] = row_indices[t]
        vals[t] = row_data[t]
    return n if n <= k else _keep_top(cols[:n], vals[:n], k)
