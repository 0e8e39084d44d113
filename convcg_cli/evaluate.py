"""``evaluate(composed, run) -> EvalResult``: held-out recall of a trained run, logged into that run."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from convcg_cli import tracking
from convcg_cli.config import Composed
from convcg_cli.errors import ConfigError, ConvcgError
from convcg_cli.tasks import PRIMARY_TASK

SPLITS = ("val", "heldout")
BASELINES = ("popularity",)
EVAL_ARTIFACT_DIR = "eval"


@dataclass(frozen=True)
class EvalResult:
    """Metrics of one evaluation, keyed by metric name (e.g. ``heldout/conversion/recall_at_100``)."""

    run_id: str
    split: str
    metrics: dict[str, float]


def embed_split(model, dm, split: str) -> np.ndarray:
    """Served query embeddings of every query of ``split``, in query order."""
    import torch

    parts = [model.embed_queries(batch["user"]).float().cpu() for batch in dm.query_loader(split)]
    return torch.cat(parts).numpy() if parts else np.zeros((0, 1), dtype=np.float32)


def evaluate(composed: Composed, run: str) -> EvalResult:
    """Rebuild the run's model from its saved config and checkpoint, score ``split``, log the metrics."""
    import torch

    from convcg_cli.data.features import popularity_scores
    from convcg_cli.metrics.suite import popularity_report, recall_report
    from convcg_cli.train import build_datamodule, build_model

    cfg = composed.cfg
    if cfg.split not in SPLITS:
        raise ConfigError(f"split={cfg.split!r} is not one of {list(SPLITS)}.")
    unknown = [b for b in cfg.baselines if b not in BASELINES]
    if unknown:
        raise ConfigError(f"Unknown baseline(s) {unknown}; known: {list(BASELINES)}.")
    run_id = tracking.resolve_run(cfg.logger, run)
    train_cfg = tracking.load_run_config(cfg.logger, run_id)
    if cfg.data_dir:
        train_cfg.data.dir = str(cfg.data_dir)
    tasks = list(train_cfg.loss.task_weights.keys())
    dm = build_datamodule(train_cfg, tasks)
    queries = dm.queries[cfg.split]
    if len(queries.positives[PRIMARY_TASK][0]) == 0:
        lo, hi = queries.days
        raise ConvcgError(
            f"The {cfg.split} split of {dm.dir}/impressions.parquet (days {lo}..{hi} since 1970-01-01, "
            f"{dm.n_rows[cfg.split]} impressions) has 0 conversions (converted = true); expected at "
            "least one held-out conversion to measure recall. Use more days (data.heldout_days) "
            "or other logs."
        )

    model = build_model(train_cfg, dm)
    state = torch.load(
        tracking.download_checkpoint(cfg.logger, run_id), map_location="cpu", weights_only=False
    )
    model.load_state_dict(state["state_dict"])
    model.eval()

    ks = list(cfg.ks)
    query_emb = embed_split(model, dm, cfg.split)
    item_emb = model.embed_items(dm.item_features)
    metrics = recall_report(query_emb, item_emb, queries, ks, cfg.split, tasks, by_surface=cfg.by_surface)
    if "popularity" in cfg.baselines:
        metrics.update(
            popularity_report(
                popularity_scores(dm.items),
                queries,
                ks,
                f"{cfg.split}/baseline_popularity",
                tasks,
                cfg.by_surface,
            )
        )
    mlflow_client = tracking.client(cfg.logger)
    tracking.log_metrics(mlflow_client, run_id, metrics)
    tracking.log_text(
        mlflow_client,
        run_id,
        json.dumps(metrics, indent=2, sort_keys=True),
        f"{EVAL_ARTIFACT_DIR}/{cfg.split}_metrics.json",
    )
    return EvalResult(run_id, cfg.split, metrics)
