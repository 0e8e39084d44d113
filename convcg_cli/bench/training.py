"""The training pieces every measured step shares: ``convcg train``'s config on a data directory
(tracking into a throwaway store), its datamodule and model, a bare hand-written training loop, and a
measure of the first step's forward and backward.

Used by :mod:`.steps`, :mod:`.serving` and :mod:`.grid`; imports none of them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from omegaconf import DictConfig

from convcg_cli.bench.measure import Clock

T = TypeVar("T")  # what a first-step measure returns


def train_overrides(cfg: DictConfig, data_dir: str, workdir: str) -> list[str]:
    """The train overrides of a measured run: ``data_dir``, a throwaway store in ``workdir``, the seed
    and ``train_overrides`` of conf/bench.yaml."""
    return [
        f"data.dir={data_dir}",
        f"logger.tracking_uri=sqlite:///{workdir}/timing-mlflow.db",
        f"logger.artifact_location={workdir}/timing-artifacts",
        f"seed={cfg.seed}",
        *cfg.train_overrides,
    ]


def train_config(cfg: DictConfig, data_dir: str, workdir: str) -> DictConfig:
    """conf/train.yaml on ``data_dir``, tracking into a throwaway store in ``workdir``."""
    from convcg_cli.config import compose

    return compose("train", train_overrides(cfg, data_dir, workdir)).cfg


def setup_model(train_cfg: DictConfig):
    """Seed, then build the datamodule (timed) and the model exactly as ``convcg train`` does."""
    import lightning as L

    from convcg_cli.tasks import check_task_names
    from convcg_cli.train import build_datamodule, build_model

    L.seed_everything(train_cfg.seed, workers=True, verbose=False)
    start = time.perf_counter()
    dm = build_datamodule(train_cfg, check_task_names(train_cfg.loss.task_weights.keys()))
    seconds = time.perf_counter() - start
    return dm, build_model(train_cfg, dm), seconds


@contextmanager
def _without_logging(model) -> Iterator[None]:
    """``self.log`` as a no-op: the bare loop has no logger, as a hand-written loop would not."""
    model.log = model.log_dict = lambda *args, **kwargs: None
    try:
        yield
    finally:
        del model.log, model.log_dict


def _epochs(dm) -> Iterator[dict]:
    """Training batches, epoch after epoch (a small dataset may have fewer batches than asked for)."""
    while True:
        yield from dm.train_dataloader()


def bare_loop(model, dm, warmup: int, batches: int, clip: float | None) -> Clock:
    """``batches`` training steps after ``warmup`` by hand: the module's own ``training_step``, then
    zero_grad, backward, gradient clipping and the optimizer step, as Lightning does them."""
    import torch

    optimizer = model.configure_optimizers()
    model.train()
    clock = Clock()
    with _without_logging(model):
        for i, batch in enumerate(_epochs(dm)):
            if i >= warmup:
                clock.tick()
            if i == warmup + batches:
                break
            loss = model.training_step(batch, i)
            optimizer.zero_grad()
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
    return clock


def measure_first_step(model, dm, measure: Callable[[Callable[[], None]], T]) -> T:
    """``measure(forward_backward)`` for one training step's forward and backward on the first batch
    (e.g. ``flops.step_flops`` or ``flops.record_matmuls``); the gradients and the random streams are
    left as they were, so the timed rounds after it do what they would without it."""
    import torch

    batch = next(iter(dm.train_dataloader()))
    model.train()

    def forward_backward() -> None:
        model.training_step(batch, 0).backward()

    with torch.random.fork_rng(), _without_logging(model):
        measured = measure(forward_backward)
    model.zero_grad(set_to_none=True)
    return measured
