"""The ``user_history`` table: what users did before the logged impressions, as (user, item, time, action).

Real logs often carry far more history than engagement inside the log window (KuaiRand: each user's
last 50 watched videos before the log, 8x the log's engagements). Importers turn such lists into
contract rows (``importing.frames.events_from_lists``); this module reads them back safely for
training: only events strictly before the training cut-off, so nothing from the validation or
held-out days can reach a feature.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from convcg_cli.data.features.history import ACTION_CLICK, ACTION_CONVERSION, ACTION_SAVE

# Contract action names -> the action codes of the in-log history sequence (convcg_cli.data.features.history).
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
