"""``evaluate(composed, run) -> EvalResult``: held-out recall of a trained run, logged into that run.

The trained model and every baseline go through the same harness: a ranked list per query, then
:func:`score_ranking` (recall@k per task and surface, plus bootstrap confidence intervals over users).
Besides the metrics, the run gets ``eval/<split>_hits.npz``: which held-out positive each ranking
(the model and every baseline) retrieved at each k, so that two rankings can be compared on the same
resampled users later (``convcg ablate``; :func:`load_hits` reads it back).
"""

from __future__ import annotations

import functools
import json
import logging
import signal
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
from omegaconf import OmegaConf

from convcg_cli import progress, tracking, workdir
from convcg_cli.baseline_tuning import chosen_metrics, tune_baseline
from convcg_cli.baselines import (
    BASELINE_DATA_OPTIONS,
    BASELINES,
    BaselineRefusedError,
    make_baseline,
    shared_ease_weights,
    training_history,
)
from convcg_cli.blend import Blend, choose_on_validation, logged_blend, with_bias
from convcg_cli.builders import (  # noqa: F401  (read_checkpoint: also imported from here)
    build_datamodule,
    check_finite_weights,
    embed_split,
    load_trained_model,
    read_checkpoint,
)
from convcg_cli.config import Composed
from convcg_cli.errors import ConfigError, ConvcgError, RunInterruptedError
from convcg_cli.figures import recall_figure
from convcg_cli.index import ExactIndex
from convcg_cli.metrics.bootstrap import CI_HIGH, CI_LOW, bootstrap_recall_ci, ci_names
from convcg_cli.metrics.retrieval import metric_name, positive_hits
from convcg_cli.metrics.suite import COUNTS_PREFIX, report_from_topk
from convcg_cli.tasks import PRIMARY_TASK

SPLITS = ("val", "heldout")
EVAL_ARTIFACT_DIR = "eval"
HITS_FILE = "{split}_hits.npz"
BASELINE_PREFIX = "baseline_"
MODEL_RANKING = "model"
PRIOR_WEIGHT_METRIC = "prior/beta"  # the popularity prior's weight chosen on validation
FALLBACK_WEIGHT_METRIC = "prior/fallback_weight"  # ... and the never-shown items' fallback's
BASELINE_RUNS_TAG = "baseline_runs"  # on a trained run: the ids of the baseline runs it was compared with


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
    n_queries: int = 0  # queries of the split that were embedded and searched


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


def score_baseline(
    name: str, dm, history: Callable[[], Any], queries, tasks: Sequence[str], cfg
) -> RankingScores:
    """Fit baseline ``name`` (options ``cfg.baseline_options[name]``) on ``history()`` (the training
    window, :func:`~convcg_cli.baselines.training_history`, read only once the baseline accepts the
    size of ``dm``'s corpus), its ``cfg.baseline_tuning[name]`` options chosen on the validation
    conversions (:func:`~convcg_cli.baselines.tune_baseline`), and score it on ``queries``. The chosen
    values join its metrics as ``<split>/baseline_<name>/chosen/<option>`` (with
    ``chosen/val_recall_at_<select_k>``)."""
    options = _as_dict(given) if (given := cfg.baseline_options.get(name)) else {}
    make_baseline(name, options).check_corpus(len(dm.items.item_ids))  # EASE refuses > max_items
    tuning = cfg.get("baseline_tuning") or {}
    grid = tuning.get(name)
    select_k = int(tuning.get("select_k", 100))
    window = history()
    tuned = tune_baseline(name, options, _as_dict(grid) if grid else {}, window, select_k)
    if grid and tuned.val_recall is None:
        logging.getLogger(__name__).warning(
            "Baseline %s is not tuned: the run has no validation conversions to choose %s on "
            "(a refit run trained through them); it uses baseline_options.%s as given.",
            name,
            sorted(grid),
            name,
        )
    topk = tuned.baseline.query_topk(query_users(queries), max(cfg.ks))
    prefix = f"{cfg.split}/{BASELINE_PREFIX}{name}"
    scores = score_ranking(topk, queries, prefix, tasks, cfg)
    scores.metrics.update(chosen_metrics(tuned, window, prefix, select_k))
    return scores


def score_baselines(dm, queries, tasks: Sequence[str], cfg) -> dict[str, RankingScores]:
    """Fit every baseline of ``cfg.baselines`` on ``dm``'s training window and score it on ``queries``;
    keyed by ranking name (``baseline_<name>``). A baseline that refuses the data
    (:class:`~convcg_cli.baselines.BaselineRefusedError`) is skipped with a logged warning."""
    history = functools.cache(functools.partial(training_history, dm))  # read once, if any is fitted
    scores: dict[str, RankingScores] = {}
    with shared_ease_weights():  # ease and ease_popularity invert the same Gram matrix once
        for name in cfg.baselines:
            score = functools.partial(score_baseline, name, dm, history, queries, tasks, cfg)
            found = _unless_refused(name, score)
            if found is not None:
                scores[f"{BASELINE_PREFIX}{name}"] = found
    return scores


def _unless_refused(name: str, score: Callable[[], RankingScores]) -> RankingScores | None:
    """``score()``, or None with a logged warning when baseline ``name`` refuses the data
    (:class:`~convcg_cli.baselines.BaselineRefusedError`): one baseline that cannot run must not
    cost the others."""
    try:
        return score()
    except BaselineRefusedError as exc:
        logging.getLogger(__name__).warning("Skipped baseline %s: %s", name, exc)
        return None


def baseline_metrics(dm, queries, tasks: Sequence[str], cfg) -> dict[str, float]:
    """The metrics of every baseline of :func:`score_baselines`, in one dict (as they are logged)."""
    metrics: dict[str, float] = {}
    for scores in score_baselines(dm, queries, tasks, cfg).values():
        metrics.update(scores.metrics)
    return metrics


def logged_metrics(
    metrics: Mapping[str, float], split: str, ranking: str = MODEL_RANKING
) -> dict[str, float]:
    """The names a run's metrics are logged under in MLflow, so the headline
    ``<split>/<task>/recall_at_<k>`` leads its own chart section: CI bounds go to ``<split>_ci/...``,
    per-surface recall to ``<split>_by_surface/...`` (its CI bounds stay in the
    ``eval/<split>_metrics.json`` artifact only). A baseline's own run logs its figures under the
    model's names (``ranking`` prefix dropped), so they line up with trained runs' columns.

    Example:
        >>> logged_metrics({"heldout/baseline_popularity/conversion/recall_at_10_ci_low": 0.1,
        ...                 "heldout/baseline_popularity/by_surface/feed/conversion/recall_at_10": 0.2},
        ...                "heldout", "baseline_popularity")  # doctest: +NORMALIZE_WHITESPACE
        {'heldout_ci/conversion/recall_at_10_ci_low': 0.1,
         'heldout_by_surface/feed/conversion/recall_at_10': 0.2}
    """
    own, own_counts = f"{split}/{ranking}/", f"{COUNTS_PREFIX}/{split}/{ranking}/"
    surface = f"{split}/by_surface/"
    out: dict[str, float] = {}
    for name, value in metrics.items():
        if ranking != MODEL_RANKING and name.startswith(own):
            name = f"{split}/{name[len(own) :]}"
        elif ranking != MODEL_RANKING and name.startswith(own_counts):  # counts/<split>/<task>/...
            name = f"{COUNTS_PREFIX}/{split}/{name[len(own_counts) :]}"
        is_ci = name.endswith((CI_LOW, CI_HIGH))
        if name.startswith(surface):
            if not is_ci:
                out[f"{split}_by_surface/{name[len(surface) :]}"] = value
        elif is_ci:
            out[f"{split}_ci/{name[len(split) + 1 :]}"] = value
        else:
            out[name] = value
    return out


def check_refit_evaluation(cfg, run_id: str) -> None:
    """ConfigError unless an evaluation of a refit run (``data.train_through_val``) leaves the
    validation days alone: it cannot score them (they trained the model) nor choose a weight on them
    (the popularity prior's beta, the EASE + popularity blend's weight); each must be one value,
    chosen on validation by a run trained without those days."""
    refit = f"Run {run_id} was trained through the validation days (data.train_through_val=true)"
    if cfg.split != "heldout":
        raise ConfigError(f"{refit}: split={cfg.split} would score its training data; use split=heldout.")
    prior = cfg.popularity_prior
    chosen_on_val = {  # null: the run's own blend, as its training chose it (one value each)
        f"popularity_prior.{name}": list(prior.get(name) or [])
        for name in ("betas", "fallback_weights")
        if prior.get(name) is not None
    }
    if "ease_popularity" in cfg.baselines:
        weights = (cfg.baseline_options.get("ease_popularity") or {}).get("weights", [])
        chosen_on_val["baseline_options.ease_popularity.weights"] = list(weights)
    for option, values in chosen_on_val.items():
        if len(values) > 1:
            raise ConfigError(
                f"{refit}: its validation days cannot choose {option} from {values}. Give the one "
                "value chosen on validation by the same configuration trained without them, e.g. "
                f"{option}=[{values[0]}]."
            )


def served_blend(store, run_id: str, model, dm, options) -> Blend | None:
    """The popularity blend the model is scored with: the run's own, as it is served
    (``popularity_prior.betas`` null: the weights ``convcg train`` chose on validation, none for a
    run trained without a blend), or chosen again on the validation split from the given grids
    (``betas``, ``fallback_weights``; one value each is used as it is); ``[]``: none."""
    if options.get("betas") is None:
        return logged_blend(store, run_id, dm)
    return choose_on_validation(model, dm, options, "popularity_prior")


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


def baseline_key(digest: str, train_cfg, tasks: Sequence[str], cfg, name: str) -> str:
    """What baseline ``name``'s scores depend on, hashed: the data's digest, the data options it
    reads (``BASELINE_DATA_OPTIONS`` but the directory, which the digest stands for), the tasks, its
    own options and the evaluation options. Runs that differ only in model, loss or feature options
    share it; so does any later evaluation on the same bytes (its baseline run is reused)."""
    import hashlib

    data = {k: v for k, v in _as_dict(train_cfg.data).items() if k in BASELINE_DATA_OPTIONS and k != "dir"}
    options = _as_dict(cfg)
    evaluation = {k: options[k] for k in ("split", "ks", "by_surface", "bootstrap")}
    evaluation["options"] = (options.get("baseline_options") or {}).get(name)
    tuning = options.get("baseline_tuning") or {}
    if tuning.get(name):  # untuned baselines keep their keys (and their logged runs)
        evaluation["tuning"] = {"grid": tuning[name], "select_k": tuning.get("select_k", 100)}
    text = json.dumps(
        {"digest": digest, "data": data, "tasks": list(tasks), "eval": evaluation, "baseline": name},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(text.encode()).hexdigest()[: tracking.DIGEST_LENGTH]


@dataclass
class BaselineContext:
    """What scoring or finding the baselines of one evaluation needs."""

    store: tracking.Store
    dm: Any
    queries: Any
    tasks: list[str]
    cfg: Any  # the eval config
    train_cfg: Any
    digest: str
    profile: dict[str, Any]
    downloads: Path  # the evaluation's own temporary directory (workdir.command_dir)
    _history: Any = None
    logged: list[str] = field(default_factory=list)  # what this evaluation has logged so far

    def history(self):
        """The training window the baselines learn from, read once (only if a baseline is fitted)."""
        if self._history is None:
            self._history = training_history(self.dm)
        return self._history


def _read_baseline_run(
    store: tracking.Store, run_id: str, split: str, ranking: str, downloads: Path
) -> RankingScores | None:
    """A baseline run's scores: its full metrics (``eval/<split>_metrics.json``) and hit flags
    (``eval/<split>_hits.npz``), downloaded under ``downloads``; None when either is missing."""
    metrics = tracking.read_json_artifact(
        store, run_id, f"{EVAL_ARTIFACT_DIR}/{split}_metrics.json", downloads
    )
    if metrics is None:
        return None
    hits = load_hits(
        tracking.download_artifact(
            store, run_id, f"{EVAL_ARTIFACT_DIR}/{HITS_FILE.format(split=split)}", downloads
        )
    )
    if any(ranking not in h.rankings for h in hits.values()):
        return None
    return RankingScores(metrics, {task: (h.query, h.rankings[ranking]) for task, h in hits.items()})


def _log_eval_artifacts(run: tracking.TrackedRun, split: str, metrics: Mapping[str, float], hits) -> None:
    """The full metrics as ``eval/<split>_metrics.json`` and the hit flags as ``eval/<split>_hits.npz``."""
    metrics_json = json.dumps(metrics, indent=2, sort_keys=True)
    tracking.log_text(run, metrics_json, f"{EVAL_ARTIFACT_DIR}/{split}_metrics.json")
    tracking.log_arrays(run, hits_arrays(hits), f"{EVAL_ARTIFACT_DIR}/{HITS_FILE.format(split=split)}")


def _score_and_log_baseline(ctx: BaselineContext, name: str, key: str) -> tuple[RankingScores, str] | None:
    """Score baseline ``name`` and log it as a run of its own (``kind=baseline``); returns the scores
    and the run id, or None when the baseline refuses the data (no run is created then)."""
    cfg, ranking = ctx.cfg, f"{BASELINE_PREFIX}{name}"
    with progress.step(f"Scoring baseline {name}"):
        scores = _unless_refused(
            name, functools.partial(score_baseline, name, ctx.dm, ctx.history, ctx.queries, ctx.tasks, cfg)
        )
    if scores is None:
        return None
    data_name = Path(str(ctx.train_cfg.data.dir)).name
    with tracking.baseline_run(ctx.store, name, key, data_name, str(cfg.split), {"data": data_name}) as run:
        tracking.log_dataset(run, ctx.train_cfg.data.dir, ctx.profile, "evaluation")
        tracking.log_metrics(run, logged_metrics(scores.metrics, str(cfg.split), ranking))
        hits = collect_hits({ranking: scores}, query_users(ctx.queries), list(cfg.ks))
        _log_eval_artifacts(run, str(cfg.split), scores.metrics, hits)
    ctx.logged.append(f"baseline run {run.run_id} ({name})")
    return scores, run.run_id


def baselines_for(
    ctx: BaselineContext, cache: MutableMapping[str, RankingScores] | None
) -> tuple[dict[str, RankingScores], list[str]]:
    """Every baseline of ``ctx.cfg.baselines``, keyed by ranking name, and the ids of their runs.

    Each comes from ``cache`` (this process), else from the newest finished baseline run with the same
    :func:`baseline_key` (``reuse_baseline_runs``), else it is scored and logged as a new baseline run.
    """
    scores: dict[str, RankingScores] = {}
    run_ids: list[str] = []
    with shared_ease_weights():  # ease and ease_popularity invert the same Gram matrix once
        for name in ctx.cfg.baselines:
            _baseline_for(ctx, name, cache, scores, run_ids)
    return scores, run_ids


def _baseline_for(
    ctx: BaselineContext,
    name: str,
    cache: MutableMapping[str, RankingScores] | None,
    scores: dict[str, RankingScores],
    run_ids: list[str],
) -> None:
    """One baseline of :func:`baselines_for`, added to ``scores`` (and its run to ``run_ids``)."""
    key, ranking = (
        baseline_key(ctx.digest, ctx.train_cfg, ctx.tasks, ctx.cfg, name),
        f"{BASELINE_PREFIX}{name}",
    )
    found = cache.get(key) if cache is not None else None
    run_id = tracking.find_baseline_run(ctx.store, key) if ctx.cfg.get("reuse_baseline_runs", True) else None
    if found is None and run_id is not None:
        with progress.step(f"Reading baseline {name} from run {run_id}"):
            found = _read_baseline_run(ctx.store, run_id, str(ctx.cfg.split), ranking, ctx.downloads)
    if found is None:
        logged = _score_and_log_baseline(ctx, name, key)
        if logged is None:  # refused the data: skipped with a warning
            return
        found, run_id = logged
    if cache is not None:
        cache[key] = found
    scores[ranking] = found
    if run_id:
        run_ids.append(run_id)


def evaluate(
    composed: Composed,
    run: str,
    baseline_cache: MutableMapping[str, RankingScores] | None = None,
    data_cache=None,
) -> EvalResult:
    """:func:`evaluate_run`; Ctrl-C stops it with a message saying what it had logged (exit 130)."""
    logged: list[str] = []
    try:
        with workdir.command_dir("eval") as downloads:  # removed however the evaluation ends
            return evaluate_run(composed, run, baseline_cache, data_cache, logged, downloads=downloads)
    except KeyboardInterrupt:
        raise RunInterruptedError(
            signal.SIGINT,
            f"Evaluation interrupted (Ctrl-C); it had logged: {'; '.join(logged) or 'nothing'}. The "
            "evaluated run keeps its training figures; run the same `convcg eval` again (baseline "
            "runs already finished are reused).",
        ) from None


def evaluate_run(
    composed: Composed,
    run: str,
    baseline_cache: MutableMapping[str, RankingScores] | None = None,
    data_cache=None,
    logged: list[str] | None = None,
    *,
    downloads: Path,
) -> EvalResult:
    """Rebuild the run's model from its saved config and checkpoint, score ``split``, log the model's
    metrics, the data as a dataset input, a recall@K figure and the per-positive hit flags of every
    ranking (``eval/<split>_hits.npz``) into the run. Baselines are runs of their own
    (:func:`baselines_for`); the returned metrics hold theirs too, as ``<split>/baseline_<name>/...``.

    Args:
        composed: the composed ``eval`` config.
        run: an MLflow run id, or ``latest``.
        baseline_cache: optional dict shared across calls (``convcg ablate``): baselines do not depend
            on the trained model, so runs on the same data and evaluation options reuse their scores.
        data_cache: optional :class:`~convcg_cli.data.loading.PreparedDataCache` shared across calls
            (``convcg ablate``): the data set up for the run's training are reused, not read again.
        logged: what has been logged so far is appended to it (for a message if it is interrupted).
        downloads: the directory the run's artifacts are downloaded into (the command's own).
    """
    logged = [] if logged is None else logged
    cfg = composed.cfg
    if cfg.split not in SPLITS:
        raise ConfigError(f"split={cfg.split!r} is not one of {list(SPLITS)}.")
    unknown = [b for b in cfg.baselines if b not in BASELINES]
    if unknown:
        raise ConfigError(f"Unknown baseline(s) {unknown}; known: {sorted(BASELINES)}.")
    store = tracking.Store.from_config(cfg.logger)
    run_id = tracking.resolve_run(store, run)
    # Read and checked before the baselines: a damaged checkpoint fails fast, with no run logged.
    name = f"The checkpoint artifact '{tracking.CHECKPOINT_ARTIFACT}' of run {run_id}"
    checkpoint = read_checkpoint(tracking.download_checkpoint(store, run_id, downloads), name)
    check_finite_weights(checkpoint, name)
    train_cfg = tracking.load_run_config(store, run_id, downloads)
    if cfg.data_dir:
        train_cfg.data.dir = str(cfg.data_dir)
    own_data = tracking.check_training_data(
        store, run_id, train_cfg.data.dir, cfg.get("allow_other_data", False)
    )
    tasks = list(train_cfg.loss.task_weights.keys())
    if train_cfg.data.get("train_through_val", False):
        check_refit_evaluation(cfg, run_id)
    with progress.step(f"Loading and checking {train_cfg.data.dir}"):
        # No training examples needed (stage): a cached set-up of the training's data has them anyway.
        dm = build_datamodule(train_cfg, tasks, stage="validate", data_cache=data_cache)
    queries = dm.queries[cfg.split]
    _check_has_conversions(dm, cfg.split)
    trained = tracking.existing_run(store, run_id)
    profile = tracking.dataset_profile(dm.n_rows, dm.split_days)
    digest = tracking.log_dataset(trained, train_cfg.data.dir, profile, "evaluation", tag=own_data)
    logged.append(f"the evaluation data as a dataset input of run {run_id}")

    # Baselines first: a bad baseline option fails fast (one that refuses the corpus is skipped).
    context = BaselineContext(
        store, dm, queries, tasks, cfg, train_cfg, digest, profile, downloads, logged=logged
    )
    baselines, baseline_runs = baselines_for(context, baseline_cache) if cfg.baselines else ({}, [])

    model = load_trained_model(train_cfg, dm, checkpoint, run_id)
    with progress.step(f"Embedding {len(queries.surface):,} {cfg.split} queries and the items"):
        query_emb, item_emb = embed_split(model, dm, cfg.split), model.embed_items(dm.item_features)
    metrics: dict[str, float] = {}
    blend = served_blend(store, run_id, model, dm, cfg.popularity_prior)
    if blend is not None:
        query_emb, item_emb = with_bias(query_emb, item_emb, blend.bias)
        metrics[f"{cfg.split}/{PRIOR_WEIGHT_METRIC}"] = blend.beta
        metrics[f"{cfg.split}/{FALLBACK_WEIGHT_METRIC}"] = blend.gamma
    with progress.step(f"Searching the top {max(cfg.ks)} items"):
        _, topk = ExactIndex(item_emb).search(query_emb, max(cfg.ks))  # the served model's search
    with progress.step("Scoring the model (recall, bootstrap CIs)"):
        rankings = {**baselines, MODEL_RANKING: score_ranking(topk, queries, cfg.split, tasks, cfg)}
    metrics.update(rankings[MODEL_RANKING].metrics)
    hits = collect_hits(rankings, query_users(queries), list(cfg.ks))
    everything = {m: v for scores in baselines.values() for m, v in scores.metrics.items()} | metrics

    with progress.step("Logging to MLflow"):
        logged.append(f"(some of) run {run_id}'s {cfg.split} metrics and eval/ artifacts")
        tracking.log_metrics(trained, logged_metrics(metrics, str(cfg.split)))
        if baseline_runs:
            tracking.set_tags(trained, {BASELINE_RUNS_TAG: ",".join(baseline_runs)})
        _log_eval_artifacts(trained, str(cfg.split), everything, hits)
        figure = recall_figure(everything, str(cfg.split), tasks, list(cfg.ks), list(rankings))
        tracking.log_figure(trained, figure, f"{EVAL_ARTIFACT_DIR}/{cfg.split}_recall.png")
    return EvalResult(run_id, cfg.split, everything, hits, n_queries=len(queries.surface))


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
