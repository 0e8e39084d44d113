"""Every shipped experiment on a shop's purchase log (the ``sparse_shop`` preset at tiny scale):
it trains, or it refuses in one line naming what the log lacks. The default design runs in the fast suite,
the others with the slow tests. And the design experiments' default levers (conf/levers/best.yaml)
settle to what the data can feed."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient

from convcg_cli.config import CONF_DIR, compose
from convcg_cli.data.contract import METADATA_FILE
from convcg_cli.data.features import resolve_auto_levers
from convcg_cli.errors import ConvcgError
from convcg_cli.train import train
from tests.conftest import TINY_TRAIN

DEFAULT = "unified_parallel"  # the README's design; the other experiments run with the slow tests
OTHERS = sorted(
    str(p.relative_to(CONF_DIR / "experiment").with_suffix(""))
    for p in (CONF_DIR / "experiment").rglob("*.yaml")
    if p.stem != DEFAULT
)


def _train_or_refuse(experiment: str, data_dir, home) -> None:
    composed = compose("train", [f"+experiment={experiment}", f"data.dir={data_dir}", *TINY_TRAIN])
    try:
        result = train(composed)
    except ConvcgError as exc:  # a refusal: one line, naming the config key or column it needs
        message = str(exc)
        assert "\n" not in message.strip() and ("data." in message or "column" in message), message
        return
    metrics = MlflowClient(tracking_uri=f"sqlite:///{home}/mlflow.db").get_run(result.run_id).data.metrics
    if not composed.cfg.data.train_through_val:
        assert 0.0 <= metrics["val/conversion/recall_at_100"] <= 1.0


def test_the_default_design_trains_on_a_shop_log_with_its_default_levers(tiny_shop_data, home):
    _train_or_refuse(DEFAULT, tiny_shop_data, home)


@pytest.mark.slow
@pytest.mark.parametrize("experiment", OTHERS)
def test_every_other_experiment_trains_on_a_shop_log_or_refuses_in_one_line(experiment, tiny_shop_data, home):
    _train_or_refuse(experiment, tiny_shop_data, home)


def test_the_designs_turn_the_levers_on_and_levers_none_is_the_bare_design():
    best = compose("train", ["+experiment=unified_parallel"]).cfg
    assert best.data.use_user_history == "auto" and best.data.cofactors.dim == 64
    assert best.data.cofactors.leave_target_out and best.data.history_examples.max_per_user == 10
    assert "ema" in best.callbacks and best.model.init_item_embeddings_from_cofactors
    bare = compose("train", ["+experiment=unified_parallel", "levers=none"]).cfg
    assert not bare.data.use_user_history and bare.data.cofactors.dim == 0 and "ema" not in bare.callbacks


def test_auto_user_history_is_on_unless_the_import_recorded_it_missing(tmp_path):
    cfg = compose("train", ["+experiment=unified_parallel", f"data.dir={tmp_path}"]).cfg
    assert resolve_auto_levers(cfg) == [] and cfg.data.use_user_history is True
    (tmp_path / METADATA_FILE).write_text(
        json.dumps({"disabled_levers": {"user_history": "no history file"}})
    )
    cfg = compose("train", ["+experiment=unified_parallel", f"data.dir={tmp_path}"]).cfg
    (line,) = resolve_auto_levers(cfg)
    assert "no history file" in line and "history_examples" in line
    assert cfg.data.use_user_history is False and cfg.data.history_examples.max_per_user == 0
    explicit = compose("train", ["data.use_user_history=true", f"data.dir={tmp_path}"]).cfg
    assert resolve_auto_levers(explicit) == [] and explicit.data.use_user_history is True  # refused later
