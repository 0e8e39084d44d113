"""The bootstrap's draws and bounds pinned against independent references (``make mutate``).

The references never call the module's own draw helper: each user must be drawn with probability
1/U (a chi-square test on the draw counts at a fixed seed, and the CI of a one-user-hits case against
exact binomial quantiles from scipy), and the interval boundaries are checked at their edges.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from convcg_cli.metrics import bootstrap
from convcg_cli.metrics.bootstrap import (
    PairedDifference,
    bootstrap_recall_ci,
    paired_bootstrap_diff,
    resample_weights,
    resampled_recall,
)


@pytest.mark.parametrize("chunk_cells", [1 << 22, 35])  # one chunk; chunks of 3 replicates (ragged end)
def test_every_user_is_drawn_with_probability_one_over_n(monkeypatch, chunk_cells):
    monkeypatch.setattr(bootstrap, "_WEIGHT_CHUNK_CELLS", chunk_cells)
    n_users, n_boot = 10, 2000
    w = np.concatenate(list(resample_weights(n_users, n_boot=n_boot, seed=0)))
    assert w.shape == (n_boot, n_users) and (w.sum(axis=1) == n_users).all()
    # Under 1/n every user is drawn n_boot times in expectation: a goodness-of-fit test of the totals.
    totals = w.sum(axis=0)
    assert stats.chisquare(totals, np.full(n_users, n_boot)).pvalue > 0.001
    # Each user's count in a replicate is Binomial(n, 1/n): mean 1, variance 1 - 1/n.
    np.testing.assert_allclose(w.mean(axis=0), 1.0, atol=0.1)
    np.testing.assert_allclose(w.var(axis=0), 1 - 1 / n_users, atol=0.15)


def test_the_ci_of_one_hitting_user_is_the_binomial_quantiles():
    # Ten users with one positive each; only the last user (in np.unique order) is ever a hit. A
    # replicate's recall is (draws of that user) / 10, with draws ~ Binomial(10, 1/10).
    users = np.array([3, 7, 8, 10, 11, 20, 30, 40, 50, 99])
    hits = (users == 99)[:, None]
    low, high = bootstrap_recall_ci(hits, users, [5], n_boot=4000, seed=1)[5]
    binom = stats.binom(10, 0.1)
    assert (low, high) == (binom.ppf(0.025) / 10, binom.ppf(0.975) / 10) == (0.0, 0.3)
    # At level 0.5: the quartiles of the same distribution.
    low, high = bootstrap_recall_ci(hits, users, [5], n_boot=4000, seed=1, level=0.5)[5]
    assert (low, high) == (binom.ppf(0.25) / 10, binom.ppf(0.75) / 10) == (0.0, 0.2)


def test_above_zero_needs_the_lower_bound_strictly_above_zero():
    assert not PairedDifference(10, 0.1, 0.0, 0.2).above_zero
    assert PairedDifference(10, 0.1, 1e-12, 0.2).above_zero
    assert not PairedDifference(10, 0.0, -1e-12, 0.2).above_zero
    assert PairedDifference(10, 0.5, 0.5, 0.9).above_zero


@pytest.mark.parametrize("level", [0.0, 1.0, -0.1, 1.5])
def test_a_level_outside_the_open_unit_interval_is_rejected(level):
    hits, users = np.array([[True], [False]]), np.array([0, 1])
    with pytest.raises(ValueError, match="level must lie in"):
        bootstrap_recall_ci(hits, users, [10], level=level)
    with pytest.raises(ValueError, match="level must lie in"):
        paired_bootstrap_diff(hits, hits, users, [10], level=level)


@pytest.mark.parametrize("n_boot", [0, -3, True, 2.0])
def test_n_boot_must_be_a_positive_integer(n_boot):
    hits, users = np.array([[True], [False]]), np.array([0, 1])
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_recall_ci(hits, users, [10], n_boot=n_boot)
    with pytest.raises(ValueError, match="n_boot"):
        paired_bootstrap_diff(hits, hits, users, [10], n_boot=n_boot)


def test_one_replicate_and_a_tiny_level_are_accepted():
    hits, users = np.array([[True], [False], [True]]), np.array([0, 0, 1])
    low, high = bootstrap_recall_ci(hits, users, [1], n_boot=1, level=1e-9, seed=2)[1]
    assert low == high and low in (0.5, 1.0, 2 / 3)  # the one replicate's recall
    d = paired_bootstrap_diff(hits, ~hits, users, [1], n_boot=np.int64(1), level=0.999)[1]
    assert d.low == d.high


def test_resampled_recall_is_hits_over_positives_of_the_weighted_users():
    hits = np.array([[True, True], [False, True], [True, False], [False, False]])
    users = np.array(["b", "a", "b", "c"])  # np.unique order: a, b, c
    weights = np.array([[1, 1, 1], [0, 2, 0], [3, 0, 0], [0, 0, 2], [0, 0, 0]])
    got = resampled_recall(hits, users, weights)
    # a: 1 positive (hits 0/1), b: 2 positives (hits 2/1), c: 1 positive (hits 0/0).
    np.testing.assert_allclose(got[:4], [[2 / 4, 2 / 4], [4 / 4, 2 / 4], [0.0, 1.0], [0.0, 0.0]])
    assert np.isnan(got[4]).all()  # no positive drawn at all
    with pytest.raises(ValueError, match="user_weights must have shape"):
        resampled_recall(hits, users, weights[:, :2])
    with pytest.raises(ValueError, match="user_weights must have shape"):
        resampled_recall(hits, users, weights[0])


def test_paired_difference_is_pinned_on_a_small_example():
    a = np.array([[True, True], [True, False], [False, True], [True, True]])
    b = np.array([[False, True], [True, True], [False, False], [False, False]])
    users = np.array([0, 0, 1, 2])
    result = paired_bootstrap_diff(a, b, users, [1, 5], n_boot=300, seed=5)
    assert result[1].difference == pytest.approx(0.5) and result[5].difference == pytest.approx(0.25)
    assert result[1].low <= 0.5 <= result[1].high and result[1].k == 1
    with pytest.raises(ValueError, match="2 columns but 1 ks"):
        paired_bootstrap_diff(a, b, users, [1])
