"""Score transforms of the baselines' tunable options (``convcg_cli.baselines``): popularity over the
training window's last days (``MostPopular(window_days=...)``) and an item-item matrix cut to each
item's nearest neighbours: ``keep_top_per_row``, the definition ``ItemCF(neighbours=...)`` follows
(:class:`~convcg_cli.baselines.ItemCFSimilarity` cuts ranked rows instead of sorting the whole matrix
for each value; the tests hold the two equal)."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from convcg_cli.errors import ConfigError


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
    rows = np.repeat(np.arange(m.shape[0]), np.diff(m.indptr))
    order = np.lexsort((m.indices, -m.data, rows))  # by row, then value descending, then column
    rank = np.arange(len(order)) - m.indptr[rows[order]]
    keep = order[rank < n]
    return sp.csr_matrix((m.data[keep], (rows[keep], m.indices[keep])), shape=m.shape)
