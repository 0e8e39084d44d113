"""Faults lose nothing: non-finite losses, signals, dead processes, resume, tampered artifacts,
missing checkpoints and an empty home. Each test states what the fault must leave behind (exit
code, run status, artifacts); the README's Reliability table is this file in words (`make faults`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from typer.testing import CliRunner

import convcg_cli.train as train_module
from convcg_cli import tracking
from convcg_cli.cli import app
from convcg_cli.config import compose
from convcg_cli.errors import TrainingDivergedError
from convcg_cli.models.guards import check_finite_gradients
from tests.conftest import runs_in

pytestmark = pytest.mark.faults
runner = CliRunner()


def store(home: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{home.resolve()}/mlflow.db")


def artifacts(home: Path, run_id: str, folder: str = tracking.CHECKPOINT_DIR) -> list[str]:
    return [f.path for f in store(home).list_artifacts(run_id, folder)]


def only_run(home: Path):
    (run,) = runs_in(home)
    return run


class SignalAfterEpochs(L.Callback):
    """Sends ``signum`` to this process once ``epochs`` epochs have finished (their validation and
    last.ckpt written), as the next one starts: a scheduler's SIGTERM or a Ctrl-C mid-training."""

    def __init__(self, signum: int, epochs: int) -> None:
        self.signum, self.epochs = signum, epochs

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epochs:
            os.kill(os.getpid(), self.signum)


@pytest.fixture
def signal_after_epochs(monkeypatch):
    """``plant(signum, epochs)``: the next training of this test gets a SignalAfterEpochs callback
    (outside its config, so a resumed run does not get it)."""

    def plant(signum: int, epochs: int) -> None:
        original = train_module._callbacks
        monkeypatch.setattr(
            train_module, "_callbacks", lambda *args: [*original(*args), SignalAfterEpochs(signum, epochs)]
        )

    return plant


# --- non-finite loss and gradients ---------------------------------------------------------------


def test_a_diverging_loss_stops_at_that_step_and_leaves_a_failed_run_without_checkpoint(home, tiny_overrides):
    # Validation off: without the guard this run FINISHED with NaN weights and became `--run latest`.
    result = runner.invoke(
        app, ["train", *tiny_overrides, "model.optimizer.lr=1e6", "+trainer.limit_val_batches=0"]
    )
    assert result.exit_code == 1, result.output
    message = " ".join(result.output.split())
    assert "The training loss went non-finite at step 1" in message
    assert "conversion/loss=nan" in message
    run = only_run(home)
    assert run.info.status == "FAILED"
    assert "non-finite at step 1" in run.data.tags[tracking.ERROR_TAG]
    assert tracking.CHECKPOINT_TAG not in run.data.tags
    assert artifacts(home, run.info.run_id) == []
    assert runner.invoke(app, ["eval", "--run", "latest"]).exit_code == 2  # nothing to pick


def test_a_non_finite_gradient_is_named():
    layer = torch.nn.Linear(2, 1)
    layer.weight.grad = torch.tensor([[float("nan"), 0.0]])
    layer.bias.grad = torch.zeros(1)
    with pytest.raises(TrainingDivergedError, match=r"step 7 \(1 parameter\(s\), e.g. weight\)"):
        check_finite_gradients(7, layer.named_parameters())
    layer.weight.grad = torch.zeros(1, 2)
    check_finite_gradients(7, layer.named_parameters())


# --- signals ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_ends_the_run_killed_with_its_metrics_and_last_checkpoint(
    home, tiny_overrides, signal_after_epochs, signum, code
):
    signal_after_epochs(signum, epochs=1)
    result = runner.invoke(app, ["train", *tiny_overrides, "trainer.max_epochs=3"])
    assert result.exit_code == code, result.output
    run = only_run(home)
    assert f"convcg train --resume {run.info.run_id}" in " ".join(result.output.split())
    assert run.info.status == "KILLED"
    assert "val/conversion/recall_at_100" in run.data.metrics
    assert artifacts(home, run.info.run_id) == [tracking.RESUME_CHECKPOINT_ARTIFACT]
    assert tracking.CHECKPOINT_TAG not in run.data.tags  # not servable: `--run latest` skips it


def test_a_running_run_whose_process_died_is_marked_killed_by_the_next_command(home):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    store = tracking.Store.from_config(compose("eval").cfg.logger)
    with tracking.open_run(store, "victim", {}) as run:
        client = run.client
        client.set_tag(run.run_id, tracking.PID_TAG, str(dead.pid))  # as if that process opened it
        client.set_tag(run.run_id, tracking.CHECKPOINT_TAG, "yes")
        result = runner.invoke(app, ["eval", "--run", "latest"])
        assert result.exit_code == 2  # never picked: it is not FINISHED
        info = client.get_run(run.run_id)
        assert info.info.status == "KILLED"
        assert f"pid {dead.pid}" in info.data.tags[tracking.ERROR_TAG]
        alive = client.create_run(info.info.experiment_id, tags=tracking.process_tags())
        assert tracking.mark_dead_runs(store, [info.info.experiment_id]) == []  # this process: alive
        assert client.get_run(alive.info.run_id).info.status == "RUNNING"


# --- resume ----------------------------------------------------------------------------------------


def _heldout(run_id: str) -> dict:
    result = runner.invoke(app, ["eval", "--run", run_id, "--json", "bootstrap.n_boot=0", "baselines=[]"])
    assert result.exit_code == 0, result.output
    return {k: v for k, v in json.loads(result.stdout).items() if k != "run_id"}


def _history(home: Path, run_id: str, name: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in store(home).get_metric_history(run_id, name)]


@pytest.mark.slow
@pytest.mark.parametrize("stream", ["in_memory", "streamed"])
def test_a_run_killed_after_epoch_2_of_4_and_resumed_equals_an_uninterrupted_one(
    home, tiny_overrides, tmp_path_factory, monkeypatch, signal_after_epochs, stream
):
    overrides = [*tiny_overrides, "trainer.max_epochs=4", f"data/stream={stream}"]
    callbacks = train_module._callbacks
    whole = runner.invoke(app, ["train", *overrides])
    assert whole.exit_code == 0, whole.output
    whole_id = only_run(home).info.run_id
    expected = _heldout(whole_id)

    other = tmp_path_factory.mktemp("resumed_home")
    monkeypatch.setenv("CONVCG_HOME", str(other))
    signal_after_epochs(signal.SIGTERM, epochs=2)
    assert runner.invoke(app, ["train", *overrides]).exit_code == 143
    run_id = only_run(other).info.run_id
    monkeypatch.setattr(train_module, "_callbacks", callbacks)  # the resumed run is not signalled
    resumed = runner.invoke(app, ["train", "--resume", run_id])
    assert resumed.exit_code == 0, resumed.output
    run = only_run(other)
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    assert tracking.ERROR_TAG not in run.data.tags
    assert _heldout(run_id) == expected
    for name in ("val/conversion/recall_at_100", "train/loss"):
        # By step: the resumed fit re-runs the last finished epoch's validation once (same value).
        assert dict(_history(other, run_id, name)) == dict(_history(home, whole_id, name))


def test_resume_refuses_a_finished_run_and_overrides(home, tiny_overrides):
    assert runner.invoke(app, ["train", *tiny_overrides]).exit_code == 0
    run_id = only_run(home).info.run_id
    finished = runner.invoke(app, ["train", "--resume", run_id])
    assert finished.exit_code == 2 and "is FINISHED" in finished.output
    with_overrides = runner.invoke(app, ["train", "--resume", run_id, "seed=3"])
    assert with_overrides.exit_code == 2 and "saved config" in with_overrides.output


# --- trust, missing artifacts, empty home ----------------------------------------------------------


def _planted_run(home: Path, tiny_overrides: list[str], *, target: str | None = None, checkpoint=None) -> str:
    """A FINISHED run with the tiny config saved (its model ``_target_`` replaced by ``target``) and
    ``checkpoint`` (a dict torch.save can write; None: no checkpoint artifact) as model.ckpt."""
    cfg = compose("train", tiny_overrides).cfg
    if target:
        OmegaConf.update(cfg, "model._target_", target)
    with tracking.open_run(tracking.Store.from_config(cfg.logger), "planted", {}) as run:
        tracking.log_text(run, OmegaConf.to_yaml(cfg), tracking.CONFIG_ARTIFACT)
        if checkpoint is not None:
            path = home / "planted.ckpt"
            torch.save(checkpoint, path)
            tracking.log_checkpoint(run, path)
        else:
            tracking.set_tags(run, {tracking.CHECKPOINT_TAG: "yes"})
    return run.run_id


RAN = "convcg-fault-payload-ran"


class Payload:
    """Unpickling this runs code: what a tampered checkpoint would carry."""

    def __reduce__(self):
        return (exec, (f"import os; os.environ['{RAN}'] = '1'",))


def test_a_hostile_target_in_a_saved_config_is_refused(home, tiny_overrides):
    run_id = _planted_run(home, tiny_overrides, target="os.system", checkpoint={"state_dict": {}})
    result = runner.invoke(app, ["eval", "--run", run_id])
    assert result.exit_code == 2
    message = " ".join(result.output.split())
    assert "model._target_='os.system' is not a class convcg builds" in message


def test_a_checkpoint_carrying_code_is_refused_by_eval(home, tiny_overrides, monkeypatch):
    monkeypatch.delenv(RAN, raising=False)
    run_id = _planted_run(home, tiny_overrides, checkpoint={"state_dict": {}, "extra": Payload()})
    result = runner.invoke(app, ["eval", "--run", run_id, "baselines=[]"])
    assert result.exit_code == 2 and "not plain weights" in result.output
    assert RAN not in os.environ


def test_eval_of_a_run_whose_checkpoint_is_gone_fails_before_the_baselines(home, tiny_overrides, monkeypatch):
    import convcg_cli.evaluate as evaluate_module

    def no_baselines(*args, **kwargs):
        raise AssertionError("baselines computed before the checkpoint was found")

    monkeypatch.setattr(evaluate_module, "score_baselines", no_baselines)
    run_id = _planted_run(home, tiny_overrides, checkpoint=None)
    result = runner.invoke(app, ["eval", "--run", run_id])
    assert result.exit_code == 2, result.output
    assert f"checkpoint artifact 'checkpoints/model.ckpt' of run {run_id} could not be read" in " ".join(
        result.output.split()
    )


def test_eval_on_an_empty_home_creates_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("CONVCG_HOME", str(tmp_path))
    result = runner.invoke(app, ["eval", "--run", "latest"])
    assert result.exit_code == 2 and "No MLflow store" in result.output
    # No store and no run: only Hydra's record of the command (outputs/hydra/eval/<time>/.hydra).
    made = [p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()]
    assert all(p.parts[:3] == ("outputs", "hydra", "eval") for p in made), made


# --- real processes: signals from outside, SIGKILL, concurrent first use ---------------------------

OPEN_STORE = """
from convcg_cli import tracking
from convcg_cli.config import compose
store = tracking.Store.from_config(compose("eval").cfg.logger)
with tracking.open_run(store, "concurrent", {}) as run:
    tracking.log_metrics(run, {"opened": 1.0})
"""


def _start_training(home: Path, overrides: list[str]) -> subprocess.Popen:
    env = {**os.environ, "CONVCG_HOME": str(home), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "convcg_cli", "train", *overrides],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_for_first_epoch(home: Path, proc: subprocess.Popen, timeout: float = 120.0):
    """The run once its first validation metric is logged (its last.ckpt is written just after)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[0]
        if (home / "mlflow.db").exists():
            runs = runs_in(home)
            if (
                runs
                and "val/conversion/recall_at_100" in store(home).get_run(runs[0].info.run_id).data.metrics
            ):
                time.sleep(1.0)
                return runs[0]
        time.sleep(0.5)
    proc.kill()
    raise AssertionError("training did not finish an epoch in time")


ENDLESS = ["trainer.max_epochs=100000"]


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_from_outside_ends_the_process_with_its_code(home, tiny_overrides, signum, code):
    proc = _start_training(home, [*tiny_overrides, *ENDLESS])
    run = _wait_for_first_epoch(home, proc)
    proc.send_signal(signum)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == code, output
    info = store(home).get_run(run.info.run_id)
    assert info.info.status == "KILLED"
    assert "val/conversion/recall_at_100" in info.data.metrics
    assert tracking.RESUME_CHECKPOINT_ARTIFACT in artifacts(home, run.info.run_id)


@pytest.mark.slow
def test_a_sigkilled_run_is_marked_killed_by_the_next_command_and_never_picked(home, tiny_overrides):
    proc = _start_training(home, [*tiny_overrides, *ENDLESS])
    run = _wait_for_first_epoch(home, proc)
    proc.kill()
    proc.communicate(timeout=60)
    assert store(home).get_run(run.info.run_id).info.status == "RUNNING"  # nobody closed it
    result = runner.invoke(app, ["eval", "--run", "latest"])
    assert result.exit_code == 2 and "No finished run" in result.output
    info = store(home).get_run(run.info.run_id)
    assert info.info.status == "KILLED"
    assert f"pid {proc.pid}" in info.data.tags[tracking.ERROR_TAG]
    last = home / "outputs" / "runs" / run.info.run_id / "last.ckpt"
    assert last.exists()  # what `convcg train --resume` continues from on this host


def _open_stores_at_once(home: Path, n: int) -> list[subprocess.CompletedProcess]:
    env = {**os.environ, "CONVCG_HOME": str(home), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", OPEN_STORE],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(n)
    ]
    return [subprocess.CompletedProcess(p.args, p.wait(timeout=300), p.communicate()[0]) for p in procs]


@pytest.mark.slow  # ~30 s a trial on 2 busy cores: 4 interpreters import mlflow at once
@pytest.mark.parametrize("trial", range(5))
def test_processes_starting_together_on_a_fresh_home_share_one_intact_store(tmp_path, trial):
    home = tmp_path / "home"
    done = _open_stores_at_once(home, 4)
    assert [p.returncode for p in done] == [0] * 4, "\n".join(p.stdout for p in done)
    runs = runs_in(home)
    assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}
    assert all(r.data.metrics == {"opened": 1.0} for r in runs)
