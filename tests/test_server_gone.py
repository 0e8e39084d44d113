"""A tracking server that goes away mid-run loses nothing (issue 22): the training goes on with its
metrics kept locally, stops with one line naming the server, and ``convcg train --resume`` finishes
the run once the server is back (the kept metrics sent with their steps, the artifacts uploaded,
the run FINISHED).

The test starts its own ``mlflow server`` (it kills it), trains in a subprocess that kills the
server after the first of two epochs (tests/train_stopping_the_server.py), restarts the server on
the same database and port, and resumes: about a minute on two busy cores, so it is ``slow``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from convcg_cli import tracking
from tests.conftest import TINY_TRAIN
from tests.server_wait import wait_until_up
from tests.test_tracking_server import free_port

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
COMMAND_TIMEOUT_S = 300


def start_server(root: Path, port: int) -> subprocess.Popen:
    """``mlflow server --serve-artifacts`` on 127.0.0.1:``port`` with its database and artifacts in
    ``root`` (kept across restarts), in its own process group; returned once it answers."""
    command = [
        *(sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root}/server.db"),
        *("--serve-artifacts", "--artifacts-destination", str(root / "artifacts")),
        *("--host", "127.0.0.1", "--port", str(port), "--workers", "1"),
    ]
    log = root / "server.log"
    with log.open("a") as out:
        process = subprocess.Popen(
            command, cwd=root, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_until_up(process, f"http://127.0.0.1:{port}", log)
    except BaseException:
        stop_server(process)
        raise
    return process


def stop_server(process: subprocess.Popen) -> None:
    """Kill the server's process group (if it still runs) and reap it."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait(timeout=30)


def convcg(args: list[str], env: dict[str, str], module: str = "convcg_cli") -> subprocess.CompletedProcess:
    """``python -m MODULE ARGS`` from the repository root, its output captured."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
    )


def test_a_server_gone_mid_run_loses_nothing_and_resume_finishes_the_run(
    tiny_data, tmp_path, empty_mlflow_store
):
    root = tmp_path / "server"
    root.mkdir()
    shutil.copyfile(empty_mlflow_store, root / "server.db")  # migrated already: it starts sooner
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    home = tmp_path / "home"
    env = {
        **os.environ,
        "CONVCG_HOME": str(home),
        "MLFLOW_TRACKING_URI": url,
        "MLFLOW_EXPERIMENT_NAME": f"gone-{uuid.uuid4().hex[:8]}",
        # MLflow's client gives up at once instead of after its two minutes of retries.
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO),
    }
    server = start_server(root, port)
    try:
        trained = convcg(
            ["train", f"data.dir={tiny_data}", *TINY_TRAIN, "serve.log_model=true", "trainer.max_epochs=2"],
            {**env, "STOP_SERVER_PGID": str(server.pid), "STOP_SERVER_URL": url},
            module="tests.train_stopping_the_server",
        )
        server.wait(timeout=30)  # the hook killed it
        output = trained.stdout + trained.stderr
        assert trained.returncode == tracking.ServerGoneError.exit_code == 75, output
        assert "Traceback" not in output
        (line,) = [line for line in trained.stderr.splitlines() if line.startswith("Error:")]
        found = re.search(rf"tracking server at {re.escape(url)} stopped answering during run (\w+):", line)
        assert found, output
        run_id = found[1]
        assert f"'convcg train --resume {run_id}'" in line  # the whole message on its one line

        run_dir = home / "outputs" / "runs" / run_id
        assert (run_dir / "last.ckpt").exists() and (run_dir / "best.ckpt").exists()
        kept = [json.loads(row) for row in (run_dir / tracking.UNSENT_METRICS_FILE).read_text().splitlines()]
        kept_names = {m["key"] for m in kept}
        assert {"val/conversion/recall_at_100", "train/loss"} <= kept_names  # the second epoch's
        assert (run_dir / tracking.FINISHED_FIT_FILE).exists()

        server = start_server(root, port)  # back, on the same database
        client = MlflowClient(tracking_uri=url)
        assert client.get_run(run_id).info.status == "RUNNING"  # nobody could close it
        val_before = client.get_metric_history(run_id, "val/conversion/recall_at_100")
        assert len(val_before) == 1  # the first epoch's, sent before the server went

        resumed = convcg(["train", "--resume", run_id], env)
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        assert f"MLflow run id: {run_id}" in resumed.stdout
        assert "Validation (last epoch)" in resumed.stdout  # the finished fit's figures, kept

        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and tracking.ERROR_TAG not in run.data.tags
        assert run.data.tags[tracking.CHECKPOINT_TAG] == "yes"
        for metric in kept:  # every value it could not send is there, at its own step and time
            history = client.get_metric_history(run_id, metric["key"])
            assert (metric["step"], metric["value"], metric["timestamp"]) in {
                (m.step, m.value, m.timestamp) for m in history
            }, metric
        val = client.get_metric_history(run_id, "val/conversion/recall_at_100")
        assert len(val) == 2 and len({m.step for m in val}) == 2  # one per epoch, the fit not rerun
        folders = ("", tracking.CHECKPOINT_DIR, "figures")
        artifacts = {f.path for folder in folders for f in client.list_artifacts(run_id, folder)}
        assert {tracking.CHECKPOINT_ARTIFACT, "figures/training.png", "config"} <= artifacts, artifacts
        experiment = client.get_run(run_id).info.experiment_id  # the served model, logged on resume
        models = client.search_logged_models([experiment], filter_string=f"source_run_id = '{run_id}'")
        assert [m.name for m in models] == ["model"], models
        assert not (run_dir / tracking.UNSENT_METRICS_FILE).exists()
        assert not (run_dir / tracking.FINISHED_FIT_FILE).exists()
    finally:
        stop_server(server)
