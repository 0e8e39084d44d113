"""Random corpus negatives (``RandomNegatives``, mixed negative sampling) pinned on hand-made tensors.

No datamodule: tiny column tensors, one hand-written npz shard and a stand-in for the DDP rank. The
mixture's share ``random_log_share`` is checked against the log of the expected number of draws of
each item (computed independently, and counted on many seeded draws); the draws are pinned at fixed
(seed, epoch, rank) keys, differ across them and from the other streams of the same key, and reach
the training batches of both data paths without moving the batch order or the item-id dropout.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from convcg_cli import distributed_env
from convcg_cli.data.loading.batches import (
    ItemIdDropout,
    RandomNegatives,
    ShardedBatches,
    ShuffledBatches,
)
from convcg_cli.data.loading.stream import ShardIndex

N_ITEMS = 40
ITEM_FEATURES = {"item_id": torch.arange(1, N_ITEMS + 1), "price": torch.arange(N_ITEMS).float() * 1.5}
ITEM_LOG_Q = -torch.arange(N_ITEMS).float() / 10


def _world(monkeypatch, rank: int, world: int) -> None:
    monkeypatch.setattr(distributed_env, "rank_and_world", lambda: (rank, world))


def _shuffled(n: int = 12, batch_size: int = 3, seed: int = 0, **kwargs) -> ShuffledBatches:
    user = {"user_id": torch.arange(1, n + 1), "row": torch.arange(n)}
    item_pos = (torch.arange(n) * 7) % N_ITEMS
    weights = {"conversion": torch.arange(n).float() / n}
    return ShuffledBatches(user, item_pos, weights, ITEM_FEATURES, ITEM_LOG_Q, batch_size, seed, **kwargs)


def _draws(count: int, n_items: int, generator: torch.Generator, batches: int) -> list[list[int]]:
    """Reference: ``batches`` successive uniform draws of ``count`` positions from one generator."""
    return [torch.randint(n_items, (count,), generator=generator).tolist() for _ in range(batches)]


# --- apply: the draws and the mixture's share ----------------------------------------------------------


@pytest.mark.parametrize(
    ("count", "n_items"),
    [(3, 10), (10, 10), (1, 1000), (50, 7)],  # a share below 1, exactly 1, tiny, above 1 (with replacement)
)
def test_the_log_share_is_the_log_of_the_expected_draws_of_each_item(count, n_items):
    neg = RandomNegatives(count)
    item_log_q = torch.zeros(n_items)
    out = neg.apply(
        {"item_pos": torch.arange(2)}, {"item_id": torch.arange(n_items)}, item_log_q, torch.Generator()
    )
    # M uniform draws with replacement from |I| items: each item is expected M * (1 / |I|) times.
    expected_count = count * (1.0 / n_items)
    assert float(out["random_log_share"]) == pytest.approx(math.log(expected_count), rel=1e-6, abs=1e-6)
    assert out["random_log_share"].shape == ()


def test_the_log_share_matches_the_counted_draws_of_every_item():
    count, n_items, batches = 3, 10, 4000
    neg = RandomNegatives(count)
    g = neg.stream(seed=0, epoch=0, rank=0)
    counts = torch.zeros(n_items)
    for _ in range(batches):
        out = neg.apply({}, {"item_id": torch.arange(n_items)}, torch.zeros(n_items), g)
        counts += torch.bincount(out["random_pos"], minlength=n_items)
    per_batch = counts / batches  # each item's mean number of draws in one batch
    share = math.exp(float(out["random_log_share"]))
    # standard error of each mean: sqrt(0.3 * 0.9 / 4000) ~ 0.008; every item within 5 of them
    assert torch.allclose(per_batch, torch.full((n_items,), share), atol=0.04)
    assert share == pytest.approx(0.3)


def test_the_drawn_items_carry_their_own_features_and_table_logq():
    neg = RandomNegatives(7)
    batch = {"item_pos": torch.tensor([1, 2]), "keep": "me"}
    out = neg.apply(batch, ITEM_FEATURES, ITEM_LOG_Q, neg.stream(seed=3, epoch=0, rank=0))
    pos = out["random_pos"]
    assert pos.shape == (7,) and int(pos.min()) >= 0 and int(pos.max()) < N_ITEMS
    assert torch.equal(out["random_item"]["item_id"], pos + 1)
    assert torch.equal(out["random_item"]["price"], pos.float() * 1.5)
    assert torch.equal(out["random_log_q"], -pos.float() / 10)
    assert out["keep"] == "me" and torch.equal(out["item_pos"], batch["item_pos"])
    assert "random_pos" not in batch  # a new dict: the batch itself is left alone


# --- stream: one seeded stream per (seed, epoch, rank) --------------------------------------------------


def test_random_negatives_pin_their_draws_at_fixed_keys():
    """A rerun of a recorded seed redraws the same corpus negatives, epoch by epoch and rank by rank."""
    neg = RandomNegatives(6)
    pinned = {
        (0, 0, 0): [363, 195, 862, 893, 914, 151],
        (0, 1, 0): [448, 72, 320, 51, 758, 906],
        (0, 0, 1): [864, 738, 60, 786, 554, 302],
        (7, 0, 0): [421, 114, 983, 800, 838, 955],
    }
    for key, draws in pinned.items():
        assert torch.randint(1000, (6,), generator=neg.stream(*key)).tolist() == draws, key


def test_random_negative_streams_differ_by_seed_epoch_and_rank_and_from_the_other_streams():
    neg = RandomNegatives(4)
    keys = [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (2, 3, 1)]
    firsts = {key: torch.rand(8, generator=neg.stream(*key)).tolist() for key in keys}
    assert len({tuple(v) for v in firsts.values()}) == len(keys)
    for key in keys:
        assert torch.rand(8, generator=neg.stream(*key)).tolist() == firsts[key]  # reproducible
        dropout = ItemIdDropout(0.5, {"item_id": torch.tensor(0)}).stream(*key)
        assert torch.rand(8, generator=dropout).tolist() != firsts[key]  # not the dropout's stream
        order = torch.Generator().manual_seed(key[0] + key[1])  # the batch order's generator
        assert torch.rand(8, generator=order).tolist() != firsts[key]


# --- the training batches -----------------------------------------------------------------------------


def test_shuffled_batches_draw_random_negatives_from_their_epoch_and_rank_stream(monkeypatch):
    neg = RandomNegatives(5)
    for rank in (0, 1):
        _world(monkeypatch, rank, 2)
        plain, mixed = _shuffled(seed=4), _shuffled(seed=4, random_negatives=neg)
        for epoch in (0, 1):
            expected = _draws(5, N_ITEMS, neg.stream(seed=4, epoch=epoch, rank=rank), len(mixed))
            got = list(mixed)
            assert [b["random_pos"].tolist() for b in got] == expected, (rank, epoch)
            for a, b in zip(list(plain), got, strict=True):  # the same batches, in the same order
                assert "random_pos" not in a
                assert torch.equal(a["item_pos"], b["item_pos"]) and torch.equal(
                    a["user"]["row"], b["user"]["row"]
                )
                assert torch.equal(b["random_log_q"], ITEM_LOG_Q[b["random_pos"]])
                assert float(b["random_log_share"]) == pytest.approx(math.log(5 / N_ITEMS))


def test_random_negatives_leave_the_item_id_dropout_alone(monkeypatch):
    _world(monkeypatch, 0, 1)
    dropout = ItemIdDropout(0.5, {"item_id": torch.tensor(0)})
    neg = RandomNegatives(4)
    dropped = list(_shuffled(seed=1, item_id_dropout=dropout))
    both = list(_shuffled(seed=1, item_id_dropout=dropout, random_negatives=neg))
    assert [b["random_pos"].tolist() for b in both] == _draws(4, N_ITEMS, neg.stream(1, 0, 0), len(both))
    gone = 0
    for a, b in zip(dropped, both, strict=True):
        assert torch.equal(a["item"]["item_id"], b["item"]["item_id"])  # the same rows dropped
        gone += int((b["item"]["item_id"] == 0).sum())
    assert 0 < gone < len(both) * 3
    # the random negatives are corpus items, never dropped
    assert all(bool((b["random_item"]["item_id"] > 0).all()) for b in both)


def test_sharded_batches_draw_the_same_random_negatives_as_in_memory(tmp_path, monkeypatch):
    _world(monkeypatch, 0, 1)
    n = 12
    rows = np.arange(n)
    np.savez(
        tmp_path / "shard-00000.npz",
        **{"q/user_id": rows + 1, "q/row": rows, "w/conversion": (rows / 100).astype(np.float32)},
        item_pos=rows % N_ITEMS,
    )
    index = ShardIndex(tmp_path, ["shard-00000.npz"], [n], np.ones(N_ITEMS, np.int64), False, {})
    neg = RandomNegatives(3)
    sharded = ShardedBatches(index, ITEM_FEATURES, ITEM_LOG_Q, 4, 9, random_negatives=neg)
    in_memory = _shuffled(n=n, batch_size=4, seed=9, random_negatives=neg)
    for epoch in (0, 1):
        got = [b["random_pos"].tolist() for b in sharded]
        assert got == _draws(3, N_ITEMS, neg.stream(seed=9, epoch=epoch, rank=0), 3), epoch
        assert got == [b["random_pos"].tolist() for b in in_memory], epoch
