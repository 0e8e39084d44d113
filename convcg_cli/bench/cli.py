"""The benchmark command line: ``python -m convcg_cli.bench run [--quick] [OVERRIDES]`` (``make bench``).

``run`` opens one MLflow run (experiment ``logger.experiment_name`` of conf/bench.yaml), runs every step,
writes the report and logs the figures; a crash marks the run FAILED, Ctrl-C marks it KILLED.
``step`` (hidden) is what ``runner`` starts in a fresh interpreter for each step.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import typer
from omegaconf import DictConfig, OmegaConf

from convcg_cli.errors import user_errors

REPORT_ARTIFACT = "bench/bench.md"
RESULTS_ARTIFACT = "bench/results.json"

app = typer.Typer(
    help="Speed and scale benchmarks (conf/bench.yaml).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def bench_config(overrides: Sequence[str], quick: bool) -> DictConfig:
    """conf/bench.yaml with ``overrides``; ``quick`` merges its ``quick`` block over the rest."""
    from convcg_cli.config import compose

    cfg = compose("bench", list(overrides)).cfg
    OmegaConf.set_struct(cfg, False)
    if quick:
        cfg = cast(DictConfig, OmegaConf.merge(cfg, cfg.quick))
    cfg.is_quick = quick
    return cfg


@app.command("run", context_settings={"ignore_unknown_options": True})
def run_command(
    quick: bool = typer.Option(False, "--quick", help="Smoke test: the tiny preset, a few batches (~1 min)."),
    overrides: list[str] = typer.Argument(None, help="Overrides of conf/bench.yaml, e.g. retrieval.ann=hnsw"),
) -> None:
    """Run every benchmark; write the markdown report and log an MLflow run."""
    from convcg_cli import tracking
    from convcg_cli.bench.figures import DATA_VS_MODEL, LIGHTNING_VS_BARE, metrics
    from convcg_cli.bench.report import render_report
    from convcg_cli.bench.runner import run

    with user_errors():
        cfg = bench_config(overrides or [], quick)
        print(f"convcg bench: preset {cfg.preset}{' (quick)' if quick else ''}; report -> {cfg.report}")
        tags = {"mlflow.source.name": "convcg bench", "preset": str(cfg.preset), "quick": str(cfg.is_quick)}
        tags[tracking.KIND_TAG] = tracking.BENCH_KIND
        with tracking.open_run(
            tracking.Store.from_config(cfg.logger), f"bench-{cfg.preset}", tags
        ) as tracked:
            tracking.log_config_params(tracked, cfg, skip_prefixes=("quick.",))
            with tempfile.TemporaryDirectory(prefix="convcg-bench-") as tmp:
                results = run(cfg, Path(tmp))
            report = render_report(cfg, results)
            path = Path(cfg.report)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(report)
            figures = metrics(results)
            tracking.log_metrics(tracked, figures)
            tracking.log_text(tracked, report, REPORT_ARTIFACT)
            raw = json.dumps(results, indent=2, default=str)
            tracking.log_text(tracked, raw, RESULTS_ARTIFACT)
        print(
            f"Lightning/bare {figures[LIGHTNING_VS_BARE]:.3f}, data/model {figures[DATA_VS_MODEL]:.0f}x, "
            "ANN speed-up/overlap "
            + ", ".join(f"{r['speedup']:.1f}x/{r['overlap']:.3f}" for r in results["retrieval"]["ann_runs"])
            + f"; total {results['total_s'] / 60:.1f} min."
        )
        print(f"Wrote {path}; MLflow run {tracked.run_id} (experiment {cfg.logger.experiment_name}).")


@app.command("step", hidden=True)
def step_command(
    name: str = typer.Argument(..., help="One of steps.STEPS."),
    config: Path = typer.Argument(..., help="The resolved bench config (yaml)."),
    kwargs: str = typer.Argument("{}", help="The step's keyword arguments as JSON."),
    out: Path = typer.Option(..., "--out", help="Where to write the step's figures (JSON)."),
) -> None:
    """Run one step in this (fresh) process and write its figures, wall time and peak memory."""
    from convcg_cli.bench.measure import peak_rss_mib
    from convcg_cli.bench.steps import STEPS, quiet

    quiet()
    start = time.perf_counter()
    result = STEPS[name](OmegaConf.load(config), **json.loads(kwargs))
    result.update(wall_s=time.perf_counter() - start, peak_rss_mib=peak_rss_mib())
    out.write_text(json.dumps(result, default=float))
