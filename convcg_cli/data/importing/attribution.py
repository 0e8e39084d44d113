"""Attribution: conversion events (the optional ``conversions`` table) joined to the impressions.

One rule, :class:`AttributionRule`, applied in this order to every conversion event:

1. **reported**: the advertiser named the impression (``impression_id``); kept when that impression is
   the same user's and not after the conversion.
2. **click**: the user's last *clicked* impression of the same item at most ``click_window_days``
   before the conversion.
3. **view** (``view_window_days > 0``): else the user's last unclicked impression of the item at most
   ``view_window_days`` before it (a view-through conversion).
4. **advertiser click / view**: a conversion with no item (the advertiser reported only itself) goes
   to the user's last click, else view, on *any* item of that advertiser within the same windows.

Everything else stays unattributed (counted by reason). Each impression with at least one attributed
conversion gets ``converted = true``, ``conversion_value`` (the sum of the known values),
``conversion_delay_seconds`` (to its first conversion) and ``view_through`` (converted without a
click); every other row gets ``converted = false``. The whole join is vectorised polars
(``join_asof``), no per-row Python.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from convcg_cli.data.contract import METADATA_FILE, load_tables, write_tables
from convcg_cli.errors import ConfigError, ConvcgError

SECONDS_PER_DAY = 86_400
# Attribution kinds, in the order the rule tries them.
REPORTED, CLICK, VIEW, ADVERTISER_CLICK, ADVERTISER_VIEW = (
    "reported",
    "click",
    "view",
    "advertiser_click",
    "advertiser_view",
)
KINDS = (REPORTED, CLICK, VIEW, ADVERTISER_CLICK, ADVERTISER_VIEW)
CONVERSIONS_FILE = "conversions.parquet"
# The impression columns attribution writes.
ATTRIBUTED_COLUMNS = ("converted", "conversion_value", "conversion_delay_seconds", "view_through")


@dataclass(frozen=True)
class AttributionRule:
    """Which impression a conversion event is credited to.

    Args:
        click_window_days: a click may be credited with conversions up to this many days after it.
        view_window_days: an unclicked impression may be credited up to this many days after it
            (view-through); 0 turns view-through attribution off.

    Example:
        >>> AttributionRule(7, 1).describe().split(";")[0]
        'last click within 7 day(s), else last view within 1 day(s)'
    """

    click_window_days: float = 7.0
    view_window_days: float = 1.0

    def __post_init__(self) -> None:
        if self.click_window_days <= 0:
            raise ConfigError(f"the click-through window must be > 0 days, got {self.click_window_days}.")
        if self.view_window_days < 0:
            raise ConfigError(f"the view-through window must be >= 0 days, got {self.view_window_days}.")

    @property
    def click_window_seconds(self) -> int:
        """The click-through window in seconds."""
        return int(round(self.click_window_days * SECONDS_PER_DAY))

    @property
    def view_window_seconds(self) -> int:
        """The view-through window in seconds (0 = off)."""
        return int(round(self.view_window_days * SECONDS_PER_DAY))

    def describe(self) -> str:
        """The rule in one line, for logs and the provenance file."""
        view = f", else last view within {self.view_window_days:g} day(s)" if self.view_window_days else ""
        return (
            f"last click within {self.click_window_days:g} day(s){view}; "
            "advertiser-level when only the advertiser is known"
        )


@dataclass
class AttributionResult:
    """The attributed impressions, and how every conversion event was (or was not) attributed."""

    impressions: pl.DataFrame
    rule: AttributionRule
    counts: dict[str, int]
    value: dict[str, float]

    def provenance(self) -> dict:
        """What is saved with the data set (``synth.json``'s ``attribution`` entry)."""
        return {
            "rule": self.rule.describe(),
            **dataclasses.asdict(self.rule),
            "counts": self.counts,
            "value": self.value,
        }

    def summary(self) -> list[str]:
        """Readable lines: the rule, then the counts."""
        c = self.counts
        attributed = ", ".join(f"{c[k]:,} {k}" for k in KINDS)
        return [
            f"Attribution rule: {self.rule.describe()}.",
            f"{c['conversions']:,} conversion events: {attributed}; {c['unattributed']:,} unattributed "
            f"({c['no_touch_in_window']:,} with no impression in the window, "
            f"{c['no_item_or_advertiser']:,} naming neither an item nor an advertiser).",
            f"{c['converted_impressions']:,} impressions converted (the input marked "
            f"{c['previously_converted']:,}); value attributed {self.value['attributed']:,.2f} of "
            f"{self.value['total']:,.2f}.",
        ]


def _touches(impressions: pl.DataFrame, items: pl.DataFrame) -> pl.DataFrame:
    """Impressions as touch points, with their advertiser, sorted by time (as ``join_asof`` needs)."""
    return (
        impressions.select("impression_id", "timestamp", "user_id", "item_id", "clicked")
        .join(items.select("item_id", "advertiser_id"), on="item_id", how="left")
        .rename({"timestamp": "touch_timestamp"})
        .sort("touch_timestamp")
    )


def _last_touch(
    events: pl.DataFrame, touches: pl.DataFrame, by: list[str], window_seconds: int, kind: str
) -> pl.DataFrame:
    """(conversion_id, impression_id, kind) of each event's last touch within ``window_seconds``
    before it, matching on ``by``; events without one are left out."""
    if events.height == 0 or touches.height == 0 or window_seconds <= 0:
        return pl.DataFrame(schema={"conversion_id": pl.Int64, "impression_id": pl.Int64, "kind": pl.String})
    matched = (
        events.select("conversion_id", "timestamp", *by)
        .sort("timestamp")
        .join_asof(
            touches.select("impression_id", "touch_timestamp", *by),
            left_on="timestamp",
            right_on="touch_timestamp",
            by=by,
            strategy="backward",
            tolerance=window_seconds,
            check_sortedness=False,  # both sides are sorted by time; polars cannot verify it per group
        )
    )
    return matched.filter(pl.col("impression_id").is_not_null()).select(
        "conversion_id", "impression_id", pl.lit(kind).alias("kind")
    )


def _reported(conversions: pl.DataFrame, touches: pl.DataFrame) -> pl.DataFrame:
    """Events whose advertiser named a valid impression (same user, not after the conversion)."""
    return (
        conversions.filter(pl.col("impression_id").is_not_null())
        .join(
            touches.select("impression_id", "touch_timestamp", pl.col("user_id").alias("touch_user")),
            on="impression_id",
            how="inner",
        )
        .filter(
            (pl.col("touch_user") == pl.col("user_id")) & (pl.col("touch_timestamp") <= pl.col("timestamp"))
        )
        .select("conversion_id", "impression_id", pl.lit(REPORTED).alias("kind"))
    )


def match_conversions(
    conversions: pl.DataFrame, impressions: pl.DataFrame, items: pl.DataFrame, rule: AttributionRule
) -> pl.DataFrame:
    """(conversion_id, impression_id, kind) for every conversion event the rule attributes.

    ``conversions``, ``impressions`` and ``items`` are frames in the contract (``load_tables``).
    """
    touches = _touches(impressions, items)
    conversions = conversions.join(
        items.select("item_id", pl.col("advertiser_id").alias("item_advertiser")), on="item_id", how="left"
    ).with_columns(pl.coalesce("item_advertiser", "advertiser_id").alias("advertiser_id"))
    found = [_reported(conversions, touches)]
    clicks, views = touches.filter("clicked"), touches.filter(~pl.col("clicked"))
    steps = (
        ("item_id", clicks, rule.click_window_seconds, CLICK),
        ("item_id", views, rule.view_window_seconds, VIEW),
        ("advertiser_id", clicks, rule.click_window_seconds, ADVERTISER_CLICK),
        ("advertiser_id", views, rule.view_window_seconds, ADVERTISER_VIEW),
    )
    for key, candidates, window, kind in steps:
        done = pl.concat(found)["conversion_id"]
        open_events = conversions.filter(~pl.col("conversion_id").is_in(done.implode()))
        if key == "item_id":
            open_events = open_events.filter(pl.col("item_id").is_not_null())
        else:  # advertiser level only where the item is unknown
            open_events = open_events.filter(
                pl.col("item_id").is_null() & pl.col("advertiser_id").is_not_null()
            )
        found.append(_last_touch(open_events, candidates, ["user_id", key], window, kind))
    return pl.concat(found)


def attribute(
    impressions: pl.DataFrame, items: pl.DataFrame, conversions: pl.DataFrame, rule: AttributionRule
) -> AttributionResult:
    """Credit ``conversions`` to ``impressions`` by ``rule``; return the impressions with
    ``ATTRIBUTED_COLUMNS`` rewritten, and the counts (see the module docstring).

    The input ``converted`` column is replaced (its count is reported as ``previously_converted``).
    """
    matches = match_conversions(conversions, impressions, items, rule)
    events = matches.join(
        conversions.select("conversion_id", pl.col("timestamp").alias("conversion_timestamp"), "value"),
        on="conversion_id",
    )
    per_impression = events.group_by("impression_id").agg(
        pl.col("conversion_timestamp").min().alias("first_conversion"),
        pl.when(pl.col("value").is_not_null().any()).then(pl.col("value").sum()).alias("conversion_value"),
    )
    converted = pl.col("first_conversion").is_not_null()
    out = (
        impressions.drop([c for c in ATTRIBUTED_COLUMNS if c != "converted"], strict=False)
        .join(per_impression, on="impression_id", how="left", maintain_order="left")
        .with_columns(
            converted.alias("converted"),
            (pl.col("first_conversion") - pl.col("timestamp")).alias("conversion_delay_seconds"),
            (converted & ~pl.col("clicked")).alias("view_through"),
        )
        .drop("first_conversion")
    )
    unmatched = conversions.filter(~pl.col("conversion_id").is_in(matches["conversion_id"].implode()))
    no_key = unmatched.filter(pl.col("item_id").is_null() & pl.col("advertiser_id").is_null()).height
    kinds = matches["kind"].value_counts()
    by_kind = dict(zip(kinds["kind"].to_list(), kinds["count"].to_list(), strict=True))
    counts = {
        "conversions": conversions.height,
        **{k: int(by_kind.get(k, 0)) for k in KINDS},
        "unattributed": conversions.height - matches.height,
        "no_item_or_advertiser": no_key,
        "no_touch_in_window": conversions.height - matches.height - no_key,
        "converted_impressions": int(out["converted"].sum()),
        "previously_converted": int(impressions["converted"].sum()),
    }
    value = {
        "total": float(conversions["value"].sum()),
        "attributed": float(events["value"].sum()),
    }
    columns = impressions.columns + [c for c in ATTRIBUTED_COLUMNS if c not in impressions.columns]
    return AttributionResult(out.select(columns), rule, counts, value)


def attribute_dir(in_dir: str | Path, out_dir: str | Path, rule: AttributionRule) -> AttributionResult:
    """Load ``in_dir`` (validated), attribute its ``conversions`` to its impressions and write every
    table to ``out_dir`` (atomically; ``in_dir`` itself is allowed), with the rule and its counts added
    to the provenance file (``synth.json``'s ``attribution`` entry).

    Raises:
        ConvcgError: ``in_dir`` has no conversion events to attribute.
    """
    in_dir = Path(in_dir)
    tables = load_tables(in_dir)
    if tables["conversions"].height == 0:
        raise ConvcgError(
            f"{in_dir} has no conversion events ({CONVERSIONS_FILE} is missing or empty); nothing to "
            "attribute. Its impressions' `converted` column is used as it is."
        )
    result = attribute(tables["impressions"], tables["items"], tables["conversions"], rule)
    metadata_path = in_dir / METADATA_FILE
    metadata = json.loads(metadata_path.read_text()) if metadata_path.is_file() else {}
    metadata.pop("rows", None)  # recounted by the writer
    metadata["attribution"] = result.provenance()
    write_tables({**tables, "impressions": result.impressions}, out_dir, metadata)
    return result
