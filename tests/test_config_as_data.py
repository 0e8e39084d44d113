"""Configs are data: every ``_target_`` a config names, whether an override set it or a run's saved
config brought it back, is looked up in the registry of classes convcg builds; anything else is
refused before anything is built, and group options resolve only inside the config search path."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf
from typer.testing import CliRunner

from convcg_cli import tracking
from convcg_cli.cli import app
from convcg_cli.config import CONF_DIR, check_overrides, compose, instantiate
from convcg_cli.errors import ConfigError
from convcg_cli.targets import BUILDABLE_TARGETS, MOVED_TARGETS, check_buildable, targets

pytestmark = pytest.mark.faults  # README "Reliability" rows (`make faults`)
runner = CliRunner()
# The write-a-file gadget of the issue: a Lightning function, under the old `lightning.` prefix.
GADGET = "lightning.fabric.utilities.cloud_io._atomic_save"


def conf_targets() -> set[str]:
    """Every ``_target_`` value in the shipped conf/ tree."""
    found = set()
    for path in CONF_DIR.rglob("*.yaml"):
        found |= {t for _, t in targets(yaml.safe_load(path.read_text()) or {})}
    return found


def test_every_class_the_shipped_configs_name_is_in_the_registry():
    assert conf_targets() <= BUILDABLE_TARGETS


@pytest.mark.parametrize("target", sorted(BUILDABLE_TARGETS))
def test_every_registry_entry_is_a_class(target):
    module, name = target.rsplit(".", 1)
    try:
        obj = getattr(importlib.import_module(module), name)
    except ImportError as exc:  # an optional extra (optuna) that CI does not install
        pytest.skip(f"{module} is not installed: {exc}")
    # A library entry is a class, never a function of the library; convcg's own may be a builder
    # (ImpressionDataModule picks the data path of configs saved before the two paths existed).
    assert inspect.isclass(obj) or target.startswith("convcg_cli."), f"{target} is not a class"


def test_targets_finds_them_in_lists_and_nested_nodes_without_resolving():
    cfg = OmegaConf.create({"a": {"_target_": "x.A", "b": [{"_target_": "y.B"}]}, "c": "${oc.env:NOPE}"})
    assert targets(cfg) == [("a._target_", "x.A"), ("a.b[0]._target_", "y.B")]


def test_a_hostile_target_anywhere_in_a_config_is_refused_before_building(tmp_path):
    victim = tmp_path / "written"
    node = OmegaConf.create({"_target_": GADGET, "checkpoint": {"pwned": 1}, "filepath": str(victim)})
    with pytest.raises(ConfigError, match=r"_target_='lightning\.fabric\..*' is not a class convcg builds"):
        instantiate(node)
    nested = OmegaConf.create({"model": {"x": [{"_target_": "os.system", "command": "true"}]}})
    with pytest.raises(ConfigError, match=r"model\.x\[0\]\._target_='os\.system'"):
        check_buildable(nested, "a test config")
    assert not victim.exists()


def test_old_class_paths_pass_the_check_and_build_through_their_new_path():
    old, new = next(iter(MOVED_TARGETS.items()))
    check_buildable(OmegaConf.create({"data": {"_target_": old}}), "an old config")
    assert new in BUILDABLE_TARGETS


@pytest.mark.parametrize(
    "override",
    [
        f"+callbacks.evil._target_={GADGET}",
        "+callbacks.x._target_=shutil.copyfile",
        "hydra.callbacks.x._target_=builtins.exec",
        "+experiment=../../../../tmp/elsewhere",
        "+experiment=/tmp/elsewhere",
        "+experiment=unified_parallel,../x",
        "model/head=../../model/two_tower",
    ],
)
def test_overrides_that_load_or_build_outside_convcg_are_refused(override):
    with pytest.raises(ConfigError):
        check_overrides([override])


def test_ordinary_overrides_pass():
    check_overrides(["+experiment=unified_parallel", "data.dir=../data/x", "model/head=unified", "seed=3"])
    check_overrides(["data_dir=/abs/other/logs", "data=kuairand", "hydra/launcher=joblib"])  # eval's data_dir
    check_overrides(["model.optimizer._target_=torch.optim.SGD", "+experiment=ablation/history_loo_ema"])


def test_an_experiment_file_outside_the_search_path_is_not_loaded(tmp_path):
    (tmp_path / "evil.yaml").write_text("# @package _global_\nseed: 999\n")
    climb = Path("../" * len((CONF_DIR / "experiment").resolve().parts)) / str(tmp_path / "evil")[1:]
    with pytest.raises(ConfigError, match="outside the config search path"):
        compose("train", [f"+experiment={climb}"])


def test_train_refuses_an_override_target_and_writes_nothing(home, tiny_overrides, tmp_path):
    copied = tmp_path / "copied"
    args = [
        "+callbacks.x._target_=shutil.copyfile",
        f"+callbacks.x.src={__file__}",
        f"+callbacks.x.dst={copied}",
    ]
    result = runner.invoke(app, ["train", *tiny_overrides, *args])
    assert result.exit_code == 2, result.output
    assert "not a class convcg builds" in " ".join(result.output.split())
    assert not copied.exists()


def test_eval_of_a_tampered_saved_config_writes_no_file(home, tiny_overrides, tmp_path):
    """The issue's case: a run's resolved.yaml edited to hold a Lightning function that writes a file."""
    victim = tmp_path / "pwned"
    cfg = compose("train", tiny_overrides).cfg
    with tracking.open_run(tracking.Store.from_config(cfg.logger), "tampered", {}) as run:
        saved = OmegaConf.to_container(cfg)
        saved["data"]["evil"] = {"_target_": GADGET, "checkpoint": {"pwned": 1}, "filepath": str(victim)}
        tracking.log_text(run, OmegaConf.to_yaml(OmegaConf.create(saved)), tracking.CONFIG_ARTIFACT)
        torch.save({"state_dict": {}}, tmp_path / "planted.ckpt")
        tracking.log_checkpoint(run, tmp_path / "planted.ckpt")
    result = runner.invoke(app, ["eval", "--run", run.run_id, "baselines=[]"])
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert f"Refusing the saved config of run {run.run_id}: data.evil._target_='{GADGET}'" in message
    assert not victim.exists()
