"""``convcg serve``: the served model over HTTP, speaking MLflow's scoring protocol with less overhead.

``POST /invocations`` takes what ``mlflow models serve`` takes as JSON (one of ``dataframe_split``,
``dataframe_records``, ``inputs``, ``instances``, and ``params``: ``{"k": K}``; other params are
ignored, as MLflow ignores params its model does not declare) and answers the same bytes:
``{"predictions": [{"request", "rank", "item_id", "score"}, ...]}``. ``GET /ping`` and ``/health``
answer 200 once the model is loaded; ``GET /version`` gives convcg's version.

Why a server of its own: a request through ``mlflow models serve`` takes ~2.5 ms more than
``predict`` in process (~2 ms; bench-large, IVF, k=100, 2 cores), and none of it is the model's: its
HTTP stack, middleware and thread hop (~1 ms with the client's share), its schema casts through
pandas (~0.5 ms), and its answer written by Python's pure-Python JSON encoder (~0.6 ms).
Here the body is decoded by ``json.loads``, its columns go straight into polars and the model's own
request checks (:func:`~convcg_cli.serve.bundle.request_rows`, the checks ``predict`` and
``convcg retrieve`` make), the candidates are ranked by the same :class:`CandidateModel`, and the
answer is written by the C encoder. A call of up to ``INLINE_ROWS`` requests is answered on the
event loop (no thread hop); a larger one in a worker thread, so ``/ping`` keeps answering meanwhile.

Errors answer MLflow's JSON shape, ``{"error_code": ..., "message": ...}``: 400 for a malformed
request (the message names the column, key or limit), 404/405 for another path or method, 413 for
a body over ``MAX_BODY_BYTES``, 415 for a body that is not JSON, 500 (logged with its traceback)
for a failure of the server's own.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import polars as pl

from convcg_cli.errors import RequestError
from convcg_cli.serve.bundle import OPTIONAL_COLUMNS, REQUIRED_COLUMNS, column_kind
from convcg_cli.serve.model import DEFAULT_K, CandidateModel, records

log = logging.getLogger(__name__)

DATA_KEYS = ("dataframe_split", "dataframe_records", "inputs", "instances")
MAX_BODY_BYTES = 64 * 2**20  # far above max_rows (10,000) requests of every column
INLINE_ROWS = 64  # calls this small are answered on the event loop: ~1.5 ms each on one core
EXPECTED = (
    f"a JSON object with one of {', '.join(DATA_KEYS)} (the requests: columns {list(REQUIRED_COLUMNS)}, "
    f'optionally {list(OPTIONAL_COLUMNS)}) and optionally params: {{"k": K}}'
)

Scope = Mapping[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


def parse_request(body: bytes) -> tuple[pl.DataFrame, Any]:
    """The request table and ``k`` of an ``/invocations`` JSON body (``k`` not yet checked).

    Raises:
        RequestError: the body is not such a JSON object, or its requests are not a table.
    """
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(f"The request body is not JSON ({exc}); expected {EXPECTED}.") from None
    if not isinstance(payload, dict):
        raise RequestError(f"The request body is a JSON {type(payload).__name__}; expected {EXPECTED}.")
    given = [key for key in DATA_KEYS if key in payload]
    unknown = sorted(set(payload) - {*DATA_KEYS, "params"})
    if len(given) != 1 or unknown:
        found = f"keys {sorted(payload)}" if payload else "no keys"
        raise RequestError(f"The request body has {found}; expected {EXPECTED}.")
    params = payload.get("params") or {}
    if not isinstance(params, dict):
        raise RequestError(f'params must be a JSON object such as {{"k": 10}}, got {params!r}.')
    return _table(given[0], payload[given[0]]), params.get("k", DEFAULT_K)


def _table(key: str, value: Any) -> pl.DataFrame:
    """The requests under ``key`` as a polars table, column by column."""
    if key == "dataframe_split":
        if not isinstance(value, dict) or not isinstance(value.get("columns"), list):
            raise RequestError(f"{key} must be an object with 'columns' and 'data' (a list of rows).")
        names, rows = value["columns"], value.get("data", [])
        if not isinstance(rows, list) or not all(isinstance(r, list) and len(r) == len(names) for r in rows):
            raise RequestError(f"{key}'s data must be a list of rows of {len(names)} values (its columns).")
        return _columns(
            key,
            dict(zip(names, map(list, zip(*rows, strict=True)), strict=True))
            if rows
            else {n: [] for n in names},
        )
    if isinstance(value, dict) and key != "dataframe_records":  # inputs / instances: {column: [values]}
        if not all(isinstance(v, list) for v in value.values()) or len({len(v) for v in value.values()}) > 1:
            raise RequestError(f"{key} as an object must map each column to a list of values, all as long.")
        return _columns(key, value)
    if isinstance(value, list) and all(isinstance(r, dict) for r in value):  # records
        names = list(dict.fromkeys(name for row in value for name in row))
        return _columns(key, {name: [row.get(name) for row in value] for name in names})
    raise RequestError(f"{key} must be a list of records (one object per request) or a table's columns.")


def _columns(key: str, columns: Mapping[str, list]) -> pl.DataFrame:
    """Each column as polars reads its JSON values; JSON true/false is refused (polars would read it
    as an integer); mixed values are read as text, for :func:`request_rows` to name."""
    series = []
    for name, values in columns.items():
        if not isinstance(name, str):
            raise RequestError(f"{key}'s column names must be strings, got {name!r}.")
        if any(v is True or v is False for v in values):
            expected = column_kind({**REQUIRED_COLUMNS, **OPTIONAL_COLUMNS}.get(name))
            raise RequestError(f"Request column '{name}' holds true/false; expected {expected}.")
        try:
            column = pl.Series(name, values)
        except (TypeError, ValueError, OverflowError):  # mixed types: read as text, refused with an example
            column = pl.Series(name, values, strict=False)
        series.append(column)
    return pl.DataFrame(series)


def candidates_json(model: CandidateModel, table: pl.DataFrame, k: Any) -> bytes:
    """The JSON answer to one ``/invocations`` call: ``{"predictions": [records]}``, the text
    ``mlflow models serve`` writes for the same request.

    Raises:
        RequestError: a malformed request or one over the model's limits.
    """
    return json.dumps({"predictions": records(model.rank(table, k))}).encode()


def _error(status: int, code: str, message: str) -> tuple[int, bytes]:
    return status, json.dumps({"error_code": code, "message": message}).encode()


class ScoringApp:
    """The ASGI application ``convcg serve`` runs (uvicorn): ``/invocations`` answered by ``model``."""

    def __init__(self, model: CandidateModel, version: str) -> None:
        self.model = model
        self.version = version.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                kind = (await receive())["type"].rsplit(".", 1)[-1]  # startup, then shutdown
                await send({"type": f"lifespan.{kind}.complete"})
                if kind == "shutdown":
                    return
        if scope["type"] != "http":
            return
        status, content = await self._respond(scope, receive)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": content})

    async def _respond(self, scope: Scope, receive: Receive) -> tuple[int, bytes]:
        path, method = scope["path"], scope["method"]
        if path in ("/ping", "/health", "/version"):
            if method not in ("GET", "HEAD"):
                return _error(405, "BAD_REQUEST", f"{path} answers GET, not {method}.")
            return 200, self.version if path == "/version" else b"\n"
        if path != "/invocations":
            return _error(404, "ENDPOINT_NOT_FOUND", f"No endpoint {path}: POST /invocations, GET /ping.")
        if method != "POST":
            return _error(405, "BAD_REQUEST", f"/invocations answers POST, not {method}.")
        content_type = dict(scope["headers"]).get(b"content-type", b"").decode("latin-1")
        mime, *parameters = [part.strip().lower() for part in content_type.split(";")]
        if mime != "application/json" or any(p not in ("charset=utf-8", "") for p in parameters):
            return _error(
                415, "BAD_REQUEST", f"This server takes application/json (UTF-8), got '{content_type}'."
            )
        body = await _read_body(receive)
        if body is None:
            return _error(413, "BAD_REQUEST", f"The request body is over {MAX_BODY_BYTES:,} bytes.")
        try:
            table, k = parse_request(body)
            if table.height <= INLINE_ROWS:
                return 200, candidates_json(self.model, table, k)
            return 200, await asyncio.to_thread(candidates_json, self.model, table, k)
        except RequestError as exc:
            return _error(400, "INVALID_PARAMETER_VALUE", str(exc))
        except Exception:
            log.exception("/invocations failed")
            return _error(500, "INTERNAL_ERROR", "The server failed to answer; its log has the traceback.")


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body, or None once it passes ``MAX_BODY_BYTES`` (the rest is not read)."""
    chunks, size = [], 0
    while True:
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def run(model: CandidateModel, host: str, port: int, access_log: bool = False) -> None:
    """Serve ``model`` on ``host:port`` until interrupted (uvicorn: its C HTTP parser and event loop
    when installed; SIGINT/SIGTERM stop it after the requests in flight)."""
    from importlib.metadata import version

    import uvicorn

    uvicorn.run(
        ScoringApp(model, f"convcg {version('convcg')}"),
        host=host,
        port=port,
        access_log=access_log,
        log_level="info" if access_log else "warning",
    )
