"""``evaluate(composed, run) -> EvalResult``: held-out recall of a trained run, logged into that run.

The trained model and every baseline go through the same harness: a ranked list per query, then
:func:`score_ranking` (recall@k per task and surface, plus bootstrap confidence intervals over users).
Besides the metrics, the run gets ``eval/<split>_hits.npz``: which held-out positive each ranking
(the model and every baseline) retrieved at each k, so that two rankings can be compared on the same
resampled users later (``convcg ablate``; :func:`load_hits` reads it back).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
from omegaconf import OmegaConf

from convcg_cli import tracking
from convcg_cli.baselines import (
    BASELINE_DATA_OPTIONS,
    BASELINES,
    BaselineRefusedError,
    make_baseline,
    training_history,
)
from convcg_cli.builders import (  # noqa: F401  (read_checkpoint: also imported from here)
    build_datamodule,
    embed_split,
    load_trained_model,
    read_checkpoint,
)
from convcg_cli.config import Composed
from convcg_cli.errors import ConfigError, ConvcgError
from convcg_cli.metrics.bootstrap import bootstrap_recall_ci, ci_names
from convcg_cli.metrics.prior import choose_prior_weight, log_prior, with_item_prior
from convcg_cli.metrics.retrieval import ExactIndex, metric_name, positive_hits
from convcg_cli.metrics.suite import report_from_topk
from convcg_cli.tasks import PRIMARY_TASK

SPLITS = ("val", "heldout")
EVAL_ARTIFACT_DIR = "eval"
HITS_FILE = "{split}_hits.npz"
BASELINE_PREFIX = "baseline_"
MODEL_RANKING = "model"
PRIOR_WEIGHT_METRIC = "prior/beta"  # the popularity prior's weight chosen on validation


@dataclass(frozen=True)
class PositiveHits:
    """Which ranking retrieved which unique held-out positive of one task, at every cutoff.

    Attributes:
        ks: the cutoff of each column of the hit flags.
        query: (P,) query index of each unique (query, item) positive, deduplicated as recall does.
        user: (P,) user position of each positive: the unit a bootstrap resamples.
        rankings: ranking name (``model``, ``baseline_popularity``, ...) -> (P, len(ks)) bool flags;
            ``rankings[name].mean(axis=0)`` is that ranking's recall at ``ks``.
    """

    ks: tuple[int, ...]
    query: np.ndarray
    user: np.ndarray
    rankings: dict[str, np.ndarray]


@dataclass(frozen=True)
class RankingScores:
    """One ranking's metrics and, per task, its ``(pair_query, hits)`` from :func:`positive_hits`."""

    metrics: dict[str, float]
    hits: dict[str, tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class EvalResult:
    """Metrics of one evaluation, keyed by metric name (e.g. ``heldout/conversion/recall_at_100``),
    and the per-positive hit flags of every ranking, by task."""

    run_id: str
    split: str
    metrics: dict[str, float]
    hits: dict[str, PositiveHits] = field(default_factory=dict)


def query_users(queries) -> np.ndarray:
    """User position of each query: the ``user_id`` feature codes are position + 1 (see build_user_table)."""
    return np.asarray(queries.features["user_id"], dtype=np.int64) - 1


def task_hits(
    topk_ids: np.ndarray, queries, ks: Sequence[int], tasks: Sequence[str]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``(pair_query, hits)`` of :func:`positive_hits` for every task with a positive among the ranked
    queries (the rows of ``topk_ids``); other tasks are left out, as recall leaves them out."""
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for task in tasks:
        q, items = queries.positives[task]
        keep = q < len(topk_ids)
        if keep.any():
            out[task] = positive_hits(topk_ids, q[keep], items[keep], ks)  # (P,), (P, len(ks))
    return out


def confidence_intervals(
    hits_by_task: Mapping[str, tuple[np.ndarray, np.ndarray]],
    queries,
    ks: Sequence[int],
    split: str,
    by_surface: bool,
    n_boot: int,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, float]:
    """Bootstrap-over-users CI bounds of every recall metric :func:`report_from_topk` reports."""
    users = query_users(queries)
    out: dict[str, float] = {}
    for task, (pair_query, hits) in hits_by_task.items():
        groups = [(split, np.ones(len(pair_query), dtype=bool))]
        if by_surface:
            surface = queries.surface[pair_query]
            groups += [(f"{split}/by_surface/{s}", surface == s) for s in np.unique(surface)]
        for prefix, mask in groups:
            ci = bootstrap_recall_ci(hits[mask], users[pair_query[mask]], ks, n_boot, seed, level)
            for k, (low, high) in ci.items():
                low_name, high_name = ci_names(metric_name(prefix, task, k))
                out[low_name], out[high_name] = low, high
    return out


def score_ranking(topk_ids: np.ndarray, queries, split: str, tasks: Sequence[str], cfg) -> RankingScores:
    """Recall@k per task (and surface) of ranked lists, with CI bounds when ``cfg.bootstrap.n_boot > 0``."""
    ks = list(cfg.ks)
    metrics = report_from_topk(topk_ids, queries, ks, split, tasks, cfg.by_surface)
    hits = task_hits(topk_ids, queries, ks, tasks)
    boot = cfg.bootstrap
    if boot.n_boot > 0:
        metrics.update(
            confidence_intervals(
                hits, queries, ks, split, cfg.by_surface, int(boot.n_boot), boot.seed, boot.level
            )
        )
    return RankingScores(metrics, hits)


def score_baselines(dm, queries, tasks: Sequence[str], cfg) -> dict[str, RankingScores]:
    """Fit every baseline of ``cfg.baselines`` on ``dm``'s training window and score it on ``queries``;
    keyed by ranking name (``baseline_<name>``). A baseline that refuses the data
    (:class:`~convcg_cli.baselines.BaselineRefusedError`) is skipped with a logged warning."""
    history = training_history(dm)
    users = query_users(queries)
    scores: dict[str, RankingScores] = {}
    for name in cfg.baselines:
        options = cfg.baseline_options.get(name)
        try:
            baseline = make_baseline(name, _as_dict(options) if options else {}).fit(history)
        except BaselineRefusedError as exc:  # one baseline that cannot run must not cost the others
            logging.getLogger(__name__).warning("Skipped baseline %s: %s", name, exc)
            continue
        topk = baseline.query_topk(users, max(cfg.ks))
        ranking = f"{BASELINE_PREFIX}{name}"
        scores[ranking] = score_ranking(topk, queries, f"{cfg.split}/{ranking}", tasks, cfg)
    return scores


def baseline_metrics(dm, queries, tasks: Sequence[str], cfg) -> dict[str, float]:
    """The metrics of every baseline of :func:`score_baselines`, in one dict (as they are logged)."""
    metrics: dict[str, float] = {}
    for scores in score_baselines(dm, queries, tasks, cfg).values():
        metrics.update(scores.metrics)
    return metrics


def _apply_prior(model, dm, query_emb, item_emb, options) -> tuple[np.ndarray, np.ndarray, float]:
    """Append the popularity prior coordinate, its weight chosen on the validation split.

    The prior is ``log1p`` of each item's training-window conversions, scaled to max 1.
    """
    prior = log_prior(dm.items.performance["conversions"].to_numpy())
    val_query, val_item = dm.queries["val"].positives[PRIMARY_TASK]
    if len(val_query) == 0:
        lo, hi = dm.queries["val"].days
        raise ConvcgError(
            f"popularity_prior.betas needs validation conversions to choose beta, but the val split of "
            f"{dm.dir}/impressions.parquet (days {lo}..{hi} since 1970-01-01) has 0; use "
            "popularity_prior.betas=[] or more validation days (data.val_days)."
        )
    beta, _ = choose_prior_weight(
        embed_split(model, dm, "val"),
        item_emb,
        prior,
        list(options.betas),
        val_query,
        val_item,
        options.select_k,
    )
    query_emb, item_emb = with_item_prior(query_emb, item_emb, prior, beta)
    return query_emb, item_emb, beta


def collect_hits(
    rankings: Mapping[str, RankingScores], users: np.ndarray, ks: Sequence[int]
) -> dict[str, PositiveHits]:
    """Per task, the hit flags of every ranking on the same positives (``users``: user per query)."""
    out: dict[str, PositiveHits] = {}
    for name, scores in rankings.items():
        for task, (pair_query, hits) in scores.hits.items():
            if task not in out:
                out[task] = PositiveHits(tuple(int(k) for k in ks), pair_query, users[pair_query], {})
            elif not np.array_equal(out[task].query, pair_query):
                raise ConvcgError(f"Ranking {name} was scored on other {task} positives than the model.")
            out[task].rankings[name] = hits
    return out


def hits_arrays(hits: Mapping[str, PositiveHits]) -> dict[str, np.ndarray]:
    """The ``.npz`` layout of per-task hits: ``ks``, then ``<task>/query``, ``<task>/user`` and
    ``<task>/<ranking>`` per task."""
    arrays: dict[str, np.ndarray] = {}
    for task, h in hits.items():
        arrays["ks"] = np.asarray(h.ks, dtype=np.int64)
        arrays[f"{task}/query"], arrays[f"{task}/user"] = h.query, h.user
        arrays.update({f"{task}/{name}": flags for name, flags in h.rankings.items()})
    return arrays


def load_hits(path: Path) -> dict[str, PositiveHits]:
    """Read an ``eval/<split>_hits.npz`` artifact (see :func:`hits_arrays`) back into per-task hits."""
    with np.load(path) as npz:
        arrays = {name: npz[name] for name in npz.files}
    ks = tuple(int(k) for k in arrays.pop("ks", ()))
    out: dict[str, PositiveHits] = {}
    for task in sorted({name.split("/")[0] for name in arrays}):
        rankings = {
            name.split("/", 1)[1]: flags
            for name, flags in arrays.items()
            if name.startswith(f"{task}/") and name.split("/", 1)[1] not in ("query", "user")
        }
        out[task] = PositiveHits(ks, arrays[f"{task}/query"], arrays[f"{task}/user"], rankings)
    return out


def _as_dict(node) -> dict[str, Any]:
    """A config mapping as a plain, resolved dict."""
    return cast(dict[str, Any], OmegaConf.to_container(node, resolve=True))


def _baseline_key(train_cfg, tasks: Sequence[str], cfg) -> str:
    """What baseline metrics depend on: the data options they read (``BASELINE_DATA_OPTIONS``), the
    tasks and the evaluation options. Runs that differ only in model, loss or feature options share them."""
    data = {k: v for k, v in _as_dict(train_cfg.data).items() if k in BASELINE_DATA_OPTIONS}
    options = _as_dict(cfg)
    evaluation = {
        k: options[k] for k in ("split", "ks", "by_surface", "baselines", "baseline_options", "bootstrap")
    }
    return json.dumps({"data": data, "tasks": list(tasks), "eval": evaluation}, sort_keys=True, default=str)


def evaluate(
    composed: Composed, run: str, baseline_cache: MutableMapping[str, dict[str, RankingScores]] | None = None
) -> EvalResult:
    """Rebuild the run's model from its saved config and checkpoint, score ``split``, log the metrics
    and the per-positive hit flags (``eval/<split>_hits.npz``) into the run.

    Args:
        composed: the composed ``eval`` config.
        run: an MLflow run id, or ``latest``.
        baseline_cache: optional dict shared across calls (``convcg ablate``): baselines do not depend
            on the trained model, so runs on the same data and evaluation options reuse their scores.
    """
    cfg = composed.cfg
    if cfg.split not in SPLITS:
        raise ConfigError(f"split={cfg.split!r} is not one of {list(SPLITS)}.")
    unknown = [b for b in cfg.baselines if b not in BASELINES]
    if unknown:
        raise ConfigError(f"Unknown baseline(s) {unknown}; known: {sorted(BASELINES)}.")
    run_id = tracking.resolve_run(cfg.logger, run)
    checkpoint = tracking.download_checkpoint(cfg.logger, run_id)  # before the baselines: fail fast
    train_cfg = tracking.load_run_config(cfg.logger, run_id)
    if cfg.data_dir:
        train_cfg.data.dir = str(cfg.data_dir)
    tasks = list(train_cfg.loss.task_weights.keys())
    dm = build_datamodule(train_cfg, tasks, stage="validate")  # no training examples needed
    queries = dm.queries[cfg.split]
    _check_has_conversions(dm, cfg.split)

    # Baselines first: a bad baseline option fails fast (one that refuses the corpus is skipped).
    baselines: dict[str, RankingScores] = {}
    if cfg.baselines:
        key = _baseline_key(train_cfg, tasks, cfg)
        cached = baseline_cache.get(key) if baseline_cache is not None else None
        baselines = cached if cached is not None else score_baselines(dm, queries, tasks, cfg)
        if baseline_cache is not None:
            baseline_cache[key] = baselines

    model = load_trained_model(train_cfg, dm, checkpoint, run_id)
    query_emb, item_emb = embed_split(model, dm, cfg.split), model.embed_items(dm.item_features)
    metrics: dict[str, float] = {}
    if cfg.popularity_prior.betas:
        query_emb, item_emb, beta = _apply_prior(model, dm, query_emb, item_emb, cfg.popularity_prior)
        metrics[f"{cfg.split}/{PRIOR_WEIGHT_METRIC}"] = beta
    _, topk = ExactIndex(item_emb).search(query_emb, max(cfg.ks))  # the served model's search
    rankings = {**baselines, MODEL_RANKING: score_ranking(topk, queries, cfg.split, tasks, cfg)}
    for scores in rankings.values():  # baselines first, then the model, as logged before
        metrics.update(scores.metrics)
    hits = collect_hits(rankings, query_users(queries), list(cfg.ks))

    mlflow_client = tracking.client(cfg.logger)
    tracking.log_metrics(mlflow_client, run_id, metrics)
    tracking.log_text(
        mlflow_client,
        run_id,
        json.dumps(metrics, indent=2, sort_keys=True),
        f"{EVAL_ARTIFACT_DIR}/{cfg.split}_metrics.json",
    )
    tracking.log_arrays(
        mlflow_client, run_id, hits_arrays(hits), f"{EVAL_ARTIFACT_DIR}/{HITS_FILE.format(split=cfg.split)}"
    )
    return EvalResult(run_id, cfg.split, metrics, hits)


def _check_has_conversions(dm, split: str) -> None:
    """ConvcgError when ``split`` holds no conversion: recall of the primary task is undefined."""
    queries = dm.queries[split]
    if len(queries.positives[PRIMARY_TASK][0]) == 0:
        lo, hi = queries.days
        raise ConvcgError(
            f"The {split} split of {dm.dir}/impressions.parquet (days {lo}..{hi} since 1970-01-01, "
            f"{dm.n_rows[split]} impressions) has 0 conversions (converted = true); expected at "
            "least one held-out conversion to measure recall. Use more days (data.heldout_days) "
            "or other logs."
        )
