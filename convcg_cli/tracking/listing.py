"""The runs of an experiment as plain rows (``convcg runs``: id, name, kind, status, start, headline)
and chosen runs with everything a comparison shows (``convcg compare``)."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from convcg_cli.errors import ConfigError, RunNotFoundError
from convcg_cli.tracking.runs import BASELINE_TAG, DESIGN_TAG, KIND_TAG, KINDS, mark_dead_runs, resolve_run
from convcg_cli.tracking.store import Store
from convcg_cli.tracking.ui import headline_metrics, parse_headline


@dataclass(frozen=True)
class RunSummary:
    """One run as ``convcg runs`` lists it.

    Args:
        run_id: MLflow's run id (what ``--run`` takes).
        name: the run's name (``unified_parallel s0 · kuairand``).
        kind: its ``kind`` tag (``trained``, ``baseline``, ...; ``-`` for a run without one).
        status: RUNNING, FINISHED, FAILED or KILLED.
        start: when it started (local time), None when the store does not say.
        headline: short headline name (``r100_conversion_heldout``) -> value.
    """

    run_id: str
    name: str
    kind: str
    status: str
    start: dt.datetime | None
    headline: dict[str, float]


@dataclass(frozen=True)
class RunListing:
    """The runs ``convcg runs`` shows, and where they are: the store (its experiment) and the id of
    that experiment (what the UI's address names)."""

    store: Store
    experiment_id: str
    runs: list[RunSummary]


def _summary(run) -> RunSummary:
    metrics = run.data.metrics
    # Runs logged before the short names existed carry only the long ones: derived here the same way.
    headline = {**headline_metrics(metrics), **{k: v for k, v in metrics.items() if parse_headline(k)}}
    start = run.info.start_time
    return RunSummary(
        run_id=run.info.run_id,
        name=run.info.run_name or "",
        kind=run.data.tags.get(KIND_TAG, "-"),
        status=run.info.status,
        start=dt.datetime.fromtimestamp(start / 1000) if start else None,
        headline=headline,
    )


def _no_store(store: Store) -> RunNotFoundError:
    return RunNotFoundError(
        f"No MLflow store at {store.uri}: nothing was trained here yet (set CONVCG_HOME to the home "
        "you trained in, or MLFLOW_TRACKING_URI to your team's server, or train with 'convcg train')."
    )


def list_runs(
    store: Store, kind: str | None = None, limit: int = 20, experiment: str | None = None
) -> RunListing:
    """The newest ``limit`` runs of the store's experiment (or of ``experiment``), newest first, of
    one ``kind`` or of every kind. Looking creates nothing: RunNotFoundError when there is no store
    or no such experiment (naming the experiments there are). RUNNING runs of dead processes on this
    host are marked KILLED first, as every command that reads runs does."""
    if kind is not None and kind not in KINDS:
        raise ConfigError(f"Unknown run kind '{kind}'; choose one of {', '.join(KINDS)}.")
    if limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {limit}.")
    if experiment:
        store = dataclasses.replace(store, experiment_name=experiment)
    if not store.exists():
        raise _no_store(store)
    exp = store.find_experiment_id()
    if exp is None:
        names = sorted(e.name for e in store.client.search_experiments())
        there = f"experiments there: {', '.join(names)}" if names else "it has no experiment yet"
        raise RunNotFoundError(
            f"No experiment '{store.experiment_name}' at {store.uri} ({there}); pick one with --experiment."
        )
    mark_dead_runs(store, [exp])
    runs = store.client.search_runs(
        [exp],
        filter_string=f"tags.{KIND_TAG} = '{kind}'" if kind else "",
        order_by=["attributes.start_time DESC"],
        max_results=limit,
    )
    return RunListing(store, exp, [_summary(run) for run in runs])


LATEST = "latest"  # what ``convcg compare`` takes for the newest finished run with a checkpoint
DATA_TAG = "data"  # a baseline run's: the name of the data it was scored on (convcg eval)


@dataclass(frozen=True)
class ComparedRun:
    """One run as ``convcg compare`` shows it: what tells it apart, and every metric it logged.

    Args:
        run_id: MLflow's run id.
        name: the run's name.
        kind: its ``kind`` tag (``-`` without one).
        design: its ``design`` tag (a baseline: its ``baseline`` tag; ``-`` for neither).
        seed: its ``seed`` tag (``-`` without one).
        data: the name of the data it was trained on (its training dataset input; a baseline's
            ``data`` tag; ``-`` when it says neither).
        metrics: metric name -> the last value logged.
    """

    run_id: str
    name: str
    kind: str
    design: str
    seed: str
    data: str
    metrics: dict[str, float]


def _training_data(run) -> str:
    inputs = getattr(run.inputs, "dataset_inputs", None) or []
    for dataset_input in inputs:
        if any(t.key == "mlflow.data.context" and t.value == "training" for t in dataset_input.tags):
            return dataset_input.dataset.name
    return run.data.tags.get(DATA_TAG, "-")


def _compared(run) -> ComparedRun:
    tags = run.data.tags
    return ComparedRun(
        run_id=run.info.run_id,
        name=run.info.run_name or "",
        kind=tags.get(KIND_TAG, "-"),
        design=tags.get(DESIGN_TAG) or tags.get(BASELINE_TAG, "-"),
        seed=tags.get("seed", "-"),
        data=_training_data(run),
        metrics=dict(run.data.metrics),
    )


def find_runs(store: Store, refs: Sequence[str], experiment: str | None = None) -> list[ComparedRun]:
    """The runs ``refs`` names (run ids, or ``latest``: the newest finished run with a checkpoint of
    the store's experiment, or of ``experiment``), in that order, each once. Looking creates
    nothing: RunNotFoundError when there is no store or a run is not in it."""
    from mlflow.exceptions import MlflowException

    if not refs:
        raise ConfigError("Name the runs to compare: run ids (shown by 'convcg runs') or 'latest'.")
    if experiment:
        store = dataclasses.replace(store, experiment_name=experiment)
    if not store.exists():
        raise _no_store(store)
    ids: list[str] = []
    for ref in refs:
        run_id = resolve_run(store, LATEST) if ref == LATEST else ref
        if run_id not in ids:
            ids.append(run_id)
    runs = []
    for run_id in ids:
        try:
            runs.append(_compared(store.client.get_run(run_id)))
        except MlflowException:
            raise RunNotFoundError(
                f"Run '{run_id}' was not found at {store.uri}. Pass run ids shown by 'convcg runs', "
                f"or '{LATEST}'."
            ) from None
    return runs
