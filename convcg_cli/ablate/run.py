"""``run_ablation``: train and evaluate every (variant, seed, fold) of a grid under one parent run.

Everything runs under ONE MLflow parent run; each cell is a child run (tag ``mlflow.parentRunId``)
trained by :func:`convcg_cli.train.train` and scored by :func:`convcg_cli.evaluate.evaluate`. A failing
child is recorded as FAILED and the grid goes on. The report is rewritten after every cell.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from omegaconf import open_dict

from convcg_cli import progress, tracking, workdir
from convcg_cli.ablate.figure import FIGURE_FILE, plot_recall
from convcg_cli.ablate.grid import (
    FAILED,
    FINISHED,
    SUMMARY_FILE,
    ChildResult,
    Grid,
    Variant,
    fold_overrides,
    grid_yaml,
    reproduce_command,
    source_commit,
)
from convcg_cli.ablate.refit import WindowChoice, choice_candidates, window_choices
from convcg_cli.ablate.report import render_report, summary_json
from convcg_cli.ablate.summary import TASKS, Pairing, Row, Summary, build_summary, selection_metric
from convcg_cli.config import compose
from convcg_cli.errors import ConfigError, RunInterruptedError
from convcg_cli.kept_checkpoint import kept_figures
from convcg_cli.metrics.retrieval import VAL, metric_name
from convcg_cli.progress import cell_line

GRID_SHA_TAG = "grid_sha256"  # on an ablation's parent run: its grid file's hash ...
COMMIT_TAG = "git_commit"  # ... and the convcg commit that ran it (the report prints both)
REPORT_FILE = "report.md"
REPORT_ARTIFACT_DIR = "report"
# Train overrides that also apply to the evaluation config (both configs share these groups).
_SHARED_GROUPS = ("paths", "logger")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Cell:
    """One training of the grid: a variant, a seed and a rolling-origin fold."""

    variant: Variant
    seed: int
    fold: int = 0

    @property
    def run_name(self) -> str:
        """The child run's name, e.g. ``unified_parallel/seed=0`` or ``.../seed=0/fold=1``."""
        return f"{self.variant.name}/seed={self.seed}" + (f"/fold={self.fold}" if self.fold else "")


@dataclass(frozen=True)
class AblationResult:
    """What ``convcg ablate`` produced."""

    parent_run_id: str
    report_dir: Path
    children: list[ChildResult]
    summary: Summary

    @property
    def rows(self) -> list[Row]:
        """The report's rows of fold 0 (the grid as configured)."""
        return self.summary.rows[0]

    @property
    def n_failed(self) -> int:
        """Children that did not finish training and evaluation."""
        return sum(c.status != FINISHED for c in self.children)


def cells(grid: Grid) -> Iterator[Cell]:
    """Every cell, fold-major then seed-major: fold 0 first, and after one seed every variant has a
    first result."""
    for fold in range(grid.folds):
        for seed in grid.seeds:
            for variant in grid.variants:
                yield Cell(variant, seed, fold)


def child_overrides(
    cell: Cell, train_overrides: Sequence[str], heldout_days: int, chosen: Sequence[str] = ()
) -> list[str]:
    """The train overrides of one cell: the variant's, the command line's, what a refit cell takes
    from the other grid's same window (``chosen``), the fold's, the seed."""
    return [
        *cell.variant.overrides,
        *train_overrides,
        *chosen,
        *fold_overrides(cell.fold, heldout_days),
        f"seed={cell.seed}",
    ]


def _child_config(
    grid: Grid,
    cell: Cell,
    train_overrides: Sequence[str],
    heldout_days: int,
    parent: str,
    chosen: WindowChoice | None = None,
):
    extra = chosen.train_overrides if chosen is not None else ()
    composed = compose("train", child_overrides(cell, train_overrides, heldout_days, extra))
    with open_dict(composed.cfg):
        composed.cfg.logger.parent_run_id = parent
        composed.cfg.logger.run_name = cell.run_name
        composed.cfg.logger.run_tags = {
            "ablation": grid.name,
            "variant": cell.variant.name,
            "fold": cell.fold,
            tracking.DESIGN_TAG: cell.variant.name,  # the UI colours runs by design
        }
    return composed


def _preflight(grid: Grid, train_overrides: Sequence[str]) -> dict[str, int]:
    """Compose and check every variant's config of every fold before any run exists, so a typo in the
    grid fails at once; returns each variant's ``data.heldout_days`` (the fold length)."""
    from convcg_cli.train import check_served_embedding_is_trained

    heldout_days: dict[str, int] = {}
    for variant in grid.variants:
        cfg = compose("train", child_overrides(Cell(variant, grid.seeds[0]), train_overrides, 1)).cfg
        check_served_embedding_is_trained(cfg)
        if grid.select_k not in list(cfg.val_ks):
            raise ConfigError(
                f"Grid '{grid.name}' selects on {selection_metric(grid)}, but variant {variant.name} "
                f"validates at val_ks={list(cfg.val_ks)}; set select.k to one of them."
            )
        heldout_days[variant.name] = int(cfg.data.heldout_days)
        for fold in range(1, grid.folds):
            compose(
                "train",
                child_overrides(
                    Cell(variant, grid.seeds[0], fold), train_overrides, heldout_days[variant.name]
                ),
            )
    return heldout_days


class ReportWriter:
    """Writes ``report.md`` and ``summary.json`` of the cells done so far; keeps the paired
    comparisons already computed, since the report is rewritten after every cell."""

    def __init__(self, grid: Grid, eval_cfg, out: Path, context: dict) -> None:
        self.grid, self.out, self.context = grid, out, context
        self.split, self.ks = str(eval_cfg.split), [int(k) for k in eval_cfg.ks]
        self.candidates = choice_candidates(eval_cfg)
        boot = eval_cfg.bootstrap
        self.pairing = Pairing(int(boot.n_boot), int(boot.seed), float(boot.level))
        self._paired_cache: dict = {}

    def write(self, children: list[ChildResult]) -> Summary:
        """Summarise ``children`` into the report files; returns the summary."""
        self.context["data_dirs"] = sorted({c.data_dir for c in children if c.data_dir})
        summary = build_summary(self.grid, children, self.split, self.ks, self.pairing, self._paired_cache)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / REPORT_FILE).write_text(render_report(self.grid, summary, self.context))
        data = summary_json(
            self.grid, summary, self.split, self.candidates, self.context.get("refit_choices")
        )
        (self.out / SUMMARY_FILE).write_text(json.dumps(data, indent=2))
        return summary


def run_ablation(
    grid: Grid,
    train_overrides: Sequence[str] = (),
    patterns: Sequence[str] | None = None,
    train_fn: Callable | None = None,
    evaluate_fn: Callable | None = None,
    launcher_overrides: Sequence[str] = (),
    reuse_data: bool = True,
) -> AblationResult:
    """Train and evaluate every cell of ``grid`` under one parent run, then report.

    Args:
        grid: the grid (see :func:`.grid.load_grid`, :func:`.grid.select`).
        train_overrides: appended to every variant's overrides (e.g. ``data.dir=...``); ``paths.`` and
            ``logger.`` ones also apply to evaluation.
        patterns: the ``--variants`` globs used to select the grid (only for the reproduce command).
        train_fn, evaluate_fn: ``train(composed)`` and ``evaluate(composed, run_id, baseline_cache)``;
            default :func:`convcg_cli.train.train` and :func:`convcg_cli.evaluate.evaluate`.
        launcher_overrides: Hydra overrides choosing a launcher (``hydra/launcher=joblib``,
            ``hydra.launcher.n_jobs=2``): the cells then run as the jobs of a Hydra multirun
            (:func:`_launch_cells`) and the report is built from their runs once all are done.
        reuse_data: the default trainings and evaluations share one
            :class:`~convcg_cli.data.loading.prepared.PreparedDataCache`: cells (and a cell's evaluation)
            whose data and data options are identical set the data up once; False sets them up
            for every training and every evaluation (the figures are the same either way).

    Every config is composed and checked before the parent run is created, so a typo in the grid
    fails at once and leaves no half-run grid behind.
    Slightly over 60 lines: preflight, the parent run and the per-cell loop with its report rewrite
    share the run's state; the per-cell work itself is ``_run_child``.
    """
    from convcg_cli.data.loading import PreparedDataCache  # imports lightning: not at module import
    from convcg_cli.evaluate import evaluate
    from convcg_cli.train import train

    data_cache = PreparedDataCache() if reuse_data else None
    train_fn = train_fn or functools.partial(train, data_cache=data_cache)
    evaluate_fn = evaluate_fn or functools.partial(evaluate, data_cache=data_cache)
    train_overrides = list(train_overrides)
    shared = [o for o in train_overrides if o.lstrip("+~").split(".")[0].split("=")[0] in _SHARED_GROUPS]
    eval_composed = compose("eval", [*grid.eval_overrides, *shared])
    heldout_days = _preflight(grid, train_overrides)
    choices = _refit_choices(grid, eval_composed.cfg)  # before any run: refused without them
    cell_evals = _cell_eval_configs([*grid.eval_overrides, *shared], choices)

    store = tracking.Store.from_config(eval_composed.cfg.logger)
    report_dir = Path(eval_composed.cfg.paths.root_dir) / "reports" / grid.name
    command = reproduce_command(grid, train_overrides, patterns)
    tags = {"mlflow.source.name": "convcg ablate", "ablation": grid.name, "command": command[:500]}
    tags[tracking.KIND_TAG] = tracking.GRID_KIND
    tags.update({GRID_SHA_TAG: grid.sha256 or "unknown", COMMIT_TAG: source_commit()})
    children: list[ChildResult] = []
    baseline_cache: dict = {}
    with tracking.parent_run(store, f"ablate/{grid.name}", tags) as parent:
        tracking.log_text(parent, grid_yaml(grid, train_overrides), "config/grid.yaml")
        context = {
            "command": command,
            "parent_run_id": parent.run_id,
            "tracking_uri": store.uri,
            "split": str(eval_composed.cfg.split),
            "grid_sha256": tags[GRID_SHA_TAG],
            "commit": tags[COMMIT_TAG],
            **({"refit_choices": choices} if grid.refit_of else {}),
        }
        writer = ReportWriter(grid, eval_composed.cfg, report_dir, context)
        summary = writer.write(children)
        jobs = [
            (
                cell,
                _child_config(
                    grid,
                    cell,
                    train_overrides,
                    heldout_days[cell.variant.name],
                    parent.run_id,
                    choices.get((cell.fold, cell.seed)),
                ),
                cell_evals.get((cell.fold, cell.seed), eval_composed),
            )
            for cell in cells(grid)
        ]
        if launcher_overrides:
            paths = [o for o in shared if o.lstrip("+~").startswith("paths")]
            shared_dir = _prepared_data_dir(eval_composed.cfg, parent.run_id) if reuse_data else None
            _launch_cells(grid, jobs, [*paths, *launcher_overrides], shared_dir)
            children = _children_from_runs(store, grid, eval_composed.cfg, parent.run_id)
            summary = writer.write(children)
        else:
            start = time.perf_counter()
            for index, (cell, composed, cell_eval) in enumerate(jobs, 1):
                progress.announce(cell_line(index, len(jobs), cell.run_name, time.perf_counter() - start))
                children.append(
                    _run_child(grid, cell, composed, cell_eval, train_fn, evaluate_fn, baseline_cache)
                )
                _mark_lost_run(store, parent.run_id, children[-1])
                summary = writer.write(children)  # a long grid that is stopped still leaves a report
        plot_recall(summary.rows[0], writer.ks, report_dir / FIGURE_FILE)
        files = [report_dir / name for name in (REPORT_FILE, FIGURE_FILE, SUMMARY_FILE)]
        for path in files:
            tracking.log_file(parent, path, REPORT_ARTIFACT_DIR)
        n_failed = sum(c.status != FINISHED for c in children)
        tracking.set_tags(parent, {"failed_children": str(n_failed)})
    return AblationResult(parent.run_id, report_dir, children, summary)


def rewrite_report(grid: Grid, parent_run_id: str, train_overrides: Sequence[str] = ()) -> AblationResult:
    """Write ``reports/<GRID>/`` again from a finished grid's MLflow runs, training nothing.

    Each child's figures, per-positive hits and kept-checkpoint validation figure are read back from
    its run, so a report (e.g. after the report format changed, or from a grid stopped midway)
    matches what the grid would have written; the parent run's command is kept.
    """
    shared = [o for o in train_overrides if o.lstrip("+~").split(".")[0].split("=")[0] in _SHARED_GROUPS]
    eval_cfg = compose("eval", [*grid.eval_overrides, *shared]).cfg
    store, split = tracking.Store.from_config(eval_cfg.logger), str(eval_cfg.split)
    children = _children_from_runs(store, grid, eval_cfg, parent_run_id)
    parent = tracking.run_info(store, parent_run_id)
    context = {
        "command": parent.data.tags.get("command", ""),
        "parent_run_id": parent_run_id,
        "tracking_uri": store.uri,
        "split": split,
        "grid_sha256": parent.data.tags.get(GRID_SHA_TAG, "not recorded"),
        "commit": parent.data.tags.get(COMMIT_TAG, "not recorded"),
    }
    if grid.refit_of:
        try:
            context["refit_choices"] = _refit_choices(grid, eval_cfg)
        except ConfigError as exc:
            context["refit_note"] = f"Not available when this report was written: {exc}"
    report_dir = Path(eval_cfg.paths.root_dir) / "reports" / grid.name
    summary = ReportWriter(grid, eval_cfg, report_dir, context).write(children)
    plot_recall(summary.rows[0], [int(k) for k in eval_cfg.ks], report_dir / FIGURE_FILE)
    return AblationResult(parent_run_id, report_dir, children, summary)


def _refit_choices(grid: Grid, eval_cfg) -> dict[tuple[int, int], WindowChoice]:
    """A refit grid's per-(fold, seed) choices, taken from its ``refit_of`` grid's same window
    (``reports/<refit_of>/summary.json`` under ``paths.root_dir``); none for other grids."""
    if not grid.refit_of:
        return {}
    return window_choices(grid, eval_cfg, Path(eval_cfg.paths.root_dir) / "reports")


def _cell_eval_configs(overrides: Sequence[str], choices: dict[tuple[int, int], WindowChoice]) -> dict:
    """The evaluation config of each refit cell by (fold, seed): the grid's ``overrides`` and its
    window's choices (composed before any run, so a bad value fails at once); other grids' cells
    share the grid's one."""
    return {key: compose("eval", [*overrides, *c.eval_overrides]) for key, c in choices.items()}


def _children_from_runs(store: tracking.Store, grid: Grid, eval_cfg, parent_run_id: str) -> list[ChildResult]:
    """Each child run's figures, per-positive hits and kept-checkpoint validation figure, read back
    from MLflow, in the grid's cell order (a parallel launcher finishes them in any order)."""
    with workdir.command_dir("ablate") as downloads:  # what is read back lives in memory after
        return _read_children(store, grid, eval_cfg, parent_run_id, downloads)


def _read_children(
    store: tracking.Store, grid: Grid, eval_cfg, parent_run_id: str, downloads: Path
) -> list[ChildResult]:
    """:func:`_children_from_runs`, downloading the runs' artifacts under ``downloads``."""
    from convcg_cli.evaluate import HITS_FILE, load_hits

    split = str(eval_cfg.split)
    children = []
    for run in tracking.child_runs(store, parent_run_id):
        tags, run_id = run.data.tags, run.info.run_id
        name, seed, fold = tags.get("variant"), int(tags.get("seed", 0)), int(tags.get("fold", 0))
        if run.info.status != FINISHED or f"{split}/conversion/recall_at_100" not in run.data.metrics:
            children.append(
                ChildResult(name, seed, run_id, FAILED, error=tags.get(tracking.ERROR_TAG), fold=fold)
            )
            continue
        train_cfg = tracking.load_run_config(store, run_id, downloads)
        # The full figures (baselines', CIs under their own names) are the eval metrics artifact;
        # the run's own MLflow metrics hold the model's headline ones.
        metrics = dict(run.data.metrics)
        metrics.update(
            tracking.read_json_artifact(store, run_id, f"eval/{split}_metrics.json", downloads) or {}
        )
        metrics.update(cell_kept_figures(store, grid, train_cfg, run_id))
        hits_path = tracking.download_artifact(
            store, run_id, f"eval/{HITS_FILE.format(split=split)}", downloads
        )
        hits = load_hits(hits_path).get(grid.select_task)
        data_dir = str(train_cfg.data.dir)
        children.append(
            ChildResult(name, seed, run_id, FINISHED, metrics, data_dir=data_dir, fold=fold, hits=hits)
        )
    order = {(c.variant.name, c.seed, c.fold): i for i, c in enumerate(cells(grid))}
    return sorted(children, key=lambda c: order.get((c.variant, c.seed, c.fold), len(order)))


def _prepared_data_dir(eval_cfg, parent_run_id: str) -> Path:
    """Where a launched grid's jobs share their set-up data: ``outputs/ablate/<parent run>/data``
    (a grid's own, removed when it ends, so no state outlives the code and data that made it)."""
    return Path(eval_cfg.paths.output_dir) / "ablate" / parent_run_id / "data"


def _launch_cells(grid: Grid, jobs: list, launcher_overrides: Sequence[str], shared_dir: Path | None) -> None:
    """Run the cells as the jobs of one Hydra multirun (``conf/ablate_cell.yaml``, ``cell=0,...,N-1``)
    on the launcher ``launcher_overrides`` choose: joblib uses local cores, submitit a SLURM cluster,
    Ray a Ray cluster. Each job trains and evaluates its cell under the parent run; a failed cell is
    recorded in its run and does not stop the others. With ``shared_dir`` the jobs share their set-up
    data there (a job on another host without that file system just sets its data up itself)."""
    from convcg_cli import hydra_cli
    from convcg_cli.data.loading import PreparedDataCache
    from convcg_cli.evaluate import evaluate
    from convcg_cli.train import train

    baseline_cache: dict = {}  # shared by the jobs the basic launcher runs in this process
    data_cache = PreparedDataCache(shared_dir) if shared_dir is not None else None
    train_fn = functools.partial(train, data_cache=data_cache)
    evaluate_fn = functools.partial(evaluate, data_cache=data_cache)

    def run_cell(composed) -> None:
        cell, child, cell_eval = jobs[int(composed.cfg.cell)]
        _run_child(grid, cell, child, cell_eval, train_fn, evaluate_fn, baseline_cache)

    sweep = ["-m", f"cell={','.join(str(i) for i in range(len(jobs)))}", *launcher_overrides]
    try:
        hydra_cli.run("ablate_cell", ["convcg", "ablate", grid.name], sweep, run_cell)
    finally:
        if shared_dir is not None:
            shutil.rmtree(shared_dir, ignore_errors=True)


def cell_kept_figures(store: tracking.Store, grid: Grid, cfg, run_id: str) -> dict[str, float]:
    """A cell's figures at the checkpoint its run kept (:func:`kept_figures`): the validation recalls
    it logs every epoch (``val_ks``, every task), the grid's selection figure, the kept epoch; the
    same whether the grid just ran the cell or its report is written again from the runs."""
    names = [metric_name(VAL, task, int(k)) for task in TASKS for k in cfg.val_ks]
    return kept_figures(store, cfg, run_id, list(dict.fromkeys([*names, selection_metric(grid)])))


def _run_child(grid: Grid, cell: Cell, composed, eval_composed, train_fn, evaluate_fn, cache) -> ChildResult:
    """Train and evaluate one cell; any error is recorded, not raised (Ctrl-C still stops the grid)."""
    store = tracking.Store.from_config(eval_composed.cfg.logger)
    run_id, data_dir = None, str(composed.cfg.data.dir)
    name, seed, fold = cell.variant.name, cell.seed, cell.fold
    try:
        run_id = train_fn(composed).run_id
        result = evaluate_fn(eval_composed, run_id, baseline_cache=cache)
        metrics = dict(result.metrics)
        metrics.update(cell_kept_figures(store, grid, composed.cfg, run_id))
        hits = result.hits.get(grid.select_task)
        return ChildResult(name, seed, run_id, FINISHED, metrics, data_dir=data_dir, fold=fold, hits=hits)
    except RunInterruptedError:  # Ctrl-C / SIGTERM in a cell's training or evaluation: the grid stops
        raise
    except Exception as exc:  # one bad cell must not stop the grid
        error = f"{type(exc).__name__}: {exc}"
        # The traceback goes to stderr for debugging; the report and the run get the one-line error.
        log.warning("ablation cell %s failed, continuing", cell.run_name, exc_info=True)
        if run_id is not None:  # training finished, evaluation failed: the cell failed
            tracking.mark_failed(tracking.existing_run(store, run_id), error)
        return ChildResult(name, seed, run_id, FAILED, error=error, data_dir=data_dir, fold=fold)


def _mark_lost_run(store: tracking.Store, parent_run_id: str, child: ChildResult) -> None:
    """A child whose training raised has a FAILED run but no id in hand: find it by its tags."""
    if child.status == FINISHED or child.run_id is not None:
        return
    for run in reversed(tracking.child_runs(store, parent_run_id)):
        tags = run.data.tags
        if (tags.get("variant"), tags.get("seed"), tags.get("fold", "0")) == (
            child.variant,
            str(child.seed),
            str(child.fold),
        ):
            child.run_id = run.info.run_id
            return
