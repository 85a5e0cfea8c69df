"""The design document's Python API (``hf-distillation-pipeline.md``): one import for every name.

    from entrenar_cli.hf_pipeline import (
        HfModelFetcher, FetchOptions, SafeTensorsTeacher, DistillationTrainer, TrainerConfig, Dataset,
    )

A thin facade over the engine the CLI runs: fetching (:mod:`entrenar_cli.hub`), loading
(:mod:`entrenar_cli.models`), the objective and trainer (:mod:`entrenar_cli.objectives`,
:mod:`entrenar_cli.trainer`), data (:mod:`entrenar_cli.data`), estimates and export. Defaults come
from the YAML schema (:mod:`entrenar_cli.config.schema`). ``X::new(a)`` is ``X(a)`` or ``X.new(a)``;
enum members have the document's spelling and the upper-case one. Errors are
:class:`~entrenar_cli.errors.EntrenarError`\\ s whose hints name Python calls.

Names load on first use, so ``import entrenar_cli.hf_pipeline`` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_NAMES = {
    # fetching
    "HfModelFetcher": "fetch", "HfDatasetFetcher": "fetch", "FetchOptions": "fetch", "WeightFormat": "fetch",
    "ModelArtifact": "fetch",
    # memory and fine-tuning configuration
    "MemoryEstimate": "memory", "Architecture": "memory",
    "FineTuneConfig": "finetune", "FineTuneMethod": "finetune", "MixedPrecision": "finetune",
    "LoRAConfig": "finetune", "MemoryRequirement": "finetune",
    # teacher, losses, trainer
    "SafeTensorsTeacher": "teacher", "TeacherModel": "teacher",
    "DistillationLoss": "losses", "ProgressiveDistillation": "losses", "AttentionTransfer": "losses",
    "TrainerConfig": "config", "DistillationYamlConfig": "config",
    "DistillationTrainer": "trainer", "TrainerState": "trainer",
    # data
    "Dataset": "dataset", "DatasetOptions": "dataset", "Split": "dataset", "Batch": "dataset",
    "DistillationCollator": "dataset",
    "TeacherCache": "cache", "CachedOutputs": "cache", "DiskTeacherCache": "cache",
    # export
    "Exporter": "export", "ExportFormat": "export", "ExportResult": "export", "ModelWeights": "export",
    "ModelMetadata": "export",
    # errors
    "EntrenarError": "errors", "ConfigError": "errors", "UsageError": "errors",
}


def __getattr__(name: str) -> Any:
    module = _NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'entrenar_cli.hf_pipeline' has no attribute {name!r}")
    path = "entrenar_cli.errors" if module == "errors" else f"entrenar_cli.hf_pipeline.{module}"
    value = getattr(importlib.import_module(path), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(_NAMES)


__all__ = sorted(_NAMES)
