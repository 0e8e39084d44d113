"""Compose Hydra configs from ``conf/``: ``compose`` for code (tests, ``convcg ablate``), and
``from_hydra_job`` for a config Hydra's own command line composed (``convcg train``/``eval``)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from convcg_cli.errors import ConfigError, ConvcgError
from convcg_cli.options import check_numeric_options
from convcg_cli.resources import resource_dir
from convcg_cli.targets import check_buildable, check_override_targets, upgrade_moved_targets

CONF_DIR = resource_dir("conf")
CONFIG_DIR_VARIABLE = "CONVCG_CONFIG_DIR"  # a user's own conf/ tree (also set by ``convcg --config-dir``)


def extra_config_dir() -> Path | None:
    """``$CONVCG_CONFIG_DIR`` (also set by ``convcg --config-dir``): a directory of the user's own
    configs searched beside the shipped ``conf/``, as Hydra's ``--config-dir`` is (e.g. their
    ``experiment/*.yaml``); None when unset. Read at each compose."""
    chosen = os.environ.get(CONFIG_DIR_VARIABLE)
    if not chosen:
        return None
    path = Path(chosen).expanduser().resolve()
    if not path.is_dir():
        raise ConfigError(
            f"{CONFIG_DIR_VARIABLE}={chosen} is not a directory; point it at a directory of your own "
            f"config groups (e.g. DIR/experiment/mine.yaml, used as +experiment=mine)."
        )
    return path


def check_home() -> None:
    """ConfigError when ``$CONVCG_HOME`` names something that is not a directory (a file): every
    run, output and store of convcg lives under it. A home that does not exist yet is made later."""
    home = os.environ.get("CONVCG_HOME")
    if home and Path(home).expanduser().exists() and not Path(home).expanduser().is_dir():
        raise ConfigError(
            f"CONVCG_HOME={home} is a file, not a directory: convcg keeps its MLflow store, runs and "
            "outputs under it. Point CONVCG_HOME at a directory (it is created when missing)."
        )


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
        extra = os.environ.get(CONFIG_DIR_VARIABLE)
        hints.append(f"config groups live under {CONF_DIR}" + (f" and {extra}." if extra else "."))
    return (" Hint: " + " ".join(hints)) if hints else ""


def _app_choices(raw_choices) -> dict[str, str]:
    """The config-group options chosen (Hydra's ``runtime.choices``), without Hydra's own groups
    (``hydra/...``, and ``hydra`` itself: the primary configs' ``- hydra: default`` entry)."""
    return {
        str(k): str(v)
        for k, v in raw_choices.items()
        if str(k) != "hydra" and not str(k).startswith("hydra/") and v is not None
    }


def config_error(config_name: str, overrides: list[str], exc: Exception) -> ConfigError:
    """Hydra's or OmegaConf's composition error as a ConfigError: its message plus a hint (did you mean)."""
    message = " ".join(str(exc).split())
    return ConfigError(
        f"Could not compose config '{config_name}' with overrides {overrides}: {message}"
        f"{_hint(message, overrides, config_name)}"
    )


def check_overrides(overrides: list[str]) -> None:
    """ConfigError, before Hydra reads anything, for an override that would load or build something
    outside convcg: a config-group option that climbs out of the config search path
    (``+experiment=../../elsewhere``: options resolve only inside conf/ and ``$CONVCG_CONFIG_DIR``),
    or a ``_target_`` outside the registry (``targets.BUILDABLE_TARGETS``)."""
    extra = extra_config_dir()
    for override in overrides:
        key, sep, value = override.partition("=")
        group = key.lstrip("+~").split("@", 1)[0]
        roots = [CONF_DIR, *([extra] if extra else [])]
        if not sep or "." in group or not ("/" in group or any((r / group).is_dir() for r in roots)):
            continue  # a value (data_dir=/abs/path), not a config-group option
        options = [o.strip().strip("'\"[]") for o in value.split(",")]
        if any(o.startswith("/") or ".." in o.split("/") for o in options):
            raise ConfigError(
                f"The override {override!r} names a config outside the config search path: the "
                f"options of '{group}' are names of files in conf/{group}/ (or in "
                f"${CONFIG_DIR_VARIABLE}/{group}/), e.g. +experiment=unified_parallel."
            )
    check_override_targets(overrides)


def _finish(cfg: DictConfig, choices: dict[str, str], overrides: list[str]) -> Composed:
    """Resolve ``cfg`` (every interpolation, once), freeze its keys (struct mode) and check its
    numeric options (``convcg_cli.options``)."""
    upgrade_moved_targets(cfg)
    check_buildable(cfg, "the composed config")  # before resolving: an override may name any class
    OmegaConf.resolve(cfg)
    OmegaConf.set_struct(cfg, True)
    check_numeric_options(cfg)
    return Composed(cfg=cfg, choices=choices, overrides=overrides)


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

    register_resolvers()
    check_home()
    overrides = list(overrides or [])
    check_overrides(overrides)
    extra = extra_config_dir()
    search = [f"hydra.searchpath=[file://{extra}]"] if extra else []
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="convcg"):
        try:
            cfg = hydra_compose(
                config_name=config_name, overrides=[*overrides, *search], return_hydra_config=True
            )
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

    check_buildable(node, "the config to build")  # whatever built it, a node is data until checked
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
