"""The statistics of ``convcg ablate``'s report: per variant and fold the recall of the finished
cells with its interval, the validation-selected variant, and paired bootstrap comparisons against
every baseline, per (seed, fold) and pooled over all the held-out windows of a rolling-origin grid.

Pure functions of the grid and its :class:`ChildResult` objects: no MLflow, no training, no files.
:mod:`.report` renders what :func:`build_summary` returns.
"""

from __future__ import annotations

import math
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from convcg_cli.ablate.grid import FINISHED, ChildResult, Grid
from convcg_cli.evaluate import BASELINE_PREFIX, MODEL_RANKING
from convcg_cli.metrics.bootstrap import PairedDifference, ci_names, paired_bootstrap_diff
from convcg_cli.metrics.compare import t_interval
from convcg_cli.metrics.hierarchical import hierarchical_paired_diff
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
class PrimaryComparison:
    """The pre-registered verdict against one name of ``grid.primary``: the design selected on
    validation in each fold (``variants[f]``) minus ``against``, pooled over the folds, the interval
    from the two-level bootstrap (seeds, then users within: training randomness included)."""

    against: str
    variants: tuple[str, ...]
    seeds: tuple[int, ...]
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
    primary: list[PrimaryComparison] = field(default_factory=list)


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


def _chosen_cells(
    grid: Grid, rows: dict[int, list[Row]], children: list[ChildResult]
) -> tuple[tuple[str, ...], dict[tuple[int, str, int], ChildResult]] | None:
    """The design validation selected in each fold and the finished cells with hits by (fold,
    variant, seed); None while some fold has no selected design."""
    selected = [selected_variant(rows.get(fold, []), grid) for fold in range(grid.folds)]
    if any(s is None for s in selected):
        return None
    done = {(c.fold, c.variant, c.seed): c for c in children if c.status == FINISHED and c.hits is not None}
    return tuple(s.name for s in selected if s is not None), done


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
    chosen = _chosen_cells(grid, rows, children)
    if chosen is None:
        return []
    names, done = chosen
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


def primary_comparisons(
    grid: Grid, rows: dict[int, list[Row]], children: list[ChildResult], pairing: Pairing
) -> list[PrimaryComparison]:
    """The pre-registered comparisons (``grid.primary``): per name, the selected design of every
    fold against it on all folds' held-out positives, over every seed with a finished cell in each
    fold, by :func:`~convcg_cli.metrics.hierarchical.hierarchical_paired_diff`. A name is compared
    with the untrained baseline of that name, else with the grid's variant of that name (its cell of
    the same seed and fold). Empty without ``primary``, bootstrap draws or a selected design."""
    if not grid.primary or pairing.n_boot < 1:
        return []
    chosen = _chosen_cells(grid, rows, children)
    if chosen is None:
        return []
    names, done = chosen
    out = []
    for against in grid.primary:
        model_rows, other_rows, seeds, users = [], [], [], None
        for seed in grid.seeds:
            cells = [done.get((fold, name, seed)) for fold, name in enumerate(names)]
            if any(c is None for c in cells):
                continue
            model, other = [], []
            for fold, cell in enumerate(cells):
                assert cell is not None
                own = _flags_at(grid, cell)
                flags = own.get(against)
                variant = done.get((fold, against, seed))
                if flags is None and variant is not None and _same_positives(cell, variant):
                    flags = _flags_at(grid, variant).get(MODEL_RANKING)
                mine = own.get(MODEL_RANKING)
                if flags is None or mine is None:
                    break
                model.append(mine[:, 0])
                other.append(flags[:, 0])
            else:
                seed_users = np.concatenate(
                    [c.hits.user for c in cells if c is not None and c.hits is not None]
                )
                if users is not None and not np.array_equal(users, seed_users):
                    continue  # another data set: positions are not the same users
                users = seed_users
                model_rows.append(np.concatenate(model))
                other_rows.append(np.concatenate(other))
                seeds.append(seed)
        if not seeds or users is None:
            continue
        difference = hierarchical_paired_diff(
            np.stack(model_rows),
            np.stack(other_rows),
            users,
            grid.select_k,
            pairing.n_boot,
            pairing.seed,
            pairing.level,
        )
        out.append(PrimaryComparison(against, names, tuple(seeds), difference, len(users)))
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
    pooled = pooled_comparisons(grid, rows, children, pairing)
    return Summary(rows, comparisons, children, pooled, primary_comparisons(grid, rows, children, pairing))
