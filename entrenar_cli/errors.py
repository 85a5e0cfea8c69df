"""One error type for everything a user can cause or act on.

The CLI maps an :class:`EntrenarError` to one clear message, a hint and an exit code; nothing
the user can cause reaches them as a Python traceback (set ``ENTRENAR_DEBUG=1`` to see one).
Exit codes: 0 success, 1 runtime failure, 2 usage or configuration error.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2


class EntrenarError(Exception):
    """A failure with a message for humans, an optional hint saying what to do, and an exit code."""

    exit_code = EXIT_RUNTIME

    def __init__(self, message: str, hint: str | None = None, *, exit_code: int | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        if exit_code is not None:
            self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class ConfigError(EntrenarError):
    """The YAML configuration (or a --set override) is invalid: exit code 2."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str, hint: str | None = None, *, problems: list[str] | None = None):
        super().__init__(message, hint)
        self.problems = problems or []


class UsageError(EntrenarError):
    """Bad command-line arguments or inputs the user named: exit code 2."""

    exit_code = EXIT_USAGE


class NotImplementedYet(EntrenarError):
    """A documented command that is not built yet: fails loudly, never fakes success."""

    exit_code = EXIT_RUNTIME


class HubError(EntrenarError):
    """Hub download or lookup failure (not found, gated, offline, disk full): exit code 1."""


class ModelError(EntrenarError):
    """A model file or directory that cannot be used (corrupt, unsupported, mismatched)."""


class DataError(EntrenarError):
    """A dataset that cannot be read or is empty."""


class TrainingError(EntrenarError):
    """Training could not continue (non-finite losses, interrupted, out of memory)."""
