"""Encode a new or changed item table exactly as the training corpus was encoded (``convcg index``).

Training encodes the item table once (``features.build_item_table``): categorical columns become
dense codes over the table's sorted values, numeric ones are scaled with the table's mean and std,
and the performance features (and the co-engagement factors) come from the training window. An
:class:`ItemEncoding` keeps what that took (the vocabularies, the scalings, the derived features of
every trained item) so that another table can be encoded the same way:

- a **trained item** (its id was in the training corpus) keeps its id code and its derived features
  (performance, factors); its table columns are read from the new table, so a changed price or
  category is what the item tower sees. An unchanged item gets exactly its training features.
- an **unseen item** gets id code 0, a row of the item-id table training never reads (the served model
  sets it to the mean trained item-id embedding: the item tower's cold start), its table columns
  encoded with the training vocabularies and scalings (an unseen category value is code 0,
  "missing"), and derived features 0 (the corpus mean of the standardised performance features; no
  co-engagement).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from convcg_cli.data import features as F

ITEM_CODE = "item_id"  # the item tower's id feature (position + 1; 0 = unseen)
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
    """

    item_ids: np.ndarray
    derived: dict[str, np.ndarray]
    vocabularies: dict[str, np.ndarray]
    scalings: dict[str, tuple[float, float]]

    def to_arrays(self) -> dict[str, Any]:
        """Flat arrays for ``np.savez`` (see :meth:`from_arrays`)."""
        out: dict[str, Any] = {"item_ids": self.item_ids}
        out.update({f"derived/{k}": v for k, v in self.derived.items()})
        out.update({f"vocabulary/{k}": v for k, v in self.vocabularies.items()})
        out.update({f"scaling/{k}": np.asarray(v, dtype=np.float64) for k, v in self.scalings.items()})
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> ItemEncoding:
        """The encoding :meth:`to_arrays` flattened."""

        def group(prefix: str) -> dict[str, Any]:
            return {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith(f"{prefix}/")}

        scalings = {k: (float(v[0]), float(v[1])) for k, v in group("scaling").items()}
        return cls(arrays["item_ids"], group("derived"), group("vocabulary"), scalings)


def fit_item_encoding(items: pl.DataFrame, columns: F.FeatureColumns, table: F.ItemTable) -> ItemEncoding:
    """The encoding of the training item table ``items`` (as read) into ``table`` (its ItemTable)."""
    items = items.sort("item_id")
    categorical = (*ALWAYS_CATEGORICAL, *columns.categorical)
    vocabularies = {name: _sorted_values(items[name]) for name in categorical}
    scalings = {name: F.numeric_scaling(items[name]) for name in columns.numeric}
    derived = {k: v for k, v in table.features.items() if k not in vocabularies and k not in scalings}
    return ItemEncoding(np.asarray(table.item_ids), derived, vocabularies, scalings)


def _sorted_values(column: pl.Series) -> np.ndarray:
    """Distinct non-null values in ``dense_codes`` order; strings as a numpy unicode array (saved
    and loaded without pickle)."""
    values = column.drop_nulls().unique().sort().to_numpy()
    return values.astype(str) if values.dtype == object else values


def encode_items(encoding: ItemEncoding, items: pl.DataFrame) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``(item_ids, features)`` of a new item table (sorted by id), encoded as the training corpus
    was; see the module docstring for trained and unseen items."""
    items = items.sort("item_id")
    ids = items["item_id"].to_numpy().astype(np.int64)
    position = np.searchsorted(encoding.item_ids, ids)
    position = np.minimum(position, max(len(encoding.item_ids) - 1, 0))
    trained = (encoding.item_ids[position] == ids) if len(encoding.item_ids) else np.zeros(len(ids), bool)
    features: dict[str, np.ndarray] = {}
    for name, values in encoding.derived.items():
        column = np.zeros(len(ids), dtype=values.dtype)  # unseen: code 0 / the standardised mean
        column[trained] = values[position[trained]]
        features[name] = column
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
    return ids, features
