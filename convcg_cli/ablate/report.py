"""What ``convcg ablate`` writes: the markdown report (reproduce command, recall tables, the
validation-selected variant and every design against every baseline, the pooled verdict over all the
held-out windows, failures, notes) and ``summary.json``, both rendered from a :class:`Summary`
(:mod:`.summary` computes it).

Pure functions: no MLflow, no training, no files. Every table goes through
:func:`convcg_cli.markdown.table`; paths are written as :mod:`convcg_cli.report_paths` makes them
portable (relative to the checkout, or a named variable), so the reproduce line runs elsewhere.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from convcg_cli.ablate.grid import END_OFFSET_KEY, FINISHED, ChildResult, Grid
from convcg_cli.ablate.refit import WindowChoice, cell_choices, choices_json, refit_section
from convcg_cli.ablate.summary import (
    BEATS,
    DESIGN,
    EXTRA_METRICS,
    FIXED_BASELINE,
    TASKS,
    Comparison,
    PooledComparison,
    PrimaryComparison,
    Row,
    Summary,
    selected_variant,
    selection_metric,
    verdict,
)
from convcg_cli.kept_checkpoint import KEPT_EPOCH
from convcg_cli.markdown import table
from convcg_cli.metrics.bootstrap import PairedDifference
from convcg_cli.metrics.compare import t_quantile
from convcg_cli.metrics.retrieval import VAL, metric_name
from convcg_cli.report_paths import Places, portable_command, portable_path, portable_uri


def _cell(row: Row, task: str, k: int) -> str:
    return _interval_cell(row, row.mean[(task, k)], row.low[(task, k)], row.high[(task, k)])


def _extra_cell(row: Row, task: str, label: str, k: int) -> str:
    return _interval_cell(row, *row.extras.get((task, label, k), (math.nan,) * 3))


def _interval_cell(row: Row, mean: float, low: float, high: float) -> str:
    """``mean ± half-width`` (across seeds) or ``mean [low, high]`` (a baseline's bootstrap CI)."""
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


def _difference_cell(d: PairedDifference) -> str:
    return f"{d.difference:+.4f} [{d.low:+.4f}, {d.high:+.4f}]"


def _recall_tables(grid: Grid, rows: list[Row], split: str, heading: str) -> list[str]:
    """One table per task: every variant's held-out recall and the validation figure that selects."""
    ks = sorted({k for r in rows for (_, k) in r.mean})
    headers = ["variant", "kind", "seeds", f"val {grid.select_task} recall@{grid.select_k} (selects)"]
    headers += [f"recall@{k}" for k in ks]
    lines = []
    for task in TASKS:
        extras = sorted(
            {(label, k) for r in rows for (t, label, k) in r.extras if t == task},
            key=lambda e: (list(EXTRA_METRICS).index(e[0]), e[1]),
        )
        body = [
            [
                r.name,
                r.kind,
                _seeds_cell(r),
                "–" if math.isnan(r.validation) else f"{r.validation:.4f}",
                *(_cell(r, task, k) for k in ks),
                *(_extra_cell(r, task, label, k) for label, k in extras),
            ]
            for r in rows
        ]
        lines += [
            f"{heading} {task.capitalize()} recall ({split})",
            "",
            table(
                headers + [f"{label}@{k}" for label, k in extras],
                body,
                "lllr" + "r" * (len(ks) + len(extras)),
            ),
            "",
        ]
    return lines


def _selected_section(grid: Grid, rows: list[Row], comparisons: list[Comparison], heading: str) -> list[str]:
    """The validation-selected variant and its paired difference to every baseline on every seed."""
    task, k = grid.select_task, grid.select_k
    head = [f"{heading} Selected variant vs every baseline ({task} recall@{k}, paired on users)", ""]
    chosen = selected_variant(rows, grid)
    if chosen is None:
        return head + [f"No design has a validation figure (`{selection_metric(grid)}`) yet.", ""]
    mine = [c for c in comparisons if c.variant == chosen.name]
    how = (
        f"Chosen on the **validation** split by grid `{grid.refit_of}` and retrained here with the "
        f"validation days (a refit: no validation figure of its own): **{chosen.name}**"
        if grid.refit_of
        else f"Selected on the **validation** split: **{chosen.name}** (mean `{selection_metric(grid)}` "
        f"over seeds = {chosen.validation:.4f})"
    )
    lines = head + [f"{how}; its held-out figures below were read after selecting.", ""]
    if not mine:
        return lines + ["No paired comparison yet (per-positive hits or a baseline missing).", ""]
    return lines + _per_seed_lines(grid, mine)


def _all_variants_section(
    grid: Grid, rows: list[Row], comparisons: list[Comparison], heading: str
) -> list[str]:
    """Compact: every design's mean paired difference to every baseline, and its verdict."""
    baselines = sorted({c.baseline for c in comparisons})
    designs = [r for r in rows if r.kind == DESIGN]
    if not baselines or not designs:
        return []
    body = []
    for row in designs:
        cells = []
        for baseline in baselines:
            mine = [c for c in comparisons if c.variant == row.name and c.baseline == baseline]
            if not mine:
                cells.append("–")
                continue
            mean = float(np.mean([c.difference.difference for c in mine]))
            cells.append(f"{mean:+.4f} ({verdict(mine, grid.seeds)})")
        body.append([row.name, "–" if math.isnan(row.validation) else f"{row.validation:.4f}", *cells])
    headers = ["variant", "val (selects)", *(f"vs {b}" for b in baselines)]
    metric = f"{grid.select_task} recall@{grid.select_k}"
    title = f"{heading} Every design vs every baseline (mean paired difference of {metric} over seeds)"
    return [title, "", table(headers, body, "lr" + "r" * len(baselines)), ""]


def render_report(grid: Grid, summary: Summary, context: dict, places: Places | None = None) -> str:
    """The markdown report: reproduce command, per fold the recall tables, the validation-selected
    variant vs every baseline and the compact all-variants comparison, then failures and notes.

    Args:
        grid: the grid as run.
        summary: what :func:`~convcg_cli.ablate.summary.build_summary` made of its cells.
        context: ``command`` (the reproduce command), ``parent_run_id``, ``tracking_uri``,
            ``data_dirs`` and ``split``; a refit grid's ``refit_choices``
            (:func:`~convcg_cli.ablate.refit.window_choices`) or ``refit_note`` (why there are none).
        places: where the paths of ``context`` are written relative to (default: this process's
            :meth:`~convcg_cli.report_paths.Places.here`), so the report runs on another machine.
    """
    places = Places.here() if places is None else places
    store = portable_uri(context["tracking_uri"], places)
    lines = [
        f"# Ablation `{grid.name}`",
        "",
        "Reproduce:",
        "",
        "```bash",
        portable_command(context["command"], places),
        "```",
        "",
        f"MLflow parent run `{context['parent_run_id']}` ({store}); every (variant, seed"
        + (", fold" if grid.folds > 1 else "")
        + ") is a child run. Data: "
        + (", ".join(f"`{portable_path(d, places)}`" for d in context["data_dirs"]) or "–")
        + f"; metrics on the `{context['split']}` split; the best variant is selected on the `val` split "
        f"(`{selection_metric(grid)}`).",
        "",
        f"Grid file `conf/ablate/{grid.name}.yaml` sha256 `{context.get('grid_sha256', 'not recorded')}`, "
        f"convcg commit `{context.get('commit', 'not recorded')}`.",
        "",
        *_declared_section(grid, context.get("grid_sha256")),
    ]
    lines += refit_section(grid, context.get("refit_choices"), context.get("refit_note", ""))
    lines += _primary_section(grid, summary.primary)
    heading = "###" if grid.folds > 1 else "##"
    for fold, rows in summary.rows.items():
        if grid.folds > 1:
            lines += [_fold_title(fold), ""]
        comparisons = [c for c in summary.comparisons if c.fold == fold]
        lines += _recall_tables(grid, rows, context["split"], heading)
        lines += _selected_section(grid, rows, comparisons, heading)
        lines += _all_variants_section(grid, rows, comparisons, heading)
    lines += _pooled_section(grid, summary.pooled)
    lines += _failures(summary.children)
    lines += _notes(grid, summary.children)
    return "\n".join(lines)


def _declared_section(grid: Grid, recorded_sha256: str | None) -> list[str]:
    """The grid file's header comment, quoted as declared before the grid ran, when the file is the
    one that ran (its hash is the one the parent run recorded); otherwise a line saying it changed."""
    if not grid.declared:
        return []
    if recorded_sha256 is None or grid.sha256 != recorded_sha256:
        return ["The grid file changed since this grid ran: its header is not quoted here.", ""]
    quoted = [f"> {line}".rstrip() for line in grid.declared.splitlines()]
    return ["Declared in the grid file before it ran (its header comment):", "", *quoted, ""]


def _primary_section(grid: Grid, primary: list[PrimaryComparison]) -> list[str]:
    """The pre-registered verdict (the grid's ``primary`` block), before every secondary result."""
    if not grid.primary:
        return []
    task, k = grid.select_task, grid.select_k
    lines = [
        f"## Primary comparison (declared in the grid file before it ran: {task} recall@{k})",
        "",
        "The design chosen on validation in each window minus each declared comparator, on the held-out "
        f"positives of all {grid.folds} window(s) together. The 95% interval is a two-level bootstrap: "
        "each replicate draws the training seeds, then the users (all their positives of every window), "
        "so it holds training randomness as well as the choice of users. Everything after this section "
        "is secondary.",
        "",
    ]
    if not primary:
        return lines + ["Not computed yet (needs a finished, selected cell of every window and seed).", ""]
    body = [
        [
            c.against,
            ", ".join(c.variants),
            ", ".join(str(s) for s in c.seeds),
            f"{c.positives:,}",
            _difference_cell(c.difference),
            "yes" if c.difference.above_zero else "no",
        ]
        for c in primary
    ]
    header = ["against", "chosen per window", "seeds", "positives", "difference [95% CI]", "CI > 0"]
    return lines + [table(header, body, "llrrrl"), ""]


def _pooled_section(grid: Grid, pooled: list[PooledComparison]) -> list[str]:
    """The rolling-origin verdict: every fold's selected design vs every baseline, all folds together."""
    if not pooled:
        return []
    task, k = grid.select_task, grid.select_k
    chosen = ", ".join(f"fold {fold}: **{name}**" for fold, name in enumerate(pooled[0].variants))
    how = (
        f"chosen on validation by grid `{grid.refit_of}` and refitted here"
        if grid.refit_of
        else "selected on validation"
    )
    lines = [
        f"## All {grid.folds} held-out windows together ({task} recall@{k}, paired on users)",
        "",
        f"The design {how} in each window ({chosen}) against every baseline, on the "
        f"{pooled[0].positives:,} held-out {task} positives of the {grid.folds} windows together. A "
        "bootstrap replicate draws users and keeps all their positives of every window, so a user "
        "counted in several windows is still one unit; recall is micro recall over all the windows.",
        "",
    ]
    return lines + _per_seed_lines(grid, pooled)


def _per_seed_lines(grid: Grid, comparisons: Sequence[Comparison | PooledComparison]) -> list[str]:
    """One row per (baseline, seed) with the paired difference and its CI, then each verdict."""
    body = [
        [c.baseline, c.seed, _difference_cell(c.difference), "yes" if c.difference.above_zero else "no"]
        for c in sorted(comparisons, key=lambda c: (c.baseline, c.seed))
    ]
    lines = [table(["baseline", "seed", "difference [95% CI]", "CI > 0"], body, "lrrl"), ""]
    for baseline in sorted({c.baseline for c in comparisons}):
        outcome = verdict([c for c in comparisons if c.baseline == baseline], grid.seeds)
        lines.append(f"- vs {baseline}: **{outcome}**")
    return lines + [""]


def _fold_title(fold: int) -> str:
    """``## Fold f`` and which days it holds out (fold 0: the grid as configured)."""
    if fold == 0:
        return "## Fold 0 (the latest held-out days)"
    return f"## Fold {fold} ({END_OFFSET_KEY} = {fold} x data.heldout_days: {fold} held-out windows earlier)"


def _failures(children: list[ChildResult]) -> list[str]:
    failed = [c for c in children if c.status != FINISHED]
    if not failed:
        return []
    body = [[c.variant, c.seed, c.fold, c.run_id or "(no run)", (c.error or "")[:300]] for c in failed]
    return ["## Failed runs", "", table(["variant", "seed", "fold", "run", "error"], body), ""]


def _notes(grid: Grid, children: list[ChildResult]) -> list[str]:
    n_seeds = len(grid.seeds)
    planned = n_seeds * len(grid.variants) * grid.folds
    return [
        "## Notes",
        "",
        f"- Selection: designs are ranked by the mean over seeds of `{selection_metric(grid)}`, the "
        "validation figure of the checkpoint each child keeps (its best epoch); held-out figures play "
        "no part in choosing.",
        f"- Seeds: {n_seeds} per trained variant ({', '.join(map(str, grid.seeds))}); a recall cell is the "
        "mean ± the half-width of the 95% t-interval across seeds (t with n-1 degrees of freedom"
        + (f"; t = {t_quantile(n_seeds):.2f} for {n_seeds} seeds" if n_seeds > 1 else "")
        + "). It measures training randomness only; with one seed no interval is shown.",
        "- Baselines without training are deterministic: their bracket is the 95% bootstrap CI over "
        "users (1 evaluation; users resampled with all their positives).",
        "- Paired differences: variant minus baseline recall on the same bootstrap resamples of users "
        "(all positives of a drawn user together), one per seed; the verdict is "
        f"**{BEATS}** only when the 95% interval's lower bound is above 0 on every seed.",
        "- Every child run also keeps its bootstrap-over-users CIs (`<split>_ci/...` metrics; per surface "
        "in `eval/<split>_metrics.json`) and its per-positive hits (`eval/<split>_hits.npz`); the "
        "baselines are runs of their own (tag `kind=baseline`); recall counts each held-out "
        "(query, item) positive once, exact search over the whole corpus.",
        f"- {sum(c.status == FINISHED for c in children)} of {planned} planned runs finished, "
        f"{sum(c.status != FINISHED for c in children)} failed.",
        "",
    ]


def _extra_key(task: str, label: str, k: int) -> str:
    """An ``EXTRA_METRICS`` figure's name without its split, e.g. ``conversion/cold/recall_at_100``."""
    return metric_name(VAL, task, k, *EXTRA_METRICS[label]).split("/", 1)[1]


def summary_json(
    grid: Grid,
    summary: Summary,
    split: str = "heldout",
    candidates: Mapping[str, Mapping[str, list]] | None = None,
    refit_choices: Mapping[tuple[int, int], WindowChoice] | None = None,
) -> dict:
    """``summary.json``: rows per fold, the selected variant per fold, paired comparisons, children
    with their figures and what validation chose for them (:func:`~convcg_cli.ablate.refit.cell_choices`:
    a refit grid reads them per window; ``candidates`` decode the logged numbers), and a refit grid's
    ``refit_choices``."""

    def clean(x: float) -> float | None:
        return None if math.isnan(x) else x

    def row(r: Row) -> dict:
        recall = {
            f"{t}/recall_at_{k}": {
                "mean": clean(r.mean[(t, k)]),
                "low": clean(r.low[(t, k)]),
                "high": clean(r.high[(t, k)]),
            }
            for (t, k) in r.mean
        }
        out = {
            "name": r.name,
            "kind": r.kind,
            "n": r.n,
            "n_failed": r.n_failed,
            "validation": clean(r.validation),
            "recall": recall,
        }
        if r.extras:  # only then, so summaries of grids without them are unchanged
            out["extras"] = {
                _extra_key(t, label, k): {"mean": clean(m), "low": clean(lo), "high": clean(hi)}
                for (t, label, k), (m, lo, hi) in sorted(r.extras.items())
            }
        return out

    selected = {
        fold: getattr(selected_variant(rows, grid), "name", None) for fold, rows in summary.rows.items()
    }
    return {
        "grid": {"name": grid.name, "sha256": grid.sha256, "primary": list(grid.primary)},
        "selection": {"split": VAL, "metric": selection_metric(grid)},
        "folds": [
            {
                "fold": fold,
                "selected": selected[fold],
                "rows": [row(r) for r in rows],
            }
            for fold, rows in summary.rows.items()
        ],
        "comparisons": [
            {
                "fold": c.fold,
                "variant": c.variant,
                "baseline": c.baseline,
                "seed": c.seed,
                "k": c.difference.k,
                "difference": c.difference.difference,
                "low": c.difference.low,
                "high": c.difference.high,
            }
            for c in summary.comparisons
        ],
        **({"pooled": [_pooled_json(c) for c in summary.pooled]} if summary.pooled else {}),
        **({"primary": [_primary_json(c) for c in summary.primary]} if grid.primary else {}),
        "children": [
            {
                "variant": c.variant,
                "seed": c.seed,
                "fold": c.fold,
                "run_id": c.run_id,
                "status": c.status,
                "error": c.error,
                "figures": _child_figures(grid, c),
                "chosen": cell_choices(c.metrics, split, candidates),
            }
            for c in summary.children
        ],
        **({"refit": {"of": grid.refit_of, "windows": choices_json(refit_choices)}} if refit_choices else {}),
    }


CELL_KS = (10, 100, 1000)  # the recalls summary.json gives per cell


def _child_figures(grid: Grid, child: ChildResult) -> dict[str, float]:
    """One cell's own figures, to check a report cell against its run by retraining it: the
    validation figure that selects, validation recall@10/@100/@1000 of every task at the checkpoint
    the run kept, its epoch (``kept_epoch``), and held-out recall@10/@100/@1000 of every task (those
    the run logged: validation logs ``val_ks`` only). The prior weight it served is under ``chosen``."""
    names = [
        selection_metric(grid),
        *(metric_name(split, task, k) for split in (VAL, "heldout") for task in TASKS for k in CELL_KS),
        KEPT_EPOCH,
    ]
    return {name: child.metrics[name] for name in dict.fromkeys(names) if name in child.metrics}


def _primary_json(c: PrimaryComparison) -> dict:
    """One pre-registered comparison in ``summary.json``."""
    d = c.difference
    return {
        "against": c.against,
        "variants": list(c.variants),
        "seeds": list(c.seeds),
        "positives": c.positives,
        "k": d.k,
        "difference": d.difference,
        "low": d.low,
        "high": d.high,
        "bootstrap": "seeds, then users within",
    }


def _pooled_json(c: PooledComparison) -> dict:
    """One all-folds paired comparison in ``summary.json``."""
    d = c.difference
    return {
        "baseline": c.baseline,
        "seed": c.seed,
        "variants": list(c.variants),
        "positives": c.positives,
        "k": d.k,
        "difference": d.difference,
        "low": d.low,
        "high": d.high,
    }
