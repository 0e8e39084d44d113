"""Bundle a trained run and log it as the run's MLflow model; register a logged model.

``convcg train`` logs the model at the end of a successful run (:func:`log_trained_model`, unless
``serve.log_model=false``); ``convcg export --run ID`` does it for an older run (:func:`export_run`).
The served options (``serve.*`` in conf/train.yaml) choose the index: ``exact`` (default) or ``ivf``
with ``nlist`` cells and ``nprobe`` probes. The index is built once and saved in the model
(``item_index.faiss``, see :mod:`convcg_cli.serve.bundle`); for ``ivf`` the overlap of that index's top
``overlap_k`` with the exact top ``overlap_k`` on a sample of the training users' requests
(``OVERLAP_REQUESTS`` of them, the surfaces in turn) is measured and logged to the run
(``INDEX_OVERLAP_METRIC``) and kept in the bundle's metadata (``index_overlap``);
``max_k`` and ``max_rows`` bound what one request may ask for (carried in the bundle). The
popularity blend the run chose on validation (:mod:`convcg_cli.blend`) is baked into the served
model's index, so what is served is what ``convcg eval`` scores.

A model is logged only once it is known to serve (:func:`log_bundle`): its weights and embeddings are
finite, and the model saved in the command's own directory loads as MLflow loads it and answers its
input example; only then is it published as ``runs:/ID/model``. Anything short of that is an
:class:`UnservableModelError` naming the run, and the run's previous model stays the one served.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from convcg_cli import tracking, workdir
from convcg_cli.blend import Blend, logged_blend
from convcg_cli.builders import (
    build_datamodule,
    load_trained_model,
    non_finite_tensors,
)
from convcg_cli.data.contract import load_schemas, load_tables
from convcg_cli.data.features import fit_item_encoding
from convcg_cli.errors import ConfigError, ConvcgError, first_line, some_of
from convcg_cli.index import ExactIndex
from convcg_cli.metrics.retrieval import overlap_at_k
from convcg_cli.serve.bundle import DEFAULT_LIMITS, ServingBundle, request_rows
from convcg_cli.serve.model import DEFAULT_K, CandidateModel

# Request and candidate columns as the signature declares them: {name: (MLflow type, required)}.
# The optional ids are "any": pandas writes an integer column with missing values as float64, which
# MLflow refuses for a long column, and it refuses int64 for a double one; the model checks them
# itself (request_rows: integers, or whole floats with NaN for "not given").
INPUT_COLUMNS = {
    "user_id": ("long", True),
    "surface": ("string", True),
    "subject_item_id": ("any", False),
    "query_id": ("any", False),
    "timestamp": ("any", False),
}
OUTPUT_COLUMNS = {"request": "long", "rank": "long", "item_id": "long", "score": "float"}
INDEX_OVERLAP_METRIC = "serve/index_overlap_at_{k}"
INDEX_KINDS = ("exact", "ivf")
OVERLAP_REQUESTS = 2000  # training users' requests the served ANN index is compared with exact on
# What conf/train.yaml's ``serve`` block holds; a run saved before it existed gets these.
SERVE_DEFAULTS: dict[str, Any] = {
    "log_model": True,
    "index": "exact",
    "nlist": 1024,
    "nprobe": 16,
    "overlap_k": 100,
    **DEFAULT_LIMITS,  # max_k, max_rows
}


class UnservableModelError(ConvcgError):
    """A served model that would not serve (non-finite weights, or it does not load and answer its
    input example): refused before it is logged, so the run keeps its previous model."""


@dataclass(frozen=True)
class ExportResult:
    """A logged model: its URI, the index options and, for an approximate index, its overlap with exact."""

    model_uri: str
    index: dict[str, Any]
    overlap: dict[str, float]


def serve_options(train_cfg, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``SERVE_DEFAULTS`` < the run's ``serve`` block < ``overrides`` (None values ignored), checked."""
    options = {**SERVE_DEFAULTS, **dict(train_cfg.get("serve") or {})}
    options.update({k: v for k, v in (overrides or {}).items() if v is not None})
    if options["index"] not in INDEX_KINDS:
        raise ConfigError(f"serve.index={options['index']!r} is not one of {list(INDEX_KINDS)}.")
    for name in ("nlist", "nprobe", "overlap_k", *DEFAULT_LIMITS):
        if int(options[name]) < 1:
            raise ConfigError(f"serve.{name} must be >= 1, got {options[name]}.")
    return options


def index_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The bundle's index entry: ``{"kind": "exact"}`` or ``{"kind": "ivf", "nlist": .., "nprobe": ..}``."""
    if options["index"] == "exact":
        return {"kind": "exact"}
    return {"kind": "ivf", "nlist": int(options["nlist"]), "nprobe": int(options["nprobe"])}


def tower_state(tower) -> dict[str, Any]:
    """A CPU copy of ``tower``'s state. The item tower's is served as trained: its ``item_id`` row 0
    is the never-shown item's row, the one evaluation reads too (``RetrievalModule``)."""
    return {k: v.detach().clone().cpu() for k, v in tower.state_dict().items()}


def cold_start_state(tower, id_feature: str) -> dict[str, Any]:
    """A copy of ``tower``'s state with row 0 of the ``id_feature`` table (never read in training:
    every trained user has code >= 1) set to the mean trained row: the cold-start user of the query
    tower (``user_id``)."""
    state = tower_state(tower)
    key = f"embedder.embeddings.{id_feature}.weight"
    state[key][0] = state[key][1:].mean(dim=0)
    return state


def make_bundle(
    train_cfg, dm, model, options: Mapping[str, Any], blend: Blend | None = None
) -> ServingBundle:
    """The serving bundle of a trained model (eval mode, its checkpoint's weights) on its data module,
    with the run's popularity ``blend`` (None: the two-tower score alone)."""
    schemas = load_schemas()
    items = load_tables(dm.dir, {"items": schemas["items"]})["items"]  # the table as training read it
    return ServingBundle(
        config=train_cfg,
        query_tower_state=cold_start_state(model.user_tower, "user_id"),
        item_tower_state=tower_state(model.item_tower),
        user_spec=dm.user_spec,
        item_spec=dm.item_spec,
        users=dm.users,
        item_ids=np.asarray(dm.items.item_ids, dtype=np.int64),
        item_emb=model.embed_items(dm.item_features),
        surfaces=list(dm.surfaces),
        query_hash_buckets=int(dm.query_hash_buckets),
        context=tuple(dm.context),
        history_max_len=int(dm.history_max_len),
        events=dm.inputs.events,
        index=index_options(options),
        item_encoding=fit_item_encoding(items, dm.item_columns, dm.items),
        limits={name: int(options[name]) for name in DEFAULT_LIMITS},
        blend=None if blend is None or blend.is_off else blend.meta(),
        item_bias=None if blend is None or blend.is_off else blend.bias,
    )


def overlap_requests(bundle: ServingBundle, n: int = OVERLAP_REQUESTS, seed: int = 0) -> pl.DataFrame:
    """Requests of up to ``n`` training users (a seeded sample, without repeats), the surfaces in turn."""
    rng = np.random.default_rng(seed)
    users = bundle.users.user_ids
    chosen = np.sort(rng.choice(users, size=min(n, len(users)), replace=False))
    surfaces = np.asarray(bundle.surfaces, dtype=object)[np.arange(len(chosen)) % len(bundle.surfaces)]
    return pl.DataFrame(
        {"user_id": chosen, "surface": surfaces}, schema={"user_id": pl.Int64, "surface": pl.String}
    )


def measure_overlap(bundle: ServingBundle, k: int, n: int = OVERLAP_REQUESTS) -> ServingBundle:
    """``bundle`` with ``index_overlap`` set: the share of exact search's top ``k`` that the served
    approximate index (the one saved with the model) finds on :func:`overlap_requests`; an exact index
    needs none (None)."""
    if bundle.index["kind"] == "exact":
        return dataclasses.replace(bundle, index_overlap=None)
    model = CandidateModel(bundle)  # builds the served index once; the bundle keeps it
    requests = request_rows(overlap_requests(bundle, n))
    query_emb = model.retriever.embed_queries(model.encoder.encode(requests))
    _, approximate = model.retriever.index.search(query_emb, k)
    _, exact = ExactIndex(bundle.index_vectors()).search(query_emb, k)
    overlap = {"k": int(k), "overlap": overlap_at_k(approximate, exact), "queries": len(query_emb)}
    return dataclasses.replace(bundle, index_overlap=overlap)


def overlap_metrics(bundle: ServingBundle) -> dict[str, float]:
    """``{INDEX_OVERLAP_METRIC: overlap}`` of a bundle's measured ``index_overlap`` (empty without)."""
    if bundle.index_overlap is None:
        return {}
    return {INDEX_OVERLAP_METRIC.format(k=bundle.index_overlap["k"]): float(bundle.index_overlap["overlap"])}


def input_example(bundle: ServingBundle) -> pl.DataFrame:
    """Two requests of known users on the first surface: the signature's example."""
    users = bundle.users.user_ids[:2]
    return pl.DataFrame({"user_id": users, "surface": [bundle.surfaces[0]] * len(users)})


@contextmanager
def pyfunc_parts(bundle: ServingBundle, scratch: Path) -> Iterator[dict[str, Any]]:
    """What MLflow saves as the served model, the bundle written under ``scratch`` (removed after):
    the code file, the artifacts, the signature and the input example (keyword arguments of
    ``tracking.save_served_model``)."""
    from convcg_cli.serve import model_code
    from convcg_cli.serve.pyfunc import BUNDLE_ARTIFACT

    written = bundle.write(scratch / BUNDLE_ARTIFACT)
    try:
        yield {
            "python_model": model_code.__file__,
            "artifacts": {BUNDLE_ARTIFACT: str(written)},
            "signature": tracking.served_model_signature(INPUT_COLUMNS, OUTPUT_COLUMNS, DEFAULT_K),
            "input_example": input_example(bundle).to_pandas(),
        }
    finally:
        shutil.rmtree(written, ignore_errors=True)


def save_bundle(bundle: ServingBundle, path: Path) -> Path:
    """Save ``bundle`` as a local pyfunc model directory at ``path`` (no run; the benchmarks load it)."""
    scratch = path.with_name(f"{path.name}.parts")
    try:
        with pyfunc_parts(bundle, scratch) as parts:
            tracking.save_served_model(path, **parts)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return path


def non_finite_parts(bundle: ServingBundle) -> list[str]:
    """The bundle's tensors and arrays holding NaN or inf: ``query_tower.<name>``,
    ``item_tower.<name>``, ``item_emb (n of N items, e.g. ids ...)``."""
    towers = (("query_tower", bundle.query_tower_state), ("item_tower", bundle.item_tower_state))
    bad = [f"{tower}.{name}" for tower, state in towers for name in non_finite_tensors(state)]
    rows = ~np.isfinite(bundle.item_emb).all(axis=1)
    if rows.any():
        ids = ", ".join(str(i) for i in bundle.item_ids[rows][:5])
        bad.append(f"item_emb ({int(rows.sum())} of {len(rows)} items, e.g. ids {ids})")
    return bad


def check_finite(bundle: ServingBundle, run_id: str) -> None:
    """UnservableModelError naming the run and its non-finite tensors (:func:`non_finite_parts`)."""
    bad = non_finite_parts(bundle)
    if bad:
        raise UnservableModelError(
            f"The served model of run {run_id} holds non-finite values (NaN or inf) in {some_of(bad, 6)}; it "
            f"was not logged (runs:/{run_id}/{tracking.SERVED_MODEL_NAME} is unchanged). The weights "
            "come from a diverged training: retrain the run (e.g. with a lower model.optimizer.lr); "
            "for item_emb alone, check the new item table's content vectors."
        )


def check_answers(store: tracking.Store, staged: Path, bundle: ServingBundle, run_id: str) -> None:
    """Load the saved model directory ``staged`` as MLflow loads it and ask it for the input
    example's top ``min(DEFAULT_K, max_k)``: every request answered, with finite scores and (exact
    index) ``k`` rows each, else an UnservableModelError naming the run."""
    example = input_example(bundle).to_pandas()
    k = min(DEFAULT_K, bundle.limits["max_k"])
    unchanged = f"it was not logged (runs:/{run_id}/{tracking.SERVED_MODEL_NAME} is unchanged)"
    try:
        answer = tracking.load_served_model(store, str(staged)).predict(example, params={"k": k})
    except Exception as exc:  # whatever stops it serving is reported, naming the run
        raise UnservableModelError(
            f"The served model of run {run_id} does not load and answer its input example "
            f"({type(exc).__name__}: {first_line(exc)}); {unchanged}."
        ) from None
    problem = None
    if list(answer.columns) != list(OUTPUT_COLUMNS):
        problem = f"columns {list(answer.columns)}, expected {list(OUTPUT_COLUMNS)}"
    elif sorted(set(answer["request"])) != list(range(len(example))):
        problem = f"it answered requests {sorted(set(answer['request']))} of {len(example)}"
    elif not np.isfinite(answer["score"].to_numpy()).all():
        problem = "non-finite scores"
    elif bundle.index["kind"] == "exact" and len(answer) != len(example) * min(k, len(bundle.item_ids)):
        problem = f"{len(answer)} candidate rows for {len(example)} requests at k={k}"
    if problem:
        raise UnservableModelError(
            f"The served model of run {run_id} answers its input example wrongly ({problem}); {unchanged}."
        )


def log_bundle(
    run: tracking.TrackedRun,
    bundle: ServingBundle,
    scratch: Path,
    tags: Mapping[str, str] | None = None,
    overlap_k: int | None = None,
) -> tuple[str, dict[str, float]]:
    """Check ``bundle`` (finite); build its index once, measure an approximate one's overlap with
    exact (top ``overlap_k``, default the run's ``serve.overlap_k``) and log it to the run; save it
    with its index as a pyfunc model under ``scratch`` (the command's own directory), load it back
    and check its answer, then publish it as the run's model. Returns its URI and the overlap metric."""
    check_finite(bundle, run.run_id)  # before an IVF index is trained on the embeddings
    k = int(overlap_k or serve_options(bundle.config)["overlap_k"])
    bundle = measure_overlap(bundle, k)
    overlap = overlap_metrics(bundle)
    if overlap:
        tracking.log_metrics(run, overlap)
    staged = scratch / "model"
    with pyfunc_parts(bundle, scratch) as parts:
        tracking.save_served_model(staged, **parts)
    check_answers(run.store, staged, bundle, run.run_id)
    uri = tracking.publish_served_model(run, staged, tags={"index": bundle.index["kind"], **(tags or {})})
    return uri, overlap


def _log(
    run: tracking.TrackedRun,
    train_cfg,
    dm,
    model,
    options: Mapping[str, Any],
    scratch: Path,
    blend: Blend | None,
) -> ExportResult:
    """Bundle and log (:func:`log_bundle`: the index built once, an approximate one's overlap
    measured and logged); the shared tail of :func:`log_trained_model` and :func:`export_run`."""
    bundle = make_bundle(train_cfg, dm, model, options, blend)
    uri, overlap = log_bundle(run, bundle, scratch, overlap_k=int(options["overlap_k"]))
    return ExportResult(uri, bundle.index, overlap)


def log_trained_model(
    cfg, dm, model, run: tracking.TrackedRun, blend: Blend | None = None
) -> ExportResult | None:
    """At the end of ``convcg train``: the model (in eval mode, with the kept checkpoint's weights)
    and the run's popularity ``blend``, bundled and logged as the run's model (None when
    ``serve.log_model`` is false)."""
    options = serve_options(cfg)
    if not options["log_model"]:
        return None
    with workdir.command_dir("model") as scratch:
        return _log(run, cfg, dm, model, options, scratch, blend)


def export_run(store: tracking.Store, run: str, overrides: Mapping[str, Any] | None = None) -> ExportResult:
    """Log the served model of an existing run (``convcg export``): rebuilt from its saved config and
    checkpoint, on its own data, with the run's ``serve`` options updated by ``overrides``."""
    run_id = tracking.resolve_run(store, run)
    # One writer per run: a second export (or index) of the run exits 2 naming this one.
    with tracking.claim_run(store, run_id), workdir.command_dir("export") as scratch:
        train_cfg = tracking.load_run_config(store, run_id, scratch)
        tracking.check_training_data(store, run_id, train_cfg.data.dir)  # serve the trained corpus
        options = serve_options(train_cfg, overrides)
        dm = build_datamodule(train_cfg, list(train_cfg.loss.task_weights.keys()), stage="validate")
        checkpoint = tracking.download_checkpoint(store, run_id, scratch)
        model = load_trained_model(train_cfg, dm, checkpoint, run_id)
        blend = logged_blend(store, run_id, dm)
        return _log(tracking.existing_run(store, run_id), train_cfg, dm, model, options, scratch, blend)


def register(
    store: tracking.Store, model_uri: str, name: str, alias: str | None = None, scratch: Path | None = None
) -> int:
    """Register ``model_uri`` (``runs:/ID/model``) as a new version of ``name``; returns the version.
    What is read meanwhile goes into ``scratch`` (default: a command directory of its own)."""
    if model_uri.startswith("runs:/"):
        tracking.resolve_run(store, model_uri.split("/")[1])  # a clear error for an unknown run
    if scratch is not None:
        return tracking.register_served_model(store, model_uri, name, alias, scratch)
    with workdir.command_dir("register") as own:
        return tracking.register_served_model(store, model_uri, name, alias, own)
