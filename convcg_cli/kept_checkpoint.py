"""Validation figures of the checkpoint a training run keeps (ModelCheckpoint's best epoch), read from
the run's MLflow metric history: what ``convcg ablate`` selects variants by and ``convcg tune`` optimises."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from convcg_cli import tracking


def checkpoint_monitor(cfg) -> tuple[str, str] | None:
    """``(monitor, mode)`` of the configured ModelCheckpoint (which epoch's weights a run keeps)."""
    for callback in (cfg.get("callbacks") or {}).values():
        if str(callback.get("_target_", "")).endswith("ModelCheckpoint") and callback.get("monitor"):
            return str(callback.monitor), str(callback.get("mode", "min"))
    return None


def value_at_best_epoch(
    monitor_history: Sequence[tuple[int, float]], history: Sequence[tuple[int, float]], mode: str
) -> float:
    """The value of a metric at the step where the monitor was best (its first best, as
    ModelCheckpoint keeps it); the last value without a monitor history; NaN without any value.

    Example:
        >>> value_at_best_epoch([(1, 0.2), (2, 0.5), (3, 0.5)], [(1, 0.1), (2, 0.4), (3, 0.3)], "max")
        0.4
    """
    if not history:
        return math.nan
    if not monitor_history:
        return history[-1][1]
    scores = np.array([v for _, v in monitor_history])
    best = int(np.argmax(scores) if mode == "max" else np.argmin(scores))
    step = monitor_history[best][0]
    return next((v for s, v in reversed(history) if s == step), math.nan)


def validation_figure(store: tracking.Store, cfg, run_id: str, metric: str) -> float:
    """``metric`` (a ``val/`` metric) of the checkpoint a training run (config ``cfg``) kept, read
    from its history in ``store``. A ``blend/`` metric is computed once, on the kept checkpoint
    (``convcg_cli.blend``): its last value."""
    history = tracking.metric_history(store, run_id, metric)
    if metric.startswith("blend/"):
        return value_at_best_epoch([], history, "max")
    monitor = checkpoint_monitor(cfg)
    if monitor is None:
        return value_at_best_epoch([], history, "max")
    name, mode = monitor
    monitor_history = history if name == metric else tracking.metric_history(store, run_id, name)
    return value_at_best_epoch(monitor_history, history, mode)


KEPT_EPOCH = "kept_epoch"  # the epoch (0-based, Lightning's ``epoch`` metric) of the checkpoint a run kept


def kept_figures(store: tracking.Store, cfg, run_id: str, names: Sequence[str]) -> dict[str, float]:
    """Every ``val/`` metric of ``names`` at the checkpoint the run kept (:func:`validation_figure`),
    those the run never logged left out, and ``kept_epoch``: the epoch of that checkpoint (Lightning
    logs ``epoch`` at every validation step; NaN left out too)."""
    out = {name: validation_figure(store, cfg, run_id, name) for name in names}
    out[KEPT_EPOCH] = validation_figure(store, cfg, run_id, "epoch")
    return {name: value for name, value in out.items() if not math.isnan(value)}
