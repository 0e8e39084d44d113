"""The CLI through Typer's CliRunner: routing and arguments (train/evaluate mocked), one design end to
end in the fast suite (the other three: ``slow``), and the error text for bad input."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from convcg_cli.cli import app
from convcg_cli.errors import ConvcgError
from convcg_cli.evaluate import EvalResult
from convcg_cli.train import TrainResult
from tests.conftest import TINY_TRAIN, runs_in

runner = CliRunner()
DESIGNS = ["multihead_sequential", "multihead_parallel", "unified_sequential", "unified_parallel"]
# unified_parallel (the default design) end to end in the fast suite; every design composes and
# instantiates in test_config.py and trains a few steps in test_train.py.
DESIGN_CASES = [pytest.param(d, marks=[] if d == "unified_parallel" else [pytest.mark.slow]) for d in DESIGNS]


def invoke(*args: str):
    return runner.invoke(app, list(args))


@pytest.fixture(scope="module")
def trained_home(tiny_data, empty_mlflow_store, tmp_path_factory) -> Path:
    """A convcg home holding one tiny run trained through the CLI, shared by the tests that only
    evaluate a trained run (they may log evaluation metrics into it, nothing else)."""
    home = tmp_path_factory.mktemp("trained_home")
    shutil.copyfile(empty_mlflow_store, home / "mlflow.db")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CONVCG_HOME", str(home))
        result = invoke("train", f"data.dir={tiny_data}", *TINY_TRAIN)
    assert result.exit_code == 0, result.output
    return home


@pytest.fixture
def trained(trained_home, monkeypatch) -> Path:
    """``trained_home`` as this test's convcg home."""
    monkeypatch.setenv("CONVCG_HOME", str(trained_home))
    return trained_home


def test_help_lists_commands():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("data", "train", "eval"):
        assert command in result.output


@pytest.mark.parametrize(
    "module, heavy",
    [
        ("convcg_cli.cli", ("torch", "lightning", "mlflow", "polars", "numba")),
        # grids load and reports are written without the training stack (e.g. --report-only)
        ("convcg_cli.ablate", ("torch", "lightning", "mlflow")),
        # the compiled loops (numba) load when a search or an ItemCF first runs, not on import
        ("convcg_cli.index", ("numba", "torch", "faiss")),
        ("convcg_cli.baselines", ("numba",)),
        ("convcg_cli.metrics.retrieval", ("numba",)),  # recall's scan and the bootstrap's sums too
        ("convcg_cli.metrics.bootstrap", ("numba",)),
    ],
)
def test_importing_the_cli_does_not_import_heavy_libraries(module, heavy):
    code = f"import sys, {module}; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("experiment", DESIGN_CASES)
def test_design_trains_and_evaluates_from_the_cli(home, tiny_overrides, experiment):
    trained = invoke("train", f"+experiment={experiment}", *tiny_overrides)
    assert trained.exit_code == 0, trained.output
    run_id = trained.output.split("MLflow run id:")[1].split()[0]
    evaluated = invoke("eval", "--run", run_id, "--json")
    assert evaluated.exit_code == 0, evaluated.output
    metrics = json.loads(evaluated.stdout)
    assert metrics["run_id"] == run_id
    for task in ("conversion", "engagement"):
        for k in (10, 50, 100, 1000):
            assert 0.0 <= metrics[f"heldout/{task}/recall_at_{k}"] <= 1.0
            assert f"heldout/baseline_popularity/{task}/recall_at_{k}" in metrics
    assert any("/by_surface/" in name for name in metrics)


def test_eval_latest_prints_a_table(trained):
    result = invoke("eval", "--run", "latest")
    assert result.exit_code == 0, result.output
    assert "recall@100" in result.output and "popularity" in result.output
    assert "Traceback" not in result.output


def test_train_passes_overrides_to_train_and_prints_the_run(home, monkeypatch):
    seen = []

    def fake_train(composed):
        seen.append(composed)
        return TrainResult("run123", home / "model.ckpt", {"val/conversion/recall_at_100": 0.25})

    monkeypatch.setattr("convcg_cli.train.train", fake_train)
    overrides = ["+experiment=unified_sequential", "seed=5", "loss.task_weights.engagement=0.7"]
    result = invoke("train", *overrides)
    assert result.exit_code == 0, result.output
    (composed,) = seen
    assert composed.overrides == overrides and composed.choices["experiment"] == "unified_sequential"
    assert composed.cfg.seed == 5 and composed.cfg.loss.task_weights.engagement == 0.7
    assert "MLflow run id: run123" in result.output
    assert "two-tower" in result.output and "0.2500" in result.output


def test_eval_passes_run_and_overrides_and_prints_json_or_a_table(home, monkeypatch):
    metrics = {
        "heldout/conversion/recall_at_100": 0.5,
        "heldout/conversion/recall_at_100_ci_low": 0.4,
        "heldout/baseline_popularity/conversion/recall_at_100": 0.25,
        "heldout/by_surface/search/conversion/recall_at_100": 0.9,
    }
    calls = []

    def fake_evaluate(composed, run):
        calls.append((run, composed.cfg.split, list(composed.cfg.ks)))
        return EvalResult("run123", composed.cfg.split, metrics)

    monkeypatch.setattr("convcg_cli.evaluate.evaluate", fake_evaluate)
    as_json = invoke("eval", "--run", "abc", "--json", "split=val", "ks=[100]")
    assert as_json.exit_code == 0, as_json.output
    assert json.loads(as_json.output) == {"run_id": "run123", **metrics}
    table = invoke("eval")
    assert table.exit_code == 0, table.output
    assert calls == [("abc", "val", [100]), ("latest", "heldout", [10, 50, 100, 1000])]
    assert "heldout evaluation of run run123" in table.output and "recall@100" in table.output
    assert "two-tower" in table.output and "0.5000" in table.output
    assert "popularity" in table.output and "0.2500" in table.output
    assert "0.9000" not in table.output and "0.4000" not in table.output  # per surface, CI: MLflow only


def test_eval_table_prints_the_confidence_intervals_it_computed(home, monkeypatch):
    metrics = {
        "heldout/conversion/recall_at_100": 0.5,
        "heldout/conversion/recall_at_100_ci_low": 0.4125,
        "heldout/conversion/recall_at_100_ci_high": 0.5875,
        "heldout/baseline_popularity/conversion/recall_at_100": 0.25,
    }
    monkeypatch.setattr(
        "convcg_cli.evaluate.evaluate", lambda composed, run: EvalResult("run123", "heldout", metrics)
    )
    result = invoke("eval")
    assert result.exit_code == 0, result.output
    assert "0.5000 [0.4125, 0.5875]" in " ".join(result.output.split())
    assert "0.2500" in result.output  # no bounds computed: the value alone


def test_an_error_in_train_or_eval_is_a_message_and_exit_code_not_a_traceback(home, monkeypatch):
    def refuse(*args, **kwargs):
        raise ConvcgError("the logs have no conversions")

    monkeypatch.setattr("convcg_cli.train.train", refuse)
    monkeypatch.setattr("convcg_cli.evaluate.evaluate", refuse)
    for args in (("train",), ("eval", "--run", "abc")):
        result = invoke(*args)
        assert result.exit_code == 2, result.output
        assert "Error: the logs have no conversions" in result.output and "Traceback" not in result.output


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
        assert "Error executing job" not in result.output  # convcg's message alone, not Hydra's line too
    assert runs_in(home) == []  # data are checked before any MLflow run is created


def test_wrong_column_type_names_file_column_and_expectation(tiny_data, tmp_path):
    bad = _copy(tiny_data, tmp_path)
    frame = pl.read_parquet(bad / "impressions.parquet")
    frame.with_columns(pl.col("clicked").cast(pl.String)).write_parquet(bad / "impressions.parquet")
    result = invoke("data", "validate", str(bad))
    assert result.exit_code == 2
    assert (
        "impressions.parquet" in result.output and "clicked" in result.output and "Boolean" in result.output
    )


def test_empty_heldout_split_is_a_clear_error(trained, tiny_data, tmp_path):
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
    assert result.exit_code == 2 and "are not the data run" in result.output  # other bytes: asked for?
    result = invoke("eval", "--run", "latest", f"data_dir={bad}", "allow_other_data=true")
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


def test_eval_on_logs_with_another_corpus_is_a_clear_error(trained, tiny_data, tmp_path):
    other = _copy(tiny_data, tmp_path)
    items = pl.read_parquet(other / "items.parquet")
    extra = items.head(1).with_columns(
        item_id=pl.lit(items["item_id"].max() + 1, dtype=items["item_id"].dtype)
    )
    pl.concat([items, extra]).write_parquet(other / "items.parquet")
    result = invoke("eval", "--run", "latest", f"data_dir={other}", "baselines=[]", "allow_other_data=true")
    assert result.exit_code == 2, result.output
    assert "does not fit the model rebuilt" in result.output and "Traceback" not in result.output


def test_eval_with_the_popularity_prior_and_the_blend_baseline(trained):
    import json

    result = invoke(
        "eval",
        "--run",
        "latest",
        "--json",
        "popularity_prior.betas=[0,0.1,0.5]",
        "bootstrap.n_boot=0",
        "baselines=[popularity,ease_popularity]",
        "by_surface=false",
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output.strip().splitlines()[-1])
    assert metrics["heldout/prior/beta"] in (0.0, 0.1, 0.5)
    assert 0 <= metrics["heldout/baseline_ease_popularity/conversion/recall_at_100"] <= 1
    assert 0 <= metrics["heldout/conversion/recall_at_100"] <= 1


def test_the_recall_table_says_which_rows_are_items_never_shown_and_keeps_its_headers_in_80_columns(
    monkeypatch,
):
    from rich.console import Console

    from convcg_cli import cli

    metrics = {}
    for k in (10, 50, 100, 1000):
        for prefix in ("heldout", "heldout/baseline_ease"):
            metrics[f"{prefix}/conversion/recall_at_{k}"] = 0.5
            metrics[f"{prefix}/conversion/recall_at_{k}_ci_low"] = 0.4125
            metrics[f"{prefix}/conversion/recall_at_{k}_ci_high"] = 0.5875
            metrics[f"{prefix}/conversion/cold/recall_at_{k}"] = 0.25
    assert cli.metric_rows(metrics)[("conversion (items never shown)", "two-tower")][100] == "0.2500"
    assert cli.metric_rows(metrics)[("conversion (items never shown)", "ease")][10] == "0.2500"
    assert set(cli.metric_rows(metrics)) == {
        ("conversion", "two-tower"),
        ("conversion", "ease"),
        ("conversion (items never shown)", "two-tower"),
        ("conversion (items never shown)", "ease"),
    }
    console = Console(width=80, record=True, file=io.StringIO())
    monkeypatch.setattr(cli, "out", console)
    cli._print_metrics("heldout evaluation of run r1", metrics)
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    header = next(line for line in text.splitlines() if "recall@10 " in line)
    assert all(f"recall@{k}" in header for k in (10, 50, 100, 1000)) and "…" not in text
    assert "cold" not in text and "(items" in text


def test_the_ui_hint_names_the_mlflow_of_this_installation(tmp_path):
    from convcg_cli.cli import ui_command
    from convcg_cli.resources import mlflow_command

    scripts, elsewhere = tmp_path / "venv bin", tmp_path / "other"
    for folder in (scripts, elsewhere):
        folder.mkdir()
        (folder / "mlflow").write_text("#!/bin/sh\n")
        (folder / "mlflow").chmod(0o755)
    python = str(scripts / "python")
    assert mlflow_command(python, path=str(scripts)) == "mlflow"  # PATH finds this very one
    assert mlflow_command(python, path=str(elsewhere)) == f"'{scripts / 'mlflow'}'"  # another: this one
    assert mlflow_command(python, path="") == f"'{scripts / 'mlflow'}'"
    assert mlflow_command(str(tmp_path / "python"), path=str(elsewhere)) == "mlflow"  # a wheel's, on PATH
    assert mlflow_command(str(tmp_path / "python"), path="") == f"{tmp_path / 'python'} -m mlflow"
    assert ui_command("sqlite:////tmp/a/mlflow.db").endswith(
        " ui --backend-store-uri sqlite:////tmp/a/mlflow.db"
    )
    assert not ui_command("sqlite:////x.db").startswith(".venv/")
