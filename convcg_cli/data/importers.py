"""Importers by configuration: a real log set -> the ``data_schemas/`` contract, driven by a mapping.

A mapping file (``conf/importer/<source>.yaml``, its header documents every key) says which source
column is the user, the item, the time, the surface, the click, the dwell, the save, the conversion,
the advertiser-like group and the user history. :func:`import_logs` reads the files it names, maps
them with vectorised polars expressions, checks the result with
:func:`~convcg_cli.data.checks.validate_frames` and only then writes it atomically with
:func:`~convcg_cli.data.tables.write_tables`: nothing is half-written on failure.

A signal the data set lacks (no dwell column, no save column, no surface, no non-engaged rows ...)
does not stop the import: the contract columns are filled as the contract allows, a warning is
recorded, and the training levers that depend on the signal are listed in
:attr:`ImportReport.disabled_levers` (also written to the output's ``synth.json``). A missing input
file or required column raises :class:`~convcg_cli.errors.ConvcgError` naming the file, the column
and what was expected.

Nothing here knows about a particular data set; KuaiRand is only a config file. Item performance
features are not imported at all: convcg recomputes them from the training window
(:func:`convcg_cli.data.features.item_performance`), so aggregate counts shipped with a data set
(which usually cover held-out days) are never needed.

Example::

    >>> report = import_logs(load_mapping("kuairand"), "../shared/data/kuairand", "data/kuairand")
    >>> report.rows["impressions"]
    228329
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from convcg_cli.config import CONF_DIR
from convcg_cli.data.checks import validate_frames
from convcg_cli.data.contract import TableSchema, load_schemas
from convcg_cli.data.levers import (  # the levers a source may lack a signal for; also imported from here
    ADVERTISER_SOFTMAX,
    DWELL_WEIGHTED_POSITIVES,
    IMPRESSION_HARD_NEGATIVES,
    SURFACE_CONTEXT,
    USER_HISTORY,
)
from convcg_cli.data.source_files import TimeSpec, read_table, source_files
from convcg_cli.data.tables import write_tables
from convcg_cli.data.user_history import events_from_lists
from convcg_cli.data.user_keys import UserKeySpec, assign_user_ids, encode_known_users
from convcg_cli.errors import ConfigError, ConvcgError, DataValidationError

IMPORTER_DIR = CONF_DIR / "importer"


_TIME_UNITS = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}
_DWELL_UNITS = {"s": 1.0, "ms": 1_000.0}
_CONVERSION_WITHOUT_CLICK = ("count_as_click", "drop")


@dataclass
class ImportReport:
    """What an import did: sizes, signal counts, the surface mapping, adjustments and warnings.

    Args:
        source: the mapping's ``source`` name.
        in_dir, out_dir: where the logs were read from and written to.
        rows: table name -> rows written.
        clicks, conversions, saves: positives in the impressions written.
        surfaces: contract surface -> impressions.
        surface_column: the source column the surfaces come from (None if there is none).
        surface_mapping: one entry per source surface value: ``{"value", "surface", "rows"}``.
        adjustments: counts of values changed on the way, e.g. ``conversions_counted_as_clicks``,
            ``nulled_sentinels.users.is_live_streamer``, ``duplicate_rows``.
        warnings: one readable line per missing signal or notable fix-up.
        disabled_levers: lever name -> why it cannot work on this data.
        seconds: wall time of the import (reading, mapping, validating, writing).
    """

    source: str
    in_dir: str
    out_dir: str = ""
    rows: dict[str, int] = field(default_factory=dict)
    clicks: int = 0
    conversions: int = 0
    saves: int = 0
    surfaces: dict[str, int] = field(default_factory=dict)
    surface_column: str | None = None
    surface_mapping: list[dict[str, Any]] = field(default_factory=list)
    adjustments: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    disabled_levers: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def disable(self, lever: str, why: str) -> None:
        """Record that ``lever`` cannot work on this data, and warn about it."""
        self.disabled_levers[lever] = why
        self.warnings.append(f"{why}; lever '{lever}' is switched off for this data.")

    def summary(self) -> list[str]:
        """Readable lines: sizes, positives, where each surface came from, disabled levers."""
        rows = self.rows
        lines = [
            f"Imported {self.source} from {self.in_dir} into {self.out_dir} in {self.seconds:.1f} s: "
            f"{rows.get('items', 0):,} items, {rows.get('users', 0):,} users, "
            f"{rows.get('impressions', 0):,} impressions; {self.clicks:,} clicks, "
            f"{self.conversions:,} conversions, {self.saves:,} saves."
        ]
        for surface, count in self.surfaces.items():
            values = [str(m["value"]) for m in self.surface_mapping if m["surface"] == surface]
            source = f" <- {self.surface_column} {', '.join(values)}" if self.surface_column else ""
            lines.append(f"  {surface}: {count:,} impressions{source}")
        levers = ", ".join(self.disabled_levers) or "none"
        lines.append(f"Disabled levers: {levers}.")
        return lines

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (what goes into ``synth.json``)."""
        return asdict(self)


# --------------------------------------------------------------------------------------------------
# The mapping
# --------------------------------------------------------------------------------------------------


def available_sources() -> list[str]:
    """Names of the shipped mappings (``conf/importer/*.yaml``)."""
    return sorted(p.stem for p in IMPORTER_DIR.glob("*.yaml"))


def load_mapping(source: str | Path) -> dict[str, Any]:
    """The mapping of a shipped source name (``conf/importer/NAME.yaml``) or of a YAML file path.

    Raises:
        ConfigError: no such source, or the file does not hold a mapping with the required sections.
    """
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    path = Path(source)
    if path.suffix not in (".yaml", ".yml"):
        path = IMPORTER_DIR / f"{source}.yaml"
    if not path.is_file():
        raise ConfigError(
            f"No importer mapping for source '{source}' ({path} does not exist); choose one of "
            f"{', '.join(available_sources())} or pass the path of a mapping .yaml."
        )
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except (yaml.YAMLError, OmegaConfBaseException) as exc:
        raise ConfigError(f"{path} is not a readable importer mapping: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level.")
    mapping: dict[str, Any] = {str(k): v for k, v in raw.items()}
    missing = [k for k in ("impressions", "items") if not isinstance(mapping.get(k), dict)]
    if missing:
        raise ConfigError(f"{path}: the mapping needs sections {missing} (see conf/importer/kuairand.yaml).")
    mapping.setdefault("source", path.stem)
    return mapping


def _columns(spec: Any) -> list[str]:
    """A signal's source columns: null -> [], a name -> [name], a list -> the list."""
    if spec is None:
        return []
    return [spec] if isinstance(spec, str) else list(spec)


def _block(spec: Any) -> dict[str, Any]:
    """A ``{column: ...}`` block, also accepted as a bare column name."""
    if spec is None:
        return {}
    return {"column": spec} if isinstance(spec, str) else dict(spec)


# --------------------------------------------------------------------------------------------------
# Mapping frames onto the contract (pure functions of frames and the mapping, plus the report)
# --------------------------------------------------------------------------------------------------


def _sample(values: pl.Series, n: int = 5) -> str:
    """Up to ``n`` distinct values of ``values``, for an error message."""
    return repr(values.unique(maintain_order=True).head(n).to_list())


def check_signal_columns(
    frame: pl.DataFrame, flags: Mapping[str, str], ids: Mapping[str, str], what: str
) -> None:
    """ConvcgError unless every flag column is Boolean or 0/1 (nulls allowed: they count as false)
    and every id column holds integers; the message names each column with a sample of bad values.

    Args:
        frame: a source table as read (``read_table``).
        flags, ids: column -> what it was mapped as (e.g. ``a 0/1 clicked flag (impressions.clicked)``);
            columns absent from ``frame`` are skipped (optional signals).
        what: the table, for the message (e.g. ``the impressions log``).
    """
    problems = []
    for column, meaning in flags.items():
        if column not in frame.columns or frame[column].dtype == pl.Boolean:
            continue
        values = frame[column].drop_nulls()
        bad = values if not values.dtype.is_numeric() else values.filter(~values.is_in([0, 1]))
        if len(bad):
            problems.append(
                f"column '{column}' ({meaning}) must be Boolean or 0/1, but {len(bad):,} of "
                f"{frame.height:,} rows hold other values, e.g. {_sample(bad)}"
            )
    for column, meaning in ids.items():
        if column in frame.columns and not frame[column].dtype.is_integer():
            problems.append(
                f"column '{column}' ({meaning}) must hold integers, but it is {frame[column].dtype}, "
                f"e.g. {_sample(frame[column].drop_nulls())}; map the ids to integers before importing"
            )
    if problems:
        raise ConvcgError(
            f"{what[0].upper()}{what[1:]} breaks the importer's signal rules: {'; '.join(problems)}. "
            "Fix the source columns or the importer mapping."
        )


def _any_true(columns: Sequence[str]) -> pl.Expr:
    """OR of 0/1 or Boolean columns; nulls count as false."""
    if not columns:
        return pl.lit(False)
    return pl.any_horizontal([pl.col(c).cast(pl.Boolean).fill_null(False) for c in columns])


def _unix_seconds(column: str, unit: str | None, dtype: pl.DataType) -> pl.Expr:
    if dtype.is_temporal():
        return pl.col(column).dt.epoch("s")
    if unit not in _TIME_UNITS:
        raise ConfigError(f"impressions.timestamp.unit must be one of {list(_TIME_UNITS)}, got {unit!r}.")
    return pl.col(column).cast(pl.Int64) // _TIME_UNITS[unit]


def map_surface(values: pl.Series, spec: Mapping[str, Any]) -> tuple[pl.Series, list[dict[str, Any]]]:
    """Source surface values -> contract surface names, and a per-value summary of the mapping.

    Values are matched as text, so ``{1: home_feed}`` maps an integer 1 and a string "1" alike.
    """
    table = {str(k): v for k, v in (spec.get("values") or {}).items()}
    text = values.cast(pl.String)
    surface = text.replace_strict(table, default=spec.get("default"), return_dtype=pl.String)
    summary = (
        pl.DataFrame({"value": values, "surface": surface})
        .group_by("value", "surface")
        .len("rows")
        .sort("rows", "value", descending=[True, False])
    )
    return surface.alias("surface"), summary.to_dicts()


def map_impressions(frame: pl.DataFrame, spec: Mapping[str, Any], report: ImportReport) -> pl.DataFrame:
    """The impressions table of the contract from a source log already read with the needed columns.

    Rows get deterministic ``impression_id`` s in time order (ties keep the source order).
    One function on purpose (~120 lines): each signal's mapping (surface, clicks, conversions
    without a click, saves, dwell, duplicates) reads and adjusts the same frame in a fixed order
    and reports into the same ``ImportReport``; split up, the order would hide in the call sites.
    """
    allowed_surfaces = load_schemas()["impressions"].column("surface").allowed or ()
    n = frame.height
    ts = _block(spec["timestamp"])
    clicked_src = _any_true(_columns(spec["clicked"]))
    converted = _any_true(_columns(spec["converted"]))
    policy = spec.get("conversion_without_click", "count_as_click")
    if policy not in _CONVERSION_WITHOUT_CLICK:
        raise ConfigError(
            f"impressions.conversion_without_click must be one of {list(_CONVERSION_WITHOUT_CLICK)}, "
            f"got {policy!r}."
        )
    unclicked = int(frame.select((converted & ~clicked_src).sum()).item())
    if policy == "count_as_click":
        clicked = clicked_src | converted
        report.adjustments["conversions_counted_as_clicks"] = unclicked
    else:
        clicked, converted = clicked_src, converted & clicked_src
        report.adjustments["conversions_dropped_without_click"] = unclicked
    if unclicked:
        action = "counted as clicks" if policy == "count_as_click" else "dropped"
        report.warnings.append(
            f"{unclicked:,} conversion(s) have no click in the source; {action} "
            f"(impressions.conversion_without_click: {policy}), as the contract needs converted => clicked."
        )

    saved_cols = [c for c in _columns(spec.get("saved")) if c in frame.columns]
    absent_saves = [c for c in _columns(spec.get("saved")) if c not in frame.columns]
    if not saved_cols:
        report.warnings.append("No save signal (impressions.saved): saved is false on every row.")
    elif absent_saves:
        report.warnings.append(
            f"Save column(s) {absent_saves} are absent from the impressions log; saved uses {saved_cols}."
        )

    dwell = _block(spec.get("dwell"))
    fill = float(dwell.get("missing_on_click", 0.0))
    if dwell.get("column") in frame.columns:
        unit = dwell.get("unit", "s")
        if unit not in _DWELL_UNITS:
            raise ConfigError(f"impressions.dwell.unit must be one of {list(_DWELL_UNITS)}, got {unit!r}.")
        seconds = pl.col(dwell["column"]).cast(pl.Float64) / _DWELL_UNITS[unit]
        # Negative or non-finite durations are logging errors: treat them as missing.
        seconds = pl.when(seconds.is_finite() & (seconds >= 0)).then(seconds)
        missing = int(frame.select((clicked & seconds.is_null()).sum()).item())
        if missing:
            report.adjustments["clicks_without_dwell"] = missing
            report.warnings.append(
                f"{missing:,} click(s) have no valid dwell in '{dwell['column']}'; set to {fill} s "
                f"(impressions.dwell.missing_on_click)."
            )
    else:
        seconds = pl.lit(None, dtype=pl.Float64)
        where = (
            f"column '{dwell['column']}' is absent from the impressions log"
            if dwell.get("column")
            else "no column is mapped"
        )
        report.disable(
            DWELL_WEIGHTED_POSITIVES,
            f"No dwell signal (impressions.dwell: {where}); dwell_seconds is {fill} on every click",
        )

    sf = _block(spec.get("surface"))
    default_surface = sf.get("default", "home_feed")
    bad = sorted({default_surface, *(sf.get("values") or {}).values()} - set(allowed_surfaces))
    if bad:
        raise ConfigError(
            f"impressions.surface maps to {bad}, which the contract does not allow; "
            f"use {', '.join(allowed_surfaces)}."
        )
    if sf.get("column") in frame.columns:
        report.surface_column = sf["column"]
        surface, report.surface_mapping = map_surface(frame[sf["column"]], {**sf, "default": default_surface})
    else:
        surface = pl.Series("surface", [default_surface] * n, dtype=pl.String)
        report.surface_mapping = [{"value": None, "surface": default_surface, "rows": n}]
        report.disable(
            SURFACE_CONTEXT, f"No surface signal (impressions.surface); every row is {default_surface}"
        )

    out = (
        frame.with_columns(surface)
        .with_row_index("_source_row")
        # Deterministic ids: time order, ties in source order.
        .sort(ts["column"], "_source_row")
        .select(
            _unix_seconds(ts["column"], ts.get("unit"), frame.schema[ts["column"]]).alias("timestamp"),
            pl.col(spec["user"]).cast(pl.Int64).alias("user_id"),
            pl.col(spec["item"]).cast(pl.Int64).alias("item_id"),
            pl.col("surface"),
            clicked.alias("clicked"),
            pl.when(clicked).then(seconds.fill_null(fill)).alias("dwell_seconds"),
            _any_true(saved_cols).alias("saved"),
            converted.alias("converted"),
        )
    )
    extra = out.height - out.n_unique()
    report.adjustments["duplicate_rows"] = extra
    if extra and spec.get("drop_duplicates", False):
        out = out.unique(maintain_order=True)
        report.warnings.append(f"{extra:,} impression(s) repeat another row exactly; dropped.")
    elif extra:
        report.warnings.append(
            f"{extra:,} impression(s) repeat another row exactly (same user, item, second and outcome); "
            f"kept (set impressions.drop_duplicates: true to drop them)."
        )
    out = out.with_row_index("impression_id").with_columns(pl.col("impression_id").cast(pl.Int64))
    if out.height and not out.select((~pl.col("clicked") & ~pl.col("saved")).any()).item():
        report.disable(
            IMPRESSION_HARD_NEGATIVES,
            "Every impression is engaged (no served-but-ignored rows: the log holds interactions only)",
        )
    return out


def _clean_sentinels(
    frame: pl.DataFrame, columns: Sequence[str], spec: Mapping[str, Any], table: str, report: ImportReport
) -> pl.DataFrame:
    """Null out sentinel values in ``columns``: listed strings, and negative numbers if asked."""
    null_values = [str(v) for v in spec.get("null_values") or []]
    negative = bool(spec.get("negative_is_null", False))
    exprs, checks = [], []
    for c in columns:
        dtype = frame.schema[c]
        if dtype == pl.String and null_values:
            sentinel = pl.col(c).is_in(null_values)
        elif dtype.is_numeric() and negative:
            sentinel = pl.col(c) < 0
        else:
            continue
        exprs.append(pl.when(sentinel).then(None).otherwise(pl.col(c)).alias(c))
        checks.append(sentinel.sum().alias(c))
    if not exprs:
        return frame
    for column, count in frame.select(checks).row(0, named=True).items():
        if count:
            report.adjustments[f"nulled_sentinels.{table}.{column}"] = int(count)
    return frame.with_columns(exprs)


def _contract_first(frame: pl.DataFrame, schema: TableSchema) -> pl.DataFrame:
    """Contract columns present in ``frame``, cast to the contract dtypes and in its order, then extras."""
    contract = [c for c in schema.columns if c.name in frame.columns]
    extras = [c for c in frame.columns if c not in schema.column_names]
    # Non-strict casts are safe here: validate_frames checks every value afterwards.
    return frame.select(*(pl.col(c.name).cast(c.polars_dtype, strict=False) for c in contract), *extras)


def advertiser_groups(values: pl.Series, spec: Mapping[str, Any]) -> pl.Series:
    """Advertiser-like group id per item: the first entry of a list-valued column, unknown -> a dedicated id.

    Integer groups keep their value; other values get dense codes above ``unknown_id`` (sorted).

    Raises:
        ConfigError: ``unknown_id`` is negative or is also a real group value.
    """
    unknown_id = int(spec.get("unknown_id", 0))
    if unknown_id < 0:
        raise ConfigError(
            f"items.advertiser.unknown_id must be >= 0 (the contract's minimum), got {unknown_id}."
        )
    sep = spec.get("list_separator")
    text = values.cast(pl.String).str.strip_chars()
    first = text.str.split(sep).list.first().str.strip_chars() if sep else text
    unknown = [str(v) for v in spec.get("unknown_values") or []] + [""]
    first = pl.select(pl.when(first.is_in(unknown)).then(None).otherwise(first)).to_series()
    as_int = first.cast(pl.Int64, strict=False)
    if as_int.null_count() == first.null_count() and (as_int.drop_nulls() >= 0).all():
        if (as_int == unknown_id).any():
            raise ConfigError(
                f"items.advertiser.unknown_id {unknown_id} is also a real value of "
                f"'{spec['column']}'; choose an id no group uses."
            )
        ids = as_int
    else:
        ids = first.rank("dense").cast(pl.Int64) + unknown_id
    return ids.fill_null(unknown_id).alias("advertiser_id")


def map_entities(
    frame: pl.DataFrame,
    spec: Mapping[str, Any],
    table: str,
    key: str,
    report: ImportReport,
) -> pl.DataFrame:
    """The items or users table: id, mapped contract columns, kept extras (sentinels -> null)."""
    id_col = spec[key]
    renames = {src: dst for dst, src in (spec.get("columns") or {}).items()}
    keep = [c for c in spec.get("keep") or [] if c not in renames]
    out = _clean_sentinels(frame, [*renames, *keep], spec, table, report)
    exprs = [pl.col(id_col).cast(pl.Int64).alias(f"{key}_id")]
    if table == "items":
        adv = _block(spec.get("advertiser"))
        if adv.get("column") in frame.columns:
            exprs.append(pl.lit(advertiser_groups(frame[adv["column"]], adv)))
        else:
            exprs.append(pl.lit(int(adv.get("unknown_id", 0)), dtype=pl.Int64).alias("advertiser_id"))
            report.disable(
                ADVERTISER_SOFTMAX,
                "No advertiser-like group (items.advertiser); every item is in one group",
            )
    exprs += [pl.col(src).alias(dst) for src, dst in renames.items()]
    exprs += [pl.col(c) for c in keep if c != id_col]
    return _contract_first(out.select(exprs), load_schemas()[table])


def join_user_history(users: pl.DataFrame, history: pl.DataFrame, spec: Mapping[str, Any]) -> pl.DataFrame:
    """Users plus the history columns (renamed per ``spec['columns']``); users without history get nulls."""
    renamed = history.select(
        pl.col(spec["user"]).cast(pl.Int64).alias("user_id"),
        *(pl.col(src).alias(dst) for dst, src in spec["columns"].items()),
    )
    return users.join(renamed, on="user_id", how="left", maintain_order="left")


# --------------------------------------------------------------------------------------------------
# The whole import
# --------------------------------------------------------------------------------------------------


_REQUIRED_KEYS = {
    "impressions": ("files", "user", "item", "timestamp", "clicked", "converted"),
    "items": ("file", "item"),
    "users": ("file", "user"),
    "user_history": ("file", "user", "columns"),
}
LOG_USER_ID = "_user_id"  # the log's integer user id, added before mapping (see user_keys)
_CATALOGUES = ("all", "logged")


def _check_keys(mapping: Mapping[str, Any]) -> None:
    """Raise ConfigError naming every required mapping key that is absent (``users`` and
    ``user_history`` are optional sections; their keys are required when they are given)."""
    missing = [
        f"{section}.{key}"
        for section, keys in _REQUIRED_KEYS.items()
        if section not in ("users", "user_history") or mapping.get(section)
        for key in keys
        if (mapping.get(section) or {}).get(key) is None
    ]
    if missing:
        raise ConfigError(
            f"The importer mapping for '{mapping.get('source', '?')}' lacks {', '.join(missing)} "
            f"(every key is described in conf/importer/kuairand.yaml)."
        )


def _signal_columns(imp: Mapping[str, Any]) -> tuple[dict[str, str], list[str]]:
    """Columns of the impressions log: required ones (with what they hold) and optional ones.

    The user key's columns are not listed: :func:`read_table` reads them as ``any_of``.
    """
    required = {
        imp["item"]: "the item id (impressions.item)",
        _block(imp["timestamp"])["column"]: "the serving time (impressions.timestamp)",
    }
    for signal in ("clicked", "converted"):
        if not _columns(imp.get(signal)):
            raise ConfigError(f"impressions.{signal} must name at least one source column.")
        required.update({c: f"a 0/1 {signal} flag (impressions.{signal})" for c in _columns(imp[signal])})
    optional = [
        *_columns(imp.get("saved")),
        *(c for c in (_block(imp.get("dwell")).get("column"), _block(imp.get("surface")).get("column")) if c),
    ]
    return required, optional


SIGNALS = ("clicked", "converted", "saved")  # flag columns of the impressions log, OR-ed per signal


def read_log(mapping: Mapping[str, Any], in_dir: Path, user: UserKeySpec) -> pl.DataFrame:
    """The impressions log as read (every file renamed, derived, times parsed, concatenated), checked."""
    imp = mapping["impressions"]
    required, optional = _signal_columns(imp)
    if not user.encoded:
        required = {user.column: "the user id (impressions.user)", **required}
    ts = _block(imp["timestamp"])
    time = TimeSpec(ts["column"], ts.get("format"), ts.get("time_zone"))
    files = source_files(imp["files"], mapping.get("csv"), "impressions.files")
    log = read_table(
        in_dir, files, required, optional, "the impressions log", time, user.columns if user.encoded else ()
    )
    flags = {c: f"a 0/1 {sig} flag (impressions.{sig})" for sig in SIGNALS for c in _columns(imp.get(sig))}
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
    adv = _block(spec.get("advertiser")).get("column")
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

    With an encoded user key (see :mod:`~convcg_cli.data.user_keys`) every logged user gets a row
    (``user_id``, ``user_key``) and the users table's attributes are joined onto it by key; users of
    the table that never appear in the log are dropped and counted.
    """
    if not mapping.get("users"):
        report.warnings.append(
            f"No users table (users): derived from the log ({logged.height:,} users, no attributes)."
        )
        return _contract_first(logged, load_schemas()["users"])
    spec = mapping["users"]
    frame = _read_entities(mapping, in_dir, "users", "user", user.encoded)
    if not user.encoded:
        return map_entities(frame, spec, "users", "user", report)
    frame, dropped = encode_known_users(frame, spec["user"], logged, user)
    report.adjustments["users_not_logged_dropped"] = dropped
    mapped = map_entities(frame, spec, "users", "user", report)
    return _contract_first(
        logged.join(mapped, on="user_id", how="left", maintain_order="left"), load_schemas()["users"]
    )


def map_tables(
    mapping: Mapping[str, Any], in_dir: str | Path, report: ImportReport
) -> dict[str, pl.DataFrame]:
    """Read the source files named by ``mapping`` and map them onto the contract (not validated)."""
    in_dir = Path(in_dir)
    _check_keys(mapping)
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
        events = _block(hist.get("events"))
        lists = dict(events.get("lists") or {})
        last_time = _block(events.get("last_time")).get("column")
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
    events = _block(spec.get("events"))
    time_spec = _block(events.get("last_time"))
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
