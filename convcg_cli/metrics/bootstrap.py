"""Confidence intervals for recall@k by resampling *users* (the unit that was sampled), not positives.

A user's held-out positives are correlated (same tastes, same session), so resampling positives one by
one would give intervals that are too narrow. Here each bootstrap replicate draws the evaluated users
with replacement and keeps all positives of every drawn user, then recomputes micro recall. Two
rankings of the same positives are compared on the SAME resamples (:func:`paired_bootstrap_diff`).

Every function takes and returns numpy arrays; nothing here knows about torch, MLflow or the config.
Metric names of the bounds are the recall metric's name plus :data:`CI_LOW` / :data:`CI_HIGH`, e.g.
``heldout/conversion/recall_at_100_ci_low``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from convcg_cli.index.checks import check_k

CI_LOW = "_ci_low"
CI_HIGH = "_ci_high"

# Bounds the (replicates x users) weight matrix built at a time to about 4M cells (32 MB).
_WEIGHT_CHUNK_CELLS = 1 << 22
# The draws of the last few (users, replicates, seed), one byte a count, kept for the next ranking
# scored on the same positives (the model, then each baseline, each cell of a grid): drawing them
# (numpy's multinomial, ~0.06 us a user a replicate) is most of a bootstrap's cost. At most 256 MiB.
_DRAW_CACHE_BYTES = 1 << 28
_draw_cache: OrderedDict[tuple[int, int, int], np.ndarray] = OrderedDict()


def ci_names(metric: str) -> tuple[str, str]:
    """Names of the lower and upper CI bound of ``metric``.

    Example:
        >>> ci_names("heldout/conversion/recall_at_100")
        ('heldout/conversion/recall_at_100_ci_low', 'heldout/conversion/recall_at_100_ci_high')
    """
    return f"{metric}{CI_LOW}", f"{metric}{CI_HIGH}"


def resampled_recall(hits: np.ndarray, user_of_positive: np.ndarray, user_weights: np.ndarray) -> np.ndarray:
    """Micro recall of weighted user resamples: row b counts user u ``user_weights[b, u]`` times.

    Args:
        hits: (P, K) bool hit flags per positive (e.g. from ``retrieval.positive_hits``).
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
    ks = _check_ks_match(ks, hits)
    _check_resampling(n_boot, level)
    hit_count, pos_count = _per_user_counts(hits, users)
    recalls = np.concatenate(
        [_weighted_recall(hit_count, pos_count, w) for w in _draws(len(pos_count), n_boot, seed)]
    )  # (n_boot, K); never NaN: every user has >= 1 positive and every replicate draws U users
    low, high = _percentile_interval(recalls, level)
    return {k: (float(lo), float(hi)) for k, lo, hi in zip(ks, low, high, strict=True)}


def resample_weights(n_users: int, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """The bootstrap draws of users: ``n_boot`` rows of multinomial counts, yielded in int64 chunks.

    Row b says how many times each of the ``n_users`` users (``np.unique`` order) is drawn in
    replicate b; every row sums to ``n_users``. The chunks come from one generator seeded with
    ``seed`` and bound the (chunk x users) matrix to about 4M cells, so the draws depend only on
    ``(n_users, n_boot, seed)``: every ranking scored on the same positives gets the same resamples.
    The draws of the last few such triples are kept (one byte a count, 256 MiB at most) and given
    again, chunk by chunk, to the next ranking that asks for them.

    Example:
        >>> w = np.concatenate(list(resample_weights(3, n_boot=4, seed=0)))
        >>> w.shape, w.sum(axis=1).tolist()
        ((4, 3), [3, 3, 3, 3])
    """
    for counts in _draws(n_users, n_boot, seed):
        yield counts.astype(np.int64, copy=False)


def _draws(n_users: int, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """:func:`resample_weights`' chunks as they are held: read-only uint8 views of the kept draws
    (not widened: :func:`_weighted_recall` reads them as they are), int64 when just drawn."""
    key = (int(n_users), int(n_boot), int(seed))
    chunk = max(1, _WEIGHT_CHUNK_CELLS // n_users)
    drawn = _draw_cache.get(key)
    if drawn is not None:  # the same draws, in the same chunks as when they were drawn
        _draw_cache.move_to_end(key)
        for start in range(0, key[1], chunk):
            yield drawn[start : start + chunk]
        return
    rng = np.random.default_rng(seed)
    uniform = np.full(n_users, 1.0 / n_users)
    kept = np.empty((key[1], key[0]), dtype=np.uint8) if key[0] * key[1] <= _DRAW_CACHE_BYTES else None
    for start in range(0, key[1], chunk):
        counts = rng.multinomial(n_users, uniform, size=min(chunk, n_boot - start))
        if kept is not None:
            if counts.max(initial=0) > np.iinfo(np.uint8).max:
                kept = None  # a count over 255 (a few users only): not kept
            else:
                kept[start : start + len(counts)] = counts
        yield counts
    if kept is not None:  # every chunk drawn (a consumer that stops early keeps nothing)
        kept.flags.writeable = False  # handed out as views: no consumer may change the draws
        _draw_cache[key] = kept
        while sum(a.nbytes for a in _draw_cache.values()) > _DRAW_CACHE_BYTES:
            _draw_cache.popitem(last=False)


@dataclass(frozen=True)
class PairedDifference:
    """Micro recall difference ``a - b`` at one cutoff, with its paired-bootstrap interval."""

    k: int
    difference: float
    low: float
    high: float

    @property
    def above_zero(self) -> bool:
        """Whether the whole interval lies above 0: ``a`` retrieves more positives than ``b``."""
        return self.low > 0.0


def paired_difference_replicates(
    hits_a: np.ndarray, hits_b: np.ndarray, user_of_positive: np.ndarray, user_weights: np.ndarray
) -> np.ndarray:
    """Recall of ``a`` minus recall of ``b`` on the same weighted user resamples.

    Args:
        hits_a, hits_b: (P, K) bool hit flags of two rankings on the same positives.
        user_of_positive: (P,) user of each positive.
        user_weights: (B, U) draws per user, users in ``np.unique`` order (see
            :func:`resample_weights`).

    Returns:
        (B, K) float64 differences, one row per resample.
    """
    count_a, count_b, pos_count = _paired_counts(hits_a, hits_b, user_of_positive)
    weights = np.asarray(user_weights, dtype=np.float64)
    return _weighted_recall(count_a, pos_count, weights) - _weighted_recall(count_b, pos_count, weights)


def paired_bootstrap_diff(
    hits_a: np.ndarray,
    hits_b: np.ndarray,
    user_of_positive: np.ndarray,
    ks: Sequence[int],
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[int, PairedDifference]:
    """Paired bootstrap of the recall difference ``a - b`` of two rankings of the same positives.

    Each replicate draws the users with replacement (all positives of a drawn user together, as
    :func:`bootstrap_recall_ci` does) and computes micro recall of BOTH rankings on that same
    resample, so what the two share (which users happen to be evaluated) cancels out of the
    difference. The interval is the percentile interval of the replicate differences.

    Args:
        hits_a, hits_b: (P, len(ks)) bool hit flags of the two rankings on the same positives.
        user_of_positive: (P,) user of each positive.
        ks: the cutoff of each column (keys of the result).
        n_boot, seed, level: replicates, seed of the draws, coverage of the interval.

    Returns:
        ``{k: PairedDifference}``; ``difference`` is the observed recall difference.

    Example:
        >>> a = np.array([[True], [True], [False], [True]])
        >>> b = np.array([[False], [True], [False], [False]])
        >>> d = paired_bootstrap_diff(a, b, np.array([0, 0, 1, 2]), ks=[10], n_boot=200)[10]
        >>> d.difference, bool(d.low <= 0.5 <= d.high)
        (0.5, True)
    """
    count_a, count_b, pos_count = _paired_counts(hits_a, hits_b, user_of_positive)
    ks = _check_ks_match(ks, count_a)
    _check_resampling(n_boot, level)
    diffs = np.concatenate(
        [
            _weighted_recall(count_a, pos_count, w) - _weighted_recall(count_b, pos_count, w)
            for w in _draws(len(pos_count), n_boot, seed)
        ]
    )  # (n_boot, K)
    observed = (count_a.sum(axis=0) - count_b.sum(axis=0)) / pos_count.sum()
    low, high = _percentile_interval(diffs, level)
    return {
        k: PairedDifference(k, float(observed[j]), float(low[j]), float(high[j])) for j, k in enumerate(ks)
    }


def _paired_counts(
    hits_a: np.ndarray, hits_b: np.ndarray, user_of_positive: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(U, K) hits of ``a`` and of ``b`` and (U,) positives per user, after checking both rankings."""
    a, users = _check_bootstrap_inputs(hits_a, user_of_positive)
    b, _ = _check_bootstrap_inputs(hits_b, user_of_positive)
    if a.shape != b.shape:
        raise ValueError(f"hits_a has shape {a.shape} but hits_b {b.shape}: not the same positives.")
    count_a, pos_count = _per_user_counts(a, users)
    count_b, _ = _per_user_counts(b, users)
    return count_a, count_b, pos_count


def _check_ks_match(ks: Sequence[int], hits: np.ndarray) -> list[int]:
    """``ks`` as ints, one per column of ``hits``, or ValueError."""
    ks = [check_k(k) for k in ks]
    if len(ks) != hits.shape[1]:
        raise ValueError(f"hits has {hits.shape[1]} columns but {len(ks)} ks were given.")
    return ks


def _check_resampling(n_boot: int, level: float) -> None:
    """ValueError unless ``n_boot`` is a positive integer and ``level`` lies in (0, 1)."""
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot!r}.")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}.")


def _percentile_interval(replicates: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """Two-sided percentile interval of (B, K) replicates: ((K,) low, (K,) high)."""
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(replicates, [tail, 100.0 - tail], axis=0)
    return low, high


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
    """(B, K) recall of (B, U) user-count resamples: one matrix product instead of a loop over positives.

    Integer ``weights`` (the draws) are summed with integers in a compiled pass that reads them as
    they are (:func:`~convcg_cli.metrics.kernels.weighted_counts`): the counts are integers, so the
    sums are the float64 product's exactly (it is exact below 2**53), without widening the draws to
    float64 first. Other weights: the float64 product."""
    if np.issubdtype(weights.dtype, np.integer):
        from convcg_cli.metrics.kernels import weighted_counts

        counts = np.concatenate([hit_count.T, pos_count[None, :]]).astype(np.int64)  # integer-valued
        sums = weighted_counts(weights, counts).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            return sums[:, :-1] / sums[:, -1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        return (weights @ hit_count) / (weights @ pos_count)[:, None]
