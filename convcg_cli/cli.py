"""The ``convcg`` command line: parses, composes a config, calls a plain function. No ML logic here.

Heavy libraries (torch, lightning, mlflow, polars) are imported inside the commands so that
``convcg --help`` answers at once.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from convcg_cli.errors import ConfigError, user_errors

app = typer.Typer(
    help="Train and evaluate conversion-optimised two-tower candidate generators.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Make and check log tables in the data_schemas/ contract.", no_args_is_help=True)
app.add_typer(data_app, name="data")

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


@app.callback()
def main_options(
    config_dir: Path = typer.Option(
        None,
        "--config-dir",
        help="A directory of your own config groups searched beside the shipped conf/ (e.g. "
        "DIR/experiment/mine.yaml for +experiment=mine), for every command; or set CONVCG_CONFIG_DIR.",
    ),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="No progress display, no step lines."),
    verbose: bool = typer.Option(False, "-v", "--verbose", help="Also print each long step with its time."),
) -> None:
    """Options shared by every command."""
    from convcg_cli import progress

    progress.set_verbosity(quiet, verbose)
    if config_dir is not None:
        import os

        os.environ["CONVCG_CONFIG_DIR"] = str(config_dir.expanduser().resolve())


OVERRIDES_HELP = (
    "Hydra overrides, e.g. +experiment=unified_parallel trainer.max_epochs=2 loss.task_weights.engagement=0.3"
)


@data_app.command("synth")
def data_synth(
    out_dir: Path = typer.Option(
        ..., "--out", help="Directory to write the tables into (replaced atomically)."
    ),
    preset: str = typer.Option(
        "small",
        help=(
            "Size preset: tiny (tests), small (demo), large (benchmarks), sparse_shop (a shop's "
            "purchase log: purchases and views, sessions as users, 120k items)."
        ),
    ),
    seed: int = typer.Option(0, help="Random seed; the same seed gives the same tables."),
    delays: bool = typer.Option(
        False, "--delays", help="Also conversion events (delayed, valued), attributed to the impressions."
    ),
    content_vectors: bool = typer.Option(
        False,
        "--content-vectors",
        help="Also item content vectors (content_emb) and new items released in the last 2 (held-out) days.",
    ),
) -> None:
    """Generate synthetic impression logs (items, users, impressions) with a planted structure."""
    with user_errors():
        from convcg_cli.data.importing import synth

        if preset not in synth.PRESETS:
            raise ConfigError(f"Unknown preset '{preset}'; choose one of {sorted(synth.PRESETS)}.")
        tables = synth.synthesize(
            preset, out_dir, seed=seed, conversion_events=delays, content_vectors=content_vectors
        )
        imp = tables["impressions"]
        out.print(
            f"Wrote {out_dir}: {tables['items'].height:,} items, {tables['users'].height:,} users, "
            f"{imp.height:,} impressions, {int(imp['clicked'].sum()):,} clicks, "
            f"{int(imp['converted'].sum()):,} conversions."
        )


@data_app.command("validate")
def data_validate(directory: Path = typer.Argument(..., help="Directory holding the log tables.")) -> None:
    """Check the tables in DIRECTORY against data_schemas/ and report every violation."""
    with user_errors():
        from convcg_cli.data.contract import load_tables

        tables = load_tables(directory)
        rows = ", ".join(f"{name}: {frame.height:,} rows" for name, frame in tables.items())
        out.print(f"{directory}: all tables valid ({rows}).")


@data_app.command("import")
def data_import(
    source: str = typer.Option(
        ..., "--source", help="Importer mapping: conf/importer/NAME.yaml (e.g. kuairand) or a .yaml path."
    ),
    in_dir: Path = typer.Option(..., "--in", help="Directory holding the source log set (read only)."),
    out_dir: Path = typer.Option(
        ..., "--out", help="Directory to write the tables into (replaced atomically)."
    ),
) -> None:
    """Import a real log set into the data_schemas/ contract, as the importer mapping says."""
    with user_errors():
        from rich.markup import escape

        from convcg_cli.data.importing import import_logs, load_mapping

        report = import_logs(load_mapping(source), in_dir, out_dir)
        for line in report.summary():
            out.print(line, markup=False, highlight=False)
        for warning in report.warnings:
            err.print(f"[yellow]Warning:[/yellow] {escape(warning)}", highlight=False)


@data_app.command("attribute")
def data_attribute(
    in_dir: Path = typer.Option(..., "--in", help="Data directory with a conversions table (read only)."),
    out_dir: Path = typer.Option(..., "--out", help="Directory to write the attributed tables into."),
    click_window_days: float = typer.Option(7.0, help="Credit the last click up to this many days before."),
    view_window_days: float = typer.Option(1.0, help="Else the last view up to this many days (0 = off)."),
) -> None:
    """Attribute conversion events to impressions: writes converted, conversion_value, delay."""
    with user_errors():
        from convcg_cli.data.importing import AttributionRule, attribute_dir

        result = attribute_dir(in_dir, out_dir, AttributionRule(click_window_days, view_window_days))
        for line in result.summary():
            out.print(line, markup=False, highlight=False)
        out.print(f"Wrote {out_dir} (the rule and its counts are in its synth.json).", markup=False)


# train/eval hand every argument they do not declare to Hydra's command line (convcg_cli.hydra_cli),
# --help included: Hydra's help lists the config groups and their options.
HYDRA_COMMAND = {"allow_extra_args": True, "ignore_unknown_options": True}


@app.command(context_settings=HYDRA_COMMAND, add_help_option=False)
def train(
    ctx: typer.Context,
    resume: str = typer.Option(
        None,
        "--resume",
        help="Continue this KILLED or FAILED run from its last finished epoch, with its saved config "
        "(no overrides), in the same MLflow run; or finish a run whose tracking server went away "
        "(its kept metrics sent, its artifacts uploaded).",
    ),
) -> None:
    """Train a model from conf/train.yaml plus Hydra overrides (-m sweeps, --cfg job, ...; see --help).

    SIGINT/SIGTERM end the run KILLED (exit 130/143) keeping its last finished epoch; continue it
    with --resume RUN_ID.
    """
    with user_errors():
        if resume:
            _resume_job(resume, ctx.args)
            return
        from convcg_cli import hydra_cli

        hydra_cli.run("train", [_prog(), "train"], ctx.args, _train_job)


def _resume_job(run_id: str, args: list[str]) -> None:
    """``--resume RUN_ID``: the run's own saved config, no overrides, no sweep."""
    from convcg_cli import tracking
    from convcg_cli.config import compose
    from convcg_cli.train import resume as resume_training

    if args:
        raise ConfigError(
            f"--resume continues run {run_id} with its own saved config; overrides {args} "
            "would make it another run. Drop them, or start a new run without --resume."
        )
    tracking.quiet()
    composed = compose("train", [])
    result = resume_training(composed, run_id)
    _report_training(result, composed)


def _report_training(result, composed) -> None:
    """Print a finished training's validation table, run id and how to open the UI (rank 0 only)."""
    from convcg_cli import tracking

    if not tracking.is_global_zero():  # DDP ranks > 0: rank 0 reports the one run
        return
    if result.metrics:
        _print_metrics(f"Validation (last epoch) of run {result.run_id}", result.metrics)
    else:  # a refit (data.train_through_val) or limit_val_batches=0: no validation ran
        out.print(f"Run {result.run_id} ran no validation; it keeps its last epoch's weights.")
    out.print(f"MLflow run id: [bold]{result.run_id}[/bold]")
    out.print(f"Open the MLflow UI: {ui_command(composed.cfg.logger.tracking_uri)}", highlight=False)


def ui_command(tracking_uri: str) -> str:
    """How to open the MLflow UI on ``tracking_uri``: a server's own address, or for a local store
    the ``mlflow ui`` command of this installation (``resources.mlflow_command``), so it runs from
    any folder (``tracking.ui_hint``)."""
    from convcg_cli.tracking.ui import ui_hint

    return ui_hint(tracking_uri)


def _store(overrides: list[str] | None):
    """The MLflow store (``logger`` of conf/eval.yaml plus ``overrides``) a serving command works on."""
    from convcg_cli import tracking
    from convcg_cli.config import compose

    tracking.quiet()
    return tracking.Store.from_config(compose("eval", overrides).cfg.logger)


def _train_job(composed) -> None:
    """One training job: train, print its validation table and run id."""
    from convcg_cli import tracking
    from convcg_cli.train import train as run_training

    tracking.quiet()
    result = run_training(composed)
    _report_training(result, composed)


@app.command("eval", context_settings=HYDRA_COMMAND, add_help_option=False)
def eval_(
    ctx: typer.Context,
    run: str = typer.Option("latest", "--run", help="MLflow run id to evaluate, or 'latest'."),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as one JSON object."),
) -> None:
    """Evaluate a trained run on held-out logs plus Hydra overrides of conf/eval.yaml (see --help)."""
    with user_errors():
        from convcg_cli import hydra_cli

        command = [_prog(), "eval", "--run", run, *(["--json"] if as_json else [])]
        hydra_cli.run("eval", command, ctx.args, lambda composed: _eval_job(composed, run, as_json))


def _eval_job(composed, run: str, as_json: bool) -> None:
    """One evaluation job: evaluate ``run`` and print its metrics (a table, or JSON)."""
    from convcg_cli import tracking
    from convcg_cli.evaluate import evaluate

    tracking.quiet()
    result = evaluate(composed, run)
    if as_json:
        print(json.dumps({"run_id": result.run_id, **result.metrics}, sort_keys=True))
        return
    _print_metrics(f"{result.split} evaluation of run {result.run_id}", result.metrics)
    for line in chosen_lines(result.metrics):
        out.print(line, highlight=False)
    out.print(f"Open the MLflow UI: {ui_command(composed.cfg.logger.tracking_uri)}", highlight=False)


def _prog() -> str:
    """The command that started this process (what Lightning's DDP launcher re-executes)."""
    import sys

    return sys.argv[0]


@app.command(context_settings={"ignore_unknown_options": True})
def tune(
    search: str = typer.Argument(..., help="Search to run: conf/hparams_search/SEARCH.yaml, e.g. smoke."),
    overrides: list[str] = typer.Argument(
        None, help="Train overrides for every trial, e.g. data.dir=data/synthetic-small trainer.max_epochs=3"
    ),
    study: str = typer.Option(
        None, "--study", help="Study name (default: SEARCH); the same name resumes it."
    ),
    n_trials: int = typer.Option(
        None, "--n-trials", help="Finished trials the study should end with (default: the search's)."
    ),
) -> None:
    """Tune train overrides with Optuna on a validation metric; write the best as an experiment file."""
    with user_errors():
        from convcg_cli import tracking
        from convcg_cli import tune as tuning

        tracking.quiet()
        result = tuning.run_tune(tuning.load_search(search), overrides or [], study, n_trials)
        out.print(f"Study '{result.study_name}' ({result.storage}): {result.n_trials} trials finished.")
        out.print(f"MLflow parent run id: [bold]{result.parent_run_id}[/bold]")
        if result.experiment_file is None:
            err.print("[bold red]No trial finished[/bold red]: no experiment file written.")
            raise typer.Exit(1)
        out.print(f"Best validation value: {result.best_value:.4f}; experiment: {result.experiment_file}")
        out.print(f"Train it: {result.train_command}", markup=False, highlight=False)


LOGGER_OVERRIDES_HELP = "Overrides of conf/eval.yaml's logger/paths, e.g. logger.tracking_uri=sqlite:///x.db"


@app.command(context_settings={"ignore_unknown_options": True})
def export(
    run: str = typer.Option("latest", "--run", help="MLflow run id to export, or 'latest'."),
    index: str = typer.Option(None, "--index", help="exact or ivf (default: the run's serve.index)."),
    nlist: int = typer.Option(None, "--nlist", help="IVF cells (default: the run's serve.nlist)."),
    nprobe: int = typer.Option(None, "--nprobe", help="IVF cells probed per query (serve.nprobe)."),
    max_k: int = typer.Option(None, "--max-k", help="Most candidates one request may ask for (serve.max_k)."),
    max_rows: int = typer.Option(None, "--max-rows", help="Most requests in one call (serve.max_rows)."),
    overrides: list[str] = typer.Argument(None, help=LOGGER_OVERRIDES_HELP),
) -> None:
    """Log a trained run's servable MLflow model (runs:/ID/model); convcg train does it for new runs."""
    with user_errors():
        from convcg_cli.serve.export import export_run

        store = _store(overrides)
        options = {"index": index, "nlist": nlist, "nprobe": nprobe, "max_k": max_k, "max_rows": max_rows}
        result = export_run(store, run, options)
        for name, value in result.overlap.items():
            out.print(f"{name}: {value:.4f}")
        out.print(f"Logged model: [bold]{result.model_uri}[/bold] (index: {result.index})")


@app.command(context_settings={"ignore_unknown_options": True})
def register(
    run: str = typer.Option(..., "--run", help="MLflow run id whose model (runs:/ID/model) to register."),
    name: str = typer.Option(..., "--name", help="Registered model name, e.g. convcg-candidates."),
    alias: str = typer.Option(None, "--alias", help="Point this alias (e.g. champion) at the new version."),
    overrides: list[str] = typer.Argument(None, help=LOGGER_OVERRIDES_HELP),
) -> None:
    """Register a run's model as a new version of NAME in the MLflow model registry."""
    with user_errors():
        from convcg_cli import tracking
        from convcg_cli.serve.export import register as register_model

        store = _store(overrides)
        version = register_model(store, f"runs:/{run}/{tracking.SERVED_MODEL_NAME}", name, alias)
        target = f"models:/{name}@{alias}" if alias else f"models:/{name}/{version}"
        out.print(f"Registered {name} version {version}: [bold]{target}[/bold]")


@app.command(context_settings={"ignore_unknown_options": True})
def retrieve(
    run: str = typer.Option(
        ..., "--run", help="A run id (its runs:/ID/model), 'latest', or a model URI: models:/NAME@ALIAS."
    ),
    requests: Path = typer.Option(
        ..., "--requests", help="Parquet file of requests: user_id, surface [, subject_item_id, query_id]."
    ),
    k: int = typer.Option(1000, "--k", help="Candidates per request."),
    out_file: Path = typer.Option(..., "--out", help="Parquet file to write: request, rank, item_id, score."),
    chunk_rows: int = typer.Option(10_000, "--chunk-rows", help="Requests ranked at a time (bounds memory)."),
    overrides: list[str] = typer.Argument(None, help=LOGGER_OVERRIDES_HELP),
) -> None:
    """Batch candidates: the top K items of every request in a file, streamed in chunks."""
    with user_errors():
        from convcg_cli.serve.batch import load_candidate_model, retrieve_file
        from convcg_cli.serve.bundle import RequestError

        store = _store(overrides)
        model = load_candidate_model(store, run)
        try:
            result = retrieve_file(model, requests, out_file, k, chunk_rows)
        except RequestError as exc:
            raise RequestError(f"{requests}: {exc}") from None
        rate = result.requests / result.seconds if result.seconds else float("inf")
        out.print(
            f"Wrote {result.out}: {result.rows:,} candidates for {result.requests:,} requests "
            f"({rate:,.0f} requests/s)."
        )


@app.command(context_settings={"ignore_unknown_options": True})
def serve(
    run: str = typer.Option(
        ..., "--run", help="A run id, 'latest', a model URI (models:/NAME@ALIAS) or a saved model directory."
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(5000, "--port", help="Port to listen on."),
    access_log: bool = typer.Option(False, "--access-log", help="Log every request (uvicorn's access log)."),
    overrides: list[str] = typer.Argument(None, help=LOGGER_OVERRIDES_HELP),
) -> None:
    """Serve a run's model over HTTP: MLflow's /invocations JSON protocol, with less overhead."""
    with user_errors():
        from convcg_cli.serve.batch import load_candidate_model
        from convcg_cli.serve.server import run as run_server

        model = load_candidate_model(_store(overrides), run)
        out.print(
            f"Serving {run} at [bold]http://{host}:{port}[/bold]: POST /invocations, GET /ping; Ctrl-C stops."
        )
        run_server(model, host, port, access_log)


@app.command("index", context_settings={"ignore_unknown_options": True})
def index_(
    run: str = typer.Option(..., "--run", help="MLflow run id (or 'latest') whose model to re-index."),
    items: Path = typer.Option(
        ..., "--items", help="New item table: a parquet file (or a directory with items.parquet)."
    ),
    name: str = typer.Option(None, "--name", help="Also register the new model as a version of NAME."),
    alias: str = typer.Option(None, "--alias", help="With --name: point this alias at the new version."),
    overrides: list[str] = typer.Argument(None, help=LOGGER_OVERRIDES_HELP),
) -> None:
    """Embed a new or changed item table with the run's trained item tower; log it as a new model."""
    with user_errors():
        from convcg_cli.serve.reindex import reindex_run

        store = _store(overrides)
        result, version = reindex_run(store, run, items, name, alias)
        out.print(f"Logged model: [bold]{result.model_uri}[/bold] (the newest model of the run)")
        if version is not None:
            out.print(f"Registered {name} version {version}" + (f" as @{alias}" if alias else ""))


@app.command(context_settings={"ignore_unknown_options": True})
def ablate(
    grid: str = typer.Argument(..., help="Grid to run: conf/ablate/GRID.yaml, e.g. designs or smoke."),
    overrides: list[str] = typer.Argument(
        None,
        help="Train overrides for every run, e.g. data.dir=data/synthetic-small trainer.max_epochs=3; "
        "hydra/launcher=joblib (hydra.launcher.n_jobs=2), submitit_slurm or ray: cells run on that launcher",
    ),
    seeds: str = typer.Option(None, "--seeds", help="Comma-separated seeds instead of the grid's: 0,1,2"),
    variants: str = typer.Option(
        None, "--variants", help="Comma-separated variant names or globs, e.g. 'unified_*,engagement_only'."
    ),
    report_only: str = typer.Option(
        None,
        "--report-only",
        help="A finished grid's MLflow parent run id: rewrite its report, train nothing.",
    ),
) -> None:
    """Train + evaluate a grid of variants over seeds under one MLflow parent run; write reports/GRID/."""
    with user_errors():
        from convcg_cli import ablate as ablation
        from convcg_cli import tracking

        tracking.quiet()
        patterns = [p for p in (variants or "").split(",") if p]
        chosen = ablation.select(
            ablation.load_grid(grid), ablation.parse_seeds(seeds) if seeds else None, patterns
        )
        # hydra/launcher=..., hydra.launcher.*: run the cells as the jobs of that launcher
        launcher = [o for o in overrides or [] if o.lstrip("+~").startswith("hydra")]
        train_overrides = [o for o in overrides or [] if o not in launcher]
        if report_only:
            result = ablation.rewrite_report(chosen, report_only, train_overrides)
        elif launcher:
            result = ablation.run_ablation(chosen, train_overrides, patterns, launcher_overrides=launcher)
        else:
            result = ablation.run_ablation(chosen, train_overrides, patterns)
        out.print(f"Report: {result.report_dir / ablation.REPORT_FILE} (figure: {ablation.FIGURE_FILE})")
        out.print(f"MLflow parent run id: [bold]{result.parent_run_id}[/bold]")
        if result.n_failed:
            err.print(f"[bold red]{result.n_failed} of {len(result.children)} runs failed[/bold red].")
            raise typer.Exit(1)


@app.command(context_settings={"ignore_unknown_options": True})
def runs(
    experiment: str = typer.Option(
        None,
        "--experiment",
        help="Experiment to list (default: logger.experiment_name, MLFLOW_EXPERIMENT_NAME).",
    ),
    kind: str = typer.Option(
        None, "--kind", help="Only runs of this kind: trained, baseline, trial, grid, study or bench."
    ),
    limit: int = typer.Option(20, "--limit", help="The newest this many runs."),
    task: str = typer.Option(
        None,
        "--task",
        help="Whose recall to show (default: the first of conf/train.yaml's loss.task_weights).",
    ),
    overrides: list[str] = typer.Argument(None, help=LOGGER_OVERRIDES_HELP),
) -> None:
    """List the runs of the MLflow store (name, id, kind, status, start, held-out recall@100/@1000),
    newest first, and how to open them in the MLflow UI."""
    with user_errors():
        from convcg_cli.config import compose
        from convcg_cli.runs_list import print_runs

        store = _store(overrides)
        task = task or next(iter(compose("train").cfg.loss.task_weights))  # the primary task
        print_runs(out, store, task, kind, limit, experiment)


@app.command(context_settings={"ignore_unknown_options": True})
def compare(
    runs: list[str] = typer.Argument(
        ...,
        help="Run ids (shown by convcg runs) or 'latest' (the newest finished run with a checkpoint), "
        "then any overrides of conf/eval.yaml's logger, e.g. logger.tracking_uri=sqlite:///x.db",
    ),
    experiment: str = typer.Option(
        None,
        "--experiment",
        help="Experiment to look for 'latest' in (default: logger.experiment_name, MLFLOW_EXPERIMENT_NAME).",
    ),
) -> None:
    """Compare runs side by side: a column per run (name, design, seed, data), validation and
    held-out recall@100/@1000 per task and the popularity blend's weights as rows, the best marked."""
    with user_errors():
        from convcg_cli.config import compose
        from convcg_cli.kept_checkpoint import checkpoint_monitor
        from convcg_cli.runs_list import print_comparison

        refs = [arg for arg in runs if "=" not in arg]  # a run id never holds '='; an override does
        store = _store([arg for arg in runs if "=" in arg])
        train_cfg = compose("train").cfg  # the tasks to show first, and the epoch a checkpoint keeps
        tasks = [str(task) for task in train_cfg.loss.task_weights]
        print_comparison(out, store, refs, tasks, checkpoint_monitor(train_cfg), experiment)


# How the recall table names a subset of a task's positives (``metrics.retrieval.COLD_ITEMS``).
SUBSET_LABELS = {"cold": "items never shown"}


def metric_rows(metrics: dict[str, float]) -> dict[tuple[str, str], dict[int, str]]:
    """The recall table's cells: (task label, model) -> k -> ``0.5000`` (with ``[low, high]`` when
    bootstrap bounds were computed). Per-surface figures are left out (they are in MLflow).

    Names look like ``heldout/conversion/recall_at_100`` (the trained model),
    ``heldout/baseline_popularity/conversion/recall_at_100`` (a baseline) and
    ``heldout[/baseline_X]/conversion/cold/recall_at_100`` (recall on the positives whose item was
    never shown in training: task label ``conversion (items never shown)``).

    Example:
        >>> metric_rows({"heldout/baseline_ease/conversion/cold/recall_at_10": 0.25})
        {('conversion (items never shown)', 'ease'): {10: '0.2500'}}
    """
    from convcg_cli.metrics.bootstrap import ci_names

    rows: dict[tuple[str, str], dict[int, str]] = {}
    for name, value in metrics.items():
        if "/by_surface/" in name or "/recall_at_" not in name:
            continue
        prefix, k_text = name.rsplit("/recall_at_", 1)
        if not k_text.isdigit():  # e.g. recall_at_100_ci_low
            continue
        _, *path = prefix.split("/")  # [baseline_X/]task[/subset]
        model = path.pop(0).removeprefix("baseline_") if path[0].startswith("baseline_") else "two-tower"
        task = path[0] if len(path) == 1 else f"{path[0]} ({SUBSET_LABELS.get(path[1], path[1])})"
        low, high = (metrics.get(bound) for bound in ci_names(name))
        ci = f" [{low:.4f}, {high:.4f}]" if low is not None and high is not None else ""
        rows.setdefault((task, model), {})[int(k_text)] = f"{value:.4f}{ci}"
    return rows


def chosen_lines(metrics: dict[str, float]) -> list[str]:
    """One line per baseline whose options validation chose (``<split>/baseline_<name>/chosen/...``).

    Example:
        >>> chosen_lines({"heldout/baseline_ease/chosen/l2": 500.0,
        ...               "heldout/baseline_ease/chosen/val_recall_at_100": 0.25})
        ['ease: validation chose l2=500 (validation conversion recall@100 0.2500)']
    """
    chosen: dict[str, dict[str, float]] = {}
    for name, value in metrics.items():
        parts = name.split("/")
        if len(parts) == 4 and parts[1].startswith("baseline_") and parts[2] == "chosen":
            chosen.setdefault(parts[1].removeprefix("baseline_"), {})[parts[3]] = value
    lines = []
    for baseline, values in sorted(chosen.items()):
        recall = {o: v for o, v in values.items() if o.startswith("val_recall_at_")}
        options = " ".join(f"{o}={v:g}" for o, v in sorted(values.items()) if o not in recall)
        line = f"{baseline}: validation chose {options}"
        for o, v in recall.items():
            line += f" (validation conversion recall@{o.removeprefix('val_recall_at_')} {v:.4f})"
        lines.append(line)
    return lines


def _print_metrics(title: str, metrics: dict[str, float]) -> None:
    """Recall table: one row per task (or subset of its positives) and model, one column per k
    (:func:`metric_rows`). The task and model columns wrap first, so every recall header stays
    whole in 80 columns."""
    rows = metric_rows(metrics)
    ks = sorted({k for values in rows.values() for k in values})
    table = Table(title=title)
    table.add_column("task", overflow="fold")
    table.add_column("model", overflow="fold")
    for k in ks:
        header = f"recall@{k}"
        table.add_column(header, justify="right", min_width=len(header))
    for task, model in sorted(rows, key=lambda r: (r[0], r[1] != "two-tower", r[1])):
        values = rows[(task, model)]
        table.add_row(task, model, *(values.get(k, "") for k in ks))
    out.print(table)


def main() -> None:
    """Entry point for ``python -m convcg_cli``."""
    app()
