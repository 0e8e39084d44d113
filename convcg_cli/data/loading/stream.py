"""Bounded-memory training input: impressions read in row chunks, encoded once into shards on disk.

With ``data/stream=streamed`` (``datamodules.StreamedDataModule``) the impressions parquet is never
loaded whole. Three passes, each holding one chunk of ``chunk_rows`` impressions at a time (plus
per-item and per-user arrays):

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
changes their content (``datamodule_base.content_options``), written to a temporary directory and renamed
into place, so a crash never leaves a half-written cache and a second run (or ``convcg eval``)
reuses them.

``convcg_cli.data.loading.batches.ShardedBatches`` serves them: per epoch a seeded permutation of the shards,
rank r of W taking shards ``r::W`` (each rank reads only its own shards), rows shuffled within a
buffer of one shard plus the previous shard's remainder; every rank yields the same number of full
batches.

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

from convcg_cli.data.contract import TableSchema, conform_frames, conform_table
from convcg_cli.data.features import encodings as F
from convcg_cli.data.loading.negatives import impression_negatives
from convcg_cli.errors import ConfigError, DataValidationError

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
                f"data/stream=streamed the file is checked {chunk_rows:,} rows at a time and the first chunk "
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
            if hard_negatives:  # the chunk's pools, and each example's slice of its user's pool
                pools = impression_negatives(chunk, inputs.users, inputs.items, tasks)
                user_pos = F.positions(inputs.users.user_ids, train["user_id"].to_numpy())
                arrays.update(
                    neg_items=pools.items, neg_start=pools.start[user_pos], neg_count=pools.count[user_pos]
                )
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
