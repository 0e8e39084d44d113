"""Baselines tuned on the validation days (conf/eval.yaml baseline_tuning): the grid's options, the
choice by validation recall only, the chosen values logged, and nothing tuned without validation."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from convcg_cli.baseline_scores import keep_top_per_row
from convcg_cli.baseline_tuning import tune_baseline
from convcg_cli.baselines import ItemCF, MostPopular, TrainHistory, training_history, validation_recall
from convcg_cli.config import compose
from convcg_cli.errors import ConfigError
from convcg_cli.train import build_datamodule
from tests.conftest import TINY_SPLIT
from tests.test_baseline_pins import _history as pinned_history
from tests.test_baselines import _direct_itemcf_weights, _tied_history

TASKS = ["conversion", "engagement"]


def _history(validation=None) -> TrainHistory:
    return pinned_history(0, n_users=30, n_items=20, n_rows=150, validation=validation)


def test_keep_top_per_row_equals_a_python_loop_with_ties_by_column():
    rng = np.random.default_rng(3)
    dense = rng.integers(0, 4, size=(25, 17)).astype(float) * (rng.random((25, 17)) < 0.5)
    for n in (1, 2, 5, 20):
        expected = np.zeros_like(dense)
        for r, row in enumerate(dense):
            nonzero = [j for j in range(len(row)) if row[j] != 0]
            for j in sorted(nonzero, key=lambda j, row=row: (-row[j], j))[:n]:
                expected[r, j] = row[j]
        np.testing.assert_array_equal(keep_top_per_row(sp.csr_matrix(dense), n).toarray(), expected)


def test_itemcf_neighbours_and_shrinkage_against_the_dense_formula():
    hist = _history()
    x = np.zeros((hist.n_users, hist.n_items))
    x[hist.user_pos, hist.item_pos] = 1.0
    together = x.T @ x
    norms = np.sqrt(x.sum(axis=0))
    norms[norms == 0] = np.inf
    cosine = together / np.outer(norms, norms)
    shrunk = cosine * together / (together + 10.0)
    model = ItemCF(include_self=True, shrinkage=10.0).fit(hist)
    np.testing.assert_allclose(model.weights.toarray(), shrunk, atol=1e-12)
    pruned = ItemCF(include_self=False, neighbours=3).fit(hist).weights.toarray()
    no_self = cosine - np.diag(np.diag(cosine))
    for j in range(hist.n_items):  # column j holds j's 3 most similar items, nothing else
        kept = np.flatnonzero(pruned[:, j])
        assert len(kept) == min(3, np.count_nonzero(no_self[:, j]))
        np.testing.assert_allclose(pruned[kept, j], no_self[kept, j], atol=1e-12)
        if len(kept):
            dropped = np.setdiff1d(np.arange(hist.n_items), kept)
            assert no_self[dropped, j].max(initial=0.0) <= no_self[kept, j].min() + 1e-12
    # the defaults are the plain cosine: the lists of before the options existed
    users = np.arange(hist.n_users)
    np.testing.assert_array_equal(
        ItemCF(neighbours=None, shrinkage=0.0).fit(hist).score_topk(users, 8),
        ItemCF().fit(hist).score_topk(users, 8),
    )


def test_popularity_window_counts_the_last_days_only():
    hist = TrainHistory(
        np.zeros(0, int),
        np.zeros(0, int),
        1,
        4,
        np.array([4.0, 3.0, 2.0, 1.0]),
        conversion_events=(np.array([0, 0, 0, 3, 3, 2]), np.array([1, 2, 3, 9, 10, 10])),
    )
    assert MostPopular(window_days=2).fit(hist).score_topk(np.zeros(1), 4).tolist() == [[3, 2, 0, 1]]
    assert MostPopular(window_days=100).fit(hist).score_topk(np.zeros(1), 4).tolist() == [[0, 3, 2, 1]]
    assert MostPopular(window_days=0).fit(hist).score_topk(np.zeros(1), 4).tolist() == [[0, 1, 2, 3]]
    for bad in (-1, 1.5):
        with pytest.raises(ConfigError, match="window_days"):
            MostPopular(window_days=bad)
    with pytest.raises(ConfigError, match="shrinkage"):
        ItemCF(shrinkage=-1)


def test_tuning_keeps_the_best_validation_recall_and_its_fitted_baseline():
    hist = _history()
    users = np.arange(hist.n_users)
    # validation conversions planted as each user's 2nd-best item under neighbours=3: that setting must win
    planted = ItemCF(include_self=True, neighbours=3).fit(hist).score_topk(users, 2)[:, 1]
    validation = (users, planted)
    hist = TrainHistory(**{**hist.__dict__, "validation": validation})
    grid = {"neighbours": [None, 3], "shrinkage": [0.0, 50.0]}
    tuned = tune_baseline("itemcf", {"include_self": True}, grid, hist, select_k=2)
    recalls = {
        (n, s): validation_recall(
            ItemCF(include_self=True, neighbours=n, shrinkage=s).fit(hist), validation, 2
        )
        for n in grid["neighbours"]
        for s in grid["shrinkage"]
    }
    best = max(recalls.values())
    first_best = next(combo for combo, r in recalls.items() if r == best)  # grid order, first on ties
    assert tuned.val_recall == best and tuned.tried == 4
    assert (tuned.chosen["neighbours"] or None, tuned.chosen["shrinkage"]) == first_best
    assert tuned.chosen["include_self"] if "include_self" in tuned.chosen else True
    # the returned baseline is the fitted winner, not a refit of the base options
    assert validation_recall(tuned.baseline, validation, 2) == best


def test_without_validation_or_grid_the_options_are_used_as_given():
    hist = _history()
    for grid, validation in (({"neighbours": [None, 3]}, None), ({}, (np.arange(3), np.arange(3)))):
        h = TrainHistory(**{**hist.__dict__, "validation": validation})
        tuned = tune_baseline("itemcf", {"neighbours": 5}, grid, h)
        assert tuned.chosen == {} and tuned.val_recall is None and tuned.tried == 0
        assert tuned.baseline.neighbours == 5
    with pytest.raises(ConfigError, match="baseline_tuning.itemcf.neighbours is an empty list"):
        with_val = TrainHistory(**{**hist.__dict__, "validation": (np.arange(2),) * 2})
        tune_baseline("itemcf", {}, {"neighbours": []}, with_val)


@pytest.fixture(scope="module")
def tiny_dm(tiny_data):
    return build_datamodule(compose("train", [f"data.dir={tiny_data}", TINY_SPLIT]).cfg, TASKS)


def test_eval_logs_the_chosen_values_and_tunes_on_validation_only(tiny_dm, monkeypatch):
    from convcg_cli import baselines
    from convcg_cli.evaluate import baseline_metrics

    seen = []
    real = baselines.validation_recall
    monkeypatch.setattr(
        baselines,
        "validation_recall",
        lambda b, validation, k: seen.append(validation) or real(b, validation, k),
    )
    overrides = ["baselines=[popularity,itemcf,ease]", "bootstrap.n_boot=0", "by_surface=false"]
    cfg = compose("eval", overrides).cfg
    metrics = baseline_metrics(tiny_dm, tiny_dm.queries["heldout"], TASKS, cfg)
    hist = training_history(tiny_dm)
    assert hist.validation is not None
    for users, items in seen:  # every choice was scored on the validation conversions, nothing else
        np.testing.assert_array_equal(users, hist.validation[0])
        np.testing.assert_array_equal(items, hist.validation[1])
    assert len(seen) == 10 + 12 + 5  # the shipped grids: popularity, itemcf, ease
    assert metrics["heldout/baseline_ease/chosen/l2"] in (50.0, 200.0, 500.0, 2000.0, 8000.0)
    assert metrics["heldout/baseline_itemcf/chosen/shrinkage"] in (0.0, 10.0)
    assert 0.0 <= metrics["heldout/baseline_popularity/chosen/val_recall_at_100"] <= 1.0
    assert metrics["heldout/baseline_popularity/chosen/window_days"] in (0.0, 1.0, 3.0, 7.0, 14.0)


def test_the_tuning_grid_is_part_of_a_baseline_runs_key():
    from convcg_cli.evaluate import baseline_key

    train_cfg = compose("train", []).cfg
    keys = {
        overrides: baseline_key("d" * 16, train_cfg, TASKS, compose("eval", list(overrides)).cfg, "ease")
        for overrides in ((), ("baseline_tuning.ease.l2=[500.0]",), ("baseline_tuning.select_k=50",))
    }
    assert len(set(keys.values())) == 3
    untuned = compose("eval", ["baseline_tuning.ease=null"]).cfg
    assert baseline_key("d" * 16, train_cfg, TASKS, untuned, "ease") not in keys.values()


def test_chosen_lines_under_the_eval_table():
    from convcg_cli.cli import chosen_lines

    lines = chosen_lines(
        {
            "heldout/baseline_itemcf/chosen/neighbours": 50.0,
            "heldout/baseline_itemcf/chosen/shrinkage": 0.0,
            "heldout/baseline_itemcf/chosen/val_recall_at_100": 0.125,
            "heldout/baseline_itemcf/conversion/recall_at_100": 0.2,
        }
    )
    expected = "itemcf: validation chose neighbours=50 shrinkage=0 (validation conversion recall@100 0.1250)"
    assert lines == [expected]


# --- ItemCF's grid from one cosine product ------------------------------------------------------------


SHIPPED_ITEMCF_GRID = {"include_self": [True, False], "neighbours": [None, 50, 200], "shrinkage": [0.0, 10.0]}
# the shipped grid's shape with lists short enough to cut this toy corpus (and one 1-item list)
SMALL_ITEMCF_GRID = {"include_self": [True, False], "neighbours": [None, 1, 4], "shrinkage": [0.0, 10.0]}


def test_the_shipped_itemcf_grid_is_the_one_tested():
    assert dict(compose("eval", []).cfg.baseline_tuning.itemcf) == SHIPPED_ITEMCF_GRID


@pytest.mark.parametrize("grid", [SHIPPED_ITEMCF_GRID, SMALL_ITEMCF_GRID], ids=["shipped", "small"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_tuned_itemcf_equals_the_loop_of_separate_fits(seed, grid):
    hist = _tied_history(seed)
    users = np.arange(hist.n_users)
    tuned = tune_baseline("itemcf", {}, grid, hist, select_k=5)
    # brute force: every combination fitted on its own, its weights the direct way
    best = None
    for s in grid["include_self"]:
        for n in grid["neighbours"]:
            for w in grid["shrinkage"]:
                model = ItemCF(include_self=s, neighbours=n, shrinkage=w).fit(hist)
                model.weights = _direct_itemcf_weights(hist.matrix(), s, n or 0, w)
                recall = validation_recall(model, hist.validation, 5)
                if best is None or recall > best[0]:
                    best = (recall, {"include_self": s, "neighbours": int(n or 0), "shrinkage": w}, model)
    assert best is not None
    assert tuned.tried == 12 and tuned.val_recall == best[0] and tuned.chosen == best[1]
    for k in (1, 5, hist.n_items):
        np.testing.assert_array_equal(tuned.baseline.score_topk(users, k), best[2].score_topk(users, k))


def test_tuning_with_auto_self_and_a_fixed_option_equals_separate_fits():
    hist = TrainHistory(**{**_tied_history(4).__dict__, "repeat_share": 0.0})  # auto: without self
    grid = {"include_self": ["auto", True], "shrinkage": [0.0, 2.0]}
    tuned = tune_baseline("itemcf", {"neighbours": 2}, grid, hist, select_k=3)
    recalls = {
        (s, w): validation_recall(ItemCF(s, neighbours=2, shrinkage=w).fit(hist), hist.validation, 3)
        for s in grid["include_self"]
        for w in grid["shrinkage"]
    }
    first_best = next(combo for combo, r in recalls.items() if r == max(recalls.values()))
    assert tuned.val_recall == max(recalls.values())
    assert tuned.chosen == {"include_self": first_best[0] is True, "shrinkage": first_best[1]}
    assert tuned.baseline.include_self is (first_best[0] is True)
