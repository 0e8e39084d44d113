"""The compiled threshold pass of exact search against the same work done in numpy."""

import os
import subprocess
import sys

import numpy as np
import pytest

from convcg_cli.index.exact import _NO_KEY
from convcg_cli.index.kernels import decode_keys, keep_passing, pad_rows


def sort_keys(scores, ids):
    """The keys in numpy, written independently of the kernel: the float32 bits made to sort in
    descending order of the score (non-negative: flip all but the sign; negative: keep), -0.0 as
    0.0, in the high 32 bits; the id in the low 32."""
    bits = (np.asarray(scores, np.float32) + np.float32(0.0)).view(np.int32).astype(np.int64)
    codes = np.where(bits >= 0, bits ^ 0x7FFFFFFF, bits & 0xFFFFFFFF).astype(np.uint64)
    return (codes << np.uint64(32)) | np.asarray(ids).astype(np.uint64)


def numpy_keys(scores, thresholds, n_valid, first_id):
    """Per row, the sort keys of the cells >= the row's threshold among the first n_valid columns."""
    part = scores[:, :n_valid]
    rows = []
    for r in range(len(part)):
        cols = np.flatnonzero(part[r] >= thresholds[r])
        rows.append(sort_keys(part[r, cols], cols.astype(np.int64) + first_id))
    return rows


def run(scores, thresholds, n_valid, first_id, capacity):
    keys = np.full((len(scores), capacity), 7, dtype=np.uint64)
    counts = np.zeros(len(scores), dtype=np.int64)
    row, grown = 0, 0
    while (row := keep_passing(scores, thresholds, n_valid, first_id, keys, counts, row)) >= 0:
        assert counts[row] == 0  # the row that did not fit is left as it was (its count)
        bigger = np.full((len(scores), 2 * keys.shape[1]), 7, dtype=np.uint64)
        bigger[:, : keys.shape[1]] = keys
        keys, grown = bigger, grown + 1
    return keys, counts, grown


@pytest.mark.parametrize("share", [0.0, 0.015, 0.3, 1.0])
@pytest.mark.parametrize("shape", [(1, 1), (1, 13), (3, 16), (5, 61), (4, 64), (3, 200), (16, 2048)])
def test_keeps_exactly_the_cells_at_or_above_the_threshold(share, shape):
    rng = np.random.default_rng(int(share * 1000) + shape[1])
    scores = rng.normal(size=shape).astype(np.float32)
    scores[:, ::7] = scores[:, :1]  # ties with the row's first cell
    thresholds = (
        np.quantile(scores, 1 - share, axis=1).astype(np.float32)
        if share
        else np.full(shape[0], np.inf, np.float32)
    )
    for n_valid in {shape[1], max(1, shape[1] - 5)}:
        keys, counts, _ = run(scores, thresholds, n_valid, first_id=1000, capacity=shape[1])
        expected = numpy_keys(scores, thresholds, n_valid, 1000)
        for r in range(shape[0]):
            np.testing.assert_array_equal(keys[r, : counts[r]], expected[r])


@pytest.mark.parametrize("copies", [1, 15])
def test_threshold_is_inclusive_and_special_values(copies):
    # One copy: 9 cells, compared one at a time (a group of fewer than 64); 15 copies: 135 cells,
    # two 64-cell groups compared as vectors and a tail, the special values on both paths.
    cells = [1.0, -0.0, 0.0, np.nan, np.inf, -np.inf, 0.5, 1.0, 2.0]
    scores = np.array([cells * copies], dtype=np.float32)
    keys, counts, _ = run(scores, np.array([0.0], np.float32), scores.shape[1], 0, 16)
    # -0.0 passes a threshold of 0.0 and is keyed as 0.0 (its tie); NaN and -inf never pass.
    np.testing.assert_array_equal(keys[0, : counts[0]], numpy_keys(scores, [0.0], scores.shape[1], 0)[0])
    assert counts[0] == 7 * copies
    assert keys[0, 1] >> np.uint64(32) == keys[0, 2] >> np.uint64(32)  # -0.0 and 0.0: one code


def test_every_bit_of_a_group_maps_to_its_own_cell():
    # One cell passing at each of the 64 places of the vector-compared groups (and in the tail): the
    # mask's bit i is cell i, so the kept id names the passing cell.
    width = 3 * 64 + 5
    for place in range(width):
        scores = np.zeros((2, width), np.float32)
        scores[0, place] = 1.0
        scores[1] = 1.0
        scores[1, place] = 0.0
        keys, counts, _ = run(scores, np.array([0.5, 0.5], np.float32), width, 10, width)
        assert counts.tolist() == [1, width - 1]
        assert int(keys[0, 0] & np.uint64(0xFFFFFFFF)) == 10 + place
        kept = (keys[1, : counts[1]] & np.uint64(0xFFFFFFFF)).astype(np.int64) - 10
        assert place not in kept and len(set(kept.tolist())) == width - 1


def test_a_tile_that_is_not_c_contiguous_is_refused_not_misread():
    # The 64-cell compare reads memory as one vector: only a C-contiguous tile compiles.
    from numba.core.errors import TypingError

    scores = np.asfortranarray(np.ones((4, 128), np.float32))
    keys, counts = np.zeros((4, 256), np.uint64), np.zeros(4, np.int64)
    with pytest.raises(TypingError):
        keep_passing(scores, np.zeros(4, np.float32), 128, 0, keys, counts, 0)


def test_full_rows_resume_where_they_stopped():
    # Room for 2 keys a row at first: the kernel stops at each row that overflows, the row is
    # doubled, and the result equals the numpy reference; counts carry over between tiles.
    rng = np.random.default_rng(5)
    scores = rng.normal(size=(8, 300)).astype(np.float32)
    thresholds = np.full(8, 0.0, np.float32)
    keys, counts, grown = run(scores, thresholds, 300, 0, capacity=2)
    assert grown >= 2
    expected = numpy_keys(scores, thresholds, 300, 0)
    for r in range(8):
        np.testing.assert_array_equal(keys[r, : counts[r]], expected[r])
    more = np.full((8, 600), 7, np.uint64)
    more[:, : keys.shape[1]] = keys
    second = rng.normal(size=(8, 300)).astype(np.float32)
    assert keep_passing(second, thresholds, 300, 300, more, counts, 0) == -1
    expected_second = numpy_keys(second, thresholds, 300, 300)
    for r in range(8):
        np.testing.assert_array_equal(more[r, : counts[r]], np.concatenate([expected[r], expected_second[r]]))


def test_pad_rows_fills_each_row_past_its_count():
    keys = np.zeros((3, 5), dtype=np.uint64)
    pad_rows(keys, np.array([0, 2, 5]), 4, _NO_KEY)
    assert keys.tolist() == [[_NO_KEY] * 4 + [0], [0, 0, _NO_KEY, _NO_KEY, 0], [0] * 5]


def test_keys_sort_as_descending_score_then_ascending_id_and_decode_back():
    scores = np.array([3.5, -1.0, 0.0, -0.0, 3.5, 1e-30, -1e30, np.inf, -np.inf, 2.0], np.float32)
    ids = np.arange(len(scores)) * 3 + 1
    keys = sort_keys(scores, ids)
    order = np.argsort(keys)
    np.testing.assert_array_equal(order, np.lexsort((ids, -(scores + np.float32(0.0)))))
    out_scores, out_ids = np.empty((1, len(keys)), np.float32), np.empty((1, len(keys)), np.int64)
    decode_keys(keys[None, :], out_scores, out_ids)
    np.testing.assert_array_equal(out_scores[0], scores + np.float32(0.0))  # -0.0 comes back as 0.0
    np.testing.assert_array_equal(out_ids[0], ids)


def test_kernels_compile_without_a_writable_cache(monkeypatch):
    # numba refuses cache=True with a RuntimeError when no cache directory is writable (a read-only
    # install, no home): the kernel is compiled for the process instead.
    from numba.core import caching

    from convcg_cli.index.kernels import compiled

    monkeypatch.setattr(caching.CacheImpl, "_locator_classes", [])

    def twice(x):
        return 2 * x

    fn = compiled()(twice)
    assert fn(21) == 42
    assert type(fn._cache).__name__ == "NullCache"  # compiled, not cached


def test_the_pass_stays_inside_its_arrays(tmp_path):
    # The kernel runs without bounds checks; in a process that turns them on (and compiles into its
    # own cache), every read and write must stay inside the tile, the masks, the keys and the counts:
    # rows ending inside a 64-score group and on its last score, full and empty groups, rows that must
    # grow, and more rows than the prefetch reaches ahead (12 against 8), so that it runs up to the last.
    code = """
import numpy as np
from convcg_cli.index.kernels import keep_passing
rng = np.random.default_rng(0)
for width, n_valid in ((64, 64), (100, 100), (256, 256), (256, 193), (48, 1)):
    scores = rng.normal(size=(12, width)).astype(np.float32)
    thresholds = np.tile(np.array([np.inf, -np.inf, 0.0, 2.0, 1.0, -1.0], np.float32), 2)
    keys = np.zeros((12, 1), np.uint64)
    counts = np.zeros(12, np.int64)
    row = 0
    while (row := keep_passing(scores, thresholds, n_valid, 0, keys, counts, row)) >= 0:
        keys = np.concatenate([keys, np.zeros_like(keys)], axis=1)
    part = scores[:, :n_valid]
    assert counts.tolist() == (part >= thresholds[:, None]).sum(axis=1).tolist(), counts
print("ok")
"""
    env = {**os.environ, "NUMBA_BOUNDSCHECK": "1", "NUMBA_CACHE_DIR": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]
