"""The document's loss objects, computed by the engine's loss functions (:mod:`entrenar_cli.losses`).

Defaults are the schema's ``distillation`` section (temperature, alpha, kd_loss, progressive and
attention weights); ``.temperature(4.0).alpha(0.7)`` validates through the same fields. Inputs may
be tensors, numpy arrays or the document's plain nested lists.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from entrenar_cli import losses as _losses
from entrenar_cli.config.schema import AttentionSettings, DistillationSettings, ProgressiveSettings
from entrenar_cli.errors import UsageError
from entrenar_cli.hf_pipeline._api import as_tensor, set_field


class DistillationLoss:
    """``alpha * T^2 * KL(teacher || student) + (1 - alpha) * CE(student, labels)``, mean over tokens."""

    def __init__(self, temperature: float | None = None, alpha: float | None = None, kind: str | None = None):
        self.settings = DistillationSettings()
        for name, value in (("temperature", temperature), ("alpha", alpha), ("kd_loss", kind)):
            if value is not None:
                set_field(self.settings, name, value, f"DistillationLoss({name}={value!r})")

    @classmethod
    def new(cls) -> "DistillationLoss":
        return cls()

    def temperature(self, value: float) -> "DistillationLoss":
        set_field(self.settings, "temperature", value, f"DistillationLoss.temperature({value!r})")
        return self

    def alpha(self, value: float) -> "DistillationLoss":
        set_field(self.settings, "alpha", value, f"DistillationLoss.alpha({value!r})")
        return self

    def kd_loss(self, kind: str) -> "DistillationLoss":
        set_field(self.settings, "kd_loss", kind, f"DistillationLoss.kd_loss({kind!r})")
        return self

    def terms(self, student_logits: Any, teacher_logits: Any, labels: Any) -> dict[str, Tensor]:
        """Mean soft term, mean hard term and the weighted total (labels of -100 are ignored)."""
        s = as_tensor(student_logits, torch.float32)
        t = as_tensor(teacher_logits, torch.float32)
        y = as_tensor(labels, torch.long).to(s.device)
        if s.shape != t.shape or s.shape[:-1] != y.shape:
            raise UsageError(f"DistillationLoss.forward: shapes differ: student {list(s.shape)}, teacher "
                             f"{list(t.shape)}, labels {list(y.shape)}",
                             hint="pass student and teacher logits of one shape [..., vocab] and one label per row")
        k = _losses.kd_terms(s, t, y, temperature=self.settings.temperature, kind=self.settings.kd_loss)
        n = k.count.clamp_min(1)
        return {"soft": k.soft / n, "hard": k.hard / n, "total": k.total(self.settings.alpha) / n}

    def forward(self, student_logits: Any, teacher_logits: Any, labels: Any) -> Tensor:
        """The weighted total (a 0-dim tensor: ``float(loss)`` or ``f"{loss:.4f}"``)."""
        return self.terms(student_logits, teacher_logits, labels)["total"]

    __call__ = forward

    def __repr__(self) -> str:
        s = self.settings
        return f"DistillationLoss(temperature={s.temperature}, alpha={s.alpha}, kd_loss={s.kd_loss!r})"


def _hidden_list(states: Any) -> list[Tensor]:
    return [as_tensor(h, torch.float32) for h in states]


class ProgressiveDistillation:
    """Hidden-state MSE over ``(student_layer, teacher_layer)`` pairs, weighted (Patient KD).

    The lists are indexed by the pairs' numbers as given (``SafeTensorsTeacher.hidden_states``
    returns block outputs in that convention). Hidden sizes must match here; a student narrower
    than its teacher is matched through a learned projection inside :class:`DistillationTrainer`.
    """

    def __init__(self, layer_mapping: Sequence[tuple[int, int]], weight: float | None = None):
        self.settings = ProgressiveSettings()
        set_field(self.settings, "layer_mapping", [tuple(p) for p in layer_mapping],
                  f"ProgressiveDistillation({list(layer_mapping)!r})")
        if not self.settings.layer_mapping:
            raise UsageError("ProgressiveDistillation([]): the layer mapping is empty",
                             hint="pass pairs (student_layer, teacher_layer), e.g. [(0, 3), (1, 7)]")
        if weight is not None:
            self.weight(weight)
        self._loss = _losses.ProgressiveDistillation(self.settings.layer_mapping)

    @classmethod
    def new(cls, layer_mapping: Sequence[tuple[int, int]]) -> "ProgressiveDistillation":
        return cls(layer_mapping)

    def weight(self, value: float) -> "ProgressiveDistillation":
        set_field(self.settings, "weight", value, f"ProgressiveDistillation.weight({value!r})")
        return self

    @property
    def layer_mapping(self) -> list[tuple[int, int]]:
        return list(self.settings.layer_mapping)

    def compute_loss(self, student_hiddens: Any, teacher_hiddens: Any, mask: Any = None) -> Tensor:
        """``weight`` x the per-token MSE averaged over pairs (``mask`` [batch, seq] marks real tokens)."""
        s, t = _hidden_list(student_hiddens), _hidden_list(teacher_hiddens)
        for i, j in self.settings.layer_mapping:
            for name, states, idx in (("student", s, i), ("teacher", t, j)):
                if not -len(states) <= idx < len(states):
                    raise UsageError(f"ProgressiveDistillation: {name} layer {idx} is out of range "
                                     f"({len(states)} hidden states given)")
            if s[i].shape[-1] != t[j].shape[-1]:
                raise UsageError(
                    f"ProgressiveDistillation: student hidden size {s[i].shape[-1]} differs from the teacher's "
                    f"{t[j].shape[-1]}",
                    hint="a learned projection matches different widths: use "
                    "TrainerConfig.with_progressive(layer_mapping) and DistillationTrainer",
                )
        m = torch.ones(s[0].shape[:-1]) if mask is None else as_tensor(mask, torch.float32)
        # the engine's sum over real tokens, as a mean per token
        return self.settings.weight * self._loss.sum_loss(s, t, m) / m.sum().clamp_min(1)


class AttentionTransfer:
    """Attention-map transfer (Zagoruyko & Komodakis 2017), weighted; maps are ``[batch, heads, seq, seq]``."""

    def __init__(self, layer_mapping: Sequence[tuple[int, int]] | None = None, weight: float | None = None):
        self.settings = AttentionSettings()
        if layer_mapping is not None:
            set_field(self.settings, "layer_mapping", [tuple(p) for p in layer_mapping],
                      f"AttentionTransfer({list(layer_mapping)!r})")
        if weight is not None:
            self.weight(weight)
        self._loss = _losses.AttentionTransfer(self.settings.layer_mapping)

    @classmethod
    def new(cls, layer_mapping: Sequence[tuple[int, int]] | None = None) -> "AttentionTransfer":
        return cls(layer_mapping)

    def weight(self, value: float) -> "AttentionTransfer":
        set_field(self.settings, "weight", value, f"AttentionTransfer.weight({value!r})")
        return self

    def compute_loss(self, student_attention: Any, teacher_attention: Any, mask: Any = None) -> Tensor:
        """``weight`` x the mean over layer pairs and sequences of the normalised-map distance."""
        s, t = _hidden_list(student_attention), _hidden_list(teacher_attention)
        if not s or not t:
            raise UsageError("AttentionTransfer.compute_loss: no attention maps given",
                             hint="pass the per-layer maps, e.g. SafeTensorsTeacher.attention_weights(input_ids)")
        m = torch.ones((s[0].shape[0], s[0].shape[-1])) if mask is None else as_tensor(mask, torch.float32)
        # the engine's sum over sequences, as a mean per sequence
        return self.settings.weight * self._loss.sum_loss(s, t, m) / s[0].shape[0]


__all__ = ["AttentionTransfer", "DistillationLoss", "ProgressiveDistillation"]
