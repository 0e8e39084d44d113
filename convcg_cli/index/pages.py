"""Large arrays that are written once, allocated without asking Linux for transparent huge pages.

numpy asks for huge pages (``madvise(MADV_HUGEPAGE)``) on every array of 4 MiB or more (THP
``madvise`` mode, the kernel's default). A huge page is a fresh 2 MiB block, cleared whole at first
touch; ordinary 4 KiB pages are mostly recycled from memory the process or its neighbours just
freed. On this project's reference VM (2 cores) first touches of fresh huge pages cost far more: the
1.4 GB ItemCF cosine of ``bench-large`` took 3.9 s to build in a fresh process against 1.2 s in
ordinary pages, and exact search's 120 MB of results (10k queries, k=1000) ~0.2 s more after the
process had freed gigabytes. The kernel counted no compaction stall meanwhile (``/proc/vmstat``),
so the cost is the first touch itself. The machine is a Firecracker microVM, whose host backs guest
memory when it is first touched; huge pages likely come from blocks the guest had not touched yet.

So memory filled once, front to back, by one pass is asked for in ordinary pages here. Everything
else keeps numpy's default. The first ``convcg eval`` of ``bench-large`` measured 34.3 and 34.4 s
with these two arrays in ordinary pages, against 35.8 s before and 36.3 s with the switch off for
the whole process. The advice is per mapping: an array that glibc maps on its own (one past its mmap
threshold, at most 32 MiB, that the heap's free space cannot hold) gets exactly what this module
asks; one carved from the heap may reuse pages that an earlier array had advised.

A leaf module: it imports only numpy.
"""

from __future__ import annotations

import threading

import numpy as np

try:  # numpy >= 2
    from numpy._core.multiarray import _set_madvise_hugepage  # type: ignore[attr-defined]
except ImportError:  # numpy 1.x (the switch exists since 1.20)
    try:
        from numpy.core.multiarray import _set_madvise_hugepage  # type: ignore[no-redef]
    except ImportError:  # no switch: numpy's own allocation
        _set_madvise_hugepage = None  # type: ignore[assignment]

# The switch is process-wide: held while one array is allocated (np.empty does not touch its pages,
# so this is microseconds), so that concurrent callers cannot leave it off.
_SWITCH = threading.Lock()


def empty_ordinary(shape: int | tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
    """``np.empty(shape, dtype)`` in ordinary pages: no ``MADV_HUGEPAGE`` (see :mod:`convcg_cli.index.pages`).

    Example:
        >>> a = empty_ordinary((2, 3), np.float32)
        >>> a.shape, a.dtype.name
        ((2, 3), 'float32')
    """
    if _set_madvise_hugepage is None:
        return np.empty(shape, dtype=dtype)
    with _SWITCH:
        before = _set_madvise_hugepage(False)
        try:
            return np.empty(shape, dtype=dtype)
        finally:
            _set_madvise_hugepage(before)
