"""Where this process sits in a distributed run: a leaf that the data and model layers both read.

The training data (``convcg_cli.data.loading.batches``) splits batches by rank and the loss
(``convcg_cli.models.distributed``) gathers across ranks; both ask the same question here, so that
``data`` does not import ``models``.
"""

from __future__ import annotations

import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of this process; ``(0, 1)`` when not running distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
