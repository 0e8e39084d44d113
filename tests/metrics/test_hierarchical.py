"""The two-level (seeds, then users) paired bootstrap of the pre-registered verdict."""

from __future__ import annotations

import numpy as np
import pytest

from convcg_cli.metrics.bootstrap import paired_bootstrap_diff
from convcg_cli.metrics.hierarchical import hierarchical_paired_diff


def flags(rng, n_seeds, n_pos, p):
    return rng.random((n_seeds, n_pos)) < np.asarray(p).reshape(-1, 1)


def test_identical_seeds_give_the_users_only_bootstrap():
    rng = np.random.default_rng(0)
    users = rng.integers(0, 80, size=300)
    a, b = flags(rng, 1, 300, [0.5]), flags(rng, 1, 300, [0.4])
    one = paired_bootstrap_diff(a.T, b.T, users, [100], n_boot=500, seed=3)[100]
    three = hierarchical_paired_diff(np.repeat(a, 3, 0), np.repeat(b, 3, 0), users, 100, n_boot=500, seed=3)
    assert (three.difference, three.low, three.high) == pytest.approx((one.difference, one.low, one.high))


def test_the_observed_difference_is_the_mean_of_the_seeds_differences():
    users = np.array([0, 0, 1, 2, 3])
    a = np.array([[1, 1, 0, 0, 1], [1, 0, 0, 0, 0]], bool)  # recall 3/5 and 1/5
    b = np.zeros((2, 5), bool)
    d = hierarchical_paired_diff(a, b, users, 10, n_boot=100)
    assert d.difference == pytest.approx((3 / 5 + 1 / 5) / 2)


def test_disagreeing_seeds_widen_the_interval():
    rng = np.random.default_rng(1)
    users = rng.integers(0, 400, size=2000)
    b = np.repeat(flags(rng, 1, 2000, [0.40]), 3, 0)
    same = np.repeat(flags(rng, 1, 2000, [0.45]), 3, 0)
    spread = flags(rng, 3, 2000, [0.35, 0.45, 0.55])  # the same mean lead, training noise added
    narrow = hierarchical_paired_diff(same, b, users, 100, n_boot=400, seed=0)
    wide = hierarchical_paired_diff(spread, b, users, 100, n_boot=400, seed=0)
    assert wide.high - wide.low > 2 * (narrow.high - narrow.low)
    # The users-only interval of the seeds' mean would hide the training noise.
    assert narrow.low > 0 and not wide.above_zero


def test_seed_draws_are_uniform_over_the_seeds():
    # Seed s leads by exactly s/10 on every user, so a replicate is the mean of the drawn seeds' leads:
    # over many replicates its mean is the mean lead and its spread that of a mean of 4 uniform draws.
    n_pos, n_seeds = 400, 4
    users = np.arange(n_pos)
    a = np.zeros((n_seeds, n_pos), bool)
    for s in range(n_seeds):
        a[s, : n_pos * s // 10] = True
    b = np.zeros_like(a)
    d = hierarchical_paired_diff(a, b, users, 10, n_boot=4000, seed=0, level=0.5)
    leads = np.arange(n_seeds) / 10
    sd_of_mean = leads.std() / np.sqrt(n_seeds)
    # The central 50% of a near-normal replicate distribution: +-0.674 sd around the mean.
    assert d.low == pytest.approx(leads.mean() - 0.674 * sd_of_mean, abs=0.01)
    assert d.high == pytest.approx(leads.mean() + 0.674 * sd_of_mean, abs=0.01)


@pytest.mark.parametrize(
    ("a", "b", "users", "message"),
    [
        (np.ones((2, 3), bool), np.ones((1, 3), bool), np.arange(3), "seeds, positives"),
        (np.ones((2, 3), bool), np.ones((2, 3), bool), np.arange(2), "user_of_positive"),
    ],
)
def test_mismatched_inputs_are_refused(a, b, users, message):
    with pytest.raises(ValueError, match=message):
        hierarchical_paired_diff(a, b, users, 10, n_boot=10)


def _brute_force_replicate(a, b, users, drawn_users, drawn_seeds) -> float:
    """One replicate the slow way: the drawn users' positives listed out (a user drawn twice lists
    its positives twice), each drawn seed's micro-recall difference on them, averaged."""
    positives = [p for u in drawn_users for p in np.flatnonzero(users == u)]
    per_seed = [(a[s, positives].sum() - b[s, positives].sum()) / len(positives) for s in drawn_seeds]
    return float(np.mean(per_seed))


def test_equals_a_brute_force_loop_with_the_same_draws():
    """Replicate by replicate, with the same user and seed draws, a plain loop over drawn users and
    seeds gives the same interval (the vectorised counts are the definition's arithmetic)."""
    from convcg_cli.metrics.bootstrap import resample_weights

    rng = np.random.default_rng(11)
    n_seeds, n_pos, n_boot, seed = 3, 40, 300, 7
    users = rng.integers(0, 12, n_pos)
    a, b = flags(rng, n_seeds, n_pos, [0.6, 0.4, 0.5]), flags(rng, n_seeds, n_pos, 0.4)
    got = hierarchical_paired_diff(a, b, users, 100, n_boot=n_boot, seed=seed)

    unique = np.unique(users)
    seed_rng = np.random.default_rng([seed, n_seeds])
    replicates = []
    for weights in resample_weights(len(unique), n_boot, seed):
        seed_draws = seed_rng.integers(0, n_seeds, size=(len(weights), n_seeds))
        for counts, drawn_seeds in zip(weights, seed_draws, strict=True):
            drawn_users = np.repeat(unique, counts)
            replicates.append(_brute_force_replicate(a, b, users, drawn_users, drawn_seeds))
    low, high = np.percentile(replicates, [2.5, 97.5])
    observed = np.mean([(a[s].sum() - b[s].sum()) / n_pos for s in range(n_seeds)])
    assert got.difference == pytest.approx(observed, abs=1e-12)
    assert (got.low, got.high) == pytest.approx((low, high), abs=1e-12)


def test_agrees_with_an_independent_brute_force_bootstrap():
    """Drawn its own way (seeds, then users, each with replacement, from another generator), a plain
    loop's interval matches the function's within Monte Carlo error."""
    rng = np.random.default_rng(3)
    n_seeds, n_pos, n_boot = 3, 60, 4000
    users = rng.integers(0, 25, n_pos)
    a, b = flags(rng, n_seeds, n_pos, [0.7, 0.45, 0.55]), flags(rng, n_seeds, n_pos, 0.45)
    got = hierarchical_paired_diff(a, b, users, 100, n_boot=n_boot, seed=0)
    unique = np.unique(users)
    draws = np.random.default_rng(99)
    replicates = [
        _brute_force_replicate(a, b, users, draws.choice(unique, len(unique)), draws.choice(n_seeds, n_seeds))
        for _ in range(n_boot)
    ]
    low, high = np.percentile(replicates, [2.5, 97.5])
    assert abs(got.low - low) < 0.015 and abs(got.high - high) < 0.015
