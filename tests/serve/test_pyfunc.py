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
    assert len(out) == n * K
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
