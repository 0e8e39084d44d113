"""A tracking server that goes away mid-run loses nothing.

While a training run's server does not answer, its Lightning logger stops sending and writes every
metric it is given to ``<run dir>/unsent_metrics.jsonl`` (:class:`MetricJournal`); the fit goes on
and its checkpoints stay in the run directory. Once the fit is over, what it kept is written to
``<run dir>/finished_fit.json`` and the command stops with :class:`ServerGoneError` (one line naming
the server, exit 75). ``convcg train --resume RUN`` then sends the kept metrics with their own steps
and times, skips the fit that already finished, uploads the checkpoint, figures and model, and ends
the run FINISHED.

A server is taken to be gone when a call fails and its ``/health`` does not answer either: a refused
connection is first retried by MLflow's client itself, for about two minutes by default
(``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, ``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR``), so a short outage is
ridden out without any of this.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

from convcg_cli.errors import EnvironmentProblem, first_line
from convcg_cli.tracking.store import Store, TrackedRun, server_answers

UNSENT_METRICS_FILE = "unsent_metrics.jsonl"  # in the run's directory (outputs/runs/<run id>)
FINISHED_FIT_FILE = "finished_fit.json"  # the kept checkpoint and validation figures of a finished fit
EX_TEMPFAIL = 75  # sysexits.h: a temporary failure; the same command can succeed later


class ServerGoneError(EnvironmentProblem):
    """The MLflow tracking server stopped answering while a command wrote into a run."""

    exit_code = EX_TEMPFAIL


class UnsentMetric(NamedTuple):
    """One metric value as MLflow takes it: name, value, time (ms since the epoch) and step."""

    key: str
    value: float
    timestamp: int
    step: int


def server_gone(store: Store, exc: BaseException) -> bool:
    """Whether ``exc`` (raised by a call into ``store``) means its server is gone: the store is a
    server and its ``/health`` does not answer now. A server that answers raised a real error."""
    return not isinstance(exc, ServerGoneError) and store.is_server and not server_answers(store.uri)


class MetricJournal:
    """Metrics that could not be sent, one JSON line each, appended to a local file.

    Example:
        >>> import tempfile
        >>> journal = MetricJournal(Path(tempfile.mkdtemp()) / UNSENT_METRICS_FILE)
        >>> journal.append([UnsentMetric("val/loss", 0.5, 1000, 3)])
        >>> journal.read()
        [UnsentMetric(key='val/loss', value=0.5, timestamp=1000, step=3)]
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, metrics: Iterable[UnsentMetric]) -> None:
        """Add ``metrics`` at the end of the file (made with its directory when missing)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            for metric in metrics:
                f.write(json.dumps(metric._asdict()) + "\n")

    def read(self) -> list[UnsentMetric]:
        """Every metric the file holds, in the order they were written; none without a file."""
        if not self.path.exists():
            return []
        lines = self.path.read_text().splitlines()
        return [UnsentMetric(**json.loads(line)) for line in lines if line.strip()]


def gone_message(store: Store, run_id: str, run_dir: Path, n_unsent: int) -> str:
    """What a training whose server went away says: the server, what is kept where, how to finish."""
    return (
        f"The MLflow tracking server at {store.uri} stopped answering during run {run_id}: its "
        f"checkpoints and the {n_unsent} metric value(s) it could not send are kept in {run_dir}. "
        f"Once the server answers again, finish the run with 'convcg train --resume {run_id}'."
    )


def keep_unsent_metrics(run: TrackedRun, run_dir: Path) -> None:
    """From now on, the metrics the run's Lightning logger cannot send (its server gone) are kept
    in ``run_dir/unsent_metrics.jsonl``."""
    if run.logger is not None:
        run.logger.unsent = MetricJournal(run_dir / UNSENT_METRICS_FILE)


def send_unsent_metrics(run: TrackedRun, run_dir: Path) -> int:
    """Send the metrics the run kept in ``run_dir`` while its server was gone, with their own steps
    and times, then remove the file; how many were sent. Sending twice is harmless: MLflow keeps one
    copy of a metric logged twice with the same name, value, time and step."""
    from mlflow.entities import Metric

    journal = MetricJournal(run_dir / UNSENT_METRICS_FILE)
    unsent = journal.read()
    metrics = [Metric(m.key, m.value, m.timestamp, m.step) for m in unsent]
    for start in range(0, len(metrics), 1000):  # MLflow caps a batch at 1000 metrics
        run.client.log_batch(run.run_id, metrics=metrics[start : start + 1000])
    journal.path.unlink(missing_ok=True)
    return len(unsent)


def finished_fit(run_dir: Path) -> tuple[Path, dict[str, float]] | None:
    """``(kept checkpoint, validation figures)`` of a fit that finished while the server was gone
    (:func:`finish_when_server_answers`), or None when there is none or its checkpoint is gone."""
    path = run_dir / FINISHED_FIT_FILE
    if not path.exists():
        return None
    kept = json.loads(path.read_text())
    checkpoint = Path(kept["checkpoint"])
    return (checkpoint, {k: float(v) for k, v in kept["metrics"].items()}) if checkpoint.exists() else None


@contextmanager
def finish_when_server_answers(
    run: TrackedRun, run_dir: Path, checkpoint: Path, metrics: Mapping[str, float]
) -> Iterator[None]:
    """The body sends a finished fit's results (checkpoint, figures, model) into ``run``. When the
    server went away during the fit (the logger kept metrics locally) or goes away during the body,
    the fit's result is written to ``run_dir/finished_fit.json`` for ``--resume`` and a
    ServerGoneError names the server; after a body that succeeds, the file goes."""
    record = run_dir / FINISHED_FIT_FILE
    unsent = MetricJournal(run_dir / UNSENT_METRICS_FILE)

    def gone() -> ServerGoneError:
        record.write_text(json.dumps({"checkpoint": str(checkpoint.resolve()), "metrics": dict(metrics)}))
        return ServerGoneError(gone_message(run.store, run.run_id, run_dir, len(unsent.read())))

    if getattr(run.logger, "server_gone_at", None) is not None:
        raise gone()
    try:
        yield
    except Exception as exc:
        if server_gone(run.store, exc):
            raise gone() from None
        raise
    record.unlink(missing_ok=True)


def run_ended_message(store: Store, run_id: str, exc: BaseException) -> str:
    """What a command whose server went away while it wrote into a run says (no fit to keep)."""
    return (
        f"The MLflow tracking server at {store.uri} stopped answering while run {run_id} was open "
        f"({first_line(exc)}). Start it again (or check the address), then run the command again."
    )
