"""User-facing errors. The CLI prints their message as one paragraph and exits non-zero."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class ConvcgError(Exception):
    """An error caused by the user's input (data, config, run id), not by a bug."""

    exit_code = 2


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


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn a ConvcgError into a one-paragraph message on stderr and a non-zero exit.

    Wraps the body of every command line (``convcg``, ``python -m convcg_cli.bench``); typer and rich
    are imported only when an error is reported, so this leaf module stays light.
    """
    try:
        yield
    except ConvcgError as exc:
        import typer
        from rich.console import Console

        Console(stderr=True, soft_wrap=True).print(f"[bold red]Error:[/bold red] {exc}", highlight=False)
        raise typer.Exit(exc.exit_code) from None


class TrainingDivergedError(ConvcgError):
    """The loss or a gradient went non-finite (NaN or inf): training stopped at that step."""

    exit_code = 1


class RunInterruptedError(ConvcgError):
    """Training was stopped by a signal (SIGINT, SIGTERM); exits 128 + the signal number, as a shell
    reports a process killed by it (130, 143)."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its class name when it has none), for a one-line
    cause inside a user-facing error.

    Example:
        >>> first_line(ValueError("bad value\\nmore detail")), first_line(KeyError())
        ('bad value', 'KeyError')
    """
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
