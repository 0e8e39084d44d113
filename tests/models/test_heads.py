"""Heads: unified shares one unit-norm embedding; multi-head has one per task and serves one."""

import pytest
import torch

from convcg_cli.models.heads import MultiHead, UnifiedHead
from convcg_cli.tasks import CONVERSION, ENGAGEMENT

TASKS = [CONVERSION, ENGAGEMENT]


def test_unified_head_same_unit_norm_tensor_for_every_task() -> None:
    torch.manual_seed(0)
    head = UnifiedHead(in_dim=6, embedding_dim=4, tasks=TASKS)
    h = torch.randn(3, 6)
    out = head(h)
    assert list(out) == TASKS
    assert out[CONVERSION] is out[ENGAGEMENT]
    assert out[CONVERSION].shape == (3, 4)
    torch.testing.assert_close(out[CONVERSION].norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(head.serve(h), out[CONVERSION])
    assert head.serving_task is None


def test_multi_head_distinct_per_task_and_unit_norm() -> None:
    torch.manual_seed(0)
    head = MultiHead(in_dim=6, embedding_dim=4, tasks=TASKS)
    h = torch.randn(3, 6)
    out = head(h)
    assert list(out) == TASKS
    assert not torch.allclose(out[CONVERSION], out[ENGAGEMENT])
    for emb in out.values():
        torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))


@pytest.mark.parametrize("serving_task", TASKS)
def test_multi_head_serve_computes_only_the_serving_head(serving_task: str) -> None:
    torch.manual_seed(0)
    head = MultiHead(in_dim=6, embedding_dim=4, tasks=TASKS, serving_task=serving_task)
    h = torch.randn(3, 6)
    served = head.serve(h)
    torch.testing.assert_close(served, head(h)[serving_task])
    served.sum().backward()
    for task in TASKS:
        grad = head.projs[task].weight.grad
        assert (grad is not None) == (task == serving_task)


def test_multi_head_defaults_to_primary_task() -> None:
    assert MultiHead(in_dim=6, embedding_dim=4, tasks=TASKS).serving_task == CONVERSION


def test_bad_serving_task_raises() -> None:
    with pytest.raises(ValueError, match="clicks"):
        MultiHead(in_dim=6, embedding_dim=4, tasks=TASKS, serving_task="clicks")


@pytest.mark.parametrize("tasks", [[], [CONVERSION, CONVERSION]])
def test_bad_task_lists_raise(tasks: list[str]) -> None:
    with pytest.raises(ValueError):
        UnifiedHead(in_dim=6, embedding_dim=4, tasks=tasks)
