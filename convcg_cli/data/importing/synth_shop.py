"""A shop's purchase log, made from a synthetic log (``convcg data synth --preset sparse_shop``).

Public shopping logs look unlike an ads platform's impression log: they record purchases and a few
item views, not what was served; most rows carry no customer id (the visitor was not logged in), so
a session stands in for the user; the catalogue is large and most of it never sells; items released
late in the log sell in the held-out days without a training-window event. :func:`shop_log` turns
the generator's tables into such a log, vectorised (no per-row Python):

* **Purchase-only, with a few views.** Only converted rows and a ``view_share`` of the other clicked
  rows are kept (a view is a click: ``clicked`` true, with its dwell); nothing served-but-ignored
  remains, so there are no served-but-not-engaged negatives.
* **Sessions as users.** For a ``session_share`` of the (user, day) visits the user is anonymous:
  those rows get a fresh user id per visit (a session) with no attributes; the users table gains
  the sessions. Only logged-in users keep a history (``user_history``: their own earlier events).
* **New items** come from the generator's ``content_vectors`` switch: released in the last
  ``new_item_days`` days, never in the log before.
"""

from __future__ import annotations

import numpy as np
import polars as pl

DAY_SECONDS = 86_400
# Session ids: far above every generated user id (which are below 10**9), so none collides.
SESSION_ID_BASE = 2 * 10**12


def shop_log(
    tables: dict[str, pl.DataFrame], view_share: float, session_share: float, rng: np.random.Generator
) -> dict[str, pl.DataFrame]:
    """The generator's ``tables`` as a purchase-only shop log (see the module docstring)."""
    impressions = tables["impressions"]
    keep_view = rng.random(impressions.height) < view_share
    kept = impressions.filter(pl.col("converted") | (pl.col("clicked") & pl.Series(keep_view)))
    day = (pl.col("timestamp") // DAY_SECONDS).alias("day")
    visits = kept.select("user_id", day).unique().sort("user_id", "day")
    anonymous = rng.random(visits.height) < session_share
    sessions = (
        visits.filter(pl.Series(anonymous))
        .with_row_index("session")
        .select("user_id", "day", (pl.col("session").cast(pl.Int64) + SESSION_ID_BASE).alias("session_id"))
    )
    kept = (
        kept.with_columns(day)
        .join(sessions, on=["user_id", "day"], how="left", maintain_order="left")
        .with_columns(pl.coalesce("session_id", "user_id").alias("user_id"))
        .drop("day", "session_id")
        .with_row_index("row")
        .with_columns(pl.col("row").cast(pl.Int64).alias("impression_id"))
        .drop("row")
    )
    users = tables["users"]
    session_users = pl.DataFrame({"user_id": sessions["session_id"]}).with_columns(
        [pl.lit(None, dtype=users.schema[c]).alias(c) for c in users.columns if c != "user_id"]
    )
    logged_in = kept["user_id"].filter(kept["user_id"] < SESSION_ID_BASE).unique()
    users = pl.concat([users.filter(pl.col("user_id").is_in(logged_in.implode())), session_users]).sort(
        "user_id"
    )
    history = tables["user_history"].filter(pl.col("user_id").is_in(logged_in.implode()))
    return {
        **tables,
        "impressions": kept.select(impressions.columns),
        "users": users,
        "user_history": history,
    }
