"""Seeded synthetic impression logs with planted structure that a good two-tower model can recover.

The generator is fully vectorised (numpy + polars, no per-row Python) and deterministic for a seed.
Its output satisfies the contract in ``data_schemas/`` exactly.

What is planted, and why:

* **Latent intent.** Users carry an engagement vector ``e`` and a conversion vector ``c`` correlated
  with it (``c = rho*e + sqrt(1-rho^2)*other``, rho = 0.6); items carry an appeal vector ``a`` (drives
  clicks through ``e.a``) and a purchase vector ``p`` (drives conversion given a click through ``c.p``),
  also correlated. So optimising for clicks helps conversions only partly: the gap a conversion
  objective should close.
* **Clusters.** Item vectors cluster around per-category centroids; users belong to segments whose
  centroids mix a few categories. ``age_bucket`` and ``region_id`` are weakly informative of the segment.
* **Advertisers.** Items belong to advertisers (power-law sizes, mostly one home category); an
  advertiser quality offset shared by its items shifts clicks a little and conversions a lot.
* **Serving.** Which items are impressed mixes the user's category preference (softmax of ``e`` against
  category centroids) with global popularity: a category is drawn by inverse CDF, then an item within
  it by Zipf popularity (``searchsorted`` over a category-sorted cumulative array). Item and user ids are
  shuffled, non-contiguous integers, so they carry no information.
* **Surfaces.** home_feed (~60%), related_items (~25%, ``subject_item_id`` = the item being viewed, the
  shown item from the same category ~80% of the time), search (~15%, ``query_id`` = a token of the
  query's category ~85% of the time). Search clicks and converts best.
* **Behaviour.** Per-surface intercepts are calibrated so the click and conversion-per-click rates hit
  their targets. Clicks bounce (< 5 s dwell, ~25%, more when the item is a poor match) or dwell for a
  lognormal tens of seconds; converters dwell longest. Saves are sparser than clicks and follow the
  conversion intent. Timestamps are uniform over days with a daily cycle: stationary, so a model
  trained on early days generalises to the last ones.

Figures for seed 0 (2 CPU cores), all matching their targets:

* ``small``: 5k users, 5k items, 1.5M impressions in ~2 s. Click rate 12.0% (home_feed 10.1%,
  related_items 13.0%, search 18.0%); conversions per click 2.75% (home_feed 2.0%, related_items 2.6%,
  search 4.5%), 4,952 conversions; saves 3.0% of impressions; 25% of clicks bounce; the top 1% of
  items take 30% of impressions.
* ``large``: 200k users, 100k items, 6M impressions in ~19 s, 1.3 GB peak memory. Same rates;
  19,617 conversions; the top 1% of items take 43% of impressions.

This module draws the logs from the latent world (serving, behaviour, timestamps, the frames) and
writes them; the knobs and presets are in :mod:`.synth_config`, the item catalogue and the user
population in :mod:`.synth_world`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from convcg_cli.data.contract import write_tables
from convcg_cli.data.importing.attribution import AttributionResult, AttributionRule, attribute
from convcg_cli.data.importing.synth_config import PRESETS, RELATED_ITEMS, SEARCH, SURFACES, SynthConfig
from convcg_cli.data.importing.synth_shop import shop_log
from convcg_cli.data.importing.synth_world import (
    Catalogue,
    Population,
    calibrate,
    rowdot,
    sample,
    shuffled_ids,
    sigmoid,
    unit,
    zipf_weights,
)
from convcg_cli.errors import ConfigError

_DAY = 86_400


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def resolve_config(preset: str | SynthConfig) -> SynthConfig:
    """A SynthConfig from a preset name (see :data:`PRESETS`) or a config passed through."""
    if isinstance(preset, SynthConfig):
        return preset
    if preset not in PRESETS:
        raise ConfigError(f"Unknown synthetic preset '{preset}'; choose one of {', '.join(PRESETS)}.")
    return PRESETS[preset]


def generate(preset: str | SynthConfig, seed: int = 0) -> dict[str, pl.DataFrame]:
    """Generate ``{"items", "users", "impressions"}`` frames that satisfy the data contract.

    Args:
        preset: a name in :data:`PRESETS` (``tiny``, ``small``, ``large``, ``sparse_shop``) or a
            :class:`SynthConfig`.
        seed: the same seed gives identical frames.

    Example:
        >>> tables = generate("tiny", seed=0)
        >>> tables["impressions"].height
        150000
    """
    return _generate(resolve_config(preset), seed)[0]


def _generate(cfg: SynthConfig, seed: int) -> tuple[dict[str, pl.DataFrame], AttributionResult | None]:
    """The frames of :func:`generate`, and the attribution of the conversion events (when on)."""
    # One stream per stage, so changing one stage's draws does not reshuffle the others (the history
    # and the conversion events have the last streams: adding them left the impressions of a seed
    # unchanged; SeedSequence children do not depend on how many are spawned).
    rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(10)]
    rng_items, rng_users, rng_serve, rng_act, rng_time, rng_ids, rng_history, rng_events = rngs[:8]
    rng_content, rng_shop = rngs[8:]
    cat = Catalogue(cfg, rng_items)
    pop = Population(cfg, cat, rng_users)
    served = _serve(cfg, cat, pop, rng_serve)
    timestamp = _timestamps(cfg, rng_time)  # its own stream: drawn here or later, the same values
    content = None
    if cfg.content_vectors:
        content, new_items = _content_and_new_items(cfg, cat, rng_content)
        _hold_back_new_items(cfg, cat, served, timestamp, new_items, rng_content)
    acts = _act(cfg, cat, pop, served, rng_act)
    history = _pre_log_history(cfg, cat, pop, rng_history)
    if cfg.content_vectors:
        history = {k: v[~new_items[history["item"]]] for k, v in history.items()}
    tables = _frames(cfg, cat, pop, served, acts, timestamp, rng_ids, history, content)
    if cfg.shop_log:
        tables = shop_log(tables, cfg.view_share, cfg.session_share, rng_shop)
    if not cfg.conversion_events:
        return tables, None
    tables["conversions"] = _conversion_events(cfg, tables["impressions"], tables["items"], rng_events)
    result = attribute(
        tables["impressions"],
        tables["items"],
        tables["conversions"],
        AttributionRule(cfg.attribution_window_days, view_window_days=0),
    )
    return {**tables, "impressions": result.impressions}, result


def _content_and_new_items(
    cfg: SynthConfig, cat: Catalogue, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(n_items, content_dim) float32 content vectors (a noisy projection of each item's appeal and
    purchase vectors) and the (n_items,) bool mask of new items (every category keeps an old one)."""
    planted = np.concatenate([cat.appeal, cat.purchase], axis=1)  # (N, 2d)
    projection = rng.standard_normal((planted.shape[1], cfg.content_dim)) / np.sqrt(planted.shape[1])
    signal = unit(planted @ projection)  # (N, content_dim)
    noise = unit(rng.standard_normal(signal.shape))
    content = (signal + cfg.content_noise * noise).astype(np.float32)
    new = rng.random(cfg.n_items) < cfg.new_item_share
    no_old = np.bincount(cat.category[~new], minlength=cfg.n_categories) == 0
    new[cat.by_category[cat.first[no_old]]] = False  # a category of new items only keeps one old
    return content, new


def _hold_back_new_items(
    cfg: SynthConfig,
    cat: Catalogue,
    served: _Served,
    timestamp: np.ndarray,
    new: np.ndarray,
    rng: np.random.Generator,
) -> None:
    """Before the new items' release, show (and take as related-items subject) another item of the
    same category instead of a new one; in place."""
    release = cfg.start_unix + (cfg.n_days - cfg.new_item_days) * _DAY
    early = timestamp < release
    served.item = _old_item_like(cat, served.item, early & new[served.item], new, rng)
    early_related = early[served.related]
    served.subject = _old_item_like(cat, served.subject, early_related & new[served.subject], new, rng)
    clash = served.item[served.related] == served.subject  # keep a subject apart from its shown item
    if clash.any():
        rows = served.related[clash]
        served.item[rows] = _old_item_like(
            cat, served.item[rows], np.ones(rows.size, bool), new, rng, avoid=True
        )


def _old_item_like(
    cat: Catalogue,
    item: np.ndarray,
    replace: np.ndarray,
    new: np.ndarray,
    rng: np.random.Generator,
    avoid: bool = False,
) -> np.ndarray:
    """``item`` with the entries where ``replace`` holds redrawn by popularity within their category
    among the old items (and, with ``avoid``, different from the item they replace); a copy."""
    out = item.copy()
    todo = np.flatnonzero(replace)
    for _ in range(50):  # rejection rounds, not rows
        if todo.size == 0:
            return out
        draw = cat.in_category(cat.category[item[todo]], rng)
        ok = ~new[draw] & ((draw != item[todo]) if avoid else True)
        out[todo[ok]] = draw[ok]
        todo = todo[~ok]
    # Left over after 50 rounds (a category with few old items): its first old item.
    old_sorted = cat.by_category[~new[cat.by_category]]
    first_old = old_sorted[np.searchsorted(cat.category[old_sorted], cat.category[item[todo]])]
    out[todo] = first_old
    return out


def _conversion_events(
    cfg: SynthConfig, impressions: pl.DataFrame, items: pl.DataFrame, rng: np.random.Generator
) -> pl.DataFrame:
    """The ``conversions`` table: one event per converted impression, delayed, valued, some naming
    only the advertiser; events after the log's end are left out (not reported yet)."""
    converted = impressions.filter("converted").join(
        items.select("item_id", "advertiser_id", "price"), on="item_id", how="left", maintain_order="left"
    )
    n = converted.height
    delay = np.maximum(1, np.round(rng.lognormal(np.log(cfg.delay_median_hours * 3600), cfg.delay_sigma, n)))
    basket = rng.lognormal(0.0, cfg.value_sigma, n)
    advertiser_only = rng.random(n) < cfg.advertiser_only_share
    log_end = cfg.start_unix + cfg.n_days * _DAY
    return (
        converted.select(
            (pl.col("timestamp") + pl.Series(delay.astype(np.int64))).alias("timestamp"),
            "user_id",
            pl.when(pl.Series(advertiser_only)).then(None).otherwise(pl.col("item_id")).alias("item_id"),
            "advertiser_id",
            (pl.col("price") * pl.Series(basket)).round(2).alias("value"),
            pl.lit("checkout").alias("type"),
            pl.lit(None, pl.Int64).alias("impression_id"),
        )
        .filter(pl.col("timestamp") < log_end)
        .sort("timestamp", maintain_order=True)
        .with_row_index("conversion_id")
        .with_columns(pl.col("conversion_id").cast(pl.Int64))
    )


def _pre_log_history(
    cfg: SynthConfig, cat: Catalogue, pop: Population, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """``history_days`` of serving before the log, acted on the same way; the engaged rows as events
    (user index, item index, unix seconds, action: 1 click, 2 save, 3 conversion)."""
    n = int(round(cfg.n_impressions * cfg.history_days / cfg.n_days))
    if n == 0:
        empty = np.zeros(0, dtype=np.int64)
        return {"user": empty, "item": empty, "timestamp": empty, "action": empty}
    pre = dataclasses.replace(cfg, n_impressions=n)
    served = _serve(pre, cat, pop, rng)
    acts = _act(pre, cat, pop, served, rng)
    engaged = acts.clicked | acts.saved | acts.converted
    action = np.where(acts.converted, 3, np.where(acts.saved, 2, 1))
    timestamp = cfg.start_unix - rng.integers(1, cfg.history_days * _DAY + 1, n)
    return {
        "user": served.user[engaged],
        "item": served.item[engaged],
        "timestamp": timestamp[engaged],
        "action": action[engaged],
    }


@dataclass
class _Served:
    """Who was shown what and where, as index arrays into the catalogue and population (internal)."""

    user: np.ndarray
    item: np.ndarray
    surface: np.ndarray
    related: np.ndarray  # row positions of related_items impressions
    subject: np.ndarray  # their subject item (index), aligned with ``related``
    search: np.ndarray  # row positions of search impressions
    query: np.ndarray  # their query token id, aligned with ``search``


@dataclass
class _Acts:
    """What the user did with each impression (internal)."""

    clicked: np.ndarray
    dwell: np.ndarray  # meaningful only where clicked
    saved: np.ndarray
    converted: np.ndarray


def _serve(cfg: SynthConfig, cat: Catalogue, pop: Population, rng: np.random.Generator) -> _Served:
    """Who is shown what, and where."""
    n = cfg.n_impressions
    user = sample(pop.activity, n, rng)
    surface = sample(np.asarray(cfg.surface_shares), n, rng)
    item = cat.in_category(pop.categories(user, rng), rng)

    related = np.flatnonzero(surface == RELATED_ITEMS)
    subject = item[related]  # the item being looked at, drawn like a feed item
    same = rng.random(related.size) < cfg.related_same_category
    shown = np.where(same, cat.in_category(cat.category[subject], rng), cat.by_popularity(related.size, rng))
    for _ in range(20):  # redraw related items equal to their subject; loops over rounds, not rows
        clash = np.flatnonzero(shown == subject)
        if clash.size == 0:
            break
        shown[clash] = cat.by_popularity(clash.size, rng)
    item[related] = shown

    search = np.flatnonzero(surface == SEARCH)
    q = cfg.queries_per_category
    token = sample(zipf_weights(q, 1.0, rng), search.size, rng)
    noisy = rng.random(search.size) < cfg.query_noise
    query_category = np.where(
        noisy, sample(cat.category_demand, search.size, rng), cat.category[item[search]]
    )
    token_ids = rng.permutation(cfg.n_categories * q)  # so a query id does not reveal its category
    query = token_ids[query_category * q + token].astype(np.int64)
    return _Served(user, item, surface, related, subject, search, query)


def _act(cfg: SynthConfig, cat: Catalogue, pop: Population, log: _Served, rng: np.random.Generator) -> _Acts:
    """Clicks, dwell, saves and conversions for the served impressions."""
    n, user, item, surface = cfg.n_impressions, log.user, log.item, log.surface
    engage_dot = rowdot(pop.engage, user, cat.appeal, item)
    convert_dot = rowdot(pop.convert, user, cat.purchase, item)
    adv_quality = cat.advertiser_quality[cat.advertiser[item]]

    click_logit = cfg.click_signal * engage_dot + 0.3 * adv_quality + cat.quality[item] + pop.click_bias[user]
    # On related_items, closeness to the item being viewed matters too.
    click_logit[log.related] += rowdot(cat.appeal, item[log.related], cat.appeal, log.subject)
    for s in range(len(SURFACES)):
        rows = surface == s
        click_logit[rows] += calibrate(click_logit[rows], cfg.click_rates[s])
    clicked = rng.random(n) < sigmoid(click_logit)

    # Poor matches bounce more often; bounced clicks never convert.
    bounce_logit = -1.5 * engage_dot
    bounce_logit += calibrate(bounce_logit[clicked], cfg.bounce_share)
    bounced = clicked & (rng.random(n) < sigmoid(bounce_logit))
    stayed = clicked & ~bounced

    conv_logit = (
        cfg.conversion_signal * convert_dot
        + adv_quality
        + pop.convert_bias[user]
        - 0.3 * (cat.log_price[item] - cat.log_price.mean())
    )
    for s in range(len(SURFACES)):
        rows = stayed & (surface == s)
        # Aim at conversions / *all* clicks, although only clicks that stayed can convert.
        target = cfg.conversions_per_click[s] * (clicked & (surface == s)).sum() / max(rows.sum(), 1)
        conv_logit[rows] += calibrate(conv_logit[rows], min(target, 0.9))
    converted = stayed & (rng.random(n) < sigmoid(conv_logit))

    stay_dwell = np.where(converted, rng.lognormal(np.log(70.0), 0.6, n), rng.lognormal(np.log(25.0), 0.8, n))
    dwell = np.where(bounced, rng.uniform(0.5, 5.0, n), 5.0 + stay_dwell)

    save_logit = 2.0 * convert_dot + 1.2 * clicked + 1.5 * converted
    save_logit += calibrate(save_logit, cfg.save_rate)
    saved = rng.random(n) < sigmoid(save_logit)
    return _Acts(clicked, dwell, saved, converted)


def _timestamps(cfg: SynthConfig, rng: np.random.Generator) -> np.ndarray:
    """Unix seconds uniform over the days, with a daily cycle peaking in the evening."""
    n = cfg.n_impressions
    hour_weight = 1.0 + 0.6 * np.sin(2 * np.pi * (np.arange(24) - 14) / 24)
    second = sample(hour_weight, n, rng) * 3600 + rng.integers(0, 3600, n)
    return cfg.start_unix + rng.integers(0, cfg.n_days, n) * _DAY + second


def _frames(
    cfg: SynthConfig,
    cat: Catalogue,
    pop: Population,
    log: _Served,
    acts: _Acts,
    timestamp: np.ndarray,
    rng: np.random.Generator,
    history: Mapping[str, np.ndarray],
    content: np.ndarray | None = None,
) -> dict[str, pl.DataFrame]:
    """Assemble the contract's frames, mapping internal indices to shuffled public ids (and the items'
    ``content_emb`` when ``content`` is given).

    One function (~80 lines) because every table must use the same id permutations, drawn here
    first and in a fixed order (the draw order is what keeps a seed's tables unchanged).
    """
    item_ids = shuffled_ids(cfg.n_items, 1_000_000, rng)
    user_ids = shuffled_ids(cfg.n_users, 50_000_000, rng)
    advertiser_ids = rng.permutation(cfg.n_advertisers).astype(np.int64)
    category_ids = rng.permutation(cfg.n_categories).astype(np.int64)
    n = cfg.n_impressions

    items = pl.DataFrame(
        {
            "item_id": item_ids,
            "advertiser_id": advertiser_ids[cat.advertiser],
            "category_id": category_ids[cat.category],
            "price": np.round(np.exp(cat.log_price), 2),
            **({} if content is None else {"content_emb": content}),
        }
    ).sort("item_id")
    users = pl.DataFrame(
        {
            "user_id": user_ids,
            "age_bucket": pop.age_bucket.astype(np.int64),
            "region_id": pop.region.astype(np.int64),
            "account_age_days": pop.account_age_days,
        }
    ).sort("user_id")

    # Dense columns first; the null pattern is applied by expressions below.
    subject = np.zeros(n, dtype=np.int64)
    subject[log.related] = item_ids[log.subject]
    query = np.zeros(n, dtype=np.int64)
    query[log.search] = log.query
    impressions = (
        pl.DataFrame(
            {
                "timestamp": timestamp.astype(np.int64),
                "user_id": user_ids[log.user],
                "item_id": item_ids[log.item],
                "surface_code": log.surface.astype(np.uint32),
                "clicked": acts.clicked,
                "dwell_seconds": np.round(acts.dwell, 2),
                "saved": acts.saved,
                "converted": acts.converted,
                "subject_item_id": subject,
                "query_id": query,
            }
        )
        .sort("timestamp", maintain_order=True)
        .with_row_index("impression_id")
        .select(
            pl.col("impression_id").cast(pl.Int64),
            "timestamp",
            "user_id",
            "item_id",
            pl.lit(pl.Series(SURFACES)).gather(pl.col("surface_code")).alias("surface"),
            "clicked",
            pl.when("clicked").then("dwell_seconds").alias("dwell_seconds"),
            "saved",
            "converted",
            pl.when(pl.col("surface_code") == RELATED_ITEMS).then("subject_item_id").alias("subject_item_id"),
            pl.when(pl.col("surface_code") == SEARCH).then("query_id").alias("query_id"),
        )
    )
    user_history = pl.DataFrame(
        {
            "user_id": user_ids[history["user"]],
            "item_id": item_ids[history["item"]],
            "timestamp": history["timestamp"].astype(np.int64),
            "action": pl.Series(["click", "save", "conversion"]).gather(history["action"] - 1),
        }
    ).sort("user_id", "timestamp", "item_id")
    return {"items": items, "users": users, "impressions": impressions, "user_history": user_history}


def synthesize(
    preset: str | SynthConfig,
    out_dir: str | Path,
    seed: int = 0,
    conversion_events: bool = False,
    content_vectors: bool = False,
) -> dict[str, pl.DataFrame]:
    """Generate a preset, write it to ``out_dir`` (atomically, see ``tables.write_tables``) with its
    provenance (preset, seed, config, and the attribution of the conversion events when
    ``conversion_events`` turns them on) in ``METADATA_FILE``; return the frames written.
    ``content_vectors`` adds the items' content vectors and new items (see :class:`SynthConfig`)."""
    cfg = resolve_config(preset)
    if conversion_events:
        cfg = dataclasses.replace(cfg, conversion_events=True)
    if content_vectors:
        cfg = dataclasses.replace(cfg, content_vectors=True)
    metadata = {
        "preset": preset if isinstance(preset, str) else None,
        "seed": seed,
        "config": dataclasses.asdict(cfg),
    }
    tables, attribution = _generate(cfg, seed)
    if attribution is not None:
        metadata["attribution"] = attribution.provenance()
    write_tables(tables, out_dir, metadata)
    return tables
