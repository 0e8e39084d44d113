"""The compiled loop of exact search (numba): find a tile's scores at or above each row's threshold
and append their sort keys to the row, in one pass over the tile while it is still in the core's
cache. The same work in numpy takes five passes (compare, pack the mask, find the non-zero bytes,
unpack them, gather) and costs about as much as the GEMM that made the tile. The kept cells are
extracted with branches that do not depend on the data (see :func:`keep_passing`): a loop over each
word's set bits, as before, mispredicted about once a kept cell and cost 40% more. Two LLVM
intrinsics do what numba cannot say: a 64-cell compare straight into a bit mask, and a prefetch of
the key slots a later row will write.

Imported by :mod:`convcg_cli.index.exact` when it first searches (numba takes ~0.2 s to import); the
compiled code is cached on disk beside this file or in the user's cache directory (``cache=True``),
so later processes skip the compilation (~1 s; loading the cache takes ~0.3 s). Where neither is
writable (a read-only install served by a user without a home), each process compiles its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.cpython.unsafe.numbers import trailing_zeros as _cttz
from numba.extending import intrinsic

# The sort key of a score is its float32 bits made to sort in descending order of the score (see
# exact._flip_order), then the item id: (code << 32) | id. -0.0 is keyed as 0.0, its tie.
_NEGATIVE_ZERO = np.int32(-(2**31))
_LOW_31 = np.int32(0x7FFFFFFF)
_ID_BITS = np.uint64(32)
_ID_MASK = np.uint64(0xFFFFFFFF)
# 64 cells' comparisons make a group: one uint64 mask, bit i for cell i.
_GROUP = 64
# Set bits extracted from every group, present or not: at 1.7% of the cells passing (exact search's
# threshold) 90% of the groups hold at most 2. The tile pass over 2k queries x 100k trained items,
# each tile fresh from its GEMM: 0.049 s, against 0.070 s looping over the set bytes of each word
# (the branches of that loop mispredicted about once a kept cell); extracting 1 or 3, or counting
# the bits without the popcount instruction, measured no better.
_EVERY_GROUP = 2
# Prefetched for writing: the slots 8 keys (a cache line) past the count of the row 8 rows ahead.
# Exact search's 512 rows keep ~1.7k keys each, 7 MB a block, far past the core's 2 MB of L2, so the
# first write to each new line of keys misses. The pass over the tiles of 10k queries x 100k trained
# items, each tile fresh from its GEMM (the kernel's time only): 0.16 s with the prefetch, 0.30 s
# without it, 0.26 s for the pass it replaced (a byte per cell packed by multiplies, whose slower
# compare hid the misses). Distances of 4 to 16 rows and offsets of 4 to 12 keys measured alike.
_PREFETCH_ROWS = 8
_PREFETCH_KEYS = 8


@intrinsic
def _ctpop(typingctx: Any, src: Any) -> Any:
    """The number of set bits of an integer (LLVM's ctpop: one instruction where the CPU has it)."""

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.ctpop(args[0])

    return src(src), codegen


@intrinsic
def _at_least64_intrinsic(typingctx: Any, row: Any, start: Any, threshold: Any) -> Any:
    """Bit i (i < 64) set where ``row[start + i] >= threshold``, as a uint64: 64 float32 cells loaded
    as one vector and compared at once, ordered (NaN never passes), the 64 results bitcast to an
    integer (bit i from cell i). With AVX-512 LLVM makes that four compares into mask registers and
    one store; elsewhere, generic vector code with the same bits. ``row``: a C-contiguous float32
    array (other layouts do not compile); the caller keeps ``start + 64`` within it (nothing is
    checked)."""
    contiguous = isinstance(row, types.Array) and row.ndim == 1 and row.layout == "C"
    if not (contiguous and row.dtype == types.float32):
        return None
    signature = types.uint64(row, start, threshold)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        array, index, value = args
        data = context.make_array(signature.args[0])(context, builder, array).data
        cells = ir.VectorType(ir.FloatType(), _GROUP)
        loaded = builder.load(builder.bitcast(builder.gep(data, [index]), cells.as_pointer()), align=4)
        undefined, lane = ir.Constant(cells, ir.Undefined), ir.IntType(32)
        one = builder.insert_element(undefined, value, ir.Constant(lane, 0))
        splat = builder.shuffle_vector(one, undefined, ir.Constant(ir.VectorType(lane, _GROUP), [0] * _GROUP))
        return builder.bitcast(builder.fcmp_ordered(">=", loaded, splat), ir.IntType(64))

    return signature, codegen


@intrinsic
def _prefetch_write_intrinsic(typingctx: Any, array: Any, row: Any, col: Any) -> Any:
    """Ask for the cache line of ``array[row, col]``, to be written (LLVM's prefetch: a hint, which
    never faults; the caller keeps the index inside the array anyway)."""
    if not (isinstance(array, types.Array) and array.ndim == 2):
        return None

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        arrty = signature.args[0]
        arr = context.make_array(arrty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, arrty, arr, [args[1], args[2]], wraparound=False)
        byte_ptr, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        prefetch = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [byte_ptr, i32, i32, i32]), "llvm.prefetch.p0"
        )
        builder.call(prefetch, [builder.bitcast(ptr, byte_ptr), i32(1), i32(3), i32(1)])  # write, keep, data
        return context.get_dummy_value()

    return types.void(array, row, col), codegen


# Called from compiled code only (numba passes the typing context itself).
_popcount = cast(Callable[[Any], Any], _ctpop)
_at_least64 = cast(Callable[[Any, Any, Any], Any], _at_least64_intrinsic)
_prefetch_write = cast(Callable[[Any, Any, Any], None], _prefetch_write_intrinsic)
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

    A row is read 64 cells at a time: each group's comparisons are one 64-bit mask
    (:func:`_at_least64`; a last group of fewer cells is compared one cell at a time), and the first
    ``_EVERY_GROUP`` set bits are extracted whether they exist or not (a missing one writes a
    scratch key and is not counted). Only a group holding more takes a loop (about a tenth of the
    groups at exact search's threshold), so nearly every branch goes the same way whatever the data.
    The key slots a row ``_PREFETCH_ROWS`` further on will write next are prefetched: in exact
    search they lie in megabytes of keys that the core's cache no longer holds.
    """
    if n_valid > scores.shape[1]:
        raise ValueError("keep_passing: n_valid is more than the tile's width.")
    capacity = keys.shape[1]
    n_full = n_valid // _GROUP  # groups compared as one vector each
    n_groups = (n_valid + _GROUP - 1) // _GROUP
    words = np.zeros(n_groups, dtype=np.uint64)  # the row's masks, one bit a cell
    bits = scores.view(np.int32)
    last = n_valid - 1
    for r in range(first_row, scores.shape[0]):
        threshold = thresholds[r]
        row = scores[r]
        for g in range(n_full):
            words[g] = _at_least64(row, _GROUP * g, threshold)
        if n_full < n_groups:
            tail = np.uint64(0)
            for j in range(_GROUP * n_full, n_valid):
                tail |= np.uint64(row[j] >= threshold) << np.uint64(j - _GROUP * n_full)
            words[n_full] = tail
        ahead = r + _PREFETCH_ROWS
        if ahead < scores.shape[0]:  # keys and counts have a row for each of the tile's rows
            _prefetch_write(keys, ahead, min(counts[ahead] + _PREFETCH_KEYS, capacity - 1))
        c = counts[r]
        for g in range(n_groups):
            group = words[g]
            if c + _EVERY_GROUP > capacity:
                return r
            rest = group
            for t in range(_EVERY_GROUP):
                j = min(_GROUP * g + _trailing_zeros(rest), last)  # 64 past the group when none is left
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
                j = _GROUP * g + _trailing_zeros(rest)
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
