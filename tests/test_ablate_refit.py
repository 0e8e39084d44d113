"""A refit grid (``refit_of``) takes every value chosen on validation from the other grid's SAME
window only: the blend per seed (else the median over the window's seeds), the baselines' tuned
options, ease_popularity's weight; it refuses when the other grid has no summary. No training: the
cells are faked, their runs are real (empty) MLflow runs."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import pytest

from convcg_cli import ablate, tracking
from convcg_cli.ablate import Grid, Variant
from convcg_cli.ablate.refit import cell_choices, choice_candidates, window_choices
from convcg_cli.config import compose
from convcg_cli.errors import ConfigError
from convcg_cli.evaluate import EvalResult
from convcg_cli.train import TrainResult
from tests.conftest import runs_in

FOLDS, SOURCE_SEEDS = 3, (0, 1)
REFIT_EVAL = ("baselines=[popularity,ease,ease_popularity]", "bootstrap.n_boot=0", "by_surface=false")
# What the source grid's window f chose, distinct per window (and the blend per seed too).
WINDOW_DAYS = [0.0, 3.0, 7.0]  # logged numbers; 0 stands for null (all days)
USE_HISTORY = [1.0, 0.0, 1.0]
L2 = [50.0, 200.0, 2000.0]
EASE_POP_WEIGHT = [0.1, 0.2, 0.5]


def _beta(fold: int, seed: int) -> float:
    return 0.01 * (fold + 1) + 0.001 * seed


def _fallback(fold: int, seed: int) -> float:
    return 0.1 * (fold + 1) + 0.01 * seed


def _source_metrics(fold: int, seed: int) -> dict[str, float]:
    """What a source cell's evaluation returns: figures, its blend, the baselines' choices."""
    head = "heldout/baseline_"
    return {
        "heldout/conversion/recall_at_100": 0.3,
        "val/conversion/recall_at_100": 0.4,
        "heldout/prior/beta": _beta(fold, seed),
        "heldout/prior/fallback_weight": _fallback(fold, seed),
        f"{head}popularity/chosen/window_days": WINDOW_DAYS[fold],
        f"{head}popularity/chosen/use_history": USE_HISTORY[fold],
        f"{head}popularity/chosen/val_recall_at_100": 0.2,
        f"{head}ease/chosen/l2": L2[fold],
        f"{head}ease/chosen/val_recall_at_100": 0.25,
        f"{head}ease_popularity/chosen/weights": EASE_POP_WEIGHT[fold],
    }


def _fake_train(seen: dict):
    """A training that logs an empty run and records each cell's config by run id."""

    def train(composed):
        store = tracking.Store.from_config(composed.cfg.logger)
        with tracking.tracked_run(store, composed.cfg, composed.choices, composed.overrides) as run:
            pass
        seen[run.run_id] = composed.cfg
        return TrainResult(run.run_id, Path("none.ckpt"), {})

    return train


def _run_source(name: str = "src") -> None:
    """The other grid, faked: 3 windows x 2 seeds, each cell with its window's (and seed's) choices."""
    trained: dict = {}

    def evaluate(composed, run_id, baseline_cache):
        cfg = trained[run_id]
        fold, seed = int(cfg.logger.run_tags.fold), int(cfg.seed)
        return EvalResult(run_id, "heldout", _source_metrics(fold, seed))

    grid = Grid(name, (Variant("design", ("+experiment=unified_parallel",)),), SOURCE_SEEDS, folds=FOLDS)
    result = ablate.run_ablation(grid, [], train_fn=_fake_train(trained), evaluate_fn=evaluate)
    assert result.n_failed == 0


def _refit_grid(seeds=(0, 5), source: str = "src") -> Grid:
    variant = Variant("design_refit", ("+experiment=unified_parallel", "data.train_through_val=true"))
    return Grid(f"{source}_refit", (variant,), seeds, eval_overrides=REFIT_EVAL, folds=FOLDS, refit_of=source)


def test_each_refit_window_gets_exactly_its_own_windows_choices(home):
    _run_source()
    written = json.loads((home / "reports" / "src" / "summary.json").read_text())
    first = next(c for c in written["children"] if c["fold"] == 0 and c["seed"] == 0)
    assert first["chosen"] == {  # the logged numbers, written back as the values they stand for
        "blend": {"beta": _beta(0, 0), "fallback_weight": _fallback(0, 0)},
        "baselines": {
            "ease": {"l2": 50.0},
            "ease_popularity": {"weights": 0.1},
            "popularity": {"use_history": True, "window_days": None},
        },
    }

    trained, evaluated = {}, {}

    def evaluate(composed, run_id, baseline_cache):
        cfg = trained[run_id]
        evaluated[(int(cfg.logger.run_tags.fold), int(cfg.seed))] = (cfg, composed.cfg)
        return EvalResult(run_id, "heldout", {"heldout/conversion/recall_at_100": 0.3})

    result = ablate.run_ablation(_refit_grid(), [], train_fn=_fake_train(trained), evaluate_fn=evaluate)
    assert result.n_failed == 0 and set(evaluated) == {(f, s) for f in range(FOLDS) for s in (0, 5)}
    for (fold, seed), (train_cfg, eval_cfg) in evaluated.items():
        if seed in SOURCE_SEEDS:  # the same seed's cell of the same window
            beta, fallback = _beta(fold, seed), _fallback(fold, seed)
        else:  # no such seed there: the median over that window's seeds
            beta = statistics.median(_beta(fold, s) for s in SOURCE_SEEDS)
            fallback = statistics.median(_fallback(fold, s) for s in SOURCE_SEEDS)
        assert list(train_cfg.blend.betas) == [beta] and list(train_cfg.blend.fallback_weights) == [fallback]
        assert list(eval_cfg.popularity_prior.betas) == [beta]
        assert list(eval_cfg.popularity_prior.fallback_weights) == [fallback]
        assert list(eval_cfg.baseline_options.ease_popularity.weights) == [EASE_POP_WEIGHT[fold]]
        assert eval_cfg.baseline_options.ease.l2 == L2[fold]
        window_days = eval_cfg.baseline_options.popularity.window_days
        assert window_days == (None if WINDOW_DAYS[fold] == 0 else WINDOW_DAYS[fold])
        assert eval_cfg.baseline_options.popularity.use_history is bool(USE_HISTORY[fold])
        # nothing left to choose on the refit's own validation days (they trained it)
        assert eval_cfg.baseline_tuning.ease is None and eval_cfg.baseline_tuning.popularity is None

    report = (result.report_dir / "report.md").read_text()
    assert "## What each window took from grid `src`" in report
    assert "| 2 | 5 | design | 0.0305 | 0.305 | median of seeds 0, 1 (no seed 5 there) |" in report
    refit = json.loads((result.report_dir / "summary.json").read_text())["refit"]
    assert refit["of"] == "src" and len(refit["windows"]) == FOLDS * 2
    assert refit["windows"][0]["baselines"]["popularity"] == {"use_history": True, "window_days": None}

    # --report-only reads the choices again; without the other grid's summary it says so
    again = ablate.rewrite_report(_refit_grid(), result.parent_run_id)
    assert "| 2 | 5 | design | 0.0305 |" in (again.report_dir / "report.md").read_text()
    (home / "reports" / "src" / "summary.json").unlink()
    again = ablate.rewrite_report(_refit_grid(), result.parent_run_id)
    assert "Not available when this report was written" in (again.report_dir / "report.md").read_text()


def test_no_other_windows_value_leaks_into_a_window(home):
    _run_source()
    grid = _refit_grid(seeds=(0, 1, 5))
    eval_cfg = compose("eval", list(REFIT_EVAL)).cfg
    choices = window_choices(grid, eval_cfg, home / "reports")

    def planted(fold: int) -> set[float]:
        blends = {v for s in SOURCE_SEEDS for v in (_beta(fold, s), _fallback(fold, s))}
        medians = {statistics.median(_beta(fold, s) for s in SOURCE_SEEDS)}
        medians.add(statistics.median(_fallback(fold, s) for s in SOURCE_SEEDS))
        return blends | medians | {L2[fold], EASE_POP_WEIGHT[fold], WINDOW_DAYS[fold]}

    for (fold, seed), choice in choices.items():
        numbers = {
            float(x)
            for o in (*choice.train_overrides, *choice.eval_overrides)
            for x in re.findall(r"(?<=[=\[])-?\d+\.?\d*", o)
        }
        others = set().union(*(planted(f) for f in range(FOLDS) if f != fold)) - planted(fold)
        assert numbers and not numbers & others, (fold, seed, numbers & others)
        assert numbers <= planted(fold) | {0.0}, (fold, seed)


def test_a_refit_refuses_without_the_other_grids_summary(home):
    with pytest.raises(ConfigError, match=r"convcg ablate nowhere` first") as refused:
        ablate.run_ablation(_refit_grid(source="nowhere"), [])
    assert "nowhere" in str(refused.value) and "\n" not in str(refused.value)
    assert runs_in(home) == []  # refused before any run


def test_a_refit_refuses_a_summary_without_choices_or_a_baselines_choice(home, tmp_path):
    eval_cfg = compose("eval", list(REFIT_EVAL)).cfg
    src = tmp_path / "src"
    src.mkdir()
    old = {"folds": [{"fold": 0, "selected": "design"}], "children": [{"variant": "design", "fold": 0}]}
    (src / "summary.json").write_text(json.dumps(old))
    with pytest.raises(ConfigError, match="--report-only"):
        window_choices(_refit_grid(), eval_cfg, tmp_path)
    child = {"variant": "design", "seed": 0, "fold": 0, "status": "FINISHED"}
    chosen = {"blend": None, "baselines": {"ease": {"l2": 50.0}, "popularity": {"window_days": None}}}
    folds = [{"fold": f, "selected": "design"} for f in range(FOLDS)]
    summary = {"folds": folds, "children": [{**child, "fold": f, "chosen": chosen} for f in range(FOLDS)]}
    (src / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(ConfigError, match="no validation choice of baseline ease_popularity in window"):
        window_choices(_refit_grid(), eval_cfg, tmp_path)
    fixed = compose("eval", [*REFIT_EVAL, "baseline_options.ease_popularity.weights=[0.3]"]).cfg
    choices = window_choices(_refit_grid(), fixed, tmp_path)  # one weight given: nothing to choose
    assert choices[(1, 5)].eval_overrides[0] == "popularity_prior.betas=[]"  # two-tower alone there
    assert choices[(1, 5)].train_overrides == ("blend.betas=[]",)


def test_cell_choices_prefer_the_evaluations_blend_and_decode_the_logged_numbers():
    candidates = choice_candidates(compose("eval").cfg)
    metrics = {
        "heldout/prior/beta": 0.05,
        "blend/beta": 0.2,  # training's choice: only where the evaluation logged none
        "blend/fallback_weight": 1.0,
        "heldout/baseline_itemcf/chosen/neighbours": 0.0,
        "heldout/baseline_itemcf/chosen/include_self": 0.0,
        "heldout/baseline_itemcf/chosen/val_recall_at_100": 0.1,
        "val/baseline_ease/chosen/l2": 50.0,  # another split's: not this one's
    }
    assert cell_choices(metrics, "heldout", candidates) == {
        "blend": {"beta": 0.05, "fallback_weight": 0.0},
        "baselines": {"itemcf": {"include_self": False, "neighbours": None}},
    }
    trained_only = {k: v for k, v in metrics.items() if not k.startswith("heldout/prior")}
    assert cell_choices(trained_only, "heldout")["blend"] == {"beta": 0.2, "fallback_weight": 1.0}
    assert cell_choices({}, "heldout") == {"blend": None, "baselines": {}}


def test_the_kuairand_refit_grid_fixes_no_choice_of_its_own():
    grid = ablate.load_grid("kuairand_refit")
    assert grid.refit_of == "kuairand_folds"
    fixed = ("popularity_prior", "ease_popularity.weights", "baseline_tuning")
    assert not [o for o in grid.eval_overrides if any(f in o for f in fixed)]


def test_ease_popularity_logs_its_weight_only_where_validation_chose_it():
    import numpy as np

    from convcg_cli.baseline_tuning import chosen_metrics, tune_baseline
    from convcg_cli.baselines import TrainHistory

    def history(validation):
        return TrainHistory(
            np.array([0, 0, 1]), np.array([0, 1, 1]), 2, 3, np.array([0.0, 0.0, 9.0]), validation=validation
        )

    options = {"l2": 1.0, "weights": [0.0, 10.0], "select_k": 1}
    prefix = "heldout/baseline_ease_popularity"
    with_val = history((np.array([1]), np.array([2])))
    tuned = tune_baseline("ease_popularity", options, None, with_val)
    assert chosen_metrics(tuned, with_val, prefix, 100) == {f"{prefix}/chosen/weights": 10.0}
    refit = history(None)  # a refit: the first weight, not a choice
    assert chosen_metrics(tune_baseline("ease_popularity", options, None, refit), refit, prefix, 100) == {}
