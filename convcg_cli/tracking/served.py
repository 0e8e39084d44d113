"""The served model of a run: the pyfunc model saved to a directory, published as ``runs:/ID/model``
once checked, loaded back and registered; and the error a served model raises for a bad request."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from convcg_cli.errors import RunNotFoundError, first_line
from convcg_cli.tracking.runs import HOST_TAG, PID_TAG, process_tags
from convcg_cli.tracking.store import Store, quiet
from convcg_cli.workdir import process_start_time, writer_gone

if TYPE_CHECKING:
    from convcg_cli.tracking.store import TrackedRun

SERVED_MODEL_NAME = "model"  # a run's served model is runs:/<run id>/model
MLMODEL_FILE = "MLmodel"  # MLflow's description of a model directory
SERVED_MODEL_REQUIREMENTS = ["convcg==0.1.0"]  # given, not inferred (inference imports and times out)


def served_model_signature(
    input_columns: Mapping[str, tuple[str, bool]], output_columns: Mapping[str, str], k: int
):
    """The pyfunc signature: request columns ``{name: (type, required)}``, the candidate columns
    ``{name: type}`` and the ``k`` param (default ``k``); types are MLflow's (``long``, ``string``...)
    or ``any`` (MLflow leaves the column's values to the model to check)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import AnyType

    inputs = Schema(
        [
            ColSpec(AnyType() if t == "any" else t, name, required=required)
            for name, (t, required) in input_columns.items()
        ]
    )
    outputs = Schema([ColSpec(t, name) for name, t in output_columns.items()])
    return ModelSignature(inputs=inputs, outputs=outputs, params=ParamSchema([ParamSpec("k", "long", k)]))


def save_served_model(
    path: Path, python_model: Any, artifacts: Mapping[str, str], signature: Any, input_example: Any
) -> None:
    """Save ``python_model`` (the path of a models-from-code file) with ``artifacts`` as a pyfunc
    model directory ``path`` (replaced), outside any run: what :func:`publish_served_model` logs
    once it is checked, and what the benchmarks load."""
    import mlflow.pyfunc

    quiet()
    shutil.rmtree(path, ignore_errors=True)
    mlflow.pyfunc.save_model(
        str(path),
        python_model=python_model,
        artifacts=dict(artifacts),
        signature=signature,
        input_example=input_example,
        pip_requirements=SERVED_MODEL_REQUIREMENTS,
    )


def _served_models(store: Store, run_id: str) -> list[Any]:
    """The run's logged models named ``SERVED_MODEL_NAME``, newest first: the first one is what
    ``runs:/ID/model`` resolves to (MLflow 3's ``RunsArtifactRepository`` takes the newest
    non-deleted logged model of that name and run, whatever its status)."""
    experiment_id = store.client.get_run(run_id).info.experiment_id
    found, token = [], None
    while True:
        page = store.client.search_logged_models(
            experiment_ids=[experiment_id], filter_string=f"name = '{SERVED_MODEL_NAME}'", page_token=token
        )
        found += [m for m in page if m.source_run_id == run_id]
        token = page.token
        if not token:
            return found


def drop_unfinished_models(store: Store, run_id: str) -> list[str]:
    """Delete the run's served models a killed writer left unfinished, so that ``runs:/ID/model``
    resolves to the newest finished one again; returns their ids.

    Unfinished: status FAILED, or PENDING while its writer (``convcg.host``/``convcg.pid`` tags) is a
    dead process of this host; a PENDING model without writer tags (logged by an older convcg) when
    it is older than this process. A live writer's model, or one of another host, is left alone.
    """
    from mlflow.entities import LoggedModelStatus

    started_ms = process_start_time() * 1000
    dropped = []
    for model in _served_models(store, run_id):
        status, tags = model.status, model.tags
        if status == LoggedModelStatus.READY:
            continue
        if HOST_TAG in tags:
            gone = writer_gone(tags[HOST_TAG], int(tags.get(PID_TAG) or 0))
        else:
            gone = (model.creation_timestamp or 0) < started_ms
        if status == LoggedModelStatus.FAILED or gone:
            store.client.delete_logged_model(model.model_id)
            dropped.append(model.model_id)
    return dropped


def publish_served_model(run: TrackedRun, staged: Path, tags: Mapping[str, str] | None = None) -> str:
    """Log the checked model directory ``staged`` (:func:`save_served_model`) as the run's newest
    model ``SERVED_MODEL_NAME`` and return its ``runs:/`` URI, which then resolves to it.

    Everything slow (bundling, saving, loading it back to check it) is done before: the store only
    sees a logged model being created, its finished files copied in and its status set READY. A
    copy cut short (SIGKILL, a lost connection) leaves a PENDING model tagged with this process;
    :func:`drop_unfinished_models` (run first by every later publish, load or registration of the
    run's model) deletes it, and ``runs:/ID/model`` resolves to the previous model again.
    """
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model

    client, run_id = run.client, run.run_id
    drop_unfinished_models(run.store, run_id)
    source = client.get_run(run_id)
    model = client.create_logged_model(
        experiment_id=source.info.experiment_id,
        name=SERVED_MODEL_NAME,
        source_run_id=run_id,
        tags={**dict(tags or {}), **process_tags()},  # who writes it: an unfinished one is dropped
        params=dict(source.data.params),
    )
    try:
        client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])  # the run's Models tab
        meta = Model.load(str(staged / MLMODEL_FILE))  # the copy names the logged model, as Model.log's
        meta.run_id, meta.artifact_path = run_id, model.artifact_location
        meta.model_id = meta.model_uuid = model.model_id
        meta.save(str(staged / MLMODEL_FILE))
        client.log_model_artifacts(model.model_id, str(staged))
        client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    except BaseException:
        try:
            client.delete_logged_model(model.model_id)  # runs:/ID/model resolves to the previous one
        except Exception:  # the store itself failed: the next publish or load deletes it
            pass
        raise
    return f"runs:/{run_id}/{SERVED_MODEL_NAME}"


def _drop_unfinished(store: Store, model_uri: str) -> None:
    """:func:`drop_unfinished_models` of the run a ``runs:/ID/model`` URI names (others: nothing)."""
    if model_uri.startswith("runs:/") and model_uri.rstrip("/").endswith(f"/{SERVED_MODEL_NAME}"):
        drop_unfinished_models(store, model_uri.split("/")[1])


def load_served_model(store: Store, model_uri: str, dest: Path | None = None):
    """``mlflow.pyfunc.load_model(model_uri)`` in this store (``runs:/ID/model``, ``models:/NAME@ALIAS``,
    or a local model directory, read in place). A store's model is downloaded under ``dest`` (the
    command's own directory, required for one); a run's unfinished models are deleted first."""
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException

    store.use_globally()
    local = Path(model_uri).is_dir()
    if not local and dest is None:
        raise ValueError(f"load_served_model({model_uri!r}) needs a destination to download into")
    try:
        if not local:
            _drop_unfinished(store, model_uri)
        into = None if local else Path(tempfile.mkdtemp(prefix="model-", dir=dest))
        return mlflow.pyfunc.load_model(model_uri, dst_path=None if into is None else str(into))
    except (MlflowException, OSError) as exc:
        first = first_line(exc)
        raise RunNotFoundError(
            f"No served model at {model_uri} in {store.uri} ({first}). Log one with "
            "'convcg export --run ID' (convcg train logs it for new runs)."
        ) from None


def register_served_model(store: Store, model_uri: str, name: str, alias: str | None, dest: Path) -> int:
    """Register ``model_uri`` as a new version of registered model ``name`` (created on first use),
    optionally pointing ``alias`` (e.g. ``champion``) at it; returns the version number. What MLflow
    reads to do it is downloaded under ``dest`` (the command's own directory)."""
    import mlflow
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    store.use_globally()
    try:
        _drop_unfinished(store, model_uri)
        download_artifacts(artifact_uri=f"{model_uri}/{MLMODEL_FILE}", dst_path=str(dest))
    except (MlflowException, OSError):
        raise RunNotFoundError(
            f"No served model at {model_uri} in {store.uri}; log one with "
            "'convcg export --run ID' (convcg train logs it for new runs)."
        ) from None
    with _temp_files_in(dest):  # MLflow reads the model's files into a temp dir of its own
        version = mlflow.register_model(model_uri, name)
    if alias:
        store.client.set_registered_model_alias(name, alias, version.version)
    return int(version.version)


@contextmanager
def _temp_files_in(dest: Path) -> Iterator[None]:
    """Python's temp directory is ``dest`` during the block: for an MLflow call that makes temporary
    files of its own and takes no destination (restored after; convcg's threads make none meanwhile)."""
    previous = tempfile.tempdir
    tempfile.tempdir = str(dest)
    try:
        yield
    finally:
        tempfile.tempdir = previous


def set_served_model(python_model: Any) -> None:
    """Declare ``python_model`` the model of the models-from-code file MLflow is loading
    (``serve/model_code.py``)."""
    from mlflow.models import set_model

    set_model(python_model)


def invalid_request(message: str) -> Exception:
    """The exception a served model raises for a malformed request: MLflow's INVALID_PARAMETER_VALUE,
    which its scoring server answers with HTTP 400 and ``message``."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)
