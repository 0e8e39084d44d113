"""Run every benchmark step in order, each in a fresh interpreter, and collect the raw results."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf


def _run_step(name: str, label: str, workdir: Path, env: Mapping[str, str], **kwargs: Any) -> dict:
    """Run step ``name(cfg, workdir, **kwargs)`` in a fresh interpreter with environment ``env``;
    return its figures plus ``wall_s`` (the step), ``interpreter_s`` (the interpreter's whole life,
    as seen from here) and ``peak_rss_mib``. Its output goes to ``<workdir>/<label>.log``."""
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
    result["interpreter_s"] = time.perf_counter() - start  # the whole interpreter: start, imports, the step
    print(f"{result['interpreter_s']:.0f} s, peak {result['peak_rss_mib']:.0f} MiB", flush=True)
    return result


def run(cfg: DictConfig, workdir: Path) -> dict:
    """Every step, in order; returns all figures (the report is rendered from them)."""
    OmegaConf.save(cfg, workdir / "bench.yaml")
    results: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "load_before": os.getloadavg()}
    results["workdir"] = str(workdir)  # the report writes paths under it as $WORKDIR
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
    results["serve"] = _run_step("serve", "serve", workdir, env, data_dir=data_dir)
    results["corpus"] = [
        _run_step("corpus", f"corpus-{int(n)}", workdir, env, items=int(n)) for n in cfg.corpus.sizes
    ]
    results["eval"] = []
    for preset in cfg.eval_breakdown.presets:
        other = workdir / f"eval-{preset}"
        results["eval"].append(
            _run_step("eval", f"eval-{preset}", workdir, env, data_dir=str(other), preset=str(preset))
        )
        shutil.rmtree(other, ignore_errors=True)
    results["eval"].append(_run_step("eval", f"eval-{cfg.preset}", workdir, env, data_dir=data_dir))
    results["grid"] = [
        _run_step("grid", f"grid-{case}", workdir, env, case=str(case))
        for case, spec in cfg.grid_timing.cases.items()
        if spec.get("data_dir") or spec.get("preset")  # a case on data not given here is skipped
    ]
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
