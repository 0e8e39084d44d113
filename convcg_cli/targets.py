"""Which classes a config may build: the registry of ``_target_`` values, the paths classes moved
from, and the checks that keep every config (composed from overrides, or read back from a run) data.

A run's saved config comes back from a tracking store, possibly a team's shared server, and an
override can set any key: so a ``_target_`` is looked up in :data:`BUILDABLE_TARGETS`, the exact
classes convcg builds and the library classes a user may swap in, never imported because it names
some module. Anything else is refused with a ConfigError before anything is built.
"""

from __future__ import annotations

from collections.abc import Iterable

from omegaconf import DictConfig, ListConfig, OmegaConf, read_write

from convcg_cli.errors import ConfigError

# Every class conf/ names, and nothing by prefix: `lightning.` alone would admit any function of the
# library (e.g. one that writes a file where the config says).
_CONVCG_TARGETS = (
    "convcg_cli.data.features.positives.DualPositives",
    "convcg_cli.data.features.positives.LabelPositives",
    "convcg_cli.data.features.positives.ValuePositives",
    "convcg_cli.data.importing.maturity.DropImmature",
    "convcg_cli.data.importing.maturity.IgnoreMaturity",
    "convcg_cli.data.importing.maturity.WeightByDelay",
    "convcg_cli.data.loading.datamodules.ImpressionDataModule",
    "convcg_cli.data.loading.datamodules.InMemoryDataModule",
    "convcg_cli.data.loading.datamodules.StreamedDataModule",
    "convcg_cli.hydra_callbacks.TrackingStoreReady",
    "convcg_cli.index.approximate.HNSW",
    "convcg_cli.index.approximate.IVFFlat",
    "convcg_cli.index.approximate.IVFPQFastScanRefine",
    "convcg_cli.index.approximate.IVFScalarRefine",
    "convcg_cli.models.balancing.GradNorm",
    "convcg_cli.models.balancing.StaticWeights",
    "convcg_cli.models.balancing.UncertaintyWeighting",
    "convcg_cli.models.cross.CrossNet",
    "convcg_cli.models.cross.LowRankCrossNet",
    "convcg_cli.models.cross.LowRankMixtureCrossNet",
    "convcg_cli.models.cross.ParallelCross",
    "convcg_cli.models.cross.SequentialCross",
    "convcg_cli.models.heads.MultiHead",
    "convcg_cli.models.heads.UnifiedHead",
    "convcg_cli.models.losses.MultiTaskSampledSoftmax",
    "convcg_cli.models.losses.NoLogQ",
    "convcg_cli.models.losses.StreamingLogQ",
    "convcg_cli.models.losses.TableLogQ",
    "convcg_cli.models.averaging.RunLengthEMA",
    "convcg_cli.models.module.RetrievalModule",
    "convcg_cli.models.sequence.HistoryEncoder",
)
# Library classes a user may swap in by an override (an optimiser, an activation, a callback, a
# sampler); classes only, each constructed with the config's own arguments.
_LIBRARY_TARGETS = (
    *(
        f"torch.optim.{name}"
        for name in ("Adam", "AdamW", "SGD", "Adagrad", "RMSprop", "Adamax", "NAdam", "RAdam")
    ),
    *(
        f"torch.nn.{name}"
        for name in ("ReLU", "GELU", "SiLU", "Tanh", "Sigmoid", "LeakyReLU", "ELU", "Identity")
    ),
    "lightning.Trainer",
    "lightning.pytorch.Trainer",
    *(
        f"lightning.pytorch.callbacks.{name}"
        for name in (
            "ModelCheckpoint",
            "EarlyStopping",
            "EMAWeightAveraging",
            "StochasticWeightAveraging",
            "LearningRateMonitor",
            "Timer",
            "RichProgressBar",
            "TQDMProgressBar",
        )
    ),
    *(f"optuna.samplers.{name}" for name in ("TPESampler", "RandomSampler", "CmaEsSampler", "GPSampler")),
)
BUILDABLE_TARGETS = frozenset((*_CONVCG_TARGETS, *_LIBRARY_TARGETS))

# Classes a run's saved config may name by the path they had before ``convcg_cli/data/`` was grouped
# into contract/, importing/, features/ and loading/ (old dotted path -> new): every class a conf/
# ``_target_`` names there, and ``ImpressionDataModule`` of configs saved before the two data paths.
MOVED_TARGETS: dict[str, str] = {
    "convcg_cli.data.datamodule.ImpressionDataModule": (
        "convcg_cli.data.loading.datamodules.ImpressionDataModule"
    ),
    "convcg_cli.data.datamodule.InMemoryDataModule": "convcg_cli.data.loading.datamodules.InMemoryDataModule",
    "convcg_cli.data.datamodule.StreamedDataModule": "convcg_cli.data.loading.datamodules.StreamedDataModule",
    "convcg_cli.data.maturity.IgnoreMaturity": "convcg_cli.data.importing.maturity.IgnoreMaturity",
    "convcg_cli.data.maturity.DropImmature": "convcg_cli.data.importing.maturity.DropImmature",
    "convcg_cli.data.maturity.WeightByDelay": "convcg_cli.data.importing.maturity.WeightByDelay",
    "convcg_cli.data.positives.LabelPositives": "convcg_cli.data.features.positives.LabelPositives",
    "convcg_cli.data.positives.DualPositives": "convcg_cli.data.features.positives.DualPositives",
    "convcg_cli.data.positives.ValuePositives": "convcg_cli.data.features.positives.ValuePositives",
    # The bench's ANN indexes (conf/bench.yaml retrieval.ann_options) moved into the index package.
    "convcg_cli.bench.ann.IVFFlat": "convcg_cli.index.approximate.IVFFlat",
    "convcg_cli.bench.ann.HNSW": "convcg_cli.index.approximate.HNSW",
}

TARGET_KEY = "_target_"


def targets(node, path: str = "") -> list[tuple[str, str]]:
    """``(dotted key, value)`` of every ``_target_`` in a config tree (lists included); nothing is
    resolved, so an interpolation in a tampered config runs no resolver here."""
    if isinstance(node, DictConfig | ListConfig):
        node = OmegaConf.to_container(node, resolve=False)
    out: list[tuple[str, str]] = []
    if isinstance(node, dict):
        for key, value in node.items():
            where = f"{path}.{key!s}" if path else str(key)
            out += [(where, str(value))] if key == TARGET_KEY else targets(value, where)
    elif isinstance(node, list | tuple):
        for i, value in enumerate(node):
            out += targets(value, f"{path}[{i}]")
    return out


def refuse_unknown(found: Iterable[tuple[str, str]], source: str) -> None:
    """ConfigError naming every ``(key, target)`` of ``found`` that is not in :data:`BUILDABLE_TARGETS`."""
    bad = [
        (key, target) for key, target in found if MOVED_TARGETS.get(target, target) not in BUILDABLE_TARGETS
    ]
    if bad:
        listed = ", ".join(f"{key}={target!r}" for key, target in bad)
        raise ConfigError(
            f"Refusing {source}: {listed} is not a class convcg builds. A config names one of the "
            f"classes in convcg_cli/targets.py (BUILDABLE_TARGETS: convcg's own, and "
            "{torch.optim, torch.nn, lightning callbacks, optuna samplers} ones a user may swap in); "
            "nothing was built."
        )


def check_buildable(cfg, source: str) -> None:
    """ConfigError when a ``_target_`` anywhere in ``cfg`` is not in :data:`BUILDABLE_TARGETS`.

    Args:
        cfg: a composed config, a node about to be instantiated, or a config read back from a run.
        source: what it is, for the message (e.g. ``the saved config of run 3f2a...``).
    """
    refuse_unknown(targets(cfg), source)


def check_override_targets(overrides: Iterable[str]) -> None:
    """ConfigError for a command-line override that sets a ``_target_`` (``+callbacks.x._target_=...``,
    ``hydra.callbacks.x._target_=...``) outside the registry: Hydra builds its own callbacks before
    convcg sees the composed config, so these are checked as written."""
    found = []
    for override in overrides:
        key, sep, value = override.partition("=")
        if sep and key.lstrip("+~").rsplit(".", 1)[-1] == TARGET_KEY:
            found.append((key.lstrip("+~"), value.strip("'\"")))
    refuse_unknown(found, "the command line")


def upgrade_moved_targets(cfg: DictConfig) -> DictConfig:
    """Rewrite, in place, every ``_target_`` of ``cfg`` that names a class by its old path
    (``MOVED_TARGETS``) to the class's new path; returns ``cfg``. For a run's saved config read back
    from the tracking store, and for a composed one (a user's own experiment file may name them)."""

    def upgrade(node) -> None:
        if isinstance(node, DictConfig):
            for key, value in node.items_ex(resolve=False):
                if key == TARGET_KEY and isinstance(value, str) and value in MOVED_TARGETS:
                    node[key] = MOVED_TARGETS[value]
                else:
                    upgrade(value)
        elif isinstance(node, ListConfig):
            for value in node:
                upgrade(value)

    with read_write(cfg):
        upgrade(cfg)
    return cfg
