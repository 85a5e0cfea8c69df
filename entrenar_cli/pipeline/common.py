"""Pieces every training pipeline shares: the output directory, saving, the summary, the report."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from entrenar_cli.errors import ConfigError, UsageError
from entrenar_cli.fsutil import (
    LOCK_FILE,
    RUN_LIST,
    human_bytes,
    read_run_list,
    record_written,
    update_run_list,
    write_json_atomic,
    write_text_atomic,
)

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
    config_path: Path | None = None  # the YAML file: the output directory must not hold it


_LOCKS: dict[str, Any] = {}


def lock_output_dir(out: Path) -> None:
    """Hold an exclusive lock on ``out`` for this process's lifetime; a second run refuses.

    flock locks vanish with the process, so a crashed run never leaves a stale lock behind.
    """
    import fcntl

    key = str(out.resolve())
    if key in _LOCKS:
        return
    try:
        fh = open(out / LOCK_FILE, "a+")
    except OSError as exc:
        raise _unusable_dir(out, exc) from None
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


@dataclass
class InputPath:
    """A path a run reads: the output directory must neither hold it nor sit inside it."""

    what: str  # "the dataset directory", "the input model directory", "the config file"
    setting: str  # the YAML key (or "config") that names it
    path: Path  # resolved
    # a glob without '**' matches files exactly this many levels below ``path``; None: any depth
    depth: int | None = None


def _glob_root(pattern: str) -> tuple[Path, int | None]:
    """The non-glob root of a dataset path and how deep below it files match (None: any depth)."""
    import glob as globmod

    from entrenar_cli.data import expand_path

    parts = Path(expand_path(pattern)).parts
    for i, part in enumerate(parts):
        if globmod.has_magic(part):
            rest = parts[i:]
            return Path(*parts[:i]) if i else Path("."), None if any("**" in r for r in rest) else len(rest)
    return Path(*parts) if parts else Path("."), None


def _resolve(path: Path) -> Path:
    try:
        return path.expanduser().resolve()
    except (OSError, RuntimeError):
        return path.expanduser().absolute()


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # unreadable: the loader reports it with its own message
        return False


def run_inputs(cfg: Any, config_path: Path | None = None) -> list[InputPath]:
    """Every local path a distill/finetune config reads: models, dataset, the config file itself."""
    found: list[InputPath] = []
    for setting in ("teacher", "student", "model"):
        src = getattr(cfg, setting, None)
        model_id = getattr(src, "model_id", None)
        if not model_id:
            continue
        if model_id.startswith("pkg:"):
            try:
                from entrenar_cli.models import package_path

                path = package_path(model_id)
            except Exception:  # noqa: BLE001 - setup reports a missing package with its own message
                continue
        else:
            path = Path(model_id).expanduser()
        if _exists(path):
            found.append(InputPath("the input model directory" if path.is_dir() else "the input model file",
                                   f"{setting}.model_id", _resolve(path)))
    ds_path = getattr(getattr(cfg, "dataset", None), "path", None)
    if ds_path:
        root, depth = _glob_root(str(ds_path))
        if _exists(root) and root.is_file():
            found.append(InputPath("the dataset file", "dataset.path", _resolve(root)))
        else:
            found.append(InputPath("the dataset directory", "dataset.path", _resolve(root), depth))
    if config_path is not None:
        found.append(InputPath("the config file", "config", _resolve(config_path)))
    return found


def _check_location(out: Path, inputs: Sequence[InputPath | Path]) -> None:
    """Refuse an output directory whose writes (and --overwrite) could touch the user's files or inputs."""
    if not str(out).strip():
        raise ConfigError("output.dir is empty", hint="set output.dir to a directory of its own, e.g. runs/my-run")
    resolved = _resolve(out)
    hint = "set output.dir to a directory of its own, e.g. runs/my-run"
    if resolved == Path(resolved.anchor):
        raise ConfigError(f"output.dir {out} is the filesystem root", hint=hint)
    for place, what in ((_resolve(Path.home()), "your home directory"),
                        (_resolve(Path.cwd()), "the current working directory")):
        if resolved == place:
            raise ConfigError(f"output.dir {out} is {what} ({place})", hint=hint)
        if place.is_relative_to(resolved):
            raise ConfigError(f"output.dir {out} contains {what} ({place})", hint=hint)
    for item in inputs:
        src = item if isinstance(item, InputPath) else InputPath("the input model directory", "model_id",
                                                                 _resolve(Path(item)))
        where = f"{src.path} ({src.setting})" if src.setting != "config" else str(src.path)
        if resolved == src.path:
            raise ConfigError(f"output.dir {out} is {src.what} {where}",
                              hint="write outputs somewhere else: the input would be modified")
        if src.path.is_relative_to(resolved):
            raise ConfigError(f"output.dir {out} contains {src.what} {where}",
                              hint="move the output directory out of the way of the inputs: --overwrite and the "
                              "run's own writes must never reach them")
        if resolved.is_relative_to(src.path) and src.what not in ("the input model file", "the dataset file",
                                                                  "the config file"):
            if src.depth is not None and len(resolved.relative_to(src.path).parts) >= src.depth:
                continue  # a glob like data/*.txt never reaches files of data/runs/x/
            consequence = ("a later run would read this run's outputs as training data"
                           if "dataset" in src.what else "the input would be modified")
            raise ConfigError(f"output.dir {out} is inside {src.what} {where}",
                              hint=f"write outputs somewhere else: {consequence}")


def _unusable_dir(out: Path, exc: OSError) -> UsageError:
    """An output directory the OS refuses (permissions, read-only mount, a file in the way)."""
    import errno

    reason = exc.strerror or str(exc)
    what = {errno.EROFS: "is on a read-only file system", errno.EACCES: "is not writable (permission denied)",
            errno.EPERM: "is not writable (operation not permitted)",
            errno.ENOTDIR: "cannot be created: a file is in the way"}.get(exc.errno or 0, f"cannot be used: {reason}")
    where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(out) else ""
    return UsageError(f"output directory {out} {what}{where}",
                      hint="choose another output.dir, or fix its permissions or mount")


# temporaries of entrenar's atomic writes: .NAME.XXXXXXXX.tmp, .NAME.old-PID, .model-XXXXXXXX.tmp, the probe
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?:[a-z0-9_]{8}\.tmp|old-\d+)$")


def _is_ours(name: str, listed: set[str]) -> bool:
    if name in listed or name in (LOCK_FILE, RUN_LIST) or name.startswith(_PROBE):
        return True
    if name.startswith(".model-") and name.endswith(".tmp"):
        return True
    m = _TEMP.match(name)
    return bool(m and (m["name"] in listed or m["name"] == RUN_LIST))


def _names(out: Path, names: list[str]) -> str:
    shown = ", ".join(str(out / n) for n in names[:3])
    return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _remove_earlier_run(out: Path, existing: list[str]) -> None:
    """--overwrite: delete what the run list names; anything else in the way is the user's: refuse."""
    data = read_run_list(out)
    if data is None:
        raise UsageError(
            f"output directory {out} is not empty and holds no record of an entrenar run ({RUN_LIST}): "
            f"{_names(out, existing)}",
            hint="--overwrite deletes only what an earlier entrenar run wrote; move these files away, "
                 "or choose another output.dir",
        )
    listed = {Path(n).parts[0] for n in data["written"]
              if n and not Path(n).is_absolute() and ".." not in Path(n).parts}
    foreign = [n for n in existing if not _is_ours(n, listed)]
    if foreign:
        raise UsageError(
            f"output directory {out} holds {_names(out, foreign)}, which entrenar did not write",
            hint="--overwrite deletes only what an earlier entrenar run wrote (listed in "
                 f"{out / RUN_LIST}); move these files away, or choose another output.dir",
        )
    for name in existing:
        path = out / name
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise UsageError(f"--overwrite could not remove {path}: {exc.strerror or exc}",
                             hint="fix its permissions, or choose another output.dir") from None


_PROBE = ".entrenar-probe-"


def prepare_output_dir(out: Path, opts: RunOptions, inputs: Sequence[InputPath | Path] = ()) -> None:
    """Check, create and lock the output directory; refuse to mix runs unless --resume or --overwrite.

    The order matters: where it is (never the working directory, home, ``/``, or overlapping an
    input), then whether the OS lets us write there, then the lock, then what is already inside.
    ``inputs``: :func:`run_inputs` (a bare Path counts as an input model directory).
    """
    import tempfile

    _check_location(out, inputs)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output.dir {out} exists and is not a directory",
                          hint="set output.dir to a directory of its own, e.g. runs/my-run")
    if opts.dry_run:
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=_PROBE, dir=out)  # writability first, then the lock
        os.close(fd)
        os.unlink(probe)
        existing = sorted(os.listdir(out))
    except OSError as exc:
        raise _unusable_dir(out, exc) from None
    lock_output_dir(out)
    existing = [n for n in existing if n not in (LOCK_FILE, RUN_LIST)]
    if existing and not opts.resume:
        if not opts.overwrite:
            raise UsageError(
                f"output directory {out} is not empty",
                hint="pass --resume to continue the run there, --overwrite to start again (it deletes only what "
                     "an earlier entrenar run wrote), or set output.dir",
            )
        _remove_earlier_run(out, existing)
    try:
        if opts.resume and read_run_list(out) is not None:
            return
        # from here on the directory has a list of what this run writes (a fresh one after --overwrite)
        write_json_atomic(out / RUN_LIST, {"version": 1, "written": [], "created": time.time()})
    except OSError as exc:
        raise _unusable_dir(out, exc) from None


def interrupted_error(result: dict[str, Any], out: Path, command: str) -> Exception:
    """The exit-1 error of a run stopped by SIGINT/SIGTERM: where it stopped and how to continue."""
    from entrenar_cli.errors import TrainingError

    if result["steps"] == 0:
        return TrainingError(f"interrupted before the first optimizer step of {result['total_steps']}: nothing to save",
                             hint=f"start again with: entrenar {command} CONFIG --overwrite")
    return TrainingError(f"interrupted at step {result['steps']} of {result['total_steps']}: checkpoint saved in "
                         f"{out / 'checkpoints'}", hint=f"continue with: entrenar {command} CONFIG --resume")


def after_stop_signal(out: Path, *, skipped: str | None = None) -> None:
    """A signal came after the last optimizer step, and the model and summary were saved regardless.

    Nothing the user asked for is lost, so this is a normal end (exit 0) with a note; when something
    requested after the model (the ``--baseline`` run) was not done, it is an exit-1 error instead.
    """
    from entrenar_cli.console import warn
    from entrenar_cli.errors import TrainingError
    from entrenar_cli.signals import STOP

    if skipped:
        raise TrainingError(f"{STOP.name} received after training: the model is saved in {out}, but {skipped}",
                            hint="rerun with --overwrite to get the comparison")
    warn(f"{STOP.name} received after the last training step: the model and summary were saved anyway in {out}; "
         f"the final report was skipped (entrenar report {out} writes it)")


def store_student_before(out: Path, before: dict[str, Any]) -> None:
    """Keep the student's metrics before training with the run, so a --resumed run still reports them."""
    update_run_list(out, student_before=before)


def stored_student_before(out: Path) -> dict[str, Any] | None:
    data = read_run_list(out)
    value = data.get("student_before") if data else None
    return value if isinstance(value, dict) else None


def disk_bytes_needed(parameters: int, trainable: int, keep_checkpoints: int, *, full_model: bool = True,
                      adapter: bool = False) -> int:
    """What a run writes at its peak, for the free-space check before training.

    ``keep_checkpoints + 1`` checkpoints (a new one is complete before the oldest is pruned), each
    the trainable weights and AdamW's two moments in fp32 (12 bytes per trainable parameter); the
    final model in fp32 (full or merged) and the adapter; 16 MiB for metrics, tokenizer and report.
    """
    checkpoint = trainable * 12
    final = (parameters * 4 if full_model else 0) + (trainable * 4 if adapter else 0)
    return int(checkpoint * (keep_checkpoints + 1) + final + 16 * 2**20)


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


# errors that can only come from writing: disk full, quota, file-size limit (ulimit -f), read-only
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


@contextlib.contextmanager
def output_write_errors(out: Path) -> Iterator[None]:
    """Disk full (or a quota, a file-size limit, a read-only remount) while saving: one message naming
    the file and what is kept, exit 1, instead of a traceback."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - re-raised unless it is a write failure
        from entrenar_cli.errors import os_error_code

        code = os_error_code(exc)
        filename = getattr(exc, "filename", None)
        under_out = bool(filename) and _resolve(Path(str(filename))).is_relative_to(_resolve(out))
        if code not in _WRITE_ERRNOS and not (code in (errno.EACCES, errno.EPERM) and under_out):
            raise
        from entrenar_cli.checkpoint import latest_checkpoint
        from entrenar_cli.errors import EntrenarError

        reason = os.strerror(code) if code else str(exc)
        kept = latest_checkpoint(out)
        raise EntrenarError(
            f"could not write {filename or out}: {reason}",
            hint=("free disk space (or raise the file-size limit, ulimit -f) and continue with --resume: the last "
                  f"complete checkpoint is {kept}" if kept else
                  "free disk space (or raise the file-size limit, ulimit -f), or choose another output.dir; "
                  "no checkpoint was completed"),
        ) from None


def write_resolved_config(out: Path, cfg: Any) -> None:
    import yaml

    record_written(out, "resolved_config.yaml")
    write_text_atomic(out / "resolved_config.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


def log_event(out: Path, record: dict[str, Any]) -> None:
    record_written(out, "metrics.jsonl")
    with open(out / "metrics.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, default=str) + "\n")


def start_event(out: Path, run: str, cfg: Any) -> None:
    log_event(out, {"event": "start", "time": time.time(), "run": run, "config": cfg.model_dump(mode="json")})


def write_summary(out: Path, summary: dict[str, Any]) -> None:
    record_written(out, "summary.json")
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


def weight_average_note(ema_decay: float | None) -> str:
    """The plan's words for ``training.ema_decay`` (empty when off): the metrics are the average's."""
    if ema_decay is None:
        return ""
    return f"; weights averaged (EMA, decay {ema_decay:g}): evaluations and the saved model use the average"


def advisory_estimate(compute: Callable[[], int]) -> int | None:
    """Run a memory estimate that is advice, not a precondition: at run time a failure is a warning
    with its reason (training goes on); under ``ENTRENAR_STRICT_ESTIMATE=1`` (the test suite) it
    raises, so an estimator bug cannot hide as a silently missing estimate."""
    import os

    try:
        return int(compute())
    except Exception as exc:  # noqa: BLE001 - any estimator failure: warn with the reason, keep training
        if os.environ.get("ENTRENAR_STRICT_ESTIMATE") == "1":
            raise
        from entrenar_cli.console import warn

        warn(f"no memory estimate: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        return None


# ---- the run skeleton shared by distill and finetune ------------------------------------------


def precision_and_device(settings: Any) -> tuple[Any, Any]:
    """(PrecisionChoice: the precision and the reason the plan prints, device), resolved once per run:
    the pipeline hands the precision to the Engine, so the plan and the training cannot disagree."""
    from entrenar_cli.precision import choose_precision
    from entrenar_cli.trainer import resolve_device

    device = resolve_device(settings.device)
    return choose_precision(settings.mixed_precision, device), device


def masked_lm_tokens(task: str, tokenizer: Any) -> dict[str, int] | None:
    """The special ids masked-LM batches need (cls/sep are never masked), or None for other tasks."""
    if task != "masked" or tokenizer.mask_token_id is None:
        return None
    return {"cls": tokenizer.cls_token_id, "sep": tokenizer.sep_token_id, "mask": tokenizer.mask_token_id}


class TrainingRun:
    """One kind of training run (distill, finetune) as :func:`run_training` sees it.

    The skeleton owns the order every run follows and everything the kinds share (output directory,
    plan, free-space check, signals, the engine, metrics before training, the final save, summary,
    end event, report, the interrupted error). A kind supplies only what differs: :meth:`setup`
    (load models and data), :meth:`plan`, :meth:`objective`, :meth:`save` and its summary fields.
    """

    command = "run"  # the subcommand: the metrics' run name and the hints' "entrenar <command>"

    def __init__(self, cfg: Any, opts: RunOptions) -> None:
        self.cfg = cfg
        self.opts = opts
        self.out = Path(cfg.output.dir)
        # set by setup()
        self.model: Any = None
        self.tokenizer: Any = None
        self.train_blocks: Any = None
        self.eval_blocks: Any = None
        self.precision = "fp32"

    # ---- what each kind supplies -----------------------------------------------------------

    def setup(self) -> None:
        """Load the models, tokenizer and data into the attributes above."""
        raise NotImplementedError

    def plan(self) -> dict[str, Any]:
        """What the run will do: printed before training, returned by --dry-run, kept in the summary."""
        raise NotImplementedError

    def print_plan(self, plan: dict[str, Any]) -> None:
        raise NotImplementedError

    def disk_bytes(self, plan: dict[str, Any]) -> int:
        """Disk the run writes at its peak (see :func:`disk_bytes_needed`)."""
        raise NotImplementedError

    def objective(self) -> Any:
        raise NotImplementedError

    def summary(self, plan: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
        """The kind's summary fields for this engine result (run, models, metrics)."""
        raise NotImplementedError

    def save(self, model: Any) -> dict[str, str]:
        """Write the trained model into the output directory; returns the summary's ``outputs``."""
        raise NotImplementedError

    def format_eval(self, metrics: dict[str, Any]) -> str:
        return f"ppl {metrics['perplexity']:.4g}" if "perplexity" in metrics else ""

    def print_summary(self, summary: dict[str, Any]) -> None:
        raise NotImplementedError

    def on_start(self) -> None:
        """Main process, before the engine starts: record extra outputs of this run."""

    def after_training(self, summary: dict[str, Any]) -> None:
        """Main process, after the model and summary are saved, unless a signal came (distill --baseline)."""

    def skipped_on_signal(self, summary: dict[str, Any]) -> str | None:
        """What :meth:`after_training` did not finish because of a signal (an exit-1 note), or None."""
        return None

    # ---- shared -------------------------------------------------------------------------------

    def engine(self, objective: Any) -> Any:
        from entrenar_cli.trainer import Engine, EngineOptions

        out, opts = self.out, self.opts

        def on_eval(record: dict[str, Any]) -> None:
            from entrenar_cli.console import info

            info(f"eval step {record['step']}: " + self.format_eval(record))
            refresh_report(out)

        return Engine(self.cfg.training, self.model, objective, self.train_blocks, self.eval_blocks,
                      EngineOptions(output_dir=out, run=self.command, resume=opts.resume, progress=opts.progress,
                                    keep_checkpoints=self.cfg.output.save_total_limit, on_eval=on_eval),
                      pad_token_id=self.tokenizer.pad_token_id or 0, precision=self.precision)


def run_training(run: TrainingRun) -> dict[str, Any]:
    """The one run skeleton: prepare -> plan -> train -> save -> summary -> report; returns the summary."""
    from entrenar_cli.console import info, is_main_process
    from entrenar_cli.signals import STOP

    out, opts = run.out, run.opts
    main = is_main_process()
    if main:  # under torchrun only rank 0 owns the output directory
        prepare_output_dir(out, opts, run_inputs(run.cfg, opts.config_path))
    run.setup()
    plan = run.plan()
    if main:
        run.print_plan(plan)
    if opts.dry_run:
        return {"dry_run": True, "plan": plan}
    if main:
        check_free_space(out, run.disk_bytes(plan))
    # from the first step until the model is saved, SIGINT/SIGTERM stop at a safe point
    with STOP, output_write_errors(out):
        summary = train_and_save(run, plan)
        if not main:
            return summary
        if STOP.signal is None:
            run.after_training(summary)
        if STOP.signal is not None:
            after_stop_signal(out, skipped=run.skipped_on_signal(summary))
            return summary
    report = refresh_report(out)
    if report:
        info(f"report: {report}")
    return summary


def train_and_save(run: TrainingRun, plan: dict[str, Any]) -> dict[str, Any]:
    """Train through the shared engine, then save the model and summary (exit 1 with a checkpoint when
    interrupted)."""
    from entrenar_cli.checkpoint import latest_checkpoint
    from entrenar_cli.console import info, is_main_process
    from entrenar_cli.signals import pause_for_tests

    out, opts = run.out, run.opts
    main = is_main_process()
    if main:
        write_resolved_config(out, run.cfg)
        record_written(out, "metrics.jsonl")
        if not (opts.resume and (out / "metrics.jsonl").exists()):
            start_event(out, run.command, run.cfg)
        run.on_start()
    engine = run.engine(run.objective())
    if opts.resume and latest_checkpoint(out) is not None:
        before = stored_student_before(out) or {}  # measured by the first run, before its first step
    else:
        before = engine.evaluate() if len(run.eval_blocks) else {}
        if before:
            info("before training: " + run.format_eval(before))
            if main:
                store_student_before(out, before)
    result = engine.train()
    summary = run.summary(plan, result)
    if before:
        summary["student_before"] = {k: before[k] for k in SUMMARY_METRICS if k in before}
    if engine.is_main:
        if result["status"] == "completed":
            model = engine.accelerator.unwrap_model(engine.model)
            pause_for_tests("the final save")
            summary["outputs"] = run.save(model)
            summary["student"]["size_bytes"] = dir_size(out)
        write_summary(out, summary)
        log_event(out, {"event": "end", "time": time.time(), "status": result["status"], "steps": result["steps"]})
        run.print_summary(summary)
    if result["status"] == "interrupted":
        if engine.is_main:
            refresh_report(out)
        raise interrupted_error(result, out, run.command)
    return summary


# the engine result's fields every summary carries, and the held-out metrics a summary reports
RESULT_FIELDS = ("status", "steps", "total_steps", "tokens", "elapsed_s", "tokens_per_s", "peak_mem_bytes",
                 "precision", "device", "skipped_steps", "resumed_from")
SUMMARY_METRICS = ("perplexity", "eval_loss", "kl_to_teacher", "agreement", "embedding_cosine", "hidden_mse",
                   "teacher_nll_of_student")
