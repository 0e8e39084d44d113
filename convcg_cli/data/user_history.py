"""The ``user_history`` table: what users did before the logged impressions, as (user, item, time, action).

Real logs often carry far more history than engagement inside the log window (KuaiRand: each user's
last 50 watched videos before the log, 8x the log's engagements). This module turns such lists into
contract rows (for importers) and reads them back safely for training: only events strictly before
the training cut-off, so nothing from the validation or held-out days can reach a feature.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import polars as pl

from convcg_cli.data.history import ACTION_CLICK, ACTION_CONVERSION, ACTION_SAVE

# Contract action names -> the action codes of the in-log history sequence (convcg_cli.data.history).
ACTION_CODES: dict[str, int] = {"click": ACTION_CLICK, "save": ACTION_SAVE, "conversion": ACTION_CONVERSION}


def before_cutoff(history: pl.DataFrame, cutoff: int) -> pl.DataFrame:
    """Events with ``timestamp < cutoff`` (unix seconds): what a model trained up to ``cutoff`` may see.

    Example:
        >>> h = pl.DataFrame({"user_id": [1, 1], "item_id": [5, 6], "timestamp": [10, 20],
        ...                   "action": ["click", "conversion"]})
        >>> before_cutoff(h, 20)["item_id"].to_list()
        [5]
    """
    return history.filter(pl.col("timestamp") < cutoff)


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
    unknown = sorted(set(lists.values()) - set(ACTION_CODES))
    if unknown:
        raise ValueError(f"unknown action(s) {unknown}; expected one of {sorted(ACTION_CODES)}.")
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


def history_positions(
    history: pl.DataFrame, user_ids: np.ndarray, item_ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user position, item position, action code) of every event, positions in the sorted id tables.

    Events of users or items outside the tables are dropped (the contract's references rule them
    out, but a subset of users must not crash).
    """
    users = np.asarray(user_ids, dtype=np.int64)
    items = np.asarray(item_ids, dtype=np.int64)
    u = history["user_id"].to_numpy().astype(np.int64)
    i = history["item_id"].to_numpy().astype(np.int64)
    up = np.clip(np.searchsorted(users, u), 0, max(len(users) - 1, 0))
    ip = np.clip(np.searchsorted(items, i), 0, max(len(items) - 1, 0))
    ok = (len(users) > 0) & (len(items) > 0)
    keep = ok & (users[up] == u) & (items[ip] == i) if ok else np.zeros(len(u), dtype=bool)
    action = history["action"].replace_strict(ACTION_CODES, return_dtype=pl.Int64).to_numpy()
    return up[keep], ip[keep], action[keep]


def as_training_rows(
    history: pl.DataFrame, like: pl.DataFrame, surface: str, max_per_user: int
) -> pl.DataFrame:
    """Each user's last ``max_per_user`` history events as engaged impression rows shaped like ``like``.

    An event becomes a clicked impression on ``surface`` (no subject item, no query, no dwell);
    ``save`` events are also saved and ``conversion`` events also converted, so every event is an
    engagement-task positive and conversions are conversion-task positives too.

    Example:
        >>> h = pl.DataFrame({"user_id": [1, 1, 1], "item_id": [5, 6, 7], "timestamp": [1, 2, 3],
        ...                   "action": ["click", "conversion", "save"]})
        >>> like = pl.DataFrame(schema={"user_id": pl.Int64, "item_id": pl.Int64, "converted": pl.Boolean})
        >>> as_training_rows(h, like, "home_feed", 2).rows()
        [(1, 6, True), (1, 7, False)]
    """
    if max_per_user < 1:
        raise ValueError(f"max_per_user must be >= 1, got {max_per_user}.")
    recent = history.filter(
        pl.col("timestamp").rank("ordinal", descending=True).over("user_id") <= max_per_user
    ).sort("user_id", "timestamp", "item_id")
    columns = {
        "impression_id": pl.lit(-1, pl.Int64),
        "timestamp": pl.col("timestamp"),
        "user_id": pl.col("user_id"),
        "item_id": pl.col("item_id"),
        "surface": pl.lit(surface, pl.String),
        "clicked": pl.lit(True),
        "dwell_seconds": pl.lit(None, pl.Float64),
        "saved": pl.col("action") == "save",
        "converted": pl.col("action") == "conversion",
        "subject_item_id": pl.lit(None, pl.Int64),
        "query_id": pl.lit(None, pl.Int64),
    }
    missing = [c for c in like.columns if c not in columns]
    return recent.select(
        *(columns[c].cast(like.schema[c]).alias(c) for c in like.columns if c in columns),
        *(pl.lit(None, like.schema[c]).alias(c) for c in missing),
    )
