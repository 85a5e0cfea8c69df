"""Export trained models to files other tools read: SafeTensors, APR (JSON) and GGUF (llama.cpp).

The public API follows the design document::

    from entrenar_cli.export import Exporter, ExportFormat, ModelWeights, ModelMetadata

    weights = ModelWeights()
    weights.add_tensor("model.embed", embedding, [vocab_size, hidden])
    weights.set_metadata(ModelMetadata(name="distilled-llama", architecture="llama"))
    result = Exporter("./output").format(ExportFormat.SAFETENSORS).include_metadata(True).export(weights)
    print(result.path, result.size_human())

:func:`export_model` is the whole `entrenar export` pipeline (load a model directory, a LoRA
adapter or an APR file; write; check parity with an independent reader). Names are resolved
lazily so importing this package does not import torch.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "ExportFormat": "entrenar_cli.export.api",
    "Exporter": "entrenar_cli.export.api",
    "ExportResult": "entrenar_cli.export.api",
    "ExportRequest": "entrenar_cli.export.api",
    "export_model": "entrenar_cli.export.api",
    "ModelWeights": "entrenar_cli.export.weights",
    "ModelMetadata": "entrenar_cli.export.weights",
    "ParityReport": "entrenar_cli.export.parity",
    "read_apr": "entrenar_cli.export.apr",
    "write_apr": "entrenar_cli.export.apr",
    "write_gguf": "entrenar_cli.export.gguf_export",
    "write_safetensors_dir": "entrenar_cli.export.safetensors_export",
    "load_source": "entrenar_cli.export.source",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'entrenar_cli.export' has no attribute {name!r}")
