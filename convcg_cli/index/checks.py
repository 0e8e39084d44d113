"""The input checks every search and every metric shares: a cutoff ``k`` and an embedding matrix."""

from __future__ import annotations

import numpy as np

# faiss pads rows with -1 when fewer than k items are found (an IVF index whose probed cells hold
# fewer than k items); an exact search never returns it, and recall accepts it (never a hit).
PADDING_ID = -1


def check_k(k: int) -> int:
    """``k`` as a positive Python int, or ValueError: the one check of a cutoff, for every metric.

    Example:
        >>> check_k(np.int64(10))
        10
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}.")
    return int(k)


def as_float32_matrix(x: np.ndarray, name: str) -> np.ndarray:
    """``x`` as a C-contiguous float32 (n, d) array with d >= 1 and finite values (faiss needs all).

    Example:
        >>> as_float32_matrix([[1, 2]], "items").dtype
        dtype('float32')
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] == 0:
        raise ValueError(f"{name} must be 2-D with at least one column, got shape {x.shape}.")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values.")
    return x
