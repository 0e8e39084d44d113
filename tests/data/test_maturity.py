"""Label maturity: conversions that arrive after the training cut-off never leak into training."""

import numpy as np
import polars as pl

from convcg_cli.data.importing import (
    DropImmature,
    IgnoreMaturity,
    WeightByDelay,
    delay_cdf_weights,
    synthesize,
)
from convcg_cli.data.loading import InMemoryDataModule

D = 86_400
CUTOFF = 20 * D


def _rows() -> pl.DataFrame:
    """Four clicked, converted impressions: mature+arrived, immature+arrived, immature+late, mature+late."""
    return pl.DataFrame(
        {
            "timestamp": [5 * D, 18 * D, 19 * D, 10 * D],
            "clicked": [True] * 4,
            "converted": [True] * 4,
            "conversion_value": [1.0, 2.0, 3.0, 4.0],
            "conversion_delay_seconds": [D, D // 2, 2 * D, 11 * D],
        }
    )


def test_ignore_keeps_every_label():
    rows = _rows()
    assert IgnoreMaturity().training_rows(rows, CUTOFF).equals(rows)
    assert IgnoreMaturity().conversion_weights(rows, CUTOFF).tolist() == [1.0] * 4


def test_drop_keeps_only_arrived_conversions_of_closed_windows():
    policy = DropImmature(window_days=7)
    known = policy.training_rows(_rows(), CUTOFF)
    assert known["converted"].to_list() == [True, True, False, False]  # 19d + 2d and 10d + 11d >= 20d
    assert known["conversion_value"].to_list() == [1.0, 2.0, None, None]
    assert policy.conversion_weights(known, CUTOFF).tolist() == [1.0, 0.0, 0.0, 1.0]
    assert policy.evaluation_rows(_rows())["converted"].to_list() == [True, True, True, False]


def test_weight_corrects_recent_conversions_by_the_delay_cdf():
    policy = WeightByDelay(window_days=7, max_weight=10)
    known = policy.training_rows(_rows(), CUTOFF)
    # Matured conversions: only row 0 (delay 1 day), so F(e) = 1 for e >= 1 day, 0 below (capped at 10).
    assert policy.conversion_weights(known, CUTOFF).tolist() == [1.0, 1.0, 1.0, 1.0]
    earlier = known.with_columns(pl.Series("timestamp", [5 * D, CUTOFF - D // 2, 19 * D, 10 * D]))
    assert policy.conversion_weights(earlier, CUTOFF).tolist() == [1.0, 10.0, 1.0, 1.0]


def test_delay_cdf_weights_against_hand_computed_values():
    delays = np.array([0, 10, 10, 30])
    w = delay_cdf_weights(delays, np.array([5, 10, 29, 40, 5]), np.array([True] * 4 + [False]), 10.0)
    np.testing.assert_allclose(w, [4.0, 4 / 3, 4 / 3, 1.0, 1.0], rtol=1e-6)
    assert delay_cdf_weights(np.array([]), np.array([1]), np.array([True]), 10.0).tolist() == [1.0]


def test_a_conversion_arriving_after_the_cutoff_never_reaches_training(tmp_path):
    data = tmp_path / "delays"
    synthesize("tiny", data, seed=0, conversion_events=True)
    options = dict(val_days=2, heldout_days=2, batch_size=256, seed=0)
    ignore = InMemoryDataModule(str(data), **options)
    drop = InMemoryDataModule(str(data), label_maturity=DropImmature(7), **options)
    ignore.setup("fit")
    drop.setup("fit")
    cutoff = drop.split_days["val"][0] * D
    from convcg_cli.data.contract import load_tables

    imp = load_tables(data)["impressions"]
    late = imp.filter(
        pl.col("converted")
        & (pl.col("timestamp") < cutoff)
        & (pl.col("timestamp") + pl.col("conversion_delay_seconds") >= cutoff)
    )
    assert late.height > 0  # the tiny log has conversions that arrive after the cut-off
    train_conversions = {
        name: float(dm.train_set.weights["conversion"].sum())
        for name, dm in (("ignore", ignore), ("drop", drop))
    }
    assert train_conversions["drop"] < train_conversions["ignore"] - late.height + 1
    # Item performance features count only conversions known at the cut-off.
    perf = drop.items.performance["conversions"].sum()
    assert perf == ignore.items.performance["conversions"].sum() - late.height
    # The held-out labels are the same: attribution kept only conversions inside the window.
    assert len(drop.queries["heldout"].positives["conversion"][0]) == len(
        ignore.queries["heldout"].positives["conversion"][0]
    )


def test_streamed_data_refuses_maturity_policies(tmp_path):
    import pytest

    from convcg_cli.data.loading import StreamedDataModule
    from convcg_cli.errors import ConfigError

    with pytest.raises(
        ConfigError, match="label_maturity=drop\\|weight is not available with data/stream=streamed"
    ):
        StreamedDataModule(str(tmp_path), label_maturity=WeightByDelay())
