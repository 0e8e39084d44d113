"""ItemCF's item-item cosine of a binary profile matrix, in one compiled pass (numba).

Replaces scipy's product ``xn.T @ xn`` (``xn = x @ diags(1 / norms)``) of
:class:`~convcg_cli.baseline_scores.ItemCFSimilarity`: scipy runs it in two passes (one sizing the
output, one summing floats); here each row is found in one pass that counts co-engaging users with
integers, into output arrays sized from an upper bound and shrunk in place afterwards.

The result is the same matrix bit for bit: every stored value of column j of ``xn`` is exactly
``inv_j = 1 / norm_j``, so scipy's entry (i, j) is n_ij copies of the one float
``c = inv_i * inv_j`` added one after another from 0.0 (n_ij: the users engaging both i and j),
whatever order the users come in. The kernel counts n_ij with integers and forms that float by the
same repeated addition (``n * c`` rounds differently for larger n; up to 3 it cannot: 2c is exact,
so 2c + c rounds once, as 3c does, and the kernel starts from there). Every such entry is > 0, so
scipy drops none of them; the same (row, column) entries are stored, in another order within a row.

The shrunk cosine of ItemCF's ``shrinkage`` (:func:`shrunk_entries`) is one compiled pass over it,
with numpy's float operations in numpy's order.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from convcg_cli.index.kernels import compiled
from convcg_cli.index.pages import empty_ordinary

_INT32_MAX = np.iinfo(np.int32).max
# The first allocation holds at most this many entries: 3.2 GB of int32 and float64 address space,
# paged in only where written (the bound, 1.2x the entries on our data, may be far above them); the
# arrays grow by doubling past it, up to the bound (numpy zeroes the new part: ~0.2 s a GB).
_FIRST_CAPACITY = 1 << 28


@compiled()
def _row_bounds(indptr: np.ndarray, indices: np.ndarray, n_items: int) -> np.ndarray:
    """(N,) int64: an upper bound of each cosine row's entries, min(N, sum of deg(u) over the users
    u engaging the item), where deg(u) is the number of items u engages."""
    bounds = np.zeros(n_items, dtype=np.int64)
    for u in range(len(indptr) - 1):
        degree = indptr[u + 1] - indptr[u]
        for k in range(indptr[u], indptr[u + 1]):
            bounds[indices[k]] += degree
    for i in range(n_items):
        bounds[i] = min(bounds[i], n_items)
    return bounds


@compiled()
def _cosine_rows(
    user_ptr: np.ndarray,
    user_items: np.ndarray,
    item_ptr: np.ndarray,
    item_users: np.ndarray,
    inv: np.ndarray,
    bounds: np.ndarray,
    first_row: int,
    indptr: np.ndarray,
    indices: np.ndarray,
    data: np.ndarray,
    counts: np.ndarray,
) -> int:
    """Write the cosine's rows from ``first_row`` on into ``indptr[i + 1]``, ``indices`` and ``data``
    (``indptr[first_row]`` already set), each row's columns in the order first met.

    ``user_ptr``/``user_items`` are the items of each user (CSR), ``item_ptr``/``item_users`` the
    users of each item (CSC), ``inv`` the (N,) 1 / norms (0 where no user), ``bounds`` the
    :func:`_row_bounds`, ``counts`` an (N,) zero array (left zero).

    Returns -1 when done, or the first row whose bound does not fit in the arrays' space left
    (grow them and call again from that row). Their last cell is spare: a row's column is written
    before it is known to be new, one past the row's columns.
    """
    capacity = len(indices) - 1
    for i in range(first_row, len(inv)):
        start = indptr[i]
        if start + bounds[i] > capacity:
            return i
        end = start
        for k in range(item_ptr[i], item_ptr[i + 1]):
            u = item_users[k]
            for m in range(user_ptr[u], user_ptr[u + 1]):
                j = user_items[m]
                n = counts[j]
                indices[end] = j  # kept (end moves past it) only where j is new to the row: no branch
                end += n == 0
                counts[j] = n + 1
        inv_i = inv[i]
        for k in range(start, end):
            j = indices[k]
            c = inv_i * inv[j]
            n = counts[j]
            counts[j] = 0
            # scipy's 0 + c + c + ...: c, 2c (exact), round(2c + c) = round(3c), then one by one.
            total = min(n, 3) * c
            for _ in range(n - 3):
                total += c
            data[k] = total
        indptr[i + 1] = end
    return -1


def binary_cosine(x: sp.csr_matrix) -> tuple[sp.csr_matrix, np.ndarray]:
    """(cosine, norms) of a binary profile matrix: what ItemCF's scipy product gives, faster.

    Args:
        x: (U, N) CSR user x item matrix whose stored values are all 1.0, canonical (no duplicate
            entries); int32 or int64 indices.

    Returns:
        ``cosine``: (N, N) CSR float64, entry (i, j) = n_ij / (norm_i norm_j) summed the way scipy's
        ``xn.T @ xn`` sums it (bit for bit), stored only where n_ij > 0, the columns of a row
        unsorted; int32 indices where they fit, as scipy's. ``norms``: (N,) sqrt of the number of
        users engaging each item.

    Example:
        >>> x = sp.csr_matrix(np.array([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]]))
        >>> cosine, norms = binary_cosine(x)
        >>> cosine.toarray().round(3).tolist()
        [[1.0, 0.707, 0.0], [0.707, 1.0, 0.707], [0.0, 0.707, 1.0]]
    """
    n_items = x.shape[1]
    norms = np.sqrt(np.asarray(x.sum(axis=0)).ravel())  # the same expression as the scipy code
    inv = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
    user_ptr, user_items = x.indptr.astype(np.int64), x.indices.astype(np.int64)
    by_item = x.tocsc()
    item_ptr, item_users = by_item.indptr.astype(np.int64), by_item.indices.astype(np.int64)
    bounds = _row_bounds(user_ptr, user_items, n_items)
    total_bound = int(bounds.sum())
    if total_bound == 0:
        return sp.csr_matrix((n_items, n_items), dtype=np.float64), norms  # what scipy returns then
    # int32 indices where any count fits; where only the actual one does, scipy's constructor below
    # narrows them (as it does scipy's own product's).
    index_dtype = np.int32 if max(total_bound, n_items) <= _INT32_MAX else np.int64
    capacity = min(total_bound, _FIRST_CAPACITY)
    indptr = np.zeros(n_items + 1, dtype=index_dtype)
    # Written once, front to back: ordinary pages (see convcg_cli.index.pages: fresh huge pages
    # cost far more at first touch on a VM that backs memory on demand).
    indices = empty_ordinary(capacity + 1, index_dtype)  # + 1: the kernel's spare cell
    data = empty_ordinary(capacity + 1, np.float64)
    counts = np.zeros(n_items, dtype=np.int32 if x.shape[0] <= _INT32_MAX else np.int64)
    row = 0
    while True:
        row = _cosine_rows(
            user_ptr, user_items, item_ptr, item_users, inv, bounds, row, indptr, indices, data, counts
        )
        if row < 0:
            break
        # resize reallocates (mremap: no copy) and zeroes the new part; only the owner holds them.
        capacity = min(total_bound, max(2 * capacity, int(indptr[row]) + int(bounds[row])))
        indices.resize(capacity + 1, refcheck=False)
        data.resize(capacity + 1, refcheck=False)
    nnz = int(indptr[-1])
    indices.resize(nnz, refcheck=False)  # shrinks in place: the untouched tail was never paged in
    data.resize(nnz, refcheck=False)
    cosine = sp.csr_matrix((data, indices, indptr), shape=(n_items, n_items))
    return cosine, norms


# Shrink factors n / (n + shrinkage) of the counts n below this are read from a table (no division).
_TABLE = 1 << 12


@compiled()
def shrunk_entries(
    indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, norms: np.ndarray, shrinkage: float
) -> np.ndarray:
    """The stored entries of a square cosine (CSR: ``indptr``, ``indices``, ``data``; ``norms`` its
    (N,) column norms) times n_ij / (n_ij + ``shrinkage``), n_ij read off each entry as
    ``rint(value * norm_i * norm_j)``: the float64 operations of
    ``ItemCFSimilarity._shrunk_matrix``'s numpy definition, in its order, so each is its entry bit
    for bit; the factors of n_ij < ``_TABLE`` are divided once, into a table."""
    table = np.arange(_TABLE, dtype=np.float64)
    for t in range(_TABLE):
        table[t] = table[t] / (table[t] + shrinkage)
    out = np.empty(data.shape[0], dtype=np.float64)
    for r in range(indptr.shape[0] - 1):
        for e in range(indptr[r], indptr[r + 1]):
            value = data[e]
            together = np.rint(value * norms[r] * norms[indices[e]])
            if together < _TABLE:
                out[e] = value * table[int(together)]
            else:
                out[e] = value * (together / (together + shrinkage))
    return out
