"""convcg_cli.index.pages: write-once arrays in ordinary pages, numpy's huge-page switch left as it was.

The pages' advice is read back from the kernel (``/proc/self/smaps``: a mapping advised
``MADV_HUGEPAGE`` carries the ``hg`` flag), so the tests check what Linux was told, not a stand-in.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from convcg_cli.index import pages
from convcg_cli.index.pages import empty_ordinary

needs_switch = pytest.mark.skipif(
    not sys.platform.startswith("linux") or pages._set_madvise_hugepage is None,
    reason="reads /proc/self/smaps (Linux) and numpy's MADV_HUGEPAGE switch",
)
_BIG = 64 << 20  # numpy advises huge pages from 4 MiB


@pytest.fixture
def switch():
    """Sets numpy's switch for one test (``switch(True)``) and restores it after."""
    before = pages._set_madvise_hugepage(True)
    pages._set_madvise_hugepage(before)
    yield pages._set_madvise_hugepage
    pages._set_madvise_hugepage(before)


def _switch() -> bool:
    """numpy's switch as it is now (setting it returns the previous value)."""
    before = pages._set_madvise_hugepage(True)
    pages._set_madvise_hugepage(before)
    return before


def _advised(a: np.ndarray) -> bool:
    """Whether the mapping holding ``a``'s middle byte is advised MADV_HUGEPAGE (VmFlags ``hg``;
    numpy advises from the first page boundary inside the array, so not its first page)."""
    address = a.ctypes.data + a.nbytes // 2
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= address < hi
        elif inside and line.startswith("VmFlags:"):
            return "hg" in line.split()[1:]
    raise AssertionError(f"no mapping holds address {address:#x}")


def test_small_shapes_and_dtypes() -> None:
    a = empty_ordinary((3, 5), np.int64)
    assert a.shape == (3, 5) and a.dtype == np.int64 and a.flags.c_contiguous and a.flags.owndata
    assert empty_ordinary(7, np.float32).shape == (7,)


@needs_switch
def test_big_array_is_not_advised_while_numpys_is(switch) -> None:
    switch(True)
    plain = np.empty(_BIG, dtype=np.uint8)
    ordinary = empty_ordinary(_BIG, np.uint8)
    assert _advised(plain)  # the reference: numpy's own allocation is advised
    assert not _advised(ordinary)
    assert _switch() is True  # and the switch is back on


@needs_switch
def test_switch_left_off_stays_off(switch) -> None:
    switch(False)
    empty_ordinary(_BIG, np.uint8)
    assert _switch() is False


@needs_switch
def test_concurrent_callers_leave_the_switch_on(switch) -> None:
    switch(True)

    def allocate() -> None:
        for _ in range(200):
            empty_ordinary(5 << 20, np.uint8)

    threads = [threading.Thread(target=allocate) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert _switch() is True


_FRESH_PROCESS_CHECK = """
import sys
import numpy as np
import scipy.sparse as sp
sys.path.insert(0, sys.argv[1])
from test_pages import _advised
from convcg_cli.index import exact_topk, pages
from convcg_cli.itemcf_cosine import binary_cosine

pages._set_madvise_hugepage(True)
rng = np.random.default_rng(0)
queries = rng.standard_normal((10_000, 8)).astype(np.float32)
items = rng.standard_normal((2000, 8)).astype(np.float32)
scores, ids = exact_topk(queries, items, 1000)
cosine, _ = binary_cosine(sp.csr_matrix(np.ones((10, 4000))))
print(_advised(scores), _advised(ids), _advised(cosine.data), _advised(cosine.indices))
"""


@needs_switch
def test_exact_search_results_and_cosine_are_in_ordinary_pages() -> None:
    """In a fresh process: there, glibc maps each of these arrays on its own (40 + 80 MB of results,
    128 + 64 MB of cosine values and indices), so the mapping carries exactly the advice asked for.
    In this process, after other tests, the heap may hold enough freed space to carve one from, on
    pages an earlier array had advised (see convcg_cli.index.pages): that says nothing of the code."""
    import subprocess

    done = subprocess.run(
        [sys.executable, "-c", _FRESH_PROCESS_CHECK, str(Path(__file__).parent)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False"] * 4  # scores, ids, cosine values, cosine indices
