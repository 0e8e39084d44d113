"""Vector features: the contract's checks, the synthetic content vectors and new items, the towers, and
a tiny training and evaluation with the items' content vectors."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from convcg_cli.config import compose
from convcg_cli.data.contract import (
    NOT_FINITE,
    VECTOR,
    WRONG_LENGTH,
    ColumnSchema,
    conform_frames,
    load_schemas,
    load_tables,
    write_tables,
)
from convcg_cli.data.features.encodings import FeatureColumns, table_features
from convcg_cli.data.importing import generate
from convcg_cli.errors import ConfigError, DataValidationError
from convcg_cli.metrics.retrieval import COLD_ITEMS, HELDOUT, metric_name
from convcg_cli.models.towers import FeatureEmbedder, FeatureSpec

HELDOUT_CONVERSION_COLD_RECALL_AT_100 = metric_name(HELDOUT, "conversion", 100, subset=COLD_ITEMS)


@pytest.fixture(scope="module")
def content_tables():
    """The tiny preset with content vectors, as frames."""
    import dataclasses

    from convcg_cli.data.importing.synth import _generate, resolve_config

    return _generate(dataclasses.replace(resolve_config("tiny"), content_vectors=True), 0)[0]


def _with_vectors(tables, vectors) -> dict[str, pl.DataFrame]:
    items = tables["items"].with_columns(pl.Series("content_emb", vectors, dtype=pl.List(pl.Float64)))
    return {**tables, "items": items}


def test_wrong_length_and_nan_vectors_are_clear_errors(tmp_path, content_tables):
    vectors = content_tables["items"]["content_emb"].to_list()
    vectors[3], vectors[7] = vectors[3][:5], vectors[7] + [0.0]
    out = write_tables(_with_vectors(content_tables, vectors), tmp_path / "length")
    with pytest.raises(DataValidationError) as err:
        load_tables(out)
    text = str(err.value)
    assert "items.parquet, column 'content_emb': 2 row(s) are not 16 floats long" in text
    assert "rows 3 (length 5), 7 (length 17)" in text
    vectors = content_tables["items"]["content_emb"].to_list()
    vectors[4][2] = float("nan")
    _, violations = conform_frames({"items": _with_vectors(content_tables, vectors)["items"]}, load_schemas())
    (v,) = violations
    assert v.kind == NOT_FINITE and v.rows == 1 and "rows 4" in str(v) and v.column == "content_emb"


def test_a_pinned_length_is_enforced_and_only_vectors_have_one(tmp_path):
    from convcg_cli.data.contract import conform_vector

    column = ColumnSchema("emb", VECTOR, length=3)
    vectors, violations = conform_vector("items", "items.parquet", column, pl.Series([[1.0, 2.0]] * 2))
    assert (
        vectors is None and violations[0].kind == WRONG_LENGTH and "not 3 floats long" in str(violations[0])
    )
    ok, none = conform_vector("items", "items.parquet", column, pl.Series([[1, 2, 3], None]))
    assert none == [] and ok.dtype == pl.Array(pl.Float32, 3)
    (tmp_path / "t.yaml").write_text(
        "table: t\nfile: t.parquet\ncolumns:\n  - {name: x, dtype: Int64, length: 3}\n"
    )
    with pytest.raises(ConfigError, match="only a vector column has a length"):
        load_schemas(tmp_path)


def test_an_undeclared_vector_feature_is_checked_too():
    users = pl.DataFrame({"user_id": [1, 2], "taste": [[0.5, 1.0], [0.5]]})
    with pytest.raises(DataValidationError, match="users.parquet, column 'taste': 1 row"):
        table_features(users, FeatureColumns(vector=("taste",)), "users.parquet")
    users = pl.DataFrame({"user_id": [1, 2], "taste": [[0.5, 1.0], None]})
    out = table_features(users, FeatureColumns(vector=("taste",)), "users.parquet")
    np.testing.assert_array_equal(out["taste"], [[0.5, 1.0], [0.0, 0.0]])


def test_content_vectors_are_opt_in_and_new_items_appear_only_in_the_last_days(content_tables):
    plain = generate("tiny", seed=0)
    assert "content_emb" not in plain["items"].columns
    # Everything but the new items' hold-back is unchanged: users and their features are the same.
    assert plain["users"].equals(content_tables["users"])
    imp = content_tables["impressions"]
    day = imp["timestamp"] // 86_400
    first_day = imp.group_by("item_id").agg((pl.col("timestamp").min() // 86_400).alias("day"))
    new = first_day.filter(pl.col("day") > day.max() - 2)
    assert new.height > 20  # ~20% of 600 items, those served in the last 2 days
    history_items = set(content_tables["user_history"]["item_id"].to_list())
    assert not history_items & set(new["item_id"].to_list())


def test_feature_embedder_projects_vectors_and_adds_nothing_without_them():
    torch.manual_seed(0)
    plain = FeatureEmbedder(FeatureSpec({"country": 10}, ("price",)), embedding_dim=4)
    torch.manual_seed(0)
    with_vectors = FeatureEmbedder(
        FeatureSpec({"country": 10}, ("price",), vectors={"emb": 6}), embedding_dim=4
    )
    assert set(plain.state_dict()) == {"embeddings.country.weight"}
    assert torch.equal(
        plain.state_dict()["embeddings.country.weight"], with_vectors.embeddings["country"].weight
    )
    batch = {"country": torch.tensor([0, 3]), "price": torch.tensor([0.5, -1.0]), "emb": torch.ones(2, 6)}
    assert with_vectors(batch).shape == (2, 4 + 1 + 4) and with_vectors.out_dim == 9


def test_tiny_training_and_evaluation_with_content_vectors(home, tiny_overrides, tiny_content_data):
    from convcg_cli.evaluate import evaluate
    from convcg_cli.train import train

    overrides = [*tiny_overrides, f"data.dir={tiny_content_data}", "+experiment=ablation/content_vectors"]
    train(compose("train", overrides))
    result = evaluate(compose("eval", ["bootstrap.n_boot=0", "baselines=[]"]), run="latest")
    assert 0.0 <= result.metrics[HELDOUT_CONVERSION_COLD_RECALL_AT_100] <= 1.0
    assert result.metrics["counts/heldout/conversion/cold/n_positives"] >= 1


def test_datamodule_reads_item_and_subject_vectors(tiny_content_data):
    from convcg_cli.data.loading import InMemoryDataModule

    dm = InMemoryDataModule(
        str(tiny_content_data), batch_size=128, features={"item": {"vector": ["content_emb"]}}
    )
    dm.setup("validate")
    assert dm.item_spec.vectors == {"content_emb": 16}
    assert dm.user_spec.vectors == {"subject_content_emb": 16}
    q = dm.queries["heldout"]
    related = q.surface == "related_items"
    subject = q.features["subject_item_id"][related] - 1
    np.testing.assert_array_equal(
        q.features["subject_content_emb"][related], dm.items.features["content_emb"][subject]
    )
    assert not q.features["subject_content_emb"][~related].any()
