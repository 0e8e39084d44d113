"""Items never shown in training: one encoding for the evaluation corpus and for serving
(``features.encode_never_shown``), and cold-start training (``data.item_id_dropout``)."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from convcg_cli.builders import build_datamodule, build_model
from convcg_cli.config import compose
from convcg_cli.data.contract import load_tables
from convcg_cli.data.features import encode_items
from convcg_cli.data.features.encodings import NEVER_SHOWN_CODE
from convcg_cli.data.loading import InMemoryDataModule, ItemIdDropout
from convcg_cli.errors import ConfigError
from tests.conftest import TINY_TRAIN

CONTENT = {"item": {"categorical": ["category_id"], "numeric": ["price"], "vector": ["content_emb"]}}


@pytest.fixture(scope="module")
def content_dm(tiny_content_data):
    """The tiny content logs (items new in the held-out days) with the items' content vectors."""
    dm = InMemoryDataModule(str(tiny_content_data), batch_size=128, features=CONTENT)
    dm.setup("fit")
    return dm


def test_items_never_shown_in_training_read_the_out_of_vocabulary_row_and_zero_impressions(content_dm):
    items = content_dm.items
    never = items.performance["impressions"].to_numpy() == 0
    assert never.any() and (~never).any()
    np.testing.assert_array_equal(items.never_shown, never)
    np.testing.assert_array_equal(content_dm.queries["heldout"].new_items, never)
    codes = items.features["item_id"]
    assert (codes[never] == NEVER_SHOWN_CODE).all()
    np.testing.assert_array_equal(codes[~never], np.flatnonzero(~never) + 1)  # shown items keep theirs
    assert content_dm.item_spec.categorical["item_id"] == len(items.item_ids) + 1  # one row per item
    shown_zero = items.features["perf_log_impressions"][~never].min()
    assert np.all(
        items.features["perf_log_impressions"][never] == items.never_shown_row["perf_log_impressions"]
    )
    assert items.never_shown_row["perf_log_impressions"] < shown_zero  # "0 impressions", not the mean
    assert (items.features["content_emb"][never] != 0).any()  # their content stays their own


def test_an_item_embeds_the_same_in_the_evaluation_corpus_and_through_serving(tiny_content_data):
    from convcg_cli.serve.export import make_bundle, serve_options
    from convcg_cli.serve.reindex import reindexed

    cfg = compose(
        "train", [f"data.dir={tiny_content_data}", *TINY_TRAIN, "+experiment=ablation/content_vectors"]
    ).cfg
    dm = build_datamodule(cfg, list(cfg.loss.task_weights), stage="validate")
    model = build_model(cfg, dm)
    with torch.no_grad():  # as if trained: the out-of-vocabulary row is not left at zero
        model.item_tower.embedder.embeddings["item_id"].weight[0].normal_()
    model.eval()
    corpus = model.embed_items(dm.item_features)
    bundle = make_bundle(cfg, dm, model, serve_options(cfg))
    np.testing.assert_array_equal(bundle.item_emb, corpus)
    table = load_tables(dm.dir)["items"].sort("item_id")
    never = np.flatnonzero(dm.items.never_shown)
    shown = np.flatnonzero(~dm.items.never_shown)[:3]
    # A never-shown corpus item under a new id (unknown to serving) and as itself, and shown items.
    renamed = table[never[:2]].with_columns(pl.col("item_id") + 10**9)
    new_table = pl.concat([table[shown], table[never[:2]], renamed])
    ids, features = encode_items(bundle.item_encoding, new_table)
    expected = {
        k: v.numpy()[np.concatenate([shown, never[:2], never[:2]])] for k, v in dm.item_features.items()
    }
    order = np.argsort(new_table["item_id"].to_numpy())
    for name, values in features.items():
        np.testing.assert_array_equal(values, expected[name][order], err_msg=name)
    served = reindexed(bundle, new_table).item_emb
    np.testing.assert_allclose(
        served, corpus[np.concatenate([shown, never[:2], never[:2]])][order], atol=1e-6
    )


def test_a_served_content_model_answers_related_items_requests_with_the_subjects_vector(
    tiny_content_data, tmp_path
):
    from convcg_cli.serve.bundle import ServingBundle
    from convcg_cli.serve.export import make_bundle, serve_options
    from convcg_cli.serve.model import CandidateModel

    cfg = compose(
        "train", [f"data.dir={tiny_content_data}", *TINY_TRAIN, "+experiment=ablation/content_vectors"]
    ).cfg
    dm = build_datamodule(cfg, list(cfg.loss.task_weights), stage="validate")
    model = build_model(cfg, dm).eval()
    bundle = ServingBundle.read(make_bundle(cfg, dm, model, serve_options(cfg)).write(tmp_path / "bundle"))
    subjects = dm.items.item_ids[:2]
    requests = pl.DataFrame(
        {"user_id": dm.users.user_ids[:2], "surface": ["related_items"] * 2, "subject_item_id": subjects}
    )
    out = CandidateModel(bundle).candidates(requests, k=5)
    assert out.height == 10
    rows = requests.with_columns(
        pl.lit(None, pl.Int64).alias("query_id"), pl.lit(None, pl.Int64).alias("timestamp")
    )
    queries = bundle.query_features(rows)
    np.testing.assert_array_equal(queries["subject_content_emb"], dm.items.features["content_emb"][:2])


def test_item_id_dropout_hits_its_share_in_training_batches_only(tiny_content_data):
    plain = InMemoryDataModule(str(tiny_content_data), batch_size=512, features=CONTENT)
    plain.setup("fit")
    dm = InMemoryDataModule(str(tiny_content_data), batch_size=512, features=CONTENT, item_id_dropout=0.3)
    dm.setup("fit")
    corpus_before = {k: v.clone() for k, v in dm.item_features.items()}
    row = dm.items.never_shown_row
    dropped, total = 0, 0
    for with_drop, without in zip(dm.train_dataloader(), plain.train_dataloader(), strict=True):
        assert torch.equal(with_drop["item_pos"], without["item_pos"])  # same batch order
        assert torch.equal(with_drop["user"]["user_id"], without["user"]["user_id"])
        out = with_drop["item"]["item_id"] == NEVER_SHOWN_CODE
        assert not (without["item"]["item_id"] == NEVER_SHOWN_CODE).any()
        for name, value in row.items():  # every derived feature of a dropped row is the never-shown one
            assert (with_drop["item"][name][out] == torch.as_tensor(value)).all(), name
            assert torch.equal(with_drop["item"][name][~out], without["item"][name][~out]), name
        for name in ("content_emb", "price", "category_id"):  # content is kept
            assert torch.equal(with_drop["item"][name], without["item"][name])
        dropped, total = dropped + int(out.sum()), total + len(out)
    assert abs(dropped / total - 0.3) < 0.05
    for name, values in dm.item_features.items():  # evaluation reads the corpus untouched
        assert torch.equal(values, corpus_before[name])
    assert dm.queries["heldout"].features.keys() == plain.queries["heldout"].features.keys()
    again = InMemoryDataModule(str(tiny_content_data), batch_size=512, features=CONTENT, item_id_dropout=0.3)
    again.setup("fit")
    first, repeat = next(iter(dm.train_set)), next(iter(again.train_set))  # epoch 1 vs epoch 0
    assert not torch.equal(first["item"]["item_id"], repeat["item"]["item_id"])
    again.train_set.epoch = 1
    assert torch.equal(first["item"]["item_id"], next(iter(again.train_set))["item"]["item_id"])


def test_item_id_dropout_on_the_streamed_path_keeps_the_shards_and_the_batch_order(
    tiny_content_data, tmp_path
):
    from convcg_cli.data.loading import StreamedDataModule

    def streamed(share: float) -> StreamedDataModule:
        dm = StreamedDataModule(
            str(tiny_content_data),
            stream={"chunk_rows": 5000, "cache_dir": str(tmp_path)},
            batch_size=256,
            features=CONTENT,
            item_id_dropout=share,
        )
        dm.setup("fit")
        return dm

    plain, dropped = streamed(0.0), streamed(0.4)
    assert plain.shard_dir == dropped.shard_dir  # the option draws batches, it is not in the cache key
    hits = []
    for with_drop, without in zip(dropped.train_dataloader(), plain.train_dataloader(), strict=True):
        assert torch.equal(with_drop["item_pos"], without["item_pos"])
        hits.append(with_drop["item"]["item_id"] == NEVER_SHOWN_CODE)
    share = float(torch.cat(hits).float().mean())
    assert abs(share - 0.4) < 0.06


def test_item_id_dropout_keeps_two_dimensional_features_per_row():
    drop = ItemIdDropout(0.5, {"item_id": torch.tensor(0), "factor": torch.tensor(0.0)})
    item = {"item_id": torch.arange(1, 101), "factor": torch.ones(100), "emb": torch.ones(100, 3)}
    out = drop.apply(item, drop.stream(seed=7, epoch=0, rank=0))
    dropped = out["item_id"] == 0
    assert 30 < int(dropped.sum()) < 70
    assert torch.equal(out["factor"], (~dropped).float()) and torch.equal(out["emb"], item["emb"])
    again = drop.apply(item, drop.stream(seed=7, epoch=0, rank=0))
    assert torch.equal(again["item_id"], out["item_id"])  # deterministic under the seed


@pytest.mark.parametrize("share", [1.0, -0.2])
def test_a_share_outside_zero_to_one_is_refused(tiny_content_data, share):
    with pytest.raises(ConfigError, match=r"data.item_id_dropout must be in \[0, 1\)"):
        InMemoryDataModule(str(tiny_content_data), item_id_dropout=share)


def test_cold_start_experiment_composes_with_content_vectors():
    cfg = compose("train", ["+experiment=ablation/cold_start"]).cfg
    assert cfg.data.item_id_dropout == 0.25
    assert list(cfg.data.features.item.vector) == ["content_emb"]
