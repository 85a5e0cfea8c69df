"""Training data: read documents, tokenize once into a disk-backed token store, pack into blocks.

Documents stream from text files, JSONL, Parquet (``iter_batches``) or a Hub dataset, and their
tokens go straight to a ``uint32`` file that is memory-mapped for training (the nanoGPT recipe):
memory does not grow with the dataset, later epochs and later runs skip tokenization, and a
resumed run can address any block by index. The store is keyed by a fingerprint of the files, the
tokenizer and the settings.

Held-out data is split by document (a hash of the document's identity), so no evaluation text
leaks into training through a shared document.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import re
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from entrenar_cli.errors import EXIT_USAGE, ConfigError, DataError, UsageError, shorten_path
from entrenar_cli.fsutil import atomic_path, cache_root, name_path, write_json_atomic

TEXT_SUFFIXES = {".txt", ".py", ".md", ".rst", ".text", ".c", ".h", ".js", ".ts", ".rs", ".go", ".java", ".cfg",
                 ".toml", ".yaml", ".yml", ".html", ".css"}
STORE_VERSION = 4


def ensure_cache_dir(directory: Path) -> Path:
    """Create a directory under the cache, or say which path is in the way (exit code 2).

    A cache root that is a file, or a file where a cache sub-directory belongs, would otherwise
    surface as a bare NotADirectoryError far from its cause.
    """
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in (directory, *directory.parents) if p.exists() and not p.is_dir()), directory)
        raise UsageError(f"the cache directory {directory} cannot be created: {blocker} is a file, not a directory",
                         hint="move that file away, or set ENTRENAR_CACHE to a directory") from None
    except OSError as exc:
        raise UsageError(f"the cache directory {directory} cannot be created: {(exc.strerror or str(exc)).lower()}",
                         hint="set ENTRENAR_CACHE to a writable directory") from None
    return directory


def _unreadable(path: Path, exc: OSError) -> DataError:
    """A dataset file or directory the operating system refused to read, named."""
    reason = (exc.strerror or type(exc).__name__).lower()
    user = isinstance(exc, (PermissionError, IsADirectoryError, NotADirectoryError)) or exc.errno in (
        errno.ENAMETOOLONG, errno.ELOOP)
    hint = ("check the file's permissions (ls -l), or leave it out of dataset.path"
            if isinstance(exc, PermissionError) else "check dataset.path")
    return DataError(f"cannot read {shorten_path(exc.filename or path)}: {reason}", hint=hint,
                     exit_code=EXIT_USAGE if user else None)


def expand_path(pattern: str) -> str:
    """Expand ``{stdlib}`` (the Python standard library source) and ``~`` in a dataset path."""
    return os.path.expanduser(pattern.replace("{stdlib}", sysconfig.get_paths()["stdlib"]))


def resolve_files(pattern: str) -> list[Path]:
    """Files named by a path, directory (recursive) or glob, sorted for determinism."""
    expanded = expand_path(pattern)
    p = Path(expanded)
    try:
        if p.is_file():
            return [p]
        if p.is_dir():
            files = [f for f in _walk(p) if f.is_file() and _kind_of(f, "auto") is not None]
        else:
            files = [Path(f) for f in sorted(glob.glob(expanded, recursive=True)) if Path(f).is_file()]
    except OSError as exc:
        raise _unreadable(p, exc) from None
    if not files:
        raise DataError(
            f"dataset.path {pattern!r} matches no files",
            hint="give a file, a directory or a glob such as 'data/**/*.txt' ('{stdlib}' is the Python stdlib)",
        )
    return files


def _walk(root: Path) -> list[Path]:
    """Every entry under ``root``, sorted like ``sorted(root.rglob('*'))``, but a directory that
    cannot be read is an error naming it (rglob skips it silently: its files would be lost)."""

    def fail(exc: OSError) -> None:
        raise exc

    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=fail):
        base = Path(dirpath)
        found.extend(base / name for name in (*dirnames, *filenames))
    return sorted(found)


def _kind_of(path: Path, fmt: str) -> str | None:
    if fmt != "auto":
        return fmt
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return "parquet"
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    if suffix in TEXT_SUFFIXES:
        return "text"
    return None


@dataclass
class Document:
    """One unit of text (or one instruction row) with a stable identity for the held-out split."""

    key: str
    text: str | None = None
    row: dict[str, Any] | None = None


def iter_documents(
    files: list[Path], *, fmt: str = "auto", text_column: str = "text", raw_rows: bool = False
) -> Iterator[Document]:
    """Stream documents from files; rows are passed through whole when ``raw_rows``.

    Document keys are paths relative to the files' common folder, so the held-out split is the
    same on every machine and in every checkout.
    """
    root = Path(os.path.commonpath([str(f.parent) for f in files])) if files else Path(".")
    for path in files:
        kind = _kind_of(path, fmt)
        if kind is None:
            continue
        rel = str(path.relative_to(root)) if path.is_relative_to(root) else path.name
        if kind == "text":
            try:
                text = path.read_text(encoding="utf-8", errors="replace")
            except OSError as exc:
                raise _unreadable(path, exc) from None
            if text.strip():
                yield Document(key=rel, text=text)
        elif kind == "jsonl":
            yield from _iter_jsonl(path, text_column, raw_rows, rel)
        elif kind == "parquet":
            yield from _iter_parquet(path, text_column, raw_rows, rel)


# a \uD800-\uDFFF escape: only lines holding one need the (slower) check for a lone surrogate
_SURROGATE_ESCAPE = re.compile(rb"\\[uU][dD][89abcdefABCDEF]")


def _iter_jsonl(path: Path, column: str, raw_rows: bool, rel: str) -> Iterator[Document]:
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise _unreadable(path, exc) from None
    with fh:
        for lineno, raw in _numbered_lines(fh, path):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})",
                    hint="JSONL is UTF-8 text with one JSON object per line; check that this is the file you meant",
                ) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON: {exc.msg}",
                                hint="JSONL needs one JSON object per line") from None
            except RecursionError:
                raise DataError(f"{path}:{lineno}: the JSON is nested too deeply to read",
                                hint="JSONL needs one flat JSON object per line") from None
            except ValueError as exc:  # e.g. an integer of more than 4300 digits
                raise DataError(f"{path}:{lineno}: cannot read this JSON: {exc}") from None
            if _SURROGATE_ESCAPE.search(raw) and _lone_surrogate(row):
                raise DataError(
                    f"{path}:{lineno}: a lone surrogate (an unpaired \\udXXX escape) is not valid Unicode text",
                    hint="fix that line: a UTF-16 surrogate escape needs its pair, or remove it",
                )
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            if raw_rows:
                yield Document(key=f"{rel}:{lineno}", row=row)
                continue
            if column not in row:
                raise DataError(
                    f"{path}:{lineno}: no field {column!r} (fields: {', '.join(row) or 'none'})",
                    hint="set dataset.text_column to the field that holds the text",
                )
            text = row[column]
            if isinstance(text, str) and text.strip():
                yield Document(key=f"{rel}:{lineno}", text=text)


def _numbered_lines(fh: Any, path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes) of a binary file; a read error names the file and line."""
    lineno = 0
    while True:
        try:
            raw = fh.readline()
        except OSError as exc:
            raise DataError(f"{path}:{lineno + 1}: cannot read: {(exc.strerror or str(exc)).lower()}") from None
        if not raw:
            return
        lineno += 1
        yield lineno, raw


def _lone_surrogate(value: Any) -> bool:
    """Whether a parsed JSON value holds a string that cannot be encoded as UTF-8."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _iter_parquet(path: Path, column: str, raw_rows: bool, rel: str) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({exc})",
                        hint="check the file, or set dataset.format for its real format") from None
    names = pf.schema_arrow.names
    if not raw_rows and column not in names:
        raise DataError(f"{path}: no column {column!r} (columns: {', '.join(names)})",
                        hint="set dataset.text_column to the column that holds the text")
    index = 0
    batches = pf.iter_batches(batch_size=1024, columns=None if raw_rows else [column])
    while True:
        try:
            batch = next(batches, None)
            rows = batch.to_pylist() if batch is not None else None
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise DataError(f"{path}: cannot read the rows after row {index}: the Parquet file is corrupt ({exc})",
                            hint="check or re-download the file") from None
        if rows is None:
            break
        for row in rows:
            index += 1
            if raw_rows:
                yield Document(key=f"{rel}#{index}", row=row)
                continue
            text = row[column]
            if isinstance(text, str) and text.strip():
                yield Document(key=f"{rel}#{index}", text=text)


def is_heldout(key: str, fraction: float) -> bool:
    """Deterministic per-document held-out assignment."""
    if fraction <= 0:
        return False
    # surrogateescape: a file name that is not UTF-8 still hashes (to the same value as before otherwise)
    h = int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=8).digest(), "little")
    return (h / 2**64) < fraction


# ---- tokenized store ------------------------------------------------------------------------


@dataclass
class TokenStore:
    """Memory-mapped token ids (+ optional loss mask) for one split."""

    tokens: np.ndarray  # uint32 [n]
    loss_mask: np.ndarray | None  # uint8 [n] or None (all tokens count)
    documents: int

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of the tokenizer's vocabulary and special tokens (teacher-cache and data keys)."""
    h = hashlib.sha256()
    vocab = tokenizer.get_vocab()
    for tok, idx in sorted(vocab.items(), key=lambda kv: kv[1]):
        h.update(f"{idx}:{tok}\n".encode())
    h.update(json.dumps([tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]).encode())
    return h.hexdigest()[:16]


def files_fingerprint(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        try:
            st = f.stat()
        except OSError as exc:
            raise _unreadable(f, exc) from None
        h.update(f"{f.resolve()}:{st.st_size}:{int(st.st_mtime)}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:16]


Encoder = Any  # callable(Document) -> (ids, mask | None) or None to skip


def build_stores(
    documents: Iterator[Document],
    encode: Encoder,
    directory: Path,
    *,
    eval_fraction: float,
    max_documents: int | None = None,
    max_tokens: int | None = None,
    min_eval_tokens: int = 1,
    meta: dict[str, Any] | None = None,
) -> tuple[TokenStore, TokenStore]:
    """Tokenize documents into train/eval stores under ``directory`` (reused when complete).

    ``max_tokens`` bounds the training split: reading stops once it is reached. When a held-out
    split is asked for but hashing gave it fewer than ``min_eval_tokens`` (one block), the last
    training document moves there, so a run never trains silently without evaluation.
    """
    manifest = directory / "manifest.json"
    if manifest.is_file():
        try:
            info = json.loads(manifest.read_text())
            if info.get("version") == STORE_VERSION and info.get("meta") == (meta or {}):
                return _open_store(directory, "train", info), _open_store(directory, "eval", info)
        except (OSError, ValueError, KeyError, TypeError):
            pass  # an incomplete or damaged store is rebuilt
    ensure_cache_dir(directory)
    counts = {"train": 0, "eval": 0}
    docs = {"train": 0, "eval": 0}
    any_mask = False
    last_train_doc: tuple[np.ndarray, np.ndarray | None] | None = None
    paths = {s: (directory / f"{s}.tokens", directory / f"{s}.mask") for s in ("train", "eval")}
    with atomic_path(paths["train"][0]) as tt, atomic_path(paths["train"][1]) as tm, \
            atomic_path(paths["eval"][0]) as et, atomic_path(paths["eval"][1]) as em:
        handles = {"train": (open(tt, "wb"), open(tm, "wb")), "eval": (open(et, "wb"), open(em, "wb"))}
        try:
            n_docs = 0
            for doc in documents:
                if max_documents is not None and n_docs >= max_documents:
                    break
                if max_tokens is not None and counts["train"] >= max_tokens:
                    break
                encoded = encode(doc)
                if encoded is None:
                    continue
                ids, mask = encoded
                if len(ids) == 0:
                    continue
                n_docs += 1
                ids_arr = np.asarray(ids, dtype=np.uint32)
                mask_arr = np.ones(len(ids_arr), dtype=np.uint8) if mask is None else np.asarray(mask, dtype=np.uint8)
                any_mask = any_mask or mask is not None
                split = "eval" if is_heldout(doc.key, eval_fraction) else "train"
                if split == "train":
                    last_train_doc = (ids_arr, mask_arr)
                handles[split][0].write(ids_arr.tobytes())
                handles[split][1].write(mask_arr.tobytes())
                counts[split] += len(ids_arr)
                docs[split] += 1
            # a held-out split is asked for but hashing gave it less than a block: hold out the last document
            if eval_fraction > 0 and counts["eval"] < min_eval_tokens and docs["train"] > 1 \
                    and last_train_doc is not None:
                ids_arr, mask_arr = last_train_doc
                handles["eval"][0].write(ids_arr.tobytes())
                handles["eval"][1].write(mask_arr.tobytes())
                counts["eval"] += len(ids_arr)
                docs["eval"] += 1
                for fh in handles["train"]:
                    fh.flush()
                handles["train"][0].truncate((counts["train"] - len(ids_arr)) * 4)
                handles["train"][1].truncate(counts["train"] - len(ids_arr))
                counts["train"] -= len(ids_arr)
                docs["train"] -= 1
        except OSError as exc:  # disk full, file-size limit: say which store
            name_path(exc, directory)
            raise
        finally:
            for pair in handles.values():
                for fh in pair:
                    fh.close()
    if docs["train"] == 0 and docs["eval"] > 0:
        raise DataError(f"all {docs['eval']} documents fell into the held-out split",
                        hint="lower dataset.eval_fraction, or add documents (the split is by document)")
    if docs["train"] == 0:
        raise DataError("the dataset has no usable text",
                        hint="check dataset.path / text_column and that files are not empty")
    info = {"version": STORE_VERSION, "meta": meta or {}, "tokens": counts, "documents": docs, "has_mask": any_mask}
    write_json_atomic(manifest, info)
    return _open_store(directory, "train", info), _open_store(directory, "eval", info)


def _open_store(directory: Path, split: str, info: dict[str, Any]) -> TokenStore:
    n = info["tokens"][split]
    if n == 0:
        return TokenStore(np.zeros(0, dtype=np.uint32), None, 0)
    tokens = np.memmap(directory / f"{split}.tokens", dtype=np.uint32, mode="r", shape=(n,))
    mask = np.memmap(directory / f"{split}.mask", dtype=np.uint8, mode="r", shape=(n,)) if info["has_mask"] else None
    return TokenStore(tokens, mask, info["documents"][split])


# ---- blocks ---------------------------------------------------------------------------------


@dataclass
class BlockDataset:
    """Fixed-length blocks over a token store.

    Causal LM: block i is tokens ``[i*L, i*L + L + 1)``: inputs are the first L, labels the last L,
    so no token is wasted and no padding exists. Encoders (``causal=False``): L tokens framed by the
    tokenizer's CLS/SEP.
    """

    store: TokenStore
    length: int
    causal: bool = True
    cls_id: int | None = None
    sep_id: int | None = None
    max_blocks: int | None = None

    def __len__(self) -> int:
        body = self.length if self.causal else self.length - 2
        n = len(self.store)
        count = max(0, (n - 1) // body) if self.causal else max(0, n // body)
        return min(count, self.max_blocks) if self.max_blocks else count

    def block(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(token ids, loss mask) of block i; for causal LMs both have L+1 entries."""
        if self.causal:
            lo, hi = i * self.length, i * self.length + self.length + 1
            ids = np.asarray(self.store.tokens[lo:hi], dtype=np.int64)
            mask = (np.asarray(self.store.loss_mask[lo:hi], dtype=np.int64)
                    if self.store.loss_mask is not None else np.ones(hi - lo, dtype=np.int64))
            return ids, mask
        body = self.length - 2
        lo, hi = i * body, (i + 1) * body
        ids = np.concatenate([[self.cls_id], np.asarray(self.store.tokens[lo:hi], dtype=np.int64), [self.sep_id]])
        mask = np.ones(len(ids), dtype=np.int64)
        return ids.astype(np.int64), mask


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled block order of one epoch; a pure function of (seed, epoch) so resume can skip."""
    rng = np.random.default_rng([seed, epoch])
    return rng.permutation(n)


class DistillationCollator:
    """Stacks (ids, mask) blocks into ``input_ids``/``attention_mask``/``labels`` tensors.

    Packed blocks need no padding; variable-length examples are padded with ``pad_token_id``
    (right by default, left with ``pad_left=True``). Every label is ``IGNORE_INDEX`` (-100) where
    the target is padding or masked out, and, for causal LMs, where the input predicting it is
    padding: with left padding the first real token follows a pad, which is no context to learn from.
    """

    def __init__(self, pad_token_id: int = 0, causal: bool = True, *, pad_left: bool = False,
                 max_length: int | None = None):
        self.pad_token_id = pad_token_id
        self.causal = causal
        self._max_length: int | None = max_length
        self._pad_left = pad_left

    def max_length(self, n: int) -> "DistillationCollator":
        self._max_length = n
        return self

    def pad_left(self, on: bool) -> "DistillationCollator":
        self._pad_left = on
        return self

    def collate(self, examples: list[tuple[np.ndarray, np.ndarray]] | list[list[int]]) -> dict[str, Any]:
        import torch

        from entrenar_cli.losses import IGNORE_INDEX

        pairs = [(np.asarray(e[0]), np.asarray(e[1])) if isinstance(e, tuple) else
                 (np.asarray(e), np.ones(len(e), dtype=np.int64)) for e in examples]
        if self._max_length:
            limit = self._max_length + (1 if self.causal else 0)
            pairs = [(ids[:limit], m[:limit]) for ids, m in pairs]
        width = max(len(ids) for ids, _ in pairs)
        ids_t = torch.full((len(pairs), width), self.pad_token_id, dtype=torch.long)
        mask_t = torch.zeros((len(pairs), width), dtype=torch.long)
        loss_t = torch.zeros((len(pairs), width), dtype=torch.long)
        for r, (ids, m) in enumerate(pairs):
            sl = slice(width - len(ids), width) if self._pad_left else slice(0, len(ids))
            ids_t[r, sl] = torch.from_numpy(ids.astype(np.int64))
            mask_t[r, sl] = 1
            loss_t[r, sl] = torch.from_numpy(m.astype(np.int64))
        if self.causal:
            inputs, targets = ids_t[:, :-1], ids_t[:, 1:].clone()
            # a target that is padding or masked out, or whose input is padding, is not trained
            targets[(loss_t[:, 1:] == 0) | (mask_t[:, 1:] == 0) | (mask_t[:, :-1] == 0)] = IGNORE_INDEX
            return {"input_ids": inputs, "attention_mask": mask_t[:, :-1], "labels": targets}
        labels = ids_t.clone()
        labels[(mask_t == 0) | (loss_t == 0)] = IGNORE_INDEX
        return {"input_ids": ids_t, "attention_mask": mask_t, "labels": labels}


def check_dataset_settings(path: str | None, name: str | None) -> None:
    """Early, cheap checks of the dataset section (before any model is loaded)."""
    if path is None and name is None:
        raise ConfigError("set dataset.path or dataset.name")
    if path is not None:
        resolve_files(path)


def dataset_files(settings: Any) -> list[Path]:
    """Local files for ``dataset.path``, or the Parquet files of Hub dataset ``dataset.name``."""
    if settings.path is not None:
        return resolve_files(settings.path)
    from entrenar_cli.hub import fetch_dataset_files

    return list(fetch_dataset_files(settings.name, split=settings.split, config=settings.config))


def text_encoder(tokenizer: Any, causal: bool) -> Encoder:
    """Plain-text documents: causal LMs get EOS between documents; encoders get raw word pieces."""
    eos = tokenizer.eos_token_id if causal else None
    if causal and eos is None:
        eos = tokenizer.sep_token_id

    def encode(doc: Document) -> tuple[list[int], None] | None:
        if doc.text is None:
            return None
        ids = tokenizer(doc.text, add_special_tokens=False)["input_ids"]
        return (ids + [eos] if eos is not None else ids), None

    return encode


def load_blocks(
    settings: Any, tokenizer: Any, *, causal: bool = True, encode: Encoder | None = None,
    raw_rows: bool = False, extra_meta: dict[str, Any] | None = None,
) -> tuple[BlockDataset, BlockDataset]:
    """Train and held-out blocks for a dataset section (tokenized once, cached on disk)."""
    files = dataset_files(settings)
    encode = encode or text_encoder(tokenizer, causal)
    meta = {
        "files": files_fingerprint(files),
        "tok": tokenizer_fingerprint(tokenizer),
        "eval_fraction": settings.eval_fraction,
        "column": settings.text_column,
        "format": settings.format,
        "max_documents": settings.max_documents,
        "causal": causal,
        "min_eval_tokens": settings.max_length + 1,
        **(extra_meta or {}),
    }
    key = hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode()).hexdigest()[:16]
    max_tokens = None
    if settings.max_blocks:
        # stop reading once the training split holds max_blocks blocks (held-out documents met on
        # the way are kept)
        max_tokens = (settings.max_blocks + 1) * (settings.max_length + 1)
        meta["max_tokens"] = max_tokens
        key = hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode()).hexdigest()[:16]
    docs = iter_documents(files, fmt=settings.format, text_column=settings.text_column, raw_rows=raw_rows)
    train, held = build_stores(docs, encode, cache_root() / "tokens" / key, eval_fraction=settings.eval_fraction,
                               max_documents=settings.max_documents, max_tokens=max_tokens,
                               min_eval_tokens=settings.max_length + 1, meta=meta)
    cls_id = getattr(tokenizer, "cls_token_id", None)
    sep_id = getattr(tokenizer, "sep_token_id", None)
    train_blocks = BlockDataset(train, settings.max_length, causal, cls_id, sep_id, settings.max_blocks)
    eval_blocks = BlockDataset(held, settings.max_length, causal, cls_id, sep_id)
    if len(train_blocks) == 0:
        raise DataError(
            f"the dataset has {len(train)} training tokens: "
            f"not enough for one block of max_length {settings.max_length}",
            hint="add data or lower dataset.max_length",
        )
    if settings.eval_fraction > 0 and len(eval_blocks) == 0:
        from entrenar_cli.console import warn

        warn(f"the held-out split has {len(held)} tokens, less than one block of {settings.max_length}: "
             "no held-out evaluation (raise dataset.eval_fraction or add documents)")
    return train_blocks, eval_blocks
