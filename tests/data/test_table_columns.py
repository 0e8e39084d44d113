"""Feature columns from data.features: named lists, or ``auto`` lists derived from the tables."""

from __future__ import annotations

import shutil
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from convcg_cli.cli import app
from convcg_cli.config import CONF_DIR, compose
from convcg_cli.data.contract import load_schemas, load_tables
from convcg_cli.data.features.encodings import FeatureColumns
from convcg_cli.data.features.table_columns import AUTO, FeatureColumnError, choose_features
from convcg_cli.errors import ConfigError
from tests.conftest import TINY_SPLIT, TINY_TRAIN, runs_in

SCHEMAS = load_schemas()
ALL_AUTO = {side: dict.fromkeys(("categorical", "numeric", "vector"), AUTO) for side in ("item", "user")}


def _tables(items: pl.DataFrame, users: pl.DataFrame) -> dict[str, pl.DataFrame]:
    return {"items": items, "users": users}


def _loaded(data: Path) -> dict[str, pl.DataFrame]:
    return load_tables(data, {name: SCHEMAS[name] for name in ("items", "users")})


ITEMS = pl.DataFrame(
    {
        "item_id": [1, 2, 3, 4],
        "advertiser_id": [0, 0, 1, 1],
        "category_id": [None, None, None, None],  # declared, no values
        "price": [1.0, 2.0, 2.0, 5.0],
        "colour": ["red", "red", "blue", None],  # extra text: categorical
        "weight": [0.5, 0.5, 0.5, 0.5],  # extra float, one value: left out
        "sku": ["a", "b", "c", "d"],  # extra text, a distinct value on every row: an identifier
        "tags": [[1], [2], [3], [4]],  # extra list: no feature type
    },
    schema_overrides={"category_id": pl.Int64},
)
USERS = pl.DataFrame({"user_id": [1, 2, 3], "age_bucket": [1, 2, 1], "score": [0.1, 0.7, 0.3]})


def test_the_synthetic_tables_derive_exactly_the_old_explicit_lists_in_order(tiny_data):
    chosen = choose_features(compose("train", []).cfg.data.features, _loaded(tiny_data), SCHEMAS)
    assert chosen.columns == {
        "item": FeatureColumns(categorical=("category_id",), numeric=("price",)),
        "user": FeatureColumns(categorical=("age_bucket", "region_id"), numeric=("account_age_days",)),
    }
    assert chosen.left_out == ()
    assert chosen.describe() == [
        "Features from the tables (data.features ... auto): items: categorical [category_id], numeric "
        "[price]; users: categorical [age_bucket, region_id], numeric [account_age_days]"
    ]


def test_auto_takes_each_column_by_its_kind_and_says_what_it_left_out_and_why():
    chosen = choose_features(ALL_AUTO, _tables(ITEMS, USERS), SCHEMAS)
    assert chosen.columns["item"] == FeatureColumns(categorical=("colour",), numeric=("price",))
    assert chosen.columns["user"] == FeatureColumns(categorical=("age_bucket",), numeric=("score",))
    assert [str(c) for c in chosen.left_out] == [
        "items.category_id (no values)",
        "items.weight (one value on every row: 0.5)",
        "items.sku (a distinct value on every row: an identifier)",
        "items.tags (List(Int64) is no feature type)",
    ]
    (_, left_out) = chosen.describe()
    assert left_out.startswith("Left out of the features: items.category_id (no values), items.weight")


def test_named_lists_win_and_auto_lists_do_not_take_a_named_column_again():
    features = {
        "item": {"categorical": ["price", "weight"], "numeric": AUTO, "vector": []},
        "user": {"categorical": [], "numeric": AUTO},  # vector not given: none
    }
    chosen = choose_features(features, _tables(ITEMS, USERS), SCHEMAS)
    # weight has one value, but it was named: kept; price was named categorical: not numeric too
    assert chosen.columns["item"] == FeatureColumns(categorical=("price", "weight"))
    assert chosen.columns["user"] == FeatureColumns(numeric=("score",))
    assert chosen.derived == {"item": ("numeric",), "user": ("numeric",)}


def test_one_error_names_every_named_column_the_tables_cannot_feed():
    features = {
        "item": {"categorical": ["category_id"], "numeric": ["price", "colour"], "vector": ["content_emb"]},
        "user": {"categorical": ["region_id"], "numeric": [], "vector": []},
    }
    users = USERS.with_columns(pl.lit(None, pl.Int64).alias("region_id"))
    with pytest.raises(FeatureColumnError) as caught:
        choose_features(features, _tables(ITEMS, users), SCHEMAS)
    message = str(caught.value)
    assert "names 4 column(s)" in message and "\n" not in message
    assert "items.category_id (categorical): no values in its 4 rows" in message
    assert "items.colour (numeric): it is String, not a number" in message
    assert "items.content_emb (vector): no column 'content_emb' in items.parquet" in message
    assert "users.region_id (categorical): no values in its 3 rows" in message
    assert "items.price" not in message


def test_shorthands_and_bad_values():
    whole = choose_features(AUTO, _tables(ITEMS, USERS), SCHEMAS)
    assert whole.columns == choose_features(ALL_AUTO, _tables(ITEMS, USERS), SCHEMAS).columns
    side = choose_features({"item": AUTO, "user": {}}, _tables(ITEMS, USERS), SCHEMAS)
    assert side.columns["item"] == whole.columns["item"] and side.columns["user"] == FeatureColumns()
    assert choose_features(None, _tables(ITEMS, USERS), SCHEMAS).derived == {"item": (), "user": ()}
    with pytest.raises(
        FeatureColumnError, match="data.features.item.numeric is a list of column names or auto"
    ):
        choose_features({"item": {"numeric": "atuo"}}, _tables(ITEMS, USERS), SCHEMAS)
    with pytest.raises(FeatureColumnError, match="got \\['numerc'\\]"):
        choose_features({"item": {"numerc": []}}, _tables(ITEMS, USERS), SCHEMAS)


def test_the_contract_declares_feature_kinds(tmp_path):
    assert SCHEMAS["items"].column("category_id").feature == "categorical"
    assert SCHEMAS["items"].column("content_emb").feature == "vector"
    assert SCHEMAS["items"].column("advertiser_id").feature is None
    bad = tmp_path
    (bad / "t.yaml").write_text(
        "table: t\nfile: t.parquet\ncolumns:\n  - {name: x, dtype: Int64, feature: numerical}\n"
    )
    with pytest.raises(ConfigError, match="feature 'numerical' is not one of"):
        load_schemas(bad)
    (bad / "t.yaml").write_text(
        "table: t\nfile: t.parquet\ncolumns:\n  - {name: x, dtype: Int64, feature: vector}\n"
    )
    with pytest.raises(ConfigError, match="feature vector goes with dtype vector"):
        load_schemas(bad)


def test_kuairand_names_every_list():
    features = compose("train", ["data=kuairand"]).cfg.data.features
    for side in ("item", "user"):
        for kind in ("categorical", "numeric", "vector"):
            assert not isinstance(features[side][kind], str), (side, kind)


@pytest.fixture(scope="module")
def plain_log(tiny_data, tmp_path_factory) -> Path:
    """The tiny logs as a shop export might come: items and users without any attribute column."""
    out = tmp_path_factory.mktemp("plain") / "logs"
    shutil.copytree(tiny_data, out)
    pl.read_parquet(out / "items.parquet").select("item_id", "advertiser_id").write_parquet(
        out / "items.parquet"
    )
    pl.read_parquet(out / "users.parquet").select("user_id").write_parquet(out / "users.parquet")
    return out


def test_a_log_without_the_synthetic_columns_trains_with_no_feature_option(home, plain_log):
    result = CliRunner().invoke(app, ["train", f"data.dir={plain_log}", *TINY_TRAIN])
    assert result.exit_code == 0, result.output
    assert "Features from the tables (data.features ... auto): items: none; users: none" in result.output
    assert "Left out of the features: items.category_id (no values), items.price (no values)" in result.output
    assert "Error executing job" not in result.output
    (run,) = runs_in(home)  # what `auto` chose is a param of the run, not only a printed line
    assert (
        run.data.params["features.item.categorical"] == "-"
        and run.data.params["features.user.numeric"] == "-"
    )


def test_the_chosen_feature_columns_are_params_of_the_run(home, tiny_data):
    result = CliRunner().invoke(app, ["train", f"data.dir={tiny_data}", *TINY_TRAIN])
    assert result.exit_code == 0, result.output
    (run,) = runs_in(home)
    params = run.data.params
    assert params["features.item.categorical"] == "category_id" and params["features.item.numeric"] == "price"
    assert params["features.user.categorical"] == "age_bucket,region_id"


def test_an_experiment_needing_a_column_the_log_lacks_names_it_in_one_line(home, plain_log):
    result = CliRunner().invoke(
        app, ["train", f"data.dir={plain_log}", *TINY_TRAIN, "+experiment=ablation/cold_start"]
    )
    assert result.exit_code == 2, result.output
    assert "items.content_emb (vector): no column 'content_emb' in items.parquet" in result.output
    assert "Traceback" not in result.output and "Error executing job" not in result.output
    assert runs_in(home) == []


EXPERIMENTS = sorted(
    str(p.relative_to(CONF_DIR / "experiment").with_suffix(""))
    for p in (CONF_DIR / "experiment").rglob("*.yaml")
)
# What an experiment needs that a log without item or user attributes lacks: the column it names.
NEEDS_A_COLUMN = {"ablation/content_vectors": "items.content_emb", "ablation/cold_start": "items.content_emb"}


@pytest.mark.slow
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_builds_on_a_log_without_attributes_or_names_the_column_it_needs(
    plain_log, experiment
):
    from convcg_cli.builders import build_datamodule, build_model
    from convcg_cli.data.features import check_levers

    small = ["model.hidden_dim=16", "model.embedding_dim=8", "model.feature_embedding_dim=8"]
    cfg = compose("train", [f"data.dir={plain_log}", TINY_SPLIT, f"+experiment={experiment}", *small]).cfg
    check_levers(cfg)
    if experiment in NEEDS_A_COLUMN:
        with pytest.raises(FeatureColumnError) as caught:
            build_datamodule(cfg, list(cfg.loss.task_weights), stage="validate")
        assert NEEDS_A_COLUMN[experiment] in str(caught.value) and "\n" not in str(caught.value)
        return
    dm = build_datamodule(cfg, list(cfg.loss.task_weights), stage="validate")
    assert dm.item_columns == FeatureColumns() and dm.user_columns == FeatureColumns()
    build_model(cfg, dm)
