"""The popularity blend (convcg_cli/blend.py): the fallback of never-shown items, the choice on
validation, and the same blend in training's choice, ``convcg eval`` and the served model."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from convcg_cli.blend import BETA_METRIC, GAMMA_METRIC, blend_inputs, check_grid, choose_blend, with_bias
from convcg_cli.errors import ConfigError
from convcg_cli.metrics.prior import choose_prior_weight
from tests.conftest import TINY_TRAIN


def items_table(conversions, impressions, category, never_shown):
    return SimpleNamespace(
        performance=pl.DataFrame({"conversions": conversions, "impressions": impressions}),
        features={"category_id": np.asarray(category), "advertiser_id": np.zeros(len(category), np.int64)},
        never_shown=np.asarray(never_shown, bool),
    )


def test_fallback_is_the_category_popularity_of_never_shown_items_only():
    # Category 1: seen items sell 3 and 1 (mean 2); category 2: 0; category 3: only never-shown items.
    items = items_table(
        conversions=[3, 1, 0, 0, 0, 0, 0],
        impressions=[9, 9, 5, 0, 0, 0, 0],
        category=[1, 1, 2, 1, 2, 3, 1],
        never_shown=[0, 0, 0, 1, 1, 1, 0],  # the last: no impression but in the user history
    )
    inputs = blend_inputs(items)
    assert inputs.group == "category_id"
    # log1p(mean) scaled to max 1 over the groups: category 1 -> 1, others 0.
    np.testing.assert_allclose(inputs.fallback, [0, 0, 0, 1, 0, 0, 0])
    np.testing.assert_allclose(inputs.prior, np.log1p([3, 1, 0, 0, 0, 0, 0]) / np.log1p(3))
    np.testing.assert_allclose(inputs.group_fallback, [0, 1, 0, 0])


def test_the_group_is_the_advertiser_when_items_have_no_category():
    items = items_table([4, 0], [3, 0], [0, 0], [0, 1])
    del items.features["category_id"]
    items.features["advertiser_id"] = np.array([2, 2])
    inputs = blend_inputs(items)
    assert inputs.group == "advertiser_id"
    np.testing.assert_allclose(inputs.fallback, [0, 1])


def world(seed=0, n_items=300, n_queries=200, dim=8):
    rng = np.random.default_rng(seed)
    item_emb = rng.normal(size=(n_items, dim)).astype(np.float32)
    item_emb /= np.linalg.norm(item_emb, axis=1, keepdims=True)
    query_emb = rng.normal(size=(n_queries, dim)).astype(np.float32)
    query_emb /= np.linalg.norm(query_emb, axis=1, keepdims=True)
    return rng, query_emb, item_emb


def test_validation_picks_popularity_when_the_positives_are_the_popular_items():
    rng, query_emb, item_emb = world()
    conversions = rng.zipf(1.5, size=len(item_emb)).clip(max=500)
    popular = np.argsort(-conversions, kind="stable")[:20]
    query_index = np.arange(len(query_emb))
    positive = rng.choice(popular, size=len(query_emb))  # unrelated to the embeddings
    items = items_table(
        conversions, np.ones(len(item_emb)), np.ones(len(item_emb), np.int64), np.zeros(len(item_emb))
    )
    blend = choose_blend(
        query_emb, item_emb, blend_inputs(items), [0, 0.5, 100], [0], query_index, positive, 20
    )
    assert blend.beta == 100.0 and blend.recalls["100,0"] > blend.recalls["0,0"]


def test_validation_keeps_the_model_when_the_model_finds_the_positives():
    rng, query_emb, item_emb = world(1)
    positive = np.argmax(query_emb @ item_emb.T, axis=1)  # each query's own best item
    conversions = rng.zipf(1.5, size=len(item_emb)).clip(max=500)
    items = items_table(
        conversions, np.ones(len(item_emb)), np.ones(len(item_emb), np.int64), np.zeros(len(item_emb))
    )
    blend = choose_blend(
        query_emb,
        item_emb,
        blend_inputs(items),
        [0, 0.5, 100],
        [0, 1],
        np.arange(len(query_emb)),
        positive,
        1,
    )
    assert (blend.beta, blend.gamma) == (0.0, 0.0)
    assert blend.recalls["0,0"] == 1.0


def test_the_fallback_weight_is_chosen_when_positives_are_new_items_of_a_selling_category():
    rng, query_emb, item_emb = world(2, n_items=400)
    category = np.repeat([1, 2, 3, 4], 100)
    never_shown = np.zeros(400, bool)
    never_shown[::10] = True  # 40 new items, 10 per category
    conversions = np.where(never_shown, 0, np.where(category == 1, 5, 1))
    new_in_1 = np.flatnonzero(never_shown & (category == 1))
    positive = rng.choice(new_in_1, size=len(query_emb))
    items = items_table(conversions, (~never_shown).astype(int), category, never_shown)
    blend = choose_blend(
        query_emb,
        item_emb,
        blend_inputs(items),
        [0, 0.1],
        [0, 0.5, 10],
        np.arange(len(query_emb)),
        positive,
        10,
    )
    assert blend.gamma == 10.0
    assert blend.recalls[f"{blend.beta:g},10"] == 1.0  # the 10 new items of category 1 fill the top 10


def test_with_one_fallback_weight_the_choice_is_the_plain_search_over_betas():
    rng, query_emb, item_emb = world(3)
    conversions = rng.zipf(1.3, size=len(item_emb)).clip(max=1000)
    positive = rng.choice(np.argsort(-conversions)[:60], size=150)
    query_index = rng.integers(0, len(query_emb), size=150)
    betas = [0, 0.01, 0.05, 0.1, 0.3, 1.0]
    items = items_table(
        conversions, np.ones(len(item_emb)), np.ones(len(item_emb), np.int64), np.zeros(len(item_emb))
    )
    inputs = blend_inputs(items)
    blend = choose_blend(query_emb, item_emb, inputs, betas, [0], query_index, positive, 30)
    beta, recalls = choose_prior_weight(query_emb, item_emb, inputs.prior, betas, query_index, positive, 30)
    assert blend.beta == beta and blend.gamma == 0.0
    assert {float(k.split(",")[0]): v for k, v in blend.recalls.items()} == recalls


def test_with_bias_adds_the_bias_to_every_score():
    rng, query_emb, item_emb = world(4, n_items=5, n_queries=3)
    bias = rng.normal(size=5)
    q, i = with_bias(query_emb, item_emb, bias)
    np.testing.assert_allclose(q @ i.T, query_emb @ item_emb.T + bias[None, :], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("options", "message"),
    [({"betas": [0, -1]}, "finite and >= 0"), ({"betas": [1], "select_k": 0}, "select_k must be >= 1")],
)
def test_a_bad_grid_is_a_config_error(options, message):
    with pytest.raises(ConfigError, match=message):
        check_grid(options, "blend")


def test_training_chooses_the_blend_and_eval_scores_the_model_as_served(
    tiny_data, empty_mlflow_store, tmp_path, monkeypatch
):
    import shutil

    from convcg_cli import tracking
    from convcg_cli.cli import app

    shutil.copyfile(empty_mlflow_store, tmp_path / "mlflow.db")
    monkeypatch.setenv("CONVCG_HOME", str(tmp_path))
    runner = CliRunner()
    trained = runner.invoke(app, ["train", f"data.dir={tiny_data}", *TINY_TRAIN, "serve.log_model=false"])
    assert trained.exit_code == 0, trained.output
    assert "blend: validation chose beta=" in trained.output
    run_id = trained.output.split("MLflow run id:")[1].split()[0]
    store = tracking.Store(f"sqlite:///{tmp_path}/mlflow.db", "convcg")
    logged = store.client.get_run(run_id).data.metrics
    assert {BETA_METRIC, GAMMA_METRIC, "blend/val_recall_at_100", "blend/val_recall_at_100_unblended"} <= set(
        logged
    )
    assert logged["blend/val_recall_at_100"] >= logged["blend/val_recall_at_100_unblended"]

    common = ["eval", "--run", run_id, "--json", "bootstrap.n_boot=0", "baselines=[]", "by_surface=false"]
    served = runner.invoke(app, common)
    assert served.exit_code == 0, served.output
    metrics = json.loads(served.output.strip().splitlines()[-1])
    assert metrics["heldout/prior/beta"] == logged[BETA_METRIC]
    assert metrics["heldout/prior/fallback_weight"] == logged[GAMMA_METRIC]
    # Chosen again from the same grids on validation: the same weights and the same figures.
    again = runner.invoke(
        app,
        [
            *common,
            "popularity_prior.betas=[0,0.005,0.01,0.02,0.03,0.05,0.075,0.1,0.15,0.2,0.3,0.5,0.75,1,2,5,100]",
            "popularity_prior.fallback_weights=[0,0.02,0.05,0.1,0.2,0.5,1,2,5]",
        ],
    )
    assert again.exit_code == 0, again.output
    assert json.loads(again.output.strip().splitlines()[-1]) == metrics
