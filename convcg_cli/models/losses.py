"""In-batch sampled softmax with logQ correction, per task and summed over tasks.

Every row of a batch is one (user, item) impression. For a task, the *anchor* rows are those whose
label is positive; each anchor's positive is its own item, and the items of all rows in the batch
are its negatives. In-batch negatives are drawn in proportion to item frequency, so popular items
are over-penalised; subtracting the log sampling probability of each candidate (logQ correction,
Yi et al., RecSys 2019, "Sampling-Bias-Corrected Neural Modeling for Large Corpus Item
Recommendations") removes that bias.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from convcg_cli.models.balancing import StaticWeights
from convcg_cli.tasks import PRIMARY_TASK, validate_task_weights


def sampled_softmax_loss(
    query: torch.Tensor,
    items: torch.Tensor,
    item_ids: torch.Tensor,
    log_q: torch.Tensor | None,
    anchor: torch.Tensor,
    temperature: float,
    *,
    weight: torch.Tensor | None = None,
    positive: torch.Tensor | None = None,
    hard_items: torch.Tensor | None = None,
    hard_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """In-batch sampled softmax cross-entropy (plus optional per-row hard negatives), over anchor rows.

    For anchor row ``b`` with positive column ``p = positive[b]`` (``b`` by default):
    ``logits[b, j] = <query_b, items_j> / temperature - log_q[j]`` over the N candidates; columns
    ``j != p`` holding the same item as ``p`` (accidental hits) are set to ``-inf``; the target is
    column ``p``. The logQ term is subtracted from every in-batch column, the positive included, as in
    Yi et al. Hard negatives (impressions served to this row's user and not engaged) are appended
    as H extra columns *without* logQ: they were not sampled in proportion to popularity, so there
    is no sampling bias to undo. Padding (``hard_ids < 0``) and hard negatives that are the
    positive item itself are masked.

    Args:
        query: (B, D) user embeddings.
        items: (N, D) candidate item embeddings; N = B in one process, the global batch under DDP.
        item_ids: (N,) int64 item ids, used to find accidental hits.
        log_q: (N,) log sampling probability of each candidate, or ``None`` for no correction.
        anchor: (B,) bool, rows whose label for this task is positive.
        temperature: softmax temperature (> 0); logits are divided by it.
        weight: (B,) per-row weight of the anchor's cross-entropy (default 1); the loss is the
            weighted mean over anchors, so weights only matter relative to each other.
        positive: (B,) int64 column of each row's positive among the N candidates (default arange(B)).
        hard_items: (B, H, D) embeddings of each row's hard negatives.
        hard_ids: (B, H) int64 item ids of the hard negatives; < 0 marks padding.

    Returns:
        Scalar loss. With no anchor rows, a zero that keeps the graph (so backward still works).

    Example:
        >>> q = torch.eye(3)
        >>> loss = sampled_softmax_loss(q, q, torch.arange(3), None, torch.ones(3, dtype=torch.bool), 1.0)
        >>> round(loss.item(), 4)
        0.5514

    One function (~75 lines, most of it this docstring): the logits, the masks and the weighted
    cross-entropy are one computation on the same (B, B + H) matrix.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    if weight is not None:
        anchor = anchor & (weight > 0)
    rows = anchor.nonzero().squeeze(-1)  # (A,) anchor rows
    if rows.numel() == 0:
        zero = (query.sum() + items.sum()) * 0.0
        return zero if hard_items is None else zero + hard_items.sum() * 0.0
    if positive is None:
        positive = torch.arange(query.shape[0], device=query.device)
    pos = positive[rows]  # (A,) positive column of each anchor

    logits = query[rows] @ items.T / temperature  # (A, N)
    if log_q is not None:
        logits = logits - log_q.unsqueeze(0)  # (A, N), one correction per column
    cols = torch.arange(items.shape[0], device=items.device)  # (N,)
    pos_ids = item_ids[pos].unsqueeze(1)  # (A, 1)
    accidental_hit = (pos_ids == item_ids.unsqueeze(0)) & (cols.unsqueeze(0) != pos.unsqueeze(1))  # (A, N)
    logits = logits.masked_fill(accidental_hit, float("-inf"))
    if hard_items is not None:
        assert hard_ids is not None, "hard_ids must come with hard_items"
        hard = torch.einsum("ad,ahd->ah", query[rows], hard_items[rows]) / temperature  # (A, H)
        hard_mask = (hard_ids[rows] < 0) | (hard_ids[rows] == pos_ids)  # (A, H) padding or the positive
        logits = torch.cat([logits, hard.masked_fill(hard_mask, float("-inf"))], dim=1)  # (A, N + H)
    ce = F.cross_entropy(logits, pos, reduction="none")  # (A,)
    if weight is None:
        return ce.mean()
    w = weight[rows]
    return (w * ce).sum() / w.sum()


def mixed_log_q(log_q: torch.Tensor, n_batch: int, log_share: torch.Tensor | float) -> torch.Tensor:
    """logQ of every candidate under mixed negative sampling: ``n_batch`` in-batch candidates drawn
    by training frequency (``exp(log_q)``) plus M uniform corpus draws, so the expected count of item
    j among the candidates is ``n_batch * q_j + M / |corpus|``; ``log_share`` = log(M / |corpus|).
    Subtracted from each column's logit like the in-batch correction (Yang et al., WWW 2020).

    Example:
        >>> q = torch.log(torch.tensor([0.5, 0.25]))
        >>> mixed_log_q(q, 4, torch.log(torch.tensor(0.5))).exp().tolist()
        [2.5, 1.5]
    """
    return torch.logaddexp(log_q + float(np.log(n_batch)), torch.as_tensor(log_share, dtype=log_q.dtype))


def advertiser_softmax_loss(
    query: torch.Tensor,
    items: torch.Tensor,
    advertiser: torch.Tensor,
    weight: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """In-batch softmax of users against *advertisers* (items pooled by advertiser).

    Each advertiser in the batch is represented by the L2-normalised mean embedding of its in-batch
    items; an anchor row's target is its item's advertiser. Advertiser-level labels are far less
    noisy than per-item conversions (many items, one shop), so this pulls users towards the shops
    they convert with. Gradients reach only the embeddings of in-batch items, shared equally among
    the items of one advertiser.

    Args:
        query: (B, D) user embeddings (the conversion task's).
        items: (B, D) item embeddings; row ``b`` is the item of impression ``b``.
        advertiser: (B,) int64 advertiser code of each row's item.
        weight: (B,) per-row weight; rows with weight 0 are not anchors.
        temperature: softmax temperature.
    """
    rows = (weight > 0).nonzero().squeeze(-1)  # (A,)
    if rows.numel() == 0:
        return (query.sum() + items.sum()) * 0.0
    uniq, group = torch.unique(advertiser, return_inverse=True)  # (G,), (B,)
    pooled = torch.zeros(len(uniq), items.shape[1], dtype=items.dtype, device=items.device)
    pooled = pooled.index_add(0, group, items)  # (G, D) sums; normalising makes it a direction
    pooled = F.normalize(pooled, dim=-1)
    logits = query[rows] @ pooled.T / temperature  # (A, G)
    ce = F.cross_entropy(logits, group[rows], reduction="none")
    w = weight[rows]
    return (w * ce).sum() / w.sum()


class TableLogQ(nn.Module):
    """logQ from a precomputed table: each item's share of the training examples (the data's ``log_q``)."""

    def forward(self, item_ids: torch.Tensor, table_log_q: torch.Tensor) -> torch.Tensor | None:
        return table_log_q


class NoLogQ(nn.Module):
    """No sampling-bias correction (popular items are over-penalised as negatives)."""

    def forward(self, item_ids: torch.Tensor, table_log_q: torch.Tensor) -> torch.Tensor | None:
        return None


class StreamingLogQ(nn.Module):
    """Streaming item-frequency estimate over the training stream (Yi et al., RecSys 2019, Alg. 2).

    For each item bucket it keeps ``last`` (the step it was last seen) and ``interval`` (an EMA of the
    number of steps between sightings); the sampling probability per batch is ``1 / interval``.
    Unlike a table it needs no pass over the data and follows drifting popularity. A bucket's first
    sighting at step t sets ``interval = t + 1`` (steps waited so far), then
    ``interval <- (1 - alpha) * interval + alpha * (t - last)``. Buckets are ``id % num_buckets``.

    Args:
        num_buckets: size of the hashed arrays (>= the number of items for an exact estimate).
        alpha: EMA rate.
    """

    last: torch.Tensor  # (num_buckets,) step of the last sighting, -1 = never
    interval: torch.Tensor  # (num_buckets,) EMA of steps between sightings
    step: torch.Tensor  # () steps seen so far

    def __init__(self, num_buckets: int = 1 << 20, alpha: float = 0.01) -> None:
        super().__init__()
        self.alpha = alpha
        self.register_buffer("last", torch.full((num_buckets,), -1, dtype=torch.long))
        self.register_buffer("interval", torch.ones(num_buckets))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def forward(self, item_ids: torch.Tensor, table_log_q: torch.Tensor | None = None) -> torch.Tensor:
        """Update with this batch (in training mode) and return (B,) log q of its items."""
        b = item_ids % self.last.numel()
        if self.training:
            t = self.step
            uniq = torch.unique(b)  # an item seen twice in one batch is one sighting
            seen = self.last[uniq] >= 0
            gap = (t - self.last[uniq]).float()
            updated = torch.where(
                seen, (1 - self.alpha) * self.interval[uniq] + self.alpha * gap, t.float() + 1
            )
            self.interval[uniq] = updated
            self.last[uniq] = t
            self.step += 1
        return -torch.log(self.interval[b].clamp_min(1.0))


class MultiTaskSampledSoftmax(nn.Module):
    """The training objective: per-task sampled softmax, balanced across tasks, plus optional extras.

    Tasks are the keys of ``task_weights`` (the config's ``loss.task_weights``, the one place task
    names are set); tasks with weight 0 are skipped. Per task ``t`` the anchors are the rows with
    ``weights[t] > 0`` (dual positives give engagement rows a weight in the conversion task).

    Args:
        task_weights: task name -> weight (>= 0, at least one > 0). Names are checked against
            ``convcg_cli.tasks``.
        temperature: softmax temperature shared by every task.
        logq: where log sampling probabilities come from (TableLogQ, StreamingLogQ, NoLogQ).
        balancer: turns per-task losses into the total (StaticWeights, UncertaintyWeighting, GradNorm);
            default: ``StaticWeights(task_weights)``, the weighted sum ``sum_t w_t * loss_t``.
        advertiser_weight: weight of the advertiser-level softmax on the conversion embeddings (0 = off).

    Example:
        >>> loss_fn = MultiTaskSampledSoftmax({"conversion": 1.0, "engagement": 0.5})
        >>> emb = F.normalize(torch.randn(4, 8), dim=-1)
        >>> user = {"conversion": emb, "engagement": emb}
        >>> weights = {t: torch.tensor([1.0, 0.0, 1.0, 1.0]) for t in user}
        >>> batch = {"weights": weights, "item_pos": torch.arange(4), "log_q": torch.zeros(4)}
        >>> total, logs = loss_fn(user, user, batch)
        >>> sorted(logs)  # doctest: +NORMALIZE_WHITESPACE
        ['conversion/loss', 'engagement/loss', 'task_weight/conversion', 'task_weight/engagement',
         'weighted_loss']
    """

    def __init__(
        self,
        task_weights: Mapping[str, float],
        temperature: float = 0.05,
        logq: nn.Module | None = None,
        balancer: nn.Module | None = None,
        advertiser_weight: float = 0.0,
    ) -> None:
        super().__init__()
        weights = validate_task_weights(task_weights)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}.")
        if advertiser_weight < 0:
            raise ValueError(f"advertiser_weight must be >= 0, got {advertiser_weight}.")
        self.task_weights = weights
        self.temperature = float(temperature)
        self.logq = logq if logq is not None else TableLogQ()
        self.balancer = balancer if balancer is not None else StaticWeights(weights)
        self.advertiser_weight = float(advertiser_weight)

    @property
    def active_tasks(self) -> list[str]:
        """Tasks with a non-zero weight, in config order."""
        return [t for t, w in self.task_weights.items() if w > 0]

    def task_losses(
        self,
        user: Mapping[str, torch.Tensor],
        item: Mapping[str, torch.Tensor],
        batch: Mapping,
        hard: Mapping[str, torch.Tensor] | None = None,
        random: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Unweighted loss of each active task.

        Args:
            user, item: task -> (B, D) embeddings (the same tensor for every task with a unified head).
            batch: needs ``weights`` (task -> (B,) float), ``item_pos`` (B,) item ids, ``log_q`` (B,);
                with hard negatives also ``hard_pos`` (B, H).
            hard: task -> (B, H, D) hard-negative embeddings, or None.
            random: task -> (M, D) embeddings of the batch's random corpus negatives (``random_pos``,
                ``random_log_q``, ``random_log_share`` in ``batch``), or None. They are appended to
                the candidates after the in-batch items; logQ becomes the mixture's
                (:func:`mixed_log_q`).

        Under DDP (``trainer=ddp``) the candidates are the *global* batch: every rank's item
        embeddings (with gradients), ids and table logQ are gathered; logQ is computed on the global
        ids (so a streaming estimate sees the same stream on every rank); each task's loss is the
        mean over the anchors of all ranks (``distributed.mean_over_ranks``), so its value and
        DDP-averaged gradient equal one process's on the global batch. Hard negatives stay per row.
        In one process every step of that is the identity.
        """
        from convcg_cli.models import distributed

        rank, world = distributed.rank_and_world()
        item_ids = distributed.gather_with_grad(batch["item_pos"])  # (N,), N = world * B
        log_q = self.logq(item_ids, distributed.gather_with_grad(batch["log_q"]))
        if random is not None:  # random corpus negatives: M more columns, this rank's own draws
            if log_q is not None:
                log_q = mixed_log_q(
                    torch.cat([log_q, batch["random_log_q"]]), len(item_ids), batch["random_log_share"]
                )
            item_ids = torch.cat([item_ids, batch["random_pos"]])
        b = len(batch["item_pos"])
        # This rank's rows are the candidate columns rank * B ... (rank + 1) * B - 1.
        positive = None if world == 1 else rank * b + torch.arange(b, device=item_ids.device)
        gathered: dict[int, torch.Tensor] = {}  # a unified head gives every task one tensor: gather once
        losses = {}
        for task in self.active_tasks:
            if id(item[task]) not in gathered:
                candidates = distributed.gather_with_grad(item[task])
                if random is not None:
                    candidates = torch.cat([candidates, random[task]])
                gathered[id(item[task])] = candidates
            weight = batch["weights"][task]
            loss = sampled_softmax_loss(
                user[task],
                gathered[id(item[task])],
                item_ids,
                log_q,
                weight > 0,
                self.temperature,
                weight=weight,
                positive=positive,
                hard_items=None if hard is None else hard[task],
                hard_ids=None if hard is None else batch["hard_pos"],
            )
            losses[task] = distributed.mean_over_ranks(loss, torch.where(weight > 0, weight, 0.0).sum())
        return losses

    def terms(
        self,
        user: Mapping[str, torch.Tensor],
        item: Mapping[str, torch.Tensor],
        batch: Mapping,
        hard: Mapping[str, torch.Tensor] | None = None,
        shared: Sequence[nn.Parameter] = (),
        random: Mapping[str, torch.Tensor] | None = None,
    ) -> "LossTerms":
        """The total to backpropagate, the named scalars to log and the per-task losses, in one pass.

        Per-task losses are computed once per call (a second computation would advance a streaming
        logQ estimate twice); the training step reuses them for the task-interference monitor.
        ``shared``: the parameters a gradient-based balancer (GradNorm) measures task gradients on.
        Logged: ``<task>/loss`` (unweighted), ``task_weight/<task>`` (effective weight this step),
        ``weighted_loss`` (sum of weighted task losses, comparable across balancers),
        ``advertiser/loss`` when the advertiser loss is on.
        """
        losses = self.task_losses(user, item, batch, hard, random)
        total, effective = self.balancer(losses, shared)
        logs = {f"{t}/loss": v.detach() for t, v in losses.items()}
        logs.update({f"task_weight/{t}": torch.as_tensor(w).detach() for t, w in effective.items()})
        logs["weighted_loss"] = torch.stack(
            [self.task_weights[t] * v.detach() for t, v in losses.items()]
        ).sum()
        if self.advertiser_weight > 0:
            adv = advertiser_softmax_loss(
                user[PRIMARY_TASK],
                item[PRIMARY_TASK],
                batch["item"]["advertiser_id"],
                batch["weights"][PRIMARY_TASK],
                self.temperature,
            )
            total = total + self.advertiser_weight * adv
            logs["advertiser/loss"] = adv.detach()
        return LossTerms(total, logs, losses)

    def forward(
        self,
        user: Mapping[str, torch.Tensor],
        item: Mapping[str, torch.Tensor],
        batch: Mapping,
        hard: Mapping[str, torch.Tensor] | None = None,
        shared: Sequence[nn.Parameter] = (),
        random: Mapping[str, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(total, logs)`` of :meth:`terms`."""
        out = self.terms(user, item, batch, hard, shared, random)
        return out.total, out.logs


@dataclass(frozen=True)
class LossTerms:
    """One evaluation of the objective on a batch.

    Attributes:
        total: the scalar to backpropagate.
        logs: named detached scalars to log (see ``MultiTaskSampledSoftmax.terms``).
        task_losses: task -> unweighted loss, with its graph (the interference monitor's input).
    """

    total: torch.Tensor
    logs: dict[str, torch.Tensor]
    task_losses: dict[str, torch.Tensor]
