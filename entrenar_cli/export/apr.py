"""APR: the design document's "JSON-based, human-readable" model format, defined in docs/apr-format.md.

One JSON object: ``format: "apr"``, ``apr_version``, ``metadata`` (name, architecture, sizes,
training info), the Hugging Face ``config`` (so the file can become a loadable model again), small
``files`` (the tokenizer) and ``tensors`` (name, dtype, shape, data). Data is a flat row-major list
of numbers by default, written with enough digits (9 for float32, 17 for float64) to read back to
the same bits, so APR -> SafeTensors gives identical tensors. The
``base64`` encoding (raw little-endian bytes) is for files too large to be read by people anyway.
The JSON Schema is ``schemas/apr.schema.json``.
"""

from __future__ import annotations

import base64
import json
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Optional

from entrenar_cli.errors import ModelError
from entrenar_cli.export.weights import DTYPE_NAMES, TOKENIZER_FILES, ModelMetadata, ModelWeights, dtype_name

if TYPE_CHECKING:  # pragma: no cover
    import torch

APR_FORMAT = "apr"
APR_VERSION = "1.0"
APR_SUFFIX = ".apr.json"
Encoding = Literal["numbers", "base64"]
# a float written with 9 significant digits takes ~14 bytes (sign, digits, exponent, comma)
BYTES_PER_NUMBER = 14
LARGE_APR_BYTES = 1 << 30  # warn above 1 GiB: JSON is for reading, not for shipping big models


def estimate_apr_bytes(weights: ModelWeights, encoding: Encoding = "numbers") -> int:
    """Approximate size of the APR file, to warn before writing gigabytes of JSON."""
    if encoding == "base64":
        return weights.nbytes() * 4 // 3
    return weights.num_parameters() * BYTES_PER_NUMBER


def write_apr(
    weights: ModelWeights,
    path: Path,
    *,
    encoding: Encoding = "numbers",
    include_metadata: bool = True,
    warn: Optional[Callable[[str], None]] = None,
) -> Path:
    """Write ``weights`` to ``path`` as APR, streaming one tensor at a time (no giant string)."""
    estimate = estimate_apr_bytes(weights, encoding)
    if estimate > LARGE_APR_BYTES:
        from entrenar_cli.fsutil import human_bytes

        message = (
            f"the APR file will be about {human_bytes(estimate)} of JSON; SafeTensors or GGUF are "
            "the formats for shipping large models (APR is for reading and diffing)"
        )
        (warn or (lambda m: warnings.warn(m, stacklevel=3)))(message)
    head: dict[str, Any] = {
        "format": APR_FORMAT,
        "apr_version": APR_VERSION,
        "metadata": weights.metadata.to_dict() if include_metadata else {"name": weights.metadata.name},
        "config": weights.config,
        "generation_config": weights.generation_config,
        "files": _embedded_files(weights),
    }
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(head, indent=1, sort_keys=False)[:-2])  # drop the closing "\n}"
        fh.write(',\n "tensors": [')
        for i, (name, tensor) in enumerate(weights.tensors.items()):
            entry = {"name": name, "dtype": dtype_name(tensor.dtype), "shape": list(tensor.shape), "encoding": encoding}
            fh.write(("\n  " if i == 0 else ",\n  ") + json.dumps(entry)[:-1] + ', "data": ')
            if encoding == "base64":
                fh.write('"' + base64.b64encode(_le_bytes(tensor)).decode("ascii") + '"}')
            else:
                fh.write("[")
                fh.flush()  # numpy writes through the file descriptor
                _write_numbers(fh, name, tensor)
                fh.write("]}")
        fh.write("\n ]\n}\n")
    return path


def read_apr(path: Path) -> ModelWeights:
    """Read an APR file into :class:`ModelWeights`; every problem names the file and the tensor."""
    import numpy as np
    import torch

    from entrenar_cli.export.weights import torch_dtype

    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh, parse_int=_parse_int)
    except FileNotFoundError:
        raise ModelError(f"APR file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path} is not valid JSON: {exc}",
                         hint="APR files are JSON; see docs/apr-format.md") from None
    if not isinstance(doc, dict) or doc.get("format") != APR_FORMAT:
        raise ModelError(f"{path} is not an APR file (missing \"format\": \"apr\")", hint="see docs/apr-format.md")
    version = str(doc.get("apr_version", ""))
    if version.split(".")[0] != APR_VERSION.split(".")[0]:
        raise ModelError(
            f"{path}: APR version {version!r} is not supported (this entrenar reads {APR_VERSION.split('.')[0]}.x)",
            hint="upgrade entrenar",
        )
    tensors = doc.get("tensors")
    if not isinstance(tensors, list):
        raise ModelError(f"{path}: 'tensors' must be a list")
    weights = ModelWeights()
    weights.metadata = ModelMetadata.from_dict(doc.get("metadata") or {})
    weights.config = doc.get("config") or None
    weights.generation_config = doc.get("generation_config") or None
    weights.files = _decode_files(path, doc.get("files") or {})
    for i, entry in enumerate(tensors):
        name = entry.get("name") if isinstance(entry, dict) else None
        where = f"{path}: tensor {name!r}" if name else f"{path}: tensors[{i}]"
        if not isinstance(name, str) or not isinstance(entry.get("shape"), list):
            raise ModelError(f"{where} needs 'name', 'dtype', 'shape' and 'data'")
        dtype = entry.get("dtype")
        if dtype not in DTYPE_NAMES:
            raise ModelError(f"{where}: unknown dtype {dtype!r} (expected one of {', '.join(DTYPE_NAMES)})")
        shape = [int(d) for d in entry["shape"]]
        count = math.prod(shape)
        data = entry.get("data")
        target = torch_dtype(dtype)
        if entry.get("encoding", "numbers") == "base64":
            if not isinstance(data, str):
                raise ModelError(f"{where}: base64 data must be a string")
            raw = base64.b64decode(data)
            item = torch.empty((), dtype=target).element_size()
            if len(raw) != count * item:
                raise ModelError(f"{where}: {len(raw)} bytes of data, shape {shape} needs {count * item}")
            tensor = torch.frombuffer(bytearray(raw), dtype=target).reshape(shape).clone()
        else:
            if not isinstance(data, list):
                raise ModelError(f"{where}: 'data' must be a flat list of numbers")
            if len(data) != count:
                raise ModelError(f"{where}: {len(data)} values, shape {shape} needs {count}")
            if target.is_floating_point:
                tensor = torch.from_numpy(np.asarray(data, dtype=np.float64)).to(target)
            else:
                tensor = torch.tensor(data, dtype=torch.int64).to(target)
            tensor = tensor.reshape(shape)
        if name in weights.tensors:
            raise ModelError(f"{where} appears twice")
        weights.tensors[name] = tensor
    return weights


def _parse_int(text: str) -> Any:
    """Python's json reads "-0" as the integer 0; in tensor data it is the float -0.0."""
    return -0.0 if text == "-0" else int(text)


def _write_numbers(fh: Any, name: str, tensor: "torch.Tensor") -> None:
    """Write a tensor as comma-separated decimals that read back to exactly the same values.

    9 significant digits always identify a float32 (17 a float64); f16 and bf16 widen to float32
    exactly. numpy formats in C (``tofile``), ~4x faster than shortest-repr formatting in Python.
    """
    import numpy as np
    import torch

    flat = tensor.detach().contiguous().reshape(-1)
    if not flat.is_floating_point():
        flat.to(torch.int64).numpy().tofile(fh, sep=",", format="%d")
        return
    wide = flat.to(torch.float64 if flat.dtype == torch.float64 else torch.float32).numpy()
    if not np.isfinite(wide).all():
        raise ModelError(
            f"tensor {name!r} contains NaN or infinite values, which JSON numbers cannot hold",
            hint="the model is broken (check training), or export with --apr-encoding base64",
        )
    wide.tofile(fh, sep=",", format="%.17g" if wide.dtype == np.float64 else "%.9g")


def _le_bytes(tensor: "torch.Tensor") -> bytes:
    import sys

    import numpy as np
    import torch

    flat = tensor.detach().contiguous().reshape(-1)
    if flat.dtype == torch.bfloat16:  # numpy has no bfloat16: ship the raw 16-bit patterns
        flat = flat.view(torch.int16)
    arr = flat.numpy()
    if sys.byteorder == "big":  # pragma: no cover - the format is little-endian everywhere
        arr = arr.byteswap()
    return np.ascontiguousarray(arr).tobytes()


def _embedded_files(weights: ModelWeights) -> dict[str, dict[str, str]]:
    """Tokenizer files inline (text as text, binary such as tokenizer.model as base64)."""
    blobs: dict[str, bytes] = dict(weights.files)
    if weights.tokenizer_dir is not None:
        for fname in TOKENIZER_FILES:
            src = weights.tokenizer_dir / fname
            if src.is_file():
                blobs[fname] = src.read_bytes()
    out: dict[str, dict[str, str]] = {}
    for fname, blob in sorted(blobs.items()):
        try:
            out[fname] = {"encoding": "utf-8", "content": blob.decode("utf-8")}
        except UnicodeDecodeError:
            out[fname] = {"encoding": "base64", "content": base64.b64encode(blob).decode("ascii")}
    return out


def _decode_files(path: Path, files: dict[str, Any]) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for fname, entry in files.items():
        if "/" in fname or "\\" in fname or fname.startswith("."):
            raise ModelError(f"{path}: embedded file name {fname!r} is not a plain file name")
        if not isinstance(entry, dict) or not isinstance(entry.get("content"), str):
            raise ModelError(f"{path}: embedded file {fname!r} needs 'encoding' and 'content'")
        if entry.get("encoding") == "base64":
            out[fname] = base64.b64decode(entry["content"])
        else:
            out[fname] = entry["content"].encode("utf-8")
    return out
