"""What a served model holds, as plain files: the query tower, the corpus and the request encodings.

A :class:`ServingBundle` is written into a directory (the MLflow model's ``bundle`` artifact) and read
back by the pyfunc model, ``convcg retrieve`` and ``convcg index``; every file is data (numpy arrays,
JSON, YAML, parquet, a tensor state dict read with ``weights_only=True``), never pickled code:

    config.yaml        the run's resolved training config (rebuilds the towers)
    query_tower.pt     the query (user) tower's state dict
    item_tower.pt      the item tower's state dict (``convcg index`` embeds new items with it)
    meta.json          feature specs, surfaces, context, hash buckets, history length, index options,
                       the request limits (``serve.max_k``, ``serve.max_rows``; a bundle written
                       before they existed gets ``DEFAULT_LIMITS``), the popularity blend
                       (``blend``: weights and the fallback per item group, see :mod:`convcg_cli.blend`)
    users.npz          sorted user ids and their encoded attributes, row i = user position i
    items.npz          sorted corpus item ids and their served embeddings, row i = item position i,
                       and the popularity blend's per-item bias (``item_bias``, when the run chose one)
    item_encoding.npz  how the training item table was encoded (``convcg index`` encodes new items
                       the same way) and the training corpus's ids (subject items, history)
    events.parquet     engagement events for the user history (only when ``data.history.max_len > 0``)

Unknown ids never fail a request (the documented fallback, see the README's "Serve" section):

- an unknown ``user_id`` is a *cold-start* user: its ``user_id`` code is 0, a row training never
  reads, which the bundle sets to the mean of the trained users' id embeddings; its attributes are
  missing (categorical code 0, numeric 0 = the mean) and its history is empty;
- an item id unknown to training (``convcg index``) is encoded as a never-shown item
  (``features.encode_never_shown``: the item tower's out-of-vocabulary id row, 0 impressions), as
  evaluation encodes a corpus item without a training-window impression;
- an unknown ``subject_item_id`` (one not in the training corpus) counts as no subject item (code 0,
  as on the home feed);
- a ``query_id`` needs no vocabulary (it is hashed into ``data.query_hash_buckets``).

A malformed request (a missing column, a wrong type, an unknown surface, ``k < 1``) or one over the
limits (``k`` above ``max_k``, more rows than ``max_rows``) is a :class:`RequestError` naming what was
expected.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from omegaconf import DictConfig, OmegaConf

from convcg_cli.data.features import ItemEncoding
from convcg_cli.data.features import encodings as F
from convcg_cli.errors import ConvcgError
from convcg_cli.specs import FeatureSpec

CONFIG_FILE = "config.yaml"
QUERY_TOWER_FILE = "query_tower.pt"
ITEM_TOWER_FILE = "item_tower.pt"
META_FILE = "meta.json"
USERS_FILE = "users.npz"
ITEMS_FILE = "items.npz"
ITEM_ENCODING_FILE = "item_encoding.npz"
EVENTS_FILE = "events.parquet"

# The request table: required columns, then optional ones (absent or null = not given).
REQUIRED_COLUMNS = {"user_id": pl.Int64, "surface": pl.String}
OPTIONAL_COLUMNS = {"subject_item_id": pl.Int64, "query_id": pl.Int64, "timestamp": pl.Int64}
# Without a timestamp a request sees the user's whole history (every stored event is before it).
LATEST = np.iinfo(np.int64).max
# The cold-start user's id: sorts before every real id, so it is user position 0 of the served table.
COLD_START_USER_ID = np.iinfo(np.int64).min
# The candidate table: one row per (request, rank).
CANDIDATE_COLUMNS = ("request", "rank", "item_id", "score")
# What one request may ask for (conf/train.yaml's serve.max_k, serve.max_rows): k candidates per
# row, rows per call. A call's answer is at most max_rows * max_k candidate rows.
DEFAULT_LIMITS = {"max_k": 1000, "max_rows": 10_000}


class RequestError(ConvcgError):
    """A request table the model cannot read (a missing column, a wrong type, an unknown surface)."""


def spec_to_dict(spec: FeatureSpec) -> dict[str, Any]:
    """A FeatureSpec as JSON-ready data (see :func:`spec_from_dict`)."""
    data: dict[str, Any] = {
        "categorical": spec.categorical,
        "numeric": list(spec.numeric),
        "sequences": spec.sequences,
    }
    if spec.vectors:  # only then, so bundles without vectors are written as before
        data["vectors"] = spec.vectors
    return data


def spec_from_dict(data: Mapping[str, Any]) -> FeatureSpec:
    """The FeatureSpec :func:`spec_to_dict` wrote."""
    return FeatureSpec(
        data["categorical"], tuple(data["numeric"]), data.get("sequences", {}), data.get("vectors", {})
    )


def request_rows(requests: Any) -> pl.DataFrame:
    """The request table (pandas or polars) checked and normalised: every column of
    ``REQUIRED_COLUMNS`` and ``OPTIONAL_COLUMNS`` with its dtype, absent optional ones as nulls.

    Raises:
        RequestError: a required column is missing or a column has values of another type.
    """
    frame = requests if isinstance(requests, pl.DataFrame) else _from_pandas(requests)
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise RequestError(
            f"The requests lack column(s) {missing}; expected {list(REQUIRED_COLUMNS)} and optionally "
            f"{list(OPTIONAL_COLUMNS)}, got {frame.columns}."
        )
    columns: list[pl.Expr | pl.Series] = []
    for name, dtype in {**REQUIRED_COLUMNS, **OPTIONAL_COLUMNS}.items():
        if name not in frame.columns:
            columns.append(pl.lit(None, dtype=dtype).alias(name))
            continue
        column = frame[name]
        if column.dtype != dtype and not _casts_cleanly(column, dtype):
            raise RequestError(
                f"Request column '{name}' must hold {_kind(dtype)}, got {column.dtype} "
                f"(e.g. {column.drop_nulls().head(1).to_list()})."
            )
        columns.append(column.cast(dtype).alias(name))
    rows = frame.select(columns)
    if rows["user_id"].null_count() or rows["surface"].null_count():
        raise RequestError("Request columns 'user_id' and 'surface' must be given on every row.")
    return rows


def _from_pandas(frame: Any) -> pl.DataFrame:
    """A pandas request table as polars; a float column holding whole numbers and NaN (pandas' way of
    writing a nullable integer) becomes Int64 with nulls."""
    try:
        rows = pl.from_pandas(frame)
    except (TypeError, ValueError, AttributeError) as exc:
        raise RequestError(f"The requests must be a table (pandas or polars DataFrame): {exc}") from None
    return rows.with_columns(pl.col(pl.Float32, pl.Float64).fill_nan(None))


def _casts_cleanly(column: pl.Series, dtype: Any) -> bool:
    """Whether ``column`` becomes ``dtype`` without changing a value (whole floats -> Int64)."""
    if dtype == pl.String or not column.dtype.is_numeric():
        return False
    cast = column.cast(dtype, strict=False)
    return cast.null_count() == column.null_count() and bool((cast.cast(pl.Float64) == column).all())


def _kind(dtype: Any) -> str:
    return "strings" if dtype == pl.String else "integers"


@dataclass
class ServingBundle:
    """Everything a served model needs besides torch: see the module docstring for the files.

    Attributes:
        config: the run's resolved training config.
        query_tower_state, item_tower_state: the towers' state dicts (tensors).
        user_spec, item_spec: the towers' feature specs.
        users: the user table (sorted ids, encoded attributes).
        item_ids: (N,) sorted corpus item ids; item_emb: (N, E) their served embeddings.
        surfaces, query_hash_buckets, context, history_max_len: how requests are encoded.
        events: engagement events for the history (None when the history is off).
        index: the index options, e.g. ``{"kind": "exact"}`` or ``{"kind": "ivf", "nlist": 1024,
            "nprobe": 16}``.
        item_encoding: the training item table's encoding; its ``item_ids`` (the training corpus)
            encode subject items and the history, whatever corpus ``item_ids`` indexes.
        limits: ``{"max_k": .., "max_rows": ..}``, what one request may ask for.
        blend: the popularity blend chosen on validation (:meth:`convcg_cli.blend.Blend.meta`), or
            None (the two-tower score alone); item_bias: (N,) its per-item term, added to every score
            (one more coordinate of the index's vectors, a constant 1 on the query side).
    """

    config: DictConfig
    query_tower_state: dict[str, Any]
    item_tower_state: dict[str, Any]
    user_spec: FeatureSpec
    item_spec: FeatureSpec
    users: F.UserTable
    item_ids: np.ndarray
    item_emb: np.ndarray
    surfaces: list[str]
    query_hash_buckets: int
    context: tuple[str, ...]
    history_max_len: int
    events: pl.DataFrame | None
    index: dict[str, Any]
    item_encoding: ItemEncoding
    limits: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_LIMITS))
    blend: dict[str, Any] | None = None
    item_bias: np.ndarray | None = None

    def index_vectors(self) -> np.ndarray:
        """The item vectors the index holds: the embeddings, with the blend's bias appended."""
        item_emb = np.asarray(self.item_emb, dtype=np.float32)
        if self.item_bias is None:
            return item_emb
        return np.hstack([item_emb, np.asarray(self.item_bias, np.float32).reshape(-1, 1)])

    def served_queries(self, query_emb: np.ndarray) -> np.ndarray:
        """Query embeddings as the index reads them (a constant 1 appended under a blend)."""
        if self.item_bias is None:
            return query_emb
        query_emb = np.asarray(query_emb, dtype=np.float32)
        return np.hstack([query_emb, np.ones((len(query_emb), 1), np.float32)])

    def write(self, directory: Path) -> Path:
        """Write the bundle's files into ``directory`` (created) and return it."""
        import torch

        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_FILE).write_text(OmegaConf.to_yaml(self.config, resolve=True))
        torch.save(self.query_tower_state, directory / QUERY_TOWER_FILE)
        torch.save(self.item_tower_state, directory / ITEM_TOWER_FILE)
        meta = {
            "user_spec": spec_to_dict(self.user_spec),
            "item_spec": spec_to_dict(self.item_spec),
            "user_features": sorted(self.users.features),
            "surfaces": self.surfaces,
            "query_hash_buckets": self.query_hash_buckets,
            "context": list(self.context),
            "history_max_len": self.history_max_len,
            "index": self.index,
            "limits": self.limits,
            **({"blend": self.blend} if self.blend is not None else {}),
        }
        (directory / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        users: dict[str, Any] = {"user_ids": self.users.user_ids, **self.users.features}
        np.savez(directory / USERS_FILE, **users)
        items: dict[str, Any] = {"item_ids": self.item_ids, "item_emb": self.item_emb}
        if self.item_bias is not None:
            items["item_bias"] = self.item_bias
        np.savez(directory / ITEMS_FILE, **items)
        np.savez(directory / ITEM_ENCODING_FILE, **self.item_encoding.to_arrays())
        if self.events is not None:
            self.events.write_parquet(directory / EVENTS_FILE)
        return directory

    @classmethod
    def read(cls, directory: Path) -> ServingBundle:
        """The bundle :meth:`write` wrote; tensors are read with ``weights_only=True`` (data only)."""
        import torch

        meta = json.loads((directory / META_FILE).read_text())
        config = OmegaConf.load(directory / CONFIG_FILE)
        assert isinstance(config, DictConfig)
        with np.load(directory / USERS_FILE) as users, np.load(directory / ITEMS_FILE) as items:
            user_table = F.UserTable(users["user_ids"], {n: users[n] for n in meta["user_features"]})
            item_ids, item_emb = items["item_ids"], items["item_emb"]
            item_bias = items["item_bias"] if "item_bias" in items.files else None
        with np.load(directory / ITEM_ENCODING_FILE) as encoding:
            item_encoding = ItemEncoding.from_arrays({name: encoding[name] for name in encoding.files})
        events_path = directory / EVENTS_FILE
        return cls(
            config=config,
            query_tower_state=torch.load(directory / QUERY_TOWER_FILE, map_location="cpu", weights_only=True),
            item_tower_state=torch.load(directory / ITEM_TOWER_FILE, map_location="cpu", weights_only=True),
            user_spec=spec_from_dict(meta["user_spec"]),
            item_spec=spec_from_dict(meta["item_spec"]),
            users=user_table,
            item_ids=item_ids,
            item_emb=item_emb,
            surfaces=list(meta["surfaces"]),
            query_hash_buckets=int(meta["query_hash_buckets"]),
            context=tuple(meta["context"]),
            history_max_len=int(meta["history_max_len"]),
            events=pl.read_parquet(events_path) if events_path.is_file() else None,
            index=dict(meta["index"]),
            item_encoding=item_encoding,
            limits={**DEFAULT_LIMITS, **{k: int(v) for k, v in meta.get("limits", {}).items()}},
            blend=meta.get("blend"),
            item_bias=item_bias,
        )

    def query_inputs(self) -> F.QueryInputs:
        """The query-tower inputs of training, with a cold-start user (``COLD_START_USER_ID``) first:
        user code 0, attributes missing; every real user keeps its training features."""
        cold = {name: np.zeros(1, dtype=values.dtype) for name, values in self.users.features.items()}
        users = F.UserTable(
            np.concatenate([[COLD_START_USER_ID], self.users.user_ids]),
            {name: np.concatenate([cold[name], values]) for name, values in self.users.features.items()},
        )
        # Subject items read their training content vectors (related-items requests).
        items = F.ItemTable(
            self.item_encoding.item_ids, dict(self.item_encoding.vectors), self.item_spec, pl.DataFrame()
        )
        return F.QueryInputs(
            users=users,
            items=items,
            surfaces=self.surfaces,
            query_hash_buckets=self.query_hash_buckets,
            context=self.context,
            events=self.events,
            history_max_len=self.history_max_len,
        )

    def query_features(
        self, rows: pl.DataFrame, inputs: F.QueryInputs | None = None
    ) -> dict[str, np.ndarray]:
        """Encoded query-tower features of checked request rows (:func:`request_rows`), with the
        documented fallback for unknown users and subject items; an unknown surface is a RequestError."""
        unknown = sorted(set(rows["surface"].unique().to_list()) - set(self.surfaces))
        if unknown:
            raise RequestError(f"Unknown surface(s) {unknown}; the model serves {self.surfaces}.")
        known_user = pl.col("user_id").is_in(pl.Series(self.users.user_ids))
        known_subject = pl.col("subject_item_id").is_in(pl.Series(self.item_encoding.item_ids))
        encoded = rows.with_columns(
            pl.when(known_user).then(pl.col("user_id")).otherwise(COLD_START_USER_ID).alias("user_id"),
            pl.when(known_subject).then(pl.col("subject_item_id")).alias("subject_item_id"),
            pl.col("timestamp").fill_null(LATEST),
        )
        return F.build_query_features(encoded, inputs or self.query_inputs()).features
