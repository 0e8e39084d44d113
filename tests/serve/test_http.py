"""``mlflow models serve -m runs:/ID/model --env-manager local``: JSON requests to ``/invocations`` on a
free local port get candidates; a malformed one gets HTTP 400 with the model's message."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

pytestmark = pytest.mark.slow  # starts a server process: ~10 s


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture
def server(served):
    """The run's model served on a free port; stopped (its process group) after the test."""
    home, run_id = served
    port = free_port()
    # The server starts `uvicorn` from PATH: the venv's bin, as an activated venv would have it.
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    env = {**os.environ, "PATH": path, "MLFLOW_TRACKING_URI": f"sqlite:///{home}/mlflow.db"}
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"runs:/{run_id}/model"]
    process = subprocess.Popen(
        [*command, "--env-manager", "local", "--host", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert process.poll() is None, "the server exited"
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("the server did not answer /ping within 120 s")
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


def test_invocations_answer_candidates_and_400_for_a_malformed_request(server):
    columns = ["user_id", "surface", "query_id"]
    body = {"dataframe_split": {"columns": columns, "data": [[1, "search", 3], [-7, "home_feed", None]]}}
    status, answer = post(f"{server}/invocations", {**body, "params": {"k": 5}})
    assert status == 200, answer
    rows = answer["predictions"]
    assert len(rows) == 10 and {r["request"] for r in rows} == {0, 1}
    assert [r["rank"] for r in rows[:5]] == [1, 2, 3, 4, 5]

    status, answer = post(
        f"{server}/invocations", {"dataframe_split": {"columns": ["user_id"], "data": [[1]]}}
    )
    assert status == 400
    assert "surface" in answer["message"]

    bad_surface = {"dataframe_split": {"columns": ["user_id", "surface"], "data": [[1, "moon"]]}}
    status, answer = post(f"{server}/invocations", bad_surface)
    assert status == 400
    assert "Unknown surface" in answer["message"]
