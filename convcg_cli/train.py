"""``train(composed) -> run id``: build data, model and trainer from a composed config, track in MLflow."""

from __future__ import annotations

import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

from convcg_cli import tracking
from convcg_cli.config import Composed, instantiate
from convcg_cli.errors import ConfigError
from convcg_cli.tasks import PRIMARY_TASK, check_task_names


@dataclass(frozen=True)
class TrainResult:
    """What a finished training run produced."""

    run_id: str
    checkpoint: Path
    metrics: dict[str, float]


def build_datamodule(cfg, tasks: list[str]):
    """Instantiate and set up ``cfg.data``: loads, validates and splits the logs (raises on bad input)."""
    dm = instantiate(cfg.data, tasks=tasks)
    dm.setup("fit")
    return dm


def build_model(cfg, dm):
    """Instantiate ``cfg.model`` with the feature specs the data defines and the configured loss."""
    return instantiate(
        cfg.model,
        user_features=dm.user_spec,
        item_features=dm.item_spec,
        loss=instantiate(cfg.loss),
        val_ks=list(cfg.val_ks),
    )


def _callbacks(cfg, checkpoint_dir: Path) -> list:
    from lightning.pytorch.callbacks import ModelCheckpoint

    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    for cb in callbacks:
        if isinstance(cb, ModelCheckpoint):
            cb.dirpath = str(checkpoint_dir)
    return callbacks


def train(composed: Composed) -> TrainResult:
    """Train one model as ``composed.cfg`` says and return its MLflow run id and checkpoint.

    Data are validated before any MLflow run is created, so bad input leaves no empty run behind.
    """
    import lightning as L

    # Expected here: our batches come from an in-process IterableDataset of known length.
    warnings.filterwarnings("ignore", message=".*IterableDataset.*has `__len__` defined")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*is deprecated")
    cfg = composed.cfg
    tasks = check_task_names(cfg.loss.task_weights.keys())
    if PRIMARY_TASK not in [t for t, w in cfg.loss.task_weights.items() if w > 0]:
        raise ConfigError(f"loss.task_weights.{PRIMARY_TASK} must be > 0: it is the task the model serves.")
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    dm = build_datamodule(cfg, tasks)
    model = build_model(cfg, dm)

    with tracking.tracked_run(cfg, composed.choices, composed.overrides) as run:
        tracking.log_metrics(run.client, run.run_id, {f"data/{k}_rows": v for k, v in dm.n_rows.items()})
        checkpoint_dir = Path(cfg.paths.output_dir) / "runs" / run.run_id
        callbacks = _callbacks(cfg, checkpoint_dir)
        trainer = instantiate(
            cfg.trainer, logger=run.logger, callbacks=callbacks, default_root_dir=str(checkpoint_dir)
        )
        trainer.fit(model, datamodule=dm)
        best = next(
            (Path(cb.best_model_path) for cb in trainer.checkpoint_callbacks if cb.best_model_path), None
        )
        if best is None:  # no validation epoch ran (e.g. limit_val_batches=0): keep the final weights
            best = checkpoint_dir / "last.ckpt"
            trainer.save_checkpoint(best)
        with tempfile.TemporaryDirectory() as tmp:
            staged = Path(tmp) / Path(tracking.CHECKPOINT_ARTIFACT).name
            shutil.copyfile(best, staged)
            run.client.log_artifact(run.run_id, str(staged), tracking.CHECKPOINT_DIR)
        run.client.set_tag(run.run_id, "checkpoint", "yes")
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    return TrainResult(run.run_id, best, metrics)
