"""Hard-negative pools: each user's served-but-not-engaged impressions, as CSR arrays (numpy, no torch).

The one pool builder of both data paths: the in-memory datamodule passes the whole training window,
the shard writer (``stream.write_shards``) one chunk of it per shard; ``batches`` draws from the pools.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from convcg_cli.data.features import encodings as F
from convcg_cli.tasks import engaged


@dataclass
class ImpressionNegatives:
    """Served-but-not-engaged impressions of each user, as CSR arrays.

    ``items[start[u] : start[u] + count[u]]`` are the item positions user ``u`` was shown and did
    not engage with; hard negatives for a training example of ``u`` are drawn from there.
    """

    start: np.ndarray  # (U,) int64
    count: np.ndarray  # (U,) int64
    items: np.ndarray  # (M,) int64


def impression_negatives(
    impressions: pl.DataFrame, users: F.UserTable, items: F.ItemTable, tasks: list[str]
) -> ImpressionNegatives:
    """Group the impressions engaged for none of ``tasks`` by user (vectorised, one stable sort).

    The in-memory path passes the whole training window; the streamed path one chunk of it per shard.
    """
    served = impressions.filter(~engaged(tasks))
    user_pos = F.positions(users.user_ids, served["user_id"].to_numpy())
    item_pos = F.positions(items.item_ids, served["item_id"].to_numpy())
    order = np.argsort(user_pos, kind="stable")
    count = np.bincount(user_pos, minlength=len(users.user_ids)).astype(np.int64)
    start = (np.cumsum(count) - count).astype(np.int64)
    return ImpressionNegatives(start, count, item_pos[order])
