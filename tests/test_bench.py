"""The benchmark harness: its measuring helpers against brute force, and `--quick` end to end.

No timing is asserted anywhere: the machine is shared, only the report's shape is checked.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path, PurePosixPath

import numpy as np
import pytest

from convcg_cli.bench import figures, measure, report, report_commands
from convcg_cli.bench.cli import bench_config
from convcg_cli.config import instantiate
from convcg_cli.index import exact_topk
from convcg_cli.report_paths import Places

REPO = Path(__file__).resolve().parents[1]
SECTIONS = [
    "## (a) Training throughput",
    "## (b) Data path vs model consumption",
    "## (c) Exact top-k evaluation vs torch vs an ANN index",
    "## (d) Peak resident memory of each step",
    "## (e) How costs grow",
    "## (f) Bounded memory: streamed training as the log grows",
    "## (g) Serving: the pyfunc model and batch candidates",
    "## (j) A million items: exact and approximate search as the corpus grows",
]


def _unit(rows: int, seed: int, dim: int = 16) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_growth_exponent_recovers_a_power_law():
    sizes = [1e5, 4e5, 1.6e6]
    assert measure.growth_exponent(sizes, [3e-6 * s**1.5 for s in sizes]) == pytest.approx(1.5)
    assert measure.growth_exponent(sizes, [7.0, 7.0, 7.0]) == pytest.approx(0.0, abs=1e-12)


def test_scale_exponents_fit_memory_above_the_import_baseline():
    base = {"synth_mib": 100.0, "train_mib": 400.0}
    points = [
        {
            "synth": {"impressions": n, "seconds": n / 1e5, "peak_rss_mib": 100 + n / 1e4},
            "run": {"setup_s": 1.0, "peak_rss_mib": 400 + n / 1e4, "step_cpu_ms": 50.0, "topk_s": n**0.5},
        }
        for n in (1e5, 1e6, 1e7)
    ]
    exponents = figures.scale_exponents(points, base)
    assert exponents["synth_s"] == pytest.approx(1.0) and exponents["topk_s"] == pytest.approx(0.5)
    assert exponents["train_mib_above_baseline"] == pytest.approx(1.0)  # not diluted by the 400 MiB
    assert exponents["step_cpu_ms"] == pytest.approx(0.0, abs=1e-12)


def test_memory_exponents_and_verdict_of_the_bounded_memory_sweep():
    results = {
        "baseline": {"train_mib": 500.0},
        "memory": [
            {
                "factor": f,
                "synth": {"impressions": int(1e6 * f)},
                "streamed": {"peak_rss_mib": 500 + 300.0},  # flat above the baseline
                "in_memory": {"peak_rss_mib": 500 + 300.0 * f},  # linear
            }
            for f in (0.25, 1.0, 4.0)
        ],
    }
    exps = figures.memory_exponents(results)
    assert exps["streamed"] == pytest.approx(0.0, abs=1e-12) and exps["in_memory"] == pytest.approx(1.0)
    assert report.memory_verdict(results)[0][1:] == ["0.00", "< 0.1", "pass"]
    results["memory"][2]["streamed"]["peak_rss_mib"] = 500 + 600.0
    assert report.memory_verdict(results)[0][-1] == "**FAIL**"
    assert figures.memory_exponents({"memory": []}) == {}


def test_a_memory_cell_of_less_than_one_chunk_is_flagged():
    # A cell whose training impressions fit in less than one chunk streams a smaller chunk: its peak
    # is not comparable, and the report says so (the quick config's chunk is 4,000 rows).
    results = _fake_results()
    results["memory"][0]["streamed"] = {**results["memory"][0]["streamed"], "train_rows": 3999}
    results["memory"][1]["streamed"] = {**results["memory"][1]["streamed"], "train_rows": 4000}
    text = report.render_report(bench_config([], quick=True), results)
    flagged = "**Not comparable:** the cells of 3,999 training impressions hold less than one chunk"
    assert f"{flagged} (4,000 rows)" in text
    results["memory"][0]["streamed"]["train_rows"] = 4000
    assert "Not comparable" not in report.render_report(bench_config([], quick=True), results)


def test_topk_overlap_matches_brute_force_and_ignores_padding():
    rng = np.random.default_rng(0)
    exact = np.stack([rng.permutation(50)[:10] for _ in range(30)])
    approx = np.stack([rng.permutation(50)[:10] for _ in range(30)])
    approx[:5, -3:] = -1  # IVF pads rows whose probed cells hold fewer than k items
    brute = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact, strict=True)])
    assert measure.topk_overlap(approx, exact) == pytest.approx(brute)
    assert measure.topk_overlap(exact, exact) == 1.0


def test_torch_topk_finds_the_exact_top_k():
    queries, items = _unit(40, 1), _unit(300, 2)  # random floats: no ties
    _, exact = exact_topk(queries, items, 25)
    plain = measure.torch_topk(queries, items, 25, max_cells=1000)  # several chunks
    assert np.array_equal(np.sort(plain, axis=1), np.sort(exact, axis=1))


@pytest.mark.parametrize("block", ["retrieval", "corpus"])
@pytest.mark.parametrize("name", ["ivf_flat", "hnsw", "ivf_sq8", "ivf_pq_fastscan"])
def test_configured_ann_indexes_build_and_search(block, name):
    cfg = bench_config([], quick=False)
    ann = instantiate(cfg[block].ann_options[name])
    queries, items = _unit(50, 3, dim=64), _unit(2000, 4, dim=64)
    ann.build(items)
    ids = ann.search(queries, 20, ann.efforts[0])
    assert ids.shape == (50, 20) and ids.max() < len(items) and ann.nbytes > 0
    assert name.split("_")[0] in ann.description.lower().replace("-", "_")
    assert name in cfg.corpus.ann


def test_blocked_gemm_reference_times_the_products():
    assert measure.blocked_gemm_seconds(_unit(600, 5, dim=64), _unit(9000, 6, dim=64)) > 0


def test_quick_config_merges_over_the_full_one():
    full, quick = bench_config([], quick=False), bench_config(["seed=3"], quick=True)
    assert full.preset == "large" and quick.preset == "tiny" and quick.seed == 3
    assert quick.report.endswith("bench-quick.md") and full.report.endswith("reports/bench/bench.md")
    ivf, hnsw = quick.retrieval.ann_options.ivf_flat, quick.retrieval.ann_options.hnsw
    assert ivf.nlist == 16 and list(ivf.efforts) == [2, 16] and hnsw.m == 32


def _corpus_point(items: int) -> dict:
    """A (j) step's figures at ``items``: exact's costs linear in the items, the ANN's square-root."""
    exact = {"k": 10, "build_s": 1e-5 * items, "nbytes": 256 * items, "search_s": 1e-4 * items}
    exact |= {"build_cpu_s": 1e-5 * items, "search_cpu_s": 1e-4 * items}
    exact |= {"qps": 1e6 / items, "p50_ms": 1e-3 * items, "p99_ms": 2e-3 * items, "eval_k": 100}
    exact |= {"eval_search_s": 2e-4 * items, "gemm_s": 1e-4 * items, "vs_gemm": 0.5, "gflop": 1e-3 * items}
    runs = [
        {
            "effort": e,
            "search_s": e * 1e-3 * items**0.5,
            "qps": 1.0,
            "speedup": 10.0 / e,
            "overlap": 0.9 + e / 400,
        }
        | {"search_cpu_s": e * 1e-3 * items**0.5, "p50_ms": e * 1e-3 * items**0.5, "p99_ms": 1.0}
        for e in (16, 32)
    ]
    ann = {"name": "ivf_flat", "description": "IVF-Flat, nlist=16", "effort_name": "nprobe"}
    ann |= {"build_s": 1e-4 * items, "build_cpu_s": 1e-4 * items, "nbytes": 300 * items, "runs": runs}
    return (
        {"items": items, "dim": 64, "queries": 50, "synth_s": 1.0, "setup_s": 1.0, "train_s": 1.0}
        | {"embed_s": 1.0, "exact": exact, "serving": {"ann": "ivf_flat", "effort": 32}, "ann": [ann]}
        | {"wall_s": 5.0, "peak_rss_mib": 600.0}
    )


def _fake_results() -> dict:
    """Results of every step, shaped as runner.run returns them (no step run)."""
    step = {"wall_s": 1.0, "peak_rss_mib": 500.0}
    rnd = {"ratio": 0.95, "bare_step_ms_median": 10.0, "lightning_step_ms_median": 11.0}
    ann_run = {"effort": 2, "search_s": 0.05, "speedup": 2.0, "overlap": 0.9, "recall": {"conversion": 0.45}}
    mode = {**step, "train_rows": 10, "train_examples": 5, "setup_s": 1.0, "setup_mib": 450.0, "step_ms": 3.0}
    return {
        "started": "2026-01-01 00:00:00",
        "total_s": 60.0,
        "load_before": (1.0,),
        "load_after": (2.0,),
        "baseline": {**step, "synth_mib": 100.0, "train_mib": 400.0},
        "synth": {**step, "seconds": 0.0, "impressions": 100},
        "data": {**step, "setup_s": 1.0, "train_examples": 1000, "batches_per_epoch": 4, "batch_size": 256}
        | {"data_batches_per_s": 400.0},
        "train": {**step, "batch_size": 256, "batches": 20, "warmup": 2, "rounds": [rnd, rnd]}
        | {"bare_examples_per_s": 1000.0, "lightning_examples_per_s": 900.0, "lightning_vs_bare": 0.93}
        | {"lightning_vs_bare_pooled": 0.92, "lightning_vs_bare_cpu": 0.91, "fit_overhead_s": 0.5}
        | {"data_batches_per_s": 500.0, "model_batches_per_s": 5.0, "data_vs_model": 100.0}
        | {"trainer": {"max_epochs": "3"}},
        "serve": {**step, "items": 50, "k": 10, "requests": 20, "p50_ms": 2.0, "p99_ms": 5.0}
        | {"batch_requests": 500, "batch_k": 50, "retrieve_rps": 900.0, "exact_qps": 3000.0}
        | {"retrieve_vs_exact": 0.3, "exact_build_s": 0.001, "ivf_build_s": 0.01},
        "retrieval": {
            **step,
            "queries": 100,
            "items": 1000,
            "dim": 16,
            "k": 10,
            "exact_s": 0.1,
            "torch_s": 0.2,
        }
        | {"exact_recall": {"conversion": 0.5}, "ann": "IVF-Flat, nlist=16", "ann_effort_name": "nprobe"}
        | {"ann_build_s": 0.3, "ann_runs": [ann_run]}
        | {"faiss_s": 0.2, "gemm_s": 0.05, "exact_vs_gemm": 0.5, "gflop": 0.0032},
        "corpus": [_corpus_point(n) for n in (1000, 10000)],
        "scale": [
            {
                "factor": f,
                "synth": {**step, "impressions": int(1000 * f), "seconds": f},
                "run": {**step, "items": int(100 * f), "train_examples": 10, "params": 5, "setup_s": f}
                | {"step_ms": 3.0, "step_cpu_ms": 2.0 + f, "topk_s": 0.1 * f},
            }
            for f in (0.5, 1.0)
        ],
        "memory": [
            {
                "factor": f,
                "synth": {**step, "impressions": int(1000 * f), "seconds": f},
                "streamed": {**mode, "peak_rss_mib": 500 + f, "shards": 2},
                "in_memory": {**mode, "peak_rss_mib": 500 + 100 * f, "shards": 0},
            }
            for f in (0.5, 1.0)
        ],
    }


def test_report_renders_every_section_and_target_from_the_results():
    text = report.render_report(bench_config([], quick=True), _fake_results())
    for section in SECTIONS:
        assert section in text
    assert "| Lightning `trainer.fit` / bare PyTorch loop, examples/s | 0.930 | >= 0.9 | pass |" in text
    assert "| ANN, nprobe=2 | 0.05 | 2.00x | 0.900 | 0.4500 |" in text
    assert "| baseline | 1.0 | 500 |" in text and "| scale_1 |" in text and "| step_cpu_ms |" in text
    assert figures.LIGHTNING_VS_BARE in figures.metrics(_fake_results())
    assert "| exact top-k (k=10) / bare GEMM of its shapes, GFLOP/s (c) | 0.50 | >= 0.6 | **FAIL** |" in text
    assert (
        "| served ANN (ivf_flat, 32) at 10,000 items: overlap with exact's top (j) | 0.980 | >= 0.95 | pass |"
        in text
    )
    assert (
        "| served ANN (ivf_flat, 32) at 10,000 items: speed-up over exact (j) | 0.3x | >= 5.0 | **FAIL** |"
        in text
    )
    assert "| faiss `IndexFlatIP` + re-sort by id (the previous path) | 0.20 | 500 | 0.0 | 0.50x |" in text
    assert "| IVF-Flat, nlist=16 | nprobe=32 | 1.00 | 3 | 1 | 0.31x | 0.980 | 3.20 | 1.00 |" in text
    assert "| corpus_10000 | 5.0 | 600 |" in text  # (d): every step's memory


def test_corpus_exponents_recover_each_power_law_and_the_served_run():
    points = [_corpus_point(n) for n in (1000, 10000, 100000)]
    exps = figures.corpus_exponents(points)
    assert exps["exact/search_cpu_s"] == pytest.approx(1.0) and exps["exact/mib"] == pytest.approx(1.0)
    assert exps["ivf_flat/nprobe_32/p50_ms"] == pytest.approx(0.5)
    assert exps["step/peak_mib"] == pytest.approx(0.0, abs=1e-12)
    assert figures.serving_run(points[0])["effort"] == 32
    assert figures.serving_run({**points[0], "serving": {"ann": "hnsw", "effort": 32}}) is None
    metrics = figures.corpus_metrics({"corpus": points})
    assert metrics[figures.SERVING_ANN_OVERLAP] == pytest.approx(0.98)
    assert metrics["bench/corpus/exact/search_cpu_s_exponent"] == pytest.approx(1.0)
    assert figures.corpus_exponents(points[:1]) == {} and figures.corpus_metrics({}) == {}


def test_eval_section_writes_the_paths_of_a_step_portably():
    point = {"data": "eval-small", "items": 50, "queries": 9, "k": 10, "total_s": 2.0, "exact_topk_s": 0.5}
    point["steps"] = [{"step": "Loading and checking /tmp/convcg-bench-x1/eval-small", "seconds": 1.0}]
    point["steps_again"] = [{"step": "Loading and checking /srv/h/data/bench-large", "seconds": 1.0}]
    point["total_again_s"] = 2.0
    named = {"CONVCG_HOME": PurePosixPath("/srv/h"), "WORKDIR": PurePosixPath("/tmp/convcg-bench-x1")}
    text = "\n".join(
        report_commands.eval_section({"eval": [point]}, Places(PurePosixPath("/work/main"), named))
    )
    assert "| Loading and checking $WORKDIR/eval-small | 1.0 | 50% |" in text
    assert "| next run: Loading and checking $CONVCG_HOME/data/bench-large | 1.0 | 50% |" in text
    here = "\n".join(report_commands.eval_section({"eval": [point], "workdir": "/tmp/convcg-bench-x1"}))
    assert "| Loading and checking $WORKDIR/eval-small | 1.0 | 50% |" in here and "/tmp/" not in here


def test_a_crashed_bench_run_is_marked_failed(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    from typer.testing import CliRunner

    from convcg_cli.bench import cli, runner

    def crash(cfg, workdir):
        raise RuntimeError("bench step 'train' failed")

    monkeypatch.setattr(runner, "run", crash)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = ["run", "--quick", f"logger.tracking_uri={uri}", f"report={tmp_path}/bench.md"]
    result = CliRunner().invoke(cli.app, args)
    assert isinstance(result.exception, RuntimeError)
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("convcg-bench").experiment_id])
    assert run.info.status == "FAILED" and run.data.params["preset"] == "tiny"
    assert not (tmp_path / "bench.md").exists()


def test_bench_does_not_import_the_convcg_cli():
    code = (
        "import sys, convcg_cli.bench.cli, convcg_cli.bench.steps; assert 'convcg_cli.cli' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_peak_rss_is_read():
    assert measure.peak_rss_mib() > 10


@pytest.mark.slow
def test_quick_bench_writes_every_section_and_one_mlflow_run(tmp_path):
    from mlflow.tracking import MlflowClient

    env = {**os.environ, "CONVCG_HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "convcg_cli.bench", "run", "--quick"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = (tmp_path / "reports" / "bench" / "bench-quick.md").read_text()
    for section in SECTIONS:
        assert section in report
    assert "| baseline |" in report and "| scale_1 |" in report and "| step_cpu_ms |" in report
    assert "| bare GEMM loop, the step's" in report and "## (i) A grid's wall time" in report
    assert "to the 4th decimal: identical" in report
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path.resolve()}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("convcg-bench").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["quick"] == "True"
    for name in (
        figures.LIGHTNING_VS_BARE,
        figures.DATA_VS_MODEL,
        "bench/retrieval/ann_nprobe_16/overlap",
        "bench/bounded_memory/streamed_peak_exponent",
    ):
        assert name in run.data.metrics
    assert {a.path for a in client.list_artifacts(run.info.run_id, "bench")} == {
        "bench/bench.md",
        "bench/results.json",
    }


def test_corpus_step_measures_exact_and_every_ann(tmp_path):
    from convcg_cli.bench.corpus import step_corpus

    cfg = bench_config(["quick.corpus.ann=[ivf_flat,hnsw]", "quick.corpus.queries=40"], quick=True)
    point = step_corpus(cfg, str(tmp_path), 1000)
    assert point["items"] == 1000 and point["queries"] == 40 and point["exact"]["k"] == 50
    assert point["exact"]["vs_gemm"] > 0 and 0 < point["exact"]["p50_ms"] <= point["exact"]["p99_ms"]
    assert [a["name"] for a in point["ann"]] == ["ivf_flat", "hnsw"]
    ivf = point["ann"][0]
    assert [r["effort"] for r in ivf["runs"]] == [4, 16] and ivf["runs"][1]["overlap"] == 1.0  # all cells
    served = point["served"]  # the model served from its saved IVF index, timed through predict
    assert served["k"] == 50 and served["requests"] == cfg.corpus.requests and served["load_s"] > 0
    assert 0 < served["p50_ms"] <= served["p99_ms"] and served["nprobe"] == 32
    assert not any(tmp_path.glob("corpus-*"))  # its logs and the served model are removed


def test_serving_section_measures_the_pyfunc_model_and_batch_retrieve(tiny_data, tmp_path):
    from convcg_cli.bench.serving import step_serve

    cfg = bench_config([], quick=True)
    figures_ = step_serve(cfg, str(tmp_path), str(tiny_data))
    assert 0 < figures_["p50_ms"] <= figures_["p99_ms"] and figures_["warmup_requests"] == 2
    assert figures_["retrieve_rps"] > 0 and figures_["retrieve_vs_exact"] > 0
    assert figures_["exact_build_s"] >= 0 and figures_["ivf_build_s"] >= 0
    for kind in ("exact", "ivf"):  # the model's load, its index read back and rebuilt
        assert 0 < figures_[f"load_{kind}_s"] and 0 < figures_[f"load_{kind}_rebuild_s"]
    assert not list(tmp_path.glob("pyfunc-*"))  # the copies without an index and the IVF model are gone
    text = "\n".join(report_commands.serving_section({"serve": figures_}))
    assert text.startswith("## (g) Serving") and "ratio to exact_topk" in text
    assert "after 2 others sent untimed" in text
    assert (
        "| served model | load s (saved index) | load s (rebuilt) |" in text and "| IVF-Flat index |" in text
    )
    assert report_commands.serving_section({}) == []


@pytest.mark.slow  # starts `mlflow models serve`: ~10 s
def test_serving_section_times_the_http_server(tiny_data, tmp_path):
    from convcg_cli.bench.serving import step_serve

    cfg = bench_config(["quick.serve.http_requests=3"], quick=True)
    figures_ = step_serve(cfg, str(tmp_path), str(tiny_data))
    assert figures_["http_requests"] == 3 and 0 < figures_["http_p50_ms"] <= figures_["http_p99_ms"]
    for served in (figures_, figures_["ivf"]):  # both servers: kept-alive, and a connection per request
        for prefix in ("http", "convcg_http"):
            assert 0 < served[f"{prefix}_p50_ms"] <= served[f"{prefix}_p99_ms"]
            assert 0 < served[f"{prefix}_new_connection_p50_ms"] <= served[f"{prefix}_new_connection_p99_ms"]
    text = "\n".join(report_commands.serving_section({"serve": figures_}))
    assert "`mlflow models serve` `/invocations`" in text and "a new connection per request" in text
    assert "| IVF-Flat nlist=" in text and "`convcg serve` `/invocations`, 1 request" in text


@pytest.mark.slow  # trains a few batches and runs convcg eval: ~20 s
def test_eval_section_times_every_step_of_convcg_eval(tiny_data, tmp_path):
    from convcg_cli.bench.steps import step_eval

    cfg = bench_config([], quick=True)
    figures_ = step_eval(cfg, str(tmp_path), str(tiny_data))
    names = [s["step"] for s in figures_["steps"]]
    assert any(n.startswith("Loading and checking") for n in names)
    assert "Scoring the model (recall, bootstrap CIs)" in names and "Scoring baseline popularity" in names
    assert sum(s["seconds"] for s in figures_["steps"]) <= figures_["total_s"] * 1.01 + 0.01
    assert figures_["queries"] > 0 and figures_["exact_topk_s"] > 0
    again = [s["step"] for s in figures_["steps_again"]]  # the next run reads the baselines' runs
    assert any(n.startswith("Reading baseline popularity") for n in again)
    assert not any(n.startswith("Scoring baseline") for n in again)
    # each of those two ran in a process of its own, which took longer than its evaluation
    assert (
        figures_["first_process_s"] > figures_["total_s"]
        and figures_["next_process_s"] > figures_["total_again_s"]
    )
    # then both in this process: the first scored its baselines again, the next read their runs
    inside = figures_["in_process"]
    assert any(s["step"] == "Scoring baseline popularity" for s in inside["first"]["steps"])
    assert any(s["step"].startswith("Reading baseline popularity") for s in inside["next"]["steps"])
    text = "\n".join(report_commands.eval_section({"eval": [figures_]}))
    assert text.startswith("## (h)") and "all of `convcg eval`" in text and "in one process" in text
    assert report_commands.eval_section({}) == []
    ratio = figures_["total_s"] / figures_["total_again_s"]
    assert figures.eval_metrics({"eval": [figures_]})[figures.FIRST_EVAL_OVER_NEXT] == pytest.approx(ratio)
    rows = report_commands.eval_verdicts({"eval": [figures_]})
    assert rows[0][1] == f"{ratio:.2f}x" and rows[0][2] == "<= 2x"
    assert rows[0][3] == ("pass" if ratio <= 2 else "**FAIL**")


def _eval_point(first: float, again: float, in_first: float, in_next: float) -> dict:
    step = [{"step": "Searching the top 1000 items", "seconds": 1.0}]
    return {
        "data": "bench-large",
        "items": 10,
        "queries": 5,
        "k": 10,
        "exact_topk_s": 0.5,
        "total_s": first,
        "steps": step,
        "total_again_s": again,
        "steps_again": step,
        "first_process_s": first + 2.0,
        "next_process_s": again + 2.0,
        "in_process": {
            "first": {"total_s": in_first, "steps": step},
            "next": {"total_s": in_next, "steps": step},
        },
    }


def test_the_eval_target_is_the_bench_presets_first_over_next_as_processes():
    small, large = _eval_point(4.0, 1.0, 4.0, 0.5), _eval_point(30.0, 15.5, 28.0, 10.0)
    got = figures.eval_metrics({"eval": [small, large]})
    assert got[figures.FIRST_EVAL_OVER_NEXT] == pytest.approx(30.0 / 15.5)  # the last point's: large
    assert got[figures.FIRST_EVAL_OVER_NEXT_IN_PROCESS] == pytest.approx(2.8)
    assert got["bench/eval/bench-large/next_process_s"] == 17.5
    rows = report_commands.eval_verdicts({"eval": [small, large]})
    assert rows[0][1:] == ["1.94x", "<= 2x", "pass"] and rows[1][1] == "2.80x"
    assert report_commands.eval_verdicts({"eval": [_eval_point(31.0, 15.4, 1.0, 1.0)]})[0][-1] == "**FAIL**"
    text = "\n".join(report_commands.eval_section({"eval": [large]}))
    assert (
        "**1.94x** as processes" in text
        and "1.83x whole processes" in text
        and "2.80x in one process" in text
    )
    # results saved before the processes were timed: their one-process ratio, and no target row
    old = {k: v for k, v in large.items() if k not in ("in_process", "first_process_s", "next_process_s")}
    assert figures.eval_metrics({"eval": [old]}) == {
        "bench/eval/bench-large/first_s": 30.0,
        "bench/eval/bench-large/next_s": 15.5,
        figures.FIRST_EVAL_OVER_NEXT_IN_PROCESS: pytest.approx(30.0 / 15.5),
    }
    assert report_commands.eval_verdicts({"eval": [old]}) == []
    assert "in one process:" not in "\n".join(report_commands.eval_section({"eval": [old]}))
    assert "in one process: first run" in text


def test_step_flops_count_forward_and_backward_matmuls_with_their_shapes():
    import torch

    from convcg_cli.bench.flops import Matmul, gemm_seconds, step_flops

    layer = torch.nn.Linear(8, 4)
    x = torch.randn(16, 8)

    def step() -> None:
        layer(x).sum().backward()

    total, matmuls = step_flops(step)
    # forward (16, 8) x (8, 4); backward: only the weight gradient (4, 16) x (16, 8) (x needs none)
    assert total == sum(m.flops for m in matmuls) == 2 * 16 * 8 * 4 * 2
    assert Matmul(1, 16, 8, 4) in matmuls
    assert gemm_seconds(matmuls, repeats=2) > 0


def test_report_renders_the_flops_and_grid_sections():
    from convcg_cli.bench.grid import PHASES, TRAINING

    results = _fake_results()
    results["train"]["flops"] = {
        "step_gflop": 1.5,
        "matmul_gflop": 1.5,
        "matmuls": 40,
        "gemm_ms": 20.0,
        "gemm_gflops_per_s": 75.0,
    } | {
        "bare_gflops_per_s": 30.0,
        "bare_vs_gemm": 0.4,
        "lightning_gflops_per_s": 27.0,
        "lightning_vs_gemm": 0.36,
    }

    def run(reuse_data: bool, data_s: float) -> dict:
        phases = dict.fromkeys(PHASES, 1.0) | {"data setup": data_s, TRAINING: 10.0}
        total = sum(phases.values())
        return {"round": 0, "reuse_data": reuse_data, "total_s": total, "phases": phases}

    results["grid"] = [
        {"case": "small", "grid": "designs", "data": "grid-small-data", "variants": ["a", "b"], "seeds": [0]}
        | {"cells": 2, "train_overrides": ["trainer.max_epochs=1"], "same_figures": True}
        | {"runs": [r | {"load_before": 1.0, "load_after": 1.5} for r in (run(False, 4.0), run(True, 1.0))]}
        | {"step": {"variant": "a", "batch_size": 64, "threads": 1, "matmuls": 12, "matmul_gflop": 3.0}}
    ]
    results["grid"][0]["step"] |= {"step_ms": 40.0, "gemm_ms": 30.0, "step_gflops_per_s": 75.0}
    results["grid"][0]["step"] |= {"gemm_gflops_per_s": 100.0, "vs_gemm": 0.75}
    text = report.render_report(bench_config([], quick=True), results)
    assert "runs at **0.75 of a bare GEMM** (75.0 against 100.0 GFLOP/s)" in text and "is 25% of it" in text
    assert "| bare GEMM loop, the step's 40 matrix shapes | 75.0 | 1.00 |" in text
    assert "| Lightning step | 27.0 | 0.36 |" in text
    assert "## (i) A grid's wall time" in text and "to the 4th decimal: identical" in text
    assert (
        "| data setup | 4.0 | 1.0 | 0.25 |" in text
        and "| **grid wall time** | **20.0** | **17.0** | **0.85** |" in text
    )
    assert report_commands.grid_section({}) == [] and report.flops_lines(None) == []


@pytest.mark.slow  # the smoke grid on the tiny logs, twice: ~30 s
def test_grid_step_times_the_grid_both_ways_with_the_same_figures(tmp_path, monkeypatch):
    from convcg_cli.bench.grid import TRAINING
    from convcg_cli.bench.steps import step_grid
    from convcg_cli.data.loading.prepared import PreparedDataCache

    served = []  # for each set-up through a grid's cache: whether the cache served it
    setup = PreparedDataCache.setup

    def counted(self, dm, stage):
        hits = self.hits
        setup(self, dm, stage)
        served.append(self.hits > hits)

    monkeypatch.setattr(PreparedDataCache, "setup", counted)
    monkeypatch.setenv("CONVCG_HOME", str(tmp_path / "home"))  # the step sets it per run
    figures_ = step_grid(bench_config([], quick=True), str(tmp_path), "small")
    assert figures_["same_figures"] and figures_["cells"] == 2
    before, after = figures_["runs"]
    assert (before["reuse_data"], after["reuse_data"]) == (False, True)
    # Only the run that reuses the data goes through a cache, and it serves every set-up but the
    # first (2 cells: 2 trainings and 2 evaluations). Counted, not timed: the seconds are the
    # benchmark's figure, and on tiny data a busy machine can swap their order.
    assert served == [False, True, True, True]
    assert before["phases"][TRAINING] > 0 and before["figures"].keys() == after["figures"].keys()
    step = figures_["step"]
    assert step["matmuls"] > 0 and step["matmul_gflop"] > 0 and 0 < step["vs_gemm"] < 5


def test_recorded_matmuls_hold_the_flops_the_counter_counts():
    import torch

    from convcg_cli.bench.flops import record_matmuls, step_flops

    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    x = torch.randn(5, 16)
    counted, _ = step_flops(lambda: net(x).sum().backward())
    recorded = record_matmuls(lambda: net(x).sum().backward())
    assert sum(m.flops for m in recorded) == counted and len(recorded) == 5  # 2 forward, 3 backward


def test_flops_figures_read_each_round_against_its_own_gemm_timing():
    from convcg_cli.bench.flops import Matmul
    from convcg_cli.bench.steps import flops_figures

    matmuls = [Matmul(1, 10, 10, 10)] * 5  # 10,000 FLOPs
    rounds = [  # the machine twice as slow in round 2: both the step and the GEMM
        {"bare_step_ms_median": 2.0, "lightning_step_ms_median": 4.0, "gemm_ms": 1.0},
        {"bare_step_ms_median": 4.0, "lightning_step_ms_median": 8.0, "gemm_ms": 2.0},
        {"bare_step_ms_median": 2.0, "lightning_step_ms_median": 4.0, "gemm_ms": 1.0},
    ]
    out = flops_figures(10_000, matmuls, rounds)
    assert out["bare_vs_gemm"] == pytest.approx(0.5) and out["lightning_vs_gemm"] == pytest.approx(0.25)
    assert out["gemm_gflops_per_s"] == pytest.approx(10_000 / 1.0 / 1e6)
    assert out["bare_gflops_per_s"] == pytest.approx(10_000 / 2.0 / 1e6)


def test_serve_verdicts_hold_the_ann_served_latency_to_its_ceilings():
    serve = {"items": 100_000, "k": 100, "requests": 200, "p50_ms": 3.0, "p99_ms": 4.0}
    assert report.serve_verdicts({"serve": serve}) == []  # saved before the ANN-served model was timed
    ivf = {"nlist": 1265, "nprobe": 32, "p50_ms": 1.5, "p99_ms": 2.5, "http_p99_ms": 6.25}
    fast = {**serve, "ivf": {**ivf, "convcg_http_p99_ms": 5.5}}
    rows = report.serve_verdicts({"serve": fast})
    assert rows == [
        ["pyfunc `predict` p99, 1 request, k=100, ANN-served, 100,000 items, ms (g)", "2.50", "<= 3", "pass"],
        ["`convcg serve` `/invocations` p99 minus pyfunc p99, same model, ms (g)", "3.00", "<= 3", "pass"],
        [  # MLflow's server: shown, not held to the ceiling
            "`mlflow models serve` `/invocations` p99 minus pyfunc p99, same model, ms (g)",
            "3.75",
            "",
            "(MLflow's own server: what it adds, see (g))",
        ],
    ]
    slow = {**fast, "ivf": {**fast["ivf"], "p99_ms": 3.25, "convcg_http_p99_ms": 6.5}}
    assert [row[-1] for row in report.serve_verdicts({"serve": slow})][:2] == ["**FAIL**", "**FAIL**"]
    metrics = figures.serve_metrics({"serve": fast})
    assert metrics[figures.SERVE_CONVCG_HTTP_OVER_PYFUNC] == pytest.approx(3.0)
    assert metrics[figures.SERVE_HTTP_OVER_PYFUNC] == pytest.approx(3.75)
    assert report.serve_verdicts({"serve": {**serve, "ivf": ivf}})[1][0].startswith("`mlflow models serve`")
    # the model served at the largest corpus of (j), against its own ceiling
    served = {"k": 100, "nlist": 4000, "nprobe": 32, "requests": 200, "load_s": 0.5, "p50_ms": 2.0}
    corpus = [_corpus_point(100_000), {**_corpus_point(1_000_000), "served": {**served, "p99_ms": 4.5}}]
    rows = report.serve_verdicts({"serve": fast, "corpus": corpus})
    assert rows[1] == ["pyfunc `predict` p99, 1 request, k=100, ANN-served, 1,000,000 items, ms (j)"] + [
        "4.50",
        "<= 5",
        "pass",
    ]
    corpus[-1]["served"]["p99_ms"] = 5.5
    assert report.serve_verdicts({"serve": fast, "corpus": corpus})[1][-1] == "**FAIL**"
    assert figures.corpus_metrics({"corpus": corpus})["bench/corpus/1000000/served/load_s"] == 0.5
