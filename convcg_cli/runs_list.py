"""``convcg runs``: an experiment's runs in the terminal (name and id, kind and status, start,
held-out recall@100/@1000 of one task), newest first, and how to open the same runs in the MLflow UI;
``convcg compare``: chosen runs side by side, the best of each headline figure marked."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from convcg_cli import tracking

HEADLINE_SPLIT = "heldout"  # what the table shows (eval on another split shows that one instead)


def headline_columns(listing: tracking.RunListing, task: str) -> tuple[str, list[str]]:
    """``(split, names)``: the short headline names of ``task`` the listed runs have, by k, of the
    held-out split (or, when no run has one, of the first split that has any).

    Example:
        >>> from convcg_cli.tracking import RunListing, RunSummary, Store
        >>> headline = {"r1000_conversion_heldout": 0.1, "r100_conversion_heldout": 0.2, "r100_x_val": 0.3}
        >>> runs = [RunSummary("a", "", "", "", None, headline)]
        >>> headline_columns(RunListing(Store("sqlite:////x.db", "e"), "1", runs), "conversion")
        ('heldout', ['r100_conversion_heldout', 'r1000_conversion_heldout'])
    """
    found = {}
    for run in listing.runs:
        for name in run.headline:
            parsed = tracking.parse_headline(name)
            if parsed is not None and parsed[2] == task:
                found[parsed] = name
    splits = sorted({split for _, split, _ in found}, key=lambda s: (s != HEADLINE_SPLIT, s))
    split = splits[0] if splits else HEADLINE_SPLIT
    return split, [found[key] for key in sorted(found) if key[1] == split]


def runs_table(listing: tracking.RunListing, task: str) -> Table:
    """The listing as a table that fits 80 columns: a row per run, its name over its id (never cut:
    it is what ``--run`` takes), kind over status, the start, and one column per headline k."""
    split, columns = headline_columns(listing, task)
    table = Table(
        title=f"{split} {task} recall",
        title_justify="right",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        padding=(0, 0),  # the box's one-space separators are enough: the table fits 80 columns
        leading=1,  # a blank line between runs: each takes two lines
    )
    table.add_column("name / run id", min_width=32, overflow="fold")  # an id is 32 characters
    table.add_column("kind /\nstatus", min_width=8)
    table.add_column("started", min_width=10)
    for name in columns:
        table.add_column(f"recall@{name.split('_', 1)[0][1:]}", justify="right")
    for run in listing.runs:
        started = run.start.strftime("%Y-%m-%d\n%H:%M") if run.start else "-"
        values = [f"{run.headline[c]:.4f}" if c in run.headline else "" for c in columns]
        table.add_row(f"{run.name}\n{run.run_id}", f"{run.kind}\n{run.status}", started, *values)
    return table


def print_runs(
    out: Console,
    store: tracking.Store,
    task: str,
    kind: str | None = None,
    limit: int = 20,
    experiment: str | None = None,
) -> tracking.RunListing:
    """Print the newest ``limit`` runs (of ``kind``, of ``experiment``) with ``task``'s headline
    recall, and the UI hint: the same experiment, filtered to that kind (trained runs by default),
    best held-out recall@100 first."""
    listing = tracking.list_runs(store, kind, limit, experiment)
    if listing.runs:
        out.print(f"Runs of {listing.store.where()}, newest first:", highlight=False)
        out.print(runs_table(listing, task))
    else:
        of_kind = f" of kind '{kind}'" if kind else ""
        out.print(f"No runs{of_kind} in {listing.store.where()}.", highlight=False)
    by = next((c for c in headline_columns(listing, task)[1] if c.startswith("r100_")), "")
    search = f"tags.{tracking.KIND_TAG} = '{kind or tracking.TRAINED_KIND}'"
    hint = tracking.ui_hint(listing.store.uri, listing.experiment_id, search, by)
    out.print(f"Open the MLflow UI: {hint}", markup=False, highlight=False)
    return listing


# --- convcg compare: chosen runs side by side ---------------------------------------------------

BEST_MARK = "*"  # after the best value of a row (every tied one)


@dataclass(frozen=True)
class ComparisonRow:
    """One row of ``convcg compare``: a label and one value per run (None: the run has none);
    ``ranked``: whether higher is better (the best is marked) or the values are choices (weights)."""

    label: str
    values: list[float | None]
    ranked: bool = True

    def best(self) -> float | None:
        """The highest value of a ranked row with at least two values; None otherwise.

        Example:
            >>> ComparisonRow("r", [0.2, None, 0.5]).best(), ComparisonRow("r", [0.2, None]).best()
            (0.5, None)
        """
        present = [v for v in self.values if v is not None]
        return max(present) if self.ranked and len(present) > 1 else None


History = Callable[[str, str], list[tuple[int, float]]]  # (run id, metric) -> [(step, value), ...]


def _tasks(runs: list[tracking.ComparedRun], primary: Sequence[str]) -> list[str]:
    """The tasks whose headline recall any run logged, those of ``primary`` first (in its order)."""
    found = {
        parsed[2]
        for run in runs
        for name in {**tracking.headline_metrics(run.metrics), **run.metrics}
        if (parsed := tracking.parse_headline(name)) is not None
    }
    return [t for t in primary if t in found] + sorted(found - set(primary))


def comparison_rows(
    runs: list[tracking.ComparedRun],
    primary_tasks: Sequence[str],
    monitor: tuple[str, str] | None,
    history: History,
) -> list[ComparisonRow]:
    """The rows ``convcg compare`` shows: validation then held-out recall@100/@1000 per task (the
    tasks any run has, ``primary_tasks`` first), then the popularity blend's chosen weights when a
    run logged them. A validation figure is the one of the epoch whose checkpoint the run kept (the
    ``monitor``, ``(metric, mode)``, at its best, read from ``history``); held-out figures are the
    run's last evaluation."""
    from convcg_cli.blend import BETA_METRIC, GAMMA_METRIC
    from convcg_cli.kept_checkpoint import value_at_best_epoch
    from convcg_cli.metrics.retrieval import HELDOUT, VAL, metric_name

    def kept(run: tracking.ComparedRun, name: str) -> float | None:
        if name not in run.metrics:
            return None
        if monitor is None:
            return run.metrics[name]
        watched, mode = monitor
        value = value_at_best_epoch(history(run.run_id, watched), history(run.run_id, name), mode)
        return None if math.isnan(value) else value

    rows = []
    for split in (VAL, HELDOUT):
        for task in _tasks(runs, primary_tasks):
            for k in tracking.HEADLINE_KS:
                name = metric_name(split, task, k)
                values = [kept(run, name) if split == VAL else run.metrics.get(name) for run in runs]
                if any(v is not None for v in values):
                    rows.append(ComparisonRow(f"{split} {task} recall@{k}", values))
    for name, label in ((BETA_METRIC, "blend: popularity weight"), (GAMMA_METRIC, "blend: fallback weight")):
        values = [run.metrics.get(name) for run in runs]
        if any(v is not None for v in values):
            rows.append(ComparisonRow(label, values, ranked=False))
    return rows


def comparison_table(runs: list[tracking.ComparedRun], rows: list[ComparisonRow]) -> Table:
    """Runs as columns (name, design, seed, data and the id's first 8 characters in the header),
    the rows as :func:`comparison_rows` gives them; the best of each ranked row in bold with
    ``BEST_MARK``."""
    table = Table(box=box.SIMPLE_HEAD, caption=f"{BEST_MARK} best of its row", caption_justify="left")
    table.add_column("metric", no_wrap=True)
    for run in runs:
        header = f"{run.name}\n{run.design}\nseed {run.seed}\n{run.data}\n{run.run_id[:8]}"
        table.add_column(Text(header), justify="right", overflow="fold")
    for row in rows:
        best = row.best()
        cells: list[Text] = []
        for value in row.values:
            if value is None:
                cells.append(Text(""))
            elif not row.ranked:
                cells.append(Text(f"{value:g}"))
            elif value == best:
                cells.append(Text(f"{value:.4f} {BEST_MARK}", style="bold"))
            else:
                cells.append(Text(f"{value:.4f}  "))
        table.add_row(row.label, *cells)
    return table


def print_comparison(
    out: Console,
    store: tracking.Store,
    refs: Sequence[str],
    primary_tasks: Sequence[str],
    monitor: tuple[str, str] | None,
    experiment: str | None = None,
) -> list[ComparisonRow]:
    """Print the runs ``refs`` names (ids or ``latest``) side by side (:func:`comparison_table`)."""
    runs = tracking.find_runs(store, refs, experiment)
    rows = comparison_rows(
        runs, primary_tasks, monitor, lambda run_id, name: tracking.metric_history(store, run_id, name)
    )
    out.print(f"Runs of {store.uri}, compared:", highlight=False)
    if not rows:
        out.print("None of them logged a validation or held-out recall yet.", highlight=False)
    out.print(comparison_table(runs, rows))
    return rows
