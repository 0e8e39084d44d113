"""The user-history levers compose, build and start where they say (tiny logs, no training)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from convcg_cli.builders import build_datamodule, build_model
from convcg_cli.config import compose
from convcg_cli.data.features.cofactors import item_factor_matrix
from convcg_cli.errors import ConfigError
from tests.conftest import TINY_SPLIT

TASKS = ["conversion", "engagement"]
SMALL = [TINY_SPLIT, "model.hidden_dim=16", "model.embedding_dim=8", "model.feature_embedding_dim=8"]


def _built(tiny_data, *overrides: str):
    cfg = compose("train", [f"data.dir={tiny_data}", *SMALL, *overrides]).cfg
    dm = build_datamodule(cfg, TASKS, stage="validate")
    return dm, build_model(cfg, dm)


def test_item_tables_start_from_the_cofactors(tiny_data):
    dm, model = _built(tiny_data, "+experiment=ablation/prelog_sequence", "data.cofactors.dim=8")
    factors = item_factor_matrix(dm.items.features)
    assert factors is not None and factors.shape == (len(dm.items.item_ids), 8)
    tables = [
        model.item_tower.embedder.embeddings["item_id"].weight,
        model.user_tower.embedder.embeddings["subject_item_id"].weight,
        model.user_tower.embedder.sequence_encoders["history"].item_embedding.weight,
    ]
    for weight in tables:
        block = weight[1:, :8].detach().numpy()
        ratio = block / np.where(factors == 0, np.nan, factors)
        scale = np.nanmedian(ratio)
        np.testing.assert_allclose(block, factors * scale, rtol=1e-4, atol=1e-6)


def test_init_needs_the_factors(tiny_data):
    with pytest.raises(ConfigError, match="cofactors.dim"):
        _built(tiny_data, "model.init_item_embeddings_from_cofactors=true")


@pytest.mark.parametrize(
    "experiment", ["cofactors", "cofactor_init", "history_examples", "history_all", "prelog_sequence"]
)
def test_history_lever_experiments_take_a_training_step(tiny_data, experiment):
    cfg = compose("train", [f"data.dir={tiny_data}", *SMALL, f"+experiment=ablation/{experiment}"]).cfg
    dm = build_datamodule(cfg, TASKS, stage="fit")
    model = build_model(cfg, dm)
    batch = next(iter(dm.train_dataloader()))
    loss = model.training_step(batch, 0)
    assert torch.isfinite(loss) and loss.requires_grad
