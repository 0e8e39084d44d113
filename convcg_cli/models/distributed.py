"""Cross-process helpers for data-parallel training (``trainer=ddp``): global in-batch negatives.

Under DDP every process (rank) embeds its own shard of the batch. The sampled softmax should still
see the *global* batch as candidates, so item embeddings are all-gathered *with gradients*
(``torch.distributed.nn.functional``: the backward of an all-gather sums each rank's gradient back
onto the rank that produced the slice). Every function here is the identity (or a no-op) when
``torch.distributed`` is not initialised or has one process, so the single-process path is unchanged.
(``torch.distributed.nn.functional`` has the same two autograd collectives but is deprecated in
torch 2.13 in favour of private functional collectives; these two small Functions use only the
stable ``all_gather``/``all_reduce``, which every backend, gloo included, implements.)

Gradient bookkeeping (why :func:`mean_over_ranks` exists): DDP *averages* parameter gradients over
ranks, while a rank's loss is naturally the mean over its own anchors only. Summing each rank's
anchor losses across ranks (with gradients) and dividing by the global anchor weight makes every
rank's loss *value* equal to the single-process loss on the global batch, and DDP's average of the
rank gradients equal to the single-process gradient exactly (tests/test_ddp.py checks both).

All collectives here run in the same order on every rank (the order the loss is built in), and their
backward passes run before any tower gradient is accumulated (they are created later in the forward,
so autograd runs them first), so they never interleave differently with DDP's gradient all-reduces.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from convcg_cli.distributed_env import rank_and_world  # re-exported: the helper lives in a leaf


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward hands each rank the sum of every rank's gradient of its slice."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:  # noqa: D102
        rank, world = rank_and_world()
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t.contiguous())
        ctx.rows = slice(rank * t.shape[0], (rank + 1) * t.shape[0])
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # every rank's loss may use every slice: sum their gradients
        return grad[ctx.rows]


class _SumWithGrad(torch.autograd.Function):
    """All-reduce (sum) whose backward is the all-reduce of the incoming gradients."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:  # noqa: D102
        out = t.detach().clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


def gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` from every rank along dim 0, in rank order; gradients flow back to each rank.

    Every rank must pass the same shape (the training data gives every rank equal batches).

    Args:
        t: (B, ...) this rank's slice.

    Returns:
        (world_size * B, ...); ``t`` itself when not distributed. Rank ``r``'s rows are
        ``r * B : (r + 1) * B``.
    """
    _, world = rank_and_world()
    if world == 1:
        return t
    if not t.requires_grad:  # ids, logQ: a plain all-gather, no autograd node
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)
    return _GatherWithGrad.apply(t)


def mean_over_ranks(local_mean: torch.Tensor, local_weight: torch.Tensor) -> torch.Tensor:
    """Weighted mean over the anchors of every rank, from each rank's mean over its own anchors.

    ``sum_r local_mean_r * local_weight_r / sum_r local_weight_r``: the same value on every rank, and
    its gradient is such that DDP's *average* over ranks equals the single-process gradient of the
    global-batch loss (the sum is all-reduced with gradients, so each rank's backward carries
    ``world_size`` times its share and DDP divides it back). With no anchor anywhere it is 0.

    Args:
        local_mean: scalar loss, the (weighted) mean over this rank's anchors (0 if it has none).
        local_weight: scalar, this rank's total anchor weight (the mean's denominator).
    """
    _, world = rank_and_world()
    if world == 1:
        return local_mean
    total = _SumWithGrad.apply(local_mean * local_weight.detach())
    weight = local_weight.detach().clone()
    dist.all_reduce(weight)
    return total / weight.clamp_min(torch.finfo(weight.dtype).tiny)
