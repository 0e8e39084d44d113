"""(i) Where a grid's time goes, with its data set up for every training and evaluation (before) and
once per grid (after: :class:`~convcg_cli.data.loading.prepared.PreparedDataCache`), interleaved.

A reduced grid (``grid_timing.cases``: a few variants and seeds of a grid of ``conf/ablate``) runs
through ``run_ablation`` both ways in one process, each run in a fresh convcg home (so both score
their baselines once, as a first grid on these data does); every step it shows (``progress``) is
timed and put into a phase. Both ways must give the same figures for every cell.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

# The steps ``convcg ablate`` shows, by the phase they belong to (a prefix of the step's text);
# the rest of a grid's wall time is training (Lightning's fit, validation) and run bookkeeping.
PHASES = {
    "data setup": ("Loading and checking",),
    "baselines": ("Scoring baseline", "Reading baseline"),
    "eval: embedding": ("Embedding",),
    "eval: prior weight": ("Choosing the popularity prior",),
    "eval: search": ("Searching",),
    "eval: recall and bootstrap": ("Scoring the model",),
    "MLflow logging": ("Logging",),
}
TRAINING = "training and the rest"


def phase_seconds(steps: Sequence[tuple[str, float]], total: float) -> dict[str, float]:
    """Seconds per phase of ``PHASES`` from ``(step text, seconds)`` records; what no step covers of
    ``total`` is ``TRAINING``.

    Example:
        >>> phases = phase_seconds([("Loading and checking d", 2.0), ("Searching the top 10", 1.0)], 10.0)
        >>> phases["data setup"], phases["eval: search"], phases["training and the rest"]
        (2.0, 1.0, 7.0)
    """
    out = dict.fromkeys(PHASES, 0.0)
    for text, seconds in steps:
        phase = next((p for p, prefixes in PHASES.items() if text.startswith(prefixes)), None)
        if phase is not None:
            out[phase] += seconds
    out[TRAINING] = total - sum(out.values())
    return out


def _empty_store(workdir: Path) -> Path:
    """An MLflow store with its tables made, copied into each run's home (its migrations would cost
    every run the same seconds)."""
    from convcg_cli import tracking

    store = workdir / "grid-empty-mlflow.db"
    if not store.exists():
        tracking.Store(f"sqlite:///{store}", "Default").create_tables()
    return store


def _timed_grid(grid, overrides: list[str], home: Path, store: Path, reuse_data: bool) -> dict[str, Any]:
    """One run of ``grid`` in the convcg home ``home``: wall time, phases, each cell's figures."""
    from convcg_cli import progress
    from convcg_cli.ablate import run_ablation

    home.mkdir(parents=True)
    shutil.copyfile(store, home / "mlflow.db")
    os.environ["CONVCG_HOME"] = str(home)  # this step's own process: compose reads it
    load = os.getloadavg()[0]
    start = time.perf_counter()
    with progress.recorded() as steps:
        result = run_ablation(grid, overrides, reuse_data=reuse_data)
    total = time.perf_counter() - start
    if result.n_failed:
        raise RuntimeError(f"{result.n_failed} cell(s) of the timed grid failed; see the step's log.")
    return {
        "reuse_data": reuse_data,
        "total_s": total,
        "phases": phase_seconds(steps, total),
        "load_before": load,
        "load_after": os.getloadavg()[0],
        "figures": {f"{c.variant}/seed={c.seed}": c.metrics for c in result.children},
    }


def _same_figures(runs: Sequence[Mapping[str, Any]], decimals: int = 4) -> bool:
    """Whether every run gave every cell the same figures, to ``decimals`` decimals."""

    def rounded(figures: Mapping[str, Mapping[str, float]]) -> dict:
        return {cell: {k: round(v, decimals) for k, v in m.items()} for cell, m in figures.items()}

    first = rounded(runs[0]["figures"])
    return all(rounded(run["figures"]) == first for run in runs[1:])


def step_grid(cfg: DictConfig, workdir: str, case: str) -> dict:
    """(i) the reduced grid ``grid_timing.cases[case]`` without and with the data set up once per
    grid, the case's ``rounds`` times each, the order alternating round by round."""
    from convcg_cli.ablate import load_grid, select
    from convcg_cli.data.importing import synth

    spec = cfg.grid_timing.cases[case]
    work = Path(workdir)
    data_dir = Path(str(spec.data_dir)) if spec.get("data_dir") else work / f"grid-{case}-data"
    if not spec.get("data_dir"):
        synth.synthesize(synth.resolve_config(str(spec.preset)), data_dir, seed=cfg.seed)
    grid = select(load_grid(str(spec.grid)), [int(s) for s in spec.seeds], [str(v) for v in spec.variants])
    overrides = [*spec.train_overrides, f"data.dir={data_dir}", "trainer.enable_progress_bar=false"]
    store = _empty_store(work)
    runs = []
    for r in range(int(spec.rounds)):
        for reuse_data in (False, True) if r % 2 == 0 else (True, False):
            home = work / f"grid-{case}-{r}-{'reused' if reuse_data else 'per-cell'}"
            runs.append({"round": r, **_timed_grid(grid, overrides, home, store, reuse_data)})
            shutil.rmtree(home, ignore_errors=True)
    step = step_vs_gemm(grid, overrides, int(spec.step_rounds), int(spec.step_batches))
    return {
        "case": case,
        "step": step,
        "grid": grid.name,
        "data": data_dir.name,
        "variants": [v.name for v in grid.variants],
        "seeds": list(grid.seeds),
        "cells": len(grid.variants) * len(grid.seeds),
        "train_overrides": list(spec.train_overrides),
        "runs": runs,
        "same_figures": _same_figures(runs),
    }


def step_vs_gemm(grid, overrides: list[str], rounds: int, batches: int, warmup: int = 3) -> dict[str, Any]:
    """A training step of the grid's first cell (its model, on the case's data) against a bare GEMM
    loop of the step's own matrix products, ``rounds`` times in turn: how much of a cell's training
    time is arithmetic the machine cannot do faster (the measure of (a), for the model a grid trains).

    Step time is the median over rounds of the mean of ``batches`` bare-loop steps (the module's
    ``training_step``, backward, clipping, optimizer step; data included); FLOPs are the recorded
    matrix products' (``record_matmuls``), as (a) counts them.
    """
    import numpy as np
    import torch

    from convcg_cli.ablate.run import Cell, child_overrides
    from convcg_cli.bench.flops import gemm_seconds, record_matmuls
    from convcg_cli.bench.training import bare_loop, measure_first_step, setup_model
    from convcg_cli.config import compose

    cell = Cell(grid.variants[0], grid.seeds[0])
    train_cfg = compose("train", child_overrides(cell, overrides, 1)).cfg
    dm, model, _ = setup_model(train_cfg)
    matmuls = measure_first_step(model, dm, record_matmuls)
    clip = train_cfg.trainer.get("gradient_clip_val")
    step_s, gemm_s = [], []
    for _ in range(rounds):
        clock = bare_loop(model, dm, warmup, batches, clip)
        step_s.append(clock.seconds / batches)
        gemm_s.append(gemm_seconds(matmuls, 3))
    flops = sum(m.flops for m in matmuls)
    return {
        "variant": cell.variant.name,
        "threads": torch.get_num_threads(),
        "batch_size": dm.batch_size,
        "matmuls": len(matmuls),
        "matmul_gflop": flops / 1e9,
        "step_ms": 1e3 * float(np.median(step_s)),
        "gemm_ms": 1e3 * float(np.median(gemm_s)),
        "step_gflops_per_s": flops / float(np.median(step_s)) / 1e9,
        "gemm_gflops_per_s": flops / float(np.median(gemm_s)) / 1e9,
        "vs_gemm": float(np.median([g / s for s, g in zip(step_s, gemm_s, strict=True)])),
    }
