"""Attribution of conversion events to impressions, against a hand-computed example."""

import json

import polars as pl
import pytest

from convcg_cli.data.contract import conform_table, load_schemas, validate_frames
from convcg_cli.data.importing import AttributionRule, attribute
from convcg_cli.errors import ConfigError

H = 3600
D = 86_400


def _tables() -> dict[str, pl.DataFrame]:
    """Two users, three items (items 10 and 11 of advertiser 1, item 12 of advertiser 2)."""
    schemas = load_schemas()
    items = pl.DataFrame({"item_id": [10, 11, 12], "advertiser_id": [1, 1, 2]})
    users = pl.DataFrame({"user_id": [1, 2]})
    # impression_id, timestamp, user, item, clicked
    rows = [
        (1, 0, 1, 10, True),  # old click on item 10
        (2, 2 * D, 1, 10, True),  # last click on item 10 before conversion 100
        (3, 2 * D + H, 1, 10, False),  # later view of item 10: a click beats it
        (4, 10 * D, 1, 11, False),  # view of item 11, 2 hours before conversion 101
        (5, 20 * D, 2, 12, True),  # click on advertiser 2's item: advertiser-level conversion 102
        (6, 30 * D, 2, 11, True),  # click, reported by the advertiser for conversion 103
        (7, 40 * D, 1, 12, True),  # click 9 days before conversion 104: outside the 7-day window
    ]
    imp = pl.DataFrame(
        rows, schema=["impression_id", "timestamp", "user_id", "item_id", "clicked"], orient="row"
    ).with_columns(
        surface=pl.lit("home_feed"),
        dwell_seconds=pl.when("clicked").then(10.0),
        saved=pl.lit(False),
        converted=pl.lit(False),
    )
    conversions = pl.DataFrame(
        {
            "conversion_id": [100, 101, 102, 103, 104, 105],
            "timestamp": [3 * D, 10 * D + 2 * H, 21 * D, 31 * D, 49 * D, 50 * D],
            "user_id": [1, 1, 2, 2, 1, 1],
            "item_id": [10, 11, None, 11, 12, None],
            "advertiser_id": [None, None, 2, None, None, None],
            "value": [5.0, 7.0, 11.0, None, 3.0, 1.0],
            "type": ["checkout"] * 6,
            "impression_id": [None, None, None, 6, None, None],
        }
    )
    return {
        "items": conform_table(schemas["items"], items),
        "users": conform_table(schemas["users"], users),
        "impressions": conform_table(schemas["impressions"], imp),
        "conversions": conform_table(schemas["conversions"], conversions),
    }


def test_attribution_matches_the_hand_computed_example():
    t = _tables()
    result = attribute(t["impressions"], t["items"], t["conversions"], AttributionRule(7, 1))
    imp = result.impressions.sort("impression_id")
    assert imp["converted"].to_list() == [False, True, False, True, True, True, False]
    assert imp["conversion_value"].to_list() == [None, 5.0, None, 7.0, 11.0, None, None]
    assert imp["conversion_delay_seconds"].to_list() == [None, D, None, 2 * H, D, D, None]
    assert imp["view_through"].to_list() == [False, False, False, True, False, False, False]
    c = result.counts
    assert (c["reported"], c["click"], c["view"], c["advertiser_click"], c["advertiser_view"]) == (
        1,
        1,
        1,
        1,
        0,
    )
    assert (c["unattributed"], c["no_touch_in_window"], c["no_item_or_advertiser"]) == (2, 1, 1)
    assert result.value == {"total": 27.0, "attributed": 23.0}
    assert validate_frames({**t, "impressions": imp}) == []


def test_without_view_through_the_view_is_not_credited():
    t = _tables()
    result = attribute(t["impressions"], t["items"], t["conversions"], AttributionRule(7, 0))
    assert result.impressions.filter(pl.col("impression_id") == 4)["converted"].item() is False
    assert result.counts["view"] == 0 and result.counts["no_touch_in_window"] == 2


def test_a_longer_click_window_reaches_the_older_click():
    t = _tables()
    result = attribute(t["impressions"], t["items"], t["conversions"], AttributionRule(28, 0))
    assert result.impressions.filter(pl.col("impression_id") == 7)["converted"].item() is True


def test_windows_are_checked():
    with pytest.raises(ConfigError, match="click-through window must be > 0"):
        AttributionRule(0, 1)


def test_synth_with_delays_reports_attributed_conversion_events(tmp_path, tiny_tables):
    from typer.testing import CliRunner

    from convcg_cli.cli import app
    from convcg_cli.data.contract import load_tables

    out = tmp_path / "delays"
    result = CliRunner().invoke(app, ["data", "synth", "--preset", "tiny", "--out", str(out), "--delays"])
    assert result.exit_code == 0, result.output
    tables = load_tables(out)
    events, imp = tables["conversions"], tables["impressions"]
    assert events.height > 0 and events["item_id"].null_count() > 0  # some name only the advertiser
    assert (events["value"] > 0).all()
    # Only the conversion columns differ from the default preset's impressions.
    same = [c for c in tiny_tables["impressions"].columns if c != "converted"]
    assert imp.select(same).equals(tiny_tables["impressions"].select(same))
    assert imp.filter("converted")["conversion_delay_seconds"].null_count() == 0
    assert imp["converted"].sum() < tiny_tables["impressions"]["converted"].sum()  # late ones missing

    again = tmp_path / "again"
    result = CliRunner().invoke(
        app, ["data", "attribute", "--in", str(out), "--out", str(again), "--view-window-days", "0"]
    )
    assert result.exit_code == 0, result.output
    assert "Attribution rule: last click within 7 day(s)" in result.output
    assert load_tables(again)["impressions"].equals(imp)
    provenance = json.loads((again / "synth.json").read_text())
    assert provenance["attribution"]["counts"]["conversions"] == events.height
    assert provenance["preset"] == "tiny" and provenance["config"]["conversion_events"] is True


def test_attribute_without_conversion_events_is_a_clear_error(tmp_path, tiny_dir):
    from typer.testing import CliRunner

    from convcg_cli.cli import app

    result = CliRunner().invoke(
        app, ["data", "attribute", "--in", str(tiny_dir), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code != 0
    assert "has no conversion events" in result.output
