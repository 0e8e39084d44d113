"""``convcg register`` and ``convcg export`` through the CLI: a registered version with an alias loads
by ``models:/NAME@ALIAS``; an older run gets its model (an IVF index with its overlap logged)."""

from __future__ import annotations

import mlflow.pyfunc
import pandas as pd
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from convcg_cli.cli import app

runner = CliRunner()


def test_register_with_alias_loads_from_the_registry(served):
    home, run_id = served
    result = runner.invoke(app, ["register", "--run", run_id, "--name", "candidates", "--alias", "champion"])
    assert result.exit_code == 0, result.output
    assert "models:/candidates@champion" in result.output
    model = mlflow.pyfunc.load_model("models:/candidates@champion")
    out = model.predict(
        pd.DataFrame({"user_id": [1], "surface": ["search"], "query_id": [3]}), params={"k": 4}
    )
    assert out["rank"].tolist() == [1, 2, 3, 4]
    version = MlflowClient().get_model_version_by_alias("candidates", "champion")
    assert version.run_id == run_id


def test_register_an_unknown_run_is_a_clear_error(served):
    result = runner.invoke(app, ["register", "--run", "nope", "--name", "candidates"])
    assert result.exit_code == 2
    assert "Run 'nope' was not found" in " ".join(result.output.split())


def test_export_with_ivf_logs_its_overlap_with_exact(served):
    home, run_id = served
    result = runner.invoke(
        app, ["export", "--run", run_id, "--index", "ivf", "--nlist", "4", "--nprobe", "1"]
    )
    assert result.exit_code == 0, result.output
    overlap = MlflowClient().get_run(run_id).data.metrics["serve/index_overlap_at_100"]
    assert 0.0 < overlap <= 1.0
    info = mlflow.models.get_model_info(f"runs:/{run_id}/model")  # the newest model of the run
    assert mlflow.MlflowClient().get_logged_model(info.model_id).tags["index"] == "ivf"
    restored = runner.invoke(app, ["export", "--run", run_id, "--index", "exact"])  # for later tests
    assert restored.exit_code == 0, restored.output
