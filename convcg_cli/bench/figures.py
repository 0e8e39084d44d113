"""The figures a benchmark run yields, from its raw results: MLflow metrics, targets, growth exponents.

Pure functions of the results dict ``runner.run`` returns; the report and the MLflow run both read them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from convcg_cli.bench.measure import growth_exponent

# Metric names of the targets the issue sets (also used in the report's verdicts).
LIGHTNING_VS_BARE = "bench/train/lightning_vs_bare"
DATA_VS_MODEL = "bench/data/data_vs_model"
EXACT_VS_GEMM = "bench/retrieval/exact_vs_gemm"
SERVING_ANN_OVERLAP = "bench/corpus/serving_ann/overlap"
SERVING_ANN_SPEEDUP = "bench/corpus/serving_ann/speedup"
SERVE_PYFUNC_P99 = "bench/serve/ivf/p99_ms"
SERVE_HTTP_OVER_PYFUNC = "bench/serve/ivf/http_over_pyfunc_p99_ms"  # mlflow models serve's
SERVE_CONVCG_HTTP_OVER_PYFUNC = "bench/serve/ivf/convcg_http_over_pyfunc_p99_ms"  # convcg serve's
SERVED_LARGEST_P99 = "bench/corpus/served/p99_ms"
# The HTTP servers (g) times (convcg_cli.serve.http's names), each with the prefix of its figures,
# and the figure of what each adds to pyfunc's p99.
HTTP_SERVERS = {"mlflow": "http", "convcg": "convcg_http"}
HTTP_OVER_PYFUNC = {"http": SERVE_HTTP_OVER_PYFUNC, "convcg_http": SERVE_CONVCG_HTTP_OVER_PYFUNC}
# The bench preset's first `convcg eval` over the next (baselines' runs reused), each in a fresh
# process as the command runs (h); and both in one process, as a grid's cells run.
FIRST_EVAL_OVER_NEXT = "bench/eval/first_over_next"
FIRST_EVAL_OVER_NEXT_IN_PROCESS = "bench/eval/first_over_next_in_process"
TARGETS = {
    LIGHTNING_VS_BARE: 0.9,
    DATA_VS_MODEL: 5.0,
    EXACT_VS_GEMM: 0.6,  # exact top-k's GFLOP/s over the bare GEMM of its shapes'
    SERVING_ANN_OVERLAP: 0.95,  # the served ANN's share of exact's top k, at the largest corpus
    SERVING_ANN_SPEEDUP: 5.0,  # its throughput over exact's there
}
# Targets a figure must stay at or under (milliseconds).
CEILINGS = {
    SERVE_PYFUNC_P99: 3.0,  # pyfunc predict p99, one request, k=100, the ANN-served model (g)
    SERVE_CONVCG_HTTP_OVER_PYFUNC: 3.0,  # what convcg serve's /invocations adds to it at p99
    SERVED_LARGEST_P99: 5.0,  # pyfunc predict p99, the ANN-served model at the largest corpus (j)
}
# Targets a ratio must stay at or under.
RATIO_CEILINGS = {
    FIRST_EVAL_OVER_NEXT: 2.0,  # the first convcg eval on the bench preset over the next (h)
}


def verdict(value: float, target: float) -> str:
    """``pass`` when ``value`` reaches ``target``, else a bold FAIL."""
    return "pass" if value >= target else "**FAIL**"


def ceiling_verdict(value: float, ceiling: float) -> str:
    """``pass`` when ``value`` stays at or under ``ceiling``, else a bold FAIL."""
    return "pass" if value <= ceiling else "**FAIL**"


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
    for name in ("faiss_s", "gemm_s"):  # absent from results saved before they were timed
        if name in ret:
            out[f"bench/retrieval/{name}"] = ret[name]
    if "exact_vs_gemm" in ret:
        out[EXACT_VS_GEMM] = ret["exact_vs_gemm"]
    out.update(corpus_metrics(results))
    out.update(serve_metrics(results))
    out.update(eval_metrics(results))
    for task, value in ret["exact_recall"].items():
        out[f"bench/retrieval/exact/{task}/recall"] = value
    for r in ret["ann_runs"]:
        prefix = f"bench/retrieval/ann_{ret['ann_effort_name']}_{r['effort']}"
        out.update({f"{prefix}/{k}": r[k] for k in ("search_s", "speedup", "overlap")})
        out.update({f"{prefix}/{task}/recall": value for task, value in r["recall"].items()})
    for label, step in step_figures(results):
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


def serve_metrics(results: Mapping[str, Any]) -> dict[str, float]:
    """Single-request latencies of the served model (g), exact- and ANN-served, in process and over
    HTTP (``mlflow models serve``, ``convcg serve``), where measured."""
    srv = results.get("serve")
    if not srv:
        return {}
    prefixes = HTTP_SERVERS.values()
    out = {
        f"bench/serve/exact/{name}": srv[name]
        for name in ("p50_ms", "p99_ms", *(f"{p}_p99_ms" for p in prefixes))
        if name in srv
    }
    ivf = srv.get("ivf")
    if ivf:
        out.update(
            {
                f"bench/serve/ivf/{name}": ivf[name]
                for name in ("p50_ms", *(f"{p}_{stat}" for p in prefixes for stat in ("p50_ms", "p99_ms")))
                if name in ivf
            }
        )
        out[SERVE_PYFUNC_P99] = ivf["p99_ms"]
        out.update(
            {
                figure: ivf[f"{prefix}_p99_ms"] - ivf["p99_ms"]
                for prefix, figure in HTTP_OVER_PYFUNC.items()
                if f"{prefix}_p99_ms" in ivf
            }
        )
    return out


def eval_metrics(results: Mapping[str, Any]) -> dict[str, float]:
    """``convcg eval``'s first and next run per data set (h), in seconds, and the bench preset's
    (the last measured) first-over-next ratios, where measured: as processes (the target) and in one
    process (results saved before the processes were timed have the latter only, as their ratio)."""
    points = [p for p in results.get("eval", []) if "total_again_s" in p]
    out: dict[str, float] = {}
    for point in points:
        prefix = f"bench/eval/{point['data']}"
        out[f"{prefix}/first_s"], out[f"{prefix}/next_s"] = point["total_s"], point["total_again_s"]
        for name in ("first_process_s", "next_process_s"):
            if name in point:
                out[f"{prefix}/{name}"] = point[name]
    if points:
        last = points[-1]
        in_process = last.get("in_process")
        if in_process is None:  # older results: both runs were timed in the step's process
            out[FIRST_EVAL_OVER_NEXT_IN_PROCESS] = last["total_s"] / last["total_again_s"]
        else:
            out[FIRST_EVAL_OVER_NEXT] = last["total_s"] / last["total_again_s"]
            out[FIRST_EVAL_OVER_NEXT_IN_PROCESS] = (
                in_process["first"]["total_s"] / in_process["next"]["total_s"]
            )
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


def step_figures(results: Mapping[str, Any]) -> list[tuple[str, dict]]:
    """(label, figures) of every subprocess step, in run order."""
    steps = [(name, results[name]) for name in ("baseline", "synth", "data", "train", "retrieval")]
    steps += [(f"corpus_{point['items']}", point) for point in results.get("corpus", [])]
    for point in results["scale"]:
        steps += [
            (f"scale_{point['factor']:g}_synth", point["synth"]),
            (f"scale_{point['factor']:g}", point["run"]),
        ]
    for point in results.get("memory", []):
        steps += [(f"days_{point['factor']:g}_synth", point["synth"])]
        steps += [(f"days_{point['factor']:g}_{mode}", point[mode]) for mode in MEMORY_MODES]
    return steps


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


def serving_run(point: Mapping[str, Any]) -> dict[str, Any] | None:
    """The run of the served ANN (``corpus.serving``: an index of ``corpus.ann`` and its effort) at
    one corpus size, or None when it was not measured."""
    serving = point.get("serving") or {}
    for ann in point.get("ann", []):
        if ann["name"] == serving.get("ann"):
            for run in ann["runs"]:
                if run["effort"] == serving.get("effort"):
                    return run
    return None


def corpus_metrics(results: Mapping[str, Any]) -> dict[str, float]:
    """(j) as flat metrics: per corpus size, exact's and each ANN effort's speed and overlap; the
    served ANN at the largest size (the targets); every growth exponent."""
    points = results.get("corpus", [])
    out: dict[str, float] = {}
    for point in points:
        prefix = f"bench/corpus/{point['items']}"
        exact = point["exact"]
        out.update(
            {f"{prefix}/exact/{k}": exact[k] for k in ("build_s", "qps", "p50_ms", "p99_ms", "vs_gemm")}
        )
        for ann in point["ann"]:
            for run in ann["runs"]:
                name = f"{prefix}/{ann['name']}/{ann['effort_name']}_{run['effort']}"
                out.update({f"{name}/{k}": run[k] for k in ("qps", "speedup", "overlap", "p50_ms", "p99_ms")})
            out[f"{prefix}/{ann['name']}/build_s"] = ann["build_s"]
        served = point.get("served")  # absent from results saved before it was measured
        if served:
            out.update({f"{prefix}/served/{k}": served[k] for k in ("load_s", "p50_ms", "p99_ms")})
    if points and points[-1].get("served"):
        out[SERVED_LARGEST_P99] = points[-1]["served"]["p99_ms"]
    if points and serving_run(points[-1]) is not None:
        run = serving_run(points[-1]) or {}
        out[SERVING_ANN_OVERLAP], out[SERVING_ANN_SPEEDUP] = run["overlap"], run["speedup"]
    out.update({f"bench/corpus/{cost}_exponent": value for cost, value in corpus_exponents(points).items()})
    return out


def corpus_costs(point: Mapping[str, Any]) -> dict[str, float]:
    """Every cost of (j) at one corpus size, by name: exact's and each ANN's build and batch search
    (CPU seconds: one thread, less disturbed by other processes than wall time), bytes, single-request
    latency (wall p50, per effort), and the step's peak memory."""
    exact = point["exact"]
    costs = {
        "exact/build_cpu_s": exact.get("build_cpu_s", exact["build_s"]),  # wall in older results
        "exact/mib": exact["nbytes"] / 2**20,
        "exact/search_cpu_s": exact.get("search_cpu_s", exact["search_s"]),
        "exact/p50_ms": exact["p50_ms"],
        "step/peak_mib": point["peak_rss_mib"],
    }
    if point.get("served"):
        costs["served/load_s"] = point["served"]["load_s"]
        costs["served/p50_ms"] = point["served"]["p50_ms"]
    for ann in point["ann"]:
        costs[f"{ann['name']}/build_cpu_s"] = ann.get("build_cpu_s", ann["build_s"])
        costs[f"{ann['name']}/mib"] = ann["nbytes"] / 2**20
        for run in ann["runs"]:
            effort = f"{ann['name']}/{ann['effort_name']}_{run['effort']}"
            costs[f"{effort}/search_cpu_s"] = run.get("search_cpu_s", run["search_s"])
            costs[f"{effort}/p50_ms"] = run["p50_ms"]
    return costs


def corpus_exponents(points: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Growth exponent of every cost of :func:`corpus_costs` against the number of items (the costs
    measured at every size; none with fewer than two sizes)."""
    if len(points) < 2:
        return {}
    costs = [corpus_costs(p) for p in points]
    sizes = [p["items"] for p in points]
    names = [name for name in costs[0] if all(name in c for c in costs)]
    return {name: growth_exponent(sizes, [max(c[name], 1e-6) for c in costs]) for name in names}
