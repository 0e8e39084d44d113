"""``convcg ablate``: grids compose, statistics and report, one parent run with child runs, CLI routing."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from convcg_cli import ablate, tracking
from convcg_cli.ablate import ChildResult, Variant
from convcg_cli.cli import app
from convcg_cli.config import compose
from convcg_cli.errors import ConfigError
from convcg_cli.train import TrainResult
from tests.conftest import runs_in

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
    assert unified.overrides == ("+experiment=unified_parallel", "loss.task_weights.engagement=0.3")
    assert {v.name for v in grid.variants if v.baseline} == {"engagement_only", "conversion_only"}


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
    cmd = ablate.reproduce_command(chosen, ["data.dir=/a b"], ["*/engagement=0.3"])
    assert cmd == "convcg ablate designs 'data.dir=/a b' --seeds 5 --variants '*/engagement=0.3'"


def test_t_interval():
    mean, low, high = ablate.t_interval([0.1, 0.2, 0.3])
    assert mean == pytest.approx(0.2)
    assert high - mean == pytest.approx(4.302653 * 0.1 / math.sqrt(3), rel=1e-6)
    assert low == pytest.approx(2 * mean - high)
    one = ablate.t_interval([0.4])
    assert one[0] == 0.4 and math.isnan(one[1]) and math.isnan(one[2])


def _fake_children() -> list[ChildResult]:
    def metrics(base: float) -> dict[str, float]:
        out = {}
        for task in ("conversion", "engagement"):
            for k in (10, 100):
                out[f"heldout/{task}/recall_at_{k}"] = base * k / 100
                out[f"heldout/baseline_popularity/{task}/recall_at_{k}"] = 0.1 * k / 100
                out[f"heldout/baseline_popularity/{task}/recall_at_{k}_ci_low"] = 0.08 * k / 100
                out[f"heldout/baseline_popularity/{task}/recall_at_{k}_ci_high"] = 0.12 * k / 100
        return out

    return [
        ChildResult("a", 0, "r1", "FINISHED", metrics(0.30)),
        ChildResult("a", 1, "r2", "FINISHED", metrics(0.34)),
        ChildResult("b", 0, "r3", "FINISHED", metrics(0.20)),
        ChildResult("b", 1, None, "FAILED", error="ConfigError: boom | bad"),
    ]


def test_summary_report_and_figure_without_training(tmp_path):
    grid = ablate.Grid("toy", (Variant("a", ()), Variant("b", (), baseline=True)), (0, 1))
    children = _fake_children()
    rows = ablate.summarize(grid, children, "heldout", [10, 100])
    assert [(r.name, r.kind, r.n, r.n_failed) for r in rows] == [
        ("a", ablate.DESIGN, 2, 0),
        ("b", ablate.TRAINED_BASELINE, 1, 1),
        ("popularity", ablate.FIXED_BASELINE, 1, 0),
    ]
    assert rows[0].mean[("conversion", 100)] == pytest.approx(0.32)
    context = {"command": "convcg ablate toy", "parent_run_id": "p", "tracking_uri": "x", "split": "heldout"}
    report = ablate.render_report(grid, rows, children, {**context, "data_dirs": ["/d"]})
    lines = report.splitlines()
    assert lines[0] == "# Ablation `toy`" and "convcg ablate toy" in lines[:8]
    assert "| a | design | 2 | 0.0320 ± 0.0254 | 0.3200 ± 0.2541 |" in report
    assert "| b | baseline (two-tower) | 1 (**1 failed**) | 0.0200 | 0.2000 |" in report
    assert "| popularity | baseline (no training) | – | 0.0100 [0.0080, 0.0120] |" in report
    assert "Best variant: **a**" in report and "Best baseline: **b**" in report
    assert "## Failed runs" in report and "ConfigError: boom \\| bad" in report
    png = ablate.plot_recall(rows, [10, 100], tmp_path / "recall.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_failed_evaluation_marks_the_child_failed_and_the_grid_goes_on(home):
    """Fake training (a real, empty MLflow run) and an evaluation that fails for one variant."""

    def fake_train(composed):
        with tracking.tracked_run(composed.cfg, composed.choices, composed.overrides) as run:
            pass
        return TrainResult(run.run_id, home / "none.ckpt", {})

    def fake_evaluate(composed, run_id, baseline_cache):
        variant = _client(home).get_run(run_id).data.tags["variant"]
        if variant == "engagement_only":
            raise RuntimeError("evaluation exploded")
        return type("R", (), {"metrics": {"heldout/conversion/recall_at_100": 0.5}})()

    grid = ablate.select(ablate.load_grid("smoke"), [0])
    result = ablate.run_ablation(grid, [], train_fn=fake_train, evaluate_fn=fake_evaluate)
    assert [c.status for c in result.children] == ["FINISHED", "FAILED"]
    failed = _client(home).get_run(result.children[1].run_id)
    assert failed.info.status == "FAILED" and "evaluation exploded" in failed.data.tags["error"]
    assert (result.report_dir / "report.md").exists()


def test_smoke_grid_end_to_end(home, tiny_overrides):
    """One seed of the smoke grid plus a variant that cannot train, on the tiny logs."""
    smoke = ablate.select(ablate.load_grid("smoke"), [0])
    broken = Variant("broken", ("+experiment=unified_parallel", "trainer.accelerator=no_such_device"))
    grid = replace(smoke, variants=(*smoke.variants, broken))
    result = ablate.run_ablation(grid, tiny_overrides)

    client = _client(home)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["failed_children"] == "1"
    children = tracking.child_runs(compose("eval").cfg.logger, result.parent_run_id)
    assert sorted((r.data.tags["variant"], r.info.status) for r in children) == [
        ("broken", "FAILED"),
        ("engagement_only", "FINISHED"),
        ("unified_parallel", "FINISHED"),
    ]
    assert {c.variant: c.run_id for c in result.children}["broken"] in {r.info.run_id for r in children}
    done = next(r for r in children if r.data.tags["variant"] == "unified_parallel")
    metrics = done.data.metrics
    for name in ("heldout/conversion/recall_at_100", "heldout/baseline_itemcf/conversion/recall_at_100"):
        assert metrics[f"{name}_ci_low"] <= metrics[name] <= metrics[f"{name}_ci_high"]
    assert "heldout/by_surface/search/conversion/recall_at_100_ci_low" in metrics

    report = (result.report_dir / "report.md").read_text()
    assert report.splitlines()[5].startswith("convcg ablate smoke data.dir=")
    assert "| broken | design | 0 (**1 failed**) |" in report and "## Failed runs" in report
    assert "| itemcf | baseline (no training) |" in report
    assert (result.report_dir / "recall.png").exists()
    artifacts = {a.path for a in client.list_artifacts(result.parent_run_id, "report")}
    assert {"report/report.md", "report/recall.png", "report/summary.json"} <= artifacts


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
