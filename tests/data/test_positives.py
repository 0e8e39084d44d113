"""Dual positives: dwell-weighted clicks and saves join the conversion task with pinned weights."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

from convcg_cli.data.features import DualPositives, LabelPositives, click_dwell_weight
from convcg_cli.errors import ConfigError

ROWS = pl.DataFrame(
    {
        "clicked": [True, True, True, False, True],
        "dwell_seconds": [2.0, 60.0, 500.0, None, 30.0],
        "saved": [False, False, False, True, False],
        "converted": [False, False, False, False, True],
    }
)
TASKS = ["conversion", "engagement"]


def test_dwell_weight_formula_is_pinned():
    w = click_dwell_weight(np.array([2.0, 60.0, 120.0, 500.0]), t_max=120.0)
    expected = [math.log1p(2 / 120) / math.log(2), math.log1p(0.5) / math.log(2), 1.0, 1.0]
    assert w.tolist() == pytest.approx(expected, abs=1e-6)
    assert w.tolist() == pytest.approx([0.023847, 0.584963, 1.0, 1.0], abs=1e-6)


def test_bounce_click_weighs_less_than_a_long_one():
    for fn in ("identity", "sqrt", "square"):
        bounce, long = click_dwell_weight(np.array([3.0, 90.0]), t_max=120.0, fn=fn)
        assert bounce < long


def test_label_positives_are_the_labels():
    w = LabelPositives().weights(ROWS, TASKS)
    assert w["conversion"].tolist() == [0, 0, 0, 0, 1]
    assert w["engagement"].tolist() == [1, 1, 1, 1, 1]


def test_dual_positives_weights_are_exactly_as_configured():
    w = DualPositives(engagement_scale=0.2, dwell_t_max=120.0, dwell_fn="identity", save_weight=0.5)
    weights = w.weights(ROWS, TASKS)
    expected = [
        0.2 * 0.023847,
        0.2 * 0.584963,
        0.2 * 1.0,
        0.2 * 0.5,
        1.0,
    ]  # bounce, mid, long, save, conversion
    assert weights["conversion"].tolist() == pytest.approx(expected, abs=1e-6)
    assert weights["engagement"].tolist() == [1, 1, 1, 1, 1]  # the auxiliary task is unchanged


def test_dual_positives_validates_its_config():
    with pytest.raises(ConfigError, match="dwell function"):
        DualPositives(dwell_fn="cube")
    with pytest.raises(ConfigError, match="t_max"):
        DualPositives(dwell_t_max=0)


def test_value_positives_weigh_conversions_by_log_value():
    from convcg_cli.data.features import ValuePositives

    rows = pl.DataFrame(
        {
            "clicked": [True, True, True, True],
            "saved": [False] * 4,
            "converted": [True, True, True, False],
            "conversion_value": [np.e - 1, np.e**3 - 1, None, None],
        }
    )
    w = ValuePositives().weights(rows, ["conversion", "engagement"])
    np.testing.assert_allclose(w["conversion"], [0.5, 1.5, 1.0, 0.0], rtol=1e-6)
    assert w["engagement"].tolist() == [1.0] * 4
    without = rows.drop("conversion_value")
    assert ValuePositives().weights(without, ["conversion"])["conversion"].tolist() == [1.0, 1.0, 1.0, 0.0]
