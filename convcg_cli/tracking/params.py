"""A run's params and name: what a person compares runs on in the MLflow UI."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from omegaconf import DictConfig, OmegaConf

if TYPE_CHECKING:
    from convcg_cli.tracking.store import TrackedRun

MAX_PARAM_LENGTH = 500
CONFIG_NOISE_KEYS = ("_target_", "_partial_", "_convert_", "_recursive_", "_args_")  # Hydra's plumbing


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


def design(choices: Mapping[str, str]) -> str:
    """What a trained run is a run of: the experiment, or the head and cross options without one.

    Example:
        >>> design({"model/head": "unified", "model/cross": "parallel"})
        'unified_parallel'
    """
    tags = choice_tags(choices)
    return tags.get("experiment") or f"{tags.get('head', 'model')}_{tags.get('cross', '')}".rstrip("_")


def run_name(cfg: DictConfig, choices: Mapping[str, str]) -> str:
    """``logger.run_name`` when set, else design, seed and data: ``unified_parallel s0 · kuairand``
    (:func:`design`). What tells runs apart comes first: the UI's runs table cuts names at about
    25 characters.

    Example:
        >>> cfg = OmegaConf.create({"seed": 0, "data": {"dir": "/x/kuairand"}, "logger": {}})
        >>> run_name(cfg, {"model/head": "unified", "model/cross": "parallel"})
        'unified_parallel s0 · kuairand'
    """
    if cfg.logger.get("run_name"):
        return str(cfg.logger.run_name)
    return f"{design(choices)} s{cfg.seed} · {Path(str(cfg.data.dir)).name}"


def log_params(run: TrackedRun, params: Mapping[str, str]) -> None:
    """Log ``params`` into the run (MLflow takes 100 per batch)."""
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), 100):
        run.client.log_batch(run.run_id, params=items[i : i + 100])


def log_config_params(run: TrackedRun, cfg: DictConfig, skip_prefixes: tuple[str, ...] = ()) -> None:
    """The resolved config, flattened, as the run's params; keys starting with one of
    ``skip_prefixes`` are left out."""
    container = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(container, dict)
    flat = flatten(cast(dict[str, Any], container))
    log_params(run, {k: v for k, v in flat.items() if not k.startswith(skip_prefixes)})
