"""User-facing errors. The CLI prints their message as one paragraph and exits non-zero."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class ConvcgError(Exception):
    """An error caused by the user's input (data, config, run id), not by a bug."""

    exit_code = 2


class RequestError(ConvcgError):
    """A request table the model cannot read (a missing column, a wrong type, an unknown surface)."""


class DataValidationError(ConvcgError):
    """Input tables broke their contract in ``data_schemas/``; carries every violation found."""

    def __init__(self, violations: list, note: str = "") -> None:
        self.violations = list(violations)
        lines = "\n".join(f"  - {v}" for v in self.violations)
        super().__init__(
            f"{len(self.violations)} data contract violation(s):\n{lines}" + (f"\n{note}" if note else "")
        )


class ConfigError(ConvcgError):
    """A config could not be composed or does not make sense."""


class RunNotFoundError(ConvcgError):
    """The MLflow run asked for does not exist or has no checkpoint."""


class RunClaimedError(ConvcgError):
    """Another process holds the run this command would write into (e.g. it is resuming it)."""


class EnvironmentProblem(ConvcgError):
    """The machine or a store got in the way (a full disk, a locked or damaged MLflow store), not
    the user's input: the message says what and where, and what to do."""


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and every exception it was raised from or during, once each."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]


def environment_problem(exc: BaseException) -> str | None:
    """A paragraph for an environment failure anywhere in ``exc``'s chain, or None.

    Recognised: no space left on a device (or over quota), a sqlite store still locked by another
    process after the wait, a damaged sqlite store, a path that should be a directory but is a file.
    Matched by errno and by sqlite's own message, so this leaf module imports no library.

    Example:
        >>> import errno
        >>> environment_problem(OSError(errno.ENOSPC, "No space left on device", "/tmp/x")).split(":")[0]
        'No space left on device writing /tmp/x'
        >>> environment_problem(ValueError("a bug")) is None
        True
    """
    import errno

    for cause in exception_chain(exc):
        text = str(cause)
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            where = f" writing {cause.filename}" if cause.filename else ""
            return (
                f"No space left on device{where}: free space there (or point TMPDIR, for downloads, or "
                "CONVCG_HOME, for runs and outputs, at a larger disk) and run the command again. "
                "A run it was writing is marked FAILED and keeps what it had logged."
            )
        if "database is locked" in text:
            return (
                "The MLflow sqlite store stayed locked by another process beyond the wait (sqlite: "
                "'database is locked'). Another convcg or mlflow process is writing to it: wait for it "
                "to finish, or raise logger.busy_timeout_s, then run the command again."
            )
        if "database disk image is malformed" in text or "file is not a database" in text:
            return (
                f"The MLflow sqlite store is damaged (sqlite: '{first_line(cause)}'). Move the file aside "
                "(keep it for recovery: `sqlite3 mlflow.db .recover`), or point CONVCG_HOME or "
                "logger.tracking_uri at another store, then run the command again."
            )
        if isinstance(cause, NotADirectoryError):
            return (
                f"{cause.filename or 'A path'} is not a directory, but convcg keeps files under it "
                f"({first_line(cause)}). Point CONVCG_HOME (or the option that names it) at a directory."
            )
    return None


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn a ConvcgError, or an environment failure (:func:`environment_problem`), into a
    one-paragraph message on stderr and a non-zero exit (2 for both); a bug still shows its traceback.

    Wraps the body of every command line (``convcg``, ``python -m convcg_cli.bench``); typer and rich
    are imported only when an error is reported, so this leaf module stays light.
    """
    try:
        yield
    except ConvcgError as exc:
        _report(str(exc), exc.exit_code)
    except Exception as exc:
        problem = environment_problem(exc)
        if problem is None:
            raise
        _report(problem, EnvironmentProblem.exit_code)


def _report(message: str, exit_code: int) -> None:
    import typer
    from rich.console import Console

    Console(stderr=True, soft_wrap=True).print(f"[bold red]Error:[/bold red] {message}", highlight=False)
    raise typer.Exit(exit_code) from None


class TrainingDivergedError(ConvcgError):
    """The loss or a gradient went non-finite (NaN or inf): training stopped at that step."""

    exit_code = 1


class RunInterruptedError(ConvcgError):
    """Training was stopped by a signal (SIGINT, SIGTERM); exits 128 + the signal number, as a shell
    reports a process killed by it (130, 143)."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


def some_of(names: list[str], at_most: int = 5) -> str:
    """``names`` for a message: the first ``at_most``, then how many more.

    Example:
        >>> some_of(["a", "b", "c"], 2)
        'a, b and 1 more'
    """
    more = len(names) - at_most
    return ", ".join(names[:at_most]) + (f" and {more} more" if more > 0 else "")


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its class name when it has none), for a one-line
    cause inside a user-facing error.

    Example:
        >>> first_line(ValueError("bad value\\nmore detail")), first_line(KeyError())
        ('bad value', 'KeyError')
    """
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
