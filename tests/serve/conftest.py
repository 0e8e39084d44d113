"""A tiny run trained through the CLI with its served model logged, shared by the serving tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from convcg_cli.cli import app
from tests.conftest import TINY_TRAIN


@pytest.fixture(scope="package")
def served_home(tiny_data, empty_mlflow_store, tmp_path_factory) -> tuple[Path, str]:
    """``(home, run id)``: a convcg home with one tiny run whose model (runs:/ID/model) is logged.
    Tests may log into it (a registered version, a re-indexed model), not retrain it."""
    home = tmp_path_factory.mktemp("served_home")
    shutil.copyfile(empty_mlflow_store, home / "mlflow.db")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CONVCG_HOME", str(home))
        result = CliRunner().invoke(
            app, ["train", f"data.dir={tiny_data}", *TINY_TRAIN, "serve.log_model=true", *SERVED_BLEND]
        )
    assert result.exit_code == 0, result.output
    return home, result.output.split("MLflow run id:")[1].split()[0]


# A popularity blend given (one value each: nothing to choose), so every served-model test serves a
# model whose scores carry the blend's bias: what eval scores is what the model serves.
SERVED_BLEND = ["blend.betas=[0.3]", "blend.fallback_weights=[0.5]"]


@pytest.fixture
def served(served_home, monkeypatch) -> tuple[Path, str]:
    """``served_home`` as this test's convcg home, with MLflow pointed at its store."""
    home, run_id = served_home
    monkeypatch.setenv("CONVCG_HOME", str(home))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home}/mlflow.db")
    return home, run_id


def store_of(home: Path):
    """The tracking store of a convcg home (its default experiment)."""
    from convcg_cli import tracking

    return tracking.Store(f"sqlite:///{home}/mlflow.db", "convcg")
