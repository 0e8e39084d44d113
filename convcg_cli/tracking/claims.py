"""A run held by one process at a time: the claim a command takes before it writes into an existing
run (``convcg train --resume``), so that two processes never both continue it."""

from __future__ import annotations

import os
import re
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from convcg_cli.errors import RunClaimedError, RunNotFoundError
from convcg_cli.tracking.store import Store, server_answers, sqlite_path
from convcg_cli.workdir import writer_gone

CLAIM_TAG = "convcg.claim"  # on a server store: who holds the run (host, pid, time, token)
CLAIM_SETTLE_SECONDS = 1.0  # a server claim is re-read after this long: the last writer wins


def _holder() -> str:
    return f"{socket.gethostname()} pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"


def _claimed(run_id: str, holder: str) -> RunClaimedError:
    return RunClaimedError(
        f"Run {run_id} is held by another process ({holder}): it is being resumed or written into "
        "now. Wait for that process to end (or stop it), then try again."
    )


@contextmanager
def claim_run(store: Store, run_id: str) -> Iterator[None]:
    """Hold ``run_id`` for this process while the body writes into it (``convcg train --resume``); a
    second process asking for the same run gets a RunClaimedError naming the holder.

    A local (sqlite) store takes an exclusive, non-blocking ``flock`` on ``<db>.claims/<run id>.lock``
    beside the database: atomic, and released by the kernel when the process ends, however it ends.
    A server store has no lock to share, so the claim is a compare-and-set on the run's
    ``convcg.claim`` tag: refused while another live holder's tag is there, written, and re-read after
    ``CLAIM_SETTLE_SECONDS`` (of two processes that wrote at once, the one whose token was
    overwritten gives way); removed when the body ends.
    """
    if not re.fullmatch(r"[\w-]+", run_id):
        raise RunNotFoundError(f"'{run_id}' is not a run id (letters, digits, '_' and '-' only).")
    db = sqlite_path(store.uri)
    if db is not None:
        with _local_claim(db, run_id):
            yield
        return
    with _tag_claim(store, run_id):
        yield


@contextmanager
def _local_claim(db: Path, run_id: str) -> Iterator[None]:
    import fcntl

    claims = db.with_name(db.name + ".claims")
    claims.mkdir(parents=True, exist_ok=True)
    with open(claims / f"{run_id}.lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            raise _claimed(run_id, lock.read().strip() or "holder unknown") from None
        lock.seek(0)
        lock.truncate()
        lock.write(_holder())
        lock.flush()
        yield  # the lock goes when the file closes, or when the process dies


def _live_claim(tag: str | None) -> bool:
    """Whether a claim tag names a holder that may still be alive (any holder on another host)."""
    if not tag:
        return False
    host, _, rest = tag.partition(" pid ")
    return not writer_gone(host, int(rest.split(" ", 1)[0] or 0))


@contextmanager
def _tag_claim(store: Store, run_id: str) -> Iterator[None]:
    current = store.client.get_run(run_id).data.tags.get(CLAIM_TAG)
    if _live_claim(current):
        raise _claimed(run_id, str(current).rsplit(" [", 1)[0])
    token = f"{_holder()} [{uuid.uuid4().hex}]"
    store.client.set_tag(run_id, CLAIM_TAG, token)
    time.sleep(CLAIM_SETTLE_SECONDS)
    now = store.client.get_run(run_id).data.tags.get(CLAIM_TAG)
    if now != token:
        raise _claimed(run_id, str(now).rsplit(" [", 1)[0])
    try:
        yield
    finally:
        try:
            store.client.delete_tag(run_id, CLAIM_TAG)
        except Exception:
            if server_answers(store.uri):
                raise
            # The server is gone: the tag names this process, which a later claim finds dead.
