"""Hydra callbacks of ``convcg train``/``eval`` (``hydra.callbacks`` in ``conf/hydra/default.yaml``)."""

from __future__ import annotations

from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class TrackingStoreReady(Callback):
    """Before a multirun launches its jobs, create the MLflow store and experiment once, here.

    Parallel jobs (joblib, submitit, Ray) that each found a new sqlite store would all run its schema
    migrations and create the experiment at the same time, and all but one fail.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Open the store of ``config.logger`` (if the config has one) and its experiment."""
        if "logger" not in config:
            return
        from convcg_cli import tracking

        tracking.Store.from_config(config.logger).experiment_id()
