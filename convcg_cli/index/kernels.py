"""The compiled loop of exact search (numba): find a tile's scores at or above each row's threshold
and append their sort keys to the row, in one pass over the tile while it is still in the core's
cache. The same work in numpy takes five passes (compare, pack the mask, find the non-zero bytes,
unpack them, gather) and costs about as much as the GEMM that made the tile. The kept cells are
extracted with branches that do not depend on the data (see :func:`keep_passing`): a loop over each
word's set bits, as before, mispredicted about once a kept cell and cost 40% more.

Imported by :mod:`convcg_cli.index.exact` when it first searches (numba takes ~0.2 s to import); the
compiled code is cached on disk beside this file or in the user's cache directory (``cache=True``),
so later processes skip the compilation (~1 s; loading the cache takes ~0.3 s). Where neither is
writable (a read-only install served by a user without a home), each process compiles its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import numpy as np
from numba import njit
from numba.cpython.unsafe.numbers import trailing_zeros as _cttz
from numba.extending import intrinsic

# The sort key of a score is its float32 bits made to sort in descending order of the score (see
# exact._flip_order), then the item id: (code << 32) | id. -0.0 is keyed as 0.0, its tie.
_NEGATIVE_ZERO = np.int32(-(2**31))
_LOW_31 = np.int32(0x7FFFFFFF)
_ID_BITS = np.uint64(32)
_ID_MASK = np.uint64(0xFFFFFFFF)
# The mask of a row is read 8 cells (bytes, 0 or 1) to a uint64 word; multiplying a word by _PACK
# gathers its 8 bytes' low bits, in order, into the top byte. 64 cells' bits make a group.
_PACK = np.uint64(0x0102040810204080)
_TOP_BYTE = np.uint64(56)
# Set bits extracted from every group, present or not: at 1.7% of the cells passing (exact search's
# threshold) 90% of the groups hold at most 2. The tile pass over 2k queries x 100k trained items,
# each tile fresh from its GEMM: 0.049 s, against 0.070 s looping over the set bytes of each word
# (the branches of that loop mispredicted about once a kept cell); extracting 1 or 3, or counting
# the bits without the popcount instruction, measured no better.
_EVERY_GROUP = 2


@intrinsic
def _ctpop(typingctx: Any, src: Any) -> Any:
    """The number of set bits of an integer (LLVM's ctpop: one instruction where the CPU has it)."""

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.ctpop(args[0])

    return src(src), codegen


# Called from compiled code only, with one integer (numba passes the typing context itself).
_popcount = cast(Callable[[Any], Any], _ctpop)
_trailing_zeros = cast(Callable[[Any], Any], _cttz)  # LLVM's cttz: 64 for 0


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
    ``n_valid`` columns count (the rest pad the corpus). NaN never passes. The slots of a row past
    its count are scratch: the kernel may leave anything there.

    Returns -1 when done, or the first row whose keys would not fit in ``keys`` (its count and its
    counted keys are left as they were: grow ``keys`` and call again from that row).

    A row is read 64 cells at a time: the cells' comparisons (one vectorised pass, a byte each) are
    packed into one 64-bit mask, and the first ``_EVERY_GROUP`` set bits are extracted whether they
    exist or not (a missing one writes a scratch key and is not counted). Only a group holding more
    takes a loop (about a tenth of the groups at exact search's threshold), so nearly every branch
    goes the same way whatever the data.
    """
    capacity = keys.shape[1]
    n_groups = (n_valid + 63) // 64
    mask = np.zeros(64 * n_groups, dtype=np.uint8)  # the row's cells >= threshold, one byte each
    words = mask.view(np.uint64)
    bits = scores.view(np.int32)
    last = n_valid - 1
    for r in range(first_row, scores.shape[0]):
        threshold = thresholds[r]
        row = scores[r]
        for j in range(n_valid):  # vectorised: no branch
            mask[j] = row[j] >= threshold
        c = counts[r]
        for g in range(n_groups):
            group = np.uint64(0)
            for b in range(8):  # byte i of a word (0 or 1) to bit i: no carries reach the top byte
                group |= ((words[8 * g + b] * _PACK) >> _TOP_BYTE) << np.uint64(8 * b)
            if c + _EVERY_GROUP > capacity:
                return r
            rest = group
            for t in range(_EVERY_GROUP):
                j = min(64 * g + _trailing_zeros(rest), last)  # 64 past the group when none is left
                keys[r, c + t] = _key(bits[r, j], first_id + j)
                rest &= rest - np.uint64(1)
            n_set = np.int64(_popcount(group))
            if n_set <= _EVERY_GROUP:
                c += n_set
                continue
            c += _EVERY_GROUP
            if c + n_set - _EVERY_GROUP > capacity:
                return r
            while rest != 0:
                j = 64 * g + _trailing_zeros(rest)
                keys[r, c] = _key(bits[r, j], first_id + j)
                c += 1
                rest &= rest - np.uint64(1)
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
