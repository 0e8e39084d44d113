"""A team's tracking server (issue 22): ``mlflow server --serve-artifacts`` on 127.0.0.1. A run trained
in one convcg home is evaluated, exported, registered, served (batch retrieval through its MLflow
model) and re-indexed from another home, with only ``MLFLOW_TRACKING_URI`` pointing both at the
server: no store, artifact or lock file on either side.

``.ci/run`` starts one server for the whole suite and names it in ``CONVCG_TEST_MLFLOW_SERVER``; then
this test is part of the fast suite. Without it the test starts its own server (15 to 25 s on two busy
cores), so it is marked ``slow`` (``make test-all``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator

import polars as pl
import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from convcg_cli import tracking
from convcg_cli.cli import app
from convcg_cli.errors import RunClaimedError
from tests.conftest import TINY_TRAIN
from tests.server_wait import wait_until_up

SERVER_ENV = "CONVCG_TEST_MLFLOW_SERVER"
pytestmark = [] if os.environ.get(SERVER_ENV) else [pytest.mark.slow]
runner = CliRunner()


def free_port() -> int:
    """A TCP port of 127.0.0.1 nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, empty_mlflow_store) -> Iterator[str]:
    """The URL of a tracking server that keeps artifacts itself (``--serve-artifacts``): the one
    ``$CONVCG_TEST_MLFLOW_SERVER`` names, else one started here on a free port of 127.0.0.1 (its
    database a copy of the migrated empty store, so it starts without migrating), stopped after."""
    given = os.environ.get(SERVER_ENV)
    if given:
        yield given.rstrip("/")
        return
    root = tmp_path_factory.mktemp("server")
    shutil.copyfile(empty_mlflow_store, root / "server.db")
    log = root / "server.log"
    port = free_port()
    command = [
        *(sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root}/server.db"),
        *("--serve-artifacts", "--artifacts-destination", str(root / "artifacts")),
        *("--host", "127.0.0.1", "--port", str(port), "--workers", "1"),
    ]
    with log.open("w") as out:
        process = subprocess.Popen(
            command, cwd=root, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(process, url, log)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:  # uvicorn's graceful shutdown: nothing here needs it
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


def _invoke(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def test_a_run_trained_in_one_home_is_used_from_another(server, tiny_data, tmp_path, monkeypatch):
    experiment = f"team-{uuid.uuid4().hex[:8]}"  # a server shared by the suite: this test's own runs
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", experiment)
    trainer, teammate = tmp_path / "trainer", tmp_path / "teammate"

    monkeypatch.setenv("CONVCG_HOME", str(trainer))
    output = _invoke("train", f"data.dir={tiny_data}", *TINY_TRAIN)
    run_id = output.split("MLflow run id:")[1].split()[0]
    assert f"Open the MLflow UI: {server}" in output and "--backend-store-uri" not in output

    monkeypatch.setenv("CONVCG_HOME", str(teammate))  # another machine: nothing of the run here
    output = _invoke(
        "-q", "eval", "--run", "latest", "--json", "baselines=[popularity]", "bootstrap.n_boot=0"
    )
    metrics = json.loads(next(line for line in output.splitlines() if line.startswith("{")))
    assert metrics["run_id"] == run_id and 0 <= metrics["heldout/conversion/recall_at_100"] <= 1
    assert f"runs:/{run_id}/model" in _invoke("export", "--run", run_id)
    name = f"{experiment}-candidates"
    assert f"models:/{name}@champion" in _invoke(
        "register", "--run", run_id, "--name", name, "--alias", "champion"
    )
    users = pl.read_parquet(tiny_data / "users.parquet")["user_id"].head(12).to_list()
    requests = tmp_path / "requests.parquet"
    pl.DataFrame({"user_id": users, "surface": ["home_feed"] * 12}).write_parquet(requests)
    out = tmp_path / "candidates.parquet"
    _invoke(
        "retrieve",
        "--run",
        f"models:/{name}@champion",
        "--requests",
        str(requests),
        "--k",
        "5",
        "--out",
        str(out),
    )
    assert pl.read_parquet(out).height == 12 * 5
    assert "(the newest model of the run)" in _invoke(
        "index", "--run", run_id, "--items", str(tiny_data / "items.parquet")
    )
    listed = _invoke("runs", "--kind", "trained")
    assert run_id in listed and f"{metrics['heldout/conversion/recall_at_100']:.4f}" in listed
    assert f"Open the MLflow UI: {server}/#/experiments/" in listed

    client = MlflowClient(tracking_uri=server)
    exp = client.get_experiment_by_name(experiment)
    assert exp.artifact_location.startswith("mlflow-artifacts:")  # the server's, not a path of the trainer's
    run = client.get_run(run_id)
    assert (
        run.data.tags[tracking.KIND_TAG] == tracking.TRAINED_KIND and tracking.RUN_COLOR_TAG in run.data.tags
    )
    assert run.data.metrics["r100_conversion_heldout"] == metrics["heldout/conversion/recall_at_100"]
    shown = client.search_runs([exp.experiment_id], filter_string="tags.kind != 'baseline'")
    assert [r.info.run_id for r in shown] == [run_id]  # the README's filter keeps the trained run
    for home in (trainer, teammate):
        left = {p.name for p in home.iterdir()} if home.exists() else set()
        assert not left & {"mlflow.db", "mlflow.db.lock", "mlflow.db.claims", "mlartifacts"}, left

    # A server has no lock file to share: a claim is a tag on the run, and a second holder (here this
    # same live process, asking again) is refused until the first lets go.
    store = tracking.Store(server, experiment)
    with tracking.claim_run(store, run_id):
        assert "convcg.claim" in client.get_run(run_id).data.tags
        with (
            pytest.raises(RunClaimedError, match="held by another process"),
            tracking.claim_run(store, run_id),
        ):
            pass
    assert "convcg.claim" not in client.get_run(run_id).data.tags
