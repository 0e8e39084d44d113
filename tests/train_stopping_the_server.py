"""``convcg`` with one callback more, for tests/test_server_gone.py: once the training's first epoch
has ended (its validation sent, its last.ckpt written), it kills the MLflow server whose process
group ``STOP_SERVER_PGID`` names and waits until ``STOP_SERVER_URL`` no longer answers; the second
epoch then trains with its server gone.

Run as ``python -m tests.train_stopping_the_server train ...`` from the repository root.
"""

from __future__ import annotations

import os
import signal
import time
import urllib.request

import lightning as L

from convcg_cli import train as train_module
from convcg_cli.cli import app

STOP_PGID, STOP_URL = "STOP_SERVER_PGID", "STOP_SERVER_URL"


class StopServerAfterFirstEpoch(L.Callback):
    """Kills the tracking server at the end of epoch 0 and returns once it is down."""

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # noqa: D102
        if trainer.current_epoch != 0:
            return
        os.killpg(int(os.environ[STOP_PGID]), signal.SIGKILL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{os.environ[STOP_URL]}/health", timeout=1):
                    time.sleep(0.1)
            except OSError:
                return
        raise RuntimeError(f"The server at {os.environ[STOP_URL]} still answers after SIGKILL.")


if __name__ == "__main__":
    original = train_module._callbacks
    train_module._callbacks = lambda *args: [*original(*args), StopServerAfterFirstEpoch()]
    app(prog_name="convcg")
