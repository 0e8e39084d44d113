"""``CandidateModel``: a serving bundle's query tower and item index; requests in, candidates out.

The pyfunc model's ``predict`` and ``convcg retrieve`` both rank with :meth:`CandidateModel.rank`: the
request table's columns read at once, the features of every row encoded and embedded in one batch,
one search, and the candidate columns made from the result arrays (no per-row Python); ``predict``
makes its pandas answer from them, ``retrieve`` its polars chunk (:meth:`CandidateModel.candidates`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import polars as pl

from convcg_cli.builders import model_from_config
from convcg_cli.data.features.query_encoder import QueryEncoder
from convcg_cli.index import Retriever
from convcg_cli.serve.bundle import (
    CANDIDATE_COLUMNS,
    DEFAULT_LIMITS,
    RequestError,
    ServingBundle,
    request_rows,
)

DEFAULT_K = 100
CANDIDATE_SCHEMA = dict(zip(CANDIDATE_COLUMNS, (pl.Int64, pl.Int64, pl.Int64, pl.Float32), strict=True))
CANDIDATE_DTYPES = dict(zip(CANDIDATE_COLUMNS, (np.int64, np.int64, np.int64, np.float32), strict=True))


def load_towers(bundle: ServingBundle):
    """The run's model rebuilt from the bundle's config and specs, with both towers' weights, in eval
    mode (the loss and optimiser parts are built but never used)."""
    model = model_from_config(bundle.config, bundle.user_spec, bundle.item_spec)
    model.user_tower.load_state_dict(bundle.query_tower_state)
    model.item_tower.load_state_dict(bundle.item_tower_state)
    model.eval()
    return model


def _with_constant(embed):
    """``embed`` with a constant 1 appended to each query embedding: the blend's coordinate."""
    import torch

    def embed_with_one(features):
        emb = embed(features)
        return torch.cat([emb, torch.ones(len(emb), 1, dtype=emb.dtype, device=emb.device)], dim=1)

    return embed_with_one


def _limits_text(limits: dict[str, int]) -> str:
    return (
        f"this model serves at most k={limits['max_k']} candidates per request and "
        f"{limits['max_rows']:,} requests per call (serve.max_k, serve.max_rows when it is exported)"
    )


def records(columns: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
    """The rows of ``columns`` as ``{name: value}`` dicts of Python ints and floats, what pandas'
    ``to_dict(orient="records")`` gives for numeric columns (so the same JSON), each array read once
    (pandas boxes value by value: ~370 µs for one request's 100 rows, against ~50 µs here)."""
    names = list(columns)
    return [
        dict(zip(names, row, strict=True)) for row in zip(*(columns[n].tolist() for n in names), strict=True)
    ]


def check_k(k: Any, limits: dict[str, int] = DEFAULT_LIMITS) -> int:
    """``k`` as an int in ``[1, limits["max_k"]]``, or a RequestError naming the limits."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or int(k) < 1:
        raise RequestError(f"k must be a positive integer, got {k!r}.")
    if int(k) > limits["max_k"]:
        raise RequestError(f"k={k} is over the limit: {_limits_text(limits)}.")
    return int(k)


def check_rows(n_rows: int, limits: dict[str, int] = DEFAULT_LIMITS) -> None:
    """A RequestError naming the limits when a call holds more than ``limits["max_rows"]`` requests."""
    if n_rows > limits["max_rows"]:
        raise RequestError(f"{n_rows:,} requests in one call is over the limit: {_limits_text(limits)}.")


class CandidateModel:
    """Ranks the corpus for each request with the trained query tower and the bundle's item index.

    Args:
        bundle: what the served model holds (see :mod:`convcg_cli.serve.bundle`).

    Example (with a logged run)::

        model = CandidateModel(ServingBundle.read(path))
        model.candidates(pl.DataFrame({"user_id": [7], "surface": ["home_feed"]}), k=10)
    """

    def __init__(self, bundle: ServingBundle) -> None:
        self.bundle = bundle
        towers = load_towers(bundle)
        self.retriever = Retriever(
            _with_constant(towers.embed_queries) if bundle.item_bias is not None else towers.embed_queries,
            bundle.served_index(),  # the saved index when it matches the bundle's items, else built
            int(bundle.config.data.get("eval_batch_size", 8192)),
        )
        # The lookups made once, not per request.
        self.encoder = QueryEncoder(bundle.query_inputs(), cold_start_user=True)

    def candidates(self, requests: Any, k: int = DEFAULT_K, first_request: int = 0) -> pl.DataFrame:
        """The candidates of :meth:`rank` as a polars table (``convcg retrieve``'s chunks)."""
        return pl.DataFrame(self.rank(requests, k, first_request), schema=CANDIDATE_SCHEMA)

    def rank(self, requests: Any, k: int = DEFAULT_K, first_request: int = 0) -> dict[str, np.ndarray]:
        """The top ``k`` items of every request as ``(request, rank, item_id, score)`` columns.

        Args:
            requests: a pandas or polars table with ``user_id``, ``surface`` and optionally
                ``subject_item_id``, ``query_id``, ``timestamp`` (see :func:`request_rows`).
            k: candidates per request (the whole corpus when it is smaller), at most the
                bundle's ``max_k``; ``requests`` may hold at most ``max_rows`` rows.
            first_request: the ``request`` number of the first row (a chunk's offset in a file).

        Returns:
            ``{column: array}`` of ``CANDIDATE_COLUMNS`` (int64, int64, int64, float32), ``min(k, N)``
            rows per request, ``rank`` 1 the best; ``request`` is the row's position in ``requests``
            plus ``first_request``. An approximate index may return fewer rows.

        Raises:
            RequestError: a malformed request table or ``k``, or one over the limits.
        """
        k = check_k(k, self.bundle.limits)
        # Counted before the table is read: a huge one fails at once (not a table: request_rows says so)
        check_rows(int(getattr(requests, "shape", (0,))[0]), self.bundle.limits)
        rows = request_rows(requests)
        if rows.height == 0:
            return {name: np.empty(0, dtype) for name, dtype in CANDIDATE_DTYPES.items()}
        scores, positions = self.retriever.topk(self.encoder.encode(rows), k)
        n, width = positions.shape
        request = np.repeat(np.arange(first_request, first_request + n, dtype=np.int64), width)
        rank = np.tile(np.arange(1, width + 1, dtype=np.int64), n)
        positions, scores = positions.reshape(-1), scores.reshape(-1)
        if positions.min(initial=0) < 0:  # an IVF index pads rows whose probed cells hold fewer than k
            found = positions >= 0
            request, rank, positions, scores = request[found], rank[found], positions[found], scores[found]
        return {
            "request": request,
            "rank": rank,
            "item_id": self.bundle.item_ids[positions].astype(np.int64, copy=False),
            "score": scores.astype(np.float32, copy=False),
        }
