"""Baselines tuned as hard as the model, on the same validation days (``conf/eval.yaml``
``baseline_tuning``): every combination of a baseline's option lists fitted on the training window,
scored on the validation split's conversions, the best kept; the held-out days are never read."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

from convcg_cli import baselines
from convcg_cli.baselines import Baseline, TrainHistory, baseline_class, make_baseline
from convcg_cli.errors import ConfigError


@dataclass(frozen=True)
class TunedBaseline:
    """A baseline fitted with the options validation chose.

    Attributes:
        baseline: the fitted baseline.
        chosen: every option tuned, with the value chosen (empty when nothing was tuned).
        val_recall: its validation conversion recall@``select_k`` (None when nothing was tuned).
        tried: how many combinations were fitted and scored on validation.
    """

    baseline: Baseline
    chosen: dict[str, Any]
    val_recall: float | None
    tried: int


def tune_baseline(
    name: str,
    options: Mapping[str, Any] | None,
    grid: Mapping[str, Any] | None,
    history: TrainHistory,
    select_k: int = 100,
) -> TunedBaseline:
    """Baseline ``name`` fitted on ``history`` with ``options``, every combination of ``grid``'s lists
    (option -> candidate values) tried on top of them, and the one with the best validation conversion
    recall@``select_k`` kept (the first in grid order on ties). The held-out days are never read:
    ``history.validation`` are the validation split's conversions. Without them (a refit run, trained
    through its validation days) or without a grid, ``options`` as given. The candidates are fitted
    by the class's :meth:`~convcg_cli.baselines.Baseline.fit_each` (ItemCF computes its cosine once for
    the whole grid), each exactly as its own ``fit`` would.

    Example:
        >>> import numpy as np
        >>> hist = TrainHistory(np.array([0, 1, 1]), np.array([0, 0, 1]), 2, 2, np.array([2.0, 1.0]),
        ...                     conversion_events=(np.array([0, 0, 1]), np.array([3, 3, 9])),
        ...                     validation=(np.array([0]), np.array([1])))
        >>> t = tune_baseline("popularity", {}, {"window_days": [None, 2]}, hist, select_k=1)
        >>> t.chosen, t.val_recall, t.tried
        ({'window_days': 2}, 1.0, 2)
    """
    grid = {str(k): list(v) for k, v in dict(grid or {}).items()}
    for option, values in grid.items():
        if not values:
            raise ConfigError(f"baseline_tuning.{name}.{option} is an empty list; give at least one value.")
    base = dict(options or {})
    validation = history.validation
    if not grid or validation is None or not len(validation[0]):
        return TunedBaseline(make_baseline(name, base).fit(history), {}, None, 0)
    best: TunedBaseline | None = None
    combos = [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]
    # fitted one at a time (only the best so far is kept), by the class: ItemCF shares its cosine
    fitted = baseline_class(name).fit_each([{**base, **chosen} for chosen in combos], history)
    for chosen, baseline in zip(combos, fitted, strict=True):
        recall = baselines.validation_recall(baseline, validation, select_k)
        if best is None or recall > cast(float, best.val_recall):
            # the effective values (e.g. include_self=auto as the fit resolved it)
            effective = {option: getattr(baseline, option, value) for option, value in chosen.items()}
            best = TunedBaseline(baseline, effective, recall, len(combos))
    assert best is not None
    return best


def chosen_value(value: Any) -> float:
    """A chosen option as a metric value: booleans 1/0, null 0 (the options where null means "all")."""
    if value is None:
        return 0.0
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"A tuned baseline option must be a number, true/false or null, got {value!r}."
        ) from None


def chosen_metrics(
    tuned: TunedBaseline, history: TrainHistory, prefix: str, select_k: int
) -> dict[str, float]:
    """What validation chose for one baseline, as metrics under ``prefix`` (``<split>/baseline_<name>``):
    ``chosen/<option>`` of every tuned option (:func:`chosen_value`) with ``chosen/val_recall_at_<k>``,
    and ``chosen/weights`` where the baseline chose its own weight on validation (ease_popularity's
    popularity weight, from its ``weights``). Empty when nothing was chosen (no validation
    conversions: a refit). A refit grid reads them to take the same window's choices.

    Example:
        >>> import numpy as np
        >>> hist = TrainHistory(np.array([0]), np.array([0]), 1, 1, np.array([1.0]))
        >>> tuned = TunedBaseline(make_baseline("popularity", {}), {"window_days": None}, 0.5, 2)
        >>> chosen_metrics(tuned, hist, "heldout/baseline_popularity", 100)  # doctest: +NORMALIZE_WHITESPACE
        {'heldout/baseline_popularity/chosen/window_days': 0.0,
         'heldout/baseline_popularity/chosen/val_recall_at_100': 0.5}
    """
    out: dict[str, float] = {}
    if tuned.val_recall is not None:
        out.update({f"{prefix}/chosen/{o}": chosen_value(v) for o, v in tuned.chosen.items()})
        out[f"{prefix}/chosen/val_recall_at_{select_k}"] = tuned.val_recall
    weight = getattr(tuned.baseline, "chosen_weight", None)
    if weight is not None and history.validation is not None and len(history.validation[0]):
        out[f"{prefix}/chosen/weights"] = float(weight)
    return out
