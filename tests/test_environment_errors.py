"""One error path for the environment: a locked or damaged store, a full disk, a home that is a file,
a checkpoint cut short or diverged, an interrupted evaluation: each a paragraph naming the file and
what to do, exit 2 (130 for Ctrl-C), never a traceback; and nothing logged before the check."""

from __future__ import annotations

import errno
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import typer
from omegaconf import OmegaConf
from typer.testing import CliRunner

from convcg_cli import tracking
from convcg_cli.cli import app
from convcg_cli.config import compose
from convcg_cli.errors import environment_problem, user_errors
from tests.conftest import runs_in

pytestmark = pytest.mark.faults  # README "Reliability" rows (`make faults`)
runner = CliRunner()


def flat(text: str) -> str:
    return " ".join(text.split())


# --- the paragraphs --------------------------------------------------------------------------------


def test_a_full_disk_anywhere_in_the_chain_names_the_file():
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "/tmp/mlflow-x/model.ckpt")
        except OSError as inner:
            raise RuntimeError("download failed") from inner
    except RuntimeError as outer:
        problem = environment_problem(outer)
    assert problem is not None and problem.startswith(
        "No space left on device writing /tmp/mlflow-x/model.ckpt"
    )


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("(sqlite3.OperationalError) database is locked", "stayed locked by another process"),
        ("(sqlite3.DatabaseError) database disk image is malformed", "store is damaged"),
        ("(sqlite3.DatabaseError) file is not a database", "store is damaged"),
    ],
)
def test_sqlite_failures_become_paragraphs(message, expected):
    assert expected in (environment_problem(RuntimeError(message)) or "")


def test_a_bug_is_not_an_environment_problem_and_keeps_its_traceback():
    assert environment_problem(ValueError("index out of range")) is None
    with pytest.raises(ValueError), user_errors():
        raise ValueError("index out of range")


def test_user_errors_exits_2_on_an_environment_problem(capsys):
    with pytest.raises(typer.Exit) as exit_info, user_errors():
        raise OSError(errno.ENOSPC, "No space left on device", "/data/out.parquet")
    assert exit_info.value.exit_code == 2
    assert "No space left on device writing /data/out.parquet" in flat(capsys.readouterr().err)


# --- the store -------------------------------------------------------------------------------------

HOLD_LOCK = """
import sqlite3, sys, time
connection = sqlite3.connect(sys.argv[1], isolation_level=None)
connection.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
"""


def hold_lock(db: Path, seconds: float) -> subprocess.Popen:
    """Another process holding the sqlite store's write lock for ``seconds``."""
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(HOLD_LOCK), str(db), str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    return holder


@pytest.mark.slow  # waits out sqlite's own 5 s once; `make faults` runs it
def test_a_store_locked_beyond_the_wait_names_the_store_and_its_holder(home):
    holder = hold_lock(home / "mlflow.db", 30)
    try:
        start = time.monotonic()
        result = runner.invoke(app, ["eval", "--run", "latest", "logger.busy_timeout_s=1"])
        waited = time.monotonic() - start
    finally:
        holder.kill()
        holder.wait()
    assert result.exit_code == 2, result.output
    message = flat(result.output)
    assert f"The MLflow store sqlite:///{home}/mlflow.db stayed locked by another process" in message
    assert f"held open by pid {holder.pid}" in message and "Traceback" not in result.output
    assert waited < 20  # bounded: about sqlite's own 5 s per try, then the configured wait


def test_a_store_locked_for_less_than_the_wait_is_waited_for(home):
    holder = hold_lock(home / "mlflow.db", 2)
    try:
        result = runner.invoke(app, ["eval", "--run", "latest", "logger.busy_timeout_s=30"])
    finally:
        holder.wait()
    assert result.exit_code == 2 and "No finished run with a checkpoint" in flat(result.output)


def test_a_damaged_store_is_a_paragraph(tmp_path, monkeypatch):
    monkeypatch.setenv("CONVCG_HOME", str(tmp_path))
    (tmp_path / "mlflow.db").write_bytes(b"not a database " * 100)
    result = runner.invoke(app, ["eval", "--run", "latest"])
    assert result.exit_code == 2
    assert "The MLflow sqlite store is damaged" in flat(result.output) and "Traceback" not in result.output


def test_a_home_that_is_a_file_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.write_text("a file")
    monkeypatch.setenv("CONVCG_HOME", str(home))
    for command in (["eval", "--run", "latest"], ["train", "trainer.max_epochs=1"]):
        result = runner.invoke(app, command)
        assert result.exit_code == 2
        assert f"CONVCG_HOME={home} is a file, not a directory" in flat(result.output)
    assert home.read_text() == "a file"


# --- checkpoints -----------------------------------------------------------------------------------


def planted_run(
    home: Path, overrides: list[str], checkpoint: bytes, artifact: str, status_killed=False
) -> str:
    """A run with the tiny config saved and ``checkpoint`` (raw bytes) as ``artifact``."""
    cfg = compose("train", overrides).cfg
    store = tracking.Store.from_config(cfg.logger)
    path = home / Path(artifact).name
    path.write_bytes(checkpoint)
    try:
        with tracking.open_run(store, "planted", {}) as run:
            tracking.log_text(run, OmegaConf.to_yaml(cfg), tracking.CONFIG_ARTIFACT)
            tracking.log_file(run, path, str(Path(artifact).parent))
            tracking.set_tags(run, {tracking.CHECKPOINT_TAG: "yes"})
            if status_killed:
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    return run.run_id


def checkpoint_bytes(tmp_path: Path, state: dict) -> bytes:
    torch.save(state, tmp_path / "ckpt")
    return (tmp_path / "ckpt").read_bytes()


def test_a_cut_short_checkpoint_is_named_as_the_artifact_before_any_baseline_runs(
    home, tiny_overrides, tmp_path
):
    whole = checkpoint_bytes(tmp_path, {"state_dict": {"w": torch.ones(50, 50)}})
    run_id = planted_run(home, tiny_overrides, whole[: len(whole) // 2], tracking.CHECKPOINT_ARTIFACT)
    result = runner.invoke(app, ["eval", "--run", run_id, "baselines=[popularity]"])
    assert result.exit_code == 2, result.output
    message = flat(result.output)
    assert (
        f"The checkpoint artifact 'checkpoints/model.ckpt' of run {run_id} is damaged or cut short" in message
    )
    assert "/tmp" not in message.split("is damaged")[0]  # not a download's temp path
    assert [r for r in runs_in(home) if r.data.tags.get("kind") == "baseline"] == []


def test_a_diverged_checkpoint_is_refused_by_eval_naming_the_tensors(home, tiny_overrides, tmp_path):
    state = {"state_dict": {"tower.w": torch.full((3, 3), float("nan")), "tower.b": torch.zeros(3)}}
    run_id = planted_run(
        home, tiny_overrides, checkpoint_bytes(tmp_path, state), tracking.CHECKPOINT_ARTIFACT
    )
    result = runner.invoke(app, ["eval", "--run", run_id, "baselines=[]"])
    assert result.exit_code == 2, result.output
    message = flat(result.output)
    assert "holds non-finite weights (NaN or inf) in tower.w" in message and "tower.b" not in message


def test_a_cut_short_last_checkpoint_on_resume_is_a_paragraph(home, tiny_overrides, tmp_path):
    whole = checkpoint_bytes(tmp_path, {"state_dict": {"w": torch.ones(50, 50)}})
    run_id = planted_run(
        home, tiny_overrides, whole[:100], tracking.RESUME_CHECKPOINT_ARTIFACT, status_killed=True
    )
    result = runner.invoke(app, ["train", "--resume", run_id])
    assert result.exit_code == 2, result.output
    assert f"The last-epoch checkpoint of run {run_id} (last.ckpt) is damaged or cut short" in flat(
        result.output
    )


def test_an_interrupted_eval_says_what_it_had_logged(home, tiny_overrides, tmp_path, monkeypatch):
    import convcg_cli.evaluate as evaluate_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    run_id = planted_run(
        home, tiny_overrides, checkpoint_bytes(tmp_path, {"state_dict": {}}), tracking.CHECKPOINT_ARTIFACT
    )
    monkeypatch.setattr(evaluate_module, "load_trained_model", interrupted)  # after the baselines
    result = runner.invoke(app, ["eval", "--run", run_id, "baselines=[popularity]"])
    assert result.exit_code == 130, result.output
    message = flat(result.output)
    (baseline,) = [r for r in runs_in(home) if r.data.tags.get("kind") == "baseline"]
    assert "Evaluation interrupted (Ctrl-C); it had logged:" in message
    assert f"baseline run {baseline.info.run_id} (popularity)" in message


def test_a_full_tmpdir_is_not_called_a_deleted_checkpoint(monkeypatch, tmp_path):
    from convcg_cli.errors import EnvironmentProblem
    from convcg_cli.tracking import artifacts

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "model.ckpt"))

    monkeypatch.setattr(artifacts, "download_artifact", full)
    store = tracking.Store(f"sqlite:///{tmp_path}/mlflow.db", "convcg")
    with pytest.raises(EnvironmentProblem) as info:
        artifacts.download_checkpoint(store, "abc123", tmp_path)
    assert "No space left on device writing" in str(info.value) and "deleted or moved" not in str(info.value)
