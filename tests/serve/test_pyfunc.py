"""The run's pyfunc model: ``mlflow.pyfunc.load_model('runs:/ID/model')`` ranks as ``convcg eval`` does,
falls back for unknown ids, and refuses malformed requests with MLflow's 400 error code."""

from __future__ import annotations

import mlflow.pyfunc
import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from convcg_cli import tracking
from convcg_cli.blend import with_bias
from convcg_cli.builders import build_datamodule
from convcg_cli.evaluate import embed_split, load_trained_model, served_blend
from convcg_cli.index import ExactIndex
from convcg_cli.serve.pyfunc import Candidates
from tests.serve.conftest import store_of

K = 20


def heldout_requests(dm, n: int) -> pd.DataFrame:
    """The first ``n`` held-out evaluation queries as request rows (their encoded features inverted)."""
    f = {name: values[:n] for name, values in dm.queries["heldout"].features.items()}
    subject = np.where(f["subject_item_id"] > 0, dm.items.item_ids[f["subject_item_id"] - 1], np.nan)
    return pd.DataFrame(
        {
            "user_id": dm.users.user_ids[f["user_id"] - 1],
            "surface": [dm.surfaces[code - 1] for code in f["surface"]],
            "subject_item_id": subject,
            "query_id": np.where(f["query_bucket"] > 0, f["query_bucket"] - 1, np.nan),
        }
    )


@pytest.fixture(scope="module")
def eval_side(served_home, tmp_path_factory):
    """The run rebuilt as ``convcg eval`` rebuilds it: data module, model, held-out top-K."""
    home, run_id = served_home
    store = store_of(home)
    downloads = tmp_path_factory.mktemp("downloads")
    train_cfg = tracking.load_run_config(store, run_id, downloads)
    dm = build_datamodule(train_cfg, list(train_cfg.loss.task_weights.keys()), stage="validate")
    model = load_trained_model(train_cfg, dm, tracking.download_checkpoint(store, run_id, downloads), run_id)
    blend = served_blend(store, run_id, model, dm, {"betas": None})  # the run's own, as eval reads it
    assert blend is not None and (blend.beta, blend.gamma) == (0.3, 0.5)
    query_emb, item_emb = with_bias(
        embed_split(model, dm, "heldout"), model.embed_items(dm.item_features), blend.bias
    )
    scores, ids = ExactIndex(item_emb).search(query_emb, K)
    return dm, scores, ids


def test_predict_returns_what_eval_ranks(served, eval_side):
    _, run_id = served
    dm, eval_scores, eval_ids = eval_side
    n = 40
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    out = model.predict(heldout_requests(dm, n), params={"k": K})
    assert list(out.columns) == ["request", "rank", "item_id", "score"]
    assert type(out) is Candidates and len(out) == n * K
    assert (out.groupby("request")["rank"].apply(list) == [list(range(1, K + 1))] * n).all()
    items = out["item_id"].to_numpy().reshape(n, K)
    assert np.array_equal(items, dm.items.item_ids[eval_ids[:n]])
    np.testing.assert_allclose(out["score"].to_numpy().reshape(n, K), eval_scores[:n], rtol=1e-5, atol=1e-6)


def test_unknown_user_and_subject_item_fall_back_without_failing(served, eval_side):
    _, run_id = served
    dm, _, _ = eval_side
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    requests = pd.DataFrame(
        {
            "user_id": [-5, int(dm.users.user_ids.max()) + 1000],
            "surface": ["home_feed", "related_items"],
            "subject_item_id": [np.nan, float(dm.items.item_ids.max() + 1000)],
        }
    )
    out = model.predict(requests, params={"k": 7})
    assert out.groupby("request").size().tolist() == [7, 7]
    assert out["item_id"].isin(dm.items.item_ids).all()
    assert np.isfinite(out["score"]).all()


@pytest.mark.parametrize(
    ("requests", "message"),
    [
        (pd.DataFrame({"user_id": [1]}), "surface"),
        (pd.DataFrame({"user_id": [1], "surface": ["the_moon"]}), "Unknown surface"),
        (pd.DataFrame({"user_id": ["x"], "surface": ["home_feed"]}), "user_id"),
    ],
)
def test_malformed_request_is_an_invalid_parameter_error(served, requests, message):
    _, run_id = served
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    with pytest.raises(MlflowException, match=message) as info:
        model.predict(requests)
    assert info.value.error_code == "INVALID_PARAMETER_VALUE"


def test_k_below_one_is_an_invalid_parameter_error(served):
    _, run_id = served
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    with pytest.raises(MlflowException, match="k must be a positive integer") as info:
        model.predict(pd.DataFrame({"user_id": [1], "surface": ["home_feed"]}), params={"k": 0})
    assert info.value.error_code == "INVALID_PARAMETER_VALUE"


def test_model_has_a_signature_with_the_k_param_and_an_input_example(served):
    _, run_id = served
    info = mlflow.models.get_model_info(f"runs:/{run_id}/model")
    assert info.signature.params.to_dict()[0]["name"] == "k"
    assert [c["name"] for c in info.signature.inputs.to_dict()][:2] == ["user_id", "surface"]
    assert info.saved_input_example_info is not None


def _records_json(frame: pd.DataFrame) -> str:
    """The answer ``mlflow models serve`` writes for ``frame`` (its own function)."""
    from io import StringIO

    from mlflow.pyfunc.scoring_server import predictions_to_json

    out = StringIO()
    predictions_to_json(frame, out)
    return out.getvalue()


@pytest.mark.parametrize("n", [0, 1, 100])
def test_candidates_records_are_pandas_own_and_the_same_json(n):
    rng = np.random.default_rng(n)
    columns = {
        "request": np.repeat(np.arange(n // 10 + 1, dtype=np.int64), 10)[:n],
        "rank": np.arange(1, n + 1, dtype=np.int64),
        "item_id": rng.integers(-(2**62), 2**62, n),
        "score": rng.standard_normal(n).astype(np.float32),
    }
    if n:
        columns["score"][0] = np.nan
        columns["item_id"][-1] = np.iinfo(np.int64).max
    fast, plain = Candidates(columns, copy=False), pd.DataFrame(columns, copy=False)
    assert type(fast.to_dict(orient="records")) is list
    # str: the values and their Python types (np.int64(1) prints otherwise), NaN included
    assert str(fast.to_dict(orient="records")) == str(plain.to_dict(orient="records"))
    assert _records_json(fast) == _records_json(plain)
    for orient in ("dict", "list", "split", "index", "tight"):  # pandas' own
        assert str(fast.to_dict(orient=orient)) == str(plain.to_dict(orient=orient))
    assert type(fast.head()) is pd.DataFrame and type(fast[["score"]]) is pd.DataFrame


def test_candidates_records_leave_other_columns_to_pandas():
    from collections import OrderedDict

    mixed = {"item_id": np.arange(3), "surface": ["a", "b", None], "seen": np.array([True, False, True])}
    fast, plain = Candidates(mixed), pd.DataFrame(mixed)
    assert fast.to_dict(orient="records") == plain.to_dict(orient="records")
    assert _records_json(fast) == _records_json(plain)
    numbers = Candidates({"a": [1, 2], "b": [0.5, 1.5]})
    records = numbers.to_dict(orient="records", into=OrderedDict)
    assert all(type(r) is OrderedDict for r in records) and records[1] == {"a": 2, "b": 1.5}
    assert Candidates({"a": [1, 2]}, index=[5, 6]).to_dict(orient="records") == [{"a": 1}, {"a": 2}]
    same_name = Candidates(np.arange(4).reshape(2, 2), columns=["a", "a"])
    assert same_name.to_dict(orient="records") == pd.DataFrame(
        np.arange(4).reshape(2, 2), columns=["a", "a"]
    ).to_dict(orient="records")


def test_candidates_records_of_numbers_do_not_box_through_pandas(monkeypatch):
    frame = Candidates({"request": np.zeros(2, np.int64), "score": np.array([0.5, 0.25], np.float32)})
    monkeypatch.setattr(pd.DataFrame, "to_dict", lambda *args, **kwargs: pytest.fail("pandas' to_dict"))
    assert frame.to_dict(orient="records") == [{"request": 0, "score": 0.5}, {"request": 0, "score": 0.25}]
