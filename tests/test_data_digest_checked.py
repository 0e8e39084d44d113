"""A run is scored on the data it was trained on, or on other logs only when asked: eval and export
compare the data directory's digest with the run's ``data_digest`` tag before anything is logged."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from convcg_cli import tracking
from convcg_cli.cli import app
from convcg_cli.data.importing import synth
from tests.conftest import TINY_TRAIN

pytestmark = pytest.mark.faults  # README "Reliability" rows (`make faults`)
runner = CliRunner()


@pytest.fixture(scope="module")
def replaced(tmp_path_factory, empty_mlflow_store):
    """A run trained on a copy of the tiny logs (seed 0) whose directory then got other logs (seed 1),
    as when a data directory is re-imported or overwritten after training."""
    home = tmp_path_factory.mktemp("digest_home")
    shutil.copyfile(empty_mlflow_store, home / "mlflow.db")
    data = synth.write_tables(synth.generate("tiny", seed=0), home / "logs")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CONVCG_HOME", str(home))
        result = runner.invoke(app, ["train", f"data.dir={data}", *TINY_TRAIN])
    assert result.exit_code == 0, result.output
    trained_digest = tracking.data_digest(data)
    synth.write_tables(synth.generate("tiny", seed=1), data)  # same contract, other logs
    assert tracking.data_digest(data) != trained_digest
    return home, trained_digest


def _run(home: Path):
    (run,) = MlflowClient(tracking_uri=f"sqlite:///{home}/mlflow.db").search_runs(
        ["1"], filter_string="attributes.run_name != ''"
    )
    return run


def test_eval_refuses_data_that_changed_since_training(replaced, monkeypatch):
    home, trained_digest = replaced
    monkeypatch.setenv("CONVCG_HOME", str(home))
    result = runner.invoke(app, ["eval", "--run", "latest", "baselines=[]"])
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert f"digest {trained_digest}, its 'data_digest' tag" in message and "allow_other_data=true" in message
    run = _run(home)
    assert run.data.tags[tracking.DATA_DIGEST_TAG] == trained_digest
    assert not any(m.startswith("heldout/") for m in run.data.metrics)  # nothing was logged


def test_export_refuses_data_that_changed_since_training(replaced, monkeypatch):
    home, _ = replaced
    monkeypatch.setenv("CONVCG_HOME", str(home))
    result = runner.invoke(app, ["export", "--run", "latest"])
    assert result.exit_code == 2, result.output
    assert "are not the data run" in " ".join(result.output.split())


def test_other_logs_scored_on_purpose_keep_the_training_digest(replaced, monkeypatch):
    home, trained_digest = replaced
    monkeypatch.setenv("CONVCG_HOME", str(home))
    result = runner.invoke(app, ["eval", "--run", "latest", "baselines=[]", "allow_other_data=true"])
    assert result.exit_code == 0, result.output
    run = _run(home)
    assert run.data.tags[tracking.DATA_DIGEST_TAG] == trained_digest
    digests = {d.dataset.digest for d in run.inputs.dataset_inputs}
    assert trained_digest in digests and len(digests) == 2  # the other logs: an input of their own
    assert "heldout/conversion/recall_at_100" in run.data.metrics
