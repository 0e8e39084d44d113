"""Shared fixtures for the data tests: the tiny synthetic log, generated once per session."""

from pathlib import Path

import polars as pl
import pytest

from convcg_cli.data.contract import TableSchema, load_schemas, write_tables
from convcg_cli.data.importing import generate


@pytest.fixture(scope="session")
def schemas() -> dict[str, TableSchema]:
    """The repo's data contract."""
    return load_schemas()


@pytest.fixture(scope="session")
def tiny_tables() -> dict[str, pl.DataFrame]:
    """``generate("tiny", seed=0)``; polars frames are immutable, so sharing them is safe."""
    return generate("tiny", seed=0)


@pytest.fixture
def tiny_dir(tmp_path: Path, tiny_tables: dict[str, pl.DataFrame]) -> Path:
    """A data directory holding the tiny tables, private to one test."""
    return write_tables(tiny_tables, tmp_path / "data")
