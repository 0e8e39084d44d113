"""The data contract: load ``data_schemas/*.yaml`` and check polars frames or parquet files against it.

Every check returns :class:`Violation` records instead of raising, so one run reports *all* problems
with a data directory. :func:`load_tables` is the single entry point the rest of the package uses: it
raises :class:`~convcg_cli.errors.DataValidationError` listing every violation, or returns frames whose
columns have exactly the schema's names, order and dtypes.

Example::

    >>> schemas = load_schemas()
    >>> list(schemas)
    ['items', 'users', 'impressions']
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import yaml

from convcg_cli.errors import ConfigError, DataValidationError

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "data_schemas"

# dtype names a schema may use; kept small on purpose so every check below knows how to handle them.
DTYPES: dict[str, pl.DataType] = {
    "Int64": pl.Int64(),
    "Int32": pl.Int32(),
    "Float64": pl.Float64(),
    "Float32": pl.Float32(),
    "Boolean": pl.Boolean(),
    "String": pl.String(),
}

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

_MAX_EXAMPLES = 5
_COLUMN_KEYS = {"name", "dtype", "nullable", "required", "min", "max", "allowed", "references", "description"}
_TABLE_KEYS = {"table", "file", "required", "primary_key", "columns", "rules", "description", "extra_columns"}
_EXTRA_COLUMNS = ("drop", "keep")


# --------------------------------------------------------------------------------------------------
# Schema objects
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ColumnSchema:
    """One column of a table contract.

    Args:
        name: column name.
        dtype: one of :data:`DTYPES` (by name).
        nullable: may hold nulls.
        required: must be present in the file; a missing optional column loads as all-null.
        min, max: inclusive bounds on non-null values.
        allowed: the only values permitted, or None for any.
        references: ``"<table>.<column>"`` every non-null value must exist in, or None.
        description: free text.
    """

    name: str
    dtype: str
    nullable: bool = False
    required: bool = True
    min: float | None = None
    max: float | None = None
    allowed: tuple | None = None
    references: str | None = None
    description: str = ""

    @property
    def polars_dtype(self) -> pl.DataType:
        """The polars dtype this column is cast to on load."""
        return DTYPES[self.dtype]

    def describe(self) -> str:
        """Short text of what a valid column looks like, e.g. ``non-null Boolean``."""
        return f"{'nullable' if self.nullable else 'non-null'} {self.dtype}"


@dataclass(frozen=True)
class Condition:
    """A per-row condition used by rules: a Boolean column is true, or a column equals a value."""

    column: str
    equals: Any = None

    def expr(self) -> pl.Expr:
        """Boolean expression; a null counts as false so rules never propagate nulls."""
        if self.equals is None:
            return pl.col(self.column).fill_null(False)
        return (pl.col(self.column) == self.equals).fill_null(False)

    def __str__(self) -> str:
        return self.column if self.equals is None else f"{self.column} == {self.equals!r}"


@dataclass(frozen=True)
class ImplicationRule:
    """Rows where ``if_true`` holds must have ``then_true`` hold (e.g. converted implies clicked)."""

    name: str
    if_true: Condition
    then_true: Condition

    @property
    def column(self) -> str:
        """The column a violation is reported against: the antecedent."""
        return self.if_true.column

    @property
    def columns(self) -> tuple[str, ...]:
        """Every column the rule reads."""
        return (self.if_true.column, self.then_true.column)

    def broken(self) -> pl.Expr:
        """Boolean expression, true on rows that break the rule."""
        return self.if_true.expr() & ~self.then_true.expr()

    def describe(self) -> str:
        """Readable statement of the rule."""
        return f"{self.if_true} only where {self.then_true}"


@dataclass(frozen=True)
class PresenceRule:
    """A column is null where a condition fails (``null_unless``) and/or non-null where it holds."""

    name: str
    column: str
    null_unless: Condition | None = None
    non_null_if: Condition | None = None

    @property
    def columns(self) -> tuple[str, ...]:
        """Every column the rule reads."""
        conds = [c.column for c in (self.null_unless, self.non_null_if) if c is not None]
        return (self.column, *conds)

    def broken(self) -> pl.Expr:
        """Boolean expression, true on rows that break the rule."""
        bad = pl.lit(False)
        if self.null_unless is not None:
            bad = bad | (pl.col(self.column).is_not_null() & ~self.null_unless.expr())
        if self.non_null_if is not None:
            bad = bad | (pl.col(self.column).is_null() & self.non_null_if.expr())
        return bad

    def describe(self) -> str:
        """Readable statement of the rule."""
        if self.null_unless is not None and self.null_unless == self.non_null_if:
            return f"{self.column} non-null exactly where {self.null_unless}"
        parts = []
        if self.null_unless is not None:
            parts.append(f"{self.column} null unless {self.null_unless}")
        if self.non_null_if is not None:
            parts.append(f"{self.column} non-null where {self.non_null_if}")
        return " and ".join(parts)


Rule = ImplicationRule | PresenceRule


@dataclass(frozen=True)
class TableSchema:
    """The contract of one table: its file, columns (in load order), primary key and row rules."""

    name: str
    file: str
    columns: tuple[ColumnSchema, ...]
    primary_key: tuple[str, ...] = ()
    rules: tuple[Rule, ...] = ()
    description: str = ""
    # "keep": columns beyond the contract (e.g. a data set's own feature columns) load unchanged, so
    # the data config can name them as features; "drop": they are ignored.
    extra_columns: str = "drop"
    # False: the file may be absent from a data directory; it then loads as an empty table.
    required: bool = True

    @property
    def column_names(self) -> list[str]:
        """Column names in schema order."""
        return [c.name for c in self.columns]

    @property
    def polars_schema(self) -> pl.Schema:
        """Name -> polars dtype of the loaded frame."""
        return pl.Schema({c.name: c.polars_dtype for c in self.columns})

    def column(self, name: str) -> ColumnSchema:
        """The column called ``name``; KeyError if there is none."""
        for col in self.columns:
            if col.name == name:
                return col
        raise KeyError(f"table '{self.name}' has no column '{name}'")


# --------------------------------------------------------------------------------------------------
# Loading the YAML
# --------------------------------------------------------------------------------------------------


def _condition(raw: Any, where: str) -> Condition:
    if isinstance(raw, str):
        return Condition(raw)
    if isinstance(raw, Mapping) and len(raw) == 1:
        ((column, value),) = raw.items()
        return Condition(str(column), value)
    raise ConfigError(f"{where}: a condition is a column name or a one-entry mapping {{column: value}}.")


def _rule(raw: Mapping, where: str) -> Rule:
    keys = set(raw)
    if "name" not in keys:
        raise ConfigError(f"{where}: every rule needs a 'name'.")
    where = f"{where}, rule '{raw['name']}'"
    if keys == {"name", "if_true", "then_true"}:
        return ImplicationRule(
            raw["name"], _condition(raw["if_true"], where), _condition(raw["then_true"], where)
        )
    if (
        "column" in keys
        and keys - {"name", "column"}
        and keys <= {"name", "column", "null_unless", "non_null_if"}
    ):
        return PresenceRule(
            raw["name"],
            raw["column"],
            null_unless=_condition(raw["null_unless"], where) if "null_unless" in raw else None,
            non_null_if=_condition(raw["non_null_if"], where) if "non_null_if" in raw else None,
        )
    raise ConfigError(
        f"{where}: expected keys {{if_true, then_true}} or {{column, null_unless and/or non_null_if}}, "
        f"got {sorted(keys - {'name'})}."
    )


def _column(raw: Mapping, where: str) -> ColumnSchema:
    unknown = set(raw) - _COLUMN_KEYS
    if unknown or "name" not in raw or "dtype" not in raw:
        raise ConfigError(
            f"{where}: a column needs 'name' and 'dtype' and may only have {sorted(_COLUMN_KEYS)}."
        )
    if raw["dtype"] not in DTYPES:
        raise ConfigError(
            f"{where}, column '{raw['name']}': dtype {raw['dtype']!r} is not one of {list(DTYPES)}."
        )
    allowed = raw.get("allowed")
    return ColumnSchema(
        name=raw["name"],
        dtype=raw["dtype"],
        nullable=bool(raw.get("nullable", False)),
        required=bool(raw.get("required", True)),
        min=raw.get("min"),
        max=raw.get("max"),
        allowed=tuple(allowed) if allowed is not None else None,
        references=raw.get("references"),
        description=raw.get("description", ""),
    )


def _table(raw: Mapping, where: str) -> TableSchema:
    unknown = set(raw) - _TABLE_KEYS
    if unknown or not {"table", "file", "columns"} <= set(raw):
        raise ConfigError(
            f"{where}: needs 'table', 'file', 'columns' and may only have {sorted(_TABLE_KEYS)}."
        )
    columns = tuple(_column(c, where) for c in raw["columns"])
    table = TableSchema(
        name=raw["table"],
        file=raw["file"],
        columns=columns,
        primary_key=tuple(raw.get("primary_key") or ()),
        rules=tuple(_rule(r, where) for r in raw.get("rules") or ()),
        description=raw.get("description", ""),
        extra_columns=raw.get("extra_columns", "drop"),
        required=bool(raw.get("required", True)),
    )
    if table.extra_columns not in _EXTRA_COLUMNS:
        raise ConfigError(f"{where}: extra_columns must be one of {list(_EXTRA_COLUMNS)}.")
    names = table.column_names
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: duplicate column names.")
    for key in table.primary_key:
        if key not in names or table.column(key).nullable or not table.column(key).required:
            raise ConfigError(f"{where}: primary key '{key}' must be a required, non-nullable column.")
    for rule in table.rules:
        missing = [c for c in rule.columns if c not in names]
        if missing:
            raise ConfigError(f"{where}, rule '{rule.name}': unknown column(s) {missing}.")
        conds = [getattr(rule, a, None) for a in ("if_true", "then_true", "null_unless", "non_null_if")]
        for cond in conds:
            if cond is not None and cond.equals is None and table.column(cond.column).dtype != "Boolean":
                raise ConfigError(
                    f"{where}, rule '{rule.name}': '{cond.column}' is not Boolean; use {{column: value}}."
                )
    return table


def _dependency_order(tables: dict[str, TableSchema]) -> list[str]:
    """Referenced tables first; ties broken by name so the order is stable."""
    deps = {
        name: {c.references.split(".")[0] for c in t.columns if c.references} - {name}
        for name, t in tables.items()
    }
    order: list[str] = []
    while len(order) < len(tables):
        ready = sorted(n for n in tables if n not in order and deps[n] <= set(order))
        if not ready:
            raise ConfigError(f"cyclic references between tables {sorted(set(tables) - set(order))}.")
        order.append(ready[0])
    return order


def load_schemas(schema_dir: str | Path = SCHEMA_DIR) -> dict[str, TableSchema]:
    """Read every ``*.yaml`` in ``schema_dir``; return table name -> schema, referenced tables first.

    Raises:
        ConfigError: a schema file is malformed or references an unknown table/column.
    """
    schema_dir = Path(schema_dir)
    tables: dict[str, TableSchema] = {}
    for path in sorted(schema_dir.glob("*.yaml")):
        with path.open() as fh:
            raw = yaml.safe_load(fh)
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{path}: expected a mapping at the top level.")
        table = _table(raw, str(path))
        if table.name in tables:
            raise ConfigError(f"{path}: table '{table.name}' is defined twice.")
        tables[table.name] = table
    if not tables:
        raise ConfigError(f"no *.yaml table schemas found in {schema_dir}.")
    for table in tables.values():
        for col in table.columns:
            if col.references is None:
                continue
            ref_table, _, ref_col = col.references.partition(".")
            if ref_table not in tables or ref_col not in tables[ref_table].column_names:
                raise ConfigError(
                    f"table '{table.name}', column '{col.name}': "
                    f"references unknown column '{col.references}'."
                )
    return {name: tables[name] for name in _dependency_order(tables)}


# --------------------------------------------------------------------------------------------------
# Violations and checks
# --------------------------------------------------------------------------------------------------


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
            if col.required:
                violations.append(_v("column is missing", MISSING_COLUMN))
                bad.add(col.name)
            exprs.append(pl.lit(None, dtype=target).alias(col.name))
            continue
        found = df.schema[col.name]
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
        if col.name in bad:
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


def _conform_and_check(
    frames: Mapping[str, pl.DataFrame], schemas: Mapping[str, TableSchema]
) -> tuple[dict[str, pl.DataFrame], list[Violation]]:
    """Validate frames that were read; return the conformed frames and every violation."""
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


def conform_frames(
    frames: Mapping[str, pl.DataFrame], schemas: Mapping[str, TableSchema]
) -> tuple[dict[str, pl.DataFrame], list[Violation]]:
    """Conform frames that were read (cast to the schema dtypes, optional columns added) and check
    them; return the conformed frames and every violation (used chunk by chunk by data.stream)."""
    return _conform_and_check(frames, schemas)


def validate_frames(
    frames: Mapping[str, pl.DataFrame], schemas: Mapping[str, TableSchema] | None = None
) -> list[Violation]:
    """Check in-memory frames (table name -> frame) against the contract; return every violation.

    A table absent from ``frames`` is reported as a missing file.
    """
    schemas = load_schemas() if schemas is None else schemas
    missing = [
        Violation(name, s.file, None, 0, f"table '{name}'", "table is missing", MISSING_FILE)
        for name, s in schemas.items()
        if name not in frames
    ]
    return missing + _conform_and_check(frames, schemas)[1]


def _missing_dir(data_dir: Path, schemas: Mapping[str, TableSchema]) -> Violation:
    files = ", ".join(s.file for s in schemas.values())
    return Violation(
        "*",
        str(data_dir),
        None,
        0,
        f"a data directory holding {files}; create one with `convcg data synth --out DIR`",
        "directory does not exist",
        MISSING_DIR,
    )


def missing_file(schema: TableSchema, data_dir: Path) -> Violation:
    """The violation of a table whose parquet file is not in ``data_dir``."""
    return Violation(
        schema.name,
        schema.file,
        None,
        0,
        f"a parquet file with columns {', '.join(schema.column_names)}",
        f"file is missing from {data_dir}",
        MISSING_FILE,
    )


def _read(
    data_dir: Path, schemas: Mapping[str, TableSchema]
) -> tuple[dict[str, pl.DataFrame], list[Violation]]:
    """Read each table's parquet file (only the schema's columns); report missing/unreadable files."""
    frames: dict[str, pl.DataFrame] = {}
    violations: list[Violation] = []
    for name, schema in schemas.items():
        path = data_dir / schema.file
        if not path.is_file():
            if schema.required:
                violations.append(missing_file(schema, data_dir))
            else:  # an optional table that is absent is an empty one
                frames[name] = pl.DataFrame(schema=schema.polars_schema)
            continue
        try:
            lazy = pl.scan_parquet(path)
            present = set(lazy.collect_schema().names())
            keep = present if schema.extra_columns == "keep" else set(schema.column_names)
            frames[name] = lazy.select([c for c in lazy.collect_schema().names() if c in keep]).collect()
        except (pl.exceptions.PolarsError, OSError) as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            violations.append(
                Violation(
                    name,
                    schema.file,
                    None,
                    0,
                    "a readable parquet file",
                    f"cannot be read ({first_line})",
                    UNREADABLE_FILE,
                )
            )
    return frames, violations


def validate_tables(
    data_dir: str | Path, schemas: Mapping[str, TableSchema] | None = None
) -> list[Violation]:
    """Check the parquet files in ``data_dir`` against the contract; return every violation found."""
    schemas = load_schemas() if schemas is None else schemas
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        return [_missing_dir(data_dir, schemas)]
    frames, violations = _read(data_dir, schemas)
    return violations + _conform_and_check(frames, schemas)[1]


def load_tables(
    data_dir: str | Path, schemas: Mapping[str, TableSchema] | None = None
) -> dict[str, pl.DataFrame]:
    """Read and validate ``data_dir``; return table name -> frame with exactly the schema's columns.

    Columns are cast to the schema dtypes, in schema order; a missing optional column is all-null;
    columns not in the schema are dropped, unless the table says ``extra_columns: keep`` (then they
    follow the schema's columns unchanged).

    Raises:
        DataValidationError: listing every violation, if there is any (including a missing directory).
    """
    schemas = load_schemas() if schemas is None else schemas
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataValidationError([_missing_dir(data_dir, schemas)])
    frames, violations = _read(data_dir, schemas)
    conformed, more = _conform_and_check(frames, schemas)
    violations += more
    if violations:
        raise DataValidationError(violations)
    return conformed
