"""Batches and hard negatives pinned on hand-made tensors and shards (``make mutate``).

No datamodule: tiny column tensors, hand-written npz shards and a stand-in for the DDP rank, so the
arithmetic of :mod:`convcg_cli.data.loading.batches` and ``negatives`` is checked against plain
references: logQ of the batch's own items, a new permutation every epoch, every item of a user's
pool reachable (uniformly), partial batches counted right, and one hard-negative stream per rank.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest
import torch
from scipy import stats

from convcg_cli import distributed_env
from convcg_cli.data.loading import batches as B
from convcg_cli.data.loading.batches import (
    HardNegativeSampler,
    ItemIdDropout,
    SequentialBatches,
    ShardedBatches,
    ShuffledBatches,
    assemble_batch,
    draw_hard_negatives,
    reordered,
)
from convcg_cli.data.loading.negatives import ImpressionNegatives, impression_negatives
from convcg_cli.data.loading.stream import ShardIndex
from convcg_cli.errors import ConfigError

N_ITEMS = 100
ITEM_FEATURES = {"item_id": torch.arange(1, N_ITEMS + 1), "price": torch.arange(N_ITEMS).float() * 1.5}
ITEM_LOG_Q = -torch.arange(N_ITEMS).float() / 10


def _world(monkeypatch, rank: int, world: int) -> None:
    monkeypatch.setattr(distributed_env, "rank_and_world", lambda: (rank, world))


def _shuffled(n: int = 10, batch_size: int = 3, seed: int = 0, **kwargs) -> ShuffledBatches:
    user = {"user_id": torch.arange(1, n + 1), "row": torch.arange(n)}  # "row": the example's index
    item_pos = (torch.arange(n) * 7) % N_ITEMS
    weights = {"conversion": torch.arange(n).float() / n}
    return ShuffledBatches(user, item_pos, weights, ITEM_FEATURES, ITEM_LOG_Q, batch_size, seed, **kwargs)


def _rows(batch: dict) -> list[int]:
    return batch["user"]["row"].tolist()


# --- assemble_batch -----------------------------------------------------------------------------------


def test_a_batch_reads_features_and_logq_of_its_own_items():
    item_pos = torch.tensor([7, 2, 2, 15])
    hard_pos = torch.tensor([[3, -1], [0, 19], [-1, -1], [5, 5]])
    user = {"cofactor_user_0": torch.ones(4), "age": torch.arange(4.0)}
    shares = {"cofactor_user_0": torch.arange(N_ITEMS).float() / 100}
    out = assemble_batch(
        user, {"conversion": torch.ones(4)}, item_pos, ITEM_FEATURES, ITEM_LOG_Q, hard_pos, shares
    )
    assert out["log_q"].tolist() == pytest.approx([-0.7, -0.2, -0.2, -1.5])
    assert out["item"]["item_id"].tolist() == [8, 3, 3, 16] and out["item_pos"] is item_pos
    assert out["hard_pos"] is hard_pos
    # Padding (-1) reads item 0's row (the loss masks it by hard_pos); rows are (B * H,) flat.
    assert out["hard_item"]["item_id"].tolist() == [4, 1, 1, 20, 1, 1, 6, 6]
    assert out["user"]["cofactor_user_0"].tolist() == pytest.approx([0.93, 0.98, 0.98, 0.85])
    assert out["user"]["age"].tolist() == [0, 1, 2, 3]
    plain = assemble_batch(user, {}, item_pos, ITEM_FEATURES, ITEM_LOG_Q)
    assert "hard_pos" not in plain and "hard_item" not in plain and plain["user"] is user


# --- ShuffledBatches ----------------------------------------------------------------------------------


def test_every_epoch_is_a_new_permutation_seeded_by_seed_plus_epoch():
    data = _shuffled(n=10, batch_size=3, seed=5)
    epochs = [[_rows(b) for b in data] for _ in range(3)]
    for epoch, batches in enumerate(epochs):
        perm = torch.randperm(10, generator=torch.Generator().manual_seed(5 + epoch)).tolist()
        assert batches == [perm[0:3], perm[3:6], perm[6:9]]  # the partial last batch is dropped
    assert epochs[0] != epochs[1] != epochs[2]
    again = reordered(data, batch_size=5, seed=5)  # from epoch 0, another batch size
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(5)).tolist()
    assert [_rows(b) for b in again] == [perm[:5], perm[5:]] and data.epoch == 3


def test_a_batch_keeps_its_rows_together():
    data = _shuffled(n=12, batch_size=4)
    for batch in data:
        rows = batch["user"]["row"]
        assert torch.equal(batch["item_pos"], (rows * 7) % N_ITEMS)
        assert torch.equal(batch["log_q"], ITEM_LOG_Q[(rows * 7) % N_ITEMS])
        assert torch.equal(batch["weights"]["conversion"], rows.float() / 12)


@pytest.mark.parametrize(
    "n, batch_size, world, expected",
    [(10, 3, 1, 3), (9, 3, 1, 3), (2, 3, 1, 1), (13, 3, 2, 2), (12, 3, 2, 2), (5, 3, 2, 1)],
)
def test_batches_per_epoch_drop_the_partial_batch(monkeypatch, n, batch_size, world, expected):
    _world(monkeypatch, 0, world)
    data = _shuffled(n=n, batch_size=batch_size)
    assert len(data) == expected and data.n_examples == n
    assert len(list(data)) == expected


def test_fewer_rows_than_a_batch_make_one_smaller_batch():
    (only,) = list(_shuffled(n=2, batch_size=3))
    assert sorted(_rows(only)) == [0, 1]


def test_ranks_split_the_global_batch_of_one_process(monkeypatch):
    single = [_rows(b) for b in _shuffled(n=14, batch_size=6, seed=2)]  # 2 global batches of 6
    per_rank = []
    for rank in (0, 1):
        _world(monkeypatch, rank, 2)
        per_rank.append([_rows(b) for b in _shuffled(n=14, batch_size=3, seed=2)])
    assert [len(r) for r in per_rank] == [2, 2]
    for i in range(2):
        assert per_rank[0][i] + per_rank[1][i] == single[i]
    # Fewer rows than world * batch_size: one equal, smaller batch per rank.
    small = []
    for rank in (0, 1):
        _world(monkeypatch, rank, 2)
        small.append([_rows(b) for b in _shuffled(n=5, batch_size=3, seed=2)])
    perm = torch.randperm(5, generator=torch.Generator().manual_seed(2)).tolist()
    assert small == [[perm[0:2]], [perm[2:4]]]


def _pools(n_users: int, size: int) -> ImpressionNegatives:
    """User u's pool: items u*size .. u*size + size - 1 (mod N_ITEMS)."""
    items = (np.arange(n_users * size) % N_ITEMS).astype(np.int64)
    return ImpressionNegatives(np.arange(n_users) * size, np.full(n_users, size), items)


def test_hard_negatives_come_from_the_rows_own_user_pool():
    pools = _pools(10, 2)
    data = _shuffled(n=10, batch_size=5, hard_negatives=HardNegativeSampler(pools, per_example=4))
    for batch in data:
        for row, hard in zip(_rows(batch), batch["hard_pos"].tolist(), strict=True):
            assert set(hard) <= {
                (2 * row) % N_ITEMS,
                (2 * row + 1) % N_ITEMS,
            }  # user_id row+1 -> position row
    # Outside an epoch, a batch is drawn from the dataset's seed: the same draws each time.
    idx = torch.tensor([0, 3])
    assert torch.equal(data.batch(idx)["hard_pos"], data.batch(idx)["hard_pos"])


def test_each_rank_draws_its_own_hard_negative_stream(monkeypatch):
    one_pool = ImpressionNegatives(np.zeros(8, np.int64), np.full(8, N_ITEMS), np.arange(N_ITEMS))
    draws = []
    for rank in (0, 1):
        _world(monkeypatch, rank, 2)
        data = _shuffled(n=8, batch_size=4, hard_negatives=HardNegativeSampler(one_pool, per_example=6))
        draws.append([b["hard_pos"] for b in data])
    assert not torch.equal(draws[0][0], draws[1][0])  # every user shares the pool: only the stream differs


def test_item_id_dropout_keeps_the_order_and_the_hard_negatives():
    pools = _pools(10, 3)
    dropout = ItemIdDropout(0.5, {"item_id": torch.tensor(0), "price": torch.tensor(-1.0)})
    plain = list(_shuffled(hard_negatives=HardNegativeSampler(pools, 2)))
    dropped = list(_shuffled(hard_negatives=HardNegativeSampler(pools, 2), item_id_dropout=dropout))
    changed = 0
    for a, b in zip(plain, dropped, strict=True):
        assert torch.equal(a["item_pos"], b["item_pos"]) and torch.equal(a["hard_pos"], b["hard_pos"])
        gone = b["item"]["item_id"] == 0
        assert torch.equal(b["item"]["price"][gone], torch.full((int(gone.sum()),), -1.0))
        assert torch.equal(b["item"]["item_id"][~gone], a["item"]["item_id"][~gone])
        changed += int(gone.sum())
    assert 0 < changed < 9


# --- ItemIdDropout ------------------------------------------------------------------------------------


def test_item_id_dropout_replaces_a_share_of_whole_rows():
    drop = ItemIdDropout(0.3, {"item_id": torch.tensor(0), "vector": torch.tensor([9.0, 9.0])})
    n = 4000
    item = {"item_id": torch.arange(1, n + 1), "vector": torch.zeros(n, 2), "price": torch.ones(n)}
    out = drop.apply(item, drop.stream(seed=0, epoch=0, rank=0))
    gone = out["item_id"] == 0
    assert stats.binomtest(int(gone.sum()), n, 0.3).pvalue > 0.001
    assert torch.equal(out["vector"][gone], torch.full((int(gone.sum()), 2), 9.0))
    assert torch.equal(out["vector"][~gone], torch.zeros(int((~gone).sum()), 2))
    assert out["price"] is item["price"] and out["item_id"].dtype == item["item_id"].dtype
    assert (
        ItemIdDropout(0.0, {"item_id": torch.tensor(0)}).apply(item, torch.Generator())["item_id"] > 0
    ).all()
    assert (
        ItemIdDropout(1.0, {"item_id": torch.tensor(0)}).apply(item, torch.Generator())["item_id"] == 0
    ).all()


def test_item_id_dropout_streams_differ_by_seed_epoch_and_rank():
    drop = ItemIdDropout(0.5, {"item_id": torch.tensor(0)})
    firsts = {
        key: torch.rand(8, generator=drop.stream(*key)).tolist()
        for key in [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1)]
    }
    assert len({tuple(v) for v in firsts.values()}) == 4
    assert torch.rand(8, generator=drop.stream(0, 0, 0)).tolist() == firsts[(0, 0, 0)]


# --- draw_hard_negatives and the pools ----------------------------------------------------------------


def test_hard_negatives_are_uniform_over_the_whole_pool():
    start, count = torch.tensor([0, 3, 3, 7]), torch.tensor([3, 0, 4, 0])  # the last pool: empty, at the end
    items = torch.tensor([10, 11, 12, 20, 21, 22, 23])
    drawn = draw_hard_negatives(start, count, items, per_example=6000, g=torch.Generator().manual_seed(0))
    assert drawn.shape == (4, 6000)
    assert (drawn[1] == -1).all() and (drawn[3] == -1).all()
    for row, pool in ((0, [10, 11, 12]), (2, [20, 21, 22, 23])):
        freq = torch.stack([(drawn[row] == i).sum() for i in pool]).numpy()
        assert freq.sum() == 6000  # nothing outside the pool
        assert stats.chisquare(freq).pvalue > 0.001  # every item, the last one too, with 1 / count
    # No pool items at all: padding everywhere.
    none = draw_hard_negatives(torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long),
                               torch.zeros(0, dtype=torch.long), 3, torch.Generator())  # fmt: skip
    assert none.tolist() == [[-1] * 3] * 2


def test_a_one_item_pool_is_drawn_and_an_empty_pool_after_it_is_padding():
    start, count, items = torch.tensor([0, 1, 0]), torch.tensor([1, 0, 0]), torch.tensor([42])
    drawn = draw_hard_negatives(start, count, items, per_example=5, g=torch.Generator().manual_seed(1))
    assert drawn.tolist() == [[42] * 5, [-1] * 5, [-1] * 5]


def test_impression_negatives_group_each_users_unengaged_items():
    impressions = pl.DataFrame(
        {
            "user_id": [20, 10, 20, 30, 20, 10, 30],
            "item_id": [300, 100, 100, 400, 200, 200, 100],
            "converted": [False, False, True, False, False, False, False],
            "clicked": [False, True, False, False, False, False, True],
            "saved": [False] * 7,
        }
    )
    users = SimpleNamespace(user_ids=np.array([10, 20, 30, 40]))  # 40: never served
    items = SimpleNamespace(item_ids=np.array([100, 200, 300, 400]))
    conv = impression_negatives(impressions, users, items, ["conversion"])
    # For conversion alone a click is not engagement: user 10 keeps items 100 and 200.
    assert conv.count.tolist() == [2, 2, 2, 0] and conv.start.tolist() == [0, 2, 4, 6]
    assert conv.items.tolist() == [0, 1, 2, 1, 3, 0]  # per user, in log order
    both = impression_negatives(impressions, users, items, ["conversion", "engagement"])
    assert both.count.tolist() == [1, 2, 1, 0] and both.start.tolist() == [0, 1, 3, 4]
    assert both.items.tolist() == [1, 2, 1, 3]


# --- SequentialBatches --------------------------------------------------------------------------------


@pytest.mark.parametrize("n, batch_size", [(10, 3), (9, 3), (1, 4), (4, 4)])
def test_sequential_batches_keep_the_partial_last_batch(n, batch_size):
    data = SequentialBatches({"x": torch.arange(n) * 2, "y": torch.arange(n).float()}, batch_size)
    batches = list(data)
    assert len(data) == len(batches) == -(-n // batch_size)
    assert torch.cat([b["query_index"] for b in batches]).tolist() == list(range(n))
    for b in batches:
        assert torch.equal(b["user"]["x"], b["query_index"] * 2)
        assert len(b["user"]["y"]) == len(b["query_index"]) <= batch_size


# --- ShardedBatches -----------------------------------------------------------------------------------


def _shards(tmp_path, sizes=(5, 4, 6), pool: int = 3) -> ShardIndex:
    """Hand-written shards in ``tmp_path``: row r of the data is user r+1 and item r % N_ITEMS; user
    r's pool in its shard is ``pool`` items r*10 + 0 .. pool - 1 (mod N_ITEMS), so a draw names its
    row's user."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    files, first = [], 0
    for s, n in enumerate(sizes):
        rows = np.arange(first, first + n)
        name = f"shard-{s:05d}.npz"
        np.savez(
            tmp_path / name,
            **{"q/user_id": rows + 1, "q/row": rows, "w/conversion": (rows / 100).astype(np.float32)},
            item_pos=rows % N_ITEMS,
            neg_start=np.arange(n) * pool,
            neg_count=np.full(n, pool),
            neg_items=np.array([(r * 10 + j) % 100 for r in rows for j in range(pool)]),
        )
        files.append(name)
        first += n
    return ShardIndex(tmp_path, files, list(sizes), np.ones(N_ITEMS, np.int64), True, {})


def _sharded(index, batch_size=4, seed=0, hard=2) -> ShardedBatches:
    return ShardedBatches(index, ITEM_FEATURES, ITEM_LOG_Q, batch_size, seed, hard_negatives=hard)


def test_sharded_batches_serve_full_batches_of_distinct_rows_with_their_users_pools(tmp_path):
    data = _sharded(_shards(tmp_path))  # 15 rows, batches of 4: 3 per epoch
    assert data.n_examples == 15 and len(data) == 3
    epochs = []
    for _ in range(2):
        batches = list(data)
        assert [len(b["item_pos"]) for b in batches] == [4, 4, 4]
        rows = torch.cat([b["user"]["row"] for b in batches])
        assert len(set(rows.tolist())) == 12 and set(rows.tolist()) <= set(range(15))
        for b in batches:
            r = b["user"]["row"]
            assert torch.equal(b["item_pos"], r % N_ITEMS) and torch.equal(
                b["log_q"], ITEM_LOG_Q[r % N_ITEMS]
            )
            assert torch.equal(b["user"]["user_id"], r + 1) and b["user"].keys() == {"user_id", "row"}
            assert b["weights"].keys() == {"conversion"}
            assert torch.equal(b["weights"]["conversion"], (r / 100).float())
            assert ((b["hard_pos"] // 10) % 10 == r[:, None] % 10).all() and b["hard_pos"].shape == (4, 2)
        epochs.append(rows.tolist())
    assert epochs[0] != epochs[1]


def test_sharded_ranks_read_disjoint_shards_and_yield_equally_many_batches(tmp_path, monkeypatch):
    index = _shards(tmp_path, sizes=(5, 4, 6, 3))
    rows, counts, hard = [], [], []
    for rank in (0, 1):
        _world(monkeypatch, rank, 2)
        data = _sharded(index, batch_size=3, hard=4)
        shards, n_batches, _ = data._assignment(0)
        batches = list(data)
        counts.append((len(data), len(batches)))
        expected = min(sum(index.rows[s] for s in mine) for mine in shards) // 3
        assert n_batches == expected and len(batches) == expected
        rows.append({r for b in batches for r in b["user"]["row"].tolist()})
        hard.append(batches[0]["hard_pos"] % 10)  # the draw's offset in its pool
    assert counts[0] == counts[1] and not rows[0] & rows[1]
    assert not torch.equal(hard[0], hard[1])  # one stream per rank


def test_each_rank_draws_its_own_hard_negatives_from_equal_shards(tmp_path, monkeypatch):
    index = _shards(tmp_path, sizes=(4, 4))
    offsets = []
    for rank in (0, 1):
        _world(monkeypatch, rank, 2)
        (batch,) = list(_sharded(index, batch_size=4, hard=6))
        order = torch.argsort(batch["user"]["row"])
        offsets.append(batch["hard_pos"][order] % 10)  # (4, 6) draws of the shard's rows, in row order
    assert not torch.equal(offsets[0], offsets[1])


def _epochs(data, n: int) -> list[list[tuple]]:
    return [[(b["item_pos"].tolist(), b["hard_pos"].tolist()) for b in data] for _ in range(n)]


def test_epoch_e_of_seed_s_is_epoch_0_of_seed_s_plus_e(tmp_path):
    """Both training paths draw each epoch (order and hard negatives) from ``seed + epoch`` alone."""
    pools = _pools(12, 5)
    shuffled = [
        _shuffled(n=12, batch_size=4, seed=s, hard_negatives=HardNegativeSampler(pools, 3)) for s in (3, 5)
    ]
    index = _shards(tmp_path, sizes=(4, 4, 4, 4, 4))
    sharded = [_sharded(index, seed=s) for s in (3, 5)]
    for seed_3, seed_5 in (shuffled, sharded):
        assert _epochs(seed_5, 1)[0] == _epochs(seed_3, 3)[2]
    # Batches the size of a shard: each batch is one shard, in the epoch's shard order.
    for epoch, batches in enumerate(_epochs(_sharded(index, seed=7), 3)):
        order = torch.randperm(5, generator=torch.Generator().manual_seed(7 + epoch)).tolist()
        assert [items[0] // 4 for items, _ in batches] == order


def test_reordered_batches_start_again_from_epoch_zero(tmp_path):
    shuffled = _shuffled(n=12, batch_size=4, seed=2)
    sharded = _sharded(_shards(tmp_path), seed=2)
    for data in (shuffled, sharded):
        first = [b["item_pos"].tolist() for b in data]
        list(data)  # another epoch
        again = reordered(data, batch_size=4, seed=2)
        assert [b["item_pos"].tolist() for b in again] == first


def test_sharded_rows_fewer_than_a_batch_make_one_smaller_batch(tmp_path, monkeypatch):
    data = _sharded(_shards(tmp_path, sizes=(3, 2)), batch_size=10)
    assert len(data) == 1
    (only,) = list(data)
    assert sorted(only["user"]["row"].tolist()) == [0, 1, 2, 3, 4]
    _world(monkeypatch, 1, 2)
    (mine,) = list(_sharded(data.index, batch_size=10))
    assert len(mine["item_pos"]) == 2  # the fewest rows any rank holds
    _world(monkeypatch, 0, 1)
    (one,) = list(_sharded(_shards(tmp_path / "one", sizes=(1,)), batch_size=4))
    assert one["user"]["row"].tolist() == [0]


def test_sharded_batches_refuse_too_few_shards_and_missing_pools(tmp_path, monkeypatch):
    index = _shards(tmp_path, sizes=(4, 4))
    _world(monkeypatch, 0, 2)
    assert len(_sharded(index)) == 1  # as many shards as ranks is enough
    _world(monkeypatch, 0, 3)
    with pytest.raises(ConfigError, match="2 shard"):
        len(_sharded(index))
    no_pools = ShardIndex(index.dir, index.files, index.rows, index.item_counts, False, {})
    with pytest.raises(ConfigError, match="hard negative pools"):
        _sharded(no_pools)
    _world(monkeypatch, 0, 1)
    plain = next(iter(_sharded(no_pools, hard=0)))
    assert "hard_pos" not in plain


def test_the_hard_negative_stream_constant_is_its_own():
    assert B._DROPOUT_STREAM == 0x1D
