"""What a person sees while a long step runs: a status line per step, ``cell i/N`` with an ETA.

The level comes from ``CONVCG_VERBOSITY`` (set by the CLI's ``-q``/``-v``; an environment variable so
that DDP worker processes started by the launcher inherit it):

* ``quiet``: nothing, and no Lightning progress bar;
* ``normal`` (default): a transient rich spinner per step on a terminal; nothing when stderr is not a
  terminal (CI logs stay plain), except one line per ablation cell;
* ``verbose``: also one line per finished step with its duration, terminal or not.

Everything goes to stderr: stdout stays for results (``convcg eval --json``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

VERBOSITY_ENV = "CONVCG_VERBOSITY"
QUIET, NORMAL, VERBOSE = "quiet", "normal", "verbose"
_active: list[str] = []  # the steps open now: a nested step does not start a second live display
_recorders: list[list[tuple[str, float]]] = []  # open ``recorded()`` blocks (the benchmarks read them)


def set_verbosity(quiet: bool, verbose: bool) -> None:
    """Set the level for this process and the processes it starts (``-q`` wins over ``-v``)."""
    os.environ[VERBOSITY_ENV] = QUIET if quiet else VERBOSE if verbose else NORMAL


def verbosity() -> str:
    """The current level: ``quiet``, ``normal`` or ``verbose``."""
    level = os.environ.get(VERBOSITY_ENV, NORMAL)
    return level if level in (QUIET, NORMAL, VERBOSE) else NORMAL


def _console():
    from rich.console import Console

    return Console(stderr=True, soft_wrap=True)


def interactive() -> bool:
    """Whether live displays (spinners, Lightning's bar) are wanted: not quiet, stderr a terminal."""
    return verbosity() != QUIET and _console().is_terminal


def announce(text: str) -> None:
    """One plain line on stderr unless quiet (milestones such as an ablation cell starting)."""
    if verbosity() != QUIET:
        _console().print(text, markup=False, highlight=False)


@contextmanager
def step(description: str) -> Iterator[None]:
    """Show ``description`` while the body runs (a spinner on a terminal); with ``-v`` print how long
    it took. A step inside another one updates nothing live (one live display at a time)."""
    start = time.perf_counter()
    console = _console()
    live = not _active and verbosity() != QUIET and console.is_terminal
    _active.append(description)
    try:
        if live:
            with console.status(f"{description}..."):
                yield
        else:
            yield
    finally:
        _active.pop()
    for record in _recorders:
        record.append((description, time.perf_counter() - start))
    if verbosity() == VERBOSE:
        console.print(f"{description}: {time.perf_counter() - start:.1f} s", markup=False, highlight=False)


@contextmanager
def recorded() -> Iterator[list[tuple[str, float]]]:
    """Collect ``(description, seconds)`` of every step that finishes inside the block, in order
    (nested steps included): how ``make bench`` breaks ``convcg eval`` down without a second
    implementation of it."""
    record: list[tuple[str, float]] = []
    _recorders.append(record)
    try:
        yield record
    finally:
        _recorders.remove(record)


def duration(seconds: float) -> str:
    """A short human duration.

    Example:
        >>> duration(42.4), duration(250), duration(7300)
        ('42s', '4m10s', '2h01m')
    """
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def cell_line(index: int, total: int, name: str, elapsed_s: float) -> str:
    """``cell i/N name`` with the time so far and an ETA from the mean time of the finished cells.

    Example:
        >>> cell_line(3, 10, "unified_parallel/seed=0", 120.0)
        'cell 3/10 unified_parallel/seed=0 (elapsed 2m00s, ETA 8m00s)'
        >>> cell_line(1, 10, "a/seed=0", 0.0)
        'cell 1/10 a/seed=0'
    """
    done = index - 1
    if done == 0:
        return f"cell {index}/{total} {name}"
    eta = elapsed_s / done * (total - done)
    return f"cell {index}/{total} {name} (elapsed {duration(elapsed_s)}, ETA {duration(eta)})"
