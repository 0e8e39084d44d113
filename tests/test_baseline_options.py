"""The baselines' options at their boundaries and the work an ItemCF grid shares (``make mutate``).

``window_days`` and ``neighbours`` accept None and every whole number from 0 (0: off) and nothing
else; ``shrinkage`` every number from 0. A grid fitted by :meth:`ItemCF.fit_each` decides
``include_self="auto"`` like a single fit, ranks each shrinkage's similarity once for every
``neighbours`` it holds, scores a shrinkage tried with and without the diagonal in one pass, and
scores negative user positions from the end as numpy does. :func:`validation_recall` is a share.
"""

from __future__ import annotations

import numpy as np
import pytest

from convcg_cli import baseline_scores, itemcf_kernels
from convcg_cli.baselines import ItemCF, MostPopular, TrainHistory, make_baseline, validation_recall
from convcg_cli.errors import ConfigError
from tests.test_baseline_pins import _history as pinned_history


def _history(**kw) -> TrainHistory:
    """test_baseline_pins' random history, smaller: 10 users, 8 items, 30 rows (seed 3)."""
    return pinned_history(**{"seed": 3, "n_users": 10, "n_items": 8, "n_rows": 30, **kw})


# --- MostPopular(window_days) ------------------------------------------------------------------------


def _recent_history() -> TrainHistory:
    # MostPopular's docstring case: item 0 leads the whole window, item 1 its last days
    return TrainHistory(
        np.array([0, 1, 1]),
        np.array([0, 0, 1]),
        2,
        2,
        np.array([2.0, 1.0]),
        conversion_events=(np.array([0, 0, 1]), np.array([3, 3, 9])),
    )


@pytest.mark.parametrize("off", [None, 0, 0.0])
def test_popularity_window_days_zero_or_none_is_the_whole_window(off):
    hist = _recent_history()
    model = MostPopular(window_days=off)
    assert model.window_days == 0
    assert model.fit(hist).score_topk(np.array([0, 1]), k=2).tolist() == [[0, 1], [0, 1]]
    # one day is already a window: the last day's item first
    assert MostPopular(window_days=1).fit(hist).score_topk(np.array([0]), k=2).tolist() == [[1, 0]]
    assert MostPopular(window_days=2.0).window_days == 2  # a whole float is a whole number


@pytest.mark.parametrize("bad", [-1, -0.5, 0.5, 1.5])
def test_popularity_window_days_below_zero_or_fractional_is_a_config_error(bad):
    with pytest.raises(ConfigError, match=rf"window_days must be null or a whole number >= 0, got {bad}\."):
        MostPopular(window_days=bad)
    with pytest.raises(ConfigError, match="window_days"):
        make_baseline("popularity", {"window_days": bad})


# --- ItemCF(neighbours, shrinkage) -------------------------------------------------------------------


@pytest.mark.parametrize("off", [None, 0, 0.0])
def test_itemcf_neighbours_zero_or_none_keeps_every_co_engaged_item(off):
    hist = _history()
    users = np.arange(hist.n_users)
    model = ItemCF(neighbours=off).fit(hist)
    assert model.neighbours == 0
    every = ItemCF().fit(hist)
    assert (model.weights != every.weights).nnz == 0
    np.testing.assert_array_equal(model.score_topk(users, 5), every.score_topk(users, 5))
    one = ItemCF(neighbours=1).fit(hist)  # one neighbour is a cut: fewer weights
    assert ItemCF(neighbours=1.0).neighbours == 1 and one.weights.nnz < every.weights.nnz


@pytest.mark.parametrize("bad", [-1, -0.5, 0.5, 2.5])
def test_itemcf_neighbours_below_zero_or_fractional_is_a_config_error(bad):
    with pytest.raises(ConfigError, match=rf"neighbours must be null or a whole number >= 0, got {bad}\."):
        ItemCF(neighbours=bad)


def test_itemcf_shrinkage_from_zero_up_and_nothing_else():
    assert ItemCF(shrinkage=0).shrinkage == 0.0 and ItemCF(shrinkage=0.25).shrinkage == 0.25
    for bad in (None, -0.5, -1e-9):
        with pytest.raises(ConfigError, match=rf"shrinkage must be >= 0, got {bad!r}\."):
            ItemCF(shrinkage=bad)
    with pytest.raises(ConfigError, match="shrinkage"):
        make_baseline("itemcf", {"shrinkage": None})  # a null in the config


# --- ItemCF.fit_each: a grid ---------------------------------------------------------------------------


@pytest.mark.parametrize(("share", "decided"), [(0.0, False), (float("nan"), True)])
def test_a_grid_decides_auto_include_self_as_a_single_fit_does(share, decided):
    hist = _history(repeat_share=share)
    users = np.arange(hist.n_users)
    with_self = ItemCF(include_self=True).fit(hist).score_topk(users, 4)
    without = ItemCF(include_self=False).fit(hist).score_topk(users, 4)
    assert not np.array_equal(with_self, without)  # the decision shows in the lists
    (model,) = ItemCF.fit_each([{"include_self": "auto"}], hist)
    assert model.include_self is decided
    np.testing.assert_array_equal(model.score_topk(users, 4), with_self if decided else without)
    alone = ItemCF(include_self="auto").fit(hist)
    assert alone.include_self is decided


def test_a_grid_ranks_each_shrinkage_once_for_all_its_neighbours(monkeypatch):
    built = []

    class CountedRankedRows(baseline_scores._RankedRows):
        def __init__(self, m, depth):
            built.append(depth)
            super().__init__(m, depth)

    monkeypatch.setattr(baseline_scores, "_RankedRows", CountedRankedRows)
    hist = _history()
    users = np.arange(hist.n_users)
    options = [{"neighbours": 2}, {"neighbours": 5}, {"neighbours": 3, "shrinkage": 1.0}]
    fitted = list(ItemCF.fit_each(options, hist))
    # the largest neighbours (5) plus one, for every shrinkage: the smaller ones are cuts of it
    assert built == [6, 6]
    built.clear()
    for o, model in zip(options, fitted, strict=True):
        alone = ItemCF(**o).fit(hist)
        assert (model.weights != alone.weights).nnz == 0
        np.testing.assert_array_equal(model.score_topk(users, 5), alone.score_topk(users, 5))
    assert list(ItemCF.fit_each([], hist)) == []  # nothing asked, nothing fitted


def _counted(monkeypatch, name: str) -> list:
    calls = []
    original = getattr(itemcf_kernels, name)

    def counting(*args, **kwargs):
        calls.append(len(args[1]))  # the users scored
        return original(*args, **kwargs)

    monkeypatch.setattr(itemcf_kernels, name, counting)
    return calls


@pytest.mark.parametrize("shrinkage", [0.0, 2.0])
def test_a_grid_scores_both_diagonals_of_a_shrinkage_in_one_pass(monkeypatch, shrinkage):
    hist = _history()
    users = np.arange(hist.n_users)  # user 0 included
    options = [{"include_self": s, "shrinkage": shrinkage} for s in (True, False)]
    expected = [ItemCF(**o).fit(hist).score_topk(users, 4) for o in options]
    assert not np.array_equal(*expected)
    paired = _counted(monkeypatch, "product_topk_with_and_without_diagonal")
    single = _counted(monkeypatch, "sparse_product_topk")
    for model, lists in zip(ItemCF.fit_each(options, hist), expected, strict=True):
        np.testing.assert_array_equal(model.score_topk(users, 4), lists)
    assert (paired, single) == ([hist.n_users], [])  # one pass for both, none alone


def test_negative_user_positions_count_from_the_end_in_a_grid_too():
    hist = _history()
    last = hist.n_users - 1
    options = [{"include_self": s} for s in (True, False)]
    for o, model in zip(options, ItemCF.fit_each(options, hist), strict=True):
        alone = ItemCF(**o).fit(hist)
        expected = alone.score_topk(np.array([last, 1]), 4)
        np.testing.assert_array_equal(alone.score_topk(np.array([-1, 1]), 4), expected)
        np.testing.assert_array_equal(model.score_topk(np.array([-1, 1]), 4), expected)


# --- validation_recall --------------------------------------------------------------------------------


def test_validation_recall_is_the_share_of_rows_found_in_the_top_k():
    hist = TrainHistory(np.array([0]), np.array([0]), 4, 4, np.array([3.0, 2.0, 1.0, 0.0]))
    popular = MostPopular().fit(hist)  # everyone's list: 0, 1, 2, 3
    validation = (np.array([0, 1, 2, 3, 3]), np.array([0, 3, 1, 2, 1]))
    assert validation_recall(popular, validation, 1) == pytest.approx(1 / 5)
    assert validation_recall(popular, validation, 2) == pytest.approx(3 / 5)
    assert validation_recall(popular, validation, 4) == 1.0
    assert validation_recall(popular, (np.array([2]), np.array([3])), 3) == 0.0
