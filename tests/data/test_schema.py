"""The data contract: schema loading, and that every kind of violation is found and counted right."""

from pathlib import Path

import polars as pl
import pytest

from convcg_cli.data import contract as S
from convcg_cli.data.contract import (
    ColumnSchema,
    Violation,
    load_schemas,
    load_tables,
    validate_frames,
    validate_tables,
)
from convcg_cli.errors import ConfigError, DataValidationError


def _set(df: pl.DataFrame, column: str, value, where: pl.Expr, n: int) -> pl.DataFrame:
    """``df`` with ``column`` set to ``value`` on the first ``n`` rows matching ``where``."""
    where = where & (pl.int_range(pl.len()) >= 0)  # broadcast a literal condition to a column
    hit = where & (where.cum_sum() <= n)
    value = pl.lit(value, dtype=df.schema[column])
    out = df.with_columns(pl.when(hit).then(value).otherwise(pl.col(column)).alias(column))
    assert out.select(hit.sum()).item() == n  # the data has enough such rows
    return out


def _only(violations: list[Violation]) -> Violation:
    assert len(violations) == 1, [str(v) for v in violations]
    return violations[0]


# --------------------------------------------------------------------------------------------------
# Schemas
# --------------------------------------------------------------------------------------------------


def test_schemas_load_in_dependency_order(schemas):
    assert list(schemas) == ["items", "users", "impressions", "conversions", "user_history"]
    assert [s.required for s in schemas.values()] == [True, True, True, False, False]
    imp = schemas["impressions"]
    assert imp.file == "impressions.parquet"
    assert imp.primary_key == ("impression_id",)
    assert imp.column_names == [
        "impression_id",
        "timestamp",
        "user_id",
        "item_id",
        "surface",
        "clicked",
        "dwell_seconds",
        "saved",
        "converted",
        "subject_item_id",
        "query_id",
        "conversion_value",
        "conversion_delay_seconds",
        "view_through",
    ]
    assert [c.name for c in imp.columns if not c.required] == [
        "subject_item_id",
        "query_id",
        "conversion_value",
        "conversion_delay_seconds",
        "view_through",
    ]
    assert imp.column("surface").allowed == ("home_feed", "related_items", "search")
    assert imp.column("item_id").references == "items.item_id"
    assert [r.name for r in imp.rules] == [
        "conversion_needs_click",
        "dwell_exactly_on_click",
        "subject_only_on_related_items",
        "query_only_on_search",
        "value_only_on_conversion",
        "delay_only_on_conversion",
    ]
    assert schemas["users"].column("age_bucket") == ColumnSchema(
        "age_bucket",
        "Int64",
        nullable=True,
        required=False,
        min=0,
        max=6,
        description="coarse age band, 0 = youngest",
        feature="categorical",
    )
    assert imp.polars_schema["clicked"] == pl.Boolean


@pytest.mark.parametrize(
    "column, message",
    [
        ("{name: x, dtype: Int128}", "dtype 'Int128'"),
        ("{name: x, dtype: Int64, colour: red}", "may only have"),
        ("{name: x, dtype: Int64, references: nowhere.id}", "unknown column 'nowhere.id'"),
    ],
)
def test_load_schemas_rejects_bad_columns(tmp_path, column, message):
    (tmp_path / "t.yaml").write_text(f"table: t\nfile: t.parquet\ncolumns:\n  - {column}\n")
    with pytest.raises(ConfigError, match=message):
        load_schemas(tmp_path)


def test_load_schemas_rejects_bad_rules(tmp_path):
    head = "table: t\nfile: t.parquet\ncolumns:\n  - {name: a, dtype: Int64}\n  - {name: b, dtype: Boolean}\n"
    (tmp_path / "t.yaml").write_text(head + "rules:\n  - {name: r, if_true: b, then_true: zzz}\n")
    with pytest.raises(ConfigError, match=r"unknown column\(s\) \['zzz'\]"):
        load_schemas(tmp_path)
    (tmp_path / "t.yaml").write_text(head + "rules:\n  - {name: r, if_true: a, then_true: b}\n")
    with pytest.raises(ConfigError, match="'a' is not Boolean"):
        load_schemas(tmp_path)


def test_violation_is_one_readable_line():
    v = Violation(
        "impressions", "impressions.parquet", "clicked", 12, "non-null Boolean", "12 row(s) are null"
    )
    assert str(v) == "impressions.parquet, column 'clicked': 12 row(s) are null; expected non-null Boolean"
    assert str(Violation("items", "items.parquet", None, 0, "at least one row", "table has 0 rows")) == (
        "items.parquet: table has 0 rows; expected at least one row"
    )


# --------------------------------------------------------------------------------------------------
# Good data
# --------------------------------------------------------------------------------------------------


def test_tiny_data_validates(tiny_dir, tiny_tables):
    assert validate_tables(tiny_dir) == []
    assert validate_frames(tiny_tables) == []


def test_load_tables_casts_and_fills_optional_columns(tmp_path, tiny_tables, schemas):
    imp = tiny_tables["impressions"]
    narrowed = imp.with_columns(pl.col("user_id").cast(pl.Int32), pl.col("surface").cast(pl.Categorical))
    tables = {**tiny_tables, "impressions": narrowed.drop("query_id").with_columns(extra=pl.lit(1))}
    data_dir = tmp_path / "d"
    data_dir.mkdir()
    for name, df in tables.items():
        df.write_parquet(data_dir / schemas[name].file)

    loaded = load_tables(data_dir)
    assert list(loaded) == ["items", "users", "impressions", "conversions", "user_history"]
    out = loaded["impressions"]
    assert out.schema == schemas["impressions"].polars_schema  # Int64 again, extra column dropped
    assert out["query_id"].null_count() == imp.height
    assert out.select(imp.columns).drop("query_id").equals(imp.drop("query_id"))
    assert (
        out.select("conversion_value", "conversion_delay_seconds", "view_through")
        .null_count()
        .sum_horizontal()
        .item()
        == 3 * imp.height
    )
    assert loaded["conversions"].height == 0
    assert loaded["items"].equals(tiny_tables["items"])


# --------------------------------------------------------------------------------------------------
# Each kind of violation, on mutated tiny data
# --------------------------------------------------------------------------------------------------

NOT_CLICKED = ~pl.col("clicked")
HOME_FEED = pl.col("surface") == "home_feed"


@pytest.mark.parametrize(
    "table, mutate, kind, column, rows, found",
    [
        (
            "items",
            lambda df: df.drop("advertiser_id"),
            S.MISSING_COLUMN,
            "advertiser_id",
            600,
            "column is missing",
        ),
        (
            "impressions",
            lambda df: df.with_columns(pl.col("clicked").cast(pl.String)),
            S.WRONG_DTYPE,
            "clicked",
            150_000,
            "dtype is String",
        ),
        (
            "impressions",
            lambda df: df.with_columns(pl.col("timestamp").cast(pl.Float64)),
            S.WRONG_DTYPE,
            "timestamp",
            150_000,
            "dtype is Float64",
        ),
        (
            "impressions",
            lambda df: _set(df, "clicked", None, NOT_CLICKED, 12),
            S.NULLS,
            "clicked",
            12,
            "12 row(s) are null",
        ),
        (
            "impressions",
            lambda df: _set(df, "surface", "email", HOME_FEED, 7),
            S.NOT_ALLOWED,
            "surface",
            7,
            "7 row(s) have values outside the allowed set, e.g. 'email'",
        ),
        (
            "users",
            lambda df: _set(df, "age_bucket", 9, pl.lit(True), 3),
            S.OUT_OF_RANGE,
            "age_bucket",
            3,
            "3 row(s) are above 6 (highest 9)",
        ),
        (
            "users",
            lambda df: _set(df, "account_age_days", -1.5, pl.lit(True), 2),
            S.OUT_OF_RANGE,
            "account_age_days",
            2,
            "2 row(s) are below 0 (lowest -1.5)",
        ),
        (
            "items",
            lambda df: _set(df, "price", float("nan"), pl.lit(True), 2),
            S.NOT_FINITE,
            "price",
            2,
            "2 row(s) are NaN or infinite",
        ),
        (
            "items",
            lambda df: pl.concat([df, df.head(3)]),
            S.DUPLICATE_KEY,
            "item_id",
            6,
            "6 row(s) share their key with another row",
        ),
        (
            "impressions",
            lambda df: _set(df, "item_id", 999, pl.lit(True), 5),
            S.DANGLING_REFERENCE,
            "item_id",
            5,
            "5 row(s) reference ids missing from items.parquet, e.g. 999",
        ),
        (
            "impressions",
            lambda df: _set(df, "converted", True, NOT_CLICKED, 4),
            S.RULE_BROKEN,
            "converted",
            4,
            "4 row(s) break rule 'conversion_needs_click'",
        ),
        (
            "impressions",
            lambda df: _set(df, "dwell_seconds", None, pl.col("clicked"), 3),
            S.RULE_BROKEN,
            "dwell_seconds",
            3,
            "3 row(s) break rule 'dwell_exactly_on_click'",
        ),
        (
            "impressions",
            lambda df: _set(df, "query_id", 5, HOME_FEED, 8),
            S.RULE_BROKEN,
            "query_id",
            8,
            "8 row(s) break rule 'query_only_on_search'",
        ),
    ],
)
def test_each_violation_is_found_and_counted(tiny_tables, table, mutate, kind, column, rows, found):
    tables = {**tiny_tables, table: mutate(tiny_tables[table])}
    v = _only(validate_frames(tables))
    assert (v.kind, v.table, v.column, v.rows) == (kind, table, column, rows)
    assert found in v.found
    assert str(v).startswith(f"{table}.parquet, column '{column}': {found}")


def test_null_violation_message(tiny_tables):
    tables = {
        **tiny_tables,
        "impressions": _set(tiny_tables["impressions"], "clicked", None, NOT_CLICKED, 12),
    }
    assert str(_only(validate_frames(tables))) == (
        "impressions.parquet, column 'clicked': 12 row(s) are null; expected non-null Boolean"
    )


def test_integer_overflow_is_a_dtype_violation(tiny_tables):
    users = tiny_tables["users"].with_columns(pl.col("region_id").cast(pl.UInt64))
    users = _set(users, "region_id", 2**63, pl.lit(True), 1)
    v = _only(validate_frames({**tiny_tables, "users": users}))
    assert (v.kind, v.column) == (S.WRONG_DTYPE, "region_id")
    assert "do not fit Int64" in v.found


def test_empty_table_and_the_references_it_breaks(tiny_tables):
    violations = validate_frames({**tiny_tables, "users": tiny_tables["users"].clear()})
    assert [(v.kind, v.table, v.column, v.rows) for v in violations] == [
        (S.EMPTY_TABLE, "users", None, 0),
        (S.DANGLING_REFERENCE, "impressions", "user_id", 150_000),
        (S.DANGLING_REFERENCE, "user_history", "user_id", tiny_tables["user_history"].height),
    ]


def test_missing_file_is_reported_without_cascading(tiny_dir):
    (tiny_dir / "users.parquet").unlink()
    v = _only(validate_tables(tiny_dir))
    assert (v.kind, v.table, v.file, v.column) == (S.MISSING_FILE, "users", "users.parquet", None)
    assert str(tiny_dir) in str(v)


def test_unreadable_file(tiny_dir):
    (tiny_dir / "items.parquet").write_text("not parquet")
    violations = validate_tables(tiny_dir)
    assert [(v.kind, v.table) for v in violations] == [(S.UNREADABLE_FILE, "items")]


def test_missing_directory_names_it_and_says_how_to_make_one(tmp_path):
    missing = tmp_path / "nope"
    v = _only(validate_tables(missing))
    assert v.kind == S.MISSING_DIR
    with pytest.raises(DataValidationError) as err:
        load_tables(missing)
    assert str(missing) in str(err.value)
    assert "convcg data synth --out DIR" in str(err.value)


def test_load_tables_lists_every_violation_at_once(tmp_path: Path, tiny_tables, schemas):
    bad = {
        "items": pl.concat([tiny_tables["items"], tiny_tables["items"].head(2)]),
        "users": tiny_tables["users"].with_columns(pl.col("region_id").cast(pl.String)),
        "impressions": _set(tiny_tables["impressions"], "surface", "email", HOME_FEED, 3),
    }
    for name, df in bad.items():
        df.write_parquet(tmp_path / schemas[name].file)
    with pytest.raises(DataValidationError) as err:
        load_tables(tmp_path)
    kinds = [(v.kind, v.table) for v in err.value.violations]
    assert kinds == [(S.DUPLICATE_KEY, "items"), (S.WRONG_DTYPE, "users"), (S.NOT_ALLOWED, "impressions")]
    message = str(err.value)
    assert message.startswith("3 data contract violation(s):")
    assert "users.parquet, column 'region_id': dtype is String; expected nullable Int64" in message
