"""An exponential moving average of the weights whose horizon follows the run's length.

Lightning's ``EMAWeightAveraging`` takes a fixed ``decay``; its horizon (about ``1 / (1 - decay)``
steps) suits one run length only. At decay 0.998 (~500 steps, 1.6 of KuaiRand's ~310-step epochs)
a 260-step run on a purchase log (``sparse_shop``, 6 epochs of 43 steps) keeps 0.998^260 = 59% of
its average on the first steps' weights, and validation sees an average of barely trained models.
:class:`RunLengthEMA` sets the decay when training starts from the steps the run will take:
``decay = min(max_decay, 1 - 1 / (horizon_share * total steps))``, so the average spans the same
share of every run (0.4 of KuaiRand's 4-epoch runs gives its 0.998 back).
"""

from __future__ import annotations

import math
from typing import Any

from lightning.pytorch.callbacks import EMAWeightAveraging
from torch.optim.swa_utils import get_ema_avg_fn


def run_length_decay(total_steps: float, horizon_share: float, max_decay: float) -> float:
    """The EMA decay whose horizon is ``horizon_share`` of ``total_steps`` optimizer steps, capped.

    Example:
        >>> round(run_length_decay(1250, 0.4, 0.998), 4), round(run_length_decay(260, 0.4, 0.998), 4)
        (0.998, 0.9904)
    """
    if not 0.0 < horizon_share <= 1.0:
        raise ValueError(f"horizon_share must lie in (0, 1], got {horizon_share}.")
    if not math.isfinite(total_steps) or total_steps <= 0:
        return max_decay  # an open-ended run (max_steps=-1 and no epoch limit): the cap
    return min(max_decay, 1.0 - 1.0 / max(1.0, horizon_share * float(total_steps)))


EMA_DECAY_METRIC = "train/ema_decay"


class RunLengthEMA(EMAWeightAveraging):
    """``EMAWeightAveraging`` with its decay set from the run's length (see the module docstring).

    Args:
        horizon_share: the share of the run's optimizer steps the average spans (0.4).
        max_decay: the decay of a long run (0.998).
        kwargs: the rest of ``EMAWeightAveraging``'s arguments (``device``, ``update_every_n_steps``...).
    """

    def __init__(self, horizon_share: float = 0.4, max_decay: float = 0.998, **kwargs: Any) -> None:
        super().__init__(decay=max_decay, **kwargs)
        self.horizon_share, self.max_decay = float(horizon_share), float(max_decay)
        self.decay = self.max_decay
        run_length_decay(1.0, self.horizon_share, self.max_decay)  # checks the share now

    def setup(self, trainer, pl_module, stage: str) -> None:  # noqa: D102
        if stage == "fit":
            self.decay = run_length_decay(
                trainer.estimated_stepping_batches, self.horizon_share, self.max_decay
            )
            self._kwargs["avg_fn"] = get_ema_avg_fn(decay=self.decay)
        super().setup(trainer, pl_module, stage)

    def on_train_start(self, trainer, pl_module) -> None:  # noqa: D102
        super().on_train_start(trainer, pl_module)
        if trainer.logger is not None:  # the run records the decay it averaged with
            trainer.logger.log_metrics({EMA_DECAY_METRIC: self.decay}, step=0)
