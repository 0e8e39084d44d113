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
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from convcg_cli.data.attribution import AttributionResult, AttributionRule, attribute
from convcg_cli.data.tables import write_tables
from convcg_cli.errors import ConfigError

SURFACES = ("home_feed", "related_items", "search")
HOME_FEED, RELATED_ITEMS, SEARCH = range(3)

_DAY = 86_400
# Calibration of intercepts uses at most this many rows, enough for ~0.1% precision on a rate.
_CALIBRATION_ROWS = 200_000
# Rows per chunk when gathering latent vectors: bounds memory on the large preset.
_CHUNK_ROWS = 1_000_000


@dataclass(frozen=True)
class SynthConfig:
    """Sizes and behaviour knobs of one synthetic log. Per-surface tuples follow :data:`SURFACES`.

    Sizes:
        n_users, n_items, n_advertisers, n_categories, n_days, n_impressions; start_date is the first
        day (ISO date, UTC midnight).
    Planted structure:
        latent_dim: size of the latent vectors. user_intent_correlation / item_intent_correlation: rho
        between engagement and conversion intent / appeal and purchase. category_spread and
        segment_spread: noise around the cluster centroids (unit vectors). click_signal and
        conversion_signal: logit per unit of ``e.a`` and ``c.p``. advertiser_quality_sd: spread of the
        advertiser offset. user_feature_signal: chance age_bucket / region_id follow the user's segment.
    Serving:
        item_popularity_exponent, user_activity_exponent, advertiser_size_exponent: Zipf exponents.
        personalisation: share of category draws from the user's preference (rest: global demand).
        category_temperature: sharpness of that preference. surface_shares, related_same_category,
        queries_per_category, query_noise: surface mix and how related items / queries are drawn.
    Behaviour:
        click_rates, conversions_per_click: targets per surface. save_rate: saves per impression.
        bounce_share: share of clicks that bounce (dwell < 5 s).
    History:
        history_days: days before start_date served and acted on like the log itself (same users,
            items and rates); their engagements become the ``user_history`` table (0 = none).
    Conversion events (off by default; ``convcg data synth --delays``):
        conversion_events: each conversion of the log becomes an event in the ``conversions`` table,
            reported ``delay`` seconds after its impression (lognormal: median delay_median_hours,
            log-sd delay_sigma, so a share arrives after the attribution window), worth the item's
            price times a lognormal(0, value_sigma) basket factor; advertiser_only_share of the
            events name only the advertiser. Events after the log's end are not reported yet. The
            impressions' ``converted`` then comes from attributing the events (last click within
            attribution_window_days), with ``conversion_value`` and ``conversion_delay_seconds``.
    Content vectors and new items (off by default; ``convcg data synth --content-vectors``):
        content_vectors: items get ``content_emb``, a content_dim-long vector: a fixed random projection
            of the item's planted appeal and purchase vectors plus noise (content_noise: the noise's
            norm relative to the signal's), so it carries part of the planted intent. A new_item_share
            of the items are new: released at the start of the last new_item_days days (the default
            held-out days), never served (nor the subject of a related-items request, nor in the
            user history) before; an impression drawn for one earlier shows another item of its
            category instead.
    """

    n_users: int
    n_items: int
    n_advertisers: int
    n_categories: int
    n_days: int
    n_impressions: int
    start_date: str = "2026-01-01"
    latent_dim: int = 12
    n_user_segments: int = 12
    n_regions: int = 20
    user_intent_correlation: float = 0.6
    item_intent_correlation: float = 0.6
    category_spread: float = 0.6
    segment_spread: float = 0.5
    click_signal: float = 3.0
    conversion_signal: float = 3.5
    advertiser_quality_sd: float = 0.5
    user_feature_signal: float = 0.4
    item_popularity_exponent: float = 0.9
    user_activity_exponent: float = 0.8
    advertiser_size_exponent: float = 1.0
    personalisation: float = 0.7
    category_temperature: float = 0.3
    surface_shares: tuple[float, float, float] = (0.60, 0.25, 0.15)
    related_same_category: float = 0.8
    queries_per_category: int = 20
    query_noise: float = 0.15
    click_rates: tuple[float, float, float] = (0.10, 0.13, 0.18)
    conversions_per_click: tuple[float, float, float] = (0.020, 0.025, 0.045)
    save_rate: float = 0.03
    bounce_share: float = 0.25
    history_days: int = 7
    conversion_events: bool = False
    delay_median_hours: float = 20.0
    delay_sigma: float = 1.5
    value_sigma: float = 0.6
    advertiser_only_share: float = 0.2
    attribution_window_days: float = 7.0
    content_vectors: bool = False
    content_dim: int = 16
    content_noise: float = 1.0
    new_item_share: float = 0.2
    new_item_days: int = 2

    def __post_init__(self) -> None:
        sizes = ("n_users", "n_items", "n_advertisers", "n_categories", "n_days", "n_impressions")
        small = [f"{k}={getattr(self, k)}" for k in sizes if getattr(self, k) < 1]
        if small:
            raise ConfigError(f"synthetic data sizes must be >= 1, got {', '.join(small)}.")
        if self.n_items < self.n_categories:
            raise ConfigError(
                "synthetic data needs at least one item per category (n_items >= n_categories)."
            )
        if abs(sum(self.surface_shares) - 1.0) > 1e-6:
            raise ConfigError(f"surface_shares must sum to 1, got {self.surface_shares}.")
        try:
            dt.date.fromisoformat(self.start_date)
        except ValueError as exc:
            raise ConfigError(
                f"start_date must be an ISO date like 2026-01-01, got {self.start_date!r}."
            ) from exc

    @property
    def start_unix(self) -> int:
        """Unix seconds of start_date at 00:00 UTC."""
        start = dt.datetime.combine(dt.date.fromisoformat(self.start_date), dt.time(), tzinfo=dt.timezone.utc)
        return int(start.timestamp())


PRESETS: dict[str, SynthConfig] = {
    # Unit tests: ~34 conversions a day, so each of the last 4 days (val + held-out) has >= 20.
    "tiny": SynthConfig(
        n_users=400, n_items=600, n_advertisers=30, n_categories=8, n_days=14, n_impressions=150_000
    ),
    "small": SynthConfig(
        n_users=5_000,
        n_items=5_000,
        n_advertisers=200,
        n_categories=30,
        n_days=21,
        n_impressions=1_500_000,
        n_user_segments=20,
    ),
    "large": SynthConfig(
        n_users=200_000,
        n_items=100_000,
        n_advertisers=2_000,
        n_categories=100,
        n_days=28,
        n_impressions=6_000_000,
        latent_dim=16,
        n_user_segments=50,
        n_regions=50,
        queries_per_category=50,
    ),
}


# --------------------------------------------------------------------------------------------------
# Small vectorised helpers
# --------------------------------------------------------------------------------------------------


def _unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length."""
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _noisy(center: np.ndarray, spread: float, rng: np.random.Generator) -> np.ndarray:
    """Unit vectors scattered around unit ``center`` rows; the noise has norm ~``spread``."""
    d = center.shape[-1]
    return _unit(center + spread * rng.standard_normal(center.shape) / np.sqrt(d))


def _correlated(base: np.ndarray, other: np.ndarray, rho: float) -> np.ndarray:
    """Unit vectors with cosine ~rho to ``base`` (``other`` is roughly orthogonal to it)."""
    return _unit(rho * base + np.sqrt(1.0 - rho**2) * other)


def _zipf_weights(n: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """Power-law weights ``rank^-exponent`` with ranks shuffled, so position carries no information."""
    return (1.0 + rng.permutation(n)) ** -exponent


def _sample(weights: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Indices drawn with probability proportional to ``weights`` (inverse CDF)."""
    cum = np.cumsum(weights, dtype=np.float64)
    idx = np.searchsorted(cum, rng.random(size) * cum[-1], side="right")
    return np.minimum(idx, len(weights) - 1)


def _shuffled_ids(n: int, offset: int, rng: np.random.Generator) -> np.ndarray:
    """Distinct, non-contiguous, randomly ordered non-negative int64 ids."""
    stride = 7
    return offset + rng.permutation(n).astype(np.int64) * stride + rng.integers(0, stride, n)


def _calibrate(logits: np.ndarray, target: float) -> float:
    """Intercept ``b`` with mean(sigmoid(logits + b)) == target, by bisection on a prefix of rows."""
    x = logits[:_CALIBRATION_ROWS].astype(np.float64)
    if x.size == 0:
        return 0.0
    lo, hi = -30.0, 30.0
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        if np.mean(1.0 / (1.0 + np.exp(-(x + mid)))) < target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _rowdot(x: np.ndarray, ix: np.ndarray, y: np.ndarray, iy: np.ndarray) -> np.ndarray:
    """``sum(x[ix] * y[iy], axis=1)``, in chunks of rows so the gathers stay small."""
    out = np.empty(ix.size, dtype=np.float64)
    for lo in range(0, ix.size, _CHUNK_ROWS):
        hi = lo + _CHUNK_ROWS
        out[lo:hi] = np.einsum("ij,ij->i", x[ix[lo:hi]], y[iy[lo:hi]])
    return out


class _Catalogue:
    """Items grouped by category and advertiser, with the cumulative arrays serving samples from."""

    def __init__(self, cfg: SynthConfig, rng: np.random.Generator) -> None:
        n, k, d = cfg.n_items, cfg.n_categories, cfg.latent_dim
        self.category_demand = _zipf_weights(k, 0.8, rng)
        self.category_demand /= self.category_demand.sum()
        self.appeal_centroid = _unit(rng.standard_normal((k, d)))
        # Independent of the appeal centroid: the correlation between appeal and purchase is set once,
        # per item below, so cos(a, p) ~ item_intent_correlation.
        self.purchase_centroid = _unit(rng.standard_normal((k, d)))

        # Advertisers: power-law sizes, each with a home category most of its items fall in.
        advertiser_home = _sample(self.category_demand, cfg.n_advertisers, rng)
        self.advertiser_quality = rng.normal(0.0, cfg.advertiser_quality_sd, cfg.n_advertisers)
        self.advertiser = _sample(_zipf_weights(cfg.n_advertisers, cfg.advertiser_size_exponent, rng), n, rng)
        at_home = rng.random(n) < 0.75
        self.category = np.where(
            at_home, advertiser_home[self.advertiser], _sample(self.category_demand, n, rng)
        )
        self.category[rng.permutation(n)[:k]] = np.arange(k)  # every category is servable

        self.appeal = _noisy(self.appeal_centroid[self.category], cfg.category_spread, rng).astype(np.float32)
        purchase_own = _noisy(self.purchase_centroid[self.category], cfg.category_spread, rng)
        self.purchase = _correlated(self.appeal, purchase_own, cfg.item_intent_correlation).astype(np.float32)
        self.quality = rng.normal(0.0, 0.3, n)
        log_price_level = rng.normal(3.0, 0.8, k)
        self.log_price = log_price_level[self.category] + rng.normal(0.0, 0.5, n)

        # Popularity: Zipf over shuffled ranks, nudged by item quality.
        popularity = _zipf_weights(n, cfg.item_popularity_exponent, rng) * np.exp(self.quality)
        self.by_category = np.argsort(self.category, kind="stable")
        self.cum = np.cumsum(popularity[self.by_category])
        starts = np.searchsorted(self.category[self.by_category], np.arange(k), side="left")
        ends = np.append(starts[1:], n)
        self.first, self.last = starts, ends - 1
        self.cum_lo = np.where(starts > 0, self.cum[np.maximum(starts - 1, 0)], 0.0)
        self.cum_hi = self.cum[ends - 1]

    def in_category(self, category: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One item per entry of ``category``, drawn by popularity within it."""
        lo, hi = self.cum_lo[category], self.cum_hi[category]
        pos = np.searchsorted(self.cum, lo + rng.random(category.size) * (hi - lo), side="right")
        return self.by_category[np.clip(pos, self.first[category], self.last[category])]

    def by_popularity(self, size: int, rng: np.random.Generator) -> np.ndarray:
        """Items drawn by global popularity (categories weighted by their items' popularity)."""
        pos = np.searchsorted(self.cum, rng.random(size) * self.cum[-1], side="right")
        return self.by_category[np.minimum(pos, self.cum.size - 1)]


class _Population:
    """Users: segment, latent intents, features and how active they are."""

    def __init__(self, cfg: SynthConfig, cat: _Catalogue, rng: np.random.Generator) -> None:
        m, s = cfg.n_users, cfg.n_user_segments
        # A segment likes a couple of categories: its centroid mixes theirs.
        liked = _sample(cat.category_demand, 2 * s, rng).reshape(s, 2)
        seg_engage = _noisy(cat.appeal_centroid[liked].sum(axis=1), 0.5, rng)
        seg_convert = _noisy(cat.purchase_centroid[liked].sum(axis=1), 0.5, rng)
        self.segment = rng.integers(0, s, m)
        self.engage = _noisy(seg_engage[self.segment], cfg.segment_spread, rng).astype(np.float32)
        convert_own = _noisy(seg_convert[self.segment], cfg.segment_spread, rng)
        self.convert = _correlated(self.engage, convert_own, cfg.user_intent_correlation).astype(np.float32)

        follows = rng.random((2, m)) < cfg.user_feature_signal
        self.age_bucket = np.where(follows[0], rng.integers(0, 7, s)[self.segment], rng.integers(0, 7, m))
        self.region = np.where(
            follows[1], rng.integers(0, cfg.n_regions, s)[self.segment], rng.integers(0, cfg.n_regions, m)
        )
        self.account_age_days = np.round(rng.exponential(500.0, m), 1)
        # Older accounts convert a little more: a weak, real signal in a user feature.
        age_z = np.log1p(self.account_age_days) - np.log1p(self.account_age_days).mean()
        self.click_bias = rng.normal(0.0, 0.4, m)
        self.convert_bias = rng.normal(0.0, 0.4, m) + 0.2 * age_z
        self.activity = _zipf_weights(m, cfg.user_activity_exponent, rng)

        # Category preference per user, flattened with row offsets so one searchsorted samples all rows.
        logits = (self.engage @ cat.appeal_centroid.T.astype(np.float32)) / cfg.category_temperature
        pref = np.exp(logits - logits.max(axis=1, keepdims=True))
        pref /= pref.sum(axis=1, keepdims=True)
        pref = cfg.personalisation * pref + (1.0 - cfg.personalisation) * cat.category_demand
        cum = np.cumsum(pref, axis=1, dtype=np.float64)
        cum /= cum[:, -1:]
        cum += np.arange(m, dtype=np.float64)[:, None]
        self.pref_cum = cum.ravel()
        self.n_categories = cfg.n_categories

    def categories(self, users: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One category per entry of ``users``, drawn from that user's preference."""
        k = self.n_categories
        pos = np.searchsorted(self.pref_cum, users + rng.random(users.size), side="right")
        return np.clip(pos - users * k, 0, k - 1)


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
        preset: a name in :data:`PRESETS` (``tiny``, ``small``, ``large``) or a :class:`SynthConfig`.
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
    rng_items, rng_users, rng_serve, rng_act, rng_time, rng_ids, rng_history, rng_events, rng_content = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(9)
    )
    cat = _Catalogue(cfg, rng_items)
    pop = _Population(cfg, cat, rng_users)
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
    cfg: SynthConfig, cat: _Catalogue, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(n_items, content_dim) float32 content vectors (a noisy projection of each item's appeal and
    purchase vectors) and the (n_items,) bool mask of new items (every category keeps an old one)."""
    planted = np.concatenate([cat.appeal, cat.purchase], axis=1)  # (N, 2d)
    projection = rng.standard_normal((planted.shape[1], cfg.content_dim)) / np.sqrt(planted.shape[1])
    signal = _unit(planted @ projection)  # (N, content_dim)
    noise = _unit(rng.standard_normal(signal.shape))
    content = (signal + cfg.content_noise * noise).astype(np.float32)
    new = rng.random(cfg.n_items) < cfg.new_item_share
    no_old = np.bincount(cat.category[~new], minlength=cfg.n_categories) == 0
    new[cat.by_category[cat.first[no_old]]] = False  # a category of new items only keeps one old
    return content, new


def _hold_back_new_items(
    cfg: SynthConfig,
    cat: _Catalogue,
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
    cat: _Catalogue,
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
    cfg: SynthConfig, cat: _Catalogue, pop: _Population, rng: np.random.Generator
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


def _serve(cfg: SynthConfig, cat: _Catalogue, pop: _Population, rng: np.random.Generator) -> _Served:
    """Who is shown what, and where."""
    n = cfg.n_impressions
    user = _sample(pop.activity, n, rng)
    surface = _sample(np.asarray(cfg.surface_shares), n, rng)
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
    token = _sample(_zipf_weights(q, 1.0, rng), search.size, rng)
    noisy = rng.random(search.size) < cfg.query_noise
    query_category = np.where(
        noisy, _sample(cat.category_demand, search.size, rng), cat.category[item[search]]
    )
    token_ids = rng.permutation(cfg.n_categories * q)  # so a query id does not reveal its category
    query = token_ids[query_category * q + token].astype(np.int64)
    return _Served(user, item, surface, related, subject, search, query)


def _act(
    cfg: SynthConfig, cat: _Catalogue, pop: _Population, log: _Served, rng: np.random.Generator
) -> _Acts:
    """Clicks, dwell, saves and conversions for the served impressions."""
    n, user, item, surface = cfg.n_impressions, log.user, log.item, log.surface
    engage_dot = _rowdot(pop.engage, user, cat.appeal, item)
    convert_dot = _rowdot(pop.convert, user, cat.purchase, item)
    adv_quality = cat.advertiser_quality[cat.advertiser[item]]

    click_logit = cfg.click_signal * engage_dot + 0.3 * adv_quality + cat.quality[item] + pop.click_bias[user]
    # On related_items, closeness to the item being viewed matters too.
    click_logit[log.related] += _rowdot(cat.appeal, item[log.related], cat.appeal, log.subject)
    for s in range(len(SURFACES)):
        rows = surface == s
        click_logit[rows] += _calibrate(click_logit[rows], cfg.click_rates[s])
    clicked = rng.random(n) < _sigmoid(click_logit)

    # Poor matches bounce more often; bounced clicks never convert.
    bounce_logit = -1.5 * engage_dot
    bounce_logit += _calibrate(bounce_logit[clicked], cfg.bounce_share)
    bounced = clicked & (rng.random(n) < _sigmoid(bounce_logit))
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
        conv_logit[rows] += _calibrate(conv_logit[rows], min(target, 0.9))
    converted = stayed & (rng.random(n) < _sigmoid(conv_logit))

    stay_dwell = np.where(converted, rng.lognormal(np.log(70.0), 0.6, n), rng.lognormal(np.log(25.0), 0.8, n))
    dwell = np.where(bounced, rng.uniform(0.5, 5.0, n), 5.0 + stay_dwell)

    save_logit = 2.0 * convert_dot + 1.2 * clicked + 1.5 * converted
    save_logit += _calibrate(save_logit, cfg.save_rate)
    saved = rng.random(n) < _sigmoid(save_logit)
    return _Acts(clicked, dwell, saved, converted)


def _timestamps(cfg: SynthConfig, rng: np.random.Generator) -> np.ndarray:
    """Unix seconds uniform over the days, with a daily cycle peaking in the evening."""
    n = cfg.n_impressions
    hour_weight = 1.0 + 0.6 * np.sin(2 * np.pi * (np.arange(24) - 14) / 24)
    second = _sample(hour_weight, n, rng) * 3600 + rng.integers(0, 3600, n)
    return cfg.start_unix + rng.integers(0, cfg.n_days, n) * _DAY + second


def _frames(
    cfg: SynthConfig,
    cat: _Catalogue,
    pop: _Population,
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
    item_ids = _shuffled_ids(cfg.n_items, 1_000_000, rng)
    user_ids = _shuffled_ids(cfg.n_users, 50_000_000, rng)
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
