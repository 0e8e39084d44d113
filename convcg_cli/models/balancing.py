"""Task balancing: turn the unweighted per-task losses into the one scalar that is backpropagated.

Conversion is the sparse primary task and engagement the abundant auxiliary one; how much weight the
auxiliary task gets decides whether it helps the shared towers or drowns the conversion signal. One
class per strategy, chosen by config (``conf/loss/balancer/``), all with the same call::

    total, weights = balancer(per_task_losses, shared_params)

* ``StaticWeights``: the fixed ``loss.task_weights`` (the plain weighted sum).
* ``UncertaintyWeighting``: learned homoscedastic-uncertainty weights (Kendall et al., CVPR 2018).
* ``GradNorm``: weights learned so that every task's gradient on the shared layer has a norm matched
  to how slowly that task trains (Chen et al., ICML 2018).

``task_gradient_cosine`` is the matching monitor: the cosine between the primary task's gradient and
each auxiliary task's gradient on the shared parameters (negative = the auxiliary task pulls against
the primary one).

Tasks with weight 0 in ``loss.task_weights`` are switched off: they get no learnable weight, are
skipped when present in ``losses``, and are left out of the returned weights.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import cast

import torch
from torch import nn

from convcg_cli.tasks import PRIMARY_TASK, validate_task_weights

# Logged metric name, filled in with ``.format(pair=...)``.
GRAD_COSINE_METRIC = "train/grad_cosine/{pair}"

# GradNorm weights are floored here before renormalising, so a weight pushed below zero by a large
# step cannot flip a task's sign or make the sum zero.
_MIN_GRADNORM_WEIGHT = 1e-6


def _grads(loss: torch.Tensor, params: Sequence[nn.Parameter]) -> list[torch.Tensor]:
    """``d loss / d p`` for each of ``params`` (zeros where ``loss`` does not reach ``p``), keeping the
    graph so the caller can still backpropagate ``loss``."""
    grads = torch.autograd.grad(loss, list(params), retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)]


def _grad_norm(loss: torch.Tensor, params: Sequence[nn.Parameter]) -> torch.Tensor:
    """L2 norm of the gradient of ``loss`` on ``params``, flattened and concatenated (a detached scalar)."""
    squares = [g.detach().float().square().sum() for g in _grads(loss, params)]
    return torch.stack(squares).sum().sqrt()


class TaskBalancer(nn.Module):
    """Base of every balancer: validates ``task_weights`` and lines the losses up in task order.

    Subclasses implement ``forward(losses, shared) -> (total, weights)``:

    * ``losses``: task -> unweighted scalar loss (``MultiTaskSampledSoftmax``'s per-task losses).
    * ``shared``: parameters shared by every task; balancers that measure gradients use them
      (GradNorm: the last shared layer), the others ignore them.
    * ``total``: the scalar to backpropagate.
    * ``weights``: task -> effective weight on that task's loss, a detached scalar, logged by the loss as
      ``task_weight/<task>``.

    Args:
        task_weights: task name -> weight >= 0 (the config's ``loss.task_weights``); at least one > 0.

    Attributes:
        tasks: the tasks with weight > 0, in config order.
        lr_scale: factor on the optimiser's learning rate for this balancer's own parameters (the
            module gives them their own param group); 1.0 where there are none.
    """

    lr_scale: float = 1.0

    def __init__(self, task_weights: Mapping[str, float]) -> None:
        super().__init__()
        weights = validate_task_weights(task_weights)
        self.task_weights = weights
        self.tasks = tuple(t for t, w in weights.items() if w > 0)

    def _stack(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The active tasks' losses as a (T,) tensor in ``self.tasks`` order; zero-weight tasks dropped."""
        unknown = sorted(set(losses) - set(self.task_weights))
        missing = [t for t in self.tasks if t not in losses]
        if unknown or missing:
            raise KeyError(
                f"Balancer tasks {list(self.tasks)} do not match the losses {sorted(losses)} "
                f"(unknown: {unknown}, missing: {missing})."
            )
        return torch.stack([losses[t] for t in self.tasks])  # (T,)

    def _as_dict(self, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        return {t: w for t, w in zip(self.tasks, weights.detach().unbind(), strict=True)}

    def forward(
        self, losses: Mapping[str, torch.Tensor], shared: Sequence[nn.Parameter]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return ``(total, {task: effective weight})``; see the class docstring."""
        raise NotImplementedError


class StaticWeights(TaskBalancer):
    """Fixed weights: ``total = sum_t w_t * L_t`` with ``w = task_weights``; ``shared`` is ignored.

    Args:
        task_weights: task name -> weight >= 0.

    Example:
        >>> bal = StaticWeights({"conversion": 1.0, "engagement": 0.3})
        >>> total, w = bal({"conversion": torch.tensor(2.0), "engagement": torch.tensor(1.0)}, [])
        >>> round(total.item(), 4), round(w["engagement"].item(), 4)
        (2.3, 0.3)
    """

    weights: torch.Tensor  # (T,) buffer

    def __init__(self, task_weights: Mapping[str, float]) -> None:
        super().__init__(task_weights)
        # Not persistent: derived from the config, and old checkpoints have no balancer entries.
        weights = torch.tensor([self.task_weights[t] for t in self.tasks])
        self.register_buffer("weights", weights, persistent=False)

    def forward(
        self, losses: Mapping[str, torch.Tensor], shared: Sequence[nn.Parameter]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return ``(sum_t w_t L_t, {t: w_t})``."""
        task_losses = self._stack(losses)  # (T,)
        weights = self.weights.to(task_losses)  # (T,)
        return (weights * task_losses).sum(), self._as_dict(weights)


class UncertaintyWeighting(TaskBalancer):
    """Homoscedastic-uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018, "Multi-Task Learning
    Using Uncertainty to Weigh Losses for Scene Geometry and Semantics").

    One learnable ``s_t = log sigma_t^2`` per task. The sampled softmax is a classification loss, for
    which Kendall et al. (eq. 10, with ``s = log sigma^2``) give ``exp(-s) L + s / 2``. The configured
    weight ``w_t`` multiplies the whole per-task term::

        total = sum_t w_t * (exp(-s_t) * L_t + s_t / 2)        effective weight = w_t * exp(-s_t)

    Why ``w_t`` also multiplies ``s_t / 2``: the optimum in ``s_t`` is ``exp(-s_t) = 1 / (2 L_t)``, so
    the effective weight settles at ``w_t / (2 L_t)`` and the configured ratio between conversion and
    engagement survives. With ``w_t`` on the loss term only, it would cancel at the optimum (every
    task would end at ``1 / (2 L_t)``) and ``loss.task_weights`` would stop mattering once ``s`` has
    converged. ``shared`` is ignored.

    Args:
        task_weights: task name -> weight >= 0; also the effective weights at ``init_log_var = 0``.
        init_log_var: initial ``s_t`` of every task.
        lr_scale: factor on the optimiser's learning rate for ``log_vars``.

    Example:
        >>> bal = UncertaintyWeighting({"conversion": 1.0, "engagement": 0.5})
        >>> total, w = bal({"conversion": torch.tensor(2.0), "engagement": torch.tensor(1.0)}, [])
        >>> round(total.item(), 4), round(w["engagement"].item(), 4)
        (2.5, 0.5)
    """

    prior_weights: torch.Tensor  # (T,) buffer

    def __init__(
        self, task_weights: Mapping[str, float], init_log_var: float = 0.0, lr_scale: float = 1.0
    ) -> None:
        super().__init__(task_weights)
        self.lr_scale = float(lr_scale)
        prior = torch.tensor([self.task_weights[t] for t in self.tasks])
        self.register_buffer("prior_weights", prior, persistent=False)  # from the config
        self.log_vars = nn.Parameter(torch.full((len(self.tasks),), float(init_log_var)))  # s_t, (T,)

    def forward(
        self, losses: Mapping[str, torch.Tensor], shared: Sequence[nn.Parameter]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return ``(sum_t w_t (exp(-s_t) L_t + s_t / 2), {t: w_t exp(-s_t)})``."""
        task_losses = self._stack(losses)  # (T,)
        prior = self.prior_weights.to(task_losses)  # (T,)
        precision = torch.exp(-self.log_vars)  # (T,) 1 / sigma_t^2
        total = (prior * (precision * task_losses + self.log_vars / 2)).sum()
        return total, self._as_dict(prior * precision)


class GradNorm(TaskBalancer):
    """GradNorm (Chen, Badrinarayanan, Lee & Rabinovich, ICML 2018, "GradNorm: Gradient
    Normalization for Adaptive Loss Balancing in Deep Multitask Networks").

    Learnable weights ``w_t`` start at ``task_weights``. On each call, for the shared parameters ``W``
    (pass the LAST shared layer's weights, as in the paper):

    * ``G_t = ||grad_W (w_t L_t)|| = w_t * ||grad_W L_t||`` (the norm is taken on the model's graph
      and detached, so ``G_t`` is differentiable in ``w_t`` only);
    * ``r_t = Ltilde_t / mean(Ltilde)`` with ``Ltilde_t = L_t / L_t(0)``, the relative inverse
      training rate; ``L_t(0)`` is the task's first positive loss, kept in the ``initial_losses``
      buffer (so it is checkpointed);
    * ``gradnorm_loss = sum_t |G_t - mean(G) * r_t ** alpha|`` with the target detached.

    The returned total is ``sum_t w_t.detach() L_t + gradnorm_loss``: the model is trained by the
    weighted sum and the weights by the GradNorm loss, in ONE optimiser step.

    Why not ``autograd.grad(w_t L_t, W, create_graph=True)``: since ``w_t`` is a scalar,
    ``d G_t / d w_t = ||grad_W L_t||`` exactly, so a first-order gradient gives the same update of
    ``w``, skips the double backward, and by construction sends no GradNorm gradient into the model
    (the paper updates only ``w`` with it).

    Renormalisation happens at the START of ``forward``, under ``no_grad``: the weights are floored
    at a tiny positive value and rescaled so that ``sum_t w_t = sum_t task_weights[t]``. So the
    weights used and returned by a call are always normalised, and the module needs no extra hook
    after the optimiser step. Tasks whose gradient on ``W`` is zero in a batch (e.g. no positive
    rows, where the sampled softmax returns a graph-keeping zero) sit out the GradNorm term of that
    call.

    Args:
        task_weights: task name -> initial weight >= 0; zero-weight tasks stay zero and are skipped.
        alpha: strength of the pull towards equal training rates (0 = equal gradient norms).
        lr_scale: factor on the optimiser's learning rate for ``weights``.
    """

    weight_sum: torch.Tensor  # () buffer
    initial_losses: torch.Tensor  # (T,) buffer

    def __init__(self, task_weights: Mapping[str, float], alpha: float = 1.5, lr_scale: float = 1.0) -> None:
        super().__init__(task_weights)
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}.")
        self.alpha = float(alpha)
        self.lr_scale = float(lr_scale)
        initial = torch.tensor([self.task_weights[t] for t in self.tasks])  # (T,)
        self.weights = nn.Parameter(initial.clone())
        self.register_buffer("weight_sum", initial.sum(), persistent=False)  # from the config
        self.register_buffer("initial_losses", torch.full_like(initial, float("nan")))  # L_t(0), (T,)

    @torch.no_grad()
    def renormalise(self) -> None:
        """Floor the weights at a tiny positive value and rescale them to sum to the initial sum."""
        self.weights.clamp_(min=_MIN_GRADNORM_WEIGHT)
        self.weights.mul_(self.weight_sum / self.weights.sum())

    @torch.no_grad()
    def _remember_initial(self, task_losses: torch.Tensor) -> None:
        # A batch without positives gives L_t = 0, which cannot be a reference: wait for one that has.
        unset = self.initial_losses.isnan() & (task_losses > 0) & task_losses.isfinite()
        self.initial_losses.copy_(torch.where(unset, task_losses, self.initial_losses))

    def forward(
        self, losses: Mapping[str, torch.Tensor], shared: Sequence[nn.Parameter]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return ``(sum_t w_t.detach() L_t + gradnorm_loss, {t: w_t})``; see the class docstring."""
        if not shared:
            raise ValueError("GradNorm needs the shared layer's parameters to measure gradient norms on.")
        self.renormalise()
        task_losses = self._stack(losses)  # (T,)
        detached = task_losses.detach().float()  # (T,)
        self._remember_initial(detached)

        grad_norms = torch.stack([_grad_norm(losses[t], shared) for t in self.tasks])  # (T,)
        weighted_norms = self.weights * grad_norms  # (T,) G_t, a graph in w only
        present = (grad_norms > 0).float()  # (T,) tasks with a signal in this batch
        n_present = present.sum().clamp(min=1)

        # Before a task has a reference loss, count it as training at the average rate.
        loss_ratio = torch.where(self.initial_losses.isnan(), 1.0, detached / self.initial_losses)  # (T,)
        mean_ratio = ((loss_ratio * present).sum() / n_present).clamp(min=torch.finfo(detached.dtype).tiny)
        inverse_rate = loss_ratio / mean_ratio  # (T,) r_t
        mean_norm = (weighted_norms.detach() * present).sum() / n_present
        target = mean_norm * inverse_rate**self.alpha  # (T,) constant, as in the paper
        gradnorm_loss = ((weighted_norms - target).abs() * present).sum()

        weighted = (self.weights.detach().to(task_losses) * task_losses).sum()
        return weighted + gradnorm_loss, self._as_dict(self.weights)


def task_gradient_cosine(
    losses: Mapping[str, torch.Tensor],
    shared: Sequence[nn.Parameter],
    primary: str = PRIMARY_TASK,
) -> dict[str, float]:
    """Cosine between the primary task's gradient and each other task's gradient on ``shared``.

    The gradients are taken on all of ``shared`` (flattened and concatenated; computed per parameter
    and summed, which is the same number without materialising the concatenation) with
    ``torch.autograd.grad(retain_graph=True)``, so the caller can still backpropagate the losses.
    Cost: one extra backward per task, so the module calls it every N steps only and logs
    ``GRAD_COSINE_METRIC`` (``train/grad_cosine/conversion_vs_engagement``). Negative values mean the
    auxiliary task pulls the shared towers against the primary task.

    Pairs where either gradient is all zero (e.g. a batch without conversions) have no cosine and are
    left out; so is everything when ``primary`` is not among ``losses`` (its weight is 0).

    Args:
        losses: task -> unweighted scalar loss, still attached to the graph.
        shared: parameters shared by every task.
        primary: the task every other task is compared with.

    Returns:
        ``{f"{primary}_vs_{task}": cosine}`` for every other task.

    Example:
        >>> w = nn.Parameter(torch.tensor([1.0, 2.0]))
        >>> task_gradient_cosine({"conversion": w.sum(), "engagement": -w.sum()}, [w])
        {'conversion_vs_engagement': -1.0}
    """
    if primary not in losses:
        return {}
    reference = _grads(losses[primary], shared)
    ref_sq = sum(float(g.double().square().sum()) for g in reference)
    out: dict[str, float] = {}
    for task, loss in losses.items():
        if task == primary:
            continue
        grads = _grads(loss, shared)
        dot = sum(float((g.double() * r.double()).sum()) for g, r in zip(grads, reference, strict=True))
        sq = sum(float(g.double().square().sum()) for g in grads)
        if ref_sq > 0 and sq > 0:
            out[f"{primary}_vs_{task}"] = dot / (ref_sq * sq) ** 0.5
    return out


def last_linear_weight(module: nn.Module) -> nn.Parameter:
    """The weight of the last ``nn.Linear`` registered in ``module``: GradNorm's "last shared layer".

    For the interaction blocks that is the output layer: ``ParallelCross.proj`` (registered after the
    cross net and the MLP) and the last Linear of ``SequentialCross.mlp``.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> last_linear_weight(net) is net[2].weight
        True
    """
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(module).__name__} has no nn.Linear layer.")
    return cast(nn.Parameter, linears[-1].weight)
