"""Build the data module and the model a (resolved) training config describes.

Shared by every use case that needs them (``train``, ``evaluate``, ``serve``, the benchmarks):
evaluation and serving rebuild the model from the run's saved config with exactly the code training
used, load its checkpoint as data (``read_checkpoint``) and embed queries the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from convcg_cli.config import instantiate
from convcg_cli.errors import ConfigError, ConvcgError, first_line, some_of
from convcg_cli.index import encode_queries


def build_datamodule(cfg, tasks: list[str], stage: str = "fit", data_cache=None):
    """Instantiate and set up ``cfg.data``: loads, validates and splits the logs (raises on bad input).

    ``stage="validate"`` may skip what only training needs (data.stream: the training shards).
    ``data_cache`` (a :class:`~convcg_cli.data.loading.PreparedDataCache`, ``convcg ablate``): the
    set-up state of an earlier datamodule of the same data and content options is reused."""
    dm = instantiate(cfg.data, tasks=tasks)
    if data_cache is None:
        dm.setup(stage)
    else:
        data_cache.setup(dm, stage)
    return dm


# Sizes the cross block and the head read through interpolation (``out_dim: ${model.hidden_dim}``,
# ``embedding_dim: ${model.embedding_dim}``): config keys for one override to resize both towers,
# not arguments of RetrievalModule.
MODEL_SIZE_KEYS = ("hidden_dim", "embedding_dim")
# Read by ``build_model`` after instantiation (it needs the data), not an argument either.
INIT_FROM_COFACTORS_KEY = "init_item_embeddings_from_cofactors"


def model_from_config(cfg, user_features, item_features):
    """Instantiate ``cfg.model`` for these feature specs with the configured loss.

    ``cfg.model`` is resolved first, then its ``MODEL_SIZE_KEYS`` are left out of the arguments.
    """
    from omegaconf import OmegaConf

    node = OmegaConf.to_container(cfg.model, resolve=True)
    assert isinstance(node, dict)
    skip = (*MODEL_SIZE_KEYS, INIT_FROM_COFACTORS_KEY)
    arguments = OmegaConf.create({k: v for k, v in node.items() if k not in skip})
    return instantiate(
        arguments,
        user_features=user_features,
        item_features=item_features,
        loss=instantiate(cfg.loss),
        val_ks=list(cfg.val_ks),
    )


def build_model(cfg, dm):
    """Instantiate ``cfg.model`` with the feature specs the data defines and the configured loss.

    With ``model.init_item_embeddings_from_cofactors`` (and ``data.cofactors.dim > 0``) the item-id
    tables start from the co-engagement factors instead of at random (training only: a checkpoint
    overwrites them at evaluation).
    """
    from convcg_cli.data.features.cofactors import item_factor_matrix

    model = model_from_config(cfg, dm.user_spec, dm.item_spec)
    if cfg.model.get(INIT_FROM_COFACTORS_KEY, False):
        factors = item_factor_matrix(dm.items.features)
        if factors is None:
            raise ConfigError(
                f"model.{INIT_FROM_COFACTORS_KEY} needs the co-engagement factors: "
                "set data.cofactors.dim > 0."
            )
        model.init_item_embeddings(factors)
    return model


def embed_split(model, dm, split: str) -> np.ndarray:
    """Served query embeddings of every query of ``split``, in query order (the retrieval path's
    :func:`~convcg_cli.index.encode_queries`, ``data.eval_batch_size`` queries at a time)."""
    return encode_queries(model.embed_queries, dm.queries[split].features, dm.eval_batch_size)


def read_checkpoint(path: Path, name: str | None = None) -> dict[str, Any]:
    """A Lightning checkpoint as plain data: ``torch.load(weights_only=True)`` unpickles tensors,
    containers and numbers only, so a tampered checkpoint cannot run code. A file that holds other
    objects, or one cut short (a copy or a write that did not finish), is a ConvcgError naming it as
    ``name`` (e.g. the run's artifact; default: the path), not a traceback."""
    import pickle

    import torch

    what = name or f"The checkpoint {path}"
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ConvcgError(
            f"{what} is not plain weights (tensors, numbers, containers): {first_line(exc)}. "
            "convcg loads checkpoints as data only, so one that holds other objects is refused; "
            "retrain the run."
        ) from None
    except (RuntimeError, EOFError, AttributeError, ValueError, OSError) as exc:
        raise ConvcgError(
            f"{what} is damaged or cut short ({first_line(exc) if str(exc) else 'empty file'}): a write "
            "or a copy of it did not finish. Retrain the run (or resume it, if it was interrupted)."
        ) from None


def non_finite_tensors(state: Mapping[str, Any]) -> list[str]:
    """Names of a state dict's floating-point tensors that hold NaN or inf (checkpoints, served
    towers: one check for both)."""
    import torch

    return [
        key
        for key, value in state.items()
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all()
    ]


def check_finite_weights(state: dict[str, Any], name: str) -> None:
    """ConvcgError naming the tensors of a checkpoint's ``state_dict`` that hold NaN or inf."""
    bad = non_finite_tensors(state.get("state_dict", {}))
    if bad:
        raise ConvcgError(
            f"{name} holds non-finite weights (NaN or inf) in {some_of(bad)}: the training it comes "
            "from diverged. Retrain the run (e.g. with a lower model.optimizer.lr)."
        )


def load_trained_model(train_cfg, dm, checkpoint: Path | dict[str, Any], run_id: str):
    """The run's model rebuilt from its config, with the weights of ``checkpoint`` (a file, or a
    checkpoint :func:`read_checkpoint` already read), in eval mode."""
    model = build_model(train_cfg, dm)
    state = (
        checkpoint if isinstance(checkpoint, dict) else read_checkpoint(checkpoint, _artifact_name(run_id))
    )
    try:
        model.load_state_dict(state["state_dict"])
    except RuntimeError as exc:  # shapes differ: the code or the data changed since training
        first = str(exc).strip().splitlines()[-1].strip()
        raise ConvcgError(
            f"The checkpoint of run {run_id} does not fit the model rebuilt from its saved config and "
            f"{dm.dir} ({first}). The data (feature columns, corpus) or convcg changed since it was "
            "trained; evaluate it on the logs it was trained on, or retrain."
        ) from None
    model.eval()
    return model


def _artifact_name(run_id: str) -> str:
    return f"The checkpoint artifact of run {run_id}"
