"""What ``convcg ablate`` reports: statistics of the finished cells, the validation-selected variant,
paired comparisons against every baseline, and the markdown report / JSON summary rendering them.

Pure functions of the grid and its :class:`ChildResult` objects: no MLflow, no training, no files.
Every table goes through :func:`convcg_cli.markdown.table`.
"""

from __future__ import annotations

import math
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from convcg_cli.ablate.grid import END_OFFSET_KEY, FINISHED, ChildResult, Grid
from convcg_cli.evaluate import BASELINE_PREFIX, MODEL_RANKING
from convcg_cli.markdown import table
from convcg_cli.metrics.bootstrap import PairedDifference, ci_names, paired_bootstrap_diff
from convcg_cli.metrics.compare import t_interval, t_quantile
from convcg_cli.metrics.retrieval import COLD_ITEMS, RECALL, VAL, VALUE_RECALL, metric_name
from convcg_cli.tasks import CONVERSION, ENGAGEMENT

TASKS = (CONVERSION, ENGAGEMENT)
DESIGN = "design"
TRAINED_BASELINE = "baseline (two-tower)"
FIXED_BASELINE = "baseline (no training)"
BEATS = "beats"
# Metrics a run logs only where they apply, shown beside recall when some run of the grid logged them:
# report label -> (metric pattern, subset of the positives) of ``metric_name``.
EXTRA_METRICS = {
    "value recall": (VALUE_RECALL, None),  # share of the positives' value retrieved
    "cold-item recall": (RECALL, COLD_ITEMS),  # positives whose item had no training impression
}


@dataclass(frozen=True)
class Row:
    """One line of the report: a variant's recall per (task, k) with its 95% interval.

    ``values[(task, k)]`` are the finished seeds' figures, ``mean`` their mean, ``low``/``high`` the
    interval: a t-interval across seeds for trained variants (NaN with one seed), the bootstrap-over-
    users CI for a baseline that has no training randomness. ``validation`` is the mean over seeds of
    the validation metric that selects (NaN where there is none, e.g. for untrained baselines).
    ``extras[(task, label, k)]``: ``(mean, low, high)`` of an ``EXTRA_METRICS`` figure, only for those
    some finished run logged (bounds as for recall; NaN where none was logged).
    """

    name: str
    kind: str
    n: int
    n_failed: int
    values: dict[tuple[str, int], tuple[float, ...]]
    mean: dict[tuple[str, int], float]
    low: dict[tuple[str, int], float]
    high: dict[tuple[str, int], float]
    validation: float = math.nan
    extras: dict[tuple[str, str, int], tuple[float, float, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class Comparison:
    """Paired difference (variant - baseline) of held-out recall@k on one (seed, fold)."""

    fold: int
    variant: str
    baseline: str
    seed: int
    difference: PairedDifference


@dataclass(frozen=True)
class PooledComparison:
    """Paired difference (selected variant - baseline) of recall@k over the held-out days of every
    fold together, for one seed. ``variants[f]`` is the design validation selected in fold f."""

    baseline: str
    seed: int
    variants: tuple[str, ...]
    difference: PairedDifference
    positives: int


@dataclass(frozen=True)
class Pairing:
    """How paired comparisons resample: ``eval.yaml``'s ``bootstrap`` options (n_boot 0: none)."""

    n_boot: int
    seed: int = 0
    level: float = 0.95


@dataclass(frozen=True)
class Summary:
    """Everything the report shows: rows per fold, the paired comparisons, the cells."""

    rows: dict[int, list[Row]]
    comparisons: list[Comparison]
    children: list[ChildResult]
    pooled: list[PooledComparison] = field(default_factory=list)


def selection_metric(grid: Grid) -> str:
    """Name of the validation metric that selects the best variant, e.g. ``val/conversion/recall_at_100``."""
    return metric_name(VAL, grid.select_task, grid.select_k)


def summarize(
    grid: Grid, children: list[ChildResult], split: str, ks: Sequence[int], fold: int = 0
) -> list[Row]:
    """One row per variant of ``fold`` (t-interval over its finished seeds), then one per untrained
    baseline (the same for every seed)."""
    children = [c for c in children if c.fold == fold]
    rows = []
    for variant in grid.variants:
        done = [c for c in children if c.variant == variant.name and c.status == FINISHED]
        failed = sum(c.variant == variant.name and c.status != FINISHED for c in children)
        values, mean, low, high = {}, {}, {}, {}
        for task in TASKS:
            for k in ks:
                name = metric_name(split, task, k)
                values[(task, k)] = tuple(c.metrics[name] for c in done if name in c.metrics)
                mean[(task, k)], low[(task, k)], high[(task, k)] = t_interval(values[(task, k)])
        validation = [c.metrics[selection_metric(grid)] for c in done if selection_metric(grid) in c.metrics]
        kind = TRAINED_BASELINE if variant.baseline else DESIGN
        extras = _extra_intervals(done, split, ks)
        rows.append(
            Row(
                variant.name,
                kind,
                len(done),
                failed,
                values,
                mean,
                low,
                high,
                t_interval(validation)[0],
                extras,
            )
        )
    return rows + _untrained_baseline_rows(children, split, ks)


def _extra_intervals(
    done: list[ChildResult], split: str, ks: Sequence[int]
) -> dict[tuple[str, str, int], tuple[float, float, float]]:
    """The t-interval over ``done`` seeds of each ``EXTRA_METRICS`` figure some of them logged."""
    out = {}
    for task in TASKS:
        for label, (pattern, subset) in EXTRA_METRICS.items():
            for k in ks:
                name = metric_name(split, task, k, pattern, subset)
                values = [c.metrics[name] for c in done if name in c.metrics]
                if values:
                    out[(task, label, k)] = t_interval(values)
    return out


def _extra_logged(metrics: dict[str, float], prefix: str, ks: Sequence[int]) -> dict:
    """A deterministic ranking's ``EXTRA_METRICS`` figures as logged, with their CI where logged."""
    out = {}
    for task in TASKS:
        for label, (pattern, subset) in EXTRA_METRICS.items():
            for k in ks:
                name = metric_name(prefix, task, k, pattern, subset)
                if name in metrics:
                    low_name, high_name = ci_names(name)
                    bounds = (metrics.get(low_name, math.nan), metrics.get(high_name, math.nan))
                    out[(task, label, k)] = (metrics[name], *bounds)
    return out


def _untrained_baseline_rows(children: list[ChildResult], split: str, ks: Sequence[int]) -> list[Row]:
    """The untrained baselines' rows, once per distinct set of baseline figures: children that read
    the same data share them; a grid whose variants read different data (with and without the user
    history) gets one set per data, named after the first variant that saw it."""
    prefix = f"{split}/{BASELINE_PREFIX}"
    firsts: dict[tuple, ChildResult] = {}
    for child in children:
        if child.status == FINISHED:
            signature = tuple(sorted((k, v) for k, v in child.metrics.items() if k.startswith(prefix)))
            firsts.setdefault(signature, child)
    rows = []
    for child in firsts.values():
        suffix = f" (data of {child.variant})" if len(firsts) > 1 else ""
        rows += [replace(r, name=f"{r.name}{suffix}") for r in _fixed_baseline_rows(child, split, ks)]
    return rows


def _fixed_baseline_rows(child: ChildResult, split: str, ks: Sequence[int]) -> list[Row]:
    """Rows of the untrained baselines: they do not depend on the seed, every child has the same."""
    prefix = f"{split}/{BASELINE_PREFIX}"
    rows = []
    for name in sorted({m[len(prefix) :].split("/")[0] for m in child.metrics if m.startswith(prefix)}):
        values: dict[tuple[str, int], tuple[float, ...]] = {}
        mean, low, high = {}, {}, {}
        for task in TASKS:
            for k in ks:
                metric = metric_name(f"{prefix}{name}", task, k)
                low_name, high_name = ci_names(metric)
                mean[(task, k)] = child.metrics.get(metric, math.nan)
                values[(task, k)] = (mean[(task, k)],)
                low[(task, k)] = child.metrics.get(low_name, math.nan)
                high[(task, k)] = child.metrics.get(high_name, math.nan)
        extras = _extra_logged(child.metrics, f"{prefix}{name}", ks)
        rows.append(Row(name, FIXED_BASELINE, 1, 0, values, mean, low, high, extras=extras))
    return rows


def selected_variant(rows: list[Row], grid: Grid | None = None) -> Row | None:
    """The design with the best mean validation figure (held-out figures play no part); in a refit
    grid (``grid.refit_of``) its one design, chosen on validation by that other grid."""
    if grid is not None and grid.refit_of:
        return next((r for r in rows if r.kind == DESIGN and r.n > 0), None)
    scored = [r for r in rows if r.kind == DESIGN and r.n > 0 and not math.isnan(r.validation)]
    return max(scored, key=lambda r: r.validation, default=None)


def paired_comparisons(
    grid: Grid,
    children: list[ChildResult],
    pairing: Pairing,
    cache: MutableMapping[tuple[int, str, str, int], PairedDifference] | None = None,
) -> list[Comparison]:
    """Every design vs every baseline, per (seed, fold), at ``grid.select_k``, paired on users.

    Untrained baselines are the ``baseline_*`` rankings saved beside the design's own; a trained
    baseline variant is compared with its child of the same seed and fold. ``cache`` keeps what was
    computed when the report is rewritten after every cell.
    """
    if pairing.n_boot < 1:
        return []
    cache = {} if cache is None else cache
    done = {(c.fold, c.variant, c.seed): c for c in children if c.status == FINISHED and c.hits is not None}
    trained_baselines = [v.name for v in grid.variants if v.baseline]
    out = []
    for (fold, name, seed), child in done.items():
        if name in trained_baselines or child.hits is None or grid.select_k not in child.hits.ks:
            continue
        column = child.hits.ks.index(grid.select_k)
        model = child.hits.rankings[MODEL_RANKING][:, [column]]
        against = {
            ranking.removeprefix(BASELINE_PREFIX): flags[:, [column]]
            for ranking, flags in child.hits.rankings.items()
            if ranking != MODEL_RANKING
        }
        for baseline in trained_baselines:
            other = done.get((fold, baseline, seed))
            if other is not None and other.hits is not None and _same_positives(child, other):
                against[baseline] = other.hits.rankings[MODEL_RANKING][:, [column]]
        for baseline, flags in against.items():
            key = (fold, name, baseline, seed)
            if key not in cache:
                cache[key] = paired_bootstrap_diff(
                    model,
                    flags,
                    child.hits.user,
                    [grid.select_k],
                    pairing.n_boot,
                    pairing.seed,
                    pairing.level,
                )[grid.select_k]
            out.append(Comparison(fold, name, baseline, seed, cache[key]))
    return out


def pooled_comparisons(
    grid: Grid, rows: dict[int, list[Row]], children: list[ChildResult], pairing: Pairing
) -> list[PooledComparison]:
    """The rolling-origin verdict: per seed, the design validation selected in each fold vs every
    baseline, on the held-out positives of all folds together, paired on users.

    One bootstrap replicate draws users with replacement from those with a held-out positive in any
    fold and keeps ALL their positives of EVERY fold (a user is one cluster across the windows, so
    the interval is not narrowed by counting the same person's tastes once per window); recall is
    micro recall over all folds' positives. Empty unless the grid has several folds, every fold has
    a selected design, and each seed's selected cell of every fold has its hits, on one data set.
    """
    if grid.folds < 2 or pairing.n_boot < 1:
        return []
    selected = [selected_variant(rows.get(fold, []), grid) for fold in range(grid.folds)]
    if any(s is None for s in selected):
        return []
    names = tuple(s.name for s in selected if s is not None)
    done = {(c.fold, c.variant, c.seed): c for c in children if c.status == FINISHED and c.hits is not None}
    if len({c.data_dir for c in done.values()}) > 1:
        return []  # user positions are positions in one data set's user table
    trained_baselines = [v.name for v in grid.variants if v.baseline]
    out = []
    for seed in grid.seeds:
        cells = [done.get((fold, name, seed)) for fold, name in enumerate(names)]
        if any(c is None or c.hits is None or grid.select_k not in c.hits.ks for c in cells):
            continue
        flags = [_flags_at(grid, c) for c in cells if c is not None]
        for fold, (cell, own) in enumerate(zip(cells, flags, strict=True)):
            for baseline in trained_baselines:  # the trained baseline's cell of the same seed and fold
                other = done.get((fold, baseline, seed))
                if cell is not None and other is not None and _same_positives(cell, other):
                    own[baseline] = _flags_at(grid, other).get(MODEL_RANKING)
        baselines = set.intersection(*({b for b, f in own.items() if f is not None} for own in flags))
        users = np.concatenate([c.hits.user for c in cells if c is not None and c.hits is not None])
        model = np.concatenate([own[MODEL_RANKING] for own in flags])
        for baseline in sorted(baselines - {MODEL_RANKING}):
            other_flags = np.concatenate([own[baseline] for own in flags])
            difference = paired_bootstrap_diff(
                model, other_flags, users, [grid.select_k], pairing.n_boot, pairing.seed, pairing.level
            )[grid.select_k]
            out.append(PooledComparison(baseline, seed, names, difference, len(users)))
    return out


def _flags_at(grid: Grid, child: ChildResult) -> dict[str, np.ndarray | None]:
    """``{ranking: (P, 1) hit flags at grid.select_k}`` of one cell: ``model`` and every untrained
    baseline saved beside it (by the baseline's name); empty without hits at that cutoff."""
    if child.hits is None or grid.select_k not in child.hits.ks:
        return {}
    column = child.hits.ks.index(grid.select_k)
    return {
        (name if name == MODEL_RANKING else name.removeprefix(BASELINE_PREFIX)): flags[:, [column]]
        for name, flags in child.hits.rankings.items()
    }


def _same_positives(a: ChildResult, b: ChildResult) -> bool:
    """Whether two cells were scored on the same held-out positives (the pairing needs it)."""
    assert a.hits is not None and b.hits is not None
    return np.array_equal(a.hits.query, b.hits.query) and np.array_equal(a.hits.user, b.hits.user)


def verdict(comparisons: Sequence[Comparison | PooledComparison], seeds: Sequence[int]) -> str:
    """``beats`` when the paired CI's lower bound is > 0 on every seed of the grid, else how many.

    Example:
        >>> verdict([], [0, 1])
        'CI > 0 on 0 of 2 seeds'
    """
    above = {c.seed for c in comparisons if c.difference.above_zero}
    if set(seeds) <= above:
        return BEATS
    return f"CI > 0 on {len(above & set(seeds))} of {len(seeds)} seeds"


def build_summary(
    grid: Grid,
    children: list[ChildResult],
    split: str,
    ks: Sequence[int],
    pairing: Pairing,
    cache: MutableMapping[tuple[int, str, str, int], PairedDifference] | None = None,
) -> Summary:
    """Rows of every fold and the paired comparisons of the cells done so far."""
    rows = {fold: summarize(grid, children, split, ks, fold) for fold in range(grid.folds)}
    comparisons = paired_comparisons(grid, children, pairing, cache)
    return Summary(rows, comparisons, children, pooled_comparisons(grid, rows, children, pairing))


# --------------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------------


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


def render_report(grid: Grid, summary: Summary, context: dict) -> str:
    """The markdown report: reproduce command, per fold the recall tables, the validation-selected
    variant vs every baseline and the compact all-variants comparison, then failures and notes."""
    lines = [
        f"# Ablation `{grid.name}`",
        "",
        "Reproduce:",
        "",
        "```bash",
        context["command"],
        "```",
        "",
        f"MLflow parent run `{context['parent_run_id']}` ({context['tracking_uri']}); every (variant, seed"
        + (", fold" if grid.folds > 1 else "")
        + ") is a child run. Data: "
        + (", ".join(f"`{d}`" for d in context["data_dirs"]) or "–")
        + f"; metrics on the `{context['split']}` split; the best variant is selected on the `val` split "
        f"(`{selection_metric(grid)}`).",
        "",
    ]
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


def summary_json(grid: Grid, summary: Summary) -> dict:
    """``summary.json``: rows per fold, the selected variant per fold, paired comparisons, children."""

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
        "children": [
            {
                "variant": c.variant,
                "seed": c.seed,
                "fold": c.fold,
                "run_id": c.run_id,
                "status": c.status,
                "error": c.error,
            }
            for c in summary.children
        ],
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
