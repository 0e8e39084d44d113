"""The logs a run read: a data directory's digest and profile, logged as the run's MLflow dataset
input (the UI's Dataset column)."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from convcg_cli.errors import ConvcgError

if TYPE_CHECKING:
    from convcg_cli.tracking.store import Store, TrackedRun

DATA_FILE_SUFFIX = ".parquet"  # the contract's tables; caches and notes beside them are not data
DIGEST_LENGTH = 16
DATA_DIGEST_TAG = "data_digest"  # also a tag, so runs (baseline ones too) can be found by their data


@functools.cache
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a file's bytes; cached per (path, size, mtime): eval and ablate digest one data dir
    many times in one process."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def data_digest(data_dir: str | Path) -> str:
    """Digest of the data: sha256 over the name and content of every ``*.parquet`` table in
    ``data_dir`` (sorted), cut to ``DIGEST_LENGTH`` hex digits. Same bytes, same digest."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(Path(data_dir).glob(f"*{DATA_FILE_SUFFIX}")):
        stat = path.stat()
        digest.update(f"{path.name}:{_file_sha256(str(path), stat.st_size, stat.st_mtime_ns)}\n".encode())
    return digest.hexdigest()[:DIGEST_LENGTH]


def dataset_profile(n_rows: Mapping[str, int], split_days: Mapping[str, tuple[int, int]]) -> dict[str, Any]:
    """The dataset profile shown in the UI: impressions and calendar days of every split.

    Example:
        >>> dataset_profile({"train": 10}, {"train": (0, 4)})
        {'train': {'impressions': 10, 'days': '1970-01-01..1970-01-05'}}
    """
    import datetime as dt

    def day(n: int) -> str:
        return (dt.date(1970, 1, 1) + dt.timedelta(days=int(n))).isoformat()

    return {
        split: {"impressions": int(n_rows.get(split, 0)), "days": f"{day(lo)}..{day(hi)}"}
        for split, (lo, hi) in split_days.items()
    }


def log_dataset(
    run: TrackedRun, data_dir: str | Path, profile: Mapping[str, Any], context: str, tag: bool = True
) -> str:
    """Log ``data_dir`` as the run's MLflow dataset input (name: the directory's name, digest:
    :func:`data_digest`, source: the directory, ``profile``: :func:`dataset_profile`) in ``context``
    (``training``, ``evaluation``); with ``tag``, tags the run ``data_digest`` (the data it was
    trained on: other logs it is scored on are inputs only); returns the digest. MLflow keeps one
    input per (run, dataset): evaluating a run on its training data adds no second one."""
    import json

    from mlflow.entities import Dataset, DatasetInput, InputTag

    path = Path(data_dir).resolve()
    digest = data_digest(path)
    dataset = Dataset(
        name=path.name,
        digest=digest,
        source_type="local",
        source=json.dumps({"uri": path.as_uri()}),
        profile=json.dumps(dict(profile)),
    )
    tags = [InputTag(key="mlflow.data.context", value=context)]
    run.client.log_inputs(run.run_id, datasets=[DatasetInput(dataset=dataset, tags=tags)])
    if tag:
        run.client.set_tag(run.run_id, DATA_DIGEST_TAG, digest)
    return digest


def check_training_data(store: Store, run_id: str, data_dir: str | Path, allow_other: bool = False) -> bool:
    """Whether ``data_dir`` holds the bytes run ``run_id`` was trained on (its ``data_digest`` tag);
    True for a run without the tag (trained before digests were logged).

    A different digest is a ConvcgError unless ``allow_other`` (eval's ``allow_other_data=true``, the
    way to score other logs in the same contract): a model scored on logs it was not trained on must
    be asked for, never happen because a directory was replaced.
    """
    trained = store.client.get_run(run_id).data.tags.get(DATA_DIGEST_TAG)
    now = data_digest(data_dir)
    if trained is None or trained == now:
        return True
    if allow_other:
        return False
    raise ConvcgError(
        f"The data in {data_dir} (digest {now}) are not the data run {run_id} was trained on (digest "
        f"{trained}, its '{DATA_DIGEST_TAG}' tag): the directory was replaced or its tables changed "
        "since training. Restore the training logs, or score these logs on purpose with "
        "allow_other_data=true (they are logged as another dataset input; the run keeps its "
        "training digest)."
    )
