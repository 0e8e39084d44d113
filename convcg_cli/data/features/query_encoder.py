"""``QueryEncoder``: the query tower's features of request or impression rows, with every lookup
made once: the one query encoding of convcg (training, evaluation and the served model).

:func:`convcg_cli.data.features.encodings.build_query_features` encodes a training or evaluation
split through it; a served model keeps one encoder for all its requests
(:class:`convcg_cli.serve.model.CandidateModel`). What a single request would otherwise pay a dozen
times over is done when the encoder is made: the surface codes, the sorted id tables, the subject
items' content vectors, the engagement events grouped by user (the rows read their own users'
events; the history is still :func:`~convcg_cli.data.features.history_before`'s). Per call the work
is a few numpy gathers over the rows, with no table library's per-operation cost.

Rows: ``user_id``, ``surface``, ``subject_item_id``, ``query_id``, ``timestamp`` (nulls allowed in
the last three). With ``cold_start_user`` (a served model) an unknown user is the cold-start user
(position 0 of the served user table), an unknown ``subject_item_id`` counts as none and a null
timestamp is the latest; without it (training and evaluation rows, whose ids the contract checked)
an unknown user is an error.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl

from convcg_cli.data.features.history import history_before
from convcg_cli.errors import ConvcgError, RequestError

# The timestamp of a request that gives none: after every event, so the whole history counts.
LATEST = np.iinfo(np.int64).max
# Request context features, in the order the tower's inputs list them (see ``data.context``).
CONTEXT_FEATURES = ("surface", "subject_item_id", "query_bucket")


def positions_or_missing(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Position of each of ``ids`` in ``sorted_ids``, -1 for an id not there.

    Example:
        >>> positions_or_missing(np.array([3, 5, 9]), np.array([5, 4, 9, 10])).tolist()
        [1, -1, 2, -1]
    """
    if len(sorted_ids) == 0:
        return np.full(len(ids), -1, dtype=np.int64)
    at = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
    return np.where(sorted_ids[at] == ids, at, -1).astype(np.int64)


def ints_and_nulls(column: pl.Series) -> tuple[np.ndarray, np.ndarray]:
    """``(values, is_null)`` of an Int64 column, nulls as 0: no polars operation when the column has
    no nulls or only nulls (an absent optional column), the usual cases.

    Example:
        >>> [a.tolist() for a in ints_and_nulls(pl.Series([4, None], dtype=pl.Int64))]
        [[4, 0], [False, True]]
    """
    n, nulls = len(column), column.null_count()
    if nulls == 0:
        return column.to_numpy(), np.zeros(n, dtype=bool)
    if nulls == n:
        return np.zeros(n, dtype=np.int64), np.ones(n, dtype=bool)
    return column.fill_null(0).to_numpy(), column.is_null().to_numpy()


class UserEvents:
    """Engagement events grouped by user once: :meth:`of` gives the events of some users at the cost
    of their own events, not of the whole log (``history_before`` reads only the requests' users'
    events, so it returns the same history from them).

    Args:
        events: engagement events (``user_id, timestamp, item_id, action``), any row order.
    """

    def __init__(self, events: pl.DataFrame) -> None:
        self.events = events.sort("user_id")
        user = self.events["user_id"].cast(pl.Int64).to_numpy()
        self.users, self.starts, counts = np.unique(user, return_index=True, return_counts=True)
        self.ends = self.starts + counts

    def of(self, user_ids: np.ndarray) -> pl.DataFrame:
        """The events of ``user_ids`` (users without events have none), in the table's order."""
        at = positions_or_missing(self.users, np.unique(user_ids))
        at = at[at >= 0]
        starts, ends = self.starts[at], self.ends[at]
        lengths = ends - starts
        # Row i of the result: the (i - first row of its user)-th event of its user.
        first = np.cumsum(lengths) - lengths
        rows = np.arange(int(lengths.sum()), dtype=np.int64) + np.repeat(starts - first, lengths)
        return self.events[rows]


class QueryEncoder:
    """The query-tower features of rows (see the module's docstring).

    Args:
        inputs: the query inputs, a :class:`~convcg_cli.data.features.encodings.QueryInputs` (users,
            items, surfaces, context, events and history length; not imported here: ``encodings``
            builds its features through this module).
        cold_start_user: rows come from requests to a served model, whose user table starts with the
            cold-start user: the served fallbacks apply. Otherwise every user must be known.

    Example (with a served bundle)::

        encoder = QueryEncoder(bundle.query_inputs(), cold_start_user=True)
        encoder.encode(request_rows(pl.DataFrame({"user_id": [7], "surface": ["home_feed"]})))
    """

    def __init__(self, inputs: Any, cold_start_user: bool = False) -> None:
        unknown = sorted(set(inputs.context) - set(CONTEXT_FEATURES))
        if unknown:
            raise ConvcgError(
                f"Unknown context feature(s) {unknown} in data.context; known: {list(CONTEXT_FEATURES)}."
            )
        self.cold_start_user = cold_start_user
        self.surfaces = list(inputs.surfaces)
        order = np.argsort(np.array(self.surfaces, dtype=object), kind="stable")
        self._sorted_surfaces = np.array(self.surfaces, dtype=object)[order]
        self._surface_codes = (order + 1).astype(np.int64)  # code of surface i is i + 1
        self.user_ids, self.user_features = inputs.users.user_ids, inputs.users.features
        self.item_ids = inputs.items.item_ids
        self.context = tuple(name for name in CONTEXT_FEATURES if name in inputs.context)
        self.query_hash_buckets = int(inputs.query_hash_buckets)
        self.subject_vectors = (
            {name: inputs.items.features[name] for name in inputs.items.spec.vectors}
            if "subject_item_id" in self.context
            else {}
        )
        self.history_max_len = int(inputs.history_max_len)
        self.events: UserEvents | None = None
        if self.history_max_len > 0:
            assert inputs.events is not None, "history needs the engagement events"
            self.events = UserEvents(inputs.events)

    def surface_codes(self, surface: pl.Series) -> np.ndarray:
        """(B,) int64 code of each row's surface; an unknown surface is a RequestError."""
        at = positions_or_missing(self._sorted_surfaces, surface.to_numpy())
        if (at < 0).any():
            unknown = sorted(set(surface.filter(pl.Series(at < 0)).to_list()))
            raise RequestError(f"Unknown surface(s) {unknown}; the model serves {self.surfaces}.")
        return self._surface_codes[at]

    def user_positions(self, user_ids: np.ndarray) -> np.ndarray:
        """(B,) position of each row's user in the user table (see ``cold_start_user``)."""
        user_pos = positions_or_missing(self.user_ids, user_ids)
        unknown = user_pos < 0
        if unknown.any():
            if not self.cold_start_user:
                raise ConvcgError(
                    f"{int(unknown.sum()):,} of {len(user_pos):,} rows have a user_id missing from the "
                    f"users table (e.g. {int(user_ids[unknown][0])}); every user must be in it."
                )
            user_pos[unknown] = 0  # the cold-start user
        return user_pos

    def encode(self, rows: pl.DataFrame) -> dict[str, np.ndarray]:
        """``{feature: (B,) or (B, L) array}`` of the rows: the user's attributes, the context named
        in ``data.context``, the subject item's content vectors, the history."""
        surface = self.surface_codes(rows["surface"])
        user_pos = self.user_positions(rows["user_id"].to_numpy())
        feats = {name: values[user_pos] for name, values in self.user_features.items()}
        subject_ids, no_subject = ints_and_nulls(rows["subject_item_id"])
        subject_pos = positions_or_missing(self.item_ids, subject_ids)
        no_subject |= subject_pos < 0  # an unknown subject item counts as none
        subject_pos[no_subject] = 0
        query_ids, no_query = ints_and_nulls(rows["query_id"])
        context = {
            "surface": surface,
            "subject_item_id": np.where(no_subject, 0, subject_pos + 1).astype(np.int64),
            "query_bucket": np.where(no_query, 0, query_ids % self.query_hash_buckets + 1).astype(np.int64),
        }
        feats.update((name, context[name]) for name in self.context)
        for name, vectors in self.subject_vectors.items():  # zeros when there is no subject
            subject = vectors[subject_pos]  # (B, length)
            feats[f"subject_{name}"] = np.where(no_subject[:, None], 0.0, subject).astype(np.float32)
        if self.events is not None:
            timestamps, no_time = ints_and_nulls(rows["timestamp"])
            users = self.user_ids[user_pos]
            feats["history"], feats["history_actions"] = history_before(
                self.events.of(users),
                users,
                np.where(no_time, LATEST, timestamps),
                self.item_ids,
                self.history_max_len,
            )
        return feats
