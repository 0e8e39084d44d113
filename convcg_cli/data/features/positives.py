"""Which training rows are positives of each task, and with what weight.

``LabelPositives``: a row is a positive of a task iff its label says so (weight 1).
``DualPositives``: the design's dual positive signal: engagement positives (clicks, saves) *also*
join the sparse conversion task, each with a weight below a conversion's; clicks are weighted by
dwell time, ``w = f(log(1 + min(t, t_max) / t_max) / log 2)``, so a bounce click counts for little
and a click read to ``t_max`` counts fully.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import polars as pl

from convcg_cli.data.features.encodings import task_labels
from convcg_cli.errors import ConfigError
from convcg_cli.tasks import CONVERSION

# f in w = f(x), x = log(1 + min(t, t_max) / t_max) / log 2 in [0, 1]; each maps [0, 1] onto [0, 1].
DWELL_FUNCTIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "identity": lambda x: x,
    "sqrt": np.sqrt,
    "square": np.square,
}


def click_dwell_weight(dwell_seconds: np.ndarray, t_max: float, fn: str = "identity") -> np.ndarray:
    """Weight of a click from its dwell time: ``f(log(1 + min(t, t_max) / t_max) / log 2)``.

    Args:
        dwell_seconds: (N,) dwell per click (NaN counts as 0: a click with no recorded dwell).
        t_max: dwell (seconds) at which a click reaches full weight 1; longer dwell is capped.
        fn: name of f in ``DWELL_FUNCTIONS``.

    Example:
        >>> click_dwell_weight(np.array([0.0, 60.0, 120.0, 600.0]), t_max=120.0).round(4).tolist()
        [0.0, 0.585, 1.0, 1.0]
    """
    if fn not in DWELL_FUNCTIONS:
        raise ConfigError(f"Unknown dwell function '{fn}'; choose one of {sorted(DWELL_FUNCTIONS)}.")
    if t_max <= 0:
        raise ConfigError(f"dwell_t_max must be > 0 seconds, got {t_max}.")
    t = np.nan_to_num(np.asarray(dwell_seconds, dtype=np.float64), nan=0.0).clip(0.0, t_max)
    x = np.log1p(t / t_max) / np.log(2.0)
    return DWELL_FUNCTIONS[fn](x).astype(np.float32)


class LabelPositives:
    """Each task's positives are the rows its label marks, with weight 1."""

    def weights(self, rows: pl.DataFrame, tasks: Sequence[str]) -> dict[str, np.ndarray]:
        """task -> (N,) float32 weight per row; 0 means 'not a positive of this task'."""
        return {t: v.astype(np.float32) for t, v in task_labels(rows, list(tasks)).items()}


class DualPositives(LabelPositives):
    """Engagement positives join the conversion task with weight ``engagement_scale * w``.

    ``w`` is the click's dwell weight (see ``click_dwell_weight``) or ``save_weight`` for a save,
    whichever is larger; conversions keep weight 1. Other tasks keep their label weights.

    Args:
        engagement_scale: weight of a full-dwell click in the conversion task, relative to a conversion.
        dwell_t_max: seconds of dwell for full weight.
        dwell_fn: f, a name in ``DWELL_FUNCTIONS``.
        save_weight: weight of a save (before ``engagement_scale``).
    """

    def __init__(
        self,
        engagement_scale: float = 0.2,
        dwell_t_max: float = 120.0,
        dwell_fn: str = "identity",
        save_weight: float = 0.5,
    ) -> None:
        if not 0 <= engagement_scale <= 1:
            raise ConfigError(f"engagement_scale must be in [0, 1], got {engagement_scale}.")
        click_dwell_weight(np.zeros(1), dwell_t_max, dwell_fn)  # validates t_max and fn early
        self.engagement_scale, self.dwell_t_max = engagement_scale, dwell_t_max
        self.dwell_fn, self.save_weight = dwell_fn, save_weight

    def weights(self, rows: pl.DataFrame, tasks: Sequence[str]) -> dict[str, np.ndarray]:
        out = super().weights(rows, tasks)
        if CONVERSION not in out:
            return out
        clicked = rows["clicked"].to_numpy()
        click_w = np.where(
            clicked,
            click_dwell_weight(rows["dwell_seconds"].to_numpy(), self.dwell_t_max, self.dwell_fn),
            0.0,
        )
        save_w = np.where(rows["saved"].to_numpy(), self.save_weight, 0.0)
        engagement = self.engagement_scale * np.maximum(click_w, save_w)
        out[CONVERSION] = np.where(out[CONVERSION] > 0, 1.0, engagement).astype(np.float32)
        return out


class ValuePositives(LabelPositives):
    """Conversion positives weighted by their value: ``log(1 + conversion_value)``, divided by its mean
    over the valued conversions of the rows, so an average conversion still weighs 1 (the task's
    scale against the other tasks does not move); a conversion of unknown value weighs 1. Other tasks
    keep their label weights. Needs ``conversion_value`` (``convcg data attribute``); a log without
    it trains as ``LabelPositives``.
    """

    def weights(self, rows: pl.DataFrame, tasks: Sequence[str]) -> dict[str, np.ndarray]:
        out = super().weights(rows, tasks)
        if CONVERSION not in out or "conversion_value" not in rows.columns:
            return out
        value = rows["conversion_value"].cast(pl.Float64).to_numpy()
        valued = (out[CONVERSION] > 0) & ~np.isnan(value)
        if not valued.any():
            return out
        log_value = np.log1p(np.where(valued, value, 0.0))
        relative = log_value / max(float(log_value[valued].mean()), 1e-12)
        out[CONVERSION] = np.where(valued, relative, out[CONVERSION]).astype(np.float32)
        return out
