"""Measuring helpers: peak memory, growth exponents, latency percentiles, top-k overlap, a plain torch
top-k, the bare GEMM of exact search's shapes, step clocks.

Pure and small; tested in tests/test_bench.py.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (``VmHWM`` of /proc/self/status), in MiB."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def growth_exponent(sizes: Sequence[float], costs: Sequence[float]) -> float:
    """Slope of log(cost) against log(size): cost ~ size ** exponent (least squares, >= 2 points).

    Example:
        >>> round(growth_exponent([1, 2, 4], [3, 12, 48]), 6)
        2.0
    """
    x, y = np.log(np.asarray(sizes, dtype=float)), np.log(np.asarray(costs, dtype=float))
    return float(np.polyfit(x, y, 1)[0])


def latency_ms(seconds: list[float]) -> dict[str, float]:
    """p50 and p99 of per-call seconds, in milliseconds.

    Example:
        >>> latency_ms([0.001] * 99 + [0.1])["p50_ms"]
        1.0
    """
    values = 1e3 * np.asarray(seconds, dtype=np.float64)
    return {"p50_ms": float(np.percentile(values, 50)), "p99_ms": float(np.percentile(values, 99))}


def topk_overlap(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean share of each row of ``exact`` (Q, k) ids that ``approx`` (Q, k) also holds (-1 = none).

    Example:
        >>> topk_overlap(np.array([[1, 2], [3, -1]]), np.array([[2, 1], [3, 4]]))
        0.75
    """
    n_rows, k = exact.shape
    if n_rows == 0 or k == 0:
        return float("nan")
    span = int(max(approx.max(initial=0), exact.max(initial=0))) + 2
    offset = (np.arange(n_rows, dtype=np.int64) * span)[:, None]  # ids of different rows never meet
    approx = np.where(approx < 0, span - 1, approx) + offset  # padding: a slot no exact id uses
    hits = np.isin(exact + offset, approx)
    return float(hits.mean())


def torch_topk(queries: np.ndarray, items: np.ndarray, k: int, max_cells: int = 1 << 26) -> np.ndarray:
    """Plain exact top-k by ``torch.topk(queries @ items.T)``, in query chunks of <= ``max_cells`` scores."""
    import torch

    item_t = torch.from_numpy(items)
    chunk = max(1, max_cells // max(1, len(items)))
    out = [
        torch.topk(torch.from_numpy(queries[s : s + chunk]) @ item_t.T, min(k, len(items))).indices
        for s in range(0, len(queries), chunk)
    ]
    return torch.cat(out).numpy()


def exact_tile(n_queries: int, n_items: int) -> tuple[int, int]:
    """(queries, items) of the tiles :class:`~convcg_cli.index.ExactIndex` scores a search of
    ``n_queries`` over ``n_items`` by (the last ones may be smaller)."""
    from convcg_cli.index.exact import QUERY_BLOCK, tile_width

    rows = max(1, min(QUERY_BLOCK, n_queries))
    return rows, tile_width(rows, n_items)


def blocked_gemm_seconds(queries: np.ndarray, items: np.ndarray) -> float:
    """Seconds of the bare GEMM of exact search's shapes: every tile of ``queries @ items.T`` that
    :class:`~convcg_cli.index.ExactIndex` computes (:func:`exact_tile`), written into one reused
    buffer and nothing else done with it: the arithmetic's limit for exact search on this machine.
    The blocks and the items' transposed tiles are sliced before the clock starts (exact search
    makes its tile list once a search too), so the limit pays no per-tile slicing."""
    import torch

    q, x = torch.from_numpy(np.ascontiguousarray(queries)), torch.from_numpy(np.ascontiguousarray(items))
    rows, cols = exact_tile(len(q), len(x))
    blocks = [q[i : i + rows] for i in range(0, len(q), rows)]
    parts = [x[j : j + cols].T for j in range(0, len(x), cols)]
    buffer = torch.empty((rows, cols), dtype=torch.float32)
    start = time.perf_counter()
    for block in blocks:
        for part in parts:
            if (len(block), part.shape[1]) == (rows, cols):
                torch.mm(block, part, out=buffer)
            else:
                torch.mm(block, part)  # the last, smaller tiles
    return time.perf_counter() - start


class Clock:
    """Wall and CPU timestamps taken each time a timed batch is in hand (``tick``).

    Both paths tick at the same moment of a step (batch fetched, step not yet run) and one batch past
    the last timed one, so ``batches`` intervals cover everything a step costs: data, compute,
    logging, progress bar. CPU time (all threads of the process) is less disturbed than wall time
    by other processes on a shared machine.
    """

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def tick(self) -> None:
        """Record now."""
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())

    @property
    def seconds(self) -> float:
        """Wall seconds between the first and the last tick."""
        return self.wall[-1] - self.wall[0]

    @property
    def cpu_seconds(self) -> float:
        """CPU seconds (every thread) between the first and the last tick."""
        return self.cpu[-1] - self.cpu[0]

    @property
    def step_seconds(self) -> np.ndarray:
        """Wall seconds of each step (tick to tick)."""
        return np.diff(self.wall)


def time_data_path(dm, n_batches: int) -> tuple[float, int]:
    """Seconds to draw ``n_batches`` (fewer if an epoch is shorter) from the training DataLoader."""
    start, n = time.perf_counter(), 0
    for _ in dm.train_dataloader():
        n += 1
        if n == n_batches:
            break
    return time.perf_counter() - start, n
