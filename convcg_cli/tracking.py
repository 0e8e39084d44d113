"""Everything MLflow-specific: runs, their status, params/tags, configs and checkpoints.

A run is created here (not by Lightning) so that its status is ours to set: FINISHED on success,
FAILED on an exception, KILLED on Ctrl-C; whatever was logged before a crash stays in the run.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from omegaconf import DictConfig, OmegaConf

from convcg_cli.errors import RunNotFoundError

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


def client(logger_cfg: Mapping[str, Any]):
    """An MlflowClient for ``logger.tracking_uri``."""
    from mlflow.tracking import MlflowClient

    quiet()
    return MlflowClient(tracking_uri=str(logger_cfg["tracking_uri"]))


def experiment_id(mlflow_client, logger_cfg: Mapping[str, Any]) -> str:
    """Id of ``logger.experiment_name``, created (with its artifact location) on first use."""
    name = str(logger_cfg["experiment_name"])
    exp = mlflow_client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = logger_cfg.get("artifact_location")
    uri = Path(str(location)).resolve().as_uri() if location and "://" not in str(location) else location
    return mlflow_client.create_experiment(name, artifact_location=uri)


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


def lineage_tags(logger_cfg: Mapping[str, Any]) -> dict[str, str]:
    """Tags a run inherits from its logger config: ``parent_run_id`` (nests it under that run in the
    MLflow UI) and any ``run_tags``. ``convcg ablate`` sets both on each child's config."""
    tags = {str(k): str(v) for k, v in (logger_cfg.get("run_tags") or {}).items()}
    if logger_cfg.get("parent_run_id"):
        tags[PARENT_RUN_TAG] = str(logger_cfg["parent_run_id"])
    return tags


@contextmanager
def open_run(logger_cfg: Mapping[str, Any], run_name: str, tags: Mapping[str, str]) -> Iterator[TrackedRun]:
    """Open a plain run (no Lightning logger) in ``logger.experiment_name``; close it FINISHED,
    FAILED (an exception escaped, e.g. a benchmark step crashed) or KILLED (Ctrl-C)."""
    mlflow_client = client(logger_cfg)
    run = mlflow_client.create_run(
        experiment_id(mlflow_client, logger_cfg), tags=dict(tags), run_name=run_name
    )
    run_id = run.info.run_id
    with terminate_with_status(mlflow_client, run_id):
        yield TrackedRun(run_id, mlflow_client, None)


@contextmanager
def parent_run(logger_cfg: Mapping[str, Any], run_name: str, tags: Mapping[str, str]) -> Iterator[TrackedRun]:
    """Open a run that groups child runs (``convcg ablate``); close it FINISHED, FAILED or KILLED."""
    with open_run(logger_cfg, run_name, tags) as run:
        yield run


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
    run = mlflow_client.create_run(
        exp, tags=tags, run_name=cfg.logger.get("run_name") or tags.get("experiment")
    )
    run_id = run.info.run_id
    with terminate_with_status(mlflow_client, run_id):
        tracked = TrackedRun(run_id, mlflow_client, _lightning_logger(cfg.logger, run_id))
        log_config_params(tracked, cfg)
        log_text(mlflow_client, run_id, OmegaConf.to_yaml(cfg, resolve=True), CONFIG_ARTIFACT)
        log_text(
            mlflow_client,
            run_id,
            OmegaConf.to_yaml(OmegaConf.create({"overrides": overrides, "choices": dict(choices)})),
            OVERRIDES_ARTIFACT,
        )
        yield tracked


def resolve_run(logger_cfg: Mapping[str, Any], run: str) -> str:
    """A run id, or for ``latest`` the newest finished run of the experiment that has a checkpoint."""
    from mlflow.exceptions import MlflowException

    mlflow_client = client(logger_cfg)
    where = f"experiment '{logger_cfg['experiment_name']}' at {logger_cfg['tracking_uri']}"
    if run == "latest":
        exp = mlflow_client.get_experiment_by_name(str(logger_cfg["experiment_name"]))
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
    """The resolved training config saved with the run."""
    from mlflow.artifacts import download_artifacts

    path = download_artifacts(
        run_id=run_id, artifact_path=CONFIG_ARTIFACT, tracking_uri=str(logger_cfg["tracking_uri"])
    )
    cfg = OmegaConf.load(path)
    assert isinstance(cfg, DictConfig)
    return cfg


def download_checkpoint(logger_cfg: Mapping[str, Any], run_id: str) -> Path:
    """Local path of the run's checkpoint artifact."""
    from mlflow.artifacts import download_artifacts

    return Path(
        download_artifacts(
            run_id=run_id, artifact_path=CHECKPOINT_ARTIFACT, tracking_uri=str(logger_cfg["tracking_uri"])
        )
    )


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


@contextmanager
def resumed_run(logger_cfg: Mapping[str, Any], run_id: str) -> Iterator[TrackedRun]:
    """Open an existing run again (a resumed study's parent): RUNNING while the block runs, then
    FINISHED, FAILED or KILLED like a new one."""
    from mlflow.entities import RunStatus

    mlflow_client = client(logger_cfg)
    mlflow_client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
    with terminate_with_status(mlflow_client, run_id):
        yield TrackedRun(run_id, mlflow_client, None)
