"""``convcg ablate GRID``: train and evaluate a grid of variants over seeds, then write a report.

A grid lives in ``conf/ablate/<GRID>.yaml``: named variants (each a list of train overrides, some marked
``baseline``), an optional ``sweep`` crossed with every non-baseline variant, the seeds, and overrides of
``conf/eval.yaml``. Everything runs under ONE MLflow parent run; each (variant, seed) is a child run
(tag ``mlflow.parentRunId``) trained by :func:`convcg_cli.train.train` and scored by
:func:`convcg_cli.evaluate.evaluate`. A failing child is recorded as FAILED and the grid goes on.

The parent run gets ``report.md`` (reproduce command, mean +- 95% t-interval across seeds per variant,
best variant vs best baseline, failures) and ``recall.png``, also written to ``reports/<GRID>/``.
"""

from __future__ import annotations

import fnmatch
import itertools
import json
import logging
import math
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
from omegaconf import OmegaConf, open_dict

from convcg_cli import tracking
from convcg_cli.config import CONF_DIR, compose
from convcg_cli.errors import ConfigError
from convcg_cli.evaluate import BASELINE_PREFIX
from convcg_cli.metrics.bootstrap import ci_names
from convcg_cli.metrics.retrieval import metric_name
from convcg_cli.tasks import CONVERSION, ENGAGEMENT

GRID_DIR = CONF_DIR / "ablate"
REPORT_FILE = "report.md"
FIGURE_FILE = "recall.png"
SUMMARY_FILE = "summary.json"
REPORT_ARTIFACT_DIR = "report"
TASKS = (CONVERSION, ENGAGEMENT)
# Train overrides that also apply to the evaluation config (both configs share these groups).
_SHARED_GROUPS = ("paths", "logger")
log = logging.getLogger(__name__)

DESIGN = "design"
TRAINED_BASELINE = "baseline (two-tower)"
FIXED_BASELINE = "baseline (no training)"


@dataclass(frozen=True)
class Variant:
    """One cell of the grid: a name, the train overrides that make it, and whether it is a baseline."""

    name: str
    overrides: tuple[str, ...]
    baseline: bool = False


@dataclass(frozen=True)
class Grid:
    """A parsed ``conf/ablate/<name>.yaml``: variants (sweep already expanded), seeds, eval overrides."""

    name: str
    variants: tuple[Variant, ...]
    seeds: tuple[int, ...]
    eval_overrides: tuple[str, ...] = ()
    select_task: str = CONVERSION
    select_k: int = 100


@dataclass
class ChildResult:
    """Outcome of one (variant, seed): its run id (None if it failed before a run existed) and metrics."""

    variant: str
    seed: int
    run_id: str | None
    status: str  # FINISHED or FAILED
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    data_dir: str | None = None


@dataclass(frozen=True)
class Row:
    """One line of the report: a variant's recall per (task, k) with its 95% interval.

    ``values[(task, k)]`` are the finished seeds' figures, ``mean`` their mean, ``low``/``high`` the
    interval: a t-interval across seeds for trained variants (NaN with one seed), the bootstrap-over-
    users CI for a baseline that has no training randomness.
    """

    name: str
    kind: str
    n: int
    n_failed: int
    values: dict[tuple[str, int], tuple[float, ...]]
    mean: dict[tuple[str, int], float]
    low: dict[tuple[str, int], float]
    high: dict[tuple[str, int], float]


@dataclass(frozen=True)
class AblationResult:
    """What ``convcg ablate`` produced."""

    parent_run_id: str
    report_dir: Path
    children: list[ChildResult]
    rows: list[Row]

    @property
    def n_failed(self) -> int:
        """Children that did not finish training and evaluation."""
        return sum(c.status != "FINISHED" for c in self.children)


def available_grids() -> list[str]:
    """Names of the grids in ``conf/ablate/``."""
    return sorted(p.stem for p in GRID_DIR.glob("*.yaml"))


def _sweep_name(key: str, value) -> str:
    return f"{key.split('.')[-1]}={value}"


def load_grid(name: str) -> Grid:
    """Compose ``conf/ablate/<name>.yaml`` and expand its sweep; ConfigError for a bad or unknown grid."""
    if name not in available_grids():
        raise ConfigError(f"Unknown ablation grid '{name}'; choose one of {available_grids()} ({GRID_DIR}).")
    spec = cast(dict[str, Any], OmegaConf.to_container(compose(f"ablate/{name}").cfg.ablate, resolve=True))
    unknown = set(spec) - {"seeds", "select", "eval_overrides", "variants", "sweep"}
    if unknown or not spec.get("variants") or not spec.get("seeds"):
        raise ConfigError(
            f"Grid {GRID_DIR / name}.yaml needs 'variants' and 'seeds' (optional: select, eval_overrides, "
            f"sweep); unknown keys: {sorted(unknown)}."
        )
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
    select = spec.get("select") or {}
    return Grid(
        name=name,
        variants=tuple(variants),
        seeds=tuple(int(s) for s in spec["seeds"]),
        eval_overrides=tuple(spec.get("eval_overrides") or ()),
        select_task=str(select.get("task", CONVERSION)),
        select_k=int(select.get("k", 100)),
    )


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
    return Grid(
        grid.name,
        variants,
        tuple(seeds) if seeds else grid.seeds,
        grid.eval_overrides,
        grid.select_task,
        grid.select_k,
    )


def reproduce_command(grid: Grid, train_overrides: Sequence[str], patterns: Sequence[str] | None) -> str:
    """The shell command that runs this ablation again (seeds always spelled out)."""
    args = ["convcg", "ablate", grid.name, *train_overrides, "--seeds", ",".join(map(str, grid.seeds))]
    if patterns:
        args += ["--variants", ",".join(patterns)]
    return shlex.join(args)


def _child_config(grid: Grid, variant: Variant, seed: int, train_overrides: Sequence[str], parent: str):
    composed = compose("train", [*variant.overrides, *train_overrides, f"seed={seed}"])
    with open_dict(composed.cfg):
        composed.cfg.logger.parent_run_id = parent
        composed.cfg.logger.run_name = f"{variant.name}/seed={seed}"
        composed.cfg.logger.run_tags = {"ablation": grid.name, "variant": variant.name}
    return composed


def run_ablation(
    grid: Grid,
    train_overrides: Sequence[str] = (),
    patterns: Sequence[str] | None = None,
    train_fn: Callable | None = None,
    evaluate_fn: Callable | None = None,
) -> AblationResult:
    """Train and evaluate every (variant, seed) of ``grid`` under one parent run, then report.

    Args:
        grid: the grid (see :func:`load_grid`, :func:`select`).
        train_overrides: appended to every variant's overrides (e.g. ``data.dir=...``); ``paths.`` and
            ``logger.`` ones also apply to evaluation.
        patterns: the ``--variants`` globs used to select the grid (only for the reproduce command).
        train_fn, evaluate_fn: ``train(composed)`` and ``evaluate(composed, run_id, baseline_cache)``;
            default :func:`convcg_cli.train.train` and :func:`convcg_cli.evaluate.evaluate`.

    Every config is composed and checked before the parent run is created, so a typo in the grid
    fails at once and leaves no half-run grid behind.
    """
    from convcg_cli.evaluate import evaluate
    from convcg_cli.train import check_served_embedding_is_trained, train

    train_fn = train_fn or train
    evaluate_fn = evaluate_fn or evaluate
    train_overrides = list(train_overrides)
    shared = [o for o in train_overrides if o.lstrip("+~").split(".")[0].split("=")[0] in _SHARED_GROUPS]
    eval_composed = compose("eval", [*grid.eval_overrides, *shared])
    for variant in grid.variants:
        check_served_embedding_is_trained(
            _child_config(grid, variant, grid.seeds[0], train_overrides, "").cfg
        )

    logger_cfg = eval_composed.cfg.logger
    report_dir = Path(eval_composed.cfg.paths.root_dir) / "reports" / grid.name
    command = reproduce_command(grid, train_overrides, patterns)
    tags = {"mlflow.source.name": "convcg ablate", "ablation": grid.name, "command": command[:500]}
    children: list[ChildResult] = []
    baseline_cache: dict[str, dict[str, float]] = {}
    split, ks = str(eval_composed.cfg.split), list(eval_composed.cfg.ks)
    with tracking.parent_run(logger_cfg, f"ablate/{grid.name}", tags) as parent:
        tracking.log_text(parent.client, parent.run_id, _grid_yaml(grid, train_overrides), "config/grid.yaml")
        context = {
            "command": command,
            "parent_run_id": parent.run_id,
            "tracking_uri": str(logger_cfg.tracking_uri),
            "split": split,
            "data_dirs": [],
        }
        report_dir.mkdir(parents=True, exist_ok=True)
        for seed in grid.seeds:  # seed-major: after one pass every variant has a first result
            for variant in grid.variants:
                composed = _child_config(grid, variant, seed, train_overrides, parent.run_id)
                children.append(
                    _run_child(composed, eval_composed, variant, seed, train_fn, evaluate_fn, baseline_cache)
                )
                _mark_lost_run(logger_cfg, parent.run_id, children[-1])
                # Rewritten after every cell, so a long grid that is stopped still leaves a report.
                context["data_dirs"] = sorted({c.data_dir for c in children if c.data_dir})
                rows = _write_report(grid, children, context, ks, report_dir)
        plot_recall(rows, ks, report_dir / FIGURE_FILE)
        for name in (REPORT_FILE, FIGURE_FILE, SUMMARY_FILE):
            parent.client.log_artifact(parent.run_id, str(report_dir / name), REPORT_ARTIFACT_DIR)
        parent.client.set_tag(
            parent.run_id, "failed_children", str(sum(c.status != "FINISHED" for c in children))
        )
    return AblationResult(parent.run_id, report_dir, children, rows)


def _write_report(
    grid: Grid, children: list[ChildResult], context: dict, ks: list[int], out: Path
) -> list[Row]:
    """Summarise the cells done so far into ``report.md`` and ``summary.json``; returns the rows."""
    rows = summarize(grid, children, context["split"], ks)
    (out / REPORT_FILE).write_text(render_report(grid, rows, children, context))
    (out / SUMMARY_FILE).write_text(json.dumps(_summary(rows, children), indent=2))
    return rows


def _run_child(composed, eval_composed, variant, seed, train_fn, evaluate_fn, cache) -> ChildResult:
    """Train and evaluate one cell; any error is recorded, not raised (Ctrl-C still stops the grid)."""
    run_id, data_dir = None, str(composed.cfg.data.dir)
    try:
        run_id = train_fn(composed).run_id
        metrics = dict(evaluate_fn(eval_composed, run_id, baseline_cache=cache).metrics)
        return ChildResult(variant.name, seed, run_id, "FINISHED", metrics, data_dir=data_dir)
    except Exception as exc:  # one bad cell must not stop the grid
        error = f"{type(exc).__name__}: {exc}"
        # The traceback goes to stderr for debugging; the report and the run get the one-line error.
        log.warning("ablation cell %s seed=%s failed, continuing", variant.name, seed, exc_info=True)
        if run_id is not None:  # training finished, evaluation failed: the cell failed
            tracking.mark_failed(tracking.client(eval_composed.cfg.logger), run_id, error)
        return ChildResult(variant.name, seed, run_id, "FAILED", error=error, data_dir=data_dir)


def _mark_lost_run(logger_cfg, parent_run_id: str, child: ChildResult) -> None:
    """A child whose training raised has a FAILED run but no id in hand: find it by its tags."""
    if child.status == "FINISHED" or child.run_id is not None:
        return
    for run in reversed(tracking.child_runs(logger_cfg, parent_run_id)):
        tags = run.data.tags
        if tags.get("variant") == child.variant and tags.get("seed") == str(child.seed):
            child.run_id = run.info.run_id
            return


def _grid_yaml(grid: Grid, train_overrides: Sequence[str]) -> str:
    spec = {
        "name": grid.name,
        "seeds": list(grid.seeds),
        "train_overrides": list(train_overrides),
        "eval_overrides": list(grid.eval_overrides),
        "select": {"task": grid.select_task, "k": grid.select_k},
        "variants": [
            {"name": v.name, "baseline": v.baseline, "overrides": list(v.overrides)} for v in grid.variants
        ],
    }
    return OmegaConf.to_yaml(OmegaConf.create(spec))


# --------------------------------------------------------------------------------------------------
# Summary statistics
# --------------------------------------------------------------------------------------------------


def _t_quantile(n: int, level: float = 0.95) -> float:
    """Two-sided t quantile for the mean of ``n`` runs (n - 1 degrees of freedom)."""
    from scipy import stats

    return float(stats.t.ppf(0.5 + level / 2, n - 1))


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean and two-sided t-interval ``(mean, low, high)`` of independent runs; NaN bounds for n < 2.

    Example:
        >>> mean, low, high = t_interval([0.1, 0.2, 0.3])
        >>> round(mean, 3), round(high - mean, 3)
        (0.2, 0.248)
    """
    x = np.asarray(values, dtype=np.float64)
    if len(x) == 0:
        return math.nan, math.nan, math.nan
    mean = float(x.mean())
    if len(x) < 2:
        return mean, math.nan, math.nan
    half = _t_quantile(len(x), level) * float(x.std(ddof=1)) / math.sqrt(len(x))
    return mean, mean - half, mean + half


def summarize(grid: Grid, children: list[ChildResult], split: str, ks: Sequence[int]) -> list[Row]:
    """One row per variant (t-interval over its finished seeds), then one per non-trained baseline."""
    rows = []
    for variant in grid.variants:
        done = [c for c in children if c.variant == variant.name and c.status == "FINISHED"]
        failed = sum(c.variant == variant.name and c.status != "FINISHED" for c in children)
        values, mean, low, high = {}, {}, {}, {}
        for task in TASKS:
            for k in ks:
                name = metric_name(split, task, k)
                values[(task, k)] = tuple(c.metrics[name] for c in done if name in c.metrics)
                mean[(task, k)], low[(task, k)], high[(task, k)] = t_interval(values[(task, k)])
        kind = TRAINED_BASELINE if variant.baseline else DESIGN
        rows.append(Row(variant.name, kind, len(done), failed, values, mean, low, high))
    # Baselines without training do not depend on the seed: every child carries the same numbers.
    first = next((c for c in children if c.status == "FINISHED"), None)
    if first is None:
        return rows
    prefix = f"{split}/{BASELINE_PREFIX}"
    for name in sorted({m[len(prefix) :].split("/")[0] for m in first.metrics if m.startswith(prefix)}):
        values, mean, low, high = {}, {}, {}, {}
        for task in TASKS:
            for k in ks:
                metric = metric_name(f"{prefix}{name}", task, k)
                low_name, high_name = ci_names(metric)
                mean[(task, k)] = first.metrics.get(metric, math.nan)
                values[(task, k)] = (mean[(task, k)],)
                low[(task, k)] = first.metrics.get(low_name, math.nan)
                high[(task, k)] = first.metrics.get(high_name, math.nan)
        rows.append(Row(name, FIXED_BASELINE, 1, 0, values, mean, low, high))
    return rows


def best_rows(rows: list[Row], task: str, k: int) -> tuple[Row | None, Row | None]:
    """The best design and the best baseline (trained or not) by mean recall@k of ``task``."""

    def best(candidates: list[Row]) -> Row | None:
        scored = [r for r in candidates if r.n > 0 and not math.isnan(r.mean[(task, k)])]
        return max(scored, key=lambda r: r.mean[(task, k)], default=None)

    return best([r for r in rows if r.kind == DESIGN]), best([r for r in rows if r.kind != DESIGN])


def _summary(rows: list[Row], children: list[ChildResult]) -> dict:
    def clean(x: float) -> float | None:
        return None if math.isnan(x) else x

    return {
        "rows": [
            {
                "name": r.name,
                "kind": r.kind,
                "n": r.n,
                "n_failed": r.n_failed,
                "recall": {
                    f"{t}/recall_at_{k}": {
                        "mean": clean(r.mean[(t, k)]),
                        "low": clean(r.low[(t, k)]),
                        "high": clean(r.high[(t, k)]),
                    }
                    for (t, k) in r.mean
                },
            }
            for r in rows
        ],
        "children": [
            {"variant": c.variant, "seed": c.seed, "run_id": c.run_id, "status": c.status, "error": c.error}
            for c in children
        ],
    }


# --------------------------------------------------------------------------------------------------
# Report and figure
# --------------------------------------------------------------------------------------------------


def _cell(row: Row, task: str, k: int) -> str:
    mean, low, high = row.mean[(task, k)], row.low[(task, k)], row.high[(task, k)]
    if math.isnan(mean):
        return "–"
    if math.isnan(low):
        return f"{mean:.4f}"
    if row.kind == FIXED_BASELINE:
        return f"{mean:.4f} [{low:.4f}, {high:.4f}]"
    return f"{mean:.4f} ± {(high - low) / 2:.4f}"


def _seeds_cell(row: Row) -> str:
    if row.kind == FIXED_BASELINE:
        return "–"
    return f"{row.n}" + (f" (**{row.n_failed} failed**)" if row.n_failed else "")


def render_report(grid: Grid, rows: list[Row], children: list[ChildResult], context: dict) -> str:
    """The markdown report: reproduce command, one table per task, best vs baseline, failures, notes."""
    ks = sorted({k for r in rows for (_, k) in r.mean})
    n_seeds = len(grid.seeds)
    lines = [
        f"# Ablation `{grid.name}`",
        "",
        "Reproduce:",
        "",
        "```bash",
        context["command"],
        "```",
        "",
        f"MLflow parent run `{context['parent_run_id']}` ({context['tracking_uri']}); every (variant, seed) "
        "is a child run. Data: "
        + (", ".join(f"`{d}`" for d in context["data_dirs"]) or "–")
        + f"; metrics on the `{context['split']}` split.",
        "",
    ]
    for task in TASKS:
        lines += [f"## {task.capitalize()} recall ({context['split']})", ""]
        lines.append("| variant | kind | seeds | " + " | ".join(f"recall@{k}" for k in ks) + " |")
        lines.append("|---|---|---|" + "---:|" * len(ks))
        for row in rows:
            lines.append(
                f"| {row.name} | {row.kind} | {_seeds_cell(row)} | "
                + " | ".join(_cell(row, task, k) for k in ks)
                + " |"
            )
        lines.append("")
    lines += _comparison(grid, rows)
    failed = [c for c in children if c.status != "FINISHED"]
    if failed:
        lines += ["## Failed runs", "", "| variant | seed | run | error |", "|---|---|---|---|"]
        for c in failed:
            error = (c.error or "").replace("|", "\\|").replace("\n", " ")[:300]
            lines.append(f"| {c.variant} | {c.seed} | {c.run_id or '(no run)'} | {error} |")
        lines.append("")
    lines += [
        "## Notes",
        "",
        f"- Seeds: {n_seeds} per trained variant ({', '.join(map(str, grid.seeds))}); a cell is the mean "
        "± the half-width of the 95% t-interval across seeds (t with n-1 degrees of freedom"
        + (f"; t = {_t_quantile(n_seeds):.2f} for {n_seeds} seeds" if n_seeds > 1 else "")
        + "). It measures training randomness only; with one seed no interval is shown.",
        "- Baselines without training are deterministic: their bracket is the 95% bootstrap CI over "
        "users (1 evaluation; users resampled with all their positives).",
        "- Every child run also logs its own bootstrap-over-users CIs (`<metric>_ci_low/_ci_high`), per "
        "surface too; recall counts each held-out (query, item) positive once, exact search over the "
        "whole corpus.",
        f"- {sum(c.status == 'FINISHED' for c in children)} of {len(grid.seeds) * len(grid.variants)} "
        f"planned runs finished, {sum(c.status != 'FINISHED' for c in children)} failed.",
        "",
    ]
    return "\n".join(lines)


def _comparison(grid: Grid, rows: list[Row]) -> list[str]:
    task, k = grid.select_task, grid.select_k
    design, baseline = best_rows(rows, task, k)
    head = [f"## Best variant vs best baseline ({task} recall@{k})", ""]
    if design is None or baseline is None:
        return head + ["Not enough finished runs to compare.", ""]
    a, b = design.mean[(task, k)], baseline.mean[(task, k)]
    rel = f" ({(a - b) / b:+.1%} relative)" if b > 0 else ""
    lines = head + [
        f"- Best variant: **{design.name}**: {_cell(design, task, k)} (n = {design.n} seeds)",
        f"- Best baseline: **{baseline.name}** ({baseline.kind}): {_cell(baseline, task, k)}",
        f"- Difference: {a - b:+.4f}{rel}.",
    ]
    if baseline.kind == FIXED_BASELINE and not math.isnan(design.low[(task, k)]):
        inside = baseline.low[(task, k)] <= a <= baseline.high[(task, k)]
        where = "inside" if inside else "outside"
        lines.append(f"- The variant's mean lies {where} the baseline's bootstrap CI.")
    elif baseline.kind == TRAINED_BASELINE and design.n > 1 and baseline.n > 1:
        lines.append(f"- Welch t-test across seeds: p = {_welch_p(grid, design, baseline):.3g}.")
    return lines + [""]


def _welch_p(grid: Grid, a: Row, b: Row) -> float:
    """Two-sided Welch t-test p-value of two trained variants' seeds on the selection metric."""
    from scipy import stats

    key = (grid.select_task, grid.select_k)
    return float(stats.ttest_ind(a.values[key], b.values[key], equal_var=False).pvalue)


def plot_recall(rows: list[Row], ks: Sequence[int], path: Path) -> Path:
    """recall@K per variant, one panel per task; error bars are the rows' 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    ks = sorted(ks)
    fig, axes = plt.subplots(1, len(TASKS), figsize=(6 * len(TASKS), 4.5), sharex=True)
    colours = plt.get_cmap("tab20")
    for ax, task in zip(np.atleast_1d(axes), TASKS, strict=True):
        for i, row in enumerate(rows):
            mean = np.array([row.mean[(task, k)] for k in ks])
            if np.isnan(mean).all():
                continue
            # A t-interval of few seeds can cross 0 or 1; recall cannot, so the bars are clipped there.
            low = np.clip([row.low[(task, k)] for k in ks], 0.0, 1.0)
            high = np.clip([row.high[(task, k)] for k in ks], 0.0, 1.0)
            err = np.nan_to_num(np.vstack([mean - low, high - mean]))
            style = "-" if row.kind == DESIGN else "--"
            ax.errorbar(
                ks,
                mean,
                yerr=err,
                fmt=style,
                marker="o",
                ms=3,
                capsize=2,
                lw=1.2,
                color=colours((2 * i) % 20 + (i // 10) % 2),  # tab20: dark hues first, then light
                label=row.name,
            )
        ax.set_xscale("log")
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_xlabel("K")
        ax.set_ylabel(f"{task} recall@K")
        ax.set_title(f"{task} (mean ± 95% CI)")
        ax.grid(alpha=0.3)
    handles, labels = np.atleast_1d(axes)[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
