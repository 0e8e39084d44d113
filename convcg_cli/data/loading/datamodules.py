"""LightningDataModules over the validated log tables: one class per data path, chosen by config.

``InMemoryDataModule`` (``data/stream=in_memory``, the default) loads the whole impressions table and
shuffles globally; ``StreamedDataModule`` (``data/stream=streamed``) reads it in chunks and serves
training examples from cached shards, so peak memory does not grow with the number of impressions.
Both extend ``datamodule_base.DataModuleBase`` (what they share); ``ImpressionDataModule`` builds
the one a config saved before the split names.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from convcg_cli.data.contract import load_schemas, load_tables, missing_file
from convcg_cli.data.features import as_training_rows
from convcg_cli.data.features import encodings as F
from convcg_cli.data.importing import IgnoreMaturity
from convcg_cli.data.loading.batches import HardNegativeSampler, ShardedBatches, ShuffledBatches
from convcg_cli.data.loading.datamodule_base import DataModuleBase, content_options, to_torch
from convcg_cli.data.loading.negatives import impression_negatives
from convcg_cli.data.loading.stream import (
    INDEX_FILE,
    fingerprint,
    read_index,
    scan_impressions,
    validate_chunks,
    wait_for_index,
    write_shards,
)
from convcg_cli.errors import ConfigError, DataValidationError
from convcg_cli.tasks import CONVERSION, engaged


class InMemoryDataModule(DataModuleBase):
    """The whole impressions table in memory: training batches from a global shuffle (fastest while
    the table fits). Options: see ``DataModuleBase``."""

    def _example_weights(self, train: pl.DataFrame, cutoff: int) -> dict[str, np.ndarray]:
        """Each task's weight per training example: the positives' weights, the conversion task's
        times the label-maturity factor (1 for ``IgnoreMaturity``)."""
        weights = self.positives.weights(train, self.tasks)
        if CONVERSION in weights:
            weights[CONVERSION] = weights[CONVERSION] * self.label_maturity.conversion_weights(train, cutoff)
        return weights

    def setup(self, stage: str | None = None) -> None:
        """Load, validate, split and build every tensor once (idempotent)."""
        if self._ready:
            return
        tables = load_tables(self.dir)
        self._choose_split(F.daily_counts(tables["impressions"]))
        split = F.split_frame(tables["impressions"], self.split_days)
        cutoff = self.cutoff()
        # The training window as known at the cut-off: everything below reads these labels.
        train_window = self.label_maturity.training_rows(self.training_window(split), cutoff)
        train = F.engaged_rows(train_window, self.tasks)
        self._require_engaged_training_rows(train.height)
        pairs = train.select("user_id", "item_id")
        self._build_corpus(tables["items"], tables["users"], train_window, tables["user_history"], pairs)
        if self.history_examples_per_user > 0:
            extra = as_training_rows(
                self.pre_cutoff_history, train, self.history_examples_surface, self.history_examples_per_user
            )
            train = pl.concat([train, extra])
        self._build_query_inputs(self._history_events(tables["impressions"]))
        q = F.build_query_features(train, self.inputs)
        self.user_spec = q.spec
        train_item_pos = F.positions(self.items.item_ids, train["item_id"].to_numpy())
        sampler = None
        if self.hard_negatives > 0:
            negatives = impression_negatives(train_window, self.users, self.items, self.tasks)
            sampler = HardNegativeSampler(negatives, self.hard_negatives)
        self.train_set = ShuffledBatches(
            user=to_torch(q.features),
            item_pos=torch.from_numpy(train_item_pos),
            weights=to_torch(self._example_weights(train, cutoff)),
            item_features=self.item_features,
            item_log_q=torch.from_numpy(F.item_log_frequency(train_item_pos, len(self.items.item_ids))),
            batch_size=self.batch_size,
            seed=self.seed,
            hard_negatives=sampler,
            profile_shares=self.profile_shares,
            item_id_dropout=self._cold_start(),
            random_negatives=self._random_negatives(),
        )
        self._build_queries({"val": split.val, "heldout": split.heldout})
        self.n_rows = {
            name: frame.height
            for name, frame in (("train", split.train), ("val", split.val), ("heldout", split.heldout))
        }
        self._ready = True


class StreamedDataModule(DataModuleBase):
    """Bounded memory: impressions read ``chunk_rows`` at a time, training examples served from shards
    cached under ``cache_dir`` (see ``convcg_cli.data.loading.stream``).

    Args:
        stream: {"chunk_rows": N, "cache_dir": DIR}: rows per chunk, and where the shards are cached
            (default ``<dir>/.convcg-shards``), keyed by the data files and ``content_options``.
        **options: the options of ``DataModuleBase``.
    """

    def __init__(self, dir: str, stream: Mapping[str, Any] | None = None, **options: Any) -> None:
        super().__init__(dir, **options)
        if type(self.label_maturity) is not IgnoreMaturity:
            raise ConfigError(
                "data/label_maturity=drop|weight is not available with data/stream=streamed yet (the "
                "labels are rewritten in memory); use data/stream=in_memory or data/label_maturity=ignore."
            )
        if self.history_examples_per_user > 0:
            raise ConfigError(
                "data.history_examples is not available with data/stream=streamed yet (the history rows "
                "are added in memory); use data/stream=in_memory or data.history_examples.max_per_user=0."
            )
        stream = dict(stream or {})
        self.chunk_rows = int(stream.get("chunk_rows", 1 << 20))
        self.cache_dir = Path(stream.get("cache_dir") or self.dir / ".convcg-shards")
        if self.chunk_rows < 1:
            raise ConfigError(f"data.stream.chunk_rows must be >= 1, got {self.chunk_rows}.")

    def cache_key(self) -> str:
        """The shard cache key: the data files (size, mtime) and every content-changing option."""
        schemas = load_schemas()
        files = [self.dir / s.file for s in schemas.values() if s.required or (self.dir / s.file).is_file()]
        return fingerprint(files, content_options(self.constructor_options))

    def setup(self, stage: str | None = None) -> None:
        """Everything but the training shards once; the shards only for ``fit`` (evaluation needs the
        corpus and the evaluation days, not the training examples)."""
        if not self._ready:
            self._setup_evaluation()
        if stage in ("fit", None) and self.train_set is None:
            self._setup_training()

    def _setup_evaluation(self) -> None:
        """The item corpus (with training-window performance), the users, the split and the evaluation
        queries, from lazy scans. Memory: O(items + users + evaluation days)."""
        schemas = load_schemas()
        small = load_tables(self.dir, {k: schemas[k] for k in ("items", "users", "user_history")})
        schema = schemas["impressions"]
        self.impressions_path = self.dir / schema.file
        if not self.impressions_path.is_file():
            raise DataValidationError([missing_file(schema, self.dir)])
        self.shard_dir = self.cache_dir / self.cache_key()
        if (self.shard_dir / INDEX_FILE).exists():  # validated when the shards were written
            meta = read_index(self.shard_dir).meta
            total, first, last = meta["rows"], meta["first_day"], meta["last_day"]
        else:
            total, first, last = validate_chunks(
                self.impressions_path, self.chunk_rows, schemas, small["items"], small["users"]
            )
        self._file_meta = {"rows": total, "first_day": first, "last_day": last}
        lazy = scan_impressions(self.impressions_path, schema)
        daily = F.daily_counts(lazy)  # O(days)
        self._choose_split(daily)
        self.n_rows = {k: F.window_sum(daily, d, "rows") for k, d in self.split_days.items()}
        F.check_split_rows(self.n_rows, self.split_days)
        train = lazy.filter(F.in_days(self.training_days()))
        is_engaged = engaged(self.tasks)
        self._require_engaged_training_rows(
            int(train.select(is_engaged.sum()).collect(engine="streaming").item())
        )
        # The co-engagement factors read the distinct engaged (user, item) pairs: O(pairs), only when on.
        lazy_pairs = train.filter(is_engaged).select("user_id", "item_id").unique()
        pairs = lazy_pairs.collect(engine="streaming") if self.cofactor_dim else lazy_pairs.head(0).collect()
        self._build_corpus(small["items"], small["users"], train, small["user_history"], pairs)
        self._build_query_inputs(self._history_events(lazy))  # O(engagements): 4 integers each
        self.user_spec = F.build_query_features(train.head(1).collect(), self.inputs).spec
        self._build_queries(
            {  # only the engaged rows become evaluation queries
                name: lazy.filter(F.in_days(self.split_days[name]) & is_engaged).collect(engine="streaming")
                for name in ("val", "heldout")
            }
        )
        self._ready = True

    def _setup_training(self) -> None:
        """The training shards: written once by local rank 0 (others wait), then read shard by shard."""
        if (self.shard_dir / INDEX_FILE).exists():
            index = read_index(self.shard_dir)
        elif int(os.environ.get("LOCAL_RANK") or 0) > 0:
            index = wait_for_index(self.shard_dir)
        else:
            index = write_shards(
                self.impressions_path,
                self.shard_dir,
                self.chunk_rows,
                self.training_days(),
                self.inputs,
                self.tasks,
                self.positives,
                load_schemas()["impressions"],
                hard_negatives=self.hard_negatives > 0,
                meta=self._file_meta,
            )
        self.train_set = ShardedBatches(
            index,
            item_features=self.item_features,
            item_log_q=torch.from_numpy(F.log_frequency_from_counts(index.item_counts)),
            batch_size=self.batch_size,
            seed=self.seed,
            hard_negatives=self.hard_negatives,
            profile_shares=self.profile_shares,
            item_id_dropout=self._cold_start(),
            random_negatives=self._random_negatives(),
        )


def ImpressionDataModule(dir: str, stream: Mapping[str, Any] | None = None, **options: Any) -> DataModuleBase:
    """The datamodule of a config saved before the two data paths were two classes (its ``_target_``):
    ``stream.enabled`` picks ``StreamedDataModule``, else ``InMemoryDataModule``; new configs name
    the class directly (``data/stream=in_memory|streamed``)."""
    stream = dict(stream or {})
    if stream.pop("enabled", False):
        return StreamedDataModule(dir, stream=stream, **options)
    return InMemoryDataModule(dir, **options)
