"""The MLflow store a command works on: its URI, the experiment runs go into, and one client.

A command builds one :class:`Store` from its ``logger`` config (:meth:`Store.from_config`) and passes
it down; nothing below holds a config mapping and a raw MLflow client side by side.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from convcg_cli.errors import EnvironmentProblem, exception_chain

T = TypeVar("T")
DEFAULT_BUSY_TIMEOUT_S = 30.0  # logger.busy_timeout_s

PARENT_RUN_TAG = "mlflow.parentRunId"  # MLflow's own tag: the UI nests the run under its parent


class _DropAdverts(logging.Filter):
    """Lightning advertises a hosted logger at every fit; our logger is MLflow."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


def quiet() -> None:
    """Keep MLflow/alembic/Lightning chatter (sqlite migrations, progress bars, adverts) off the console."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for name in ("mlflow", "alembic", "alembic.runtime.migration"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_DropAdverts())


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` tracking URI; None for a server or another store."""
    prefix = "sqlite:///"
    return Path(tracking_uri[len(prefix) :]) if tracking_uri.startswith(prefix) else None


def is_server(tracking_uri: str) -> bool:
    """Whether the URI names a tracking server (``http://`` or ``https://``), not a local file."""
    return tracking_uri.startswith(("http://", "https://"))


LOCAL_ARTIFACTS = "mlartifacts"  # a sqlite store's artifacts: this folder beside its database
SERVER_PROBE_TIMEOUT_S = 10.0  # how long a command waits for a server's first answer


def _probe(tracking_uri: str) -> str | None:
    """None when the server at ``tracking_uri`` answers at all (any HTTP status) within
    ``SERVER_PROBE_TIMEOUT_S``, else the name of the failure (``ConnectionError``...)."""
    import requests

    try:
        requests.get(f"{tracking_uri.rstrip('/')}/health", timeout=SERVER_PROBE_TIMEOUT_S)
    except requests.RequestException as exc:
        return type(exc).__name__
    return None


def server_answers(tracking_uri: str) -> bool:
    """Whether the tracking server at ``tracking_uri`` answers one short request now."""
    return _probe(tracking_uri) is None


def _check_server(tracking_uri: str) -> None:
    """EnvironmentProblem unless the server at ``tracking_uri`` answers at all (any HTTP status).

    MLflow's client retries a refused connection with backoff for about two minutes before it gives
    up; one short request first turns an absent server into a message at once.
    """
    failure = _probe(tracking_uri)
    if failure is not None:
        raise EnvironmentProblem(
            f"The MLflow tracking server at {tracking_uri} does not answer ({failure}). "
            "Start it (or check the address), or unset MLFLOW_TRACKING_URI / set logger.tracking_uri "
            "to use another store, then run the command again."
        )


def _locked(exc: BaseException) -> bool:
    """Whether sqlite said 'database is locked' anywhere in the exception's chain."""
    return any("database is locked" in str(cause) for cause in exception_chain(exc))


def _holders(db: Path) -> list[str]:
    """Other processes of this host with the database (or its journal) open: ``pid N (command)``."""
    names = {str(db.resolve()), f"{db.resolve()}-journal", f"{db.resolve()}-wal"}
    found = []
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        pid = fd_dir.parent.name
        if pid == str(os.getpid()):
            continue
        try:
            if any(os.readlink(fd) in names for fd in fd_dir.iterdir()):
                command = " ".join((fd_dir.parent / "cmdline").read_bytes().decode(errors="replace").split())
                found.append(f"pid {pid} ({command[:80]})")
        except OSError:  # gone, or not ours to read
            continue
    return found


def _busy_error(tracking_uri: str, waited_s: float) -> EnvironmentProblem:
    db = sqlite_path(tracking_uri)
    holders = _holders(db) if db is not None and db.exists() else []
    held = f" It is held open by {', '.join(holders)}." if holders else ""
    return EnvironmentProblem(
        f"The MLflow store {tracking_uri} stayed locked by another process for {waited_s:.0f} s "
        f"(sqlite: 'database is locked').{held} Wait for that process to finish (or stop it), or "
        "raise logger.busy_timeout_s, then run the command again."
    )


def _patiently(call: Callable[[], T], tracking_uri: str, timeout_s: float) -> T:
    """``call()``, retried while sqlite reports the database locked, for up to ``timeout_s`` seconds;
    then an EnvironmentProblem naming the store and its holders. A locked statement was rolled back,
    so trying it again is safe."""
    start = time.monotonic()
    delay = 0.1
    while True:
        try:
            return call()
        except Exception as exc:
            if not _locked(exc):
                raise
            waited = time.monotonic() - start
            if waited >= timeout_s:
                raise _busy_error(tracking_uri, waited) from exc
            time.sleep(min(delay, max(0.0, timeout_s - waited)))
            delay = min(delay * 2, 2.0)


class _PatientClient:
    """An MlflowClient whose calls wait out a locked sqlite store (:func:`_patiently`)."""

    def __init__(self, client: Any, tracking_uri: str, timeout_s: float) -> None:
        self._client, self._uri, self._timeout_s = client, tracking_uri, timeout_s

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        @functools.wraps(attr)
        def call(*args: Any, **kwargs: Any) -> Any:
            return _patiently(lambda: attr(*args, **kwargs), self._uri, self._timeout_s)

        return call


@functools.cache
def _prepare_store(tracking_uri: str, timeout_s: float) -> None:
    """Create and migrate a sqlite store once, under an exclusive lock on ``<db>.lock`` beside it;
    for a server, check that it answers (:func:`_check_server`). Done once per process and URI.

    MLflow creates its tables on first use with alembic migrations that are not safe to run twice at
    once: processes starting together on a fresh home would die mid-migration and could leave the
    store half-migrated for good. Behind the lock the first process migrates and the others find
    the tables made. A server migrates its own database when it starts: no lock file is made.
    """
    import fcntl

    from mlflow.tracking import MlflowClient

    if is_server(tracking_uri):
        _check_server(tracking_uri)
        return
    db = sqlite_path(tracking_uri)
    if db is None:
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        # Making the client opens the store (and checks its schema): that can find it locked too.
        _patiently(
            lambda: MlflowClient(tracking_uri=tracking_uri).search_experiments(max_results=1),
            tracking_uri,
            timeout_s,
        )


USER_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")  # what conf/logger/mlflow.yaml reads


@contextlib.contextmanager
def user_variables_kept() -> Iterator[None]:
    """MLflow's ``set_tracking_uri``/``set_registry_uri`` (which Lightning's logger calls too) also
    export the URI as ``MLFLOW_TRACKING_URI``/``MLFLOW_REGISTRY_URI``. Those are the user's choice,
    read by conf/logger/mlflow.yaml: they are put back after the body, so that the next config
    composed in this process (an ablation's next cell, the next test) does not take the last store
    used for the user's."""
    saved = {name: os.environ.get(name) for name in USER_VARIABLES}
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def import_mlflow() -> None:
    """Load MLflow now (what every tracked command loads; the bench measures its memory)."""
    import mlflow  # noqa: F401


@dataclass(frozen=True)
class Store:
    """One MLflow tracking store and the experiment a command's runs go into.

    Args:
        uri: the tracking URI (``sqlite:///ABS/mlflow.db`` or a team's ``http://`` server).
        experiment_name: the experiment new runs are created in (and ``--run latest`` looks in).
        artifact_location: where a new experiment keeps its artifacts. None: a sqlite store's
            ``mlartifacts/`` beside its database; a server's own choice (its ``--default-artifact-root``
            or, with ``--serve-artifacts``, ``mlflow-artifacts:/``, uploaded through the server).
        registry_uri: the model registry (None: the tracking store's own).
        lineage: tags every run opened through this store inherits (``convcg ablate`` sets the
            parent run and the grid's tags on each child's logger config).

    The client is made on first use (a sqlite store is created and migrated then, under a lock; a
    server is asked once whether it answers); :meth:`exists` looks without creating anything.

    Example:
        >>> store = Store.from_config({"tracking_uri": "sqlite:////tmp/x.db", "experiment_name": "e"})
        >>> store.uri, store.experiment_name, store.lineage
        ('sqlite:////tmp/x.db', 'e', {})
    """

    uri: str
    experiment_name: str
    artifact_location: str | None = None
    lineage: Mapping[str, str] = field(default_factory=dict)
    busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S
    registry_uri: str | None = None

    @classmethod
    def from_config(cls, logger_cfg: Mapping[str, Any]) -> Store:
        """The store of a ``logger`` config (conf/logger/): ``tracking_uri``, ``experiment_name``,
        ``artifact_location``, ``registry_uri``, and the lineage ``parent_run_id`` / ``run_tags``.
        conf/logger/mlflow.yaml reads MLflow's own variables (``MLFLOW_TRACKING_URI``...) when
        the command line sets none of these."""
        lineage = {str(k): str(v) for k, v in (logger_cfg.get("run_tags") or {}).items()}
        if logger_cfg.get("parent_run_id"):
            lineage[PARENT_RUN_TAG] = str(logger_cfg["parent_run_id"])
        location, registry = logger_cfg.get("artifact_location"), logger_cfg.get("registry_uri")
        return cls(
            uri=str(logger_cfg["tracking_uri"]),
            experiment_name=str(logger_cfg["experiment_name"]),
            artifact_location=str(location) if location else None,
            lineage=lineage,
            busy_timeout_s=float(logger_cfg.get("busy_timeout_s", DEFAULT_BUSY_TIMEOUT_S)),
            registry_uri=str(registry) if registry else None,
        )

    @property
    def is_server(self) -> bool:
        """Whether the store is a tracking server (``http(s)://``): no file of it lives here."""
        return is_server(self.uri)

    @property
    def registry(self) -> str:
        """The model registry's URI: ``registry_uri``, else the tracking store itself."""
        return self.registry_uri or self.uri

    @functools.cached_property
    def client(self):
        """The store's MlflowClient; a sqlite store is created and migrated first, once, under a
        file lock (:func:`_prepare_store`), and its calls wait up to ``busy_timeout_s`` for a lock
        another process holds, then stop with a message naming the store and the holders."""
        from mlflow.tracking import MlflowClient

        quiet()
        _prepare_store(self.uri, self.busy_timeout_s)
        if sqlite_path(self.uri) is None:
            return MlflowClient(tracking_uri=self.uri, registry_uri=self.registry)
        client = _patiently(
            lambda: MlflowClient(tracking_uri=self.uri, registry_uri=self.registry),
            self.uri,
            self.busy_timeout_s,
        )
        return _PatientClient(client, self.uri, self.busy_timeout_s)

    def create_tables(self) -> None:
        """Make the store's tables now (a sqlite store is created and migrated; a server is asked)."""
        self.client.search_experiments(max_results=1)

    def exists(self) -> bool:
        """False when the URI is a sqlite file that does not exist yet (nothing trained here); a
        server is taken to exist (its client reports one that does not answer)."""
        db = sqlite_path(self.uri)
        return db is None or db.exists()

    def find_experiment_id(self) -> str | None:
        """Id of the experiment, or None when it was never created (looking creates nothing)."""
        exp = self.client.get_experiment_by_name(self.experiment_name)
        return None if exp is None else exp.experiment_id

    def new_artifact_location(self) -> str | None:
        """Where a new experiment of this store keeps its artifacts, as a URI: ``artifact_location``
        when set (a plain path made a ``file://`` URI), else ``mlartifacts/`` beside a sqlite
        database, else None (a server puts them where it was told to, not on this machine)."""
        location = self.artifact_location
        db = sqlite_path(self.uri)
        if location is None and db is not None:
            location = str(db.parent / LOCAL_ARTIFACTS)
        return Path(location).resolve().as_uri() if location and "://" not in location else location

    def experiment_id(self) -> str:
        """Id of the experiment, created (with its artifact location) on first use."""
        found = self.find_experiment_id()
        if found is not None:
            return found
        from mlflow.exceptions import MlflowException

        uri = self.new_artifact_location()
        try:
            return self.client.create_experiment(self.experiment_name, artifact_location=uri)
        except MlflowException:  # another process created it between the lookup and here
            found = self.find_experiment_id()
            if found is None:
                raise
            return found

    def use_globally(self) -> None:
        """Point MLflow's module-level model functions (which read the global URIs) at this store
        and its model registry (:attr:`registry`)."""
        import mlflow

        quiet()
        with user_variables_kept():
            mlflow.set_tracking_uri(self.uri)
            mlflow.set_registry_uri(self.registry)

    def where(self) -> str:
        """``experiment 'NAME' at URI``, for messages."""
        return f"experiment '{self.experiment_name}' at {self.uri}"


@dataclass
class TrackedRun:
    """A run of a store: its id and, for a training run open in this process, a Lightning logger
    that writes into it. Everything logged into a run goes through one of these."""

    store: Store
    run_id: str
    logger: Any = None

    @property
    def client(self):
        """The store's MlflowClient (for the tracking package's own modules)."""
        return self.store.client
