"""Sections (g)-(i) of the benchmark report: what convcg's own commands cost, from the raw results
alone: the served model (g), ``convcg eval``'s steps (h) and a grid's phases with the data set up per
cell or once (i). Each section is empty for results saved before its step existed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from convcg_cli.bench.figures import (
    FIRST_EVAL_OVER_NEXT,
    FIRST_EVAL_OVER_NEXT_IN_PROCESS,
    HTTP_SERVERS,
    RATIO_CEILINGS,
    ceiling_verdict,
    eval_metrics,
)
from convcg_cli.markdown import table
from convcg_cli.report_paths import Places, portable_text
from convcg_cli.serve.http import SERVER_TITLES


def _workdir(results: Mapping[str, Any]) -> dict[str, str]:
    """``{"WORKDIR": the run's temporary directory}``, where the results name it (newer runs)."""
    return {"WORKDIR": results["workdir"]} if results.get("workdir") else {}


def eval_section(results: Mapping[str, Any], places: Places | None = None) -> list[str]:
    """(h): ``convcg eval``'s steps and their share of its time, per data set: the first run and the
    next, each in a fresh process, then both in one process; against the bare ``exact_topk`` of as
    many queries over as many items (absent from older results: no section; results saved before
    the processes were timed have the runs of one process only, as their first and next).
    Paths in a step's text are written as ``places`` makes them portable (default: this process's)."""
    if not results.get("eval"):
        return []
    places = Places.here(**_workdir(results)) if places is None else places
    lines = [
        "## (h) Where `convcg eval`'s time goes",
        "",
        "A run of the default design trained for a few batches, then evaluated as `convcg eval` does "
        "(the baselines of the KuaiRand grids, bootstrap CIs, MLflow logging), each step it shows timed. "
        "The first and the next run are each a fresh process, as two `convcg eval` commands are: the "
        "next reuses the first's baseline runs, and loads again what any process loads (the bootstrap "
        "draws, the compiled kernels). Then both again in one process, as the cells of a grid run: the "
        "first scoring its baselines again, the next also reusing the first's bootstrap draws. The "
        "reference is the bare `exact_topk` of as many random queries over as many items, in that "
        "process. Results saved before the processes were timed hold the runs of one process only.",
        "",
    ]
    for point in results["eval"]:
        total, again = float(point["total_s"]), float(point.get("total_again_s", float("nan")))
        rows = [
            [
                portable_text(step["step"], places),
                f"{step['seconds']:.1f}",
                f"{100 * step['seconds'] / total:.0f}%",
            ]
            for step in point["steps"]
        ]
        rows.append(["**all of `convcg eval`, first run on these data**", f"**{total:.1f}**", "100%"])
        if "first_process_s" in point:
            rows.append(
                [
                    "the whole first process (start, imports, config, run)",
                    f"{point['first_process_s']:.1f}",
                    "",
                ]
            )
        rows += [
            [
                f"next run: {portable_text(step['step'], places)}",
                f"{step['seconds']:.1f}",
                f"{100 * step['seconds'] / again:.0f}%",
            ]
            for step in point.get("steps_again", [])
        ]
        if "steps_again" in point:
            rows.append(["**all of `convcg eval`, next run (baselines reused)**", f"**{again:.1f}**", "100%"])
        if "next_process_s" in point:
            rows.append(["the whole next process", f"{point['next_process_s']:.1f}", ""])
        in_process = point.get("in_process")
        if in_process:
            rows += [
                [f"in one process: {label}", f"{in_process[which]['total_s']:.1f}", ""]
                for which, label in (
                    ("first", "first run (baselines scored again)"),
                    ("next", "next run (baselines and bootstrap draws reused)"),
                )
            ]
        last = in_process["next"]["total_s"] if in_process else (total if math.isnan(again) else again)
        rows.append(
            [
                f"bare `exact_topk`, {point['queries']:,} queries x {point['items']:,} items, k={point['k']}",
                f"{point['exact_topk_s']:.2f}",
                f"{100 * point['exact_topk_s'] / last:.0f}% (of the last)",
            ]
        )
        lines += [f"`{point['data']}`:", "", table(["step", "seconds", "share"], rows, align="lrr"), ""]
        if in_process and not math.isnan(again):
            lines += [
                f"First run over the next: **{total / again:.2f}x** as processes (`convcg eval`'s own "
                f"time; {point['first_process_s'] / point['next_process_s']:.2f}x whole processes), "
                f"{in_process['first']['total_s'] / in_process['next']['total_s']:.2f}x in one process.",
                "",
            ]
    return lines


def eval_verdicts(results: Mapping[str, Any]) -> list[list[str]]:
    """The target row of (h), where measured: the first ``convcg eval`` on the bench preset over the
    next, each a process; with the same ratio in one process beside it (not the target: there the
    next reuses the first's bootstrap draws, which no second command has)."""
    figures = eval_metrics(results)
    if FIRST_EVAL_OVER_NEXT not in figures:
        return []
    data, ceiling = results["eval"][-1]["data"], RATIO_CEILINGS[FIRST_EVAL_OVER_NEXT]
    value, in_process = figures[FIRST_EVAL_OVER_NEXT], figures[FIRST_EVAL_OVER_NEXT_IN_PROCESS]
    return [
        [
            f"first `convcg eval` on `{data}` / the next, each a fresh process (h)",
            f"{value:.2f}x",
            f"<= {ceiling:g}x",
            ceiling_verdict(value, ceiling),
        ],
        [
            "the same, both in one process, as a grid's cells (h)",
            f"{in_process:.2f}x",
            "",
            "(the next also reuses the first's bootstrap draws)",
        ],
    ]


def serving_section(results: Mapping[str, Any]) -> list[str]:
    """(g): the served model's single-request latency, batch retrieve vs the bare exact path, index
    build times (absent from results saved before the step existed: no section)."""
    if "serve" not in results:
        return []
    srv = results["serve"]
    rows = [
        [f"pyfunc `predict`, 1 request, k={srv['k']}", f"{srv['p50_ms']:.1f}", f"{srv['p99_ms']:.1f}"],
    ]
    for server, prefix in HTTP_SERVERS.items():
        rows += _http_rows(srv, f"`{SERVER_TITLES[server]}` `/invocations`, 1 request, k={srv['k']}", prefix)
    if "ivf" in srv:  # absent from results saved before the ANN-served model was timed
        ivf, index = srv["ivf"], f"IVF-Flat nlist={srv['ivf']['nlist']:,}, nprobe={srv['ivf']['nprobe']}"
        rows = [[f"exact index: {row[0]}", *row[1:]] for row in rows]
        rows.append(
            [
                f"{index}: pyfunc `predict`, 1 request, k={srv['k']}",
                f"{ivf['p50_ms']:.1f}",
                f"{ivf['p99_ms']:.1f}",
            ]
        )
        for server, prefix in HTTP_SERVERS.items():
            label = f"{index}: `{SERVER_TITLES[server]}` `/invocations`, 1 request, k={srv['k']}"
            rows += _http_rows(ivf, label, prefix)
    batch = [
        [
            "`convcg retrieve` (encode + search + write)",
            f"{srv['retrieve_rps']:,.0f}",
            f"{srv['retrieve_vs_exact']:.2f}",
        ],
        ["bare `exact_topk` of (c) (search only: the limit)", f"{srv['exact_qps']:,.0f}", "1.00"],
    ]
    builds = [
        ["exact (`ExactIndex`)", f"{srv['exact_build_s']:.3f}"],
        ["IVF-Flat", f"{srv['ivf_build_s']:.3f}"],
    ]
    loads = [  # absent from results saved before the index travelled with the model
        [f"{name} index", f"{srv[f'load_{key}_s']:.3f}", f"{srv[f'load_{key}_rebuild_s']:.3f}"]
        for name, key in (("exact", "exact"), ("IVF-Flat", "ivf"))
        if f"load_{key}_s" in srv
    ]
    return [
        "## (g) Serving: the pyfunc model and batch candidates",
        "",
        f"The run's served model over {srv['items']:,} items, saved and loaded as MLflow serves it (schema "
        f"checks included); {srv['requests']:,} single requests of random known users, the surfaces in turn"
        + (
            f", after {srv['warmup_requests']} others sent untimed (a served model is warm)"
            if "warmup_requests" in srv
            else ""
        )
        + (
            ", each sent to the model served from the exact index (`serve.index=exact`) and to the same "
            "model served from the ANN index (`serve.index=ivf`, conf/train.yaml's serve block), in turn."
            if "ivf" in srv
            else "."
        ),
        "",
        table(["call", "p50 ms", "p99 ms"], rows, align="lrr"),
        "",
        f"Batch: {srv['batch_requests']:,} requests, k={srv['batch_k']}, one process, interleaved rounds, "
        "the fastest of each; the ratio is retrieve's requests/s over the bare path's queries/s.",
        "",
        table(["path", "requests/s", "ratio to exact_topk"], batch, align="lrr"),
        "",
        table(["index build", "seconds"], builds, align="lr"),
        "",
        *(
            [
                "Model load (`mlflow.pyfunc.load_model` of the saved model, fastest of interleaved rounds): "
                "with the index saved in the model, and with its file removed (rebuilt at load).",
                "",
                table(["served model", "load s (saved index)", "load s (rebuilt)"], loads, align="lrr"),
                "",
            ]
            if loads
            else []
        ),
        f"The HTTP rows time a local client's JSON request ({srv.get('http_requests', 0):,} of the requests) "
        "to the server's `/invocations` end to end (HTTP, parsing, predict and writing the answer; the "
        "client reads and decodes it): on one kept-alive connection, as a service or a load balancer "
        "holds it (the targets' figure), and with a new connection per request, the two in turn"
        + (
            "; `mlflow models serve` and `convcg serve` are both up, and each request goes to one, then the "
            "other. Both answer the same bytes. MLflow's server adds its middleware and thread hop, its "
            "schema casts through pandas and a pure-Python JSON encoder; `convcg serve` reads the body "
            "with `json.loads` into polars, checks it with the model's own request checks and writes the "
            "answer with the C encoder (docs/reference/serving.md)"
            if "convcg_http_p50_ms" in srv
            else ""
        )
        + ". The servers and the client share the cores.",
        "",
    ]


def _http_rows(figures: Mapping[str, Any], label: str, prefix: str = "http") -> list[list[str]]:
    """The ``/invocations`` rows of one served model and server (``prefix``: ``http`` for MLflow's,
    ``convcg_http``): kept-alive connection, and a new connection per request where measured (absent
    from results saved before: fewer rows)."""
    rows = []
    if f"{prefix}_p50_ms" in figures:
        rows.append([label, f"{figures[f'{prefix}_p50_ms']:.1f}", f"{figures[f'{prefix}_p99_ms']:.1f}"])
    if f"{prefix}_new_connection_p50_ms" in figures:
        rows.append(
            [
                f"{label}, a new connection per request",
                f"{figures[f'{prefix}_new_connection_p50_ms']:.1f}",
                f"{figures[f'{prefix}_new_connection_p99_ms']:.1f}",
            ]
        )
    return rows


def grid_section(results: Mapping[str, Any]) -> list[str]:
    """(i): a reduced ablation grid with its data set up per training and evaluation (before) and
    once per grid (after), per phase (absent from older results: no section)."""
    from convcg_cli.bench.grid import PHASES, TRAINING

    if not results.get("grid"):
        return []
    lines = [
        "## (i) A grid's wall time: data set up per cell (before) vs once per grid (after)",
        "",
        "A reduced grid through `run_ablation` (`grid_timing` in conf/bench.yaml), in one process, "
        "with the data set up by every training and every evaluation (before) and with the set-up "
        "data reused by every cell whose data and data options are identical (after: "
        "`PreparedDataCache`, `convcg ablate`'s default), the order alternating round by round. Each "
        "run starts from an empty MLflow store, so both score their baselines once (the first cell) "
        "and reuse them in the later cells (`baseline_cache`, `reuse_baseline_runs`). Phases are "
        "the steps `convcg ablate` shows; the load average (1 min) is read before and after each run, "
        "since the machine is shared: the per-phase ratios are the figures to read. A case on data "
        "not at hand is skipped (`kuairand` runs once `grid_timing.cases.kuairand.data_dir` names "
        "the imported logs).",
        "",
    ]
    for case in results["grid"]:
        before = _mean_phases([r for r in case["runs"] if not r["reuse_data"]])
        after = _mean_phases([r for r in case["runs"] if r["reuse_data"]])
        rows = [
            [phase, f"{before[phase]:.1f}", f"{after[phase]:.1f}", _ratio(after[phase], before[phase])]
            for phase in [*PHASES, TRAINING]
        ]
        total = [f"{before[WALL]:.1f}", f"{after[WALL]:.1f}", _ratio(after[WALL], before[WALL])]
        rows.append([f"**{cell}**" for cell in ["grid wall time", *total]])
        load_rows = [
            [
                str(r["round"]),
                "after" if r["reuse_data"] else "before",
                f"{r['total_s']:.1f}",
                f"{r['load_before']:.2f}",
                f"{r['load_after']:.2f}",
            ]
            for r in case["runs"]
        ]
        same = "identical" if case["same_figures"] else "**NOT identical**"
        variants = ", ".join(f"`{v}`" for v in case["variants"])
        lines += [
            f"`{case['grid']}` on `{case['data']}`: variants {variants}, seeds {case['seeds']} "
            f"({case['cells']} cells), train overrides `{case['train_overrides']}`. Every cell's figures "
            f"before and after, to the 4th decimal: {same}.",
            "",
            table(["phase", "before s", "after s", "after/before"], rows, align="lrrr"),
            "",
            table(["round", "run", "wall s", "load before", "load after"], load_rows, align="llrrr"),
            "",
            *_step_lines(case.get("step")),
        ]
    return lines


def _step_lines(step: Mapping[str, Any] | None) -> list[str]:
    """What bounds the training phase: a cell's training step against a bare GEMM of its own matrix
    products (absent from older results: nothing)."""
    if not step:
        return []
    rest = 1.0 - step["vs_gemm"]
    return [
        f"What bounds its training: a training step of `{step['variant']}` on these data (batch "
        f"{step['batch_size']}, {step['threads']} thread(s), bare loop) takes {step['step_ms']:.1f} ms; "
        f"its {step['matmuls']} matrix products ({step['matmul_gflop']:.2f} GFLOP) run bare, on random "
        f"operands of the same shapes, in {step['gemm_ms']:.1f} ms. The step runs at "
        f"**{step['vs_gemm']:.2f} of a bare GEMM** ({step['step_gflops_per_s']:.1f} against "
        f"{step['gemm_gflops_per_s']:.1f} GFLOP/s): everything else (data, element-wise work, the "
        f"optimizer) is {rest:.0%} of it, so a faster step that does the same arithmetic can save at "
        f"most that share.",
        "",
    ]


WALL = "wall"


def _mean_phases(runs: list[Mapping[str, Any]]) -> dict[str, float]:
    """Mean seconds per phase (and of the wall time, ``WALL``) over ``runs`` of one way."""
    names = [*runs[0]["phases"], WALL]
    return {n: float(np.mean([r["total_s"] if n == WALL else r["phases"][n] for r in runs])) for n in names}


def _ratio(after: float, before: float) -> str:
    return f"{after / before:.2f}" if before > 0 else "-"
