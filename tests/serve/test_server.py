"""``convcg serve``: the same answers as ``mlflow models serve`` (byte for byte, every JSON input
format), MLflow's error shape for what it refuses, and the HTTP edges (paths, methods, content
types, body size, a failure of its own), driven through the ASGI application in this process."""

from __future__ import annotations

import asyncio
import json
import logging

import mlflow.pyfunc
import pytest
from mlflow.pyfunc import scoring_server

from convcg_cli.errors import RequestError
from convcg_cli.serve import server
from convcg_cli.serve.batch import load_candidate_model, served_model_uri
from convcg_cli.serve.server import ScoringApp, candidates_json, parse_request
from tests.serve.conftest import store_of

ROWS = [[1, "search", 3, None], [-7, "home_feed", None, 1_700_000_000], [2, "related_items", None, None]]
COLUMNS = ["user_id", "surface", "query_id", "timestamp"]
RECORDS = [dict(zip(COLUMNS, row, strict=True)) for row in ROWS]


@pytest.fixture(scope="module")
def models(served_home):
    """(the pyfunc model as ``mlflow models serve`` loads it, the CandidateModel convcg serve loads)."""
    home, run_id = served_home
    uri = f"sqlite:///{home}/mlflow.db"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        pyfunc = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
        return pyfunc, load_candidate_model(store_of(home), run_id)


def mlflow_answer(pyfunc, body: bytes) -> tuple[int, bytes]:
    """What MLflow's scoring server answers to ``body`` (its own ``invocations``, no HTTP)."""
    from mlflow.exceptions import MlflowException

    try:
        result = scoring_server.invocations(
            body, "application/json", pyfunc, pyfunc.metadata.get_input_schema()
        )
    except MlflowException as exc:
        return exc.get_http_status_code(), exc.serialize_as_json().encode()
    return result.status, result.response.encode()


BODIES = {
    "split": {"dataframe_split": {"columns": COLUMNS, "data": ROWS}, "params": {"k": 7}},
    "split, required columns only, default k": {
        "dataframe_split": {"columns": ["user_id", "surface"], "data": [r[:2] for r in ROWS]}
    },
    "records": {"dataframe_records": RECORDS, "params": {"k": 5}},
    "records missing a key": {"dataframe_records": [RECORDS[0], {"user_id": 4, "surface": "search"}]},
    "inputs as columns": {
        "inputs": {c: [r[i] for r in ROWS] for i, c in enumerate(COLUMNS)},
        "params": {"k": 3},
    },
    "instances as records": {"instances": RECORDS, "params": {"k": 3}},
    "a column of nulls": {
        "dataframe_split": {"columns": ["user_id", "surface", "query_id"], "data": [[1, "search", None]]}
    },
    "an ignored param": {"dataframe_records": RECORDS[:1], "params": {"k": 2, "temperature": 0.5}},
}


@pytest.mark.parametrize("name", list(BODIES))
def test_answers_are_the_bytes_mlflow_models_serve_writes(models, name):
    pyfunc, model = models
    body = json.dumps(BODIES[name]).encode()
    status, expected = mlflow_answer(pyfunc, body)
    assert status == 200, expected
    assert candidates_json(model, *parse_request(body)) == expected
    assert json.loads(expected)["predictions"]  # candidates, not an empty answer


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "not JSON"),
        (b"[1, 2]", "is a JSON list"),
        (b"{}", "has no keys"),
        (json.dumps({"dataframe_split": {"columns": ["user_id"], "data": [[1]]}, "extra": 1}), "'extra'"),
        (json.dumps({"inputs": RECORDS, "instances": RECORDS}), "'inputs', 'instances'"),
        (
            json.dumps({"dataframe_split": {"columns": ["user_id", "surface"], "data": [[1]]}}),
            "rows of 2 values",
        ),
        (json.dumps({"dataframe_split": [1]}), "'columns' and 'data'"),
        (json.dumps({"inputs": {"user_id": [1, 2], "surface": ["search"]}}), "all as long"),
        (json.dumps({"dataframe_records": [1, 2]}), "list of records"),
        (json.dumps({"dataframe_records": RECORDS, "params": [5]}), "params must be a JSON object"),
        (
            json.dumps({"dataframe_records": [{"user_id": True, "surface": "search"}]}),
            "'user_id' holds true/false",
        ),
    ],
)
def test_a_malformed_body_is_a_request_error_naming_what_was_expected(body, message):
    with pytest.raises(RequestError, match=message.replace("[", r"\[")):
        parse_request(body if isinstance(body, bytes) else body.encode())


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        ({"dataframe_records": [{"user_id": 1}]}, "lack column"),
        ({"dataframe_records": [{"user_id": "x", "surface": "search"}]}, "must hold integers"),
        ({"dataframe_records": [{"user_id": 1, "surface": "moon"}]}, "Unknown surface"),
        (  # mixed types: read as text, refused with an example
            {
                "dataframe_records": [
                    {"user_id": 1, "surface": "search"},
                    {"user_id": "a", "surface": "search"},
                ]
            },
            "'user_id' must hold integers, got String",
        ),
        (
            {"dataframe_records": [{"user_id": 1, "surface": "search"}], "params": {"k": 0}},
            "positive integer",
        ),
        (
            {"dataframe_records": [{"user_id": 1, "surface": "search"}], "params": {"k": "5"}},
            "positive integer",
        ),
        (
            {"dataframe_records": [{"user_id": 1, "surface": "search"}], "params": {"k": 10**9}},
            "over the limit",
        ),
    ],
)
def test_what_mlflow_refuses_is_refused_with_the_models_message(models, request_, message):
    pyfunc, model = models
    body = json.dumps(request_).encode()
    assert mlflow_answer(pyfunc, body)[0] == 400
    with pytest.raises(RequestError, match=message):
        candidates_json(model, *parse_request(body))


def test_a_fractional_id_is_refused_where_mlflows_cast_truncates_it(models):
    pyfunc, model = models
    body = json.dumps(
        {"dataframe_records": [{"user_id": 1, "surface": "search"}, {"user_id": 2.5, "surface": "search"}]}
    )
    assert mlflow_answer(pyfunc, body.encode())[0] == 200  # its schema cast reads 2.5 as user 2
    with pytest.raises(RequestError, match="'user_id' must hold integers"):
        candidates_json(model, *parse_request(body.encode()))


def call(app, method: str, path: str, body: bytes = b"", content_type: str = "application/json", chunks=1):
    """One request through the ASGI application: (status, headers, decoded body)."""
    size = max(1, -(-len(body) // chunks))
    parts = [body[i : i + size] for i in range(0, len(body), size)] or [b""]
    incoming = [
        {"type": "http.request", "body": p, "more_body": i < len(parts) - 1} for i, p in enumerate(parts)
    ]
    sent = []

    async def receive():
        return incoming.pop(0)

    async def send(message):
        sent.append(message)

    headers = [(b"content-type", content_type.encode())] if content_type else []
    scope = {"type": "http", "method": method, "path": path, "headers": headers}
    asyncio.run(app(scope, receive, send))
    start, content = sent
    assert dict(start["headers"])[b"content-length"] == str(len(content["body"])).encode()
    return start["status"], dict(start["headers"]), content["body"]


def test_the_app_answers_invocations_and_health(models):
    pyfunc, model = models
    app = ScoringApp(model, "convcg 9.9")
    body = json.dumps(BODIES["split"]).encode()
    status, headers, content = call(
        app, "POST", "/invocations", body, "application/json; charset=utf-8", chunks=3
    )
    assert (status, headers[b"content-type"]) == (200, b"application/json")
    assert content == mlflow_answer(pyfunc, body)[1]
    assert call(app, "GET", "/ping")[::2] == (200, b"\n") == call(app, "GET", "/health")[::2]
    assert call(app, "GET", "/version")[::2] == (200, b"convcg 9.9")


@pytest.mark.parametrize(
    ("method", "path", "content_type", "status", "code", "message"),
    [
        ("GET", "/invocations", "application/json", 405, "BAD_REQUEST", "answers POST, not GET"),
        ("POST", "/ping", "application/json", 405, "BAD_REQUEST", "answers GET, not POST"),
        ("POST", "/predict", "application/json", 404, "ENDPOINT_NOT_FOUND", "No endpoint /predict"),
        ("POST", "/invocations", "text/csv", 415, "BAD_REQUEST", "got 'text/csv'"),
        ("POST", "/invocations", "application/json; charset=latin-1", 415, "BAD_REQUEST", "UTF-8"),
        ("POST", "/invocations", "", 415, "BAD_REQUEST", "takes application/json"),
        ("POST", "/invocations", "application/json", 400, "INVALID_PARAMETER_VALUE", "lack column"),
    ],
)
def test_the_app_answers_mlflows_error_shape(models, method, path, content_type, status, code, message):
    app = ScoringApp(models[1], "convcg 9.9")
    body = json.dumps({"dataframe_records": [{"user_id": 1}]}).encode()
    got, _, content = call(app, method, path, body, content_type)
    answer = json.loads(content)
    assert (got, answer["error_code"]) == (status, code)
    assert message in answer["message"]


def test_a_call_over_the_models_limits_is_400_naming_them(models):
    app = ScoringApp(models[1], "v")
    rows = {"dataframe_split": {"columns": ["user_id", "surface"], "data": [[1, "search"]] * 10_001}}
    status, _, content = call(app, "POST", "/invocations", json.dumps(rows).encode())
    assert status == 400 and "10,001 requests in one call is over the limit" in json.loads(content)["message"]
    status, _, content = call(
        app, "POST", "/invocations", json.dumps({**BODIES["records"], "params": {"k": 10**9}}).encode()
    )
    assert status == 400 and "k=1000" in json.loads(content)["message"]


def test_a_body_over_the_limit_is_413_unread(models, monkeypatch):
    monkeypatch.setattr(server, "MAX_BODY_BYTES", 100)
    body = json.dumps(BODIES["split"]).encode()
    assert len(body) > 100
    status, _, content = call(ScoringApp(models[1], "v"), "POST", "/invocations", body, chunks=4)
    assert status == 413 and "over 100 bytes" in json.loads(content)["message"]


def test_over_http_a_413_answers_and_the_next_request_is_served(models, monkeypatch):
    """uvicorn with the app in a thread: a body over the limit is answered unread, and the client's
    next request on its kept-alive connection (or a new one, if uvicorn closed it) gets candidates."""
    import threading
    import time

    import uvicorn

    from convcg_cli.serve.http import JsonClient, free_port

    monkeypatch.setattr(server, "MAX_BODY_BYTES", 1000)
    port = free_port()
    config = uvicorn.Config(ScoringApp(models[1], "v"), host="127.0.0.1", port=port, log_level="warning")
    http = uvicorn.Server(config)
    thread = threading.Thread(target=http.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not http.started and time.monotonic() < deadline:
            time.sleep(0.05)
        with JsonClient(f"http://127.0.0.1:{port}") as client:
            status, answer = client.post(
                "/invocations", json.dumps({"dataframe_records": RECORDS * 50}).encode()
            )
            assert status == 413 and "over 1,000 bytes" in answer["message"]
            status, answer = client.post("/invocations", json.dumps(BODIES["records"]).encode())
            assert status == 200 and len(answer["predictions"]) == 3 * 5
    finally:
        http.should_exit = True
        thread.join(30)


def test_a_large_call_is_ranked_in_a_worker_thread_with_the_same_answer(models, monkeypatch):
    import threading

    model = models[1]
    body = json.dumps(BODIES["records"]).encode()
    inline = call(ScoringApp(model, "v"), "POST", "/invocations", body)
    threads = []
    rank = model.rank
    monkeypatch.setattr(model, "rank", lambda *a: threads.append(threading.current_thread()) or rank(*a))
    monkeypatch.setattr(server, "INLINE_ROWS", 2)  # the body holds 3 requests
    assert call(ScoringApp(model, "v"), "POST", "/invocations", body) == inline
    assert threads and threads[0] is not threading.main_thread()


def test_a_failure_of_the_servers_own_is_500_and_logged(models, monkeypatch, caplog):
    model = models[1]

    def broken(*args):
        raise RuntimeError("index went away")

    monkeypatch.setattr(model, "rank", broken)
    with caplog.at_level(logging.ERROR, logger="convcg_cli.serve.server"):
        status, _, content = call(
            ScoringApp(model, "v"), "POST", "/invocations", json.dumps(BODIES["records"]).encode()
        )
    assert (status, json.loads(content)["error_code"]) == (500, "INTERNAL_ERROR")
    assert "index went away" not in content.decode()  # the traceback stays in the log
    assert "index went away" in caplog.text


def test_lifespan_starts_and_stops():
    sent, incoming = [], [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]

    async def receive():
        return incoming.pop(0)

    async def send(message):
        sent.append(message["type"])

    asyncio.run(ScoringApp(None, "v")({"type": "lifespan"}, receive, send))  # type: ignore[arg-type]
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


def test_a_saved_model_directory_is_its_own_uri(served, tmp_path):
    home, _ = served
    (tmp_path / "MLmodel").write_text("flavors: {}\n")
    assert served_model_uri(store_of(home), str(tmp_path)) == str(tmp_path)
    assert served_model_uri(store_of(home), "runs:/abc/model") == "runs:/abc/model"


def test_the_cli_serves_the_runs_model_and_names_a_missing_run(served, monkeypatch):
    from typer.testing import CliRunner

    from convcg_cli.cli import app
    from convcg_cli.serve.model import CandidateModel

    _, run_id = served
    calls = []
    monkeypatch.setattr(server, "run", lambda *args: calls.append(args))
    result = CliRunner().invoke(app, ["serve", "--run", run_id, "--port", "5123"])
    assert result.exit_code == 0, result.output
    assert "http://127.0.0.1:5123" in result.output
    ((model, host, port, access_log),) = calls
    assert isinstance(model, CandidateModel) and (host, port, access_log) == ("127.0.0.1", 5123, False)

    result = CliRunner().invoke(app, ["serve", "--run", "0123456789abcdef"])
    assert result.exit_code != 0 and "0123456789abcdef" in result.output
    assert "Traceback" not in result.output and len(calls) == 1
