"""Data sets on disk: read and validate a directory of parquet tables, or write one atomically.

:func:`load_tables` is the single entry point the rest of the package reads data through: it raises
:class:`~convcg_cli.errors.DataValidationError` listing every violation, or returns frames whose
columns have exactly the contract's names, order and dtypes. :func:`write_tables` is the one writer
(``convcg data synth``, ``convcg data import``, the benchmarks).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import polars as pl

from convcg_cli.data.contract.checks import (
    MISSING_DIR,
    MISSING_FILE,
    UNREADABLE_FILE,
    Violation,
    conform_frames,
    conform_table,
)
from convcg_cli.data.contract.schemas import TableSchema, load_schemas
from convcg_cli.errors import ConvcgError, DataValidationError, first_line
from convcg_cli.workdir import sweep_stale, temp_beside

# Written next to the tables: row counts and the provenance the writer passes (seed, config, source).
METADATA_FILE = "synth.json"

# The data directories this process's load_tables checked whole (resolved directory -> the schemas
# and every file's signature then): a table of one unchanged since is read again without its checks
# (reload_table).
_checked: dict[Path, tuple[dict[str, TableSchema], dict[str, tuple[int, ...] | None]]] = {}


def _signature(path: Path) -> tuple[int, ...] | None:
    """What changes whenever a file's bytes may have changed: device, inode, size, modification and
    status-change times (the last is set by the kernel on every write, rename or ``utime``)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


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
            cause = first_line(exc)
            violations.append(
                Violation(
                    name,
                    schema.file,
                    None,
                    0,
                    "a readable parquet file",
                    f"cannot be read ({cause})",
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
    return violations + conform_frames(frames, schemas)[1]


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
    before = {name: _signature(data_dir / s.file) for name, s in schemas.items()}
    frames, violations = _read(data_dir, schemas)
    conformed, more = conform_frames(frames, schemas)
    violations += more
    if violations:
        raise DataValidationError(violations)
    if all(_signature(data_dir / s.file) == before[name] for name, s in schemas.items()):
        _checked[data_dir.resolve()] = (dict(schemas), before)  # the bytes read are the bytes checked
    return conformed


def reload_table(
    data_dir: str | Path, name: str, schemas: Mapping[str, TableSchema] | None = None
) -> pl.DataFrame:
    """Table ``name`` of ``data_dir``, as ``load_tables(data_dir, schemas)[name]`` returns it, read
    again: when this process's :func:`load_tables` checked the directory with the same schemas and
    none of its files has changed since (same device, inode, size and times, the table's also after
    this read), it is only cast (its checks, references to the other tables included, passed
    already: on ``bench-large``'s impressions 0.15 s instead of 0.7 s); otherwise the directory is
    loaded and checked again, so a changed file is never read unchecked."""
    schemas = load_schemas() if schemas is None else schemas
    data_dir = Path(data_dir)
    now = {n: _signature(data_dir / s.file) for n, s in schemas.items()}
    if now[name] is not None and _checked.get(data_dir.resolve()) == (dict(schemas), now):
        frames, violations = _read(data_dir, {name: schemas[name]})
        if not violations and _signature(data_dir / schemas[name].file) == now[name]:
            return conform_table(schemas[name], frames[name])
    return load_tables(data_dir, schemas)[name]


def write_tables(
    tables: Mapping[str, pl.DataFrame], out_dir: str | Path, metadata: Mapping | None = None
) -> Path:
    """Write ``<file>`` per schema table plus ``METADATA_FILE`` into ``out_dir``, atomically.

    Files are written into a temporary directory next to ``out_dir`` which then replaces it, so a crash
    never leaves a half-written directory and a failed write leaves an existing one untouched. An
    existing ``out_dir`` is only replaced if it holds nothing but files this function writes.

    Args:
        tables: table name -> frame, for every table in the schemas.
        out_dir: directory to (re)create.
        metadata: extra entries for ``METADATA_FILE`` (e.g. preset, seed, config); row counts are added.

    Returns:
        ``out_dir`` as a Path.
    """
    schemas = load_schemas()
    missing = sorted(n for n, s in schemas.items() if s.required and n not in tables)
    if missing:
        raise ConvcgError(f"cannot write data: tables {missing} are missing.")
    out_dir = Path(out_dir)
    ours = {s.file for s in schemas.values()} | {METADATA_FILE}
    if out_dir.exists():
        foreign = (
            sorted(p.name for p in out_dir.iterdir() if p.name not in ours) if out_dir.is_dir() else [""]
        )
        if foreign:
            raise ConvcgError(
                f"refusing to replace {out_dir}: it is not a directory written by `convcg data synth` "
                f"(it holds {', '.join(foreign[:5]) or 'a file'}); choose another --out."
            )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(out_dir)  # what writers of out_dir that were killed left beside it (named by pid)

    tmp = Path(tempfile.mkdtemp(prefix=temp_beside(out_dir, "tmp"), dir=out_dir.parent))
    try:
        written = [name for name in schemas if name in tables]
        for name in written:
            tables[name].write_parquet(tmp / schemas[name].file)
        info = dict(metadata or {})
        info["rows"] = {name: tables[name].height for name in written}
        (tmp / METADATA_FILE).write_text(json.dumps(info, indent=2, default=str) + "\n")
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _replace_dir(new: Path, target: Path) -> None:
    """Move ``new`` to ``target``; an existing ``target`` is set aside first and restored on failure."""
    if not target.exists():
        os.replace(new, target)
        return
    aside = Path(tempfile.mkdtemp(prefix=temp_beside(target, "old"), dir=target.parent))
    os.replace(target, aside / target.name)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(aside / target.name, target)  # put the good data back
        aside.rmdir()
        raise
    shutil.rmtree(aside, ignore_errors=True)
