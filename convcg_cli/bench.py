"""Speed and scale, measured: ``make bench`` (``python -m convcg_cli.bench run [--quick] [OVERRIDES]``).

Every figure comes from one command on the machine at hand and goes to ``reports/bench/bench.md``
and to an MLflow run (experiment ``convcg-bench``; the report and the raw figures as artifacts).
Settings live in ``conf/bench.yaml``; the model, data and trainer under test are ``conf/train.yaml``'s.

Each step runs in its own subprocess, so the peak resident memory (``VmHWM``) it reports is its own.
Figures that are compared with each other are measured in *one* process, interleaved round by round,
because a shared machine's speed drifts: Lightning vs a bare loop, the data path vs the model,
faiss vs torch vs an ANN index.

Steps:
    synth      generate (or reuse) the synthetic logs of the preset
    data       datamodule setup; batches/s of the training data path alone
    train      ``trainer.fit`` (convcg train's trainer, logger included) vs a bare PyTorch loop over
               the same model, optimizer, clipping and batches; the data path again, for its ratio
               to model consumption; saves embeddings for ``retrieval``
    retrieval  exact top-k (``exact_topk``, faiss) vs torch matmul + topk vs an ANN index (config)
    scale      synthesis, setup, a training step and exact top-k at several sizes; log-log slopes
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import numpy as np
import typer
from omegaconf import DictConfig, OmegaConf

# Metric names of the targets the issue sets (also used in the report's verdicts).
LIGHTNING_VS_BARE = "bench/train/lightning_vs_bare"
DATA_VS_MODEL = "bench/data/data_vs_model"
TARGETS = {LIGHTNING_VS_BARE: 0.9, DATA_VS_MODEL: 5.0}
MIB = 1024 * 1024


# --------------------------------------------------------------------------------------------------
# Measuring helpers (pure, small; tested in tests/test_bench.py)
# --------------------------------------------------------------------------------------------------


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (``VmHWM`` of /proc/self/status), in MiB."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def growth_exponent(sizes: Sequence[float], costs: Sequence[float]) -> float:
    """Slope of log(cost) against log(size): cost ~ size ** exponent (least squares, >= 2 points).

    Example:
        >>> round(growth_exponent([1, 2, 4], [3, 12, 48]), 6)
        2.0
    """
    x, y = np.log(np.asarray(sizes, dtype=float)), np.log(np.asarray(costs, dtype=float))
    return float(np.polyfit(x, y, 1)[0])


def topk_overlap(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean share of each row of ``exact`` (Q, k) ids that ``approx`` (Q, k) also holds (-1 = none).

    Example:
        >>> topk_overlap(np.array([[1, 2], [3, -1]]), np.array([[2, 1], [3, 4]]))
        0.75
    """
    n_rows, k = exact.shape
    if n_rows == 0 or k == 0:
        return float("nan")
    span = int(max(approx.max(initial=0), exact.max(initial=0))) + 2
    offset = (np.arange(n_rows, dtype=np.int64) * span)[:, None]  # ids of different rows never meet
    approx = np.where(approx < 0, span - 1, approx) + offset  # padding: a slot no exact id uses
    hits = np.isin(exact + offset, approx)
    return float(hits.mean())


def torch_topk(queries: np.ndarray, items: np.ndarray, k: int, max_cells: int = 1 << 26) -> np.ndarray:
    """Plain exact top-k by ``torch.topk(queries @ items.T)``, in query chunks of <= ``max_cells`` scores."""
    import torch

    item_t = torch.from_numpy(items)
    chunk = max(1, max_cells // max(1, len(items)))
    out = [
        torch.topk(torch.from_numpy(queries[s : s + chunk]) @ item_t.T, min(k, len(items))).indices
        for s in range(0, len(queries), chunk)
    ]
    return torch.cat(out).numpy()


class IVFFlat:
    """faiss inverted-file index: k-means cells, exact inner products inside the ``nprobe`` nearest.

    Args:
        nlist: number of cells (capped so that each gets >= 39 training points, as faiss wants).
        efforts: the ``nprobe`` values to search with (cells visited per query): more is closer to
            exact and slower.
    """

    effort_name = "nprobe"

    def __init__(self, nlist: int = 1024, efforts: Sequence[int] = (16, 64, 256)) -> None:
        self.nlist, self.efforts = nlist, [int(e) for e in efforts]

    def build(self, items: np.ndarray) -> None:
        """Train the cells on ``items`` (N, d) float32 and add them."""
        import faiss

        nlist = max(1, min(self.nlist, len(items) // 39))
        self.quantizer = faiss.IndexFlatIP(items.shape[1])  # kept: the index only points at it
        self.index = faiss.IndexIVFFlat(self.quantizer, items.shape[1], nlist, faiss.METRIC_INNER_PRODUCT)
        self.index.train(items)
        self.index.add(items)
        self.description = f"IVF-Flat, nlist={nlist}"

    def search(self, queries: np.ndarray, k: int, effort: int) -> np.ndarray:
        """(Q, k) item ids, best first; -1 where the probed cells hold fewer than k items."""
        self.index.nprobe = min(effort, self.index.nlist)
        return self.index.search(queries, k)[1]


class HNSW:
    """faiss HNSW graph index over inner products.

    Args:
        m: graph degree. ef_construction: build-time beam.
        efforts: the ``efSearch`` values (search beam) to search with; each is raised to at least k.
    """

    effort_name = "efSearch"

    def __init__(
        self, m: int = 32, ef_construction: int = 100, efforts: Sequence[int] = (1000, 2000)
    ) -> None:
        self.m, self.ef_construction, self.efforts = m, ef_construction, [int(e) for e in efforts]

    def build(self, items: np.ndarray) -> None:
        """Insert ``items`` (N, d) float32 into the graph."""
        import faiss

        self.index = faiss.IndexHNSWFlat(items.shape[1], self.m, faiss.METRIC_INNER_PRODUCT)
        self.index.hnsw.efConstruction = self.ef_construction
        self.index.add(items)
        self.description = f"HNSW-Flat, M={self.m}, efConstruction={self.ef_construction}"

    def search(self, queries: np.ndarray, k: int, effort: int) -> np.ndarray:
        """(Q, k) item ids, best first."""
        self.index.hnsw.efSearch = max(effort, k)
        return self.index.search(queries, k)[1]


# --------------------------------------------------------------------------------------------------
# Steps (each runs in a subprocess: `python -m convcg_cli.bench step NAME ...`)
# --------------------------------------------------------------------------------------------------


def _quiet() -> None:
    from convcg_cli import tracking

    tracking.quiet()
    # Expected here (see train.py): batches come from an in-process IterableDataset of known length.
    warnings.filterwarnings("ignore", message=".*IterableDataset.*has `__len__` defined")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*is deprecated")


def _synth_config(cfg: DictConfig, factor: float, days: bool = False):
    """The preset's SynthConfig with users, items, advertisers and impressions scaled by ``factor``;
    with ``days``, days and impressions instead (a longer log of the same corpus and daily traffic)."""
    from convcg_cli.data import synth

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
    from convcg_cli.data import synth  # noqa: F401  (polars, numpy)

    synth_mib = peak_rss_mib()
    import faiss  # noqa: F401
    import lightning  # noqa: F401
    import mlflow  # noqa: F401
    import torch  # noqa: F401

    from convcg_cli import train  # noqa: F401

    return {"synth_mib": synth_mib, "train_mib": peak_rss_mib()}


def step_synth(
    cfg: DictConfig, workdir: str, factor: float, out_dir: str, reuse: bool, days: bool = False
) -> dict:
    """Generate and write the scaled preset; with ``reuse``, keep ``out_dir`` if it holds the same logs."""
    from convcg_cli.data import synth

    config = _synth_config(cfg, factor, days)
    wanted = json.loads(json.dumps(dataclasses.asdict(config)))
    meta = Path(out_dir) / "synth.json"
    if reuse and meta.exists():
        info = json.loads(meta.read_text())
        if info.get("config") == wanted and info.get("seed") == cfg.seed:
            return {"reused": True, "seconds": 0.0, "impressions": config.n_impressions}
    start = time.perf_counter()
    synth.write_tables(synth.generate(config, seed=cfg.seed), out_dir, {"seed": cfg.seed, "config": wanted})
    return {"reused": False, "seconds": time.perf_counter() - start, "impressions": config.n_impressions}


def _train_overrides(cfg: DictConfig, data_dir: str, workdir: str) -> list[str]:
    return [
        f"data.dir={data_dir}",
        f"logger.tracking_uri=sqlite:///{workdir}/timing-mlflow.db",
        f"logger.artifact_location={workdir}/timing-artifacts",
        f"seed={cfg.seed}",
        *cfg.train_overrides,
    ]


def _train_config(cfg: DictConfig, data_dir: str, workdir: str) -> DictConfig:
    """conf/train.yaml on ``data_dir``, tracking into a throwaway store in ``workdir``."""
    from convcg_cli.config import compose

    return compose("train", _train_overrides(cfg, data_dir, workdir)).cfg


def _setup(train_cfg: DictConfig):
    """Seed, then build the datamodule (timed) and the model exactly as ``convcg train`` does."""
    import lightning as L

    from convcg_cli.tasks import check_task_names
    from convcg_cli.train import build_datamodule, build_model

    L.seed_everything(train_cfg.seed, workers=True, verbose=False)
    start = time.perf_counter()
    dm = build_datamodule(train_cfg, check_task_names(train_cfg.loss.task_weights.keys()))
    seconds = time.perf_counter() - start
    return dm, build_model(train_cfg, dm), seconds


class Clock:
    """Wall and CPU timestamps taken each time a timed batch is in hand (``tick``).

    Both paths tick at the same moment of a step (batch fetched, step not yet run) and one batch past
    the last timed one, so ``batches`` intervals cover everything a step costs: data, compute,
    logging, progress bar. CPU time (all threads of the process) is less disturbed than wall time
    by other processes on a shared machine.
    """

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def tick(self) -> None:
        """Record now."""
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())

    @property
    def seconds(self) -> float:
        """Wall seconds between the first and the last tick."""
        return self.wall[-1] - self.wall[0]

    @property
    def cpu_seconds(self) -> float:
        """CPU seconds (every thread) between the first and the last tick."""
        return self.cpu[-1] - self.cpu[0]

    @property
    def step_seconds(self) -> np.ndarray:
        """Wall seconds of each step (tick to tick)."""
        return np.diff(self.wall)


def time_data_path(dm, n_batches: int) -> tuple[float, int]:
    """Seconds to draw ``n_batches`` (fewer if an epoch is shorter) from the training DataLoader."""
    start, n = time.perf_counter(), 0
    for _ in dm.train_dataloader():
        n += 1
        if n == n_batches:
            break
    return time.perf_counter() - start, n


@contextmanager
def _without_logging(model) -> Iterator[None]:
    """``self.log`` as a no-op: the bare loop has no logger, as a hand-written loop would not."""
    model.log = model.log_dict = lambda *args, **kwargs: None
    try:
        yield
    finally:
        del model.log, model.log_dict


def _epochs(dm) -> Iterator[dict]:
    """Training batches, epoch after epoch (a small dataset may have fewer batches than asked for)."""
    while True:
        yield from dm.train_dataloader()


def bare_loop(model, dm, warmup: int, batches: int, clip: float | None) -> Clock:
    """``batches`` training steps after ``warmup`` by hand: the module's own ``training_step``, then
    zero_grad, backward, gradient clipping and the optimizer step, as Lightning does them."""
    import torch

    optimizer = model.configure_optimizers()
    model.train()
    clock = Clock()
    with _without_logging(model):
        for i, batch in enumerate(_epochs(dm)):
            if i >= warmup:
                clock.tick()
            if i == warmup + batches:
                break
            loss = model.training_step(batch, i)
            optimizer.zero_grad()
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
    return clock


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


def step_data(cfg: DictConfig, workdir: str, data_dir: str) -> dict:
    """Datamodule setup time and the training data path's batches/s."""
    dm, _, setup_s = _setup(_train_config(cfg, data_dir, workdir))
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

    train_cfg = _train_config(cfg, data_dir, workdir)
    dm, model, setup_s = _setup(train_cfg)
    t = cfg.throughput
    warmup, n = int(t.warmup), int(t.batches)
    clip = train_cfg.trainer.get("gradient_clip_val")
    rounds = []
    # The run and logger convcg train uses (in a throwaway store), so logging costs what it costs.
    with tracking.tracked_run(train_cfg, {}, []) as run:
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
                }
            )
    b = dm.batch_size
    total = {k: sum(r[k] for r in rounds) for k in ("bare_s", "lightning_s", "bare_cpu_s", "lightning_cpu_s")}
    data_rate = sum(r["data_n"] for r in rounds) / sum(r["data_s"] for r in rounds)
    model_rate = n * len(rounds) / total["lightning_s"]  # batches/s the Lightning path consumes
    _save_embeddings(cfg, dm, model, Path(workdir) / "embeddings.npz")
    return {
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
    """Exact top-k by faiss (``exact_topk``) vs torch vs the configured ANN index, same sizes."""
    from convcg_cli.config import instantiate
    from convcg_cli.metrics.retrieval import exact_topk, recall_at_k

    saved = np.load(Path(workdir) / "embeddings.npz")
    queries, items = saved["queries"], saved["items"]
    k = min(int(cfg.retrieval.k), len(items))
    exact_topk(queries[:8], items, k)  # warm-up: first-call costs (thread pools, lazy imports) are not search
    torch_topk(queries[:8], items, k)
    exact_s, torch_s = [], []
    for _ in range(int(cfg.retrieval.repeats)):  # interleaved, so drift hits both alike
        start = time.perf_counter()
        _, exact = exact_topk(queries, items, k)
        exact_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        torch_topk(queries, items, k)
        torch_s.append(time.perf_counter() - start)
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

    runs = []
    for effort in ann.efforts:  # the speed / overlap trade-off along the index's search knob
        start = time.perf_counter()
        approx = ann.search(queries, k, effort)
        seconds = time.perf_counter() - start
        runs.append(
            {
                "effort": effort,
                "search_s": seconds,
                "speedup": min(exact_s) / seconds,
                "overlap": topk_overlap(approx, exact),
                "recall": recall(approx),
            }
        )
    return {
        "queries": len(queries),
        "items": len(items),
        "dim": items.shape[1],
        "k": k,
        "exact_s": min(exact_s),
        "torch_s": min(torch_s),
        "exact_recall": recall(exact),
        "ann": ann.description,
        "ann_effort_name": ann.effort_name,
        "ann_build_s": build_s,
        "ann_runs": runs,
    }


def step_scale(cfg: DictConfig, workdir: str, data_dir: str) -> dict:
    """At one size: setup, ms per training step (bare loop) and exact top-k of a fixed query count."""
    from convcg_cli.metrics.retrieval import exact_topk

    train_cfg = _train_config(cfg, data_dir, workdir)
    dm, model, setup_s = _setup(train_cfg)
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

    train_cfg = compose("train", [*_train_overrides(cfg, data_dir, workdir), *overrides]).cfg
    if streamed:
        train_cfg.data.stream.cache_dir = str(cache)
    dm, model, setup_s = _setup(train_cfg)
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


STEPS: dict[str, Callable[..., dict]] = {
    "baseline": step_baseline,
    "synth": step_synth,
    "data": step_data,
    "train": step_train,
    "retrieval": step_retrieval,
    "scale": step_scale,
    "memory": step_memory,
}


# --------------------------------------------------------------------------------------------------
# Orchestration, report, MLflow
# --------------------------------------------------------------------------------------------------


def _run_step(name: str, label: str, workdir: Path, env: Mapping[str, str], **kwargs: Any) -> dict:
    """Run step ``name(cfg, workdir, **kwargs)`` in a fresh interpreter with environment ``env``;
    return its figures plus ``wall_s`` and ``peak_rss_mib``. Its output goes to ``<workdir>/<label>.log``."""
    out = workdir / f"{label}.json"
    log = workdir / f"{label}.log"
    cmd = [
        sys.executable,
        "-m",
        "convcg_cli.bench",
        "step",
        name,
        str(workdir / "bench.yaml"),
        json.dumps({"workdir": str(workdir), **kwargs}),
    ]
    print(f"  {label} ...", end=" ", flush=True)
    start = time.perf_counter()
    with log.open("w") as sink:
        done = subprocess.run([*cmd, "--out", str(out)], stdout=sink, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0:
        raise RuntimeError(
            f"bench step '{label}' failed (exit {done.returncode}):\n{log.read_text()[-4000:]}"
        )
    result = json.loads(out.read_text())
    print(f"{time.perf_counter() - start:.0f} s, peak {result['peak_rss_mib']:.0f} MiB", flush=True)
    return result


def run(cfg: DictConfig, workdir: Path) -> dict:
    """Every step, in order; returns all figures (the report is rendered from them)."""
    OmegaConf.save(cfg, workdir / "bench.yaml")
    results: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "load_before": os.getloadavg()}
    start = time.perf_counter()
    data_dir = str(Path(cfg.data_dir))
    env = dict(os.environ)
    if cfg.threads:  # set before the child imports torch, faiss (OpenMP) and polars
        env.update(
            {v: str(cfg.threads) for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "POLARS_MAX_THREADS")}
        )
    results["baseline"] = _run_step("baseline", "baseline", workdir, env)
    results["synth"] = _run_step("synth", "synth", workdir, env, factor=1.0, out_dir=data_dir, reuse=True)
    results["data"] = _run_step("data", "data", workdir, env, data_dir=data_dir)
    results["train"] = _run_step("train", "train", workdir, env, data_dir=data_dir)
    results["retrieval"] = _run_step("retrieval", "retrieval", workdir, env)
    results["scale"] = []
    for factor in cfg.scale.factors:
        scaled = workdir / f"scale-{factor}"
        point: dict[str, Any] = {"factor": float(factor)}
        label = f"scale-{factor:g}"
        point["synth"] = _run_step(
            "synth", f"{label}-synth", workdir, env, factor=factor, out_dir=str(scaled), reuse=False
        )
        point["run"] = _run_step("scale", label, workdir, env, data_dir=str(scaled))
        shutil.rmtree(scaled, ignore_errors=True)
        results["scale"].append(point)
    results["memory"] = []
    for factor in cfg.memory.factors:
        scaled = workdir / f"days-{factor}"
        label = f"days-{factor:g}"
        point = {"factor": float(factor)}
        point["synth"] = _run_step(
            "synth",
            f"{label}-synth",
            workdir,
            env,
            factor=factor,
            out_dir=str(scaled),
            reuse=False,
            days=True,
        )
        for streamed in (True, False):
            mode = "streamed" if streamed else "in_memory"
            point[mode] = _run_step(
                "memory", f"{label}-{mode}", workdir, env, data_dir=str(scaled), streamed=streamed
            )
        shutil.rmtree(scaled, ignore_errors=True)
        results["memory"].append(point)
    results["total_s"] = time.perf_counter() - start
    results["load_after"] = os.getloadavg()
    return results


def metrics(results: Mapping[str, Any]) -> dict[str, float]:
    """The headline figures as flat MLflow metrics (``bench/...``)."""
    train, ret, data = results["train"], results["retrieval"], results["data"]
    out = {
        "bench/train/bare_examples_per_s": train["bare_examples_per_s"],
        "bench/train/lightning_examples_per_s": train["lightning_examples_per_s"],
        LIGHTNING_VS_BARE: train["lightning_vs_bare"],
        "bench/train/lightning_vs_bare_pooled": train["lightning_vs_bare_pooled"],
        "bench/train/lightning_vs_bare_cpu": train["lightning_vs_bare_cpu"],
        "bench/train/fit_overhead_s": train["fit_overhead_s"],
        "bench/data/setup_s": data["setup_s"],
        "bench/data/batches_per_s": train["data_batches_per_s"],
        DATA_VS_MODEL: train["data_vs_model"],
        "bench/retrieval/exact_s": ret["exact_s"],
        "bench/retrieval/torch_s": ret["torch_s"],
        "bench/retrieval/torch_vs_exact": ret["exact_s"] / ret["torch_s"],
        "bench/retrieval/ann_build_s": ret["ann_build_s"],
        "bench/total_s": results["total_s"],
    }
    for task, value in ret["exact_recall"].items():
        out[f"bench/retrieval/exact/{task}/recall"] = value
    for r in ret["ann_runs"]:
        prefix = f"bench/retrieval/ann_{ret['ann_effort_name']}_{r['effort']}"
        out.update({f"{prefix}/{k}": r[k] for k in ("search_s", "speedup", "overlap")})
        out.update({f"{prefix}/{task}/recall": value for task, value in r["recall"].items()})
    for label, step in _steps(results):
        out[f"bench/memory/{label}_peak_mib"] = step["peak_rss_mib"]
    for cost, exponent in scale_exponents(results["scale"], results["baseline"]).items():
        out[f"bench/scale/{cost}_exponent"] = exponent
    for mode, exponent in memory_exponents(results).items():
        out[f"bench/bounded_memory/{mode}_peak_exponent"] = exponent
    for point in results.get("memory", []):
        for mode in MEMORY_MODES:
            out[f"bench/bounded_memory/days_{point['factor']:g}_{mode}_peak_mib"] = point[mode][
                "peak_rss_mib"
            ]
    return out


MEMORY_MODES = ("streamed", "in_memory")
# The streamed peak (above the import baseline) may grow at most like impressions^this: "flat".
FLAT_MEMORY_EXPONENT = 0.1


def memory_exponents(results: Mapping[str, Any]) -> dict[str, float]:
    """Growth exponent of each mode's training-process peak memory (above the import baseline) against
    impressions, in the bounded-memory sweep (f)."""
    points = results.get("memory", [])
    if len(points) < 2:
        return {}
    sizes = [p["synth"]["impressions"] for p in points]
    base = results["baseline"]["train_mib"]
    return {
        mode: growth_exponent(sizes, [max(p[mode]["peak_rss_mib"] - base, 1.0) for p in points])
        for mode in MEMORY_MODES
    }


def _steps(results: Mapping[str, Any]) -> list[tuple[str, dict]]:
    """(label, figures) of every subprocess step, in run order."""
    steps = [(name, results[name]) for name in ("baseline", "synth", "data", "train", "retrieval")]
    for point in results["scale"]:
        steps += [
            (f"scale_{point['factor']:g}_synth", point["synth"]),
            (f"scale_{point['factor']:g}", point["run"]),
        ]
    for point in results.get("memory", []):
        steps += [(f"days_{point['factor']:g}_synth", point["synth"])]
        steps += [(f"days_{point['factor']:g}_{mode}", point[mode]) for mode in MEMORY_MODES]
    return steps


# Costs fitted against the number of impressions in the scaling sweep: name -> figures -> value.
SCALE_COSTS = {
    "synth_s": lambda p, base: p["synth"]["seconds"],
    "synth_mib_above_baseline": lambda p, base: p["synth"]["peak_rss_mib"] - base["synth_mib"],
    "setup_s": lambda p, base: p["run"]["setup_s"],
    "train_mib_above_baseline": lambda p, base: p["run"]["peak_rss_mib"] - base["train_mib"],
    "step_cpu_ms": lambda p, base: p["run"]["step_cpu_ms"],
    "topk_s": lambda p, base: p["run"]["topk_s"],
}


def scale_exponents(points: Sequence[Mapping[str, Any]], baseline: Mapping[str, float]) -> dict[str, float]:
    """Growth exponent of every cost in ``SCALE_COSTS`` against the number of impressions."""
    sizes = [p["synth"]["impressions"] for p in points]
    return {
        name: growth_exponent(sizes, [max(cost(p, baseline), 1e-3) for p in points])
        for name, cost in SCALE_COSTS.items()
    }


def _verdict(value: float, target: float) -> str:
    return "pass" if value >= target else "**FAIL**"


def render_report(cfg: DictConfig, results: Mapping[str, Any]) -> str:
    """The markdown report: every section (a)-(e), from the figures alone."""
    import faiss
    import lightning
    import torch

    train, data, ret = results["train"], results["data"], results["retrieval"]
    base = results["baseline"]
    b = train["batch_size"]
    threads = (
        f"every step limited to {cfg.threads} thread(s) (`threads`), so figures are per core"
        if cfg.threads
        else "default threads"
    )
    light_ratio, data_ratio = train["lightning_vs_bare"], train["data_vs_model"]
    per_round = ", ".join(f"{r['ratio']:.3f}" for r in train["rounds"])
    lines = [
        "# convcg benchmarks",
        "",
        f"Generated by `make bench` ({'`--quick`, ' if cfg.get('is_quick') else ''}preset `{cfg.preset}`) on "
        f"{results['started']} in {results['total_s'] / 60:.1f} min. Machine: {os.cpu_count()} CPU cores, "
        f"torch {torch.__version__}, lightning {lightning.__version__}, "
        f"faiss {faiss.__version__}, {platform.platform()}; {threads}; load average "
        f"{results['load_before'][0]:.1f} before, {results['load_after'][0]:.1f} after.",
        "",
        "The machine is shared, so absolute speeds drift between runs; the ratios are the figures to "
        "read: each is measured inside one process with the paths interleaved round by round.",
        "",
        "| target | measured | required | |",
        "|---|---:|---:|---|",
        f"| Lightning `trainer.fit` / bare PyTorch loop, examples/s | {light_ratio:.3f} | "
        f">= {TARGETS[LIGHTNING_VS_BARE]} | {_verdict(light_ratio, TARGETS[LIGHTNING_VS_BARE])} |",
        f"| data path / model consumption, batches/s | {data_ratio:.0f}x | "
        f">= {TARGETS[DATA_VS_MODEL]:.0f}x | {_verdict(data_ratio, TARGETS[DATA_VS_MODEL])} |",
        *_memory_verdict(results),
        "",
        "## (a) Training throughput: Lightning vs a bare PyTorch loop",
        "",
        f"Same model (`conf/train.yaml` + `{list(cfg.train_overrides)}`), optimizer, gradient clipping, "
        f"batch size ({b}) and batches. The Lightning path is `trainer.fit` with convcg train's trainer "
        "config and MLflow logger (`limit_train_batches`, no validation); the bare loop calls the "
        "module's own `training_step` (logging stubbed out), then zero_grad, backward, clipping and the "
        f"optimizer step. {len(train['rounds'])} rounds of {train['batches']} timed batches per path "
        f"(after {train['warmup']} warm-up batches each), the order of the paths alternating from round "
        "to round; a step is timed from one batch in hand to the next, so data, logging and the "
        "progress bar count.",
        "",
        "| path | examples/s | ms/batch | median ms/batch |",
        "|---|---:|---:|---:|",
        f"| bare loop | {train['bare_examples_per_s']:,.0f} | {1e3 * b / train['bare_examples_per_s']:.1f} | "
        f"{np.median([r['bare_step_ms_median'] for r in train['rounds']]):.1f} |",
        f"| Lightning | {train['lightning_examples_per_s']:,.0f} | "
        f"{1e3 * b / train['lightning_examples_per_s']:.1f} | "
        f"{np.median([r['lightning_step_ms_median'] for r in train['rounds']]):.1f} |",
        "",
        f"Lightning/bare, median of the per-round ratios (the verdict): **{light_ratio:.3f}**; pooled wall "
        f"time {train['lightning_vs_bare_pooled']:.3f}; pooled CPU time (all threads) "
        f"{train['lightning_vs_bare_cpu']:.3f}. Per round: "
        f"{per_round}. One-off cost of each `trainer.fit` "
        f"call outside the steps (setup, teardown): {train['fit_overhead_s']:.2f} s. Trainer settings: "
        + ", ".join(f"`{k}={v}`" for k, v in train["trainer"].items())
        + ".",
        "",
        "## (b) Data path vs model consumption",
        "",
        f"Datamodule setup (load, validate, split, build every tensor): {data['setup_s']:.1f} s for "
        f"{data['train_examples']:,} training examples ({data['batches_per_epoch']:,} batches of "
        f"{data['batch_size']} per epoch). The training DataLoader alone (ShuffledBatches: whole-batch "
        f"tensor slicing) yields **{train['data_batches_per_s']:,.0f} batches/s**; the Lightning path "
        f"consumes {train['model_batches_per_s']:,.2f} batches/s, so the data path is "
        f"**{train['data_vs_model']:,.0f}x** faster than the model needs (measured in the training process; "
        f"the data step alone measured {data['data_batches_per_s']:,.0f} batches/s).",
        "",
        "## (c) Exact top-k evaluation vs torch vs an ANN index",
        "",
        f"{ret['queries']:,} validation queries x {ret['items']:,} items, d={ret['dim']}, k={ret['k']}, "
        "embeddings of the model trained in (a).",
        "",
        "| search | seconds | queries/s | vs exact_topk |",
        "|---|---:|---:|---:|",
        f"| `exact_topk` (faiss IndexFlatIP, ties by id) | {ret['exact_s']:.2f} | "
        f"{ret['queries'] / ret['exact_s']:,.0f} | 1.00x |",
        f"| torch matmul + `torch.topk` | {ret['torch_s']:.2f} | {ret['queries'] / ret['torch_s']:,.0f} | "
        f"{ret['exact_s'] / ret['torch_s']:.2f}x |",
    ]
    tasks = list(ret["exact_recall"])
    effort = ret["ann_effort_name"]
    lines += [
        "",
        f"ANN: {ret['ann']} (`retrieval.ann` in conf/bench.yaml), built in {ret['ann_build_s']:.2f} s, "
        f"searched at each `{effort}`. Overlap = share of the exact top-{ret['k']} the ANN list holds; "
        f"recall@{ret['k']} on the validation positives of those queries.",
        "",
        "| search | seconds | speed-up vs exact_topk | overlap | "
        + " | ".join(f"{t} recall@{ret['k']}" for t in tasks)
        + " |",
        "|---|---:|---:|---:|" + "---:|" * len(tasks),
        f"| exact (`exact_topk`) | {ret['exact_s']:.2f} | 1.00x | 1.000 | "
        + " | ".join(f"{ret['exact_recall'][t]:.4f}" for t in tasks)
        + " |",
        *[
            f"| ANN, {effort}={r['effort']} | {r['search_s']:.2f} | {r['speedup']:.2f}x | "
            f"{r['overlap']:.3f} | " + " | ".join(f"{r['recall'][t]:.4f}" for t in tasks) + " |"
            for r in ret["ann_runs"]
        ],
        "",
    ]
    lines += [
        "## (d) Peak resident memory of each step",
        "",
        "Each step runs in its own process; peak = `VmHWM`, which includes the interpreter and the "
        f"libraries: `baseline` imports them and nothing else ({base['synth_mib']:,.0f} MiB for the synth "
        f"step's, {base['train_mib']:,.0f} MiB for everything). `synth` is 0 s when the logs were reused.",
        "",
        "| step | wall s | peak MiB |",
        "|---|---:|---:|",
    ]
    for label, step in _steps(results):
        lines.append(f"| {label} | {step['wall_s']:.1f} | {step['peak_rss_mib']:,.0f} |")
    points = results["scale"]
    factors = ", ".join(f"{p['factor']:g}" for p in points)
    lines += [
        "",
        "## (e) How costs grow",
        "",
        f"The `{cfg.preset}` preset with users, items, advertisers and impressions scaled together by "
        f"{factors}. Step time is the bare loop's median over {cfg.scale.steps} steps, in wall and in "
        "CPU time (the exponent is fitted on CPU time, which other processes disturb less); top-k is "
        f"`exact_topk` of {cfg.scale.queries:,} queries over all items "
        f"(fastest of {cfg.scale.repeats}), k={min(int(cfg.retrieval.k), points[-1]['run']['items'])}.",
        "",
        "| impressions | items | train examples | params | synth s | synth MiB | setup s | train MiB "
        "| step ms | step CPU ms | top-k s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in points:
        s, r = p["synth"], p["run"]
        lines.append(
            f"| {s['impressions']:,} | {r['items']:,} | {r['train_examples']:,} | {r['params']:,} | "
            f"{s['seconds']:.1f} | {s['peak_rss_mib']:,.0f} | {r['setup_s']:.1f} | "
            f"{r['peak_rss_mib']:,.0f} | {r['step_ms']:.0f} | {r['step_cpu_ms']:.0f} | {r['topk_s']:.2f} |"
        )
    exponents = scale_exponents(points, results["baseline"])
    lines += [
        "",
        "Fitted growth exponent (log-log slope against impressions; items grow in proportion):",
        "",
        "| cost | exponent |",
        "|---|---:|",
        *[f"| {name} | {value:.2f} |" for name, value in exponents.items()],
        "",
        "Memory exponents are fitted on the peak *above* the import baseline of (d), i.e. on what the "
        "data and the model take.",
        "",
    ]
    lines += _memory_section(cfg, results)
    return "\n".join(lines)


def _memory_verdict(results: Mapping[str, Any]) -> list[str]:
    """The headline row of (f): the streamed peak's growth exponent against impressions."""
    exps = memory_exponents(results)
    if not exps:
        return []
    value = exps["streamed"]
    return [
        f"| streamed training, peak memory growth exponent vs impressions (f) | {value:.2f} | "
        f"< {FLAT_MEMORY_EXPONENT} | {_verdict(FLAT_MEMORY_EXPONENT, value)} |"
    ]


def _memory_section(cfg: DictConfig, results: Mapping[str, Any]) -> list[str]:
    """(f): peak memory of a training process, streamed vs in memory, as the training log grows."""
    points = results.get("memory", [])
    if not points:
        return []
    m = cfg.memory
    exps = memory_exponents(results)
    factors = ", ".join(f"{p['factor']:g}" for p in points)
    lines = [
        "## (f) Bounded memory: streamed training as the log grows",
        "",
        f"The `{cfg.preset}` preset's corpus (users, items) and daily traffic over {factors} times its "
        "days: the training window grows with the impressions while the evaluation days (the last "
        f"`val_days` + `heldout_days`) keep their size. Each cell is one process that sets up the data and "
        f"takes {int(m.warmup) + int(m.steps)} training steps; peak = its `VmHWM` (setup MiB: the peak "
        "when setup ended). Streamed = `data/stream=streamed` with "
        f"`chunk_rows={int(m.chunk_rows):,}`: the impressions are validated and encoded one chunk at a "
        "time into shards (written in this process: setup includes the encoding), and batches are read "
        "shard by shard. In memory = the default path, which loads the whole table and shuffles globally.",
        "",
        "| impressions | train impressions | train examples | streamed setup s | shards "
        "| streamed setup MiB | streamed peak MiB | streamed step ms | in-memory setup s "
        "| in-memory peak MiB | in-memory step ms |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in points:
        st, mem = p["streamed"], p["in_memory"]
        lines.append(
            f"| {p['synth']['impressions']:,} | {st['train_rows']:,} | {st['train_examples']:,} | "
            f"{st['setup_s']:.1f} | {st['shards']} | {st['setup_mib']:,.0f} | "
            f"{st['peak_rss_mib']:,.0f} | {st['step_ms']:.0f} | {mem['setup_s']:.1f} | "
            f"{mem['peak_rss_mib']:,.0f} | {mem['step_ms']:.0f} |"
        )
    lines += [
        "",
        "Growth exponent of the peak above the import baseline of (d) against impressions: streamed "
        f"**{exps['streamed']:.2f}** (flat means below {FLAT_MEMORY_EXPONENT}: "
        f"{_verdict(FLAT_MEMORY_EXPONENT, exps['streamed'])}), in memory {exps['in_memory']:.2f}. What the "
        "streamed process still holds grows with the corpus (item and user tables, embeddings), the "
        "evaluation days' engaged rows, and, with the user history on, the engagement events; not with "
        "the training impressions.",
        "",
    ]
    return lines


def log_to_mlflow(cfg: DictConfig, results: Mapping[str, Any], report: str) -> str:
    """One FINISHED run in ``logger.experiment_name`` with the figures, the config and the report."""
    from mlflow.entities import Param, RunStatus

    from convcg_cli import tracking

    client = tracking.client(cfg.logger)
    exp = tracking.experiment_id(client, cfg.logger)
    tags = {"mlflow.source.name": "convcg bench", "preset": str(cfg.preset), "quick": str(cfg.is_quick)}
    run_id = client.create_run(exp, tags=tags, run_name=f"bench-{cfg.preset}").info.run_id
    container = cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True))
    params = [Param(k, v) for k, v in tracking.flatten(container).items() if not k.startswith("quick.")]
    for i in range(0, len(params), 100):
        client.log_batch(run_id, params=params[i : i + 100])
    tracking.log_metrics(client, run_id, metrics(results))
    tracking.log_text(client, run_id, report, "bench/bench.md")
    tracking.log_text(client, run_id, json.dumps(results, indent=2, default=str), "bench/results.json")
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))
    return run_id


def bench_config(overrides: Sequence[str], quick: bool) -> DictConfig:
    """conf/bench.yaml with ``overrides``; ``quick`` merges its ``quick`` block over the rest."""
    from convcg_cli.config import compose

    cfg = compose("bench", list(overrides)).cfg
    OmegaConf.set_struct(cfg, False)
    if quick:
        cfg = cast(DictConfig, OmegaConf.merge(cfg, cfg.quick))
    cfg.is_quick = quick
    return cfg


app = typer.Typer(
    help="Speed and scale benchmarks (conf/bench.yaml).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command("run", context_settings={"ignore_unknown_options": True})
def run_command(
    quick: bool = typer.Option(False, "--quick", help="Smoke test: the tiny preset, a few batches (~1 min)."),
    overrides: list[str] = typer.Argument(None, help="Overrides of conf/bench.yaml, e.g. retrieval.ann=hnsw"),
) -> None:
    """Run every benchmark; write the markdown report and log an MLflow run."""
    from convcg_cli.cli import user_errors

    with user_errors():
        cfg = bench_config(overrides or [], quick)
        print(f"convcg bench: preset {cfg.preset}{' (quick)' if quick else ''}; report -> {cfg.report}")
        with tempfile.TemporaryDirectory(prefix="convcg-bench-") as tmp:
            results = run(cfg, Path(tmp))
        report = render_report(cfg, results)
        path = Path(cfg.report)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(report)
        run_id = log_to_mlflow(cfg, results, report)
        figures = metrics(results)
        print(
            f"Lightning/bare {figures[LIGHTNING_VS_BARE]:.3f}, data/model {figures[DATA_VS_MODEL]:.0f}x, "
            "ANN speed-up/overlap "
            + ", ".join(f"{r['speedup']:.1f}x/{r['overlap']:.3f}" for r in results["retrieval"]["ann_runs"])
            + f"; total {results['total_s'] / 60:.1f} min."
        )
        print(f"Wrote {path}; MLflow run {run_id} (experiment {cfg.logger.experiment_name}).")


@app.command("step", hidden=True)
def step_command(
    name: str = typer.Argument(..., help="One of STEPS."),
    config: Path = typer.Argument(..., help="The resolved bench config (yaml)."),
    kwargs: str = typer.Argument("{}", help="The step's keyword arguments as JSON."),
    out: Path = typer.Option(..., "--out", help="Where to write the step's figures (JSON)."),
) -> None:
    """Run one step in this (fresh) process and write its figures, wall time and peak memory."""
    _quiet()
    start = time.perf_counter()
    result = STEPS[name](OmegaConf.load(config), **json.loads(kwargs))
    result.update(wall_s=time.perf_counter() - start, peak_rss_mib=peak_rss_mib())
    out.write_text(json.dumps(result, default=float))


if __name__ == "__main__":
    app()
