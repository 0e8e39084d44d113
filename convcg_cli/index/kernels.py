"""The compiled loop of exact search (numba): find a tile's scores at or above each row's threshold
and append their sort keys to the row, in one pass over the tile while it is still in the core's
cache. The same work in numpy takes five passes (compare, pack the mask, find the non-zero bytes,
unpack them, gather) and costs about as much as the GEMM that made the tile.

Imported by :mod:`convcg_cli.index.exact` when it first searches (numba takes ~0.2 s to import); the
compiled code is cached on disk beside this file or in the user's cache directory (``cache=True``),
so later processes skip the compilation (~1 s; loading the cache takes ~0.3 s). Where neither is
writable (a read-only install served by a user without a home), each process compiles its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from numba import njit

# The sort key of a score is its float32 bits made to sort in descending order of the score (see
# exact._flip_order), then the item id: (code << 32) | id. -0.0 is keyed as 0.0, its tie.
_NEGATIVE_ZERO = np.int32(-(2**31))
_LOW_31 = np.int32(0x7FFFFFFF)
_ID_BITS = np.uint64(32)
_ID_MASK = np.uint64(0xFFFFFFFF)
# The mask of a row is read 8 cells (bytes) to a uint64 word; the lowest set byte of a word is found
# by a de Bruijn multiplication (its bit position // 8), with no loop over the word's bytes.
_DE_BRUIJN = np.uint64(0x03F79D71B4CB0A89)
_BIT_OF = np.zeros(64, dtype=np.int64)
with np.errstate(over="ignore"):
    for _bit in range(64):
        _BIT_OF[int((np.uint64(1) << np.uint64(_bit)) * _DE_BRUIJN >> np.uint64(58))] = _bit


def compiled(**options: Any) -> Callable[[Callable], Any]:
    """``numba.njit(nogil=True, boundscheck=False, cache=True, **options)``, without the on-disk cache
    where numba finds no writable directory for it (it refuses with a RuntimeError then)."""

    def decorate(func: Callable) -> Any:
        try:
            return njit(nogil=True, boundscheck=False, cache=True, **options)(func)
        except RuntimeError:  # "cannot cache function ...: no locator available"
            return njit(nogil=True, boundscheck=False, cache=False, **options)(func)

    return decorate


@compiled(inline="always")
def _key(bits: np.int32, item: int) -> np.uint64:
    if bits == _NEGATIVE_ZERO:
        bits = np.int32(0)
    bits ^= ~(bits >> 31) & _LOW_31
    return (np.uint64(np.uint32(bits)) << _ID_BITS) | np.uint64(item)


@compiled()
def keep_passing(
    scores: np.ndarray,
    thresholds: np.ndarray,
    n_valid: int,
    first_id: int,
    keys: np.ndarray,
    counts: np.ndarray,
    first_row: int,
) -> int:
    """Append to ``keys[r, counts[r]:]`` the sort keys of the cells of row r of ``scores`` (a
    C-contiguous (rows, w) float32 tile whose column j is item ``first_id + j``) that score at least
    ``thresholds[r]``, in ascending id, for the rows from ``first_row`` on; only the first
    ``n_valid`` columns count (the rest pad the corpus). NaN never passes.

    Returns -1 when done, or the first row whose keys would not fit in ``keys`` (its count is left
    as it was: grow ``keys`` and call again from that row).
    """
    capacity = keys.shape[1]
    n_words = (n_valid + 7) // 8
    mask = np.zeros(8 * n_words, dtype=np.uint8)  # the row's cells >= threshold, one byte each
    words = mask.view(np.uint64)
    bits = scores.view(np.int32)
    for r in range(first_row, scores.shape[0]):
        threshold = thresholds[r]
        row = scores[r]
        for j in range(n_valid):  # vectorised: no branch
            mask[j] = row[j] >= threshold
        c = counts[r]
        for w in range(n_words):
            word = words[w]
            while word != 0:
                lowest = word & (~word + np.uint64(1))
                j = 8 * w + (_BIT_OF[(lowest * _DE_BRUIJN) >> np.uint64(58)] >> 3)
                if c == capacity:
                    return r
                keys[r, c] = _key(bits[r, j], first_id + j)
                c += 1
                word ^= lowest
        counts[r] = c
    return -1


@compiled()
def pad_rows(keys: np.ndarray, counts: np.ndarray, width: int, pad: int) -> None:
    """Fill ``keys[r, counts[r]:width]`` with ``pad`` for every row r."""
    for r in range(keys.shape[0]):
        for c in range(counts[r], width):
            keys[r, c] = pad


@compiled()
def decode_keys(keys: np.ndarray, scores: np.ndarray, ids: np.ndarray) -> None:
    """Write the float32 score and the int64 id of each sort key of ``keys`` (rows, k) into
    ``scores`` and ``ids`` (same shape): the inverse of the keys :func:`keep_passing` makes."""
    score_bits = scores.view(np.int32)
    for r in range(keys.shape[0]):
        for c in range(keys.shape[1]):
            key = keys[r, c]
            bits = np.int32(np.uint32(key >> _ID_BITS))
            score_bits[r, c] = bits ^ (~(bits >> 31) & _LOW_31)
            ids[r, c] = np.int64(key & _ID_MASK)
