"""The popularity prior's arithmetic pinned against hand-computed values (``make mutate``)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from convcg_cli.metrics.prior import choose_prior_weight, log_prior, with_item_prior


def test_log_prior_is_log1p_over_its_maximum_with_negative_counts_as_zero():
    got = log_prior(np.array([-3, 0, 1, 3, 7]))
    np.testing.assert_allclose(got, [0.0, 0.0, math.log(2) / math.log(8), math.log(4) / math.log(8), 1.0])
    # A maximum below 1 (one conversion at most) still scales to exactly 1.
    np.testing.assert_allclose(log_prior(np.array([0, 1, 1])), [0.0, 1.0, 1.0])
    assert log_prior(np.array([-2.0, 0.0])).tolist() == [0.0, 0.0] and log_prior(np.zeros(0)).size == 0


def test_the_prior_coordinate_is_beta_times_the_prior():
    q, i = with_item_prior(
        np.array([[2.0, 0.5]]), np.array([[1.0, 1.0], [0.0, 4.0]]), np.array([0.25, 1.0]), 3.0
    )
    assert q.tolist() == [[2.0, 0.5, 1.0]] and i.tolist() == [[1.0, 1.0, 0.75], [0.0, 4.0, 3.0]]
    assert q.dtype == i.dtype == np.float32


def test_choose_prior_weight_returns_every_recall_and_refuses_no_betas():
    q = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    items = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]], dtype=np.float32)
    prior = np.array([0.0, 0.0, 1.0])
    # Query 0 wants item 0, query 1 item 2 (the popular one, never its best match without a prior).
    beta, tried = choose_prior_weight(
        q, items, prior, [5.0, 0.0, 0.6], np.array([0, 1]), np.array([0, 2]), k=1
    )
    assert tried == {0.0: 0.5, 0.6: 0.5, 5.0: 0.5}
    assert beta == 0.0  # all equal: the smallest
    beta, tried = choose_prior_weight(q, items, prior, [0.0, 1.5], np.array([0, 1]), np.array([2, 2]), k=1)
    assert (beta, tried) == (1.5, {0.0: 0.0, 1.5: 1.0})
    with pytest.raises(ValueError, match="at least one"):
        choose_prior_weight(q, items, prior, [], np.array([0]), np.array([0]), k=1)
