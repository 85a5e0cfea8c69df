"""Cheap structural checks of downloaded weight and data files, and removal of damaged ones.

A download cut short, a full disk or a broken upload leaves a file that looks present. Parsing
the header (SafeTensors), the magic number (GGUF) or the footer (Parquet) catches that in
milliseconds, long before a training run would fail on it. A file that fails is removed from the
cache (snapshot link and blob) so the next fetch downloads it again instead of trusting it.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from entrenar_cli.errors import DataError, ModelError

# bytes per element; sub-byte and exotic types are checked for offsets only
_DTYPE_BYTES = {
    "F64": 8, "I64": 8, "U64": 8,
    "F32": 4, "I32": 4, "U32": 4,
    "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
    "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I8": 1, "U8": 1, "BOOL": 1,
}
_MAX_HEADER = 100 * 1024 * 1024  # the limit the safetensors library itself enforces


@dataclass(frozen=True)
class SafetensorsSummary:
    """What a valid SafeTensors header says: tensor count, element count, dtypes present."""

    tensors: int
    parameters: int
    dtypes: tuple[str, ...]


def verify_safetensors(path: str | Path) -> SafetensorsSummary:
    """Parse a SafeTensors header and check every tensor lies inside the file.

    Layout: 8-byte little-endian header length N, N bytes of JSON, then the data buffer. Each
    tensor's ``data_offsets`` are relative to the buffer; together they must tile it exactly,
    and each span must match ``prod(shape) * dtype size``.
    """
    p = Path(path)
    size = p.stat().st_size
    with p.open("rb") as fh:
        raw_len = fh.read(8)
        if len(raw_len) < 8:
            raise _corrupt(p, f"file is {size} bytes, too short for a header")
        (n,) = struct.unpack("<Q", raw_len)
        if n == 0 or n > _MAX_HEADER or 8 + n > size:
            raise _corrupt(p, f"header length {n} does not fit a {size}-byte file (truncated?)")
        try:
            header = json.loads(fh.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise _corrupt(p, f"header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise _corrupt(p, "header is not a JSON object")
    data_len = size - 8 - n
    spans: list[tuple[int, int]] = []
    params = 0
    dtypes: set[str] = set()
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            numel = math.prod(int(d) for d in shape)
            begin, end = int(begin), int(end)
        except (KeyError, TypeError, ValueError):
            raise _corrupt(p, f"tensor '{name}' has a malformed header entry") from None
        if not 0 <= begin <= end <= data_len:
            raise _corrupt(p, f"tensor '{name}' lies outside the file "
                              f"(offsets {begin}-{end}, data {data_len} bytes; truncated?)")
        width = _DTYPE_BYTES.get(str(dtype))
        if width is not None and end - begin != numel * width:
            raise _corrupt(p, f"tensor '{name}' has {end - begin} bytes "
                              f"but shape {shape} x {dtype} needs {numel * width}")
        spans.append((begin, end))
        params += numel
        dtypes.add(str(dtype))
    spans.sort()
    cursor = 0
    for begin, end in spans:
        if begin != cursor:
            raise _corrupt(p, f"tensor data has a gap or overlap at byte {cursor}")
        cursor = end
    if cursor != data_len:
        raise _corrupt(p, f"data buffer is {data_len} bytes but the tensors cover {cursor}")
    return SafetensorsSummary(tensors=len(spans), parameters=params, dtypes=tuple(sorted(dtypes)))


def verify_gguf(path: str | Path) -> int:
    """Check the GGUF magic and version; return the version."""
    p = Path(path)
    with p.open("rb") as fh:
        head = fh.read(8)
    if len(head) < 8 or head[:4] != b"GGUF":
        raise _corrupt(p, "not a GGUF file (bad magic number)")
    (version,) = struct.unpack("<I", head[4:8])
    if not 1 <= version <= 16:
        raise _corrupt(p, f"unknown GGUF version {version}")
    return version


def verify_parquet(path: str | Path) -> None:
    """Check the ``PAR1`` magic at both ends of a Parquet file (a truncated file loses its footer)."""
    p = Path(path)
    size = p.stat().st_size
    with p.open("rb") as fh:
        head = fh.read(4)
        fh.seek(max(size - 4, 0))
        tail = fh.read(4)
    if size < 12 or head != b"PAR1" or tail != b"PAR1":
        raise DataError(
            f"corrupt Parquet file {p.name}: missing PAR1 magic (truncated download?)",
            "the file is damaged or incomplete: download it again",
        )


def evict(path: Path, *, local_dir: Path | None = None) -> None:
    """Remove a damaged file so no later run mistakes it for a good download.

    In the Hub cache a snapshot entry is a symlink to a content-addressed blob: both go. In a
    ``--local-dir`` the file and its download metadata go (the metadata would otherwise tell
    ``huggingface_hub`` the file is up to date).
    """
    targets = [path]
    if path.is_symlink():
        targets.append(path.resolve())
    if local_dir is not None:
        try:
            rel = path.relative_to(local_dir)
            targets.append(local_dir / ".cache" / "huggingface" / "download" / f"{rel}.metadata")
        except ValueError:
            pass
    for target in targets:
        try:
            target.unlink()
        except FileNotFoundError:
            pass


def _corrupt(path: Path, why: str) -> ModelError:
    return ModelError(
        f"corrupt SafeTensors file {path.name}: {why}" if path.suffix == ".safetensors"
        else f"corrupt file {path.name}: {why}",
        "the file is damaged or incomplete: download it again",
    )
