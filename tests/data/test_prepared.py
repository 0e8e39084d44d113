"""PreparedDataCache: set-up data reused across datamodules of the same data and content options."""

from __future__ import annotations

import os

import pytest
import torch

from convcg_cli.data.features import DualPositives
from convcg_cli.data.loading import InMemoryDataModule, PreparedDataCache, StreamedDataModule, prepared_key
from convcg_cli.data.loading import datamodules as datamodule_module

TASKS = ["conversion", "engagement"]


def _dm(data_dir, **options):
    base = {"batch_size": 64, "tasks": TASKS, "hard_negatives": 2, "positives": DualPositives()}
    return InMemoryDataModule(str(data_dir), **{**base, **options})


def _batches(dm, n: int = 3) -> list[dict]:
    it = iter(dm.train_dataloader())
    return [next(it) for _ in range(n)]


def _assert_same_batches(a: list[dict], b: list[dict]) -> None:
    for left, right in zip(a, b, strict=True):
        for name in ("item_pos", "log_q", "hard_pos"):
            torch.testing.assert_close(left[name], right[name], rtol=0, atol=0)
        for part in ("user", "item", "weights"):
            for name, value in left[part].items():
                torch.testing.assert_close(value, right[part][name], rtol=0, atol=0, msg=name)


@pytest.fixture
def counted_reads(monkeypatch):
    """How often the tables are read: once per real set-up."""
    reads = []
    original = datamodule_module.load_tables

    def counting(*args, **kwargs):
        reads.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(datamodule_module, "load_tables", counting)
    return reads


def test_the_key_follows_content_options_and_data_not_batch_size_or_seed(tiny_dir):
    key = prepared_key(_dm(tiny_dir))
    assert prepared_key(_dm(tiny_dir, batch_size=32, seed=7, eval_batch_size=5)) == key
    assert prepared_key(_dm(tiny_dir, val_days=3)) != key
    assert prepared_key(_dm(tiny_dir, hard_negatives=0)) != key
    assert prepared_key(StreamedDataModule(str(tiny_dir), tasks=TASKS)) != prepared_key(
        InMemoryDataModule(str(tiny_dir), tasks=TASKS)
    )
    items = tiny_dir / "items.parquet"
    items.write_bytes(items.read_bytes())  # same bytes, new mtime: the same data
    os.utime(items, (1, 1))
    assert prepared_key(_dm(tiny_dir)) == key
    (tiny_dir / "users.parquet").write_bytes((tiny_dir / "users.parquet").read_bytes() + b"\0")
    assert prepared_key(_dm(tiny_dir)) != key  # other bytes: other data


def test_a_cache_hit_gives_the_batches_of_a_fresh_setup(tiny_dir, counted_reads):
    cache = PreparedDataCache()
    first = _dm(tiny_dir)
    cache.setup(first, "fit")
    _batches(first, 2)  # a training epoch advances the first one's batch order
    hit = _dm(tiny_dir, seed=3, batch_size=32)
    cache.setup(hit, "fit")
    assert (cache.hits, cache.misses, len(counted_reads)) == (1, 1, 1)
    fresh = _dm(tiny_dir, seed=3, batch_size=32)
    fresh.setup("fit")
    assert hit.train_set.epoch == 0 and hit.train_set.batch_size == 32 and hit.train_set.seed == 3
    assert first.train_set.batch_size == 64  # the cached datamodule keeps its own order
    _assert_same_batches(_batches(hit), _batches(fresh))
    assert hit.split_days == fresh.split_days and hit.n_rows == fresh.n_rows
    for name, values in fresh.queries["heldout"].features.items():
        assert (hit.queries["heldout"].features[name] == values).all(), name


@pytest.mark.parametrize("first_p, then_p", [(0.0, 0.5), (0.5, 0.0)])
def test_a_cache_hit_keeps_its_own_item_id_dropout(tiny_dir, counted_reads, first_p, then_p):
    """Cold-start training (``item_id_dropout``) is drawn per batch, not part of the set-up data: a
    cell with another dropout shares the set-up and still gets its own batches."""
    cache = PreparedDataCache()
    cache.setup(_dm(tiny_dir, item_id_dropout=first_p), "fit")
    hit = _dm(tiny_dir, item_id_dropout=then_p)
    cache.setup(hit, "fit")
    assert cache.hits == 1
    fresh = _dm(tiny_dir, item_id_dropout=then_p)
    fresh.setup("fit")
    assert (hit.train_set.item_id_dropout is None) == (then_p == 0.0)
    _assert_same_batches(_batches(hit), _batches(fresh))


def test_another_option_is_set_up_anew(tiny_dir, counted_reads):
    cache = PreparedDataCache()
    cache.setup(_dm(tiny_dir), "fit")
    cache.setup(_dm(tiny_dir, val_days=3), "fit")
    assert (cache.hits, cache.misses, len(counted_reads)) == (0, 2, 2)


def test_the_directory_is_shared_by_caches_of_other_processes(tiny_dir, tmp_path, counted_reads):
    """A launcher's jobs share the directory: a second cache (another job) reads the pickled state."""
    writer, reader = PreparedDataCache(tmp_path / "shared"), PreparedDataCache(tmp_path / "shared")
    written = _dm(tiny_dir)
    writer.setup(written, "fit")
    read = _dm(tiny_dir)
    reader.setup(read, "fit")
    assert (reader.hits, len(counted_reads)) == (1, 1)
    assert [p.suffix for p in (tmp_path / "shared").iterdir()] == [".pkl"]  # no temp file left
    _assert_same_batches(_batches(read), _batches(written))


def test_the_cache_travels_to_a_job_without_its_states(tiny_dir, tmp_path):
    import pickle

    cache = PreparedDataCache(tmp_path / "shared")
    cache.setup(_dm(tiny_dir), "fit")
    travelled = pickle.loads(pickle.dumps(cache))
    assert travelled.directory == cache.directory and not travelled._states


def test_the_cache_keeps_only_the_newest_states(tiny_dir):
    cache = PreparedDataCache(max_entries=1)
    cache.setup(_dm(tiny_dir), "fit")
    cache.setup(_dm(tiny_dir, val_days=3), "fit")
    cache.setup(_dm(tiny_dir), "fit")
    assert (cache.hits, cache.misses) == (0, 3)
