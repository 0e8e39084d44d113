"""``convcg tune``: search files, Hydra sweep syntax -> Optuna distributions, the kept checkpoint's
validation objective, the best trial's experiment file, and a study end to end (resumed, nested runs)."""

from __future__ import annotations

import importlib.util

import pytest
from typer.testing import CliRunner

from convcg_cli import tune
from convcg_cli.cli import app
from convcg_cli.config import compose
from convcg_cli.errors import ConfigError
from tests.conftest import runs_in

needs_optuna = pytest.mark.skipif(
    importlib.util.find_spec("optuna") is None,
    reason="Optuna is the [tune] extra: pip install 'convcg[tune]'",
)
runner = CliRunner()


@needs_optuna
@pytest.mark.parametrize("name", tune.available_searches())
def test_every_shipped_search_loads_and_its_params_parse(name):
    search = tune.load_search(name)
    assert search.optimized_metric.startswith(("val/", "blend/val_"))
    assert set(tune.distributions(search.params)) == set(search.params)
    compose("train", list(search.overrides))


def test_a_search_refuses_an_objective_that_is_not_a_validation_metric():
    spec = {"optimized_metric": "heldout/conversion/recall_at_100", "params": {"seed": "choice(1,2)"}}
    with pytest.raises(ConfigError, match="must be a validation metric"):
        tune.search_from_spec("bad", spec)
    with pytest.raises(ConfigError, match="unknown keys: \\['trials'\\]"):
        tune.search_from_spec("bad", {**spec, "optimized_metric": "val/x", "trials": 3})


@needs_optuna
def test_hydra_sweep_syntax_becomes_optuna_distributions():
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    dists = tune.distributions(
        {
            "a": "choice(0.1, 1.0)",
            "b": "range(1, 8, 3)",
            "c": "interval(0.5, 2.0)",
            "d": "tag(log, interval(0.001, 0.1))",
            "e": "int(interval(2, 9))",
        }
    )
    assert dists["a"] == CategoricalDistribution([0.1, 1.0])
    assert dists["b"] == IntDistribution(1, 7, step=3)  # Hydra's range excludes its end: 1, 4, 7
    assert dists["c"] == FloatDistribution(0.5, 2.0)
    assert dists["d"] == FloatDistribution(0.001, 0.1, log=True)
    assert dists["e"] == IntDistribution(2, 9)
    with pytest.raises(ConfigError, match="not a sweep"):
        tune.distributions({"seed": "3"})


def test_the_best_trials_overrides_become_an_experiment_file():
    overrides = [
        "+experiment=unified_parallel",
        "model/cross=sequential",
        "seed=3",
        "+trainer.limit_train_batches=4",
    ]
    text = tune.experiment_yaml(overrides, compose("train", overrides), ["convcg train +experiment=tuned/x"])
    lines = text.splitlines()
    assert lines[:2] == ["# @package _global_", "# convcg train +experiment=tuned/x"]
    assert "- /experiment/unified_parallel" in text and "- override /model/cross: sequential" in text
    assert "seed: 3" in text and "limit_train_batches: 4" in text


@needs_optuna
@pytest.mark.slow  # ~10 s: Optuna's and MLflow's stores are created, one model trains
def test_tune_runs_trials_as_children_of_one_parent_and_writes_a_trainable_experiment(home, tiny_overrides):
    result = runner.invoke(app, ["tune", "smoke", "--n-trials", "1", *tiny_overrides])
    assert result.exit_code == 0, result.output
    assert "1 trials finished" in result.output
    tuned = home / "conf" / "experiment" / "tuned" / "smoke.yaml"
    assert tuned.is_file() and (home / "tune" / "optuna.db").is_file()
    assert f"Train it: convcg train --config-dir {home / 'conf'} +experiment=tuned/smoke" in result.output
    runs = runs_in(home)
    (parent,) = [r for r in runs if "tune/best_value" in r.data.metrics]
    (child,) = [r for r in runs if r is not parent]
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert child.data.tags["tune"] == "smoke" and child.data.tags["trial"] == "0"
    assert parent.data.tags["best_run_id"] == child.info.run_id
    # one epoch: the kept checkpoint's validation value is the run's only one
    assert parent.data.metrics["tune/best_value"] == child.data.metrics["val/conversion/recall_at_100"]


@needs_optuna
@pytest.mark.slow
def test_a_3_trial_study_resumes_and_its_best_experiment_trains(home, tiny_overrides):
    first = runner.invoke(app, ["tune", "smoke", "--n-trials", "2", *tiny_overrides])
    assert first.exit_code == 0, first.output
    resumed = runner.invoke(app, ["tune", "smoke", *tiny_overrides])  # the search's 3 trials in all
    assert resumed.exit_code == 0, resumed.output
    assert "3 trials finished" in resumed.output and "Trial 2:" in resumed.output
    parent_ids = {
        line.split()[-1] for line in (first.output + resumed.output).splitlines() if "parent run id" in line
    }
    assert len(parent_ids) == 1
    (parent_id,) = parent_ids
    children = [r for r in runs_in(home) if r.data.tags.get("mlflow.parentRunId") == parent_id]
    assert sorted(r.data.tags["trial"] for r in children) == ["0", "1", "2"]
    trained = runner.invoke(app, ["train", "--config-dir", str(home / "conf"), "+experiment=tuned/smoke"])
    assert trained.exit_code == 0, trained.output
    best = max(r.data.metrics["val/conversion/recall_at_100"] for r in children)
    assert f"{best:.4f}" in resumed.output


@needs_optuna
@pytest.mark.slow  # 4 tiny trainings
def test_the_levers_search_tries_every_combination_and_keeps_the_best_served_validation_figure(
    home, tiny_overrides
):
    search = tune.load_search("levers")
    assert search.optimized_metric == "blend/val_recall_at_100"  # the model as served, on validation
    result = runner.invoke(app, ["tune", "levers", *tiny_overrides])
    assert result.exit_code == 0, result.output
    runs = runs_in(home)
    (parent,) = [r for r in runs if "tune/best_value" in r.data.metrics]
    children = [r for r in runs if r is not parent]
    tried = {(c.data.params.get("levers"), c.data.params.get("data.random_negatives")) for c in children}
    assert len(children) == 4 and len(tried) == 4  # the grid, each combination once
    best = max(c.data.metrics["blend/val_recall_at_100"] for c in children)
    assert parent.data.metrics["tune/best_value"] == best
    tuned = (home / "conf" / "experiment" / "tuned" / "levers.yaml").read_text()
    assert "override /levers:" in tuned
