"""The teacher cache: run the teacher once, store compact targets, train from them in later runs.

Format 3 (``CACHE_VERSION``) stores, per training token, one fixed-size binary record (``CacheFormat``):

* ``top``/``code``/``hi``/``step``: the teacher's k most likely tokens at temperature T, with ids in
  2 bytes (V <= 65,536), 3 bytes (V <= 2^24) or 4, and their log-probabilities quantised to uint8 on a
  per-token linear grid: ``log p_i ~= hi - code_i * step`` with ``hi`` the top-1 log-probability and
  ``step = (hi - log p_k) / 255`` (both fp16). Stated error: ``|decoded - true| <= step/2 + 2^-11 |hi|``
  before the kept probabilities are rescaled to sum to ``1 - tail`` (which removes the total-mass error).
* ``tail``: log of the probability mass outside the top k (fp16).
* ``samp`` + ``negent``: ``samples`` token ids drawn with replacement from the teacher's distribution
  restricted to the tail (each carries weight ``tail / samples``) and the teacher's negative entropy
  ``sum_v p_v log p_v``. This is the unbiased sparse target of Anshumann et al. (ACL 2025, "Sparse logit
  sampling"), stratified: the head is exact, only the tail is sampled, so the KD loss computed from the
  cache is an unbiased estimate of the full-vocabulary ``KL(teacher || student)`` (up to quantisation)
  and so is its gradient. With ``samples: 0`` the tail is one extra outcome instead (the biased
  "coarsened" top-k KL; it underestimates the full KL).

The default (k=32, 32 samples, V <= 65,536) is 170 bytes per token; the previous format (top-2048 bf16
logits + int32 ids) was 12,293. Hidden states (``h{j}``, ``[L, d]`` bf16: 2d bytes per token and layer)
and head-averaged attention maps (``a{j}``, ``[L, L]`` bf16: 2L bytes per token and layer) stay
available for the other losses; they are large by nature and printed by the plan.

Files: SafeTensors shards ``blocks-*.safetensors`` written atomically, one uint8 tensor per block
(``b{block}.rec``, contiguous, read in one sequential read); each shard's metadata holds its block ids
and a SHA-256 of its tensors (``entrenar cache --verify``). ``manifest.json`` names everything the
targets depend on (teacher weights hash, tokenizer hash, data fingerprint, block length, format, k,
samples, temperature, vocabulary, layers), never an absolute path; a cache whose manifest differs is
refused with what differs, so a cache built in another directory, on another machine or by another
number of processes is used as long as it was built from the same inputs.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from entrenar_cli.errors import ConfigError
from entrenar_cli.fsutil import atomic_path, write_json_atomic

CACHE_VERSION = 3
FORMAT_NAME = "topk-u8-logp+tail-samples"
DEFAULT_TOP_K = 32
DEFAULT_SAMPLES = 32
_KEY = re.compile(r"^b(\d+)\.(\w+)$")
# manifest keys that identify the targets (a difference means the cache is not for this run)
IDENTITY_KEYS = ("version", "format", "weights", "tokenizer", "data", "max_length", "top_k", "samples",
                 "temperature", "vocab", "hidden_layers", "attention_layers")


# ---- the record format ----------------------------------------------------------------------


@dataclass(frozen=True)
class CacheFormat:
    """Layout of one token's logit targets: k quantised top log-probabilities + tail samples."""

    k: int
    samples: int
    vocab: int
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.k < 0 or self.samples < 0 or (self.k == 0 and self.samples == 0):
            raise ConfigError("distillation.teacher_cache: top_k and samples must not both be 0",
                              hint="the defaults are top_k: 32, samples: 32")
        if self.k > self.vocab:
            raise ConfigError(f"distillation.teacher_cache.top_k {self.k} exceeds the vocabulary ({self.vocab})")

    @property
    def id_bytes(self) -> int:
        return 2 if self.vocab <= 1 << 16 else 3 if self.vocab <= 1 << 24 else 4

    def _ids(self, name: str, n: int) -> tuple[Any, ...]:
        if self.id_bytes == 3:
            return (name, "u1", (n, 3))
        return (name, "<u2" if self.id_bytes == 2 else "<u4", (n,))

    @property
    def dtype(self) -> np.dtype:
        """The packed per-token record (numpy structured dtype, little-endian, no padding)."""
        fields: list[tuple[Any, ...]] = []
        if self.k:
            fields += [self._ids("top", self.k), ("code", "u1", (self.k,)), ("hi", "<f2"), ("step", "<f2")]
        fields.append(("tail", "<f2"))
        if self.samples:
            fields += [self._ids("samp", self.samples), ("negent", "<f4")]
        return np.dtype(fields)

    @property
    def bytes_per_token(self) -> int:
        return int(self.dtype.itemsize)


def _pack_ids(ids: Tensor, id_bytes: int) -> np.ndarray:
    a = ids.to(torch.int64).cpu().numpy()
    if id_bytes == 2:
        return a.astype("<u2")
    if id_bytes == 4:
        return a.astype("<u4")
    return a.astype("<u4").view("u1").reshape(*a.shape, 4)[..., :3]


def _unpack_ids(a: np.ndarray, id_bytes: int) -> np.ndarray:
    if id_bytes != 3:
        return a.astype(np.int64)
    a = a.astype(np.int64)
    return a[..., 0] | (a[..., 1] << 8) | (a[..., 2] << 16)


def _fp16_up(x: Tensor) -> Tensor:
    """fp16 values >= x (so a grid built on them still spans the range)."""
    h = x.half()
    return torch.where(h.float() < x, torch.nextafter(h.float(), torch.full_like(x, float("inf"))).half(), h)


def _negentropy(p: Tensor, logp: Tensor) -> Tensor:
    """``sum p log p`` per row, in fp32 whatever autocast is on. ``nansum`` drops the ``0 * -inf`` terms of
    ``-inf`` logits (p = 0 contributes 0): two passes over the vocabulary where a masked ``where`` took four."""
    return (p * logp).nansum(-1)


def encode(logits: Tensor, fmt: CacheFormat, seed: int) -> np.ndarray:
    """One block's teacher logits ``[L, V']`` -> ``L`` records. Sampling is seeded by ``seed`` (the block id),
    so the same block gives the same record in any process, batch or machine of the same device kind."""
    z = logits.float()[:, : fmt.vocab] / fmt.temperature
    logp = torch.log_softmax(z, dim=-1)
    rec = np.zeros(z.shape[0], dtype=fmt.dtype)
    if fmt.k:
        top_lp, top_id = logp.topk(fmt.k, dim=-1)
        hi = top_lp[:, 0].half().float()
        step = _fp16_up(((hi - top_lp[:, -1]) / 255).clamp_min(1e-4)).float()
        code = ((hi[:, None] - top_lp) / step[:, None]).round().clamp(0, 255)
        top_mass = torch.logsumexp(top_lp, dim=-1).clamp(max=0.0)
        log_tail = torch.log(-torch.expm1(top_mass))  # log(1 - top mass), -inf when nothing is left
        rec["top"] = _pack_ids(top_id, fmt.id_bytes)
        rec["code"] = code.to(torch.uint8).cpu().numpy()
        rec["hi"] = hi.cpu().numpy().astype("<f2")
        rec["step"] = step.cpu().numpy().astype("<f2")
    else:
        top_id = None
        log_tail = torch.zeros(z.shape[0], device=z.device)
    rec["tail"] = log_tail.cpu().numpy().astype("<f2")
    if fmt.samples:
        p = logp.exp()
        negent = _negentropy(p, logp)
        if top_id is not None:
            p = p.scatter(-1, top_id, 0.0)
        empty = p.sum(-1) <= 0  # the top k hold everything: the samples' weight is 0, any id will do
        p[empty, 0] = 1.0
        gen = torch.Generator(device=p.device).manual_seed(int(seed) & 0x7FFF_FFFF_FFFF_FFFF)
        samp = torch.multinomial(p, fmt.samples, replacement=True, generator=gen)
        rec["samp"] = _pack_ids(samp, fmt.id_bytes)
        rec["negent"] = negent.cpu().numpy().astype("<f4")
    return rec


def decode(rec: np.ndarray, fmt: CacheFormat) -> tuple[Tensor, Tensor, Tensor]:
    """Records ``[...]`` -> ``(weights [..., c], ids [..., c], negentropy [...])`` for
    :func:`entrenar_cli.losses.topk_divergence`: the KD loss is ``negentropy - sum_j w_j log q(ids_j)``.

    Without samples the tail is one outcome with id -1 (the student's tail mass stands for it) and
    the constant is the coarsened distribution's own negative entropy, so the loss is its exact KL.
    """
    shape = rec.shape
    flat = rec.reshape(-1)
    tail = np.exp(flat["tail"].astype(np.float32))
    ids, ws = [], []
    if fmt.k:
        lp = flat["hi"].astype(np.float32)[:, None] - flat["code"].astype(np.float32) * flat["step"].astype(
            np.float32)[:, None]
        p = np.exp(lp)
        p *= ((1.0 - tail) / np.maximum(p.sum(-1), 1e-30))[:, None]  # the kept mass is 1 - tail exactly
        ids.append(_unpack_ids(flat["top"], fmt.id_bytes))
        ws.append(p)
    if fmt.samples:
        ids.append(_unpack_ids(flat["samp"], fmt.id_bytes))
        ws.append(np.repeat((tail / fmt.samples)[:, None], fmt.samples, axis=1))
        const = flat["negent"].astype(np.float32)
    else:
        ids.append(np.full((flat.shape[0], 1), -1, dtype=np.int64))
        ws.append(tail[:, None])
    w = np.concatenate(ws, axis=1).astype(np.float32)
    if not fmt.samples:
        const = np.where(w > 0, w * np.log(np.maximum(w, 1e-38)), 0.0).sum(-1).astype(np.float32)
    c = w.shape[1]
    return (torch.from_numpy(w).reshape(*shape, c), torch.from_numpy(np.concatenate(ids, axis=1)).reshape(*shape, c),
            torch.from_numpy(np.ascontiguousarray(const)).reshape(shape))


def decoded_logp_error_bound(rec: np.ndarray) -> np.ndarray:
    """Per-token bound on |decoded - true| top-k log-probability before rescaling (see module doc)."""
    return rec["step"].astype(np.float32) / 2 + np.abs(rec["hi"].astype(np.float32)) * 2.0**-11 + 1e-6


# ---- fingerprints ---------------------------------------------------------------------------


def data_fingerprint(tokens: Any, length: int) -> str:
    """Identity of a tokenized training split: its size and its first and last tokens."""
    h = hashlib.sha256(f"{len(tokens)}:{length}".encode())
    h.update(np.asarray(tokens[:8192]).tobytes())
    h.update(np.asarray(tokens[-8192:]).tobytes())
    return h.hexdigest()[:16]


_SAMPLE_CHUNK = 1 << 16
_SAMPLES_PER_FILE = 64


def weights_fingerprint(model_dir: Path) -> str:
    """Identity of a teacher's weights from their bytes, portable across machines (no paths, no mtimes).

    Hashing hundreds of gigabytes would cost minutes, so each weight file contributes its name, size,
    first and last MiB and 64 evenly spaced 64 KiB chunks (a fine-tune changes every tensor, so any
    other weights differ in these bytes), plus config.json in full.
    """
    h = hashlib.sha256()
    model_dir = Path(model_dir)
    files = sorted(f for f in model_dir.glob("*") if f.is_file() and
                   (f.suffix in (".safetensors", ".gguf", ".bin", ".pt") or f.name == "config.json"))
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}\n".encode())
        with f.open("rb") as fh:
            if f.suffix == ".json" or size <= 4 << 20:
                h.update(fh.read())
                continue
            offsets = [0, size - (1 << 20)] + [int(i * (size - _SAMPLE_CHUNK) / (_SAMPLES_PER_FILE - 1))
                                                 for i in range(_SAMPLES_PER_FILE)]
            for i, off in enumerate(offsets):
                fh.seek(off)
                h.update(fh.read((1 << 20) if i < 2 else _SAMPLE_CHUNK))
    return h.hexdigest()[:16]


# ---- the training schedule (what the engine will ask for next) ------------------------------


def training_schedule(n_blocks: int, seed: int, batch_size: int, accumulation: int, world: int, rank: int,
                      epochs: int) -> Iterator[tuple[int, ...]]:
    """This process's micro-batches of block ids in the order the Engine asks for them.

    Mirrors ``Engine._step_batches`` (``epoch_order`` permutation, interleaved shard per rank); it is
    only a prediction for prefetching: a wrong guess costs one wasted read, never a wrong target.
    """
    from entrenar_cli.data import epoch_order

    per_step = batch_size * accumulation * world
    steps = n_blocks // per_step if per_step else 0
    for epoch in range(epochs):
        order = epoch_order(n_blocks, seed, epoch)
        for s in range(steps):
            mine = order[s * per_step:(s + 1) * per_step][rank::world]
            for i in range(0, len(mine), batch_size):
                yield tuple(int(j) for j in mine[i:i + batch_size])


# ---- the cache ------------------------------------------------------------------------------


def _identity(manifest: dict[str, Any]) -> dict[str, Any]:
    return {k: manifest.get(k) for k in IDENTITY_KEYS}


def read_manifest(directory: Path) -> dict[str, Any]:
    path = Path(directory) / "manifest.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{directory} is not a teacher cache (no manifest.json)",
                          hint="build one with: entrenar cache CONFIG") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: unreadable teacher-cache manifest: {exc}",
                          hint="rebuild the cache with: entrenar cache CONFIG") from None


def check_manifest(directory: Path, stored: dict[str, Any], wanted: dict[str, Any]) -> None:
    """Refuse a cache built for other inputs, naming what differs."""
    if stored.get("version") != wanted.get("version"):
        raise ConfigError(
            f"teacher cache {directory} has format version {stored.get('version')}; this entrenar reads version "
            f"{wanted.get('version')} ({FORMAT_NAME})",
            hint="rebuild the cache: entrenar cache CONFIG "
            "(or point distillation.teacher_cache.dir at a new directory)")
    a, b = _identity(stored), _identity(wanted)
    diff = [k for k in IDENTITY_KEYS if a[k] != b[k]]
    if diff:
        detail = "; ".join(f"{k}: cache {a[k]!r}, this run {b[k]!r}" for k in diff)
        raise ConfigError(
            f"teacher cache {directory} was built for different inputs (differs in: {', '.join(diff)}): {detail}",
            hint="set distillation.teacher_cache.dir to a new directory, or rebuild: entrenar cache CONFIG")


def _shard_digest(tensors: dict[str, Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class TeacherCache:
    """Cached teacher outputs keyed by training-block index, with read-ahead of the next batches."""

    def __init__(self, directory: Path, manifest: dict[str, Any], fmt: CacheFormat | None,
                 hidden_layers: list[int], attn_layers: list[int], *, create: bool = True):
        self.dir = Path(directory)
        self.fmt = fmt
        self.hidden_layers = hidden_layers
        self.attn_layers = attn_layers
        self.hits = 0
        self.misses = 0
        self.prefetched = 0
        self.read_wait_s = 0.0
        self._index: dict[int, Path] = {}
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._ahead: dict[int, Future[dict[str, Tensor]]] = {}  # schedule position -> read in flight
        self._schedule: list[tuple[int, ...]] = []
        self._positions: dict[tuple[int, ...], list[int]] = {}
        self._cursor = 0
        self._pin = False
        self.manifest = {"version": CACHE_VERSION, "format": FORMAT_NAME if fmt is not None else None, **manifest}
        self._open(create)

    def _open(self, create: bool) -> None:
        path = self.dir / "manifest.json"
        if path.is_file():
            check_manifest(self.dir, read_manifest(self.dir), self.manifest)
        elif create:
            self.dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, self.manifest)
        else:
            read_manifest(self.dir)
        self._index = index_shards(self.dir)

    def __contains__(self, block: int) -> bool:
        return block in self._index

    def __len__(self) -> int:
        return len(self._index)

    @property
    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.dir.glob("blocks-*.safetensors"))

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def compress(self, out: Any, hidden_fn: Any) -> dict[str, Tensor]:
        """Teacher model outputs for a batch -> what :meth:`put` stores, batch-first (logits are encoded
        there, per block, because the tail samples are seeded by block id)."""
        logits = getattr(out, "logits", None)
        first = logits if logits is not None else out.hidden_states[0]
        data = {"mark": torch.ones(first.shape[0], 1, dtype=torch.int8)}
        if logits is not None and self.fmt is not None:
            data["logits"] = logits
        if self.hidden_layers:
            blocks = hidden_fn(out.hidden_states)
            for j in self.hidden_layers:
                data[f"h{j}"] = blocks[j].to(torch.bfloat16)
        for j in self.attn_layers:
            data[f"a{j}"] = out.attentions[j].float().mean(1).to(torch.bfloat16)
        return data

    def encode_batch(self, block_ids: list[int], data: dict[str, Tensor]) -> dict[str, Tensor]:
        """A batch's :meth:`compress` output -> the shard tensors of its blocks (CPU, logits encoded)."""
        data = dict(data)
        logits = data.pop("logits", None)
        if logits is not None:
            assert self.fmt is not None
            recs = np.stack([encode(logits[i], self.fmt, b) for i, b in enumerate(block_ids)])
            data["rec"] = torch.from_numpy(recs.view(np.uint8).reshape(len(block_ids), recs.shape[1], -1))
        return {f"b{b}.{name}": t[i].detach().contiguous().cpu() for i, b in enumerate(block_ids)
                for name, t in data.items()}

    def write_shard(self, block_ids: list[int], tensors: dict[str, Tensor]) -> Path:
        """One shard file holding the blocks' tensors, renamed into place when complete."""
        names = ",".join(map(str, block_ids))
        digest = hashlib.sha256(names.encode()).hexdigest()[:8]
        target = self.dir / f"blocks-{min(block_ids):08d}-{len(block_ids):04d}-{digest}.safetensors"
        meta = {"blocks": names, "sha256": _shard_digest(tensors), "version": str(CACHE_VERSION)}
        with atomic_path(target) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        with self._lock:
            for b in block_ids:
                self._index[b] = target
        return target

    def put(self, block_ids: list[int], data: dict[str, Tensor]) -> Path:
        """Store one batch's outputs (one shard)."""
        return self.write_shard(block_ids, self.encode_batch(block_ids, data))

    # -- reading ------------------------------------------------------------------------------

    def expect(self, schedule: Iterator[tuple[int, ...]], pin_memory: bool = False) -> None:
        """The order batches will be asked for: each ``get`` then reads the next batch in the background."""
        self._schedule = list(schedule)
        self._positions = {}
        for i, ids in enumerate(self._schedule):
            self._positions.setdefault(ids, []).append(i)
        self._cursor = 0
        self._pin = pin_memory
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="teacher-cache")

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._ahead.clear()

    def _read(self, block_ids: tuple[int, ...]) -> dict[str, Tensor]:
        """Decoded, stacked targets of the blocks (CPU; pinned when training on CUDA)."""
        with self._lock:
            by_file: dict[Path, list[int]] = {}
            for b in block_ids:
                by_file.setdefault(self._index[b], []).append(b)
        rows: dict[int, dict[str, Tensor]] = {}
        for f, blocks in by_file.items():
            with safe_open(str(f), "pt") as fh:
                keys = list(fh.keys())
                for b in blocks:
                    prefix = f"b{b}."
                    rows[b] = {key[len(prefix):]: fh.get_tensor(key) for key in keys if key.startswith(prefix)}
        parts: dict[str, list[Tensor]] = {}
        for b in block_ids:
            for name, t in rows[b].items():
                parts.setdefault(name, []).append(t)
        out: dict[str, Tensor] = {}
        for name, ts in parts.items():
            if name == "mark":
                continue
            if name == "rec":
                assert self.fmt is not None
                rec = torch.stack(ts).numpy()
                rec = np.ascontiguousarray(rec).view(self.fmt.dtype)[..., 0]
                out["vals"], out["idx"], out["tail"] = decode(rec, self.fmt)
            else:
                out[name] = torch.stack(ts)
        if self._pin:
            out = {k: v.pin_memory() for k, v in out.items()}
        return out

    def _position(self, ids: tuple[int, ...]) -> int | None:
        """Where in the expected schedule this request is: its first occurrence at or after the cursor."""
        import bisect

        found = self._positions.get(ids)
        if not found:
            return None
        i = bisect.bisect_left(found, self._cursor)
        return found[i] if i < len(found) else found[0]

    def get(self, block_ids: list[int], device: torch.device) -> dict[str, Tensor]:
        """Stacked targets of the given blocks (all must be cached); starts reading the next batches."""
        import time

        ids = tuple(int(b) for b in block_ids)
        pos = self._position(ids)
        fut = self._ahead.pop(pos, None) if pos is not None else None
        if pos is not None:
            self._cursor = pos + 1
            for stale in [p for p in self._ahead if p < self._cursor]:  # skipped past (resume, other order)
                self._ahead.pop(stale).cancel()
            if self._pool is not None:
                for p in range(self._cursor, min(self._cursor + 2, len(self._schedule))):
                    nxt = self._schedule[p]
                    if p not in self._ahead and all(b in self._index for b in nxt):
                        self._ahead[p] = self._pool.submit(self._read, nxt)
        t0 = time.perf_counter()
        if fut is not None:
            got = fut.result()
            self.prefetched += 1
        else:
            got = self._read(ids)
        self.read_wait_s += time.perf_counter() - t0
        return {k: v.to(device, non_blocking=self._pin) for k, v in got.items()}


def index_shards(directory: Path) -> dict[int, Path]:
    """Block id -> shard, from every readable shard header (blocks of half-written files never appear)."""
    index: dict[int, Path] = {}
    for f in sorted(Path(directory).glob("blocks-*.safetensors")):
        try:
            with safe_open(str(f), "pt") as fh:
                meta = fh.metadata() or {}
                blocks = meta.get("blocks")
                if blocks is not None:
                    ids = [int(b) for b in blocks.split(",") if b]
                else:
                    ids = [int(m.group(1)) for m in map(_KEY.match, fh.keys()) if m and m.group(2) == "mark"]
        except Exception:  # noqa: BLE001 - an unreadable shard is reported by --verify, refilled here
            continue
        for b in ids:
            index[b] = f
    return index


# ---- integrity ------------------------------------------------------------------------------


@dataclass
class VerifyResult:
    shards: int
    blocks: int
    bytes: int
    problems: list[str]
    expected_blocks: int | None


def verify(directory: Path) -> VerifyResult:
    """Read every shard in full: header readable, SHA-256 of its tensors as recorded, record sizes as the
    manifest's format says, no block twice, and the block count the manifest promises when complete."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    problems: list[str] = []
    fmt = None
    if manifest.get("version") != CACHE_VERSION:
        problems.append(f"manifest.json: format version {manifest.get('version')}, expected {CACHE_VERSION} "
                        "(rebuild the cache)")
    elif manifest.get("top_k") is not None and manifest.get("format"):
        try:
            fmt = CacheFormat(manifest["top_k"], manifest.get("samples", 0), manifest["vocab"],
                              manifest.get("temperature", 1.0))
        except (ConfigError, KeyError, TypeError) as exc:
            problems.append(f"manifest.json: bad format fields: {exc}")
    seen: dict[int, str] = {}
    total = 0
    shards = sorted(directory.glob("blocks-*.safetensors"))
    for f in shards:
        total += f.stat().st_size
        try:
            with safe_open(str(f), "pt") as fh:
                meta = fh.metadata() or {}
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        except Exception as exc:  # noqa: BLE001 - any failure to read is what we report
            problems.append(f"{f.name}: unreadable ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})")
            continue
        if meta.get("sha256") != _shard_digest(tensors):
            problems.append(f"{f.name}: contents do not match the recorded SHA-256 (corrupted)")
            continue
        ids = [int(b) for b in meta.get("blocks", "").split(",") if b]
        for b in ids:
            if b in seen and seen[b] != f.name:
                problems.append(f"{f.name}: block {b} also in {seen[b]}")
            seen[b] = f.name
            rec = tensors.get(f"b{b}.rec")
            if fmt is not None and (rec is None or rec.shape[-1] != fmt.bytes_per_token
                                    or rec.shape[0] != manifest.get("max_length")):
                got = None if rec is None else tuple(rec.shape)
                problems.append(f"{f.name}: block {b} record shape {got}, expected "
                                f"({manifest.get('max_length')}, {fmt.bytes_per_token})")
    expected = manifest.get("blocks_total") if manifest.get("complete") else None
    missing = sorted(set(range(expected)) - set(seen)) if expected is not None else []
    if missing:
        problems.append(f"{len(missing)} of the {expected} blocks of the completed fill are missing "
                        f"(e.g. {missing[:5]})")
    listed = manifest.get("shards") or {}
    for name, count in listed.items():
        if not (directory / name).is_file():
            problems.append(f"{name}: listed in manifest.json ({count} blocks) but missing")
    return VerifyResult(len(shards), len(seen), total, problems, expected)
