"""The importer mapping file (``conf/importer/<source>.yaml``): finding and reading it, checking its
required keys, and reading its column specs (a signal's columns, a ``{column: ...}`` block)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from convcg_cli.config import CONF_DIR
from convcg_cli.errors import ConfigError

IMPORTER_DIR = CONF_DIR / "importer"


def available_sources() -> list[str]:
    """Names of the shipped mappings (``conf/importer/*.yaml``)."""
    return sorted(p.stem for p in IMPORTER_DIR.glob("*.yaml"))


def load_mapping(source: str | Path) -> dict[str, Any]:
    """The mapping of a shipped source name (``conf/importer/NAME.yaml``) or of a YAML file path.

    Raises:
        ConfigError: no such source, or the file does not hold a mapping with the required sections.
    """
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    path = Path(source)
    if path.suffix not in (".yaml", ".yml"):
        path = IMPORTER_DIR / f"{source}.yaml"
    if not path.is_file():
        raise ConfigError(
            f"No importer mapping for source '{source}' ({path} does not exist); choose one of "
            f"{', '.join(available_sources())} or pass the path of a mapping .yaml."
        )
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except (yaml.YAMLError, OmegaConfBaseException) as exc:
        raise ConfigError(f"{path} is not a readable importer mapping: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level.")
    mapping: dict[str, Any] = {str(k): v for k, v in raw.items()}
    missing = [k for k in ("impressions", "items") if not isinstance(mapping.get(k), dict)]
    if missing:
        raise ConfigError(f"{path}: the mapping needs sections {missing} (see conf/importer/kuairand.yaml).")
    mapping.setdefault("source", path.stem)
    return mapping


def as_columns(spec: Any) -> list[str]:
    """A signal's source columns: null -> [], a name -> [name], a list -> the list."""
    if spec is None:
        return []
    return [spec] if isinstance(spec, str) else list(spec)


def as_block(spec: Any) -> dict[str, Any]:
    """A ``{column: ...}`` block, also accepted as a bare column name."""
    if spec is None:
        return {}
    return {"column": spec} if isinstance(spec, str) else dict(spec)


_REQUIRED_KEYS = {
    "impressions": ("files", "user", "item", "timestamp", "clicked", "converted"),
    "items": ("file", "item"),
    "users": ("file", "user"),
    "user_history": ("file", "user", "columns"),
}


def check_keys(mapping: Mapping[str, Any]) -> None:
    """Raise ConfigError naming every required mapping key that is absent (``users`` and
    ``user_history`` are optional sections; their keys are required when they are given)."""
    missing = [
        f"{section}.{key}"
        for section, keys in _REQUIRED_KEYS.items()
        if section not in ("users", "user_history") or mapping.get(section)
        for key in keys
        if (mapping.get(section) or {}).get(key) is None
    ]
    if missing:
        raise ConfigError(
            f"The importer mapping for '{mapping.get('source', '?')}' lacks {', '.join(missing)} "
            f"(every key is described in conf/importer/kuairand.yaml)."
        )
