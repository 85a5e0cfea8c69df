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


class HubError(EntrenarError):
    """Hub download or lookup failure (not found, gated, offline, disk full): exit code 1."""


class ModelError(EntrenarError):
    """A model file or directory that cannot be used (corrupt, unsupported, mismatched)."""


class DataError(EntrenarError):
    """A dataset that cannot be read or is empty."""


class TrainingError(EntrenarError):
    """Training could not continue (non-finite losses, interrupted, out of memory)."""


# ---- what the operating system and the interpreter raise, in the user's words -------------------


def shorten_path(path: object, limit: int = 160) -> str:
    """A path short enough for one line of a message (the middle of a very long one elided)."""
    text = str(path)
    return text if len(text) <= limit else f"{text[:limit // 2]}...{text[-limit // 2:]} ({len(text)} characters)"


def _access_verb(path: str) -> str:
    """What was denied on ``path``, judged from what exists (a best guess: the error does not say)."""
    import os

    if not os.path.lexists(path):
        return "create"
    if os.path.isdir(path):
        return "open the directory" if not os.access(path, os.R_OK | os.X_OK) else "write into the directory"
    return "read" if not os.access(path, os.R_OK) else "write"


def os_error_code(exc: BaseException) -> int | None:
    """The OS error number behind ``exc``: an OSError's errno, or the one safetensors reports as text.

    safetensors' Rust writer raises ``SafetensorError("... (os error 28)")`` for a full disk: the
    same failure as Python's ``OSError(ENOSPC)``, and it deserves the same message.
    """
    import re

    if isinstance(exc, OSError):
        return exc.errno
    if type(exc).__name__ == "SafetensorError":
        m = re.search(r"(?:os error |code: )(\d+)", str(exc))  # "... (os error 28)" or "Os { code: 28, ..."
        return int(m.group(1)) if m else None
    return None


def explain(exc: BaseException) -> EntrenarError | None:
    """The message, hint and exit code for an error a user can cause, or None for a genuine bug.

    The CLI maps everything that escapes a command through this, so a full disk, a read-only
    mount, a file-size limit or a path that is a file where a directory belongs reads as one clear
    line naming the path, never as "unexpected failure".
    """
    import errno
    import os

    if isinstance(exc, EntrenarError):
        return exc
    if not isinstance(exc, OSError) and os_error_code(exc) in (errno.ENOSPC, errno.EFBIG, errno.EROFS,
                                                                getattr(errno, "EDQUOT", -1)):
        code = os_error_code(exc)  # safetensors' writer: the same failure as an OSError
        exc = OSError(code, os.strerror(code or 0))
    if isinstance(exc, OSError) and not isinstance(exc, (ConnectionError, TimeoutError)) and exc.errno is not None:
        path = exc.filename if exc.filename is not None else None
        shown = shorten_path(path) if path is not None else None
        at = f" {shown}" if shown else ""
        code = exc.errno
        reason = (exc.strerror or "").lower()
        if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
            return EntrenarError(
                f"disk full while writing{at}" + (" (quota exceeded)" if code != errno.ENOSPC else ""),
                hint="free space on that disk, or write elsewhere (output.dir, ENTRENAR_CACHE, HF_HOME); "
                "a training run continues from its last checkpoint with --resume",
            )
        if code == errno.EFBIG:
            return EntrenarError(
                f"file-size limit reached while writing{at or ' a file'}",
                hint="raise the limit ('ulimit -f unlimited') or write to a file system that allows larger files",
            )
        if code == errno.EROFS:
            return UsageError(f"cannot write{at}: read-only file system",
                              hint="choose a directory on a writable file system (output.dir, ENTRENAR_CACHE, HF_HOME)")
        if isinstance(exc, PermissionError):
            verb = _access_verb(str(path)) if path is not None else "access a file"
            return UsageError(f"cannot {verb}{at}: {reason or 'permission denied'}",
                              hint="check the permissions of the file and of its directory (ls -ld), "
                              "or choose another path")
        if isinstance(exc, IsADirectoryError):
            return UsageError(f"{shown or 'a path'} is a directory where a file was expected",
                              hint="give the path of a file, or move the directory out of the way")
        if isinstance(exc, NotADirectoryError):
            return UsageError(
                f"{shown or 'a path'}: a part of this path is a file where a directory was expected",
                hint="check the path; the cache locations (ENTRENAR_CACHE, XDG_CACHE_HOME, HF_HOME) must be "
                "directories",
            )
        if isinstance(exc, FileExistsError):
            return UsageError(f"{shown or 'a path'} already exists and is not what entrenar expected there "
                              "(a file where a directory belongs?)",
                              hint="move it out of the way or choose another path")
        if isinstance(exc, FileNotFoundError):
            return UsageError(f"not found: {shown or reason}",
                              hint="check the path (was it moved or deleted while entrenar ran?)")
        if code == errno.ENAMETOOLONG:
            return UsageError(f"path name too long: {shown or reason}", hint="use a shorter path")
        if code == errno.ELOOP:
            return UsageError(f"{shown or 'a path'}: too many levels of symbolic links (a link loop?)",
                              hint="fix the symbolic links on this path")
        if code in (errno.EMFILE, errno.ENFILE):
            return EntrenarError("too many open files", hint="raise the limit ('ulimit -n 4096')")
        if code == errno.EIO:
            return EntrenarError(f"input/output error{' on' + at if at else ''}",
                                 hint="the disk or network file system failed; check it and retry")
        return EntrenarError(f"cannot access{at or ' a file'}: {reason or type(exc).__name__}")
    if isinstance(exc, OSError):  # network errors and OSErrors without an errno
        return EntrenarError(f"system error: {exc}", hint="check the network, or set HF_HUB_OFFLINE=1 to use the cache")
    if isinstance(exc, UnicodeDecodeError):
        return UsageError(f"a file is not UTF-8 text ({exc.reason} at byte {exc.start})",
                          hint="entrenar reads YAML, JSON and text as UTF-8; convert the file (iconv -t utf-8)")
    if isinstance(exc, UnicodeEncodeError) and "surrogate" in str(exc.reason):
        return UsageError("the text holds a lone surrogate (half of a UTF-16 pair), which is not valid Unicode",
                          hint="fix the data: a '\\udXXX' escape without its pair")
    if isinstance(exc, RecursionError):
        return EntrenarError("an input is nested too deeply to read (the recursion limit was reached)",
                             hint="a file entrenar read (config, JSON, dataset row) is nested far deeper than a "
                             "real one")
    if isinstance(exc, MemoryError) or (
            isinstance(exc, RuntimeError) and any(s in str(exc) for s in ("out of memory", "can't allocate memory"))):
        return TrainingError("out of memory",
                             hint="lower training.batch_size or dataset.max_length, or run 'entrenar estimate' to plan "
                             "the run")
    if isinstance(exc, ValueError) and "embedded null byte" in str(exc):
        return UsageError("a path contains a NUL character",
                          hint="check the paths in the config and on the command line")
    return None
