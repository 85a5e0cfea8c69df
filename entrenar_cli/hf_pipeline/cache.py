"""The document's in-memory ``TeacherCache``, beside the engine's on-disk cache.

``TeacherCache(1000)`` keeps the teacher outputs (logits, hidden states) of up to ``capacity``
examples in memory, least recently used out first, and counts hits and misses. For training runs
the engine's on-disk cache (:class:`DiskTeacherCache`, ``distillation.teacher_cache`` in the YAML)
stores compressed top-k logits across epochs and runs.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from entrenar_cli.errors import UsageError
from entrenar_cli.hf_pipeline._api import as_tensor
from entrenar_cli.teacher_cache import TeacherCache as DiskTeacherCache


@dataclass
class CachedOutputs:
    """What is cached for one example (either part may be missing)."""

    logits: Tensor | None = None
    hidden_states: list[Tensor] | None = None


class TeacherCache:
    """Teacher outputs of up to ``capacity`` examples keyed by example index (LRU)."""

    def __init__(self, capacity: int):
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity <= 0:
            raise UsageError(f"TeacherCache({capacity!r}): capacity must be a positive number of examples")
        self.capacity = capacity
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[int, CachedOutputs] = OrderedDict()

    @classmethod
    def new(cls, capacity: int) -> "TeacherCache":
        return cls(capacity)

    def _entry(self, index: int) -> CachedOutputs:
        entry = self._entries.get(index)
        if entry is None:
            entry = CachedOutputs()
            self._entries[index] = entry
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        self._entries.move_to_end(index)
        return entry

    def cache_logits(self, index: int, logits: Any) -> None:
        """Store the teacher's logits for example ``index`` (detached)."""
        self._entry(int(index)).logits = as_tensor(logits).detach()

    def cache_hidden_states(self, index: int, hidden_states: Any) -> None:
        """Store the teacher's hidden states for example ``index`` (a tensor or a list of per-layer tensors)."""
        states = [as_tensor(h).detach() for h in hidden_states] if isinstance(hidden_states, (list, tuple)) \
            else [as_tensor(hidden_states).detach()]
        self._entry(int(index)).hidden_states = states

    def get(self, index: int) -> CachedOutputs | None:
        """The cached outputs of ``index`` (a hit), or None (a miss)."""
        entry = self._entries.get(int(index))
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(int(index))
        return entry

    def get_or_compute(self, index: int, teacher: Any, input_ids: Any) -> Tensor:
        """The teacher's logits for example ``index``, running ``teacher.forward(input_ids)`` on a miss."""
        entry = self.get(index)
        if entry is not None and entry.logits is not None:
            return entry.logits
        logits = teacher.forward(input_ids)
        self.cache_logits(index, logits)
        return logits

    def hit_rate(self) -> float:
        """Hits / lookups (0.0 before the first lookup)."""
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def __contains__(self, index: int) -> bool:
        return int(index) in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def __repr__(self) -> str:
        return f"TeacherCache({len(self)}/{self.capacity} examples, hit rate {self.hit_rate():.1%})"


__all__ = ["CachedOutputs", "DiskTeacherCache", "TeacherCache"]
