"""The user_history table: contract, importer lists, synthetic history, and the training cut-off."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from convcg_cli.data.contract import load_tables, validate_tables, write_tables
from convcg_cli.data.features import ACTION_CODES, as_training_rows, before_cutoff, history_positions
from convcg_cli.data.features.cofactors import ITEM_PREFIX, USER_PREFIX, engagement_matrix, fit_cofactors
from convcg_cli.data.features.encodings import SECONDS_PER_DAY, split_by_time
from convcg_cli.data.importing import HISTORY_ACTIONS, events_from_lists
from convcg_cli.data.loading import ImpressionDataModule

TASKS = ["conversion", "engagement"]


def test_synthetic_history_is_before_the_log_and_valid(tiny_tables):
    history, imp = tiny_tables["user_history"], tiny_tables["impressions"]
    assert history.height > 1000
    assert history["timestamp"].max() < imp["timestamp"].min()
    assert set(history["action"].unique()) == {"click", "save", "conversion"}


def test_user_history_is_optional(tmp_path, tiny_tables):
    without = {k: v for k, v in tiny_tables.items() if k != "user_history"}
    out = write_tables(without, tmp_path / "d")
    assert not (out / "user_history.parquet").exists()
    assert validate_tables(out) == []
    loaded = load_tables(out)["user_history"]
    assert loaded.height == 0 and loaded.columns == ["user_id", "item_id", "timestamp", "action"]


def test_user_history_rows_are_validated(tmp_path, tiny_tables):
    bad = tiny_tables["user_history"].with_columns(
        pl.when(pl.int_range(pl.len()) < 3).then(pl.lit("like")).otherwise("action").alias("action")
    )
    out = write_tables({**tiny_tables, "user_history": bad}, tmp_path / "d")
    violations = validate_tables(out)
    assert [(v.table, v.column, v.rows) for v in violations] == [("user_history", "action", 3)]


def test_events_from_lists_keeps_order_and_places_events_before_the_last_time():
    frame = pl.DataFrame(
        {"u": [1, 2], "watch": [[10, 11, 12], []], "like": [[11], [13]], "t": [5_000, 9_000]}
    )
    rows = events_from_lists(frame, "u", {"watch": "click", "like": "conversion"}, "t", 1e-3)
    assert rows.rows() == [
        (1, 10, 3, "click"),
        (1, 11, 4, "click"),
        (1, 11, 5, "conversion"),
        (1, 12, 5, "click"),
        (2, 13, 9, "conversion"),
    ]
    with pytest.raises(ValueError, match="unknown action"):
        events_from_lists(frame, "u", {"watch": "like"}, "t", 1e-3)


def test_the_importer_and_the_features_know_the_contract_s_history_actions(schemas):
    # Importing writes them (HISTORY_ACTIONS), training codes them (ACTION_CODES): the same three.
    allowed = schemas["user_history"].column("action").allowed
    assert set(HISTORY_ACTIONS) == set(allowed) == set(ACTION_CODES)
    with pytest.raises(ValueError, match=r"expected one of \['click', 'conversion', 'save'\]"):
        events_from_lists(pl.DataFrame({"u": [1], "l": [[2]]}), "u", {"l": "like"}, None, 1.0)


def test_history_positions_drop_unknown_ids():
    h = pl.DataFrame(
        {
            "user_id": [5, 6, 5],
            "item_id": [100, 100, 999],
            "timestamp": [1, 2, 3],
            "action": ["click", "conversion", "save"],
        }
    )
    users, items, actions = history_positions(h, np.array([5, 6]), np.array([100, 200]))
    assert users.tolist() == [0, 1] and items.tolist() == [0, 0] and actions.tolist() == [1, 3]


def test_before_cutoff_is_strict():
    h = pl.DataFrame({"user_id": [1, 1], "item_id": [2, 3], "timestamp": [99, 100], "action": ["click"] * 2})
    assert before_cutoff(h, 100)["item_id"].to_list() == [2]


def test_history_as_training_rows_match_the_impression_columns(tiny_tables):
    imp = tiny_tables["impressions"]
    rows = as_training_rows(tiny_tables["user_history"], imp, "home_feed", 5)
    assert rows.columns == imp.columns and rows.schema == imp.schema
    assert rows.group_by("user_id").len()["len"].max() <= 5
    assert (
        rows["clicked"].all()
        and rows["subject_item_id"].is_null().all()
        and rows["dwell_seconds"].is_null().all()
    )
    assert 0 < rows["converted"].sum() < rows.height and (rows["surface"] == "home_feed").all()


def _dm(data_dir, **kw) -> ImpressionDataModule:
    kw.setdefault("cofactors", {"dim": 8})
    dm = ImpressionDataModule(str(data_dir), tasks=TASKS, use_user_history=True, **kw)
    dm.setup()
    return dm


def test_a_planted_future_event_changes_nothing(tmp_path, tiny_tables):
    """History at or after the first validation day never reaches a feature, a baseline or an example."""
    split = split_by_time(tiny_tables["impressions"], 2, 2)
    val_start = split.days["val"][0] * SECONDS_PER_DAY
    history = tiny_tables["user_history"]
    future = history.head(200).with_columns(
        pl.lit(val_start, pl.Int64).alias("timestamp")
    )  # the cut-off itself
    later = history.tail(200).with_columns(pl.col("timestamp") * 0 + val_start + 3 * SECONDS_PER_DAY)
    clean = write_tables(tiny_tables, tmp_path / "clean")
    planted = write_tables(
        {**tiny_tables, "user_history": pl.concat([history, future, later])}, tmp_path / "p"
    )
    kw = {"history_examples": {"max_per_user": 3}, "history": {"max_len": 5}}
    a, b = _dm(clean, **kw), _dm(planted, **kw)
    for name in a.items.features:
        np.testing.assert_array_equal(a.items.features[name], b.items.features[name], err_msg=name)
    for name in a.users.features:
        np.testing.assert_array_equal(a.users.features[name], b.users.features[name], err_msg=name)
    for x, y in zip(a.history_pairs, b.history_pairs, strict=True):
        np.testing.assert_array_equal(x, y)
    for split_name in ("val", "heldout"):
        for name, values in a.queries[split_name].features.items():
            np.testing.assert_array_equal(values, b.queries[split_name].features[name], err_msg=name)
    assert a.train_set.n_examples == b.train_set.n_examples
    np.testing.assert_array_equal(a.train_set.item_pos.numpy(), b.train_set.item_pos.numpy())


def test_cofactor_features_reach_both_towers(tiny_dir):
    dm = _dm(tiny_dir)
    assert {f"{ITEM_PREFIX}{j}" for j in range(8)} <= set(dm.item_spec.numeric)
    assert {f"{USER_PREFIX}{j}" for j in range(8)} <= set(dm.user_spec.numeric)
    off = ImpressionDataModule(str(tiny_dir), tasks=TASKS)
    off.setup()
    assert not any(n.startswith("cofactor_") for n in (*off.item_spec.numeric, *off.user_spec.numeric))
    assert len(off.history_pairs[0]) == 0


def test_history_examples_add_training_rows(tiny_dir):
    base = _dm(tiny_dir)
    more = _dm(tiny_dir, history_examples={"max_per_user": 2})
    n_users_with_history = base.pre_cutoff_history["user_id"].n_unique()
    assert more.train_set.n_examples - base.train_set.n_examples <= 2 * n_users_with_history
    assert more.train_set.n_examples > base.train_set.n_examples


def test_history_examples_need_the_history(tiny_dir):
    from convcg_cli.errors import ConfigError

    with pytest.raises(ConfigError, match="use_user_history"):
        ImpressionDataModule(str(tiny_dir), tasks=TASKS, history_examples={"max_per_user": 2})


def test_cofactors_recover_a_planted_block_structure():
    """Two user groups (25 and 15 users) engage with two disjoint item groups: each of the two
    factors is non-zero on one group's items only."""
    users = np.repeat(np.arange(40), 5)
    items = np.where(users < 25, 0, 10) + np.tile(np.arange(5), 40) * 2 % 10
    f = fit_cofactors(engagement_matrix(users, items, 40, 20), dim=2, seed=0)
    engaged = np.unique(items)
    a, b = engaged[engaged < 10], engaged[engaged >= 10]
    for j in range(2):  # one factor spans group a's items, the other group b's
        on_a, on_b = np.ptp(f.item[a, j]) < 1e-5, np.ptp(f.item[b, j]) < 1e-5
        assert on_a and on_b and f.item[a[0], j] != f.item[b[0], j]
    never = np.setdiff1d(np.arange(20), engaged)
    assert np.all(f.item[never] == 0)
    g = fit_cofactors(engagement_matrix(users, items, 40, 20), dim=2, seed=0)
    np.testing.assert_array_equal(f.item, g.item)  # deterministic for a seed


def test_streamed_path_gets_the_same_history_features(tmp_path, tiny_dir):
    from convcg_cli.data.loading import InMemoryDataModule, StreamedDataModule

    kw = {"tasks": TASKS, "use_user_history": True, "cofactors": {"dim": 8}}
    memory = InMemoryDataModule(str(tiny_dir), **kw)
    memory.setup("validate")
    streamed = StreamedDataModule(
        str(tiny_dir), stream={"chunk_rows": 40_000, "cache_dir": str(tmp_path)}, **kw
    )
    streamed.setup("validate")
    for name, values in memory.items.features.items():
        np.testing.assert_allclose(streamed.items.features[name], values, atol=1e-5, err_msg=name)
    assert memory.item_spec == streamed.item_spec and memory.user_spec == streamed.user_spec
    for x, y in zip(memory.history_pairs, streamed.history_pairs, strict=True):
        np.testing.assert_array_equal(x, y)


def test_profile_share_is_exactly_the_items_part_of_a_profile():
    """A profile minus an item's share equals the profile of the same row without that item,
    projected with the fitted factors (the profile is linear in the user's row)."""
    rng = np.random.default_rng(0)
    users, items = rng.integers(0, 30, 400), rng.integers(0, 25, 400)
    x = engagement_matrix(users, items, 30, 25)
    f = fit_cofactors(x, dim=4, seed=0)
    dense = x.toarray()
    u = int(np.argmax(dense.sum(axis=1)))
    engaged = np.flatnonzero(dense[u])
    i = int(engaged[0])
    # project rows through the profile map p(row) = (row @ share - mean) with the same mean:
    # share @ row reproduces every engaged user's profile up to one constant offset per column
    offset = f.user[u] - dense[u] @ f.profile_share
    other = int(np.flatnonzero(dense.sum(axis=1) > 0)[-1])
    np.testing.assert_allclose(f.user[other] - dense[other] @ f.profile_share, offset, atol=1e-4)
    without = dense[u].copy()
    without[i] = 0.0
    np.testing.assert_allclose(f.user[u] - f.profile_share[i], without @ f.profile_share + offset, atol=1e-4)
    assert np.all(f.profile_share[dense.sum(axis=0) == 0] == 0)  # never-engaged items have no share


def test_leave_target_out_removes_each_examples_item_from_its_profile(tiny_dir):
    plain = _dm(tiny_dir)
    loo = _dm(tiny_dir, cofactors={"dim": 8, "leave_target_out": True})
    assert plain.profile_shares is None and loo.profile_shares is not None
    idx = torch.arange(64)
    a, b = plain.train_set.batch(idx), loo.train_set.batch(idx)
    np.testing.assert_array_equal(a["item_pos"], b["item_pos"])
    name = f"{USER_PREFIX}0"
    expected = a["user"][name] - loo.profile_shares[name][a["item_pos"]]
    torch.testing.assert_close(b["user"][name], expected)
    assert not torch.equal(a["user"][name], b["user"][name])
    torch.testing.assert_close(a["user"]["user_id"], b["user"]["user_id"])
