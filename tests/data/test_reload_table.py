"""``reload_table``: a table read again as ``load_tables`` returns it, checked again unless this
process checked the same directory whole, with the same schemas, and none of its files has changed
since (same inode, size and times)."""

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
        m.setattr(tables, "_checked", {})  # nothing checked by this process yet
        reload_table(logs, "impressions")
        assert checks == [sorted(load_schemas())]  # the whole directory, references too
        reload_table(logs, "impressions")  # that load checked it: not again
        assert len(checks) == 1
        path = logs / "impressions.parquet"
        stat = path.stat()
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same bytes and times: ctime moves
        reload_table(logs, "impressions")
        assert len(checks) == 2
        # the schemas checked must be the ones asked for: another contract is checked again
        schemas = load_schemas()
        other = {**schemas, "impressions": dataclasses.replace(schemas["impressions"], primary_key=())}
        reload_table(logs, "impressions", other)
        assert len(checks) == 3
        reload_table(logs, "impressions")  # the last check was against the other contract
        assert len(checks) == 4
        # a table checked alone (no references to the others) does not count as checked whole
        load_tables(logs, {"impressions": schemas["impressions"]})
        reload_table(logs, "impressions")
        assert len(checks) == 6


def test_another_table_changed_since_the_check_means_checking_again(logs, checks):
    load_tables(logs)
    items, shown = logs / "items.parquet", pl.read_parquet(logs / "impressions.parquet")["item_id"][0]
    pl.read_parquet(items).filter(pl.col("item_id") != shown).write_parquet(items)  # a shown item removed
    with pytest.raises(DataValidationError, match="item_id"):  # the impressions now point at nothing
        reload_table(logs, "impressions")
    assert len(checks) == 2


def test_a_file_rewritten_with_bad_rows_after_its_check_is_refused(logs, checks):
    load_tables(logs)
    path = logs / "impressions.parquet"
    frame = pl.read_parquet(path)
    pl.concat([frame, frame.head(1)]).write_parquet(path)  # a duplicate impression_id
    with pytest.raises(DataValidationError, match="impression_id"):
        reload_table(logs, "impressions")
    assert len(checks) == 2
