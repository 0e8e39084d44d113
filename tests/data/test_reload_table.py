"""``reload_table``: a table read again as ``load_tables`` returns it, checked again unless this
process checked the very same file (same inode, size and times) with the same schema."""

from __future__ import annotations

import dataclasses
import os
import shutil

import polars as pl
import pytest

from convcg_cli.data.contract import load_schemas, load_tables, reload_table, tables
from convcg_cli.errors import DataValidationError


@pytest.fixture
def logs(tiny_data, tmp_path):
    """A private copy of the tiny logs (these tests rewrite a file)."""
    return shutil.copytree(tiny_data, tmp_path / "logs")


@pytest.fixture
def checks(monkeypatch):
    """Counts the runs of the contract's checks (``conform_frames``) from here on."""
    calls = []
    original = tables.conform_frames

    def counted(frames, schemas):
        calls.append(sorted(frames))
        return original(frames, schemas)

    monkeypatch.setattr(tables, "conform_frames", counted)
    return calls


def test_a_file_checked_by_this_process_is_read_again_without_its_checks(logs, checks):
    loaded = load_tables(logs)
    assert len(checks) == 1
    again = reload_table(logs, "impressions")
    assert len(checks) == 1  # cast only
    assert again.schema == loaded["impressions"].schema and again.equals(loaded["impressions"])


def test_a_file_never_checked_or_changed_since_is_checked_again(logs, checks):
    with pytest.MonkeyPatch.context() as m:
        m.setattr(tables, "_validated", {})  # nothing checked by this process yet
        reload_table(logs, "impressions")
        assert checks == [sorted(load_schemas())]  # the whole directory, references too
        reload_table(logs, "impressions")  # that load checked it: not again
        assert len(checks) == 1
        path = logs / "impressions.parquet"
        stat = path.stat()
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same bytes and times: ctime moves
        reload_table(logs, "impressions")
        assert len(checks) == 2
        # the schema checked must be the one asked for: another contract is checked again
        schemas = load_schemas()
        other = {**schemas, "impressions": dataclasses.replace(schemas["impressions"], primary_key=())}
        reload_table(logs, "impressions", other)
        assert len(checks) == 3


def test_a_file_rewritten_with_bad_rows_after_its_check_is_refused(logs, checks):
    load_tables(logs)
    path = logs / "impressions.parquet"
    frame = pl.read_parquet(path)
    pl.concat([frame, frame.head(1)]).write_parquet(path)  # a duplicate impression_id
    with pytest.raises(DataValidationError, match="impression_id"):
        reload_table(logs, "impressions")
    assert len(checks) == 2
