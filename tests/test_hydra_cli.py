"""``convcg train``/``eval`` on Hydra's own command line: --help with the config groups, --cfg, --info,
multirun sweeps (one MLflow run per job), --config-dir / CONVCG_CONFIG_DIR, launchers' thread budget."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from convcg_cli import hydra_cli
from convcg_cli.cli import app
from convcg_cli.errors import ConvcgError
from convcg_cli.train import TrainResult
from tests.conftest import hydra_plugin_installed, runs_in

runner = CliRunner()
JOBLIB = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"


def invoke(*args: str):
    return runner.invoke(app, list(args))


@pytest.fixture
def trainings(home, monkeypatch) -> list:
    """Replace training with a recorder: each call's Composed config, and a fake result."""
    seen: list = []

    def fake_train(composed):
        seen.append(composed)
        return TrainResult(f"run{len(seen)}", home / "model.ckpt", {"val/conversion/recall_at_100": 0.5})

    monkeypatch.setattr("convcg_cli.train.train", fake_train)
    return seen


def test_train_help_lists_the_config_groups_and_their_options():
    result = invoke("train", "--help")
    assert result.exit_code == 0, result.output
    assert "Usage: convcg train" in result.output
    assert "model/head: multi_head, unified" in result.output
    assert "experiment: multihead_parallel" in result.output and "+experiment=NAME" in result.output


def test_eval_help_names_its_own_options():
    result = invoke("eval", "--help")
    assert result.exit_code == 0, result.output
    assert "--run RUN_ID|latest" in result.output and "--json" in result.output


def test_cfg_job_prints_the_composed_config_and_trains_nothing(trainings):
    result = invoke("train", "--cfg", "job", "+experiment=unified_sequential", "seed=7")
    assert result.exit_code == 0, result.output
    assert "seed: 7" in result.output and "_target_: convcg_cli.models.cross.SequentialCross" in result.output
    assert trainings == []


def test_info_and_hydra_help_are_hydras():
    assert "Hydra 1.3" in invoke("train", "--info").output
    assert "hydra/launcher: basic" in invoke("train", "--hydra-help").output


def test_multirun_runs_one_job_per_combination_with_its_overrides_and_tags(trainings):
    result = invoke("train", "-m", "seed=1,2", "loss.task_weights.engagement=0.1,1.0")
    assert result.exit_code == 0, result.output
    combos = [(c.cfg.seed, c.cfg.loss.task_weights.engagement) for c in trainings]
    assert combos == [(1, 0.1), (1, 1.0), (2, 0.1), (2, 1.0)]
    assert trainings[3].overrides == ["seed=2", "loss.task_weights.engagement=1.0"]
    assert [c.cfg.logger.run_tags.multirun_job for c in trainings] == [0, 1, 2, 3]
    assert len({c.cfg.logger.run_tags.multirun for c in trainings}) == 1
    assert result.output.count("MLflow run id: run") == 4


def test_multirun_range_sweep(trainings):
    result = invoke("train", "--multirun", "seed=range(0,3)")
    assert result.exit_code == 0, result.output
    assert [c.cfg.seed for c in trainings] == [0, 1, 2]


def test_a_plain_run_has_no_multirun_tags(trainings):
    assert invoke("train", "seed=3").exit_code == 0
    (composed,) = trainings
    assert "run_tags" not in composed.cfg.logger


def test_an_error_in_a_multirun_job_is_a_message_and_exit_2(home, monkeypatch):
    def refuse(composed):
        raise ConvcgError(f"seed {composed.cfg.seed} refused")

    monkeypatch.setattr("convcg_cli.train.train", refuse)
    result = invoke("train", "-m", "seed=1,2")
    assert result.exit_code == 2, result.output
    assert "Error: seed 1 refused" in result.output and "Traceback" not in result.output


def test_a_bad_sweep_override_keeps_the_did_you_mean_hint(home):
    result = invoke("train", "-m", "trainer.max_epoch=1,2")
    assert result.exit_code == 2
    assert "did you mean 'trainer.max_epochs'" in result.output and "Traceback" not in result.output


def test_an_extra_config_dir_from_the_environment_or_the_flag(tmp_path, monkeypatch, trainings):
    experiments = tmp_path / "myconf" / "experiment"
    experiments.mkdir(parents=True)
    (experiments / "mine.yaml").write_text("# @package _global_\nseed: 1234\n")
    by_flag = invoke("train", "--config-dir", str(tmp_path / "myconf"), "--cfg", "job", "+experiment=mine")
    assert by_flag.exit_code == 0 and "seed: 1234" in by_flag.output, by_flag.output
    monkeypatch.setenv(hydra_cli.CONFIG_DIR_ENV, str(tmp_path / "myconf"))
    by_env = invoke("train", "+experiment=mine")
    assert by_env.exit_code == 0, by_env.output
    assert trainings[0].cfg.seed == 1234


def test_with_config_dir_adds_the_environments_dir_unless_one_is_given():
    env = {hydra_cli.CONFIG_DIR_ENV: "/c"}
    assert hydra_cli.with_config_dir(["a=1"], env) == ["--config-dir", "/c", "a=1"]
    assert hydra_cli.with_config_dir(["--config-dir=/d", "a=1"], env) == ["--config-dir=/d", "a=1"]
    assert hydra_cli.with_config_dir(["a=1"], {}) == ["a=1"]


def test_job_argv_makes_a_multirun_job_a_single_run():
    command = ["convcg", "train"]
    assert hydra_cli.job_argv(command, ["seed=1"], ["seed=1"]) == ["convcg", "train", "seed=1"]
    multirun = hydra_cli.job_argv(command, ["-m", "-cd", "/c", "seed=1,2"], ["seed=2"])
    assert multirun == ["convcg", "train", "-cd", "/c", "seed=2"]


@pytest.mark.parametrize(
    ("launcher", "cores", "threads"),
    [
        ({"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"}, 8, None),
        ({"_target_": JOBLIB, "n_jobs": 2}, 8, 4),
        ({"_target_": JOBLIB, "n_jobs": 3}, 2, 1),
        ({"_target_": JOBLIB, "n_jobs": -1}, 4, 1),
        ({"_target_": JOBLIB, "n_jobs": -2}, 5, 1),
        ({"_target_": "x.RayLauncher", "ray": {"remote": {"num_cpus": 3}}}, 8, 3),
        ({"_target_": "x.SlurmLauncher", "cpus_per_task": None}, 8, None),
        ({"_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"}, 8, None),
        (
            {
                "_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher",
                "cpus_per_task": 4,
            },
            8,
            4,
        ),
    ],
)
def test_thread_budget_shares_the_cores_among_parallel_jobs(launcher, cores, threads):
    assert hydra_cli.thread_budget(launcher, cores) == threads


def test_a_multirun_creates_the_mlflow_store_before_its_jobs_start(monkeypatch):
    from omegaconf import OmegaConf

    from convcg_cli import tracking
    from convcg_cli.hydra_callbacks import TrackingStoreReady

    opened = []
    monkeypatch.setattr(tracking.Store, "experiment_id", lambda store: opened.append(store.uri))
    logger = {"tracking_uri": "sqlite:///x.db", "experiment_name": "convcg"}
    TrackingStoreReady().on_multirun_start(OmegaConf.create({"logger": logger}))
    TrackingStoreReady().on_multirun_start(OmegaConf.create({"cell": 0}))  # no logger: nothing to do
    assert opened == ["sqlite:///x.db"]


@pytest.mark.slow
def test_a_2x2_multirun_trains_4_mlflow_runs_with_their_tags(home, tiny_overrides):
    result = invoke("train", "-m", *tiny_overrides, "seed=1,2", "loss.task_weights.engagement=0.1,1.0")
    assert result.exit_code == 0, result.output
    runs = runs_in(home)
    assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}
    combos = {(r.data.tags["seed"], r.data.params["loss.task_weights.engagement"]) for r in runs}
    assert combos == {("1", "0.1"), ("1", "1.0"), ("2", "0.1"), ("2", "1.0")}
    assert sorted(r.data.tags["multirun_job"] for r in runs) == ["0", "1", "2", "3"]
    assert len({r.data.tags["multirun"] for r in runs}) == 1


def _needs(plugin: str, extra: str):
    missing = not hydra_plugin_installed(plugin)
    return pytest.mark.skipif(missing, reason=f"the launcher is an extra: pip install 'convcg[{extra}]'")


LAUNCHERS = [
    pytest.param(
        ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
        marks=_needs("hydra_joblib_launcher", "joblib"),
        id="joblib",
    ),
    # The SLURM launcher's code path (each job pickled and run in a new process) on this machine.
    pytest.param(
        ["hydra/launcher=submitit_local", "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=10"],
        marks=_needs("hydra_submitit_launcher", "slurm"),
        id="submitit_local",
    ),
    # No address: the launcher starts a local Ray instance and runs each job as a Ray task.
    pytest.param(
        [
            "hydra/launcher=ray",
            "++hydra.launcher.ray.init.num_cpus=2",
            "++hydra.launcher.ray.remote.num_cpus=1",
        ],
        marks=_needs("hydra_ray_launcher", "ray"),
        id="ray",
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_a_2_job_multirun_through_a_launcher(home, tiny_overrides, launcher, fresh_joblib_workers):
    result = invoke("train", "-m", *tiny_overrides, "seed=1,2", *launcher)
    assert result.exit_code == 0, result.output
    runs = runs_in(home)
    assert sorted(r.data.tags["seed"] for r in runs) == ["1", "2"]
    assert {r.info.status for r in runs} == {"FINISHED"}
