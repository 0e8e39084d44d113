"""The logQ of mixed negative sampling (``mixed_log_q``) and the loss that uses it, pinned on tiny
float64 tensors (``make mutate``).

The mixture's logQ is checked against the log of each candidate's expected count among the
candidates, ``n_batch * q_j + M / |I|``, computed directly (boundaries: a never-engaged item, no
random draws, one in-batch row); the loss with random corpus negatives against a softmax written as
plain loops, with the table logQ (the mixture corrects every column) and without logQ (no column is
corrected).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from convcg_cli.models.losses import MultiTaskSampledSoftmax, NoLogQ, mixed_log_q


@pytest.mark.parametrize(
    ("n_batch", "n_random", "n_items"),
    [(8, 16, 4), (2, 1, 1000), (1, 3, 10), (512, 64, 50_000), (8, 0, 4)],  # the last: no random draws
)
def test_mixed_log_q_is_the_log_of_each_candidates_expected_count(n_batch, n_random, n_items):
    q = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0], dtype=torch.float64)  # the last: never engaged
    log_share = math.log(n_random / n_items) if n_random else -math.inf
    got = mixed_log_q(torch.log(q), n_batch, log_share)
    expected = [
        math.log(n_batch * qj + n_random / n_items) if n_batch * qj + n_random else -math.inf for qj in q
    ]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0.0)


def test_mixed_log_q_pinned_numbers():
    q = torch.log(torch.tensor([0.5, 0.25, 0.0]))
    got = mixed_log_q(q, 4, torch.log(torch.tensor(0.5))).exp()
    torch.testing.assert_close(got, torch.tensor([2.5, 1.5, 0.5]))  # 4 * q + 1 / 2
    # a tensor share keeps the candidates' dtype
    assert mixed_log_q(q.double(), 4, torch.tensor(-1.0)).dtype == torch.float64


def _loop_softmax(query, cand, cand_ids, log_q, weight, temperature):
    """Per anchor row a (weight > 0; its positive is its own column): the cross-entropy of the softmax
    over every candidate column (logit / T - logQ), the other columns holding the positive's item
    left out; the weighted mean over anchors. Plain loops."""
    total, norm = 0.0, 0.0
    for a in range(len(query)):
        if weight[a] <= 0:
            continue
        logits, target = [], None
        for j in range(len(cand)):
            if j != a and cand_ids[j] == cand_ids[a]:
                continue
            if j == a:
                target = len(logits)
            logits.append(float(query[a] @ cand[j]) / temperature - float(log_q[j]))
        values = torch.tensor(logits, dtype=torch.float64)
        total += float(weight[a]) * float(torch.logsumexp(values, 0) - values[target])
        norm += float(weight[a])
    return total / norm


def _batch(n_items: int = 25):
    torch.manual_seed(3)
    b, m, d = 5, 4, 3
    user = F.normalize(torch.randn(b, d, dtype=torch.float64), dim=-1)
    item = F.normalize(torch.randn(b, d, dtype=torch.float64), dim=-1)
    rand = F.normalize(torch.randn(m, d, dtype=torch.float64), dim=-1)
    item_pos = torch.tensor([4, 9, 4, 17, 0])
    random_pos = torch.tensor([9, 22, 13, 0])  # 9 and 0 are in-batch items too: accidental hits
    table = torch.log(torch.linspace(1.0, 3.0, n_items, dtype=torch.float64) / (2.0 * n_items))
    weights = torch.tensor([1.0, 0.5, 0.0, 2.0, 1.0], dtype=torch.float64)
    batch = {
        "weights": {"conversion": weights},
        "item_pos": item_pos,
        "log_q": table[item_pos],
        "random_pos": random_pos,
        "random_log_q": table[random_pos],
        "random_log_share": torch.tensor(math.log(m / n_items), dtype=torch.float64),
    }
    return user, item, rand, batch, table


def test_random_negatives_are_corrected_by_the_mixture_of_batch_and_corpus_draws():
    user, item, rand, batch, table = _batch(n_items=25)
    b, m = len(item), len(rand)
    loss_fn = MultiTaskSampledSoftmax({"conversion": 1.0}, temperature=0.2)
    got = loss_fn.task_losses({"conversion": user}, {"conversion": item}, batch, random={"conversion": rand})
    ids = torch.cat([batch["item_pos"], batch["random_pos"]])
    expected_count = [b * math.exp(float(table[i])) + m / 25 for i in ids]  # B q_j + M / |I|
    log_q = [math.log(c) for c in expected_count]
    cand = torch.cat([item, rand])
    expected = _loop_softmax(user, cand, ids, log_q, batch["weights"]["conversion"], 0.2)
    assert float(got["conversion"]) == pytest.approx(expected, rel=1e-9)


def test_without_logq_random_negatives_are_not_corrected_either():
    user, item, rand, batch, _ = _batch()
    loss_fn = MultiTaskSampledSoftmax({"conversion": 1.0}, temperature=0.2, logq=NoLogQ())
    got = loss_fn.task_losses({"conversion": user}, {"conversion": item}, batch, random={"conversion": rand})
    ids = torch.cat([batch["item_pos"], batch["random_pos"]])
    cand = torch.cat([item, rand])
    expected = _loop_softmax(user, cand, ids, [0.0] * len(cand), batch["weights"]["conversion"], 0.2)
    assert float(got["conversion"]) == pytest.approx(expected, rel=1e-9)
