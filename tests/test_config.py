"""Every shipped config composes and instantiates; override mistakes give helpful errors."""

from __future__ import annotations

import functools

import pytest
import torch

from convcg_cli.builders import model_from_config
from convcg_cli.config import CONF_DIR, compose, instantiate
from convcg_cli.errors import ConfigError
from convcg_cli.models.towers import FeatureSpec

EXPERIMENTS = sorted(
    str(p.relative_to(CONF_DIR / "experiment").with_suffix(""))
    for p in (CONF_DIR / "experiment").rglob("*.yaml")
)
USER = FeatureSpec(categorical={"user_id": 11, "surface": 4}, numeric=("log_account_age",))
ITEM = FeatureSpec(categorical={"item_id": 21, "advertiser_id": 5}, numeric=("ctr",))


def build(overrides: list[str]):
    cfg = compose("train", overrides).cfg
    return model_from_config(cfg, USER, ITEM)


def test_the_four_designs_ship():
    assert {"multihead_sequential", "multihead_parallel", "unified_sequential", "unified_parallel"} <= set(
        EXPERIMENTS
    )


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_instantiates(experiment):
    composed = compose("train", [f"+experiment={experiment}"])
    assert composed.choices["experiment"] == experiment
    model = build([f"+experiment={experiment}"])
    batch = {
        "user_id": torch.tensor([1, 2]),
        "surface": torch.tensor([0, 3]),
        "log_account_age": torch.zeros(2),
    }
    emb = model.embed_queries(batch)
    assert emb.shape == (2, composed.cfg.model.embedding_dim)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_header_says_how_to_run_it(experiment):
    # Hydra reads `@package` only from the very first comment lines, so the command comes second.
    package, command = (CONF_DIR / "experiment" / f"{experiment}.yaml").read_text().splitlines()[:2]
    assert package == "# @package _global_"
    assert command == f"# convcg train +experiment={experiment}"


def test_experiments_differ_in_architecture():
    def shapes(exp):
        model = build([f"+experiment={exp}"])
        return {k: tuple(v.shape) for k, v in model.state_dict().items()}

    designs = {
        exp: shapes(exp)
        for exp in ("multihead_sequential", "multihead_parallel", "unified_sequential", "unified_parallel")
    }
    assert len({tuple(sorted(s.items())) for s in designs.values()}) == len(designs)
    # multi-head has one projection per task, unified exactly one.
    multi = [k for k in designs["multihead_parallel"] if k.startswith("user_tower.head.")]
    unified = [k for k in designs["unified_parallel"] if k.startswith("user_tower.head.")]
    assert len(multi) == 2 * len(unified)
    # parallel projects the concatenated cross and MLP outputs; sequential has no such projection.
    assert any(".interaction.proj." in k for k in designs["unified_parallel"])
    assert not any(".interaction.proj." in k for k in designs["unified_sequential"])


def test_task_weights_override_reaches_the_loss():
    cfg = compose("train", ["loss.task_weights.engagement=0.7"]).cfg
    assert instantiate(cfg.loss).task_weights == {"conversion": 1.0, "engagement": 0.7}


def test_paths_are_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = compose("train").cfg
    assert cfg.paths.root_dir == str(tmp_path.resolve())
    assert cfg.logger.tracking_uri == f"sqlite:///{tmp_path.resolve()}/mlflow.db"


def test_typo_in_key_is_a_config_error_with_hint():
    with pytest.raises(ConfigError, match="did you mean 'trainer.max_epochs'"):
        compose("train", ["trainer.max_epoch=2"])


def test_experiment_without_plus_says_to_use_plus():
    with pytest.raises(ConfigError, match=r"\+experiment=NAME"):
        compose("train", ["experiment=unified_parallel"])


def test_unknown_experiment_lists_available():
    with pytest.raises(ConfigError, match="unified_parallel"):
        compose("train", ["+experiment=nope"])


def test_eval_config_composes():
    cfg = compose("eval", ["ks=[100,1000]"]).cfg
    assert list(cfg.ks) == [100, 1000] and cfg.split == "heldout"


def test_unknown_task_weight_is_rejected():
    cfg = compose("train", ["+loss.task_weights.purchse=1.0"]).cfg
    with pytest.raises(ConfigError, match="purchse"):
        instantiate(cfg.loss)


def test_parallel_and_sequential_factories_take_in_dim():
    cfg = compose("train", ["+experiment=unified_sequential"]).cfg
    cross = instantiate(cfg.model.cross)
    assert isinstance(cross, functools.partial)
    assert cross(24).out_dim == cfg.model.hidden_dim


def test_rejected_constructor_argument_is_a_config_error():
    with pytest.raises(ConfigError, match="SequentialCross"):
        build(["+experiment=unified_sequential", "model.cross.mlp_dims=[8]"])


def test_config_dir_variable_adds_a_users_configs(tmp_path, monkeypatch):
    from convcg_cli.config import CONFIG_DIR_VARIABLE

    own = tmp_path / "conf" / "experiment"
    own.mkdir(parents=True)
    (own / "mine.yaml").write_text("# @package _global_\nseed: 7\n")
    monkeypatch.setenv(CONFIG_DIR_VARIABLE, str(tmp_path / "conf"))
    assert compose("train", ["+experiment=mine"]).cfg.seed == 7
    assert compose("train", ["+experiment=unified_parallel"]).cfg.seed == 42  # the shipped ones stay


def test_config_dir_option_that_is_no_directory_is_a_clear_error(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from convcg_cli.cli import app
    from convcg_cli.config import CONFIG_DIR_VARIABLE

    monkeypatch.setenv(CONFIG_DIR_VARIABLE, "")  # recorded, so the value --config-dir sets is undone
    result = CliRunner().invoke(app, ["--config-dir", str(tmp_path / "nowhere"), "ablate", "smoke"])
    assert result.exit_code == 2
    assert "is not a directory" in " ".join(result.output.split()) and "Traceback" not in result.output
