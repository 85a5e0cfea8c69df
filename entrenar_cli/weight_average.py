"""An exponential moving average of the trained weights (``training.ema_decay``).

Evaluations and the saved model use the average rather than the last step's weights: at a learning
rate high enough to make progress, the last step's weights carry that step's noise, and the average
of the recent ones is a better model at no cost in steps (measured on the demo in BENCHMARKS.md). Only
trained tensors are averaged (a LoRA run keeps one extra copy of its adapters, not of the base).

Written here rather than with ``torch.optim.swa_utils.AveragedModel``: that deep-copies the whole
module, frozen base included, and is not a plain dict of tensors for checkpoints and FSDP shards.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

#: key prefix of the averaged tensors in checkpoints
PREFIX = "ema."


def warmed_decay(decay: float, step: int) -> float:
    """The decay after optimizer step ``step`` (1-based): ``min(decay, (1 + step) / (10 + step))``.

    Early on the fixed decay would average the poor first weights in for hundreds of steps; the
    warm-up lets the average follow the fast early changes and reach ``decay`` only once they slow.
    """
    return min(decay, (1.0 + step) / (10.0 + step))


class WeightAverage:
    """The average of ``params`` (name -> trained tensor, updated in place by the optimizer)."""

    def __init__(self, params: dict[str, Tensor], decay: float):
        self.params = params
        self.decay = decay
        with torch.no_grad():
            self.shadow = {n: p.detach().clone() for n, p in params.items()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold in the weights after optimizer step ``step``."""
        weight = 1.0 - warmed_decay(self.decay, step)
        for name, p in self.params.items():
            self.shadow[name].lerp_(p.detach(), weight)

    @torch.no_grad()
    def _swap(self) -> None:
        # one tensor at a time: the extra memory is the largest tensor, not a second model
        for name, p in self.params.items():
            held = p.detach().clone()
            p.copy_(self.shadow[name])
            self.shadow[name].copy_(held)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The model holds the average inside the block and its own weights again after it."""
        self._swap()
        try:
            yield
        finally:
            self._swap()

    @torch.no_grad()
    def apply(self) -> None:
        """Put the average into the model for good (the end of training: what is saved)."""
        for name, p in self.params.items():
            p.copy_(self.shadow[name])

    def state(self) -> dict[str, Tensor]:
        """The averaged tensors for a checkpoint (restored in place by copying into them)."""
        return {PREFIX + n: s for n, s in self.shadow.items()}
