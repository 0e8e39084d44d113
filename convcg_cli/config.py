"""Compose Hydra configs from ``conf/`` without ``@hydra.main`` (the CLI is Typer's, not Hydra's)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from convcg_cli.errors import ConfigError, ConvcgError
from convcg_cli.options import check_numeric_options
from convcg_cli.resources import resource_dir

CONF_DIR = resource_dir("conf")
CONFIG_DIR_VARIABLE = "CONVCG_CONFIG_DIR"  # a user's own conf/ tree (also set by ``convcg --config-dir``)


def config_dir() -> Path:
    """The directory configs are composed from: ``$CONVCG_CONFIG_DIR`` when set (a copy of ``conf/``
    with the user's own experiments), else the shipped ``conf/``. Read at each compose, so the global
    ``--config-dir`` option takes effect for the command it precedes."""
    import os

    chosen = os.environ.get(CONFIG_DIR_VARIABLE)
    if not chosen:
        return CONF_DIR
    path = Path(chosen).expanduser().resolve()
    if not (path / "train.yaml").is_file():
        raise ConfigError(
            f"{CONFIG_DIR_VARIABLE}={chosen} holds no train.yaml; point it at a copy of the shipped "
            f"config directory ({CONF_DIR}) with your changes."
        )
    return path


def _register_resolvers() -> None:
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

    try:
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
        hints.append(f"config groups live under {config_dir()}.")
    return (" Hint: " + " ".join(hints)) if hints else ""


def compose(config_name: str, overrides: list[str] | None = None) -> Composed:
    """Compose ``conf/<config_name>.yaml`` with Hydra command-line style overrides and resolve it.

    Raises ConfigError with Hydra's message (plus a hint) for an unknown key, a missing group option,
    ``experiment=`` without ``+``, or a value that does not resolve; and for a numeric option outside
    its range (``convcg_cli.options.NUMERIC_OPTIONS``).
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    _register_resolvers()
    overrides = list(overrides or [])
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3", job_name="convcg"):
        try:
            cfg = hydra_compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
            raw_choices = OmegaConf.to_container(cfg.hydra.runtime.choices)
            assert isinstance(raw_choices, dict)
            choices = {
                str(k): str(v)
                for k, v in raw_choices.items()
                if not str(k).startswith("hydra/") and v is not None
            }
            cfg = OmegaConf.masked_copy(cfg, [str(k) for k in cfg if k != "hydra"])
            OmegaConf.resolve(cfg)
        except (HydraException, OmegaConfBaseException) as exc:
            message = " ".join(str(exc).split())
            raise ConfigError(
                f"Could not compose config '{config_name}' with overrides {overrides}: {message}"
                f"{_hint(message, overrides, config_name)}"
            ) from None
    OmegaConf.set_struct(cfg, True)
    check_numeric_options(cfg)
    return Composed(cfg=cfg, choices=choices, overrides=overrides)


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


# Modules whose classes a run's saved config may name as ``_target_``. A saved config is read back
# from the tracking store (possibly a shared server), so it is data to check, not code to trust.
TRUSTED_TARGET_PREFIXES = ("convcg_cli.", "torch.optim.", "torch.nn.", "lightning.")


def _targets(node, path: str = "") -> list[tuple[str, str]]:
    """``(dotted key, value)`` of every ``_target_`` in a config tree."""
    from omegaconf import ListConfig

    out: list[tuple[str, str]] = []
    if isinstance(node, DictConfig):
        for key, value in node.items():
            where = f"{path}.{key!s}" if path else str(key)
            out += [(where, str(value))] if key == "_target_" else _targets(value, where)
    elif isinstance(node, ListConfig):
        for i, value in enumerate(node):
            out += _targets(value, f"{path}[{i}]")
    return out


def check_trusted_targets(cfg: DictConfig, source: str) -> None:
    """ConfigError when a ``_target_`` in ``cfg`` is outside ``TRUSTED_TARGET_PREFIXES``.

    Args:
        cfg: a config read back from outside this process (a run's saved ``resolved.yaml``).
        source: what it is, for the message (e.g. ``the saved config of run 3f2a...``).
    """
    bad = [(key, target) for key, target in _targets(cfg) if not target.startswith(TRUSTED_TARGET_PREFIXES)]
    if bad:
        listed = ", ".join(f"{key}={target!r}" for key, target in bad)
        raise ConfigError(
            f"Refusing {source}: {listed} is not a class convcg builds (allowed module prefixes: "
            f"{', '.join(TRUSTED_TARGET_PREFIXES)}). The run's config was edited outside convcg; it is "
            "not instantiated."
        )
