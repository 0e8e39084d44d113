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
    item_index.faiss   the built item index (faiss's own serialisation, :mod:`convcg_cli.index.stored`);
                       meta.json's ``index_file`` holds the sha256 of the item vectors it was built
                       from (``vectors_sha256``) and its build options, and ``index_overlap`` the
                       overlap of an approximate index's top k with exact search's

The index is read back as it was built (an IVF index's cells are not trained again) when the digest
and options match the bundle's item vectors and index options; otherwise (a model logged before the
index was saved, a changed corpus, an unreadable file) it is rebuilt at load and a warning says why.

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
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from omegaconf import DictConfig, OmegaConf

from convcg_cli import workdir
from convcg_cli.data.features import ItemEncoding
from convcg_cli.data.features import encodings as F
from convcg_cli.data.features.query_encoder import QueryEncoder
from convcg_cli.errors import RequestError, first_line
from convcg_cli.index import ItemIndex, StoredIndex, read_index, vectors_digest, write_index
from convcg_cli.specs import FeatureSpec

CONFIG_FILE = "config.yaml"
QUERY_TOWER_FILE = "query_tower.pt"
ITEM_TOWER_FILE = "item_tower.pt"
META_FILE = "meta.json"
USERS_FILE = "users.npz"
ITEMS_FILE = "items.npz"
ITEM_ENCODING_FILE = "item_encoding.npz"
EVENTS_FILE = "events.parquet"
INDEX_FILE = "item_index.faiss"

# The request table: required columns, then optional ones (absent or null = not given).
REQUIRED_COLUMNS = {"user_id": pl.Int64, "surface": pl.String}
OPTIONAL_COLUMNS = {"subject_item_id": pl.Int64, "query_id": pl.Int64, "timestamp": pl.Int64}
# The cold-start user's id: sorts before every real id, so it is user position 0 of the served table.
COLD_START_USER_ID = np.iinfo(np.int64).min
# The candidate table: one row per (request, rank).
CANDIDATE_COLUMNS = ("request", "rank", "item_id", "score")
# What one request may ask for (conf/train.yaml's serve.max_k, serve.max_rows): k candidates per
# row, rows per call. A call's answer is at most max_rows * max_k candidate rows.
DEFAULT_LIMITS = {"max_k": 1000, "max_rows": 10_000}


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
    given = _column_names(requests)
    missing = [c for c in REQUIRED_COLUMNS if c not in given]
    if missing:
        raise RequestError(
            f"The requests lack column(s) {missing}; expected {list(REQUIRED_COLUMNS)} and optionally "
            f"{list(OPTIONAL_COLUMNS)}, got {given}."
        )
    # Column by column (no per-row Python), each read once; a pandas column straight into polars.
    from_polars = isinstance(requests, pl.DataFrame)
    columns: list[pl.Series] = []
    for name, dtype in {**REQUIRED_COLUMNS, **OPTIONAL_COLUMNS}.items():
        if name not in given:
            columns.append(pl.Series(name, [None] * len(requests), dtype=dtype))  # all null
            continue
        column = requests[name] if from_polars else _from_pandas_column(requests[name], name)
        if column.dtype == dtype or column.null_count() == column.len():  # all null: of any type
            columns.append(column.cast(dtype))
            continue
        if not _casts_cleanly(column, dtype):
            raise RequestError(
                f"Request column '{name}' must hold {column_kind(dtype)}, got {column.dtype} "
                f"(e.g. {column.drop_nulls().head(1).to_list()})."
            )
        columns.append(column.cast(dtype).alias(name))
    rows = pl.DataFrame(columns)
    if rows["user_id"].null_count() or rows["surface"].null_count():
        raise RequestError("Request columns 'user_id' and 'surface' must be given on every row.")
    return rows


def _column_names(requests: Any) -> list[str]:
    """The column names of a request table (pandas or polars), or a RequestError for anything else."""
    try:
        return [str(name) for name in requests.columns]
    except (AttributeError, TypeError):
        raise RequestError(
            f"The requests must be a table (pandas or polars DataFrame), got {type(requests).__name__}."
        ) from None


def _from_pandas_column(column: Any, name: str) -> pl.Series:
    """One pandas request column as a polars Series: numpy columns are not copied, pandas' string
    columns are read through Arrow; a float column holding whole numbers and NaN (pandas' way of
    writing a nullable integer) becomes Int64 with nulls (:func:`request_rows` casts it)."""
    if getattr(column.dtype, "name", None) in ("str", "string"):  # pandas' StringDtype: Arrow or Python
        return pl.Series(name, column.array.__arrow_array__())
    values = getattr(column, "values", None)
    if isinstance(values, np.ndarray) and values.dtype.kind in "iub":
        return pl.Series(name, values)
    if isinstance(values, np.ndarray) and values.dtype.kind == "f":
        return pl.Series(name, values, nan_to_null=True)
    if isinstance(values, np.ndarray) and values.dtype.kind == "O":  # strings: polars reads them at once
        series = pl.Series(name, values, strict=False)
        if series.dtype != pl.Object:
            return series
    try:  # pandas' own extension types (nullable integers, strings, categoricals) and mixed objects
        converted = pl.from_pandas(column)
    except (TypeError, ValueError, AttributeError) as exc:
        raise RequestError(f"Request column '{name}' cannot be read ({exc}).") from None
    assert isinstance(converted, pl.Series)
    converted = converted.alias(name)
    return converted.fill_nan(None) if converted.dtype.is_float() else converted


def _casts_cleanly(column: pl.Series, dtype: Any) -> bool:
    """Whether ``column`` becomes ``dtype`` without changing a value (whole floats -> Int64)."""
    if dtype == pl.String or not column.dtype.is_numeric():
        return False
    cast = column.cast(dtype, strict=False)
    return cast.null_count() == column.null_count() and bool((cast.cast(pl.Float64) == column).all())


def column_kind(dtype: Any) -> str:
    """What a request column of ``dtype`` holds, in words (for error messages)."""
    return "strings" if dtype == pl.String else "integers"


def write_index_atomically(index: ItemIndex, path: Path) -> Path:
    """Write ``index`` to ``path`` as a temporary file beside it, then renamed over it: a crash
    midway leaves whatever ``path`` held (and the partial file is removed, or swept by the next
    writer when the process was killed)."""
    workdir.sweep_stale(path, ("partial",))
    partial = path.with_name(workdir.temp_beside(path, "partial"))
    try:
        write_index(index, partial)
        _move_into_place(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return path


def _move_into_place(partial: Path, path: Path) -> None:
    """The atomic step of :func:`write_index_atomically` (its own function: the tests fail it)."""
    partial.replace(path)


def _stored_index(directory: Path, meta: Mapping[str, Any]) -> StoredIndex:
    """The index a bundle directory holds; one that is missing (a model logged before indexes were
    saved) or cannot be read comes back without its index, saying why."""
    entry = meta.get("index_file")
    if not entry or not (directory / entry["file"]).is_file():
        return StoredIndex(
            None, "", {}, f"the model holds no {INDEX_FILE} (logged before indexes were saved with the model)"
        )
    options = dict(meta["index"])
    digest, built_with = str(entry["vectors_sha256"]), dict(entry["options"])
    try:
        index = read_index(directory / entry["file"], str(options["kind"]), int(options.get("nprobe", 16)))
    except (RuntimeError, ValueError) as exc:  # faiss raises RuntimeError on a damaged file
        return StoredIndex(None, digest, built_with, f"its file could not be read ({first_line(exc)})")
    return StoredIndex(index, digest, built_with)


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
        index_overlap: an approximate index's measured overlap with exact search
            (``{"k": .., "overlap": .., "queries": ..}``), or None.
        stored_index: the built index and what it was built from (set by :meth:`served_index`, or
            read from ``item_index.faiss``); :meth:`served_index` checks it before serving it.
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
    index_overlap: dict[str, Any] | None = None
    stored_index: StoredIndex | None = field(default=None, compare=False, repr=False)

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

    def served_index(self) -> ItemIndex:
        """The item index over :meth:`index_vectors`: the stored one when it was built from these
        vectors with these options, else built now (and kept), with a warning when a stored one is
        set aside (a model logged before indexes were saved, a changed corpus, an unreadable file)."""
        vectors = self.index_vectors()
        digest = vectors_digest(vectors)
        stored = self.stored_index
        why = "" if stored is None else stored.stale_for(digest, self.index)
        if stored is None or why:
            if why:  # a stored index set aside (a bundle being made has none: nothing to say)
                logging.getLogger(__name__).warning(
                    "Rebuilding the served %s index over %s items: %s.",
                    self.index["kind"],
                    f"{len(vectors):,}",
                    why,
                )
            self.stored_index = stored = StoredIndex.build(vectors, self.index, digest)
        assert stored.index is not None
        return stored.index

    def write(self, directory: Path) -> Path:
        """Write the bundle's files into ``directory`` (created) and return it; the item index (built
        now unless :meth:`served_index` was called) goes to ``item_index.faiss``."""
        import torch

        index = self.served_index()
        assert self.stored_index is not None

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
            "index_file": {
                "file": INDEX_FILE,
                "vectors_sha256": self.stored_index.digest,
                "options": self.stored_index.options,
            },
            **({"index_overlap": self.index_overlap} if self.index_overlap is not None else {}),
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
        write_index_atomically(index, directory / INDEX_FILE)
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
            index_overlap=meta.get("index_overlap"),
            stored_index=_stored_index(directory, meta),
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
        documented fallback for unknown users and subject items; an unknown surface is a RequestError.
        One call's convenience: a served model keeps its
        :class:`~convcg_cli.data.features.query_encoder.QueryEncoder` (the lookups it makes once)."""
        return QueryEncoder(inputs or self.query_inputs(), cold_start_user=True).encode(rows)
