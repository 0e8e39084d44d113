"""Label maturity: what the conversion task does with impressions whose attribution window has not
closed by the training cut-off (the first validation day), chosen by ``data/label_maturity``.

Conversions arrive late (``conversion_delay_seconds``, written by ``convcg data attribute`` or
``convcg data synth --delays``). A log exported after the validation days already holds conversions
that arrived after the cut-off; a model trained at the cut-off could not have seen them.

* :class:`IgnoreMaturity` (``ignore``, the default): labels as written, today's behaviour.
* :class:`DropImmature` (``drop``): labels as known at the cut-off (a conversion arriving at or after
  it never reaches training: not a label, not an item performance count), and rows whose window is
  still open at the cut-off are dropped from the conversion task (weight 0 there; their clicks and
  saves still train the engagement task).
* :class:`WeightByDelay` (``weight``): labels as known at the cut-off; every row stays, and a
  conversion observed ``e`` seconds before the cut-off (``e`` < window) is importance-weighted by
  ``1 / F(e)``, capped at ``max_weight``, where ``F`` is the empirical CDF of the conversion delays
  of the matured training rows: a positive that had only a share ``F(e)`` of its chance to arrive
  yet stands in for the ``1 / F(e)`` that will (the positive-only form of the delayed-feedback
  correction of Chapelle 2014 / Ktena et al. 2019).

``drop`` and ``weight`` also make evaluation count only conversions that arrived inside the window
(``conversion_delay_seconds <= window``). A log without delays (only ``converted``) counts every
conversion as arrived at its impression.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from convcg_cli.errors import ConfigError

SECONDS_PER_DAY = 86_400

_DELAY = pl.col("conversion_delay_seconds").fill_null(0)


def _delay_column(rows: pl.DataFrame) -> pl.DataFrame:
    """``rows`` with a ``conversion_delay_seconds`` column (all null when the log has none)."""
    if "conversion_delay_seconds" in rows.columns:
        return rows
    return rows.with_columns(pl.lit(None, pl.Int64).alias("conversion_delay_seconds"))


class IgnoreMaturity:
    """Labels as written: every conversion in the log counts, whenever it arrived (today's behaviour)."""

    def training_rows(self, train: pl.DataFrame, cutoff: int) -> pl.DataFrame:
        """The training window's rows with the labels training may see (here: unchanged)."""
        return train

    def conversion_weights(self, train: pl.DataFrame, cutoff: int) -> np.ndarray:
        """(N,) factor on each training row's conversion-task weight (here: 1)."""
        return np.ones(train.height, dtype=np.float32)

    def evaluation_rows(self, rows: pl.DataFrame) -> pl.DataFrame:
        """An evaluation split's rows with the conversions evaluation counts (here: unchanged)."""
        return rows


class DropImmature(IgnoreMaturity):
    """Labels as known at the cut-off; rows whose window is open at the cut-off leave the conversion task.

    Args:
        window_days: the attribution window (the click-through window the log was attributed with).
    """

    def __init__(self, window_days: float = 7.0) -> None:
        if window_days <= 0:
            raise ConfigError(f"data.label_maturity.window_days must be > 0, got {window_days}.")
        self.window_days = float(window_days)

    @property
    def window_seconds(self) -> int:
        """The attribution window in seconds."""
        return int(round(self.window_days * SECONDS_PER_DAY))

    def training_rows(self, train: pl.DataFrame, cutoff: int) -> pl.DataFrame:
        """``converted`` only where the conversion arrived before the cut-off (value and delay too)."""
        train = _delay_column(train)
        arrived = pl.col("converted") & (pl.col("timestamp") + _DELAY < cutoff)
        return train.with_columns(
            arrived.alias("converted"),
            *(
                pl.when(arrived).then(pl.col(c)).alias(c)
                for c in ("conversion_value", "conversion_delay_seconds")
                if c in train.columns
            ),
        )

    def mature(self, train: pl.DataFrame, cutoff: int) -> np.ndarray:
        """(N,) bool: the row's attribution window closed before the cut-off."""
        return (train["timestamp"] + self.window_seconds <= cutoff).to_numpy()

    def conversion_weights(self, train: pl.DataFrame, cutoff: int) -> np.ndarray:
        """0 on rows whose window is still open at the cut-off, 1 elsewhere."""
        return self.mature(train, cutoff).astype(np.float32)

    def evaluation_rows(self, rows: pl.DataFrame) -> pl.DataFrame:
        """``converted`` only where the conversion arrived inside the window."""
        inside = pl.col("converted") & (_DELAY <= self.window_seconds)
        return _delay_column(rows).with_columns(inside.alias("converted"))


class WeightByDelay(DropImmature):
    """Labels as known at the cut-off; recent conversions weighted by ``1 / F(elapsed)`` (see module).

    Args:
        window_days: the attribution window.
        max_weight: cap on a conversion's weight (a conversion seconds before the cut-off would
            otherwise weigh ``1 / F(0)``, huge and noisy).
    """

    def __init__(self, window_days: float = 7.0, max_weight: float = 10.0) -> None:
        super().__init__(window_days)
        if max_weight < 1:
            raise ConfigError(f"data.label_maturity.max_weight must be >= 1, got {max_weight}.")
        self.max_weight = float(max_weight)

    def conversion_weights(self, train: pl.DataFrame, cutoff: int) -> np.ndarray:
        """``min(1 / F(cutoff - timestamp), max_weight)`` on conversions of open windows, else 1."""
        train = _delay_column(train)
        mature = self.mature(train, cutoff)
        converted = train["converted"].to_numpy()
        delays = train["conversion_delay_seconds"].fill_null(0).to_numpy()
        elapsed = cutoff - train["timestamp"].to_numpy()
        return delay_cdf_weights(delays[mature & converted], elapsed, converted & ~mature, self.max_weight)


def delay_cdf_weights(
    matured_delays: np.ndarray, elapsed: np.ndarray, correct: np.ndarray, max_weight: float
) -> np.ndarray:
    """``min(1 / F(elapsed), max_weight)`` where ``correct``, else 1; ``F`` the empirical CDF of
    ``matured_delays`` (``F(e)`` = share of delays ``<= e``; no delays: ``F = 1``).

    Example:
        >>> delay_cdf_weights(np.array([0, 10, 10, 30]), np.array([5, 10, 40, 5]),
        ...                   np.array([True, True, True, False]), 10.0).tolist()
        [4.0, 1.3333333730697632, 1.0, 1.0]
    """
    if matured_delays.size == 0:
        return np.ones(elapsed.shape, dtype=np.float32)
    cdf = np.searchsorted(np.sort(matured_delays), elapsed, side="right") / matured_delays.size
    weights = np.minimum(1.0 / np.maximum(cdf, 1.0 / max_weight), max_weight)
    return np.where(correct, weights, 1.0).astype(np.float32)
