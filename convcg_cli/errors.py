"""User-facing errors. The CLI prints their message as one paragraph and exits non-zero."""


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
