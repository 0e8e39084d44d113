"""The MLflow pyfunc model: ``mlflow.pyfunc.load_model("runs:/ID/model").predict(requests, params={"k": 10})``
and ``mlflow models serve -m runs:/ID/model --env-manager local``.

The class subclasses MLflow's ``PythonModel`` (the one MLflow import outside ``tracking/``: MLflow
loads a model through this base class); the work is :class:`~convcg_cli.serve.model.CandidateModel`'s.
A malformed request becomes MLflow's INVALID_PARAMETER_VALUE error, which its server answers with 400.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.pyfunc import PythonModel

from convcg_cli import tracking
from convcg_cli.serve.bundle import RequestError, ServingBundle
from convcg_cli.serve.model import DEFAULT_K, CandidateModel

BUNDLE_ARTIFACT = "bundle"  # the name of the bundle directory among the model's artifacts


class CandidateGenerator(PythonModel):
    """Top-K candidates per request (pandas DataFrame in, long DataFrame out); ``k`` is a param."""

    def load_context(self, context) -> None:
        """Read the bundle and build the query tower and the item index once per process."""
        self.model = CandidateModel(ServingBundle.read(Path(context.artifacts[BUNDLE_ARTIFACT])))

    def predict(
        self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        """``(request, rank, item_id, score)`` rows, ``k`` per request (``params={"k": K}``): the
        columns of :meth:`CandidateModel.rank` as they are (one batch encoded and searched; no copy
        through another table library)."""
        k = (params or {}).get("k", DEFAULT_K)
        try:
            return pd.DataFrame(self.model.rank(model_input, k), copy=False)
        except RequestError as exc:
            raise tracking.invalid_request(str(exc)) from None
