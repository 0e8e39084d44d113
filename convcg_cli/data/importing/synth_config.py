"""The synthetic generator's knobs: :class:`SynthConfig` (sizes, rates, planted structure), the named
presets (:data:`PRESETS`); what the knobs plant is described in :mod:`.synth`."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from convcg_cli.errors import ConfigError

SURFACES = ("home_feed", "related_items", "search")
HOME_FEED, RELATED_ITEMS, SEARCH = range(3)


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
    A shop's purchase log (off by default; the ``sparse_shop`` preset, see :mod:`.synth_shop`):
        shop_log: keep only converted rows and a view_share of the other clicked rows (views);
            session_share of the (user, day) visits are anonymous, each a session user of its own.
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
    shop_log: bool = False
    view_share: float = 0.1
    session_share: float = 0.63

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
    # A shop's purchase log (README "Your own log"): purchases and a few views only, 63% of visits
    # anonymous (sessions as users), a 120k-item catalogue, new items released in the last 4 days
    # (the validation and held-out days of the auto split), ~170 purchases a day over 8 weeks.
    "sparse_shop": SynthConfig(
        n_users=40_000,
        n_items=120_000,
        n_advertisers=3_000,
        n_categories=300,
        n_days=56,
        n_impressions=3_000_000,
        latent_dim=16,
        n_user_segments=40,
        queries_per_category=20,
        content_vectors=True,
        new_item_share=0.15,
        new_item_days=4,
        shop_log=True,
    ),
}
