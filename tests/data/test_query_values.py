"""Conversion values travel with the evaluation positives; items new after the training window are marked."""

import numpy as np
import polars as pl

from convcg_cli.data.contract import load_tables
from convcg_cli.data.features.encodings import in_days
from convcg_cli.data.importing import synthesize
from convcg_cli.data.loading import InMemoryDataModule


def test_heldout_conversion_positives_carry_their_conversion_value(tmp_path):
    data = tmp_path / "delays"
    synthesize("tiny", data, seed=0, conversion_events=True)
    dm = InMemoryDataModule(str(data), val_days=2, heldout_days=2, batch_size=256)
    dm.setup("validate")
    queries = dm.queries["heldout"]
    rows = load_tables(data)["impressions"].filter(in_days(dm.split_days["heldout"]))
    converted = rows.filter(pl.col("converted"))
    values = queries.positive_values["conversion"]
    assert len(values) == len(queries.positives["conversion"][0]) == converted.height
    expected = converted["conversion_value"].cast(pl.Float64).fill_null(float("nan")).to_numpy()
    np.testing.assert_array_equal(values, expected)  # same rows, same order (NaN where unknown)
    assert np.nansum(values) > 0
    # Item positions of items with no training-window impression are the new (cold) items.
    np.testing.assert_array_equal(queries.new_items, dm.items.performance["impressions"].to_numpy() == 0)


def test_a_log_without_values_has_no_positive_values(tiny_dir):
    dm = InMemoryDataModule(str(tiny_dir), val_days=2, heldout_days=2, batch_size=256)
    dm.setup("validate")
    assert dm.queries["heldout"].positive_values == {}
