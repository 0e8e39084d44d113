"""LightningDataModule over the validated log tables: whole-batch tensor slicing, no per-row Python."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import polars as pl
import torch
from torch.utils.data import DataLoader, IterableDataset

from convcg_cli.data import features as F
from convcg_cli.data.cofactors import engagement_matrix, fit_cofactors
from convcg_cli.data.history import engagement_events
from convcg_cli.data.positives import LabelPositives
from convcg_cli.data.schema import load_schemas, load_tables, missing_file
from convcg_cli.data.stream import (
    INDEX_FILE,
    ShardedBatches,
    assemble_batch,
    draw_hard_negatives,
    fingerprint,
    read_index,
    scan_impressions,
    validate_chunks,
    wait_for_index,
    write_shards,
)
from convcg_cli.data.user_history import ACTION_CODES, as_training_rows, before_cutoff, history_positions
from convcg_cli.errors import ConfigError, DataValidationError
from convcg_cli.tasks import TASK_LABELS


def _to_torch(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}


class HardNegativeSampler:
    """Draws, per training example, ``per_example`` of its user's served-but-not-engaged items.

    Sampling is uniform with replacement within the user's list, as one vectorised gather per batch;
    users with no such impressions get padding (-1), which the loss masks.
    """

    def __init__(self, negatives: F.ImpressionNegatives, per_example: int) -> None:
        self.start = torch.from_numpy(negatives.start)
        self.count = torch.from_numpy(negatives.count)
        self.items = torch.from_numpy(negatives.items)
        self.per_example = per_example

    def sample(self, user_pos: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """(B,) user positions -> (B, H) item positions, -1 where the user has none."""
        return draw_hard_negatives(
            self.start[user_pos], self.count[user_pos], self.items, self.per_example, generator
        )


class ShuffledBatches(IterableDataset):
    """Yields whole training batches by fancy-indexing column tensors with a shuffled index.

    A new permutation per epoch from ``seed + epoch``, so batch order is reproducible. The last partial
    batch is dropped (it would bias in-batch negatives) unless it is the only one.
    """

    def __init__(
        self,
        user: dict[str, torch.Tensor],
        item_pos: torch.Tensor,
        weights: dict[str, torch.Tensor],
        item_features: dict[str, torch.Tensor],
        item_log_q: torch.Tensor,
        batch_size: int,
        seed: int,
        hard_negatives: HardNegativeSampler | None = None,
    ) -> None:
        self.user, self.item_pos, self.weights = user, item_pos, weights
        self.item_features, self.item_log_q = item_features, item_log_q
        self.batch_size, self.seed, self.epoch = batch_size, seed, 0
        self.hard_negatives = hard_negatives

    @property
    def n_examples(self) -> int:
        """Training examples per epoch (all ranks together)."""
        return len(self.item_pos)

    def __len__(self) -> int:
        """Batches per epoch in this process. Under DDP every rank gets ``1 / world_size`` of the full
        batches; the few that do not divide evenly are dropped, like the last partial batch."""
        from convcg_cli.models.distributed import rank_and_world

        _, world = rank_and_world()
        return max(len(self.item_pos) // self.batch_size // world, 1)

    def batch(self, idx: torch.Tensor, generator: torch.Generator | None = None) -> dict:
        """Gather one batch; item features come from the corpus table by item position."""
        hard = None
        if self.hard_negatives is not None:
            generator = generator or torch.Generator().manual_seed(self.seed)
            hard = self.hard_negatives.sample(self.user["user_id"][idx] - 1, generator)  # (B, H)
        return assemble_batch(
            {k: v[idx] for k, v in self.user.items()},
            {k: v[idx] for k, v in self.weights.items()},
            self.item_pos[idx],
            self.item_features,
            self.item_log_q,
            hard,
        )

    def __iter__(self) -> Iterator[dict]:
        """This process's batches of the next epoch.

        Under DDP every rank draws the same permutation (same seed and epoch) and takes every
        ``world_size``-th batch starting at its rank: disjoint, equally many, equally large. So the
        global batch of step i (the ranks' batches in rank order) is exactly batch i of one process
        with a ``world_size`` times larger batch size.
        """
        from convcg_cli.models.distributed import rank_and_world

        rank, world = rank_and_world()
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1
        perm = torch.randperm(len(self.item_pos), generator=g)
        # Fewer rows than world * batch_size: one smaller batch per rank, equal on every rank.
        size = min(self.batch_size, len(perm) // world)
        if world > 1:  # hard negatives: a stream per rank, else every rank would make the same draws
            g = torch.Generator().manual_seed(int(torch.randint(1 << 62, (1,), generator=g)) + rank)
        for i in range(len(self)):
            start = (i * world + rank) * size
            yield self.batch(perm[start : start + size], g)


class SequentialBatches(IterableDataset):
    """Query features in order, in batches, with their query indices (for evaluation)."""

    def __init__(self, features: dict[str, torch.Tensor], batch_size: int) -> None:
        self.features, self.batch_size = features, batch_size
        self.n = len(next(iter(features.values())))

    def __len__(self) -> int:
        return (self.n + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[dict]:
        for start in range(0, self.n, self.batch_size):
            sl = slice(start, start + self.batch_size)
            yield {
                "user": {k: v[sl] for k, v in self.features.items()},
                "query_index": torch.arange(start, min(start + self.batch_size, self.n)),
            }


class ImpressionDataModule(L.LightningDataModule):
    """Loads ``dir`` (validated against data_schemas/), splits by time and serves tensors.

    Args:
        dir: directory with items/users/impressions parquet files.
        val_days, heldout_days: whole days at the end of the log for validation and held-out eval.
        batch_size: training batch size (the in-batch negatives of each example).
        query_hash_buckets: number of hash buckets for search query ids.
        seed: batch-order seed.
        tasks: task names (from ``loss.task_weights``).
        eval_batch_size: queries per batch when embedding evaluation queries.
        features: {"item"|"user": {"categorical": [...], "numeric": [...]}}: the table columns used as
            features besides the ids (item_id, advertiser_id, user_id are always used).
        positives: which rows are positives of each task, with what weight (LabelPositives,
            DualPositives).
        hard_negatives: served-but-not-engaged impressions of the same user added to each example's
            negatives (0 = in-batch negatives only).
        context: request-context features of the query tower (surface, subject_item_id, query_bucket).
        history: {"max_len": L}: the user's last L engaged items strictly before each request as a
            sequence feature (0 = off). Events come from every day, each request seeing only its past.
        stream: {"enabled": bool, "chunk_rows": N, "cache_dir": DIR}: with enabled, impressions are
            read N rows at a time and training examples served from shards cached in DIR, so peak
            memory does not grow with the number of impressions (see ``convcg_cli.data.stream``).
        use_user_history: read the optional ``user_history`` table (events before the log), up to the
            training cut-off (the first validation day); the co-engagement factors and the baselines
            then see it. Off: the table is ignored.
        history_examples: {"max_per_user": N, "surface": S}: N > 0 adds each user's last N
            ``user_history`` events before the cut-off as training examples (engaged rows on surface
            S; conversions are conversion positives). Needs ``use_user_history``; in memory only.
        cofactors: {"dim": d}: d > 0 adds a d-dimensional truncated SVD of the (user x item)
            engagement matrix (training window + user history) as numeric item and user features
            (``convcg_cli.data.cofactors``). 0 = off.
    """

    def __init__(
        self,
        dir: str,
        val_days: int = 2,
        heldout_days: int = 2,
        batch_size: int = 1024,
        query_hash_buckets: int = 1024,
        seed: int = 0,
        tasks: Sequence[str] = tuple(TASK_LABELS),
        eval_batch_size: int = 8192,
        features: Mapping[str, Mapping[str, Sequence[str]]] | None = None,
        positives: LabelPositives | None = None,
        hard_negatives: int = 0,
        context: Sequence[str] = F.CONTEXT_FEATURES,
        history: Mapping[str, int] | None = None,
        stream: Mapping | None = None,
        use_user_history: bool = False,
        cofactors: Mapping[str, int] | None = None,
        history_examples: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        history_examples = dict(history_examples or {})
        self.history_examples_per_user = int(history_examples.get("max_per_user", 0))
        self.history_examples_surface = str(history_examples.get("surface", "home_feed"))
        if self.history_examples_per_user < 0:
            raise ConfigError(
                "data.history_examples.max_per_user must be >= 0 (0 = off), got "
                f"{self.history_examples_per_user}."
            )
        if self.history_examples_per_user > 0 and not use_user_history:
            raise ConfigError("data.history_examples.max_per_user > 0 needs data.use_user_history=true.")
        self.use_user_history = bool(use_user_history)
        self.cofactor_dim = int((cofactors or {}).get("dim", 0))
        if self.cofactor_dim < 0:
            raise ConfigError(f"data.cofactors.dim must be >= 0 (0 = off), got {self.cofactor_dim}.")
        self.dir = Path(dir)
        self.val_days, self.heldout_days = val_days, heldout_days
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.query_hash_buckets, self.seed = query_hash_buckets, seed
        self.tasks = list(tasks)
        self.positives = positives or LabelPositives()
        self.hard_negatives = hard_negatives
        self.context = tuple(context)
        self.history_max_len = int((history or {}).get("max_len", 0))
        features = features or {}
        self.item_columns = F.FeatureColumns(**{k: tuple(v) for k, v in features.get("item", {}).items()})
        self.user_columns = F.FeatureColumns(**{k: tuple(v) for k, v in features.get("user", {}).items()})
        stream = dict(stream or {})
        self.stream = bool(stream.get("enabled", False))
        self.chunk_rows = int(stream.get("chunk_rows", 1 << 20))
        self.cache_dir = Path(stream.get("cache_dir") or self.dir / ".convcg-shards")
        if self.stream and self.chunk_rows < 1:
            raise ConfigError(f"data.stream.chunk_rows must be >= 1, got {self.chunk_rows}.")
        self.train_set: ShuffledBatches | ShardedBatches | None = None
        self._ready = False

    def setup(self, stage: str | None = None) -> None:
        """Load, validate, split and build every tensor once (idempotent).

        Streamed (``stream.enabled``), the training shards are only written or read for ``fit``:
        evaluation needs the corpus and the evaluation days, not the training examples.
        """
        if self.stream:
            self._setup_streamed(stage)
            return
        if self._ready:
            return
        tables = load_tables(self.dir)
        self.surfaces = list(load_schemas()["impressions"].column("surface").allowed or ())
        split = F.split_by_time(tables["impressions"], self.val_days, self.heldout_days)
        self.split_days = split.days
        self.items = F.build_item_table(tables["items"], split.train, self.item_columns)
        self.users = F.build_user_table(tables["users"], self.user_columns)

        train = F.engaged_rows(split.train, self.tasks)
        if train.height == 0:
            raise F.SplitError(
                f"The train split (days {split.days['train']}) of {F.IMPRESSIONS_FILE} has no row positive "
                f"for any task {self.tasks}; expected clicks, saves or conversions to learn from."
            )
        self._add_pre_cutoff_context(tables["user_history"], train.select("user_id", "item_id"))
        if self.history_examples_per_user > 0:
            extra = as_training_rows(
                self.pre_cutoff_history, train, self.history_examples_surface, self.history_examples_per_user
            )
            train = pl.concat([train, extra])
        inputs = F.QueryInputs(
            users=self.users,
            items=self.items,
            surfaces=self.surfaces,
            query_hash_buckets=self.query_hash_buckets,
            context=self.context,
            events=self._with_pre_cutoff(engagement_events(tables["impressions"]))
            if self.history_max_len > 0
            else None,
            history_max_len=self.history_max_len,
        )
        q = F.build_query_features(train, inputs)
        self.user_spec, self.item_spec = q.spec, self.items.spec
        train_item_pos = F.positions(self.items.item_ids, train["item_id"].to_numpy())
        self.item_features = _to_torch(self.items.features)
        sampler = None
        if self.hard_negatives > 0:
            negatives = F.impression_negatives(split.train, self.users, self.items, self.tasks)
            sampler = HardNegativeSampler(negatives, self.hard_negatives)
        self.train_set = ShuffledBatches(
            user=_to_torch(q.features),
            item_pos=torch.from_numpy(train_item_pos),
            weights=_to_torch(self.positives.weights(train, self.tasks)),
            item_features=self.item_features,
            item_log_q=torch.from_numpy(F.item_log_frequency(train_item_pos, len(self.items.item_ids))),
            batch_size=self.batch_size,
            seed=self.seed,
            hard_negatives=sampler,
        )
        self.queries = {
            name: F.build_query_set(frame, inputs, self.tasks, split.days[name])
            for name, frame in (("val", split.val), ("heldout", split.heldout))
        }
        self.n_rows = {
            name: frame.height
            for name, frame in (("train", split.train), ("val", split.val), ("heldout", split.heldout))
        }
        self._ready = True

    def _add_pre_cutoff_context(self, user_history: pl.DataFrame, train_pairs: pl.DataFrame) -> None:
        """Keep the user history before the training cut-off and add the co-engagement factors.

        ``history_pairs``: (user position, item position, action code) of every ``user_history`` event
        before the first validation day (empty unless ``use_user_history``), for the baselines.
        """
        cutoff = self.split_days["val"][0] * F.SECONDS_PER_DAY
        history = before_cutoff(user_history, cutoff) if self.use_user_history else user_history.clear()
        self.pre_cutoff_history = history
        self.history_pairs = history_positions(history, self.users.user_ids, self.items.item_ids)
        if self.cofactor_dim == 0:
            return
        user_pos = np.concatenate(
            [F.positions(self.users.user_ids, train_pairs["user_id"].to_numpy()), self.history_pairs[0]]
        )
        item_pos = np.concatenate(
            [F.positions(self.items.item_ids, train_pairs["item_id"].to_numpy()), self.history_pairs[1]]
        )
        matrix = engagement_matrix(user_pos, item_pos, len(self.users.user_ids), len(self.items.item_ids))
        factors = fit_cofactors(matrix, self.cofactor_dim, seed=self.seed)
        self.items.features.update(factors.item_features())
        self.items.spec = F.spec_of(self.items.features)
        self.users.features.update(factors.user_features())

    def _with_pre_cutoff(self, events: pl.DataFrame) -> pl.DataFrame:
        """The history sequence's events: engaged impressions (``engagement_events``), plus the user
        history before the cut-off when the run reads it (so the sequence starts before the log)."""
        if self.pre_cutoff_history.height == 0:
            return events
        before = self.pre_cutoff_history.select(
            "user_id",
            "timestamp",
            "item_id",
            pl.col("action").replace_strict(ACTION_CODES, return_dtype=pl.Int64),
        )
        return pl.concat([before, events]).sort("user_id", "timestamp", "item_id", "action")

    # ----------------------------------------------------------------------------------------------
    # Streamed: bounded memory (convcg_cli.data.stream)
    # ----------------------------------------------------------------------------------------------

    def _content_options(self) -> dict:
        """Every option that changes the shards' content (part of their cache key)."""
        return {
            "val_days": self.val_days,
            "heldout_days": self.heldout_days,
            "tasks": self.tasks,
            "positives": [type(self.positives).__name__, sorted(vars(self.positives).items())],
            "hard_negatives": self.hard_negatives > 0,
            "context": list(self.context),
            "history_max_len": self.history_max_len,
            "query_hash_buckets": self.query_hash_buckets,
            "item_columns": repr(self.item_columns),
            "user_columns": repr(self.user_columns),
            "chunk_rows": self.chunk_rows,
            "use_user_history": self.use_user_history,
            "cofactor_dim": self.cofactor_dim,
        }

    def _setup_streamed(self, stage: str | None) -> None:
        if self.history_examples_per_user > 0:
            raise ConfigError(
                "data.history_examples is not available with data.stream.enabled yet: the history rows "
                "are added in memory. Turn one of them off."
            )
        if not self._ready:
            self._setup_streamed_eval()
        if stage in ("fit", None) and self.train_set is None:
            self._setup_streamed_train()

    def _setup_streamed_eval(self) -> None:
        """Everything but the training examples: the item corpus (with training-window performance),
        the users, the split and the evaluation queries. Memory: O(items + users + evaluation days)."""
        schemas = load_schemas()
        small = load_tables(self.dir, {k: schemas[k] for k in ("items", "users", "user_history")})
        schema = schemas["impressions"]
        self.impressions_path = self.dir / schema.file
        if not self.impressions_path.is_file():
            raise DataValidationError([missing_file(schema, self.dir)])
        files = [self.dir / schemas[k].file for k in ("impressions", "items", "users")]
        self.shard_dir = self.cache_dir / fingerprint(files, self._content_options())
        if (self.shard_dir / INDEX_FILE).exists():  # validated when the shards were written
            meta = read_index(self.shard_dir).meta
            total, first, last = meta["rows"], meta["first_day"], meta["last_day"]
        else:
            total, first, last = validate_chunks(
                self.impressions_path, self.chunk_rows, schemas, small["items"], small["users"]
            )
        self._file_meta = {"rows": total, "first_day": first, "last_day": last}
        self.split_days = F.split_days(first, last, self.val_days, self.heldout_days)
        lazy = scan_impressions(self.impressions_path, schema)
        self.n_rows = {
            k: int(v)
            for k, v in lazy.select([F.in_days(d).sum().alias(k) for k, d in self.split_days.items()])
            .collect(engine="streaming")
            .row(0, named=True)
            .items()
        }
        F.check_split_rows(self.n_rows, self.split_days)
        train = lazy.filter(F.in_days(self.split_days["train"]))
        engaged = pl.any_horizontal([TASK_LABELS[t] for t in self.tasks])
        n_engaged = int(train.select(engaged.sum()).collect(engine="streaming").item())
        if n_engaged == 0:
            raise F.SplitError(
                f"The train split (days {self.split_days['train']}) of {F.IMPRESSIONS_FILE} has no row "
                f"positive for any task {self.tasks}; expected clicks, saves or conversions to learn from."
            )
        self.surfaces = list(schema.column("surface").allowed or ())
        self.items = F.build_item_table(small["items"], train, self.item_columns)
        self.users = F.build_user_table(small["users"], self.user_columns)
        pairs = train.filter(engaged).select("user_id", "item_id").unique().collect(engine="streaming")
        self._add_pre_cutoff_context(small["user_history"], pairs)
        events = None
        if self.history_max_len > 0:  # O(engagements): 4 integers per click, saves and conversions
            cols = ["user_id", "timestamp", "item_id", "clicked", "saved", "converted"]
            engaged_any = pl.col("clicked") | pl.col("saved") | pl.col("converted")
            events = self._with_pre_cutoff(
                engagement_events(lazy.filter(engaged_any).select(cols).collect(engine="streaming"))
            )
        self.inputs = F.QueryInputs(
            users=self.users,
            items=self.items,
            surfaces=self.surfaces,
            query_hash_buckets=self.query_hash_buckets,
            context=self.context,
            events=events,
            history_max_len=self.history_max_len,
        )
        frames = {  # only the engaged rows become evaluation queries
            name: lazy.filter(F.in_days(self.split_days[name]) & engaged).collect(engine="streaming")
            for name in ("val", "heldout")
        }
        self.user_spec = F.build_query_features(train.head(1).collect(), self.inputs).spec
        self.item_spec = self.items.spec
        self.item_features = _to_torch(self.items.features)
        self.queries = {
            name: F.build_query_set(frame, self.inputs, self.tasks, self.split_days[name])
            for name, frame in frames.items()
        }
        self._ready = True

    def _setup_streamed_train(self) -> None:
        """The training shards: written once by local rank 0 (others wait), then read shard by shard."""
        import os

        if (self.shard_dir / INDEX_FILE).exists():
            index = read_index(self.shard_dir)
        elif int(os.environ.get("LOCAL_RANK") or 0) > 0:
            index = wait_for_index(self.shard_dir)
        else:
            index = write_shards(
                self.impressions_path,
                self.shard_dir,
                self.chunk_rows,
                self.split_days["train"],
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
        )

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            raise RuntimeError("setup('fit') builds the training set; it was set up for evaluation only")
        return DataLoader(self.train_set, batch_size=None)

    def query_loader(self, split: str) -> DataLoader:
        """Batches of one evaluation split's query features, in query-index order."""
        return DataLoader(
            SequentialBatches(_to_torch(self.queries[split].features), self.eval_batch_size), batch_size=None
        )

    def val_dataloader(self) -> DataLoader:
        return self.query_loader("val")
