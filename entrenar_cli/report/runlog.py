"""Read a run directory (metrics.jsonl, summary.json, resolved_config.yaml) into a :class:`RunLog`.

The training engine appends one JSON object per line to ``metrics.jsonl``; ``event`` says which
(``start``, ``train``, ``eval``, ``end``). Every key except ``event`` and ``step`` is optional, so
a run still in progress, or one that logged a single line, reads without error. Only numbers are
kept as metric values; NaN and infinity are kept too (a diverged run must show its divergence).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from entrenar_cli.errors import DataError, UsageError

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "resolved_config.yaml"
BASELINE_DIR = "baseline"

# The loss terms the engine writes, in the order a reader expects them; any other numeric key that
# starts with "loss_" is a further term and is shown after these.
KNOWN_LOSS_TERMS = ("loss", "loss_kd", "loss_ce", "loss_hidden", "loss_attn")


def number(value: Any) -> float | None:
    """``value`` as a float when it is a JSON number (bools are not numbers here), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def finite(value: Any) -> float | None:
    """``value`` as a float when it is a finite JSON number, else None."""
    x = number(value)
    return x if x is not None and math.isfinite(x) else None


@dataclass
class RunLog:
    """Everything one run directory recorded; missing files give empty values, never errors."""

    directory: Path
    start: dict[str, Any] = field(default_factory=dict)
    train: list[dict[str, Any]] = field(default_factory=list)  # sorted by step, one row per step
    evals: list[dict[str, Any]] = field(default_factory=list)  # sorted by step, one row per step
    end: dict[str, Any] | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    config_text: str | None = None
    notes: list[str] = field(default_factory=list)  # problems worth telling the reader, not fatal

    @property
    def kind(self) -> str | None:
        """``distill`` or ``finetune`` when recorded."""
        kind = self.summary.get("run") or self.start.get("run")
        return kind if isinstance(kind, str) else None

    @property
    def name(self) -> str:
        name = self.start.get("name") or self.summary.get("name")
        return name if isinstance(name, str) and name else self.directory.name

    @property
    def status(self) -> str:
        """``completed``/``interrupted``/``failed`` from the end record, else ``in progress``."""
        for source in (self.end or {}, self.summary):
            status = source.get("status")
            if isinstance(status, str) and status:
                return status
        return "in progress"

    @property
    def last_step(self) -> int | None:
        steps = [row["step"] for row in (*self.train, *self.evals)]
        end_steps = number((self.end or {}).get("steps"))
        if end_steps is not None:
            steps.append(int(end_steps))
        return max(steps) if steps else None

    def final_student(self) -> tuple[dict[str, Any], bool]:
        """The student's final numbers: summary.json's ``student``, else those of the latest
        evaluation (a run still going); the flag says they come from an evaluation."""
        student = self.summary.get("student")
        if isinstance(student, dict):
            return student, False
        latest = self.evals[-1] if self.evals else {}
        return {k: latest[k] for k in ("perplexity", "kl_to_teacher", "agreement") if k in latest}, bool(latest)

    def loss_terms(self) -> list[str]:
        """The loss keys present in the train rows: the known ones first, then the others sorted."""
        present = {k for row in self.train for k, v in row.items()
                   if (k == "loss" or k.startswith("loss_")) and number(v) is not None}
        known = [k for k in KNOWN_LOSS_TERMS if k in present]
        return known + sorted(present.difference(known))

    def series(self, key: str, rows: str = "train") -> tuple[list[float], list[float]]:
        """(steps, values) of the rows that carry a number for ``key``; rows is 'train' or 'eval'."""
        xs: list[float] = []
        ys: list[float] = []
        for row in self.train if rows == "train" else self.evals:
            y = number(row.get(key))
            if y is not None:
                xs.append(float(row["step"]))
                ys.append(y)
        return xs, ys

    def has(self, key: str, rows: str = "train") -> bool:
        return any(number(row.get(key)) is not None for row in (self.train if rows == "train" else self.evals))


def check_run_dir(directory: str | Path) -> Path:
    """The run directory as a Path; a usage error (exit 2) when it or its metrics.jsonl is missing."""
    path = Path(directory)
    if not path.exists():
        raise UsageError(
            f"run directory not found: {path}",
            hint="pass the output directory of a distill or finetune run (its output.dir)",
        )
    if not path.is_dir():
        raise UsageError(f"not a directory: {path}", hint="pass the run's output directory, not a file in it")
    if not (path / METRICS_FILE).is_file():
        raise UsageError(
            f"no {METRICS_FILE} in {path}: this is not a run output directory, or the run has not started",
            hint="the training engine writes metrics.jsonl when a distill or finetune run starts",
        )
    return path


def read_run(directory: str | Path) -> RunLog:
    """Read a run directory. Usage error (exit 2) when it is missing; data error (exit 1) when
    metrics.jsonl is corrupt, naming the line. A missing or unreadable summary or config only
    adds a note: the report must render for a run that is still going."""
    path = check_run_dir(directory)
    log = RunLog(directory=path)
    _read_metrics(path / METRICS_FILE, log)
    summary_path = path / SUMMARY_FILE
    if summary_path.is_file():
        try:
            summary = json.loads(summary_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            log.notes.append(f"{summary_path} could not be read ({_reason(exc)}); the final summary is left out")
        else:
            if isinstance(summary, dict):
                log.summary = summary
            else:
                log.notes.append(f"{summary_path} is not a JSON object; the final summary is left out")
    config_path = path / CONFIG_FILE
    if config_path.is_file():
        try:
            log.config_text = config_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            log.notes.append(f"{config_path} could not be read ({_reason(exc)})")
    if log.config_text is None and isinstance(log.start.get("config"), dict):
        import yaml

        log.config_text = yaml.safe_dump(log.start["config"], sort_keys=False)
    return log


def read_baseline(directory: Path) -> tuple[RunLog | None, list[str]]:
    """The CE-only run in ``directory/baseline`` when there is one, and notes about problems with
    it. A broken baseline never stops the main report from rendering."""
    base = directory / BASELINE_DIR
    if not base.is_dir():
        return None, []
    if not (base / METRICS_FILE).is_file():
        return None, [f"{base} has no {METRICS_FILE}: the baseline run has not started or did not record metrics"]
    try:
        log = read_run(base)
    except DataError as exc:
        return None, [f"the baseline run is left out: {exc.message}"]
    return log, list(log.notes)


def _read_metrics(path: Path, log: RunLog) -> None:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})",
                        hint="the file is damaged; restore it or rerun the training") from None
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    lines = text.split("\n")
    # a run that is still writing may leave its last line half-written: that line has no newline
    unterminated = len(lines) if lines and lines[-1].strip() else None
    train: dict[int, dict[str, Any]] = {}
    evals: dict[int, dict[str, Any]] = {}
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if lineno == unterminated:
                log.notes.append(f"{path}:{lineno}: an incomplete last line was ignored (the run may still be writing)")
                break
            raise _corrupt(path, lineno, f"not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(record, dict):
            raise _corrupt(path, lineno, "not a JSON object")
        event = record.get("event")
        if not isinstance(event, str):
            raise _corrupt(path, lineno, "no 'event' key")
        if event in ("train", "eval"):
            step = number(record.get("step"))
            if step is None or not math.isfinite(step) or step < 0 or step != int(step):
                raise _corrupt(path, lineno, f"a {event} record without a whole-number 'step'")
            record["step"] = int(step)
            # a resumed run repeats steps after its last checkpoint: the later record wins
            (train if event == "train" else evals)[int(step)] = record
        elif event == "start":
            if not log.start:
                log.start = record
            else:  # a resumed run starts again; keep the first start's time, take the rest as new
                log.start = {**log.start, **{k: v for k, v in record.items() if k != "time"}}
            log.end = None
        elif event == "end":
            log.end = record
        # unknown events come from newer engines: ignored, not an error
    log.train = [train[s] for s in sorted(train)]
    log.evals = [evals[s] for s in sorted(evals)]


def _corrupt(path: Path, lineno: int, what: str) -> DataError:
    return DataError(
        f"{path}:{lineno}: corrupt metrics line: {what}",
        hint=f"fix or delete line {lineno} of {path.name}, then run 'entrenar report {path.parent}' again",
    )


def _reason(exc: BaseException) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"invalid JSON at line {exc.lineno}: {exc.msg}"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc)
