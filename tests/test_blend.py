"""The popularity blend (convcg_cli/blend.py): the fallback of never-shown items, the choice on
validation, and the same blend in training's choice, ``convcg eval`` and the served model."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from convcg_cli.blend import (
    BETA_METRIC,
    GAMMA_METRIC,
    blend_inputs,
    check_grid,
    choose_blend,
    item_bias,
    with_bias,
)
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


def _mixed_world(n_model: int, n_popular: int, seed: int = 5):
    """Queries whose positive is either their own best item (the model finds it) or a popular item
    unrelated to the embeddings (popularity finds it): the shares decide which blend wins."""
    rng, query_emb, item_emb = world(seed, n_queries=n_model + n_popular)
    conversions = rng.zipf(1.5, size=len(item_emb)).clip(max=500)
    popular = np.argsort(-conversions, kind="stable")[:5]
    own = np.argmax(query_emb @ item_emb.T, axis=1)
    positive = np.concatenate([own[:n_model], rng.choice(popular, size=n_popular)])
    items = items_table(
        conversions, np.ones(len(item_emb)), np.ones(len(item_emb), np.int64), np.zeros(len(item_emb))
    )
    return query_emb, item_emb, blend_inputs(items), positive


@pytest.mark.parametrize("margin_se", [0.0, 1.0, 1e6])
def test_the_best_blend_is_served_only_if_it_beats_popularity_by_the_margin(margin_se):
    from convcg_cli.blend import paired_se
    from convcg_cli.metrics.retrieval import positive_hits

    query_emb, item_emb, inputs, positive = _mixed_world(n_model=60, n_popular=140)
    queries = np.arange(len(query_emb))
    betas = [0, 0.05, 100]
    blend = choose_blend(query_emb, item_emb, inputs, betas, [0], queries, positive, 5, margin_se)
    plain = choose_blend(query_emb, item_emb, inputs, betas, [0], queries, positive, 5)
    assert plain.beta != 100.0  # the argmax is a blend that finds both kinds of positives
    # the margin rule, by hand: the paired standard error of the two rankings' hit flags
    flags = {}
    for beta in (plain.beta, 100.0):
        q, i = with_bias(query_emb, item_emb, item_bias(inputs, beta, 0.0))
        order = np.argsort(-(q @ i.T), axis=1, kind="stable")[:, :5]
        pair_query, hits = positive_hits(order, queries, positive, [5])
        flags[beta] = hits[:, 0]
    gap = flags[plain.beta].mean() - flags[100.0].mean()
    se = paired_se(flags[plain.beta], flags[100.0], pair_query)
    assert gap == pytest.approx(plain.recalls[f"{plain.beta:g},0"] - plain.recalls["100,0"])
    expected = plain.beta if gap > margin_se * se else 100.0
    assert blend.beta == expected
    if margin_se == 0.0:
        assert blend.beta == plain.beta
    if margin_se == 1e6:
        assert blend.beta == 100.0  # no validation gain is that large: popularity is served


@pytest.mark.parametrize(("n_model", "margin_se", "served"), [(1, 1.0, 100.0), (1, 0.0, 0.5), (2, 1.0, 0.5)])
def test_a_gain_of_one_positive_is_no_evidence_against_popularity(n_model, margin_se, served):
    """Planted: 5 popular items and 195 others, one-hot embeddings. 200 popular-led queries (zero
    query vectors: popularity's list at every beta) convert on the 5 popular items; ``n_model``
    queries convert on their own unpopular item, which only a blend with the model retrieves. The
    blend gains exactly n_model positives: one is within one standard error (1/N), two are not."""
    n_items, n_pop = 200, 200
    conversions = np.concatenate([[50, 40, 30, 20, 10], np.ones(n_items - 5)])
    item_emb = np.eye(n_items, dtype=np.float32)
    own = np.arange(5, 5 + n_model)
    query_emb = np.zeros((n_pop + n_model, n_items), np.float32)
    query_emb[np.arange(n_pop, n_pop + n_model), own] = 1.0
    positive = np.concatenate([np.arange(n_pop) % 5, own])
    items = items_table(conversions, np.ones(n_items), np.ones(n_items, np.int64), np.zeros(n_items))
    queries = np.arange(len(query_emb))
    blend = choose_blend(
        query_emb, item_emb, blend_inputs(items), [0.5, 100], [0], queries, positive, 5, margin_se
    )
    assert blend.recalls["0.5,0"] - blend.recalls["100,0"] == pytest.approx(n_model / len(positive))
    assert blend.beta == served
    assert blend.overruled_beta == (0.5 if served == 100.0 else None)  # what the train line names


def test_paired_se_is_the_cluster_robust_standard_error():
    from convcg_cli.blend import paired_se

    rng = np.random.default_rng(0)
    a, b = rng.random(300) < 0.4, rng.random(300) < 0.3
    cluster = rng.integers(0, 60, size=300)
    d = a.astype(float) - b.astype(float)
    sums = np.array([d[cluster == c].sum() for c in np.unique(cluster)])
    c = len(sums)
    expected = np.sqrt(c / (c - 1) * ((sums - sums.mean()) ** 2).sum()) / len(d)
    assert paired_se(a, b, cluster) == pytest.approx(expected)
    assert paired_se(a, a, cluster) == 0.0
    assert paired_se(a[:3], b[:3], np.zeros(3)) == 0.0  # one cluster: no variance to estimate
