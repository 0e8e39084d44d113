"""The data contract's objects, loaded from ``data_schemas/*.yaml``: tables, columns, row rules.

Declarative only: ``checks`` holds what compares frames with the contract, ``tables`` the file IO.

Example::

    >>> schemas = load_schemas()
    >>> list(schemas)
    ['items', 'users', 'impressions', 'conversions', 'user_history']
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import yaml

from convcg_cli.errors import ConfigError
from convcg_cli.resources import resource_dir

SCHEMA_DIR = resource_dir("data_schemas")

# dtype names a schema may use; kept small on purpose so every check below knows how to handle them.
DTYPES: dict[str, pl.DataType] = {
    "Int64": pl.Int64(),
    "Int32": pl.Int32(),
    "Float64": pl.Float64(),
    "Float32": pl.Float32(),
    "Boolean": pl.Boolean(),
    "String": pl.String(),
}
# A fixed-length float vector (e.g. a pretrained content embedding): loaded as Array(Float32, length).
# ``length`` pins it; without it every row must have the length of the column's first non-null row.
VECTOR = "vector"
# How a column feeds the towers when data.features derives its lists from the tables (``auto``):
# categorical (an embedding), numeric (scaled) or vector (projected). A declared column without one
# (an id, a log field) is no table feature.
FEATURE_KINDS = ("categorical", "numeric", VECTOR)

_COLUMN_KEYS = {
    "name",
    "dtype",
    "length",
    "nullable",
    "required",
    "min",
    "max",
    "allowed",
    "references",
    "description",
    "feature",
}
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
        dtype: one of :data:`DTYPES` (by name), or :data:`VECTOR`.
        length: a vector column's length (None: any one length, the same on every row).
        nullable: may hold nulls.
        required: must be present in the file; a missing optional column loads as all-null.
        min, max: inclusive bounds on non-null values.
        allowed: the only values permitted, or None for any.
        references: ``"<table>.<column>"`` every non-null value must exist in, or None.
        description: free text.
        feature: one of :data:`FEATURE_KINDS` when the column is a feature of its table's tower
            (``data.features`` lists left as ``auto`` use it so), None when it is not.
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
    length: int | None = None
    feature: str | None = None

    @property
    def is_vector(self) -> bool:
        """A fixed-length float vector column (:data:`VECTOR`)."""
        return self.dtype == VECTOR

    @property
    def polars_dtype(self) -> pl.DataType:
        """The polars dtype this column is cast to on load (a vector of unpinned length: a list until
        its length is read from the data)."""
        if self.is_vector:
            return pl.Array(pl.Float32, self.length) if self.length else pl.List(pl.Float32)
        return DTYPES[self.dtype]

    def describe(self) -> str:
        """Short text of what a valid column looks like, e.g. ``non-null Boolean``."""
        if self.is_vector:
            length = f"{self.length} floats" if self.length else "floats of one length"
            return f"{'nullable' if self.nullable else 'non-null'} vector of {length}"
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
    """Rows where ``if_true`` holds must have ``then_true`` (or one of ``or_true``) hold, e.g. converted
    implies clicked or view_through."""

    name: str
    if_true: Condition
    then_true: Condition
    or_true: tuple[Condition, ...] = ()

    @property
    def column(self) -> str:
        """The column a violation is reported against: the antecedent."""
        return self.if_true.column

    @property
    def columns(self) -> tuple[str, ...]:
        """Every column the rule reads."""
        return (self.if_true.column, self.then_true.column, *(c.column for c in self.or_true))

    def broken(self) -> pl.Expr:
        """Boolean expression, true on rows that break the rule."""
        holds = self.then_true.expr()
        for alternative in self.or_true:
            holds = holds | alternative.expr()
        return self.if_true.expr() & ~holds

    def describe(self) -> str:
        """Readable statement of the rule."""
        return f"{self.if_true} only where {' or '.join(map(str, (self.then_true, *self.or_true)))}"


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
        # then_true may list alternatives: the rule holds where at least one of them does.
        then_true = raw["then_true"] if isinstance(raw["then_true"], list) else [raw["then_true"]]
        if not then_true:
            raise ConfigError(f"{where}: then_true lists no condition.")
        first, *rest = (_condition(c, where) for c in then_true)
        return ImplicationRule(raw["name"], _condition(raw["if_true"], where), first, tuple(rest))
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
    if raw["dtype"] not in DTYPES and raw["dtype"] != VECTOR:
        raise ConfigError(
            f"{where}, column '{raw['name']}': dtype {raw['dtype']!r} is not one of {[*DTYPES, VECTOR]}."
        )
    length = raw.get("length")
    if raw["dtype"] == VECTOR:
        if length is not None and (not isinstance(length, int) or isinstance(length, bool) or length < 1):
            raise ConfigError(f"{where}, column '{raw['name']}': length must be a positive integer.")
        if set(raw) & {"min", "max", "allowed", "references"}:
            raise ConfigError(
                f"{where}, column '{raw['name']}': a vector column takes no min, max, allowed or references."
            )
    elif length is not None:
        raise ConfigError(f"{where}, column '{raw['name']}': only a {VECTOR} column has a length.")
    feature = raw.get("feature")
    if feature is not None and feature not in FEATURE_KINDS:
        raise ConfigError(
            f"{where}, column '{raw['name']}': feature {feature!r} is not one of {list(FEATURE_KINDS)}."
        )
    if feature is not None and (feature == VECTOR) != (raw["dtype"] == VECTOR):
        raise ConfigError(
            f"{where}, column '{raw['name']}': feature {VECTOR} goes with dtype {VECTOR}, and only with it."
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
        length=length,
        feature=feature,
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
        conds += list(getattr(rule, "or_true", ()))
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
