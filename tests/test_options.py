"""Numeric options are checked before any run is created: exit 2, one paragraph naming key, value and
range (``convcg_cli.options``)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from convcg_cli.cli import app
from convcg_cli.config import compose
from convcg_cli.errors import ConfigError
from convcg_cli.options import NUMERIC_OPTIONS, NumericOption, check_numeric_options
from tests.conftest import runs_in

runner = CliRunner()

BAD_TRAIN_OPTIONS = [
    ("data.batch_size=0", "data.batch_size=0", "an integer >= 1"),
    ("data.batch_size=-5", "data.batch_size=-5", "an integer >= 1"),
    ("model.embedding_dim=0", "model.embedding_dim=0", "an integer >= 1"),
    ("model.feature_embedding_dim=0", "model.feature_embedding_dim=0", "an integer >= 1"),
    ("seed=abc", "seed='abc'", "an integer in [0, 4294967295]"),
    ("model.optimizer.lr=nan", "model.optimizer.lr=nan", "a finite number > 0"),
    ("model.optimizer.lr=0", "model.optimizer.lr=0", "a finite number > 0"),
    ("loss.temperature=1e-30", "loss.temperature=1e-30", "a finite number >= 0.0001"),
    ("trainer.max_epochs=-1", "trainer.max_epochs=-1", "an integer >= 1"),
    ("loss.task_weights.engagement=-1", "loss.task_weights.engagement=-1", "a finite number >= 0"),
    ("val_ks=[0,100]", "val_ks[0]=0", "an integer >= 1"),
    ("data.item_id_dropout=1.0", "data.item_id_dropout=1.0", "a finite number in [0, 1)"),
    ("data.item_id_dropout=-0.1", "data.item_id_dropout=-0.1", "a finite number in [0, 1)"),
]


pytestmark = pytest.mark.faults


@pytest.mark.parametrize(("override", "shown", "allowed"), BAD_TRAIN_OPTIONS)
def test_train_refuses_a_bad_numeric_option_before_creating_a_run(home, tiny_data, override, shown, allowed):
    result = runner.invoke(app, ["train", f"data.dir={tiny_data}", override])
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert shown in message and f"(allowed: {allowed})" in message
    assert "Traceback" not in result.output
    assert runs_in(home) == []


def test_eval_refuses_a_bad_numeric_option(home):
    result = runner.invoke(app, ["eval", "ks=[10,-1]"])
    assert result.exit_code == 2
    assert "ks[1]=-1 (allowed: an integer >= 1)" in " ".join(result.output.split())


def test_every_bad_value_is_named_in_one_message():
    with pytest.raises(ConfigError) as caught:
        compose("train", ["data.batch_size=0", "model.hidden_dim=-1"])
    assert "data.batch_size=0" in str(caught.value) and "model.hidden_dim=-1" in str(caught.value)


def test_every_option_of_the_table_exists_in_a_shipped_config():
    """A key misspelt in the table would never be checked."""
    configs = [
        compose(
            "train",
            [
                "loss/logq=streaming",
                "loss/balancer=uncertainty",
                "data/stream=streamed",
                "+data.eval_batch_size=64",
            ],
        ).cfg,
        compose(
            "train", ["loss/balancer=gradnorm", "model/cross/cross_net=mixture", "data/label_maturity=weight"]
        ).cfg,
        compose("eval", ["popularity_prior.betas=[0.5]"]).cfg,
    ]
    from convcg_cli.options import _values

    for option in NUMERIC_OPTIONS:
        assert any(_values(cfg, option.key.split("."), "") for cfg in configs), option.key


@pytest.mark.parametrize(
    ("option", "value", "ok"),
    [
        (NumericOption("x", integer=True, minimum=1), 1, True),
        (NumericOption("x", integer=True, minimum=1), 1.0, False),
        (NumericOption("x", integer=True, minimum=1), True, False),
        (NumericOption("x", minimum=0, exclusive_minimum=True), 0.0, False),
        (NumericOption("x", minimum=0, exclusive_minimum=True), float("inf"), False),
        (NumericOption("x", maximum=1, exclusive_maximum=True), 1, False),
        (NumericOption("x", nullable=True), None, True),
        (NumericOption("x"), None, False),
    ],
)
def test_numeric_option_accepts(option, value, ok):
    assert option.accepts(value) is ok


def test_a_config_without_the_key_is_not_checked():
    check_numeric_options({"trainer": {}}, (NumericOption("trainer.max_epochs", integer=True, minimum=1),))


@pytest.mark.parametrize(
    "overrides",
    [["serve.nprobe=0"], ["data/label_maturity=weight", "data.label_maturity.max_weight=0.5"]],
)
def test_options_from_the_serve_and_maturity_blocks_are_checked(overrides):
    compose("train", overrides[:-1])  # the shipped values pass
    with pytest.raises(ConfigError, match="allowed"):
        compose("train", overrides)
