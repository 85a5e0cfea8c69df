"""The seam between an objective and the engine: one micro-batch's loss sums, typed.

An objective returns sums, not means: the engine only knows the normalisers once every micro-batch
of an optimizer step (and every process) has been counted, so it divides once per step. Two kinds
of sum exist: per token (cross-entropy, KD divergences, hidden-state matching: divided by the step's
counted tokens) and per sequence (attention transfer, embedding cosine: divided by its sequences).
The same split decides how the logged parts are averaged, so it lives in the type, not in key names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

# how accumulated totals are keyed (internal to this module and the engine's cross-process reduce)
_TOKEN, _SEQ, _COUNT = "tok:", "seq:", "n:"


@dataclass
class LossTerms:
    """One micro-batch's loss sums (what ``Objective.loss_terms`` returns)."""

    loss: Tensor  # token-level sum over counted tokens; carries the gradient
    tokens: Tensor  # tokens whose label counts: the token-level normaliser's share of this micro-batch
    sequence_loss: Tensor | None = None  # sequence-level sum (attention, embedding); carries the gradient
    per_token: dict[str, Tensor] = field(default_factory=dict)  # detached parts logged per token: loss_ce, ...
    per_sequence: dict[str, Tensor] = field(default_factory=dict)  # detached parts logged per sequence
    counters: dict[str, Tensor] = field(default_factory=dict)  # totals logged as they are: generated_tokens, ...

    def objective(self, token_norm: float, sequence_norm: float) -> Tensor:
        """The scalar to differentiate: each sum divided by the step's (global) count of its kind."""
        loss = self.loss * token_norm
        if self.sequence_loss is not None:
            loss = loss + self.sequence_loss * sequence_norm
        return loss

    def named(self) -> dict[str, Tensor]:
        """Every sum by name (``loss``, ``loss_seq``, ``tokens``, the parts, the counters): for tests and
        inspection; the engine reads the fields."""
        out = {"loss": self.loss, "tokens": self.tokens, **self.per_token, **self.per_sequence, **self.counters}
        if self.sequence_loss is not None:
            out["loss_seq"] = self.sequence_loss
        return out

    def totals(self, sequences: int) -> dict[str, Tensor | float]:
        """Detached sums to accumulate over micro-batches, steps and processes (see :func:`means`)."""
        out: dict[str, Tensor | float] = {"tokens": self.tokens.detach(), "sequences": float(sequences),
                                          _TOKEN + "loss": self.loss.detach()}
        if self.sequence_loss is not None:
            out[_SEQ + "loss"] = self.sequence_loss.detach()
        out.update({_TOKEN + k: v.detach() for k, v in self.per_token.items()})
        out.update({_SEQ + k: v.detach() for k, v in self.per_sequence.items()})
        out.update({_COUNT + k: v.detach() for k, v in self.counters.items()})
        return out


def accumulate(into: dict[str, Tensor | float], totals: dict[str, Tensor | float]) -> None:
    """Add one micro-batch's (or step's) :meth:`LossTerms.totals` into a running sum."""
    for k, v in totals.items():
        into[k] = into.get(k, 0.0) + v


def means(totals: dict[str, Tensor | float]) -> dict[str, float]:
    """Logged values from accumulated totals: ``loss`` (token mean + sequence mean), each part's mean
    by its own kind, and the counters as totals."""
    tokens = max(1.0, float(totals.get("tokens", 0.0)))
    seqs = max(1.0, float(totals.get("sequences", 0.0)))
    out: dict[str, float] = {}
    for k, v in sorted(totals.items()):
        if k.startswith(_TOKEN):
            out[k[len(_TOKEN):]] = out.get(k[len(_TOKEN):], 0.0) + float(v) / tokens
        elif k.startswith(_SEQ):
            out[k[len(_SEQ):]] = out.get(k[len(_SEQ):], 0.0) + float(v) / seqs
        elif k.startswith(_COUNT):
            out[k[len(_COUNT):]] = float(v)
    return out
