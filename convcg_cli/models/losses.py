"""In-batch sampled softmax with logQ correction, per task and summed over tasks.

Every row of a batch is one (user, item) impression. For a task, the *anchor* rows are those whose
label is positive; each anchor's positive is its own item, and the items of all rows in the batch
are its negatives. In-batch negatives are drawn in proportion to item frequency, so popular items
are over-penalised; subtracting the log sampling probability of each candidate (logQ correction,
Yi et al., RecSys 2019, "Sampling-Bias-Corrected Neural Modeling for Large Corpus Item
Recommendations") removes that bias.
"""

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from convcg_cli.tasks import check_task_names


def sampled_softmax_loss(
    query: torch.Tensor,
    items: torch.Tensor,
    item_ids: torch.Tensor,
    log_q: torch.Tensor | None,
    anchor: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """In-batch sampled softmax cross-entropy, averaged over the anchor rows.

    For anchor row ``b``: ``logits[b, j] = <query_b, items_j> / temperature - log_q[j]``; columns
    ``j != b`` holding the same item as ``b`` (accidental hits) are set to ``-inf``; the target is
    column ``b``. The logQ term is subtracted from every column, the positive included, as in Yi et al.

    Args:
        query: (B, D) user embeddings.
        items: (B, D) item embeddings; row ``b`` is the item of impression ``b``.
        item_ids: (B,) int64 item ids, used to find accidental hits.
        log_q: (B,) log sampling probability of each row's item, or ``None`` for no correction.
        anchor: (B,) bool, rows whose label for this task is positive.
        temperature: softmax temperature (> 0); logits are divided by it.

    Returns:
        Scalar loss. With no anchor rows, a zero that keeps the graph (so backward still works).

    Example:
        >>> q = torch.eye(3)
        >>> loss = sampled_softmax_loss(q, q, torch.arange(3), None, torch.ones(3, dtype=torch.bool), 1.0)
        >>> round(loss.item(), 4)
        0.5514
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    rows = anchor.nonzero().squeeze(-1)  # (A,) the anchors' row (= positive column) indices
    if rows.numel() == 0:
        return (query.sum() + items.sum()) * 0.0

    logits = query[rows] @ items.T / temperature  # (A, B)
    if log_q is not None:
        logits = logits - log_q.unsqueeze(0)  # (A, B), one correction per column
    cols = torch.arange(items.shape[0], device=items.device)  # (B,)
    same_item = item_ids[rows].unsqueeze(1) == item_ids.unsqueeze(0)  # (A, B)
    accidental_hit = same_item & (cols.unsqueeze(0) != rows.unsqueeze(1))  # (A, B)
    logits = logits.masked_fill(accidental_hit, float("-inf"))  # (A, B)
    return F.cross_entropy(logits, rows)


class MultiTaskSampledSoftmax(nn.Module):
    """Weighted sum over tasks of ``sampled_softmax_loss``.

    Tasks are the keys of ``task_weights`` (the config's ``loss.task_weights``, the one place task
    names are set); tasks with weight 0 are skipped and do not appear in the per-task losses.

    Args:
        task_weights: task name -> weight (>= 0, at least one > 0). Names are checked against
            ``convcg_cli.tasks``.
        temperature: softmax temperature shared by every task.
        logq_correction: subtract ``log_q`` of each candidate from its logit.

    Example:
        >>> loss_fn = MultiTaskSampledSoftmax({"conversion": 1.0, "engagement": 0.5})
        >>> emb = F.normalize(torch.randn(4, 8), dim=-1)
        >>> user = {"conversion": emb, "engagement": emb}
        >>> labels = {t: torch.tensor([True, False, True, True]) for t in user}
        >>> total, per_task = loss_fn(user, user, labels, torch.arange(4), torch.zeros(4))
        >>> sorted(per_task)
        ['conversion', 'engagement']
    """

    def __init__(
        self,
        task_weights: Mapping[str, float],
        temperature: float = 0.05,
        logq_correction: bool = True,
    ) -> None:
        super().__init__()
        weights = {str(t): float(w) for t, w in dict(task_weights).items()}
        check_task_names(weights)
        negative = {t: w for t, w in weights.items() if w < 0}
        if negative:
            raise ValueError(f"Task weights must be >= 0, got {negative}.")
        if not any(w > 0 for w in weights.values()):
            raise ValueError(f"At least one task weight must be > 0, got {weights}.")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}.")
        self.task_weights = weights
        self.temperature = float(temperature)
        self.logq_correction = logq_correction

    def forward(
        self,
        user: Mapping[str, torch.Tensor],
        item: Mapping[str, torch.Tensor],
        labels: Mapping[str, torch.Tensor],
        item_ids: torch.Tensor,
        log_q: torch.Tensor | None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return ``(sum_t w_t * loss_t, {t: loss_t})`` over tasks with non-zero weight.

        Args:
            user: task -> (B, D) user embeddings.
            item: task -> (B, D) item embeddings.
            labels: task -> (B,) bool positives; they pick the anchor rows.
            item_ids: (B,) int64 item ids.
            log_q: (B,) log sampling probability of each row's item; may be ``None`` only when
                ``logq_correction`` is off.
        """
        if self.logq_correction and log_q is None:
            raise ValueError("logq_correction is on but log_q was not given.")
        correction = log_q if self.logq_correction else None
        losses: dict[str, torch.Tensor] = {}
        total: torch.Tensor | None = None
        for task, weight in self.task_weights.items():
            if weight == 0:
                continue
            loss = sampled_softmax_loss(
                user[task], item[task], item_ids, correction, labels[task], self.temperature
            )
            losses[task] = loss
            total = weight * loss if total is None else total + weight * loss
        assert total is not None  # __init__ guarantees one task with weight > 0
        return total, losses
