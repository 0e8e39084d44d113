"""The ``sparse_shop`` synthetic preset: a shop's purchase log (purchases and a few views, sessions as
users, a large catalogue that mostly never sells, new items late in the log)."""

from __future__ import annotations

import dataclasses

import polars as pl

from convcg_cli.data.contract import load_schemas, load_tables
from convcg_cli.data.importing import synth
from convcg_cli.data.importing.synth_shop import DAY_SECONDS, SESSION_ID_BASE
from tests.conftest import TINY_SHOP


def test_the_preset_is_shaped_like_a_shop_log():
    cfg = synth.PRESETS["sparse_shop"]
    assert cfg.shop_log and cfg.content_vectors and cfg.n_items >= 100_000


def test_only_purchases_and_a_share_of_views_are_kept(tiny_shop_data):
    full = synth.generate(dataclasses.replace(TINY_SHOP, shop_log=False), seed=0)["impressions"]
    shop = pl.read_parquet(tiny_shop_data / "impressions.parquet")
    # Every purchase is kept; nothing served-but-ignored is.
    assert shop["converted"].sum() == full["converted"].sum()
    assert shop["clicked"].all()
    views, clicks = (~shop["converted"]).sum(), (full["clicked"] & ~full["converted"]).sum()
    assert abs(views / clicks - 0.1) < 0.01  # view_share of the other clicks, within sampling noise
    assert shop["impression_id"].is_unique().all() and shop["timestamp"].is_sorted()


def test_most_visits_are_sessions_without_attributes(tiny_shop_data):
    tables = load_tables(tiny_shop_data, load_schemas())  # the contract checks every reference
    shop, users = tables["impressions"], tables["users"]
    visits = shop.select("user_id", (pl.col("timestamp") // DAY_SECONDS).alias("day")).unique()
    sessions = visits.filter(pl.col("user_id") >= SESSION_ID_BASE)
    assert 0.58 < sessions.height / visits.height < 0.68  # session_share 0.63 of the visits
    # A session is one visit: one user id per (session, day), never seen on another day.
    assert sessions["user_id"].is_unique().all()
    anonymous = users.filter(pl.col("user_id") >= SESSION_ID_BASE)
    assert anonymous.height == sessions.height
    assert anonymous.drop("user_id").null_count().row(0) == (anonymous.height,) * (users.width - 1)
    history_users = set(tables["user_history"]["user_id"].unique().to_list())
    assert history_users and all(u < SESSION_ID_BASE for u in history_users)


def first_sold_late_share(impressions: pl.DataFrame, last_days: int) -> float:
    """Share of the last ``last_days`` days' purchases on items with no earlier row in the log."""
    day = impressions["timestamp"] // DAY_SECONDS
    cut = int(day.max()) - last_days + 1
    log = impressions.with_columns(day.alias("day"))
    earlier = log.filter(pl.col("day") < cut)["item_id"].unique().implode()
    late = log.filter((pl.col("day") >= cut) & pl.col("converted"))
    return float((~late["item_id"].is_in(earlier)).mean())


def test_new_items_make_many_late_purchases_unseen_before(tiny_shop_data):
    shop = pl.read_parquet(tiny_shop_data / "impressions.parquet")
    without_new = dataclasses.replace(TINY_SHOP, content_vectors=False)
    plain = synth.generate(without_new, seed=0)["impressions"]
    # The release days' purchases on items never in the log before: many with new items, few without
    # (an old item of the long tail may sell for the first time late too).
    days = TINY_SHOP.new_item_days
    assert first_sold_late_share(shop, days) > 0.2
    assert first_sold_late_share(plain, days) < first_sold_late_share(shop, days) / 2
