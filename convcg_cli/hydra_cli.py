"""Hand a command's arguments to Hydra's own command line (``@hydra.main``), so ``convcg train`` and
``convcg eval`` take everything a Hydra app takes: overrides, ``-m`` sweeps, ``--cfg``, ``--info``,
``--help``, ``--config-dir``, launchers and sweepers.

Errors keep convcg's form: a composition error becomes a ConfigError with the "did you mean" hint, and
every ConvcgError (also one raised inside a job) reaches ``user_errors`` (one paragraph, exit 2).
Only Hydra and OmegaConf are imported here; the job function imports the heavy libraries.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from convcg_cli.config import (
    CONF_DIR,
    CONFIG_DIR_VARIABLE,
    Composed,
    check_home,
    check_overrides,
    config_error,
    from_hydra_job,
    register_resolvers,
)

CONFIG_DIR_ENV = CONFIG_DIR_VARIABLE  # an extra config directory, as if given with --config-dir
_CONFIG_DIR_FLAGS = ("--config-dir", "-cd")
_MULTIRUN_FLAGS = ("-m", "--multirun")


def with_config_dir(args: Sequence[str], environ: Mapping[str, str]) -> list[str]:
    """``args`` plus ``--config-dir $CONVCG_CONFIG_DIR`` when that is set and no config dir is given."""
    given = any(a in _CONFIG_DIR_FLAGS or a.startswith("--config-dir=") for a in args)
    if environ.get(CONFIG_DIR_ENV) and not given:
        return ["--config-dir", environ[CONFIG_DIR_ENV], *args]
    return list(args)


def config_dir_args(args: Sequence[str]) -> list[str]:
    """The ``--config-dir DIR`` part of ``args`` (both spellings), to repeat in a re-launched process."""
    kept: list[str] = []
    for i, arg in enumerate(args):
        if arg.startswith("--config-dir="):
            kept.append(arg)
        elif arg in _CONFIG_DIR_FLAGS and i + 1 < len(args):
            kept.extend([arg, args[i + 1]])
    return kept


def job_argv(command_argv: Sequence[str], args: Sequence[str], job_overrides: Sequence[str]) -> list[str]:
    """The command line that re-runs this one job: what Lightning's DDP launcher re-executes for the
    other ranks (it appends ``hydra.run.dir=...``). A multirun job becomes a single run of its own
    overrides, so a rank never starts the whole sweep again."""
    if not any(a in _MULTIRUN_FLAGS for a in args):
        return [*command_argv, *args]
    return [*command_argv, *config_dir_args(args), *job_overrides]


def thread_budget(launcher: Mapping[str, Any], cores: int) -> int | None:
    """Threads per job when a parallel launcher runs several jobs on this machine's ``cores``, so
    that they do not oversubscribe it; None when the launcher runs one job at a time (leave as is).

    joblib: ``n_jobs`` workers share the cores (``-1`` = one per core, ``-2`` = all but one, as in
    joblib). Ray and SLURM: the CPUs each job is given (``ray.remote.num_cpus``, ``cpus_per_task``).
    """
    target = str(launcher.get("_target_", ""))
    if target.endswith("JoblibLauncher"):
        n_jobs = int(launcher.get("n_jobs") or -1)
        workers = n_jobs if n_jobs > 0 else max(1, cores + 1 + n_jobs)
        return max(1, cores // min(workers, cores))
    if target.endswith("RayLauncher"):
        cpus = (launcher.get("ray") or {}).get("remote", {}).get("num_cpus")
        return max(1, int(cpus)) if cpus else None
    if "submitit" in target.lower():
        cpus = launcher.get("cpus_per_task")
        return max(1, int(cpus)) if cpus else None
    return None


def _limit_threads(threads: int) -> None:
    """Use at most ``threads`` threads in this job: torch's intra-op pool and any child process."""
    import torch

    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(threads)
    torch.set_num_threads(threads)


def _tag_multirun_job(composed: Composed, sweep_dir: str, job_num: int) -> None:
    """Tag a multirun job's MLflow run with its sweep (the sweep directory) and job number."""
    from omegaconf import open_dict

    if "logger" not in composed.cfg:  # a config that opens no run of its own (an ablation cell's)
        return
    with open_dict(composed.cfg):
        tags = dict(composed.cfg.logger.get("run_tags") or {})
        composed.cfg.logger.run_tags = {**tags, "multirun": sweep_dir, "multirun_job": job_num}


@contextmanager
def _argv(argv: list[str]) -> Iterator[None]:
    saved = sys.argv
    sys.argv = argv
    try:
        yield
    finally:
        sys.argv = saved


@contextmanager
def _root_logging_kept() -> Iterator[None]:
    """Give the root logger back its handlers and level afterwards: ``--info`` and ``--hydra-help``
    make it print to the stdout of the moment, which an in-process caller (tests) later closes."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


@contextmanager
def _full_errors() -> Iterator[None]:
    """Let Hydra raise errors instead of printing them and exiting 1, so that convcg reports them."""
    saved = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = saved


def run(
    config_name: str, command_argv: Sequence[str], args: Sequence[str], job: Callable[[Composed], Any]
) -> None:
    """Run ``conf/<config_name>.yaml`` through ``@hydra.main`` with the command line ``args``;
    ``job`` is called with each job's resolved config (one call, or one per multirun job).

    ``command_argv`` re-runs this command (e.g. ``[convcg, "train"]``): each job sees it, plus its
    overrides, as ``sys.argv`` (Lightning's DDP launcher re-executes ``sys.argv`` for ranks > 0).
    """
    import hydra
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.errors import HydraException
    from hydra.types import RunMode
    from omegaconf import DictConfig
    from omegaconf.errors import OmegaConfBaseException

    register_resolvers()
    check_home()
    check_overrides([a for a in args if not a.startswith("-")])
    hydra_args = with_config_dir(args, os.environ)
    failed: list[BaseException] = []  # a single run's error, raised after Hydra returns

    @hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base="1.3")
    def hydra_job(cfg: DictConfig) -> Any:
        composed = from_hydra_job(cfg)
        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode == RunMode.MULTIRUN:
            print(f"Job #{hydra_cfg.job.num}: {' '.join(composed.overrides)}", flush=True)
            _tag_multirun_job(composed, str(hydra_cfg.sweep.dir), int(hydra_cfg.job.num))
            threads = thread_budget(hydra_cfg.launcher, os.cpu_count() or 1)
            if threads is not None:
                _limit_threads(threads)
        if composed.cfg.get("threads"):  # the config's thread count (train.yaml, eval.yaml) wins
            _limit_threads(int(composed.cfg.threads))
        with _argv(job_argv(command_argv, hydra_args, composed.overrides)):
            if hydra_cfg.mode == RunMode.MULTIRUN:  # a failed job stops the sweep; Hydra names it
                return job(composed)
            try:
                return job(composed)
            except Exception as exc:
                # Hydra would print "Error executing job with overrides: [...]" before re-raising it;
                # convcg's own message is enough, so a single run's error passes Hydra by.
                failed.append(exc)
                return None

    prog = " ".join(os.path.basename(a) for a in command_argv[:2])
    try:
        with _argv([prog, *hydra_args]), _full_errors(), _root_logging_kept():
            hydra_job()
        if failed:
            raise failed[0]
    except (HydraException, OmegaConfBaseException) as exc:
        raise config_error(config_name, [a for a in hydra_args if not a.startswith("-")], exc) from None
    finally:
        GlobalHydra.instance().clear()
