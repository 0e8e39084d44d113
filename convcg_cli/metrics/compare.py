"""Across-seed statistics of trained variants: mean and t-interval of independent training runs.

Pure numpy/scipy on plain sequences; nothing here knows about runs, MLflow or the config. The paired
comparison of two rankings on the same users lives beside the other bootstrap code
(:func:`convcg_cli.metrics.bootstrap.paired_bootstrap_diff`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def t_quantile(n: int, level: float = 0.95) -> float:
    """Two-sided t quantile for the mean of ``n`` runs (n - 1 degrees of freedom).

    Example:
        >>> round(t_quantile(3), 3)
        4.303
    """
    from scipy import stats

    return float(stats.t.ppf(0.5 + level / 2, n - 1))


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean and two-sided t-interval ``(mean, low, high)`` of independent runs; NaN bounds for n < 2.

    Example:
        >>> mean, low, high = t_interval([0.1, 0.2, 0.3])
        >>> round(mean, 3), round(high - mean, 3)
        (0.2, 0.248)
    """
    x = np.asarray(values, dtype=np.float64)
    if len(x) == 0:
        return math.nan, math.nan, math.nan
    mean = float(x.mean())
    if len(x) < 2:
        return mean, math.nan, math.nan
    half = t_quantile(len(x), level) * float(x.std(ddof=1)) / math.sqrt(len(x))
    return mean, mean - half, mean + half
