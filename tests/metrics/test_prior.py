"""The popularity prior coordinate: equal to adding beta * prior to every score, chosen on the given split."""

from __future__ import annotations

import numpy as np
import pytest

from convcg_cli.index import exact_topk
from convcg_cli.metrics.prior import choose_prior_weight, log_prior, with_item_prior
from convcg_cli.metrics.retrieval import recall_at_k


def test_extra_coordinate_adds_beta_times_prior_to_every_inner_product():
    rng = np.random.default_rng(0)
    q, i = rng.standard_normal((7, 4)).astype(np.float32), rng.standard_normal((11, 4)).astype(np.float32)
    prior = log_prior(rng.integers(0, 50, 11))
    q2, i2 = with_item_prior(q, i, prior, 0.7)
    np.testing.assert_allclose(q2 @ i2.T, q @ i.T + 0.7 * prior[None, :], rtol=1e-5, atol=1e-6)
    assert q2.shape == (7, 5) and i2.shape == (11, 5)


def test_log_prior_is_scaled_to_one_and_zero_stays_zero():
    assert log_prior(np.array([0, 0])).tolist() == [0.0, 0.0]
    p = log_prior(np.array([0, 3, 15]))
    assert p[0] == 0 and p[2] == pytest.approx(1.0) and 0 < p[1] < 1


def test_choose_prior_weight_takes_the_best_recall_and_the_smallest_on_ties():
    rng = np.random.default_rng(1)
    q, i = rng.standard_normal((40, 8)).astype(np.float32), rng.standard_normal((30, 8)).astype(np.float32)
    counts = np.zeros(30)
    counts[:3] = 100  # three popular items that every query's positive is
    query = np.arange(40)
    item = query % 3
    beta, tried = choose_prior_weight(q, i, log_prior(counts), [0.0, 0.5, 100.0, 50.0], query, item, k=3)
    assert beta == 50.0 and tried[50.0] == tried[100.0] == 1.0  # both rank the 3 popular items first
    _, topk = exact_topk(q, i, 3)
    assert tried[0.0] == pytest.approx(recall_at_k(topk, query, item, [3])[3])
    with pytest.raises(ValueError):
        choose_prior_weight(q, i, log_prior(counts), [], query, item, k=3)
