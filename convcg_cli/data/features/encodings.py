"""From validated log tables to model inputs: feature building, training examples (the time split,
``time_split``, is re-exported here).

Pure functions over polars frames and numpy arrays, vectorised (no per-row Python). Everything that
looks at impressions for a *feature* (item performance, logQ frequencies, popularity) reads the
training window only, so nothing is computed from validation or held-out days.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from convcg_cli.data.contract import VECTOR, ColumnSchema, conform_vector
from convcg_cli.data.features.query_encoder import CONTEXT_FEATURES, QueryEncoder
from convcg_cli.data.features.time_split import (  # noqa: F401  (the split's names, as encodings.*)
    IMPRESSIONS_FILE,
    SECONDS_PER_DAY,
    SplitError,
    TimeSplit,
    check_end_offset_days,
    check_split_rows,
    daily_counts,
    in_days,
    split_by_time,
    split_days,
    split_frame,
    split_rule,
    window_sum,
)
from convcg_cli.errors import ConvcgError, DataValidationError
from convcg_cli.specs import FeatureSpec
from convcg_cli.tasks import CONVERSION, TASK_LABELS, engaged


def dense_codes(column: pl.Series) -> np.ndarray:
    """Categorical values (ints or strings) -> 1..n in sorted order; null -> 0 ('missing')."""
    return column.rank("dense").fill_null(0).to_numpy().astype(np.int64)


def scaled_numeric(column: pl.Series) -> np.ndarray:
    """Signed log1p, then standardised; nulls become 0 (the mean). Heavy-tailed counts and prices
    become roughly unit-scale inputs."""
    return apply_numeric_scaling(column, numeric_scaling(column))


def _signed_log1p(column: pl.Series) -> np.ndarray:
    x = column.cast(pl.Float64).to_numpy()
    return np.sign(x) * np.log1p(np.abs(x))


def numeric_scaling(column: pl.Series) -> tuple[float, float]:
    """``(mean, std)`` of the signed log1p of ``column``'s values (std 1 when constant or empty): what
    :func:`scaled_numeric` standardises with, kept to scale other rows (new items) the same way."""
    x = _signed_log1p(column)
    ok = ~np.isnan(x)
    mean, std = (x[ok].mean(), x[ok].std()) if ok.any() else (0.0, 1.0)
    return float(mean), float(std if std > 0 else 1.0)


def apply_numeric_scaling(column: pl.Series, scaling: tuple[float, float]) -> np.ndarray:
    """Signed log1p of ``column`` standardised with ``scaling`` (from :func:`numeric_scaling`), float32;
    nulls become 0 (the mean)."""
    x = _signed_log1p(column)
    mean, std = scaling
    return np.where(~np.isnan(x), (x - mean) / std, 0.0).astype(np.float32)


@dataclass(frozen=True)
class FeatureColumns:
    """Columns of a table used as features: categorical ones get an embedding, numeric ones are scaled,
    vector ones (fixed-length float vectors, e.g. content embeddings) are read as they are."""

    categorical: tuple[str, ...] = ()
    numeric: tuple[str, ...] = ()
    vector: tuple[str, ...] = ()


def vector_feature(frame: pl.DataFrame, name: str, table: str, file: str) -> np.ndarray:
    """(n, length) float32 of a vector column, null rows as zeros; a DataValidationError when a row has
    another length or a NaN / infinite value (the contract's checks, also for undeclared columns)."""
    column = ColumnSchema(name, VECTOR, nullable=True)
    vectors, violations = conform_vector(table, file, column, frame[name])
    if violations or vectors is None:
        raise DataValidationError(violations)
    if not isinstance(vectors.dtype, pl.Array):  # no row has a vector: nothing to read
        raise ConvcgError(f"Column '{name}' of {file} has no vector; a vector feature needs at least one.")
    dense = vectors.to_numpy().astype(np.float32)  # (n, length); null rows are NaN
    return np.nan_to_num(dense, nan=0.0)


def table_features(frame: pl.DataFrame, columns: FeatureColumns, file: str) -> dict[str, np.ndarray]:
    """Encode the configured feature columns of one table (rows in frame order): categorical and
    numeric ones as (n,) codes / scaled values, vector ones as (n, length) float32."""
    out: dict[str, np.ndarray] = {}
    for name in (*columns.categorical, *columns.numeric, *columns.vector):
        if name not in frame.columns or frame[name].null_count() == frame.height:
            raise ConvcgError(
                f"The data config names '{name}' as a feature, but {file} has no values in a column "
                f"'{name}' ({frame.height} rows; columns: {', '.join(frame.columns)}). Fix data.features "
                f"or the table."
            )
        if name in columns.categorical:
            out[name] = dense_codes(frame[name])
        elif name in columns.vector:
            out[name] = vector_feature(frame, name, file.removesuffix(".parquet"), file)
        else:
            if not frame[name].dtype.is_numeric():
                raise ConvcgError(
                    f"Column '{name}' of {file} is {frame[name].dtype}; a numeric feature must be a number. "
                    f"List it under categorical instead."
                )
            out[name] = scaled_numeric(frame[name])
    return out


def positions(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Row position of each id in ``sorted_ids`` (ids are known to exist: the contract checked it)."""
    return np.searchsorted(sorted_ids, ids).astype(np.int64)


def item_performance(items: pl.DataFrame, train: pl.DataFrame | pl.LazyFrame) -> pl.DataFrame:
    """Per-item impressions, clicks and conversions in the training window, with smoothed rates.

    Rates are shrunk towards the global rate (Beta prior worth ``prior`` impressions/clicks) so that
    an item with 1 impression and 1 click does not look like the best item in the corpus. ``train``
    may be a lazy scan (data.stream): then only per-item counts are ever held in memory.
    """
    lazy = train.lazy()
    counts = (
        lazy.group_by("item_id")
        .agg(
            pl.len().alias("impressions"),
            pl.col("clicked").sum().alias("clicks"),
            pl.col("converted").sum().alias("conversions"),
        )
        .collect(engine="streaming")
    )
    n, clicks, conversions = (
        lazy.select(pl.len(), pl.col("clicked").sum(), pl.col("converted").sum())
        .collect(engine="streaming")
        .row(0)
    )
    ctr0, cvr0 = global_rates(n, clicks, conversions)
    return (
        items.select("item_id")
        .join(counts, on="item_id", how="left", maintain_order="left")
        .fill_null(0)
        .with_columns(smoothed_rates(ctr0, cvr0))
    )


def global_rates(impressions: int, clicks: int, conversions: int) -> tuple[float, float]:
    """The training window's click-through and post-click conversion rates (0 without rows)."""
    return float(clicks) / max(float(impressions), 1.0), float(conversions) / max(float(clicks), 1.0)


def smoothed_rates(ctr0: float, cvr0: float, prior: float = 20.0) -> list[pl.Expr]:
    """``ctr`` and ``cvr`` of per-item counts, shrunk towards the global rates ``ctr0`` / ``cvr0`` by a
    Beta prior worth ``prior`` impressions / clicks."""
    return [
        ((pl.col("clicks") + prior * ctr0) / (pl.col("impressions") + prior)).alias("ctr"),
        ((pl.col("conversions") + prior * cvr0) / (pl.col("clicks") + prior)).alias("cvr"),
    ]


NEVER_SHOWN_CODE = 0  # the item-id code of an item never shown in training: the out-of-vocabulary row


@dataclass
class ItemTable:
    """The whole item corpus as model inputs; row i is item ``item_ids[i]`` (sorted ids).

    ``never_shown_row``: derived feature (not read from the item table: the id code, the training-window
    performance, the co-engagement factors) -> its value for an item never shown in training (see
    :func:`encode_never_shown`). ``never_shown``: (N,) true for the corpus items encoded so (None until
    ``mark_never_shown``).
    """

    item_ids: np.ndarray
    features: dict[str, np.ndarray]
    spec: FeatureSpec
    performance: pl.DataFrame  # training-window counts, for baselines and reports
    never_shown_row: dict[str, np.ndarray] = field(default_factory=dict)
    never_shown: np.ndarray | None = None


def encode_never_shown(
    features: Mapping[str, np.ndarray], never_shown: np.ndarray, row: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """``features`` with the derived features (the keys of ``row``) of the items where ``never_shown``
    is true set to ``row``: the one encoding of an item the model never saw in training.

    Such an item reads the out-of-vocabulary id row (``NEVER_SHOWN_CODE``), the performance features of
    0 impressions and no co-engagement, because that is the truth about it; its table columns (category,
    price, content vectors) stay its own. The evaluation corpus (``mark_never_shown``) and serving
    (``item_encoding.encode_items``, for ids training never had) both encode through here.

    Example:
        >>> out = encode_never_shown(
        ...     {"item_id": np.array([1, 2]), "price": np.array([0.5, 0.7], np.float32)},
        ...     np.array([False, True]), {"item_id": np.array(0)})
        >>> out["item_id"].tolist(), out["price"].tolist() == [np.float32(0.5), np.float32(0.7)]
        ([1, 0], True)
    """
    out = dict(features)
    if not never_shown.any():
        return out
    for name, value in row.items():
        column = np.array(out[name], copy=True)
        column[never_shown] = value
        out[name] = column
    return out


def never_shown_row(perf: pl.DataFrame) -> dict[str, np.ndarray]:
    """The derived features of an item with no training-window impression: the out-of-vocabulary id
    code and the performance features of 0 impressions, scaled as the corpus's ``perf`` columns
    (``item_performance``) are."""
    # The rates item_performance shrinks towards (every impression is of a corpus item).
    ctr0, cvr0 = global_rates(*(int(perf[c].sum()) for c in ("impressions", "clicks", "conversions")))
    zero = pl.DataFrame({"impressions": [0], "clicks": [0], "conversions": [0]}).with_columns(
        smoothed_rates(ctr0, cvr0)
    )
    row = {"item_id": np.array(NEVER_SHOWN_CODE, dtype=np.int64)}
    for name, column in PERFORMANCE_FEATURES.items():
        row[name] = apply_numeric_scaling(zero[column], numeric_scaling(perf[column]))[0]
    return row


PERFORMANCE_FEATURES = {"perf_log_impressions": "impressions", "perf_ctr": "ctr", "perf_cvr": "cvr"}


def build_item_table(
    items: pl.DataFrame, train: pl.DataFrame | pl.LazyFrame, columns: FeatureColumns
) -> ItemTable:
    """Item ID, advertiser, the configured item columns, and training-window performance features.

    Every item keeps its own id code here; ``mark_never_shown`` then encodes the items never shown in
    training as such (once the rest of the derived features, e.g. the co-engagement factors, are in).
    """
    items = items.sort("item_id")
    perf = item_performance(items, train)
    n = items.height
    features = {
        "item_id": np.arange(1, n + 1, dtype=np.int64),
        "advertiser_id": dense_codes(items["advertiser_id"]),
        **table_features(items, columns, "items.parquet"),
        **{name: scaled_numeric(perf[column]) for name, column in PERFORMANCE_FEATURES.items()},
    }
    row = never_shown_row(perf)
    return ItemTable(items["item_id"].to_numpy(), features, spec_of(features), perf, row)


def mark_never_shown(items: ItemTable, never_shown: np.ndarray) -> ItemTable:
    """``items`` with the items where ``never_shown`` is true encoded by :func:`encode_never_shown`.

    The spec is kept: the id table still has a row per corpus item (an item shown later, e.g. after
    ``convcg index``, is the same model), so its size does not depend on which items were shown.
    """
    features = encode_never_shown(items.features, never_shown, items.never_shown_row)
    return ItemTable(
        items.item_ids, features, items.spec, items.performance, items.never_shown_row, never_shown
    )


def spec_of(features: dict[str, np.ndarray]) -> FeatureSpec:
    """Feature spec of encoded columns: int64 columns are categorical (cardinality = max code + 1),
    1-D float32 ones numeric, 2-D float32 ones vectors (length = columns)."""
    categorical = {k: int(v.max(initial=0)) + 1 for k, v in features.items() if v.dtype == np.int64}
    return FeatureSpec(
        categorical=categorical, numeric=numeric_names(features), vectors=vector_lengths(features)
    )


def numeric_names(features: Mapping[str, np.ndarray]) -> tuple[str, ...]:
    """Sorted names of the numeric features: 1-D float32 columns."""
    return tuple(sorted(k for k, v in features.items() if v.dtype == np.float32 and v.ndim == 1))


def vector_lengths(features: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Name -> length of the vector features: 2-D float32 columns."""
    return {k: int(v.shape[1]) for k, v in sorted(features.items()) if v.dtype == np.float32 and v.ndim == 2}


@dataclass
class UserTable:
    """Static user attributes indexed by user position (sorted ids)."""

    user_ids: np.ndarray
    features: dict[str, np.ndarray]


def build_user_table(users: pl.DataFrame, columns: FeatureColumns) -> UserTable:
    """User ID and the configured user attribute columns (static attributes, no log statistics)."""
    users = users.sort("user_id")
    features = {
        "user_id": np.arange(1, users.height + 1, dtype=np.int64),
        **table_features(users, columns, "users.parquet"),
    }
    return UserTable(users["user_id"].to_numpy(), features)


@dataclass
class QueryFeatures:
    """Query-tower inputs for a set of impressions: the user, the surface and its context."""

    features: dict[str, np.ndarray]
    spec: FeatureSpec


@dataclass(frozen=True)
class QueryInputs:
    """What the query tower's features are built from, shared by the train, val and held-out rows."""

    users: UserTable
    items: ItemTable
    surfaces: list[str]
    query_hash_buckets: int
    context: tuple[str, ...] = CONTEXT_FEATURES
    events: pl.DataFrame | None = None  # engagement events, for the user history
    history_max_len: int = 0


def build_query_features(rows: pl.DataFrame, inputs: QueryInputs) -> QueryFeatures:
    """Per impression: user attributes plus the request context named in ``context``: the surface,
    the subject item (related items) and the query bucket (search). One model serves every surface;
    these features let it behave differently on each. With ``history_max_len > 0`` the user's last
    engaged items strictly before the request (from ``events``, see ``history.engagement_events``)
    are added as the sequence feature ``history`` / ``history_actions``. The rows are encoded by
    :class:`~convcg_cli.data.features.query_encoder.QueryEncoder`, as a served model's requests are."""
    users, items = inputs.users, inputs.items
    feats = QueryEncoder(inputs).encode(rows)
    # Cardinalities come from the tables, not from the rows at hand, so every split shares one spec.
    categorical = {k: int(v.max(initial=0)) + 1 for k, v in users.features.items() if v.dtype == np.int64}
    context = {
        "surface": len(inputs.surfaces) + 1,
        "subject_item_id": len(items.item_ids) + 1,
        "query_bucket": inputs.query_hash_buckets + 1,
    }
    categorical.update((name, context[name]) for name in CONTEXT_FEATURES if name in inputs.context)
    sequences = {"history": len(items.item_ids) + 1} if inputs.history_max_len > 0 else {}
    spec = FeatureSpec(categorical, numeric_names(feats), sequences, vector_lengths(feats))
    return QueryFeatures(feats, spec)


def task_labels(rows: pl.DataFrame, tasks: list[str]) -> dict[str, np.ndarray]:
    """Boolean positive label of each task for each row (see ``convcg_cli.tasks.TASK_LABELS``)."""
    return {t: rows.select(TASK_LABELS[t].alias(t))[t].to_numpy().astype(bool) for t in tasks}


def engaged_rows(rows: pl.DataFrame, tasks: list[str]) -> pl.DataFrame:
    """Rows positive for at least one task: the training examples and the evaluation queries."""
    return rows.filter(engaged(tasks))


@dataclass
class QuerySet:
    """Evaluation queries (one per engaged impression) and each task's positive (query, item) pairs.

    ``positive_values``: task -> (P,) value of each of its positives (aligned with ``positives``),
    NaN when unknown; only the conversion task, and only when the rows carry ``conversion_value``.
    ``new_items``: (N,) per item position, true for an item with no impression in the training window
    (a cold item: the model never trained on it); None when not known.
    """

    features: dict[str, np.ndarray]
    positives: dict[str, tuple[np.ndarray, np.ndarray]]  # task -> (query index, item position)
    surface: np.ndarray  # surface name per query, for per-surface recall
    days: tuple[int, int] = field(default=(0, 0))
    positive_values: dict[str, np.ndarray] = field(default_factory=dict)
    new_items: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.surface)


def build_query_set(
    rows: pl.DataFrame, inputs: QueryInputs, tasks: list[str], days: tuple[int, int]
) -> QuerySet:
    """Queries and positives of one evaluation split; each held-out positive is counted once."""
    rows = engaged_rows(rows, tasks)
    q = build_query_features(rows, inputs)
    item_pos = positions(inputs.items.item_ids, rows["item_id"].to_numpy())
    labels = task_labels(rows, tasks)
    positives = {t: (np.flatnonzero(m), item_pos[m]) for t, m in labels.items()}
    values = {}
    if (
        CONVERSION in labels
        and "conversion_value" in rows.columns
        and rows["conversion_value"].null_count() < rows.height
    ):
        value = rows["conversion_value"].cast(pl.Float64).fill_null(float("nan")).to_numpy()
        values[CONVERSION] = value[labels[CONVERSION]]
    new_items = inputs.items.never_shown
    if new_items is None:
        new_items = inputs.items.performance["impressions"].to_numpy() == 0
    return QuerySet(q.features, positives, rows["surface"].to_numpy(), days, values, new_items)


def item_log_frequency(item_pos: np.ndarray, n_items: int) -> np.ndarray:
    """log of each item's share of the training examples: the in-batch sampling probability for logQ."""
    return log_frequency_from_counts(np.bincount(item_pos, minlength=n_items))


def log_frequency_from_counts(counts: np.ndarray) -> np.ndarray:
    """``item_log_frequency`` from per-item example counts (add-one smoothed)."""
    counts = counts.astype(np.float64) + 1.0
    return np.log(counts / counts.sum()).astype(np.float32)


def popularity_scores(items: ItemTable, extra_conversions: np.ndarray | None = None) -> np.ndarray:
    """Most-popular baseline score: training-window conversions, ties broken by clicks then impressions.

    ``extra_conversions`` (N,) are added to the conversion counts (e.g. the user history's conversions
    before the cut-off). Encoded as one float per item whose order is the lexicographic order of the
    three counts.
    """
    perf = items.performance
    conversions = perf["conversions"].to_numpy().astype(np.int64)
    if extra_conversions is not None:
        conversions = conversions + np.asarray(extra_conversions, dtype=np.int64)
    order = np.lexsort((perf["impressions"].to_numpy(), perf["clicks"].to_numpy(), conversions))
    keys = np.stack([conversions, perf["clicks"].to_numpy(), perf["impressions"].to_numpy()], axis=1)[order]
    # Equal count triples get equal scores, so ties stay ties (and break by item index downstream).
    new_group = np.concatenate([[True], np.any(keys[1:] != keys[:-1], axis=1)])
    scores = np.empty(len(order), dtype=np.float32)
    scores[order] = np.cumsum(new_group).astype(np.float32)
    return scores
