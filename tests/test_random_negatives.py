"""Random corpus negatives (``data.random_negatives``, mixed negative sampling): the draws, the batch
order they leave alone, the mixture's logQ and the loss against a brute-force softmax."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from convcg_cli.data.loading import InMemoryDataModule
from convcg_cli.errors import ConfigError
from convcg_cli.models.losses import MultiTaskSampledSoftmax, mixed_log_q


def test_mixed_log_q_is_the_expected_count_of_each_candidate():
    q = torch.tensor([0.5, 0.3, 0.2, 0.0])  # training frequency; the last item is never engaged
    log_q = torch.log(q)
    out = mixed_log_q(log_q, 8, math.log(16 / 4)).exp()
    torch.testing.assert_close(out, 8 * q + 16 / 4)  # B q_j + M / |corpus|
    assert torch.isfinite(mixed_log_q(log_q, 8, math.log(16 / 4))).all()  # never-engaged: M/|I| only


def _brute_force(query, cand, cand_ids, log_q, anchors, positive_cols, weight, temperature):
    """Per anchor: softmax over every candidate column (logit / T - logQ), other columns holding the
    positive's item masked, weighted mean of the cross-entropies: in plain loops."""
    total, norm = 0.0, 0.0
    for a in anchors:
        p = positive_cols[a]
        logits = []
        for j in range(len(cand)):
            if j != p and cand_ids[j] == cand_ids[p]:
                continue
            logits.append((float(query[a] @ cand[j]) / temperature - float(log_q[j]), j == p))
        values = torch.tensor([v for v, _ in logits], dtype=torch.float64)
        target = [i for i, (_, is_p) in enumerate(logits) if is_p][0]
        ce = float(torch.logsumexp(values, 0) - values[target])
        total, norm = total + weight[a] * ce, norm + weight[a]
    return total / norm


def test_the_loss_is_the_softmax_over_batch_and_random_candidates_under_the_mixture():
    torch.manual_seed(0)
    b, m, d, n_items = 6, 5, 4, 30
    user = F.normalize(torch.randn(b, d, dtype=torch.float64), dim=-1)
    item = F.normalize(torch.randn(b, d, dtype=torch.float64), dim=-1)
    rand = F.normalize(torch.randn(m, d, dtype=torch.float64), dim=-1)
    item_pos = torch.tensor([3, 7, 3, 11, 2, 9])
    random_pos = torch.tensor([7, 20, 21, 3, 29])  # 7 and 3 collide with in-batch items: accidental hits
    table = torch.log(
        torch.full((n_items,), 1.0 / n_items, dtype=torch.float64) + torch.arange(n_items) / 500
    )
    weights = torch.tensor([1.0, 0.0, 2.0, 1.0, 0.5, 1.0], dtype=torch.float64)
    batch = {
        "weights": {"conversion": weights},
        "item_pos": item_pos,
        "log_q": table[item_pos],
        "random_pos": random_pos,
        "random_log_q": table[random_pos],
        "random_log_share": torch.tensor(math.log(m / n_items), dtype=torch.float64),
    }
    loss_fn = MultiTaskSampledSoftmax({"conversion": 1.0}, temperature=0.1)
    got = loss_fn.task_losses({"conversion": user}, {"conversion": item}, batch, random={"conversion": rand})
    cand = torch.cat([item, rand])
    ids = torch.cat([item_pos, random_pos])
    log_q = torch.log(b * torch.cat([table[item_pos], table[random_pos]]).exp() + m / n_items)
    anchors = [i for i in range(b) if weights[i] > 0]
    expected = _brute_force(user, cand, ids, log_q, anchors, list(range(b)), weights.tolist(), 0.1)
    assert float(got["conversion"]) == pytest.approx(expected, rel=1e-9)
    # without random negatives: exactly the in-batch loss of before
    plain = loss_fn.task_losses({"conversion": user}, {"conversion": item}, batch)
    expected_plain = _brute_force(
        user, item, item_pos, table[item_pos], anchors, list(range(b)), weights.tolist(), 0.1
    )
    assert float(plain["conversion"]) == pytest.approx(expected_plain, rel=1e-9)


def test_random_negatives_leave_the_batch_order_alone_and_cover_the_corpus(tiny_data):
    plain = InMemoryDataModule(str(tiny_data), batch_size=256)
    plain.setup("fit")
    dm = InMemoryDataModule(str(tiny_data), batch_size=256, random_negatives=64)
    dm.setup("fit")
    n_items = len(dm.items.item_ids)
    drawn = []
    for with_random, without in zip(dm.train_dataloader(), plain.train_dataloader(), strict=True):
        assert "random_pos" not in without
        assert torch.equal(with_random["item_pos"], without["item_pos"])  # same batches
        assert torch.equal(with_random["user"]["user_id"], without["user"]["user_id"])
        pos = with_random["random_pos"]
        assert pos.shape == (64,) and int(pos.min()) >= 0 and int(pos.max()) < n_items
        for name, values in dm.item_features.items():  # the drawn items' own corpus features
            assert torch.equal(with_random["random_item"][name], values[pos]), name
        assert torch.equal(with_random["random_log_q"], dm.train_set.item_log_q[pos])
        assert float(with_random["random_log_share"]) == pytest.approx(math.log(64 / n_items))
        drawn.append(pos)
    counts = torch.bincount(torch.cat(drawn), minlength=n_items).float()
    assert counts.std() / counts.mean() < 0.5  # uniform over the corpus, never-engaged items included
    again = InMemoryDataModule(str(tiny_data), batch_size=256, random_negatives=64)
    again.setup("fit")
    assert torch.equal(next(iter(again.train_dataloader()))["random_pos"], drawn[0])  # seeded


def test_a_negative_count_is_refused(tiny_data):
    with pytest.raises(ConfigError, match="data.random_negatives must be a whole number >= 0"):
        InMemoryDataModule(str(tiny_data), random_negatives=-1)


def test_a_model_trains_with_random_negatives(tiny_overrides, home):
    from convcg_cli.config import compose
    from convcg_cli.train import train

    result = train(compose("train", [*tiny_overrides, "data.random_negatives=32"]))
    assert math.isfinite(result.metrics["val/conversion/recall_at_100"])


def test_a_datamodule_adopting_a_prepared_set_up_keeps_its_own_random_negatives(tiny_data):
    """Trials and grid cells share one set-up (``PreparedDataCache``): ``random_negatives`` is not a
    content option, so the adopted training batches must draw this datamodule's own."""
    from convcg_cli.data.loading import PreparedDataCache

    cache = PreparedDataCache()
    plain = InMemoryDataModule(str(tiny_data), batch_size=256)
    cache.setup(plain, "fit")
    adopted = InMemoryDataModule(str(tiny_data), batch_size=256, random_negatives=16)
    cache.setup(adopted, "fit")
    assert cache.hits == 1  # the same set-up, shared
    first = next(iter(adopted.train_dataloader()))
    assert first["random_pos"].shape == (16,)
    assert "random_pos" not in next(iter(plain.train_dataloader()))
