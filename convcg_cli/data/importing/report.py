"""What an import did (:class:`ImportReport`), and the names of the training levers an import can
switch off when the source lacks their signal (recorded as ``disabled_levers`` in ``synth.json``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# The levers a source may lack a signal for (refused before training: ``features.levers``).
DWELL_WEIGHTED_POSITIVES = "dwell_weighted_positives"
IMPRESSION_HARD_NEGATIVES = "impression_hard_negatives"
ADVERTISER_SOFTMAX = "advertiser_softmax"
SURFACE_CONTEXT = "surface_context"
USER_HISTORY = "user_history"


@dataclass
class ImportReport:
    """What an import did: sizes, signal counts, the surface mapping, adjustments and warnings.

    Args:
        source: the mapping's ``source`` name.
        in_dir, out_dir: where the logs were read from and written to.
        rows: table name -> rows written.
        clicks, conversions, saves: positives in the impressions written.
        surfaces: contract surface -> impressions.
        surface_column: the source column the surfaces come from (None if there is none).
        surface_mapping: one entry per source surface value: ``{"value", "surface", "rows"}``.
        adjustments: counts of values changed on the way, e.g. ``conversions_counted_as_clicks``,
            ``nulled_sentinels.users.is_live_streamer``, ``duplicate_rows``.
        warnings: one readable line per missing signal or notable fix-up.
        disabled_levers: lever name -> why it cannot work on this data.
        seconds: wall time of the import (reading, mapping, validating, writing).
    """

    source: str
    in_dir: str
    out_dir: str = ""
    rows: dict[str, int] = field(default_factory=dict)
    clicks: int = 0
    conversions: int = 0
    saves: int = 0
    surfaces: dict[str, int] = field(default_factory=dict)
    surface_column: str | None = None
    surface_mapping: list[dict[str, Any]] = field(default_factory=list)
    adjustments: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    disabled_levers: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def disable(self, lever: str, why: str) -> None:
        """Record that ``lever`` cannot work on this data, and warn about it."""
        self.disabled_levers[lever] = why
        self.warnings.append(f"{why}; lever '{lever}' is switched off for this data.")

    def summary(self) -> list[str]:
        """Readable lines: sizes, positives, where each surface came from, disabled levers."""
        rows = self.rows
        lines = [
            f"Imported {self.source} from {self.in_dir} into {self.out_dir} in {self.seconds:.1f} s: "
            f"{rows.get('items', 0):,} items, {rows.get('users', 0):,} users, "
            f"{rows.get('impressions', 0):,} impressions; {self.clicks:,} clicks, "
            f"{self.conversions:,} conversions, {self.saves:,} saves."
        ]
        for surface, count in self.surfaces.items():
            values = [str(m["value"]) for m in self.surface_mapping if m["surface"] == surface]
            source = f" <- {self.surface_column} {', '.join(values)}" if self.surface_column else ""
            lines.append(f"  {surface}: {count:,} impressions{source}")
        levers = ", ".join(self.disabled_levers) or "none"
        lines.append(f"Disabled levers: {levers}.")
        return lines

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (what goes into ``synth.json``)."""
        return asdict(self)
