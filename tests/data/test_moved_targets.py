"""Configs saved before ``convcg_cli/data/`` was grouped into subpackages name its classes by their old
paths: ``targets.upgrade_moved_targets`` rewrites them, and they build through the new ones."""

from __future__ import annotations

import importlib

import pytest
from hydra.utils import get_object
from omegaconf import OmegaConf

from convcg_cli.config import CONF_DIR, compose, instantiate
from convcg_cli.data.features import DualPositives
from convcg_cli.data.importing import WeightByDelay
from convcg_cli.data.loading import InMemoryDataModule
from convcg_cli.targets import MOVED_TARGETS, upgrade_moved_targets


@pytest.mark.parametrize("old", sorted(MOVED_TARGETS))
def test_a_config_naming_an_old_path_builds_through_the_new_one(old, tmp_path):
    with pytest.raises(ModuleNotFoundError):  # the old module is gone: the old path alone cannot build
        importlib.import_module(old.rsplit(".", 1)[0])
    args = {"dir": str(tmp_path)} if "DataModule" in old else {}
    cfg = OmegaConf.create({"data": {"_target_": old, **args}, "other": [{"_target_": old}]})
    assert upgrade_moved_targets(cfg) is cfg
    assert cfg.data._target_ == cfg.other[0]._target_ == MOVED_TARGETS[old]
    built, new = instantiate(cfg.data), get_object(MOVED_TARGETS[old])
    # ImpressionDataModule is a function: it builds the in-memory class when no streaming is asked for.
    assert type(built) is (new if isinstance(new, type) else InMemoryDataModule)


def test_every_data_class_a_shipped_config_names_is_listed():
    named = {
        line.split(":", 1)[1].split("#")[0].strip()
        for path in CONF_DIR.rglob("*.yaml")
        for line in path.read_text().splitlines()
        if line.startswith("_target_: convcg_cli.data.")
    }
    assert len(named) == 8 and named <= set(MOVED_TARGETS.values())


def test_a_whole_saved_config_with_old_paths_reads_as_today(tmp_path):
    composed = compose("train", [f"data.dir={tmp_path}", "data/positives=dual", "data/label_maturity=weight"])
    text = OmegaConf.to_yaml(composed.cfg)
    for old, new in MOVED_TARGETS.items():
        text = text.replace(f"_target_: {new}\n", f"_target_: {old}\n")
    saved = OmegaConf.create(text)
    assert saved.data._target_ == "convcg_cli.data.datamodule.InMemoryDataModule"
    assert saved.data.positives._target_ == "convcg_cli.data.positives.DualPositives"
    upgraded = upgrade_moved_targets(saved)
    assert OmegaConf.to_container(upgraded) == OmegaConf.to_container(composed.cfg)
    dm = instantiate(upgraded.data, tasks=["conversion", "engagement"])
    assert type(dm) is InMemoryDataModule
    assert type(dm.positives) is DualPositives and type(dm.label_maturity) is WeightByDelay


def test_a_read_only_config_is_upgraded_and_stays_read_only():
    cfg = OmegaConf.create({"_target_": "convcg_cli.data.maturity.DropImmature", "window_days": 3.0})
    OmegaConf.set_readonly(cfg, True)
    upgrade_moved_targets(cfg)
    assert cfg._target_ == "convcg_cli.data.importing.maturity.DropImmature"
    assert OmegaConf.is_readonly(cfg)
