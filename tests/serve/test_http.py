"""``mlflow models serve -m runs:/ID/model --env-manager local``: JSON requests to ``/invocations`` on a
free local port get candidates; a malformed one gets HTTP 400 with the model's message; ``convcg serve``
answers the same requests as it does."""

from __future__ import annotations

import pytest

from convcg_cli.serve.http import local_server
from convcg_cli.serve.http import post_json as post

pytestmark = pytest.mark.slow  # starts a server process: ~10 s


@pytest.fixture
def server(served):
    """The run's model served on a free port; stopped (its process group) after the test."""
    home, run_id = served
    with local_server(f"runs:/{run_id}/model", {"MLFLOW_TRACKING_URI": f"sqlite:///{home}/mlflow.db"}) as url:
        yield url


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

    # Over the limits (serve.max_k, serve.max_rows): 400 naming them, before any work is done.
    status, answer = post(f"{server}/invocations", {**body, "params": {"k": 10**9}})
    assert status == 400
    assert "over the limit" in answer["message"] and "k=1000" in answer["message"]
    rows = {"dataframe_split": {"columns": ["user_id", "surface"], "data": [[1, "search"]] * 10_001}}
    status, answer = post(f"{server}/invocations", rows)
    assert status == 400
    assert "10,001 requests in one call is over the limit" in answer["message"]


def test_a_kept_alive_connection_answers_as_a_connection_per_request(server):
    import json

    from convcg_cli.serve.http import JsonClient

    request = {"columns": ["user_id", "surface"], "data": [[1, "search"]]}
    body = {"dataframe_split": request, "params": {"k": 5}}
    bad = {"dataframe_split": {"columns": ["user_id"], "data": [[1]]}}
    with JsonClient(server) as client:
        answers = [client.post("/invocations", json.dumps(b).encode()) for b in (body, bad, body, body)]
    assert answers[0] == post(f"{server}/invocations", body) and answers[0][0] == 200
    assert answers[1][0] == 400 and "surface" in answers[1][1]["message"]
    assert answers[2] == answers[3] == answers[0]  # the connection survives an error answer


def test_convcg_serve_answers_what_mlflow_models_serve_answers(served, server):
    """The same requests to both servers over HTTP: the same statuses and answers, errors included."""
    import json

    from convcg_cli.serve.http import JsonClient

    home, run_id = served
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{home}/mlflow.db"}
    requests = [
        {"dataframe_split": {"columns": ["user_id", "surface"], "data": [[1, "search"], [5, "home_feed"]]}},
        {
            "dataframe_records": [{"user_id": -3, "surface": "related_items", "subject_item_id": 2}],
            "params": {"k": 4},
        },
        {"inputs": {"user_id": [1], "surface": ["search"], "query_id": [None]}, "params": {"k": 3}},
        {"dataframe_split": {"columns": ["user_id"], "data": [[1]]}},
        {"dataframe_records": [{"user_id": 1, "surface": "moon"}]},
    ]
    named = [None, None, None, "surface", "moon"]  # what an error's message names in both answers
    with local_server(f"runs:/{run_id}/model", env, server="convcg") as ours:
        with JsonClient(ours) as client:
            answers = [client.post("/invocations", json.dumps(r).encode()) for r in requests]
    for request, (status, answer), name in zip(requests, answers, named, strict=True):
        expected_status, expected = post(f"{server}/invocations", request)
        assert status == expected_status
        if status == 200:
            assert answer == expected
        else:
            assert answer["error_code"] == "INVALID_PARAMETER_VALUE"
            assert name in answer["message"] and name in expected["message"]
