"""Build the data module and the model a (resolved) training config describes.

Shared by every use case that needs them (``train``, ``evaluate``, the benchmarks): evaluation rebuilds
the model from the run's saved config with exactly the code training used.
"""

from __future__ import annotations

from convcg_cli.config import instantiate


def build_datamodule(cfg, tasks: list[str], stage: str = "fit"):
    """Instantiate and set up ``cfg.data``: loads, validates and splits the logs (raises on bad input).

    ``stage="validate"`` may skip what only training needs (data.stream: the training shards)."""
    dm = instantiate(cfg.data, tasks=tasks)
    dm.setup(stage)
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
