"""A paired comparison whose interval holds training randomness too: a two-level bootstrap.

The per-seed paired bootstrap (:func:`~convcg_cli.metrics.bootstrap.paired_bootstrap_diff`) resamples
users only: several seeds of one grid share the users, the baselines and the draws, so "CI > 0 on 3 of
3 seeds" are not three independent replications and none of the intervals varies the training. Here
one replicate first draws the training seeds with replacement, then the users with replacement (all
positives of a drawn user together, the same draw for every seed of the replicate), and takes the
mean over the drawn seeds of the micro-recall difference on the drawn users. The observed value is
the mean over seeds of each seed's difference. With one seed it is the users-only bootstrap.
"""

from __future__ import annotations

import numpy as np

from convcg_cli.metrics.bootstrap import (
    PairedDifference,
    _check_resampling,
    _per_user_counts,
    _percentile_interval,
    resample_weights,
)


def hierarchical_paired_diff(
    hits_a: np.ndarray,
    hits_b: np.ndarray,
    user_of_positive: np.ndarray,
    k: int,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> PairedDifference:
    """Two-level (seeds, then users) paired bootstrap of the recall difference ``a - b`` at ``k``.

    Args:
        hits_a, hits_b: (S, P) bool hit flags of the two rankings, one row per training seed, on the
            same P positives (an untrained baseline repeats its one row S times).
        user_of_positive: (P,) user of each positive.
        k: the cutoff the flags are at (kept in the result).
        n_boot, seed, level: replicates, seed of the draws, coverage of the percentile interval.

    Example:
        >>> a = np.array([[1, 1, 0, 1], [1, 0, 0, 1]], bool)
        >>> b = np.array([[0, 1, 0, 0], [0, 1, 0, 0]], bool)
        >>> d = hierarchical_paired_diff(a, b, np.array([0, 0, 1, 2]), k=10, n_boot=200)
        >>> d.difference, bool(d.low <= d.difference <= d.high)
        (0.375, True)
    """
    a, b = np.asarray(hits_a), np.asarray(hits_b)
    if a.ndim != 2 or a.shape != b.shape or a.dtype != bool or b.dtype != bool:
        raise ValueError(
            f"hits_a and hits_b must be (seeds, positives) bool arrays, got {a.shape} and {b.shape}."
        )
    users = np.asarray(user_of_positive)
    if users.shape != (a.shape[1],):
        raise ValueError(f"user_of_positive has shape {users.shape}, expected ({a.shape[1]},).")
    if a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError("need at least one seed and one positive.")
    _check_resampling(n_boot, level)
    # (U, S): each seed's hits per user minus the other ranking's; (U,) positives per user.
    hits_per_user, pos_count = _per_user_counts(a.T, users)
    diff_count = hits_per_user - _per_user_counts(b.T, users)[0]
    n_seeds = a.shape[0]
    rng = np.random.default_rng([seed, n_seeds])
    replicates = []
    for weights in resample_weights(len(pos_count), n_boot, seed):  # (chunk, U) user draws
        per_seed = (weights @ diff_count) / (weights @ pos_count)[:, None]  # (chunk, S)
        drawn = rng.integers(0, n_seeds, size=(len(weights), n_seeds))  # (chunk, S) seed draws
        replicates.append(np.take_along_axis(per_seed, drawn, axis=1).mean(axis=1))
    observed = float((diff_count.sum(axis=0) / pos_count.sum()).mean())
    low, high = _percentile_interval(np.concatenate(replicates)[:, None], level)
    return PairedDifference(int(k), observed, float(low[0]), float(high[0]))
