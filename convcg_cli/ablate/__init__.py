"""``convcg ablate GRID``: train and evaluate a grid of variants over seeds (and folds), then report.

A grid lives in ``conf/ablate/<GRID>.yaml``: named variants (each a list of train overrides, some marked
``baseline``), an optional ``sweep`` crossed with every non-baseline variant, the seeds, the validation
metric that selects the best variant (``select``), optional rolling-origin ``folds``, and overrides of
``conf/eval.yaml``.

Modules: :mod:`.grid` (the grid and its cells' results), :mod:`.run` (training and evaluating the
cells under one MLflow parent run), :mod:`.summary` (statistics, the validation-selected variant,
paired comparisons per fold and pooled), :mod:`.report` (the markdown report and ``summary.json``),
:mod:`.figure` (``recall.png``), :mod:`.refit` (what a ``refit_of`` grid's cells take from the other
grid's same window: the blend and the baselines' options chosen on its validation days).

The parent run gets ``report.md`` (reproduce command, mean +- 95% t-interval across seeds per variant,
the variant selected on validation and its paired bootstrap differences to every baseline per seed,
failures), ``recall.png`` and ``summary.json``, also written to ``reports/<GRID>/``.
``convcg ablate GRID --report-only PARENT_RUN_ID`` writes them again from the runs, training nothing.
"""

from convcg_cli.ablate.figure import FIGURE_FILE
from convcg_cli.ablate.grid import ChildResult, Grid, Variant, available_grids, load_grid, parse_seeds, select
from convcg_cli.ablate.run import REPORT_FILE, AblationResult, rewrite_report, run_ablation

__all__ = [
    "FIGURE_FILE",
    "REPORT_FILE",
    "AblationResult",
    "ChildResult",
    "Grid",
    "Variant",
    "available_grids",
    "load_grid",
    "parse_seeds",
    "rewrite_report",
    "run_ablation",
    "select",
]
