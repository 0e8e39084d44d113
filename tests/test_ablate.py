"""``convcg ablate``: grids compose, statistics and report, one parent run with child runs, CLI routing."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from convcg_cli import ablate, tracking
from convcg_cli.ablate import ChildResult, Variant
from convcg_cli.ablate import report as ablate_report
from convcg_cli.ablate import summary as ablate_summary
from convcg_cli.ablate.figure import plot_recall
from convcg_cli.ablate.grid import check_refit_of, fold_overrides, reproduce_command
from convcg_cli.ablate.run import Cell, cells, child_overrides
from convcg_cli.cli import app
from convcg_cli.config import compose
from convcg_cli.errors import ConfigError
from convcg_cli.evaluate import EvalResult, PositiveHits, load_hits
from convcg_cli.kept_checkpoint import value_at_best_epoch
from convcg_cli.train import TrainResult
from tests.conftest import hydra_plugin_installed, runs_in

runner = CliRunner()


def _client(home) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{home.resolve()}/mlflow.db")


@pytest.mark.parametrize("name", ablate.available_grids())
def test_every_grid_and_variant_composes(name):
    grid = ablate.load_grid(name)
    assert grid.seeds and grid.variants
    for variant in grid.variants:
        compose("train", [*variant.overrides, f"seed={grid.seeds[0]}"])
    compose("eval", list(grid.eval_overrides))


def test_designs_grid_crosses_designs_with_engagement_weights():
    grid = ablate.load_grid("designs")
    designs = [v for v in grid.variants if not v.baseline]
    assert len(designs) == 4 * 3 and grid.seeds == (0, 1, 2)
    assert "unified_parallel/engagement=0.3" in [v.name for v in designs]
    unified = next(v for v in designs if v.name == "unified_parallel/engagement=0.3")
    assert unified.overrides == (
        "levers=none",  # the bare designs (conf/ablate/designs.yaml)
        "+experiment=unified_parallel",
        "loss.task_weights.engagement=0.3",
    )
    assert {v.name for v in grid.variants if v.baseline} == {"engagement_only", "conversion_only"}
    assert grid.folds == 1 and grid.select_k == 100


def test_select_seeds_and_variants():
    grid = ablate.load_grid("designs")
    chosen = ablate.select(grid, [5], ["*/engagement=0.3", "engagement_only"])
    assert chosen.seeds == (5,)
    assert len(chosen.variants) == 5
    with pytest.raises(ConfigError, match="matches none"):
        ablate.select(grid, None, ["nothing*"])
    assert ablate.parse_seeds("0, 1,2") == [0, 1, 2]
    with pytest.raises(ConfigError, match="comma-separated integers"):
        ablate.parse_seeds("0,x")
    cmd = reproduce_command(chosen, ["data.dir=/a b"], ["*/engagement=0.3"])
    assert cmd == "convcg ablate designs 'data.dir=/a b' --seeds 5 --variants '*/engagement=0.3'"


def _hits(rng, model_rate: float, n_users: int = 60) -> PositiveHits:
    """Hit flags on 3 positives per user at k = 10, 100: the model's and popularity's."""
    users = np.repeat(np.arange(n_users), 3)
    popular = rng.random((len(users), 1)) < 0.2
    model = popular | (rng.random((len(users), 1)) < model_rate)
    rankings = {"model": np.hstack([model, model]), "baseline_popularity": np.hstack([popular, popular])}
    return PositiveHits((10, 100), np.arange(len(users)), users, rankings)


def _fake_children() -> list[ChildResult]:
    rng = np.random.default_rng(0)

    def metrics(base: float, val: float) -> dict[str, float]:
        out = {"val/conversion/recall_at_100": val}
        for task in ("conversion", "engagement"):
            for k in (10, 100):
                out[f"heldout/{task}/recall_at_{k}"] = base * k / 100
                out[f"heldout/baseline_popularity/{task}/recall_at_{k}"] = 0.1 * k / 100
                out[f"heldout/baseline_popularity/{task}/recall_at_{k}_ci_low"] = 0.08 * k / 100
                out[f"heldout/baseline_popularity/{task}/recall_at_{k}_ci_high"] = 0.12 * k / 100
        return out

    # "c" has the best held-out recall but the worse validation figure: "a" must be selected.
    return [
        ChildResult("a", 0, "r1", "FINISHED", metrics(0.30, 0.5), hits=_hits(rng, 0.4)),
        ChildResult("c", 0, "r5", "FINISHED", metrics(0.60, 0.2), hits=_hits(rng, 0.0)),
        ChildResult("a", 1, "r2", "FINISHED", metrics(0.34, 0.6), hits=_hits(rng, 0.4)),
        ChildResult("c", 1, "r6", "FINISHED", metrics(0.62, 0.3), hits=_hits(rng, 0.0)),
        ChildResult("b", 0, "r3", "FINISHED", metrics(0.20, 0.1)),
        ChildResult("b", 1, None, "FAILED", error="ConfigError: boom | bad"),
    ]


def test_summary_report_and_figure_without_training(tmp_path):
    variants = (Variant("a", ()), Variant("c", ()), Variant("b", (), baseline=True))
    grid = ablate.Grid("toy", variants, (0, 1))
    children = _fake_children()
    pairing = ablate_summary.Pairing(n_boot=300)
    summary = ablate_summary.build_summary(grid, children, "heldout", [10, 100], pairing)
    rows = summary.rows[0]
    assert [(r.name, r.kind, r.n, r.n_failed) for r in rows] == [
        ("a", ablate_summary.DESIGN, 2, 0),
        ("c", ablate_summary.DESIGN, 2, 0),
        ("b", ablate_summary.TRAINED_BASELINE, 1, 1),
        ("popularity", ablate_summary.FIXED_BASELINE, 1, 0),
    ]
    assert rows[0].mean[("conversion", 100)] == pytest.approx(0.32)
    assert rows[0].validation == pytest.approx(0.55)
    assert ablate_summary.selected_variant(rows).name == "a"  # by validation, not by held-out recall
    by_pair = {(c.variant, c.baseline, c.seed): c.difference for c in summary.comparisons}
    assert set(by_pair) == {(v, "popularity", s) for v in "ac" for s in (0, 1)}  # b has no hits
    assert by_pair[("a", "popularity", 0)].above_zero and by_pair[("a", "popularity", 1)].above_zero
    assert by_pair[("c", "popularity", 0)].difference == 0.0  # c ranks exactly like popularity

    context = {"command": "convcg ablate toy", "parent_run_id": "p", "tracking_uri": "x", "split": "heldout"}
    report = ablate_report.render_report(grid, summary, {**context, "data_dirs": ["/d"]})
    lines = report.splitlines()
    assert lines[0] == "# Ablation `toy`" and "convcg ablate toy" in lines[:8]
    assert "| a | design | 2 | 0.5500 | 0.0320 ± 0.0254 | 0.3200 ± 0.2541 |" in report
    assert "| b | baseline (two-tower) | 1 (**1 failed**) | 0.1000 | 0.0200 | 0.2000 |" in report
    assert "| popularity | baseline (no training) | – | – | 0.0100 [0.0080, 0.0120] |" in report
    assert "Selected on the **validation** split: **a**" in report
    assert "- vs popularity: **beats**" in report
    assert "| c | 0.2500 | +0.0000 (CI > 0 on 0 of 2 seeds) |" in report
    assert "## Failed runs" in report and "ConfigError: boom \\| bad" in report
    json_summary = ablate_report.summary_json(grid, summary)
    assert json_summary["selection"] == {"split": "val", "metric": "val/conversion/recall_at_100"}
    assert json_summary["folds"][0]["selected"] == "a" and len(json_summary["comparisons"]) == 4
    png = plot_recall(rows, [10, 100], tmp_path / "recall.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def _with_value_and_cold(children: list[ChildResult]) -> list[ChildResult]:
    """The fake children with value and cold-item recall: the designs' and popularity's (not b's)."""
    out = []
    for child in children:
        extra = {"heldout/baseline_popularity/conversion/cold/recall_at_100": 0.005}
        if child.variant != "b" and child.status == "FINISHED":
            base = child.metrics["heldout/conversion/recall_at_100"]
            extra["heldout/conversion/value_recall_at_100"] = base + 0.1
            extra["heldout/conversion/cold/recall_at_100"] = base / 10 + 0.01 * child.seed
        out.append(replace(child, metrics={**child.metrics, **extra}))
    return out


def test_report_shows_value_and_cold_item_recall_only_where_runs_logged_them():
    variants = (Variant("a", ()), Variant("c", ()), Variant("b", (), baseline=True))
    grid = ablate.Grid("toy", variants, (0, 1))
    context = {"command": "x", "parent_run_id": "p", "tracking_uri": "x", "split": "heldout", "data_dirs": []}
    pairing = ablate_summary.Pairing(n_boot=0)
    plain = ablate_summary.build_summary(grid, _fake_children(), "heldout", [10, 100], pairing)
    plain_report = ablate_report.render_report(grid, plain, context)
    assert "value recall" not in plain_report and "cold-item" not in plain_report
    assert all("extras" not in r for r in ablate_report.summary_json(grid, plain)["folds"][0]["rows"])

    summary = ablate_summary.build_summary(
        grid, _with_value_and_cold(_fake_children()), "heldout", [10, 100], pairing
    )
    report = ablate_report.render_report(grid, summary, context)
    # Recall tables are as before, with the extra columns appended (conversion only: engagement has none).
    assert "| recall@10 | recall@100 | value recall@100 | cold-item recall@100 |" in report
    assert (
        "| a | design | 2 | 0.5500 | 0.0320 ± 0.0254 | 0.3200 ± 0.2541 | 0.4200 ± 0.2541 | 0.0370 ± 0.0889 |"
        in report
    )
    assert "| b | baseline (two-tower) | 1 (**1 failed**) | 0.1000 | 0.0200 | 0.2000 | – | – |" in report
    assert (
        "| popularity | baseline (no training) | – | – | 0.0100 [0.0080, 0.0120] | "
        "0.1000 [0.0800, 0.1200] | – | 0.0050 |" in report
    )
    engagement = report.split("Engagement recall")[1].split("##")[0]
    assert "cold-item" not in engagement
    rows = ablate_report.summary_json(grid, summary)["folds"][0]["rows"]
    assert rows[0]["extras"]["conversion/cold/recall_at_100"]["mean"] == pytest.approx(0.037)
    assert set(rows[0]["extras"]) == {"conversion/value_recall_at_100", "conversion/cold/recall_at_100"}
    assert "extras" not in rows[2]


def test_paired_comparison_with_a_trained_baseline_and_the_verdict():
    rng = np.random.default_rng(1)
    grid = ablate.Grid("toy", (Variant("a", ()), Variant("b", (), baseline=True)), (0, 1), select_k=10)
    trained = [ChildResult("b", s, f"b{s}", "FINISHED", hits=_hits(rng, 0.0)) for s in (0, 1)]
    design = [ChildResult("a", s, f"a{s}", "FINISHED", hits=_hits(rng, 0.5)) for s in (0, 1)]
    comparisons = ablate_summary.paired_comparisons(grid, design + trained, ablate_summary.Pairing(200))
    assert {(c.baseline, c.seed) for c in comparisons} == {
        (b, s) for b in ("popularity", "b") for s in (0, 1)
    }
    assert all(c.difference.k == 10 and c.difference.above_zero for c in comparisons)
    mine = [c for c in comparisons if c.baseline == "b"]
    assert ablate_summary.verdict(mine, grid.seeds) == "beats"
    assert ablate_summary.verdict(mine[:1], grid.seeds) == "CI > 0 on 1 of 2 seeds"
    assert ablate_summary.paired_comparisons(grid, design + trained, ablate_summary.Pairing(0)) == []


def test_folds_add_the_end_offset_override_and_are_reported():
    assert fold_overrides(0, 2) == () and fold_overrides(2, 2) == ("data.end_offset_days=4",)
    cell = Cell(Variant("a", ("+experiment=unified_parallel",)), seed=3, fold=1)
    assert child_overrides(cell, ["data.dir=/d"], heldout_days=2) == [
        "+experiment=unified_parallel",
        "data.dir=/d",
        "data.end_offset_days=2",
        "seed=3",
    ]
    assert cell.run_name == "a/seed=3/fold=1"
    grid = ablate.Grid("toy", (Variant("a", ()),), (0,), folds=2)
    assert [(c.fold, c.seed) for c in cells(grid)] == [(0, 0), (1, 0)]
    children = _fake_children()[:1] + [replace(_fake_children()[0], fold=1, run_id="r9")]
    summary = ablate_summary.build_summary(grid, children, "heldout", [10, 100], ablate_summary.Pairing(100))
    report = ablate_report.render_report(
        grid,
        summary,
        {"command": "c", "parent_run_id": "p", "tracking_uri": "x", "split": "heldout", "data_dirs": []},
    )
    assert "## Fold 0 (the latest held-out days)" in report and "## Fold 1 (data.end_offset_days" in report
    assert {c.fold for c in summary.comparisons} == {0, 1}


def _fold_child(variant: str, fold: int, val: float, hits: PositiveHits, seed: int = 0) -> ChildResult:
    metrics = {"val/conversion/recall_at_100": val, "heldout/conversion/recall_at_100": 0.9 - val}
    return ChildResult(variant, seed, f"{variant}{fold}{seed}", "FINISHED", metrics, fold=fold, hits=hits)


def test_pooled_verdict_takes_each_folds_validation_choice_and_resamples_users_across_folds():
    """All folds together: per seed, the design validation chose in each fold (not the one with the
    better held-out figure), users as clusters across folds, equal to a brute-force bootstrap loop."""
    from convcg_cli.metrics.bootstrap import resample_weights

    rng = np.random.default_rng(3)
    grid = ablate.Grid("toy", (Variant("a", ()), Variant("c", ())), (0,), select_k=100, folds=2)
    fold0, fold1 = _hits(rng, 0.3), _hits(rng, 0.5)
    fold1 = replace(fold1, user=fold1.user + 30)  # users 30..59 hold positives in both folds
    children = [
        _fold_child("a", 0, 0.6, fold0),
        _fold_child("c", 0, 0.5, _hits(rng, 0.9)),
        _fold_child("a", 1, 0.4, _hits(rng, 0.9)),
        _fold_child("c", 1, 0.7, fold1),
    ]
    summary = ablate_summary.build_summary(
        grid, children, "heldout", [10, 100], ablate_summary.Pairing(300, 7)
    )
    (pooled,) = summary.pooled
    assert pooled.variants == ("a", "c") and pooled.baseline == "popularity" and pooled.positives == 360

    model = np.concatenate([fold0.rankings["model"][:, 1], fold1.rankings["model"][:, 1]])
    base = np.concatenate([f.rankings["baseline_popularity"][:, 1] for f in (fold0, fold1)])
    users = np.concatenate([fold0.user, fold1.user])
    ids = np.unique(users)
    assert len(ids) == 90  # one unit per person, not one per (person, fold)
    diffs = []
    for draw in np.concatenate(list(resample_weights(len(ids), 300, 7))):
        weight = dict(zip(ids.tolist(), draw.tolist(), strict=True))
        per_positive = np.array([weight[u] for u in users.tolist()], dtype=float)
        diffs.append((per_positive @ model - per_positive @ base) / per_positive.sum())
    low, high = np.percentile(diffs, [2.5, 97.5])
    assert pooled.difference.difference == pytest.approx((model.sum() - base.sum()) / len(model))
    assert (pooled.difference.low, pooled.difference.high) == pytest.approx((low, high))

    context = {"command": "c", "parent_run_id": "p", "tracking_uri": "x", "split": "heldout", "data_dirs": []}
    report = ablate_report.render_report(grid, summary, context)
    assert "## All 2 held-out windows together" in report and "fold 1: **c**" in report
    assert ablate_report.summary_json(grid, summary)["pooled"][0]["variants"] == ["a", "c"]


def test_pooled_verdict_needs_every_folds_selected_cell_and_several_folds():
    rng = np.random.default_rng(4)
    grid = ablate.Grid("toy", (Variant("a", ()),), (0, 1), select_k=100, folds=2)
    children = [_fold_child("a", f, 0.5, _hits(rng, 0.4), seed=s) for f in (0, 1) for s in (0, 1)]
    pairing = ablate_summary.Pairing(100)
    summary = ablate_summary.build_summary(grid, children, "heldout", [100], pairing)
    assert {c.seed for c in summary.pooled} == {0, 1}
    summary = ablate_summary.build_summary(grid, children[:-1], "heldout", [100], pairing)
    assert {c.seed for c in summary.pooled} == {0}  # seed 1 has no fold-1 cell
    one_fold = replace(grid, folds=1)
    summary = ablate_summary.build_summary(one_fold, children[:2], "heldout", [100], pairing)
    assert summary.pooled == [] and "pooled" not in ablate_report.summary_json(one_fold, summary)
    context = {"command": "c", "parent_run_id": "p", "tracking_uri": "x", "split": "heldout", "data_dirs": []}
    assert "held-out windows together" not in ablate_report.render_report(one_fold, summary, context)


def test_validation_figure_is_the_kept_checkpoints():
    monitor = [(10, 0.2), (20, 0.5), (30, 0.5), (40, 0.4)]
    assert value_at_best_epoch(monitor, [(10, 0.1), (20, 0.3), (30, 0.9), (40, 0.2)], "max") == 0.3
    assert value_at_best_epoch(monitor, [(10, 0.1), (20, 0.3)], "min") == 0.1
    assert value_at_best_epoch([], [(1, 0.7), (2, 0.8)], "max") == 0.8
    assert np.isnan(value_at_best_epoch(monitor, [], "max"))


def test_failed_evaluation_marks_the_child_failed_and_the_grid_goes_on(home):
    """Fake training (a real, empty MLflow run) and an evaluation that fails for one variant."""

    def fake_train(composed):
        with tracking.tracked_run(
            tracking.Store.from_config(composed.cfg.logger),
            composed.cfg,
            composed.choices,
            composed.overrides,
        ) as run:
            pass
        return TrainResult(run.run_id, home / "none.ckpt", {})

    def fake_evaluate(composed, run_id, baseline_cache):
        variant = _client(home).get_run(run_id).data.tags["variant"]
        if variant == "engagement_only":
            raise RuntimeError("evaluation exploded")
        return EvalResult(run_id, "heldout", {"heldout/conversion/recall_at_100": 0.5})

    grid = ablate.select(ablate.load_grid("smoke"), [0])
    result = ablate.run_ablation(grid, [], train_fn=fake_train, evaluate_fn=fake_evaluate)
    assert [c.status for c in result.children] == ["FINISHED", "FAILED"]
    failed = _client(home).get_run(result.children[1].run_id)
    assert failed.info.status == "FAILED" and "evaluation exploded" in failed.data.tags["error"]
    assert (result.report_dir / "report.md").exists()


def test_smoke_grid_end_to_end(home, tiny_overrides, tmp_path_factory):
    """One seed of the smoke grid plus a variant that cannot train, on the tiny logs."""
    smoke = ablate.select(ablate.load_grid("smoke"), [0])
    broken = Variant("broken", ("+experiment=unified_parallel", "trainer.accelerator=no_such_device"))
    grid = replace(smoke, variants=(*smoke.variants, broken))
    result = ablate.run_ablation(grid, tiny_overrides)

    client = _client(home)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["failed_children"] == "1"
    children = tracking.child_runs(
        tracking.Store.from_config(compose("eval").cfg.logger), result.parent_run_id
    )
    assert sorted((r.data.tags["variant"], r.info.status) for r in children) == [
        ("broken", "FAILED"),
        ("engagement_only", "FINISHED"),
        ("unified_parallel", "FINISHED"),
    ]
    assert {c.variant: c.run_id for c in result.children}["broken"] in {r.info.run_id for r in children}
    done = next(r for r in children if r.data.tags["variant"] == "unified_parallel")
    metrics = done.data.metrics  # the model's own, leanly named; the baselines are runs of their own
    low, high = "heldout_ci/conversion/recall_at_100_ci_low", "heldout_ci/conversion/recall_at_100_ci_high"
    assert metrics[low] <= metrics["heldout/conversion/recall_at_100"] <= metrics[high]
    assert not any("baseline" in name for name in metrics)
    assert "heldout_by_surface/search/conversion/recall_at_100" in metrics
    downloads = tmp_path_factory.mktemp("downloads")
    eval_store = tracking.Store.from_config(compose("eval").cfg.logger)
    full = tracking.read_json_artifact(eval_store, done.info.run_id, "eval/heldout_metrics.json", downloads)
    name = "heldout/baseline_itemcf/conversion/recall_at_100"
    assert full[f"{name}_ci_low"] <= full[name] <= full[f"{name}_ci_high"]
    assert "heldout/by_surface/search/conversion/recall_at_100_ci_low" in full
    baseline_runs = client.search_runs(
        [done.info.experiment_id], filter_string="tags.kind = 'baseline'", order_by=["attributes.start_time"]
    )
    assert sorted(r.data.tags["baseline"] for r in baseline_runs) == ["itemcf", "popularity"]  # scored once
    itemcf = next(r for r in baseline_runs if r.data.tags["baseline"] == "itemcf")
    assert itemcf.data.metrics["heldout/conversion/recall_at_100"] == pytest.approx(full[name])

    hits_file = tracking.download_artifact(eval_store, done.info.run_id, "eval/heldout_hits.npz", downloads)
    hits = load_hits(hits_file)["conversion"]
    assert set(hits.rankings) == {"model", "baseline_popularity", "baseline_itemcf"} and hits.ks == (
        10,
        50,
        100,
        1000,
    )
    assert hits.rankings["model"].mean(axis=0)[2] == pytest.approx(
        metrics["heldout/conversion/recall_at_100"]
    )

    report = (result.report_dir / "report.md").read_text()
    assert "Selected on the **validation** split: **unified_parallel**" in report
    assert report.splitlines()[5].startswith("convcg ablate smoke data.dir=")
    assert "| broken | design | 0 (**1 failed**) |" in report and "## Failed runs" in report
    assert "| itemcf | baseline (no training) |" in report
    # The pre-registered verdict (conf/ablate/smoke.yaml's primary), with the grid file's hash.
    assert "## Primary comparison" in report and f"sha256 `{grid.sha256}`" in report
    primary = json.loads((result.report_dir / "summary.json").read_text())["primary"]
    assert {p["against"] for p in primary} == {"engagement_only", "popularity"}
    # every finished cell's own figures, to check it by retraining it (issue 21 point 4)
    cells = json.loads((result.report_dir / "summary.json").read_text())["children"]
    figures = next(c for c in cells if c["variant"] == "unified_parallel")["figures"]
    assert {
        "val/conversion/recall_at_100",
        "val/engagement/recall_at_1000",
        "heldout/conversion/recall_at_10",
        "heldout/engagement/recall_at_1000",
        "kept_epoch",
    } <= set(figures)
    assert figures["kept_epoch"] == 0.0  # one epoch: the kept checkpoint is epoch 0
    assert (result.report_dir / "recall.png").exists()
    artifacts = {a.path for a in client.list_artifacts(result.parent_run_id, "report")}
    assert {"report/report.md", "report/recall.png", "report/summary.json"} <= artifacts

    # --report-only: the same report again from the runs alone, nothing trained
    written = (result.report_dir / "report.md").read_text()
    (result.report_dir / "report.md").unlink()
    summary_written = (result.report_dir / "summary.json").read_text()
    again = ablate.rewrite_report(grid, result.parent_run_id, tiny_overrides)
    assert (again.report_dir / "report.md").read_text() == written
    assert (again.report_dir / "summary.json").read_text() == summary_written
    assert (
        len(tracking.child_runs(tracking.Store.from_config(compose("eval").cfg.logger), result.parent_run_id))
        == 3
    )


def test_cli_routing_and_errors(home):
    help_text = runner.invoke(app, ["ablate", "--help"]).output
    assert "conf/ablate/GRID.yaml" in help_text and "--seeds" in help_text
    unknown = runner.invoke(app, ["ablate", "nope"])
    assert unknown.exit_code == 2 and "Unknown ablation grid 'nope'" in unknown.output
    bad_seeds = runner.invoke(app, ["ablate", "smoke", "--seeds", "one"])
    assert bad_seeds.exit_code == 2 and "comma-separated integers" in bad_seeds.output
    typo = runner.invoke(app, ["ablate", "smoke", "trainer.max_epoch=1"])
    assert typo.exit_code == 2 and "max_epoch" in typo.output and "Traceback" not in typo.output
    assert runs_in(home) == []  # every config is checked before the parent run


def test_cli_passes_grid_seeds_variants_and_overrides_to_run_ablation(home, monkeypatch):
    calls = []

    def fake_run_ablation(grid, overrides, patterns):
        calls.append((grid, overrides, patterns))
        failed = ChildResult("unified_parallel", 5, None, "FAILED", error="boom")
        return ablate.AblationResult("parent123", home / "reports" / "smoke", [failed], [])

    monkeypatch.setattr(ablate, "run_ablation", fake_run_ablation)
    result = runner.invoke(
        app, ["ablate", "smoke", "trainer.max_epochs=1", "--seeds", "5", "--variants", "unified_*"]
    )
    assert result.exit_code == 1, result.output  # a failed cell fails the command
    ((grid, overrides, patterns),) = calls
    assert (
        grid.name == "smoke"
        and grid.seeds == (5,)
        and [v.name for v in grid.variants] == ["unified_parallel"]
    )
    assert overrides == ["trainer.max_epochs=1"] and patterns == ["unified_*"]
    assert "MLflow parent run id: parent123" in result.output and "1 of 1 runs failed" in result.output


@pytest.mark.slow
def test_cli_runs_the_smoke_grid(home, tiny_overrides):
    result = runner.invoke(app, ["ablate", "smoke", *tiny_overrides])
    assert result.exit_code == 0, result.output
    assert "MLflow parent run id:" in result.output
    report = (home / "reports" / "smoke" / "report.md").read_text()
    assert (
        "| unified_parallel | design | 2 |" in report and "4 of 4 planned runs finished, 0 failed" in report
    )


def test_grid_train_overrides_come_first_in_every_variant():
    grid = ablate.load_grid("kuairand")
    common = ("levers=none", "data.use_user_history=true", "data.cofactors.dim=64")
    assert all(v.overrides[:3] == common for v in grid.variants)
    assert {v.name for v in grid.variants} >= {"unified_parallel/engagement=1.0", "conversion_only"}


def _launcher_case(name: str):
    missing = name == "joblib" and not hydra_plugin_installed("hydra_joblib_launcher")
    reason = "the joblib launcher is an extra: pip install 'convcg[joblib]'"
    return pytest.param(name, marks=[pytest.mark.skipif(missing, reason=reason)])


@pytest.mark.slow
@pytest.mark.parametrize("launcher", [_launcher_case("basic"), _launcher_case("joblib")])
def test_cells_through_a_hydra_launcher_give_the_sequential_figures(
    home, tiny_overrides, tmp_path_factory, empty_mlflow_store, monkeypatch, launcher, fresh_joblib_workers
):
    """``convcg ablate smoke hydra/launcher=...``: the cells run as Hydra jobs (joblib: 2 worker
    processes), the report is built from their runs and matches the in-process grid's."""
    grid = ablate.select(ablate.load_grid("smoke"), [0])
    launched = runner.invoke(
        app, ["ablate", "smoke", "--seeds", "0", *tiny_overrides, f"hydra/launcher={launcher}"]
    )
    assert launched.exit_code == 0, launched.output
    trained = [r for r in runs_in(home) if r.data.tags.get("kind") != "baseline"]
    assert len(trained) == 3  # the parent and its 2 cells (the baselines are runs of their own)
    summary = (home / "reports" / "smoke" / "summary.json").read_text()
    assert not list(home.glob("outputs/ablate/*/data"))  # the jobs' shared set-up data are removed

    sequential_home = tmp_path_factory.mktemp("sequential")
    shutil.copyfile(empty_mlflow_store, sequential_home / "mlflow.db")
    monkeypatch.setenv("CONVCG_HOME", str(sequential_home))
    ablate.run_ablation(grid, tiny_overrides)
    expected = (sequential_home / "reports" / "smoke" / "summary.json").read_text()

    def figures(text: str) -> str:
        return "\n".join(line for line in text.splitlines() if "run_id" not in line)

    assert figures(summary) == figures(expected)


def test_cli_hands_launcher_overrides_to_the_grid_and_the_rest_to_training(home, monkeypatch):
    calls = []

    def fake_run_ablation(grid, overrides, patterns, launcher_overrides=()):
        calls.append((overrides, list(launcher_overrides)))
        return ablate.AblationResult("parent123", home / "reports" / "smoke", [], [])

    monkeypatch.setattr(ablate, "run_ablation", fake_run_ablation)
    args = ["ablate", "smoke", "trainer.max_epochs=1", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert calls == [(["trainer.max_epochs=1"], ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"])]


def test_a_refit_grid_reports_its_one_design_chosen_by_the_other_grid():
    rng = np.random.default_rng(1)
    children = [
        ChildResult(
            "refit",
            seed,
            f"r{seed}",
            "FINISHED",
            {"heldout/conversion/recall_at_100": 0.4},
            hits=_hits(rng, 0.4),
        )
        for seed in (0, 1)
    ]
    grid = ablate.Grid("toy_refit", (Variant("refit", ()),), (0, 1), refit_of="kuairand_folds")
    summary = ablate_summary.build_summary(
        grid, children, "heldout", [100], ablate_summary.Pairing(n_boot=50)
    )
    rows = summary.rows[0]
    assert ablate_summary.selected_variant(rows) is None  # no validation figure of its own
    assert ablate_summary.selected_variant(rows, grid).name == "refit"
    context = {"command": "c", "parent_run_id": "p", "tracking_uri": "x", "split": "heldout", "data_dirs": []}
    report = ablate_report.render_report(grid, summary, context)
    assert "by grid `kuairand_folds`" in report and "vs popularity" in report
    assert ablate.load_grid("kuairand_refit").refit_of == "kuairand_folds"


def test_refit_of_needs_a_known_grid_and_one_design():
    one, two = (Variant("a", ()),), (Variant("a", ()), Variant("b", ()))
    assert check_refit_of("g", "kuairand_folds", one) == "kuairand_folds"
    assert check_refit_of("g", None, two) is None
    with pytest.raises(ConfigError, match="exactly one design"):
        check_refit_of("g", "kuairand_folds", two)
    with pytest.raises(ConfigError, match="must name a grid"):
        check_refit_of("g", "no_such_grid", one)


def test_data_set_up_once_per_grid_give_the_figures_of_data_set_up_per_cell(
    home, tiny_overrides, tmp_path_factory, empty_mlflow_store, monkeypatch
):
    """The smoke grid (2 variants x 2 seeds) with the data set up once per distinct data options
    (``reuse_data``) reports the same figures as with the data set up for every training and every
    evaluation; the baselines are scored once per grid either way."""
    from convcg_cli import progress
    from convcg_cli.data.loading import datamodules as datamodule

    reads: list = []
    original = datamodule.load_tables

    def counting(*args, **kwargs):
        reads.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(datamodule, "load_tables", counting)
    grid = ablate.select(ablate.load_grid("smoke"), [0, 1])
    summaries, scored, per_cell = {}, {}, {}
    for reuse_data in (True, False):
        store = tmp_path_factory.mktemp(f"reuse-{reuse_data}")
        shutil.copyfile(empty_mlflow_store, store / "mlflow.db")
        monkeypatch.setenv("CONVCG_HOME", str(store))
        reads.clear()
        with progress.recorded() as steps:
            result = ablate.run_ablation(grid, tiny_overrides, reuse_data=reuse_data)
        assert result.n_failed == 0
        summaries[reuse_data] = (store / "reports" / "smoke" / "summary.json").read_text()
        per_cell[reuse_data] = {(c.variant, c.seed): c.metrics for c in result.children}
        scored[reuse_data] = sorted(name for name, _ in steps if name.startswith("Scoring baseline"))
        if reuse_data:  # the two variants read the same data with the same options: one set-up
            assert len(reads) == 1
        else:  # every training and every evaluation sets its data up
            assert len(reads) == 2 * 4

    def figures(text: str) -> str:
        return "\n".join(line for line in text.splitlines() if "run_id" not in line)

    assert per_cell[True] == per_cell[False]  # every figure of every cell, exactly
    assert figures(summaries[True]) == figures(summaries[False])
    assert scored[True] == scored[False] == ["Scoring baseline itemcf", "Scoring baseline popularity"]


def test_baselines_and_data_are_set_up_once_per_fold(home, tiny_overrides, monkeypatch):
    """Two folds of one seed of the smoke grid: each fold (its own split) sets its data up once and
    scores its baselines once; its second variant and its evaluations reuse both."""
    from convcg_cli import progress
    from convcg_cli.data.loading import datamodules as datamodule

    reads: list = []
    original = datamodule.load_tables
    monkeypatch.setattr(datamodule, "load_tables", lambda *a, **k: reads.append(a[0]) or original(*a, **k))
    grid = replace(ablate.select(ablate.load_grid("smoke"), [0]), folds=2)
    with progress.recorded() as steps:
        result = ablate.run_ablation(grid, tiny_overrides)
    assert result.n_failed == 0 and len(result.children) == 4
    assert len(reads) == 2
    scored = sorted(name for name, _ in steps if name.startswith(("Scoring baseline", "Reading baseline")))
    assert scored == 2 * ["Scoring baseline itemcf"] + 2 * ["Scoring baseline popularity"]


def test_a_grid_of_the_users_config_dir_is_found(tmp_path, monkeypatch):
    (tmp_path / "ablate").mkdir()
    (tmp_path / "ablate" / "mine.yaml").write_text(
        "seeds: [0]\nvariants:\n  - {name: a, overrides: [+experiment=unified_parallel]}\n"
    )
    assert "mine" not in ablate.available_grids()
    monkeypatch.setenv("CONVCG_CONFIG_DIR", str(tmp_path))
    assert "mine" in ablate.available_grids() and "smoke" in ablate.available_grids()
    assert [v.name for v in ablate.load_grid("mine").variants] == ["a"]


def test_the_primary_comparison_pools_folds_and_seeds_and_is_printed_first():
    """A grid's pre-registered comparison: the design chosen per fold against an untrained baseline and
    against a trained baseline variant, every seed at once, with the grid file's hash and the commit."""
    from convcg_cli.metrics.hierarchical import hierarchical_paired_diff

    rng = np.random.default_rng(5)
    variants = (Variant("a", ()), Variant("c", ()), Variant("eng", (), baseline=True))
    grid = ablate.Grid("toy", variants, (0, 1), select_k=100, folds=2, primary=("popularity", "eng"))
    children = []
    for seed in (0, 1):
        for fold in (0, 1):
            shared = _hits(rng, 0.0)  # the positives and popularity's flags of this (fold, seed)
            for name, val, rate in (
                ("a", 0.6 - 0.3 * fold, 0.5),
                ("c", 0.4 + 0.3 * fold, 0.4),
                ("eng", 0.1, 0.3),
            ):
                model = shared.rankings["baseline_popularity"] | (rng.random((len(shared.user), 1)) < rate)
                hits = replace(shared, rankings={**shared.rankings, "model": np.hstack([model, model])})
                children.append(_fold_child(name, fold, val, hits, seed=seed))
    summary = ablate_summary.build_summary(
        grid, children, "heldout", [10, 100], ablate_summary.Pairing(200, 3)
    )
    by_name = {c.against: c for c in summary.primary}
    assert set(by_name) == {"popularity", "eng"}
    assert by_name["eng"].variants == ("a", "c") and by_name["eng"].seeds == (0, 1)

    def cell(name, fold, seed):
        return next(c for c in children if (c.variant, c.fold, c.seed) == (name, fold, seed))

    chosen = [("a", 0), ("c", 1)]
    model = np.stack(
        [np.concatenate([cell(n, f, s).hits.rankings["model"][:, 1] for n, f in chosen]) for s in (0, 1)]
    )
    eng = np.stack(
        [np.concatenate([cell("eng", f, s).hits.rankings["model"][:, 1] for _, f in chosen]) for s in (0, 1)]
    )
    users = np.concatenate([cell(n, f, 0).hits.user for n, f in chosen])
    expected = hierarchical_paired_diff(model, eng, users, 100, n_boot=200, seed=3)
    assert by_name["eng"].difference == expected and by_name["eng"].positives == len(users)

    context = {
        "command": "c",
        "parent_run_id": "p",
        "tracking_uri": "x",
        "split": "heldout",
        "data_dirs": [],
        "grid_sha256": "abc123",
        "commit": "deadbeef",
    }
    report = ablate_report.render_report(grid, summary, context)
    assert "sha256 `abc123`, convcg commit `deadbeef`" in report
    primary_at = report.index("## Primary comparison")
    assert primary_at < report.index("Conversion recall (heldout)")  # before every secondary result
    assert primary_at < report.index("held-out windows together")
    out = ablate_report.summary_json(grid, summary)
    assert {p["against"] for p in out["primary"]} == {"popularity", "eng"}
    assert out["children"][0]["figures"] == {
        "val/conversion/recall_at_100": children[0].metrics["val/conversion/recall_at_100"],
        "heldout/conversion/recall_at_100": children[0].metrics["heldout/conversion/recall_at_100"],
    }


def test_a_grid_declares_its_primary_comparison_and_is_hashed(tmp_path, monkeypatch):
    import hashlib

    text = (
        "seeds: [0]\nvariants:\n  - {name: a, overrides: []}\n  - {name: e, baseline: true, overrides: []}\n"
        "primary: {against: [e, ease_popularity]}\n"
    )
    (tmp_path / "ablate").mkdir()
    (tmp_path / "ablate" / "pre.yaml").write_text(text)
    monkeypatch.setenv("CONVCG_CONFIG_DIR", str(tmp_path))
    grid = ablate.load_grid("pre")
    assert grid.primary == ("e", "ease_popularity")
    assert grid.sha256 == hashlib.sha256(text.encode()).hexdigest()
    assert grid.declared == ""  # no header comment
    (tmp_path / "ablate" / "pre.yaml").write_text("# Declared: a vs e.\n#\n# Left out: b.\n" + text)
    grid = ablate.load_grid("pre")
    assert grid.declared == "Declared: a vs e.\n\nLeft out: b."
    summary = ablate_summary.build_summary(grid, [], "heldout", [100], ablate_summary.Pairing(0, 0))
    context = {"command": "c", "parent_run_id": "p", "tracking_uri": "x", "split": "heldout", "data_dirs": []}
    quoted = ablate_report.render_report(grid, summary, {**context, "grid_sha256": grid.sha256})
    assert "> Declared: a vs e.\n>\n> Left out: b." in quoted
    changed = ablate_report.render_report(grid, summary, {**context, "grid_sha256": "0" * 64})
    assert "Left out: b." not in changed and "The grid file changed since this grid ran" in changed
    (tmp_path / "ablate" / "pre.yaml").write_text(text.replace("{against: [e, ease_popularity]}", "[e]"))
    with pytest.raises(ConfigError, match="primary must be"):
        ablate.load_grid("pre")
