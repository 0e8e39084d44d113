"""What a run holds besides params: metrics, tags, text/JSON/array artifacts, figures, checkpoints,
and its saved config, written through a :class:`~convcg_cli.tracking.runs.TrackedRun` and read back
by run id from a :class:`~convcg_cli.tracking.store.Store`."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from convcg_cli.errors import (
    ConfigError,
    EnvironmentProblem,
    RunNotFoundError,
    environment_problem,
    first_line,
)
from convcg_cli.targets import check_buildable, upgrade_moved_targets
from convcg_cli.tracking.store import Store, TrackedRun
from convcg_cli.tracking.ui import headline_metrics

CONFIG_ARTIFACT = "config/resolved.yaml"
OVERRIDES_ARTIFACT = "config/overrides.yaml"
CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_ARTIFACT = f"{CHECKPOINT_DIR}/model.ckpt"
RESUME_CHECKPOINT_ARTIFACT = f"{CHECKPOINT_DIR}/last.ckpt"  # a KILLED run's last epoch-end state
CHECKPOINT_TAG = "checkpoint"  # "yes" on runs whose checkpoint artifact is logged (what eval looks for)

# --- writing into a run ---------------------------------------------------------------------------


def log_text(run: TrackedRun, text: str, artifact_file: str) -> None:
    """Write ``text`` as artifact ``artifact_file`` of the run."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(artifact_file).name
        path.write_text(text)
        run.client.log_artifact(run.run_id, str(path), str(Path(artifact_file).parent))


def log_metrics(run: TrackedRun, metrics: Mapping[str, float], step: int = 0) -> None:
    """Log a dict of metrics in batches (MLflow caps a batch at 1000 metrics); the headline recalls
    among them also under their short names (``ui.headline_metrics``: ``r100_conversion_heldout``),
    which stay apart in the UI's cut column headers."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    named = {**metrics, **headline_metrics(metrics)}
    items = [Metric(k, float(v), now, step) for k, v in named.items()]
    for i in range(0, len(items), 1000):
        run.client.log_batch(run.run_id, metrics=items[i : i + 1000])


def log_file(run: TrackedRun, path: str | Path, artifact_dir: str) -> None:
    """Log the file at ``path`` as an artifact of the run, under ``artifact_dir``."""
    run.client.log_artifact(run.run_id, str(path), artifact_dir)


def set_tags(run: TrackedRun, tags: Mapping[str, str]) -> None:
    """Set (or overwrite) tags of the run."""
    for key, value in tags.items():
        run.client.set_tag(run.run_id, key, str(value))


def log_checkpoint(run: TrackedRun, checkpoint: Path) -> None:
    """Log ``checkpoint`` as the run's ``CHECKPOINT_ARTIFACT`` and tag the run as having one."""
    import shutil

    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / Path(CHECKPOINT_ARTIFACT).name  # the artifact's name, whatever the file's
        shutil.copyfile(checkpoint, staged)
        log_file(run, staged, CHECKPOINT_DIR)
    set_tags(run, {CHECKPOINT_TAG: "yes"})


@contextmanager
def keep_resume_point(run: TrackedRun, last_checkpoint: Path) -> Iterator[None]:
    """When the body is interrupted (Ctrl-C, SIGTERM), log ``last_checkpoint`` (Lightning's
    ``save_last``: the state at the end of the last finished epoch) as the run's
    ``RESUME_CHECKPOINT_ARTIFACT``, so ``convcg train --resume`` can continue it from any host.
    While the server is gone (the logger keeps its metrics locally) the local file is all there is:
    ``--resume`` on this host continues from it."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit):
        if last_checkpoint.exists() and getattr(run.logger, "server_gone_at", None) is None:
            log_file(run, last_checkpoint, CHECKPOINT_DIR)
        raise


def log_arrays(run: TrackedRun, arrays: Mapping[str, Any], artifact_file: str) -> None:
    """Write named numpy arrays as one compressed ``.npz`` artifact ``artifact_file`` of the run."""
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(artifact_file).name
        with path.open("wb") as f:  # a file object: np.savez would append ".npz" to a bare name
            np.savez_compressed(f, **arrays)
        run.client.log_artifact(run.run_id, str(path), str(Path(artifact_file).parent))


def log_figure(run: TrackedRun, figure: Any, artifact_file: str) -> None:
    """Log a matplotlib figure as image artifact ``artifact_file`` of the run, then close it."""
    import matplotlib.pyplot as plt

    run.client.log_figure(run.run_id, figure, artifact_file, save_kwargs={"dpi": 110, "bbox_inches": "tight"})
    plt.close(figure)


# --- reading a run back ---------------------------------------------------------------------------


def download_artifact(store: Store, run_id: str, artifact_path: str, dest: Path) -> Path:
    """Artifact ``artifact_path`` of the run (e.g. ``eval/heldout_hits.npz``) downloaded under
    ``dest/<run id>/`` (the command's own directory, ``workdir.command_dir``); its local path."""
    from mlflow.artifacts import download_artifacts

    into = dest / run_id
    into.mkdir(parents=True, exist_ok=True)
    return Path(
        download_artifacts(
            run_id=run_id, artifact_path=artifact_path, dst_path=str(into), tracking_uri=store.uri
        )
    )


def load_run_config(store: Store, run_id: str, dest: Path) -> DictConfig:
    """The resolved training config saved with the run. It is data: every ``_target_`` must name a
    class in convcg's registry (``targets.BUILDABLE_TARGETS``), checked before anything is built;
    classes that moved since the run was trained are named by their new path (``MOVED_TARGETS``)."""
    cfg = OmegaConf.load(download_artifact(store, run_id, CONFIG_ARTIFACT, dest))
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"The saved config of run {run_id} ({CONFIG_ARTIFACT}) is not a mapping.")
    check_buildable(cfg, f"the saved config of run {run_id}")
    return upgrade_moved_targets(cfg)


def download_checkpoint(store: Store, run_id: str, dest: Path, artifact: str = CHECKPOINT_ARTIFACT) -> Path:
    """The run's checkpoint artifact downloaded under ``dest``; RunNotFoundError when it is gone."""
    from mlflow.exceptions import MlflowException

    try:
        return download_artifact(store, run_id, artifact, dest)
    except (MlflowException, OSError) as exc:
        problem = environment_problem(exc)  # e.g. a full $TMPDIR: the artifact is intact
        if problem is not None:
            raise EnvironmentProblem(
                f"The checkpoint artifact '{artifact}' of run {run_id} could not be downloaded to {dest}. "
                + problem
            ) from None
        first = first_line(exc)
        raise RunNotFoundError(
            f"The checkpoint artifact '{artifact}' of run {run_id} could not be read ({first}); it was "
            "deleted or moved. Retrain the run."
        ) from None


def has_artifact(store: Store, run_id: str, artifact: str) -> bool:
    """Whether the run lists the artifact file ``artifact`` (e.g. ``checkpoints/last.ckpt``)."""
    listed = store.client.list_artifacts(run_id, str(Path(artifact).parent))
    return any(f.path == artifact for f in listed)


def read_json_artifact(store: Store, run_id: str, artifact_path: str, dest: Path) -> Any:
    """The JSON artifact ``artifact_path`` of the run (downloaded under ``dest``), parsed; None when
    the run has none."""
    import json

    from mlflow.exceptions import MlflowException

    try:
        return json.loads(download_artifact(store, run_id, artifact_path, dest).read_text())
    except (MlflowException, OSError):
        return None


def metric_history(store: Store, run_id: str, name: str) -> list[tuple[int, float]]:
    """Every logged value of metric ``name`` in the run as ``(step, value)``, in logging order."""
    return [(int(m.step), float(m.value)) for m in store.client.get_metric_history(run_id, name)]


def run_metric_names(store: Store, run_id: str) -> list[str]:
    """Names of every metric logged into the run."""
    return sorted(store.client.get_run(run_id).data.metrics)
