"""Waiting for an ``mlflow server`` a test started (the team-server and browser tests share it)."""

from __future__ import annotations

import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

SERVER_START_TIMEOUT_S = 120.0


def wait_until_up(process: subprocess.Popen, url: str, log: Path | None = None, poll_s: float = 0.25) -> None:
    """Return once ``url``'s ``/health`` answers; fail with the reason (and the end of ``log``) when
    the server exits first or does not answer within ``SERVER_START_TIMEOUT_S``."""
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while True:
        if process.poll() is not None:
            tail = f":\n{log.read_text()[-2000:]}" if log is not None else " before answering"
            pytest.fail(f"mlflow server exited with {process.returncode}{tail}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not answer within {SERVER_START_TIMEOUT_S} s")
            time.sleep(poll_s)
