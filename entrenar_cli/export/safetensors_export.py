"""SafeTensors export: a Hugging Face model directory that ``from_pretrained`` loads as is.

The Rust original wrote a header followed by zero bytes. Here the tensors are written with the
``safetensors`` library itself, sharded with the Hub's own splitter (so file names and the index
are exactly what transformers expects), and the header carries ``format: pt`` (transformers
refuses other values) plus the model metadata.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Optional, Union

from entrenar_cli.export.weights import TOKENIZER_FILES, ModelWeights

DEFAULT_MAX_SHARD_SIZE = "5GB"
INDEX_FILE = "model.safetensors.index.json"


def parse_shard_size(value: Union[str, int]) -> int:
    """Bytes from '5GB', '500MB', '2KB' (decimal units, as the Hub uses) or a plain integer."""
    if isinstance(value, int):
        size = value
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", value, flags=re.IGNORECASE)
        if match is None:
            raise ValueError(f"cannot read size {value!r}; use e.g. 5GB, 500MB or a number of bytes")
        scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}[match.group(2).upper()]
        size = int(float(match.group(1)) * scale)
    if size <= 0:
        raise ValueError(f"size must be positive, got {value!r}")
    return size


def header_metadata(weights: ModelWeights, include_metadata: bool = True) -> dict[str, str]:
    """The string map stored in every shard's header: ``format: pt`` first, then the model facts."""
    meta = {"format": "pt"}
    if include_metadata:
        from entrenar_cli import __version__

        meta.update(weights.metadata.header_strings())
        meta["exporter"] = f"entrenar {__version__}"
    return meta


def write_safetensors_dir(
    weights: ModelWeights,
    out_dir: Path,
    *,
    max_shard_size: Union[str, int] = DEFAULT_MAX_SHARD_SIZE,
    include_metadata: bool = True,
    dtype: Optional[str] = None,
) -> list[Path]:
    """Write ``weights`` as a Hugging Face directory into the (existing, empty) ``out_dir``.

    Writes config.json and generation_config.json when the weights carry them, the tokenizer
    files, and one ``model.safetensors`` or ``model-0000k-of-0000n.safetensors`` shards plus
    ``model.safetensors.index.json`` when the weights exceed ``max_shard_size``.
    ``dtype`` ('F32', 'F16', 'BF16') casts floating tensors; None keeps each tensor's dtype.
    Returns the files written.
    """
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    from entrenar_cli.export.weights import torch_dtype

    tensors = dict(weights.tensors)
    if dtype is not None:
        target = torch_dtype(dtype)
        tensors = {k: (v.to(target) if v.is_floating_point() else v) for k, v in tensors.items()}
    meta = header_metadata(weights, include_metadata)
    if dtype is not None and include_metadata:
        meta["dtype"] = dtype
    split = split_torch_state_dict_into_shards(
        tensors, filename_pattern="model{suffix}.safetensors", max_shard_size=parse_shard_size(max_shard_size)
    )
    written: list[Path] = []
    for filename, names in split.filename_to_tensors.items():
        path = out_dir / filename
        save_file({n: tensors[n].contiguous() for n in names}, str(path), metadata=meta)
        written.append(path)
    if split.is_sharded:
        index = {"metadata": dict(split.metadata), "weight_map": dict(sorted(split.tensor_to_filename.items()))}
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        written.append(out_dir / INDEX_FILE)

    if weights.config is not None:
        config = dict(weights.config)
        if dtype is not None:
            config["dtype"] = str(torch_dtype(dtype)).removeprefix("torch.")
        elif tensors:
            first = next(iter(tensors.values()))
            if first.is_floating_point():
                config["dtype"] = str(first.dtype).removeprefix("torch.")
        config.pop("quantization_config", None)  # the weights written here are plain tensors
        (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        written.append(out_dir / "config.json")
    if weights.generation_config:
        (out_dir / "generation_config.json").write_text(
            json.dumps(weights.generation_config, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
        written.append(out_dir / "generation_config.json")
    written += copy_tokenizer_files(weights, out_dir)
    return written


def copy_tokenizer_files(weights: ModelWeights, out_dir: Path) -> list[Path]:
    """Copy the tokenizer files byte for byte (re-saving through transformers can change them)."""
    written: list[Path] = []
    if weights.tokenizer_dir is not None:
        for fname in TOKENIZER_FILES:
            src = weights.tokenizer_dir / fname
            if src.is_file():
                shutil.copyfile(src, out_dir / fname)
                written.append(out_dir / fname)
    else:
        for fname, blob in weights.files.items():
            if fname in TOKENIZER_FILES:
                (out_dir / fname).write_bytes(blob)
                written.append(out_dir / fname)
    return written
