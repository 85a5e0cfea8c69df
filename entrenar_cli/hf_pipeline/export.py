"""Export with the document's spelling, over :mod:`entrenar_cli.export` (the writers ``entrenar export`` uses)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from entrenar_cli.errors import UsageError
from entrenar_cli.export.api import Exporter as _Exporter
from entrenar_cli.export.api import ExportResult
from entrenar_cli.export.weights import ModelMetadata as _ModelMetadata
from entrenar_cli.export.weights import ModelWeights as _ModelWeights
from entrenar_cli.hf_pipeline._api import New, python_errors


class ExportFormat(str, Enum):
    """SafeTensors (a Hugging Face directory), APR (JSON) or GGUF (llama.cpp); both spellings."""

    SafeTensors = "safetensors"
    Apr = "apr"
    Gguf = "gguf"
    SAFETENSORS = "safetensors"
    APR = "apr"
    GGUF = "gguf"


@dataclass
class ModelMetadata(_ModelMetadata):
    """Model facts written into every export; ``ModelMetadata(name=..., architecture=...)``."""

    @classmethod
    def default(cls) -> "ModelMetadata":
        return cls()


class ModelWeights(New, _ModelWeights):
    """Named tensors plus metadata: ``weights.add_tensor(name, data, shape)``, ``weights.set_metadata(...)``.

    ``ModelWeights.from_model(trainer.student)`` takes a trained model's weights and config.
    """


class Exporter(New, _Exporter):
    """``Exporter(out).format(ExportFormat.SafeTensors).include_metadata(True).export(weights)``."""

    def format(self, fmt: ExportFormat | str) -> "Exporter":  # type: ignore[override]
        value = fmt.value if isinstance(fmt, Enum) else str(fmt).lower()
        try:
            return super().format(value)  # type: ignore[return-value]
        except UsageError:
            raise UsageError(f"Exporter.format({fmt!r}): unknown export format",
                             hint="use ExportFormat.SafeTensors, ExportFormat.Apr or ExportFormat.Gguf") from None

    @python_errors
    def export(self, weights: Any) -> ExportResult:
        """Write ``weights``; returns the path, files and size (``result.size_human()``)."""
        return super().export(weights)


__all__ = ["ExportFormat", "ExportResult", "Exporter", "ModelMetadata", "ModelWeights"]
