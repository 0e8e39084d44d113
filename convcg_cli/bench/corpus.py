"""(j) A million items: exact and approximate search as the corpus grows (``corpus`` in conf/bench.yaml).

At each corpus size, in its own process: the preset's logs with that many items (users, days and
impressions as the preset has them), convcg train's model trained for ``corpus.train_batches``
batches on them, its item embeddings and the first ``corpus.queries`` validation queries' embeddings.
Then, on those embeddings:

* exact search (:class:`~convcg_cli.index.ExactIndex`): build time and bytes, batch throughput at
  ``corpus.k`` and at ``retrieval.k`` (the latter against a bare GEMM of the same shapes, timed
  round by round in the same process), single-request latency;
* every index of ``corpus.ann`` at each of its efforts: build time, bytes, batch throughput and
  speed-up over exact, single-request latency, and the overlap of its top ``corpus.k`` with exact's;
* the model served as conf/train.yaml's serve block builds it with ``serve.index=ivf``: saved and
  loaded as MLflow loads a pyfunc model (its index read back: the load time), then single requests of
  random known users at ``corpus.k`` timed end to end through ``predict`` (encode, search, response).

Memory: the bytes each index holds (as faiss serialises it; the exact index: its copy of the items
and its sample) and the step's peak RSS (which includes training). ``figures.corpus_exponents`` fits
how each cost grows with the number of items.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from convcg_cli.bench.measure import blocked_gemm_seconds, latency_ms, topk_overlap


def _embeddings(cfg: DictConfig, workdir: str, items: int) -> tuple[np.ndarray, np.ndarray, dict, dict]:
    """``(queries, items, timings, served)``: the preset with ``items`` items synthesised in
    ``workdir``, the model trained briefly on it, the first ``corpus.queries`` validation queries'
    embeddings and every item's, and the served model's figures (:func:`served_figures`); the data
    directory is removed afterwards."""
    import torch

    from convcg_cli.bench.training import bare_loop, setup_model, train_config
    from convcg_cli.data.importing import synth

    c = cfg.corpus
    data_dir = Path(workdir) / f"corpus-{items}"
    config = dataclasses.replace(synth.resolve_config(str(cfg.preset)), n_items=int(items))
    start = time.perf_counter()
    synth.synthesize(config, str(data_dir), seed=cfg.seed)
    synth_s = time.perf_counter() - start
    train_cfg = train_config(cfg, str(data_dir), workdir)
    dm, model, setup_s = setup_model(train_cfg)
    start = time.perf_counter()
    bare_loop(model, dm, 0, int(c.train_batches), train_cfg.trainer.get("gradient_clip_val"))
    train_s = time.perf_counter() - start
    model.eval()
    start = time.perf_counter()
    features = {
        k: torch.from_numpy(np.ascontiguousarray(v[: int(c.queries)]))
        for k, v in dm.queries["val"].features.items()
    }
    with torch.no_grad():
        queries = model.embed_queries(features).float().numpy()
    item_emb = np.ascontiguousarray(model.embed_items(dm.item_features), dtype=np.float32)
    embed_s = time.perf_counter() - start
    served = served_figures(cfg, train_cfg, dm, model, Path(workdir) / f"corpus-pyfunc-{items}")
    shutil.rmtree(data_dir, ignore_errors=True)
    timings = {"synth_s": synth_s, "setup_s": setup_s, "train_s": train_s, "embed_s": embed_s}
    return np.ascontiguousarray(queries, dtype=np.float32), item_emb, timings, served


def served_figures(cfg: DictConfig, train_cfg, dm, model, model_dir: Path) -> dict:
    """The model served from its ANN index (conf/train.yaml's serve block, ``serve.index=ivf``) at this
    corpus size: saved as a pyfunc model directory, loaded as MLflow loads it (the saved index read
    back, timed), then ``corpus.requests`` single requests of random known users at ``corpus.k``
    through ``predict`` (schema enforcement, encoding, search, response), after
    ``serve.warmup_requests`` other requests, untimed.
    The directory is removed afterwards."""
    from convcg_cli import tracking
    from convcg_cli.bench.serving import bench_requests, single_request_seconds, warmup_requests
    from convcg_cli.index.approximate import ivf_cells
    from convcg_cli.serve.export import make_bundle, save_bundle, serve_options

    bundle = make_bundle(train_cfg, dm, model, serve_options(train_cfg, {"index": "ivf"}))
    save_bundle(bundle, model_dir)
    try:
        start = time.perf_counter()
        served = tracking.load_served_model(tracking.Store.from_config(train_cfg.logger), str(model_dir))
        load_s = time.perf_counter() - start
        k = min(int(cfg.corpus.k), len(bundle.item_ids))
        users, surfaces = bundle.users.user_ids, bundle.surfaces
        requests = bench_requests(users, surfaces, int(cfg.corpus.requests), cfg.seed).to_pandas()
        warmup = bench_requests(users, surfaces, warmup_requests(cfg), cfg.seed + 2)
        seconds = single_request_seconds({"ivf": served}, requests, warmup, k)["ivf"]
    finally:
        shutil.rmtree(model_dir, ignore_errors=True)
    return {
        "nlist": ivf_cells(int(bundle.index["nlist"]), len(bundle.item_ids)),
        "nprobe": int(bundle.index["nprobe"]),
        "k": k,
        "requests": len(seconds),
        "load_s": load_s,
        **latency_ms(seconds),
    }


def _latencies(search, queries: np.ndarray, n: int) -> dict[str, float]:
    """p50/p99 of ``search(one query)`` over the first ``n`` queries (after one untimed call)."""
    search(queries[:1])
    seconds = []
    for i in range(min(n, len(queries))):
        start = time.perf_counter()
        search(queries[i : i + 1])
        seconds.append(time.perf_counter() - start)
    return latency_ms(seconds)


def _fastest(search, repeats: int) -> tuple[float, float, np.ndarray]:
    """``(fastest wall seconds, fastest CPU seconds, ids of the last call)`` of ``repeats`` calls of
    ``search()``. CPU time (every thread of the process) is what the growth exponents are fitted on:
    other processes on a shared machine disturb it less than wall time."""
    best, best_cpu, ids = float("inf"), float("inf"), np.empty(0)
    for _ in range(max(1, repeats)):
        start, start_cpu = time.perf_counter(), time.process_time()
        ids = search()
        best, best_cpu = (
            min(best, time.perf_counter() - start),
            min(best_cpu, time.process_time() - start_cpu),
        )
    return best, best_cpu, ids


def exact_figures(cfg: DictConfig, queries: np.ndarray, items: np.ndarray) -> tuple[dict, np.ndarray]:
    """Exact search's figures and its top ``corpus.k`` ids (the reference of every ANN's overlap)."""
    from convcg_cli.index import ExactIndex

    c = cfg.corpus
    k, k_eval = min(int(c.k), len(items)), min(int(cfg.retrieval.k), len(items))
    start, start_cpu = time.perf_counter(), time.process_time()
    index = ExactIndex(items)
    build_s, build_cpu_s = time.perf_counter() - start, time.process_time() - start_cpu
    index.search(queries[:16], k)  # warm-up: thread pools and first allocations are not search
    search_s, search_cpu_s, exact = _fastest(lambda: index.search(queries, k)[1], int(c.repeats))
    # At retrieval.k, against the bare GEMM of the same shapes: rounds interleaved, medians of ratios.
    rounds = []
    for _ in range(max(1, int(c.repeats))):
        gemm_s = blocked_gemm_seconds(queries, items)
        eval_s, _, _ = _fastest(lambda: index.search(queries, k_eval)[1], 1)
        rounds.append((gemm_s, eval_s))
    figures = {
        "k": k,
        "build_s": build_s,
        "build_cpu_s": build_cpu_s,
        "nbytes": int(index.items.nbytes + index.sample.nbytes),
        "search_s": search_s,
        "search_cpu_s": search_cpu_s,
        "qps": len(queries) / search_s,
        **_latencies(lambda q: index.search(q, k), queries, int(c.requests)),
        "eval_k": k_eval,
        "eval_search_s": min(r[1] for r in rounds),
        "gemm_s": min(r[0] for r in rounds),
        "vs_gemm": float(np.median([g / s for g, s in rounds])),
        "gflop": 2 * len(queries) * len(items) * items.shape[1] / 1e9,
    }
    return figures, exact


def ann_figures(
    cfg: DictConfig, name: str, queries: np.ndarray, items: np.ndarray, exact: np.ndarray, exact_s: float
) -> dict:
    """One ANN index of ``corpus.ann_options``: build, bytes, and each effort's speed and overlap."""
    from convcg_cli.config import instantiate

    c = cfg.corpus
    k = exact.shape[1]
    ann = instantiate(c.ann_options[name])
    start, start_cpu = time.perf_counter(), time.process_time()
    ann.build(items)
    build_s, build_cpu_s = time.perf_counter() - start, time.process_time() - start_cpu
    runs = []
    for effort in ann.efforts:
        ann.search(queries[:16], k, effort)  # warm-up
        search_s, search_cpu_s, ids = _fastest(lambda e=effort: ann.search(queries, k, e), int(c.repeats))
        runs.append(
            {
                "effort": effort,
                "search_s": search_s,
                "search_cpu_s": search_cpu_s,
                "qps": len(queries) / search_s,
                "speedup": exact_s / search_s,
                "overlap": topk_overlap(ids, exact),
                **_latencies(lambda q, e=effort: ann.search(q, k, e), queries, int(c.requests)),
            }
        )
    return {
        "name": name,
        "description": ann.description,
        "effort_name": ann.effort_name,
        "build_s": build_s,
        "build_cpu_s": build_cpu_s,
        "nbytes": int(ann.nbytes),
        "runs": runs,
    }


def step_corpus(cfg: DictConfig, workdir: str, items: int) -> dict:
    """(j) at one corpus size: embeddings of a briefly trained model, exact search and every ANN."""
    queries, item_emb, timings, served = _embeddings(cfg, workdir, int(items))
    exact, exact_ids = exact_figures(cfg, queries, item_emb)
    return {
        "items": len(item_emb),
        "dim": int(item_emb.shape[1]),
        "queries": len(queries),
        **timings,
        "exact": exact,
        "serving": {"ann": str(cfg.corpus.serving.ann), "effort": int(cfg.corpus.serving.effort)},
        "served": served,
        "ann": [
            ann_figures(cfg, str(name), queries, item_emb, exact_ids, exact["search_s"])
            for name in cfg.corpus.ann
        ],
    }
