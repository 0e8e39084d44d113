"""The training tasks and what counts as a positive for each.

Task *weights* live only in the config (``loss.task_weights``); this module says what each task name
means, so that a typo in the config is caught instead of silently training nothing.
"""

import polars as pl

CONVERSION = "conversion"
ENGAGEMENT = "engagement"

# The served embedding is judged on the primary task; engagement is auxiliary.
PRIMARY_TASK = CONVERSION

# Positive label of each task, as a polars expression over the impressions table.
TASK_LABELS: dict[str, pl.Expr] = {
    CONVERSION: pl.col("converted"),
    ENGAGEMENT: pl.col("clicked") | pl.col("saved"),
}


def engaged(tasks=None) -> pl.Expr:
    """True for a row positive for at least one of ``tasks`` (every task by default): the rows that
    are training examples, evaluation queries and history events; the rest are served-not-engaged."""
    return pl.any_horizontal([TASK_LABELS[t] for t in (TASK_LABELS if tasks is None else tasks)])


def check_task_names(names) -> list[str]:
    """Return ``names`` as a list, or raise ConfigError naming the unknown ones."""
    from convcg_cli.errors import ConfigError

    names = list(names)
    unknown = [n for n in names if n not in TASK_LABELS]
    if unknown:
        raise ConfigError(
            f"Unknown task(s) {unknown} in loss.task_weights; known tasks are {sorted(TASK_LABELS)}."
        )
    if PRIMARY_TASK not in names:
        raise ConfigError(f"loss.task_weights must include the primary task '{PRIMARY_TASK}'.")
    return names


def validate_task_weights(task_weights) -> dict[str, float]:
    """``loss.task_weights`` as a plain dict, checked: known names, weights >= 0, at least one > 0."""
    weights = {str(t): float(w) for t, w in dict(task_weights).items()}
    check_task_names(weights)
    negative = {t: w for t, w in weights.items() if w < 0}
    if negative:
        raise ValueError(f"Task weights must be >= 0, got {negative}.")
    if not any(w > 0 for w in weights.values()):
        raise ValueError(f"At least one task weight must be > 0, got {weights}.")
    return weights
