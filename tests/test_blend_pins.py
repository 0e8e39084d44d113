"""The popularity blend's arithmetic pinned against references computed here (``make mutate``).

The bias of every (beta, gamma), the fallback of groups without a seen item, the grid checks at their
boundaries, the coordinate search against a brute-force recall loop, and what is read back from a
run: no training, no MLflow store (stand-ins for the model, the datamodule and the tracking calls).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest

from convcg_cli import blend as B
from convcg_cli.blend import Blend, BlendInputs, blend_inputs, check_grid, choose_blend, item_bias
from convcg_cli.errors import ConfigError


def _items(conversions, category, never_shown):
    return SimpleNamespace(
        performance=pl.DataFrame({"conversions": conversions}),
        features={"category_id": np.asarray(category)},
        never_shown=None if never_shown is None else np.asarray(never_shown, bool),
    )


def _inputs(n: int = 6) -> BlendInputs:
    prior = np.linspace(0.0, 1.0, n)
    fallback = np.where(np.arange(n) % 3 == 0, 0.5, 0.0)
    return BlendInputs(prior, fallback, "category_id", np.array([0.0, 0.5]))


def test_the_bias_is_beta_times_prior_plus_gamma_times_fallback():
    inputs = _inputs()
    got = item_bias(inputs, 2.0, 3.0)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, 2.0 * inputs.prior + 3.0 * inputs.fallback, rtol=1e-6)
    np.testing.assert_allclose(
        Blend(0.5, 4.0, inputs).bias, 0.5 * inputs.prior + 4.0 * inputs.fallback, rtol=1e-6
    )


def test_a_blend_is_off_only_when_both_weights_are_zero():
    inputs = _inputs()
    assert Blend(0.0, 0.0, inputs).is_off
    assert not Blend(0.0, 1.0, inputs).is_off and not Blend(1.0, 0.0, inputs).is_off
    assert not Blend(1.0, 1.0, inputs).is_off


def test_logged_metrics_are_the_weights_and_the_recalls_with_and_without_the_blend():
    inputs = _inputs()
    chosen = Blend(0.5, 2.0, inputs, select_k=7, recalls={"0,0": 0.25, "0.5,2": 0.75, "1,0": 0.5})
    assert chosen.metrics() == {
        B.BETA_METRIC: 0.5,
        B.GAMMA_METRIC: 2.0,
        "blend/val_recall_at_7": 0.75,
        "blend/val_recall_at_7_unblended": 0.25,
    }
    no_raw = Blend(1.0, 0.0, inputs, select_k=3, recalls={"1,0": 0.5, "0,1": 0.1})
    assert no_raw.metrics() == {B.BETA_METRIC: 1.0, B.GAMMA_METRIC: 0.0, "blend/val_recall_at_3": 0.5}
    assert Blend(1.0, 0.0, inputs).metrics() == {B.BETA_METRIC: 1.0, B.GAMMA_METRIC: 0.0}
    assert Blend(1.0, 0.0, inputs).meta() == {
        "beta": 1.0,
        "gamma": 0.0,
        "group": "category_id",
        "group_fallback": [0.0, 0.5],
    }


def test_the_fallback_of_a_group_without_seen_items_is_zero():
    # Group 0: seen items sell 4 and 2 (mean 3); group 2: only never-shown items; group 3: mean 1.
    items = _items([4, 2, 0, 0, 1, 0], [0, 0, 2, 0, 3, 3], [0, 0, 1, 1, 0, 1])
    inputs = blend_inputs(items)
    expected_groups = np.log1p([3.0, 0.0, 0.0, 1.0]) / np.log1p(3.0)
    np.testing.assert_allclose(inputs.group_fallback, expected_groups)
    np.testing.assert_allclose(inputs.fallback, [0, 0, 0, 1, 0, expected_groups[3]])
    # Nothing marked never shown: no fallback anywhere.
    plain = blend_inputs(_items([4, 2, 0], [0, 1, 1], None))
    assert plain.fallback.tolist() == [0.0, 0.0, 0.0]
    np.testing.assert_allclose(plain.group_fallback, [1.0, np.log1p(1.0) / np.log1p(4.0)])
    # One value per group code that occurs, no more.
    assert blend_inputs(_items([2, 0], [0, 0], [0, 1])).group_fallback.tolist() == [1.0]


def test_grid_checks_at_their_boundaries():
    assert check_grid({"betas": [0.5, 0.0, 0.5]}, "blend") == ([0.0, 0.5], [0.0], 100)
    assert check_grid({"betas": [1], "fallback_weights": [2, 0], "select_k": 1}, "b") == (
        [1.0],
        [0.0, 2.0],
        1,
    )
    assert check_grid({}, "blend") == ([], [0.0], 100)
    for bad in ([float("nan")], [float("inf")], [-0.5]):
        with pytest.raises(ConfigError, match="finite and >= 0"):
            check_grid({"betas": [1], "fallback_weights": bad}, "blend")


def _brute_recall(query_emb, item_emb, bias, query_index, positive, k):
    scores = query_emb @ item_emb.T + bias[None, :]
    pairs = set(zip(query_index.tolist(), positive.tolist(), strict=True))
    top = {
        q: set(sorted(range(scores.shape[1]), key=lambda j, q=q: (-scores[q, j], j))[:k]) for q, _ in pairs
    }
    return sum(i in top[q] for q, i in pairs) / len(pairs)


@pytest.mark.parametrize("seed", range(3))
def test_choose_blend_is_the_coordinate_search_over_brute_force_recalls(seed):
    rng = np.random.default_rng(seed)
    n_items, n_queries = 40, 30
    item_emb = rng.normal(size=(n_items, 4)).astype(np.float32)
    query_emb = rng.normal(size=(n_queries, 4)).astype(np.float32)
    inputs = BlendInputs(
        rng.random(n_items), np.where(rng.random(n_items) < 0.2, 1.0, 0.0), "category_id", np.zeros(1)
    )
    query_index = rng.integers(5, n_queries, 25)  # not every query asked, some twice
    positive = np.where(rng.random(25) < 0.5, rng.integers(0, n_items, 25), np.argmax(inputs.fallback))
    betas, gammas, k = [2.0, 0.0, 0.5], [1.5, 0.0, 4.0], 5

    def recall(b, g):
        return _brute_recall(
            query_emb, item_emb, b * inputs.prior + g * inputs.fallback, query_index, positive, k
        )

    def best(values, score):
        scores = [score(v) for v in values]
        return values[scores.index(max(scores))]

    beta = best(sorted(betas), lambda b: recall(b, 0.0))
    gamma = best(sorted(gammas), lambda g: recall(beta, g))
    beta = best(sorted(betas), lambda b: recall(b, gamma))
    chosen = choose_blend(query_emb, item_emb, inputs, betas, gammas, query_index, positive, k)
    assert (chosen.beta, chosen.gamma, chosen.select_k) == (beta, gamma, k)
    for key, value in chosen.recalls.items():
        b, g = (float(x) for x in key.split(","))
        assert value == pytest.approx(recall(b, g))
    assert len(chosen.recalls) == len(
        {(b, g) for b in betas for g in (0.0, gamma)} | {(beta, g) for g in gammas}
    )


def test_with_two_fallback_weights_the_second_is_tried():
    # One query whose positive (item 1) is only reached with the fallback: gamma 3 must be chosen.
    query_emb = np.array([[1.0, 0.0]], np.float32)
    item_emb = np.array([[1.0, 0.0], [0.0, 0.0], [0.5, 0.0]], np.float32)
    inputs = BlendInputs(np.zeros(3), np.array([0.0, 1.0, 0.0]), "category_id", np.zeros(1))
    chosen = choose_blend(query_emb, item_emb, inputs, [0.0], [3.0, 0.0], np.array([0]), np.array([1]), 1)
    assert (chosen.beta, chosen.gamma) == (0.0, 3.0) and chosen.recalls == {"0,0": 0.0, "0,3": 1.0}
    with pytest.raises(ValueError, match="at least one"):
        choose_blend(query_emb, item_emb, inputs, [], [0.0], np.array([0]), np.array([1]), 1)
    none_given = choose_blend(query_emb, item_emb, inputs, [1.0], [], np.array([0]), np.array([1]), 1)
    assert none_given.gamma == 0.0


def _fake_run(monkeypatch, val_positives):
    rng = np.random.default_rng(5)
    item_emb = rng.normal(size=(12, 3)).astype(np.float32)
    query_emb = rng.normal(size=(4, 3)).astype(np.float32)
    items = _items(rng.integers(0, 9, 12), rng.integers(0, 3, 12), rng.random(12) < 0.3)
    val = None if val_positives is None else SimpleNamespace(positives={"conversion": val_positives})
    dm = SimpleNamespace(items=items, queries={"val": val}, item_features={}, dir="logs")
    model = SimpleNamespace(embed_items=lambda features: item_emb)
    import convcg_cli.builders

    monkeypatch.setattr(convcg_cli.builders, "embed_split", lambda model, dm, split: query_emb)
    return model, dm, query_emb, item_emb


def test_choose_on_validation_chooses_on_the_validation_conversions(monkeypatch):
    positives = (np.array([0, 1, 3, 3]), np.array([2, 5, 7, 1]))
    model, dm, query_emb, item_emb = _fake_run(monkeypatch, positives)
    options = {"betas": [0.0, 1.0, 5.0], "fallback_weights": [0.0, 2.0], "select_k": 3}
    got = B.choose_on_validation(model, dm, options)
    inputs = blend_inputs(dm.items)
    expected = choose_blend(query_emb, item_emb, inputs, [0.0, 1.0, 5.0], [0.0, 2.0], *positives, 3)
    assert (got.beta, got.gamma, got.recalls) == (expected.beta, expected.gamma, expected.recalls)
    # One value each: nothing to choose, the given weights.
    fixed = B.choose_on_validation(model, dm, {"betas": [0.7], "fallback_weights": [0.2], "select_k": 9})
    assert (fixed.beta, fixed.gamma, fixed.select_k, fixed.recalls) == (0.7, 0.2, 9, {})
    assert B.choose_on_validation(model, dm, {"betas": []}) is None
    one_beta = B.choose_on_validation(
        model, dm, {"betas": [0.7], "fallback_weights": [0.0, 2.0], "select_k": 3}
    )
    assert one_beta.recalls  # a grid of fallback weights: chosen on validation


@pytest.mark.parametrize("val", [None, (np.zeros(0, np.int64), np.zeros(0, np.int64))])
def test_choosing_without_validation_conversions_is_a_config_error(monkeypatch, val):
    model, dm, *_ = _fake_run(monkeypatch, val)
    with pytest.raises(ConfigError, match="validation split of logs/impressions.parquet has none"):
        B.choose_on_validation(model, dm, {"betas": [0.0, 1.0]})


def test_the_logged_blend_is_the_last_logged_weights(monkeypatch):
    history = {B.BETA_METRIC: [(0, 0.5), (1, 1.0), (2, 2.0)], B.GAMMA_METRIC: [(0, 3.0), (1, 1.0), (2, 0.25)]}
    monkeypatch.setattr(B.tracking, "run_metric_names", lambda store, run_id: list(history))
    monkeypatch.setattr(B.tracking, "metric_history", lambda store, run_id, name: history[name])
    dm = SimpleNamespace(items=_items([1, 2], [0, 0], [0, 0]))
    got = B.logged_blend(None, "run", dm)
    assert (got.beta, got.gamma) == (2.0, 0.25)
    del history[B.GAMMA_METRIC]
    assert (B.logged_blend(None, "run", dm).beta, B.logged_blend(None, "run", dm).gamma) == (2.0, 0.0)
    history.clear()
    assert B.logged_blend(None, "run", dm) is None
