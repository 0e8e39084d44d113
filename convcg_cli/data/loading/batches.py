"""Training and evaluation batches, and the hard negatives drawn into them: one module for both data paths.

``ShuffledBatches`` (in memory: a global shuffle of column tensors) and ``ShardedBatches`` (streamed:
shard by shard, see ``convcg_cli.data.loading.stream``) yield the same batches, built by
``assemble_batch``; ``SequentialBatches`` serves evaluation queries in order. Hard negatives are
served-but-not-engaged impressions of the example's user: ``negatives.impression_negatives`` groups
them by user (the one pool builder, used for the whole training window in memory and for each chunk
when writing shards) and ``draw_hard_negatives`` draws from a pool. Under DDP the batches are split
by rank (``convcg_cli.distributed_env``).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import IterableDataset

from convcg_cli import distributed_env
from convcg_cli.data.features.cofactors import leave_target_out
from convcg_cli.data.loading.negatives import ImpressionNegatives
from convcg_cli.data.loading.stream import ShardIndex
from convcg_cli.errors import ConfigError


def assemble_batch(
    user: dict[str, torch.Tensor],
    weights: dict[str, torch.Tensor],
    item_pos: torch.Tensor,
    item_features: Mapping[str, torch.Tensor],
    item_log_q: torch.Tensor,
    hard_pos: torch.Tensor | None = None,
    profile_shares: Mapping[str, torch.Tensor] | None = None,
) -> dict:
    """One training batch from its rows' query features, task weights and item positions (and hard
    negative positions, -1 = padding): item features and logQ come from the corpus by position.
    With ``profile_shares`` the user profiles leave out each row's own item (``leave_target_out``)."""
    if profile_shares is not None:
        user = leave_target_out(user, item_pos, profile_shares)
    out = {
        "user": user,
        "item": {k: v[item_pos] for k, v in item_features.items()},
        "item_pos": item_pos,
        "log_q": item_log_q[item_pos],
        "weights": weights,
    }
    if hard_pos is not None:
        out["hard_pos"] = hard_pos
        out["hard_item"] = {k: v[hard_pos.clamp_min(0).reshape(-1)] for k, v in item_features.items()}
    return out


@dataclass(frozen=True)
class ItemIdDropout:
    """Cold-start training: each training example's item is encoded, with probability ``share``, as an
    item never shown in training (``never_shown_row``: the out-of-vocabulary id row, the performance
    features of 0 impressions, no co-engagement; see ``features.encodings.encode_never_shown``), so the
    out-of-vocabulary row and the content features (table columns, content vectors) learn to score
    an item alone. Training batches only; its draws come from their own seeded stream, so the batch
    order and the hard negatives are those of a run without it.

    Example:
        >>> drop = ItemIdDropout(0.5, {"item_id": torch.tensor(0)})
        >>> out = drop.apply({"item_id": torch.arange(1, 9)}, drop.stream(seed=0, epoch=0, rank=0))
        >>> sorted(set(out["item_id"].tolist()) - set(range(1, 9)))
        [0]
    """

    share: float
    never_shown_row: Mapping[str, torch.Tensor]

    def stream(self, seed: int, epoch: int, rank: int) -> torch.Generator:
        """The generator of one epoch's draws on one rank (independent of the batch-order streams)."""
        state = np.random.SeedSequence([seed, epoch, rank, _DROPOUT_STREAM]).generate_state(1, np.uint64)
        return torch.Generator().manual_seed(int(state[0]) >> 1)

    def apply(self, item: Mapping[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        """``item`` (a batch's item features, (B,) or (B, d)) with a random share of rows never shown."""
        n = len(next(iter(item.values())))
        drop = torch.rand(n, generator=generator) < self.share  # (B,)
        out = dict(item)
        for name, value in self.never_shown_row.items():
            column = item[name]
            mask = drop.view(-1, *([1] * (column.dim() - 1)))
            out[name] = torch.where(mask, value.to(column.dtype), column)
        return out


_DROPOUT_STREAM = 0x1D  # tells the dropout's seed sequence apart from other streams of the same seed


def draw_hard_negatives(
    start: torch.Tensor, count: torch.Tensor, items: torch.Tensor, per_example: int, g: torch.Generator
) -> torch.Tensor:
    """Per row, ``per_example`` draws (uniform, with replacement) from ``items[start : start + count]``;
    -1 (padding, masked by the loss) where the row's pool is empty. One vectorised gather."""
    count = count.unsqueeze(1)
    u = torch.rand(len(start), per_example, generator=g)
    offset = (u * count).long().clamp_max((count - 1).clamp_min(0))
    idx = (start.unsqueeze(1) + offset).clamp_max(max(len(items) - 1, 0))
    picked = items[idx] if len(items) else torch.zeros_like(idx)
    return torch.where(count > 0, picked, torch.full_like(picked, -1))


class HardNegativeSampler:
    """Draws, per training example, ``per_example`` of its user's served-but-not-engaged items.

    Sampling is uniform with replacement within the user's list, as one vectorised gather per batch;
    users with no such impressions get padding (-1), which the loss masks.
    """

    def __init__(self, negatives: ImpressionNegatives, per_example: int) -> None:
        self.start = torch.from_numpy(negatives.start)
        self.count = torch.from_numpy(negatives.count)
        self.items = torch.from_numpy(negatives.items)
        self.per_example = per_example

    def sample(self, user_pos: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """(B,) user positions -> (B, H) item positions, -1 where the user has none."""
        return draw_hard_negatives(
            self.start[user_pos], self.count[user_pos], self.items, self.per_example, generator
        )


@dataclass(frozen=True)
class RandomNegatives:
    """Mixed negative sampling (Yang et al., WWW 2020, "Mixed Negative Sampling for Learning
    Two-tower Neural Networks in Recommendations"): each training batch also draws ``count`` items
    uniformly from the whole corpus (items never shown included), which join every task's in-batch
    candidates as negatives. In-batch negatives follow the training frequency, so items rarely or
    never engaged are almost never pushed away from anyone; uniform ones reach them. The loss
    corrects the mixture (``losses.mixed_log_q``). The draws come from their own seeded stream, so
    the batch order, hard negatives and item-id dropout are those of a run without them.

    Example:
        >>> neg = RandomNegatives(3)
        >>> out = neg.apply({"item_pos": torch.arange(2)}, {"item_id": torch.arange(10) + 1},
        ...                 torch.zeros(10), neg.stream(seed=0, epoch=0, rank=0))
        >>> out["random_pos"].shape, out["random_item"]["item_id"].shape
        (torch.Size([3]), torch.Size([3]))
        >>> round(float(out["random_log_share"]), 4)  # log(3 / 10)
        -1.204
    """

    count: int

    def stream(self, seed: int, epoch: int, rank: int) -> torch.Generator:
        """The generator of one epoch's draws on one rank (independent of the batch-order streams)."""
        state = np.random.SeedSequence([seed, epoch, rank, _RANDOM_STREAM]).generate_state(1, np.uint64)
        return torch.Generator().manual_seed(int(state[0]) >> 1)

    def apply(
        self,
        batch: dict,
        item_features: Mapping[str, torch.Tensor],
        item_log_q: torch.Tensor,
        generator: torch.Generator,
    ) -> dict:
        """``batch`` with ``random_pos`` (M,), their features ``random_item``, table logQ
        ``random_log_q`` (M,) and ``random_log_share`` = log(M / corpus size)."""
        n_items = len(item_log_q)
        pos = torch.randint(n_items, (self.count,), generator=generator)
        return {
            **batch,
            "random_pos": pos,
            "random_item": {k: v[pos] for k, v in item_features.items()},
            "random_log_q": item_log_q[pos],
            "random_log_share": torch.tensor(float(np.log(self.count / n_items))),
        }


_RANDOM_STREAM = 0x2A  # tells the random negatives' seed sequence apart from other streams


class _BatchExtras:
    """One epoch's per-batch extras on one rank: item-id dropout and random corpus negatives, each
    from its own stream (the batch as it is when both are off)."""

    def __init__(
        self,
        dropout: ItemIdDropout | None,
        seed: int,
        epoch: int,
        rank: int,
        random_negatives: RandomNegatives | None = None,
        item_features: Mapping[str, torch.Tensor] | None = None,
        item_log_q: torch.Tensor | None = None,
    ) -> None:
        self.dropout = dropout
        self.generator = dropout.stream(seed, epoch, rank) if dropout is not None else None
        self.random = random_negatives
        self.random_generator = random_negatives.stream(seed, epoch, rank) if random_negatives else None
        self.item_features, self.item_log_q = item_features, item_log_q

    def __call__(self, batch: dict) -> dict:
        if self.dropout is not None and self.generator is not None:
            batch = {**batch, "item": self.dropout.apply(batch["item"], self.generator)}
        if self.random is not None and self.random_generator is not None:
            assert self.item_features is not None and self.item_log_q is not None
            batch = self.random.apply(batch, self.item_features, self.item_log_q, self.random_generator)
        return batch


def _epoch_extras(batches: ShuffledBatches | ShardedBatches, epoch: int, rank: int) -> _BatchExtras:
    """The per-batch extras of one epoch of ``batches`` on one rank."""
    return _BatchExtras(
        batches.item_id_dropout,
        batches.seed,
        epoch,
        rank,
        batches.random_negatives,
        batches.item_features,
        batches.item_log_q,
    )


class ShuffledBatches(IterableDataset):
    """Yields whole training batches by fancy-indexing column tensors with a shuffled index.

    A new permutation per epoch from ``seed + epoch``, so batch order is reproducible. The last partial
    batch is dropped (it would bias in-batch negatives) unless it is the only one.
    """

    def __init__(
        self,
        user: dict[str, torch.Tensor],
        item_pos: torch.Tensor,
        weights: dict[str, torch.Tensor],
        item_features: dict[str, torch.Tensor],
        item_log_q: torch.Tensor,
        batch_size: int,
        seed: int,
        hard_negatives: HardNegativeSampler | None = None,
        profile_shares: Mapping[str, torch.Tensor] | None = None,
        item_id_dropout: ItemIdDropout | None = None,
        random_negatives: RandomNegatives | None = None,
    ) -> None:
        self.user, self.item_pos, self.weights = user, item_pos, weights
        self.item_features, self.item_log_q = item_features, item_log_q
        self.batch_size, self.seed, self.epoch = batch_size, seed, 0
        self.hard_negatives, self.profile_shares = hard_negatives, profile_shares
        self.item_id_dropout, self.random_negatives = item_id_dropout, random_negatives

    @property
    def n_examples(self) -> int:
        """Training examples per epoch (all ranks together)."""
        return len(self.item_pos)

    def __len__(self) -> int:
        """Batches per epoch in this process. Under DDP every rank gets ``1 / world_size`` of the full
        batches; the few that do not divide evenly are dropped, like the last partial batch."""
        _, world = distributed_env.rank_and_world()
        return max(len(self.item_pos) // self.batch_size // world, 1)

    def batch(self, idx: torch.Tensor, generator: torch.Generator | None = None) -> dict:
        """Gather one batch; item features come from the corpus table by item position."""
        hard = None
        if self.hard_negatives is not None:
            generator = generator or torch.Generator().manual_seed(self.seed)
            hard = self.hard_negatives.sample(self.user["user_id"][idx] - 1, generator)  # (B, H)
        return assemble_batch(
            {k: v[idx] for k, v in self.user.items()},
            {k: v[idx] for k, v in self.weights.items()},
            self.item_pos[idx],
            self.item_features,
            self.item_log_q,
            hard,
            self.profile_shares,
        )

    def __iter__(self) -> Iterator[dict]:
        """This process's batches of the next epoch.

        Under DDP every rank draws the same permutation (same seed and epoch) and takes every
        ``world_size``-th batch starting at its rank: disjoint, equally many, equally large. So the
        global batch of step i (the ranks' batches in rank order) is exactly batch i of one process
        with a ``world_size`` times larger batch size.
        """
        rank, world = distributed_env.rank_and_world()
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        cold_start = _epoch_extras(self, self.epoch, rank)
        self.epoch += 1
        perm = torch.randperm(len(self.item_pos), generator=g)
        # Fewer rows than world * batch_size: one smaller batch per rank, equal on every rank.
        size = min(self.batch_size, len(perm) // world)
        if world > 1:  # hard negatives: a stream per rank, else every rank would make the same draws
            g = torch.Generator().manual_seed(int(torch.randint(1 << 62, (1,), generator=g)) + rank)
        for i in range(len(self)):
            start = (i * world + rank) * size
            yield cold_start(self.batch(perm[start : start + size], g))


def reordered(
    batches: ShuffledBatches | ShardedBatches,
    batch_size: int,
    seed: int,
    item_id_dropout: ItemIdDropout | None = None,
    random_negatives: RandomNegatives | None = None,
):
    """The same training examples cut into batches of ``batch_size`` in the order of ``seed``, from
    epoch 0, with ``item_id_dropout`` and ``random_negatives`` (none by default): a shallow copy (the
    example tensors are shared, read-only)."""
    out = copy.copy(batches)
    out.batch_size, out.seed, out.epoch = batch_size, seed, 0
    out.item_id_dropout, out.random_negatives = item_id_dropout, random_negatives
    return out


class SequentialBatches(IterableDataset):
    """Query features in order, in batches, with their query indices (for evaluation)."""

    def __init__(self, features: dict[str, torch.Tensor], batch_size: int) -> None:
        self.features, self.batch_size = features, batch_size
        self.n = len(next(iter(features.values())))

    def __len__(self) -> int:
        return (self.n + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[dict]:
        for start in range(0, self.n, self.batch_size):
            sl = slice(start, start + self.batch_size)
            yield {
                "user": {k: v[sl] for k, v in self.features.items()},
                "query_index": torch.arange(start, min(start + self.batch_size, self.n)),
            }


class ShardedBatches(IterableDataset):
    """Training batches read shard by shard: bounded memory whatever the number of impressions.

    Per epoch, a permutation of the shards from ``seed + epoch``; rank r of W reads shards ``r::W``.
    Rows are shuffled within a buffer (one shard plus the previous shard's remainder) and cut into
    full batches; every rank yields ``len(self)`` batches, the fewest any rank can fill, so the ranks
    step together. A batch holds exactly the keys of ``ShuffledBatches``'s batches.
    """

    def __init__(
        self,
        index: ShardIndex,
        item_features: dict[str, torch.Tensor],
        item_log_q: torch.Tensor,
        batch_size: int,
        seed: int,
        hard_negatives: int = 0,
        profile_shares: Mapping[str, torch.Tensor] | None = None,
        item_id_dropout: ItemIdDropout | None = None,
        random_negatives: RandomNegatives | None = None,
    ) -> None:
        self.index, self.item_features, self.item_log_q = index, item_features, item_log_q
        self.batch_size, self.seed, self.epoch = batch_size, seed, 0
        self.hard_negatives, self.profile_shares = hard_negatives, profile_shares
        self.item_id_dropout, self.random_negatives = item_id_dropout, random_negatives
        if hard_negatives and not index.has_hard_negatives:
            raise ConfigError("data.hard_negatives > 0 needs shards written with hard negative pools.")

    @property
    def n_examples(self) -> int:
        """Training examples per epoch (all ranks together)."""
        return self.index.n_rows

    def _assignment(self, epoch: int) -> tuple[list[list[int]], int, int]:
        """Each rank's shards for ``epoch``, the full batches every rank yields, and the fewest rows
        any rank holds (the one smaller batch of every rank when no rank fills a whole one)."""
        _, world = distributed_env.rank_and_world()
        if len(self.index.files) < world:
            raise ConfigError(
                f"{len(self.index.files)} shard(s) for {world} ranks: every rank needs at least one. Lower "
                f"data.stream.chunk_rows so the training window makes at least {world} shards."
            )
        g = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(len(self.index.files), generator=g).tolist()
        shards = [order[r::world] for r in range(world)]
        rank_rows = [sum(self.index.rows[s] for s in mine) for mine in shards]
        return shards, min(rank_rows) // self.batch_size, min(rank_rows)

    def __len__(self) -> int:
        return max(self._assignment(self.epoch)[1], 1)

    def _load(self, shard: int, g: torch.Generator) -> dict[str, torch.Tensor]:
        """One shard's rows as flat tensors (``q/*``, ``w/*``, ``item_pos``, and ``hard_pos`` drawn now)."""
        with np.load(self.index.dir / self.index.files[shard]) as z:
            cols = {k: torch.from_numpy(z[k]) for k in z.files if not k.startswith("neg_")}
            if self.hard_negatives:
                cols["hard_pos"] = draw_hard_negatives(
                    torch.from_numpy(z["neg_start"]),
                    torch.from_numpy(z["neg_count"]),
                    torch.from_numpy(z["neg_items"]),
                    self.hard_negatives,
                    g,
                )
        return cols

    def batch(self, cols: Mapping[str, torch.Tensor], idx: torch.Tensor) -> dict:
        return assemble_batch(
            {k[2:]: v[idx] for k, v in cols.items() if k.startswith("q/")},
            {k[2:]: v[idx] for k, v in cols.items() if k.startswith("w/")},
            cols["item_pos"][idx],
            self.item_features,
            self.item_log_q,
            cols["hard_pos"][idx] if "hard_pos" in cols else None,
            self.profile_shares,
        )

    def __iter__(self) -> Iterator[dict]:
        rank, _ = distributed_env.rank_and_world()
        shards, n_batches, min_rows = self._assignment(self.epoch)
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        g = torch.Generator().manual_seed(int(torch.randint(1 << 62, (1,), generator=g)) + rank)
        cold_start = _epoch_extras(self, self.epoch, rank)
        self.epoch += 1
        done, rest = 0, None
        for shard in shards[rank]:
            cols = self._load(shard, g)
            if rest is not None:
                cols = {k: torch.cat([rest[k], v]) for k, v in cols.items()}
            n = len(cols["item_pos"])
            perm = torch.randperm(n, generator=g)
            full = n // self.batch_size
            for i in range(full):
                if done == n_batches:
                    return
                yield cold_start(self.batch(cols, perm[i * self.batch_size : (i + 1) * self.batch_size]))
                done += 1
            left = perm[full * self.batch_size :]
            rest = {k: v[left] for k, v in cols.items()}
        if n_batches == 0 and rest is not None and min_rows > 0:  # fewer rows than one batch per rank
            yield cold_start(self.batch(rest, torch.arange(min_rows)))
