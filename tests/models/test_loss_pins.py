"""The loss arithmetic pinned where the older tests were blind (``make mutate``).

Every expected value is built here by hand (logits, masks, EMA steps) and compared with
:mod:`convcg_cli.models.losses`: hard negatives at a temperature other than 1, item id 0 as a real
hard negative, non-uniform row weights, the streaming logQ at an alpha other than 0.5, a rank's
positive columns in a gathered (DDP) batch, and the graph kept by a batch without anchors.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from convcg_cli.models import distributed
from convcg_cli.models.losses import (
    MultiTaskSampledSoftmax,
    StreamingLogQ,
    advertiser_softmax_loss,
    sampled_softmax_loss,
)
from convcg_cli.tasks import CONVERSION, ENGAGEMENT


def _reference(query, items, ids, log_q, weight, temperature, hard_items, hard_ids, positive=None):
    """Weighted mean over rows with weight > 0 of -log softmax, one row at a time, by plain loops."""
    total, weights = 0.0, 0.0
    for b in range(query.shape[0]):
        w = float(weight[b])
        if w <= 0:
            continue
        p = b if positive is None else int(positive[b])
        logits, target = [], None
        for j in range(items.shape[0]):
            if j != p and int(ids[j]) == int(ids[p]):
                continue  # an accidental hit is no negative
            if j == p:
                target = len(logits)
            logits.append(
                float(query[b] @ items[j]) / temperature - (0.0 if log_q is None else float(log_q[j]))
            )
        for h in range(hard_ids.shape[1]):
            if int(hard_ids[b, h]) < 0 or int(hard_ids[b, h]) == int(ids[p]):
                continue  # padding, or the positive itself
            logits.append(float(query[b] @ hard_items[b, h]) / temperature)
        lse = math.log(sum(math.exp(x) for x in logits))
        total += w * (lse - logits[target])
        weights += w
    return total / weights


@pytest.mark.parametrize("temperature", [0.05, 0.5, 2.0])
def test_hard_negatives_are_divided_by_the_temperature(temperature):
    g = torch.Generator().manual_seed(0)
    query = F.normalize(torch.randn(5, 4, generator=g), dim=-1)
    items = F.normalize(torch.randn(5, 4, generator=g), dim=-1)
    hard_items = F.normalize(torch.randn(5, 3, 4, generator=g), dim=-1)
    ids = torch.tensor([3, 0, 7, 3, 9])  # rows 0 and 3 show the same item
    # Item 0 is a real hard negative (only negative ids are padding); row 3's 7 is row 2's positive item.
    hard_ids = torch.tensor([[0, -1, 5], [0, 4, -1], [7, 0, 0], [-1, -1, -1], [2, 9, 0]])
    log_q = torch.tensor([-1.0, -2.5, -0.3, -1.0, -4.0])
    weight = torch.tensor([1.0, 0.5, 2.0, 0.0, 3.0])
    loss = sampled_softmax_loss(
        query,
        items,
        ids,
        log_q,
        weight > 0,
        temperature,
        weight=weight,
        hard_items=hard_items,
        hard_ids=hard_ids,
    )
    expected = _reference(query, items, ids, log_q, weight, temperature, hard_items, hard_ids)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_a_hard_negative_with_item_id_zero_changes_the_loss():
    query, items = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0]])
    hard_items = torch.tensor([[[1.0, 0.0]]])
    ids = torch.tensor([4])
    plain = sampled_softmax_loss(query, items, ids, None, torch.tensor([True]), 0.5)
    with_zero = sampled_softmax_loss(
        query,
        items,
        ids,
        None,
        torch.tensor([True]),
        0.5,
        hard_items=hard_items,
        hard_ids=torch.tensor([[0]]),
    )
    assert plain.item() == pytest.approx(0.0, abs=1e-6)
    assert with_zero.item() == pytest.approx(math.log(2.0), abs=1e-6)  # two equal logits of 2.0


def test_row_weights_weigh_rows_with_different_losses():
    g = torch.Generator().manual_seed(1)
    query, items = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    ids, weight = torch.arange(4), torch.tensor([3.0, 0.25, 1.0, 0.0])
    loss = sampled_softmax_loss(query, items, ids, None, weight > 0, 0.3, weight=weight)
    no_hard = torch.full((4, 0), -1)
    assert loss.item() == pytest.approx(
        _reference(query, items, ids, None, weight, 0.3, torch.zeros(4, 0, 3), no_hard), rel=1e-5
    )
    # Rows with weight 0 are no anchors even when the anchor mask says they are.
    everyone = sampled_softmax_loss(
        query, items, ids, None, torch.ones(4, dtype=torch.bool), 0.3, weight=weight
    )
    assert everyone.item() == pytest.approx(loss.item(), rel=1e-6)


def test_the_advertiser_loss_is_the_weighted_mean_over_anchor_rows():
    query = F.normalize(torch.tensor([[1.0, 0.2], [0.1, 1.0], [0.7, 0.7], [-1.0, 0.3]]), dim=-1)
    items = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [0.5, -0.5]])
    advertiser = torch.tensor([7, 9, 7, 4])
    weight = torch.tensor([2.0, 0.5, 0.0, 1.0])
    loss = advertiser_softmax_loss(query, items, advertiser, weight, temperature=0.2)
    pooled = {a: F.normalize(items[advertiser == a].sum(0), dim=0) for a in (4, 7, 9)}
    total = 0.0
    for b in (0, 1, 3):
        logits = torch.stack([query[b] @ pooled[a] / 0.2 for a in (4, 7, 9)])
        target = [4, 7, 9].index(int(advertiser[b]))
        total += float(weight[b]) * float(torch.logsumexp(logits, 0) - logits[target])
    assert loss.item() == pytest.approx(total / 3.5, rel=1e-5)


def _leaves():
    g = torch.Generator().manual_seed(3)
    return [torch.randn(*shape, generator=g).requires_grad_() for shape in ((3, 2), (3, 2), (3, 2, 2))]


def test_losses_without_anchors_are_zero_and_reach_every_input():
    query, items, hard_items = _leaves()
    none = torch.zeros(3, dtype=torch.bool)
    loss = sampled_softmax_loss(
        query, items, torch.arange(3), None, none, 0.1, hard_items=hard_items, hard_ids=torch.zeros(3, 2)
    )
    assert loss.item() == 0.0
    loss.backward()  # every input gets a (zero) gradient: DDP needs every parameter used
    for t in (query, items, hard_items):
        assert t.grad is not None and torch.equal(t.grad, torch.zeros_like(t))
    query, items, _ = _leaves()
    adv = advertiser_softmax_loss(query, items, torch.arange(3), torch.zeros(3), 0.1)
    assert adv.item() == 0.0
    adv.backward()
    for t in (query, items):
        assert t.grad is not None and torch.equal(t.grad, torch.zeros_like(t))


def test_anchors_need_both_the_mask_and_a_positive_weight():
    query, items, _ = (t.detach() for t in _leaves())
    ids, ones = torch.arange(3), torch.ones(3)
    mask = torch.tensor([True, False, True])
    masked = sampled_softmax_loss(query, items, ids, None, mask, 0.5, weight=ones)
    no_hard = (torch.zeros(3, 0, 2), torch.zeros(3, 0))
    assert masked.item() == pytest.approx(
        _reference(query, items, ids, None, mask.float(), 0.5, *no_hard), rel=1e-6
    )
    # Every row in the mask but every weight 0: no anchor at all, a zero (not 0 / 0).
    zero = sampled_softmax_loss(
        query, items, ids, None, torch.ones(3, dtype=torch.bool), 0.5, weight=0 * ones
    )
    assert zero.item() == 0.0


def test_a_temperature_of_zero_and_a_negative_advertiser_weight_are_refused():
    q = torch.eye(2)
    with pytest.raises(ValueError, match="temperature"):
        sampled_softmax_loss(q, q, torch.arange(2), None, torch.ones(2, dtype=torch.bool), 0.0)
    with pytest.raises(ValueError, match="temperature"):
        MultiTaskSampledSoftmax({CONVERSION: 1.0}, temperature=0.0)
    with pytest.raises(ValueError, match="advertiser_weight"):
        MultiTaskSampledSoftmax({CONVERSION: 1.0}, advertiser_weight=-0.1)
    assert MultiTaskSampledSoftmax({CONVERSION: 1.0}, advertiser_weight=0.0).advertiser_weight == 0.0


def _streaming_reference(batches, alpha, num_buckets):
    """Yi et al.'s Algorithm 2 with dicts: the first sighting at step t sets t + 1, then the EMA."""
    last, interval = {}, {}
    for t, ids in enumerate(batches):
        for bucket in sorted({i % num_buckets for i in ids}):
            if bucket in last:
                interval[bucket] = (1 - alpha) * interval[bucket] + alpha * (t - last[bucket])
            else:
                interval[bucket] = t + 1.0
            last[bucket] = t
    return lambda i: -math.log(max(interval.get(i % num_buckets, 1.0), 1.0))


def test_streaming_logq_at_an_alpha_other_than_one_half():
    batches = [[1, 2, 2], [1], [3, 11], [2, 1], [5], [5, 1], [2], [3]]  # 11 shares bucket 3 (of 8)
    est = StreamingLogQ(num_buckets=8, alpha=0.2)
    for ids in batches:
        est(torch.tensor(ids))
    est.eval()
    ask = [1, 2, 3, 5, 11, 6, 0]  # 6 and 0 never seen: interval 1, log q 0
    got = est(torch.tensor(ask))
    reference = _streaming_reference(batches, 0.2, 8)
    assert got.tolist() == pytest.approx([reference(i) for i in ask], abs=1e-6)
    assert est.step.item() == len(batches)


def test_streaming_logq_of_an_item_seen_every_step_stays_at_zero():
    est = StreamingLogQ(num_buckets=4, alpha=0.3)
    for _ in range(5):
        out = est(torch.tensor([0, 1]))
    assert out.tolist() == pytest.approx([0.0, 0.0], abs=1e-7)  # q = 1: in every batch


def _two_tasks():
    g = torch.Generator().manual_seed(2)
    user = {t: F.normalize(torch.randn(4, 3, generator=g), dim=-1) for t in (CONVERSION, ENGAGEMENT)}
    item = {t: F.normalize(torch.randn(4, 3, generator=g), dim=-1) for t in (CONVERSION, ENGAGEMENT)}
    batch = {
        "weights": {
            CONVERSION: torch.tensor([1.0, 0.0, 2.0, 0.5]),
            ENGAGEMENT: torch.tensor([1.0, 1.0, 0.0, 1.0]),
        },
        "item_pos": torch.tensor([5, 6, 7, 8]),
        "log_q": torch.tensor([-1.0, -2.0, -0.5, -3.0]),
        "item": {"advertiser_id": torch.tensor([1, 2, 1, 3])},
    }
    return user, item, batch


def test_logged_weighted_loss_and_advertiser_term():
    user, item, batch = _two_tasks()
    loss_fn = MultiTaskSampledSoftmax(
        {CONVERSION: 2.0, ENGAGEMENT: 0.5}, temperature=0.2, advertiser_weight=0.3
    )
    terms = loss_fn.terms(user, item, batch)
    per_task = {
        t: sampled_softmax_loss(
            user[t], item[t], batch["item_pos"], batch["log_q"], batch["weights"][t] > 0, 0.2,
            weight=batch["weights"][t],
        ).item()
        for t in (CONVERSION, ENGAGEMENT)
    }  # fmt: skip
    adv = advertiser_softmax_loss(
        user[CONVERSION], item[CONVERSION], batch["item"]["advertiser_id"], batch["weights"][CONVERSION], 0.2
    ).item()
    weighted = 2.0 * per_task[CONVERSION] + 0.5 * per_task[ENGAGEMENT]
    assert terms.logs["weighted_loss"].item() == pytest.approx(weighted, rel=1e-6)
    assert terms.logs["advertiser/loss"].item() == pytest.approx(adv, rel=1e-6)
    assert terms.total.item() == pytest.approx(weighted + 0.3 * adv, rel=1e-6)
    assert {t: v.item() for t, v in terms.task_losses.items()} == pytest.approx(per_task, rel=1e-6)
    assert terms.logs[f"task_weight/{ENGAGEMENT}"].item() == 0.5


def test_rank_one_of_two_takes_its_positives_from_its_own_columns(monkeypatch):
    """Rank 1 of 2 (simulated): candidates are [rank 0's rows, this rank's rows]; row b's positive is
    column B + b, and the rank's anchor weight is what the cross-rank mean is weighted by."""
    user, item, batch = _two_tasks()
    other = {"ids": batch["item_pos"] + 100, "log_q": batch["log_q"] - 1.0}
    monkeypatch.setattr(distributed, "rank_and_world", lambda: (1, 2))

    def gather(t):
        if t is batch["item_pos"]:
            return torch.cat([other["ids"], t])
        if t is batch["log_q"]:
            return torch.cat([other["log_q"], t])
        return torch.cat([t.flip(0) * 0.5, t])  # embeddings: some other rank's rows

    seen_weights = []
    monkeypatch.setattr(distributed, "gather_with_grad", gather)
    monkeypatch.setattr(distributed, "mean_over_ranks", lambda loss, w: seen_weights.append(w.item()) or loss)
    losses = MultiTaskSampledSoftmax({CONVERSION: 1.0, ENGAGEMENT: 1.0}, temperature=0.5).task_losses(
        user, item, batch
    )
    ids = torch.cat([other["ids"], batch["item_pos"]])
    log_q = torch.cat([other["log_q"], batch["log_q"]])
    positive = torch.arange(4) + 4
    for t in (CONVERSION, ENGAGEMENT):
        expected = _reference(
            user[t], gather(item[t]), ids, log_q, batch["weights"][t], 0.5,
            torch.zeros(4, 0, 3), torch.zeros(4, 0), positive,
        )  # fmt: skip
        assert losses[t].item() == pytest.approx(expected, rel=1e-5)
    assert seen_weights == [3.5, 3.0]
