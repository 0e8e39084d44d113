"""Reading the source files an importer mapping names: CSV dialects, per-file renames and derived
columns, string timestamps.

A file of a mapping is either a path or an entry (every key but ``path`` optional)::

    {path: purchases.csv,
     csv: {separator: ";", quote_char: '"'},          # over the mapping's top-level `csv` defaults
     columns: {user: customer_id, time: bought_at},   # name the mapping uses -> this file's column
     derive: {clicked: true, converted: "qty > 0"},   # a constant, or a SQL expression on the file
     timestamp_format: "%d.%m.%Y %H:%M"}              # over impressions.timestamp.format

:func:`read_table` reads such files one by one (renames, derived columns and time parsing applied
per file, so an error names the file it is in), then concatenates them. Every failure is a
:class:`~convcg_cli.errors.ConvcgError` naming the file and the column, never a polars traceback.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from convcg_cli.errors import ConfigError, ConvcgError

# polars.scan_csv options a mapping may set (under `csv`, globally or per file).
CSV_OPTIONS = (
    "separator",
    "quote_char",
    "decimal_comma",
    "null_values",
    "encoding",
    "has_header",
    "skip_rows",
)
_FILE_KEYS = ("path", "csv", "columns", "derive", "timestamp_format")


@dataclass(frozen=True)
class SourceFile:
    """One source file and how to read it (see the module docstring for the mapping keys).

    Attributes:
        path: relative to the import's input directory.
        csv: polars ``scan_csv`` options (``CSV_OPTIONS``); ignored for parquet.
        columns: name used by the mapping -> the file's own column.
        derive: name used by the mapping -> a constant (bool or number) or a SQL expression (a string,
            polars SQL: text literals in single quotes) computed from the file's columns.
        timestamp_format: strptime format of this file's string timestamps (None: the mapping's).
    """

    path: str
    csv: dict[str, Any] = field(default_factory=dict)
    columns: dict[str, str] = field(default_factory=dict)
    derive: dict[str, Any] = field(default_factory=dict)
    timestamp_format: str | None = None

    def source_column(self, name: str) -> str:
        """The file's own column behind a name the mapping uses (for messages)."""
        return self.columns.get(name, name)


@dataclass(frozen=True)
class TimeSpec:
    """How to read a string timestamp column: ``column`` (a mapping name), strptime ``format`` and
    the ``time_zone`` of naive times (UTC by default)."""

    column: str
    format: str | None = None
    time_zone: str | None = None
    meaning: str = "the serving time (impressions.timestamp)"


def check_csv_options(options: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``options`` as a dict; ConfigError naming any key polars reads we do not pass on."""
    unknown = sorted(set(options) - set(CSV_OPTIONS))
    if unknown:
        raise ConfigError(
            f"{where}: unknown CSV option(s) {unknown}; the importer passes on {list(CSV_OPTIONS)}."
        )
    return dict(options)


def source_files(spec: Any, csv_defaults: Mapping[str, Any] | None, where: str) -> list[SourceFile]:
    """The mapping's ``files`` (a path, an entry, or a list of both) as :class:`SourceFile` s.

    Args:
        spec: e.g. ``impressions.files`` or ``items.file``.
        csv_defaults: the mapping's top-level ``csv`` block; a file's own ``csv`` keys win.
        where: the mapping key, for messages.
    """
    defaults = check_csv_options(csv_defaults or {}, "csv")
    entries = spec if isinstance(spec, list) else [spec]
    files = []
    for entry in entries:
        if isinstance(entry, str):
            files.append(SourceFile(entry, dict(defaults)))
            continue
        if not isinstance(entry, Mapping) or "path" not in entry or set(entry) - set(_FILE_KEYS):
            raise ConfigError(
                f"{where}: each file is a path or an entry with 'path' and any of {list(_FILE_KEYS[1:])}, "
                f"got {entry!r}."
            )
        files.append(
            SourceFile(
                path=str(entry["path"]),
                csv={**defaults, **check_csv_options(entry.get("csv") or {}, f"{where} {entry['path']}.csv")},
                columns={str(k): str(v) for k, v in (entry.get("columns") or {}).items()},
                derive={str(k): v for k, v in (entry.get("derive") or {}).items()},
                timestamp_format=entry.get("timestamp_format"),
            )
        )
    return files


def _scan(path: Path, csv: Mapping[str, Any]) -> pl.LazyFrame:
    if path.suffix == ".parquet":
        return pl.scan_parquet(path)
    if path.suffix == ".csv":
        # Whole-file type inference: a column that is numeric for 100 rows may hold "12,65" later.
        return pl.scan_csv(path, infer_schema_length=None, **csv)
    raise ConfigError(f"{path}: the importer reads .parquet or .csv files, not '{path.suffix}'.")


def _derived(value: Any, name: str, path: Path) -> pl.Expr:
    """A ``derive`` entry as an expression: constants as literals, strings as polars SQL."""
    if isinstance(value, bool | int | float):
        return pl.lit(value).alias(name)
    if not isinstance(value, str):
        raise ConfigError(f"{path}: derive.{name} must be a constant or a SQL expression, got {value!r}.")
    try:
        return pl.sql_expr(value).alias(name)
    except (pl.exceptions.PolarsError, ValueError) as exc:
        raise ConfigError(
            f"{path}: derive.{name} = {value!r} is not a SQL expression: {_first_line(exc)}"
        ) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _open(in_dir: Path, source: SourceFile, what: str) -> tuple[pl.LazyFrame, list[str]]:
    """The file with its renames and derived columns applied, and its columns (mapping names)."""
    path = in_dir / source.path
    if not path.is_file():
        raise ConvcgError(f"{source.path} is missing from {in_dir}; expected {what} there.")
    lazy = _scan(path, source.csv)
    try:
        present = lazy.collect_schema().names()
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise ConvcgError(f"{path} cannot be read as {what}: {_first_line(exc)}") from None
    absent = {name: src for name, src in source.columns.items() if src not in present}
    if absent:
        listed = "; ".join(f"'{src}' (columns.{name})" for name, src in absent.items())
        raise ConvcgError(f"{path} has no column {listed}. Columns present: {', '.join(present)}.")
    lazy = lazy.with_columns(pl.col(src).alias(name) for name, src in source.columns.items())
    if source.derive:
        lazy = lazy.with_columns(_derived(v, name, path) for name, v in source.derive.items())
        try:
            present = lazy.collect_schema().names()
        except pl.exceptions.PolarsError as exc:
            raise ConvcgError(f"{path}: a derive expression cannot be computed: {_first_line(exc)}") from None
    return lazy, list(dict.fromkeys([*present, *source.columns]))


def parse_times(frame: pl.DataFrame, time: TimeSpec, source: SourceFile, path: Path) -> pl.DataFrame:
    """Parse ``time.column`` from text with its format (the file's ``timestamp_format`` first).

    Non-text columns are returned unchanged (numbers with a unit, or already Datetime).

    Raises:
        ConvcgError: text without a format, an unusable format, or rows that do not match it
            (the message names the file, the column, the number of bad rows and a sample).
    """
    column = time.column
    if frame.schema[column] != pl.String:
        return frame
    fmt = source.timestamp_format or time.format
    src = source.source_column(column)
    if not fmt:
        sample = frame[column].drop_nulls().head(3).to_list()
        raise ConvcgError(
            f"{path}: column '{src}' ({time.meaning}) holds text, e.g. {sample!r}; set its strptime "
            "format in the mapping (impressions.timestamp.format, or timestamp_format on the file)."
        )
    parsed = pl.col(column).str.strptime(pl.Datetime("us"), fmt, strict=False)
    if time.time_zone:
        parsed = parsed.dt.replace_time_zone(time.time_zone)
    try:
        out = frame.with_columns(parsed.alias("_parsed"))
    except pl.exceptions.PolarsError as exc:
        raise ConvcgError(
            f"{path}: column '{src}' ({time.meaning}) cannot be parsed with format {fmt!r}"
            f"{f' in time zone {time.time_zone!r}' if time.time_zone else ''}: {_first_line(exc)}"
        ) from None
    bad = out.filter(pl.col("_parsed").is_null() & pl.col(column).is_not_null())[column]
    if len(bad):
        raise ConvcgError(
            f"{path}: column '{src}' ({time.meaning}) does not match format {fmt!r} in {len(bad):,} of "
            f"{frame.height:,} rows, e.g. {bad.unique(maintain_order=True).head(3).to_list()!r}. "
            "Fix the rows or the format (impressions.timestamp.format, or timestamp_format on the file)."
        )
    return out.with_columns(pl.col("_parsed").alias(column)).drop("_parsed")


def read_table(
    in_dir: Path,
    files: Sequence[SourceFile | str],
    required: Mapping[str, str],
    optional: Sequence[str],
    what: str,
    time: TimeSpec | None = None,
    any_of: Sequence[str] = (),
) -> pl.DataFrame:
    """Read and concatenate ``files`` (in order), keeping only the columns the mapping uses.

    Args:
        in_dir: the source directory; file paths are relative to it.
        files: the files of one table (a bare string is a file read with polars' defaults).
        required: column (mapping name) -> what it was expected to hold (for the error message).
        optional: columns used if present in every file; absent from any file, they are left out
            (that signal is missing).
        what: what the table is, for the error message (e.g. "the impressions log").
        time: a timestamp column to parse from text (see :func:`parse_times`).
        any_of: columns of which each file needs at least one (e.g. a user id and its fallback);
            a file without one of them gets it as nulls.

    Raises:
        ConvcgError: a file is missing or unreadable, lacks a required column, or its times do not parse.
    """
    frames: list[pl.DataFrame] = []
    absent: set[str] = set()
    for source in (SourceFile(f) if isinstance(f, str) else f for f in files):
        lazy, present = _open(in_dir, source, what)
        path = in_dir / source.path
        lacking = [c for c in required if c not in present]
        if lacking:
            expected = "; ".join(f"'{source.source_column(c)}' ({required[c]})" for c in lacking)
            raise ConvcgError(
                f"{path} has no column {expected}. Columns present: {', '.join(present)}. "
                f"Fix the file or the importer mapping."
            )
        if any_of and not any(c in present for c in any_of):
            raise ConvcgError(f"{path} has none of the columns {list(any_of)}; expected one in {what}.")
        absent |= {c for c in optional if c not in present}
        keep = list(dict.fromkeys([*required, *(c for c in [*optional, *any_of] if c in present)]))
        try:
            frame = lazy.select(keep).collect()
        except (pl.exceptions.PolarsError, OSError) as exc:
            raise ConvcgError(f"{path} cannot be read as {what}: {_first_line(exc)}") from None
        frame = frame.with_columns(pl.lit(None).alias(c) for c in any_of if c not in present)
        frames.append(parse_times(frame, time, source, path) if time else frame)
    common = [c for c in frames[0].columns if c not in absent]
    return pl.concat([f.select(common) for f in frames], how="vertical_relaxed")
