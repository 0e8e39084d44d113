"""A run's served model is never broken while everything says it is fine: non-finite weights and a
model that does not load are refused (exit 2) before ``runs:/ID/model`` moves; a publish cut short
is dropped by the next command, which serves the previous model again. And serving is bounded: a
request over ``max_k``/``max_rows`` is MLflow's INVALID_PARAMETER_VALUE (HTTP 400) naming the limits.
README "Reliability" and "Serve"."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd
import polars as pl
import pytest
import torch
from mlflow.entities import LoggedModelStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from convcg_cli import tracking
from convcg_cli.cli import app
from convcg_cli.serve.bundle import DEFAULT_LIMITS, META_FILE, ServingBundle
from convcg_cli.tracking.runs import HOST_TAG, PID_TAG

pytestmark = pytest.mark.faults
runner = CliRunner()
POISONED = "user_tower.interaction.cross.layers.0.weight"  # a weight of the query (user) tower


def served_model_id(run_id: str) -> str:
    """The logged model ``runs:/ID/model`` resolves to now."""
    return mlflow.models.get_model_info(f"runs:/{run_id}/model").model_id


def served_models(run_id: str) -> list:
    """Every logged model named ``model`` of the run, newest first, deleted ones left out."""
    client = MlflowClient()
    experiment = client.get_run(run_id).info.experiment_id
    found = client.search_logged_models([experiment], filter_string="name = 'model'")
    return [m for m in found if m.source_run_id == run_id]


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def one_line(text: str) -> str:
    return " ".join(text.split())


# --- refused before it is logged ------------------------------------------------------------------


def test_export_refuses_non_finite_weights_and_the_run_keeps_its_model(served, monkeypatch, tmp_path):
    _, run_id = served
    before, n_models = served_model_id(run_id), len(served_models(run_id))
    real = tracking.download_checkpoint

    def poisoned(store, run, dest, *args):
        state = torch.load(real(store, run, dest, *args), weights_only=True)
        state["state_dict"][POISONED][1, 0] = float("nan")
        torch.save(state, tmp_path / "model.ckpt")
        return tmp_path / "model.ckpt"

    monkeypatch.setattr(tracking, "download_checkpoint", poisoned)
    result = runner.invoke(app, ["export", "--run", run_id])
    assert result.exit_code == 2, result.output
    message = one_line(result.output)
    assert run_id in message and "non-finite" in message
    assert POISONED.removeprefix("user_tower.") in message  # the tensor, by name
    assert served_model_id(run_id) == before and len(served_models(run_id)) == n_models


def test_a_model_that_does_not_load_is_not_published(served, monkeypatch):
    _, run_id = served
    before, n_models = served_model_id(run_id), len(served_models(run_id))

    def cut_short(directory):
        raise OSError(f"{directory}/items.npz: unexpected end of file")

    monkeypatch.setattr(ServingBundle, "read", cut_short)  # what loading the saved model reads
    result = runner.invoke(app, ["export", "--run", run_id])
    assert result.exit_code == 2, result.output
    message = one_line(result.output)
    assert f"The served model of run {run_id} does not load and answer its input example" in message
    assert "unexpected end of file" in message and f"runs:/{run_id}/model is unchanged" in message
    assert served_model_id(run_id) == before and len(served_models(run_id)) == n_models


# --- a publish cut short --------------------------------------------------------------------------


def half_published(run_id: str, pid: int, scratch: Path) -> str:
    """A logged model as a publish killed mid-copy leaves it: named ``model``, PENDING, tagged with
    its writer, holding the bundle but no MLmodel. Returns its id."""
    client = MlflowClient()
    experiment = client.get_run(run_id).info.experiment_id
    tags = {HOST_TAG: socket.gethostname(), PID_TAG: str(pid)}
    model = client.create_logged_model(experiment, name="model", source_run_id=run_id, tags=tags)
    part = scratch / f"part-{pid}"
    part.mkdir()
    (part / "items.npz").write_bytes(b"PK half a bundle")
    client.log_model_artifacts(model.model_id, str(part), "artifacts/bundle")
    return model.model_id


def test_a_publish_cut_short_is_dropped_and_the_previous_model_serves_again(served, tmp_path):
    _, run_id = served
    before = served_model_id(run_id)
    killed = half_published(run_id, dead_pid(), tmp_path)
    assert served_models(run_id)[0].model_id == killed  # MLflow resolves runs:/ID/model to it now
    with pytest.raises(MlflowException):  # no MLmodel: the fault the tester saw
        mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    requests = tmp_path / "requests.parquet"
    pl.DataFrame({"user_id": [1], "surface": ["home_feed"]}).write_parquet(requests)
    out = tmp_path / "c.parquet"
    args = ["retrieve", "--run", run_id, "--requests", str(requests), "--k", "3", "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert pl.read_parquet(out).height == 3
    assert served_model_id(run_id) == before
    assert killed not in {m.model_id for m in served_models(run_id)}  # deleted


def test_drop_unfinished_models_keeps_a_live_writers_model(served, tmp_path):
    home, run_id = served
    live = half_published(run_id, os.getpid(), tmp_path)
    store = tracking.Store(f"sqlite:///{home}/mlflow.db", "convcg")
    try:
        assert tracking.drop_unfinished_models(store, run_id) == []
        assert served_models(run_id)[0].status == LoggedModelStatus.PENDING
    finally:
        MlflowClient().delete_logged_model(live)
    assert served_models(run_id)[0].status == LoggedModelStatus.READY


# --- the limits of one request --------------------------------------------------------------------


def test_a_request_over_the_limits_is_an_invalid_parameter_error(served):
    _, run_id = served
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    one = pd.DataFrame({"user_id": [1], "surface": ["home_feed"]})
    with pytest.raises(
        MlflowException, match=r"k=1000000000 is over the limit.*k=1000 .*10,000 requests"
    ) as info:
        model.predict(one, params={"k": 10**9})
    assert info.value.error_code == "INVALID_PARAMETER_VALUE"
    many = pd.DataFrame({"user_id": [1] * 10_001, "surface": ["home_feed"] * 10_001})
    with pytest.raises(MlflowException, match=r"10,001 requests in one call is over the limit") as info:
        model.predict(many, params={"k": 1})
    assert info.value.error_code == "INVALID_PARAMETER_VALUE"
    assert len(model.predict(one, params={"k": DEFAULT_LIMITS["max_k"]})) > 0  # the limit itself is fine


def test_retrieve_k_over_the_limit_is_a_clear_error(served, tmp_path):
    _, run_id = served
    pl.DataFrame({"user_id": [1], "surface": ["home_feed"]}).write_parquet(tmp_path / "r.parquet")
    args = ["--requests", str(tmp_path / "r.parquet"), "--out", str(tmp_path / "c.parquet"), "--k", "5000"]
    result = runner.invoke(app, ["retrieve", "--run", run_id, *args])
    assert result.exit_code == 2
    assert "--k 5000 is over the served model's limit of 1000 candidates per request" in one_line(
        result.output
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.parquet"]


def test_export_sets_the_limits_and_a_bundle_without_them_gets_the_defaults(served, tmp_path):
    _, run_id = served
    result = runner.invoke(app, ["export", "--run", run_id, "--max-k", "5", "--max-rows", "2"])
    assert result.exit_code == 0, result.output
    try:
        model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
        requests = pd.DataFrame({"user_id": [1, 2], "surface": ["home_feed", "search"]})
        assert len(model.predict(requests, params={"k": 5})) == 10
        with pytest.raises(MlflowException, match="at most k=5 candidates per request and 2 requests"):
            model.predict(requests, params={"k": 6})
        bundle = model.unwrap_python_model().model.bundle
        assert bundle.limits == {"max_k": 5, "max_rows": 2}
        # A bundle written before the limits existed: meta.json without them.
        written = bundle.write(tmp_path / "bundle")
        meta = json.loads((written / META_FILE).read_text())
        del meta["limits"]
        (written / META_FILE).write_text(json.dumps(meta))
        assert ServingBundle.read(written).limits == DEFAULT_LIMITS
    finally:  # later tests serve with the run's own options
        assert runner.invoke(app, ["export", "--run", run_id]).exit_code == 0


# --- a real SIGKILL -------------------------------------------------------------------------------

KILL_DURING_PUBLISH = """
import os, signal, sys
from pathlib import Path
from mlflow.tracking import MlflowClient

def copy_part_then_die(self, model_id, local_dir, artifact_path=None):
    self._tracking_client.log_model_artifacts(model_id, str(Path(local_dir) / "artifacts"), "artifacts")
    os.kill(os.getpid(), signal.SIGKILL)  # the bundle is copied, MLmodel is not

MlflowClient.log_model_artifacts = copy_part_then_die
from convcg_cli.cli import app
sys.argv = ["convcg", "export", "--run", sys.argv[1]]
app()
"""

KILL_WHILE_CHECKING = """
import os, signal, sys
from convcg_cli.serve import export

export.check_answers = lambda *args: os.kill(os.getpid(), signal.SIGKILL)
from convcg_cli.cli import app
sys.argv = ["convcg", "export", "--run", sys.argv[1]]
app()
"""


@pytest.mark.slow  # two exports in subprocesses: ~30 s
def test_a_sigkilled_export_leaves_the_previous_model_served(served, tmp_path):
    _, run_id = served
    before = served_model_id(run_id)
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    env = {**os.environ, "TMPDIR": str(tmpdir)}

    # Killed while the saved model is checked (most of an export's time): nothing was published.
    killed = subprocess.run([sys.executable, "-c", KILL_WHILE_CHECKING, run_id], env=env)
    assert killed.returncode == -signal.SIGKILL
    assert served_model_id(run_id) == before
    assert mlflow.pyfunc.load_model(f"runs:/{run_id}/model").metadata.model_id == before
    (left,) = tmpdir.iterdir()  # the killed command's own directory, with the staged model
    assert left.name.startswith("convcg-export-") and (left / "model" / "MLmodel").is_file()

    # Killed while the checked model is copied into the store: a PENDING model without MLmodel.
    killed = subprocess.run([sys.executable, "-c", KILL_DURING_PUBLISH, run_id], env=env)
    assert killed.returncode == -signal.SIGKILL
    newest = served_models(run_id)[0]
    assert newest.status == LoggedModelStatus.PENDING and newest.model_id != before
    # The next command on the run's model drops it and serves the previous one.
    pl.DataFrame({"user_id": [1], "surface": ["search"]}).write_parquet(tmp_path / "r.parquet")
    out = tmp_path / "c.parquet"
    retrieve = ["retrieve", "--run", run_id, "--requests", str(tmp_path / "r.parquet"), "--out", str(out)]
    result = subprocess.run(
        [sys.executable, "-m", "convcg_cli", *retrieve], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert served_model_id(run_id) == before
    assert np.isfinite(pl.read_parquet(out)["score"].to_numpy()).all()
    assert list(tmpdir.iterdir()) == []  # both killed exports' directories are gone too
