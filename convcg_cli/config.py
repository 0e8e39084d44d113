"""Compose Hydra configs from ``conf/``: ``compose`` for code (tests, ``convcg ablate``), and
``from_hydra_job`` for a config Hydra's own command line composed (``convcg train``/``eval``)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from convcg_cli.errors import ConfigError, ConvcgError
from convcg_cli.resources import resource_dir

CONF_DIR = resource_dir("conf")


def register_resolvers() -> None:
    """Register convcg's OmegaConf resolvers (``abspath``); needed before any config is resolved."""
    # `${abspath:...}` makes paths absolute at compose time, so a run's saved config points at the
    # same files wherever `convcg eval` is later started from.
    if not OmegaConf.has_resolver("abspath"):
        OmegaConf.register_new_resolver("abspath", lambda p: str(Path(p).expanduser().resolve()))


@dataclass(frozen=True)
class Composed:
    """A resolved config plus the config-group options chosen for it (e.g. ``model/head: unified``)."""

    cfg: DictConfig
    choices: dict[str, str]
    overrides: list[str]


def _keys(cfg, prefix: str = "") -> list[str]:
    out = []
    for key, value in cfg.items():
        out.append(f"{prefix}{key}")
        if isinstance(value, DictConfig):
            out.extend(_keys(value, f"{prefix}{key}."))
    return out


def _close_keys(config_name: str, key: str) -> list[str]:
    """Existing keys of the plain config that look like ``key`` (for "did you mean")."""
    import difflib

    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    try:
        if GlobalHydra.instance().is_initialized():  # called from compose(): its config dir is set
            cfg = hydra_compose(config_name=config_name, overrides=[])
        else:  # called after a Hydra command line failed
            with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="convcg"):
                cfg = hydra_compose(config_name=config_name, overrides=[])
    except Exception:  # the hint is best effort; the original error is what matters
        return []
    return difflib.get_close_matches(key, _keys(cfg), n=3, cutoff=0.75)


def _hint(message: str, overrides: list[str], config_name: str) -> str:
    hints = []
    bad_key = re.search(r"Could not override '([^']+)'", message)
    if "No match in the defaults list" in message and any(o.startswith("experiment=") for o in overrides):
        hints.append("experiment is not in the defaults list: select one with '+experiment=NAME'.")
    elif bad_key and bad_key.group(1).startswith("data.stream."):
        hints.append(
            "data.stream.* are options of the streamed data path: select it with 'data/stream=streamed' "
            "(it replaced data.stream.enabled=true)."
        )
    elif bad_key:
        close = _close_keys(config_name, bad_key.group(1))
        if close:
            hints.append(f"did you mean {' or '.join(repr(c) for c in close)}?")
        hints.append("Check the key's spelling; to add a new key on purpose, prefix it with '+'.")
    if "Could not find" in message:
        hints.append(f"config groups live under {CONF_DIR}.")
    return (" Hint: " + " ".join(hints)) if hints else ""


def _app_choices(raw_choices) -> dict[str, str]:
    """The config-group options chosen (Hydra's ``runtime.choices``), without Hydra's own groups."""
    return {
        str(k): str(v) for k, v in raw_choices.items() if not str(k).startswith("hydra/") and v is not None
    }


def config_error(config_name: str, overrides: list[str], exc: Exception) -> ConfigError:
    """Hydra's or OmegaConf's composition error as a ConfigError: its message plus a hint (did you mean)."""
    message = " ".join(str(exc).split())
    return ConfigError(
        f"Could not compose config '{config_name}' with overrides {overrides}: {message}"
        f"{_hint(message, overrides, config_name)}"
    )


def _finish(cfg: DictConfig, choices: dict[str, str], overrides: list[str]) -> Composed:
    """Resolve ``cfg`` (every interpolation, once) and freeze its keys (struct mode)."""
    OmegaConf.resolve(cfg)
    OmegaConf.set_struct(cfg, True)
    return Composed(cfg=cfg, choices=choices, overrides=overrides)


def compose(config_name: str, overrides: list[str] | None = None) -> Composed:
    """Compose ``conf/<config_name>.yaml`` with Hydra command-line style overrides and resolve it.

    Raises ConfigError with Hydra's message (plus a hint) for an unknown key, a missing group option,
    ``experiment=`` without ``+``, or a value that does not resolve.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    register_resolvers()
    overrides = list(overrides or [])
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="convcg"):
        try:
            cfg = hydra_compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
            choices = _app_choices(cfg.hydra.runtime.choices)
            cfg = OmegaConf.masked_copy(cfg, [str(k) for k in cfg if k != "hydra"])
            return _finish(cfg, choices, overrides)
        except (HydraException, OmegaConfBaseException) as exc:
            raise config_error(config_name, overrides, exc) from None


def from_hydra_job(cfg: DictConfig) -> Composed:
    """The config Hydra composed for the running job (``@hydra.main``), resolved and checked like
    ``compose``'s; the overrides are this job's (a multirun job's include its sweep values)."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf.errors import OmegaConfBaseException

    hydra_cfg = HydraConfig.get()
    overrides = [str(o) for o in hydra_cfg.overrides.task]
    try:
        return _finish(cfg, _app_choices(hydra_cfg.runtime.choices), overrides)
    except OmegaConfBaseException as exc:
        raise config_error(str(hydra_cfg.job.config_name), overrides, exc) from None


def instantiate(node, **kwargs):
    """``hydra.utils.instantiate`` whose failures read as config errors, not library tracebacks.

    A ConvcgError raised by a constructor (bad data, unknown task) passes through unchanged; a
    constructor rejecting its arguments (TypeError/ValueError) becomes a ConfigError naming the target.
    """
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate as hydra_instantiate

    try:
        return hydra_instantiate(node, **kwargs)
    except InstantiationException as exc:
        cause = exc.__cause__
        if isinstance(cause, ConvcgError):
            raise cause from None
        if isinstance(cause, (TypeError, ValueError)):
            target = node.get("_target_", "?") if hasattr(node, "get") else "?"
            raise ConfigError(f"The config for {target} was rejected: {cause}") from None
        raise
