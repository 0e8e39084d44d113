"""``convcg runs``: an experiment's runs in the terminal (name and id, kind and status, start,
held-out recall@100/@1000 of one task), newest first, and how to open the same runs in the MLflow UI."""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.table import Table

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
