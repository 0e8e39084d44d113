"""``convcg index``: a fresh corpus without retraining.

A new or changed item table (in the ``items`` contract of data_schemas/) is encoded as the training
corpus was (:mod:`convcg_cli.data.features.item_encoding`: corpus items keep their id and training-window
features, unseen items are encoded as never shown, as evaluation encodes them), embedded by the
run's trained item tower, and logged as a new model of the run (``runs:/ID/model`` then resolves to
it; optionally registered as a new version). The query side is unchanged: requests are encoded with
the training corpus (a subject item unseen in training counts as none). The new corpus gets a new
index, built once, saved in the new model (written atomically: a crash leaves the old model served)
and, when approximate, its overlap with exact measured and logged, as ``convcg export`` does.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import polars as pl

from convcg_cli import tracking, workdir
from convcg_cli.data.contract import conform_frames, load_schemas
from convcg_cli.data.features import encode_items
from convcg_cli.errors import ConvcgError, DataValidationError
from convcg_cli.serve.batch import load_candidate_model, served_model_uri
from convcg_cli.serve.bundle import ServingBundle
from convcg_cli.serve.export import ExportResult, log_bundle, register
from convcg_cli.serve.model import load_towers


def read_items(path: Path) -> pl.DataFrame:
    """The item table at ``path`` (a parquet file, or a directory holding ``items.parquet``), checked
    against the ``items`` contract; a DataValidationError lists every violation."""
    schema = load_schemas()["items"]
    file = path / schema.file if path.is_dir() else path
    if not file.is_file():
        raise ConvcgError(f"No item table at {file}; expected a parquet file in the items contract.")
    conformed, violations = conform_frames({"items": pl.read_parquet(file)}, {"items": schema})
    if violations:
        raise DataValidationError(violations)
    return conformed["items"]


def reindexed(bundle: ServingBundle, items: pl.DataFrame) -> ServingBundle:
    """``bundle`` with its index corpus replaced by ``items``, embedded by the bundle's item tower."""
    import torch

    ids, features = encode_items(bundle.item_encoding, items)
    towers = load_towers(bundle)
    embeddings = towers.embed_items({k: torch.from_numpy(v) for k, v in features.items()})
    return dataclasses.replace(
        bundle,
        item_ids=ids,
        item_emb=embeddings,
        item_bias=reindexed_bias(bundle, ids, features),
        stored_index=None,  # the old corpus's index: a new one is built for the new vectors
        index_overlap=None,
    )


def reindexed_bias(
    bundle: ServingBundle, ids: np.ndarray, features: dict[str, np.ndarray]
) -> np.ndarray | None:
    """The popularity blend's bias of a new corpus: an item of the served corpus keeps its own (its
    training-window popularity); an item training never had gets the fallback of its group (category
    or advertiser, encoded as training encoded it), times the blend's fallback weight."""
    if bundle.item_bias is None or not bundle.blend:
        return None
    table = np.asarray(bundle.blend["group_fallback"], dtype=np.float64)
    codes = np.asarray(features[bundle.blend["group"]], dtype=np.int64).reshape(-1)
    new = float(bundle.blend["gamma"]) * np.where(
        codes < len(table), table[np.minimum(codes, len(table) - 1)], 0.0
    )
    at = np.minimum(np.searchsorted(bundle.item_ids, ids), len(bundle.item_ids) - 1)
    known = bundle.item_ids[at] == ids
    return np.where(known, bundle.item_bias[at], new).astype(np.float32)


def reindex_run(
    store: tracking.Store, run: str, items_path: Path, name: str | None = None, alias: str | None = None
) -> tuple[ExportResult, int | None]:
    """Log the run's model with the corpus of ``items_path``; register it as a new version of
    ``name`` (with ``alias``) when given. Returns the logged model and the registered version."""
    model_uri = served_model_uri(store, run)
    run_id = model_uri.split("/")[1]
    bundle = reindexed(load_candidate_model(store, model_uri).bundle, read_items(items_path))
    with tracking.claim_run(store, run_id), workdir.command_dir("index") as scratch:
        tags = {"items": str(items_path)}
        uri, overlap = log_bundle(tracking.existing_run(store, run_id), bundle, scratch, tags=tags)
        version = register(store, uri, name, alias, scratch) if name else None
    return ExportResult(uri, bundle.index, overlap), version
