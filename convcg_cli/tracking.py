"""Everything MLflow-specific: runs, their status, params/tags, configs and checkpoints.

A run is created here (not by Lightning) so that its status is ours to set: FINISHED on success,
FAILED on an exception, KILLED on Ctrl-C; whatever was logged before a crash stays in the run.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from omegaconf import DictConfig, OmegaConf

from convcg_cli.config import check_trusted_targets
from convcg_cli.errors import RunNotFoundError, first_line

CONFIG_ARTIFACT = "config/resolved.yaml"
OVERRIDES_ARTIFACT = "config/overrides.yaml"
CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_ARTIFACT = f"{CHECKPOINT_DIR}/model.ckpt"
MAX_PARAM_LENGTH = 500
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


def ui_command(tracking_uri: str) -> str:
    """The command that opens the MLflow UI on this store."""
    return f".venv/bin/mlflow ui --backend-store-uri {tracking_uri}"


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` tracking URI; None for a server or another store."""
    prefix = "sqlite:///"
    return Path(tracking_uri[len(prefix) :]) if tracking_uri.startswith(prefix) else None


@functools.cache
def _prepare_store(tracking_uri: str) -> None:
    """Create and migrate a sqlite store once, under an exclusive lock on ``<db>.lock`` beside it.

    MLflow creates its tables on first use with alembic migrations that are not safe to run twice at
    once: processes starting together on a fresh home would die mid-migration and could leave the
    store half-migrated for good. Behind the lock the first process migrates and the others find
    the tables made. Done once per process and URI.
    """
    import fcntl

    from mlflow.tracking import MlflowClient

    db = sqlite_path(tracking_uri)
    if db is None:
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        MlflowClient(tracking_uri=tracking_uri).search_experiments(max_results=1)


def store_exists(logger_cfg: Mapping[str, Any]) -> bool:
    """False when ``logger.tracking_uri`` is a sqlite file that does not exist yet (nothing trained)."""
    db = sqlite_path(str(logger_cfg["tracking_uri"]))
    return db is None or db.exists()


def client(logger_cfg: Mapping[str, Any]):
    """An MlflowClient for ``logger.tracking_uri``; a sqlite store is created and migrated first,
    once, under a file lock (:func:`_prepare_store`)."""
    from mlflow.tracking import MlflowClient

    quiet()
    _prepare_store(str(logger_cfg["tracking_uri"]))
    return MlflowClient(tracking_uri=str(logger_cfg["tracking_uri"]))


def experiment_id(mlflow_client, logger_cfg: Mapping[str, Any]) -> str:
    """Id of ``logger.experiment_name``, created (with its artifact location) on first use."""
    name = str(logger_cfg["experiment_name"])
    exp = mlflow_client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    from mlflow.exceptions import MlflowException

    location = logger_cfg.get("artifact_location")
    uri = Path(str(location)).resolve().as_uri() if location and "://" not in str(location) else location
    try:
        return mlflow_client.create_experiment(name, artifact_location=uri)
    except MlflowException:  # another process created it between the lookup and here
        exp = mlflow_client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def flatten(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {"model.cross.cross_layers": "2", ...} with values cut to MLflow's limits."""
    out: dict[str, str] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = str(value)[:MAX_PARAM_LENGTH]
    return out


def choice_tags(choices: Mapping[str, str]) -> dict[str, str]:
    """Chosen config options as tags: ``model/head: unified`` -> ``head=unified``."""
    return {group.split("/")[-1]: option for group, option in choices.items()}


# Where launchers put a process's rank: torchrun (RANK), Lightning's DDP launcher (LOCAL_RANK in the
# processes it starts, NODE_RANK on the other nodes), SLURM (SLURM_PROCID).
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")


def is_global_zero() -> bool:
    """Whether this process owns the MLflow run: rank 0 of a multi-process launch, or the only process.

    Read from the launcher's environment, not ``torch.distributed``: it must be known before
    ``trainer.fit`` creates the process group, because every rank runs the same ``convcg train``
    command and only one of them may open a run.
    """
    return all(int(os.environ.get(name) or 0) == 0 for name in RANK_VARIABLES)


@dataclass
class TrackedRun:
    """An open MLflow run: its id, the client, and a Lightning logger that writes into it."""

    run_id: str
    client: Any
    logger: Any


def _lightning_logger(logger_cfg: Mapping[str, Any], run_id: str):
    from lightning.pytorch.loggers import MLFlowLogger

    class RunLogger(MLFlowLogger):
        """MLFlowLogger bound to our run; the run's final status is set by ``tracked_run``."""

        def finalize(self, status: str = "success") -> None:  # noqa: D102
            return None

    return RunLogger(
        experiment_name=str(logger_cfg["experiment_name"]),
        tracking_uri=str(logger_cfg["tracking_uri"]),
        run_id=run_id,
    )


def log_text(mlflow_client, run_id: str, text: str, artifact_file: str) -> None:
    """Write ``text`` as artifact ``artifact_file`` of the run."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(artifact_file).name
        path.write_text(text)
        mlflow_client.log_artifact(run_id, str(path), str(Path(artifact_file).parent))


def log_metrics(mlflow_client, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
    """Log a dict of metrics in batches (MLflow caps a batch at 1000 metrics)."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
    for i in range(0, len(items), 1000):
        mlflow_client.log_batch(run_id, metrics=items[i : i + 1000])


def log_file(run: TrackedRun, path: str | Path, artifact_dir: str) -> None:
    """Log the file at ``path`` as an artifact of the run, under ``artifact_dir``."""
    run.client.log_artifact(run.run_id, str(path), artifact_dir)


def set_tags(run: TrackedRun, tags: Mapping[str, str]) -> None:
    """Set (or overwrite) tags of the run."""
    for key, value in tags.items():
        run.client.set_tag(run.run_id, key, str(value))


CHECKPOINT_TAG = "checkpoint"  # "yes" on runs whose checkpoint artifact is logged (what eval looks for)


def log_checkpoint(run: TrackedRun, checkpoint: Path) -> None:
    """Log ``checkpoint`` as the run's ``CHECKPOINT_ARTIFACT`` and tag the run as having one."""
    import shutil

    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / Path(CHECKPOINT_ARTIFACT).name  # the artifact's name, whatever the file's
        shutil.copyfile(checkpoint, staged)
        log_file(run, staged, CHECKPOINT_DIR)
    set_tags(run, {CHECKPOINT_TAG: "yes"})


RESUME_CHECKPOINT_ARTIFACT = f"{CHECKPOINT_DIR}/last.ckpt"  # a KILLED run's last epoch-end state


@contextmanager
def keep_resume_point(run: TrackedRun, last_checkpoint: Path) -> Iterator[None]:
    """When the body is interrupted (Ctrl-C, SIGTERM), log ``last_checkpoint`` (Lightning's
    ``save_last``: the state at the end of the last finished epoch) as the run's
    ``RESUME_CHECKPOINT_ARTIFACT``, so ``convcg train --resume`` can continue it from any host."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit):
        if last_checkpoint.exists():
            log_file(run, last_checkpoint, CHECKPOINT_DIR)
        raise


def lineage_tags(logger_cfg: Mapping[str, Any]) -> dict[str, str]:
    """Tags a run inherits from its logger config: ``parent_run_id`` (nests it under that run in the
    MLflow UI) and any ``run_tags``. ``convcg ablate`` sets both on each child's config."""
    tags = {str(k): str(v) for k, v in (logger_cfg.get("run_tags") or {}).items()}
    if logger_cfg.get("parent_run_id"):
        tags[PARENT_RUN_TAG] = str(logger_cfg["parent_run_id"])
    return tags


HOST_TAG, PID_TAG = "convcg.host", "convcg.pid"  # the process that holds a RUNNING run open
# The threads torch computed with: in float32 a trained figure depends on it (a matrix product's
# partial sums are ordered by how the work is split), so a run reproduces with its seed AND this.
THREADS_TAG = "torch_threads"


def process_tags() -> dict[str, str]:
    """Host and pid of this process, set on every run it opens, so that a later command on the same
    host can tell a run whose process died (SIGKILL, out of memory, power loss) from a live one."""
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}


def _torch_threads() -> int:
    """torch's intra-op thread count (imported here: training has torch loaded already)."""
    import torch

    return torch.get_num_threads()


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def mark_dead_runs(mlflow_client, experiment_ids: list[str]) -> list[str]:
    """End KILLED, with an ``error`` tag, every RUNNING run opened on this host by a process that is
    gone; returns their ids. Runs of other hosts cannot be checked from here and are left alone."""
    from mlflow.entities import RunStatus

    host = socket.gethostname()
    running = mlflow_client.search_runs(
        experiment_ids, filter_string=f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{host}'"
    )
    dead = [r for r in running if not _process_alive(int(r.data.tags.get(PID_TAG, "0") or 0))]
    for run in dead:
        pid = run.data.tags.get(PID_TAG)
        mlflow_client.set_tag(
            run.info.run_id,
            ERROR_TAG,
            f"Its process (pid {pid} on {host}) ended without closing the run (SIGKILL, out of memory "
            "or power loss); marked KILLED by the next convcg command.",
        )
        mlflow_client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.KILLED))
    return [r.info.run_id for r in dead]


@contextmanager
def open_run(logger_cfg: Mapping[str, Any], run_name: str, tags: Mapping[str, str]) -> Iterator[TrackedRun]:
    """Open a plain run (no Lightning logger) in ``logger.experiment_name``; close it FINISHED,
    FAILED (an exception escaped, e.g. a benchmark step crashed) or KILLED (Ctrl-C)."""
    mlflow_client = client(logger_cfg)
    run = mlflow_client.create_run(
        experiment_id(mlflow_client, logger_cfg), tags={**tags, **process_tags()}, run_name=run_name
    )
    run_id = run.info.run_id
    with terminate_with_status(mlflow_client, run_id):
        yield TrackedRun(run_id, mlflow_client, None)


@contextmanager
def parent_run(logger_cfg: Mapping[str, Any], run_name: str, tags: Mapping[str, str]) -> Iterator[TrackedRun]:
    """Open a run that groups child runs (``convcg ablate``); close it FINISHED, FAILED or KILLED."""
    with open_run(logger_cfg, run_name, tags) as run:
        yield run


CONFIG_NOISE_KEYS = ("_target_", "_partial_", "_convert_", "_recursive_", "_args_")  # Hydra's plumbing


def _override_key(override: str) -> str | None:
    """The config key an override sets (``+a.b=1`` -> ``a.b``); None for a deletion (``~a``)."""
    if override.startswith("~") or "=" not in override:
        return None
    return override.split("=", 1)[0].lstrip("+")


def run_params(cfg: DictConfig, choices: Mapping[str, str], overrides: list[str]) -> dict[str, str]:
    """The params a person compares runs on: every chosen option (``head: unified``, ``cross:
    parallel``, ``experiment: unified_parallel``), the seed, the task weights, and every value the
    command line set (``data.dir``, ``loss.task_weights.engagement``...), resolved and flattened.
    Hydra's ``_target_``/``_partial_`` keys are left out; the full config is the run's
    ``CONFIG_ARTIFACT``.

    Example:
        >>> cfg = OmegaConf.create({"seed": 1, "loss": {"task_weights": {"conversion": 1.0}},
        ...                         "trainer": {"_target_": "T", "max_epochs": 2}})
        >>> run_params(cfg, {"model/head": "unified"}, ["trainer=default", "trainer.max_epochs=2"])
        {'head': 'unified', 'seed': '1', 'loss.task_weights.conversion': '1.0', 'trainer.max_epochs': '2'}
    """
    params = dict(choice_tags(choices))
    keys = ["seed", "loss.task_weights"]
    keys += [k for k in map(_override_key, overrides) if k and k not in choices]
    for key in keys:
        value = OmegaConf.select(cfg, key, default=None)
        if isinstance(value, DictConfig):
            nested = cast(dict[str, Any], OmegaConf.to_container(value, resolve=True))
            params.update(flatten(nested, f"{key}."))
        elif value is not None:
            params[key] = str(value)[:MAX_PARAM_LENGTH]
    return {k: v for k, v in params.items() if k.rsplit(".", 1)[-1] not in CONFIG_NOISE_KEYS}


def log_params(run: TrackedRun, params: Mapping[str, str]) -> None:
    """Log ``params`` into the run (MLflow takes 100 per batch)."""
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), 100):
        run.client.log_batch(run.run_id, params=items[i : i + 100])


def run_name(cfg: DictConfig, choices: Mapping[str, str]) -> str:
    """``logger.run_name`` when set, else design, data and seed: ``unified_parallel · kuairand · s0``
    (the design is the experiment, or the head and cross options without one).

    Example:
        >>> cfg = OmegaConf.create({"seed": 0, "data": {"dir": "/x/kuairand"}, "logger": {}})
        >>> run_name(cfg, {"model/head": "unified", "model/cross": "parallel"})
        'unified_parallel · kuairand · s0'
    """
    if cfg.logger.get("run_name"):
        return str(cfg.logger.run_name)
    tags = choice_tags(choices)
    design = tags.get("experiment") or f"{tags.get('head', 'model')}_{tags.get('cross', '')}".rstrip("_")
    return f"{design} · {Path(str(cfg.data.dir)).name} · s{cfg.seed}"


def log_config_params(run: TrackedRun, cfg: DictConfig, skip_prefixes: tuple[str, ...] = ()) -> None:
    """The resolved config, flattened, as the run's params (MLflow takes 100 per batch); keys starting
    with one of ``skip_prefixes`` are left out."""
    from mlflow.entities import Param

    container = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(container, dict)
    params = [
        Param(k, v)
        for k, v in flatten(cast(dict[str, Any], container)).items()
        if not k.startswith(skip_prefixes)
    ]
    for i in range(0, len(params), 100):
        run.client.log_batch(run.run_id, params=params[i : i + 100])


def child_runs(logger_cfg: Mapping[str, Any], parent_run_id: str) -> list:
    """Every run nested under ``parent_run_id``, oldest first (FAILED ones included)."""
    mlflow_client = client(logger_cfg)
    exp = mlflow_client.get_experiment_by_name(str(logger_cfg["experiment_name"]))
    return mlflow_client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`{PARENT_RUN_TAG}` = '{parent_run_id}'",
        order_by=["attributes.start_time ASC"],
    )


ERROR_TAG = "error"  # the one-line error of a FAILED run


def mark_failed(mlflow_client, run_id: str, error: str) -> None:
    """Set a finished run to FAILED with the error text as a tag (e.g. its evaluation crashed)."""
    from mlflow.entities import RunStatus

    mlflow_client.set_tag(run_id, ERROR_TAG, error[:MAX_PARAM_LENGTH])
    mlflow_client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))


def _terminate(mlflow_client, run_id: str, exc: BaseException | None) -> None:
    """End a run FINISHED, KILLED (Ctrl-C: Lightning turns it into SystemExit(1)) or FAILED."""
    from mlflow.entities import RunStatus

    if exc is None:
        status = RunStatus.FINISHED
    elif isinstance(exc, (KeyboardInterrupt, SystemExit)):
        status = RunStatus.KILLED
    else:
        status = RunStatus.FAILED
        mlflow_client.set_tag(run_id, ERROR_TAG, f"{type(exc).__name__}: {exc}"[:MAX_PARAM_LENGTH])
    mlflow_client.set_terminated(run_id, RunStatus.to_string(status))


@contextmanager
def terminate_with_status(mlflow_client, run_id: str) -> Iterator[None]:
    """Whatever happens inside, the run ends with the matching status; what it logged stays."""
    try:
        yield
    except BaseException as exc:
        _terminate(mlflow_client, run_id, exc)
        raise
    else:
        _terminate(mlflow_client, run_id, None)


@contextmanager
def tracked_run(cfg: DictConfig, choices: Mapping[str, str], overrides: list[str]) -> Iterator[TrackedRun]:
    """Open a run with params, tags and the resolved config; close it with the right status."""
    mlflow_client = client(cfg.logger)
    exp = experiment_id(mlflow_client, cfg.logger)
    tags = {**choice_tags(choices), "seed": str(cfg.seed), "mlflow.source.name": "convcg train"}
    tags.update(lineage_tags(cfg.logger))
    tags.update(process_tags())
    tags[THREADS_TAG] = str(_torch_threads())
    mark_dead_runs(mlflow_client, [exp])
    run = mlflow_client.create_run(exp, tags=tags, run_name=run_name(cfg, choices))
    run_id = run.info.run_id
    with terminate_with_status(mlflow_client, run_id):
        tracked = TrackedRun(run_id, mlflow_client, _lightning_logger(cfg.logger, run_id))
        log_params(tracked, run_params(cfg, choices, overrides))
        log_text(mlflow_client, run_id, OmegaConf.to_yaml(cfg, resolve=True), CONFIG_ARTIFACT)
        log_text(
            mlflow_client,
            run_id,
            OmegaConf.to_yaml(OmegaConf.create({"overrides": overrides, "choices": dict(choices)})),
            OVERRIDES_ARTIFACT,
        )
        yield tracked


def resolve_run(logger_cfg: Mapping[str, Any], run: str) -> str:
    """A run id, or for ``latest`` the newest finished run of the experiment that has a checkpoint.

    RunNotFoundError when the store does not exist (it is not created by looking). RUNNING runs of
    dead processes on this host are marked KILLED first (:func:`mark_dead_runs`).
    """
    from mlflow.exceptions import MlflowException

    where = f"experiment '{logger_cfg['experiment_name']}' at {logger_cfg['tracking_uri']}"
    if not store_exists(logger_cfg):  # looking must not create an empty store
        raise RunNotFoundError(
            f"No MLflow store at {logger_cfg['tracking_uri']}: nothing was trained here "
            "yet (set CONVCG_HOME to the home you trained in, or train with 'convcg train')."
        )
    mlflow_client = client(logger_cfg)
    exp = mlflow_client.get_experiment_by_name(str(logger_cfg["experiment_name"]))
    if exp is not None:
        mark_dead_runs(mlflow_client, [exp.experiment_id])
    if run == "latest":
        runs = (
            []
            if exp is None
            else mlflow_client.search_runs(
                [exp.experiment_id],
                filter_string=f"attributes.status = 'FINISHED' and tags.{CHECKPOINT_TAG} = 'yes'",
                order_by=["attributes.start_time DESC"],
                max_results=1,
            )
        )
        if not runs:
            raise RunNotFoundError(
                f"No finished run with a checkpoint in {where}; train one with 'convcg train'."
            )
        return runs[0].info.run_id
    try:
        info = mlflow_client.get_run(run)
    except MlflowException:
        raise RunNotFoundError(
            f"Run '{run}' was not found in {where}. Pass a run id shown by 'convcg train' or the MLflow UI, "
            f"or --run latest."
        ) from None
    if info.data.tags.get(CHECKPOINT_TAG) != "yes":
        raise RunNotFoundError(
            f"Run '{run}' in {where} has no checkpoint (status {info.info.status}); it cannot be evaluated."
        )
    return run


def load_run_config(logger_cfg: Mapping[str, Any], run_id: str) -> DictConfig:
    """The resolved training config saved with the run; its ``_target_`` values must be on the
    allow-list (``config.check_trusted_targets``): a run's artifacts are data, not code."""
    from mlflow.artifacts import download_artifacts

    path = download_artifacts(
        run_id=run_id, artifact_path=CONFIG_ARTIFACT, tracking_uri=str(logger_cfg["tracking_uri"])
    )
    cfg = OmegaConf.load(path)
    assert isinstance(cfg, DictConfig)
    check_trusted_targets(cfg, f"the saved config of run {run_id}")
    return cfg


def download_checkpoint(
    logger_cfg: Mapping[str, Any], run_id: str, artifact: str = CHECKPOINT_ARTIFACT
) -> Path:
    """Local path of the run's checkpoint artifact; RunNotFoundError when it is gone."""
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    try:
        return Path(
            download_artifacts(
                run_id=run_id, artifact_path=artifact, tracking_uri=str(logger_cfg["tracking_uri"])
            )
        )
    except (MlflowException, OSError) as exc:
        first = first_line(exc)
        raise RunNotFoundError(
            f"The checkpoint artifact '{artifact}' of run {run_id} could not be read ({first}); it was "
            "deleted or moved. Retrain the run."
        ) from None


def has_artifact(logger_cfg: Mapping[str, Any], run_id: str, artifact: str) -> bool:
    """Whether the run lists the artifact file ``artifact`` (e.g. ``checkpoints/last.ckpt``)."""
    listed = client(logger_cfg).list_artifacts(run_id, str(Path(artifact).parent))
    return any(f.path == artifact for f in listed)


RESUMABLE = ("KILLED", "FAILED")


def check_resumable(logger_cfg: Mapping[str, Any], run_id: str) -> None:
    """RunNotFoundError unless the run exists and ended KILLED or FAILED (RUNNING runs of dead
    processes on this host are marked KILLED first, so a run is never resumed twice at once)."""
    from mlflow.exceptions import MlflowException

    mlflow_client = client(logger_cfg)
    try:
        info = mlflow_client.get_run(run_id).info
    except MlflowException:
        raise RunNotFoundError(f"Run '{run_id}' was not found at {logger_cfg['tracking_uri']}.") from None
    if info.status == "RUNNING":
        mark_dead_runs(mlflow_client, [info.experiment_id])
        info = mlflow_client.get_run(run_id).info
    if info.status not in RESUMABLE:
        raise RunNotFoundError(
            f"Run {run_id} is {info.status}; only a {' or '.join(RESUMABLE)} run can be resumed"
            + (" (it is still open in a live process)." if info.status == "RUNNING" else ".")
        )


@contextmanager
def reopened_run(logger_cfg: Mapping[str, Any], run_id: str) -> Iterator[TrackedRun]:
    """Reopen an existing run (a KILLED or FAILED run being resumed, a resumed study's parent) as
    RUNNING in this process; close it with the right status as :func:`tracked_run` does. Its params
    and config stay as logged; the host/pid tags become this process's, a stale error tag goes."""
    from mlflow.entities import RunStatus

    mlflow_client = client(logger_cfg)
    mlflow_client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
    for key, value in process_tags().items():
        mlflow_client.set_tag(run_id, key, value)
    if ERROR_TAG in mlflow_client.get_run(run_id).data.tags:
        mlflow_client.delete_tag(run_id, ERROR_TAG)
    with terminate_with_status(mlflow_client, run_id):
        yield TrackedRun(run_id, mlflow_client, _lightning_logger(logger_cfg, run_id))


def log_arrays(mlflow_client, run_id: str, arrays: Mapping[str, Any], artifact_file: str) -> None:
    """Write named numpy arrays as one compressed ``.npz`` artifact ``artifact_file`` of the run."""
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(artifact_file).name
        with path.open("wb") as f:  # a file object: np.savez would append ".npz" to a bare name
            np.savez_compressed(f, **arrays)
        mlflow_client.log_artifact(run_id, str(path), str(Path(artifact_file).parent))


def download_artifact(logger_cfg: Mapping[str, Any], run_id: str, artifact_path: str) -> Path:
    """Local path of artifact ``artifact_path`` of the run (e.g. ``eval/heldout_hits.npz``)."""
    from mlflow.artifacts import download_artifacts

    return Path(
        download_artifacts(
            run_id=run_id, artifact_path=artifact_path, tracking_uri=str(logger_cfg["tracking_uri"])
        )
    )


def metric_history(logger_cfg: Mapping[str, Any], run_id: str, name: str) -> list[tuple[int, float]]:
    """Every logged value of metric ``name`` in the run as ``(step, value)``, in logging order."""
    history = client(logger_cfg).get_metric_history(run_id, name)
    return [(int(m.step), float(m.value)) for m in history]


# --- served models: the pyfunc model of a run, the registry --------------------------------------

SERVED_MODEL_NAME = "model"  # a run's served model is runs:/<run id>/model
SERVED_MODEL_REQUIREMENTS = ["convcg==0.1.0"]  # given, not inferred (inference imports and times out)


def _use_store(logger_cfg: Mapping[str, Any]) -> None:
    """Point MLflow's model functions (which read the global URIs) at ``logger.tracking_uri``; the
    registry lives in the same store."""
    import mlflow

    quiet()
    uri = str(logger_cfg["tracking_uri"])
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)


def served_model_signature(
    input_columns: Mapping[str, tuple[str, bool]], output_columns: Mapping[str, str], k: int
):
    """The pyfunc signature: request columns ``{name: (type, required)}``, the candidate columns
    ``{name: type}`` and the ``k`` param (default ``k``); types are MLflow's (``long``, ``string``...)
    or ``any`` (MLflow leaves the column's values to the model to check)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import AnyType

    inputs = Schema(
        [
            ColSpec(AnyType() if t == "any" else t, name, required=required)
            for name, (t, required) in input_columns.items()
        ]
    )
    outputs = Schema([ColSpec(t, name) for name, t in output_columns.items()])
    return ModelSignature(inputs=inputs, outputs=outputs, params=ParamSchema([ParamSpec("k", "long", k)]))


def log_served_model(
    logger_cfg: Mapping[str, Any],
    run_id: str,
    python_model: Any,
    artifacts: Mapping[str, str],
    signature: Any,
    input_example: Any,
    tags: Mapping[str, str] | None = None,
) -> str:
    """Log ``python_model`` (the path of a models-from-code file) with ``artifacts`` as the run's model
    ``SERVED_MODEL_NAME`` and return its ``runs:/`` URI (a later call logs a newer model under the
    same name; ``runs:/`` then resolves to the newest)."""
    import mlflow
    import mlflow.pyfunc
    from mlflow.models import Model

    _use_store(logger_cfg)
    # The logged model belongs to the run's experiment (MLflow would take the active one, "Default").
    mlflow.set_experiment(experiment_id=mlflow.MlflowClient().get_run(run_id).info.experiment_id)
    Model.log(
        artifact_path=None,
        name=SERVED_MODEL_NAME,
        flavor=mlflow.pyfunc,
        run_id=run_id,
        python_model=python_model,
        artifacts=dict(artifacts),
        signature=signature,
        input_example=input_example,
        pip_requirements=SERVED_MODEL_REQUIREMENTS,
        tags=dict(tags or {}),
    )
    return f"runs:/{run_id}/{SERVED_MODEL_NAME}"


def save_served_model(
    path: Path, python_model: Any, artifacts: Mapping[str, str], signature: Any, input_example: Any
) -> None:
    """:func:`log_served_model` into a local directory ``path`` (replaced), outside any run."""
    import shutil

    import mlflow.pyfunc

    quiet()
    shutil.rmtree(path, ignore_errors=True)
    mlflow.pyfunc.save_model(
        str(path),
        python_model=python_model,
        artifacts=dict(artifacts),
        signature=signature,
        input_example=input_example,
        pip_requirements=SERVED_MODEL_REQUIREMENTS,
    )


def load_served_model(logger_cfg: Mapping[str, Any], model_uri: str):
    """``mlflow.pyfunc.load_model(model_uri)`` in this store (``runs:/ID/model``, ``models:/NAME@ALIAS``)."""
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException

    _use_store(logger_cfg)
    try:
        return mlflow.pyfunc.load_model(model_uri)
    except (MlflowException, OSError) as exc:
        first = first_line(exc)
        raise RunNotFoundError(
            f"No served model at {model_uri} in {logger_cfg['tracking_uri']} ({first}). Log one with "
            "'convcg export --run ID' (convcg train logs it for new runs)."
        ) from None


def register_served_model(logger_cfg: Mapping[str, Any], model_uri: str, name: str, alias: str | None) -> int:
    """Register ``model_uri`` as a new version of registered model ``name`` (created on first use),
    optionally pointing ``alias`` (e.g. ``champion``) at it; returns the version number."""
    import mlflow
    from mlflow.exceptions import MlflowException

    _use_store(logger_cfg)
    try:
        mlflow.models.get_model_info(model_uri)
    except (MlflowException, OSError):
        raise RunNotFoundError(
            f"No served model at {model_uri} in {logger_cfg['tracking_uri']}; log one with "
            "'convcg export --run ID' (convcg train logs it for new runs)."
        ) from None
    version = mlflow.register_model(model_uri, name)
    if alias:
        mlflow.MlflowClient().set_registered_model_alias(name, alias, version.version)
    return int(version.version)


def set_served_model(python_model: Any) -> None:
    """Declare ``python_model`` the model of the models-from-code file MLflow is loading
    (``serve/model_code.py``)."""
    from mlflow.models import set_model

    set_model(python_model)


def invalid_request(message: str) -> Exception:
    """The exception a served model raises for a malformed request: MLflow's INVALID_PARAMETER_VALUE,
    which its scoring server answers with HTTP 400 and ``message``."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


# --- datasets: the logs a run read (the UI's Dataset column) -------------------------------------

DATA_FILE_SUFFIX = ".parquet"  # the contract's tables; caches and notes beside them are not data
DIGEST_LENGTH = 16
DATA_DIGEST_TAG = "data_digest"  # also a tag, so runs (baseline ones too) can be found by their data


@functools.cache
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a file's bytes; cached per (path, size, mtime): eval and ablate digest one data dir
    many times in one process."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def data_digest(data_dir: str | Path) -> str:
    """Digest of the data: sha256 over the name and content of every ``*.parquet`` table in
    ``data_dir`` (sorted), cut to ``DIGEST_LENGTH`` hex digits. Same bytes, same digest."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(Path(data_dir).glob(f"*{DATA_FILE_SUFFIX}")):
        stat = path.stat()
        digest.update(f"{path.name}:{_file_sha256(str(path), stat.st_size, stat.st_mtime_ns)}\n".encode())
    return digest.hexdigest()[:DIGEST_LENGTH]


def dataset_profile(n_rows: Mapping[str, int], split_days: Mapping[str, tuple[int, int]]) -> dict[str, Any]:
    """The dataset profile shown in the UI: impressions and calendar days of every split.

    Example:
        >>> dataset_profile({"train": 10}, {"train": (0, 4)})
        {'train': {'impressions': 10, 'days': '1970-01-01..1970-01-05'}}
    """
    import datetime as dt

    def day(n: int) -> str:
        return (dt.date(1970, 1, 1) + dt.timedelta(days=int(n))).isoformat()

    return {
        split: {"impressions": int(n_rows.get(split, 0)), "days": f"{day(lo)}..{day(hi)}"}
        for split, (lo, hi) in split_days.items()
    }


def log_dataset(
    mlflow_client, run_id: str, data_dir: str | Path, profile: Mapping[str, Any], context: str
) -> str:
    """Log ``data_dir`` as the run's MLflow dataset input (name: the directory's name, digest:
    :func:`data_digest`, source: the directory, ``profile``: :func:`dataset_profile`) in ``context``
    (``training``, ``evaluation``); tags the run ``data_digest``; returns the digest. MLflow keeps one
    input per (run, dataset): evaluating a run on its training data adds no second one."""
    import json

    from mlflow.entities import Dataset, DatasetInput, InputTag

    path = Path(data_dir).resolve()
    digest = data_digest(path)
    dataset = Dataset(
        name=path.name,
        digest=digest,
        source_type="local",
        source=json.dumps({"uri": path.as_uri()}),
        profile=json.dumps(dict(profile)),
    )
    tags = [InputTag(key="mlflow.data.context", value=context)]
    mlflow_client.log_inputs(run_id, datasets=[DatasetInput(dataset=dataset, tags=tags)])
    mlflow_client.set_tag(run_id, DATA_DIGEST_TAG, digest)
    return digest


# --- baseline runs: untrained rankings scored once per (data, split, options) --------------------

KIND_TAG, BASELINE_KIND = "kind", "baseline"  # trained runs carry no kind tag
BASELINE_TAG = "baseline"  # which baseline (popularity, itemcf, ...)
BASELINE_KEY_TAG = "baseline_key"  # digest of everything the baseline's scores depend on


def find_baseline_run(logger_cfg: Mapping[str, Any], key: str) -> str | None:
    """The newest FINISHED baseline run tagged ``baseline_key=key``, or None."""
    mlflow_client = client(logger_cfg)
    exp = experiment_id(mlflow_client, logger_cfg)
    runs = mlflow_client.search_runs(
        [exp],
        filter_string=f"attributes.status = 'FINISHED' and tags.{KIND_TAG} = '{BASELINE_KIND}' "
        f"and tags.{BASELINE_KEY_TAG} = '{key}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def baseline_run(
    logger_cfg: Mapping[str, Any], name: str, key: str, data_name: str, split: str, tags: Mapping[str, str]
):
    """Open a run ``baseline_<name> · <data_name> · <split>`` (tags ``kind=baseline``, ``baseline``,
    ``baseline_key``), closed FINISHED, FAILED or KILLED as :func:`open_run` does."""
    all_tags = {"mlflow.source.name": "convcg eval", "split": split, **tags}
    all_tags.update({KIND_TAG: BASELINE_KIND, BASELINE_TAG: name, BASELINE_KEY_TAG: key})
    return open_run(logger_cfg, f"baseline_{name} · {data_name} · {split}", all_tags)


def read_json_artifact(logger_cfg: Mapping[str, Any], run_id: str, artifact_path: str) -> Any:
    """The JSON artifact ``artifact_path`` of the run, parsed; None when the run has none."""
    import json

    from mlflow.exceptions import MlflowException

    try:
        return json.loads(download_artifact(logger_cfg, run_id, artifact_path).read_text())
    except (MlflowException, OSError):
        return None


def log_figure(mlflow_client, run_id: str, figure: Any, artifact_file: str) -> None:
    """Log a matplotlib figure as image artifact ``artifact_file`` of the run, then close it."""
    import matplotlib.pyplot as plt

    mlflow_client.log_figure(run_id, figure, artifact_file, save_kwargs={"dpi": 110, "bbox_inches": "tight"})
    plt.close(figure)


def run_metric_names(mlflow_client, run_id: str) -> list[str]:
    """Names of every metric logged into the run."""
    return sorted(mlflow_client.get_run(run_id).data.metrics)


def metric_history_of(mlflow_client, run_id: str, name: str) -> list[tuple[int, float]]:
    """:func:`metric_history` with a client in hand (one per run, not one per metric)."""
    return [(int(m.step), float(m.value)) for m in mlflow_client.get_metric_history(run_id, name)]
