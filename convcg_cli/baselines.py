"""Non-trained baselines scored by the same harness as the two-tower model (``convcg eval``).

One class per baseline, chosen by name in ``conf/eval.yaml`` (``baselines: [popularity, itemcf]``):

* ``MostPopular``: one list for everyone, by training-window conversions (then clicks, impressions).
* ``ItemCF``: item-to-item cosine similarity of training-window engagements (scipy.sparse);
  score(u, j) = sum over u's engaged items i of sim(i, j), kept sparse: each user's top k is chosen
  among the items it scores above 0 (:func:`sparse_topk_rows`'s lists, by a compiled kernel:
  :mod:`convcg_cli.itemcf_kernels`), never over a dense users x items block. Scales to large sparse
  corpora. A tuning grid of its options is fitted from one cosine product (:meth:`ItemCF.fit_each`,
  :class:`ItemCFSimilarity`).
* ``EASE``: Steck's closed-form linear autoencoder, B = I - P diag(1/diag P), P = (X^T X + l2 I)^-1;
  score(u, .) = X_u B. Dense N x N inverse: for corpora up to ~10k items.
* ``EASEPopularity``: EASE's per-user scores (scaled to max 1) plus ``w`` times the log popularity
  (scaled to max 1), ``w`` chosen on the validation split's conversions from a grid.

When the run reads the ``user_history`` table (``data.use_user_history``), every baseline sees it too:
its events before the training cut-off join the engagement profiles (ItemCF, EASE), and
``popularity`` can count its conversions too (``use_history``), so a model that uses the history is
measured against baselines that use it as well.

All of them ``fit(history)`` on the users' *training-window* engagements only (:func:`training_history`
re-reads and re-splits the logs, so val/held-out days can never leak into a profile), and
``score_topk(user_pos, k)`` returns ranked item positions, best first. Ties (e.g. a user with no
history, whose scores are all 0) are broken by popularity, so a cold user gets the popularity list.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import polars as pl
import scipy.sparse as sp

from convcg_cli.baseline_scores import ItemCFSimilarity, query_rows, recent_popularity, topk_rows
from convcg_cli.errors import ConfigError
from convcg_cli.index import popularity_topk
from convcg_cli.metrics.prior import log_prior

# Users scored at a time: bounds the dense (users x items) score block to about 4M cells.
_SCORE_CHUNK_CELLS = 1 << 22

# EASE weights by (l2, profiles), kept inside a ``shared_ease_weights()`` block only (None outside).
_SHARED_EASE: dict[tuple, np.ndarray] | None = None


@contextlib.contextmanager
def shared_ease_weights() -> Iterator[None]:
    """Inside the block, EASE baselines fitted on the same profiles with the same ``l2`` (``ease`` and
    ``ease_popularity`` of one evaluation) share one Gram-matrix inverse instead of computing it each:
    the same array, so the same figures, at half the cost. The weights are dropped when the
    outermost block ends (a dense N x N matrix is not kept for the rest of the process)."""
    global _SHARED_EASE
    outer = _SHARED_EASE
    _SHARED_EASE = {} if outer is None else outer
    try:
        yield
    finally:
        _SHARED_EASE = outer


def _profiles_key(x: sp.csr_matrix, l2: float) -> tuple:
    """What EASE's weights depend on: ``l2`` and the profile matrix (shape and a digest of its arrays)."""
    digest = hashlib.blake2b(digest_size=16)
    for part in (x.indptr, x.indices, x.data):
        digest.update(np.ascontiguousarray(part).tobytes())
    return (l2, x.shape, digest.hexdigest())


class BaselineRefusedError(ConfigError):
    """A baseline cannot run on this data (e.g. EASE on more than ``max_items`` items): ``convcg eval``
    skips it with a warning; called directly, it is a config error like any other."""


@dataclass(frozen=True)
class TrainHistory:
    """What the baselines may learn from: the training window only.

    Attributes:
        user_pos, item_pos: (E,) row positions (sorted-id order, as in the datamodule) of every
            training-window impression positive for at least one task (click, save or conversion),
            plus the user history's events before the cut-off when the run reads it.
        n_users, n_items: sizes of the user table and the item corpus.
        popularity: (N,) most-popular score per item (training conversions, then clicks, impressions).
        history_popularity: (N,) the same with the user history's conversions added to the counts.
        conversions: (N,) training-window conversions per item (the blend's and the prior's counts).
        repeat_share: share of the last training day's conversions whose (user, item) was engaged
            before that day (NaN if that day has none): how often conversions repeat an engagement.
        validation: (user positions, item positions) of the validation split's conversions, for
            baselines that tune a hyper-parameter (never the held-out split).
        conversion_events: (item positions, UTC days) of the training window's conversions, for
            popularity over the last days only (``MostPopular(window_days=...)``).
    """

    user_pos: np.ndarray
    item_pos: np.ndarray
    n_users: int
    n_items: int
    popularity: np.ndarray
    history_popularity: np.ndarray | None = None
    conversions: np.ndarray | None = None
    repeat_share: float = float("nan")
    validation: tuple[np.ndarray, np.ndarray] | None = None
    conversion_events: tuple[np.ndarray, np.ndarray] | None = None

    def matrix(self) -> sp.csr_matrix:
        """Binary (n_users, n_items) engagement matrix; repeated engagements count once."""
        x = sp.csr_matrix(
            (np.ones(len(self.user_pos)), (self.user_pos, self.item_pos)), shape=(self.n_users, self.n_items)
        )
        x.data[:] = 1.0  # duplicates were summed on construction
        return x


# The datamodule options :func:`training_history` and the evaluation queries depend on (besides the
# tasks): the logs, the split and whether the user history is read. Nothing else a run configures
# (features, factors, batching, the model) changes a baseline, so runs differing only in those share
# their baseline scores (``convcg_cli.evaluate``'s cache).
BASELINE_DATA_OPTIONS = (
    "dir",
    "val_days",
    "heldout_days",
    "end_offset_days",
    "split",
    "min_conversions",
    "use_user_history",
    "train_through_val",
)


def training_history(dm) -> TrainHistory:
    """Training-window engagements of a set-up datamodule (re-read from its impressions; with
    ``train_through_val`` the validation days' too, and then no validation split to tune on), plus
    the user history before the cut-off that the datamodule kept (``dm.history_pairs``; empty unless the run
    reads it).

    The logs are cut at the datamodule's own days (``dm.split_days``), so the profile window is
    exactly the window the two-tower model trained on.
    """
    from convcg_cli.data.contract import reload_table
    from convcg_cli.data.features import ACTION_CONVERSION
    from convcg_cli.data.features import encodings as F
    from convcg_cli.tasks import PRIMARY_TASK

    # as the datamodule's set-up read it (not checked again when that read checked the same file)
    split = F.split_frame(reload_table(dm.dir, "impressions"), dm.split_days)
    engaged = F.engaged_rows(dm.training_window(split), dm.tasks)
    user_pos = F.positions(dm.users.user_ids, engaged["user_id"].to_numpy())
    item_pos = F.positions(dm.items.item_ids, engaged["item_id"].to_numpy())
    hist_user, hist_item, hist_action = getattr(dm, "history_pairs", (np.zeros(0, np.int64),) * 3)
    extra_conversions = np.bincount(
        hist_item[hist_action == ACTION_CONVERSION], minlength=len(dm.items.item_ids)
    )
    day = engaged["timestamp"].to_numpy() // F.SECONDS_PER_DAY
    val = F.task_labels(split.val, [PRIMARY_TASK])[PRIMARY_TASK]
    val_rows = split.val.filter(pl.Series(val))
    converted = np.asarray(F.task_labels(engaged, [PRIMARY_TASK])[PRIMARY_TASK], dtype=bool)
    return TrainHistory(
        user_pos=np.concatenate([user_pos, hist_user]),
        item_pos=np.concatenate([item_pos, hist_item]),
        n_users=len(dm.users.user_ids),
        n_items=len(dm.items.item_ids),
        popularity=F.popularity_scores(dm.items),
        history_popularity=F.popularity_scores(dm.items, extra_conversions),
        conversions=dm.items.performance["conversions"].to_numpy(),
        repeat_share=repeat_share(
            np.concatenate([user_pos, hist_user]),
            np.concatenate([item_pos, hist_item]),
            np.concatenate([day, np.full(len(hist_user), -1)]),
            np.concatenate([converted, np.zeros(len(hist_user), dtype=bool)]),
        ),
        conversion_events=(item_pos[converted], day[converted]),
        # A refit (train_through_val) learned from the validation days: nothing is tuned on them.
        validation=None
        if dm.train_through_val
        else (
            F.positions(dm.users.user_ids, val_rows["user_id"].to_numpy()),
            F.positions(dm.items.item_ids, val_rows["item_id"].to_numpy()),
        ),
    )


def repeat_share(user_pos: np.ndarray, item_pos: np.ndarray, day: np.ndarray, converted) -> float:
    """Share of the last day's conversions whose (user, item) pair was engaged on an earlier day.

    Example:
        >>> repeat_share(np.array([0, 0, 1]), np.array([5, 5, 6]), np.array([0, 1, 1]), [False, True, True])
        0.5
    """
    converted = np.asarray(converted, dtype=bool)
    if len(day) == 0 or not converted.any():
        return float("nan")
    last = day.max()
    target = converted & (day == last)
    if not target.any():
        return float("nan")
    n_items = int(item_pos.max()) + 1
    pairs = user_pos[target] * n_items + item_pos[target]  # the last day's conversions: few
    known = np.unique(pairs)
    before = day < last
    earlier = user_pos[before] * n_items + item_pos[before]  # each looked up among the few: no sort
    at = np.minimum(np.searchsorted(known, earlier), len(known) - 1)
    seen = np.zeros(len(known), dtype=bool)
    seen[at[known[at] == earlier]] = True
    return float(seen[np.searchsorted(known, pairs)].mean())


class Baseline:
    """Common interface: ``fit(history)`` then ``score_topk(user_pos, k)`` / ``query_topk``."""

    name = "baseline"

    def fit(self, history: TrainHistory) -> Baseline:  # pragma: no cover - interface
        """Learn from the training window; returns self."""
        raise NotImplementedError

    def score_topk(self, user_pos: np.ndarray, k: int) -> np.ndarray:  # pragma: no cover - interface
        """(n,) user positions -> (n, min(k, N)) ranked item positions, best first."""
        raise NotImplementedError

    def check_corpus(self, n_items: int) -> None:
        """Raise :class:`BaselineRefusedError` when this baseline cannot run on ``n_items`` items,
        before anything is read for it. Here: every corpus is accepted."""

    @classmethod
    def fit_each(cls, options: Sequence[Mapping[str, Any]], history: TrainHistory) -> Iterator[Baseline]:
        """A baseline of this class for each of ``options`` (e.g. a tuning grid's combinations), each
        fitted on ``history`` exactly as ``make_baseline(cls.name, o).fit(history)`` fits it. Yielded
        one at a time, in order, and not kept, so a caller keeping only the best holds one or two
        fitted baselines at a time. Here each is fitted on its own; a class whose options share the
        expensive part of a fit (:class:`ItemCF`) overrides it to compute that part once."""
        for o in options:
            yield make_baseline(cls.name, o).fit(history)

    def query_topk(self, user_pos: np.ndarray, k: int) -> np.ndarray:
        """Ranked lists of evaluation queries given each query's user: each distinct user scored once."""
        users, inverse = np.unique(np.asarray(user_pos, dtype=np.int64), return_inverse=True)
        return query_rows(self.score_topk(users, k), inverse)


class MostPopular(Baseline):
    """The same list for every query: items by training-window conversions, then clicks, impressions.

    Args:
        use_history: also count the user history's conversions before the cut-off (when the run
            reads it). Off by default: on KuaiRand the pre-log likes lowered validation recall.
        window_days: rank by the conversions of the training window's last ``window_days`` days
            only, ties broken by the whole window's popularity; None or 0: the whole window.

    Example:
        >>> hist = TrainHistory(np.array([0, 1, 1]), np.array([0, 0, 1]), 2, 2, np.array([2.0, 1.0]),
        ...                     conversion_events=(np.array([0, 0, 1]), np.array([3, 3, 9])))
        >>> MostPopular().fit(hist).score_topk(np.array([0]), k=2).tolist()
        [[0, 1]]
        >>> MostPopular(window_days=2).fit(hist).score_topk(np.array([0]), k=2).tolist()
        [[1, 0]]
    """

    name = "popularity"

    def __init__(self, use_history: bool = False, window_days: int | None = None) -> None:
        self.use_history = bool(use_history)
        if window_days is not None and (int(window_days) != window_days or window_days < 0):
            raise ConfigError(
                f"popularity: window_days must be null or a whole number >= 0, got {window_days!r}."
            )
        self.window_days = int(window_days or 0)

    def fit(self, history: TrainHistory) -> MostPopular:
        """Keep the popularity scores of the training window (or of its last ``window_days``)."""
        use = self.use_history and history.history_popularity is not None
        whole = np.asarray(history.history_popularity if use else history.popularity)
        if self.window_days:
            whole = recent_popularity(history.conversion_events, self.window_days, whole)
        self.popularity = whole
        return self

    def score_topk(self, user_pos: np.ndarray, k: int) -> np.ndarray:
        """The popularity list for every user, as a read-only broadcast view (no copy)."""
        ranked = popularity_topk(self.popularity, k)
        return np.broadcast_to(ranked[None, :], (len(user_pos), len(ranked)))

    def query_topk(self, user_pos: np.ndarray, k: int) -> np.ndarray:
        """Non-personalised: a broadcast view, not one copied row per query."""
        return self.score_topk(user_pos, k)


class _ItemToItem(Baseline):
    """Personalised scores X_u W from an item-item weight matrix W, popularity as tie-breaker."""

    def _weights(self, x: sp.csr_matrix) -> Any:
        """The (N, N) item-item matrix (dense ndarray or scipy.sparse)."""
        raise NotImplementedError  # pragma: no cover - interface

    def fit(self, history: TrainHistory) -> _ItemToItem:
        """Build the user profiles and the item-item weights from the training window."""
        profiles = history.matrix()  # (U, N) binary
        return self._fitted(history, profiles, self._weights(profiles))

    def _fitted(self, history: TrainHistory, profiles: sp.csr_matrix, weights: Any) -> _ItemToItem:
        """Keep ``profiles`` and ``weights`` (fitted on ``history``) and the popularity tie order."""
        self.profiles, self.weights = profiles, weights
        # Ranking in popularity order, then mapping back, breaks score ties by popularity.
        self.by_popularity = popularity_topk(history.popularity, history.n_items)  # (N,)
        return self

    def score_topk(self, user_pos: np.ndarray, k: int) -> np.ndarray:
        """Top k of X_u W per user, computed in chunks of users to bound memory."""
        user_pos = np.asarray(user_pos, dtype=np.int64)
        n_items = self.profiles.shape[1]
        out = np.empty((len(user_pos), min(k, n_items)), dtype=np.int64)
        chunk = max(1, _SCORE_CHUNK_CELLS // n_items)
        for start in range(0, len(user_pos), chunk):
            rows = user_pos[start : start + chunk]
            ranked = topk_rows(self._scores(rows)[:, self.by_popularity], k)  # ids in popularity order
            out[start : start + len(rows)] = self.by_popularity[ranked]
        return out

    def _scores(self, rows: np.ndarray) -> np.ndarray:
        """Dense (C, N) scores X_u W of a chunk of users."""
        scores = self.profiles[rows] @ self.weights  # (C, N), sparse or dense
        return scores.toarray() if sp.issparse(scores) else np.asarray(scores)


class ItemCF(_ItemToItem):
    """Item-based collaborative filtering with cosine similarity of engagement columns.

    sim(i, j) = |users engaging i and j| / sqrt(|users engaging i| * |users engaging j|).

    Args:
        include_self: keep sim(i, i) = 1, so the items a user already engaged with score high. True
            suits logs where conversions often repeat an engagement (about half of them in the
            synthetic logs); False suits logs where they almost never do (KuaiRand: 0 of fold 0's 697
            held-out likes repeat an engagement of the log, 7 an event of the history before it).
            ``"auto"`` decides from the training window alone: True when at least
            ``AUTO_REPEAT_SHARE`` of the last training day's conversions repeat an earlier engagement.
        neighbours: keep, for each scored item j, only its ``neighbours`` most similar items i
            (ties by item position); None or 0: every co-engaged item.
        shrinkage: multiply sim(i, j) by n_ij / (n_ij + shrinkage), n_ij the users engaging both,
            so a similarity that rests on few users counts less (Koren's shrunk similarity); 0: off.

    Example:
        >>> hist = TrainHistory(np.array([0, 0, 1]), np.array([0, 1, 1]), 2, 3, np.zeros(3))
        >>> ItemCF().fit(hist).score_topk(np.array([1]), k=3).tolist()
        [[1, 0, 2]]
    """

    name = "itemcf"

    AUTO_REPEAT_SHARE = 0.05

    def __init__(
        self, include_self: bool | str = True, neighbours: int | None = None, shrinkage: float = 0.0
    ) -> None:
        if include_self not in (True, False, "auto"):
            raise ConfigError(f"itemcf: include_self must be true, false or auto, got {include_self!r}.")
        if neighbours is not None and (int(neighbours) != neighbours or neighbours < 0):
            raise ConfigError(f"itemcf: neighbours must be null or a whole number >= 0, got {neighbours!r}.")
        if shrinkage is None or float(shrinkage) < 0:
            raise ConfigError(f"itemcf: shrinkage must be >= 0, got {shrinkage!r}.")
        self.include_self = include_self
        self.neighbours, self.shrinkage = int(neighbours or 0), float(shrinkage)
        self._built: sp.csr_matrix | None = None  # W once fitted (or built), see ``weights``
        self._unbuilt: Callable[[], sp.csr_matrix] | None = None
        self.scoring: tuple[sp.csr_matrix, bool] | None = None  # (matrix, skip its diagonal)
        self._similarity: ItemCFSimilarity | None = None  # without neighbours: may score two at once

    def fit(self, history: TrainHistory) -> ItemCF:
        """Decide ``include_self`` (when ``auto``) from the training window, then fit."""
        self._decide_include_self(history)
        profiles = history.matrix()  # (U, N) binary
        return self._fitted_from(history, profiles, ItemCFSimilarity(profiles, self.neighbours))

    @classmethod
    def fit_each(cls, options: Sequence[Mapping[str, Any]], history: TrainHistory) -> Iterator[Baseline]:
        """An ItemCF for each of ``options``, fitted on ``history`` with the same weights as its own
        ``fit`` (:meth:`Baseline.fit_each`), but the profiles and the cosine product computed once for
        all of them and each one's weights derived from it (:class:`ItemCFSimilarity`)."""
        pending = deque(cast(ItemCF, make_baseline(cls.name, o)) for o in options)  # every option checked
        for candidate in pending:
            candidate._decide_include_self(history)
        profiles = history.matrix()  # (U, N) binary
        similarity = ItemCFSimilarity(profiles, max((c.neighbours for c in pending), default=0))
        # without neighbours, a shrinkage tried with and without the diagonal is scored for both at once
        similarity.expect((bool(c.include_self), c.neighbours, c.shrinkage) for c in pending)
        while pending:
            candidate = pending.popleft()  # once fitted, held by the caller only
            yield candidate._fitted_from(history, profiles, similarity)

    def _fitted_from(
        self, history: TrainHistory, profiles: sp.csr_matrix, similarity: ItemCFSimilarity
    ) -> ItemCF:
        """Fitted on ``history`` from ``similarity`` (the cosine of ``profiles``): scored with
        :meth:`ItemCFSimilarity.scoring`'s matrix, :attr:`weights` built when first read."""
        options = (bool(self.include_self), self.neighbours, self.shrinkage)
        matrix, skip_diagonal = similarity.scoring(*options)
        self._fitted(history, profiles, matrix)
        if skip_diagonal:  # W is the matrix without its diagonal: skipped while scoring, built if read
            self.scoring = (matrix, True)
            self._built, self._unbuilt = None, functools.partial(similarity.weights, *options)
        self._similarity = None if self.neighbours else similarity
        return self

    @property
    def weights(self) -> sp.csr_matrix:
        """W, the (N, N) weights of the scores X_u W. With ``include_self`` false and no
        ``neighbours`` it is the similarity without its diagonal, built when first read: scoring
        skips the diagonal instead of copying the similarity's other entries."""
        if self._built is None:
            if self._unbuilt is None:
                raise AttributeError("ItemCF.weights: fit the baseline first.")
            self._built, self._unbuilt = self._unbuilt(), None
        return self._built

    @weights.setter
    def weights(self, weights: sp.csr_matrix) -> None:
        self._built, self._unbuilt, self.scoring = weights, None, (weights, False)
        self._similarity = None

    def _decide_include_self(self, history: TrainHistory) -> None:
        """Resolve ``include_self="auto"`` from the training window's repeat share."""
        if self.include_self == "auto":
            share = history.repeat_share
            self.include_self = bool(np.isnan(share) or share >= self.AUTO_REPEAT_SHARE)

    def score_topk(self, user_pos: np.ndarray, k: int) -> np.ndarray:
        """Top k of X_u W per user, each list chosen among its positive scores, ties by popularity:
        ``sparse_topk_rows(profiles[users] @ weights, ...)`` (:func:`sparse_topk_rows`) in one
        compiled pass per user, never building the sparse product
        (:func:`~convcg_cli.itemcf_kernels.sparse_product_topk`: the same scores bit for bit)."""
        return self._topk(user_pos, k, np.int64)

    def query_topk(self, user_pos: np.ndarray, k: int) -> np.ndarray:
        """:meth:`Baseline.query_topk`, the users' lists written as int32 by the kernel (no copy)."""
        users, inverse = np.unique(np.asarray(user_pos, dtype=np.int64), return_inverse=True)
        dtype = np.int32 if len(self.by_popularity) <= np.iinfo(np.int32).max else np.int64
        return query_rows(self._topk(users, k, dtype), inverse)

    def _topk(self, user_pos: np.ndarray, k: int, dtype: type) -> np.ndarray:
        """:meth:`score_topk`'s lists, as ``dtype`` (int64, or int32 when every item id fits)."""
        from convcg_cli.itemcf_kernels import sparse_product_topk  # numba: imported when first scoring

        rank = np.empty(len(self.by_popularity), dtype=np.int64)
        rank[self.by_popularity] = np.arange(len(self.by_popularity))  # item -> place in popularity order
        matrix, skip_diagonal = cast(tuple[sp.csr_matrix, bool], self.scoring)
        users = np.asarray(user_pos, dtype=np.int64)
        if self._similarity is not None and len(users) and users.min() >= 0:
            # a grid's other diagonal choice scored these lists with it, or is scored with it now
            found = self._similarity.full_topk(
                bool(self.include_self), self.shrinkage, self.profiles, users, rank, k
            )
            if found is not None:
                return found.astype(dtype, copy=False)
        return sparse_product_topk(
            self.profiles, users, matrix, rank, k, skip_diagonal=skip_diagonal, dtype=dtype
        )


class EASE(_ItemToItem):
    """Embarrassingly Shallow Autoencoder (Steck 2019): closed-form item-item weights with diag 0.

    Args:
        l2: ridge penalty lambda added to the diagonal of the Gram matrix X^T X.
        max_items: refuse corpora larger than this (the dense N x N inverse costs O(N^3) time and
            2 N^2 floats of memory); use ``itemcf`` there.

    Example:
        >>> hist = TrainHistory(np.array([0, 0, 1]), np.array([0, 1, 1]), 2, 3, np.zeros(3))
        >>> EASE(l2=1.0).fit(hist).score_topk(np.array([1]), k=3).tolist()
        [[0, 1, 2]]
    """

    name = "ease"

    def __init__(self, l2: float = 500.0, max_items: int = 10_000) -> None:
        if l2 <= 0:
            raise ConfigError(f"ease: l2 must be > 0, got {l2}.")
        self.l2, self.max_items = float(l2), int(max_items)

    def check_corpus(self, n_items: int) -> None:
        """Refuse a corpus of more than ``max_items`` items (the dense inverse would not fit)."""
        if n_items > self.max_items:
            raise BaselineRefusedError(
                f"ease needs a dense {n_items} x {n_items} inverse ({n_items} items > "
                f"baseline_options.ease.max_items={self.max_items}); use the itemcf baseline on this "
                "corpus, or raise max_items."
            )

    def _weights(self, x: sp.csr_matrix) -> np.ndarray:
        key = _profiles_key(x, self.l2) if _SHARED_EASE is not None else None
        if key is not None and key in (_SHARED_EASE or {}):
            return (_SHARED_EASE or {})[key]
        b = self._solve(x)
        if key is not None and _SHARED_EASE is not None:
            b.flags.writeable = False  # shared by every EASE of the block: nobody may change it
            _SHARED_EASE[key] = b
        return b

    def _solve(self, x: sp.csr_matrix) -> np.ndarray:
        """B = I - P diag(1/diag P) with diag 0, P = (X^T X + l2 I)^-1 (a Cholesky solve)."""
        import scipy.linalg

        n = x.shape[1]
        self.check_corpus(n)
        gram = (x.T @ x).toarray()  # (N, N)
        gram[np.diag_indices(n)] += self.l2
        # Cholesky: the regularised Gram matrix is symmetric positive definite.
        p = scipy.linalg.cho_solve(scipy.linalg.cho_factor(gram, check_finite=False), np.eye(n))
        b = -p / np.diag(p)[None, :]  # B_ij = -P_ij / P_jj
        np.fill_diagonal(b, 0.0)
        return b


class EASEPopularity(EASE):
    """EASE blended with popularity: ``ease_u / max|ease_u| + w * log1p(c) / max log1p(c)``, ``c`` the
    training-window conversions per item.

    ``w`` is chosen from ``weights`` by recall@``select_k`` of the validation split's conversions
    (``TrainHistory.validation``), never the held-out split; ``chosen_weight`` records it. Without
    validation data the first weight is used.

    Example:
        >>> hist = TrainHistory(np.array([0, 0, 1]), np.array([0, 1, 1]), 2, 3, np.array([0.0, 0.0, 9.0]),
        ...                     validation=(np.array([1]), np.array([2])))
        >>> b = EASEPopularity(l2=1.0, weights=[0.0, 10.0], select_k=1).fit(hist)
        >>> b.chosen_weight, b.score_topk(np.array([1]), k=1).tolist()
        (10.0, [[2]])
    """

    name = "ease_popularity"

    def __init__(
        self,
        l2: float = 500.0,
        max_items: int = 10_000,
        weights=(0.0, 0.1, 0.3, 1.0, 3.0),
        select_k: int = 100,
    ) -> None:
        super().__init__(l2=l2, max_items=max_items)
        self.weights_grid = [float(w) for w in weights]
        if not self.weights_grid or min(self.weights_grid) < 0:
            raise ConfigError(
                f"ease_popularity: weights must be a non-empty list of values >= 0, got {weights}."
            )
        self.select_k = int(select_k)

    def fit(self, history: TrainHistory) -> EASEPopularity:
        """Fit EASE, then choose the popularity weight on the validation conversions."""
        super().fit(history)
        counts = history.conversions if history.conversions is not None else history.popularity
        self.prior = log_prior(counts)  # the same prior as the model's (convcg eval popularity_prior)
        self.chosen_weight = self.weights_grid[0]
        if history.validation is not None and len(history.validation[0]):
            recall = []
            for w in self.weights_grid:
                self.chosen_weight = w
                recall.append(validation_recall(self, history.validation, self.select_k))
            self.chosen_weight = self.weights_grid[int(np.argmax(recall))]  # first best on ties
        return self

    def _scores(self, rows: np.ndarray) -> np.ndarray:
        """EASE's scores scaled to max |.| 1 per user, plus the weighted popularity prior."""
        scores = super()._scores(rows)
        scale = np.abs(scores).max(axis=1, keepdims=True)
        return scores / np.where(scale > 0, scale, 1.0) + self.chosen_weight * self.prior[None, :]


def validation_recall(baseline: Baseline, validation: tuple[np.ndarray, np.ndarray], k: int) -> float:
    """Share of the validation conversion rows ``(users, items)`` whose item is in its user's top
    ``k`` of ``baseline``: what a baseline's own choices are made on (EASEPopularity's weight,
    ``baseline_tuning``'s options)."""
    users, items = validation
    topk = baseline.query_topk(users, k)
    return float((topk == items[:, None]).any(axis=1).mean())


BASELINES: dict[str, type[Baseline]] = {cls.name: cls for cls in (MostPopular, ItemCF, EASE, EASEPopularity)}


def baseline_class(name: str) -> type[Baseline]:
    """The class of the baseline called ``name``."""
    if name not in BASELINES:
        raise ConfigError(f"Unknown baseline '{name}'; known: {sorted(BASELINES)}.")
    return BASELINES[name]


def make_baseline(name: str, options: Mapping[str, Any] | None = None) -> Baseline:
    """The baseline called ``name`` built with ``options`` (from ``baseline_options.<name>``)."""
    cls = baseline_class(name)
    try:
        return cls(**dict(options or {}))
    except TypeError as exc:
        raise ConfigError(f"baseline_options.{name} was rejected: {exc}") from None
