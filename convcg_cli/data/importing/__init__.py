"""Where the logs come from: importers of real log sets, the synthetic generator, attribution, maturity."""

from convcg_cli.data.importing.attribution import (
    AttributionResult,
    AttributionRule,
    attribute,
    attribute_dir,
)
from convcg_cli.data.importing.frames import HISTORY_ACTIONS, events_from_lists
from convcg_cli.data.importing.importers import import_logs
from convcg_cli.data.importing.mapping import available_sources, load_mapping
from convcg_cli.data.importing.maturity import DropImmature, IgnoreMaturity, WeightByDelay, delay_cdf_weights
from convcg_cli.data.importing.report import (
    ADVERTISER_SOFTMAX,
    DWELL_WEIGHTED_POSITIVES,
    IMPRESSION_HARD_NEGATIVES,
    SURFACE_CONTEXT,
    USER_HISTORY,
    ImportReport,
)
from convcg_cli.data.importing.synth import generate, resolve_config, synthesize
from convcg_cli.data.importing.synth_config import PRESETS, SURFACES, SynthConfig

__all__ = [
    "ADVERTISER_SOFTMAX",
    "DWELL_WEIGHTED_POSITIVES",
    "HISTORY_ACTIONS",
    "IMPRESSION_HARD_NEGATIVES",
    "PRESETS",
    "SURFACES",
    "SURFACE_CONTEXT",
    "USER_HISTORY",
    "AttributionResult",
    "AttributionRule",
    "DropImmature",
    "IgnoreMaturity",
    "ImportReport",
    "SynthConfig",
    "WeightByDelay",
    "attribute",
    "attribute_dir",
    "available_sources",
    "delay_cdf_weights",
    "events_from_lists",
    "generate",
    "import_logs",
    "load_mapping",
    "resolve_config",
    "synthesize",
]
