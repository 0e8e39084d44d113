"""The served score: the two-tower score blended with popularity, chosen on validation.

``score(q, i) = q . i + beta * prior(i) + gamma * fallback(i)``, where

* ``prior(i)`` is ``log1p`` of item ``i``'s training-window conversions, scaled to a maximum of 1
  (:func:`~convcg_cli.metrics.prior.log_prior`);
* ``fallback(i)`` is 0 for an item the model saw in training and, for an item it never saw (no
  training-window impression, not in the user history: the item tower reads its out-of-vocabulary id
  row), the popularity of its *group*: ``log1p`` of the mean training-window conversions per seen
  item of its category (``category_id`` when the items have one, else its advertiser), scaled to a
  maximum of 1. A new item of a category that sells gets a place in the list; the model alone
  cannot give it one.

Both terms are one extra coordinate each on the item side (``bias``) and a constant 1 on the query
side, so the served index stays an inner-product index. ``beta`` and ``gamma`` are chosen on the
validation split only (coordinate search over the configured grids: ``beta`` with ``gamma = 0``,
``gamma`` given ``beta``, ``beta`` again; the smallest value among equals), by ``convcg train``
(``blend`` in ``conf/train.yaml``), which logs them (``blend/beta``, ``blend/fallback_weight``) and
bakes the bias into the served model. ``convcg eval`` scores the model with the run's own blend, so
the table shows the model as served.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from convcg_cli import progress, tracking
from convcg_cli.errors import ConfigError
from convcg_cli.index import exact_topk
from convcg_cli.metrics.prior import log_prior, with_bias
from convcg_cli.metrics.retrieval import positive_hits
from convcg_cli.tasks import PRIMARY_TASK

BETA_METRIC = "blend/beta"
GAMMA_METRIC = "blend/fallback_weight"
VAL_RECALL_METRIC = "blend/val_recall_at_{k}"  # validation conversion recall at the chosen blend
RAW_VAL_RECALL_METRIC = "blend/val_recall_at_{k}_unblended"  # ... and of the two-tower alone
GROUP_FEATURES = ("category_id", "advertiser_id")  # the fallback's group: the first the items have


@dataclass(frozen=True)
class BlendInputs:
    """Per item of the corpus (rows as the item table's): ``prior``, ``fallback`` (see the module
    docstring); ``group``: the item feature naming the fallback's group, ``group_fallback``: the
    fallback of each group code (what an item never shown gets, by its code)."""

    prior: np.ndarray
    fallback: np.ndarray
    group: str
    group_fallback: np.ndarray


@dataclass(frozen=True)
class Blend:
    """A chosen blend: weights and the per-item bias they give (``beta * prior + gamma * fallback``).

    ``recalls``: validation recall@select_k of every (beta, gamma) tried, as ``"beta,gamma"`` keys.
    """

    beta: float
    gamma: float
    inputs: BlendInputs
    select_k: int = 100
    recalls: dict[str, float] = field(default_factory=dict)
    # the best blend's beta when popularity_margin_se served the largest beta in its place, else None
    overruled_beta: float | None = None

    @property
    def bias(self) -> np.ndarray:
        """The item-side coordinate, float32."""
        return item_bias(self.inputs, self.beta, self.gamma)

    @property
    def is_off(self) -> bool:
        """True when the blend adds nothing (both weights 0)."""
        return self.beta == 0.0 and self.gamma == 0.0

    def val_recall(self, beta: float | None = None, gamma: float | None = None) -> float | None:
        """Validation recall@select_k at (beta, gamma) (default: the chosen ones), if it was tried."""
        return self.recalls.get(
            _key(self.beta if beta is None else beta, self.gamma if gamma is None else gamma)
        )

    def metrics(self) -> dict[str, float]:
        """What a run logs of the blend: the weights, and validation recall with and without it."""
        out = {BETA_METRIC: self.beta, GAMMA_METRIC: self.gamma}
        chosen, raw = self.val_recall(), self.val_recall(0.0, 0.0)
        if chosen is not None:
            out[VAL_RECALL_METRIC.format(k=self.select_k)] = chosen
        if raw is not None:
            out[RAW_VAL_RECALL_METRIC.format(k=self.select_k)] = raw
        return out

    def meta(self) -> dict[str, Any]:
        """JSON-ready description for the served model (``meta.json``'s ``blend``)."""
        return {
            "beta": self.beta,
            "gamma": self.gamma,
            "group": self.inputs.group,
            "group_fallback": [float(v) for v in self.inputs.group_fallback],
        }


def item_bias(inputs: BlendInputs, beta: float, gamma: float) -> np.ndarray:
    """``beta * prior + gamma * fallback`` as float32."""
    return (float(beta) * inputs.prior + float(gamma) * inputs.fallback).astype(np.float32)


def blend_inputs(items) -> BlendInputs:
    """The prior and fallback of every corpus item of ``items`` (an ``ItemTable`` marked with
    ``never_shown``): counts from its training-window ``performance``."""
    conversions = items.performance["conversions"].to_numpy().astype(np.float64)
    never_shown = (
        np.zeros(len(conversions), bool) if items.never_shown is None else np.asarray(items.never_shown, bool)
    )
    group = next(g for g in GROUP_FEATURES if g in items.features)
    codes = np.asarray(items.features[group], dtype=np.int64).reshape(-1)
    return BlendInputs(
        prior=log_prior(conversions),
        **_fallback(codes, conversions, never_shown),
        group=group,
    )


def _fallback(codes: np.ndarray, conversions: np.ndarray, never_shown: np.ndarray) -> dict[str, np.ndarray]:
    """Per group code: ``log1p`` of mean conversions per seen item, scaled to max 1 (0 for a group
    without seen items); per item: its group's value where never shown, else 0."""
    n_groups = int(codes.max(initial=0)) + 1
    seen = ~never_shown
    totals = np.bincount(codes[seen], weights=conversions[seen], minlength=n_groups)
    counts = np.bincount(codes[seen], minlength=n_groups)
    means = np.divide(totals, counts, out=np.zeros(n_groups), where=counts > 0)
    group_fallback = log_prior(means)
    return {"fallback": np.where(never_shown, group_fallback[codes], 0.0), "group_fallback": group_fallback}


def check_grid(options: Mapping[str, Any], where: str) -> tuple[list[float], list[float], int]:
    """``(betas, gammas, select_k)`` of a blend config block, checked: non-negative finite weights,
    ``select_k >= 1``. An absent ``fallback_weights`` is ``[0]`` (no fallback)."""
    betas = sorted({float(b) for b in (options.get("betas") or [])})
    gammas = sorted({float(g) for g in (options.get("fallback_weights") or [0.0])})
    select_k = int(options.get("select_k", 100))
    bad = [w for w in [*betas, *gammas] if not np.isfinite(w) or w < 0]
    if bad:
        raise ConfigError(f"{where}: blend weights must be finite and >= 0, got {bad}.")
    if select_k < 1:
        raise ConfigError(f"{where}.select_k must be >= 1, got {select_k}.")
    return betas, gammas, select_k


def choose_blend(
    query_emb: np.ndarray,
    item_emb: np.ndarray,
    inputs: BlendInputs,
    betas: Sequence[float],
    gammas: Sequence[float],
    query_index: np.ndarray,
    positive_item: np.ndarray,
    k: int,
    popularity_margin_se: float = 0.0,
) -> Blend:
    """The (beta, gamma) with the best recall@k of the given (validation) positives, by coordinate
    search: beta over ``betas`` at the smallest gamma, gamma over ``gammas`` at that beta, beta again
    at that gamma; the smallest value among equals each time. With one gamma this is a plain search
    over ``betas``. Only the queries holding a positive are searched.

    ``popularity_margin_se`` > 0: never worse than popularity unless validation shows it. The best
    blend is kept only if its recall beats the most popularity-led one (the largest beta, at the
    chosen gamma) by more than that many standard errors of their paired difference
    (:func:`paired_se`, queries as clusters); else the largest beta is served. On a log where the
    model cannot be told from popularity on the validation days, noise must not choose."""
    if not len(betas):
        raise ValueError("betas must hold at least one value.")
    betas, gammas = sorted(float(b) for b in betas), sorted(float(g) for g in (gammas or [0.0]))
    asked, query_index = np.unique(np.asarray(query_index, np.int64), return_inverse=True)
    query_emb = np.asarray(query_emb, np.float32)[asked]
    recalls: dict[str, float] = {}
    hits: dict[str, np.ndarray] = {}  # (P',) hit flags of each unique positive, as recall counts them
    pair_query = np.zeros(0, np.int64)

    def recall(beta: float, gamma: float) -> float:
        nonlocal pair_query
        key = _key(beta, gamma)
        if key not in recalls:
            q, i = with_bias(query_emb, item_emb, item_bias(inputs, beta, gamma))
            _, topk = exact_topk(q, i, k)
            pair_query, flags = positive_hits(topk, query_index, positive_item, [k])
            hits[key] = flags[:, 0]
            recalls[key] = float(flags[:, 0].mean())
        return recalls[key]

    def best(values: list[float], score) -> float:
        scores = [score(v) for v in values]
        return values[int(np.argmax(scores))]  # argmax: the first (smallest) among equals

    gamma = gammas[0]
    beta = best(betas, lambda b: recall(b, gamma))
    if len(gammas) > 1:
        gamma = best(gammas, lambda g: recall(beta, g))
        beta = best(betas, lambda b: recall(b, gamma))
    most_popular = betas[-1]
    if popularity_margin_se > 0 and beta != most_popular:
        margin = recall(beta, gamma) - recall(most_popular, gamma)
        se = paired_se(hits[_key(beta, gamma)], hits[_key(most_popular, gamma)], pair_query)
        if margin <= popularity_margin_se * se:
            return Blend(most_popular, gamma, inputs, int(k), recalls, overruled_beta=beta)
    return Blend(beta, gamma, inputs, int(k), recalls)


def paired_se(hits_a: np.ndarray, hits_b: np.ndarray, cluster: np.ndarray) -> float:
    """Standard error of ``mean(hits_a) - mean(hits_b)`` over the same positives, the positives of one
    ``cluster`` (query) counted together (a cluster-robust variance of the mean difference).

    Example:
        >>> a, b = np.array([1, 1, 0, 1], bool), np.array([0, 1, 0, 0], bool)
        >>> round(paired_se(a, b, np.array([0, 0, 1, 2])), 4)
        0.25
    """
    d = hits_a.astype(np.float64) - hits_b.astype(np.float64)
    _, group = np.unique(cluster, return_inverse=True)
    per_cluster = np.bincount(group.ravel(), weights=d)  # (C,) summed differences
    n_clusters, n = len(per_cluster), len(d)
    if n_clusters < 2:
        return 0.0
    centred = per_cluster - per_cluster.mean()
    return float(np.sqrt(n_clusters / (n_clusters - 1) * (centred**2).sum()) / n)


def _key(beta: float, gamma: float) -> str:
    return f"{float(beta):g},{float(gamma):g}"


def choose_on_validation(model, dm, options: Mapping[str, Any], where: str = "blend") -> Blend | None:
    """The blend of ``options`` (``betas``, ``fallback_weights``, ``select_k``) for ``model`` on
    ``dm``: chosen on the validation split's conversions, or the given weights when each grid holds
    one value (nothing to choose). None when ``betas`` is empty (off).

    Raises:
        ConfigError: a grid to choose from but no validation conversions (e.g. a refit run, trained
            through the validation days, or an empty validation window).
    """
    from convcg_cli.builders import embed_split

    betas, gammas, select_k = check_grid(options, where)
    if not betas:
        return None
    inputs = blend_inputs(dm.items)
    if len(betas) == 1 and len(gammas) == 1:
        return Blend(betas[0], gammas[0], inputs, select_k)
    val = dm.queries.get("val")  # none: a data module set up without a validation split
    val_query, val_item = (np.zeros(0, np.int64),) * 2 if val is None else val.positives[PRIMARY_TASK]
    if len(val_query) == 0:
        raise ConfigError(
            f"{where} chooses its weights on validation conversions, but the validation split of "
            f"{dm.dir}/impressions.parquet has none; give one value each ({where}.betas=[x] "
            f"{where}.fallback_weights=[y], chosen by a run that had validation days) or {where}.betas=[]."
        )
    margin = float(options.get("popularity_margin_se", 0.0))
    if not np.isfinite(margin) or margin < 0:
        raise ConfigError(f"{where}.popularity_margin_se must be >= 0 (0 = off), got {margin}.")
    with progress.step("Choosing the popularity blend on validation"):
        item_emb = model.embed_items(dm.item_features)
        query_emb = embed_split(model, dm, "val")
        return choose_blend(query_emb, item_emb, inputs, betas, gammas, val_query, val_item, select_k, margin)


def logged_blend(store: tracking.Store, run_id: str, dm) -> Blend | None:
    """The popularity blend run ``run_id`` chose on validation when it was trained (its
    ``blend/beta`` and ``blend/fallback_weight`` metrics) on the corpus of ``dm``; None for a run
    trained without one (or before blends existed)."""
    names = set(tracking.run_metric_names(store, run_id))
    if BETA_METRIC not in names:
        return None
    beta = tracking.metric_history(store, run_id, BETA_METRIC)[-1][1]
    gamma = tracking.metric_history(store, run_id, GAMMA_METRIC)[-1][1] if GAMMA_METRIC in names else 0.0
    return Blend(beta, gamma, blend_inputs(dm.items))
