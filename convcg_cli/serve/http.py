"""``mlflow models serve`` or ``convcg serve`` as a local process: start it on a free port, wait for
``/ping``, post JSON (a request on a connection of its own, or many on one kept-alive connection).

Used by the HTTP benchmark (``convcg_cli.bench.serving``) and the server tests; a deployment runs
``convcg serve --run ID`` or ``mlflow models serve -m runs:/ID/model --env-manager local`` itself
(README, "Serve").
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit


def free_port() -> int:
    """A TCP port nobody listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def post_json(url: str, body: Mapping[str, Any], timeout: float = 30.0) -> tuple[int, Any]:
    """POST ``body`` as JSON; (HTTP status, decoded JSON answer), error statuses included."""
    request = urllib.request.Request(
        url, json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


class JsonClient:
    """POSTs of JSON to one server over a single kept-alive HTTP/1.1 connection, as a service or a load
    balancer in front of ``mlflow models serve`` holds it (no TCP handshake per request); reconnects
    once if the server has closed it.

    Example:
        >>> with JsonClient("http://127.0.0.1:5000") as client:  # doctest: +SKIP
        ...     status, answer = client.post("/invocations", json.dumps(body).encode())
    """

    def __init__(self, url: str, timeout: float = 30.0) -> None:
        parts = urlsplit(url)
        host = parts.hostname or "127.0.0.1"
        self._connection = http.client.HTTPConnection(host, parts.port, timeout=timeout)

    def post(self, path: str, body: bytes) -> tuple[int, Any]:
        """POST ``body`` (JSON, already encoded) to ``path``; (HTTP status, decoded JSON answer)."""
        headers = {"Content-Type": "application/json"}
        for attempt in (0, 1):
            try:
                self._connection.request("POST", path, body, headers)
                response = self._connection.getresponse()
                return response.status, json.loads(response.read())
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self._connection.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        self._connection.close()

    def __enter__(self) -> JsonClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# The servers a local one can be, by name: what each is called (messages, the bench's report).
SERVER_TITLES = {"mlflow": "mlflow models serve", "convcg": "convcg serve"}


def server_command(server: str, model_uri: str, port: int) -> list[str]:
    """The command serving ``model_uri`` on 127.0.0.1:``port``, ``server`` one of ``SERVER_TITLES``."""
    if server not in SERVER_TITLES:
        raise ValueError(f"server must be one of {list(SERVER_TITLES)}, got {server!r}")
    if server == "convcg":
        return [sys.executable, "-m", "convcg_cli", "serve", "--run", model_uri, "--port", str(port)]
    serve = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local"]
    return [*serve, "--host", "127.0.0.1", "-p", str(port)]


@contextmanager
def local_server(
    model_uri: str,
    env: Mapping[str, str] | None = None,
    start_timeout_s: float = 120.0,
    server: str = "mlflow",
) -> Iterator[str]:
    """Serve ``model_uri`` with ``mlflow models serve --env-manager local`` (``server="convcg"``:
    ``convcg serve``) on a free local port and yield its base URL once ``/ping`` answers; the
    server's process group is stopped on exit.

    ``env`` is added to this process's environment (e.g. ``MLFLOW_TRACKING_URI`` for ``runs:/``
    URIs). MLflow's server starts ``uvicorn`` from PATH, so this interpreter's ``bin`` is put first,
    as an activated virtual environment would have it.
    """
    port = free_port()
    command, name = server_command(server, model_uri, port), SERVER_TITLES[server]
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    process = subprocess.Popen(
        command,
        env={**os.environ, **dict(env or {}), "PATH": path},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode} before answering")
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not answer /ping within {start_timeout_s} s") from None
                time.sleep(0.5)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
