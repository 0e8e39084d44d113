"""The blend's popularity margin rule at its boundaries, pinned on planted worlds (``make mutate``).

One-hot item embeddings and a prior of 1 on item 0 only (the popular item), so every recall and
standard error is an exact binary fraction: the best blend is served only when it beats the largest
beta by *more* than ``popularity_margin_se`` standard errors (a tie, or a gain of exactly that many,
serves popularity); the rule is off at 0 (the default, also of :func:`choose_on_validation`), where
even a tie keeps the smallest beta. :func:`paired_se` is pinned from two clusters up, and
:func:`choose_on_validation` refuses a margin below 0 or not finite.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest

from convcg_cli import blend as B
from convcg_cli.blend import BlendInputs, blend_inputs, choose_blend, paired_se
from convcg_cli.errors import ConfigError

N_ITEMS = 6
BETAS = [0.5, 100.0]  # at 0.5 a query's own item (score 1) leads item 0 (0.5); at 100 item 0 leads


def _world(model_led: int, popular_led: int, against: int = 0):
    """Queries and their one positive each, for k = 1:

    * ``model_led``: the query points at its own item 1, 2, ...: found at beta 0.5, not at 100;
    * ``popular_led``: a zero query whose positive is item 0: found at every beta > 0;
    * ``against``: a query pointing at item 5 whose positive is item 0: found at 100 only.
    """
    item_emb = np.eye(N_ITEMS, dtype=np.float32)
    rows = [np.eye(N_ITEMS)[1 + q] for q in range(model_led)]
    rows += [np.zeros(N_ITEMS)] * popular_led + [np.eye(N_ITEMS)[5]] * against
    positive = np.array([1 + q for q in range(model_led)] + [0] * (popular_led + against))
    return np.array(rows, np.float32), item_emb, positive


def _inputs() -> BlendInputs:
    prior = np.zeros(N_ITEMS)
    prior[0] = 1.0
    return BlendInputs(prior, np.zeros(N_ITEMS), "category_id", np.zeros(1))


def _choose(world, margin_se: float | None = None):
    query_emb, item_emb, positive = world
    queries = np.arange(len(positive))
    margin = {} if margin_se is None else {"popularity_margin_se": margin_se}
    return choose_blend(query_emb, item_emb, _inputs(), BETAS, [0.0], queries, positive, 1, **margin)


def test_a_gain_of_exactly_the_margin_serves_popularity():
    # 4 queries, the blend finds one more positive: a gain of 1/4, and its standard error is 1/4
    world = _world(model_led=1, popular_led=3)
    plain = _choose(world)
    assert (plain.recalls["0.5,0"], plain.recalls["100,0"]) == (1.0, 0.75)
    assert paired_se(np.array([1, 1, 1, 1], bool), np.array([0, 1, 1, 1], bool), np.arange(4)) == 0.25
    assert (plain.beta, plain.overruled_beta) == (0.5, None)  # the margin rule is off by default
    at = _choose(world, 1.0)  # a gain of exactly one standard error is no evidence
    assert (at.beta, at.overruled_beta) == (100.0, 0.5)
    below = _choose(world, 0.99)  # ... and one of a little more is
    assert (below.beta, below.overruled_beta) == (0.5, None)


def test_a_tie_with_popularity_keeps_the_smallest_beta_only_when_the_rule_is_off():
    world = _world(model_led=0, popular_led=4)  # every beta finds every positive
    for off in (None, 0.0):
        tied = _choose(world, off)
        assert tied.recalls == {"0.5,0": 1.0, "100,0": 1.0}
        assert (tied.beta, tied.overruled_beta) == (0.5, None)  # the smallest among equals
    on = _choose(world, 0.5)
    assert (on.beta, on.overruled_beta) == (100.0, 0.5)  # no gain at all: popularity


@pytest.mark.parametrize("margin_se", [None, 0.0, 2.0])
def test_when_popularity_is_best_it_is_served_and_nothing_is_overruled(margin_se):
    chosen = _choose(_world(model_led=1, popular_led=2, against=2), margin_se)
    assert (chosen.recalls["0.5,0"], chosen.recalls["100,0"]) == (0.6, 0.8)
    assert (chosen.beta, chosen.overruled_beta) == (100.0, None)


def test_paired_se_from_two_clusters_up():
    # two clusters with summed differences 1 and 0: sqrt(2 / 1 * (0.5^2 + 0.5^2)) / 2 = 0.5
    assert paired_se(np.array([1, 0], bool), np.array([0, 0], bool), np.array([7, 9])) == 0.5
    # sums 2 and 0 over 3 positives: sqrt(2 * (1 + 1)) / 3
    got = paired_se(np.array([1, 1, 0], bool), np.zeros(3, bool), np.array([4, 4, 5]))
    assert got == pytest.approx(2.0 / 3.0)
    # three clusters, sums 1, 0, 0: sqrt(3 / 2 * (4/9 + 1/9 + 1/9)) / 3 = 1 / 3
    assert paired_se(np.array([1, 0, 0], bool), np.zeros(3, bool), np.arange(3)) == pytest.approx(1 / 3)
    assert paired_se(np.array([1, 0], bool), np.zeros(2, bool), np.array([3, 3])) == 0.0  # one cluster


# --- choose_on_validation -------------------------------------------------------------------------------


def _run(monkeypatch, world):
    """Stand-ins for the trained model and the datamodule: the world's embeddings, item 0 the only
    item that converted in training (its prior is 1, every other item's 0)."""
    query_emb, item_emb, positive = world
    conversions = np.zeros(N_ITEMS, np.int64)
    conversions[0] = 9
    items = SimpleNamespace(
        performance=pl.DataFrame({"conversions": conversions}),
        features={"category_id": np.zeros(N_ITEMS, np.int64)},
        never_shown=None,
    )
    val = SimpleNamespace(positives={"conversion": (np.arange(len(positive)), positive)})
    dm = SimpleNamespace(items=items, queries={"val": val}, item_features={}, dir="logs")
    model = SimpleNamespace(embed_items=lambda features: item_emb)
    import convcg_cli.builders

    monkeypatch.setattr(convcg_cli.builders, "embed_split", lambda model, dm, split: query_emb)
    assert blend_inputs(items).prior.tolist() == _inputs().prior.tolist()
    return model, dm


def test_choose_on_validation_serves_the_best_blend_unless_a_margin_is_asked(monkeypatch):
    # 8 queries: the blend finds two positives popularity misses and misses one it finds, a gain of
    # 1/8 within one standard error (sqrt(8 / 7 * 2.875) / 8 = 0.227)
    model, dm = _run(monkeypatch, _world(model_led=2, popular_led=5, against=1))
    options = {"betas": BETAS, "select_k": 1}
    chosen = B.choose_on_validation(model, dm, options)
    assert chosen.recalls == {"0.5,0": 7 / 8, "100,0": 6 / 8}
    assert (chosen.beta, chosen.overruled_beta) == (0.5, None)  # off by default
    assert B.choose_on_validation(model, dm, {**options, "popularity_margin_se": 0}).beta == 0.5
    assert B.choose_on_validation(model, dm, {**options, "popularity_margin_se": 0.5}).beta == 0.5
    one_se = B.choose_on_validation(model, dm, {**options, "popularity_margin_se": 1.0})
    assert (one_se.beta, one_se.overruled_beta) == (100.0, 0.5)


@pytest.mark.parametrize("bad", [-0.5, -1e-9, float("nan"), float("inf"), float("-inf")])
def test_a_margin_below_zero_or_not_finite_is_a_config_error(monkeypatch, bad):
    model, dm = _run(monkeypatch, _world(model_led=1, popular_led=3))
    with pytest.raises(ConfigError, match=r"val_blend\.popularity_margin_se must be >= 0 \(0 = off\), got"):
        B.choose_on_validation(model, dm, {"betas": BETAS, "popularity_margin_se": bad}, where="val_blend")
