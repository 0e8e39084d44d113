"""Shared fixtures: tiny synthetic logs written once per session, and an isolated convcg home."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# MLflow's variables decide where convcg's runs go (conf/logger/mlflow.yaml): a developer's team
# server must not receive the tests' runs. A test that wants a server sets them itself.
MLFLOW_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_REGISTRY_URI")


def pytest_configure(config) -> None:
    """Run every test with MLflow's variables unset (:data:`MLFLOW_VARIABLES`)."""
    for name in MLFLOW_VARIABLES:
        os.environ.pop(name, None)


# The tiny logs hold about 35 conversions a day, too few for the default split's minimums
# (data.split=auto: 300 held-out, 200 validation conversions): tests keep the fixed days their
# figures were pinned on. tests/data/test_time_split.py tests the auto split.
TINY_SPLIT = "data.split=days"
# Small enough to train an epoch in a second or two on 2 CPU cores.
TINY_TRAIN = [
    TINY_SPLIT,
    "trainer.max_epochs=1",
    "+trainer.limit_train_batches=4",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
    "data.batch_size=128",
    "model.hidden_dim=32",
    "model.embedding_dim=16",
    "model.feature_embedding_dim=8",
    "serve.log_model=false",  # tests of the served model (tests/serve) turn it on
]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """The tiny preset, seed 0, written in the data_schemas/ contract."""
    from convcg_cli.data.importing import synth

    return synth.write_tables(synth.generate("tiny", seed=0), tmp_path_factory.mktemp("tiny") / "logs")


@pytest.fixture(scope="session")
def tiny_content_data(tmp_path_factory) -> Path:
    """The tiny preset, seed 0, with item content vectors and new items (``--content-vectors``)."""
    from convcg_cli.data.importing import synth

    out = tmp_path_factory.mktemp("tiny-content") / "logs"
    synth.synthesize("tiny", out, seed=0, content_vectors=True)
    return out


def _tiny_shop():
    """The ``sparse_shop`` preset at the tiny preset's scale (the ``tiny_shop_data`` fixture's)."""
    import dataclasses

    from convcg_cli.data.importing.synth_config import PRESETS

    return dataclasses.replace(
        PRESETS["sparse_shop"],
        n_users=600,
        n_items=3000,
        n_advertisers=60,
        n_categories=20,
        n_days=14,
        n_impressions=400_000,
        latent_dim=12,
        n_user_segments=12,
    )


TINY_SHOP = _tiny_shop()


@pytest.fixture(scope="session")
def tiny_shop_data(tmp_path_factory) -> Path:
    """The ``sparse_shop`` preset at the tiny preset's scale, seed 0: a purchase log (purchases and a
    few views, sessions as users, new items in the last days)."""
    from convcg_cli.data.importing import synth

    out = tmp_path_factory.mktemp("tiny-shop") / "logs"
    synth.synthesize(TINY_SHOP, out, seed=0)
    return out


@pytest.fixture(scope="session")
def empty_mlflow_store(tmp_path_factory) -> Path:
    """An MLflow sqlite store with its tables created and no run, made once per session.

    Creating the tables (MLflow's alembic migrations) costs 1 to 5 s, paid by every test that opens a
    fresh store; a copy of this file is the same empty store for the price of a file copy.
    """
    from mlflow.tracking import MlflowClient

    from convcg_cli import tracking

    tracking.quiet()
    store = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{store}").search_experiments()
    return store


def hydra_plugin_installed(plugin: str) -> bool:
    """Whether the Hydra plugin ``hydra_plugins.<plugin>`` is installed (an extra). ``find_spec`` of a
    submodule raises when the ``hydra_plugins`` namespace itself is absent (no plugin installed)."""
    import importlib.util

    try:
        return importlib.util.find_spec(f"hydra_plugins.{plugin}") is not None
    except ModuleNotFoundError:
        return False


@pytest.fixture
def fresh_joblib_workers():
    """joblib's loky workers outlive a sweep and keep the environment they started with (an earlier
    test's ``CONVCG_HOME``): stop them before and after a test that launches through joblib."""

    def shutdown() -> None:
        try:
            from joblib.externals.loky import get_reusable_executor
        except ImportError:  # the [joblib] extra is not installed: no workers to stop
            return
        get_reusable_executor().shutdown(wait=True)

    shutdown()
    yield
    shutdown()


def runs_in(home: Path) -> list:
    """Every MLflow run in ``home``'s store, of every experiment."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{home.resolve()}/mlflow.db")
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


@pytest.fixture
def home(tmp_path, monkeypatch, empty_mlflow_store) -> Path:
    """A fresh convcg home (MLflow store, artifacts, outputs) for one test; its store is empty."""
    monkeypatch.setenv("CONVCG_HOME", str(tmp_path))
    shutil.copyfile(empty_mlflow_store, tmp_path / "mlflow.db")
    return tmp_path


@pytest.fixture
def tiny_overrides(tiny_data) -> list[str]:
    """Overrides that train a tiny model on the tiny logs."""
    return [f"data.dir={tiny_data}", *TINY_TRAIN]
