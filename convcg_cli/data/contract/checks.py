"""Checks of polars frames against the contract: every check returns :class:`Violation` records
instead of raising, so one run reports *all* problems with a data set.

:func:`conform_frames` casts frames to the contract and checks them (also chunk by chunk, for
data.stream); :func:`validate_frames` checks in-memory frames.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import polars as pl

from convcg_cli.data.contract.schemas import ColumnSchema, TableSchema, load_schemas

# Violation kinds, so callers and tests can tell them apart without parsing messages.
MISSING_DIR = "missing_dir"
MISSING_FILE = "missing_file"
UNREADABLE_FILE = "unreadable_file"
EMPTY_TABLE = "empty_table"
MISSING_COLUMN = "missing_column"
WRONG_DTYPE = "wrong_dtype"
NULLS = "nulls"
NOT_FINITE = "not_finite"
NOT_ALLOWED = "not_allowed"
OUT_OF_RANGE = "out_of_range"
DUPLICATE_KEY = "duplicate_key"
DANGLING_REFERENCE = "dangling_reference"
RULE_BROKEN = "rule_broken"
WRONG_LENGTH = "wrong_length"

_MAX_EXAMPLES = 5


@dataclass(frozen=True)
class Violation:
    """One way a table breaks its contract.

    ``str(v)`` is one readable line, e.g.
    ``impressions.parquet, column 'clicked': 12 row(s) are null; expected non-null Boolean``.

    Args:
        table: table name (``*`` when the whole data directory is missing).
        file: the file (or directory) concerned.
        column: the column concerned, or None for table/file-level problems.
        rows: number of offending rows (the table height for a missing or mistyped column, 0 when
            there are no rows to count).
        expected: what the contract asks for.
        found: what was found instead.
        kind: one of the kind constants of this module (``NULLS``, ``DUPLICATE_KEY`` ...).
    """

    table: str
    file: str
    column: str | None
    rows: int
    expected: str
    found: str
    kind: str = ""

    def __str__(self) -> str:
        where = self.file if self.column is None else f"{self.file}, column '{self.column}'"
        return f"{where}: {self.found}; expected {self.expected}"


def _examples(values: pl.Series) -> str:
    vals = values.drop_nulls().unique().sort().head(_MAX_EXAMPLES).to_list()
    return ", ".join(repr(v) for v in vals)


def _row_examples(mask: pl.Series, detail: pl.Series | None = None) -> str:
    """``rows 3, 17 ...`` (0-based file rows where ``mask`` holds), with ``detail`` of each in brackets."""
    rows = np.flatnonzero(mask.fill_null(False).to_numpy())[:_MAX_EXAMPLES]
    if detail is None:
        return "rows " + ", ".join(str(r) for r in rows)
    values = detail.to_numpy()
    return "rows " + ", ".join(f"{r} (length {values[r]})" for r in rows)


def conform_vector(
    table: str, file: str, col: ColumnSchema, series: pl.Series
) -> tuple[pl.Series | None, list[Violation]]:
    """A vector column as ``Array(Float32, length)``, and its violations: not a list of numbers, rows
    of another length (``col.length``, else the first non-null row's) or holding NaN / +-inf.

    Returns None instead of the column when it cannot be made fixed-length. Also used for vector
    feature columns the contract does not declare (``features.encodings.table_features``).
    """

    def violation(rows: int, found: str, expected: str, kind: str) -> Violation:
        return Violation(table, file, col.name, rows, expected, found, kind)

    dtype = series.dtype
    if not (
        dtype == pl.Null
        or isinstance(dtype, pl.List | pl.Array)
        and (dtype.inner.is_numeric() or dtype.inner == pl.Null)
    ):
        return None, [violation(series.len(), f"dtype is {dtype}", col.describe(), WRONG_DTYPE)]
    as_list = series.cast(pl.List(pl.Float32))
    lengths = as_list.list.len()
    known = lengths.drop_nulls()
    length = col.length or (int(known[0]) if known.len() else None)
    if length is None:  # no vector at all: nothing to check, no length to fix
        return as_list, []
    wrong = lengths.is_not_null() & (lengths != length)
    if n := int(wrong.sum()):
        expected = col.describe() if col.length else f"{col.describe()} (the first row's length, {length})"
        found = f"{n} row(s) are not {length} floats long, e.g. {_row_examples(wrong, lengths)}"
        return None, [violation(n, found, expected, WRONG_LENGTH)]
    out: list[Violation] = []
    finite = as_list.list.eval(pl.element().is_finite()).list.all().fill_null(True)
    if n := int((~finite).sum()):
        found = f"{n} row(s) hold NaN or infinite values, e.g. {_row_examples(~finite)}"
        out.append(violation(n, found, f"finite {col.describe()}", NOT_FINITE))
    return as_list.cast(pl.Array(pl.Float32, length)), out


def _castable(found: pl.DataType, target: pl.DataType) -> bool:
    """Whether ``found`` may stand in for ``target``: the cast cannot change a value (overflow is
    caught separately by a strict cast)."""
    if found == target or found == pl.Null:
        return True
    if target.is_integer():
        return found.is_integer()
    if target == pl.Float64:
        return found.is_float() or found.is_integer()
    if target == pl.String:
        return isinstance(found, pl.Categorical | pl.Enum)
    return False


def _conform(schema: TableSchema, df: pl.DataFrame) -> tuple[pl.DataFrame, list[Violation], set[str]]:
    """Cast ``df`` to the schema (adding missing optional columns); return it, the structural
    violations, and the names of columns too broken for value checks."""
    violations: list[Violation] = []
    bad: set[str] = set()
    exprs: list[pl.Expr] = []
    for col in schema.columns:
        target = col.polars_dtype

        def _v(found: str, kind: str, col: ColumnSchema = col) -> Violation:
            return Violation(schema.name, schema.file, col.name, df.height, col.describe(), found, kind)

        if col.name not in df.columns:
            if col.is_vector and not col.required:
                continue  # left out rather than filled: a null vector has no length to give it
            if col.required:
                violations.append(_v("column is missing", MISSING_COLUMN))
                bad.add(col.name)
            exprs.append(pl.lit(None, dtype=target).alias(col.name))
            continue
        found = df.schema[col.name]
        if col.is_vector:
            vector, problems = conform_vector(schema.name, schema.file, col, df[col.name])
            violations += problems
            if vector is None:
                bad.add(col.name)
                exprs.append(pl.lit(None, dtype=target).alias(col.name))
            else:
                exprs.append(pl.lit(vector).alias(col.name))
            continue
        if not _castable(found, target):
            violations.append(_v(f"dtype is {found}", WRONG_DTYPE))
            bad.add(col.name)
            exprs.append(pl.lit(None, dtype=target).alias(col.name))
            continue
        try:
            df[col.name].cast(target, strict=True)
        except pl.exceptions.PolarsError:
            violations.append(_v(f"dtype is {found} with values that do not fit {col.dtype}", WRONG_DTYPE))
            bad.add(col.name)
            exprs.append(pl.lit(None, dtype=target).alias(col.name))
            continue
        exprs.append(pl.col(col.name).cast(target))
    if schema.extra_columns == "keep":
        exprs.extend(pl.col(c) for c in df.columns if c not in schema.column_names)
    return df.select(exprs), violations, bad


def _column_values(schema: TableSchema, df: pl.DataFrame, bad: set[str]) -> list[Violation]:
    """Nulls, non-finite floats, allowed values and bounds, for every well-typed column."""
    out: list[Violation] = []

    def add(col: ColumnSchema, rows: int, found: str, expected: str, kind: str) -> None:
        out.append(Violation(schema.name, schema.file, col.name, rows, expected, found, kind))

    for col in schema.columns:
        if col.name in bad or col.name not in df.columns:  # an absent optional vector column
            continue
        s = df[col.name]
        if not col.nullable and (n := s.null_count()):
            add(col, n, f"{n} row(s) are null", col.describe(), NULLS)
        values = s.drop_nulls()
        if values.dtype.is_float():
            finite = values.is_finite()
            if n := int((~finite).sum()):
                add(col, n, f"{n} row(s) are NaN or infinite", f"finite {col.dtype}", NOT_FINITE)
            values = values.filter(finite)
        if col.allowed is not None:
            outside = values.filter(~values.is_in(list(col.allowed)))
            if n := outside.len():
                add(
                    col,
                    n,
                    f"{n} row(s) have values outside the allowed set, e.g. {_examples(outside)}",
                    f"one of {', '.join(map(str, col.allowed))}",
                    NOT_ALLOWED,
                )
        if col.min is not None and (n := int((values < col.min).sum())):
            add(
                col,
                n,
                f"{n} row(s) are below {col.min} (lowest {values.min()!r})",
                f">= {col.min}",
                OUT_OF_RANGE,
            )
        if col.max is not None and (n := int((values > col.max).sum())):
            add(
                col,
                n,
                f"{n} row(s) are above {col.max} (highest {values.max()!r})",
                f"<= {col.max}",
                OUT_OF_RANGE,
            )
    return out


def _primary_key(schema: TableSchema, df: pl.DataFrame, bad: set[str]) -> list[Violation]:
    key = list(schema.primary_key)
    if not key or set(key) & bad:
        return []
    dup = df.select(key).is_duplicated()
    if not (n := int(dup.sum())):
        return []
    shown = df.filter(dup)[key[0]] if len(key) == 1 else df.filter(dup).select(pl.struct(key))[:, 0]
    return [
        Violation(
            schema.name,
            schema.file,
            ", ".join(key),
            n,
            "unique primary key",
            f"{n} row(s) share their key with another row, e.g. {_examples(shown)}",
            DUPLICATE_KEY,
        )
    ]


def _rules(schema: TableSchema, df: pl.DataFrame, bad: set[str]) -> list[Violation]:
    out = []
    for rule in schema.rules:
        if set(rule.columns) & bad:
            continue
        n = int(df.select(rule.broken().sum()).item())
        if n:
            out.append(
                Violation(
                    schema.name,
                    schema.file,
                    rule.column,
                    n,
                    f"{rule.describe()} (rule '{rule.name}')",
                    f"{n} row(s) break rule '{rule.name}'",
                    RULE_BROKEN,
                )
            )
    return out


def _references(
    schemas: Mapping[str, TableSchema], frames: Mapping[str, pl.DataFrame], bad: Mapping[str, set[str]]
) -> list[Violation]:
    out = []
    for name, schema in schemas.items():
        if name not in frames:
            continue
        for col in schema.columns:
            if col.references is None or col.name in bad[name]:
                continue
            ref_table, _, ref_col = col.references.partition(".")
            if ref_table not in frames or ref_col in bad[ref_table]:
                continue  # the referenced table's own problem is reported already
            values = frames[name][col.name].drop_nulls()
            dangling = values.filter(~values.is_in(frames[ref_table][ref_col].implode()))
            if n := dangling.len():
                out.append(
                    Violation(
                        name,
                        schema.file,
                        col.name,
                        n,
                        f"every {col.name} present in {schemas[ref_table].file} ({col.references})",
                        f"{n} row(s) reference ids missing from {schemas[ref_table].file}, "
                        f"e.g. {_examples(dangling)}",
                        DANGLING_REFERENCE,
                    )
                )
    return out


def conform_frames(
    frames: Mapping[str, pl.DataFrame], schemas: Mapping[str, TableSchema]
) -> tuple[dict[str, pl.DataFrame], list[Violation]]:
    """Conform frames that were read (cast to the schema dtypes, optional columns added) and check
    them; return the conformed frames and every violation (used chunk by chunk by data.stream)."""
    conformed: dict[str, pl.DataFrame] = {}
    bad: dict[str, set[str]] = {}
    violations: list[Violation] = []
    for name, schema in schemas.items():
        if name not in frames:
            continue
        df, structural, bad[name] = _conform(schema, frames[name])
        violations += structural
        if df.height == 0 and schema.required:
            violations.append(
                Violation(name, schema.file, None, 0, "at least one row", "table has 0 rows", EMPTY_TABLE)
            )
        violations += _column_values(schema, df, bad[name])
        violations += _primary_key(schema, df, bad[name])
        violations += _rules(schema, df, bad[name])
        conformed[name] = df
    violations += _references(schemas, conformed, bad)
    return conformed, violations


def conform_table(schema: TableSchema, df: pl.DataFrame) -> pl.DataFrame:
    """``df`` cast to ``schema`` as ``load_tables`` returns it (no checks: validate first)."""
    return _conform(schema, df)[0]


def validate_frames(
    frames: Mapping[str, pl.DataFrame], schemas: Mapping[str, TableSchema] | None = None
) -> list[Violation]:
    """Check in-memory frames (table name -> frame) against the contract; return every violation.

    A required table absent from ``frames`` is reported as a missing file; an optional one is empty.
    """
    schemas = load_schemas() if schemas is None else schemas
    missing = [
        Violation(name, s.file, None, 0, f"table '{name}'", "table is missing", MISSING_FILE)
        for name, s in schemas.items()
        if name not in frames and s.required
    ]
    return missing + conform_frames(frames, schemas)[1]
