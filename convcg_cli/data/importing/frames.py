"""Mapping source frames onto the contract: pure functions of polars frames (impressions, items, users,
per-user history lists) and the mapping's sections, recording what they changed or could not map in
the :class:`ImportReport`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import polars as pl

from convcg_cli.data.contract import TableSchema, load_schemas
from convcg_cli.data.importing.mapping import as_block, as_columns
from convcg_cli.data.importing.report import (
    ADVERTISER_SOFTMAX,
    DWELL_WEIGHTED_POSITIVES,
    IMPRESSION_HARD_NEGATIVES,
    SURFACE_CONTEXT,
    ImportReport,
)
from convcg_cli.errors import ConfigError, ConvcgError

_TIME_UNITS = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}
_DWELL_UNITS = {"s": 1.0, "ms": 1_000.0}
_CONVERSION_WITHOUT_CLICK = ("count_as_click", "drop")
# The contract's ``user_history.action`` values (data_schemas/user_history.yaml).
HISTORY_ACTIONS = ("click", "save", "conversion")


def _sample(values: pl.Series, n: int = 5) -> str:
    """Up to ``n`` distinct values of ``values``, for an error message."""
    return repr(values.unique(maintain_order=True).head(n).to_list())


def check_signal_columns(
    frame: pl.DataFrame, flags: Mapping[str, str], ids: Mapping[str, str], what: str
) -> None:
    """ConvcgError unless every flag column is Boolean or 0/1 (nulls allowed: they count as false)
    and every id column holds integers; the message names each column with a sample of bad values.

    Args:
        frame: a source table as read (``read_table``).
        flags, ids: column -> what it was mapped as (e.g. ``a 0/1 clicked flag (impressions.clicked)``);
            columns absent from ``frame`` are skipped (optional signals).
        what: the table, for the message (e.g. ``the impressions log``).
    """
    problems = []
    for column, meaning in flags.items():
        if column not in frame.columns or frame[column].dtype == pl.Boolean:
            continue
        values = frame[column].drop_nulls()
        bad = values if not values.dtype.is_numeric() else values.filter(~values.is_in([0, 1]))
        if len(bad):
            problems.append(
                f"column '{column}' ({meaning}) must be Boolean or 0/1, but {len(bad):,} of "
                f"{frame.height:,} rows hold other values, e.g. {_sample(bad)}"
            )
    for column, meaning in ids.items():
        if column in frame.columns and not frame[column].dtype.is_integer():
            problems.append(
                f"column '{column}' ({meaning}) must hold integers, but it is {frame[column].dtype}, "
                f"e.g. {_sample(frame[column].drop_nulls())}; map the ids to integers before importing"
            )
    if problems:
        raise ConvcgError(
            f"{what[0].upper()}{what[1:]} breaks the importer's signal rules: {'; '.join(problems)}. "
            "Fix the source columns or the importer mapping."
        )


def _any_true(columns: Sequence[str]) -> pl.Expr:
    """OR of 0/1 or Boolean columns; nulls count as false."""
    if not columns:
        return pl.lit(False)
    return pl.any_horizontal([pl.col(c).cast(pl.Boolean).fill_null(False) for c in columns])


def _unix_seconds(column: str, unit: str | None, dtype: pl.DataType) -> pl.Expr:
    if dtype.is_temporal():
        return pl.col(column).dt.epoch("s")
    if unit not in _TIME_UNITS:
        raise ConfigError(f"impressions.timestamp.unit must be one of {list(_TIME_UNITS)}, got {unit!r}.")
    return pl.col(column).cast(pl.Int64) // _TIME_UNITS[unit]


def map_surface(values: pl.Series, spec: Mapping[str, Any]) -> tuple[pl.Series, list[dict[str, Any]]]:
    """Source surface values -> contract surface names, and a per-value summary of the mapping.

    Values are matched as text, so ``{1: home_feed}`` maps an integer 1 and a string "1" alike.
    """
    table = {str(k): v for k, v in (spec.get("values") or {}).items()}
    text = values.cast(pl.String)
    surface = text.replace_strict(table, default=spec.get("default"), return_dtype=pl.String)
    summary = (
        pl.DataFrame({"value": values, "surface": surface})
        .group_by("value", "surface")
        .len("rows")
        .sort("rows", "value", descending=[True, False])
    )
    return surface.alias("surface"), summary.to_dicts()


def map_impressions(frame: pl.DataFrame, spec: Mapping[str, Any], report: ImportReport) -> pl.DataFrame:
    """The impressions table of the contract from a source log already read with the needed columns.

    Rows get deterministic ``impression_id`` s in time order (ties keep the source order).
    One function on purpose (~120 lines): each signal's mapping (surface, clicks, conversions
    without a click, saves, dwell, duplicates) reads and adjusts the same frame in a fixed order
    and reports into the same ``ImportReport``; split up, the order would hide in the call sites.
    """
    allowed_surfaces = load_schemas()["impressions"].column("surface").allowed or ()
    n = frame.height
    ts = as_block(spec["timestamp"])
    clicked_src = _any_true(as_columns(spec["clicked"]))
    converted = _any_true(as_columns(spec["converted"]))
    policy = spec.get("conversion_without_click", "count_as_click")
    if policy not in _CONVERSION_WITHOUT_CLICK:
        raise ConfigError(
            f"impressions.conversion_without_click must be one of {list(_CONVERSION_WITHOUT_CLICK)}, "
            f"got {policy!r}."
        )
    unclicked = int(frame.select((converted & ~clicked_src).sum()).item())
    if policy == "count_as_click":
        clicked = clicked_src | converted
        report.adjustments["conversions_counted_as_clicks"] = unclicked
    else:
        clicked, converted = clicked_src, converted & clicked_src
        report.adjustments["conversions_dropped_without_click"] = unclicked
    if unclicked:
        action = "counted as clicks" if policy == "count_as_click" else "dropped"
        report.warnings.append(
            f"{unclicked:,} conversion(s) have no click in the source; {action} "
            f"(impressions.conversion_without_click: {policy}), as the contract needs converted => clicked."
        )

    saved_cols = [c for c in as_columns(spec.get("saved")) if c in frame.columns]
    absent_saves = [c for c in as_columns(spec.get("saved")) if c not in frame.columns]
    if not saved_cols:
        report.warnings.append("No save signal (impressions.saved): saved is false on every row.")
    elif absent_saves:
        report.warnings.append(
            f"Save column(s) {absent_saves} are absent from the impressions log; saved uses {saved_cols}."
        )

    dwell = as_block(spec.get("dwell"))
    fill = float(dwell.get("missing_on_click", 0.0))
    if dwell.get("column") in frame.columns:
        unit = dwell.get("unit", "s")
        if unit not in _DWELL_UNITS:
            raise ConfigError(f"impressions.dwell.unit must be one of {list(_DWELL_UNITS)}, got {unit!r}.")
        seconds = pl.col(dwell["column"]).cast(pl.Float64) / _DWELL_UNITS[unit]
        # Negative or non-finite durations are logging errors: treat them as missing.
        seconds = pl.when(seconds.is_finite() & (seconds >= 0)).then(seconds)
        missing = int(frame.select((clicked & seconds.is_null()).sum()).item())
        if missing:
            report.adjustments["clicks_without_dwell"] = missing
            report.warnings.append(
                f"{missing:,} click(s) have no valid dwell in '{dwell['column']}'; set to {fill} s "
                f"(impressions.dwell.missing_on_click)."
            )
    else:
        seconds = pl.lit(None, dtype=pl.Float64)
        where = (
            f"column '{dwell['column']}' is absent from the impressions log"
            if dwell.get("column")
            else "no column is mapped"
        )
        report.disable(
            DWELL_WEIGHTED_POSITIVES,
            f"No dwell signal (impressions.dwell: {where}); dwell_seconds is {fill} on every click",
        )

    sf = as_block(spec.get("surface"))
    default_surface = sf.get("default", "home_feed")
    bad = sorted({default_surface, *(sf.get("values") or {}).values()} - set(allowed_surfaces))
    if bad:
        raise ConfigError(
            f"impressions.surface maps to {bad}, which the contract does not allow; "
            f"use {', '.join(allowed_surfaces)}."
        )
    if sf.get("column") in frame.columns:
        report.surface_column = sf["column"]
        surface, report.surface_mapping = map_surface(frame[sf["column"]], {**sf, "default": default_surface})
    else:
        surface = pl.Series("surface", [default_surface] * n, dtype=pl.String)
        report.surface_mapping = [{"value": None, "surface": default_surface, "rows": n}]
        report.disable(
            SURFACE_CONTEXT, f"No surface signal (impressions.surface); every row is {default_surface}"
        )

    out = (
        frame.with_columns(surface)
        .with_row_index("_source_row")
        # Deterministic ids: time order, ties in source order.
        .sort(ts["column"], "_source_row")
        .select(
            _unix_seconds(ts["column"], ts.get("unit"), frame.schema[ts["column"]]).alias("timestamp"),
            pl.col(spec["user"]).cast(pl.Int64).alias("user_id"),
            pl.col(spec["item"]).cast(pl.Int64).alias("item_id"),
            pl.col("surface"),
            clicked.alias("clicked"),
            pl.when(clicked).then(seconds.fill_null(fill)).alias("dwell_seconds"),
            _any_true(saved_cols).alias("saved"),
            converted.alias("converted"),
        )
    )
    extra = out.height - out.n_unique()
    report.adjustments["duplicate_rows"] = extra
    if extra and spec.get("drop_duplicates", False):
        out = out.unique(maintain_order=True)
        report.warnings.append(f"{extra:,} impression(s) repeat another row exactly; dropped.")
    elif extra:
        report.warnings.append(
            f"{extra:,} impression(s) repeat another row exactly (same user, item, second and outcome); "
            f"kept (set impressions.drop_duplicates: true to drop them)."
        )
    out = out.with_row_index("impression_id").with_columns(pl.col("impression_id").cast(pl.Int64))
    if out.height and not out.select((~pl.col("clicked") & ~pl.col("saved")).any()).item():
        report.disable(
            IMPRESSION_HARD_NEGATIVES,
            "Every impression is engaged (no served-but-ignored rows: the log holds interactions only)",
        )
    return out


def _clean_sentinels(
    frame: pl.DataFrame, columns: Sequence[str], spec: Mapping[str, Any], table: str, report: ImportReport
) -> pl.DataFrame:
    """Null out sentinel values in ``columns``: listed strings, and negative numbers if asked."""
    null_values = [str(v) for v in spec.get("null_values") or []]
    negative = bool(spec.get("negative_is_null", False))
    exprs, checks = [], []
    for c in columns:
        dtype = frame.schema[c]
        if dtype == pl.String and null_values:
            sentinel = pl.col(c).is_in(null_values)
        elif dtype.is_numeric() and negative:
            sentinel = pl.col(c) < 0
        else:
            continue
        exprs.append(pl.when(sentinel).then(None).otherwise(pl.col(c)).alias(c))
        checks.append(sentinel.sum().alias(c))
    if not exprs:
        return frame
    for column, count in frame.select(checks).row(0, named=True).items():
        if count:
            report.adjustments[f"nulled_sentinels.{table}.{column}"] = int(count)
    return frame.with_columns(exprs)


def contract_first(frame: pl.DataFrame, schema: TableSchema) -> pl.DataFrame:
    """Contract columns present in ``frame``, cast to the contract dtypes and in its order, then extras."""
    contract = [c for c in schema.columns if c.name in frame.columns]
    extras = [c for c in frame.columns if c not in schema.column_names]
    # Non-strict casts are safe here: validate_frames checks every value afterwards.
    return frame.select(*(pl.col(c.name).cast(c.polars_dtype, strict=False) for c in contract), *extras)


def advertiser_groups(values: pl.Series, spec: Mapping[str, Any]) -> pl.Series:
    """Advertiser-like group id per item: the first entry of a list-valued column, unknown -> a dedicated id.

    Integer groups keep their value; other values get dense codes above ``unknown_id`` (sorted).

    Raises:
        ConfigError: ``unknown_id`` is negative or is also a real group value.
    """
    unknown_id = int(spec.get("unknown_id", 0))
    if unknown_id < 0:
        raise ConfigError(
            f"items.advertiser.unknown_id must be >= 0 (the contract's minimum), got {unknown_id}."
        )
    sep = spec.get("list_separator")
    text = values.cast(pl.String).str.strip_chars()
    first = text.str.split(sep).list.first().str.strip_chars() if sep else text
    unknown = [str(v) for v in spec.get("unknown_values") or []] + [""]
    first = pl.select(pl.when(first.is_in(unknown)).then(None).otherwise(first)).to_series()
    as_int = first.cast(pl.Int64, strict=False)
    if as_int.null_count() == first.null_count() and (as_int.drop_nulls() >= 0).all():
        if (as_int == unknown_id).any():
            raise ConfigError(
                f"items.advertiser.unknown_id {unknown_id} is also a real value of "
                f"'{spec['column']}'; choose an id no group uses."
            )
        ids = as_int
    else:
        ids = first.rank("dense").cast(pl.Int64) + unknown_id
    return ids.fill_null(unknown_id).alias("advertiser_id")


def map_entities(
    frame: pl.DataFrame,
    spec: Mapping[str, Any],
    table: str,
    key: str,
    report: ImportReport,
) -> pl.DataFrame:
    """The items or users table: id, mapped contract columns, kept extras (sentinels -> null)."""
    id_col = spec[key]
    renames = {src: dst for dst, src in (spec.get("columns") or {}).items()}
    keep = [c for c in spec.get("keep") or [] if c not in renames]
    out = _clean_sentinels(frame, [*renames, *keep], spec, table, report)
    exprs = [pl.col(id_col).cast(pl.Int64).alias(f"{key}_id")]
    if table == "items":
        adv = as_block(spec.get("advertiser"))
        if adv.get("column") in frame.columns:
            exprs.append(pl.lit(advertiser_groups(frame[adv["column"]], adv)))
        else:
            exprs.append(pl.lit(int(adv.get("unknown_id", 0)), dtype=pl.Int64).alias("advertiser_id"))
            report.disable(
                ADVERTISER_SOFTMAX,
                "No advertiser-like group (items.advertiser); every item is in one group",
            )
    exprs += [pl.col(src).alias(dst) for src, dst in renames.items()]
    exprs += [pl.col(c) for c in keep if c != id_col]
    return contract_first(out.select(exprs), load_schemas()[table])


def join_user_history(users: pl.DataFrame, history: pl.DataFrame, spec: Mapping[str, Any]) -> pl.DataFrame:
    """Users plus the history columns (renamed per ``spec['columns']``); users without history get nulls."""
    renamed = history.select(
        pl.col(spec["user"]).cast(pl.Int64).alias("user_id"),
        *(pl.col(src).alias(dst) for dst, src in spec["columns"].items()),
    )
    return users.join(renamed, on="user_id", how="left", maintain_order="left")


def events_from_lists(
    frame: pl.DataFrame, user: str, lists: Mapping[str, str], last_time: str | None, unit_seconds: float
) -> pl.DataFrame:
    """Per-user lists of item ids (oldest first) -> contract rows ``user_id, item_id, timestamp, action``.

    Args:
        frame: one row per user, with list columns of item ids.
        user: the user id column.
        lists: list column -> contract action (``click`` | ``save`` | ``conversion``).
        last_time: column with the time of each user's latest listed event, or None (then every list
            ends 1 s before the unix epoch's day 1; only the order is known).
        unit_seconds: seconds per unit of ``last_time`` (0.001 for milliseconds).

    Exact times of older list entries are unknown: the i-th of n entries is placed ``n - 1 - i``
    seconds before the latest one, which keeps the order and keeps every event before the log.

    Example:
        >>> f = pl.DataFrame({"u": [7], "seq": [[3, 4]], "t": [10_000]})
        >>> events_from_lists(f, "u", {"seq": "click"}, "t", 0.001).rows()
        [(7, 3, 9, 'click'), (7, 4, 10, 'click')]
    """
    unknown = sorted(set(lists.values()) - set(HISTORY_ACTIONS))
    if unknown:
        raise ValueError(f"unknown action(s) {unknown}; expected one of {sorted(HISTORY_ACTIONS)}.")
    end = (
        (pl.col(last_time).cast(pl.Float64) * unit_seconds).floor().cast(pl.Int64)
        if last_time
        else pl.lit(86_399, pl.Int64)
    )
    parts = []
    for column, action in lists.items():
        parts.append(
            frame.select(
                pl.col(user).cast(pl.Int64).alias("user_id"),
                end.alias("end"),
                pl.col(column).alias("item_id"),
            )
            .filter(pl.col("item_id").list.len() > 0)
            .with_columns(pl.col("item_id").list.len().alias("n"))
            .explode("item_id")
            .with_columns(pl.int_range(pl.len()).over("user_id").alias("i"))
            .select(
                "user_id",
                pl.col("item_id").cast(pl.Int64),
                (pl.col("end") - (pl.col("n") - 1 - pl.col("i"))).clip(0).alias("timestamp"),
                pl.lit(action).alias("action"),
            )
        )
    if not parts:
        return pl.DataFrame(
            schema={"user_id": pl.Int64, "item_id": pl.Int64, "timestamp": pl.Int64, "action": pl.String}
        )
    return pl.concat(parts).sort("user_id", "timestamp", "item_id", "action")
