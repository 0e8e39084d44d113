"""Training levers that need a signal a data set may lack, and the check that refuses them.

An import records in its ``synth.json`` which levers the data cannot feed (``disabled_levers``:
lever -> the missing signal; the lever names and the report live in
:mod:`convcg_cli.data.importing.report`). :func:`check_levers` runs before training: a config that
switches such a lever on is an exit-2 error naming the lever, the config key that switched it on and
the missing signal, instead of a model trained on a constant.

``surface_context`` is recorded but not refused: it is on by default (``data.context``) and, with
one surface, only adds a constant input; refusing it would fail every default run on such data.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from convcg_cli.data.contract import METADATA_FILE
from convcg_cli.data.features.positives import DualPositives
from convcg_cli.data.importing import (
    ADVERTISER_SOFTMAX,
    DWELL_WEIGHTED_POSITIVES,
    IMPRESSION_HARD_NEGATIVES,
    USER_HISTORY,
)
from convcg_cli.errors import ConfigError

_DUAL_POSITIVES_TARGET = f"{DualPositives.__module__}.{DualPositives.__qualname__}"


def levers_in_use(cfg) -> dict[str, str]:
    """The refusable levers a training config switches on: lever -> the setting that does it."""
    data, loss = cfg.data, cfg.loss
    used = {
        DWELL_WEIGHTED_POSITIVES: (
            data.get("positives", {}).get("_target_") == _DUAL_POSITIVES_TARGET,
            "data/positives=dual",
        ),
        IMPRESSION_HARD_NEGATIVES: (
            int(data.get("hard_negatives", 0)) > 0,
            f"data.hard_negatives={data.get('hard_negatives')}",
        ),
        ADVERTISER_SOFTMAX: (
            float(loss.get("advertiser_weight", 0.0)) > 0,
            f"loss.advertiser_weight={loss.get('advertiser_weight')}",
        ),
        USER_HISTORY: (bool(data.get("use_user_history", False)), "data.use_user_history=true"),
    }
    return {lever: setting for lever, (on, setting) in used.items() if on}


def disabled_levers(data_dir: str | Path) -> dict[str, str]:
    """``disabled_levers`` of the data set's ``synth.json`` (lever -> missing signal); {} if none."""
    path = Path(data_dir) / METADATA_FILE
    if not path.is_file():
        return {}
    recorded = json.loads(path.read_text()).get("disabled_levers") or {}
    return dict(recorded) if isinstance(recorded, Mapping) else {lever: "" for lever in recorded}


def refused_levers(in_use: Mapping[str, str], disabled: Mapping[str, str]) -> list[str]:
    """One line per lever both switched on and disabled by the data: the lever, setting and signal."""
    return [
        f"{lever} (switched on by {setting}) needs a signal this data lacks: {disabled[lever]}"
        for lever, setting in in_use.items()
        if lever in disabled
    ]


AUTO = "auto"


def resolve_auto_levers(cfg) -> list[str]:
    """Settle the levers set to ``auto`` (``data.use_user_history``) for ``cfg``'s data, in place, and
    return one line per lever that ``auto`` turned off: on unless the data set's import recorded the
    signal missing (``disabled_levers``), so a design experiment's default levers train on every
    data set the importer writes. The run then logs the settled value."""
    from omegaconf import open_dict

    data = cfg.data
    if str(data.get("use_user_history", False)) != AUTO:
        return []
    missing = disabled_levers(data.dir).get(USER_HISTORY)
    with open_dict(cfg):
        data.use_user_history = missing is None
        if missing is None:
            return []
        examples = int(data.get("history_examples", {}).get("max_per_user", 0))
        if examples:
            data.history_examples.max_per_user = 0
    return [
        f"data.use_user_history=auto: off, the data lack it ({missing})"
        + ("; data.history_examples.max_per_user=0 with it" if examples else "")
    ]


def check_levers(cfg) -> None:
    """ConfigError (exit 2) if ``cfg`` trains a lever its data set's import recorded as disabled."""
    refused = refused_levers(levers_in_use(cfg), disabled_levers(cfg.data.dir))
    if refused:
        raise ConfigError(
            f"The data in {cfg.data.dir} cannot feed {len(refused)} lever(s) this config switches on: "
            f"{'; '.join(refused)}. Switch them off or import data with that signal "
            f"(its {METADATA_FILE} lists disabled_levers)."
        )
