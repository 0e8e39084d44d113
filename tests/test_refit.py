"""The refit of a chosen configuration (``data.train_through_val``): the validation days join the
training window of the model and of the baselines, nothing is chosen or scored on them afterwards."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from convcg_cli.baselines import training_history
from convcg_cli.builders import build_datamodule
from convcg_cli.cli import app
from convcg_cli.config import compose
from convcg_cli.data.contract import load_tables
from convcg_cli.data.features import encodings as F
from convcg_cli.errors import ConfigError
from convcg_cli.evaluate import check_refit_evaluation
from tests.conftest import TINY_SPLIT

TASKS = ["conversion", "engagement"]


def _dm(tiny_data, *overrides: str):
    cfg = compose("train", [f"data.dir={tiny_data}", TINY_SPLIT, *overrides]).cfg
    return build_datamodule(cfg, TASKS, stage="fit")


def test_the_validation_days_join_the_training_window(tiny_data):
    plain, refit = _dm(tiny_data), _dm(tiny_data, "data.train_through_val=true")
    assert plain.split_days == refit.split_days  # the split is the same; only the window grows
    assert refit.training_days() == (plain.split_days["train"][0], plain.split_days["val"][1])
    assert refit.cutoff() == plain.split_days["heldout"][0] * F.SECONDS_PER_DAY
    impressions = load_tables(tiny_data)["impressions"]
    split = F.split_by_time(impressions, plain.val_days, plain.heldout_days)
    engaged = [F.engaged_rows(frame, TASKS).height for frame in (split.train, split.val)]
    assert len(plain.train_set.item_pos) == engaged[0]
    assert len(refit.train_set.item_pos) == sum(engaged)
    # item performance counts the validation days' impressions too
    shown = [plain.items.performance["impressions"].sum(), refit.items.performance["impressions"].sum()]
    assert shown[1] - shown[0] == split.val.height


def test_the_baselines_refit_on_the_same_days_and_tune_nothing_on_them(tiny_data):
    plain, refit = _dm(tiny_data), _dm(tiny_data, "data.train_through_val=true")
    before, after = training_history(plain), training_history(refit)
    impressions = load_tables(tiny_data)["impressions"]
    val = F.engaged_rows(F.split_by_time(impressions, plain.val_days, plain.heldout_days).val, TASKS)
    assert len(after.user_pos) == len(before.user_pos) + val.height
    assert before.validation is not None and after.validation is None
    assert after.conversions.sum() > before.conversions.sum()


def test_a_refit_evaluation_takes_the_validation_choices_as_given():
    cfg = compose("eval", ["baselines=[popularity,ease_popularity]"]).cfg
    cfg.popularity_prior.betas = [0.0, 0.1]
    with pytest.raises(ConfigError, match=r"popularity_prior.betas=\[0.0\]"):
        check_refit_evaluation(cfg, "r1")
    cfg.popularity_prior.betas = [0.1]
    with pytest.raises(ConfigError, match="ease_popularity.weights"):
        check_refit_evaluation(cfg, "r1")
    cfg.baseline_options.ease_popularity.weights = [0.3]
    check_refit_evaluation(cfg, "r1")
    cfg.split = "val"
    with pytest.raises(ConfigError, match="training data"):
        check_refit_evaluation(cfg, "r1")


def test_a_refit_trains_without_validation_and_evaluates_on_the_heldout_days(home, tiny_overrides):
    runner = CliRunner()
    trained = runner.invoke(app, ["train", "data.train_through_val=true", *tiny_overrides])
    assert trained.exit_code == 0, trained.output
    assert "ran no validation" in trained.output
    run_id = trained.output.split("MLflow run id:")[1].split()[0]
    chosen = ["popularity_prior.betas=[0.05]", "baseline_options.ease_popularity.weights=[0.3]"]
    refused = runner.invoke(app, ["eval", "--run", run_id, "popularity_prior.betas=[0,0.05]"])
    assert refused.exit_code == 2 and "train_through_val" in refused.output
    evaluated = runner.invoke(app, ["eval", "--run", run_id, "--json", *chosen])
    assert evaluated.exit_code == 0, evaluated.output
    metrics = json.loads(evaluated.stdout)
    assert metrics["heldout/prior/beta"] == 0.05
    assert 0.0 <= metrics["heldout/conversion/recall_at_100"] <= 1.0
    assert not any(name.startswith("val/") for name in metrics)
