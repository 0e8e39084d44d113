"""User history: engagement events, and each request's past strictly before it, against brute force.

The property that matters is "no item from the future": every item in a request's history was engaged
strictly before the request, and they are the latest such items, most recent first.
"""

import numpy as np
import polars as pl
import pytest

from convcg_cli.data.features import (
    ACTION_CLICK,
    ACTION_CONVERSION,
    ACTION_SAVE,
    engagement_events,
    history_before,
)
from convcg_cli.data.features.encodings import engaged_rows, split_by_time
from convcg_cli.tasks import TASK_LABELS


def _events(user, ts, item, action) -> pl.DataFrame:
    return pl.DataFrame({"user_id": user, "timestamp": ts, "item_id": item, "action": action}).cast(pl.Int64)


def _brute_force(events: pl.DataFrame, req_user, req_ts, item_ids, max_len: int):
    """Per-request Python reference: filter, sort by (ts, item, action) descending, take max_len."""
    rows = [r for r in events.iter_rows(named=True) if r["item_id"] in set(item_ids.tolist())]
    items = np.zeros((len(req_user), max_len), dtype=np.int64)
    actions = np.zeros_like(items)
    for q, (u, t) in enumerate(zip(req_user.tolist(), req_ts.tolist(), strict=True)):
        past = [r for r in rows if r["user_id"] == u and r["timestamp"] < t]
        past.sort(key=lambda r: (r["timestamp"], r["item_id"], r["action"]), reverse=True)
        for j, r in enumerate(past[:max_len]):
            items[q, j] = int(np.searchsorted(item_ids, r["item_id"])) + 1
            actions[q, j] = r["action"]
    return items, actions


def _polars_reference(events: pl.DataFrame, req_user, req_ts, item_ids, max_len: int):
    """The same answer by a join (user) + filter (ts < t) + top-L per request, for larger inputs."""
    pos = pl.col("item_id").replace_strict(item_ids, np.arange(len(item_ids)), default=-1)
    past = (
        pl.DataFrame({"req": np.arange(len(req_user)), "user_id": req_user, "t": req_ts})
        .join(events.with_columns(pos.alias("pos")).filter(pl.col("pos") >= 0), on="user_id")
        .filter(pl.col("timestamp") < pl.col("t"))
        .sort(["req", "timestamp", "pos", "action"], descending=[False, True, True, True])
        .with_columns(pl.int_range(pl.len()).over("req").alias("slot"))
        .filter(pl.col("slot") < max_len)
    )
    items = np.zeros((len(req_user), max_len), dtype=np.int64)
    actions = np.zeros_like(items)
    r, s = past["req"].to_numpy(), past["slot"].to_numpy()
    items[r, s] = past["pos"].to_numpy() + 1
    actions[r, s] = past["action"].to_numpy()
    return items, actions


def _random_case(seed: int, n_users: int, n_events: int, n_requests: int, n_items: int, span: int):
    rng = np.random.default_rng(seed)
    events = _events(
        rng.integers(0, n_users, n_events),
        rng.integers(0, span, n_events),  # small span: many same-second ties
        rng.integers(0, n_items, n_events) * 10,
        rng.integers(1, 4, n_events),
    )
    # Some requesting users have no events at all (ids n_users .. n_users + 2).
    req_user = rng.integers(0, n_users + 3, n_requests)
    req_ts = rng.integers(-2, span + 2, n_requests)
    return events, req_user, req_ts, np.arange(n_items) * 10


def test_engagement_events_keeps_engaged_rows_with_strongest_action() -> None:
    imp = pl.DataFrame(
        {
            "user_id": [2, 1, 1, 1, 1, 1],
            "timestamp": [50, 40, 30, 20, 10, 60],
            "item_id": [7, 6, 5, 4, 3, 2],
            "clicked": [True, True, True, False, True, False],
            "saved": [False, True, True, True, False, False],
            "converted": [False, True, False, False, False, False],
        }
    )
    ev = engagement_events(imp)
    assert ev.columns == ["user_id", "timestamp", "item_id", "action"]
    # Sorted by (user, time); the unengaged impression (item 2) is gone.
    assert ev.rows() == [
        (1, 10, 3, ACTION_CLICK),
        (1, 20, 4, ACTION_SAVE),
        (1, 30, 5, ACTION_SAVE),
        (1, 40, 6, ACTION_CONVERSION),
        (2, 50, 7, ACTION_CLICK),
    ]


def test_history_before_pinned_example() -> None:
    # Rows deliberately unsorted. User 1: items 100, 200 (twice), 300, 400 (same second as 300);
    # item 999 is not in the corpus and must neither crash nor take a slot.
    events = _events(
        user=[1, 1, 2, 1, 1, 1, 1],
        ts=[30, 10, 15, 20, 30, 40, 25],
        item=[400, 100, 300, 200, 300, 200, 999],
        action=[1, 3, 2, 1, 2, 1, 3],
    )
    item_ids = np.array([100, 200, 300, 400])  # positions 0..3 -> codes 1..4
    req_user = np.array([1, 1, 1, 1, 2, 3])
    req_ts = np.array([10, 11, 30, 100, 16, 100])
    items, actions = history_before(events, req_user, req_ts, item_ids, max_len=3)
    np.testing.assert_array_equal(
        items,
        [
            [0, 0, 0],  # at t=10 the event at t=10 is not strictly before
            [1, 0, 0],
            [2, 1, 0],  # t=30 excludes both events at 30
            [2, 4, 3],  # last 3: 200@40, then the two at 30 (larger item id counts as later)
            [3, 0, 0],
            [0, 0, 0],  # user 3 has no events
        ],
    )
    np.testing.assert_array_equal(actions, [[0, 0, 0], [3, 0, 0], [1, 3, 0], [1, 1, 2], [2, 0, 0], [0, 0, 0]])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_history_before_matches_brute_force(seed: int) -> None:
    events, req_user, req_ts, item_ids = _random_case(
        seed, n_users=4, n_events=40, n_requests=30, n_items=6, span=12
    )
    # One event of an item outside the corpus.
    events = pl.concat([events, _events([0], [3], [12345], [1])])
    got = history_before(events, req_user, req_ts, item_ids, max_len=4)
    want = _brute_force(events, req_user, req_ts, item_ids, max_len=4)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    assert (got[0] > 0).sum() > 20  # the case is not trivially empty


def test_no_item_from_the_future_on_a_larger_random_case() -> None:
    # Every event has its own item, so an item code identifies the event and its timestamp.
    rng = np.random.default_rng(7)
    n_events, n_users, max_len = 20_000, 300, 8
    ev_user = rng.integers(0, n_users, n_events)
    ev_ts = rng.integers(0, 5_000, n_events)
    ev_item = rng.permutation(n_events) * 3 + 1
    events = _events(ev_user, ev_ts, ev_item, rng.integers(1, 4, n_events))
    item_ids = np.sort(ev_item)
    req_user = rng.integers(0, n_users + 5, 10_000)
    req_ts = rng.integers(0, 5_000, 10_000)
    items, actions = history_before(events, req_user, req_ts, item_ids, max_len)

    valid = items > 0
    np.testing.assert_array_equal(valid, actions > 0)
    # Right-padded: once a slot is padding, every later slot is too.
    assert not (~valid[:, :-1] & valid[:, 1:]).any()
    # Look up each returned event by its item.
    event_of_pos = np.empty(n_events, dtype=np.int64)
    event_of_pos[np.searchsorted(item_ids, ev_item)] = np.arange(n_events)
    ev = event_of_pos[np.where(valid, items - 1, 0)]  # (R, L)
    rows = np.broadcast_to(np.arange(len(req_user))[:, None], items.shape)
    assert (ev_user[ev][valid] == req_user[rows][valid]).all()
    assert (ev_ts[ev][valid] < req_ts[rows][valid]).all()  # strictly before: nothing from the future
    ts = np.where(valid, ev_ts[ev], -1)
    assert (np.diff(ts, axis=1)[valid[:, 1:]] <= 0).all()  # most recent first
    # ... and they are the latest ones: exactly what an independent join-based reference picks.
    want_items, want_actions = _polars_reference(events, req_user, req_ts, item_ids, max_len)
    np.testing.assert_array_equal(items, want_items)
    np.testing.assert_array_equal(actions, want_actions)
    assert valid[:, -1].mean() > 0.5  # most rows are full, so truncation to max_len is exercised


def test_history_on_synthetic_logs_never_includes_the_request_itself(tiny_tables) -> None:
    imp = tiny_tables["impressions"]
    events = engagement_events(imp)
    # The held-out evaluation queries: each is an engaged impression, itself one of the events.
    heldout = engaged_rows(split_by_time(imp, val_days=2, heldout_days=2).heldout, list(TASK_LABELS))
    item_ids = np.sort(tiny_tables["items"]["item_id"].to_numpy())
    req_user, req_ts = heldout["user_id"].to_numpy(), heldout["timestamp"].to_numpy()
    items, actions = history_before(events, req_user, req_ts, item_ids, max_len=5)
    want = _polars_reference(events, req_user, req_ts, item_ids, max_len=5)
    np.testing.assert_array_equal(items, want[0])
    np.testing.assert_array_equal(actions, want[1])
    # Held-out requests also see earlier held-out-day engagements, as serving would.
    before_heldout = events.filter(pl.col("timestamp") < heldout["timestamp"].min())
    assert (history_before(before_heldout, req_user, req_ts, item_ids, max_len=5)[0] != items).any()


def test_users_without_history_get_all_padding() -> None:
    events = _events([5, 5], [100, 200], [1, 2], [1, 2])
    items, actions = history_before(events, np.array([6, 5, 7]), np.array([300, 100, 0]), np.array([1, 2]), 2)
    np.testing.assert_array_equal(items, [[0, 0], [0, 0], [0, 0]])
    np.testing.assert_array_equal(actions, [[0, 0], [0, 0], [0, 0]])
    empty = _events([], [], [], [])
    items, _ = history_before(empty, np.array([5]), np.array([300]), np.array([1, 2]), 3)
    assert items.shape == (1, 3) and not items.any()
    items, _ = history_before(
        events, np.array([], dtype=np.int64), np.array([], dtype=np.int64), np.array([1]), 3
    )
    assert items.shape == (0, 3)


def test_huge_time_span_falls_back_to_time_ranks() -> None:
    # Seconds since the first event would overflow user * stride: the rank path must agree.
    events, req_user, req_ts, item_ids = _random_case(
        3, n_users=4, n_events=40, n_requests=30, n_items=6, span=12
    )
    scale = 2**58  # span ~ 13 * 2**58; 4 users * span > 2**62
    events = events.with_columns(pl.col("timestamp") * scale)
    got = history_before(events, req_user, req_ts * scale, item_ids, max_len=4)
    want = _brute_force(events, req_user, req_ts * scale, item_ids, max_len=4)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def test_bad_arguments_raise() -> None:
    events = _events([1], [1], [1], [1])
    with pytest.raises(ValueError, match="max_len"):
        history_before(events, np.array([1]), np.array([2]), np.array([1]), 0)
    with pytest.raises(ValueError, match="one length"):
        history_before(events, np.array([1, 2]), np.array([2]), np.array([1]), 3)
