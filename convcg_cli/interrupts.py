"""SIGINT and SIGTERM end a training run KILLED and the process with 128 + the signal (130, 143).

Lightning turns Ctrl-C into ``sys.exit(1)`` and SIGTERM into ``SystemExit(0)``: a scheduler or CI
would read an interrupted run as a failure of the wrong kind, or as a success. Inside
:class:`StopOnSignals` both signals raise KeyboardInterrupt (Lightning's graceful shutdown, the run
ends KILLED), and leaving the block turns whatever exit that became into RunInterruptedError.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType

from convcg_cli.errors import RunInterruptedError

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopOnSignals:
    """Context manager: SIGINT/SIGTERM inside it stop the work and leave it as RunInterruptedError.

    Set ``run_id`` once the run is open so the message can say how to resume it. Outside the main
    thread (where handlers cannot be installed) it does nothing.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.run_id: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum
        raise KeyboardInterrupt

    def __enter__(self) -> StopOnSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        if self.signum is None or not isinstance(exc, (KeyboardInterrupt, SystemExit)):
            return
        name = signal.Signals(self.signum).name
        where = (
            f"run {self.run_id} ended KILLED with its metrics and its last finished epoch's checkpoint; "
            f"continue it with 'convcg train --resume {self.run_id}'."
            if self.run_id
            else "no run was opened yet."
        )
        raise RunInterruptedError(self.signum, f"Training stopped by {name}: {where}") from None
