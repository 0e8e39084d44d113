"""Encode a new or changed item table exactly as the training corpus was encoded (``convcg index``).

Training encodes the item table once (``encodings.build_item_table``): categorical columns become
dense codes over the table's sorted values, numeric ones are scaled with the table's mean and std,
vector columns are read as they are, and the derived features (the id code, the performance
features and the co-engagement factors) come from the training window. An :class:`ItemEncoding`
keeps what that took (the vocabularies, the scalings, the training content vectors, the derived features of
every corpus item and of a never-shown one) so that another table can be encoded the same way:

- a **corpus item** (its id was in the training item table) keeps its derived features; its table
  columns are read from the new table, so a changed price, category or content vector is what the
  item tower sees. An unchanged item gets exactly its training features.
- an **unseen item** is encoded as a never-shown one (``encodings.encode_never_shown``, the function
  the evaluation corpus uses for its items without a training impression): the out-of-vocabulary id
  row (code 0), the performance features of 0 impressions, no co-engagement; its table columns are
  encoded with the training vocabularies and scalings (an unseen category value is code 0,
  "missing") and its content vectors are its own.

A bundle written before the never-shown row was kept (no ``never_shown/*`` arrays) encodes an unseen
item's derived features as 0, as it did then.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

import convcg_cli.data.features.encodings as F
from convcg_cli.errors import ConvcgError

ALWAYS_CATEGORICAL = ("advertiser_id",)  # encoded from the table whatever data.features says


@dataclass
class ItemEncoding:
    """The training corpus's item encoding.

    Attributes:
        item_ids: (N,) sorted training item ids (row i = item position i).
        derived: encoded features not read from the item table (``item_id``, performance, factors),
            row i for item position i.
        vocabularies: categorical table column -> its sorted distinct training values.
        scalings: numeric table column -> ``(mean, std)`` of its signed log1p (``F.numeric_scaling``).
        never_shown_row: derived feature -> its value for a never-shown item (``F.encode_never_shown``).
        vectors: vector table column -> (N, length) of the training corpus, row i for item position i
            (a request's subject item reads its training vector; a new table brings its own).
    """

    item_ids: np.ndarray
    derived: dict[str, np.ndarray]
    vocabularies: dict[str, np.ndarray]
    scalings: dict[str, tuple[float, float]]
    never_shown_row: dict[str, np.ndarray] = field(default_factory=dict)
    vectors: dict[str, np.ndarray] = field(default_factory=dict)

    def to_arrays(self) -> dict[str, Any]:
        """Flat arrays for ``np.savez`` (see :meth:`from_arrays`)."""
        out: dict[str, Any] = {"item_ids": self.item_ids}
        out.update({f"derived/{k}": v for k, v in self.derived.items()})
        out.update({f"vocabulary/{k}": v for k, v in self.vocabularies.items()})
        out.update({f"scaling/{k}": np.asarray(v, dtype=np.float64) for k, v in self.scalings.items()})
        out.update({f"never_shown/{k}": np.asarray(v) for k, v in self.never_shown_row.items()})
        out.update({f"vector/{k}": v for k, v in self.vectors.items()})
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> ItemEncoding:
        """The encoding :meth:`to_arrays` flattened."""

        def group(prefix: str) -> dict[str, Any]:
            return {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith(f"{prefix}/")}

        scalings = {k: (float(v[0]), float(v[1])) for k, v in group("scaling").items()}
        return cls(
            arrays["item_ids"],
            group("derived"),
            group("vocabulary"),
            scalings,
            group("never_shown"),
            group("vector"),
        )


def fit_item_encoding(items: pl.DataFrame, columns: F.FeatureColumns, table: F.ItemTable) -> ItemEncoding:
    """The encoding of the training item table ``items`` (as read) into ``table`` (its ItemTable)."""
    items = items.sort("item_id")
    categorical = (*ALWAYS_CATEGORICAL, *columns.categorical)
    vocabularies = {name: _sorted_values(items[name]) for name in categorical}
    scalings = {name: F.numeric_scaling(items[name]) for name in columns.numeric}
    derived = {name: table.features[name] for name in table.never_shown_row}
    vectors = {name: table.features[name] for name in columns.vector}
    return ItemEncoding(
        np.asarray(table.item_ids), derived, vocabularies, scalings, dict(table.never_shown_row), vectors
    )


def _sorted_values(column: pl.Series) -> np.ndarray:
    """Distinct non-null values in ``dense_codes`` order; strings as a numpy unicode array (saved
    and loaded without pickle)."""
    values = column.drop_nulls().unique().sort().to_numpy()
    return values.astype(str) if values.dtype == object else values


def encode_items(encoding: ItemEncoding, items: pl.DataFrame) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``(item_ids, features)`` of a new item table (sorted by id), encoded as the training corpus
    was; see the module docstring for corpus and unseen items."""
    items = items.sort("item_id")
    ids = items["item_id"].to_numpy().astype(np.int64)
    position = np.searchsorted(encoding.item_ids, ids)
    position = np.minimum(position, max(len(encoding.item_ids) - 1, 0))
    known = (encoding.item_ids[position] == ids) if len(encoding.item_ids) else np.zeros(len(ids), bool)
    features: dict[str, np.ndarray] = {}
    for name, values in encoding.derived.items():
        column = np.zeros((len(ids), *values.shape[1:]), dtype=values.dtype)
        column[known] = values[position[known]]
        features[name] = column
    row = encoding.never_shown_row or {
        name: np.zeros((), values.dtype) for name, values in encoding.derived.items()
    }
    features = F.encode_never_shown(features, ~known, row)
    for name, vocabulary in encoding.vocabularies.items():
        codes = pl.Series(np.arange(1, len(vocabulary) + 1, dtype=np.int64))
        features[name] = (
            items[name]
            .replace_strict(pl.Series(vocabulary), codes, default=0, return_dtype=pl.Int64)
            .fill_null(0)
            .to_numpy()
            .astype(np.int64)
        )
    for name, scaling in encoding.scalings.items():
        features[name] = F.apply_numeric_scaling(items[name], scaling)
    for name, corpus in encoding.vectors.items():
        features[name] = _vector_column(items, name, corpus.shape[1])
    return ids, features


def _vector_column(items: pl.DataFrame, name: str, length: int) -> np.ndarray:
    """(n, length) of the vector column ``name`` of a new item table (validated as at training), or a
    ConvcgError when it is missing or has another length than training's."""
    if name not in items.columns:
        raise ConvcgError(
            f"The item table has no vector column '{name}'; the model reads one of length {length}."
        )
    vectors = F.vector_feature(items, name, "items", "items.parquet")
    if vectors.shape[1] != length:
        raise ConvcgError(
            f"Column '{name}' of the item table holds vectors of length {vectors.shape[1]}; the model was "
            f"trained on length {length}."
        )
    return vectors
