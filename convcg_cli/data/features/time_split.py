"""The time split: whole UTC days counted back from the end of the log, train | val | heldout.

Two rules, chosen by ``data.split``:

* :class:`FixedDays` (``days``): the last ``heldout_days`` days are held out, the ``val_days`` before
  them validate, the rest trains.
* :class:`ConversionSizedDays` (``auto``, the default): the same windows, each grown by whole days
  (held-out first, then validation right before it) until it holds ``min_conversions`` converted
  impressions, so a sparse log still evaluates on enough conversions.

Both count back from the last logged day minus ``end_offset_days`` (rolling-origin folds). A
datamodule computes its days once (``split_days``); training, evaluation, the baselines and the
caches read them from it, never split again with their own rule.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from dataclasses import dataclass

import polars as pl

from convcg_cli.errors import ConfigError, ConvcgError

SECONDS_PER_DAY = 86_400
IMPRESSIONS_FILE = "impressions.parquet"
SPLIT_NAMES = ("train", "val", "heldout")
SPLIT_LABELS = {"train": "training", "val": "validation", "heldout": "held-out"}
# data.min_conversions when the config gives none (300: a recall near 0.5 is known to about +-0.06).
DEFAULT_MIN_CONVERSIONS = {"heldout": 300, "val": 200}


class SplitError(ConvcgError):
    """A time split is empty or impossible for the data at hand."""


@dataclass(frozen=True)
class TimeSplit:
    """Impressions cut into consecutive whole UTC days: train | val | heldout."""

    train: pl.DataFrame
    val: pl.DataFrame
    heldout: pl.DataFrame
    days: dict[str, tuple[int, int]]  # split -> (first day, last day), days since the unix epoch


def in_days(days: tuple[int, int]) -> pl.Expr:
    """Rows whose UTC day lies in ``days`` (first and last day, inclusive)."""
    day = pl.col("timestamp") // SECONDS_PER_DAY
    return (day >= days[0]) & (day <= days[1])


def check_end_offset_days(days: int) -> int:
    """``data.end_offset_days`` as an int, or a ConfigError when it is negative."""
    if days < 0:
        raise ConfigError(f"data.end_offset_days must be >= 0 (days to drop from the end), got {days}.")
    return int(days)


def split_days(
    first: int, last: int, val_days: int, heldout_days: int, end_offset_days: int = 0
) -> dict[str, tuple[int, int]]:
    """(first day, last day) of train | val | heldout, counted back from ``last - end_offset_days``.

    ``end_offset_days`` (rolling-origin evaluation) drops the last N logged days: no split holds them.
    """
    end = last - check_end_offset_days(end_offset_days)
    heldout_start = end - heldout_days + 1
    val_start = heldout_start - val_days
    n_days = end - first + 1
    if val_days < 1 or heldout_days < 1 or val_start <= first:
        dropped = f" once data.end_offset_days={end_offset_days} are dropped" if end_offset_days else ""
        raise SplitError(
            f"{IMPRESSIONS_FILE} covers {max(n_days, 0)} day(s){dropped} (days {first}..{end} since "
            f"1970-01-01); data.val_days={val_days} and data.heldout_days={heldout_days} need at least "
            f"{val_days + heldout_days + 1} days so that at least one day is left to train on."
        )
    return {
        "train": (first, val_start - 1),
        "val": (val_start, heldout_start - 1),
        "heldout": (heldout_start, end),
    }


def check_split_rows(rows: dict[str, int], days: dict[str, tuple[int, int]]) -> None:
    """Every split must have rows."""
    for name, n in rows.items():
        if n == 0:
            lo, hi = days[name]
            raise SplitError(
                f"The {name} split (days {lo}..{hi} since 1970-01-01) of {IMPRESSIONS_FILE} has 0 rows; "
                f"expected impressions on those days. Adjust data.val_days / data.heldout_days."
            )


def daily_counts(impressions: pl.DataFrame | pl.LazyFrame) -> pl.DataFrame:
    """Impressions and converted impressions per logged UTC day: columns ``day`` (days since
    1970-01-01), ``rows``, ``conversions``, sorted by day (a day without impressions has no row).
    A lazy scan is aggregated streaming: O(days) memory."""
    day = (pl.col("timestamp") // SECONDS_PER_DAY).alias("day")
    counts = (
        impressions.lazy()
        .group_by(day)
        .agg(
            pl.len().cast(pl.Int64).alias("rows"),
            pl.col("converted").sum().cast(pl.Int64).alias("conversions"),
        )
        .sort("day")
        .collect(engine="streaming")
    )
    if counts.height == 0:
        raise SplitError(f"{IMPRESSIONS_FILE} has 0 rows; expected impressions over several days.")
    return counts


def window_sum(daily: pl.DataFrame, days: tuple[int, int], column: str = "conversions") -> int:
    """The sum of ``column`` of :func:`daily_counts` over ``days`` (first and last, inclusive)."""
    inside = (pl.col("day") >= days[0]) & (pl.col("day") <= days[1])
    return int(daily.filter(inside)[column].sum())


def _first_and_last(daily: pl.DataFrame) -> tuple[int, int]:
    """The first and last logged day of :func:`daily_counts`."""
    first, last = daily.select(pl.col("day").min().alias("first"), pl.col("day").max().alias("last")).row(0)
    return int(first), int(last)


def iso_day(day: int) -> str:
    """A day since 1970-01-01 as its UTC date, e.g. ``2026-01-20``."""
    return (datetime.date(1970, 1, 1) + datetime.timedelta(days=int(day))).isoformat()


def _window(days: tuple[int, int]) -> str:
    lo, hi = days
    return f"{iso_day(lo)}..{iso_day(hi)} ({hi - lo + 1} day{'s' if hi > lo else ''})"


class FixedDays:
    """``data.split=days``: the last ``heldout_days`` days (before ``end_offset_days`` dropped ones)
    are held out, the ``val_days`` before them validate, every earlier day trains.

    Example:
        >>> daily = pl.DataFrame({"day": [0, 1, 2, 3, 4], "rows": [9] * 5, "conversions": [1] * 5})
        >>> FixedDays(val_days=1, heldout_days=2).days(daily)
        {'train': (0, 1), 'val': (2, 2), 'heldout': (3, 4)}
    """

    name = "days"

    def __init__(self, val_days: int = 2, heldout_days: int = 2, end_offset_days: int = 0) -> None:
        self.val_days, self.heldout_days = int(val_days), int(heldout_days)
        self.end_offset_days = check_end_offset_days(end_offset_days)

    def days(self, daily: pl.DataFrame) -> dict[str, tuple[int, int]]:
        """(first, last) day of train | val | heldout for the log whose :func:`daily_counts` is ``daily``."""
        first, last = _first_and_last(daily)
        return split_days(first, last, self.val_days, self.heldout_days, self.end_offset_days)

    def describe(self, daily: pl.DataFrame, days: Mapping[str, tuple[int, int]]) -> str:
        """One line: each split's UTC dates, number of days and converted impressions."""
        parts = [
            f"{name} {_window(days[name])}, {window_sum(daily, days[name]):,} conversions"
            for name in SPLIT_NAMES
        ]
        return f"Time split (data.split={self.name}, UTC days): " + " | ".join(parts)


class ConversionSizedDays(FixedDays):
    """``data.split=auto``: :class:`FixedDays`'s windows, each grown by whole days until it holds
    ``min_conversions[split]`` converted impressions: the held-out window first (leaving room for
    ``val_days`` and a training day), then the validation window right before it (leaving a training
    day). With enough conversions in the configured days, the days are :class:`FixedDays`'s.

    Raises a :class:`SplitError` naming the counts when the log cannot hold both minimums and a day
    of training.

    Example:
        >>> daily = pl.DataFrame({"day": list(range(8)), "rows": [9] * 8, "conversions": [1] * 8})
        >>> ConversionSizedDays(1, 2, min_conversions={"heldout": 3, "val": 2}).days(daily)
        {'train': (0, 2), 'val': (3, 4), 'heldout': (5, 7)}
    """

    name = "auto"

    def __init__(
        self,
        val_days: int = 2,
        heldout_days: int = 2,
        end_offset_days: int = 0,
        min_conversions: Mapping[str, int] | None = None,
    ) -> None:
        super().__init__(val_days, heldout_days, end_offset_days)
        given = dict(min_conversions or {})
        unknown = sorted(set(given) - set(DEFAULT_MIN_CONVERSIONS))
        if unknown:
            raise ConfigError(
                f"data.min_conversions takes {sorted(DEFAULT_MIN_CONVERSIONS)}, got unknown key(s) {unknown}."
            )
        self.min_conversions = {**DEFAULT_MIN_CONVERSIONS, **{k: int(v) for k, v in given.items()}}
        for name, value in self.min_conversions.items():
            if value < 0:
                raise ConfigError(f"data.min_conversions.{name} must be >= 0, got {value}.")

    def days(self, daily: pl.DataFrame) -> dict[str, tuple[int, int]]:
        """The fixed days, then each window grown to hold its minimum (see the class)."""
        fixed = super().days(daily)  # raises when even the configured days do not fit
        first, end = fixed["train"][0], fixed["heldout"][1]
        heldout = self._grown(daily, end, self.heldout_days, "heldout", earliest=first + self.val_days + 1)
        val = self._grown(daily, heldout[0] - 1, self.val_days, "val", earliest=first + 1, after=heldout)
        return {"train": (first, val[0] - 1), "val": val, "heldout": heldout}

    def _grown(
        self,
        daily: pl.DataFrame,
        end: int,
        n_days: int,
        split: str,
        earliest: int,
        after: tuple[int, int] | None = None,
    ) -> tuple[int, int]:
        """The shortest window of at least ``n_days`` days ending on ``end`` (starting no earlier
        than ``earliest``) that holds ``min_conversions[split]``; a SplitError naming the counts when
        even the widest does not (``after``: the held-out window, for the message)."""
        need = self.min_conversions[split]
        start = end - n_days + 1
        while window_sum(daily, (start, end)) < need and start > earliest:
            start -= 1
        held = window_sum(daily, (start, end))
        if held >= need:
            return start, end
        first, last = _first_and_last(daily)
        last -= self.end_offset_days
        dropped = f", data.end_offset_days={self.end_offset_days} dropped" if self.end_offset_days else ""
        if after is None:
            taken = f"leaving {self.val_days} validation day(s) and one training day"
        else:
            taken = (
                f"after the held-out window {_window(after)} with {window_sum(daily, after):,} "
                "conversions, leaving one training day"
            )
        raise SplitError(
            f"data.split=auto cannot size the time split: {IMPRESSIONS_FILE} holds "
            f"{window_sum(daily, (first, last)):,} conversions over {last - first + 1} days "
            f"({iso_day(first)}..{iso_day(last)}{dropped}); the {SPLIT_LABELS[split]} window needs "
            f"data.min_conversions.{split}={need}, and the widest it can be ({taken}), "
            f"{_window((start, end))}, holds {held:,}. Lower data.min_conversions.heldout / .val, or use "
            f"data.split=days with data.heldout_days / data.val_days."
        )


# data.split -> the rule's class.
SPLIT_RULES: dict[str, type[FixedDays]] = {
    FixedDays.name: FixedDays,
    ConversionSizedDays.name: ConversionSizedDays,
}


def split_rule(
    split: str,
    val_days: int,
    heldout_days: int,
    end_offset_days: int = 0,
    min_conversions: Mapping[str, int] | None = None,
) -> FixedDays:
    """The rule ``data.split`` names (``days`` or ``auto``), with the data options it reads."""
    if split not in SPLIT_RULES:
        raise ConfigError(f"data.split must be one of {sorted(SPLIT_RULES)}, got {split!r}.")
    if split == FixedDays.name:
        return FixedDays(val_days, heldout_days, end_offset_days)
    return ConversionSizedDays(val_days, heldout_days, end_offset_days, min_conversions)


def split_frame(impressions: pl.DataFrame, days: Mapping[str, tuple[int, int]]) -> TimeSplit:
    """``impressions`` cut into the splits' ``days`` (a rule's :meth:`FixedDays.days`); every split
    must have rows."""
    parts = {name: impressions.filter(in_days(days[name])) for name in SPLIT_NAMES}
    check_split_rows({name: frame.height for name, frame in parts.items()}, dict(days))
    return TimeSplit(**parts, days=dict(days))


def split_by_time(
    impressions: pl.DataFrame, val_days: int, heldout_days: int, end_offset_days: int = 0
) -> TimeSplit:
    """Split by whole days counted back from the last logged day (minus ``end_offset_days``):
    :class:`FixedDays`. The last ``heldout_days`` days are held out, the ``val_days`` before them
    validate, the rest trains; the ``end_offset_days`` after the held-out days are in no split.
    """
    if impressions.height == 0:
        raise SplitError(f"{IMPRESSIONS_FILE} has 0 rows; expected impressions over several days.")
    day = pl.col("timestamp") // SECONDS_PER_DAY
    first, last = (
        int(x) for x in impressions.select(day.min().alias("first"), day.max().alias("last")).row(0)
    )
    bounds = split_days(first, last, val_days, heldout_days, end_offset_days)
    return split_frame(impressions, bounds)
