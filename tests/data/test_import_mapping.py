"""Imports that need no hand preparation: the mapping keys of a shop log as it comes
(``tests/data/fixtures/shop_sample``: semicolon CSVs with quotes, string dates, purchases and views
with different columns, anonymous sessions, no users table, a catalogue larger than the log)."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import pytest
import yaml
from typer.testing import CliRunner

from convcg_cli.cli import app
from convcg_cli.data.contract import load_tables, validate_frames
from convcg_cli.data.importing import (
    DWELL_WEIGHTED_POSITIVES,
    IMPRESSION_HARD_NEGATIVES,
    import_logs,
    load_mapping,
)
from convcg_cli.data.importing.source_files import SourceFile, TimeSpec, parse_times, read_table, source_files
from convcg_cli.data.importing.user_keys import UserKeySpec, assign_user_ids
from convcg_cli.errors import ConfigError, ConvcgError

SHOP = Path(__file__).parent / "fixtures" / "shop_sample"
runner = CliRunner()


@pytest.fixture
def shop_dir(tmp_path: Path) -> Path:
    """A private copy of the shop sample (tests may break its files)."""
    return Path(shutil.copytree(SHOP, tmp_path / "shop"))


def _mapping() -> dict:
    return load_mapping(SHOP / "shop.yaml")


def _epoch(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp())


def _import(mapping: dict, in_dir: Path, out: Path) -> tuple[str, int]:
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(mapping))
    result = runner.invoke(
        app, ["data", "import", "--source", str(path), "--in", str(in_dir), "--out", str(out)]
    )
    return " ".join(result.output.split()), result.exit_code


# --------------------------------------------------------------------------------------------------
# 1. CSV dialect and string timestamps
# --------------------------------------------------------------------------------------------------


def test_semicolon_csv_with_quotes_and_string_dates(tmp_path):
    report = import_logs(_mapping(), SHOP, tmp_path / "out")
    tables = load_tables(tmp_path / "out")
    names = dict(tables["items"].select("item_id", "name").iter_rows())
    assert names[101] == "Mug; blue" and names[102] == 'Tea "Earl Grey"'  # quoted separators and quotes
    assert tables["items"].filter(pl.col("item_id") == 102)["price"].item() == 2.2  # decimal comma
    imp = tables["impressions"]
    assert imp["timestamp"].to_list()[:3] == [
        _epoch("2024-04-25 10:00"),  # views.csv, its own ISO format
        _epoch("2024-04-25 10:10"),
        _epoch("2024-04-25 10:15"),  # purchases.csv, 25.04.2024 10:15 read as UTC
    ]
    assert report.rows["impressions"] == 10


def test_time_zone_of_naive_times():
    frame = pl.DataFrame({"t": ["25.04.2024 10:15"]})
    spec = TimeSpec("t", "%d.%m.%Y %H:%M", "Europe/Berlin")
    parsed = parse_times(frame, spec, SourceFile("x.csv"), Path("x.csv"))
    assert parsed["t"].dt.epoch("s").item() == _epoch("2024-04-25 08:15")  # CEST = UTC+2


def test_unparsable_dates_are_a_clean_error_naming_file_column_count_and_sample(shop_dir, tmp_path):
    path = shop_dir / "purchases.csv"
    path.write_text(
        path.read_text().replace("26.04.2024 09:30", "yesterday").replace("27.04.2024", "2024-04-27")
    )
    text, code = _import(_mapping(), shop_dir, tmp_path / "out")
    assert code == 2, text
    assert "purchases.csv: column 'purchased_at' (the serving time (impressions.timestamp))" in text
    assert (
        "does not match format '%d.%m.%Y %H:%M' in 2 of 6 rows, e.g. ['yesterday', '2024-04-27 18:45']"
        in text
    )
    assert "Traceback" not in text and not (tmp_path / "out").exists()


def test_text_times_without_a_format_name_the_key_to_set(tmp_path):
    mapping = _mapping()
    del mapping["impressions"]["timestamp"]["format"]
    with pytest.raises(
        ConvcgError, match=r"purchases.csv: column 'purchased_at' .* holds text.*timestamp.format"
    ):
        import_logs(mapping, SHOP, tmp_path / "out")


def test_unknown_csv_option_is_a_config_error():
    with pytest.raises(ConfigError, match=r"unknown CSV option\(s\) \['delimiter'\]"):
        source_files("a.csv", {"delimiter": ";"}, "impressions.files")


# --------------------------------------------------------------------------------------------------
# 2. Several files, per-file renames, constant and derived labels
# --------------------------------------------------------------------------------------------------


def test_views_and_purchases_get_their_constant_labels(tmp_path):
    report = import_logs(_mapping(), SHOP, tmp_path / "out")
    imp = load_tables(tmp_path / "out")["impressions"]
    assert (report.clicks, report.conversions) == (6, 6)  # the 6 purchases
    views = imp.filter(~pl.col("clicked"))
    assert views.height == 4 and not views["converted"].any() and views["dwell_seconds"].is_null().all()
    # views are served-but-ignored rows: hard negatives work; no dwell column: dual positives do not
    assert IMPRESSION_HARD_NEGATIVES not in report.disabled_levers
    assert DWELL_WEIGHTED_POSITIVES in report.disabled_levers


def test_a_label_derived_by_a_sql_expression(tmp_path):
    (tmp_path / "log.csv").write_text("u;i;t;event\n1;10;5;view\n1;11;6;purchase\n2;10;7;cart\n")
    source = SourceFile(
        "log.csv",
        {"separator": ";"},
        derive={"converted": "event = 'purchase'", "clicked": "event <> 'view'"},
    )
    frame = read_table(tmp_path, [source], {"clicked": "", "converted": ""}, [], "a log")
    assert frame.rows() == [(False, False), (True, True), (True, False)]


def test_a_missing_renamed_column_names_the_file_and_the_rename(tmp_path):
    mapping = _mapping()
    mapping["impressions"]["files"][1]["columns"]["time"] = "seen_at"
    with pytest.raises(ConvcgError, match=r"views.csv has no column 'seen_at' \(columns.time\)"):
        import_logs(mapping, SHOP, tmp_path / "out")


# --------------------------------------------------------------------------------------------------
# 3. The user key: user id, else session id; users derived from the log or joined by key
# --------------------------------------------------------------------------------------------------


def test_user_id_else_session_id_gives_dense_ids_in_key_order():
    log = pl.DataFrame({"customer": [None, 17, 0, None, 17], "session": ["s-a", "s-b", "s-c", "17", None]})
    spec = UserKeySpec.from_mapping({"column": "customer", "fallback": "session", "null_values": [0]})
    ids, users = assign_user_ids(log, spec)
    assert users["user_key"].to_list() == ["customer:17", "session:17", "session:s-a", "session:s-c"]
    assert ids.to_list() == [2, 0, 3, 1, 0]  # customer 17 and session "17" are two users
    with pytest.raises(ConvcgError, match="1 of 1 impressions have no user"):
        assign_user_ids(
            pl.DataFrame({"customer": [0], "session": [None]}, schema_overrides={"session": pl.String}), spec
        )


def test_users_are_derived_from_the_log_without_a_users_table(tmp_path):
    report = import_logs(_mapping(), SHOP, tmp_path / "out")
    users = load_tables(tmp_path / "out")["users"]
    assert users["user_key"].to_list() == [
        "customer_id:17",
        "session_id:17",
        "session_id:s-a1",
        "session_id:s-c3",  # customer_id 0 is a null value: its session is the user
        "session_id:s-d4",
    ]
    assert users["user_id"].to_list() == [0, 1, 2, 3, 4]
    assert any("No users table" in w for w in report.warnings)


def test_a_users_table_joins_onto_the_logged_users_by_key(tmp_path):
    mapping = _mapping()
    mapping["users"] = {"file": "customers.csv", "user": "customer_id", "keep": ["tier"]}
    report = import_logs(mapping, SHOP, tmp_path / "out")
    users = load_tables(tmp_path / "out")["users"]
    assert dict(users.select("user_key", "tier").iter_rows())["customer_id:17"] == "gold"
    assert users.filter(pl.col("user_key").str.starts_with("session"))["tier"].is_null().all()
    assert report.adjustments["users_not_logged_dropped"] == 1  # customer 99 never appears


# --------------------------------------------------------------------------------------------------
# 4. A catalogue far larger than the log
# --------------------------------------------------------------------------------------------------


def test_catalogue_keeps_every_item_or_only_the_logged_ones(tmp_path):
    import_logs(_mapping(), SHOP, tmp_path / "all")
    assert load_tables(tmp_path / "all")["items"].height == 40
    mapping = _mapping()
    mapping["items"]["catalogue"] = "logged"
    report = import_logs(mapping, SHOP, tmp_path / "logged")
    assert sorted(load_tables(tmp_path / "logged")["items"]["item_id"]) == [101, 102, 103, 104, 105, 106]
    assert report.adjustments["items_not_logged_dropped"] == 34
    mapping["items"]["catalogue"] = "some"
    with pytest.raises(ConfigError, match="items.catalogue must be one of"):
        import_logs(mapping, SHOP, tmp_path / "bad")


# --------------------------------------------------------------------------------------------------
# The example, end to end: purchases only, anonymous sessions, no users table
# --------------------------------------------------------------------------------------------------


def test_purchases_only_with_anonymous_sessions_and_no_users_table(tmp_path):
    mapping = _mapping()
    mapping["impressions"]["files"] = mapping["impressions"]["files"][:1]
    out = tmp_path / "shop"
    text, code = _import(mapping, SHOP, out)
    assert code == 0, text
    assert "40 items, 4 users, 6 impressions; 6 clicks, 6 conversions" in text
    assert "No users table (users): derived from the log (4 users, no attributes)" in text
    tables = load_tables(out)  # raises on any contract violation
    assert validate_frames(tables) == []
    assert tables["impressions"]["converted"].all() and tables["impressions"]["clicked"].all()
    levers = yaml.safe_load((out / "synth.json").read_text())["disabled_levers"]  # JSON is YAML
    assert {DWELL_WEIGHTED_POSITIVES, IMPRESSION_HARD_NEGATIVES} <= set(levers)
