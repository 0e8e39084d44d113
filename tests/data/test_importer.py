"""Importers by configuration: a hand-written sample in the KuaiRand layout through
``conf/importer/kuairand.yaml``, missing signals, the CLI's error text, and (marker ``kuairand``) the
real data set."""

from __future__ import annotations

import json
import shutil
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
    SURFACE_CONTEXT,
    ImportReport,
    import_logs,
    load_mapping,
)
from convcg_cli.data.importing.frames import advertiser_groups, map_impressions, map_surface
from convcg_cli.errors import ConfigError

SAMPLE = Path(__file__).parent / "fixtures" / "kuairand_sample"
REAL = Path(__file__).resolve().parents[2] / "../shared/data/kuairand"
SPLITS = ("splits_val", "splits_test")
# dtypes of the real processed/splits_*.parquet that CSV inference would not give (the rest are Int64).
SPLIT_DTYPES = {
    "hourmin": pl.Int32,
    "source_file": pl.String,
    "watch_ratio": pl.Float32,
    "finish": pl.Int8,
    "like": pl.Int8,
    "long_watch": pl.Int8,
    "is_positive": pl.Int8,
    "tag": pl.String,
    "upload_dt": pl.String,
    "video_duration": pl.Float64,
}

runner = CliRunner()


def _ids(text: str) -> pl.Expr:
    """Space-separated ids -> List(Int64); empty -> [] (as in the real user_sequences.parquet)."""
    return pl.col(text).fill_null("").str.split(" ").list.eval(pl.element().filter(pl.element() != ""))


@pytest.fixture
def sample_dir(tmp_path: Path) -> Path:
    """The sample laid out like the real data set: raw/*.csv as written, processed/*.parquet built."""
    root = tmp_path / "kuairand"
    shutil.copytree(SAMPLE / "raw", root / "raw")
    (root / "processed").mkdir()
    for name in SPLITS:
        path = SAMPLE / "processed" / f"{name}.csv"
        columns = pl.read_csv(path, n_rows=0).columns
        schema = {c: SPLIT_DTYPES.get(c, pl.Int64) for c in columns}
        pl.read_csv(path, schema=schema).write_parquet(root / "processed" / f"{name}.parquet")
    seq = pl.read_csv(SAMPLE / "processed" / "user_sequences.csv", infer_schema=False)
    seq.select(
        pl.col("user_id", "history_len", "last_time_ms").cast(pl.Int64),
        *(_ids(c).cast(pl.List(pl.Int64)) for c in ("watch_seq", "like_seq", "long_watch_seq")),
    ).write_parquet(root / "processed" / "user_sequences.parquet")
    return root


def _imported(sample_dir: Path, out: Path, mapping: dict | None = None) -> tuple[ImportReport, dict]:
    report = import_logs(mapping or load_mapping("kuairand"), sample_dir, out)
    return report, load_tables(out)


def _row(impressions: pl.DataFrame, user: int, item: int) -> dict:
    return impressions.filter((pl.col("user_id") == user) & (pl.col("item_id") == item)).row(0, named=True)


def _invoke(*args: str):
    result = runner.invoke(app, ["data", "import", *args])
    return result, " ".join(result.output.split())  # rich wraps long lines; compare words


# --------------------------------------------------------------------------------------------------
# The sample through the shipped KuaiRand mapping
# --------------------------------------------------------------------------------------------------


def test_sample_imports_into_the_contract(sample_dir, tmp_path):
    report, tables = _imported(sample_dir, tmp_path / "out")
    assert report.rows == {"impressions": 29, "items": 10, "users": 7, "user_history": 29}
    assert (report.clicks, report.conversions, report.saves) == (19, 6, 3)
    assert report.adjustments["conversions_counted_as_clicks"] == 2
    assert report.adjustments["duplicate_rows"] == 1
    assert report.disabled_levers == {}
    assert validate_frames(tables) == []
    imp = tables["impressions"]
    assert imp["impression_id"].to_list() == list(range(29))
    assert imp["timestamp"].is_sorted()
    info = json.loads((tmp_path / "out" / "synth.json").read_text())
    assert info["kind"] == "import" and info["source"] == "kuairand" and info["disabled_levers"] == {}
    assert info["rows"]["impressions"] == 29


def test_import_is_deterministic(sample_dir, tmp_path):
    _, first = _imported(sample_dir, tmp_path / "a")
    _, second = _imported(sample_dir, tmp_path / "b")
    for name in first:
        assert first[name].equals(second[name])


def test_tabs_map_to_surfaces_with_a_default(sample_dir, tmp_path):
    report, tables = _imported(sample_dir, tmp_path / "out")
    assert report.surfaces == {"home_feed": 19, "related_items": 10}
    assert {m["value"]: m["surface"] for m in report.surface_mapping} == {
        1: "home_feed",
        **{tab: "related_items" for tab in (0, 2, 4, 6, 11, 12)},
    }
    assert _row(tables["impressions"], 3, 0)["surface"] == "related_items"  # tab 4
    surface, _ = map_surface(pl.Series([1, 0, 14, 1]), {"values": {1: "search"}, "default": "home_feed"})
    assert surface.to_list() == ["search", "home_feed", "home_feed", "search"]


def test_a_surface_outside_the_contract_is_a_config_error(sample_dir, tmp_path):
    mapping = load_mapping("kuairand")
    mapping["impressions"]["surface"]["values"] = {1: "main_feed"}
    with pytest.raises(ConfigError, match="main_feed"):
        import_logs(mapping, sample_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_like_without_click_counts_as_click(sample_dir, tmp_path):
    _, tables = _imported(sample_dir, tmp_path / "out")
    row = _row(tables["impressions"], 2, 3)  # is_click 0, is_like 1, 4 s played
    assert row["clicked"] and row["converted"] and row["dwell_seconds"] == 4.0


def test_like_without_click_can_be_dropped(sample_dir, tmp_path):
    mapping = load_mapping("kuairand")
    mapping["impressions"]["conversion_without_click"] = "drop"
    report, tables = _imported(sample_dir, tmp_path / "out", mapping)
    row = _row(tables["impressions"], 2, 3)
    assert not row["clicked"] and not row["converted"] and row["dwell_seconds"] is None
    assert (report.clicks, report.conversions) == (17, 4)


def test_dwell_is_null_exactly_on_non_clicks(sample_dir, tmp_path):
    _, tables = _imported(sample_dir, tmp_path / "out")
    imp = tables["impressions"]
    assert imp["dwell_seconds"].is_null().to_list() == (~imp["clicked"]).to_list()
    assert _row(imp, 0, 0)["dwell_seconds"] == 35.0  # play_time_ms 35000
    assert _row(imp, 4, 8)["dwell_seconds"] == 0.0  # a click with 0 ms played stays a 0 s dwell


def test_untagged_videos_get_a_dedicated_group(sample_dir, tmp_path):
    _, tables = _imported(sample_dir, tmp_path / "out")
    groups = dict(tables["items"].select("item_id", "advertiser_id").iter_rows())
    assert groups[5] == groups[7] == 0  # no tag
    assert (groups[1], groups[3], groups[8]) == (12, 3, 65)  # first of "12,65", "3,7,12", "65,3"
    spec = {"column": "brand", "list_separator": "|", "unknown_values": ["n/a"], "unknown_id": 0}
    names = advertiser_groups(pl.Series(["acme|x", "n/a", None, "zeta", "acme"]), spec)
    assert names.to_list() == [1, 0, 0, 2, 1]  # non-integer groups: dense codes above unknown_id
    with pytest.raises(ConfigError, match="unknown_id 12"):
        tags = {**spec, "column": "tag", "list_separator": ",", "unknown_id": 12}
        advertiser_groups(pl.Series(["12,65", ""]), tags)


def test_sentinels_become_null_and_user_history_joins(sample_dir, tmp_path):
    report, tables = _imported(sample_dir, tmp_path / "out")
    users = tables["users"].sort("user_id")
    assert users["is_live_streamer"].to_list() == [1, None, None, 1, None, None, None]  # -124
    assert users["user_active_degree"][3] is None  # UNKNOWN
    assert users["account_age_days"].to_list() == [800.0, 200.0, 1500.0, 20.0, 400.0, 9.0, 100.0]
    assert users["watch_history"][0].to_list() == [4, 6, 2, 2, 9]
    assert users["like_history"][1].to_list() == []
    assert users["history_len"][5] is None  # no history before the log
    items = tables["items"].sort("item_id")
    assert items["upload_type"][2] is None and items["video_type"][8] is None
    assert report.adjustments["nulled_sentinels.users.is_live_streamer"] == 5


def test_no_leaky_aggregates_are_imported(sample_dir, tmp_path):
    _, tables = _imported(sample_dir, tmp_path / "out")
    leaky = {"show_cnt", "play_cnt", "like_cnt", "counts"}
    assert not leaky & set(tables["items"].columns)


# --------------------------------------------------------------------------------------------------
# Missing signals: a warning and a disabled lever, not a crash
# --------------------------------------------------------------------------------------------------


def test_sample_without_dwell_imports_with_a_warning(sample_dir, tmp_path):
    for name in SPLITS:
        path = sample_dir / "processed" / f"{name}.parquet"
        pl.read_parquet(path).drop("play_time_ms").write_parquet(path)
    out = tmp_path / "out"
    result, text = _invoke("--source", "kuairand", "--in", str(sample_dir), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "play_time_ms' is absent" in text and DWELL_WEIGHTED_POSITIVES in text
    assert "29 impressions" in text and "home_feed: 19 impressions <- tab 1" in text
    imp = load_tables(out)["impressions"]
    assert imp.filter("clicked")["dwell_seconds"].unique().to_list() == [0.0]
    assert DWELL_WEIGHTED_POSITIVES in json.loads((out / "synth.json").read_text())["disabled_levers"]


def test_interactions_only_log_without_surface_disables_levers():
    log = pl.DataFrame({"uid": [1, 2], "iid": [10, 11], "ts": [1_700_000_000, 1_700_000_100], "buy": [1, 1]})
    spec = {"user": "uid", "item": "iid", "timestamp": {"column": "ts", "unit": "s"}}
    report = ImportReport(source="shop", in_dir="")
    out = map_impressions(log, {**spec, "clicked": ["buy"], "converted": ["buy"]}, report)
    assert set(report.disabled_levers) == {
        DWELL_WEIGHTED_POSITIVES,
        SURFACE_CONTEXT,
        IMPRESSION_HARD_NEGATIVES,
    }
    assert out["surface"].to_list() == ["home_feed", "home_feed"]
    assert out["saved"].to_list() == [False, False]
    assert any("No save signal" in w for w in report.warnings)


# --------------------------------------------------------------------------------------------------
# Errors through the CLI: exit 2, the file and column named, nothing written
# --------------------------------------------------------------------------------------------------


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith((".out", "out"))]


def test_missing_file_is_a_clear_error(sample_dir, tmp_path):
    (sample_dir / "processed" / "splits_test.parquet").unlink()
    result, text = _invoke("--source", "kuairand", "--in", str(sample_dir), "--out", str(tmp_path / "out"))
    assert result.exit_code == 2
    assert "processed/splits_test.parquet is missing" in text and "the impressions log" in text
    assert "Traceback" not in text and _leftovers(tmp_path) == []


def test_missing_column_is_a_clear_error(sample_dir, tmp_path):
    path = sample_dir / "processed" / "splits_val.parquet"
    pl.read_parquet(path).drop("video_id").write_parquet(path)
    result, text = _invoke("--source", "kuairand", "--in", str(sample_dir), "--out", str(tmp_path / "out"))
    assert result.exit_code == 2
    assert "splits_val.parquet has no column 'video_id' (the item id (impressions.item))" in text
    assert _leftovers(tmp_path) == []


def test_dangling_item_is_a_contract_error(sample_dir, tmp_path):
    path = sample_dir / "raw" / "video_features_basic_pure.csv"
    pl.read_csv(path).filter(pl.col("video_id") != 9).write_csv(path)
    result, text = _invoke("--source", "kuairand", "--in", str(sample_dir), "--out", str(tmp_path / "out"))
    assert result.exit_code == 2
    assert "impressions.parquet, column 'item_id'" in text and "missing from items.parquet" in text
    assert _leftovers(tmp_path) == []


def test_unknown_source_names_the_shipped_ones(sample_dir, tmp_path):
    result, text = _invoke("--source", "nope", "--in", str(sample_dir), "--out", str(tmp_path / "out"))
    assert result.exit_code == 2 and "No importer mapping for source 'nope'" in text and "kuairand" in text


def test_a_mapping_file_path_works_as_source(sample_dir, tmp_path):
    mapping = load_mapping("kuairand")
    del mapping["user_history"]
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(mapping))
    result, text = _invoke("--source", str(path), "--in", str(sample_dir), "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert "Disabled levers: user_history." in text


@pytest.mark.faults
def test_a_count_column_mapped_as_clicked_is_refused_with_a_sample(sample_dir, tmp_path):
    mapping = load_mapping("kuairand")
    mapping["impressions"]["clicked"] = ["play_time_ms"]
    path = tmp_path / "counts.yaml"
    path.write_text(yaml.safe_dump(mapping))
    result, text = _invoke("--source", str(path), "--in", str(sample_dir), "--out", str(tmp_path / "out"))
    assert result.exit_code == 2, result.output
    assert "column 'play_time_ms' (a 0/1 clicked flag (impressions.clicked)) must be Boolean or 0/1" in text
    assert "e.g. [35000," in text
    assert not (tmp_path / "out").exists()


@pytest.mark.faults
def test_a_string_item_id_is_refused_with_a_sample(sample_dir, tmp_path):
    path = sample_dir / "processed" / "splits_val.parquet"
    frame = pl.read_parquet(path)
    frame.with_columns(("v" + pl.col("video_id").cast(pl.String)).alias("video_id")).write_parquet(path)
    result, text = _invoke("--source", "kuairand", "--in", str(sample_dir), "--out", str(tmp_path / "out"))
    assert result.exit_code == 2, result.output
    assert "column 'video_id' (the item id (impressions.item)) must hold integers, but it is String" in text
    assert "e.g. ['v" in text and "Traceback" not in text


# --------------------------------------------------------------------------------------------------
# The real data set
# --------------------------------------------------------------------------------------------------


@pytest.mark.kuairand
@pytest.mark.skipif(not REAL.is_dir(), reason=f"the KuaiRand data set is not at {REAL.resolve()}")
def test_real_kuairand_imports_with_the_readme_counts(tmp_path):
    report, tables = _imported(REAL, tmp_path / "kuairand")
    assert report.rows == {"impressions": 228_329, "items": 7_583, "users": 27_285, "user_history": 1_230_650}
    assert report.conversions == 3_915  # likes
    assert report.clicks == 100_900 + report.adjustments["conversions_counted_as_clicks"]
    assert report.disabled_levers == {}
    assert tables["items"]["advertiser_id"].n_unique() == 44  # 43 first tags + the untagged group
