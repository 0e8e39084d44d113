"""What both LightningDataModules share: ``DataModuleBase`` and the options that key its caches.

``DataModuleBase`` holds the options, the time split, the corpus, the query-tower inputs and the
evaluation queries, built once; the two data paths (``datamodules.InMemoryDataModule`` and
``datamodules.StreamedDataModule``) differ only in how the training examples are made.
``content_options`` is what the shard cache and the prepared-data cache are keyed by. Batches come
from ``convcg_cli.data.loading.batches``.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import polars as pl
import torch
from torch.utils.data import DataLoader

from convcg_cli import progress
from convcg_cli.data.contract import load_schemas
from convcg_cli.data.features import (
    ACTION_CODES,
    LabelPositives,
    before_cutoff,
    engagement_events,
    history_positions,
)
from convcg_cli.data.features import encodings as F
from convcg_cli.data.features.cofactors import engagement_matrix, fit_cofactors
from convcg_cli.data.features.table_columns import choose_features
from convcg_cli.data.importing import IgnoreMaturity
from convcg_cli.data.loading.batches import (
    ItemIdDropout,
    RandomNegatives,
    SequentialBatches,
    ShardedBatches,
    ShuffledBatches,
    reordered,
)
from convcg_cli.errors import ConfigError
from convcg_cli.specs import FeatureSpec
from convcg_cli.tasks import TASK_LABELS, engaged

# Constructor options that cannot change what the data holds (training examples, features, splits,
# queries): how batches are cut, ordered and item-id dropped out, and where the shard cache lives.
# Every other option, including any added later, is part of the shard cache key (``content_options``).
# Dotted names reach into a mapping option (``stream.cache_dir``).
NON_CONTENT_OPTIONS = frozenset(
    {"batch_size", "eval_batch_size", "seed", "stream.cache_dir", "item_id_dropout", "random_negatives"}
)

# Columns the user history reads from the impressions (``history.engagement_events``).
_HISTORY_COLUMNS = ["user_id", "timestamp", "item_id", "clicked", "saved", "converted"]


def _plain(value: Any) -> Any:
    """A JSON-ready, repr-free form of an option: mappings, sequences, paths and option objects (e.g.
    ``DualPositives``: their class and attributes) become dicts, lists and strings."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    kind = type(value)
    return {"class": f"{kind.__module__}.{kind.__qualname__}", **_plain(vars(value))}


def content_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` (a datamodule's ``constructor_options``) without ``NON_CONTENT_OPTIONS``, as plain data.

    Example:
        >>> content_options({"batch_size": 64, "val_days": 2, "stream": {"chunk_rows": 9, "cache_dir": "x"}})
        {'val_days': 2, 'stream': {'chunk_rows': 9}}
    """
    out = _plain(options)
    for name in NON_CONTENT_OPTIONS:
        *parents, leaf = name.split(".")
        node = out
        for parent in parents:
            node = node.get(parent) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return out


def to_torch(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors sharing the arrays' memory."""
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}


class DataModuleBase(L.LightningDataModule):
    """Loads ``dir`` (validated against data_schemas/), splits by time and serves tensors.

    Subclasses make the training examples (``setup``); everything else is built here.

    Args:
        dir: directory with items/users/impressions parquet files.
        val_days, heldout_days: whole days at the end of the log for validation and held-out eval.
        split: how the days are chosen (``convcg_cli.data.features.time_split``): ``days`` (exactly
            ``val_days`` / ``heldout_days``) or ``auto`` (those, each window grown by whole days until
            it holds ``min_conversions[split]`` converted impressions; conf/data's default). ``days``
            here, so a run saved before the option existed is rebuilt on the days it trained on.
        min_conversions: {"heldout": n, "val": m}: the ``auto`` split's minimums (default 300, 200).
        batch_size: training batch size (the in-batch negatives of each example).
        query_hash_buckets: number of hash buckets for search query ids.
        seed: batch-order seed.
        tasks: task names (from ``loss.task_weights``).
        eval_batch_size: queries per batch when embedding evaluation queries.
        features: {"item"|"user": {"categorical"|"numeric"|"vector": [...] or "auto"}}: the table
            columns used as features besides the ids (item_id, advertiser_id, user_id are always
            used); an ``auto`` list is derived from the tables at set-up
            (``convcg_cli.data.features.table_columns``). None: no table feature.
        positives: which rows are positives of each task, with what weight (LabelPositives,
            DualPositives).
        hard_negatives: served-but-not-engaged impressions of the same user added to each example's
            negatives (0 = in-batch negatives only).
        random_negatives: items drawn uniformly from the whole corpus per training batch, added to
            every task's in-batch negatives under the mixture's logQ (``batches.RandomNegatives``);
            0 = off.
        context: request-context features of the query tower (surface, subject_item_id, query_bucket).
        history: {"max_len": L}: the user's last L engaged items strictly before each request as a
            sequence feature (0 = off). Events come from every kept day, each request seeing only its past.
        end_offset_days: the last N logged days are dropped before the split (rolling-origin
            evaluation): train | val | heldout are counted back from ``last - N`` and nothing (features,
            item performance, history) reads the dropped days.
        use_user_history: read the optional ``user_history`` table (events outside the log, typically
            before it) up to the training cut-off (the first validation day); the co-engagement
            factors, the history sequence, the history examples and the baselines then see it.
        cofactors: {"dim": d, "item_exponent": a, "leave_target_out": b}: d > 0 adds a d-dimensional
            truncated SVD of the (user x item) engagement matrix (training window + user history;
            item columns divided by their count^a) as numeric item and user features
            (``convcg_cli.data.features.cofactors``). 0 = off. b: each training example's user profile leaves
            out the example's own item (as a held-out positive is never in it).
        history_examples: {"max_per_user": N, "surface": S}: N > 0 adds each user's last N
            ``user_history`` events before the cut-off as training examples (engaged rows on surface
            S; conversions are conversion positives). Needs ``use_user_history``; in memory only.
        label_maturity: what the conversion task does with conversions not yet arrived at the
            training cut-off (``convcg_cli.data.importing.maturity``; default ``IgnoreMaturity``); in
            memory only.
        train_through_val: the refit of a chosen configuration: the validation days join the
            training window (examples, item performance, co-engagement factors, user history and
            the baselines all read up to the first held-out day). Validation is then off: the
            epochs, the prior's weight and every other choice come from a run trained without them.
        item_id_dropout: cold-start training: the share of training examples whose item is encoded as
            never shown (``batches.ItemIdDropout``), so the towers learn to score an item from its
            content. 0 = off; evaluation is never affected.

    ``constructor_options`` holds every constructor argument by name, defaults included (see
    ``__new__``); the shard cache key is derived from it.
    """

    # What both data paths expose once set up (evaluation, baselines, training and bench read these).
    constructor_options: dict[str, Any]
    split_days: dict[str, tuple[int, int]]  # train | val | heldout -> (first day, last day)
    item_columns: F.FeatureColumns  # the table columns the towers read (``features`` resolved)
    user_columns: F.FeatureColumns
    n_rows: dict[str, int]  # impressions per split
    items: F.ItemTable
    users: F.UserTable
    item_spec: FeatureSpec
    user_spec: FeatureSpec
    item_features: dict[str, torch.Tensor]
    inputs: F.QueryInputs
    queries: dict[str, F.QuerySet]  # val | heldout

    def __new__(cls, *args: Any, **kwargs: Any) -> DataModuleBase:
        """Record every constructor argument in ``constructor_options``, so that anything derived
        from the options (the shard cache key) sees an option added to any subclass without a hand
        list: defaults of each ``__init__`` in the class hierarchy, then the arguments given."""
        self = super().__new__(cls)
        options: dict[str, Any] = {}
        for klass in reversed(cls.__mro__):
            if issubclass(klass, DataModuleBase) and "__init__" in vars(klass):
                for p in inspect.signature(klass.__init__).parameters.values():
                    if p.default is not p.empty:
                        options[p.name] = p.default
        signature = inspect.signature(cls.__init__)
        for name, value in signature.bind_partial(self, *args, **kwargs).arguments.items():
            if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                options.update(value)
            elif name != "self":
                options[name] = value
        self.constructor_options = options
        return self

    def __init__(
        self,
        dir: str,
        val_days: int = 2,
        heldout_days: int = 2,
        batch_size: int = 1024,
        query_hash_buckets: int = 1024,
        seed: int = 0,
        tasks: Sequence[str] = tuple(TASK_LABELS),
        eval_batch_size: int = 8192,
        features: Mapping[str, Mapping[str, Sequence[str]]] | None = None,
        positives: LabelPositives | None = None,
        hard_negatives: int = 0,
        context: Sequence[str] = F.CONTEXT_FEATURES,
        history: Mapping[str, int] | None = None,
        end_offset_days: int = 0,
        use_user_history: bool = False,
        cofactors: Mapping[str, int] | None = None,
        history_examples: Mapping[str, Any] | None = None,
        label_maturity: IgnoreMaturity | None = None,
        train_through_val: bool = False,
        item_id_dropout: float = 0.0,
        random_negatives: int = 0,
        split: str = "days",
        min_conversions: Mapping[str, int] | None = None,
    ) -> None:
        super().__init__()
        self.train_through_val = bool(train_through_val)
        self.item_id_dropout = float(item_id_dropout)
        if not 0.0 <= self.item_id_dropout < 1.0:
            raise ConfigError(f"data.item_id_dropout must be in [0, 1), got {item_id_dropout}.")
        if int(random_negatives) != random_negatives or random_negatives < 0:
            raise ConfigError(f"data.random_negatives must be a whole number >= 0, got {random_negatives}.")
        self.random_negatives = int(random_negatives)
        self.label_maturity = label_maturity or IgnoreMaturity()
        self.use_user_history = bool(use_user_history)
        self.cofactor_dim = int((cofactors or {}).get("dim", 0))
        self.cofactor_item_exponent = float((cofactors or {}).get("item_exponent", 0.5))
        self.cofactor_leave_target_out = bool((cofactors or {}).get("leave_target_out", False))
        self.profile_shares: dict[str, torch.Tensor] | None = None
        if self.cofactor_dim < 0:
            raise ConfigError(f"data.cofactors.dim must be >= 0 (0 = off), got {self.cofactor_dim}.")
        examples = dict(history_examples or {})
        self.history_examples_per_user = int(examples.get("max_per_user", 0))
        self.history_examples_surface = str(examples.get("surface", "home_feed"))
        if self.history_examples_per_user < 0:
            raise ConfigError(
                "data.history_examples.max_per_user must be >= 0 (0 = off), got "
                f"{self.history_examples_per_user}."
            )
        if self.history_examples_per_user > 0 and not self.use_user_history:
            raise ConfigError("data.history_examples.max_per_user > 0 needs data.use_user_history=true.")
        self.dir = Path(dir)
        self.val_days, self.heldout_days = val_days, heldout_days
        self.end_offset_days = F.check_end_offset_days(end_offset_days)
        # The one rule that chooses the days; set-up applies it once (``split_days``).
        self.split_rule = F.split_rule(split, val_days, heldout_days, end_offset_days, min_conversions)
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.query_hash_buckets, self.seed = query_hash_buckets, seed
        self.tasks = list(tasks)
        self.positives = positives or LabelPositives()
        self.hard_negatives = hard_negatives
        self.context = tuple(context)
        self.history_max_len = int((history or {}).get("max_len", 0))
        self.features = features  # resolved against the tables at set-up: item_columns, user_columns
        self.train_set: ShuffledBatches | ShardedBatches | None = None
        self._ready = False

    # Shared by both data paths: written once, here.

    def _choose_split(self, daily: pl.DataFrame) -> None:
        """``split_days`` from the log's :func:`~F.daily_counts`, by ``split_rule``; says which."""
        self.split_days = self.split_rule.days(daily)
        progress.announce(self.split_rule.describe(daily, self.split_days))

    def training_days(self) -> tuple[int, int]:
        """(first, last) day of the training window: the train days, with the validation days too
        when ``train_through_val`` (set up first: needs ``split_days``)."""
        last = self.split_days["val" if self.train_through_val else "train"][1]
        return self.split_days["train"][0], last

    def cutoff(self) -> int:
        """The training cut-off in seconds: the start of the day after the training window. Nothing
        at or after it is read for training, features or the baselines' profiles."""
        return (self.training_days()[1] + 1) * F.SECONDS_PER_DAY

    def training_window(self, split: F.TimeSplit) -> pl.DataFrame:
        """The impressions of the training window of ``split`` (train rows, plus the validation rows
        when ``train_through_val``)."""
        return pl.concat([split.train, split.val]) if self.train_through_val else split.train

    def _require_engaged_training_rows(self, n_engaged: int) -> None:
        if n_engaged == 0:
            raise F.SplitError(
                f"The train split (days {self.split_days['train']}) of {F.IMPRESSIONS_FILE} has no row "
                f"positive for any task {self.tasks}; expected clicks, saves or conversions to learn from."
            )

    def _build_corpus(
        self,
        items: pl.DataFrame,
        users: pl.DataFrame,
        train: pl.DataFrame | pl.LazyFrame,
        user_history: pl.DataFrame,
        train_pairs: pl.DataFrame,
    ) -> None:
        """The item corpus (performance features from the training window ``train``) and the users,
        with what the user history before the cut-off adds (``_add_pre_cutoff_context``); the item
        spec and tensors are made once, from the finished table.

        An item neither shown in the training window nor in the user history before the cut-off is
        encoded as never shown (``F.encode_never_shown``): as serving encodes an item id it never had.
        """
        chosen = choose_features(self.features, {"items": items, "users": users}, load_schemas())
        self.item_columns, self.user_columns = chosen.columns["item"], chosen.columns["user"]
        for line in chosen.describe():
            progress.announce(line)
        self.items = F.build_item_table(items, train, self.item_columns)
        self.users = F.build_user_table(users, self.user_columns)
        self._add_pre_cutoff_context(user_history, train_pairs)
        seen = self.items.performance["impressions"].to_numpy() > 0
        seen[self.history_pairs[1]] = True
        self.items = F.mark_never_shown(self.items, ~seen)
        self.item_spec = self.items.spec
        self.item_features = to_torch(self.items.features)

    def _add_pre_cutoff_context(self, user_history: pl.DataFrame, train_pairs: pl.DataFrame) -> None:
        """Keep the user history before the training cut-off and add the co-engagement factors.

        ``pre_cutoff_history`` holds the ``user_history`` rows before the first validation day (empty
        unless ``use_user_history``); ``history_pairs`` their (user position, item position, action
        code), for the baselines. ``train_pairs``: the training window's engaged (user_id, item_id).
        """
        cutoff = self.cutoff()
        history = before_cutoff(user_history, cutoff) if self.use_user_history else user_history.clear()
        self.pre_cutoff_history = history
        self.history_pairs = history_positions(history, self.users.user_ids, self.items.item_ids)
        if self.cofactor_dim == 0:
            return
        users, items = self.users.user_ids, self.items.item_ids
        user_pos = np.concatenate(
            [F.positions(users, train_pairs["user_id"].to_numpy()), self.history_pairs[0]]
        )
        item_pos = np.concatenate(
            [F.positions(items, train_pairs["item_id"].to_numpy()), self.history_pairs[1]]
        )
        factors = fit_cofactors(
            engagement_matrix(user_pos, item_pos, len(users), len(items)),
            self.cofactor_dim,
            item_exponent=self.cofactor_item_exponent,
        )
        self.items.features.update(factors.item_features())
        # An item without engagement has no co-engagement information: factor 0 (fit_cofactors).
        self.items.never_shown_row.update(
            {name: np.zeros((), np.float32) for name in factors.item_features()}
        )
        self.items.spec = F.spec_of(self.items.features)
        self.users.features.update(factors.user_features())
        if self.cofactor_leave_target_out:
            self.profile_shares = to_torch(factors.profile_shares())

    def _history_events(self, impressions: pl.DataFrame | pl.LazyFrame) -> pl.DataFrame | None:
        """The engagement events of the kept days (none after the held-out days), when history is on;
        with ``use_user_history`` the user history before the cut-off comes first (the sequence then
        starts before the log)."""
        if self.history_max_len == 0:
            return None
        kept = F.in_days((self.split_days["train"][0], self.split_days["heldout"][1]))
        rows = impressions.lazy().filter(engaged() & kept).select(_HISTORY_COLUMNS)
        events = engagement_events(rows.collect(engine="streaming"))
        if self.pre_cutoff_history.height == 0:
            return events
        before = self.pre_cutoff_history.select(
            "user_id",
            "timestamp",
            "item_id",
            pl.col("action").replace_strict(ACTION_CODES, return_dtype=pl.Int64),
        )
        return pl.concat([before, events]).sort("user_id", "timestamp", "item_id", "action")

    def _build_query_inputs(self, events: pl.DataFrame | None) -> None:
        """What the query tower's features are built from (users, corpus, surfaces, history events)."""
        self.surfaces = list(load_schemas()["impressions"].column("surface").allowed or ())
        self.inputs = F.QueryInputs(
            users=self.users,
            items=self.items,
            surfaces=self.surfaces,
            query_hash_buckets=self.query_hash_buckets,
            context=self.context,
            events=events,
            history_max_len=self.history_max_len,
        )

    def _build_queries(self, frames: Mapping[str, pl.DataFrame]) -> None:
        """Evaluation queries of the ``val`` and ``heldout`` rows (engaged rows become queries)."""
        self.queries = {
            name: F.build_query_set(
                self.label_maturity.evaluation_rows(frame), self.inputs, self.tasks, self.split_days[name]
            )
            for name, frame in frames.items()
        }

    def _random_negatives(self) -> RandomNegatives | None:
        """The training batches' random corpus negatives (None when ``random_negatives`` is 0)."""
        return RandomNegatives(self.random_negatives) if self.random_negatives > 0 else None

    def _cold_start(self) -> ItemIdDropout | None:
        """The training batches' item-id dropout (None when ``item_id_dropout`` is 0)."""
        if self.item_id_dropout == 0.0:
            return None
        row = {name: torch.as_tensor(value) for name, value in self.items.never_shown_row.items()}
        return ItemIdDropout(self.item_id_dropout, row)

    def adopt_prepared(self, state: Mapping[str, Any]) -> None:
        """Take over what ``setup`` built on another datamodule of the same data, class and content
        options (``convcg_cli.data.loading.prepared``): the tables, features, queries and training examples
        are shared, read-only; the training batches keep this datamodule's size, order (``seed``)
        and item-id dropout (not a content option: it is drawn per batch) and start at epoch 0."""
        vars(self).update(state)
        if self.train_set is not None:
            self.train_set = reordered(
                self.train_set, self.batch_size, self.seed, self._cold_start(), self._random_negatives()
            )

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs besides the weights: the training batches' epoch counter, so the
        epoch after a checkpoint draws its own batch order (``seed + epoch``), not the first epoch's."""
        return {"train_epoch": self.train_set.epoch} if self.train_set is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (Lightning calls it after ``setup`` when fit resumes)."""
        if self.train_set is not None and "train_epoch" in state_dict:
            self.train_set.epoch = int(state_dict["train_epoch"])

    def train_dataloader(self) -> DataLoader:
        """The training batches (``setup('fit')`` builds them)."""
        if self.train_set is None:
            raise RuntimeError("setup('fit') builds the training set; it was set up for evaluation only")
        return DataLoader(self.train_set, batch_size=None)

    def query_loader(self, split: str) -> DataLoader:
        """Batches of one evaluation split's query features, in query-index order."""
        return DataLoader(
            SequentialBatches(to_torch(self.queries[split].features), self.eval_batch_size), batch_size=None
        )

    def val_dataloader(self) -> DataLoader:
        """The validation queries (recall@K every epoch)."""
        return self.query_loader("val")
