"""The time split's two rules: fixed days, and days grown to hold enough conversions (data.split)."""

from __future__ import annotations

import polars as pl
import pytest

from convcg_cli.builders import build_datamodule
from convcg_cli.config import compose
from convcg_cli.data.contract import load_tables
from convcg_cli.data.features import encodings as F
from convcg_cli.data.features.time_split import (
    ConversionSizedDays,
    FixedDays,
    SplitError,
    daily_counts,
    split_rule,
    window_sum,
)
from convcg_cli.errors import ConfigError

TASKS = ["conversion", "engagement"]


def _daily(conversions: list[int], first: int = 100) -> pl.DataFrame:
    n = len(conversions)
    return pl.DataFrame({"day": list(range(first, first + n)), "rows": [50] * n, "conversions": conversions})


def test_daily_counts_count_rows_and_conversions_per_utc_day():
    imp = pl.DataFrame(
        {
            "timestamp": [0, 86_399, 86_400, 3 * 86_400 + 5],
            "converted": [True, False, True, True],
        }
    )
    assert daily_counts(imp).rows() == [(0, 2, 1), (1, 1, 1), (3, 1, 1)]
    assert daily_counts(imp.lazy()).equals(daily_counts(imp))


def test_fixed_days_are_the_configured_days():
    daily = _daily([5] * 10)
    assert FixedDays(2, 3).days(daily) == F.split_days(100, 109, 2, 3)
    assert FixedDays(2, 3, end_offset_days=2).days(daily) == F.split_days(100, 109, 2, 3, 2)


def test_auto_keeps_the_configured_days_when_they_hold_enough():
    daily = _daily([10] * 12)
    rule = ConversionSizedDays(2, 2, min_conversions={"heldout": 20, "val": 20})
    assert rule.days(daily) == FixedDays(2, 2).days(daily)


def test_auto_grows_the_heldout_window_first_then_validation_by_whole_days():
    #        day: 100 101 102 103 104 105 106 107 108 109
    daily = _daily([9, 9, 9, 9, 9, 1, 7, 4, 1, 2])
    rule = ConversionSizedDays(1, 2, min_conversions={"heldout": 10, "val": 9})
    days = rule.days(daily)
    # held-out: 108..109 hold 3, 107..109 hold 7, 106..109 hold 14 >= 10 (one day fewer would not)
    assert days["heldout"] == (106, 109) and window_sum(daily, days["heldout"]) == 14
    # validation, right before it: 105 holds 1, 104..105 hold 10 >= 9
    assert days["val"] == (104, 105) and window_sum(daily, days["val"]) == 10
    assert days["train"] == (100, 103)


def test_auto_grows_from_the_offset_end_and_leaves_the_dropped_days_out():
    daily = _daily([9, 9, 9, 9, 9, 1, 7, 4, 1, 2, 50, 50])
    rule = ConversionSizedDays(1, 2, end_offset_days=2, min_conversions={"heldout": 10, "val": 9})
    assert rule.days(daily) == {"train": (100, 103), "val": (104, 105), "heldout": (106, 109)}


def test_auto_refuses_with_the_counts_when_the_log_cannot_hold_both_and_a_training_day():
    daily = _daily([3] * 10)  # 30 conversions in all
    with pytest.raises(SplitError) as held:
        ConversionSizedDays(2, 2, min_conversions={"heldout": 40, "val": 1}).days(daily)
    message = str(held.value)
    assert "30 conversions over 10 days" in message and "min_conversions.heldout=40" in message
    assert "(7 days), holds 21" in message  # 103..109: 2 validation days and one training day left
    with pytest.raises(SplitError) as val:
        ConversionSizedDays(2, 2, min_conversions={"heldout": 12, "val": 20}).days(daily)
    message = str(val.value)
    assert "held-out window" in message and "with 12 conversions" in message
    assert "min_conversions.val=20" in message and "(5 days), holds 15" in message  # 101..105
    assert "data.split=days" in message and "\n" not in message


def test_the_rule_is_chosen_by_name_and_checks_its_options():
    assert type(split_rule("days", 2, 2)) is FixedDays
    auto = split_rule("auto", 2, 2, min_conversions={"val": 5})
    assert isinstance(auto, ConversionSizedDays) and auto.min_conversions == {"heldout": 300, "val": 5}
    with pytest.raises(ConfigError, match="data.split must be one of"):
        split_rule("weeks", 2, 2)
    with pytest.raises(ConfigError, match="unknown key"):
        split_rule("auto", 2, 2, min_conversions={"test": 5})
    with pytest.raises(ConfigError, match="min_conversions.val must be >= 0"):
        split_rule("auto", 2, 2, min_conversions={"val": -1})


def test_describe_says_each_windows_dates_and_conversions():
    daily = _daily([1] * 6, first=20_454)  # 2026-01-01
    rule = FixedDays(2, 2)
    line = rule.describe(daily, rule.days(daily))
    assert line == (
        "Time split (data.split=days, UTC days): train 2026-01-01..2026-01-02 (2 days), 2 conversions | "
        "val 2026-01-03..2026-01-04 (2 days), 2 conversions | "
        "heldout 2026-01-05..2026-01-06 (2 days), 2 conversions"
    )


def test_the_default_config_sizes_the_split_by_conversions():
    data = compose("train", []).cfg.data
    assert data.split == "auto" and dict(data.min_conversions) == {"heldout": 300, "val": 200}
    assert compose("train", ["data=kuairand"]).cfg.data.split == "auto"


def _tiny(tiny_data, *overrides: str):
    cfg = compose("train", [f"data.dir={tiny_data}", *overrides]).cfg
    return build_datamodule(cfg, TASKS, stage="validate")


def test_every_user_of_the_data_sees_the_days_the_auto_split_chose(tiny_data, capsys):
    """Training, the streamed path and the baselines read one set of days: the datamodule's."""
    from convcg_cli.baselines import training_history

    grown = ["data.min_conversions.heldout=100", "data.min_conversions.val=100"]
    memory = _tiny(tiny_data, *grown)
    assert "Time split (data.split=auto" in capsys.readouterr().err
    fixed = _tiny(tiny_data, "data.split=days")
    assert memory.split_days != fixed.split_days
    held, val = memory.split_days["heldout"], memory.split_days["val"]
    assert held[1] == fixed.split_days["heldout"][1] and held[1] - held[0] + 1 > 2 and val[1] == held[0] - 1
    streamed = _tiny(tiny_data, *grown, "data/stream=streamed", "data.stream.cache_dir=null")
    assert streamed.split_days == memory.split_days and streamed.n_rows == memory.n_rows
    impressions = load_tables(tiny_data)["impressions"]
    train = F.engaged_rows(impressions.filter(F.in_days(memory.split_days["train"])), TASKS)
    assert len(training_history(memory).user_pos) == train.height  # the baselines' profile window
    assert memory.cutoff() == (memory.split_days["train"][1] + 1) * F.SECONDS_PER_DAY


def test_auto_split_with_a_refit_and_a_rolling_origin(tiny_data):
    grown = ["data.min_conversions.heldout=100", "data.min_conversions.val=100"]
    plain = _tiny(tiny_data, *grown)
    refit = _tiny(tiny_data, *grown, "data.train_through_val=true")
    assert refit.split_days == plain.split_days
    assert refit.training_days() == (plain.split_days["train"][0], plain.split_days["val"][1])
    earlier = _tiny(tiny_data, *grown, "data.end_offset_days=2")
    assert earlier.split_days["heldout"][1] == plain.split_days["heldout"][1] - 2
