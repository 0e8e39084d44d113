"""Which table columns feed the towers: ``data.features``, per list either names or ``auto``.

``data.features.<item|user>.<categorical|numeric|vector>`` is a list of column names (used as they
are; a name the table cannot feed is an error, all of them named in one message) or ``auto``: the
list is derived from what the table holds. A derived list takes, in the table's column order, every
column of its kind that is no id and not named in another list of the table: the contract's
``feature`` key says a declared column's kind (``data_schemas/``), a kept extra column's kind comes
from its type (integers, text and booleans categorical, floats numeric; a vector only if declared).
A column without values or with one value on every row, and a categorical one with a distinct value
on every row (an identifier, like the id the tower already embeds), is left out, and
:meth:`ChosenFeatures.describe` says which and why.

Example (the small synthetic preset's tables, every list ``auto``)::

    items: categorical [category_id], numeric [price]
    users: categorical [age_bucket, region_id], numeric [account_age_days]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import polars as pl

from convcg_cli.data.contract import FEATURE_KINDS, VECTOR, TableSchema
from convcg_cli.data.features.encodings import FeatureColumns
from convcg_cli.errors import ConvcgError

AUTO = "auto"
# data.features' keys -> the table each one reads.
FEATURE_TABLES = {"item": "items", "user": "users"}
CATEGORICAL, NUMERIC = "categorical", "numeric"


class FeatureColumnError(ConvcgError):
    """``data.features`` names columns its tables cannot feed."""


@dataclass(frozen=True)
class LeftOut:
    """A column a derived list did not take, and why."""

    table: str
    column: str
    reason: str

    def __str__(self) -> str:
        return f"{self.table}.{self.column} ({self.reason})"


@dataclass(frozen=True)
class ChosenFeatures:
    """The feature columns of each table (``item``, ``user``), which lists were derived, and the
    columns the derived lists left out."""

    columns: dict[str, FeatureColumns]
    derived: dict[str, tuple[str, ...]]  # item | user -> the kinds whose list was ``auto``
    left_out: tuple[LeftOut, ...] = ()

    def describe(self) -> list[str]:
        """What to print: one line with the derived lists, one with the columns left out (each only
        when there is something to say)."""
        lines = []
        derived = []
        for side, kinds in self.derived.items():
            columns = self.columns[side]
            taken = [
                f"{kind} [{', '.join(getattr(columns, kind))}]" for kind in kinds if getattr(columns, kind)
            ]
            if kinds:
                derived.append(f"{FEATURE_TABLES[side]}: {', '.join(taken) or 'none'}")
        if derived:
            lines.append(f"Features from the tables (data.features ... auto): {'; '.join(derived)}")
        if self.left_out:
            lines.append(f"Left out of the features: {', '.join(map(str, self.left_out))}")
        return lines


def _as_list(value: Sequence[str] | str | None, where: str) -> tuple[str, ...] | str:
    """A feature list as a tuple of column names, or :data:`AUTO`."""
    if isinstance(value, str):
        if value != AUTO:
            raise FeatureColumnError(f"{where} is a list of column names or {AUTO}, got {value!r}.")
        return AUTO
    return tuple(str(name) for name in value or ())


def _lists(features: Mapping | str | None, side: str) -> dict[str, tuple[str, ...] | str]:
    """``features[side]`` as kind -> column names or ``auto`` (``features: auto`` and ``item: auto``
    make every list of it ``auto``; a kind not given is an empty list)."""
    node = features if isinstance(features, str) else (features or {}).get(side)
    if isinstance(node, str):
        return {kind: _as_list(node, f"data.features.{side}") for kind in FEATURE_KINDS}
    node = node or {}
    unknown = sorted(set(node) - set(FEATURE_KINDS))
    if unknown:
        raise FeatureColumnError(
            f"data.features.{side} takes {list(FEATURE_KINDS)} (each a list of columns or {AUTO}), "
            f"got {unknown}."
        )
    return {kind: _as_list(node.get(kind), f"data.features.{side}.{kind}") for kind in FEATURE_KINDS}


def type_kind(dtype: pl.DataType) -> str | None:
    """The feature kind of a kept extra column by its type: integers, text and booleans are
    categorical, floats numeric; anything else (lists, dates, ...) None."""
    if dtype.is_float():
        return NUMERIC
    if dtype.is_integer() or dtype in (pl.String, pl.Boolean, pl.Categorical) or isinstance(dtype, pl.Enum):
        return CATEGORICAL
    return None


def _why_unusable(frame: pl.DataFrame, name: str, kind: str, file: str) -> str | None:
    """Why an explicitly named column cannot be a ``kind`` feature, or None when it can."""
    if name not in frame.columns:
        return f"no column '{name}' in {file} (its columns: {', '.join(frame.columns)})"
    column = frame[name]
    if column.null_count() == frame.height:
        return f"no values in its {frame.height} rows"
    if kind == NUMERIC and not column.dtype.is_numeric():
        return f"it is {column.dtype}, not a number (name it under categorical)"
    if kind == VECTOR and not isinstance(column.dtype, (pl.Array, pl.List)):
        return f"it is {column.dtype}, not a vector of floats"
    return None


def _why_left_out(column: pl.Series, kind: str) -> str | None:
    """Why a column of a derived list is left out, or None when it is taken."""
    if column.null_count() == column.len():
        return "no values"
    if kind == VECTOR:
        return None
    distinct = column.n_unique()
    if distinct == 1:
        return f"one value on every row: {column.drop_nulls()[0]!r}"
    if kind == CATEGORICAL and distinct == column.len() and column.null_count() == 0:
        return "a distinct value on every row: an identifier"
    return None


def _table_columns(
    frame: pl.DataFrame, schema: TableSchema, lists: Mapping[str, tuple[str, ...] | str], problems: list[str]
) -> tuple[FeatureColumns, list[LeftOut]]:
    """One table's feature columns: named lists checked (what fails goes to ``problems``), ``auto``
    lists derived."""
    named = {name for value in lists.values() if not isinstance(value, str) for name in value}
    chosen: dict[str, list[str]] = {kind: [] for kind in FEATURE_KINDS}
    for kind, value in lists.items():
        if isinstance(value, str):  # auto: derived below
            continue
        for name in value:
            why = _why_unusable(frame, name, kind, schema.file)
            if why is not None:
                problems.append(f"{schema.name}.{name} ({kind}): {why}")
            chosen[kind].append(name)
    left_out: list[LeftOut] = []
    declared = {column.name: column for column in schema.columns}
    for name in frame.columns:
        if name in named or (name in declared and declared[name].feature is None):  # ids, log fields
            continue
        of_kind = declared[name].feature if name in declared else type_kind(frame[name].dtype)
        if of_kind is None:
            if AUTO in lists.values():
                left_out.append(LeftOut(schema.name, name, f"{frame[name].dtype} is no feature type"))
            continue
        if lists[of_kind] != AUTO:
            continue
        why = _why_left_out(frame[name], of_kind)
        if why is None:
            chosen[of_kind].append(name)
        else:
            left_out.append(LeftOut(schema.name, name, why))
    return FeatureColumns(**{kind: tuple(names) for kind, names in chosen.items()}), left_out


def choose_features(
    features: Mapping | str | None, tables: Mapping[str, pl.DataFrame], schemas: Mapping[str, TableSchema]
) -> ChosenFeatures:
    """The feature columns of ``tables`` (``items``, ``users``: loaded frames) as ``features``
    (``data.features``) says: named lists as given, ``auto`` lists derived (see the module).

    Raises:
        FeatureColumnError: one message naming every named column its table cannot feed (table,
            column, kind, what is wrong).
    """
    problems: list[str] = []
    columns: dict[str, FeatureColumns] = {}
    derived: dict[str, tuple[str, ...]] = {}
    left_out: list[LeftOut] = []
    for side, table in FEATURE_TABLES.items():
        lists = _lists(features, side)
        columns[side], dropped = _table_columns(tables[table], schemas[table], lists, problems)
        derived[side] = tuple(kind for kind, value in lists.items() if value == AUTO)
        left_out.extend(dropped)
    if problems:
        raise FeatureColumnError(
            f"data.features names {len(problems)} column(s) the tables cannot feed: {'; '.join(problems)}. "
            f"Make the data hold them, or drop the names (a list set to {AUTO} uses what the tables hold)."
        )
    return ChosenFeatures(columns, derived, tuple(left_out))
