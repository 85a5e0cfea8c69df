"""Experiment trackers (``training.report_to``) through accelerate's tracker integrations.

Users keep their runs where they already look (TensorBoard, W&B, MLflow, trackio, ...): every
record the engine writes to ``metrics.jsonl`` on rank 0 is sent to each configured tracker too.
entrenar writes no tracker client of its own; accelerate's ``GeneralTracker`` classes do the work.
Offline use needs nothing special: TensorBoard writes event files, MLflow defaults to a local file
store under the run directory here, W&B honours ``WANDB_MODE=offline``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from entrenar_cli.errors import UsageError

# what `report_to` accepts: the names accelerate gives its tracker classes
KNOWN_TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio", "comet_ml", "aim", "clearml", "dvclive", "swanlab")
# the package each tracker imports, for a message that says what to install
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow-skinny", "trackio": "trackio",
             "comet_ml": "comet-ml", "aim": "aim", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab"}
_MODULES = {"mlflow-skinny": "mlflow", "comet-ml": "comet_ml"}


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numeric fields of a metrics record (trackers take numbers; event names become tags)."""
    return {k: float(v) for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}


class Trackers:
    """The run's open trackers; ``log`` fans one metrics record out to all of them."""

    def __init__(self, trackers: list[Any]):
        self._trackers = trackers

    @property
    def names(self) -> list[str]:
        return [t.name for t in self._trackers]

    def log(self, record: dict[str, Any]) -> None:
        """Send a record; train records as ``train/<key>``, evaluations as ``eval/<key>``."""
        if not self._trackers:
            return
        prefix = record.get("event", "train")
        values = {f"{prefix}/{k}": v for k, v in _scalars(record).items()}
        step = int(record.get("step", 0))
        for tracker in self._trackers:
            tracker.log(values, step=step)
        if prefix == "eval":
            self.flush()

    def flush(self) -> None:
        for tracker in self._trackers:
            writer = getattr(tracker, "writer", None)
            if writer is not None and hasattr(writer, "flush"):
                writer.flush()

    def finish(self) -> None:
        for tracker in self._trackers:
            tracker.finish()
        self._trackers = []


def check_available(names: list[str]) -> None:
    """Refuse a tracker whose package is not installed, before any model is loaded."""
    import importlib.util

    for name in names:
        package = _PACKAGES.get(name, name)
        if importlib.util.find_spec(_MODULES.get(package, package)) is None:
            raise UsageError(f"training.report_to names {name!r}, but its package {package!r} is not installed",
                             hint=f"pip install {package}  (or pip install 'entrenar[trackers]'), "
                             "or remove it from training.report_to")


def open_trackers(names: list[str], *, run_name: str, logging_dir: Path, config: dict[str, Any]) -> Trackers:
    """Start each tracker and store the resolved config as its hyper-parameters (rank 0 only)."""
    if not names:
        return Trackers([])
    check_available(names)
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    logging_dir.mkdir(parents=True, exist_ok=True)
    flat = _flatten(config)
    opened = []
    for name in names:
        cls = LOGGER_TYPE_TO_CLASS[name]
        if name == "mlflow":
            # a local file store in the run directory unless the user points MLflow elsewhere
            if "MLFLOW_TRACKING_URI" not in os.environ:
                # MLflow 3 keeps its file store for offline use behind an opt-in
                os.environ["MLFLOW_TRACKING_URI"] = (logging_dir / "mlruns").resolve().as_uri()
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            tracker = cls(experiment_name="entrenar", logging_dir=str(logging_dir), run_name=run_name)
        elif name == "tensorboard":
            tracker = cls(run_name=run_name, logging_dir=str(logging_dir))
        else:
            tracker = cls(run_name, logging_dir=str(logging_dir)) if cls.requires_logging_directory else cls(run_name)
        tracker.start()
        tracker.store_init_configuration(flat)
        opened.append(tracker)
    return Trackers(opened)


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"training.learning_rate": 5e-4, ...} with tracker-safe value types."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{path}."))
        elif isinstance(value, (bool, int, float, str)):
            out[path] = value
        else:
            out[path] = str(value)
    return out
