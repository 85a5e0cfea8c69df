"""Pieces every training pipeline shares: the output directory, saving, the summary, the report."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from entrenar_cli.errors import ConfigError, UsageError
from entrenar_cli.fsutil import human_bytes, write_json_atomic, write_text_atomic

# files a run writes into its output directory (anything else there is the user's)
RUN_FILES = ("metrics.jsonl", "summary.json", "resolved_config.yaml", "report.html", "loss_curves.png")


@dataclass
class RunOptions:
    """Command-line switches of distill/finetune (not part of the YAML)."""

    resume: bool = False
    overwrite: bool = False
    dry_run: bool = False
    baseline: bool = False
    progress: bool = True


_LOCKS: dict[str, Any] = {}


def lock_output_dir(out: Path) -> None:
    """Hold an exclusive lock on ``out`` for this process's lifetime; a second run refuses.

    flock locks vanish with the process, so a crashed run never leaves a stale lock behind.
    """
    import fcntl

    key = str(out.resolve())
    if key in _LOCKS:
        return
    out.mkdir(parents=True, exist_ok=True)
    fh = open(out / ".entrenar.lock", "a+")
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.seek(0)
        owner = fh.read().strip() or "another process"
        fh.close()
        raise UsageError(f"output directory {out} is in use by another entrenar run ({owner})",
                         hint="wait for it to finish, or choose another output.dir") from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"pid {os.getpid()}")
    fh.flush()
    _LOCKS[key] = fh


def prepare_output_dir(out: Path, opts: RunOptions, inputs: list[Path] = ()) -> None:
    """Create and lock the output directory; refuse to mix runs unless --resume or --overwrite."""
    resolved = out.resolve()
    for src in inputs:
        try:
            if src.is_dir() and (resolved == src.resolve() or src.resolve() in resolved.parents):
                raise ConfigError(f"output.dir {out} is inside the input model directory {src}",
                                  hint="write outputs somewhere else: the input would be modified")
        except OSError:
            continue
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output.dir {out} exists and is not a directory")
    if out.is_dir() and not opts.dry_run:
        lock_output_dir(out)
    if out.is_dir() and any(p.name != ".entrenar.lock" for p in out.iterdir()) and not opts.dry_run:
        if opts.overwrite:
            for name in os.listdir(out):
                if name == ".entrenar.lock":
                    continue
                path = out / name
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        elif not opts.resume:
            raise UsageError(
                f"output directory {out} is not empty",
                hint="pass --resume to continue the run there, --overwrite to start again, or set output.dir",
            )
    if not opts.dry_run:
        try:
            out.mkdir(parents=True, exist_ok=True)
            lock_output_dir(out)
            probe = out / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise UsageError(f"output directory {out} is not writable: {exc.strerror or exc}",
                             hint="choose another output.dir or fix its permissions") from None


def check_free_space(out: Path, needed_bytes: int) -> None:
    """Refuse to start when the disk cannot hold the checkpoints and the final model."""
    try:
        free = shutil.disk_usage(out if out.exists() else out.parent).free
    except OSError:
        return
    if free < needed_bytes:
        from entrenar_cli.errors import EntrenarError

        raise EntrenarError(
            f"not enough disk space in {out}: {human_bytes(free)} free, about {human_bytes(needed_bytes)} needed "
            "for checkpoints and the final model",
            hint="free space, lower output.save_total_limit, or choose another output.dir",
        )


def write_resolved_config(out: Path, cfg: Any) -> None:
    import yaml

    write_text_atomic(out / "resolved_config.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


def log_event(out: Path, record: dict[str, Any]) -> None:
    with open(out / "metrics.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, default=str) + "\n")


def start_event(out: Path, run: str, cfg: Any) -> None:
    log_event(out, {"event": "start", "time": time.time(), "run": run, "config": cfg.model_dump(mode="json")})


def write_summary(out: Path, summary: dict[str, Any]) -> None:
    write_json_atomic(out / "summary.json", summary)


def refresh_report(out: Path) -> Path | None:
    """Regenerate report.html (the report module is optional: a failure never fails a run)."""
    try:
        from entrenar_cli.report import write_report
    except ImportError:
        return None
    try:
        return write_report(out)
    except Exception as exc:  # noqa: BLE001 - a report problem must not lose a finished training run
        from entrenar_cli.console import warn

        warn(f"could not write the run report: {exc}")
        return None


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def memory_phrase(summary: dict[str, Any]) -> str:
    """What the peak-memory number is, said plainly, with the estimate it compares to.

    On a GPU the allocator's peak is training memory; on a CPU the peak RSS also holds the Python
    runtime and libraries (about 0.5 GiB), which the training-memory estimate leaves out.
    """
    peak = human_bytes(summary.get("peak_mem_bytes") or 0)
    est = summary.get("estimated_mem_bytes")
    if summary.get("device") == "cuda":
        text = f"peak GPU memory {peak}"
        return text + (f" (estimate {human_bytes(est)})" if est else "")
    text = f"peak RSS {peak}"
    return text + (f" (whole process; training-memory estimate {human_bytes(est)})" if est else "")
