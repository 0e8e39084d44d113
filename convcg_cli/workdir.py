"""Temporary files that outlive nothing: a command's own directory, and the leftovers of killed writers.

- :func:`command_dir`: the one temporary directory a command owns
  (``$TMPDIR/convcg-<command>-<pid>@<host>~XXXX``). Downloads and staged files go there; it is
  removed when the command ends, on an error, on Ctrl-C and on SIGTERM. A SIGKILLed command cannot
  remove it: the next command removes it (its pid is dead).
- :func:`temp_beside` names a file or directory written beside its target and renamed over it at the
  end (``.<target>.<kind>-<pid>@<host>~XXXX``); :func:`sweep_stale` removes those whose writer is
  gone, the next time anything writes the same target: a dead pid of this host, or (written before
  names carried a pid: ``.<target>.tmp-XXXX``, ``.<target>.partial``) older than this process.

A writer on another host (a shared disk) cannot be checked from here: its files are left alone.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

COMMAND_DIR_PREFIX = "convcg-"
# <pid>@<host>~: the writer; a host name holds no '~' or '/'.
_WRITER = r"(?P<pid>\d+)@(?P<host>[^~/]+)~"
_COMMAND_DIR = re.compile(rf"{re.escape(COMMAND_DIR_PREFIX)}[\w-]+?-{_WRITER}")
# What an atomic write leaves beside its target (the old, pid-less names too).
STALE_KINDS = ("tmp", "old", "partial")


def process_alive(pid: int) -> bool:
    """Whether a process of this host with id ``pid`` exists."""
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def writer() -> str:
    """``<pid>@<host>~``: who writes a temporary file, in its name."""
    return f"{os.getpid()}@{socket.gethostname()}~"


def writer_gone(host: str, pid: int) -> bool:
    """Whether a writer (a temp file's, a claim's, an unfinished model's) is a dead process of this
    host; one of another host cannot be checked from here and counts as alive."""
    return host == socket.gethostname() and not process_alive(pid)


def _writer_gone(match: re.Match[str]) -> bool:
    """Whether the writer a name carries is a dead process of this host."""
    return writer_gone(match["host"], int(match["pid"]))


def process_start_time() -> float:
    """When this process started (seconds since the epoch; Linux's ``/proc``, else now)."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        lines = Path("/proc/stat").read_text().splitlines()
        boot = next(float(line.split()[1]) for line in lines if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# --- temporary names beside a target --------------------------------------------------------------


def temp_beside(target: Path, kind: str = "tmp") -> str:
    """The name prefix of a temporary ``kind`` (``tmp``, ``old``, ``partial``) written beside
    ``target`` by this process: ``.<target name>.<kind>-<pid>@<host>~`` (``mkdtemp``/``mkstemp`` add
    a random suffix; a fixed name may use it as is). :func:`sweep_stale` recognises it."""
    return f".{target.name}.{kind}-{writer()}"


def sweep_stale(target: Path, kinds: tuple[str, ...] = STALE_KINDS) -> list[Path]:
    """Remove what killed writers of ``target`` left beside it; returns what was removed.

    A name with a writer (:func:`temp_beside`) is removed when that pid of this host is dead. A
    name from before writers were named (``.<name>.tmp-XXXX``, ``.<name>.old-XXXX``,
    ``.<name>.partial``) is removed when it is older than this process. An ``old`` entry (a replaced
    target set aside) is removed only while ``target`` exists: otherwise it holds the only copy.
    """
    parent = target.parent
    if not parent.is_dir():
        return []
    started = process_start_time()
    name = re.escape(target.name)
    removed: list[Path] = []
    for entry in parent.iterdir():
        for kind in kinds:
            if kind == "old" and not target.exists():
                continue
            named = re.fullmatch(rf"\.{name}\.{kind}-{_WRITER}.*", entry.name)
            legacy = re.fullmatch(rf"\.{name}\.{kind}(-[\w]+)?", entry.name) and not named
            try:
                stale = _writer_gone(named) if named else bool(legacy) and entry.lstat().st_mtime < started
            except OSError:  # gone meanwhile
                stale = False
            if stale:
                _remove(entry)
                removed.append(entry)
                break
    return removed


# --- a command's own directory --------------------------------------------------------------------


def sweep_command_dirs(root: Path | None = None) -> list[Path]:
    """Remove the command directories (:func:`command_dir`) of dead processes of this host under
    ``root`` (default: the temp directory); returns what was removed."""
    root = Path(root or tempfile.gettempdir())
    removed: list[Path] = []
    try:
        entries = list(root.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _COMMAND_DIR.match(entry.name)
        if match and _writer_gone(match):
            _remove(entry)
            removed.append(entry)
    return removed


@contextmanager
def exit_on_sigterm() -> Iterator[None]:
    """SIGTERM inside the block exits with 143 through ``finally`` blocks (Python's default ends the
    process at once, leaving temporary files), unless a handler of its own is set (training's)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous is not signal.SIG_DFL:
        yield
        return

    def _exit(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def command_dir(command: str) -> Iterator[Path]:
    """The temporary directory ``command`` (e.g. ``eval``) owns: made in ``$TMPDIR`` (after removing
    those of dead commands, :func:`sweep_command_dirs`), removed when the block ends, however it
    ends but SIGKILL. Pass it down as the destination of downloads and staged files."""
    sweep_command_dirs()
    path = Path(tempfile.mkdtemp(prefix=f"{COMMAND_DIR_PREFIX}{command}-{writer()}"))
    try:
        with exit_on_sigterm():
            yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
