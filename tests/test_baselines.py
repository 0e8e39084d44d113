"""Baselines: exact against brute force on toy matrices, training-window only, better than random on tiny."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from convcg_cli import baselines
from convcg_cli.baseline_scores import keep_top_per_row, sparse_topk_rows
from convcg_cli.baselines import (
    EASE,
    BaselineRefusedError,
    EASEPopularity,
    ItemCF,
    ItemCFSimilarity,
    MostPopular,
    TrainHistory,
    make_baseline,
    shared_ease_weights,
    topk_rows,
    training_history,
)
from convcg_cli.config import compose
from convcg_cli.errors import ConfigError
from convcg_cli.index import popularity_topk
from convcg_cli.train import build_datamodule, check_served_embedding_is_trained
from tests.conftest import TINY_SPLIT

TASKS = ["conversion", "engagement"]


def _history(seed: int = 0, n_users: int = 12, n_items: int = 9, n_rows: int = 40) -> TrainHistory:
    rng = np.random.default_rng(seed)
    return TrainHistory(
        user_pos=rng.integers(0, n_users - 1, size=n_rows),  # the last user has no history (cold)
        item_pos=rng.integers(0, n_items, size=n_rows),
        n_users=n_users,
        n_items=n_items,
        popularity=rng.integers(0, 4, size=n_items).astype(np.float32),  # ties on purpose
    )


def _brute_force_ranking(scores: np.ndarray, popularity: np.ndarray, k: int) -> list[list[int]]:
    """Sort every row by (-score, -popularity, id) in plain Python."""
    return [
        sorted(range(len(row)), key=lambda j, row=row: (-row[j], -popularity[j], j))[:k] for row in scores
    ]


def test_topk_rows_matches_lexsort_with_ties_and_k_beyond_n():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=(50, 13)).astype(np.float64)
    for k in (1, 5, 13, 20):
        expected = np.lexsort((np.broadcast_to(np.arange(13), scores.shape), -scores), axis=-1)[:, :k]
        np.testing.assert_array_equal(topk_rows(scores, k), expected)
    assert topk_rows(np.zeros((0, 4)), 3).shape == (0, 3)
    with pytest.raises(ValueError, match="NaN"):
        topk_rows(np.array([[np.nan, 1.0]]), 1)


def test_itemcf_is_cosine_of_engagement_columns():
    hist = _history()
    x = np.zeros((hist.n_users, hist.n_items))
    x[hist.user_pos, hist.item_pos] = 1.0
    norms = np.sqrt(x.sum(axis=0))
    norms[norms == 0] = np.inf
    cosine = (x.T @ x) / np.outer(norms, norms)
    for include_self in (True, False):
        model = ItemCF(include_self=include_self).fit(hist)
        expected = cosine if include_self else cosine - np.diag(np.diag(cosine))
        np.testing.assert_allclose(model.weights.toarray(), expected, atol=1e-12)
        # Ranking checked on the model's own scores: cosines equal in exact arithmetic may differ in
        # the last bit between sparse and dense products, which would make the tie order ambiguous.
        scores = (model.profiles @ model.weights).toarray()
        users = np.arange(hist.n_users)
        np.testing.assert_array_equal(
            model.score_topk(users, 6), _brute_force_ranking(scores, hist.popularity, 6)
        )


def test_sparse_topk_rows_is_topk_rows_of_the_dense_matrix_in_rank_order():
    import scipy.sparse as sp

    rng = np.random.default_rng(7)
    dense = rng.integers(0, 4, size=(60, 40)) * (rng.random((60, 40)) < 0.3)  # ties, empty rows
    dense[3] = 0
    scores = sp.csr_matrix(dense.astype(np.float64))
    scores.data[::5] = 0.0  # explicit zeros: unscored like the implicit ones
    rank = rng.permutation(40)
    by_rank = np.argsort(rank)  # column at each place of the tie order
    for k in (1, 3, 12, 40, 55):
        expected = by_rank[topk_rows(scores.toarray()[:, by_rank], k)]
        np.testing.assert_array_equal(sparse_topk_rows(scores, rank, k), expected)
    with pytest.raises(ValueError, match=">= 0"):
        sparse_topk_rows(sp.csr_matrix(np.array([[1.0, -1.0]])), np.arange(2), 1)


@pytest.mark.parametrize("include_self", [True, False])
@pytest.mark.parametrize("k", [1, 5, 40, 300, 2000])
def test_itemcf_sparse_lists_equal_the_dense_ones(include_self, k):
    # Zipf-popular items, so some users score more than k items and some fewer; small integer
    # counts make many cosines equal; the last users have no history (the popularity list).
    rng = np.random.default_rng(k)
    n_users, n_items = 400, 1200
    items = np.minimum(rng.zipf(1.3, size=6000), n_items) - 1
    hist = TrainHistory(
        user_pos=rng.integers(0, n_users - 20, size=6000),
        item_pos=items,
        n_users=n_users,
        n_items=n_items,
        popularity=rng.integers(0, 5, size=n_items).astype(np.float64),
    )
    model = ItemCF(include_self=include_self).fit(hist)
    users = rng.permutation(n_users)
    dense_lists = baselines._ItemToItem.score_topk(model, users, k)  # the dense path it replaced
    np.testing.assert_array_equal(model.score_topk(users, k), dense_lists)


def test_ease_is_the_closed_form_solution():
    hist = _history(seed=1)
    x = np.zeros((hist.n_users, hist.n_items))
    x[hist.user_pos, hist.item_pos] = 1.0
    p = np.linalg.inv(x.T @ x + 3.0 * np.eye(hist.n_items))
    b = np.eye(hist.n_items) - p / np.diag(p)[None, :]
    model = EASE(l2=3.0).fit(hist)
    np.testing.assert_allclose(model.weights, b, atol=1e-10)
    assert np.all(np.diag(model.weights) == 0)
    users = np.arange(hist.n_users)
    np.testing.assert_array_equal(model.score_topk(users, 9), _brute_force_ranking(x @ b, hist.popularity, 9))


@pytest.mark.parametrize("name", ["popularity", "itemcf", "ease"])
def test_cold_user_gets_the_popularity_list(name):
    hist = _history(seed=2)
    cold = np.array([hist.n_users - 1])
    ranked = make_baseline(name).fit(hist).score_topk(cold, 5)
    np.testing.assert_array_equal(ranked[0], popularity_topk(hist.popularity, 5))


def test_query_topk_repeats_each_users_list():
    hist = _history(seed=3)
    model = ItemCF().fit(hist)
    users = np.array([4, 1, 4, 0])
    np.testing.assert_array_equal(model.query_topk(users, 3), model.score_topk(users, 3))
    # the kernel writes the queries' lists as int32; score_topk keeps int64; EASE's are cast
    assert model.query_topk(users, 3).dtype == np.int32 and model.score_topk(users, 3).dtype == np.int64
    ease = make_baseline("ease").fit(hist)
    np.testing.assert_array_equal(ease.query_topk(users, 3), ease.score_topk(users, 3))
    assert ease.query_topk(users, 3).dtype == np.int32
    popular = MostPopular().fit(hist).query_topk(users, 3)
    assert popular.shape == (4, 3) and not popular.flags.writeable  # a view, not 4 copies


def test_bad_baseline_config_is_a_config_error():
    with pytest.raises(ConfigError, match="Unknown baseline 'knn'"):
        make_baseline("knn")
    with pytest.raises(ConfigError, match="baseline_options.ease was rejected"):
        make_baseline("ease", {"lambda": 3})
    with pytest.raises(ConfigError, match="use the itemcf baseline"):
        EASE(max_items=5).fit(_history())


@pytest.fixture(scope="module")
def tiny_dm(tiny_data):
    return build_datamodule(compose("train", [f"data.dir={tiny_data}", TINY_SPLIT]).cfg, TASKS)


def test_history_holds_only_training_window_engagements(tiny_dm):
    from convcg_cli.data.contract import load_tables
    from convcg_cli.data.features import encodings as F

    split = F.split_by_time(load_tables(tiny_dm.dir)["impressions"], tiny_dm.val_days, tiny_dm.heldout_days)
    engaged = {
        name: set(F.engaged_rows(getattr(split, name), TASKS)["item_id"].to_list())
        for name in ("train", "heldout")
    }
    heldout_only = engaged["heldout"] - engaged["train"]
    assert heldout_only, "the tiny logs should have items engaged in held-out days only"
    hist = training_history(tiny_dm)
    profiled = set(tiny_dm.items.item_ids[np.unique(hist.item_pos)].tolist())
    assert profiled == engaged["train"]
    assert not profiled & heldout_only
    profiles = ItemCF().fit(hist).profiles
    heldout_pos = np.searchsorted(tiny_dm.items.item_ids, sorted(heldout_only))
    assert profiles[:, heldout_pos].nnz == 0  # in no user's profile


def test_baselines_beat_random_on_tiny(tiny_dm):
    from convcg_cli.evaluate import baseline_metrics

    cfg = compose(
        "eval", ["baselines=[popularity,itemcf,ease]", "bootstrap.n_boot=50", "by_surface=false"]
    ).cfg
    metrics = baseline_metrics(tiny_dm, tiny_dm.queries["heldout"], TASKS, cfg)
    random_recall = 100 / len(tiny_dm.items.item_ids)
    for name in ("itemcf", "ease"):
        recall = metrics[f"heldout/baseline_{name}/conversion/recall_at_100"]
        assert recall > 2 * random_recall
        low = metrics[f"heldout/baseline_{name}/conversion/recall_at_100_ci_low"]
        high = metrics[f"heldout/baseline_{name}/conversion/recall_at_100_ci_high"]
        assert low <= recall <= high


def test_a_baseline_that_refuses_the_corpus_is_skipped_with_a_warning(tiny_dm, caplog):
    from convcg_cli.evaluate import score_baselines

    cfg = compose(
        "eval",
        ["baselines=[popularity,ease]", "baseline_options.ease.max_items=5", "bootstrap.n_boot=0"],
    ).cfg
    with caplog.at_level("WARNING", logger="convcg_cli.evaluate"):
        scores = score_baselines(tiny_dm, tiny_dm.queries["heldout"], TASKS, cfg)
    assert list(scores) == ["baseline_popularity"]
    assert "Skipped baseline ease: ease needs a dense" in caplog.text and "max_items=5" in caplog.text
    with pytest.raises(BaselineRefusedError):  # called directly, still an error
        EASE(max_items=5).fit(_history())


def test_a_refused_baseline_reads_no_training_window(tiny_dm, monkeypatch):
    # EASE refuses from the corpus size alone: an evaluation whose other baselines are reused from
    # their runs does not build the training history just to be told no.
    from convcg_cli import evaluate

    cfg = compose("eval", ["baselines=[ease]", "baseline_options.ease.max_items=5", "bootstrap.n_boot=0"]).cfg
    built = []
    monkeypatch.setattr(evaluate, "training_history", lambda dm: built.append(dm))
    assert evaluate.score_baselines(tiny_dm, tiny_dm.queries["heldout"], TASKS, cfg) == {}
    assert built == []
    EASE(max_items=len(tiny_dm.items.item_ids)).check_corpus(len(tiny_dm.items.item_ids))  # exactly: allowed
    with pytest.raises(BaselineRefusedError, match="max_items=5"):
        EASE(max_items=5).check_corpus(6)


def test_single_task_baseline_configs():
    engagement_only = compose("train", ["+experiment=baseline/engagement_only"]).cfg
    assert dict(engagement_only.loss.task_weights) == {"conversion": 0.0, "engagement": 1.0}
    assert engagement_only.callbacks.model_checkpoint.monitor == "val/engagement/recall_at_100"
    check_served_embedding_is_trained(engagement_only)  # unified: the one embedding is trained
    conversion_only = compose("train", ["+experiment=baseline/conversion_only"]).cfg
    assert dict(conversion_only.loss.task_weights) == {"conversion": 1.0, "engagement": 0.0}
    check_served_embedding_is_trained(conversion_only)
    served_untrained = compose("train", ["+experiment=baseline/engagement_only", "model/head=multi_head"]).cfg
    with pytest.raises(ConfigError, match="serving_task=conversion"):
        check_served_embedding_is_trained(served_untrained)
    with pytest.raises(ConfigError, match="At least one"):
        check_served_embedding_is_trained(
            compose("train", ["loss.task_weights.engagement=0", "loss.task_weights.conversion=0"]).cfg
        )


def test_ease_popularity_is_the_brute_force_blend_with_the_weight_chosen_on_validation():
    hist = _history(seed=3)
    counts = np.random.default_rng(3).integers(0, 9, size=hist.n_items)
    x = np.zeros((hist.n_users, hist.n_items))
    x[hist.user_pos, hist.item_pos] = 1.0
    ease = EASE(l2=2.0).fit(hist)
    prior = np.log1p(counts) / np.log1p(counts).max()
    users = np.arange(hist.n_users)

    def blend(w: float) -> np.ndarray:
        s = x @ ease.weights
        scale = np.abs(s).max(axis=1, keepdims=True)
        return s / np.where(scale > 0, scale, 1.0) + w * prior[None, :]

    # validation positives: each user's best item under a large weight, so the large weight wins
    val_items = np.argmax(blend(5.0) + 1e-9 * np.arange(hist.n_items)[::-1], axis=1)
    from dataclasses import replace

    tuned = replace(hist, conversions=counts, validation=(users, val_items))
    model = make_baseline("ease_popularity", {"l2": 2.0, "weights": [0.0, 5.0], "select_k": 1}).fit(tuned)
    assert model.chosen_weight == 5.0
    got = model.score_topk(users, k=4)
    assert got.tolist() == _brute_force_ranking(blend(5.0), hist.popularity, 4)
    untuned = make_baseline("ease_popularity", {"l2": 2.0, "weights": [0.0, 5.0]}).fit(
        replace(tuned, validation=None)
    )
    assert untuned.chosen_weight == 0.0  # no validation data: the first weight
    with pytest.raises(ConfigError, match="weights"):
        make_baseline("ease_popularity", {"weights": []})


def test_ease_and_ease_popularity_share_one_inverse_inside_the_block_only(monkeypatch):
    solve = EASE._solve
    calls = []
    monkeypatch.setattr(EASE, "_solve", lambda self, x: calls.append(self.l2) or solve(self, x))
    hist = _history(3)
    users = np.arange(hist.n_users)
    alone = [EASE(l2=2.0).fit(hist), EASEPopularity(l2=2.0, weights=[0.5]).fit(hist)]
    assert calls == [2.0, 2.0]  # outside the block each computes its own
    calls.clear()
    with shared_ease_weights():
        shared = [EASE(l2=2.0).fit(hist), EASEPopularity(l2=2.0, weights=[0.5]).fit(hist)]
        EASE(l2=3.0).fit(hist)  # another penalty: its own inverse
        EASE(l2=2.0).fit(_history(4))  # other profiles: their own inverse
    assert calls == [2.0, 3.0, 2.0]
    assert shared[0].weights is shared[1].weights and not shared[0].weights.flags.writeable
    for a, b in zip(alone, shared, strict=True):  # the same figures as without sharing
        np.testing.assert_array_equal(a.weights, b.weights)
        np.testing.assert_array_equal(a.score_topk(users, 5), b.score_topk(users, 5))
    assert baselines._SHARED_EASE is None  # nothing N x N is kept after the block


def test_itemcf_auto_self_follows_the_training_window_repeats():
    hist = _history()
    repeats = ItemCF(include_self="auto").fit(_replace_share(hist, 0.4))
    no_repeats = ItemCF(include_self="auto").fit(_replace_share(hist, 0.0))
    assert repeats.include_self is True and no_repeats.include_self is False
    with pytest.raises(ConfigError, match="include_self"):
        ItemCF(include_self="sometimes")


def _replace_share(hist: TrainHistory, share: float) -> TrainHistory:
    from dataclasses import replace

    return replace(hist, repeat_share=share)


def test_repeat_share_counts_last_day_conversions_seen_before():
    from convcg_cli.baselines import repeat_share

    user = np.array([0, 0, 1, 1, 2])
    item = np.array([5, 5, 6, 7, 8])
    day = np.array([0, 3, 3, -1, 3])  # -1: a user-history event, before the window
    converted = [False, True, True, False, True]
    assert repeat_share(user, item, day, converted) == pytest.approx(1 / 3)
    assert np.isnan(repeat_share(user, item, day, [False] * 5))


def test_baselines_see_the_history_only_when_the_run_does(tiny_data):
    cfg = compose("train", [f"data.dir={tiny_data}", TINY_SPLIT]).cfg
    plain = training_history(build_datamodule(cfg, TASKS, stage="validate"))
    cfg = compose("train", [f"data.dir={tiny_data}", TINY_SPLIT, "data.use_user_history=true"]).cfg
    dm = build_datamodule(cfg, TASKS, stage="validate")
    with_history = training_history(dm)
    assert len(with_history.user_pos) == len(plain.user_pos) + len(dm.history_pairs[0]) > len(plain.user_pos)
    np.testing.assert_array_equal(plain.popularity, with_history.popularity)
    assert not np.array_equal(with_history.history_popularity, with_history.popularity)
    assert len(with_history.validation[0]) > 0


# --- ItemCF's options derived from one cosine product (what baseline_tuning fits) ------------------


def _direct_itemcf_weights(x: sp.csr_matrix, include_self: bool, neighbours: int, shrinkage: float):
    """ItemCF's weights the direct way, one fit on its own: the cosine product, n_ij from a second
    product ``x.T @ x``, ``setdiag(0)`` and :func:`keep_top_per_row` over the whole matrix."""
    norms = np.sqrt(np.asarray(x.sum(axis=0)).ravel())
    inv = sp.diags(np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0))
    xn = (x @ inv).tocsc()
    sim = (xn.T @ xn).tocsr()
    if shrinkage > 0:
        together = (x.T @ x).tocsr()
        together.data = together.data / (together.data + shrinkage)
        sim = sim.multiply(together).tocsr()
    if not include_self:
        sim.setdiag(0.0)
        sim.eliminate_zeros()
    if neighbours:
        sim = keep_top_per_row(sim, neighbours).T.tocsr()
    return sim


def _assert_same_entries(got: sp.spmatrix, expected: sp.spmatrix) -> None:
    """The same stored entries with bit-identical values (no tolerance)."""
    got, expected = sp.csr_matrix(got, copy=True), sp.csr_matrix(expected, copy=True)
    got.sort_indices()
    expected.sort_indices()
    assert got.shape == expected.shape and got.nnz == expected.nnz
    np.testing.assert_array_equal(got.indptr, expected.indptr)
    np.testing.assert_array_equal(got.indices, expected.indices)
    np.testing.assert_array_equal(got.data, expected.data)  # exact: ties must stay ties


def _tied_history(seed: int, n_users: int = 60, n_items: int = 25, n_rows: int = 300) -> TrainHistory:
    """A random history with many tied similarities (few engagements per item) and tied popularity,
    and validation conversions of its own."""
    rng = np.random.default_rng(seed)
    return TrainHistory(
        user_pos=rng.integers(0, n_users - 2, size=n_rows),  # the last two users are cold
        item_pos=np.minimum(rng.zipf(1.6, size=n_rows) - 1, n_items - 1),  # power-law popularity
        n_users=n_users,
        n_items=n_items,
        popularity=rng.integers(0, 3, size=n_items).astype(np.float64),  # ties on purpose
        validation=(rng.integers(0, n_users, size=80), rng.integers(0, n_items, size=80)),
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_itemcf_variant_of_one_cosine_equals_its_direct_fit(seed):
    hist = _tied_history(seed)
    x = hist.matrix()
    options = [
        {"include_self": s, "neighbours": n, "shrinkage": w}
        for s in (True, False)
        for n in (None, 1, 2, 3, 7, 24, 25, 200)
        for w in (0.0, 0.5, 10.0)
    ]
    fitted = list(ItemCF.fit_each(options, hist))
    assert len(fitted) == len(options)
    for o, model in zip(options, fitted, strict=True):
        direct = _direct_itemcf_weights(x, o["include_self"], o["neighbours"] or 0, o["shrinkage"])
        _assert_same_entries(model.weights, direct)
        _assert_same_entries(ItemCF(**o).fit(hist).weights, direct)  # a fit on its own: the same
        assert model.include_self is o["include_self"] and model.profiles.shape == x.shape
    # a list longer than the similarity was ranked for is ranked again, not cut short
    similarity = ItemCFSimilarity(x, max_neighbours=1)
    for n in (1, 3, 6):
        _assert_same_entries(similarity.weights(False, n, 10.0), _direct_itemcf_weights(x, False, n, 10.0))


def test_shrinkage_counts_read_off_the_cosine_are_exact_for_many_users():
    # n_ij in the thousands: the counts read off the cosine must equal x.T @ x's, or shrinkage changes
    rng = np.random.default_rng(5)
    n_users, n_items = 20_000, 6
    user_pos, item_pos = np.nonzero(rng.random((n_users, n_items)) < np.linspace(0.05, 0.9, n_items))
    hist = TrainHistory(user_pos, item_pos, n_users, n_items, np.arange(n_items, dtype=float))
    x = hist.matrix()
    assert (x.T @ x).max() > 15_000
    for include_self, shrinkage in ((True, 1.0), (False, 3000.0)):
        model = ItemCF(include_self=include_self, shrinkage=shrinkage).fit(hist)
        _assert_same_entries(model.weights, _direct_itemcf_weights(x, include_self, 0, shrinkage))


def test_query_rows_narrow_to_int32_only_when_every_id_fits():
    from convcg_cli.baseline_scores import query_rows

    lists = np.array([[3, 1], [0, 2]], dtype=np.int64)
    got = query_rows(lists, np.array([1, 0, 1]))
    assert got.dtype == np.int32 and got.tolist() == [[0, 2], [3, 1], [0, 2]]
    assert query_rows(np.array([[2**31 - 1]], dtype=np.int64), np.array([0])).dtype == np.int32  # fits
    wide = np.array([[2**31, 1]], dtype=np.int64)  # an id past int32: kept as it is
    assert query_rows(wide, np.array([0, 0])).tolist() == [[2**31, 1]] * 2
    assert query_rows(wide, np.array([0])).dtype == np.int64
    assert query_rows(np.zeros((0, 3), dtype=np.int64), np.zeros(0, dtype=np.int64)).shape == (0, 3)
