"""What the model is fed: feature encodings, item encoding, engagement history, positives, lever checks."""

# ``cofactors`` (co-engagement factors) is imported from its module: it imports torch, this package not.
from convcg_cli.data.features import encodings
from convcg_cli.data.features.history import (
    ACTION_CLICK,
    ACTION_CONVERSION,
    ACTION_PADDING,
    ACTION_SAVE,
    NUM_ACTIONS,
    engagement_events,
    history_before,
)
from convcg_cli.data.features.item_encoding import ItemEncoding, encode_items, fit_item_encoding
from convcg_cli.data.features.levers import (
    check_levers,
    disabled_levers,
    levers_in_use,
    refused_levers,
    resolve_auto_levers,
)
from convcg_cli.data.features.positives import (
    DualPositives,
    LabelPositives,
    ValuePositives,
    click_dwell_weight,
)
from convcg_cli.data.features.user_history import (
    ACTION_CODES,
    as_training_rows,
    before_cutoff,
    history_positions,
)

__all__ = [
    "ACTION_CLICK",
    "ACTION_CODES",
    "ACTION_CONVERSION",
    "ACTION_PADDING",
    "ACTION_SAVE",
    "NUM_ACTIONS",
    "DualPositives",
    "ItemEncoding",
    "LabelPositives",
    "ValuePositives",
    "as_training_rows",
    "before_cutoff",
    "check_levers",
    "resolve_auto_levers",
    "click_dwell_weight",
    "disabled_levers",
    "encode_items",
    "encodings",
    "engagement_events",
    "fit_item_encoding",
    "history_before",
    "history_positions",
    "levers_in_use",
    "refused_levers",
]
