"""What a person sees in MLflow (issue 10), checked through MlflowClient.search_runs (the API the UI
reads): datasets, run names, readable params, lean metrics, baseline runs, figures, logging steps."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from convcg_cli import progress, tracking
from convcg_cli.config import compose
from convcg_cli.evaluate import evaluate, logged_metrics
from convcg_cli.train import train

MAX_METRICS_PER_RUN = 120  # was 402 with the baselines re-logged into every run


def _client(home) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{home.resolve()}/mlflow.db")


def test_trained_and_evaluated_runs_are_readable(home, tiny_data, tiny_overrides):
    """A trained run evaluated twice: datasets, name, params, lean metrics, one baseline run per
    baseline (scored once, reused by the second evaluation), figures."""
    overrides = [*tiny_overrides, "model.interference_every_n_steps=2", "+trainer.limit_val_batches=1"]
    run_id = train(compose("train", ["+experiment=unified_parallel", "seed=0", *overrides])).run_id
    eval_cfg = compose("eval", ["baselines=[popularity,itemcf]", "bootstrap.n_boot=20"])
    results = [evaluate(eval_cfg, run_id) for _ in range(2)]
    run_ids = [run_id]

    client = _client(home)
    exp = client.get_experiment_by_name("convcg").experiment_id
    runs = {r.info.run_id: r for r in client.search_runs([exp])}
    baseline_runs = [r for r in runs.values() if r.data.tags.get("kind") == "baseline"]
    assert sorted(r.data.tags["baseline"] for r in baseline_runs) == ["itemcf", "popularity"]
    assert {r.info.run_name for r in baseline_runs} == {
        f"baseline_{b} · {tiny_data.name} · heldout" for b in ("itemcf", "popularity")
    }
    digest = tracking.data_digest(tiny_data)
    for run in [runs[i] for i in run_ids] + baseline_runs:
        (dataset,) = {(d.dataset.name, d.dataset.digest) for d in run.inputs.dataset_inputs}
        assert dataset == (tiny_data.name, digest) and run.data.tags["data_digest"] == digest
        assert not any(k.endswith(("_target_", "_partial_")) for k in run.data.params)
        assert len(run.data.metrics) < MAX_METRICS_PER_RUN
    trained = runs[run_ids[0]]
    assert trained.info.run_name == f"unified_parallel s0 · {tiny_data.name}"
    assert trained.data.tags["kind"] == "trained" and trained.data.tags["design"] == "unified_parallel"
    assert (
        trained.data.metrics["r100_conversion_heldout"]
        == trained.data.metrics["heldout/conversion/recall_at_100"]
    )
    assert trained.data.params["head"] == "unified" and trained.data.params["cross"] == "parallel"
    assert trained.data.params["data.dir"] == str(tiny_data)
    # MLflow keeps one input per (run, dataset): evaluating on the training data adds none.
    assert {t.value for d in trained.inputs.dataset_inputs for t in d.tags} == {"training"}
    assert not any("baseline" in name or name.startswith("data/") for name in trained.data.metrics)
    assert "heldout/conversion/recall_at_100" in trained.data.metrics
    assert set(trained.data.tags["baseline_runs"].split(",")) == {r.info.run_id for r in baseline_runs}
    # What convcg eval returns still holds the baselines, under the names the reports read.
    assert "heldout/baseline_itemcf/conversion/recall_at_100" in results[1].metrics
    assert results[0].metrics["heldout/baseline_itemcf/conversion/recall_at_100"] == pytest.approx(
        results[1].metrics["heldout/baseline_itemcf/conversion/recall_at_100"]
    )

    artifacts = {a.path for d in ("eval", "figures") for a in client.list_artifacts(trained.info.run_id, d)}
    assert {"eval/heldout_recall.png", "figures/training.png", "figures/balancing.png"} <= artifacts
    # The cosine is logged at the steps it was computed (every 2nd), nothing stale in between.
    cosine = client.get_metric_history(trained.info.run_id, "train/grad_cosine/conversion_vs_engagement")
    assert [m.step for m in cosine] == [0, 2]
    assert len(client.get_metric_history(trained.info.run_id, "train/loss")) == 4  # every step of 4


def test_short_epochs_still_log_training_curves(home, tiny_overrides):
    """4 batches an epoch with the shipped log_every_n_steps=20: the curves are there anyway."""
    overrides = [o for o in tiny_overrides if not o.startswith("trainer.log_every_n_steps")]
    run_id = train(compose("train", [*overrides, "trainer.log_every_n_steps=20"])).run_id
    assert len(_client(home).get_metric_history(run_id, "train/loss")) == 4


def test_logged_metric_names_keep_the_headline_on_top():
    metrics = {
        "heldout/conversion/recall_at_100": 0.5,
        "heldout/conversion/recall_at_100_ci_low": 0.4,
        "heldout/by_surface/feed/conversion/recall_at_100": 0.6,
        "heldout/by_surface/feed/conversion/recall_at_100_ci_low": 0.5,
        "heldout/prior/beta": 0.1,
    }
    assert logged_metrics(metrics, "heldout") == {
        "heldout/conversion/recall_at_100": 0.5,
        "heldout_ci/conversion/recall_at_100_ci_low": 0.4,
        "heldout_by_surface/feed/conversion/recall_at_100": 0.6,
        "heldout/prior/beta": 0.1,
    }


def test_run_params_leave_out_hydra_plumbing_and_keep_what_the_user_set():
    composed = compose("train", ["+experiment=unified_parallel", "seed=3", "loss.temperature=0.07"])
    params = tracking.run_params(composed.cfg, composed.choices, composed.overrides)
    assert params["experiment"] == "unified_parallel" and params["head"] == "unified"
    assert params["seed"] == "3" and params["loss.temperature"] == "0.07"
    assert "loss.task_weights.conversion" in params
    assert not any("_target_" in k or "_partial_" in k for k in params)
    assert len(params) < 40


def test_data_digest_follows_the_bytes(tmp_path):
    (tmp_path / "items.parquet").write_bytes(b"a")
    (tmp_path / "notes.txt").write_text("not data")
    first = tracking.data_digest(tmp_path)
    (tmp_path / "notes.txt").write_text("still not data")
    assert tracking.data_digest(tmp_path) == first
    (tmp_path / "items.parquet").write_bytes(b"b")
    assert tracking.data_digest(tmp_path) != first and len(first) == tracking.DIGEST_LENGTH


def test_verbosity_levels(monkeypatch, capsys, tiny_data):
    from typer.testing import CliRunner

    from convcg_cli.cli import app

    monkeypatch.setenv(progress.VERBOSITY_ENV, progress.NORMAL)  # restored after the test
    assert CliRunner().invoke(app, ["-q", "data", "validate", str(tiny_data)]).exit_code == 0
    assert progress.verbosity() == progress.QUIET
    progress.set_verbosity(quiet=False, verbose=True)
    with progress.step("Loading"):
        pass
    progress.announce("cell 1/2 a/seed=0")
    assert "Loading: " in capsys.readouterr().err
    progress.set_verbosity(quiet=True, verbose=True)
    with progress.step("Loading"):
        pass
    progress.announce("cell 1/2 a/seed=0")
    assert capsys.readouterr().err == "" and not progress.interactive()
