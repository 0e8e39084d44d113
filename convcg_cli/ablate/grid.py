"""An ablation grid (``conf/ablate/<GRID>.yaml``) and the outcome of its cells.

Pure parsing and bookkeeping: composing the grid's config is the only side effect here.
"""

from __future__ import annotations

import fnmatch
import itertools
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

from omegaconf import OmegaConf

from convcg_cli.config import CONF_DIR, compose, extra_config_dir
from convcg_cli.errors import ConfigError
from convcg_cli.evaluate import PositiveHits
from convcg_cli.tasks import CONVERSION

GRID_DIR = CONF_DIR / "ablate"
FINISHED = "FINISHED"
FAILED = "FAILED"
SUMMARY_FILE = "summary.json"  # reports/<GRID>/summary.json: every cell's figures and choices
# The train option that moves a fold's end back in time (its last N days are dropped before the split).
END_OFFSET_KEY = "data.end_offset_days"
_GRID_KEYS = {
    "seeds",
    "select",
    "eval_overrides",
    "train_overrides",
    "variants",
    "sweep",
    "folds",
    "refit_of",
    "primary",
}


@dataclass(frozen=True)
class Variant:
    """One cell of the grid: a name, the train overrides that make it, and whether it is a baseline."""

    name: str
    overrides: tuple[str, ...]
    baseline: bool = False


@dataclass(frozen=True)
class Grid:
    """A parsed ``conf/ablate/<name>.yaml``: variants (sweep already expanded), seeds, eval overrides.

    ``select_task``/``select_k`` name the validation metric that picks the best variant; ``folds``
    is the number of rolling-origin folds (fold f ends ``f * data.heldout_days`` days earlier).
    ``refit_of`` names the grid whose validation figures chose this grid's single design, which is
    retrained here with the validation days (``data.train_through_val``): it has no validation
    figure of its own; each of its windows takes what that grid chose on the same window's
    validation days (:mod:`.refit`), and the report says what and from where. ``primary`` is the
    pre-registered verdict: what the validation-chosen design is compared with (baselines by name,
    or baseline variants of the grid), pooled over the folds, by the two-level bootstrap over seeds
    and users; ``sha256`` is the grid file's hash, printed in the report with the commit, and
    ``declared`` its header comment (what the grid declares before it runs: the primary comparison,
    what was left out for time), which the report quotes while the file is unchanged.
    """

    name: str
    variants: tuple[Variant, ...]
    seeds: tuple[int, ...]
    eval_overrides: tuple[str, ...] = ()
    select_task: str = CONVERSION
    select_k: int = 100
    folds: int = 1
    refit_of: str | None = None
    primary: tuple[str, ...] = ()
    sha256: str | None = None
    declared: str = ""


@dataclass
class ChildResult:
    """Outcome of one (variant, seed, fold): its run id (None if it failed before a run existed),
    its metrics (held-out ones and the validation figure that selects), and the held-out hit flags of
    the selection task (the model's and every baseline's) for paired comparisons."""

    variant: str
    seed: int
    run_id: str | None
    status: str  # FINISHED or FAILED
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    data_dir: str | None = None
    fold: int = 0
    hits: PositiveHits | None = None


def available_grids() -> list[str]:
    """Names of the grids in ``conf/ablate/``."""
    return sorted({p.stem for directory in grid_dirs() for p in directory.glob("*.yaml")})


def grid_dirs() -> list[Path]:
    """Where grids are found: the shipped ``conf/ablate/``, then ``ablate/`` of the user's config
    directory (``convcg --config-dir`` / ``$CONVCG_CONFIG_DIR``) when it has one."""
    extra = extra_config_dir()
    return [GRID_DIR, *([extra / "ablate"] if extra is not None and (extra / "ablate").is_dir() else [])]


def _sweep_name(key: str, value) -> str:
    return f"{key.split('.')[-1]}={value}"


def _variants(name: str, spec: dict[str, Any]) -> list[Variant]:
    """The grid's variants, every non-baseline one crossed with the sweep."""
    sweep = [[(key, value) for value in values] for key, values in (spec.get("sweep") or {}).items()]
    variants: list[Variant] = []
    for item in spec["variants"]:
        if not isinstance(item, dict) or set(item) - {"name", "overrides", "baseline"} or "name" not in item:
            raise ConfigError(f"Grid '{name}': a variant needs a name and overrides, got {item}.")
        base = Variant(str(item["name"]), tuple(item.get("overrides") or ()), bool(item.get("baseline")))
        if base.baseline or not sweep:
            variants.append(base)
            continue
        for combo in itertools.product(*sweep):
            suffix = ",".join(_sweep_name(k, v) for k, v in combo)
            extra = tuple(f"{k}={v}" for k, v in combo)
            variants.append(Variant(f"{base.name}/{suffix}", base.overrides + extra))
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ConfigError(f"Grid '{name}' has duplicate variant names: {names}.")
    return variants


def load_grid(name: str) -> Grid:
    """Compose ``conf/ablate/<name>.yaml`` and expand its sweep; ConfigError for a bad or unknown grid."""
    if name not in available_grids():
        dirs = ", ".join(str(d) for d in grid_dirs())
        raise ConfigError(f"Unknown ablation grid '{name}'; choose one of {available_grids()} ({dirs}).")
    # Composed as a config group: Hydra finds a primary config only on its first search path, a
    # group option on every one (the user's --config-dir too).
    grid_cfg = compose("ablate_cell", [f"+ablate={name}"]).cfg.ablate
    spec = cast(dict[str, Any], OmegaConf.to_container(grid_cfg, resolve=True))
    unknown = set(spec) - _GRID_KEYS
    if unknown or not spec.get("variants") or not spec.get("seeds"):
        raise ConfigError(
            f"Grid {name}.yaml needs 'variants' and 'seeds' (optional: select, eval_overrides, "
            f"train_overrides, sweep, folds, refit_of, primary); unknown keys: {sorted(unknown)}."
        )
    folds = spec.get("folds", 1)
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 1:
        raise ConfigError(f"Grid '{name}': folds must be an integer >= 1, got {folds!r}.")
    select = spec.get("select") or {}
    refit_of = check_refit_of(name, spec.get("refit_of"), _variants(name, spec))
    # Train overrides shared by every variant come first, so a variant can still override them.
    common = tuple(str(o) for o in spec.get("train_overrides") or ())
    return Grid(
        name=name,
        variants=tuple(replace(v, overrides=(*common, *v.overrides)) for v in _variants(name, spec)),
        seeds=tuple(int(s) for s in spec["seeds"]),
        eval_overrides=tuple(spec.get("eval_overrides") or ()),
        select_task=str(select.get("task", CONVERSION)),
        select_k=int(select.get("k", 100)),
        folds=folds,
        refit_of=refit_of,
        primary=_primary(name, spec.get("primary")),
        sha256=grid_file_sha256(name),
        declared=grid_file_header(name),
    )


def _primary(name: str, spec: Any) -> tuple[str, ...]:
    """The names of the grid's ``primary: {against: [...]}`` block (none without one)."""
    if spec is None:
        return ()
    against = spec.get("against") if isinstance(spec, dict) else None
    if not isinstance(against, list) or not against or set(spec) - {"against"}:
        raise ConfigError(
            f"Grid '{name}': primary must be {{against: [NAME, ...]}}, the baselines (e.g. "
            f"ease_popularity) or baseline variants the chosen design is compared with; got {spec}."
        )
    return tuple(str(a) for a in against)


def source_commit() -> str:
    """The git commit of the convcg checkout running the grid (``git rev-parse HEAD``), with
    ``+dirty`` when tracked files differ from it; ``unknown`` outside a git checkout."""
    import subprocess

    root = CONF_DIR.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=root, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.returncode == 1 else "")


def grid_file_sha256(name: str) -> str | None:
    """sha256 of the grid's file as it is on disk (the first grid directory holding it)."""
    import hashlib

    for directory in grid_dirs():
        path = directory / f"{name}.yaml"
        if path.is_file():
            return hashlib.sha256(path.read_bytes()).hexdigest()
    return None


def grid_file_header(name: str) -> str:
    """The grid file's leading comment lines (:func:`header_of`; empty without a file or header)."""
    for directory in grid_dirs():
        path = directory / f"{name}.yaml"
        if path.is_file():
            return header_of(path.read_text())
    return ""


def header_of(text: str) -> str:
    r"""The comment lines at the top of a YAML text, without their ``#`` and one space.

    Example:
        >>> header_of("# convcg ablate x\n# Declared: a vs b.\nseeds: [0]  # not this\n")
        'convcg ablate x\nDeclared: a vs b.'
    """
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[2:] if line.startswith("# ") else line[1:])
    return "\n".join(lines).strip()


def check_refit_of(name: str, refit_of: str | None, variants: Sequence[Variant]) -> str | None:
    """``refit_of`` as given, or ConfigError unless it names a known grid and grid ``name``
    has exactly one design (the one that grid chose on validation)."""
    designs = [v for v in variants if not v.baseline]
    if refit_of is not None and (refit_of not in available_grids() or len(designs) != 1):
        raise ConfigError(
            f"Grid '{name}': refit_of must name a grid of {available_grids()} (got {refit_of!r}) and "
            f"the grid must have exactly one design to refit (it has {len(designs)})."
        )
    return refit_of


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``; ConfigError for anything else."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds takes comma-separated integers, e.g. 0,1,2; got {text!r}.") from None
    if not seeds:
        raise ConfigError("--seeds is empty; give at least one seed, e.g. --seeds 0.")
    return seeds


def select(grid: Grid, seeds: Sequence[int] | None = None, patterns: Sequence[str] | None = None) -> Grid:
    """The grid restricted to ``seeds`` and to variants whose name matches a glob in ``patterns``."""
    variants = grid.variants
    if patterns:
        variants = tuple(v for v in variants if any(fnmatch.fnmatchcase(v.name, p) for p in patterns))
        if not variants:
            raise ConfigError(
                f"--variants {','.join(patterns)} matches none of {[v.name for v in grid.variants]}."
            )
    return replace(grid, variants=variants, seeds=tuple(seeds) if seeds else grid.seeds)


def reproduce_command(grid: Grid, train_overrides: Sequence[str], patterns: Sequence[str] | None) -> str:
    """The shell command that runs this ablation again (seeds always spelled out)."""
    args = ["convcg", "ablate", grid.name, *train_overrides, "--seeds", ",".join(map(str, grid.seeds))]
    if patterns:
        args += ["--variants", ",".join(patterns)]
    return shlex.join(args)


def fold_overrides(fold: int, heldout_days: int) -> tuple[str, ...]:
    """Train overrides of rolling-origin fold ``fold``: its logs end ``fold * heldout_days`` days early.

    Fold 0 is the grid as configured; fold f evaluates on the ``heldout_days`` days just before fold
    f - 1's held-out days, so the folds' held-out windows do not overlap.

    Example:
        >>> fold_overrides(0, 3), fold_overrides(2, 3)
        ((), ('data.end_offset_days=6',))
    """
    if fold < 0 or heldout_days < 1:
        raise ValueError(f"fold must be >= 0 and heldout_days >= 1, got {fold} and {heldout_days}.")
    return () if fold == 0 else (f"{END_OFFSET_KEY}={fold * heldout_days}",)


def grid_yaml(grid: Grid, train_overrides: Sequence[str]) -> str:
    """The grid as run (variants expanded, the train overrides added), as YAML for the parent run."""
    spec = {
        "name": grid.name,
        "seeds": list(grid.seeds),
        "folds": grid.folds,
        "train_overrides": list(train_overrides),
        "eval_overrides": list(grid.eval_overrides),
        "select": {"task": grid.select_task, "k": grid.select_k, "split": "val"},
        **({"refit_of": grid.refit_of} if grid.refit_of else {}),
        "variants": [
            {"name": v.name, "baseline": v.baseline, "overrides": list(v.overrides)} for v in grid.variants
        ],
    }
    return OmegaConf.to_yaml(OmegaConf.create(spec))
