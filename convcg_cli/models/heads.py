"""Output heads of a tower: turn the interaction output into L2-normalised retrieval embeddings.

One class per variant, chosen by config (``conf/model/head/``):

* ``UnifiedHead``: one embedding shared by every task (the tasks only differ in their loss).
* ``MultiHead``: one embedding per task; only the serving task's embedding is used for retrieval.

Both expose the same two calls: ``forward(h) -> {task: (B, E)}`` for training, ``serve(h) -> (B, E)``
for building the index and querying it.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from convcg_cli.tasks import PRIMARY_TASK


def _check_tasks(tasks: Sequence[str]) -> tuple[str, ...]:
    names = tuple(str(t) for t in tasks)
    if not names:
        raise ValueError("A head needs at least one task.")
    if len(set(names)) != len(names):
        raise ValueError(f"Task names must be unique, got {list(names)}.")
    return names


class UnifiedHead(nn.Module):
    """One Linear projection plus L2 normalisation, shared by every task.

    ``forward`` returns the *same* tensor under every task name, so the multi-task loss can treat both
    heads alike. ``serving_task`` is ``None``: the one embedding serves all tasks, there is nothing to
    choose.

    Args:
        in_dim: width of the interaction output.
        embedding_dim: width ``E`` of the retrieval embedding.
        tasks: task names to key the output by (from ``loss.task_weights``).

    Example:
        >>> head = UnifiedHead(in_dim=8, embedding_dim=4, tasks=["conversion", "engagement"])
        >>> out = head(torch.randn(3, 8))
        >>> out["conversion"] is out["engagement"]
        True
    """

    serving_task: str | None = None

    def __init__(self, in_dim: int, embedding_dim: int, tasks: Sequence[str]) -> None:
        super().__init__()
        self.tasks = _check_tasks(tasks)
        self.proj = nn.Linear(in_dim, embedding_dim)
        self.in_dim = in_dim
        self.embedding_dim = embedding_dim

    def serve(self, h: torch.Tensor) -> torch.Tensor:
        """The retrieval embedding: (B, in_dim) -> (B, E), unit L2 norm per row."""
        return F.normalize(self.proj(h), dim=-1)  # (B, E)

    def forward(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        """Map (B, in_dim) -> {task: (B, E)}, the same tensor for every task."""
        emb = self.serve(h)  # (B, E)
        return {task: emb for task in self.tasks}


class MultiHead(nn.Module):
    """One Linear projection plus L2 normalisation per task.

    Every task trains its own embedding on top of the shared tower; retrieval uses only the
    ``serving_task`` embedding, and ``serve`` computes only that head.

    Args:
        in_dim: width of the interaction output.
        embedding_dim: width ``E`` of each task's embedding.
        tasks: task names, one head each (from ``loss.task_weights``).
        serving_task: the task whose embedding is served; must be one of ``tasks``.

    Example:
        >>> head = MultiHead(in_dim=8, embedding_dim=4, tasks=["conversion", "engagement"])
        >>> sorted(head(torch.randn(3, 8)))
        ['conversion', 'engagement']
        >>> head.serve(torch.randn(3, 8)).shape
        torch.Size([3, 4])
    """

    def __init__(
        self,
        in_dim: int,
        embedding_dim: int,
        tasks: Sequence[str],
        serving_task: str = PRIMARY_TASK,
    ) -> None:
        super().__init__()
        self.tasks = _check_tasks(tasks)
        if serving_task not in self.tasks:
            raise ValueError(f"serving_task '{serving_task}' is not one of the tasks {list(self.tasks)}.")
        self.serving_task = serving_task
        self.projs = nn.ModuleDict({task: nn.Linear(in_dim, embedding_dim) for task in self.tasks})
        self.in_dim = in_dim
        self.embedding_dim = embedding_dim

    def serve(self, h: torch.Tensor) -> torch.Tensor:
        """The serving task's embedding: (B, in_dim) -> (B, E), unit L2 norm per row."""
        return F.normalize(self.projs[self.serving_task](h), dim=-1)  # (B, E)

    def forward(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        """Map (B, in_dim) -> {task: (B, E)}, one distinct embedding per task."""
        return {task: F.normalize(self.projs[task](h), dim=-1) for task in self.tasks}
