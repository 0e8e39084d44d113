"""Feature spec, embedder and tower: widths, end-to-end shapes, and clear errors on bad input."""

from functools import partial

import pytest
import torch

from convcg_cli.models.cross import ParallelCross, SequentialCross
from convcg_cli.models.heads import MultiHead, UnifiedHead
from convcg_cli.models.sequence import HistoryEncoder
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


def test_feature_spec_normalises_its_containers() -> None:
    # Configs hand over DictConfig/ListConfig and string numbers: the spec holds plain dicts and tuples.
    from omegaconf import OmegaConf

    spec = FeatureSpec(OmegaConf.create({"country": 5, "category": "7"}), OmegaConf.create(["price", "age"]))
    assert spec == SPEC and type(spec.categorical) is dict and spec.numeric == ("price", "age")


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


# A user tower with a history sequence: the batch carries `history` and `history_actions` (B, L).
SEQ_SPEC = FeatureSpec(categorical={"country": 5}, numeric=("age",), sequences={"history": 10})
HISTORY = partial(HistoryEncoder, dim=4, num_heads=2, max_len=3)


def _seq_features() -> dict[str, torch.Tensor]:
    feats = {k: v for k, v in _features(batch=3).items() if k in ("country", "age")}
    feats["history"] = torch.tensor([[4, 2, 9], [7, 0, 0], [0, 0, 0]])  # the last user has none
    feats["history_actions"] = torch.tensor([[1, 3, 2], [2, 0, 0], [0, 0, 0]])
    return feats


def test_feature_spec_with_sequences_only() -> None:
    assert SPEC.sequences == {}
    assert FeatureSpec(categorical={}, sequences={"history": 3}).sequences == {"history": 3}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"categorical": {"a": 3}, "sequences": {"h": 1}},  # vocabulary must hold padding + an item
        {"categorical": {"h": 3}, "sequences": {"h": 5}},
        {"categorical": {"h_actions": 3}, "sequences": {"h": 5}},
    ],
)
def test_feature_spec_rejects_bad_sequences(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        FeatureSpec(**kwargs)


def test_embedder_appends_encoded_sequence() -> None:
    emb = FeatureEmbedder(SEQ_SPEC, embedding_dim=2, sequence_encoder=HISTORY)
    assert emb.out_dim == 2 + 1 + 2 * 4
    feats = _seq_features()
    out = emb(feats)
    assert out.shape == (3, emb.out_dim)
    # layout: country(2) | age | history(8)
    torch.testing.assert_close(out[:, 2], feats["age"])
    encoded = emb.sequence_encoders["history"](feats["history"], feats["history_actions"])
    torch.testing.assert_close(out[:, 3:], encoded)
    assert torch.equal(out[2, 3:].abs(), torch.zeros(8))  # no history -> zeros, not NaN


def test_sequence_without_encoder_factory_raises() -> None:
    with pytest.raises(ValueError, match="sequence_encoder"):
        FeatureEmbedder(SEQ_SPEC)


def test_sequence_encoder_is_ignored_without_sequences() -> None:
    plain = FeatureEmbedder(SPEC, embedding_dim=2)
    torch.manual_seed(0)
    with_factory = FeatureEmbedder(SPEC, embedding_dim=2, sequence_encoder=HISTORY)
    assert with_factory.out_dim == plain.out_dim
    assert with_factory.state_dict().keys() == plain.state_dict().keys()  # old checkpoints still load


def test_missing_sequence_actions_raises_naming_them() -> None:
    feats = _seq_features()
    del feats["history_actions"]
    with pytest.raises(KeyError, match="history_actions"):
        FeatureEmbedder(SEQ_SPEC, sequence_encoder=HISTORY)(feats)


def test_tower_with_history_end_to_end() -> None:
    torch.manual_seed(0)
    tower = Tower(
        SEQ_SPEC,
        interaction=partial(ParallelCross, out_dim=8, mlp_dims=(16, 8, 4)),
        head=partial(UnifiedHead, embedding_dim=5, tasks=TASKS),
        embedding_dim=3,
        sequence_encoder=HISTORY,
    )
    assert tower.interaction.in_dim == 3 + 1 + 8
    out = tower(_seq_features())
    assert all(v.shape == (3, 5) for v in out.values())
    sum(v.sum() for v in out.values()).backward()
    history_grads = [p.grad for p in tower.embedder.sequence_encoders.parameters() if p.grad is not None]
    assert history_grads and all(torch.isfinite(g).all() for g in history_grads)
    tower.eval()
    with torch.no_grad():
        served = tower.serve(_seq_features())
    assert served.shape == (3, 5) and torch.isfinite(served).all()
