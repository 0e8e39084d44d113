"""(g) The served model: single-request latency of the pyfunc ``predict`` (the model served from the
exact index and from the ANN index, ``serve.index=exact`` and ``ivf``), batch ``retrieve``
throughput against the bare ``exact_topk`` path of (c) as the limit, index build times, and the
model's load time with its saved index read back and with it rebuilt (exact and IVF).

The pyfunc model is saved to and loaded from a local directory exactly as MLflow serves it (schema
enforcement included); the same directories are then served by ``mlflow models serve`` and by
``convcg serve``, and single JSON requests to each one's ``/invocations`` are timed end to end (client,
HTTP, parsing, predict, the answer). The batch path and
the bare path are timed in one process, round by round, on the same requests and k.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
from omegaconf import DictConfig

from convcg_cli.bench.figures import HTTP_SERVERS
from convcg_cli.bench.measure import latency_ms, peak_rss_mib

if TYPE_CHECKING:
    import pandas as pd


def bench_requests(user_ids: np.ndarray, surfaces: list[str], n: int, seed: int) -> pl.DataFrame:
    """``n`` requests of random known users, the surfaces in turn (no subject item or query)."""
    rng = np.random.default_rng(seed)
    return pl.DataFrame(
        {"user_id": rng.choice(user_ids, size=n), "surface": [surfaces[i % len(surfaces)] for i in range(n)]}
    )


def index_build_seconds(item_emb: np.ndarray, nlist: int) -> dict[str, float]:
    """Seconds to build the exact and the IVF index of the served corpus."""
    from convcg_cli.index import ExactIndex, IVFIndex

    start = time.perf_counter()
    ExactIndex(item_emb)
    exact_s = time.perf_counter() - start
    start = time.perf_counter()
    IVFIndex(item_emb, nlist=nlist)
    return {"exact_build_s": exact_s, "ivf_build_s": time.perf_counter() - start}


def warmup_requests(cfg: DictConfig) -> int:
    """Untimed requests before single-request latencies are timed (``serve.warmup_requests``, >= 1)."""
    return max(1, int(cfg.serve.get("warmup_requests", 1)))


def single_request_seconds(
    served: Mapping[str, Any], requests: pd.DataFrame, warmup: pl.DataFrame, k: int
) -> dict[str, list[float]]:
    """Seconds of each pyfunc model's ``predict`` of each one-row request at ``k``, by model name:
    the ``warmup`` requests first, untimed (first-call costs are not latency; a served model is
    warm), then request by request, the models in turn (drift hits them alike)."""
    import pandas as pd

    for i in range(warmup.height):
        for one in served.values():
            one.predict(warmup.slice(i, 1).to_pandas(), params={"k": k})
    seconds: dict[str, list[float]] = {name: [] for name in served}
    for i in range(len(requests)):
        request = pd.DataFrame(requests.iloc[i : i + 1])
        for name, one in served.items():
            start = time.perf_counter()
            one.predict(request, params={"k": k})
            seconds[name].append(time.perf_counter() - start)
    return seconds


LOAD_ROUNDS = 3  # loads of each model (saved index, rebuilt), interleaved; the fastest counts


def load_seconds(model_dir: Path, store, rounds: int = LOAD_ROUNDS) -> dict[str, float]:
    """``{"load_s", "load_rebuild_s"}``: the fastest of ``rounds`` pyfunc loads of ``model_dir`` as
    saved (its index read back) and of a copy without its index file (rebuilt at load, as a model
    logged before indexes were saved), interleaved round by round."""
    from convcg_cli import tracking
    from convcg_cli.serve.bundle import INDEX_FILE
    from convcg_cli.serve.pyfunc import BUNDLE_ARTIFACT

    bare = model_dir.with_name(f"{model_dir.name}-no-index")
    shutil.rmtree(bare, ignore_errors=True)
    shutil.copytree(model_dir, bare)
    (bare / "artifacts" / BUNDLE_ARTIFACT / INDEX_FILE).unlink()
    seconds: dict[str, list[float]] = {"load_s": [], "load_rebuild_s": []}
    try:
        for _ in range(max(1, rounds)):
            for name, directory in (("load_s", model_dir), ("load_rebuild_s", bare)):
                start = time.perf_counter()
                tracking.load_served_model(store, str(directory))
                seconds[name].append(time.perf_counter() - start)
    finally:
        shutil.rmtree(bare, ignore_errors=True)
    return {name: min(values) for name, values in seconds.items()}


def load_times(model_dirs: Mapping[str, Path], store, rounds: int = LOAD_ROUNDS) -> dict:
    """Load times (:func:`load_seconds`) of each saved model, by index kind (``exact``, ``ivf``):
    ``load_<kind>_s`` and ``load_<kind>_rebuild_s``."""
    return {
        name.replace("load", f"load_{kind}"): value
        for kind, model_dir in model_dirs.items()
        for name, value in load_seconds(model_dir, store, rounds).items()
    }


def http_latency(
    model_dir: Path, requests: pl.DataFrame, k: int, warmup: pl.DataFrame | None = None
) -> dict[str, float]:
    """p50/p99 of single ``/invocations`` requests to ``mlflow models serve`` and to ``convcg serve``
    of ``model_dir`` (JSON ``dataframe_split``, one row each, encoded beforehand; the answer read and
    decoded), after the ``warmup`` requests (default: the first request) sent untimed by each client.

    Both servers are up at once and every request goes to each in turn, so drift hits them alike:
    ``http_*`` (MLflow's) and ``convcg_http_*`` on one kept-alive connection (as a service or a load
    balancer holds it), ``..._new_connection_*`` with a connection per request."""
    from convcg_cli.serve.http import JsonClient, local_server, post_json

    def bodies_of(table: pl.DataFrame) -> list[dict]:
        return [
            {"dataframe_split": {"columns": table.columns, "data": [list(row)]}, "params": {"k": k}}
            for row in table.iter_rows()
        ]

    bodies = bodies_of(requests)
    encoded = [json.dumps(body).encode() for body in bodies]
    seconds: dict[str, list[float]] = {
        f"{prefix}{kind}": [] for prefix in HTTP_SERVERS.values() for kind in ("", "_new_connection")
    }
    with ExitStack() as stack:
        urls = {
            prefix: stack.enter_context(local_server(str(model_dir), server=server))
            for server, prefix in HTTP_SERVERS.items()
        }
        clients = {prefix: stack.enter_context(JsonClient(url)) for prefix, url in urls.items()}
        for prefix, url in urls.items():
            for body in bodies_of(warmup) if warmup is not None and warmup.height else bodies[:1]:
                clients[prefix].post("/invocations", json.dumps(body).encode())
                post_json(f"{url}/invocations", body)
        for body, data in zip(bodies, encoded, strict=True):
            for prefix, url in urls.items():
                start = time.perf_counter()
                status, answer = clients[prefix].post("/invocations", data)
                seconds[prefix].append(time.perf_counter() - start)
                if status != 200:
                    raise RuntimeError(f"/invocations answered {status}: {answer}")
                start = time.perf_counter()
                post_json(f"{url}/invocations", body)
                seconds[f"{prefix}_new_connection"].append(time.perf_counter() - start)
    return {f"{name}_{stat}": v for name, values in seconds.items() for stat, v in latency_ms(values).items()}


def step_serve(cfg: DictConfig, workdir: str, data_dir: str) -> dict:
    """Bundle convcg train's model on ``data_dir`` (its weights do not change the timings), save and
    load it as a pyfunc model served from the exact index and from the ANN one, and time single
    requests (both), batch retrieval and the bare exact path."""

    from convcg_cli import tracking
    from convcg_cli.bench.training import setup_model, train_config
    from convcg_cli.index import exact_topk
    from convcg_cli.index.approximate import ivf_cells
    from convcg_cli.serve.batch import retrieve_file
    from convcg_cli.serve.bundle import request_rows
    from convcg_cli.serve.export import make_bundle, save_bundle, serve_options
    from convcg_cli.serve.model import CandidateModel

    s = cfg.serve
    train_cfg = train_config(cfg, data_dir, workdir)
    dm, model, _ = setup_model(train_cfg)
    model.eval()
    bundle = make_bundle(train_cfg, dm, model, serve_options(train_cfg, {"index": "exact"}))
    model_dir = save_bundle(bundle, Path(workdir) / "pyfunc")
    # The same model served from the ANN index of conf/train.yaml's serve block (serve.index=ivf).
    ivf_bundle = make_bundle(train_cfg, dm, model, serve_options(train_cfg, {"index": "ivf"}))
    ivf_dir = save_bundle(ivf_bundle, Path(workdir) / "pyfunc-ivf")
    store = tracking.Store.from_config(train_cfg.logger)
    served = {
        "exact": tracking.load_served_model(store, str(model_dir)),
        "ivf": tracking.load_served_model(store, str(ivf_dir)),
    }
    k = min(int(s.k), len(bundle.item_ids))
    single = bench_requests(bundle.users.user_ids, bundle.surfaces, int(s.requests), cfg.seed).to_pandas()
    warmup = bench_requests(bundle.users.user_ids, bundle.surfaces, warmup_requests(cfg), cfg.seed + 2)
    seconds = single_request_seconds(served, single, warmup, k)
    n_http = min(int(s.http_requests), len(single))
    http_rows = pl.from_pandas(single.iloc[:n_http])
    http = http_latency(Path(model_dir), http_rows, k, warmup) if n_http else {}
    ivf_http = http_latency(Path(ivf_dir), http_rows, k, warmup) if n_http else {}

    candidates = CandidateModel(bundle)
    batch = bench_requests(bundle.users.user_ids, bundle.surfaces, int(s.batch_requests), cfg.seed + 1)
    requests_path = Path(workdir) / "serve-requests.parquet"
    batch.write_parquet(requests_path)
    query_emb = candidates.retriever.embed_queries(candidates.encoder.encode(request_rows(batch)))
    batch_k = min(int(cfg.retrieval.k), len(bundle.item_ids))
    retrieve_s, exact_s = [], []
    for _ in range(int(s.rounds)):  # interleaved, so drift hits both alike
        result = retrieve_file(
            candidates, requests_path, Path(workdir) / "serve-candidates.parquet", batch_k, int(s.chunk_rows)
        )
        retrieve_s.append(result.seconds)
        start = time.perf_counter()
        exact_topk(query_emb, bundle.item_emb, batch_k)
        exact_s.append(time.perf_counter() - start)
    n = batch.height
    # the two models timed above, each loaded with its saved index and with it rebuilt; then the
    # IVF model is removed (the exact one stays, as the step's served model)
    loads = load_times(
        {"exact": Path(model_dir), "ivf": Path(ivf_dir)}, store, int(s.get("load_rounds", LOAD_ROUNDS))
    )
    shutil.rmtree(ivf_dir, ignore_errors=True)
    return {
        "items": len(bundle.item_ids),
        "k": k,
        "requests": len(single),
        "warmup_requests": warmup.height,
        **latency_ms(seconds["exact"]),
        "http_requests": n_http,
        **http,
        "ivf": {
            "nlist": ivf_cells(int(ivf_bundle.index["nlist"]), len(bundle.item_ids)),
            "nprobe": int(ivf_bundle.index["nprobe"]),
            **latency_ms(seconds["ivf"]),
            **ivf_http,
        },
        "batch_requests": n,
        "batch_k": batch_k,
        "retrieve_rps": n / min(retrieve_s),
        "exact_qps": n / min(exact_s),
        "retrieve_vs_exact": min(exact_s) / min(retrieve_s),
        **index_build_seconds(bundle.item_emb, int(cfg.retrieval.ann_options.ivf_flat.nlist)),
        **loads,
        "peak_rss_mib_before_batch": peak_rss_mib(),
    }
