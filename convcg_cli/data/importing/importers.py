"""Importers by configuration: a real log set -> the ``data_schemas/`` contract, driven by a mapping.

A mapping file (``conf/importer/<source>.yaml``, its header documents every key) says which source
column is the user, the item, the time, the surface, the click, the dwell, the save, the conversion,
the advertiser-like group and the user history. :func:`import_logs` reads the files it names, maps
them with vectorised polars expressions, checks the result with
:func:`~convcg_cli.data.contract.checks.validate_frames` and only then writes it atomically with
:func:`~convcg_cli.data.contract.tables.write_tables`: nothing is half-written on failure.

A signal the data set lacks (no dwell column, no save column, no surface, no non-engaged rows ...)
does not stop the import: the contract columns are filled as the contract allows, a warning is
recorded, and the training levers that depend on the signal are listed in
:attr:`ImportReport.disabled_levers` (also written to the output's ``synth.json``). A missing input
file or required column raises :class:`~convcg_cli.errors.ConvcgError` naming the file, the column
and what was expected.

Nothing here knows about a particular data set; KuaiRand is only a config file. Item performance
features are not imported at all: convcg recomputes them from the training window
(:func:`convcg_cli.data.features.encodings.item_performance`), so aggregate counts shipped with a data set
(which usually cover held-out days) are never needed.

Example::

    >>> report = import_logs(load_mapping("kuairand"), "../shared/data/kuairand", "data/kuairand")
    >>> report.rows["impressions"]
    228329

This module reads the source files and runs the whole import; the mapping file is read in
:mod:`.mapping`, frames are mapped onto the contract in :mod:`.frames`, and :mod:`.report` holds
the :class:`ImportReport` and the lever names.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import polars as pl

from convcg_cli.data.contract import load_schemas, validate_frames, write_tables
from convcg_cli.data.importing.frames import (
    check_signal_columns,
    contract_first,
    events_from_lists,
    join_user_history,
    map_entities,
    map_impressions,
)
from convcg_cli.data.importing.mapping import as_block, as_columns, check_keys
from convcg_cli.data.importing.report import USER_HISTORY, ImportReport
from convcg_cli.data.importing.source_files import TimeSpec, read_table, source_files
from convcg_cli.data.importing.user_keys import UserKeySpec, assign_user_ids, encode_known_users
from convcg_cli.errors import ConfigError, ConvcgError, DataValidationError

LOG_USER_ID = "_user_id"  # the log's integer user id, added before mapping (see user_keys)
_CATALOGUES = ("all", "logged")


def _signal_columns(imp: Mapping[str, Any]) -> tuple[dict[str, str], list[str]]:
    """Columns of the impressions log: required ones (with what they hold) and optional ones.

    The user key's columns are not listed: :func:`read_table` reads them as ``any_of``.
    """
    required = {
        imp["item"]: "the item id (impressions.item)",
        as_block(imp["timestamp"])["column"]: "the serving time (impressions.timestamp)",
    }
    for signal in ("clicked", "converted"):
        if not as_columns(imp.get(signal)):
            raise ConfigError(f"impressions.{signal} must name at least one source column.")
        required.update({c: f"a 0/1 {signal} flag (impressions.{signal})" for c in as_columns(imp[signal])})
    dwell, surface = as_block(imp.get("dwell")).get("column"), as_block(imp.get("surface")).get("column")
    optional = [*as_columns(imp.get("saved")), *(c for c in (dwell, surface) if c)]
    return required, optional


SIGNALS = ("clicked", "converted", "saved")  # flag columns of the impressions log, OR-ed per signal


def read_log(mapping: Mapping[str, Any], in_dir: Path, user: UserKeySpec) -> pl.DataFrame:
    """The impressions log as read (every file renamed, derived, times parsed, concatenated), checked."""
    imp = mapping["impressions"]
    required, optional = _signal_columns(imp)
    if not user.encoded:
        required = {user.column: "the user id (impressions.user)", **required}
    ts = as_block(imp["timestamp"])
    time = TimeSpec(ts["column"], ts.get("format"), ts.get("time_zone"))
    files = source_files(imp["files"], mapping.get("csv"), "impressions.files")
    log = read_table(
        in_dir, files, required, optional, "the impressions log", time, user.columns if user.encoded else ()
    )
    flags = {c: f"a 0/1 {sig} flag (impressions.{sig})" for sig in SIGNALS for c in as_columns(imp.get(sig))}
    ids = {imp["item"]: "the item id (impressions.item)"}
    if not user.encoded:
        ids[user.column] = "the user id (impressions.user)"
    check_signal_columns(log, flags, ids, "the impressions log")
    return log


def _read_entities(
    mapping: Mapping[str, Any], in_dir: Path, table: str, key: str, encoded: bool
) -> pl.DataFrame:
    """The items or users source table with the columns its mapping section uses."""
    spec = mapping[table]
    wanted = {spec[key]: f"the {key} id ({table}.{key})"}
    wanted |= {src: f"{table}.columns.{dst}" for dst, src in (spec.get("columns") or {}).items()}
    wanted |= {c: f"listed in {table}.keep" for c in spec.get("keep") or []}
    adv = as_block(spec.get("advertiser")).get("column")
    files = source_files(spec["file"], mapping.get("csv"), f"{table}.file")
    frame = read_table(in_dir, files, wanted, [adv] if adv else [], f"the {table} table ({table}.file)")
    if not encoded:
        check_signal_columns(frame, {}, {spec[key]: f"the {key} id ({table}.{key})"}, f"the {table} table")
    return frame


def restrict_catalogue(
    items: pl.DataFrame, impressions: pl.DataFrame, spec: Mapping[str, Any], report: ImportReport
) -> pl.DataFrame:
    """The items table as ``items.catalogue`` says: ``all`` (default) keeps every item, ``logged``
    only the items the impressions log serves (the others are counted in ``adjustments``)."""
    catalogue = spec.get("catalogue", "all")
    if catalogue not in _CATALOGUES:
        raise ConfigError(f"items.catalogue must be one of {list(_CATALOGUES)}, got {catalogue!r}.")
    if catalogue == "all":
        return items
    kept = items.filter(pl.col("item_id").is_in(impressions["item_id"].unique().implode()))
    report.adjustments["items_not_logged_dropped"] = items.height - kept.height
    if items.height > kept.height:
        report.warnings.append(
            f"{items.height - kept.height:,} of {items.height:,} catalogue items are never served in the "
            "log; dropped (items.catalogue: logged)."
        )
    return kept


def map_users(
    mapping: Mapping[str, Any], in_dir: Path, user: UserKeySpec, logged: pl.DataFrame, report: ImportReport
) -> pl.DataFrame:
    """The users table: the mapped ``users`` section, or, without one, the log's distinct users.

    With an encoded user key (see :mod:`~convcg_cli.data.importing.user_keys`) every logged user gets a row
    (``user_id``, ``user_key``) and the users table's attributes are joined onto it by key; users of
    the table that never appear in the log are dropped and counted.
    """
    if not mapping.get("users"):
        report.warnings.append(
            f"No users table (users): derived from the log ({logged.height:,} users, no attributes)."
        )
        return contract_first(logged, load_schemas()["users"])
    spec = mapping["users"]
    frame = _read_entities(mapping, in_dir, "users", "user", user.encoded)
    if not user.encoded:
        return map_entities(frame, spec, "users", "user", report)
    frame, dropped = encode_known_users(frame, spec["user"], logged, user)
    report.adjustments["users_not_logged_dropped"] = dropped
    mapped = map_entities(frame, spec, "users", "user", report)
    return contract_first(
        logged.join(mapped, on="user_id", how="left", maintain_order="left"), load_schemas()["users"]
    )


def map_tables(
    mapping: Mapping[str, Any], in_dir: str | Path, report: ImportReport
) -> dict[str, pl.DataFrame]:
    """Read the source files named by ``mapping`` and map them onto the contract (not validated)."""
    in_dir = Path(in_dir)
    check_keys(mapping)
    imp = mapping["impressions"]
    user = UserKeySpec.from_mapping(imp["user"])
    log = read_log(mapping, in_dir, user)
    user_ids, logged_users = assign_user_ids(log, user)
    log = log.with_columns(user_ids.alias(LOG_USER_ID))
    tables = {"impressions": map_impressions(log, {**imp, "user": LOG_USER_ID}, report)}
    items = map_entities(
        _read_entities(mapping, in_dir, "items", "item", False), mapping["items"], "items", "item", report
    )
    tables["items"] = restrict_catalogue(items, tables["impressions"], mapping["items"], report)
    tables["users"] = map_users(mapping, in_dir, user, logged_users, report)

    hist = mapping.get("user_history")
    if not hist:
        report.disable(USER_HISTORY, "No user history table (user_history)")
    elif not (in_dir / hist["file"]).is_file():
        report.disable(USER_HISTORY, f"The user history table {hist['file']} is missing from {in_dir}")
    else:
        wanted = {hist["user"]: "the user id (user_history.user)"}
        wanted |= {src: f"user_history.columns.{dst}" for dst, src in hist["columns"].items()}
        events = as_block(hist.get("events"))
        lists = dict(events.get("lists") or {})
        last_time = as_block(events.get("last_time")).get("column")
        wanted |= {src: f"user_history.events.lists.{src}" for src in lists}
        history = read_table(
            in_dir,
            source_files(hist["file"], mapping.get("csv"), "user_history.file"),
            wanted,
            [last_time] if last_time else [],
            "the user history (user_history.file)",
        )
        if user.encoded:
            history, dropped = encode_known_users(history, hist["user"], logged_users, user)
            report.adjustments["user_history_users_not_logged_dropped"] = dropped
        else:
            check_signal_columns(
                history, {}, {hist["user"]: "the user id (user_history.user)"}, "the user history"
            )
        tables["users"] = join_user_history(tables["users"], history, hist)
        if lists:
            tables["user_history"] = history_events(history, hist, tables, report)
    return tables


def history_events(
    history: pl.DataFrame, spec: Mapping[str, Any], tables: Mapping[str, pl.DataFrame], report: ImportReport
) -> pl.DataFrame:
    """The ``user_history`` contract table from per-user list columns (``user_history.events``).

    Events of items outside the item table or of users outside the user table are dropped and
    counted (``adjustments.user_history_dropped_*``). Events may overlap the first logged day; the
    datamodule reads only those before the training cut-off.
    """
    events = as_block(spec.get("events"))
    time_spec = as_block(events.get("last_time"))
    unit = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}[time_spec.get("unit", "s")]
    rows = events_from_lists(history, spec["user"], dict(events["lists"]), time_spec.get("column"), unit)
    checks = {
        "unknown_item": pl.col("item_id").is_in(tables["items"]["item_id"].implode()),
        "unknown_user": pl.col("user_id").is_in(tables["users"]["user_id"].implode()),
    }
    for name, keep in checks.items():
        dropped = rows.height
        rows = rows.filter(keep)
        dropped -= rows.height
        if dropped:
            report.adjustments[f"user_history_dropped_{name}"] = dropped
            report.warnings.append(f"{dropped:,} user history event(s) dropped: {name.replace('_', ' ')}.")
    return rows


def import_logs(mapping: Mapping[str, Any], in_dir: str | Path, out_dir: str | Path) -> ImportReport:
    """Import a log set into ``out_dir`` in the data_schemas/ contract, as ``mapping`` says.

    The output is validated before anything is written and written atomically (``synth.json`` holds the
    mapping and this report, ``disabled_levers`` included).

    Args:
        mapping: a mapping from :func:`load_mapping` (a dict or an omegaconf DictConfig).
        in_dir: the source directory; the mapping's file names are relative to it.
        out_dir: the directory to (re)create.

    Raises:
        ConvcgError: a missing file or column; DataValidationError if the mapped tables break the
            contract (e.g. impressions of items absent from the item table).
    """
    from omegaconf import DictConfig, OmegaConf

    start = time.perf_counter()
    if isinstance(mapping, DictConfig):
        mapping = OmegaConf.to_container(mapping, resolve=True)  # type: ignore[assignment]
    in_dir = Path(in_dir)
    if not in_dir.is_dir():
        raise ConvcgError(f"The input directory {in_dir} does not exist; expected the source log set there.")
    report = ImportReport(source=str(mapping.get("source", "")), in_dir=str(in_dir), out_dir=str(out_dir))
    tables = map_tables(mapping, in_dir, report)

    violations = validate_frames(tables)
    if violations:
        raise DataValidationError(violations)
    imp = tables["impressions"]
    report.rows = {name: frame.height for name, frame in tables.items()}
    report.clicks, report.conversions, report.saves = (
        int(imp[c].sum()) for c in ("clicked", "converted", "saved")
    )
    report.surfaces = dict(imp.group_by("surface").len().sort("surface").iter_rows())
    metadata = {
        "kind": "import",
        "source": report.source,
        "disabled_levers": report.disabled_levers,
        "import": {k: v for k, v in report.to_dict().items() if k != "seconds"},
        "mapping": dict(mapping),
    }
    write_tables(tables, out_dir, metadata)
    report.seconds = time.perf_counter() - start
    return report
