"""Feature spec, embedder and tower: widths, end-to-end shapes, and clear errors on bad input."""

from functools import partial

import pytest
import torch

from convcg_cli.models.cross import ParallelCross, SequentialCross
from convcg_cli.models.heads import MultiHead, UnifiedHead
from convcg_cli.models.towers import FeatureEmbedder, FeatureSpec, Tower
from convcg_cli.tasks import CONVERSION, ENGAGEMENT

TASKS = [CONVERSION, ENGAGEMENT]
SPEC = FeatureSpec(categorical={"country": 5, "category": 7}, numeric=("price", "age"))


def _features(batch: int = 3) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "country": torch.randint(0, 5, (batch,)),
        "category": torch.randint(0, 7, (batch,)),
        "price": torch.randn(batch),
        "age": torch.randn(batch),
        "item_id": torch.arange(batch),  # extra keys in a batch are ignored
    }


def test_feature_spec_round_trips_through_dict() -> None:
    d = SPEC.to_dict()
    assert d == {"categorical": {"category": 7, "country": 5}, "numeric": ["price", "age"]}
    assert FeatureSpec.from_dict(d) == SPEC


@pytest.mark.parametrize(
    ("categorical", "numeric"),
    [({"a": 0}, ()), ({"a": 3}, ("a",)), ({}, ("x", "x")), ({}, ())],
)
def test_feature_spec_rejects_bad_input(categorical: dict[str, int], numeric: tuple[str, ...]) -> None:
    with pytest.raises(ValueError):
        FeatureSpec(categorical=categorical, numeric=numeric)


def test_embedder_out_dim_with_overrides() -> None:
    emb = FeatureEmbedder(SPEC, embedding_dim=4, embedding_dims={"category": 6})
    assert emb.out_dim == 4 + 6 + 2
    assert emb(_features()).shape == (3, emb.out_dim)


def test_embedder_order_is_sorted_and_numeric_passes_through() -> None:
    emb = FeatureEmbedder(SPEC, embedding_dim=2)
    feats = _features()
    out = emb(feats)
    # layout: category(2) | country(2) | age | price
    torch.testing.assert_close(out[:, 0:2], emb.embeddings["category"](feats["category"]))
    torch.testing.assert_close(out[:, 2:4], emb.embeddings["country"](feats["country"]))
    torch.testing.assert_close(out[:, 4], feats["age"])
    torch.testing.assert_close(out[:, 5], feats["price"])


def test_embedder_override_for_unknown_feature_raises() -> None:
    with pytest.raises(ValueError, match="colour"):
        FeatureEmbedder(SPEC, embedding_dims={"colour": 3})


def test_missing_feature_raises_naming_it() -> None:
    feats = _features()
    del feats["price"]
    with pytest.raises(KeyError, match="price"):
        FeatureEmbedder(SPEC)(feats)


@pytest.mark.parametrize(
    ("interaction", "head"),
    [
        (partial(ParallelCross, out_dim=8, mlp_dims=(16, 8, 4)), partial(UnifiedHead, tasks=TASKS)),
        (partial(SequentialCross, out_dim=8, mlp_dims=(16, 8)), partial(MultiHead, tasks=TASKS)),
    ],
)
def test_tower_end_to_end_shapes(interaction: partial, head: partial) -> None:
    tower = Tower(SPEC, interaction=interaction, head=partial(head, embedding_dim=5), embedding_dim=3)
    assert tower.interaction.in_dim == tower.embedder.out_dim == 3 + 3 + 2
    out = tower(_features(batch=4))
    assert list(out) == TASKS
    assert all(v.shape == (4, 5) for v in out.values())
    served = tower.serve(_features(batch=4))
    assert served.shape == (4, 5)
    torch.testing.assert_close(served, out[CONVERSION])
