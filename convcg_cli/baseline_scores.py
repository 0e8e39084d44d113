"""The baselines' ranking helpers (``topk_rows``, ``sparse_topk_rows``: each row's top k, ties by a
fixed order; ``sparse_topk_rows`` of scipy's product is the definition ItemCF's compiled scoring,
:mod:`convcg_cli.itemcf_kernels`, follows and is tested against) and score transforms of their
tunable options (``convcg_cli.baselines``): popularity over the training window's last days
(``MostPopular(window_days=...)``) and an item-item matrix cut to each item's nearest neighbours:
``keep_top_per_row``, the definition ``ItemCF(neighbours=...)`` follows (:class:`ItemCFSimilarity`,
every ItemCF weight matrix of a tuning grid from one cosine product, cuts ranked rows instead of
sorting the whole matrix for each value; the tests hold the two equal)."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable

import numpy as np
import scipy.sparse as sp

from convcg_cli.errors import ConfigError
from convcg_cli.index.pages import empty_ordinary

# Stored entries a pass over a large sparse matrix handles at a time (its temporaries: a few MB each).
_BLOCK_CELLS = 1 << 20


def recent_popularity(
    conversion_events: tuple[np.ndarray, np.ndarray] | None, window_days: int, whole: np.ndarray
) -> np.ndarray:
    """(N,) scores ranking items by their conversions in the last ``window_days`` days of the training
    window (counted back from the last day holding a conversion), ties broken by ``whole`` (the whole
    window's popularity scores).

    Example:
        >>> events = (np.array([0, 2, 2]), np.array([1, 5, 6]))  # (item, day) of each conversion
        >>> np.argsort(-recent_popularity(events, 2, np.array([3.0, 2.0, 1.0]))).tolist()
        [2, 0, 1]
    """
    if conversion_events is None:
        raise ConfigError("popularity: window_days needs the training window's conversion days.")
    items, days = conversion_events
    recent = items[days > days.max() - window_days] if len(days) else items[:0]
    counts = np.bincount(recent, minlength=len(whole)).astype(np.float64)
    # dense rank of the whole-window score in [0, N): a tie-breaker below one recent conversion
    ties = np.unique(whole, return_inverse=True)[1].ravel().astype(np.float64)
    return counts * (len(whole) + 1) + ties


def keep_top_per_row(m: sp.csr_matrix, n: int) -> sp.csr_matrix:
    """``m`` with only each row's ``n`` largest entries kept (ties by column position).

    Example:
        >>> m = sp.csr_matrix(np.array([[1.0, 3.0, 2.0], [0.0, 5.0, 5.0]]))
        >>> keep_top_per_row(m, 1).toarray().tolist()
        [[0.0, 3.0, 0.0], [0.0, 5.0, 0.0]]
    """
    m = m.tocsr()
    rows = entry_rows(m.indptr, 0, m.shape[0])
    order = np.lexsort((m.indices, -m.data, rows))  # by row, then value descending, then column
    rank = np.arange(len(order)) - m.indptr[rows[order]]
    keep = order[rank < n]
    return sp.csr_matrix((m.data[keep], (rows[keep], m.indices[keep])), shape=m.shape)


class ItemCFSimilarity:
    """Every ItemCF weight matrix of one binary profile matrix, from one cosine product.

    The sparse product ``xn.T @ xn`` (the cosine) is the expensive part of an ItemCF fit, and the
    options only edit its result: ``shrinkage`` scales each entry by n_ij / (n_ij + shrinkage),
    ``include_self=False`` drops the diagonal, ``neighbours`` keeps each item's most similar items.
    So the cosine is computed once here (of a binary matrix in one compiled pass,
    :func:`~convcg_cli.itemcf_cosine.binary_cosine`, the product bit for bit), n_ij is read off it
    (no second product), each shrinkage's
    matrix is kept for the next variant, and so is each row's ranking of its largest entries, from
    which every ``neighbours`` and ``include_self`` value is cut. Each matrix equals, entry for entry,
    the one computed the direct way (a second product ``x.T @ x`` for n_ij, ``setdiag(0)``,
    :func:`~convcg_cli.baseline_scores.keep_top_per_row` over the whole matrix): the same
    floating-point operations on each entry, so the lists and their ties do not change. The passes
    over the cosine's entries go a block of rows at a time (:func:`row_blocks`), so their temporaries
    stay a few MB however many entries the cosine holds.

    The matrices handed out are shared between variants (and with this object): read them only.

    Args:
        x: (U, N) binary profile matrix (:meth:`TrainHistory.matrix`).
        max_neighbours: the largest ``neighbours`` that will be asked for (0: none), so that one
            ranking per shrinkage serves them all; a larger one is ranked again when asked for.

    Example:
        >>> x = sp.csr_matrix(np.array([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]]))
        >>> sim = ItemCFSimilarity(x, max_neighbours=1)
        >>> sim.weights(include_self=False, neighbours=1, shrinkage=0.0).toarray().round(3).tolist()
        [[0.0, 0.707, 0.0], [0.707, 0.0, 0.707], [0.0, 0.0, 0.0]]
    """

    def __init__(self, x: sp.csr_matrix, max_neighbours: int = 0) -> None:
        x = sp.csr_matrix(x)
        if x.has_canonical_format and bool(np.all(x.data == 1.0)):  # binary: one compiled pass
            from convcg_cli.itemcf_cosine import binary_cosine  # numba: imported when first needed

            self.cosine, self.norms = binary_cosine(x)  # (N, N) cosine, symmetric; (N,) norms
        else:  # the product it equals, bit for bit, on a binary matrix
            self.norms = np.sqrt(np.asarray(x.sum(axis=0)).ravel())  # (N,) sqrt(|users engaging i|)
            inv = sp.diags(np.divide(1.0, self.norms, out=np.zeros_like(self.norms), where=self.norms > 0))
            xn = (x @ inv).tocsc()
            self.cosine = (xn.T @ xn).tocsr()
        self.max_neighbours = int(max_neighbours)
        self._shrunk: dict[float, sp.csr_matrix] = {0.0: self.cosine}
        self._ranked: dict[float, _RankedRows] = {}
        self._paired: set[float] = set()  # shrinkages whose next full scoring serves both diagonals
        self._held: dict[tuple, np.ndarray] = {}  # lists scored for a variant that has not asked yet

    def weights(self, include_self: bool, neighbours: int, shrinkage: float) -> sp.csr_matrix:
        """The (N, N) ItemCF weights W with these options (:class:`ItemCF`'s arguments; ``neighbours``
        0 keeps every co-engaged item): W[i, j] = sim(i, j), column j cut to j's ``neighbours`` most
        similar items when ``neighbours`` > 0."""
        if neighbours:
            ranked = self._ranked.get(shrinkage)
            if ranked is None or ranked.depth <= neighbours:
                # one more than the longest list: a list without the diagonal may need the next entry
                depth = max(neighbours, self.max_neighbours) + 1
                ranked = _RankedRows(self._shrunk_matrix(shrinkage), depth)
                self._ranked[shrinkage] = ranked
            # sim is symmetric: row j's top entries are j's neighbours; W[:, j] holds them.
            return ranked.columns(neighbours, include_self)
        sim = self._shrunk_matrix(shrinkage)
        if include_self:
            return sim
        # setdiag(0) and eliminate_zeros() of the direct way: the diagonal entries left out
        off, indices, indptr = self._off_diagonal
        return sp.csr_matrix((sim.data[off], indices, indptr), shape=sim.shape)

    def scoring(self, include_self: bool, neighbours: int, shrinkage: float) -> tuple[sp.csr_matrix, bool]:
        """``(matrix, skip_diagonal)`` to score ItemCF with these options: the product with
        ``matrix``, its diagonal left out when ``skip_diagonal``, is the product with
        :meth:`weights` term for term. Without ``neighbours`` and with ``include_self`` false that is
        the (shrunk) similarity itself, diagonal skipped, instead of a copy of its other entries."""
        if neighbours or include_self:
            return self.weights(include_self, neighbours, shrinkage), False
        return self._shrunk_matrix(shrinkage), True

    def expect(self, variants: Iterable[tuple[bool, int, float]]) -> None:
        """Note the ``(include_self, neighbours, shrinkage)`` of the variants about to be scored (a
        tuning grid): a shrinkage whose whole similarity (no ``neighbours``) is asked for both with
        and without its diagonal is then scored for both the first time either asks
        (:meth:`full_topk`), reading the similarity once instead of twice."""
        full = {
            (bool(include_self), float(shrinkage))
            for include_self, neighbours, shrinkage in variants
            if not neighbours
        }
        self._paired = {
            shrinkage for include_self, shrinkage in full if (not include_self, shrinkage) in full
        }
        self._held = {}

    def full_topk(
        self,
        include_self: bool,
        shrinkage: float,
        profiles: sp.csr_matrix,
        users: np.ndarray,
        rank: np.ndarray,
        k: int,
    ) -> np.ndarray | None:
        """The ItemCF lists of ``users`` without ``neighbours`` (what ``sparse_product_topk`` of
        :meth:`scoring`'s matrix gives), when they were scored for the other diagonal choice's
        variant already, or when this shrinkage was :meth:`expect`-ed both ways and has not been
        scored yet: then both are scored in one pass
        (:func:`~convcg_cli.itemcf_kernels.product_topk_with_and_without_diagonal`) and the other's
        lists kept until it asks for the same users, rank and k. None otherwise (score it alone)."""
        shrinkage = float(shrinkage)
        if not self._held and shrinkage not in self._paired:  # nothing to share: no keys hashed
            return None
        key = (
            shrinkage,
            int(k),
            hashlib.blake2b(users.tobytes()).digest(),
            hashlib.blake2b(rank.tobytes()).digest(),
        )
        held = self._held.pop((key, bool(include_self)), None)
        if held is not None or shrinkage not in self._paired:
            return held
        from convcg_cli.itemcf_kernels import product_topk_with_and_without_diagonal

        self._paired.discard(shrinkage)
        both = product_topk_with_and_without_diagonal(
            profiles, users, self._shrunk_matrix(shrinkage), rank, k
        )
        self._held[(key, not include_self)] = both[bool(include_self)]  # with (0) / without (1) the diagonal
        return both[not include_self]

    def _shrunk_matrix(self, shrinkage: float) -> sp.csr_matrix:
        """The cosine times n_ij / (n_ij + shrinkage), entry by entry (kept for the next variant), in
        one compiled pass (:func:`~convcg_cli.itemcf_cosine.shrunk_entries`).

        n_ij is read off the cosine entry: it is n_ij copies of 1 / (norm_i norm_j) summed, so times
        norm_i norm_j it is n_ij up to a rounding error of about n_ij^2 * 1e-16: rounded, exactly the
        count ``x.T @ x`` gives while fewer than ten million users engage both items, for a fraction
        of its cost."""
        if shrinkage not in self._shrunk:
            from convcg_cli.itemcf_cosine import shrunk_entries  # numba: imported when first needed

            cosine = self.cosine
            data = shrunk_entries(cosine.indptr, cosine.indices, cosine.data, self.norms, float(shrinkage))
            self._shrunk[shrinkage] = sp.csr_matrix((data, cosine.indices, cosine.indptr), shape=cosine.shape)
        return self._shrunk[shrinkage]

    @functools.cached_property
    def _off_diagonal(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(which stored entries are off the diagonal, their column indices, the rows' pointers
        without the diagonal): the sparsity of every matrix here without its diagonal."""
        cosine = self.cosine
        off = np.empty(cosine.nnz, dtype=bool)
        for first, last in row_blocks(cosine.indptr):
            block = slice(cosine.indptr[first], cosine.indptr[last])
            off[block] = cosine.indices[block] != entry_rows(cosine.indptr, first, last)
        diagonal_rows = rows_of_entries(cosine.indptr, np.flatnonzero(~off))
        on_diagonal = np.bincount(diagonal_rows, minlength=cosine.shape[0])  # (N,) 0 or 1
        indptr = cosine.indptr - np.concatenate([[0], np.cumsum(on_diagonal)])
        return off, cosine.indices[off], indptr


class _RankedRows:
    """Each row's ``depth`` largest entries of a sparse matrix (with the ties at the cut), sorted by
    row, then value descending, then column, as :func:`~convcg_cli.baseline_scores.keep_top_per_row`
    sorts the whole matrix: every ``keep_top_per_row(m, n)`` with n < ``depth`` (of ``m``, or of ``m``
    without its diagonal) is a cut of it, without sorting the whole matrix again. Only the entries
    at or above each row's ``depth``-th largest value are sorted, row by row, in one compiled pass
    (:func:`~convcg_cli.itemcf_kernels.ranked_row_entries`).

    Args:
        m: (R, C) CSR matrix.
        depth: how many entries of each row to rank.
    """

    def __init__(self, m: sp.csr_matrix, depth: int) -> None:
        from convcg_cli.itemcf_kernels import ranked_row_entries  # numba: imported when first needed

        self.shape, self.depth = m.shape, int(depth)
        if self.depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}.")
        # where each row's entries begin: the cuts read these, not a row index per entry (8 bytes an
        # entry, ~160 MB a ranking of `large`'s cosine, never made)
        self.starts, self.cols, self.values = ranked_row_entries(m.indptr, m.indices, m.data, self.depth)

    @property
    def rows(self) -> np.ndarray:
        """The row of each ranked entry (int64), from :attr:`starts`."""
        return np.repeat(np.arange(self.shape[0], dtype=np.int64), np.diff(self.starts))

    def keep_top(self, n: int, include_self: bool = True) -> sp.csr_matrix:
        """``keep_top_per_row(m, n)``, or with ``include_self=False`` the same of ``m`` without its
        diagonal; n < ``depth``."""
        return self._cut(n, include_self, transpose=False)

    def columns(self, n: int, include_self: bool = True) -> sp.csr_matrix:
        """The transpose of :meth:`keep_top` (column j holds row j's top ``n``), built directly."""
        return self._cut(n, include_self, transpose=True)

    def _cut(self, n: int, include_self: bool, transpose: bool) -> sp.csr_matrix:
        from convcg_cli.itemcf_kernels import cut_ranked

        if n >= self.depth:
            raise ValueError(f"Ranked {self.depth} entries per row; cannot keep the top {n}.")
        shape = self.shape[::-1] if transpose else self.shape
        parts = cut_ranked(
            self.starts, self.cols, self.values, shape[0], int(n), bool(include_self), transpose
        )
        return sp.csr_matrix(parts[::-1], shape=shape)


def query_rows(lists: np.ndarray, inverse: np.ndarray) -> np.ndarray:
    """Each query's list: row ``inverse[q]`` of the users' ``lists``, as int32 when every id fits
    (half the copy; the recall code accepts any integer dtype), written once into ordinary pages
    (:mod:`convcg_cli.index.pages`: 238 MB for ``bench-large``'s 59,480 held-out queries at k=1000)."""
    inverse = inverse.ravel()
    if lists.dtype.itemsize > 4 and lists.max(initial=0) <= np.iinfo(np.int32).max:
        lists = lists.astype(np.int32)
    out = empty_ordinary((len(inverse), lists.shape[1]), lists.dtype)
    return np.take(lists, inverse, axis=0, out=out)


def topk_rows(scores: np.ndarray, k: int) -> np.ndarray:
    """Column ids of each row's top k by descending score, ties by lower column id (exact, vectorised).

    Args:
        scores: (C, N) real scores, no NaN.
        k: list length, >= 1.

    Returns:
        (C, min(k, N)) int64 column ids, best first.

    Example:
        >>> topk_rows(np.array([[0.0, 2.0, 1.0, 2.0]]), k=3).tolist()
        [[1, 3, 2]]
    """
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be 2-D (rows x items), got shape {scores.shape}.")
    if np.isnan(scores).any():
        raise ValueError("scores contains NaN; cannot rank the items.")
    n_rows, n = scores.shape
    k = min(int(k), n)
    if k < 1 or n_rows == 0:
        return np.zeros((n_rows, max(k, 0)), dtype=np.int64)
    kth = -np.partition(-scores, k - 1, axis=1)[:, k - 1]  # (C,) k-th largest score per row
    above = scores > kth[:, None]
    tied = scores == kth[:, None]
    need = k - above.sum(axis=1)  # (C,) members of the tie group that make the cut: the lowest ids
    take = above | (tied & (np.cumsum(tied, axis=1) <= need[:, None]))  # exactly k per row
    cols = np.nonzero(take)[1].reshape(n_rows, k)  # (C, k), ascending ids
    order = np.lexsort((cols, -np.take_along_axis(scores, cols, axis=1)), axis=-1)
    return np.take_along_axis(cols, order, axis=1)


def sparse_topk_rows(scores: sp.csr_matrix, rank: np.ndarray, k: int) -> np.ndarray:
    """Column ids of each row's top k of non-negative sparse ``scores``: by descending score, ties
    (the zeros among them) by ascending ``rank``. The same lists as :func:`topk_rows` of the dense
    matrix with its columns put in ``rank`` order, chosen among each row's positive entries only
    (then the columns it does not score, in rank order) instead of over all N columns.

    Args:
        scores: (C, N) scores >= 0, no NaN (explicit zeros count as unscored).
        rank: (N,) a permutation of 0..N-1: column j's place in the tie order.
        k: list length, >= 1.

    Returns:
        (C, min(k, N)) int64 column ids, best first.

    Example:
        >>> rows = sp.csr_matrix(np.array([[0.0, 0.5, 0.0, 0.5], [0.0, 0.0, 0.0, 0.0]]))
        >>> sparse_topk_rows(rows, np.array([3, 2, 0, 1]), k=3).tolist()
        [[3, 1, 2], [2, 3, 1]]
    """
    scores = sp.csr_matrix(scores)
    n_rows, n = scores.shape
    k = min(int(k), n)
    if scores.nnz and (np.isnan(scores.data).any() or scores.data.min() < 0):
        raise ValueError("sparse_topk_rows needs scores >= 0 without NaN.")
    rank = np.asarray(rank, dtype=np.int64)
    fill = np.argsort(rank)[:k]  # the first k columns in tie order: enough to complete any row
    out = np.empty((n_rows, k), dtype=np.int64)
    scored = np.zeros(n, dtype=bool)
    for r in range(n_rows):
        cols = scores.indices[scores.indptr[r] : scores.indptr[r + 1]]
        vals = scores.data[scores.indptr[r] : scores.indptr[r + 1]]
        if len(vals) and not (vals > 0).all():
            cols, vals = cols[vals > 0], vals[vals > 0]
        if len(vals) > k:  # keep the k best: above the k-th score, then its ties of lowest rank
            kth = np.partition(vals, len(vals) - k)[len(vals) - k]
            tied = np.flatnonzero(vals == kth)
            above = np.flatnonzero(vals > kth)
            keep = np.concatenate([above, tied[np.argsort(rank[cols[tied]])[: k - len(above)]]])
            cols, vals = cols[keep], vals[keep]
        best = cols[np.lexsort((rank[cols], -vals))]
        out[r, : len(best)] = best
        if len(best) < k:  # the unscored columns tie at 0: in rank order
            scored[best] = True
            out[r, len(best) :] = fill[~scored[fill]][: k - len(best)]
            scored[best] = False
    return out


def row_blocks(indptr: np.ndarray, cells: int | None = None) -> list[tuple[int, int]]:
    """(first, last) ranges of consecutive rows of a CSR matrix holding about ``cells`` stored entries
    each (a longer row on its own), for passes over a large matrix that keep their temporaries small.

    Example:
        >>> row_blocks(np.array([0, 2, 3, 3, 9]), cells=3)
        [(0, 2), (2, 4)]
    """
    cells = int(cells or _BLOCK_CELLS)
    n_rows = len(indptr) - 1
    cuts = np.searchsorted(indptr, np.arange(cells, indptr[-1], cells), side="left")
    bounds = np.unique(np.concatenate([[0], np.minimum(cuts, n_rows), [n_rows]]))
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def entry_rows(indptr: np.ndarray, first: int, last: int) -> np.ndarray:
    """The row of each stored entry of rows [first, last) of a CSR matrix (``indptr``), in order.

    Example:
        >>> entry_rows(np.array([0, 2, 2, 5]), 0, 3).tolist()
        [0, 0, 2, 2, 2]
    """
    return np.repeat(np.arange(first, last), np.diff(indptr[first : last + 1]))


def rows_of_entries(indptr: np.ndarray, entries: np.ndarray) -> np.ndarray:
    """The row of each of the stored entries ``entries`` (positions in the data) of a CSR matrix
    (``indptr``): :func:`entry_rows` for a chosen few entries.

    Example:
        >>> rows_of_entries(np.array([0, 2, 2, 5]), np.array([1, 2, 4])).tolist()
        [0, 2, 2]
    """
    return np.searchsorted(indptr, entries, side="right") - 1
