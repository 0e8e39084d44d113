"""Compiled loops of the metrics (numba): where a ranked list holds each positive, and the bootstrap's
weighted sums of integer counts.

Imported by :mod:`convcg_cli.metrics.retrieval` and :mod:`convcg_cli.metrics.bootstrap` when they
first need them (numba takes ~0.2 s to import), so importing the metrics stays light. Each returns
exactly what the numpy code it replaces returned: the same ranks; the same integer sums (numpy's
float64 matrix product of integer-valued operands is exact below 2**53, whatever its order).
"""

from __future__ import annotations

import numpy as np

from convcg_cli.index.kernels import compiled

# Cells of a list compared at a time before testing for the hit: a fixed-length, branch-free loop
# the compiler vectorises, then one branch per block.
_BLOCK = 16


@compiled()
def first_hit_rank(topk_ids: np.ndarray, query_index: np.ndarray, item: np.ndarray, never: int) -> np.ndarray:
    """(P,) int64: the position of ``item[p]`` in row ``query_index[p]`` of ``topk_ids`` (Q, K), or
    ``never`` where the row does not hold it. Reads each row in place, up to the hit (numpy gathers
    every positive's whole row first, then compares it, then reduces it twice)."""
    n_pos, width = query_index.shape[0], topk_ids.shape[1]
    out = np.empty(n_pos, dtype=np.int64)
    for p in range(n_pos):
        row = topk_ids[query_index[p]]
        target = item[p]
        found = never
        for start in range(0, width, _BLOCK):
            stop = min(start + _BLOCK, width)
            hit = False
            for j in range(start, stop):
                hit |= row[j] == target
            if hit:
                for j in range(start, stop):
                    if row[j] == target:
                        found = j
                        break
                break
        out[p] = found
    return out


@compiled()
def weighted_counts(weights: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """(B, C) int64 ``weights @ counts.T``: for (B, U) integer ``weights`` (any integer dtype: the
    bootstrap's stored uint8 draws are read as they are, not widened first) and (C, U) int64
    ``counts`` (each row one count per user, C-contiguous)."""
    n_boot, n_users = weights.shape
    out = np.empty((n_boot, counts.shape[0]), dtype=np.int64)
    for b in range(n_boot):
        row = weights[b]
        for c in range(counts.shape[0]):
            per_user = counts[c]
            total = 0
            for u in range(n_users):
                total += np.int64(row[u]) * per_user[u]
            out[b, c] = total
    return out
