"""The LightningModule: wires two towers, the multi-task loss and per-epoch retrieval validation.

The towers and heads are plain nn.Modules (towers.py, cross.py, heads.py); the loss lives in
losses.py; recall is computed by convcg_cli.metrics. This class only connects them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import lightning as L
import numpy as np
import torch

from convcg_cli.models.balancing import GRAD_COSINE_METRIC, last_linear_weight, task_gradient_cosine
from convcg_cli.models.guards import check_finite_gradients, check_finite_loss
from convcg_cli.models.losses import MultiTaskSampledSoftmax
from convcg_cli.models.towers import FeatureSpec, Tower
from convcg_cli.tasks import PRIMARY_TASK


class RetrievalModule(L.LightningModule):
    """Two-tower retriever trained with a multi-task in-batch sampled softmax.

    Args:
        user_features, item_features: feature specs of the query (user + context) and item towers.
        cross: factory ``cross(in_dim)`` of the cross block (SequentialCross / ParallelCross).
        head: factory ``head(in_dim)`` of the head (UnifiedHead / MultiHead).
        loss: the multi-task loss; its ``task_weights`` name the tasks.
        optimizer: factory ``optimizer(params)``.
        feature_embedding_dim: size of each categorical feature embedding.
        val_ks: recall cut-offs computed on the validation days every epoch.
        interference_every_n_steps: log the cosine between the conversion and each auxiliary task's
            gradient on the shared parameters every N steps (0 = off); negative = the auxiliary
            task pulls against the primary one.
        history_encoder: factory ``history_encoder(num_items)`` of the user-history sequence encoder;
            used only when the user features include a sequence (``data.history.max_len > 0``).
    """

    def __init__(
        self,
        user_features: FeatureSpec,
        item_features: FeatureSpec,
        cross: Callable[[int], torch.nn.Module],
        head: Callable[[int], torch.nn.Module],
        loss: MultiTaskSampledSoftmax,
        optimizer: Callable[..., torch.optim.Optimizer],
        feature_embedding_dim: int = 16,
        val_ks: Sequence[int] = (100, 1000),
        interference_every_n_steps: int = 50,
        history_encoder: Callable[[int], torch.nn.Module] | None = None,
    ) -> None:
        super().__init__()
        self.user_tower = Tower(
            user_features,
            interaction=cross,
            head=head,
            embedding_dim=feature_embedding_dim,
            sequence_encoder=history_encoder,
        )
        self.item_tower = Tower(
            item_features, interaction=cross, head=head, embedding_dim=feature_embedding_dim
        )
        self._zero_never_shown_item_row()
        self.loss = loss
        self.optimizer_factory = optimizer
        self.val_ks = list(val_ks)
        self.interference_every_n_steps = interference_every_n_steps
        self._val_query_emb: list[torch.Tensor] = []

    @torch.no_grad()
    def _zero_never_shown_item_row(self) -> None:
        """Start row 0 of the item tower's ``item_id`` table (the out-of-vocabulary row every item never
        shown in training reads, in evaluation and in serving alike) at zero: "no id information".
        Training reads it only under ``data.item_id_dropout``; otherwise it stays zero. Set after the
        random initialisation, so no other weight changes."""
        tables = self.item_tower.embedder.embeddings
        if "item_id" in tables:
            cast(torch.Tensor, tables["item_id"].weight)[0].zero_()

    @property
    def tasks(self) -> list[str]:
        return list(self.loss.task_weights)

    def shared_parameters(self) -> list[torch.nn.Parameter]:
        """Parameters every task trains: both towers minus their heads (not the balancer's own)."""
        return [
            p
            for tower in (self.user_tower, self.item_tower)
            for name, p in tower.named_parameters()
            if not name.startswith("head.") and p.requires_grad
        ]

    def last_shared_layers(self) -> list[torch.nn.Parameter]:
        """GradNorm's W: the output Linear of each tower's interaction block."""
        towers = (self.user_tower, self.item_tower)
        return [last_linear_weight(cast(torch.nn.Module, t.interaction)) for t in towers]

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        user = self.user_tower(batch["user"])
        item = self.item_tower(batch["item"])
        hard = None
        if "hard_item" in batch:  # impression hard negatives: (B, H) items per example
            b, h = batch["hard_pos"].shape
            hard = {t: e.view(b, h, -1) for t, e in self.item_tower(batch["hard_item"]).items()}
        # random corpus negatives (data.random_negatives): (M, D) per task, shared by every row
        random = self.item_tower(batch["random_item"]) if "random_item" in batch else None
        terms = self.loss.terms(user, item, batch, hard=hard, shared=self.last_shared_layers(), random=random)
        check_finite_loss(self.global_step, terms.total, terms.logs)
        bs = len(batch["item_pos"])
        if self.interference_every_n_steps and self.global_step % self.interference_every_n_steps == 0:
            # Task-interference monitor: one extra backward per task, every N steps.
            cosines = task_gradient_cosine(terms.task_losses, self.shared_parameters(), PRIMARY_TASK)
            self._log_at_this_step({GRAD_COSINE_METRIC.format(pair=p): float(c) for p, c in cosines.items()})
        self.log("train/loss", terms.total, prog_bar=True, batch_size=bs)
        self.log_dict({f"train/{k}": v for k, v in terms.logs.items()}, batch_size=bs)
        return terms.total

    def _log_at_this_step(self, metrics: dict[str, float]) -> None:
        """Log ``metrics`` at this very step, straight to the logger: values computed only every N steps
        (the gradient cosine) must not go through ``self.log``, which re-logs the last value at every
        logging step in between. The logger writes on rank 0 only."""
        if self.logger is not None and metrics:
            self.logger.log_metrics(metrics, step=self.global_step)

    @torch.no_grad()
    def init_item_embeddings(self, factors: np.ndarray) -> int:
        """Start every item-id table (the item tower's ``item_id``, the user tower's ``subject_item_id``
        and the history encoder's items) from item factors (N, d), row i for item position i.

        The first ``min(d, width)`` columns of rows 1..N (0 = missing/padding) get the factors scaled
        to the table's own initial standard deviation, so the optimiser sees familiar magnitudes;
        other columns keep their random start. Returns how many tables were initialised.
        """
        factors_t = torch.as_tensor(factors, dtype=torch.float32)
        n, d = factors_t.shape
        tables: list[torch.nn.Module] = [
            e
            for tower in (self.item_tower, self.user_tower)
            for name, e in tower.embedder.embeddings.items()
            if name in ("item_id", "subject_item_id")
        ]
        tables += [
            cast(torch.nn.Module, m.item_embedding)
            for m in self.user_tower.embedder.sequence_encoders.values()
            if hasattr(m, "item_embedding")
        ]
        for table in tables:
            weight = cast(torch.Tensor, table.weight)
            if weight.shape[0] != n + 1:
                raise ValueError(f"an item table has {weight.shape[0]} rows for {n} items (+1 padding).")
            width = min(d, weight.shape[1])
            block = factors_t[:, :width]
            scale = weight[1:, :width].std() / block.std().clamp_min(1e-12)
            weight[1:, :width] = block * scale
        return len(tables)

    @torch.no_grad()
    def embed_queries(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Served query embedding (the conversion head for multi-head, the one head for unified)."""
        return self.user_tower.serve(features)

    @torch.no_grad()
    def embed_items(self, item_features: Mapping[str, torch.Tensor], batch_size: int = 65536) -> np.ndarray:
        """Served embedding of every item in the corpus, in corpus order, as float32 numpy."""
        n = len(next(iter(item_features.values())))
        out = []
        for start in range(0, n, batch_size):
            chunk = {k: v[start : start + batch_size].to(self.device) for k, v in item_features.items()}
            out.append(self.item_tower.serve(chunk).float().cpu())
        return torch.cat(out).numpy()

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._val_query_emb.append(self.embed_queries(batch["user"]).float().cpu())

    def on_validation_epoch_end(self) -> None:
        from convcg_cli.metrics.suite import recall_report

        dm = self.trainer.datamodule  # type: ignore[attr-defined]
        query_emb = torch.cat(self._val_query_emb).numpy()
        self._val_query_emb.clear()
        item_emb = self.embed_items(dm.item_features)
        queries = dm.queries["val"]
        # fast_dev_run / limit_val_batches embed a prefix of the queries: score the positives among them.
        report = recall_report(
            query_emb, item_emb, queries, self.val_ks, split="val", tasks=self.tasks, n_queries=len(query_emb)
        )
        self.log_dict(report, prog_bar=False)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Stop at a non-finite gradient before the optimiser spreads it into every weight."""
        check_finite_gradients(self.global_step, self.named_parameters())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # A learned balancer's own weights get their own group: no weight decay, lr scaled.
        balancer = self.loss.balancer
        own = list(balancer.parameters())
        ids = {id(p) for p in own}
        groups: list[dict] = [{"params": [p for p in self.parameters() if id(p) not in ids]}]
        if own:
            groups.append({"params": own, "weight_decay": 0.0})
        optimizer = self.optimizer_factory(groups)
        if own:
            optimizer.param_groups[-1]["lr"] *= balancer.lr_scale
        return optimizer
