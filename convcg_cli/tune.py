"""``convcg tune``: an Optuna study over train overrides, scored on a validation metric only.

A search is ``conf/hparams_search/<name>.yaml`` (lightning-hydra-template's layout, hydra-optuna-sweeper's
``params`` syntax: ``choice(...)``, ``range(...)``, ``interval(...)``, ``tag(log, interval(...))``).
Optuna 5 is driven directly rather than through hydra-optuna-sweeper 1.3.0, whose optuna 2.10.1 cannot
open a sqlite study with this stack's SQLAlchemy 2 (README, "Tuning").

Each trial trains one model (an MLflow child run of the study's parent run) and is scored by
``optimized_metric`` (``val/...``, never held-out) at the epoch of the checkpoint the run keeps. The
study lives in ``<paths.root_dir>/tune/optuna.db``: running the same search again resumes it. The best
trial's overrides become ``<paths.root_dir>/conf/experiment/tuned/<name>.yaml``, an experiment to train.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from omegaconf import DictConfig, OmegaConf, open_dict

from convcg_cli import tracking
from convcg_cli.config import CONF_DIR, Composed, compose, instantiate
from convcg_cli.errors import ConfigError
from convcg_cli.kept_checkpoint import validation_figure

if TYPE_CHECKING:
    from convcg_cli.data.loading import PreparedDataCache

SEARCH_DIR = CONF_DIR / "hparams_search"
STORAGE_FILE = Path("tune") / "optuna.db"  # under paths.root_dir
TUNED_CONF_DIR = Path("conf")  # under paths.root_dir; pass it to `convcg train --config-dir`
PARENT_RUN_ATTR = "mlflow_parent_run_id"  # study attribute: the parent run every trial nests under
_SEARCH_KEYS = {"optimized_metric", "direction", "n_trials", "overrides", "sampler", "params", "grid"}


@dataclass(frozen=True)
class Search:
    """A hyperparameter search: what to vary (Hydra sweep syntax), what to maximise, how many trials."""

    name: str
    optimized_metric: str
    direction: str
    n_trials: int
    overrides: tuple[str, ...]
    params: dict[str, str]
    sampler: dict[str, Any]
    # true: every combination of the choice() params is tried once, in order, before the sampler
    # proposes anything (enqueued trials: a grid without a sampler's luck)
    grid: bool = False


@dataclass(frozen=True)
class TuneResult:
    """What a (possibly resumed) study ended with."""

    study_name: str
    storage: str
    parent_run_id: str
    n_trials: int  # finished trials in the study (this session's and earlier ones)
    n_failed: int
    best_value: float | None
    experiment_file: Path | None
    train_command: str | None


def available_searches() -> list[str]:
    """Names of the searches in ``conf/hparams_search/``."""
    return sorted(p.stem for p in SEARCH_DIR.glob("*.yaml"))


def load_search(name: str) -> Search:
    """Compose ``conf/hparams_search/<name>.yaml``; ConfigError for an unknown or malformed search."""
    if name not in available_searches():
        raise ConfigError(f"Unknown search '{name}'; choose one of {available_searches()} ({SEARCH_DIR}).")
    spec = OmegaConf.to_container(compose(f"hparams_search/{name}").cfg.hparams_search, resolve=True)
    return search_from_spec(name, cast(dict[str, Any], spec))


def search_from_spec(name: str, spec: Mapping[str, Any]) -> Search:
    """Check a search's keys and refuse an objective that is not a validation metric."""
    unknown = set(spec) - _SEARCH_KEYS
    if unknown or not spec.get("params") or not spec.get("optimized_metric"):
        raise ConfigError(
            f"Search '{name}' needs 'params' and 'optimized_metric' (optional: direction, n_trials, "
            f"overrides, sampler, grid); unknown keys: {sorted(unknown)}."
        )
    metric = str(spec["optimized_metric"])
    if not metric.startswith(("val/", "blend/val_")):
        raise ConfigError(
            f"Search '{name}': optimized_metric must be a validation metric (val/... or blend/val_...), "
            f"got '{metric}'; "
            "tuning on held-out figures would make them no longer held out."
        )
    direction = str(spec.get("direction", "maximize"))
    if direction not in ("maximize", "minimize"):
        raise ConfigError(f"Search '{name}': direction must be maximize or minimize, got '{direction}'.")
    return Search(
        name=name,
        optimized_metric=metric,
        direction=direction,
        n_trials=int(spec.get("n_trials", 20)),
        overrides=tuple(str(o) for o in spec.get("overrides") or ()),
        params={str(k): str(v) for k, v in spec["params"].items()},
        sampler=dict(spec.get("sampler") or {"_target_": "optuna.samplers.TPESampler", "seed": 0}),
        grid=bool(spec.get("grid", False)),
    )


def _require_optuna() -> None:
    """Optuna is the ``[tune]`` extra, not in the default install: say so instead of a traceback."""
    import importlib.util

    if importlib.util.find_spec("optuna") is None:
        raise ConfigError("convcg tune needs Optuna, an optional extra: pip install 'convcg[tune]'.")


def distributions(params: Mapping[str, str]) -> dict:
    """Optuna distributions from Hydra sweep syntax, as hydra-optuna-sweeper reads it: ``choice(a, b)``
    categorical; ``range(lo, hi[, step])`` integers (``hi`` excluded, as in Hydra); ``interval(lo, hi)``
    float (``int(interval(lo, hi))`` integer), ``tag(log, interval(...))`` on a log scale."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep

    _require_optuna()
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    parser = OverridesParser.create()
    out: dict = {}
    for key, text in params.items():
        value = parser.parse_override(f"{key}={text}").value()
        if isinstance(value, ChoiceSweep):
            out[key] = CategoricalDistribution(cast(list[Any], value.list))
        elif isinstance(value, RangeSweep):
            assert value.start is not None and value.stop is not None
            values = list(range(int(value.start), int(value.stop), int(value.step or 1)))
            if not values or any(v != int(v) for v in (value.start, value.stop, value.step or 1)):
                raise ConfigError(f"Search param {key}={text}: range() needs integer, non-empty bounds.")
            out[key] = IntDistribution(values[0], values[-1], step=int(value.step or 1))
        elif isinstance(value, IntervalSweep):
            log = "log" in value.tags
            assert value.start is not None and value.end is not None
            if isinstance(value.start, int) and isinstance(value.end, int):
                out[key] = IntDistribution(value.start, value.end, log=log)
            else:
                out[key] = FloatDistribution(float(value.start), float(value.end), log=log)
        else:
            raise ConfigError(
                f"Search param {key}={text} is not a sweep (choice/range/interval); "
                "put fixed values in the search's 'overrides'."
            )
    return out


def grid_points(dists: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every combination of categorical distributions' choices, in order; ConfigError for a param
    that is not a ``choice(...)`` (a grid needs finite choices)."""
    import itertools

    from optuna.distributions import CategoricalDistribution

    not_choices = [k for k, d in dists.items() if not isinstance(d, CategoricalDistribution)]
    if not_choices:
        raise ConfigError(f"A grid search needs choice(...) params only; not choices: {not_choices}.")
    keys = list(dists)
    return [dict(zip(keys, v, strict=True)) for v in itertools.product(*(dists[k].choices for k in keys))]


def experiment_yaml(overrides: Sequence[str], composed: Composed, header: Sequence[str]) -> str:
    """An experiment file (``# @package _global_``) that reproduces ``overrides``: group choices and
    ``+experiment=`` as defaults entries, every other key with its value in ``composed.cfg``."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    defaults: list[Any] = []
    values = OmegaConf.create({})
    for text in overrides:
        override = parser.parse_override(text)
        key = override.key_or_group
        if override.is_delete():
            raise ConfigError(f"The override {text} deletes a key: an experiment file cannot say that.")
        if key == "experiment":
            defaults.append(f"/experiment/{override.value()}")
        elif key in composed.choices:
            defaults.append({f"{'' if override.is_add() else 'override '}/{key}": str(override.value())})
        else:
            node = OmegaConf.select(composed.cfg, key)
            value = OmegaConf.to_container(node) if isinstance(node, (DictConfig,)) else node
            OmegaConf.update(values, key, value, force_add=True)
    body = OmegaConf.to_container(values)
    assert isinstance(body, dict)
    document = {**({"defaults": defaults} if defaults else {}), **body}
    lines = ["# @package _global_", *(f"# {line}" for line in header)]
    return "\n".join(lines) + "\n" + OmegaConf.to_yaml(OmegaConf.create(document))


def _trial_config(search: Search, overrides: list[str], parent_run_id: str, number: int) -> Composed:
    composed = compose("train", overrides)
    with open_dict(composed.cfg):
        composed.cfg.logger.parent_run_id = parent_run_id
        composed.cfg.logger.run_name = f"{search.name}/trial_{number}"
        composed.cfg.logger.run_tags = {
            "tune": search.name,
            "trial": number,
            tracking.KIND_TAG: tracking.TRIAL_KIND,
        }
    return composed


def _run_trial(
    search: Search, study, dists: dict, base: list[str], parent_run_id: str, data_cache: PreparedDataCache
) -> bool:
    """Ask the study for one trial, train it, tell the study its objective; False if it failed.
    Trials whose data options are identical (e.g. only model options or the batch size are searched)
    set their data up once (``data_cache``)."""
    from optuna.trial import TrialState

    from convcg_cli.train import train

    trial = study.ask(dists)
    overrides = [*base, *(f"{key}={value}" for key, value in trial.params.items())]
    trial.set_user_attr("overrides", overrides)
    try:
        composed = _trial_config(search, overrides, parent_run_id, trial.number)
        result = train(composed, data_cache=data_cache)
        trial.set_user_attr("mlflow_run_id", result.run_id)
        store = tracking.Store.from_config(composed.cfg.logger)
        value = validation_figure(store, composed.cfg, result.run_id, search.optimized_metric)
        if math.isnan(value):
            raise ConfigError(f"run {result.run_id} logged no {search.optimized_metric}")
    except Exception as exc:  # a failed trial does not stop the study; its error stays with it
        trial.set_user_attr("error", f"{type(exc).__name__}: {exc}"[: tracking.MAX_PARAM_LENGTH])
        study.tell(trial, state=TrialState.FAIL)
        print(f"Trial {trial.number} failed: {exc}", flush=True)
        return False
    study.tell(trial, value)
    chosen = " ".join(f"{key}={value}" for key, value in trial.params.items())
    print(f"Trial {trial.number}: {search.optimized_metric} = {value:.4f} ({chosen})", flush=True)
    return True


def run_tune(
    search: Search,
    train_overrides: Sequence[str] = (),
    study_name: str | None = None,
    n_trials: int | None = None,
) -> TuneResult:
    """Run (or resume) the study until it has ``n_trials`` (default: the search's) finished trials;
    write the best trial's experiment file. The base config is checked before any study exists."""
    _require_optuna()
    import optuna
    from optuna.trial import TrialState

    from convcg_cli.data.loading import PreparedDataCache

    base = [*search.overrides, *train_overrides]
    dists = distributions(search.params)
    plain = compose("train", base)  # a typo fails here, before any study or run exists
    root = Path(plain.cfg.paths.root_dir)
    (root / STORAGE_FILE).parent.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{root / STORAGE_FILE}"
    name = study_name or search.name
    study = optuna.create_study(
        study_name=name,
        storage=storage,
        direction=cast(Any, search.direction),
        sampler=instantiate(OmegaConf.create(search.sampler)),
        load_if_exists=True,
    )
    finished = (TrialState.COMPLETE, TrialState.FAIL)
    done = len(study.get_trials(deepcopy=False, states=finished))
    parent_id = study.user_attrs.get(PARENT_RUN_ATTR)
    tags = {"tune": search.name, "study": name, "optimized_metric": search.optimized_metric}
    tags[tracking.KIND_TAG] = tracking.STUDY_KIND
    store = tracking.Store.from_config(plain.cfg.logger)
    opened = (
        tracking.reopened_run(store, parent_id)
        if parent_id
        else tracking.parent_run(store, f"tune/{name}", tags)
    )
    if search.grid:
        for params in grid_points(dists):  # skipped when a resumed study already holds them
            study.enqueue_trial(params, skip_if_exists=True)
    with opened as parent:
        study.set_user_attr(PARENT_RUN_ATTR, parent.run_id)
        data_cache = PreparedDataCache()
        for _ in range(max(0, (n_trials or search.n_trials) - done)):
            _run_trial(search, study, dists, base, parent.run_id, data_cache)
        result = _best_experiment(search, study, name, root, parent)
    trials = study.get_trials(deepcopy=False, states=finished)
    n_failed = sum(t.state == TrialState.FAIL for t in trials)
    return TuneResult(name, storage, parent.run_id, len(trials), n_failed, *result)


def _best_experiment(search: Search, study, name: str, root: Path, parent) -> tuple:
    """Write the best trial's experiment file, log it and the best value on the parent run."""
    from optuna.trial import TrialState

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return None, None, None
    best = study.best_trial
    config_dir = root / TUNED_CONF_DIR
    command = f"convcg train --config-dir {config_dir} +experiment=tuned/{name}"
    header = [
        command,
        f"Best of study '{name}' (trial {best.number}): {search.optimized_metric} = {best.value:.4f} "
        f"on the validation days; MLflow run {best.user_attrs.get('mlflow_run_id')}.",
    ]
    overrides = list(best.user_attrs["overrides"])
    text = experiment_yaml(overrides, compose("train", overrides), header)
    path = config_dir / "experiment" / "tuned" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    tracking.log_text(parent, text, f"tuned/{name}.yaml")
    tracking.log_metrics(parent, {"tune/best_value": float(best.value)})
    tracking.set_tags(
        parent, {"best_trial": str(best.number), "best_run_id": str(best.user_attrs.get("mlflow_run_id"))}
    )
    return float(best.value), path, command
