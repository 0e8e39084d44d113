"""Run lifecycle: open, reopen, find and end runs with the right status.

A run is created here (not by Lightning) so that its status is ours to set: FINISHED on success,
FAILED on an exception, KILLED on Ctrl-C; whatever was logged before a crash stays in the run.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from omegaconf import DictConfig, OmegaConf

from convcg_cli.errors import RunNotFoundError
from convcg_cli.tracking.artifacts import CHECKPOINT_TAG, CONFIG_ARTIFACT, OVERRIDES_ARTIFACT, log_text
from convcg_cli.tracking.offline import (
    MetricJournal,
    ServerGoneError,
    UnsentMetric,
    gone_message,
    run_ended_message,
    server_gone,
)
from convcg_cli.tracking.params import MAX_PARAM_LENGTH, choice_tags, design, log_params, run_name, run_params
from convcg_cli.tracking.store import PARENT_RUN_TAG, Store, TrackedRun, user_variables_kept
from convcg_cli.tracking.ui import BASELINE_COLOURS, DESIGN_COLOURS, RUN_COLOR_TAG, run_colour
from convcg_cli.workdir import process_alive

ERROR_TAG = "error"  # the one-line error of a FAILED run
HOST_TAG, PID_TAG = "convcg.host", "convcg.pid"  # the process that holds a RUNNING run open
# The threads torch computed with: in float32 a trained figure depends on it (a matrix product's
# partial sums are ordered by how the work is split), so a run reproduces with its seed AND this.
THREADS_TAG = "torch_threads"
RESUMABLE = ("KILLED", "FAILED")

# What a run is, on every run convcg opens, so one UI filter shows the designs: tags.kind = 'trained'.
KIND_TAG = "kind"
TRAINED_KIND = "trained"  # convcg train, an ablation's cells
BASELINE_KIND = "baseline"  # an untrained ranking scored by convcg eval
TRIAL_KIND = "trial"  # a convcg tune trial (its lineage says so)
GRID_KIND, STUDY_KIND, BENCH_KIND = "grid", "study", "bench"  # parents: ablate, tune; convcg bench
KINDS = (TRAINED_KIND, BASELINE_KIND, TRIAL_KIND, GRID_KIND, STUDY_KIND, BENCH_KIND)
DESIGN_TAG = "design"  # what a trained run is a run of (params.design); its colour in the UI


def existing_run(store: Store, run_id: str) -> TrackedRun:
    """A handle to log into a run that already exists (e.g. eval adding its metrics to a training run)."""
    return TrackedRun(store, run_id)


# Where launchers put a process's rank: torchrun (RANK), Lightning's DDP launcher (LOCAL_RANK in the
# processes it starts, NODE_RANK on the other nodes), SLURM (SLURM_PROCID).
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")


def is_global_zero() -> bool:
    """Whether this process owns the MLflow run: rank 0 of a multi-process launch, or the only process.

    Read from the launcher's environment, not ``torch.distributed``: it must be known before
    ``trainer.fit`` creates the process group, because every rank runs the same ``convcg train``
    command and only one of them may open a run.
    """
    return all(int(os.environ.get(name) or 0) == 0 for name in RANK_VARIABLES)


def _lightning_logger(store: Store, run_id: str):
    import time

    from lightning.pytorch.loggers import MLFlowLogger

    class RunLogger(MLFlowLogger):
        """MLFlowLogger bound to our run; the run's final status is set by ``tracked_run``. Once its
        server stops answering it sends nothing more and keeps every metric in ``unsent`` (set by
        :func:`~convcg_cli.tracking.offline.keep_unsent_metrics`), for ``--resume`` to send."""

        unsent: MetricJournal | None = None
        server_gone_at: int | None = None  # the step of the first metrics it could not send

        def log_metrics(self, metrics, step=None) -> None:  # noqa: D102
            if self.server_gone_at is None:
                try:
                    super().log_metrics(metrics, step)
                    return
                except Exception as exc:
                    if self.unsent is None or not server_gone(store, exc):
                        raise
                    self.server_gone_at = step or 0
                    from convcg_cli import progress

                    progress.announce(
                        f"The MLflow tracking server at {store.uri} stopped answering at step {step or 0}: "
                        f"training goes on, its metrics kept in {self.unsent.path}."
                    )
            assert self.unsent is not None
            now, at = int(time.time() * 1000), step or 0
            self.unsent.append(
                UnsentMetric(k, float(v), now, at) for k, v in metrics.items() if not isinstance(v, str)
            )

        @property
        def experiment(self):  # noqa: D102
            with user_variables_kept():  # it calls mlflow.set_tracking_uri, which exports the URI
                return super().experiment

        def finalize(self, status: str = "success") -> None:  # noqa: D102
            return None

    return RunLogger(experiment_name=store.experiment_name, tracking_uri=store.uri, run_id=run_id)


def process_tags() -> dict[str, str]:
    """Host and pid of this process, set on every run it opens, so that a later command on the same
    host can tell a run whose process died (SIGKILL, out of memory, power loss) from a live one."""
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}


def _torch_threads() -> int:
    """torch's intra-op thread count (imported here: training has torch loaded already)."""
    import torch

    return torch.get_num_threads()


def mark_dead_runs(store: Store, experiment_ids: list[str]) -> list[str]:
    """End KILLED, with an ``error`` tag, every RUNNING run opened on this host by a process that is
    gone; returns their ids. Runs of other hosts cannot be checked from here and are left alone."""
    from mlflow.entities import RunStatus

    host = socket.gethostname()
    running = store.client.search_runs(
        experiment_ids, filter_string=f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{host}'"
    )
    dead = [r for r in running if not process_alive(int(r.data.tags.get(PID_TAG, "0") or 0))]
    for run in dead:
        pid = run.data.tags.get(PID_TAG)
        store.client.set_tag(
            run.info.run_id,
            ERROR_TAG,
            f"Its process (pid {pid} on {host}) ended without closing the run (SIGKILL, out of memory "
            "or power loss); marked KILLED by the next convcg command.",
        )
        store.client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.KILLED))
    return [r.info.run_id for r in dead]


def mark_failed(run: TrackedRun, error: str) -> None:
    """Set a finished run to FAILED with the error text as a tag (e.g. its evaluation crashed)."""
    from mlflow.entities import RunStatus

    run.client.set_tag(run.run_id, ERROR_TAG, error[:MAX_PARAM_LENGTH])
    run.client.set_terminated(run.run_id, RunStatus.to_string(RunStatus.FAILED))


def _terminate(run: TrackedRun, exc: BaseException | None) -> None:
    """End a run FINISHED, KILLED (Ctrl-C: Lightning turns it into SystemExit(1)) or FAILED."""
    from mlflow.entities import RunStatus

    if exc is None:
        status = RunStatus.FINISHED
    elif isinstance(exc, (KeyboardInterrupt, SystemExit)):
        status = RunStatus.KILLED
    else:
        status = RunStatus.FAILED
        run.client.set_tag(run.run_id, ERROR_TAG, f"{type(exc).__name__}: {exc}"[:MAX_PARAM_LENGTH])
    run.client.set_terminated(run.run_id, RunStatus.to_string(status))


def _server_gone_error(run: TrackedRun, exc: BaseException) -> ServerGoneError | None:
    """The error to stop with when the run's server is gone (nothing can be told to it: the run stays
    RUNNING, and the next command on this host marks it KILLED, which ``--resume`` takes); None when
    the server answers, or the store is no server."""
    if isinstance(exc, ServerGoneError):
        return exc
    unsent = getattr(run.logger, "unsent", None)
    if getattr(run.logger, "server_gone_at", None) is not None and unsent is not None:
        return ServerGoneError(gone_message(run.store, run.run_id, unsent.path.parent, len(unsent.read())))
    if isinstance(exc, Exception) and server_gone(run.store, exc):
        return ServerGoneError(run_ended_message(run.store, run.run_id, exc))
    return None


@contextmanager
def terminate_with_status(run: TrackedRun) -> Iterator[TrackedRun]:
    """Whatever happens inside, the run ends with the matching status; what it logged stays. When
    the server went away, a :class:`ServerGoneError` names it instead (the status cannot be set)."""
    try:
        yield run
    except BaseException as exc:
        gone = _server_gone_error(run, exc)
        if gone is exc:
            raise
        if gone is not None:
            raise gone from None
        _terminate(run, exc)
        raise
    else:
        _terminate(run, None)


@contextmanager
def open_run(store: Store, run_name: str, tags: Mapping[str, str]) -> Iterator[TrackedRun]:
    """Open a plain run (no Lightning logger) in the store's experiment; close it FINISHED, FAILED
    (an exception escaped, e.g. a benchmark step crashed) or KILLED (Ctrl-C)."""
    run = store.client.create_run(store.experiment_id(), tags={**tags, **process_tags()}, run_name=run_name)
    with terminate_with_status(TrackedRun(store, run.info.run_id)) as tracked:
        yield tracked


@contextmanager
def parent_run(store: Store, run_name: str, tags: Mapping[str, str]) -> Iterator[TrackedRun]:
    """Open a run that groups child runs (``convcg ablate``); close it FINISHED, FAILED or KILLED."""
    with open_run(store, run_name, tags) as run:
        yield run


@contextmanager
def tracked_run(
    store: Store, cfg: DictConfig, choices: Mapping[str, str], overrides: list[str]
) -> Iterator[TrackedRun]:
    """Open a training run with params, tags (``kind=trained``, ``design``, the chosen options, a
    colour per design) and the resolved config; close it with the right status."""
    exp = store.experiment_id()
    tags = {KIND_TAG: TRAINED_KIND, DESIGN_TAG: design(choices), **choice_tags(choices)}
    tags.update({"seed": str(cfg.seed), "mlflow.source.name": "convcg train"})
    tags.update(store.lineage)  # a tune trial's says kind=trial
    tags.update(process_tags())
    tags[THREADS_TAG] = str(_torch_threads())
    tags[RUN_COLOR_TAG] = run_colour(store, exp, DESIGN_TAG, tags[DESIGN_TAG], DESIGN_COLOURS)
    mark_dead_runs(store, [exp])
    run_id = store.client.create_run(exp, tags=tags, run_name=run_name(cfg, choices)).info.run_id
    with terminate_with_status(TrackedRun(store, run_id, _lightning_logger(store, run_id))) as tracked:
        log_params(tracked, run_params(cfg, choices, overrides))
        log_text(tracked, OmegaConf.to_yaml(cfg, resolve=True), CONFIG_ARTIFACT)
        choices_yaml = OmegaConf.to_yaml(OmegaConf.create({"overrides": overrides, "choices": dict(choices)}))
        log_text(tracked, choices_yaml, OVERRIDES_ARTIFACT)
        yield tracked


@contextmanager
def reopened_run(store: Store, run_id: str) -> Iterator[TrackedRun]:
    """Reopen an existing run (a KILLED or FAILED run being resumed, a resumed study's parent) as
    RUNNING in this process; close it with the right status as :func:`tracked_run` does. Its params
    and config stay as logged; the host/pid tags become this process's, a stale error tag goes."""
    from mlflow.entities import RunStatus

    client = store.client
    client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
    for key, value in process_tags().items():
        client.set_tag(run_id, key, value)
    if ERROR_TAG in client.get_run(run_id).data.tags:
        client.delete_tag(run_id, ERROR_TAG)
    with terminate_with_status(TrackedRun(store, run_id, _lightning_logger(store, run_id))) as tracked:
        yield tracked


def resolve_run(store: Store, run: str) -> str:
    """A run id, or for ``latest`` the newest finished run of the experiment that has a checkpoint.

    RunNotFoundError when the store does not exist (it is not created by looking). RUNNING runs of
    dead processes on this host are marked KILLED first (:func:`mark_dead_runs`).
    """
    from mlflow.exceptions import MlflowException

    if not store.exists():  # looking must not create an empty store
        raise RunNotFoundError(
            f"No MLflow store at {store.uri}: nothing was trained here yet (set CONVCG_HOME to the "
            "home you trained in, or MLFLOW_TRACKING_URI to your team's server, or train with "
            "'convcg train')."
        )
    exp = store.find_experiment_id()
    if exp is not None:
        mark_dead_runs(store, [exp])
    if run == "latest":
        runs = (
            []
            if exp is None
            else store.client.search_runs(
                [exp],
                filter_string=f"attributes.status = 'FINISHED' and tags.{CHECKPOINT_TAG} = 'yes'",
                order_by=["attributes.start_time DESC"],
                max_results=1,
            )
        )
        if not runs:
            raise RunNotFoundError(
                f"No finished run with a checkpoint in {store.where()}; train one with 'convcg train'."
            )
        return runs[0].info.run_id
    try:
        info = store.client.get_run(run)
    except MlflowException:
        raise RunNotFoundError(
            f"Run '{run}' was not found in {store.where()}. Pass a run id shown by 'convcg train' or the "
            "MLflow UI, or --run latest."
        ) from None
    if info.data.tags.get(CHECKPOINT_TAG) != "yes":
        raise RunNotFoundError(
            f"Run '{run}' in {store.where()} has no checkpoint (status {info.info.status}); it cannot be "
            "evaluated."
        )
    return run


def check_resumable(store: Store, run_id: str) -> None:
    """RunNotFoundError unless the run exists and ended KILLED or FAILED (RUNNING runs of dead
    processes on this host are marked KILLED first, so a run is never resumed twice at once)."""
    from mlflow.exceptions import MlflowException

    try:
        info = store.client.get_run(run_id).info
    except MlflowException:
        raise RunNotFoundError(f"Run '{run_id}' was not found at {store.uri}.") from None
    if info.status == "RUNNING":
        mark_dead_runs(store, [info.experiment_id])
        info = store.client.get_run(run_id).info
    if info.status not in RESUMABLE:
        raise RunNotFoundError(
            f"Run {run_id} is {info.status}; only a {' or '.join(RESUMABLE)} run can be resumed"
            + (" (it is still open in a live process)." if info.status == "RUNNING" else ".")
        )


def run_info(store: Store, run_id: str):
    """MLflow's record of the run (info, params, tags, metrics)."""
    return store.client.get_run(run_id)


def child_runs(store: Store, parent_run_id: str) -> list:
    """Every run nested under ``parent_run_id``, oldest first (FAILED ones included)."""
    exp = store.find_experiment_id()
    if exp is None:
        return []
    return store.client.search_runs(
        [exp],
        filter_string=f"tags.`{PARENT_RUN_TAG}` = '{parent_run_id}'",
        order_by=["attributes.start_time ASC"],
    )


# --- baseline runs: untrained rankings scored once per (data, split, options) --------------------

BASELINE_TAG = "baseline"  # which baseline (popularity, itemcf, ...)
BASELINE_KEY_TAG = "baseline_key"  # digest of everything the baseline's scores depend on


def find_baseline_run(store: Store, key: str) -> str | None:
    """The newest FINISHED baseline run tagged ``baseline_key=key``, or None."""
    runs = store.client.search_runs(
        [store.experiment_id()],
        filter_string=f"attributes.status = 'FINISHED' and tags.{KIND_TAG} = '{BASELINE_KIND}' "
        f"and tags.{BASELINE_KEY_TAG} = '{key}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def baseline_run(store: Store, name: str, key: str, data_name: str, split: str, tags: Mapping[str, str]):
    """Open a run ``baseline_<name> · <data_name> · <split>`` (tags ``kind=baseline``, ``baseline``,
    ``baseline_key``, a grey per baseline), closed FINISHED, FAILED or KILLED as :func:`open_run` does."""
    all_tags = {"mlflow.source.name": "convcg eval", "split": split, **tags}
    all_tags.update({KIND_TAG: BASELINE_KIND, BASELINE_TAG: name, BASELINE_KEY_TAG: key})
    all_tags[RUN_COLOR_TAG] = run_colour(store, store.experiment_id(), BASELINE_TAG, name, BASELINE_COLOURS)
    return open_run(store, f"baseline_{name} · {data_name} · {split}", all_tags)
