"""The CLI through Typer's CliRunner: routing, the four designs end to end, and error text."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import polars as pl
import pytest
from typer.testing import CliRunner

from convcg_cli.cli import app

runner = CliRunner()
DESIGNS = ["multihead_sequential", "multihead_parallel", "unified_sequential", "unified_parallel"]


def invoke(*args: str):
    return runner.invoke(app, list(args))


def test_help_lists_commands():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("data", "train", "eval"):
        assert command in result.output


def test_importing_the_cli_does_not_import_heavy_libraries():
    heavy = ("torch", "lightning", "mlflow", "polars")
    code = f"import sys, convcg_cli.cli; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("experiment", DESIGNS)
def test_design_trains_and_evaluates_from_the_cli(home, tiny_overrides, experiment):
    trained = invoke("train", f"+experiment={experiment}", *tiny_overrides)
    assert trained.exit_code == 0, trained.output
    run_id = trained.output.split("MLflow run id:")[1].split()[0]
    evaluated = invoke("eval", "--run", run_id, "--json")
    assert evaluated.exit_code == 0, evaluated.output
    metrics = json.loads(evaluated.output)
    assert metrics["run_id"] == run_id
    for task in ("conversion", "engagement"):
        for k in (10, 50, 100, 1000):
            assert 0.0 <= metrics[f"heldout/{task}/recall_at_{k}"] <= 1.0
            assert f"heldout/baseline_popularity/{task}/recall_at_{k}" in metrics
    assert any("/by_surface/" in name for name in metrics)


def test_eval_latest_prints_a_table(home, tiny_overrides):
    assert invoke("train", *tiny_overrides).exit_code == 0
    result = invoke("eval", "--run", "latest")
    assert result.exit_code == 0, result.output
    assert "recall@100" in result.output and "popularity" in result.output
    assert "Traceback" not in result.output


def test_data_synth_and_validate(tmp_path):
    out = tmp_path / "logs"
    made = invoke("data", "synth", "--preset", "tiny", "--seed", "1", "--out", str(out))
    assert made.exit_code == 0, made.output
    checked = invoke("data", "validate", str(out))
    assert checked.exit_code == 0 and "all tables valid" in checked.output


def test_unknown_preset(tmp_path):
    result = invoke("data", "synth", "--preset", "huge", "--out", str(tmp_path / "x"))
    assert result.exit_code == 2 and "Unknown preset 'huge'" in result.output
    assert not (tmp_path / "x").exists()


def _copy(tiny_data, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_data, bad)
    return bad


def test_missing_table_is_a_clear_error(home, tiny_data, tmp_path):
    bad = _copy(tiny_data, tmp_path)
    (bad / "items.parquet").unlink()
    for args in (("data", "validate", str(bad)), ("train", f"data.dir={bad}")):
        result = invoke(*args)
        assert result.exit_code == 2
        assert "items.parquet" in result.output and "Traceback" not in result.output
    assert not (home / "mlflow.db").exists()  # data are checked before any MLflow run is created


def test_wrong_column_type_names_file_column_and_expectation(tiny_data, tmp_path):
    bad = _copy(tiny_data, tmp_path)
    frame = pl.read_parquet(bad / "impressions.parquet")
    frame.with_columns(pl.col("clicked").cast(pl.String)).write_parquet(bad / "impressions.parquet")
    result = invoke("data", "validate", str(bad))
    assert result.exit_code == 2
    assert (
        "impressions.parquet" in result.output and "clicked" in result.output and "Boolean" in result.output
    )


def test_empty_heldout_split_is_a_clear_error(home, tiny_data, tmp_path, tiny_overrides):
    trained = invoke("train", *tiny_overrides)
    assert trained.exit_code == 0, trained.output
    bad = _copy(tiny_data, tmp_path)
    imp = pl.read_parquet(bad / "impressions.parquet")
    last_day = imp["timestamp"].max() // 86_400
    imp = imp.with_columns(
        converted=pl.when(pl.col("timestamp") // 86_400 >= last_day - 1)
        .then(False)
        .otherwise(pl.col("converted"))
    )
    imp.write_parquet(bad / "impressions.parquet")
    result = invoke("eval", "--run", "latest", f"data_dir={bad}")
    assert result.exit_code == 2
    assert "heldout split" in result.output and "0 conversions" in result.output


def test_unknown_run_id(home):
    result = invoke("eval", "--run", "0123456789abcdef")
    assert result.exit_code == 2
    assert "Run '0123456789abcdef' was not found" in result.output


def test_no_runs_yet(home):
    result = invoke("eval", "--run", "latest")
    assert result.exit_code == 2 and "No finished run" in result.output


def test_override_typo_and_missing_plus(home):
    typo = invoke("train", "trainer.max_epoch=2")
    assert typo.exit_code == 2 and "max_epoch" in typo.output and "Traceback" not in typo.output
    plus = invoke("train", "experiment=unified_parallel")
    assert plus.exit_code == 2 and "+experiment=NAME" in plus.output


def test_eval_on_logs_with_another_corpus_is_a_clear_error(home, tiny_data, tmp_path, tiny_overrides):
    assert invoke("train", *tiny_overrides).exit_code == 0
    other = _copy(tiny_data, tmp_path)
    items = pl.read_parquet(other / "items.parquet")
    extra = items.head(1).with_columns(
        item_id=pl.lit(items["item_id"].max() + 1, dtype=items["item_id"].dtype)
    )
    pl.concat([items, extra]).write_parquet(other / "items.parquet")
    result = invoke("eval", "--run", "latest", f"data_dir={other}")
    assert result.exit_code == 2, result.output
    assert "does not fit the model rebuilt" in result.output and "Traceback" not in result.output
