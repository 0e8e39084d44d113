"""HistoryEncoder: shapes, padding invariance, finite output and gradients for empty histories (the
Transformer fast path turns fully-masked rows into NaN), and pinned numbers on a seeded tiny input."""

import pytest
import torch

from convcg_cli.models.sequence import HistoryEncoder

# Most recent first, right-padded: full, partial, one item, no history.
ITEMS = torch.tensor([[3, 1, 7, 2], [5, 2, 0, 0], [9, 0, 0, 0], [0, 0, 0, 0]])
ACTIONS = torch.tensor([[1, 3, 2, 1], [2, 1, 0, 0], [3, 0, 0, 0], [0, 0, 0, 0]])


def _encoder(**kwargs) -> HistoryEncoder:
    torch.manual_seed(0)
    return HistoryEncoder(**{"num_items": 10, "dim": 8, "num_heads": 2, "max_len": 4, **kwargs})


def test_shapes_and_out_dim() -> None:
    enc = _encoder(num_layers=2)
    assert enc.out_dim == 16
    assert enc(ITEMS, ACTIONS).shape == (4, 16)
    assert enc(ITEMS[:, :2], ACTIONS[:, :2]).shape == (4, 16)  # shorter than max_len is fine


def test_pinned_output() -> None:
    out = _encoder()(ITEMS, ACTIONS)
    # mean pool | most recent item, first 3 of each half.
    expected = torch.tensor(
        [
            [-0.2176, -0.5632, -0.3394, 0.2370, -0.6984, -2.0454],
            [-0.3467, -0.8399, 0.3493, 1.0393, -1.6627, 0.5166],
            [-0.1836, -1.9230, -0.2572, -0.1836, -1.9230, -0.2572],
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        ]
    )
    torch.testing.assert_close(out[:, [0, 1, 2, 8, 9, 10]], expected, atol=1e-4, rtol=0)


def test_single_item_history_mean_equals_latest() -> None:
    out = _encoder()(ITEMS, ACTIONS)
    torch.testing.assert_close(out[2, :8], out[2, 8:])


def test_padding_content_and_length_do_not_change_output() -> None:
    enc = _encoder()
    base = enc(ITEMS, ACTIONS)
    # Action codes left in padded slots are ignored ...
    noisy_actions = torch.where(ITEMS == 0, torch.full_like(ACTIONS, 3), ACTIONS)
    torch.testing.assert_close(enc(ITEMS, noisy_actions), base)
    # ... and so is the amount of padding: rows 1-3 fit in 2 slots.
    torch.testing.assert_close(enc(ITEMS[1:, :2], ACTIONS[1:, :2]), base[1:])


def test_rows_are_independent() -> None:
    enc = _encoder()
    torch.testing.assert_close(enc(ITEMS[1:2], ACTIONS[1:2]), enc(ITEMS, ACTIONS)[1:2])


@pytest.mark.parametrize("train", [True, False])
def test_empty_history_is_zero_with_finite_gradients(train: bool) -> None:
    enc = _encoder(num_layers=2)
    enc.train(train)
    only_empty = enc(ITEMS[3:], ACTIONS[3:])
    assert torch.equal(only_empty.abs(), torch.zeros(1, 16))
    out = enc(ITEMS, ACTIONS)
    assert torch.isfinite(out).all()
    (out**2).sum().backward()
    grads = [p.grad for p in enc.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_inference_fast_path_matches_training_path() -> None:
    # eval + no_grad takes PyTorch's fused encoder path, where an all-masked row would come out NaN.
    enc = _encoder(num_layers=2)
    train_out = enc(ITEMS, ACTIONS)
    enc.eval()
    with torch.no_grad():
        fast = enc(ITEMS, ACTIONS)
    assert torch.isfinite(fast).all()
    torch.testing.assert_close(fast, train_out.detach(), atol=1e-5, rtol=1e-5)


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="divisible"):
        HistoryEncoder(num_items=10, dim=6, num_heads=4)
    with pytest.raises(ValueError, match="max_len=4"):
        _encoder()(torch.ones(2, 5, dtype=torch.int64), torch.ones(2, 5, dtype=torch.int64))
