"""Across-seed t-intervals."""

from __future__ import annotations

import math

import pytest

from convcg_cli.metrics.compare import t_interval


def test_t_interval():
    mean, low, high = t_interval([0.1, 0.2, 0.3])
    assert mean == pytest.approx(0.2)
    assert high - mean == pytest.approx(4.302653 * 0.1 / math.sqrt(3), rel=1e-6)
    assert low == pytest.approx(2 * mean - high)
    one = t_interval([0.4])
    assert one[0] == 0.4 and math.isnan(one[1]) and math.isnan(one[2])
    assert all(math.isnan(x) for x in t_interval([]))
