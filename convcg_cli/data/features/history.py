"""User engagement history: each request's most recent engaged items, strictly before the request.

TransAct-style sequence input for the user tower. The only rule that matters for correctness is
*strictly before*: a request at time ``t`` sees engagements with timestamp ``< t``, never its own
impression nor anything served in the same second or later. That is exactly what a serving system
knows when the request arrives, so history for a held-out request may include earlier engagements
from held-out days too.

Vectorised: events are sorted once by (user, time); each request finds the end of its user's past
with one ``np.searchsorted`` on a combined (user, time) key, and the last ``max_len`` events are
gathered with a (R, L) index matrix. No per-request Python.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from convcg_cli.tasks import engaged

# Action codes; 0 is padding. Stronger actions have larger codes and an engagement takes its strongest.
ACTION_PADDING = 0
ACTION_CLICK = 1
ACTION_SAVE = 2
ACTION_CONVERSION = 3
NUM_ACTIONS = 4  # vocabulary size of the action codes, padding included

# Requests per gather chunk: keeps the (chunk, L) index matrix small (a few MB).
_CHUNK = 1 << 16


def engagement_events(impressions: pl.DataFrame) -> pl.DataFrame:
    """Engaged impressions (positive for any task, ``tasks.engaged``) as events ``user_id, timestamp,
    item_id, action``.

    ``action`` is the strongest thing the user did: 3 conversion > 2 save > 1 click. Rows come sorted
    by (user_id, timestamp, item_id, action) so the result does not depend on the input order.

    Example:
        >>> imp = pl.DataFrame({"user_id": [7, 7], "timestamp": [5, 9], "item_id": [1, 2],
        ...                     "clicked": [True, False], "saved": [True, False],
        ...                     "converted": [False, False]})
        >>> engagement_events(imp).rows()
        [(7, 5, 1, 2)]
    """
    action = (
        pl.when(pl.col("converted"))
        .then(ACTION_CONVERSION)
        .when(pl.col("saved"))
        .then(ACTION_SAVE)
        .otherwise(ACTION_CLICK)
        .cast(pl.Int64)
        .alias("action")
    )
    return (
        impressions.filter(engaged())
        .select(
            pl.col("user_id").cast(pl.Int64),
            pl.col("timestamp").cast(pl.Int64),
            pl.col("item_id").cast(pl.Int64),
            action,
        )
        .sort("user_id", "timestamp", "item_id", "action")
    )


def history_before(
    events: pl.DataFrame,
    requests_user: np.ndarray,
    requests_ts: np.ndarray,
    item_ids: np.ndarray,
    max_len: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Each request's last ``max_len`` engaged items with event timestamp strictly before the request.

    One function on purpose (longer than usual): its steps (sort, CSR layout, one combined key, one
    search, a chunked gather) share half a dozen aligned arrays; split up, each part would pass them all.

    Args:
        events: ``engagement_events`` output (any row order; user_id, timestamp, item_id, action).
        requests_user: (R,) user id of each request.
        requests_ts: (R,) unix-seconds timestamp of each request.
        item_ids: the sorted corpus item ids (``ItemTable.item_ids``); events of items not in it are
            dropped (the data contract rules them out, but they must not crash or take a slot).
        max_len: L, the number of most recent events kept.

    Returns:
        ``(items, actions)``, both (R, L) int64. ``items`` holds corpus position + 1 (the item tower's
        ``item_id`` code; 0 = padding), ``actions`` the action codes (0 = padding). Most recent first:
        column 0 is the latest engagement before the request; rows are right-padded with 0. A
        repeated engagement with one item appears once per event. Among events in the same second the
        larger item id counts as more recent, so the result does not depend on the row order.

    Example:
        >>> ev = pl.DataFrame({"user_id": [1, 1, 1], "timestamp": [10, 20, 30], "item_id": [5, 6, 7],
        ...                    "action": [1, 3, 2]})
        >>> items, actions = history_before(ev, np.array([1, 2]), np.array([30, 99]), np.array([5, 6, 7]), 3)
        >>> items.tolist(), actions.tolist()
        ([[2, 1, 0], [0, 0, 0]], [[3, 1, 0], [0, 0, 0]])
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}.")
    requests_user = np.asarray(requests_user, dtype=np.int64)
    requests_ts = np.asarray(requests_ts, dtype=np.int64)
    if requests_user.shape != requests_ts.shape or requests_user.ndim != 1:
        raise ValueError(
            f"requests_user and requests_ts must be 1-d of one length, got {requests_user.shape} "
            f"and {requests_ts.shape}."
        )
    n_req = len(requests_user)
    out_items = np.zeros((n_req, max_len), dtype=np.int64)
    out_actions = np.zeros((n_req, max_len), dtype=np.int64)

    # Corpus position of each event's item (-1: not in the corpus, dropped), then (user, time) order;
    # ties within one second by item, then action, so the result does not depend on input order.
    item_ids = np.asarray(item_ids, dtype=np.int64)
    known = (
        events.select(
            pl.col("user_id").cast(pl.Int64),
            pl.col("timestamp").cast(pl.Int64),
            pl.col("item_id")
            .cast(pl.Int64)
            .replace_strict(item_ids, np.arange(len(item_ids)), default=-1, return_dtype=pl.Int64)
            .alias("pos"),
            pl.col("action").cast(pl.Int64),
        )
        .filter(pl.col("pos") >= 0)
        .sort("user_id", "timestamp", "pos", "action")
    )
    if known.height == 0 or n_req == 0:
        return out_items, out_actions
    user, ts, pos, action = (known[c].to_numpy() for c in ("user_id", "timestamp", "pos", "action"))

    # CSR layout: users[u] owns events start[u] .. start[u + 1] - 1.
    new_user = np.concatenate([[True], user[1:] != user[:-1]])
    start = np.flatnonzero(new_user)
    users = user[start]
    user_rank = np.cumsum(new_user) - 1
    # One sorted key over (user, time) so a single searchsorted finds each request's end of past.
    event_time, request_time, stride = _time_codes(ts, requests_ts, len(users))
    event_key = user_rank * stride + event_time

    req_rank = np.searchsorted(users, requests_user)
    has_events = req_rank < len(users)
    has_events[has_events] = users[req_rank[has_events]] == requests_user[has_events]
    req_rank = np.where(has_events, req_rank, 0)
    # side="left": the first event of the user at or after the request time, so the past is < t.
    req_key = req_rank * stride + request_time
    # Searching in sorted order is ~5x faster (cache-friendly) than in request order.
    order = np.argsort(req_key)
    end = np.empty(n_req, dtype=np.int64)
    end[order] = np.searchsorted(event_key, req_key[order], side="left")
    count = np.where(has_events, np.minimum(end - start[req_rank], max_len), 0)

    # Padded copies: slot 0 holds the padding code, event i sits at i + 1.
    item_code = np.concatenate([[0], pos + 1])
    action_code = np.concatenate([[0], action])
    offsets = np.arange(max_len, dtype=np.int64)
    for lo in range(0, n_req, _CHUNK):
        hi = min(lo + _CHUNK, n_req)
        idx = end[lo:hi, None] - offsets  # (chunk, L): padded index of the j-th most recent event
        idx *= offsets < count[lo:hi, None]  # slots past the user's past read the padding slot 0
        # mode="clip" skips numpy's buffered bounds check (indices are in range by construction).
        np.take(item_code, idx, out=out_items[lo:hi], mode="clip")
        np.take(action_code, idx, out=out_actions[lo:hi], mode="clip")
    return out_items, out_actions


def _time_codes(
    event_ts: np.ndarray, request_ts: np.ndarray, n_users: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """Int codes of event and request times with ``event_code < request_code`` iff ``event_ts <
    request_ts``, all in ``[0, stride)``, and ``stride`` small enough that ``n_users * stride`` fits int64.

    Seconds since the first event (request times clipped to [first, last + 1], which keeps every
    comparison) fit for any realistic log; a log spanning too long a time for its number of users
    falls back to dense ranks of the event times.
    """
    lo, hi = int(event_ts.min()), int(event_ts.max())
    stride = hi - lo + 2
    if n_users * stride < 2**62:
        return event_ts - lo, np.clip(request_ts, lo, hi + 1) - lo, stride
    times = np.unique(event_ts)
    # A request's code = number of distinct event times before it.
    return np.searchsorted(times, event_ts), np.searchsorted(times, request_ts, side="left"), len(times) + 1
