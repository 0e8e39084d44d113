"""Sampled softmax: hand-computed value, logQ per column, accidental hits, anchors; multi-task sum."""

import math

import pytest
import torch
import torch.nn.functional as F

from convcg_cli.models.losses import MultiTaskSampledSoftmax, NoLogQ, sampled_softmax_loss
from convcg_cli.tasks import CONVERSION, ENGAGEMENT

# logits = QUERY @ ITEMS.T = [[1, 0, 0], [0, 1, 0], [1, 1, 0]]
QUERY = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
ITEMS = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
IDS = torch.tensor([10, 11, 12])
ALL = torch.ones(3, dtype=torch.bool)


def test_matches_hand_computed_cross_entropy() -> None:
    loss = sampled_softmax_loss(QUERY, ITEMS, IDS, None, ALL, temperature=1.0)
    row0 = -1 + math.log(math.e + 1 + 1)
    row1 = row0
    row2 = -0 + math.log(math.e + math.e + 1)
    expected = (row0 + row1 + row2) / 3
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert loss.item() == pytest.approx(0.988295, abs=1e-6)


def test_temperature_divides_logits() -> None:
    loss = sampled_softmax_loss(QUERY, ITEMS, IDS, None, ALL, temperature=0.5)
    expected = F.cross_entropy((QUERY @ ITEMS.T) / 0.5, torch.arange(3))
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)


def test_logq_is_subtracted_per_column() -> None:
    log_q = torch.tensor([0.3, -0.2, 1.1])
    loss = sampled_softmax_loss(QUERY, ITEMS, IDS, log_q, ALL, temperature=1.0)
    logits = QUERY @ ITEMS.T - log_q[None, :]  # same correction down each column
    expected = F.cross_entropy(logits, torch.arange(3))
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    # A constant log_q shifts every logit of a row equally and changes nothing.
    const = sampled_softmax_loss(QUERY, ITEMS, IDS, torch.full((3,), 2.0), ALL, temperature=1.0)
    assert const.item() == pytest.approx(0.988295, abs=1e-6)


def test_accidental_hit_equals_removing_the_duplicate_column() -> None:
    torch.manual_seed(0)
    query, items = torch.randn(4, 3), torch.randn(4, 3)
    ids = torch.tensor([7, 8, 9, 7])  # row 3 shows the same item as row 0
    anchor = torch.tensor([True, True, False, False])
    log_q = torch.randn(4)
    with_dup = sampled_softmax_loss(query, items, ids, log_q, anchor, temperature=0.5)
    # Row 0 must not see column 3 as a negative; row 1 (item 8) sees it normally.
    logits = (query @ items.T) / 0.5 - log_q[None, :]
    row0 = F.cross_entropy(logits[0:1, :3], torch.tensor([0]))
    row1 = F.cross_entropy(logits[1:2, :], torch.tensor([1]))
    assert with_dup.item() == pytest.approx(((row0 + row1) / 2).item(), abs=1e-6)
    # And the masked loss differs from the unmasked one.
    unmasked = sampled_softmax_loss(query, items, torch.arange(4), log_q, anchor, temperature=0.5)
    assert unmasked.item() != pytest.approx(with_dup.item(), abs=1e-4)


def test_non_anchor_rows_are_excluded_but_serve_as_negatives() -> None:
    anchor = torch.tensor([True, False, True])
    loss = sampled_softmax_loss(QUERY, ITEMS, IDS, None, anchor, temperature=1.0)
    expected = (-1 + math.log(math.e + 2) + math.log(2 * math.e + 1)) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_no_anchors_gives_zero_with_grad() -> None:
    query = QUERY.clone().requires_grad_()
    loss = sampled_softmax_loss(query, ITEMS, IDS, None, torch.zeros(3, dtype=torch.bool), 1.0)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(query.grad, torch.zeros_like(query))


def test_gradient_is_finite_with_masked_columns() -> None:
    query = QUERY.clone().requires_grad_()
    loss = sampled_softmax_loss(query, ITEMS, torch.tensor([5, 5, 5]), None, ALL, 1.0)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)  # every negative is an accidental hit
    loss.backward()
    assert torch.isfinite(query.grad).all()


def _batch() -> tuple[dict, dict, dict, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    user = {t: F.normalize(torch.randn(5, 4), dim=-1) for t in (CONVERSION, ENGAGEMENT)}
    item = {t: F.normalize(torch.randn(5, 4), dim=-1) for t in (CONVERSION, ENGAGEMENT)}
    labels = {
        CONVERSION: torch.tensor([True, False, False, True, False]),
        ENGAGEMENT: torch.tensor([True, True, False, True, True]),
    }
    return user, item, labels, torch.tensor([1, 2, 3, 4, 2]), torch.log(torch.full((5,), 0.2))


def _as_batch(labels, ids, log_q):
    return {"weights": {t: v.float() for t, v in labels.items()}, "item_pos": ids, "log_q": log_q}


def test_multi_task_total_is_weighted_sum() -> None:
    user, item, labels, ids, log_q = _batch()
    loss_fn = MultiTaskSampledSoftmax({CONVERSION: 1.0, ENGAGEMENT: 0.25}, temperature=0.1)
    total, logs = loss_fn(user, item, _as_batch(labels, ids, log_q))
    per_task = {t: logs[f"{t}/loss"] for t in (CONVERSION, ENGAGEMENT)}
    for task in per_task:
        single = sampled_softmax_loss(user[task], item[task], ids, log_q, labels[task], 0.1)
        assert per_task[task].item() == pytest.approx(single.item(), abs=1e-6)
    expected = per_task[CONVERSION] + 0.25 * per_task[ENGAGEMENT]
    assert total.item() == pytest.approx(expected.item(), abs=1e-6)
    assert logs[f"task_weight/{ENGAGEMENT}"].item() == 0.25


def test_zero_weight_task_is_skipped() -> None:
    user, item, labels, ids, log_q = _batch()
    del user[ENGAGEMENT], item[ENGAGEMENT], labels[ENGAGEMENT]  # would raise KeyError if computed
    loss_fn = MultiTaskSampledSoftmax({CONVERSION: 2.0, ENGAGEMENT: 0.0})
    total, logs = loss_fn(user, item, _as_batch(labels, ids, log_q))
    assert f"{ENGAGEMENT}/loss" not in logs
    assert total.item() == pytest.approx(2.0 * logs[f"{CONVERSION}/loss"].item(), abs=1e-6)


def test_no_logq_ignores_log_q() -> None:
    user, item, labels, ids, _ = _batch()
    loss_fn = MultiTaskSampledSoftmax({CONVERSION: 1.0}, logq=NoLogQ())
    _, logs = loss_fn(user, item, _as_batch(labels, ids, torch.randn(5)))
    plain = sampled_softmax_loss(user[CONVERSION], item[CONVERSION], ids, None, labels[CONVERSION], 0.05)
    assert logs[f"{CONVERSION}/loss"].item() == pytest.approx(plain.item(), abs=1e-6)


@pytest.mark.parametrize("weights", [{CONVERSION: -1.0}, {CONVERSION: 0.0}, {CONVERSION: 1.0, "clicks": 1.0}])
def test_bad_task_weights_raise(weights: dict[str, float]) -> None:
    from convcg_cli.errors import ConvcgError

    with pytest.raises((ValueError, ConvcgError)):
        MultiTaskSampledSoftmax(weights)
