"""Models and datasets from the Hugging Face Hub, safe by default.

Built on ``huggingface_hub`` so users keep their cache, token and mirror settings
(``HF_HOME``, ``HF_HUB_CACHE``, ``HF_ENDPOINT``, ``HF_TOKEN``, ``HF_HUB_OFFLINE``; all read when a
function is called, not at import). Only SafeTensors weights plus config and tokenizer files are
downloaded unless the caller opts in to pickle weights (``allow_pickle``) or asks for GGUF; every
SafeTensors header is parsed after download and a damaged file is removed from the cache.

This package imports no heavy library at import time: ``huggingface_hub`` and ``pyarrow`` load
inside the functions that use them, so the CLI's ``--help`` stays fast.

The functions other modules rely on:

- :func:`resolve_model` - a local path or Hub id to a local directory (or ``.gguf`` file);
- :func:`fetch_config_json` - only ``config.json`` (for memory estimates);
- :func:`fetch_dataset_files` - the Parquet files of one dataset split.
"""

from __future__ import annotations

from entrenar_cli.hub.datasets import (
    DatasetFiles,
    DatasetOptions,
    HfDatasetFetcher,
    fetch_dataset_files,
)
from entrenar_cli.hub.models import (
    FetchOptions,
    FileEntry,
    HfModelFetcher,
    ModelArtifact,
    WeightFormat,
    fetch_config_json,
    resolve_model,
)
from entrenar_cli.hub.verify import verify_gguf, verify_parquet, verify_safetensors

__all__ = [
    "DatasetFiles",
    "DatasetOptions",
    "FetchOptions",
    "FileEntry",
    "HfDatasetFetcher",
    "HfModelFetcher",
    "ModelArtifact",
    "WeightFormat",
    "fetch_config_json",
    "fetch_dataset_files",
    "resolve_model",
    "verify_gguf",
    "verify_parquet",
    "verify_safetensors",
]
