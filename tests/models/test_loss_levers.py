"""The design's loss levers, pinned on tiny batches: weighted positives, impression hard negatives,
streaming logQ and the advertiser-level softmax."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from convcg_cli.models.losses import (
    MultiTaskSampledSoftmax,
    StreamingLogQ,
    advertiser_softmax_loss,
    sampled_softmax_loss,
)
from convcg_cli.tasks import CONVERSION

# logits = QUERY @ ITEMS.T = [[1, 0, 0], [0, 1, 0], [1, 1, 0]]
QUERY = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
ITEMS = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
IDS = torch.tensor([10, 11, 12])
ALL = torch.ones(3, dtype=torch.bool)


def test_row_weights_give_a_weighted_mean_of_cross_entropies() -> None:
    w = torch.tensor([1.0, 0.25, 0.0])  # row 2 is not an anchor
    loss = sampled_softmax_loss(QUERY, ITEMS, IDS, None, w > 0, 1.0, weight=w)
    row0 = -1 + math.log(math.e + 2)  # 0.5514
    row1 = row0
    assert loss.item() == pytest.approx((1.0 * row0 + 0.25 * row1) / 1.25, abs=1e-6)
    assert loss.item() == pytest.approx(0.551445, abs=1e-6)


def test_hard_negatives_are_extra_columns_without_logq() -> None:
    # Row 0 gets one hard negative [0.5, 0.5] (logit 0.5) and one padding slot; rows 1-2 only padding.
    hard_items = torch.tensor([[[0.5, 0.5], [9.0, 9.0]], [[0.0, 0.0]] * 2, [[0.0, 0.0]] * 2])
    hard_ids = torch.tensor([[20, -1], [-1, -1], [-1, -1]])
    log_q = torch.tensor([0.3, -0.2, 1.1])
    anchor = torch.tensor([True, False, False])
    loss = sampled_softmax_loss(
        QUERY, ITEMS, IDS, log_q, anchor, 1.0, hard_items=hard_items, hard_ids=hard_ids
    )
    in_batch = torch.tensor([1.0, 0.0, 0.0]) - log_q  # logQ on in-batch columns only
    logits = torch.cat([in_batch, torch.tensor([0.5])])  # the padded 9.0 column is masked
    expected = -logits[0] + torch.logsumexp(logits, 0)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert loss.item() == pytest.approx(0.951874, abs=1e-5)  # -0.7 + log(e^.7 + e^.2 + e^-1.1 + e^.5)


def test_hard_negative_equal_to_the_positive_is_masked() -> None:
    hard_items = ITEMS[[0]].expand(3, 1, 2)  # every row's hard negative embeds like item 10
    with_hit = sampled_softmax_loss(
        QUERY, ITEMS, IDS, None, ALL[:1].expand(3) & torch.tensor([True, False, False]), 1.0,
        hard_items=hard_items, hard_ids=torch.tensor([[10], [-1], [-1]]),
    )  # fmt: skip
    without = sampled_softmax_loss(QUERY, ITEMS, IDS, None, torch.tensor([True, False, False]), 1.0)
    assert with_hit.item() == pytest.approx(without.item(), abs=1e-6)


def test_positive_column_can_point_into_a_global_batch() -> None:
    # As under DDP: this process's 2 rows, candidates from 2 processes (4 columns), our rows are 2..3.
    items = torch.cat([torch.randn(2, 2), ITEMS[:2]])
    ids = torch.tensor([50, 51, 10, 11])
    loss = sampled_softmax_loss(QUERY[:2], items, ids, None, ALL[:2], 1.0, positive=torch.tensor([2, 3]))
    expected = F.cross_entropy(QUERY[:2] @ items.T, torch.tensor([2, 3]))
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)


def test_streaming_logq_follows_yi_et_al() -> None:
    est = StreamingLogQ(num_buckets=8, alpha=0.5)
    est(torch.tensor([1, 2]))  # step 0: first sightings -> interval 1
    est(torch.tensor([1, 1]))  # step 1: item 1 again, gap 1 -> 0.5 * 1 + 0.5 * 1 = 1
    est(torch.tensor([3]))  # step 2: first sighting of 3 -> interval 3
    est(torch.tensor([2]))  # step 3: item 2, gap 3 -> 0.5 * 1 + 0.5 * 3 = 2
    est.eval()
    log_q = est(torch.tensor([1, 2, 3]))
    assert torch.allclose(log_q, -torch.log(torch.tensor([1.0, 2.0, 3.0])))
    assert est.step.item() == 4  # eval calls do not advance the stream


def test_streaming_logq_ranks_frequent_items_higher() -> None:
    est = StreamingLogQ(num_buckets=16, alpha=0.05)
    g = torch.Generator().manual_seed(0)
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    for _ in range(2000):
        est(torch.multinomial(probs, 4, replacement=True, generator=g))
    est.eval()
    log_q = est(torch.arange(4))
    assert torch.all(log_q[:-1] > log_q[1:])


def test_advertiser_loss_pools_items_by_advertiser() -> None:
    query = F.normalize(torch.tensor([[1.0, 0.2], [0.1, 1.0], [0.7, 0.7]]), dim=-1)
    items = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.5, -0.5]], requires_grad=True)
    advertiser = torch.tensor([7, 9, 7, 4])
    weight = torch.tensor([1.0, 1.0, 0.0])
    q = torch.cat([query, torch.zeros(1, 2)])  # 4 rows; row 3 is not an anchor
    loss = advertiser_softmax_loss(q, items, advertiser, torch.cat([weight, torch.zeros(1)]), temperature=1.0)
    pooled = F.normalize(
        torch.stack([items[3], items[0] + items[2], items[1]]).detach(), dim=-1
    )  # ids 4, 7, 9
    expected = F.cross_entropy(query[:2] @ pooled.T, torch.tensor([1, 2]))
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    loss.backward()
    # Gradients reach only the items of in-batch advertisers, through their pooled direction: the
    # two items of advertiser 7 share one pooled vector, so their gradients are identical.
    assert torch.allclose(items.grad[0], items.grad[2])


def test_advertiser_loss_only_moves_items_of_involved_advertisers() -> None:
    emb = torch.nn.Embedding(6, 2)  # an item-embedding table; items 4 and 5 are not in the batch
    item_ids = torch.tensor([0, 1, 2, 3])
    loss = advertiser_softmax_loss(
        F.normalize(torch.randn(4, 2), dim=-1), emb(item_ids), torch.tensor([1, 1, 2, 3]), torch.ones(4), 0.5
    )
    loss.backward()
    assert torch.count_nonzero(emb.weight.grad[4:]) == 0
    assert torch.count_nonzero(emb.weight.grad[:4].abs().sum(1)) == 4


def test_objective_adds_weighted_advertiser_loss() -> None:
    emb = F.normalize(torch.randn(4, 2, generator=torch.Generator().manual_seed(0)), dim=-1)
    batch = {
        "weights": {CONVERSION: torch.tensor([1.0, 0.0, 1.0, 1.0])},
        "item_pos": torch.arange(4),
        "log_q": torch.zeros(4),
        "item": {"advertiser_id": torch.tensor([1, 1, 2, 3])},
    }
    plain, _ = MultiTaskSampledSoftmax({CONVERSION: 1.0})({CONVERSION: emb}, {CONVERSION: emb}, batch)
    total, logs = MultiTaskSampledSoftmax({CONVERSION: 1.0}, advertiser_weight=0.5)(
        {CONVERSION: emb}, {CONVERSION: emb}, batch
    )
    assert total.item() == pytest.approx(plain.item() + 0.5 * logs["advertiser/loss"].item(), abs=1e-6)
