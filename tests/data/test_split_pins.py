"""The time split's day arithmetic pinned against plain loops (``make mutate``).

Which day each row falls in (boundaries of a UTC day included), the fixed windows for every small
configuration, and the conversion-sized windows on random daily counts, each against a reference
written here day by day.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from convcg_cli.data.features.time_split import (
    SECONDS_PER_DAY,
    ConversionSizedDays,
    FixedDays,
    SplitError,
    check_end_offset_days,
    daily_counts,
    iso_day,
    split_by_time,
    split_days,
    split_frame,
    window_sum,
)
from convcg_cli.errors import ConfigError


def _fixed_reference(first, last, val_days, heldout_days, offset):
    """Walk back from the end day by day; None when no training day is left."""
    days = list(range(first, last - offset + 1))
    if val_days < 1 or heldout_days < 1 or len(days) < val_days + heldout_days + 1:
        return None
    cut = len(days) - heldout_days - val_days
    train, val, heldout = days[:cut], days[cut : cut + val_days], days[cut + val_days :]
    return {"train": (train[0], train[-1]), "val": (val[0], val[-1]), "heldout": (heldout[0], heldout[-1])}


@pytest.mark.parametrize("offset", [0, 1, 3])
def test_split_days_is_the_day_by_day_walk_back(offset):
    for n_days in range(1, 9):
        for val_days in range(0, 4):
            for heldout_days in range(0, 4):
                expected = _fixed_reference(50, 50 + n_days - 1, val_days, heldout_days, offset)
                if expected is None:
                    with pytest.raises(SplitError):
                        split_days(50, 50 + n_days - 1, val_days, heldout_days, offset)
                else:
                    assert split_days(50, 50 + n_days - 1, val_days, heldout_days, offset) == expected


def test_the_too_short_log_message_counts_the_days():
    with pytest.raises(SplitError) as short:
        split_days(10, 13, 2, 2)
    assert "covers 4 day(s)" in str(short.value) and "need at least 5 days" in str(short.value)
    with pytest.raises(SplitError) as dropped:
        split_days(10, 15, 2, 2, end_offset_days=2)
    assert "covers 4 day(s) once data.end_offset_days=2 are dropped (days 10..13" in str(dropped.value)


def test_end_offset_days_may_be_zero_but_not_negative():
    assert check_end_offset_days(0) == 0 and check_end_offset_days(3) == 3
    with pytest.raises(ConfigError, match="end_offset_days must be >= 0"):
        check_end_offset_days(-1)


def _impressions(days_and_seconds):
    ts = [d * SECONDS_PER_DAY + s for d, s in days_and_seconds]
    return pl.DataFrame(
        {"timestamp": ts, "converted": [i % 2 == 0 for i in range(len(ts))], "row": list(range(len(ts)))}
    )


def test_rows_fall_in_the_split_of_their_utc_day_boundaries_included():
    # Days 100..106 with a row at the first and the last second of each day; 2 val, 2 held-out days.
    pairs = [(d, s) for d in range(100, 107) for s in (0, SECONDS_PER_DAY - 1)]
    imp = _impressions(pairs)
    split = split_by_time(imp, val_days=2, heldout_days=2)
    assert split.days == {"train": (100, 102), "val": (103, 104), "heldout": (105, 106)}
    for name, (lo, hi) in split.days.items():
        expected = [i for i, (d, _) in enumerate(pairs) if lo <= d <= hi]
        assert getattr(split, name)["row"].to_list() == expected
    again = split_frame(imp, split.days)
    assert again.val["row"].to_list() == split.val["row"].to_list()
    with pytest.raises(SplitError, match="0 rows"):
        split_by_time(imp.head(0), 2, 2)
    with pytest.raises(SplitError, match="The val split"):
        split_frame(
            imp.filter(pl.col("row") < 6), {"train": (100, 100), "val": (103, 104), "heldout": (100, 102)}
        )


def test_daily_counts_and_window_sums_are_inclusive_day_sums():
    imp = _impressions([(5, 0), (5, 86_399), (6, 10), (8, 0), (8, 1), (8, 2)])
    daily = daily_counts(imp)
    assert daily.rows() == [(5, 2, 1), (6, 1, 1), (8, 3, 1)]
    assert window_sum(daily, (5, 8)) == 3 and window_sum(daily, (6, 8)) == 2
    assert window_sum(daily, (5, 6)) == 2 and window_sum(daily, (6, 6)) == 1
    assert window_sum(daily, (5, 8), "rows") == 6 and window_sum(daily, (7, 7)) == 0
    with pytest.raises(SplitError, match="0 rows"):
        daily_counts(imp.head(0))


def test_fixed_days_from_daily_counts_use_the_first_and_last_logged_day():
    daily = pl.DataFrame({"day": [7, 9, 10, 12, 13], "rows": [1] * 5, "conversions": [1] * 5})
    assert FixedDays(1, 2).days(daily) == {"train": (7, 10), "val": (11, 11), "heldout": (12, 13)}
    assert iso_day(0) == "1970-01-01" and iso_day(20_454) == "2026-01-01" and iso_day(-1) == "1969-12-31"


def _grown_reference(conversions, first, val_days, heldout_days, offset, need):
    """Each window grown a day at a time, held-out first; None when a minimum cannot be met."""
    end = first + len(conversions) - 1 - offset
    per_day = dict(zip(range(first, first + len(conversions)), conversions, strict=True))

    def held(lo, hi):
        return sum(per_day.get(d, 0) for d in range(lo, hi + 1))

    windows = {}
    for name, n, earliest in (
        ("heldout", heldout_days, first + val_days + 1),
        ("val", val_days, first + 1),
    ):
        start = end - n + 1
        while held(start, end) < need[name] and start > earliest:
            start -= 1
        if held(start, end) < need[name]:
            return None
        windows[name] = (start, end)
        end = start - 1
    return {"train": (first, windows["val"][0] - 1), **windows}


@pytest.mark.parametrize("seed", range(8))
def test_conversion_sized_days_are_the_day_by_day_growth(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(6, 14))
    conversions = rng.integers(0, 6, n).tolist()
    val_days, heldout_days, offset = int(rng.integers(1, 3)), int(rng.integers(1, 3)), int(rng.integers(0, 2))
    need = {"heldout": int(rng.integers(0, 14)), "val": int(rng.integers(0, 10))}
    daily = pl.DataFrame({"day": list(range(200, 200 + n)), "rows": [9] * n, "conversions": conversions})
    rule = ConversionSizedDays(val_days, heldout_days, offset, min_conversions=need)
    expected = _grown_reference(conversions, 200, val_days, heldout_days, offset, need)
    if expected is None:
        with pytest.raises(SplitError):
            rule.days(daily)
    else:
        assert rule.days(daily) == expected


def test_a_minimum_met_exactly_stops_the_growth():
    daily = pl.DataFrame({"day": list(range(10)), "rows": [9] * 10, "conversions": [2] * 10})
    rule = ConversionSizedDays(1, 1, min_conversions={"heldout": 4, "val": 2})
    assert rule.days(daily) == {"train": (0, 6), "val": (7, 7), "heldout": (8, 9)}
    assert ConversionSizedDays(1, 1, min_conversions={"heldout": 0, "val": 0}).min_conversions == {
        "heldout": 0,
        "val": 0,
    }


def test_the_refusal_names_the_window_and_the_dropped_days():
    daily = pl.DataFrame({"day": list(range(20_454, 20_464)), "rows": [9] * 10, "conversions": [3] * 10})
    with pytest.raises(SplitError) as refused:
        ConversionSizedDays(2, 2, end_offset_days=2, min_conversions={"heldout": 40, "val": 1}).days(daily)
    message = str(refused.value)
    # 8 days once 2 are dropped (24 conversions); the held-out window may grow to 20457..20461.
    assert (
        "holds 24 conversions over 8 days (2026-01-01..2026-01-08, data.end_offset_days=2 dropped)" in message
    )
    assert "leaving 2 validation day(s) and one training day" in message
    assert "2026-01-04..2026-01-08 (5 days), holds 15" in message
