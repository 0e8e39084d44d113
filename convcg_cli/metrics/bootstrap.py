"""Confidence intervals for recall@k by resampling *users* (the unit that was sampled), not positives.

A user's held-out positives are correlated (same tastes, same session), so resampling positives one by
one would give intervals that are too narrow. Here each bootstrap replicate draws the evaluated users
with replacement and keeps all positives of every drawn user, then recomputes micro recall.

Every function takes and returns numpy arrays; nothing here knows about torch, MLflow or the config.
Metric names of the bounds are the recall metric's name plus :data:`CI_LOW` / :data:`CI_HIGH`, e.g.
``heldout/conversion/recall_at_100_ci_low``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from convcg_cli.metrics.retrieval import _check_k, _check_recall_inputs, _first_hit_rank

CI_LOW = "_ci_low"
CI_HIGH = "_ci_high"

# Bounds the (replicates x users) weight matrix built at a time to about 4M cells (32 MB).
_WEIGHT_CHUNK_CELLS = 1 << 22


def ci_names(metric: str) -> tuple[str, str]:
    """Names of the lower and upper CI bound of ``metric``.

    Example:
        >>> ci_names("heldout/conversion/recall_at_100")
        ('heldout/conversion/recall_at_100_ci_low', 'heldout/conversion/recall_at_100_ci_high')
    """
    return f"{metric}{CI_LOW}", f"{metric}{CI_HIGH}"


def positive_hits(
    topk_ids: np.ndarray, query_index: np.ndarray, positive_item: np.ndarray, ks: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Per-positive hit flags: was each held-out positive in its query's top k, for every k.

    Positives are deduplicated exactly as :func:`~convcg_cli.metrics.retrieval.recall_at_k` does
    (each unique (query, item) pair counts once), so ``hits.mean(axis=0)`` equals its recall values.

    Args:
        topk_ids: (Q, K) ranked item ids per query (best first); ``-1`` padding is never a hit.
        query_index: (P,) row of ``topk_ids`` each positive belongs to.
        positive_item: (P,) item id of each positive, >= 0.
        ks: cutoffs.

    Returns:
        ``(pair_query, hits)``: (P',) query index of each unique positive and (P', len(ks)) bool,
        ``hits[p, j]`` true when positive ``p`` is ranked within the first ``ks[j]``.

    Example:
        >>> topk = np.array([[3, 1], [0, 2]])
        >>> q, hits = positive_hits(topk, np.array([0, 0, 1]), np.array([1, 4, 0]), ks=[1, 2])
        >>> q.tolist(), hits.tolist()
        ([0, 0, 1], [[False, True], [False, False], [True, True]])
    """
    ks = [_check_k(k) for k in ks]
    topk_ids, query_index, positive_item = _check_recall_inputs(topk_ids, query_index, positive_item)
    pairs = np.unique(np.stack([query_index, positive_item], axis=1), axis=0)  # (P', 2)
    rank = _first_hit_rank(topk_ids, pairs[:, 0], pairs[:, 1])  # (P',)
    return pairs[:, 0], rank[:, None] < np.asarray(ks)[None, :]


def resampled_recall(hits: np.ndarray, user_of_positive: np.ndarray, user_weights: np.ndarray) -> np.ndarray:
    """Micro recall of weighted user resamples: row b counts user u ``user_weights[b, u]`` times.

    Args:
        hits: (P, K) bool hit flags per positive (e.g. from :func:`positive_hits`).
        user_of_positive: (P,) user of each positive; any values ``np.unique`` can sort.
        user_weights: (B, U) non-negative counts per resample, users in ``np.unique`` order.

    Returns:
        (B, K) float64 recall of every resample; NaN for a resample with no positive at all.
    """
    hit_count, pos_count = _per_user_counts(*_check_bootstrap_inputs(hits, user_of_positive))
    user_weights = np.asarray(user_weights, dtype=np.float64)
    if user_weights.ndim != 2 or user_weights.shape[1] != len(pos_count):
        raise ValueError(f"user_weights must have shape (B, {len(pos_count)}), got {user_weights.shape}.")
    return _weighted_recall(hit_count, pos_count, user_weights)


def bootstrap_recall_ci(
    hits: np.ndarray,
    user_of_positive: np.ndarray,
    ks: Sequence[int],
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[int, tuple[float, float]]:
    """Percentile bootstrap CI of micro recall@k, resampling users with replacement.

    Each replicate draws U users out of the U evaluated users with replacement (multinomial counts)
    and keeps all positives of each drawn user. Replicates are generated in chunks from one seeded
    generator, so the result depends only on the inputs, ``n_boot`` and ``seed``; two models scored
    on the same positives get the same resamples (paired comparison).

    Args:
        hits: (P, len(ks)) bool, ``hits[p, j]``: positive p retrieved within ``ks[j]``.
        user_of_positive: (P,) user of each positive (ids or codes).
        ks: the cutoff of each column of ``hits`` (keys of the result).
        n_boot: number of bootstrap replicates, >= 1.
        seed: seed of the resampling.
        level: coverage of the interval, in (0, 1).

    Returns:
        ``{k: (low, high)}``.

    Example:
        >>> hits = np.array([[True], [False], [True], [True]])
        >>> ci = bootstrap_recall_ci(hits, np.array([0, 0, 1, 2]), ks=[10], n_boot=200)
        >>> low, high = ci[10]
        >>> bool(0.0 <= low <= 0.75 <= high <= 1.0)
        True
    """
    hits, users = _check_bootstrap_inputs(hits, user_of_positive)
    ks = [_check_k(k) for k in ks]
    if len(ks) != hits.shape[1]:
        raise ValueError(f"hits has {hits.shape[1]} columns but {len(ks)} ks were given.")
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot!r}.")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}.")
    hit_count, pos_count = _per_user_counts(hits, users)
    n_users = len(pos_count)
    rng = np.random.default_rng(seed)
    uniform = np.full(n_users, 1.0 / n_users)
    chunk = max(1, _WEIGHT_CHUNK_CELLS // n_users)
    recalls = np.concatenate(
        [
            _weighted_recall(
                hit_count, pos_count, rng.multinomial(n_users, uniform, size=min(chunk, n_boot - start))
            )
            for start in range(0, int(n_boot), chunk)
        ]
    )  # (n_boot, K); never NaN: every user has >= 1 positive and every replicate draws U users
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(recalls, [tail, 100.0 - tail], axis=0)
    return {k: (float(lo), float(hi)) for k, lo, hi in zip(ks, low, high, strict=True)}


def _check_bootstrap_inputs(hits: np.ndarray, user_of_positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``hits`` as (P, K) float64 0/1 and ``user_of_positive`` as (P,), or ValueError."""
    hits = np.asarray(hits)
    users = np.asarray(user_of_positive)
    if hits.ndim != 2 or hits.dtype != bool:
        raise ValueError(f"hits must be a 2-D bool array (positives x ks), got {hits.dtype} {hits.shape}.")
    if users.shape != (hits.shape[0],):
        raise ValueError(f"user_of_positive has shape {users.shape}, expected ({hits.shape[0]},).")
    if hits.shape[0] == 0:
        raise ValueError("No positives: recall and its CI are undefined.")
    return hits.astype(np.float64), users


def _per_user_counts(hits: np.ndarray, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(U, K) hits and (U,) positives per user, users in ``np.unique`` order."""
    _, code = np.unique(users, return_inverse=True)
    n_users = int(code.max()) + 1
    hit_count = np.stack(
        [np.bincount(code, weights=hits[:, j], minlength=n_users) for j in range(hits.shape[1])], axis=1
    )
    return hit_count, np.bincount(code, minlength=n_users).astype(np.float64)


def _weighted_recall(hit_count: np.ndarray, pos_count: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(B, K) recall of (B, U) user-count resamples: one matrix product instead of a loop over positives."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return (weights @ hit_count) / (weights @ pos_count)[:, None]
