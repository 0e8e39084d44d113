"""The index travels with the model: saved in the logged model (faiss's file, with the digest of the
item vectors it was built from), read back without rebuilding and answering with the same bits as a
fresh build; rebuilt, saying why, when it does not match; ``convcg index`` interrupted before its
rename leaves the old model served; an IVF index's overlap with exact is logged and kept in the
bundle; the vectorised request path answers as the polars path did."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd
import polars as pl
import pytest
from mlflow.artifacts import download_artifacts
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from convcg_cli.cli import app
from convcg_cli.index import ExactIndex, vectors_digest
from convcg_cli.serve import bundle as bundle_module
from convcg_cli.serve.bundle import INDEX_FILE, META_FILE, ServingBundle, write_index_atomically
from convcg_cli.serve.model import CandidateModel
from convcg_cli.serve.pyfunc import BUNDLE_ARTIFACT

runner = CliRunner()


def _requests(bundle: ServingBundle) -> pd.DataFrame:
    """Known and unknown users on every surface, a subject item given, unknown or absent, a query id."""
    users = [int(u) for u in bundle.users.user_ids[:5]] + [-1]
    return pd.DataFrame(
        {
            "user_id": users,
            "surface": [bundle.surfaces[i % len(bundle.surfaces)] for i in range(len(users))],
            "subject_item_id": [float(bundle.item_ids[0]), np.nan, 1e12, np.nan, np.nan, np.nan],
            "query_id": [np.nan, 3, np.nan, 5, np.nan, np.nan],
        }
    )


def _bundle_dir(run_id: str, tmp_path) -> Path:
    """The bundle directory of the run's newest model, downloaded under ``tmp_path``."""
    local = download_artifacts(artifact_uri=f"runs:/{run_id}/model", dst_path=str(tmp_path))
    return Path(local) / "artifacts" / BUNDLE_ARTIFACT


def _same_answers(served: CandidateModel, fresh: CandidateModel, requests: pd.DataFrame, k: int) -> None:
    got, expected = served.rank(requests, k), fresh.rank(requests, k)
    for name in ("request", "rank", "item_id"):
        assert np.array_equal(got[name], expected[name]), name
    assert got["score"].tobytes() == expected["score"].tobytes()  # the same bits


def test_the_logged_model_loads_its_saved_index_without_rebuilding(served, tmp_path, caplog):
    _, run_id = served
    with caplog.at_level(logging.WARNING):
        model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model").unwrap_python_model().model
    assert "Rebuilding" not in caplog.text
    bundle = model.bundle
    stored = bundle.stored_index
    assert stored is not None and stored.index is model.retriever.index and stored.problem == ""
    assert stored.digest == vectors_digest(bundle.index_vectors())
    assert bundle.item_bias is not None  # the blend's coordinate travels in the saved vectors
    assert stored.index.dim == bundle.item_emb.shape[1] + 1
    meta = json.loads((_bundle_dir(run_id, tmp_path) / META_FILE).read_text())
    assert meta["index_file"] == {
        "file": INDEX_FILE,
        "vectors_sha256": stored.digest,
        "options": {"kind": "exact"},
    }
    fresh = CandidateModel(dataclasses.replace(bundle, stored_index=None))  # built now
    assert fresh.retriever.index is not model.retriever.index
    _same_answers(model, fresh, _requests(bundle), k=50)


@pytest.mark.parametrize("damage", ["digest", "missing", "garbage"])
def test_an_index_that_does_not_match_is_rebuilt_saying_why(served, tmp_path, caplog, damage):
    _, run_id = served
    directory = _bundle_dir(run_id, tmp_path)
    meta_path, index_path = directory / META_FILE, directory / INDEX_FILE
    if damage == "digest":  # as if the items had changed after the index was built
        meta = json.loads(meta_path.read_text())
        meta["index_file"]["vectors_sha256"] = "0" * 64
        meta_path.write_text(json.dumps(meta))
    elif damage == "missing":  # a model logged before indexes were saved
        index_path.unlink()
    else:
        index_path.write_bytes(b"not a faiss index")
    bundle = ServingBundle.read(directory)
    with caplog.at_level(logging.WARNING):
        model = CandidateModel(bundle)
    reason = {
        "digest": "other item vectors",
        "missing": f"holds no {INDEX_FILE}",
        "garbage": "could not be read",
    }
    assert "Rebuilding the served exact index" in caplog.text and reason[damage] in caplog.text
    assert bundle.stored_index is not None and bundle.stored_index.problem == ""  # the rebuilt one
    assert bundle.stored_index.digest == vectors_digest(bundle.index_vectors())
    fresh = CandidateModel(dataclasses.replace(bundle, stored_index=None))
    _same_answers(model, fresh, _requests(bundle), k=20)


def test_index_interrupted_before_its_rename_leaves_the_old_model(served, tiny_data, tmp_path, monkeypatch):
    _, run_id = served
    before = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    old_ids = before.unwrap_python_model().model.bundle.item_ids
    client = MlflowClient()
    experiment = client.get_run(run_id).info.experiment_id
    models_before = len(client.search_logged_models(experiment_ids=[experiment]))
    items = pl.read_parquet(tiny_data / "items.parquet").sort("item_id").slice(20)  # a smaller corpus
    items.write_parquet(tmp_path / "new_items.parquet")

    def crash(partial, target):
        raise RuntimeError("injected: killed before the index was renamed into place")

    monkeypatch.setattr(bundle_module, "_move_into_place", crash)
    result = runner.invoke(app, ["index", "--run", run_id, "--items", str(tmp_path / "new_items.parquet")])
    assert result.exit_code != 0
    assert len(client.search_logged_models(experiment_ids=[experiment])) == models_before  # none half-made
    after = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    assert np.array_equal(after.unwrap_python_model().model.bundle.item_ids, old_ids)
    requests = pd.DataFrame({"user_id": [1], "surface": ["home_feed"]})
    pd.testing.assert_frame_equal(
        after.predict(requests, params={"k": 5}), before.predict(requests, params={"k": 5})
    )


def test_an_index_write_failing_before_the_rename_leaves_the_old_file(tmp_path, monkeypatch):
    items = np.random.default_rng(0).standard_normal((500, 8)).astype(np.float32)
    path = write_index_atomically(ExactIndex(items), tmp_path / INDEX_FILE)
    before = path.read_bytes()

    def crash(partial, target):
        assert partial.is_file() and partial.parent == target.parent  # written whole, beside it
        raise KeyboardInterrupt  # killed between the write and the rename

    monkeypatch.setattr(bundle_module, "_move_into_place", crash)
    with pytest.raises(KeyboardInterrupt):
        write_index_atomically(ExactIndex(items[:100]), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [INDEX_FILE]  # no partial file left


def test_an_ivf_model_logs_its_overlap_and_loads_the_saved_cells(served, tmp_path, caplog):
    _, run_id = served
    result = runner.invoke(
        app, ["export", "--run", run_id, "--index", "ivf", "--nlist", "4", "--nprobe", "2"]
    )
    assert result.exit_code == 0, result.output
    try:
        logged = MlflowClient().get_run(run_id).data.metrics["serve/index_overlap_at_100"]
        with caplog.at_level(logging.WARNING):
            model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model").unwrap_python_model().model
        assert "Rebuilding" not in caplog.text
        bundle = model.bundle
        assert bundle.index_overlap is not None
        assert bundle.index_overlap["overlap"] == pytest.approx(logged) and bundle.index_overlap["k"] == 100
        assert bundle.index_overlap["queries"] == min(2000, len(bundle.users.user_ids))
        assert 0.0 < logged <= 1.0
        assert f"serve/index_overlap_at_100: {logged:.4f}" in result.output
        index = model.retriever.index
        assert type(index).__name__ == "IVFIndex" and index.index.nprobe == 2
        fresh = CandidateModel(dataclasses.replace(bundle, stored_index=None))  # k-means again, seed 0
        _same_answers(model, fresh, _requests(bundle), k=30)
    finally:  # later tests serve the exact index again
        assert runner.invoke(app, ["export", "--run", run_id, "--index", "exact"]).exit_code == 0


def test_predict_answers_as_the_polars_path_did(served):
    _, run_id = served
    pyfunc = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    model = pyfunc.unwrap_python_model().model
    requests = _requests(model.bundle)
    for k in (1, 7, 100):
        got = pyfunc.predict(requests, params={"k": k})
        expected = model.candidates(requests, k).to_pandas()  # the previous predict: polars -> pandas
        pd.testing.assert_frame_equal(got, expected, check_exact=True)
        assert [str(t) for t in got.dtypes] == ["int64", "int64", "int64", "float32"]
    empty = pyfunc.predict(requests[["user_id", "surface"]].iloc[:0], params={"k": 3})
    assert list(empty.columns) == ["request", "rank", "item_id", "score"] and len(empty) == 0
