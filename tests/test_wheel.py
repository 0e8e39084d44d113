"""The built wheel carries conf/ and data_schemas/ and its CLI runs from any directory.

The wheel is built from a copy of the sources (no build/ left in the checkout) and unpacked with
``pip install --target``; the CLI then runs with only that copy of ``convcg_cli`` on the path, from
another working directory, so nothing can be read from the checkout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "convcg_cli", "conf", "data_schemas")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, src / name)  # type: ignore[operator]
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(src),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
        ],
        check=True,
        capture_output=True,
    )
    return next(out.glob("convcg-*.whl"))


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
    )
    return site


def _convcg(site: Path, cwd: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site), "CONVCG_HOME": str(cwd), "OMP_NUM_THREADS": "2"}
    return subprocess.run(
        [sys.executable, "-m", "convcg_cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_wheel_holds_the_configs_and_the_contract(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in (
        "conf/train.yaml",
        "conf/eval.yaml",
        "conf/importer/kuairand.yaml",
        "conf/ablate/kuairand.yaml",
    ):
        assert f"convcg_cli/_bundled/{path}" in names
    schemas = {p.name for p in (ROOT / "data_schemas").glob("*.yaml")}
    assert {f"convcg_cli/_bundled/data_schemas/{s}" for s in schemas} <= names


def test_installed_cli_synthesizes_and_validates_from_another_directory(installed, tmp_path):
    done = _convcg(installed, tmp_path, "data", "synth", "--preset", "tiny", "--out", "logs")
    assert done.returncode == 0, done.stderr
    done = _convcg(installed, tmp_path, "data", "validate", "logs")
    assert done.returncode == 0 and "all tables valid" in done.stdout, done.stdout + done.stderr


@pytest.mark.slow
def test_installed_cli_trains_and_evaluates_from_another_directory(installed, tmp_path):
    assert _convcg(installed, tmp_path, "data", "synth", "--preset", "tiny", "--out", "logs").returncode == 0
    train = _convcg(
        installed,
        tmp_path,
        "train",
        f"data.dir={tmp_path / 'logs'}",
        "data.split=days",  # the tiny logs hold too few conversions for the auto split's minimums
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=4",
        "trainer.enable_progress_bar=false",
    )
    assert train.returncode == 0, train.stdout + train.stderr
    evaluation = _convcg(installed, tmp_path, "eval", "--run", "latest", "baselines=[popularity]", "--json")
    assert evaluation.returncode == 0, evaluation.stdout + evaluation.stderr
    assert "heldout/conversion/recall_at_100" in evaluation.stdout
