"""Bounded-memory training input: impressions read in row chunks, encoded once into shards on disk.

With ``data.stream.enabled=true`` the impressions parquet is never loaded whole. Three passes, each
holding one chunk of ``chunk_rows`` impressions at a time (plus per-item and per-user arrays):

1. **validate**: each chunk is conformed and checked against ``data_schemas/`` like ``load_tables``
   does (types, nulls, allowed values, rules, references to items/users); the day range is tracked.
2. **aggregate** (polars lazy scans, streaming engine): split row counts, item performance of the
   training window (O(items)), the evaluation days' rows (O(evaluation days)), and the engagement
   events when the user history is on (O(engagements): 4 integers per click).
3. **encode**: each chunk's training examples (engaged rows of the training days) become one shard,
   an ``.npz`` of the exact arrays the in-memory path builds (query features, item position, task
   weights, and the chunk's served-but-not-engaged impressions of each example's user as its hard
   negative pool); item frequencies for logQ are summed over the shards.

Shards are cached under ``cache_dir`` keyed by the data files (size, mtime) and every option that
changes their content, written to a temporary directory and renamed into place, so a crash never
leaves a half-written cache and a second run (or ``convcg eval``) reuses them.

``ShardedBatches`` serves them: per epoch a seeded permutation of the shards, rank r of W taking
shards ``r::W`` (each rank reads only its own shards), rows shuffled within a buffer of one shard plus
the previous shard's remainder; every rank yields the same number of full batches.

What differs from the in-memory path, by design: the shuffle is within a shard, not global; hard
negatives come from the same chunk (impressions served to the user around the same time) rather than
from the user's whole training window; the primary key (``impression_id``) is checked within each
chunk, not across chunks (``convcg data validate`` checks the whole table).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch
from torch.utils.data import IterableDataset

from convcg_cli.data import features as F
from convcg_cli.data.schema import TableSchema, conform_frames, conform_table
from convcg_cli.errors import ConfigError, DataValidationError
from convcg_cli.tasks import TASK_LABELS

INDEX_FILE = "index.json"
FORMAT_VERSION = 1
# How long a non-writing local rank waits for local rank 0's shards before giving up.
WAIT_FOR_SHARDS_S = 3600


def iter_chunks(path: Path, chunk_rows: int) -> Iterator[pl.DataFrame]:
    """The parquet file in consecutive frames of at most ``chunk_rows`` rows (one in memory at a time).

    Each chunk is its own polars scan with the slice pushed down to the reader, so only the row groups
    it overlaps are read; resident memory stays flat over the file (pyarrow's ``iter_batches`` kept
    growing its buffer pool here, by ~40% of a chunk per chunk before levelling off).
    """
    lazy = pl.scan_parquet(path)
    n = int(lazy.select(pl.len()).collect().item())
    for offset in range(0, n, chunk_rows):
        yield lazy.slice(offset, chunk_rows).collect()


def validate_chunks(
    path: Path, chunk_rows: int, schemas: Mapping[str, TableSchema], items: pl.DataFrame, users: pl.DataFrame
) -> tuple[int, int, int]:
    """Check every chunk of the impressions file against the contract; return (rows, first day, last day).

    Raises:
        DataValidationError: the violations of the first chunk that has any, naming its row range.
    """
    rows, first, last = 0, None, None
    for chunk in iter_chunks(path, chunk_rows):
        conformed, violations = conform_frames(
            {"items": items, "users": users, "impressions": chunk}, schemas
        )
        if violations:
            raise DataValidationError(
                violations,
                note=f"In impressions.parquet rows {rows:,}..{rows + chunk.height - 1:,}: with "
                f"data.stream.enabled the file is checked {chunk_rows:,} rows at a time and the first chunk "
                "with violations is reported; `convcg data validate` checks it whole.",
            )
        day = conformed["impressions"]["timestamp"] // F.SECONDS_PER_DAY
        lo, hi = int(day.min()), int(day.max())  # type: ignore[arg-type]
        first = lo if first is None else min(first, lo)
        last = hi if last is None else max(last, hi)
        rows += chunk.height
    if first is None or last is None:
        raise F.SplitError(f"{F.IMPRESSIONS_FILE} has 0 rows; expected impressions over several days.")
    return rows, first, last


def scan_impressions(path: Path, schema: TableSchema) -> pl.LazyFrame:
    """A lazy scan of the (validated) impressions file cast to the schema, as ``load_tables`` returns it."""
    frame = pl.scan_parquet(path)
    names = frame.collect_schema().names()
    return frame.select(
        [
            pl.col(c.name).cast(c.polars_dtype)
            if c.name in names
            else pl.lit(None, c.polars_dtype).alias(c.name)
            for c in schema.columns
        ]
    )


@dataclass(frozen=True)
class ShardIndex:
    """The shards of one training window: files, rows per shard, and the item frequencies."""

    dir: Path
    files: list[str]
    rows: list[int]
    item_counts: np.ndarray  # (n_items,) training examples per item position
    has_hard_negatives: bool
    meta: dict  # what the writer recorded about the whole file (rows, first_day, last_day)

    @property
    def n_rows(self) -> int:
        return int(sum(self.rows))


def fingerprint(files: Sequence[Path], options: Mapping) -> str:
    """Key of a shard cache: the input files' sizes and mtimes and every content-changing option."""
    stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    blob = json.dumps({"v": FORMAT_VERSION, "files": stats, "options": options}, sort_keys=True, default=repr)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _user_negative_pools(
    chunk: pl.DataFrame, example_user_pos: np.ndarray, inputs: F.QueryInputs, tasks: list[str]
) -> dict[str, np.ndarray]:
    """The chunk's served-but-not-engaged impressions grouped by user, and each example's slice of them."""
    served = chunk.filter(~pl.any_horizontal([TASK_LABELS[t] for t in tasks]))
    user_pos = F.positions(inputs.users.user_ids, served["user_id"].to_numpy())
    item_pos = F.positions(inputs.items.item_ids, served["item_id"].to_numpy())
    order = np.argsort(user_pos, kind="stable")
    sorted_users = user_pos[order]
    start = np.searchsorted(sorted_users, example_user_pos, side="left")
    end = np.searchsorted(sorted_users, example_user_pos, side="right")
    return {"neg_items": item_pos[order], "neg_start": start.astype(np.int64), "neg_count": (end - start)}


def write_shards(
    path: Path,
    out_dir: Path,
    chunk_rows: int,
    train_days: tuple[int, int],
    inputs: F.QueryInputs,
    tasks: list[str],
    positives,
    impressions_schema: TableSchema,
    hard_negatives: bool,
    meta: Mapping | None = None,
) -> ShardIndex:
    """Encode each chunk's training examples into ``out_dir/shard-NNNNN.npz`` (atomically, via a temp dir)."""
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files: list[str] = []
    rows: list[int] = []
    counts = np.zeros(len(inputs.items.item_ids), dtype=np.int64)
    try:
        for chunk in iter_chunks(path, chunk_rows):
            chunk = conform_table(impressions_schema, chunk).filter(F.in_days(train_days))
            train = F.engaged_rows(chunk, tasks)
            if train.height == 0:
                continue
            q = F.build_query_features(train, inputs)
            item_pos = F.positions(inputs.items.item_ids, train["item_id"].to_numpy())
            counts += np.bincount(item_pos, minlength=len(counts))
            arrays = {f"q/{k}": v for k, v in q.features.items()}
            arrays.update({f"w/{k}": v for k, v in positives.weights(train, tasks).items()})
            arrays["item_pos"] = item_pos
            if hard_negatives:
                user_pos = F.positions(inputs.users.user_ids, train["user_id"].to_numpy())
                arrays.update(_user_negative_pools(chunk, user_pos, inputs, tasks))
            name = f"shard-{len(files):05d}.npz"
            np.savez(tmp / name, **arrays)  # type: ignore[arg-type]
            files.append(name)
            rows.append(train.height)
        np.save(tmp / "item_counts.npy", counts)
        index = {"files": files, "rows": rows, "hard_negatives": hard_negatives, "version": FORMAT_VERSION}
        (tmp / INDEX_FILE).write_text(json.dumps({**index, "meta": dict(meta or {})}))
        try:
            tmp.rename(out_dir)
        except OSError:
            if not (out_dir / INDEX_FILE).exists():
                raise
            shutil.rmtree(tmp)  # another process (another node's rank 0) finished first: keep its shards
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return read_index(out_dir)


def read_index(out_dir: Path) -> ShardIndex:
    meta = json.loads((out_dir / INDEX_FILE).read_text())
    return ShardIndex(
        out_dir,
        meta["files"],
        meta["rows"],
        np.load(out_dir / "item_counts.npy"),
        meta["hard_negatives"],
        meta.get("meta", {}),
    )


def wait_for_index(out_dir: Path, timeout_s: float = WAIT_FOR_SHARDS_S) -> ShardIndex:
    """Another local rank writes the shards: wait until its index appears."""
    deadline = time.monotonic() + timeout_s
    while not (out_dir / INDEX_FILE).exists():
        if time.monotonic() > deadline:
            raise ConfigError(
                f"No shards appeared in {out_dir} after {timeout_s:.0f} s (local rank 0 writes them)."
            )
        time.sleep(1.0)
    return read_index(out_dir)


class ShardedBatches(IterableDataset):
    """Training batches read shard by shard: bounded memory whatever the number of impressions.

    Per epoch, a permutation of the shards from ``seed + epoch``; rank r of W reads shards ``r::W``.
    Rows are shuffled within a buffer (one shard plus the previous shard's remainder) and cut into
    full batches; every rank yields ``len(self)`` batches, the fewest any rank can fill, so the ranks
    step together. A batch holds exactly the keys of ``ShuffledBatches``'s batches.
    """

    def __init__(
        self,
        index: ShardIndex,
        item_features: dict[str, torch.Tensor],
        item_log_q: torch.Tensor,
        batch_size: int,
        seed: int,
        hard_negatives: int = 0,
    ) -> None:
        self.index, self.item_features, self.item_log_q = index, item_features, item_log_q
        self.batch_size, self.seed, self.epoch = batch_size, seed, 0
        self.hard_negatives = hard_negatives
        if hard_negatives and not index.has_hard_negatives:
            raise ConfigError("data.hard_negatives > 0 needs shards written with hard negative pools.")

    @property
    def n_examples(self) -> int:
        """Training examples per epoch (all ranks together)."""
        return self.index.n_rows

    def _assignment(self, epoch: int) -> tuple[list[list[int]], int, int]:
        """Each rank's shards for ``epoch``, the full batches every rank yields, and the fewest rows
        any rank holds (the one smaller batch of every rank when no rank fills a whole one)."""
        from convcg_cli.models.distributed import rank_and_world

        _, world = rank_and_world()
        if len(self.index.files) < world:
            raise ConfigError(
                f"{len(self.index.files)} shard(s) for {world} ranks: every rank needs at least one. Lower "
                f"data.stream.chunk_rows so the training window makes at least {world} shards."
            )
        g = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(len(self.index.files), generator=g).tolist()
        shards = [order[r::world] for r in range(world)]
        rank_rows = [sum(self.index.rows[s] for s in mine) for mine in shards]
        return shards, min(rank_rows) // self.batch_size, min(rank_rows)

    def __len__(self) -> int:
        return max(self._assignment(self.epoch)[1], 1)

    def _load(self, shard: int, g: torch.Generator) -> dict[str, torch.Tensor]:
        """One shard's rows as flat tensors (``q/*``, ``w/*``, ``item_pos``, and ``hard_pos`` drawn now)."""
        with np.load(self.index.dir / self.index.files[shard]) as z:
            cols = {k: torch.from_numpy(z[k]) for k in z.files if not k.startswith("neg_")}
            if self.hard_negatives:
                cols["hard_pos"] = draw_hard_negatives(
                    torch.from_numpy(z["neg_start"]),
                    torch.from_numpy(z["neg_count"]),
                    torch.from_numpy(z["neg_items"]),
                    self.hard_negatives,
                    g,
                )
        return cols

    def batch(self, cols: Mapping[str, torch.Tensor], idx: torch.Tensor) -> dict:
        return assemble_batch(
            {k[2:]: v[idx] for k, v in cols.items() if k.startswith("q/")},
            {k[2:]: v[idx] for k, v in cols.items() if k.startswith("w/")},
            cols["item_pos"][idx],
            self.item_features,
            self.item_log_q,
            cols["hard_pos"][idx] if "hard_pos" in cols else None,
        )

    def __iter__(self) -> Iterator[dict]:
        from convcg_cli.models.distributed import rank_and_world

        rank, _ = rank_and_world()
        shards, n_batches, min_rows = self._assignment(self.epoch)
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        g = torch.Generator().manual_seed(int(torch.randint(1 << 62, (1,), generator=g)) + rank)
        self.epoch += 1
        done, rest = 0, None
        for shard in shards[rank]:
            cols = self._load(shard, g)
            if rest is not None:
                cols = {k: torch.cat([rest[k], v]) for k, v in cols.items()}
            n = len(cols["item_pos"])
            perm = torch.randperm(n, generator=g)
            full = n // self.batch_size
            for i in range(full):
                if done == n_batches:
                    return
                yield self.batch(cols, perm[i * self.batch_size : (i + 1) * self.batch_size])
                done += 1
            left = perm[full * self.batch_size :]
            rest = {k: v[left] for k, v in cols.items()}
        if n_batches == 0 and rest is not None and min_rows > 0:  # fewer rows than one batch per rank
            yield self.batch(rest, torch.arange(min_rows))


def assemble_batch(
    user: dict[str, torch.Tensor],
    weights: dict[str, torch.Tensor],
    item_pos: torch.Tensor,
    item_features: Mapping[str, torch.Tensor],
    item_log_q: torch.Tensor,
    hard_pos: torch.Tensor | None = None,
) -> dict:
    """One training batch from its rows' query features, task weights and item positions (and hard
    negative positions, -1 = padding): item features and logQ come from the corpus by position."""
    out = {
        "user": user,
        "item": {k: v[item_pos] for k, v in item_features.items()},
        "item_pos": item_pos,
        "log_q": item_log_q[item_pos],
        "weights": weights,
    }
    if hard_pos is not None:
        out["hard_pos"] = hard_pos
        out["hard_item"] = {k: v[hard_pos.clamp_min(0).reshape(-1)] for k, v in item_features.items()}
    return out


def draw_hard_negatives(
    start: torch.Tensor, count: torch.Tensor, items: torch.Tensor, per_example: int, g: torch.Generator
) -> torch.Tensor:
    """Per row, ``per_example`` draws (uniform, with replacement) from ``items[start : start + count]``;
    -1 (padding, masked by the loss) where the row's pool is empty. One vectorised gather."""
    count = count.unsqueeze(1)
    u = torch.rand(len(start), per_example, generator=g)
    offset = (u * count).long().clamp_max((count - 1).clamp_min(0))
    idx = (start.unsqueeze(1) + offset).clamp_max(max(len(items) - 1, 0))
    picked = items[idx] if len(items) else torch.zeros_like(idx)
    return torch.where(count > 0, picked, torch.full_like(picked, -1))
