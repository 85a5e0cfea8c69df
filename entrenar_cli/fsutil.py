"""Filesystem helpers: nothing half-written is ever left looking complete.

Files are written to a temporary name in the same directory and renamed into place
(``os.replace`` is atomic on POSIX); directories are built under a temporary name and renamed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# every run directory holds the list of what entrenar wrote there (--overwrite removes only that)
RUN_LIST = ".entrenar-run.json"
LOCK_FILE = ".entrenar.lock"


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary file path next to ``path``; on success rename it onto ``path``."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600; outputs get the permissions a plain open() would give
        os.chmod(tmp_path, 0o666 & ~current_umask())
        _fsync_file(tmp_path)
        os.replace(tmp_path, target)
        _fsync_dir(target.parent)
    except OSError as exc:
        name_path(exc, target)
        raise
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | Path, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary directory next to ``path``; on success it replaces ``path``."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        # mkdtemp creates 0700 (and safetensors writes 0600): give what a plain mkdir()/open() would
        honour_umask(tmp)
        if target.exists():
            if not overwrite:
                raise FileExistsError(target)
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        _fsync_dir(target.parent)
    except OSError as exc:
        name_path(exc, target)
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def name_path(exc: OSError, path: str | Path) -> None:
    """Give a write error without a file name (disk full, file-size limit) the path being written,
    so the message says where."""
    if exc.filename is None:
        exc.filename = str(path)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write text so readers see either the old file or the whole new one."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON (indented, sorted keys kept as given) atomically."""
    write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def read_run_list(directory: str | Path) -> dict[str, Any] | None:
    """The run list of ``directory`` (``{"written": [names], ...}``); None when there is none or it is unusable."""
    try:
        data = json.loads((Path(directory) / RUN_LIST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    written = data.get("written") if isinstance(data, dict) else None
    if not isinstance(written, list) or not all(isinstance(n, str) for n in written):
        return None
    return data


def record_written(directory: str | Path, *names: str, create: bool = True) -> None:
    """Add ``names`` (paths relative to ``directory``) to its run list *before* they are created.

    A run killed at any moment leaves a list that names everything it wrote, so a later
    ``--overwrite`` can remove exactly that. ``create=False``: only where a list already exists.
    """
    data = read_run_list(directory)
    if data is None:
        if not create:
            return
        data = {"version": 1, "written": []}
    new = [n for n in names if n not in data["written"]]
    if new:
        data["written"] = [*data["written"], *new]
        write_json_atomic(Path(directory) / RUN_LIST, data)


def update_run_list(directory: str | Path, **fields: Any) -> None:
    """Store facts about the run beside the list (e.g. the student's metrics before training, for --resume)."""
    data = read_run_list(directory) or {"version": 1, "written": []}
    data.update(fields)
    write_json_atomic(Path(directory) / RUN_LIST, data)


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (os.umask is racy in threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: str | Path) -> None:
    """Give ``path`` (recursively for a directory) the permissions plain ``mkdir``/``open`` would.

    ``tempfile.mkstemp``/``mkdtemp`` and safetensors' writer create 0600/0700 whatever the umask;
    outputs built under a temporary name get the usual permissions before they are renamed into place.
    """
    mask = current_umask()
    root = Path(path)
    if not root.is_dir():
        os.chmod(root, 0o666 & ~mask)
        return
    os.chmod(root, 0o777 & ~mask)
    for base, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(base, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(base, name), 0o666 & ~mask)


def human_bytes(n: float) -> str:
    """Binary units, explicit: '1.50 GiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def _fsync_file(path: Path) -> None:
    with contextlib.suppress(OSError):
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def cache_root() -> Path:
    """Where entrenar caches derived data (tokens, converted GGUF teachers, precision probes).

    $ENTRENAR_CACHE, else $XDG_CACHE_HOME/entrenar, else ~/.cache/entrenar.
    """
    env = os.environ.get("ENTRENAR_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME")
    if not base:
        try:
            base = str(Path.home() / ".cache")
        except RuntimeError:  # no HOME and no passwd entry
            from entrenar_cli.errors import UsageError

            raise UsageError("cannot find a cache directory: HOME is not set",
                             hint="set ENTRENAR_CACHE (or HOME) to a writable directory") from None
    return Path(base) / "entrenar"
