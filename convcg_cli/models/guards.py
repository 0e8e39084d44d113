"""Stop training at the first non-finite loss or gradient, naming the step and what went non-finite.

Pure checks on tensors, called by the LightningModule each step; a NaN that is let through poisons
every weight within a step or two, then ends as a faiss error at validation or a checkpoint of NaNs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from convcg_cli.errors import TrainingDivergedError

ADVICE = (
    "Lower model.optimizer.lr, raise loss.temperature or check the input features. The run ends "
    "FAILED and its weights are not logged as its checkpoint."
)


def check_finite_loss(step: int, total: torch.Tensor, logged: Mapping[str, torch.Tensor]) -> None:
    """Raise TrainingDivergedError when ``total`` is NaN or inf, naming each non-finite term of
    ``logged`` (``conversion/loss``, ``engagement/loss``, ...)."""
    if bool(torch.isfinite(total.detach()).all()):
        return
    bad = {name: float(v) for name, v in logged.items() if not bool(torch.isfinite(v).all())}
    terms = ", ".join(f"{name}={value}" for name, value in bad.items()) or "none of the task losses"
    raise TrainingDivergedError(
        f"The training loss went non-finite at step {step} (total={float(total.detach())}; non-finite "
        f"terms: {terms}). {ADVICE}"
    )


def check_finite_gradients(step: int, named_parameters: Iterable[tuple[str, torch.nn.Parameter]]) -> None:
    """Raise TrainingDivergedError when a gradient holds a NaN or inf, naming up to 3 parameters."""
    named = [(name, p.grad) for name, p in named_parameters if p.grad is not None]
    if not named:
        return
    norms = torch.stack(torch._foreach_norm([g.detach() for _, g in named]))  # one norm per tensor
    finite = torch.isfinite(norms)
    if bool(finite.all()):
        return
    names = [name for (name, _), ok in zip(named, finite.tolist(), strict=True) if not ok]
    raise TrainingDivergedError(
        f"A gradient went non-finite at step {step} ({len(names)} parameter(s), e.g. "
        f"{', '.join(names[:3])}) while the loss was finite. {ADVICE}"
    )
