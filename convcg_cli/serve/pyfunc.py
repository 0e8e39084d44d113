"""The MLflow pyfunc model: ``mlflow.pyfunc.load_model("runs:/ID/model").predict(requests, params={"k": 10})``
and ``mlflow models serve -m runs:/ID/model --env-manager local``.

The class subclasses MLflow's ``PythonModel`` (the one MLflow import outside ``tracking/``: MLflow
loads a model through this base class); the work is :class:`~convcg_cli.serve.model.CandidateModel`'s.
A malformed request becomes MLflow's INVALID_PARAMETER_VALUE error, which its server answers with 400.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

from convcg_cli import tracking
from convcg_cli.serve.bundle import RequestError, ServingBundle
from convcg_cli.serve.model import DEFAULT_K, CandidateModel, records

BUNDLE_ARTIFACT = "bundle"  # the name of the bundle directory among the model's artifacts


class Candidates(pd.DataFrame):
    """The table ``predict`` returns: a pandas DataFrame in every way (what is derived from it is a
    plain DataFrame), whose ``to_dict(orient="records")`` reads each numeric column's array once.

    That call is how ``mlflow models serve`` turns the answer into JSON, and pandas boxes it value
    by value: ~370 µs for one request's 100 rows (pandas 3.1; ~590 µs on a subclass, whose fast
    paths pandas skips), against ~50 µs by :func:`~convcg_cli.serve.model.records`. The records are
    the same Python ints and floats, so the JSON is the same text (tests/serve/test_pyfunc.py).
    Any other orient or argument, or a column that is not a numpy number, goes to pandas.
    """

    def to_dict(self, orient: str = "dict", *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        column_array = getattr(self, "_get_column_array", None)  # pandas' own, since 1.x
        plain = orient != "records" or args or kwargs or not self.shape[1] or not self.columns.is_unique
        if plain or column_array is None:
            return super().to_dict(orient, *args, **kwargs)
        arrays = [column_array(i) for i in range(self.shape[1])]
        if not all(isinstance(a, np.ndarray) and a.dtype.kind in "iuf" for a in arrays):
            return super().to_dict(orient, *args, **kwargs)
        return records(dict(zip(self.columns, arrays, strict=True)))


class CandidateGenerator(PythonModel):
    """Top-K candidates per request (pandas DataFrame in, long DataFrame out: :class:`Candidates`);
    ``k`` is a param."""

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
            return Candidates(self.model.rank(model_input, k), copy=False)
        except RequestError as exc:
            raise tracking.invalid_request(str(exc)) from None
