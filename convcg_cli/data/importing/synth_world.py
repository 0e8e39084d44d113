"""The latent world the synthetic logs are drawn from: small vectorised sampling helpers, the item
``Catalogue`` (categories, advertisers, appeal and purchase vectors, popularity) and the user
``Population`` (segments, intents, features, activity)."""

from __future__ import annotations

import numpy as np

from convcg_cli.data.importing.synth_config import SynthConfig

# Calibration of intercepts uses at most this many rows, enough for ~0.1% precision on a rate.
_CALIBRATION_ROWS = 200_000
# Rows per chunk when gathering latent vectors: bounds memory on the large preset.
_CHUNK_ROWS = 1_000_000


# --------------------------------------------------------------------------------------------------
# Small vectorised helpers
# --------------------------------------------------------------------------------------------------


def unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length."""
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def noisy(center: np.ndarray, spread: float, rng: np.random.Generator) -> np.ndarray:
    """Unit vectors scattered around unit ``center`` rows; the noise has norm ~``spread``."""
    d = center.shape[-1]
    return unit(center + spread * rng.standard_normal(center.shape) / np.sqrt(d))


def correlated(base: np.ndarray, other: np.ndarray, rho: float) -> np.ndarray:
    """Unit vectors with cosine ~rho to ``base`` (``other`` is roughly orthogonal to it)."""
    return unit(rho * base + np.sqrt(1.0 - rho**2) * other)


def zipf_weights(n: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """Power-law weights ``rank^-exponent`` with ranks shuffled, so position carries no information."""
    return (1.0 + rng.permutation(n)) ** -exponent


def sample(weights: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Indices drawn with probability proportional to ``weights`` (inverse CDF)."""
    cum = np.cumsum(weights, dtype=np.float64)
    idx = np.searchsorted(cum, rng.random(size) * cum[-1], side="right")
    return np.minimum(idx, len(weights) - 1)


def shuffled_ids(n: int, offset: int, rng: np.random.Generator) -> np.ndarray:
    """Distinct, non-contiguous, randomly ordered non-negative int64 ids."""
    stride = 7
    return offset + rng.permutation(n).astype(np.int64) * stride + rng.integers(0, stride, n)


def calibrate(logits: np.ndarray, target: float) -> float:
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


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def rowdot(x: np.ndarray, ix: np.ndarray, y: np.ndarray, iy: np.ndarray) -> np.ndarray:
    """``sum(x[ix] * y[iy], axis=1)``, in chunks of rows so the gathers stay small."""
    out = np.empty(ix.size, dtype=np.float64)
    for lo in range(0, ix.size, _CHUNK_ROWS):
        hi = lo + _CHUNK_ROWS
        out[lo:hi] = np.einsum("ij,ij->i", x[ix[lo:hi]], y[iy[lo:hi]])
    return out


class Catalogue:
    """Items grouped by category and advertiser, with the cumulative arrays serving samples from."""

    def __init__(self, cfg: SynthConfig, rng: np.random.Generator) -> None:
        n, k, d = cfg.n_items, cfg.n_categories, cfg.latent_dim
        self.category_demand = zipf_weights(k, 0.8, rng)
        self.category_demand /= self.category_demand.sum()
        self.appeal_centroid = unit(rng.standard_normal((k, d)))
        # Independent of the appeal centroid: the correlation between appeal and purchase is set once,
        # per item below, so cos(a, p) ~ item_intent_correlation.
        self.purchase_centroid = unit(rng.standard_normal((k, d)))

        # Advertisers: power-law sizes, each with a home category most of its items fall in.
        advertiser_home = sample(self.category_demand, cfg.n_advertisers, rng)
        self.advertiser_quality = rng.normal(0.0, cfg.advertiser_quality_sd, cfg.n_advertisers)
        self.advertiser = sample(zipf_weights(cfg.n_advertisers, cfg.advertiser_size_exponent, rng), n, rng)
        at_home = rng.random(n) < 0.75
        self.category = np.where(
            at_home, advertiser_home[self.advertiser], sample(self.category_demand, n, rng)
        )
        self.category[rng.permutation(n)[:k]] = np.arange(k)  # every category is servable

        self.appeal = noisy(self.appeal_centroid[self.category], cfg.category_spread, rng).astype(np.float32)
        purchase_own = noisy(self.purchase_centroid[self.category], cfg.category_spread, rng)
        self.purchase = correlated(self.appeal, purchase_own, cfg.item_intent_correlation).astype(np.float32)
        self.quality = rng.normal(0.0, 0.3, n)
        log_price_level = rng.normal(3.0, 0.8, k)
        self.log_price = log_price_level[self.category] + rng.normal(0.0, 0.5, n)

        # Popularity: Zipf over shuffled ranks, nudged by item quality.
        popularity = zipf_weights(n, cfg.item_popularity_exponent, rng) * np.exp(self.quality)
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


class Population:
    """Users: segment, latent intents, features and how active they are."""

    def __init__(self, cfg: SynthConfig, cat: Catalogue, rng: np.random.Generator) -> None:
        m, s = cfg.n_users, cfg.n_user_segments
        # A segment likes a couple of categories: its centroid mixes theirs.
        liked = sample(cat.category_demand, 2 * s, rng).reshape(s, 2)
        seg_engage = noisy(cat.appeal_centroid[liked].sum(axis=1), 0.5, rng)
        seg_convert = noisy(cat.purchase_centroid[liked].sum(axis=1), 0.5, rng)
        self.segment = rng.integers(0, s, m)
        self.engage = noisy(seg_engage[self.segment], cfg.segment_spread, rng).astype(np.float32)
        convert_own = noisy(seg_convert[self.segment], cfg.segment_spread, rng)
        self.convert = correlated(self.engage, convert_own, cfg.user_intent_correlation).astype(np.float32)

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
        self.activity = zipf_weights(m, cfg.user_activity_exponent, rng)

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
