"""Every cross network option composes and instantiates inside both cross structures, and the
cross-network ablation experiments compose into a model."""

from __future__ import annotations

import functools

import pytest
import torch

from convcg_cli.builders import model_from_config
from convcg_cli.config import CONF_DIR, compose, instantiate
from convcg_cli.errors import ConfigError
from convcg_cli.models.cross import (
    CrossNet,
    LowRankCrossNet,
    LowRankMixtureCrossNet,
    ParallelCross,
    SequentialCross,
)
from convcg_cli.models.towers import FeatureSpec

CROSS_NET_CLASSES = {"full": CrossNet, "low_rank": LowRankCrossNet, "mixture": LowRankMixtureCrossNet}
STRUCTURE_CLASSES = {"sequential": SequentialCross, "parallel": ParallelCross}
ABLATIONS = ["low_rank_cross", "mixture_cross"]
USER = FeatureSpec(categorical={"user_id": 11, "surface": 4}, numeric=("log_account_age",))
ITEM = FeatureSpec(categorical={"item_id": 21, "advertiser_id": 5}, numeric=("ctr",))


def test_every_shipped_cross_net_is_covered() -> None:
    shipped = {p.stem for p in (CONF_DIR / "model" / "cross" / "cross_net").glob("*.yaml")}
    assert shipped == set(CROSS_NET_CLASSES)
    for name in ABLATIONS:
        assert (CONF_DIR / "experiment" / "ablation" / f"{name}.yaml").is_file()


def test_default_cross_net_is_full_rank() -> None:
    composed = compose("train")
    assert composed.choices["model/cross/cross_net"] == "full"
    assert "cross_layers" not in composed.cfg.model.cross  # the cross_net's num_layers is the only one


@pytest.mark.parametrize("structure", sorted(STRUCTURE_CLASSES))
@pytest.mark.parametrize("cross_net", sorted(CROSS_NET_CLASSES))
def test_cross_net_option_composes_and_instantiates(structure: str, cross_net: str) -> None:
    composed = compose("train", [f"model/cross={structure}", f"model/cross/cross_net={cross_net}"])
    assert composed.choices["model/cross/cross_net"] == cross_net
    factory = instantiate(composed.cfg.model.cross)
    assert isinstance(factory, functools.partial)
    block = factory(24)
    assert isinstance(block, STRUCTURE_CLASSES[structure])
    assert isinstance(block.cross, CROSS_NET_CLASSES[cross_net])
    assert block.cross.num_layers == composed.cfg.model.cross.cross_net.num_layers
    assert block(torch.randn(2, 24)).shape == (2, composed.cfg.model.hidden_dim)


def test_cross_net_fields_are_overridable() -> None:
    overrides = [
        "model/cross/cross_net=mixture",
        "model.cross.cross_net.num_layers=3",
        "model.cross.cross_net.rank=4",
        "model.cross.cross_net.num_experts=2",
    ]
    net = instantiate(compose("train", overrides).cfg.model.cross)(24).cross
    assert (net.num_layers, len(net.layers), net.rank, net.num_experts) == (3, 3, 4, 2)


def test_issue_commands_compose() -> None:
    cfg = compose("train", ["+experiment=multihead_sequential", "model/cross/cross_net=mixture"]).cfg
    block = instantiate(cfg.model.cross)(24)
    assert isinstance(block, SequentialCross) and isinstance(block.cross, LowRankMixtureCrossNet)


def test_removed_cross_layers_key_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="cross_layers"):
        compose("train", ["model.cross.cross_layers=3"])


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_ablation_header_says_how_to_run_it(ablation: str) -> None:
    text = (CONF_DIR / "experiment" / "ablation" / f"{ablation}.yaml").read_text()
    package, command = text.splitlines()[:2]
    assert package == "# @package _global_"
    assert command == f"# convcg train +experiment=ablation/{ablation}"


@pytest.mark.parametrize(
    ("ablation", "cross_net"), [("low_rank_cross", "low_rank"), ("mixture_cross", "mixture")]
)
@pytest.mark.parametrize("structure", sorted(STRUCTURE_CLASSES))
def test_ablation_builds_a_model(ablation: str, cross_net: str, structure: str) -> None:
    composed = compose("train", [f"+experiment=ablation/{ablation}", f"model/cross={structure}"])
    assert composed.choices["experiment"] == f"ablation/{ablation}"
    assert composed.choices["model/cross/cross_net"] == cross_net
    cfg = composed.cfg
    model = model_from_config(cfg, USER, ITEM)
    assert isinstance(model.user_tower.interaction.cross, CROSS_NET_CLASSES[cross_net])
    batch = {
        "user_id": torch.tensor([1, 2]),
        "surface": torch.tensor([0, 3]),
        "log_account_age": torch.zeros(2),
    }
    assert model.embed_queries(batch).shape == (2, cfg.model.embedding_dim)
