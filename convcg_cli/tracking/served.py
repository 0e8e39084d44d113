"""The served model of a run: the pyfunc model logged as ``runs:/ID/model``, saved to a directory,
loaded back and registered; and the error a served model raises for a bad request."""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from convcg_cli.errors import RunNotFoundError, first_line
from convcg_cli.tracking.store import Store, quiet

if TYPE_CHECKING:
    from convcg_cli.tracking.store import TrackedRun

SERVED_MODEL_NAME = "model"  # a run's served model is runs:/<run id>/model
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


def log_served_model(
    run: TrackedRun,
    python_model: Any,
    artifacts: Mapping[str, str],
    signature: Any,
    input_example: Any,
    tags: Mapping[str, str] | None = None,
) -> str:
    """Log ``python_model`` (the path of a models-from-code file) with ``artifacts`` as the run's model
    ``SERVED_MODEL_NAME`` and return its ``runs:/`` URI (a later call logs a newer model under the
    same name; ``runs:/`` then resolves to the newest)."""
    import mlflow
    import mlflow.pyfunc
    from mlflow.models import Model

    run.store.use_globally()
    # The logged model belongs to the run's experiment (MLflow would take the active one, "Default").
    mlflow.set_experiment(experiment_id=run.client.get_run(run.run_id).info.experiment_id)
    Model.log(
        artifact_path=None,
        name=SERVED_MODEL_NAME,
        flavor=mlflow.pyfunc,
        run_id=run.run_id,
        python_model=python_model,
        artifacts=dict(artifacts),
        signature=signature,
        input_example=input_example,
        pip_requirements=SERVED_MODEL_REQUIREMENTS,
        tags=dict(tags or {}),
    )
    return f"runs:/{run.run_id}/{SERVED_MODEL_NAME}"


def save_served_model(
    path: Path, python_model: Any, artifacts: Mapping[str, str], signature: Any, input_example: Any
) -> None:
    """:func:`log_served_model` into a local directory ``path`` (replaced), outside any run."""
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


def load_served_model(store: Store, model_uri: str):
    """``mlflow.pyfunc.load_model(model_uri)`` in this store (``runs:/ID/model``, ``models:/NAME@ALIAS``,
    or a local model directory)."""
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException

    store.use_globally()
    try:
        return mlflow.pyfunc.load_model(model_uri)
    except (MlflowException, OSError) as exc:
        first = first_line(exc)
        raise RunNotFoundError(
            f"No served model at {model_uri} in {store.uri} ({first}). Log one with "
            "'convcg export --run ID' (convcg train logs it for new runs)."
        ) from None


def register_served_model(store: Store, model_uri: str, name: str, alias: str | None) -> int:
    """Register ``model_uri`` as a new version of registered model ``name`` (created on first use),
    optionally pointing ``alias`` (e.g. ``champion``) at it; returns the version number."""
    import mlflow
    from mlflow.exceptions import MlflowException

    store.use_globally()
    try:
        mlflow.models.get_model_info(model_uri)
    except (MlflowException, OSError):
        raise RunNotFoundError(
            f"No served model at {model_uri} in {store.uri}; log one with "
            "'convcg export --run ID' (convcg train logs it for new runs)."
        ) from None
    version = mlflow.register_model(model_uri, name)
    if alias:
        store.client.set_registered_model_alias(name, alias, version.version)
    return int(version.version)


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
