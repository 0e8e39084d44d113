"""Levers an import recorded as disabled are refused before training (exit 2, lever and signal named)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from convcg_cli.cli import app
from convcg_cli.config import compose
from convcg_cli.data.features import check_levers, disabled_levers, levers_in_use, refused_levers
from convcg_cli.data.importing import (
    ADVERTISER_SOFTMAX,
    DWELL_WEIGHTED_POSITIVES,
    IMPRESSION_HARD_NEGATIVES,
    USER_HISTORY,
    import_logs,
    load_mapping,
)
from convcg_cli.errors import ConfigError
from tests.conftest import runs_in

SHOP = Path(__file__).parent / "fixtures" / "shop_sample"


def test_levers_in_use_follow_the_config():
    assert levers_in_use(compose("train").cfg) == {}
    overrides = [
        "data/positives=dual",
        "data.hard_negatives=2",
        "loss.advertiser_weight=0.5",
        "data.use_user_history=true",
    ]
    assert levers_in_use(compose("train", overrides).cfg) == {
        DWELL_WEIGHTED_POSITIVES: "data/positives=dual",
        IMPRESSION_HARD_NEGATIVES: "data.hard_negatives=2",
        ADVERTISER_SOFTMAX: "loss.advertiser_weight=0.5",
        USER_HISTORY: "data.use_user_history=true",
    }


def test_only_levers_both_used_and_disabled_are_refused():
    used = {DWELL_WEIGHTED_POSITIVES: "data/positives=dual", ADVERTISER_SOFTMAX: "loss.advertiser_weight=1"}
    disabled = {DWELL_WEIGHTED_POSITIVES: "No dwell signal", USER_HISTORY: "No user history table"}
    assert refused_levers(used, disabled) == [
        "dwell_weighted_positives (switched on by data/positives=dual) needs a signal this data lacks: "
        "No dwell signal"
    ]


def test_data_without_provenance_refuses_nothing(tmp_path):
    assert disabled_levers(tmp_path) == {}
    (tmp_path / "synth.json").write_text(json.dumps({"kind": "synthetic"}))
    cfg = compose("train", [f"data.dir={tmp_path}", "data/positives=dual"]).cfg
    check_levers(cfg)


@pytest.fixture(scope="module")
def purchases_only(tmp_path_factory) -> Path:
    """The shop sample's purchases alone: no dwell, no served-but-ignored rows."""
    mapping = load_mapping(SHOP / "shop.yaml")
    mapping["impressions"]["files"] = mapping["impressions"]["files"][:1]
    out = tmp_path_factory.mktemp("shop") / "purchases"
    import_logs(mapping, SHOP, out)
    return out


def test_check_levers_names_each_lever_and_missing_signal(purchases_only):
    cfg = compose("train", [f"data.dir={purchases_only}", "data.hard_negatives=1"]).cfg
    with pytest.raises(
        ConfigError, match="impression_hard_negatives .switched on by data.hard_negatives=1. needs"
    ):
        check_levers(cfg)


def test_training_a_disabled_lever_exits_2_before_any_run(home, purchases_only):
    result = CliRunner().invoke(app, ["train", f"data.dir={purchases_only}", "data/positives=dual"])
    text = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert (
        "dwell_weighted_positives (switched on by data/positives=dual) needs a signal this data lacks" in text
    )
    assert "No dwell signal" in text and "Traceback" not in text
    assert runs_in(home) == []
