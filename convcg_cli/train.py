"""``train(composed) -> run id``: build data, model and trainer from a composed config, track in MLflow."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from convcg_cli import figures, progress, tracking, workdir
from convcg_cli.blend import Blend, check_grid, choose_on_validation
from convcg_cli.builders import (  # build_*: also imported from here (bench, tests)
    build_datamodule,
    build_model,
    read_checkpoint,
)
from convcg_cli.config import Composed, instantiate
from convcg_cli.data.features import check_levers, resolve_auto_levers
from convcg_cli.errors import ConfigError, RunNotFoundError
from convcg_cli.interrupts import StopOnSignals
from convcg_cli.serve.export import log_trained_model
from convcg_cli.tasks import check_task_names

LAST_CHECKPOINT = "last.ckpt"  # Lightning's save_last file: the state after the last finished epoch


@dataclass(frozen=True)
class TrainResult:
    """What a finished training run produced."""

    run_id: str
    checkpoint: Path
    metrics: dict[str, float]


def check_served_embedding_is_trained(cfg) -> None:
    """Refuse task weights that would serve an untrained embedding.

    A head with a ``serving_task`` (multi_head) serves that task's own embedding, so its weight must
    be > 0. A unified head serves the one shared embedding, which any positive weight trains; so an
    engagement-only model (``loss.task_weights.conversion=0``) is allowed there.
    """
    weights = {str(t): float(w) for t, w in cfg.loss.task_weights.items()}
    serving = cfg.model.head.get("serving_task")
    if serving is not None and weights.get(str(serving), 0.0) <= 0:
        raise ConfigError(
            f"loss.task_weights.{serving} must be > 0: model.head.serving_task={serving} is the embedding "
            "the model serves. To serve an embedding trained on other tasks use model/head=unified."
        )
    if not any(w > 0 for w in weights.values()):
        raise ConfigError(f"At least one of loss.task_weights must be > 0, got {weights}.")


POINTS_PER_EPOCH = 10  # a short epoch still draws its training curves


def _log_interval_callback():
    """:class:`LogEveryShortEpoch`, built here so that importing this module does not import Lightning."""
    from lightning.pytorch.callbacks import Callback

    class LogEveryShortEpoch(Callback):
        """Shrink ``trainer.log_every_n_steps`` so an epoch logs about ``POINTS_PER_EPOCH`` points of the
        ``train/*`` curves when it is short: the configured 20 steps would log nothing in a 14-batch
        epoch. Long epochs keep the configured interval."""

        def on_train_start(self, trainer, pl_module) -> None:  # noqa: D102
            batches = trainer.num_training_batches
            if isinstance(batches, int) and batches > 0:
                trainer.log_every_n_steps = max(
                    1, min(trainer.log_every_n_steps, batches // POINTS_PER_EPOCH)
                )

    return LogEveryShortEpoch()


def _callbacks(cfg, checkpoint_dir: Path, validates: bool) -> list:
    """The configured callbacks, checkpoints written to ``checkpoint_dir``; without validation
    (``validates`` false) the checkpoint monitors nothing and keeps the last epoch."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    for cb in callbacks:
        if isinstance(cb, ModelCheckpoint):
            cb.dirpath = str(checkpoint_dir)
            if not validates:
                cb.monitor = None
    return callbacks


def _validation_options(cfg) -> dict[str, Any]:
    """Trainer options that turn validation off where it would mislead: a refit
    (``data.train_through_val``) trains on the validation days, so their figure would measure
    training data."""
    return {"limit_val_batches": 0} if cfg.data.get("train_through_val", False) else {}


def _build(cfg, data_cache=None):
    """Check the tasks, seed everything and build ``(datamodule, model)`` as ``cfg`` says (the data
    set up from ``data_cache`` when it holds them: see :func:`~convcg_cli.builders.build_datamodule`)."""
    import lightning as L

    # Expected here: our batches come from an in-process IterableDataset of known length.
    warnings.filterwarnings("ignore", message=".*IterableDataset.*has `__len__` defined")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*is deprecated")
    tasks = check_task_names(cfg.loss.task_weights.keys())
    check_served_embedding_is_trained(cfg)
    for line in resolve_auto_levers(cfg):
        progress.announce(line)
    check_levers(cfg)  # before any data is loaded: a lever the data cannot feed is a config error
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    with progress.step(f"Loading and checking {cfg.data.dir}"):
        dm = build_datamodule(cfg, tasks, data_cache=data_cache)
    return dm, build_model(cfg, dm)


def train(composed: Composed, data_cache=None) -> TrainResult:
    """Train one model as ``composed.cfg`` says and return its MLflow run id and checkpoint.

    Data are validated before any MLflow run is created, so bad input leaves no empty run behind.
    ``data_cache``: optional :class:`~convcg_cli.data.loading.PreparedDataCache` shared across calls
    (``convcg ablate``): data already set up with the same options are reused, not read again.
    """
    cfg = composed.cfg
    dm, model = _build(cfg, data_cache)

    if not tracking.is_global_zero():
        # Rank > 0 of a multi-process launch (Lightning's DDP launcher re-runs this very command;
        # torchrun and SLURM start it once per rank): rank 0 owns the one MLflow run, this process
        # only trains its shard and learns the run id from rank 0.
        return _fit(cfg, model, dm, logger=False, run_id=None)

    with (
        StopOnSignals() as stop,
        tracking.tracked_run(
            tracking.Store.from_config(cfg.logger), cfg, composed.choices, composed.overrides
        ) as run,
    ):
        stop.run_id = run.run_id
        profile = tracking.dataset_profile(dm.n_rows, dm.split_days)
        tracking.log_dataset(run, cfg.data.dir, profile, "training")
        tracking.log_params(run, feature_params(dm))
        result = _fit_and_log(cfg, model, dm, run)
    return result


def feature_params(dm) -> dict[str, str]:
    """The table columns the model is fed, as params (``features.item.categorical: category_id``...):
    ``data.features`` may say ``auto``, and the UI should show what that chose ("-": none)."""
    params = {}
    for side in ("item", "user"):
        columns = getattr(dm, f"{side}_columns", None)
        for kind in ("categorical", "numeric", "vector") if columns is not None else ():
            params[f"features.{side}.{kind}"] = ",".join(getattr(columns, kind)) or "-"
    return params


def resume(composed: Composed, run_id: str) -> TrainResult:
    """Continue a KILLED or FAILED run from its last finished epoch, in the same MLflow run; or, on
    the host that trained it, finish a run whose tracking server went away (its kept metrics sent,
    a finished fit not run again: tracking/offline.py).

    The run's own saved config is used (``composed`` only says where the store is); the state comes
    from its ``checkpoints/last.ckpt`` artifact (logged when it was interrupted) or, on the host
    that trained it, from ``outputs/runs/<run_id>/last.ckpt`` (a run whose process was killed).
    """
    store = tracking.Store.from_config(composed.cfg.logger)
    with workdir.command_dir("resume") as downloads:  # the run's config and checkpoint, removed after
        return _resume(store, run_id, downloads)


def _resume(store: tracking.Store, run_id: str, downloads: Path) -> TrainResult:
    if not tracking.is_global_zero():  # ranks > 0 start once rank 0 has reopened the run (RUNNING)
        cfg, checkpoint, dm, model = _resume_state(store, run_id, downloads)
        return _fit(cfg, model, dm, logger=False, run_id=None, ckpt_path=checkpoint)
    # The claim first: of two `--resume` of one run, the second exits 2 here, naming the first.
    with tracking.claim_run(store, run_id):
        tracking.check_resumable(store, run_id)
        cfg, checkpoint, dm, model = _resume_state(store, run_id, downloads)
        with StopOnSignals() as stop, tracking.reopened_run(store, run_id) as run:
            stop.run_id = run_id
            result = _fit_and_log(cfg, model, dm, run, ckpt_path=checkpoint)
    return result


def _resume_state(store: tracking.Store, run_id: str, downloads: Path):
    """The saved config, the checkpoint to continue from, the data module and the model of a run
    (what is downloaded goes under ``downloads``)."""
    cfg = tracking.load_run_config(store, run_id, downloads)
    checkpoint = _last_checkpoint(store, cfg, run_id, downloads)
    # Read once as data before Lightning restores it: a cut-short file is a message, not a traceback.
    read_checkpoint(checkpoint, f"The last-epoch checkpoint of run {run_id} ({checkpoint.name})")
    dm, model = _build(cfg)
    return cfg, checkpoint, dm, model


def _last_checkpoint(store: tracking.Store, cfg, run_id: str, downloads: Path) -> Path:
    """The state ``resume`` continues from: the logged resume artifact, else the local ``last.ckpt``."""
    if tracking.has_artifact(store, run_id, tracking.RESUME_CHECKPOINT_ARTIFACT):
        return tracking.download_checkpoint(store, run_id, downloads, tracking.RESUME_CHECKPOINT_ARTIFACT)
    local = _checkpoint_dir(cfg, run_id) / LAST_CHECKPOINT
    if local.exists():
        return local
    raise RunNotFoundError(
        f"Run {run_id} has no last-epoch checkpoint (no {tracking.RESUME_CHECKPOINT_ARTIFACT} artifact, "
        f"no {local}): it stopped before its first epoch ended. Train it anew with 'convcg train'."
    )


def _fit_and_log(cfg, model, dm, run: tracking.TrackedRun, ckpt_path: Path | None = None) -> TrainResult:
    """Fit in ``run`` (from ``ckpt_path`` when resuming) and log the checkpoint to serve; an
    interrupted fit logs its last finished epoch's state instead, to resume from.

    A server that goes away keeps the run here (tracking/offline.py): the fit goes on with its
    metrics kept in the run directory, then the command stops naming the server. Resumed, the kept
    metrics are sent first and a fit that had finished is not run again."""
    run_dir = _checkpoint_dir(cfg, run.run_id)
    tracking.send_unsent_metrics(run, run_dir)
    finished = tracking.finished_fit(run_dir)
    if finished is not None:
        result = TrainResult(run.run_id, *finished)
    else:
        tracking.keep_unsent_metrics(run, run_dir)
        with tracking.keep_resume_point(run, run_dir / LAST_CHECKPOINT):
            result = _fit(cfg, model, dm, logger=run.logger, run_id=run.run_id, ckpt_path=ckpt_path)
    with tracking.finish_when_server_answers(run, run_dir, result.checkpoint, result.metrics):
        tracking.log_checkpoint(run, result.checkpoint)
        log_training_figures(run, list(model.tasks))
        model.load_state_dict(read_checkpoint(result.checkpoint)["state_dict"])  # the kept weights
        model.eval()
        blend = served_blend(cfg, model, dm)
        if blend is not None:
            tracking.log_metrics(run, blend.metrics())
        with progress.step("Logging the served model"):
            log_trained_model(cfg, dm, model, run, blend)  # runs:/<run id>/model
    return result


def served_blend(cfg, model, dm) -> Blend | None:
    """The popularity blend to serve (``blend`` in conf/train.yaml), chosen on the validation days;
    None when ``blend.betas`` is empty. A refit (``data.train_through_val``) trained on those days:
    it takes one given value per weight, or serves the two-tower score alone (said in one line)."""
    options = cfg.get("blend") or {}
    betas, gammas, _ = check_grid(options, "blend")
    if not betas:
        return None
    if cfg.data.get("train_through_val", False) and (len(betas) > 1 or len(gammas) > 1):
        progress.announce(
            "blend: a refit trained on its validation days, so it cannot choose the popularity "
            "blend there; it serves the two-tower score alone (give blend.betas=[x] "
            "blend.fallback_weights=[y], as chosen on validation by the run it refits)."
        )
        return None
    blend = choose_on_validation(model, dm, options)
    if blend is not None and blend.recalls:
        raw = blend.val_recall(0.0, 0.0)
        best = blend.overruled_beta
        rule = (
            f"; the best blend (beta={best:g}, {blend.val_recall(best):.4f}) does not beat popularity by "
            f"more than {float(options.get('popularity_margin_se', 0.0)):g} standard error(s), so "
            "popularity is served"
            if best is not None
            else ""
        )
        progress.announce(
            f"blend: validation chose beta={blend.beta:g} (popularity), fallback={blend.gamma:g} "
            f"(never-shown items by {blend.inputs.group}): conversion recall@{blend.select_k} "
            f"{blend.val_recall():.4f}" + (f" (two-tower alone {raw:.4f})" if raw is not None else "") + rule
        )
    return blend


TRAINING_FIGURE, BALANCING_FIGURE = "figures/training.png", "figures/balancing.png"


def log_training_figures(run: tracking.TrackedRun, tasks: list[str]) -> None:
    """The run's training curves per task (``figures/training.png``) and, when balancing is on (a
    weight moved or a gradient cosine was computed), the weight and cosine traces
    (``figures/balancing.png``), drawn from the metric histories the run logged."""
    names = [n for n in tracking.run_metric_names(run.store, run.run_id) if n.startswith(("train/", "val/"))]
    histories = {n: tracking.metric_history(run.store, run.run_id, n) for n in names}
    tracking.log_figure(run, figures.training_figure(histories, tasks), TRAINING_FIGURE)
    if figures.balancing_is_on(histories):
        tracking.log_figure(run, figures.balancing_figure(histories), BALANCING_FIGURE)


def _checkpoint_dir(cfg, run_id: str | None) -> Path:
    """``outputs/runs/<run_id>``: where a run's checkpoints are written (``outputs/runs`` before the
    run id is known, on DDP ranks > 0)."""
    runs_dir = Path(cfg.paths.output_dir) / "runs"
    return runs_dir / run_id if run_id else runs_dir


def _fit(cfg, model, dm, logger, run_id: str | None, ckpt_path: Path | None = None) -> TrainResult:
    """``trainer.fit`` (from ``ckpt_path`` when resuming) and the checkpoint to keep; every rank of a
    DDP launch runs this.

    ``run_id`` is None on ranks > 0: they get rank 0's once ``fit`` has set up the process group
    (ModelCheckpoint likewise takes rank 0's directory). Only rank 0 writes checkpoints.
    """
    runs_dir = Path(cfg.paths.output_dir) / "runs"
    checkpoint_dir = _checkpoint_dir(cfg, run_id)
    validation = _validation_options(cfg)
    validates = validation.get("limit_val_batches", cfg.trainer.get("limit_val_batches", 1.0)) != 0
    callbacks = _callbacks(cfg, checkpoint_dir, validates)
    quiet = {} if progress.interactive() else {"enable_progress_bar": False}  # -q, or not a terminal
    trainer = instantiate(
        cfg.trainer,
        logger=logger,
        callbacks=[*callbacks, _log_interval_callback()],
        default_root_dir=str(checkpoint_dir),
        **quiet,
        **validation,
    )
    resume_from = {"ckpt_path": str(ckpt_path), "weights_only": True} if ckpt_path else {}
    trainer.fit(model, datamodule=dm, **resume_from)
    run_id = trainer.strategy.broadcast(run_id)
    best = next((Path(cb.best_model_path) for cb in trainer.checkpoint_callbacks if cb.best_model_path), None)
    if best is None:  # no validation epoch ran (e.g. limit_val_batches=0): keep the final weights
        best = runs_dir / run_id / LAST_CHECKPOINT
        trainer.save_checkpoint(best)  # a barrier: every rank calls it, rank 0 writes
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    return TrainResult(run_id, best, metrics)
