"""A refit grid's choices, window by window (``refit_of`` in ``conf/ablate/<GRID>.yaml``).

A refit retrains the validation-chosen design with the validation days in its training window
(``data.train_through_val``), so it cannot choose anything on validation itself. Everything chosen
there comes from the ``refit_of`` grid's SAME window (fold) only, so no later window's choice reaches
an earlier one:

* the popularity blend (beta, fallback weight) that grid's design was scored with in that window:
  the cell of the same seed, else the median over the window's seeds;
* every baseline's options chosen on that window's validation days (``conf/eval.yaml``
  ``baseline_tuning``, and ease_popularity's own weight), the same for every seed.

Written: every grid's ``summary.json`` records each cell's ``chosen`` values (:func:`cell_choices`,
from the metrics its evaluation logged). Read: :func:`window_choices` takes them back from the other
grid's ``reports/<GRID>/summary.json`` and turns them into each refit cell's train and eval overrides;
:func:`refit_section` prints them in the refit's report.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from convcg_cli.ablate.grid import FINISHED, SUMMARY_FILE, Grid
from convcg_cli.baseline_tuning import chosen_value
from convcg_cli.blend import BETA_METRIC, GAMMA_METRIC
from convcg_cli.errors import ConfigError
from convcg_cli.evaluate import BASELINE_PREFIX, FALLBACK_WEIGHT_METRIC, PRIOR_WEIGHT_METRIC
from convcg_cli.markdown import table

CHOSEN = "chosen"  # <split>/baseline_<name>/chosen/<option>: what validation chose (evaluate.py)
# Where a cell's blend weights are read: what its evaluation scored with, else what training chose.
_BLEND_SOURCES = ((PRIOR_WEIGHT_METRIC, FALLBACK_WEIGHT_METRIC, True), (BETA_METRIC, GAMMA_METRIC, False))


@dataclass(frozen=True)
class WindowChoice:
    """What refit cell (``fold``, ``seed``) takes from grid ``source``'s same window.

    Attributes:
        design: the design ``source`` selected on validation in that window.
        blend: ``{"beta", "fallback_weight"}`` that design was scored with; None: the two-tower alone.
        blend_from: whose blend: ``seed 1``, or the median over the window's seeds.
        baselines: baseline -> option -> the value chosen on that window's validation days.
        train_overrides, eval_overrides: what the refit cell gets for them.
    """

    fold: int
    seed: int
    source: str
    design: str
    blend: dict[str, float] | None
    blend_from: str
    baselines: dict[str, dict[str, Any]]
    train_overrides: tuple[str, ...]
    eval_overrides: tuple[str, ...]


def choice_candidates(eval_cfg) -> dict[str, dict[str, list]]:
    """Per baseline and option, the values validation chooses from (``baseline_tuning`` lists and
    list-valued ``baseline_options`` such as ease_popularity's ``weights``): a logged choice (a number)
    is written back as the candidate it stands for (null, true/false)."""
    tuning = OmegaConf.to_container(eval_cfg.get("baseline_tuning") or {}, resolve=True)
    options = OmegaConf.to_container(eval_cfg.get("baseline_options") or {}, resolve=True)
    out: dict[str, dict[str, list]] = {}
    for source in (options, tuning):
        assert isinstance(source, dict)
        for name, grid in source.items():
            if isinstance(grid, dict):
                lists = {str(o): v for o, v in grid.items() if isinstance(v, list)}
                out.setdefault(str(name), {}).update(lists)
    return out


def _decode(value: float, candidates: Sequence[Any]) -> Any:
    """The first candidate whose logged number is ``value`` (``None`` for 0 of ``[null, 1, 3]``),
    else ``value`` itself."""
    for candidate in candidates:
        try:
            if math.isclose(chosen_value(candidate), value, rel_tol=1e-9, abs_tol=1e-12):
                return candidate
        except ConfigError:  # a string candidate is never logged as a number
            continue
    return float(value)


def cell_choices(
    metrics: Mapping[str, float], split: str, candidates: Mapping[str, Mapping[str, list]] | None = None
) -> dict[str, Any]:
    """What validation chose for one cell, from the metrics its run logged: ``blend`` (the weights
    its evaluation scored the model with, ``<split>/prior/...``, else training's ``blend/...``; None
    without a blend) and ``baselines`` (``<split>/baseline_<name>/chosen/<option>``, decoded by
    :func:`choice_candidates`).

    Example:
        >>> cell_choices({"heldout/prior/beta": 0.05, "heldout/baseline_popularity/chosen/window_days": 0.0,
        ...               "heldout/baseline_popularity/chosen/val_recall_at_100": 0.3}, "heldout",
        ...              {"popularity": {"window_days": [None, 3]}})
        {'blend': {'beta': 0.05, 'fallback_weight': 0.0}, 'baselines': {'popularity': {'window_days': None}}}
    """
    blend = None
    for beta, gamma, per_split in _BLEND_SOURCES:
        beta, gamma = (f"{split}/{beta}", f"{split}/{gamma}") if per_split else (beta, gamma)
        if beta in metrics:
            blend = {"beta": float(metrics[beta]), "fallback_weight": float(metrics.get(gamma, 0.0))}
            break
    head = f"{split}/{BASELINE_PREFIX}"
    baselines: dict[str, dict[str, Any]] = {}
    for name, value in sorted(metrics.items()):
        parts = name[len(head) :].split("/") if name.startswith(head) else []
        if len(parts) == 3 and parts[1] == CHOSEN and not parts[2].startswith("val_recall_at_"):
            known = (candidates or {}).get(parts[0], {}).get(parts[2], [])
            baselines.setdefault(parts[0], {})[parts[2]] = _decode(value, known)
    return {"blend": blend, "baselines": baselines}


def _hydra_value(value: Any) -> str:
    """A value as a Hydra override writes it: null, true/false, numbers as JSON."""
    return json.dumps(float(value) if isinstance(value, float) else value)


def _blend_overrides(group: str, blend: dict[str, float] | None) -> list[str]:
    """One value per weight of a blend config block (``blend`` or ``popularity_prior``); ``[]``: none."""
    if blend is None:
        return [f"{group}.betas=[]"]
    beta, gamma = _hydra_value(blend["beta"]), _hydra_value(blend["fallback_weight"])
    return [f"{group}.betas=[{beta}]", f"{group}.fallback_weights=[{gamma}]"]


def _chooses_on_validation(eval_cfg, name: str) -> bool:
    """Whether baseline ``name`` would choose something on validation under ``eval_cfg``: it is
    tuned (``baseline_tuning.<name>``) or one of its options is a list of several values."""
    tuning = eval_cfg.get("baseline_tuning") or {}
    options = eval_cfg.baseline_options.get(name) or {}
    return bool(tuning.get(name)) or any(OmegaConf.is_list(v) and len(v) > 1 for v in options.values())


def _baseline_overrides(eval_cfg, chosen: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Each baseline of ``eval_cfg.baselines`` with the options chosen for it, as given values: a
    list-valued option gets a one-value list, and its tuning is off (nothing left to choose)."""
    out = []
    tuning = eval_cfg.get("baseline_tuning") or {}
    for name in eval_cfg.baselines:
        given = eval_cfg.baseline_options.get(name) or {}
        for option, value in chosen.get(name, {}).items():
            text = _hydra_value(value)
            if OmegaConf.is_list(given.get(option)):
                text = f"[{text}]"
            out.append(f"{'' if option in given else '+'}baseline_options.{name}.{option}={text}")
        if tuning.get(name):
            out.append(f"baseline_tuning.{name}=null")
    return out


def _median_blend(blends: Sequence[dict[str, float] | None]) -> dict[str, float] | None:
    """The median of each weight over ``blends`` (a cell without a blend counts as 0, 0)."""
    if all(b is None for b in blends):
        return None
    return {
        key: float(statistics.median((b or {}).get(key, 0.0) for b in blends))
        for key in ("beta", "fallback_weight")
    }


def _read_summary(grid: Grid, path: Path) -> dict:
    """The other grid's summary, or a one-line ConfigError saying how to make it."""
    source = grid.refit_of
    if not path.is_file():
        raise ConfigError(
            f"Grid '{grid.name}' refits what grid '{source}' chose per window, but {path} does not "
            f"exist: run `convcg ablate {source}` first (with the same data options)."
        )
    data = json.loads(path.read_text())
    if any("chosen" not in c for c in data.get("children", [])):
        raise ConfigError(
            f"{path} predates per-cell choices: write it again from its runs with `convcg ablate "
            f"{source} --report-only PARENT_RUN_ID` (the parent run is in reports/{source}/report.md)."
        )
    return data


def window_choices(grid: Grid, eval_cfg, reports_dir: Path) -> dict[tuple[int, int], WindowChoice]:
    """Per (fold, seed) of refit ``grid``, what it takes from grid ``grid.refit_of``'s same fold only,
    read from ``reports_dir/<refit_of>/summary.json``; ``eval_cfg`` is the refit's evaluation config
    (which baselines it scores, which of their options are lists or tuned).

    Raises:
        ConfigError: no summary of the other grid, one written before cells recorded their choices,
            a fold without a selected design there, or a baseline that chooses on validation with no
            choice recorded in that fold.
    """
    assert grid.refit_of is not None
    path = reports_dir / grid.refit_of / SUMMARY_FILE
    data = _read_summary(grid, path)
    selected = {int(f["fold"]): f.get("selected") for f in data.get("folds", [])}
    out = {}
    for fold in range(grid.folds):
        design = selected.get(fold)
        cells = sorted(
            (c for c in data["children"] if c["fold"] == fold and c["variant"] == design),
            key=lambda c: c["seed"],
        )
        by_seed = {int(c["seed"]): c["chosen"] for c in cells if c["status"] == FINISHED}
        if design is None or not by_seed:
            raise ConfigError(
                f"Grid '{grid.refit_of}' has no validation-selected design with a finished cell in "
                f"window (fold) {fold} ({path}): run `convcg ablate {grid.refit_of}` to the end first."
            )
        for seed in grid.seeds:
            out[(fold, seed)] = choice = _choice(grid, eval_cfg, fold, seed, design, by_seed)
            _check_baselines(grid, eval_cfg, fold, choice.baselines, path)
    return out


def _check_baselines(grid: Grid, eval_cfg, fold: int, chosen: Mapping[str, Any], path: Path) -> None:
    """ConfigError for a refit baseline that would choose on validation but has no choice in ``fold``."""
    for name in eval_cfg.baselines:
        if _chooses_on_validation(eval_cfg, name) and not chosen.get(name):
            raise ConfigError(
                f"Grid '{grid.refit_of}' recorded no validation choice of baseline {name} in window "
                f"(fold) {fold} ({path}): run `convcg ablate {grid.refit_of}` again with this code, or "
                f"give baseline {name} one value per option in conf/ablate/{grid.name}.yaml's "
                f"eval_overrides (baseline_tuning.{name}=null)."
            )


def _choice(grid: Grid, eval_cfg, fold: int, seed: int, design: str, by_seed: dict) -> WindowChoice:
    """Refit cell (fold, seed)'s choice: the same seed's cell when the other grid has it, else the
    median blend over the window's seeds; the baselines' options (seed-independent) likewise."""
    assert grid.refit_of is not None
    seeds = sorted(by_seed)
    if seed in by_seed:
        blend, blend_from, own = by_seed[seed]["blend"], f"seed {seed}", by_seed[seed]
    else:
        blend = _median_blend([by_seed[s]["blend"] for s in seeds])
        blend_from = f"median of seeds {', '.join(map(str, seeds))} (no seed {seed} there)"
        own = by_seed[seeds[0]]
    baselines = {name: dict(own["baselines"].get(name, {})) for name in eval_cfg.baselines}
    baselines = {name: options for name, options in baselines.items() if options}
    return WindowChoice(
        fold=fold,
        seed=seed,
        source=grid.refit_of,
        design=design,
        blend=blend,
        blend_from=blend_from,
        baselines=baselines,
        train_overrides=tuple(_blend_overrides("blend", blend)),
        eval_overrides=(
            *_blend_overrides("popularity_prior", blend),
            *_baseline_overrides(eval_cfg, baselines),
        ),
    )


def _options_text(options: Mapping[str, Mapping[str, Any]]) -> str:
    """``ease: l2=500; popularity: window_days=null`` (``as given`` without any)."""
    parts = [
        f"{name}: " + ", ".join(f"{o}={_hydra_value(v)}" for o, v in sorted(values.items()))
        for name, values in sorted(options.items())
    ]
    return "; ".join(parts) or "as given"


def refit_section(
    grid: Grid, choices: Mapping[tuple[int, int], WindowChoice] | None, note: str = ""
) -> list[str]:
    """The refit report's account of what each window took and from where (empty for other grids)."""
    if not grid.refit_of:
        return []
    lines = [
        f"## What each window took from grid `{grid.refit_of}`",
        "",
        "A refit trains through its validation days, so it chooses nothing on them: every value chosen "
        f"on validation comes from grid `{grid.refit_of}`'s **same window** only "
        f"(`reports/{grid.refit_of}/summary.json`), so no window sees another window's choices. The "
        "blend is the one the same seed's cell was scored with (the median over the window's seeds "
        "when the other grid has no such seed); the baselines' options are the ones tuned on that "
        "window's validation days.",
        "",
    ]
    if not choices:
        return lines + [note or "Not read.", ""]
    body = [
        [
            c.fold,
            c.seed,
            c.design,
            "none" if c.blend is None else f"{c.blend['beta']:g}",
            "none" if c.blend is None else f"{c.blend['fallback_weight']:g}",
            c.blend_from,
            _options_text(c.baselines),
        ]
        for c in sorted(choices.values(), key=lambda c: (c.fold, c.seed))
    ]
    header = ["window", "seed", "design chosen there", "blend beta", "fallback weight", "blend from"]
    return lines + [table([*header, "baselines' chosen options"], body, "rrlrrll"), ""]


def choices_json(choices: Mapping[tuple[int, int], WindowChoice]) -> list[dict]:
    """The choices as ``summary.json`` records them (one entry per refit cell)."""
    return [asdict(c) for c in sorted(choices.values(), key=lambda c: (c.fold, c.seed))]
