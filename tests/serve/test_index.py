"""``convcg index``: a new item table embedded by the trained item tower becomes the run's newest model;
trained items keep their embeddings, unseen ones are retrievable, removed ones are gone."""

from __future__ import annotations

import mlflow.pyfunc
import numpy as np
import pandas as pd
import polars as pl
from typer.testing import CliRunner

from convcg_cli.cli import app

runner = CliRunner()


def bundle_of(run_id: str):
    return mlflow.pyfunc.load_model(f"runs:/{run_id}/model").unwrap_python_model().model.bundle


def test_index_serves_a_new_item_table(served, tiny_data, tmp_path):
    _, run_id = served
    before = bundle_of(run_id)
    items = pl.read_parquet(tiny_data / "items.parquet").sort("item_id")
    unseen = items.head(3).with_columns(pl.col("item_id") + 10**9)  # new ids, known attributes
    table = pl.concat([items.slice(10), unseen])  # the first 10 items are withdrawn
    table.write_parquet(tmp_path / "new_items.parquet")
    try:
        result = runner.invoke(
            app, ["index", "--run", run_id, "--items", str(tmp_path / "new_items.parquet"), "--name", "fresh"]
        )
        assert result.exit_code == 0, result.output
        after = bundle_of(run_id)
        assert np.array_equal(after.item_ids, np.sort(table["item_id"].to_numpy()))
        kept = np.searchsorted(before.item_ids, after.item_ids[:-3])
        np.testing.assert_allclose(after.item_emb[:-3], before.item_emb[kept], rtol=1e-5, atol=1e-6)
        assert np.isfinite(after.item_emb[-3:]).all()
        # The blend: kept items keep their bias; a new item gets its category's fallback x the weight.
        np.testing.assert_array_equal(after.item_bias[:-3], before.item_bias[kept])
        table_of = np.asarray(before.blend["group_fallback"])
        group = before.blend["group"]
        assert group == "category_id"
        vocabulary = before.item_encoding.vocabularies[group]  # dense codes: 1.. in sorted order
        codes = np.searchsorted(vocabulary, unseen[group].to_numpy()) + 1
        np.testing.assert_allclose(after.item_bias[-3:], before.blend["gamma"] * table_of[codes], rtol=1e-6)
        requests = pd.DataFrame({"user_id": [1], "surface": ["home_feed"]})
        fresh = mlflow.pyfunc.load_model("models:/fresh/1")
        everything = fresh.predict(requests, params={"k": 1000})  # max_k: more than the corpus
        assert set(everything["item_id"]) == set(table["item_id"].to_list())
    finally:  # later tests serve the run's own corpus again
        assert runner.invoke(app, ["export", "--run", run_id]).exit_code == 0


def test_index_refuses_a_table_outside_the_contract(served, tmp_path):
    _, run_id = served
    pl.DataFrame({"item_id": [1, 1]}).write_parquet(tmp_path / "bad.parquet")
    result = runner.invoke(app, ["index", "--run", run_id, "--items", str(tmp_path / "bad.parquet")])
    assert result.exit_code == 2
    assert "violation" in result.output
