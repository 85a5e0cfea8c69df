"""The teacher cache: compute the teacher's outputs once, reuse them in later epochs and runs.

What is stored per training block (SafeTensors files, one per filled step, written atomically):

* ``vals`` ``[L, k]`` bf16: the teacher's top-k logits at each position (T=1; teachers with an LM head),
* ``idx`` ``[L, k]`` int32: their token ids,
* ``tail`` ``[L]`` fp32: ``log sum exp`` of every other logit (the remaining probability mass),
* ``h{j}`` ``[L, d]`` bf16: hidden states of the teacher layers the progressive loss maps,
* ``a{j}`` ``[L, L]`` bf16: head-averaged attention maps of the layers attention transfer maps
  (the loss averages heads first, so nothing is lost),
* ``mark`` ``[1]`` int8: present once a block is stored (encoders without an LM head store no logits).

KD on top-k (see :func:`entrenar_cli.losses.topk_divergence`): the teacher distribution is exact on
its k most likely tokens and the tail is one extra outcome; the student's tail is ``1 - sum`` of its
probabilities on those k tokens. The KL between these coarsened distributions is what is optimised.

A ``manifest.json`` names everything the outputs depend on (teacher, weights, tokenizer, data, block
length, k, layers); a cache whose manifest differs is refused rather than silently reused. Files of
an interrupted fill stay valid: a later run fills only what is missing.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from entrenar_cli.errors import ConfigError
from entrenar_cli.fsutil import atomic_path, write_json_atomic
from entrenar_cli.losses import topk_teacher

CACHE_VERSION = 2
_KEY = re.compile(r"^b(\d+)\.(\w+)$")


def data_fingerprint(tokens: Any, length: int) -> str:
    """Identity of a tokenized training split: its size and its first and last tokens."""
    import numpy as np

    h = hashlib.sha256(f"{len(tokens)}:{length}".encode())
    h.update(np.asarray(tokens[:8192]).tobytes())
    h.update(np.asarray(tokens[-8192:]).tobytes())
    return h.hexdigest()[:16]


def weights_fingerprint(model_dir: Path) -> str:
    """Identity of a teacher's weights without hashing gigabytes: names, sizes and mtimes."""
    h = hashlib.sha256()
    for f in sorted(Path(model_dir).glob("*")):
        if f.suffix in (".safetensors", ".gguf", ".json") and f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{int(st.st_mtime)}\n".encode())
    return h.hexdigest()[:16]


class TeacherCache:
    """Cached teacher outputs keyed by training-block index."""

    def __init__(self, directory: Path, manifest: dict[str, Any], k: int,
                 hidden_layers: list[int], attn_layers: list[int]):
        self.dir = directory
        self.k = k
        self.hidden_layers = hidden_layers
        self.attn_layers = attn_layers
        self.hits = 0
        self.misses = 0
        self._index: dict[int, Path] = {}
        self._open(manifest)

    def _open(self, manifest: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / "manifest.json"
        manifest = {"version": CACHE_VERSION, **manifest}
        if path.is_file():
            stored = json.loads(path.read_text())
            if stored != manifest:
                diff = sorted(k for k in set(stored) | set(manifest) if stored.get(k) != manifest.get(k))
                raise ConfigError(
                    f"teacher cache {self.dir} was built for different inputs (differs in: {', '.join(diff)})",
                    hint="set distillation.teacher_cache.dir to a new directory, or delete the old cache",
                )
        else:
            write_json_atomic(path, manifest)
        for f in sorted(self.dir.glob("blocks-*.safetensors")):
            with safe_open(str(f), "pt") as fh:
                for key in fh.keys():
                    m = _KEY.match(key)
                    if m and m.group(2) == "mark":
                        self._index[int(m.group(1))] = f

    def __contains__(self, block: int) -> bool:
        return block in self._index

    @property
    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.dir.glob("blocks-*.safetensors"))

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def compress(self, out: Any, hidden_fn: Any) -> dict[str, Tensor]:
        """Teacher model outputs for a batch -> the stored tensors, batch-first."""
        logits = getattr(out, "logits", None)
        first = logits if logits is not None else out.hidden_states[0]
        data = {"mark": torch.ones(first.shape[0], 1, dtype=torch.int8, device=first.device)}
        if logits is not None:
            vals, idx, tail = topk_teacher(logits, self.k)
            data.update(vals=vals, idx=idx, tail=tail.float())
        if self.hidden_layers:
            blocks = hidden_fn(out.hidden_states)
            for j in self.hidden_layers:
                data[f"h{j}"] = blocks[j].to(torch.bfloat16)
        for j in self.attn_layers:
            data[f"a{j}"] = out.attentions[j].float().mean(1).to(torch.bfloat16)
        return data

    def put(self, block_ids: list[int], data: dict[str, Tensor]) -> None:
        """Store one batch's outputs (one file, renamed into place when complete)."""
        tensors = {f"b{b}.{name}": t[i].detach().contiguous().cpu() for i, b in enumerate(block_ids)
                   for name, t in data.items()}
        digest = hashlib.sha256(",".join(map(str, block_ids)).encode()).hexdigest()[:8]
        target = self.dir / f"blocks-{min(block_ids):08d}-{len(block_ids):04d}-{digest}.safetensors"
        with atomic_path(target) as tmp:
            save_file(tensors, str(tmp))
        for b in block_ids:
            self._index[b] = target

    def get(self, block_ids: list[int], device: torch.device) -> dict[str, Tensor]:
        """Stacked outputs of the given blocks (all must be cached)."""
        parts: dict[str, list[Tensor]] = {}
        by_file: dict[Path, list[int]] = {}
        for b in block_ids:
            by_file.setdefault(self._index[b], []).append(b)
        rows: dict[int, dict[str, Tensor]] = {}
        for f, blocks in by_file.items():
            with safe_open(str(f), "pt") as fh:
                for b in blocks:
                    rows[b] = {key.split(".", 1)[1]: fh.get_tensor(key) for key in fh.keys()
                               if key.startswith(f"b{b}.")}
        for b in block_ids:
            for name, t in rows[b].items():
                parts.setdefault(name, []).append(t)
        return {name: torch.stack(ts).to(device) for name, ts in parts.items()}
