"""data.stream: chunked validation, shards equal to the in-memory examples, bounded reads, caching, ranks."""

from __future__ import annotations

import shutil

import numpy as np
import polars as pl
import pytest
import torch

from convcg_cli.data.contract import load_schemas, write_tables
from convcg_cli.data.features import DualPositives
from convcg_cli.data.loading import DataModuleBase, InMemoryDataModule, StreamedDataModule, stream
from convcg_cli.errors import DataValidationError

TASKS = ["conversion", "engagement"]
CHUNK = 4_000  # the tiny preset has ~30k impressions: ~8 chunks


def _dm(data_dir, cache_dir, streamed: bool, **kwargs) -> DataModuleBase:
    kwargs = {"batch_size": 64, "tasks": TASKS, "positives": DualPositives(engagement_scale=0.3), **kwargs}
    if not streamed:
        return InMemoryDataModule(str(data_dir), **kwargs)
    return StreamedDataModule(
        str(data_dir), stream={"chunk_rows": CHUNK, "cache_dir": str(cache_dir)}, **kwargs
    )


@pytest.fixture(scope="module")
def pair(tiny_data, tmp_path_factory):
    """The same data and options, in memory and streamed (hard negatives and history on)."""
    cache = tmp_path_factory.mktemp("shards")
    extra = {"hard_negatives": 3, "history": {"max_len": 5}}
    memory, streamed = _dm(tiny_data, cache, False, **extra), _dm(tiny_data, cache, True, **extra)
    memory.setup("fit"), streamed.setup("fit")
    return memory, streamed


def _shard_columns(dm) -> dict[str, np.ndarray]:
    """Every shard's arrays concatenated, in shard order."""
    index = dm.train_set.index
    parts: dict[str, list[np.ndarray]] = {}
    for name in index.files:
        with np.load(index.dir / name) as z:
            for k in z.files:
                parts.setdefault(k, []).append(z[k])
    return {k: np.concatenate(v) for k, v in parts.items()}


def _row_keys(columns: dict[str, np.ndarray]) -> np.ndarray:
    """Rows as sortable tuples over every per-example column (2-D ones flattened into columns)."""
    cols = [v.reshape(len(v), -1).astype(np.float64) for _, v in sorted(columns.items())]
    rows = np.concatenate(cols, axis=1)
    return rows[np.lexsort(rows.T[::-1])]


def test_shards_hold_exactly_the_in_memory_training_examples(pair):
    memory, streamed = pair
    mem = memory.train_set
    cols = _shard_columns(streamed)
    assert streamed.train_set.n_examples == mem.n_examples == len(cols["item_pos"])
    ours = {f"q/{k}": v.numpy() for k, v in mem.user.items()}
    ours.update({f"w/{k}": v.numpy() for k, v in mem.weights.items()})
    ours["item_pos"] = mem.item_pos.numpy()
    theirs = {k: v for k, v in cols.items() if not k.startswith("neg_")}
    assert set(ours) == set(theirs)
    np.testing.assert_array_equal(_row_keys(ours), _row_keys(theirs))
    torch.testing.assert_close(streamed.train_set.item_log_q, mem.item_log_q)


def test_streamed_corpus_splits_and_queries_equal_the_in_memory_ones(pair):
    memory, streamed = pair
    assert streamed.split_days == memory.split_days and streamed.n_rows == memory.n_rows
    assert streamed.user_spec == memory.user_spec and streamed.item_spec == memory.item_spec
    for k, v in memory.item_features.items():  # item performance from a lazy scan of the train days
        torch.testing.assert_close(streamed.item_features[k], v)
    for split in ("val", "heldout"):
        a, b = memory.queries[split], streamed.queries[split]
        assert a.features.keys() == b.features.keys()
        for k in a.features:
            np.testing.assert_array_equal(a.features[k], b.features[k])
        for task in TASKS:
            for x, y in zip(a.positives[task], b.positives[task], strict=True):
                np.testing.assert_array_equal(x, y)


def test_an_epoch_serves_each_example_at_most_once_in_full_batches(pair):
    memory, streamed = pair
    batches = list(streamed.train_dataloader())
    assert len(batches) == len(streamed.train_set) == streamed.train_set.n_examples // 64
    assert all(len(b["item_pos"]) == 64 for b in batches)
    first = next(iter(memory.train_dataloader()))
    assert set(batches[0]) == set(first) and batches[0]["user"].keys() == first["user"].keys()
    # Rows are identified by (user, item, request time via the history); none served twice.
    keys = torch.cat([torch.stack([b["user"]["user_id"], b["item_pos"]], 1) for b in batches])
    hist = torch.cat([b["user"]["history"] for b in batches])
    rows = torch.cat([keys, hist], 1)
    cols = _shard_columns(streamed)
    all_rows = np.concatenate([np.stack([cols["q/user_id"], cols["item_pos"]], 1), cols["q/history"]], axis=1)
    _, counts = np.unique(all_rows, axis=0, return_counts=True)
    served, served_counts = torch.unique(rows, dim=0, return_counts=True)
    assert served_counts.max() <= counts.max()  # a duplicate row in the data may appear as often as it is
    assert len(served) >= len(rows) - (counts > 1).sum()
    # Another epoch: another order.
    again = next(iter(streamed.train_dataloader()))
    assert not torch.equal(again["item_pos"], batches[0]["item_pos"])


def test_hard_negatives_are_the_users_own_unengaged_impressions(pair, tiny_data):
    _, streamed = pair
    imp = pl.read_parquet(tiny_data / "impressions.parquet")
    unengaged = imp.filter(~(pl.col("clicked") | pl.col("saved") | pl.col("converted")))
    users, items = streamed.users.user_ids, streamed.items.item_ids
    pairs = set(zip(unengaged["user_id"].to_list(), unengaged["item_id"].to_list(), strict=True))
    batch = next(iter(streamed.train_dataloader()))
    hard, user = batch["hard_pos"], batch["user"]["user_id"] - 1
    assert hard.shape == (64, 3) and (hard >= 0).any()
    for u, row in zip(user.tolist(), hard.tolist(), strict=True):
        for item in row:
            assert item == -1 or (int(users[u]), int(items[item])) in pairs
    # -1 (masked) only where the user has no unengaged impression in the example's chunk.
    assert torch.all(batch["hard_item"]["item_id"] > 0)


def test_the_file_is_read_in_chunks_never_whole(tiny_data, tmp_path, monkeypatch):
    seen = []
    real = stream.iter_chunks

    def spy(path, chunk_rows):
        for chunk in real(path, chunk_rows):
            seen.append(chunk.height)
            yield chunk

    monkeypatch.setattr(stream, "iter_chunks", spy)
    monkeypatch.setattr(
        "convcg_cli.data.loading.datamodules.load_tables",
        lambda d, schemas: (
            pytest.fail("streamed setup loaded whole tables")
            if "impressions" in schemas
            else __import__("convcg_cli.data.contract", fromlist=["x"]).load_tables(d, schemas)
        ),
    )
    dm = _dm(tiny_data, tmp_path / "cache", True)
    dm.setup("fit")
    n = pl.scan_parquet(tiny_data / "impressions.parquet").select(pl.len()).collect().item()
    assert max(seen) <= CHUNK and sum(seen) == 2 * n  # one validation pass, one encoding pass


def test_shards_are_cached_and_evaluation_writes_none(tiny_data, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    ev = _dm(tiny_data, cache, True)
    ev.setup("validate")
    assert ev.train_set is None and not cache.exists()
    first = _dm(tiny_data, cache, True)
    first.setup("fit")
    (key,) = [p.name for p in cache.iterdir()]
    monkeypatch.setattr(
        "convcg_cli.data.loading.datamodules.write_shards",
        lambda *a, **k: pytest.fail("rewrote cached shards"),
    )
    monkeypatch.setattr(
        "convcg_cli.data.loading.datamodules.validate_chunks", lambda *a, **k: pytest.fail("revalidated")
    )
    again = _dm(tiny_data, cache, True)
    again.setup("fit")
    assert again.shard_dir.name == key and again.train_set.n_examples == first.train_set.n_examples
    # An option that changes the examples' content changes the key.
    monkeypatch.undo()
    other = _dm(tiny_data, cache, True, positives=DualPositives(engagement_scale=0.1))
    other.setup("validate")
    assert other.shard_dir.name != key


def test_a_failed_write_leaves_no_cache_behind(tiny_data, tmp_path):
    class Broken(DualPositives):
        def weights(self, rows, tasks):
            raise RuntimeError("boom")

    dm = _dm(tiny_data, tmp_path / "cache", True, positives=Broken())
    with pytest.raises(RuntimeError, match="boom"):
        dm.setup("fit")
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_writer_that_loses_the_race_keeps_the_winners_shards(pair, tmp_path):
    _, streamed = pair
    winner = streamed.train_set.index.dir
    target = tmp_path / "shards"
    shutil.copytree(winner, target)
    index = stream.write_shards(
        streamed.impressions_path,
        target,
        CHUNK,
        streamed.split_days["train"],
        streamed.inputs,
        TASKS,
        streamed.positives,
        load_schemas()["impressions"],
        hard_negatives=False,
    )
    assert index.has_hard_negatives  # the winner's shards (written with hard negative pools) are kept
    assert [p.name for p in tmp_path.iterdir()] == ["shards"]  # no temporary directory left


def test_a_bad_chunk_is_a_clear_error_naming_column_rows_and_range(tiny_tables, tmp_path):
    imp = tiny_tables["impressions"]
    bad = imp.with_columns(
        pl.when(pl.int_range(pl.len()) >= imp.height - 10)
        .then(None)
        .otherwise(pl.col("clicked"))
        .alias("clicked")
    )
    data = write_tables({**tiny_tables, "impressions": bad}, tmp_path / "data")
    with pytest.raises(DataValidationError) as err:
        _dm(data, tmp_path / "cache", True).setup("fit")
    text = str(err.value)
    assert "impressions.parquet, column 'clicked': 10 row(s) are null" in text
    last = (imp.height - 1) // CHUNK * CHUNK
    assert f"rows {last:,}..{imp.height - 1:,}" in text
    assert not (tmp_path / "cache").exists()


def _fake_world(monkeypatch, rank: int, world: int) -> None:
    monkeypatch.setattr("convcg_cli.distributed_env.rank_and_world", lambda: (rank, world))


def test_ranks_read_disjoint_shards_and_step_together(pair, monkeypatch):
    _, streamed = pair
    data = streamed.train_set
    per_rank = []
    for rank in range(2):
        _fake_world(monkeypatch, rank, 2)
        data.epoch = 0
        shards, n_batches, _ = data._assignment(0)
        batches = list(data)
        assert len(batches) == n_batches == len(data) > 0
        per_rank.append((set(shards[rank]), batches))
    assert not per_rank[0][0] & per_rank[1][0]
    assert per_rank[0][0] | per_rank[1][0] == set(range(len(data.index.files)))
    assert len(per_rank[0][1]) == len(per_rank[1][1])


def test_more_ranks_than_shards_is_a_clear_error(pair, monkeypatch):
    _, streamed = pair
    _fake_world(monkeypatch, 0, len(streamed.train_set.index.files) + 1)
    with pytest.raises(Exception, match="Lower data.stream.chunk_rows"):
        len(streamed.train_set)


def test_the_cache_key_covers_every_option_but_the_batching_ones(tiny_data, tmp_path):
    """The key is derived from the constructor options: a new option is in it by default; batch size,
    seed and the cache location are not (they cannot change the shards)."""

    class WithNewOption(StreamedDataModule):
        def __init__(self, dir, new_option: int = 0, **options) -> None:
            super().__init__(dir, **options)

    new = WithNewOption(str(tiny_data), **_options(tmp_path)).cache_key()
    assert WithNewOption(str(tiny_data), new_option=1, **_options(tmp_path)).cache_key() != new
    base = _dm(tiny_data, tmp_path, True).cache_key()
    assert _dm(tiny_data, tmp_path, True, batch_size=7, seed=3, eval_batch_size=5).cache_key() == base
    assert _dm(tiny_data, tmp_path / "elsewhere", True).cache_key() == base
    assert _dm(tiny_data, tmp_path, True, val_days=3).cache_key() != base
    assert _dm(tiny_data, tmp_path, True, end_offset_days=1).cache_key() != base
    bigger = StreamedDataModule(str(tiny_data), **{**_options(tmp_path), "stream": {"chunk_rows": CHUNK + 1}})
    assert bigger.cache_key() != base


def _options(cache_dir) -> dict:
    return {
        "batch_size": 64,
        "tasks": TASKS,
        "positives": DualPositives(engagement_scale=0.3),
        "stream": {"chunk_rows": CHUNK, "cache_dir": str(cache_dir)},
    }
