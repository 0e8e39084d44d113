"""The one query encoding, ``QueryEncoder`` (training, evaluation and the served model): it encodes
exactly as the polars encoding it replaced (kept here as the reference) did, with the served
fallbacks; the served model ranks exactly (ids, score bits, order) as that encoding through the one
retrieval path does; request tables of every pandas column kind read as the same polars rows."""

from __future__ import annotations

import mlflow.pyfunc
import numpy as np
import pandas as pd
import polars as pl
import pytest

from convcg_cli.data.features import encodings as F
from convcg_cli.data.features.history import history_before
from convcg_cli.data.features.query_encoder import (
    LATEST,
    QueryEncoder,
    UserEvents,
    ints_and_nulls,
    positions_or_missing,
)
from convcg_cli.errors import ConvcgError
from convcg_cli.serve.bundle import COLD_START_USER_ID, RequestError, request_rows
from convcg_cli.specs import FeatureSpec


def reference_features(rows: pl.DataFrame, inputs: F.QueryInputs) -> dict[str, np.ndarray]:
    """The features the polars encoding makes of served request rows: an unknown user as the
    cold-start user (position 0), an unknown subject item as none, no timestamp as the latest."""
    user_ids = inputs.users.user_ids
    user_pos = np.searchsorted(user_ids, rows["user_id"].to_numpy()).clip(0, len(user_ids) - 1)
    user_pos = np.where(user_ids[user_pos] == rows["user_id"].to_numpy(), user_pos, 0)
    subject = rows["subject_item_id"]
    unknown_subject = ~subject.is_in(pl.Series(inputs.items.item_ids)).fill_null(False)
    encoded = pl.DataFrame(
        [
            pl.Series("user_id", user_ids[user_pos]),
            rows["surface"],
            subject.set(unknown_subject, None),
            rows["query_id"],
            rows["timestamp"].fill_null(LATEST),
        ]
    )
    return polars_encoding(encoded, inputs)


def polars_encoding(rows: pl.DataFrame, inputs: F.QueryInputs) -> dict[str, np.ndarray]:
    """The query features as ``build_query_features`` encoded them before ``QueryEncoder`` (one polars
    operation per feature over known users and subject items): an independent reference."""
    users, items, context = inputs.users, inputs.items, inputs.context
    user_pos = np.searchsorted(users.user_ids, rows["user_id"].to_numpy()).astype(np.int64)
    feats = {name: values[user_pos] for name, values in users.features.items()}
    surface_codes = {s: i + 1 for i, s in enumerate(inputs.surfaces)}
    feats["surface"] = (
        rows["surface"].replace_strict(surface_codes, return_dtype=pl.Int64).to_numpy().astype(np.int64)
    )
    subject = rows["subject_item_id"]
    subject_pos = np.searchsorted(items.item_ids, subject.fill_null(items.item_ids[0]).to_numpy()) + 1
    feats["subject_item_id"] = np.where(subject.is_null().to_numpy(), 0, subject_pos).astype(np.int64)
    query = rows["query_id"]
    buckets = (query.fill_null(0).to_numpy() % inputs.query_hash_buckets) + 1
    feats["query_bucket"] = np.where(query.is_null().to_numpy(), 0, buckets).astype(np.int64)
    for name in set(F.CONTEXT_FEATURES) - set(context):
        del feats[name]
    if "subject_item_id" in context:
        has_subject = ~subject.is_null().to_numpy()
        for name in items.spec.vectors:
            vectors = items.features[name][subject_pos - 1]  # (B, length)
            feats[f"subject_{name}"] = np.where(has_subject[:, None], vectors, 0.0).astype(np.float32)
    if inputs.history_max_len > 0:
        feats["history"], feats["history_actions"] = history_before(
            inputs.events,
            rows["user_id"].to_numpy(),
            rows["timestamp"].to_numpy(),
            items.item_ids,
            inputs.history_max_len,
        )
    return feats


def synthetic_inputs(
    history_max_len: int = 3, context: tuple[str, ...] = F.CONTEXT_FEATURES, seed: int = 0
) -> F.QueryInputs:
    """Served query inputs: 40 users after the cold-start user (zero attributes), 30 items with a
    content vector, engagement events with same-second ties and events of items outside the corpus."""
    rng = np.random.default_rng(seed)
    user_ids = np.concatenate([[COLD_START_USER_ID], np.sort(rng.choice(1000, 40, replace=False))])
    n = len(user_ids)
    users = F.UserTable(
        user_ids,
        {
            "user_id": np.arange(n, dtype=np.int64),
            "region_id": np.concatenate([[0], rng.integers(1, 6, n - 1)]).astype(np.int64),
            "account_age_days": np.concatenate([[0.0], rng.normal(size=n - 1)]).astype(np.float32),
        },
    )
    item_ids = np.sort(rng.choice(np.arange(100, 1000), 30, replace=False))
    vectors = {"content_emb": rng.normal(size=(30, 4)).astype(np.float32)}
    items = F.ItemTable(item_ids, vectors, FeatureSpec({}, (), {}, {"content_emb": 4}), pl.DataFrame())
    m = 300
    events = pl.DataFrame(
        {
            "user_id": rng.choice(user_ids[1:30], m),  # users 30.. have no events
            "timestamp": rng.integers(0, 50, m),  # many events share a second
            "item_id": np.where(rng.random(m) < 0.9, rng.choice(item_ids, m), 5),  # 5: not in the corpus
            "action": rng.integers(1, 4, m),
        }
    )
    return F.QueryInputs(
        users=users,
        items=items,
        surfaces=["search", "home_feed", "related_items"],  # not sorted: codes follow this order
        query_hash_buckets=16,
        context=context,
        events=events,
        history_max_len=history_max_len,
    )


def synthetic_rows(inputs: F.QueryInputs, n: int = 200, seed: int = 1) -> pl.DataFrame:
    """Checked request rows: known and unknown users, every surface, subject items known, unknown and
    absent, queries (negative ones too) and timestamps given or not."""
    rng = np.random.default_rng(seed)
    known = inputs.users.user_ids[1:]
    user = np.where(rng.random(n) < 0.8, rng.choice(known, n), rng.integers(-50, 2000, n))
    subject = np.where(rng.random(n) < 0.7, rng.choice(inputs.items.item_ids, n), rng.integers(0, 2000, n))
    return request_rows(
        pl.DataFrame(
            {
                "user_id": user,
                "surface": rng.choice(inputs.surfaces, n),
                "subject_item_id": pl.Series(subject).set(pl.Series(rng.random(n) < 0.3), None),
                "query_id": pl.Series(rng.integers(-40, 40, n)).set(pl.Series(rng.random(n) < 0.5), None),
                "timestamp": pl.Series(rng.integers(0, 60, n)).set(pl.Series(rng.random(n) < 0.3), None),
            }
        )
    )


def assert_same_features(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert list(got) == list(expected)  # the same features in the same order
    for name, values in expected.items():
        assert got[name].dtype == values.dtype, name
        assert got[name].shape == values.shape, name
        assert np.array_equal(got[name], values), name


@pytest.mark.parametrize(
    ("history_max_len", "context"),
    [
        (3, F.CONTEXT_FEATURES),
        (0, F.CONTEXT_FEATURES),
        (5, ("surface",)),
        (0, ("query_bucket", "subject_item_id")),
    ],
)
def test_encoder_encodes_as_the_polars_encoding(history_max_len, context):
    inputs = synthetic_inputs(history_max_len, context)
    rows = synthetic_rows(inputs)
    features = QueryEncoder(inputs, cold_start_user=True).encode(rows)
    assert_same_features(features, reference_features(rows, inputs))
    if history_max_len:  # the rows reach real histories, not only padding
        assert (features["history"] > 0).sum() > 50


def test_encoder_pins_the_codes_of_one_request_per_case():
    inputs = synthetic_inputs(history_max_len=0)
    users, items = inputs.users.user_ids, inputs.items.item_ids
    rows = request_rows(
        pl.DataFrame(
            {
                "user_id": [int(users[3]), -7, int(users[1])],
                "surface": ["home_feed", "search", "related_items"],
                "subject_item_id": [None, int(items[2]), 5],  # none, the third item, an unknown one
                "query_id": [35, -1, None],
            }
        )
    )
    f = QueryEncoder(inputs, cold_start_user=True).encode(rows)
    assert f["surface"].tolist() == [2, 1, 3]  # position in the served surfaces + 1
    assert f["query_bucket"].tolist() == [35 % 16 + 1, 16, 0]  # -1 % 16 = 15; no query: 0
    assert f["subject_item_id"].tolist() == [0, 3, 0]  # corpus position + 1; unknown: none
    assert f["user_id"].tolist() == [3, 0, 1]  # the unknown user is the cold-start user
    assert f["account_age_days"][1] == 0.0 and f["region_id"][1] == 0
    assert np.array_equal(f["subject_content_emb"][1], inputs.items.features["content_emb"][2])
    assert not f["subject_content_emb"][[0, 2]].any()  # no subject: zeros


def test_an_unknown_surface_is_a_request_error_naming_it():
    inputs = synthetic_inputs(history_max_len=0)
    rows = request_rows(pl.DataFrame({"user_id": [1, 2, 3], "surface": ["search", "moon", "aaa"]}))
    with pytest.raises(RequestError, match=r"Unknown surface\(s\) \['aaa', 'moon'\]"):
        QueryEncoder(inputs, cold_start_user=True).encode(rows)


def test_user_events_gives_the_events_of_the_users_asked_for():
    events = pl.DataFrame({"user_id": [5, 3, 5, 9, 3, 5], "timestamp": [1, 2, 3, 4, 5, 6]})
    grouped = UserEvents(events)
    assert sorted(grouped.of(np.array([5, 9, 5, 4])).rows()) == [(5, 1), (5, 3), (5, 6), (9, 4)]
    assert grouped.of(np.array([4, 7])).height == 0


def test_positions_and_nulls_helpers():
    assert positions_or_missing(np.array([2, 4, 8]), np.array([8, 2, 3, 9, 1])).tolist() == [2, 0, -1, -1, -1]
    assert positions_or_missing(np.array([], dtype=np.int64), np.array([1])).tolist() == [-1]
    values, nulls = ints_and_nulls(pl.Series([None, None], dtype=pl.Int64))
    assert values.tolist() == [0, 0] and nulls.tolist() == [True, True]
    values, nulls = ints_and_nulls(pl.Series([7, None, -2], dtype=pl.Int64))
    assert values.tolist() == [7, 0, -2] and nulls.tolist() == [False, True, False]


def test_predict_ranks_exactly_as_the_training_encoding_through_the_retriever(served):
    """ids, score bits and order of predict against the polars encoding -> Retriever.topk."""
    _, run_id = served
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    candidates = model.unwrap_python_model().model
    bundle = candidates.bundle
    users = [int(u) for u in bundle.users.user_ids[:30]] + [-1, 10**12]
    n = len(users)
    requests = pd.DataFrame(
        {
            "user_id": users,
            "surface": [bundle.surfaces[i % len(bundle.surfaces)] for i in range(n)],
            "subject_item_id": [float(bundle.item_ids[i]) if i % 3 == 0 else np.nan for i in range(n)],
            "query_id": [float(i) if i % 4 == 1 else np.nan for i in range(n)],
        }
    )
    k = 25
    out = model.predict(requests, params={"k": k})
    features = reference_features(request_rows(requests), bundle.query_inputs())
    scores, ids = candidates.retriever.topk(features, k)
    assert out["request"].tolist() == np.repeat(np.arange(n), k).tolist()
    assert out["rank"].tolist() == np.tile(np.arange(1, k + 1), n).tolist()
    assert np.array_equal(out["item_id"].to_numpy(), bundle.item_ids[ids.reshape(-1)])
    assert out["score"].to_numpy().tobytes() == scores.reshape(-1).tobytes()  # the same bits


@pytest.mark.parametrize(
    "surface",
    [
        pd.array(["search", "home_feed"], dtype="str"),  # pandas' default strings (Arrow)
        pd.array(["search", "home_feed"], dtype=pd.StringDtype("python")),
        pd.array(["search", "home_feed"], dtype="string[pyarrow]"),
        np.array(["search", "home_feed"], dtype=object),
    ],
)
def test_pandas_string_columns_read_as_the_polars_rows(surface):
    frame = pd.DataFrame(
        {"user_id": [4, 5], "surface": surface, "query_id": [np.nan, 3.0], "timestamp": pd.array([None, 9])}
    )
    expected = request_rows(
        pl.DataFrame(
            {
                "user_id": [4, 5],
                "surface": ["search", "home_feed"],
                "query_id": [None, 3],
                "timestamp": [None, 9],
            }
        )
    )
    got = request_rows(frame)
    assert got.schema == expected.schema and got.equals(expected)


def test_a_missing_surface_in_a_pandas_string_column_is_refused():
    frame = pd.DataFrame({"user_id": [4, 5], "surface": pd.array(["search", None], dtype="str")})
    with pytest.raises(RequestError, match="must be given on every row"):
        request_rows(frame)


def test_training_rows_are_encoded_as_before_and_an_unknown_user_is_refused():
    """Training and evaluation rows (no cold-start user): build_query_features encodes known users as
    the polars encoding did; a user missing from the users table is an error naming the count."""
    inputs = synthetic_inputs(history_max_len=3)
    rows = synthetic_rows(inputs)
    known = rows.filter(
        pl.col("user_id").is_in(pl.Series(inputs.users.user_ids[1:]).implode())
        & pl.col("subject_item_id").is_in(pl.Series(inputs.items.item_ids).implode()).fill_null(True)
        & pl.col("timestamp").is_not_null()
    )
    assert 50 < known.height < rows.height
    assert_same_features(F.build_query_features(known, inputs).features, polars_encoding(known, inputs))
    with pytest.raises(ConvcgError, match=r"^\d+ of 200 rows have a user_id missing from the users table"):
        F.build_query_features(rows, inputs)
