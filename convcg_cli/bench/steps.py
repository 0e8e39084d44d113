"""The measured steps. Each runs in its own subprocess (``python -m convcg_cli.bench step NAME ...``,
started by ``runner``), so the peak memory it reports is its own; each returns a dict of figures.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from convcg_cli.bench.measure import (
    Clock,
    blocked_gemm_seconds,
    exact_tile,
    peak_rss_mib,
    time_data_path,
    topk_overlap,
    torch_topk,
)
from convcg_cli.bench.training import (
    bare_loop,
    measure_first_step,
    setup_model,
    train_config,
    train_overrides,
)


def quiet() -> None:
    """Keep library chatter and the warnings convcg train also silences out of a step's log."""
    from convcg_cli import tracking

    tracking.quiet()
    # Expected here (see train.py): batches come from an in-process IterableDataset of known length.
    warnings.filterwarnings("ignore", message=".*IterableDataset.*has `__len__` defined")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*is deprecated")


def _synth_config(cfg: DictConfig, factor: float, days: bool = False):
    """The preset's SynthConfig with users, items, advertisers and impressions scaled by ``factor``;
    with ``days``, days and impressions instead (a longer log of the same corpus and daily traffic)."""
    from convcg_cli.data.importing import synth

    base = synth.resolve_config(str(cfg.preset))
    if days:
        return dataclasses.replace(
            base,
            n_days=max(1, round(base.n_days * factor)),
            n_impressions=max(1, round(base.n_impressions * factor)),
        )
    return dataclasses.replace(
        base,
        n_users=max(1, round(base.n_users * factor)),
        n_items=max(base.n_categories, round(base.n_items * factor)),
        n_advertisers=max(1, round(base.n_advertisers * factor)),
        n_impressions=max(1, round(base.n_impressions * factor)),
    )


def step_baseline(cfg: DictConfig, workdir: str) -> dict:
    """Peak memory of the imports alone: of the synth step's libraries, then of every step's."""
    from convcg_cli.data.importing import synth  # noqa: F401  (polars, numpy)

    synth_mib = peak_rss_mib()
    import faiss  # noqa: F401
    import lightning  # noqa: F401
    import torch  # noqa: F401

    from convcg_cli import tracking, train  # noqa: F401

    tracking.import_mlflow()

    return {"synth_mib": synth_mib, "train_mib": peak_rss_mib()}


def step_synth(
    cfg: DictConfig, workdir: str, factor: float, out_dir: str, reuse: bool, days: bool = False
) -> dict:
    """Generate and write the scaled preset; with ``reuse``, keep ``out_dir`` if it holds the same logs."""
    from convcg_cli.data.contract import METADATA_FILE
    from convcg_cli.data.importing import synth

    config = _synth_config(cfg, factor, days)
    wanted = json.loads(json.dumps(dataclasses.asdict(config)))
    meta = Path(out_dir) / METADATA_FILE
    if reuse and meta.exists():
        info = json.loads(meta.read_text())
        if info.get("config") == wanted and info.get("seed") == cfg.seed:
            return {"reused": True, "seconds": 0.0, "impressions": config.n_impressions}
    start = time.perf_counter()
    synth.synthesize(config, out_dir, seed=cfg.seed)
    return {"reused": False, "seconds": time.perf_counter() - start, "impressions": config.n_impressions}


def lightning_loop(train_cfg: DictConfig, model, dm, logger, warmup: int, batches: int, root: str):
    """``(Clock of the timed steps, seconds of the whole fit)`` of ``trainer.fit`` with convcg train's
    trainer config and logger on ``warmup + batches + 1`` batches, no validation, no checkpoint."""
    import lightning as L

    from convcg_cli.config import instantiate

    clock = Clock()

    class Ticks(L.Callback):
        """Ticks the clock when a timed batch is in hand, as the bare loop does."""

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: D102
            if batch_idx >= warmup:
                clock.tick()

    trainer = instantiate(
        train_cfg.trainer,
        logger=logger,
        callbacks=[Ticks()],
        max_epochs=1,
        limit_train_batches=warmup + batches + 1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        default_root_dir=root,
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    return clock, time.perf_counter() - start


def flops_figures(flops: int, matmuls: list, rounds: list[dict]) -> dict:
    """Each path's achieved GFLOP/s (``flops`` over its median step time) and the bare GEMM loop's
    (timed in every round, ``gemm_ms``); ``<path>_vs_gemm`` is the median of the per-round ratios,
    which a burst of load in one round cannot swing."""
    gemm_flops = sum(m.flops for m in matmuls)
    gemm_ms = float(np.median([r["gemm_ms"] for r in rounds]))
    out = {
        "step_gflop": flops / 1e9,
        "matmul_gflop": gemm_flops / 1e9,
        "matmuls": len(matmuls),
        "gemm_ms": gemm_ms,
        "gemm_gflops_per_s": gemm_flops / gemm_ms / 1e6,
    }
    for path in ("bare", "lightning"):
        step_ms = [r[f"{path}_step_ms_median"] for r in rounds]
        per_round = [
            (flops / ms) / (gemm_flops / r["gemm_ms"]) for ms, r in zip(step_ms, rounds, strict=True)
        ]
        out[f"{path}_gflops_per_s"] = flops / float(np.median(step_ms)) / 1e6
        out[f"{path}_vs_gemm"] = float(np.median(per_round))
    return out


def step_data(cfg: DictConfig, workdir: str, data_dir: str) -> dict:
    """Datamodule setup time and the training data path's batches/s."""
    dm, _, setup_s = setup_model(train_config(cfg, data_dir, workdir))
    seconds, n = time_data_path(dm, int(cfg.data_path.batches))
    return {
        "setup_s": setup_s,
        "batch_size": dm.batch_size,
        "train_examples": dm.train_set.n_examples,
        "batches_per_epoch": len(dm.train_set),
        "data_batches_per_s": n / seconds,
    }


def step_train(cfg: DictConfig, workdir: str, data_dir: str) -> dict:
    """Lightning vs bare loop (and the data path), in rounds; then embeddings for ``retrieval``.

    Rounds alternate the order of the two paths (bare first, then Lightning first, ...) so that a
    slow-down of the machine hits both alike; the verdict is the median of the per-round ratios,
    which a burst of load in one round cannot swing.
    """
    from convcg_cli import tracking
    from convcg_cli.bench.flops import gemm_seconds, step_flops

    train_cfg = train_config(cfg, data_dir, workdir)
    dm, model, setup_s = setup_model(train_cfg)
    t = cfg.throughput
    warmup, n = int(t.warmup), int(t.batches)
    clip = train_cfg.trainer.get("gradient_clip_val")
    flops, matmuls = measure_first_step(model, dm, step_flops)
    rounds = []
    # The run and logger convcg train uses (in a throwaway store), so logging costs what it costs.
    with tracking.tracked_run(tracking.Store.from_config(train_cfg.logger), train_cfg, {}, []) as run:
        for r in range(int(t.rounds)):
            dm.train_set.epoch = 0  # the same batches for every path and round
            data_s, data_n = time_data_path(dm, int(cfg.data_path.batches))
            clocks: dict[str, Clock] = {}
            for path in ("bare", "lightning") if r % 2 == 0 else ("lightning", "bare"):
                dm.train_set.epoch = 0
                if path == "bare":
                    clocks[path] = bare_loop(model, dm, warmup, n, clip)
                else:
                    clocks[path], fit_s = lightning_loop(train_cfg, model, dm, run.logger, warmup, n, workdir)
            bare, light = clocks["bare"], clocks["lightning"]
            gemm_s = gemm_seconds(matmuls, int(t.gemm_repeats))  # the step's matrix products, bare
            rounds.append(
                {
                    "bare_s": bare.seconds,
                    "lightning_s": light.seconds,
                    "bare_cpu_s": bare.cpu_seconds,
                    "lightning_cpu_s": light.cpu_seconds,
                    "bare_step_ms_median": 1e3 * float(np.median(bare.step_seconds)),
                    "lightning_step_ms_median": 1e3 * float(np.median(light.step_seconds)),
                    "ratio": bare.seconds / light.seconds,
                    "fit_overhead_s": fit_s - light.seconds,
                    "data_s": data_s,
                    "data_n": data_n,
                    "gemm_ms": 1e3 * gemm_s,
                }
            )
    b = dm.batch_size
    total = {k: sum(r[k] for r in rounds) for k in ("bare_s", "lightning_s", "bare_cpu_s", "lightning_cpu_s")}
    data_rate = sum(r["data_n"] for r in rounds) / sum(r["data_s"] for r in rounds)
    model_rate = n * len(rounds) / total["lightning_s"]  # batches/s the Lightning path consumes
    _save_embeddings(cfg, dm, model, Path(workdir) / "embeddings.npz")
    return {
        "flops": flops_figures(flops, matmuls, rounds),
        "setup_s": setup_s,
        "batch_size": b,
        "batches": n,
        "warmup": warmup,
        "rounds": rounds,
        "bare_examples_per_s": n * len(rounds) * b / total["bare_s"],
        "lightning_examples_per_s": n * len(rounds) * b / total["lightning_s"],
        "lightning_vs_bare": float(np.median([r["ratio"] for r in rounds])),
        "lightning_vs_bare_pooled": total["bare_s"] / total["lightning_s"],
        "lightning_vs_bare_cpu": total["bare_cpu_s"] / total["lightning_cpu_s"],
        "fit_overhead_s": float(np.mean([r["fit_overhead_s"] for r in rounds])),
        "data_batches_per_s": data_rate,
        "model_batches_per_s": model_rate,
        "data_vs_model": data_rate / model_rate,
        "trainer": {k: str(v) for k, v in train_cfg.trainer.items() if k != "_target_"},
    }


def _save_embeddings(cfg: DictConfig, dm, model, path: Path) -> None:
    """Served item embeddings, the first ``retrieval.max_queries`` validation queries' embeddings and
    their positives per task, for the retrieval step."""
    import torch

    model.eval()
    queries = dm.queries["val"]
    q = int(cfg.retrieval.max_queries)
    features = {k: torch.from_numpy(np.ascontiguousarray(v[:q])) for k, v in queries.features.items()}
    n_q = len(next(iter(features.values())))
    step = int(dm.eval_batch_size)
    query_emb = torch.cat(
        [model.embed_queries({k: v[s : s + step] for k, v in features.items()}) for s in range(0, n_q, step)]
    )
    positives = {}
    for task, (qi, item) in queries.positives.items():
        keep = qi < n_q
        positives[f"{task}_query"], positives[f"{task}_item"] = qi[keep], item[keep]
    np.savez(path, queries=query_emb.float().numpy(), items=model.embed_items(dm.item_features), **positives)


def step_retrieval(cfg: DictConfig, workdir: str) -> dict:
    """Exact top-k (``exact_topk``) vs the faiss path it replaced vs torch vs the bare GEMM of its
    shapes vs the configured ANN index, same sizes; the searches interleaved round by round."""
    from convcg_cli.config import instantiate
    from convcg_cli.index import exact_topk
    from convcg_cli.index.exact import faiss_exact_topk
    from convcg_cli.metrics.retrieval import recall_at_k

    saved = np.load(Path(workdir) / "embeddings.npz")
    queries, items = saved["queries"], saved["items"]
    k = min(int(cfg.retrieval.k), len(items))
    exact_topk(queries[:8], items, k)  # warm-up: first-call costs (thread pools, lazy imports) are not search
    torch_topk(queries[:8], items, k)
    rounds = []
    for _ in range(int(cfg.retrieval.repeats)):  # interleaved, so drift hits every path alike
        start = time.perf_counter()
        _, exact = exact_topk(queries, items, k)
        exact_s = time.perf_counter() - start
        start = time.perf_counter()
        faiss_exact_topk(queries, items, k)
        faiss_s = time.perf_counter() - start
        start = time.perf_counter()
        torch_topk(queries, items, k)
        torch_s = time.perf_counter() - start
        rounds.append({"exact_s": exact_s, "faiss_s": faiss_s, "torch_s": torch_s})
        rounds[-1]["gemm_s"] = blocked_gemm_seconds(queries, items)
    ann = instantiate(cfg.retrieval.ann_options[cfg.retrieval.ann])
    start = time.perf_counter()
    ann.build(items)
    build_s = time.perf_counter() - start

    def recall(ids: np.ndarray) -> dict[str, float]:
        out = {}
        for task in ("conversion", "engagement"):
            qi, item = saved[f"{task}_query"], saved[f"{task}_item"]
            if len(qi):
                out[task] = recall_at_k(ids, qi, item, [k])[k]
        return out

    fastest = {name: min(r[name] for r in rounds) for name in ("exact_s", "faiss_s", "torch_s", "gemm_s")}
    runs = []
    for effort in ann.efforts:  # the speed / overlap trade-off along the index's search knob
        start = time.perf_counter()
        approx = ann.search(queries, k, effort)
        seconds = time.perf_counter() - start
        runs.append(
            {
                "effort": effort,
                "search_s": seconds,
                "speedup": fastest["exact_s"] / seconds,
                "overlap": topk_overlap(approx, exact),
                "recall": recall(approx),
            }
        )
    return {
        "queries": len(queries),
        "items": len(items),
        "dim": items.shape[1],
        "k": k,
        **fastest,
        "gflop": 2 * len(queries) * len(items) * items.shape[1] / 1e9,
        # The verdict: the median of the per-round ratios, which a burst of load cannot swing.
        "exact_vs_gemm": float(np.median([r["gemm_s"] / r["exact_s"] for r in rounds])),
        "tile": list(exact_tile(len(queries), len(items))),
        "exact_recall": recall(exact),
        "ann": ann.description,
        "ann_effort_name": ann.effort_name,
        "ann_build_s": build_s,
        "ann_runs": runs,
    }


def step_scale(cfg: DictConfig, workdir: str, data_dir: str) -> dict:
    """At one size: setup, ms per training step (bare loop) and exact top-k of a fixed query count."""
    from convcg_cli.index import exact_topk

    train_cfg = train_config(cfg, data_dir, workdir)
    dm, model, setup_s = setup_model(train_cfg)
    s = cfg.scale
    clip = train_cfg.trainer.get("gradient_clip_val")
    # Medians and minima: a burst of load from another process must not bend the growth curve.
    clock = bare_loop(model, dm, int(s.warmup), int(s.steps), clip)
    model.eval()
    items = model.embed_items(dm.item_features)
    rng = np.random.default_rng(cfg.seed)
    queries = rng.standard_normal((int(s.queries), items.shape[1])).astype(np.float32)
    topk_s = []
    for _ in range(int(s.repeats)):
        start = time.perf_counter()
        exact_topk(queries, items, min(int(cfg.retrieval.k), len(items)))
        topk_s.append(time.perf_counter() - start)
    return {
        "setup_s": setup_s,
        "train_examples": dm.train_set.n_examples,
        "items": len(items),
        "params": sum(p.numel() for p in model.parameters()),
        "step_ms": 1e3 * float(np.median(clock.step_seconds)),
        "step_cpu_ms": 1e3 * float(np.median(np.diff(clock.cpu))),
        "topk_s": min(topk_s),
    }


def step_memory(cfg: DictConfig, workdir: str, data_dir: str, streamed: bool) -> dict:
    """Set up the data (in memory, or streamed into shards) and take training steps: the peak memory of
    a training process on these logs. The shards go to a fresh directory, so they are written here."""
    m = cfg.memory
    cache = Path(workdir) / f"shards-{Path(data_dir).name}"
    shutil.rmtree(cache, ignore_errors=True)
    overrides = ["data/stream=streamed", f"data.stream.chunk_rows={int(m.chunk_rows)}"] if streamed else []
    from convcg_cli.config import compose

    train_cfg = compose("train", [*train_overrides(cfg, data_dir, workdir), *overrides]).cfg
    if streamed:
        train_cfg.data.stream.cache_dir = str(cache)
    dm, model, setup_s = setup_model(train_cfg)
    setup_mib = peak_rss_mib()
    clock = bare_loop(model, dm, int(m.warmup), int(m.steps), train_cfg.trainer.get("gradient_clip_val"))
    out = {
        "streamed": streamed,
        "setup_s": setup_s,
        "setup_mib": setup_mib,
        "train_examples": dm.train_set.n_examples,
        "train_rows": dm.n_rows["train"],
        "step_ms": 1e3 * float(np.median(clock.step_seconds)),
        "shards": len(dm.train_set.index.files) if streamed else 0,
    }
    shutil.rmtree(cache, ignore_errors=True)
    return out


def step_serve(cfg: DictConfig, workdir: str, data_dir: str) -> dict:
    """(g) the served model (``convcg_cli.bench.serving``)."""
    from convcg_cli.bench.serving import step_serve as measure_serving

    return measure_serving(cfg, workdir, data_dir)


def step_corpus(cfg: DictConfig, workdir: str, items: int) -> dict:
    """(j) exact and approximate search at one corpus size (``convcg_cli.bench.corpus``)."""
    from convcg_cli.bench.corpus import step_corpus as measure_corpus

    return measure_corpus(cfg, workdir, items)


def step_eval(cfg: DictConfig, workdir: str, data_dir: str, preset: str | None = None) -> dict:
    """(h) Where ``convcg eval``'s time goes: a run of the default design trained briefly on
    ``data_dir`` (synthesised from ``preset`` first when given), then evaluated as ``convcg eval``
    does (baselines, bootstrap CIs, logging), every step it shows timed:

    * twice in fresh processes (:func:`step_eval_once`), as two ``convcg eval`` commands run: the
      first on these data (its baselines scored and logged as runs), then the next (their runs
      reused; the bootstrap draws and compiled kernels loaded again, as a new process does);
    * then twice in this process, as the cells of a grid are: the first scoring its baselines again
      (``reuse_baseline_runs=false``), the next reusing their runs and the first's bootstrap draws.

    The reference is the bare ``exact_topk`` of as many random queries over as many items, in this
    process."""
    import numpy as np

    from convcg_cli import progress
    from convcg_cli.bench.runner import _run_step
    from convcg_cli.config import compose
    from convcg_cli.data.importing import synth
    from convcg_cli.evaluate import evaluate
    from convcg_cli.index import exact_topk
    from convcg_cli.train import train

    e = cfg.eval_breakdown
    if preset is not None:
        synth.synthesize(synth.resolve_config(preset), data_dir, seed=cfg.seed)
    overrides = train_overrides(cfg, data_dir, workdir)
    trained_cfg = compose(
        "train", [*overrides, "trainer.max_epochs=1", f"+trainer.limit_train_batches={int(e.train_batches)}"]
    )
    trained = train(trained_cfg)
    store = [o for o in overrides if o.startswith("logger.")]
    eval_overrides = [*store, f"baselines={list(e.baselines)}", f"bootstrap.n_boot={int(e.n_boot)}"]
    env = dict(os.environ)  # the runner's thread limits
    if not (Path(workdir) / "bench.yaml").is_file():  # the children read the config the runner saved
        OmegaConf.save(cfg, Path(workdir) / "bench.yaml")
    processes = {
        which: _run_step(
            "eval_once",
            f"{Path(data_dir).name}-eval-{which}",
            Path(workdir),
            env,
            run_id=trained.run_id,
            overrides=eval_overrides,
        )
        for which in ("first", "next")
    }
    # In this process, as a grid's cells: the first scores its baselines again, the next reuses them.
    in_process = {}
    for which, extra in (("first", ["reuse_baseline_runs=false"]), ("next", [])):
        eval_cfg = compose("eval", [*eval_overrides, *extra])
        start = time.perf_counter()
        with progress.recorded() as steps:
            result = evaluate(eval_cfg, trained.run_id)
        in_process[which] = {
            "total_s": time.perf_counter() - start,
            "steps": [{"step": name, "seconds": seconds} for name, seconds in steps],
        }
    n_queries = result.n_queries
    items = _items_in(data_dir)
    rng = np.random.default_rng(cfg.seed)
    dim = int(trained_cfg.cfg.model.embedding_dim)
    queries = rng.standard_normal((n_queries, dim)).astype(np.float32)
    corpus = rng.standard_normal((items, dim)).astype(np.float32)
    k = min(max(int(x) for x in eval_cfg.cfg.ks), items)
    reference = time.perf_counter()
    exact_topk(queries, corpus, k)
    exact_s = time.perf_counter() - reference
    first, again = processes["first"], processes["next"]
    return {
        "data": Path(data_dir).name,
        "items": items,
        "queries": n_queries,
        "k": k,
        "total_s": first["total_s"],
        "steps": first["steps"],
        "total_again_s": again["total_s"],
        "steps_again": again["steps"],
        "first_process_s": first["interpreter_s"],
        "next_process_s": again["interpreter_s"],
        "in_process": in_process,
        "exact_topk_s": exact_s,
    }


def step_eval_once(cfg: DictConfig, workdir: str, run_id: str, overrides: list[str]) -> dict:
    """One ``convcg eval`` of run ``run_id`` with ``overrides`` in this (fresh) process: the eval
    config composed, then :func:`~convcg_cli.evaluate.evaluate` timed step by step (as the in-process
    runs of :func:`step_eval`; the runner times the whole process)."""
    from convcg_cli import progress
    from convcg_cli.config import compose
    from convcg_cli.evaluate import evaluate

    eval_cfg = compose("eval", list(overrides))
    start = time.perf_counter()
    with progress.recorded() as steps:
        evaluate(eval_cfg, run_id)
    return {
        "total_s": time.perf_counter() - start,
        "steps": [{"step": name, "seconds": seconds} for name, seconds in steps],
    }


def step_grid(cfg: DictConfig, workdir: str, case: str) -> dict:
    """(i) a reduced grid's time per phase, data set up per cell vs once (``convcg_cli.bench.grid``)."""
    from convcg_cli.bench.grid import step_grid as time_grid

    return time_grid(cfg, workdir, case)


def _items_in(data_dir: str) -> int:
    import polars as pl

    return int(pl.scan_parquet(Path(data_dir) / "items.parquet").select(pl.len()).collect().item())


STEPS: dict[str, Callable[..., dict]] = {
    "baseline": step_baseline,
    "synth": step_synth,
    "data": step_data,
    "train": step_train,
    "retrieval": step_retrieval,
    "serve": step_serve,
    "corpus": step_corpus,
    "scale": step_scale,
    "memory": step_memory,
    "eval": step_eval,
    "eval_once": step_eval_once,
    "grid": step_grid,
}
