"""train() end to end on the tiny preset: MLflow contents, run status on failure and interrupt."""

from __future__ import annotations

import pytest
import torch
from mlflow.tracking import MlflowClient

from convcg_cli.config import CONF_DIR, compose
from convcg_cli.models.module import RetrievalModule
from convcg_cli.train import train


def _client(home) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{home.resolve()}/mlflow.db")


def test_train_logs_everything_a_run_needs(home, tiny_overrides):
    composed = compose("train", ["+experiment=multihead_sequential", "seed=7", *tiny_overrides])
    result = train(composed)
    run = _client(home).get_run(result.run_id)
    assert run.info.status == "FINISHED"
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    assert tags["head"] == "multi_head" and tags["cross"] == "sequential"
    assert tags["experiment"] == "multihead_sequential" and tags["seed"] == "7"
    assert tags["checkpoint"] == "yes"
    assert tags["torch_threads"] == str(torch.get_num_threads())  # float32 figures depend on it
    assert params["seed"] == "7" and params["loss.task_weights.conversion"] == "1.0"
    for name in ("train/loss", "train/conversion/loss", "train/engagement/loss"):
        assert name in metrics
    for task in ("conversion", "engagement"):
        for k in (100, 1000):
            assert 0.0 <= metrics[f"val/{task}/recall_at_{k}"] <= 1.0
    artifacts = {
        a.path for d in ("config", "checkpoints") for a in _client(home).list_artifacts(result.run_id, d)
    }
    assert {"config/resolved.yaml", "config/overrides.yaml", "checkpoints/model.ckpt"} <= artifacts
    assert result.checkpoint.exists()


def test_zero_weight_task_is_not_trained(home, tiny_overrides):
    result = train(compose("train", ["loss.task_weights.engagement=0", *tiny_overrides]))
    metrics = _client(home).get_run(result.run_id).data.metrics
    assert "train/conversion/loss" in metrics and "train/engagement/loss" not in metrics


def test_crash_marks_run_failed_and_keeps_metrics(home, tiny_overrides, monkeypatch):
    original = RetrievalModule.training_step

    def crash_on_third_step(self, batch, batch_idx):
        if batch_idx == 2:
            raise RuntimeError("boom")
        return original(self, batch, batch_idx)

    monkeypatch.setattr(RetrievalModule, "training_step", crash_on_third_step)
    with pytest.raises(RuntimeError, match="boom"):
        train(compose("train", tiny_overrides))
    client = _client(home)
    (run,) = client.search_runs([client.get_experiment_by_name("convcg").experiment_id])
    assert run.info.status == "FAILED"
    assert "train/loss" in run.data.metrics  # logged before the crash, kept
    assert "checkpoint" not in run.data.tags


def test_interrupt_marks_run_killed(home, tiny_overrides, monkeypatch):
    def interrupt(self, batch, batch_idx):
        raise KeyboardInterrupt

    monkeypatch.setattr(RetrievalModule, "training_step", interrupt)
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        train(compose("train", tiny_overrides))
    client = _client(home)
    (run,) = client.search_runs([client.get_experiment_by_name("convcg").experiment_id])
    assert run.info.status == "KILLED"


def test_same_seed_same_validation_metrics(home, tiny_overrides):
    a = train(compose("train", ["seed=3", *tiny_overrides])).metrics
    b = train(compose("train", ["seed=3", *tiny_overrides])).metrics
    assert a == b


def test_bf16_mixed_trains_and_its_checkpoint_evaluates_in_float32(home, tiny_overrides):
    """``trainer.precision=bf16-mixed`` (Lightning's autocast): validation reads bfloat16 outputs, the
    kept weights stay float32, and ``convcg eval`` scores the run as any other."""
    from convcg_cli.builders import read_checkpoint
    from convcg_cli.evaluate import evaluate

    result = train(compose("train", ["trainer.precision=bf16-mixed", *tiny_overrides]))
    assert 0.0 <= result.metrics["val/conversion/recall_at_100"] <= 1.0
    weights = read_checkpoint(result.checkpoint)["state_dict"]  # as data only, as convcg reads it
    assert {t.dtype for t in weights.values() if t.is_floating_point()} == {torch.float32}
    metrics = evaluate(compose("eval", ["bootstrap.n_boot=0"]), result.run_id).metrics
    assert 0.0 <= metrics["heldout/conversion/recall_at_100"] <= 1.0


LEVERS = sorted(p.stem for p in (CONF_DIR / "experiment" / "ablation").glob("*.yaml"))


# Levers that need columns the plain tiny log lacks, and the fixture of a tiny log that has them.
LEVER_DATA = {"content_vectors": "tiny_content_data", "cold_start": "tiny_content_data"}


@pytest.mark.parametrize("lever", LEVERS)
def test_every_lever_trains_end_to_end(home, tiny_overrides, lever, request):
    if lever in LEVER_DATA:
        tiny_overrides = [*tiny_overrides, f"data.dir={request.getfixturevalue(LEVER_DATA[lever])}"]
    composed = compose("train", [f"+experiment=ablation/{lever}", *tiny_overrides])
    result = train(composed)
    metrics = _client(home).get_run(result.run_id).data.metrics
    if composed.cfg.data.train_through_val:  # a refit: no validation, its last epoch kept
        assert not any(name.startswith("val/") for name in metrics) and result.checkpoint.is_file()
    else:
        assert 0.0 <= metrics["val/conversion/recall_at_100"] <= 1.0
    assert "train/task_weight/conversion" in metrics


def test_streamed_training_and_evaluation_end_to_end(home, tiny_overrides):
    """Streamed data: shards under outputs/shards, a finished run, and eval on it writes no new shards."""
    from convcg_cli.evaluate import evaluate

    overrides = ["data/stream=streamed", "data.stream.chunk_rows=5000", "data.hard_negatives=2"]
    result = train(compose("train", [*tiny_overrides, *overrides]))
    run = _client(home).get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.params["stream"] == "streamed"
    assert 0.0 <= run.data.metrics["val/conversion/recall_at_100"] <= 1.0
    (shards,) = (home / "outputs" / "shards").iterdir()
    assert len(list(shards.glob("shard-*.npz"))) > 1
    before = {p: p.stat().st_mtime_ns for p in shards.iterdir()}
    out = evaluate(compose("eval", ["bootstrap.n_boot=0", "baselines=[]"]), run="latest")
    assert 0.0 <= out.metrics["heldout/conversion/recall_at_100"] <= 1.0
    assert {p: p.stat().st_mtime_ns for p in shards.iterdir()} == before
