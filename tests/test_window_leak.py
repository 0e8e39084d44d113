"""A rolling window's choices read nothing after its validation days (issue 21).

A planted signal on later days (every impression clicked and converted) is written into a copy of
the tiny logs. A window that ends before those days (``data.end_offset_days``) must train, choose
and score exactly as on the original logs; a window whose held-out days carry the signal must make
every choice (the kept epoch, the served blend, the baselines' tuned options, the validation
figures) as before, its held-out positives alone changing.
"""

from __future__ import annotations

import math
from pathlib import Path

import polars as pl
import pytest

from convcg_cli.config import compose
from convcg_cli.data.contract.tables import load_tables
from convcg_cli.data.features.time_split import SECONDS_PER_DAY
from tests.conftest import TINY_TRAIN

TASKS = ["conversion", "engagement"]
LATER_DAYS = 2  # the planted days: the log's last two
# The levers that read the training window's aggregates (the history, co-engagement factors, EMA,
# the blend's popularity prior) and the conversion-signal lever (dual positives).
LEVERS = ["levers=best", "data/positives=dual", "loss.task_weights.engagement=1.0"]
# Figures that measure time, not what was learnt.
TIMING = ("time", "seconds", "per_second", "throughput", "duration")


def _planted(tiny_data: Path, out: Path) -> Path:
    """A copy of the tiny logs whose last ``LATER_DAYS`` days have every impression clicked, read
    for a minute and converted (the conversion events table, when there is one, left as it is)."""
    tables = load_tables(tiny_data)
    imp = tables["impressions"]
    cut = (imp["timestamp"].max() // SECONDS_PER_DAY - LATER_DAYS + 1) * SECONDS_PER_DAY
    later = pl.col("timestamp") >= cut
    planted = imp.with_columns(
        clicked=pl.when(later).then(True).otherwise(pl.col("clicked")),
        converted=pl.when(later).then(True).otherwise(pl.col("converted")),
        dwell_seconds=pl.when(later).then(60.0).otherwise(pl.col("dwell_seconds")),
    )
    assert planted["converted"].sum() > imp["converted"].sum() + 100  # the plant is large
    out.mkdir()
    for name, frame in {**tables, "impressions": planted}.items():
        frame.write_parquet(out / f"{name}.parquet")
    return out


def _run_figures(home: Path, data_dir: Path, overrides: list[str]) -> dict[str, float]:
    """Train on ``data_dir`` and return what the run logged, timings left out."""
    from mlflow.tracking import MlflowClient

    from convcg_cli.train import train

    composed = compose("train", [f"data.dir={data_dir}", *TINY_TRAIN, *LEVERS, *overrides])
    result = train(composed)
    run = MlflowClient(tracking_uri=f"sqlite:///{home.resolve()}/mlflow.db").get_run(result.run_id)
    return {k: v for k, v in run.data.metrics.items() if not any(t in k for t in TIMING)}


def _baseline_choices(data_dir: Path, overrides: list[str]) -> dict[str, float]:
    """Every baseline's options as validation tuned them, with their validation figure."""
    from convcg_cli.evaluate import baseline_metrics

    dm = _datamodule(data_dir, overrides)
    eval_overrides = ["baselines=[popularity,itemcf,ease]", "bootstrap.n_boot=0", "by_surface=false"]
    cfg = compose("eval", eval_overrides).cfg
    metrics = baseline_metrics(dm, dm.queries["heldout"], TASKS, cfg)
    return {k: v for k, v in metrics.items() if "/chosen/" in k}


def _datamodule(data_dir: Path, overrides: list[str]):
    from convcg_cli.train import build_datamodule

    return build_datamodule(compose("train", [f"data.dir={data_dir}", *TINY_TRAIN, *overrides]).cfg, TASKS)


def _same(a: dict[str, float], b: dict[str, float]) -> list[str]:
    """The keys whose values differ (NaN equal to NaN), or that only one side has."""
    return sorted(
        k
        for k in set(a) | set(b)
        if k not in a or k not in b or not (a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])))
    )


@pytest.fixture(scope="module")
def planted_data(tiny_data, tmp_path_factory) -> Path:
    return _planted(tiny_data, tmp_path_factory.mktemp("planted") / "logs")


@pytest.mark.slow
def test_a_window_before_the_planted_days_trains_and_scores_the_same(home, tiny_data, planted_data):
    """Fold 1 (its log ends ``LATER_DAYS`` before the end): every logged figure the same, held-out too."""
    fold = [f"data.end_offset_days={LATER_DAYS}"]
    original = _run_figures(home, tiny_data, fold)
    planted = _run_figures(home, planted_data, fold)
    assert any(k.startswith("val/") for k in original) and any("blend" in k for k in original)
    assert _same(original, planted) == []
    assert _same(_baseline_choices(tiny_data, fold), _baseline_choices(planted_data, fold)) == []


def test_a_windows_choices_ignore_its_own_held_out_days(home, tiny_data, planted_data):
    """Fold 0 (the plant on its held-out days): the choices and validation figures the same; its
    held-out positives are not (the plant lies where the window scores, not where it chooses)."""
    heldout = [_datamodule(d, []).queries["heldout"] for d in (tiny_data, planted_data)]
    assert len(heldout[1]) > len(heldout[0])
    original = _run_figures(home, tiny_data, [])
    planted = _run_figures(home, planted_data, [])
    choices = [k for k in original if not k.startswith(("heldout/", "test/"))]
    assert any(k.startswith("val/") for k in choices)
    assert _same({k: original[k] for k in choices}, {k: planted.get(k, math.nan) for k in choices}) == []
    assert _same(_baseline_choices(tiny_data, []), _baseline_choices(planted_data, [])) == []
