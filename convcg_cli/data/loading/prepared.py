"""The set-up data of a grid, prepared once and reused: :class:`PreparedDataCache`.

Setting a datamodule up (reading and validating the tables, the item and user features, the
co-engagement SVD, the history, the evaluation queries and the training examples) depends only on
the data's bytes, the datamodule's class and its content options (``content_options``: every
constructor option but the batch size and order). The cells of a grid mostly share all three, and
each cell sets its data up twice (training, then evaluation). The cache keeps what ``setup`` built
under a key made of those three, and hands it to the next datamodule with the same key; the batch
size and order stay that datamodule's own (``DataModuleBase.adopt_prepared``). Nothing set up is
recomputed differently, so a figure never depends on whether the cache was hit.

Two places: in this process (``convcg ablate``'s sequential loop), and optionally a directory
(pickles, one per key) that the jobs of a launcher share; the grid removes it when it ends.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from collections import OrderedDict
from pathlib import Path
from typing import Any

from convcg_cli.data.loading.datamodule_base import DataModuleBase, content_options

PICKLE_SUFFIX = ".pkl"


def prepared_key(dm: DataModuleBase) -> str:
    """What a datamodule's set-up state depends on, hashed: its class, the digest of the data's
    bytes and its content options (a changed file or option is a new key).

    Example (the key changes with a content option, not with the batch size)::

        prepared_key(InMemoryDataModule(d, val_days=2)) != prepared_key(InMemoryDataModule(d, val_days=3))
        prepared_key(InMemoryDataModule(d, batch_size=8)) == prepared_key(InMemoryDataModule(d, batch_size=9))
    """
    from convcg_cli.tracking import data_digest

    kind = type(dm)
    blob = json.dumps(
        {
            "class": f"{kind.__module__}.{kind.__qualname__}",
            "data": data_digest(dm.dir),
            "options": content_options(dm.constructor_options),
        },
        sort_keys=True,
        default=repr,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


class PreparedDataCache:
    """Set-up datamodule states by :func:`prepared_key`: the last ``max_entries`` in this process,
    and every one in ``directory`` when given (shared by the processes of a launcher).

    ``hits`` and ``misses`` count the set-ups served and done, for the benchmark and the tests.
    """

    def __init__(self, directory: Path | None = None, max_entries: int = 2) -> None:
        self.directory = Path(directory) if directory is not None else None
        self.max_entries = max_entries
        self._states: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __getstate__(self) -> dict[str, Any]:
        """A launcher pickles the cache into its jobs: they share the directory, not this process's
        states (which would travel with every job)."""
        return {**vars(self), "_states": OrderedDict()}

    def setup(self, dm: DataModuleBase, stage: str) -> None:
        """``dm.setup(stage)``, from a cached state when one has ``dm``'s key, else done and cached.

        The state is every attribute ``setup`` assigned (new or replaced): a datamodule's setup
        builds new objects and leaves what its constructor made as it was (the tests check that
        a cached set-up gives the batches and figures of a fresh one)."""
        key = prepared_key(dm)
        state = self._states.get(key) or self._read(key)
        if state is not None:
            self.hits += 1
            self._remember(key, state)
            dm.adopt_prepared(state)
            dm.setup(stage)  # idempotent; builds only what this stage still needs (streamed shards)
            return
        self.misses += 1
        before = dict(vars(dm))
        dm.setup(stage)
        state = {n: v for n, v in vars(dm).items() if n not in before or before[n] is not v}  # what setup set
        self._remember(key, state)
        self._write(key, state)

    def _remember(self, key: str, state: dict[str, Any]) -> None:
        """Keep ``state`` as the newest; forget the oldest beyond ``max_entries`` (memory)."""
        self._states[key] = state
        self._states.move_to_end(key)
        while len(self._states) > self.max_entries:
            self._states.popitem(last=False)

    def _read(self, key: str) -> dict[str, Any] | None:
        path = self._path(key)
        if path is None or not path.is_file():
            return None
        with path.open("rb") as f:
            return pickle.load(f)  # written by this grid's own jobs (see the module docstring)

    def _write(self, key: str, state: dict[str, Any]) -> None:
        """Atomically (a temp file renamed): a job never reads a half-written state."""
        path = self._path(key)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        with tmp.open("wb") as f:
            pickle.dump(state, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, path)

    def _path(self, key: str) -> Path | None:
        return self.directory / f"{key}{PICKLE_SUFFIX}" if self.directory is not None else None
