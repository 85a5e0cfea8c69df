"""Distillation losses: logit KD (Hinton et al. 2015), hidden-state matching (Sun et al. 2019,
Patient KD) and attention transfer (Zagoruyko & Komodakis 2017).

Conventions (kept from the original, they are the standard ones):

* Logit KD per token: ``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)``;
  teacher-to-student forward KL, ``T^2`` keeps gradient magnitudes comparable across T, hard CE on
  the raw (un-tempered) student logits.
* Every term is returned as a **sum over valid tokens** plus the count, so the caller can normalise
  once by the number of real tokens in the whole optimizer step: gradient accumulation and
  padding then cannot change the result.
* The vocabulary dimension is processed in chunks of tokens, so at most one chunk of
  ``(tokens x vocab)`` fp32 temporaries exists at a time (a 49k vocabulary at 1k tokens is 200 MB
  per copy otherwise).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = -100
# tokens per chunk of the vocabulary-wide loss computation
KD_CHUNK_TOKENS = 1024


# skew KL: the share of the teacher mixed into the student's side; DistiLLM's value. The mixture keeps the
# divergence and its gradient bounded where the student puts ~0 mass on a token the teacher likes.
SKEW = 0.1
_LOG_SKEW, _LOG_1M_SKEW = math.log(SKEW), math.log(1.0 - SKEW)


def _divergence(s_logp: Tensor, t_logp: Tensor, kind: str, beta: float = 0.5) -> Tensor:
    """Per-row divergence between student and teacher log-probabilities. [n, V] -> [n].

    ``beta`` weighs the teacher in JSD's mixture ``m = beta * q + (1 - beta) * p`` (TRL/GKD convention):
    ``beta * KL(q || m) + (1 - beta) * KL(p || m)``; 0.5 is the symmetric Jensen-Shannon divergence.
    """
    if kind == "forward_kl":  # KL(teacher || student)
        return (t_logp.exp() * (t_logp - s_logp)).sum(-1)
    if kind == "reverse_kl":  # KL(student || teacher)
        return (s_logp.exp() * (s_logp - t_logp)).sum(-1)
    if kind == "skew_kl":  # KL(teacher || l*teacher + (1-l)*student), DistiLLM (Ko et al. 2024), l = SKEW
        m_logp = torch.logaddexp(t_logp + _LOG_SKEW, s_logp + _LOG_1M_SKEW)
        return (t_logp.exp() * (t_logp - m_logp)).sum(-1)
    if kind == "jsd":
        m_logp = torch.logaddexp(t_logp + math.log(beta), s_logp + math.log1p(-beta))
        to_teacher = (t_logp.exp() * (t_logp - m_logp)).sum(-1)
        return beta * to_teacher + (1 - beta) * (s_logp.exp() * (s_logp - m_logp)).sum(-1)
    raise ValueError(f"unknown kd_loss {kind!r}")


@dataclass
class KDTerms:
    """Sums over valid tokens (divide by ``count``, or by the step's token count, for means)."""

    soft: Tensor  # T^2 * divergence, summed
    hard: Tensor  # cross-entropy, summed
    count: Tensor  # number of valid tokens

    def total(self, alpha: float) -> Tensor:
        return alpha * self.soft + (1.0 - alpha) * self.hard


def kd_terms(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    labels: Tensor,
    *,
    temperature: float = 1.0,
    kind: str = "forward_kl",
    need_soft: bool = True,
    need_hard: bool = True,
    teacher_topk: tuple[Tensor, Tensor, Tensor] | None = None,
    chunk_tokens: int = KD_CHUNK_TOKENS,
    beta: float = 0.5,
) -> KDTerms:
    """Soft (KD) and hard (CE) sums over tokens whose label is not IGNORE_INDEX.

    ``student_logits`` / ``teacher_logits``: ``[..., V]``; ``labels``: ``[...]``. The teacher may
    instead be given as a sparse target ``(weights, ids, negentropy)``: see :func:`topk_divergence`.
    Loss math runs in fp32 whatever the input precision.
    """
    vocab = student_logits.shape[-1]
    s_flat = student_logits.reshape(-1, vocab)
    y_flat = labels.reshape(-1)
    valid = (y_flat != IGNORE_INDEX).nonzero(as_tuple=True)[0]
    soft = student_logits.new_zeros((), dtype=torch.float32)
    hard = student_logits.new_zeros((), dtype=torch.float32)
    t_flat = teacher_logits.reshape(-1, teacher_logits.shape[-1]) if teacher_logits is not None else None
    if teacher_topk is not None:
        tk_vals, tk_idx, tk_tail = (x.reshape(-1, *x.shape[labels.dim():]) for x in teacher_topk)
    for start in range(0, valid.numel(), chunk_tokens):
        rows = valid[start : start + chunk_tokens]
        s = s_flat.index_select(0, rows).float()  # [n, V]
        y = y_flat.index_select(0, rows)
        s_logp = F.log_softmax(s / temperature, dim=-1) if need_soft or temperature == 1.0 else None
        if need_hard:
            if temperature == 1.0:  # reuse the softmax already computed for the soft term
                hard = hard - s_logp.gather(-1, y.unsqueeze(-1)).sum()
            else:
                hard = hard + F.cross_entropy(s, y, reduction="sum")
        if need_soft:
            if teacher_topk is not None:
                div = topk_divergence(s_logp, tk_vals.index_select(0, rows), tk_idx.index_select(0, rows),
                                      tk_tail.index_select(0, rows), temperature)
            else:
                t = t_flat.index_select(0, rows).float()[:, :vocab]
                div = _divergence(s_logp, F.log_softmax(t / temperature, dim=-1), kind, beta)
            soft = soft + (temperature**2) * div.sum()
    count = torch.tensor(float(valid.numel()), device=student_logits.device)
    return KDTerms(soft=soft, hard=hard, count=count)


def topk_divergence(s_logp: Tensor, t_w: Tensor, t_idx: Tensor, t_negent: Tensor, temperature: float) -> Tensor:
    """Forward KL against a sparse teacher: ``negent - sum_j w_j log q(id_j)`` per row.

    ``t_w``/``t_idx`` ``[n, c]``: teacher probabilities (at temperature T) on token ids; ``t_negent``
    ``[n]``: the teacher's ``sum_v p_v log p_v``. Id -1 is the coarsened tail: the student's mass outside
    the row's other ids stands for it (then the value is the exact KL of the two coarsened distributions,
    a lower bound of the full KL). Ids may repeat (sampled tail tokens, Anshumann et al. 2025): with
    weights ``tail / m`` on tokens drawn from the teacher's tail the value and its gradient are unbiased
    estimates of the full-vocabulary KL. ``s_logp`` is already at temperature T. See teacher_cache.py.
    """
    del temperature  # the cache is built at the run's temperature (its manifest says which)
    idx = t_idx.long()
    tail = idx < 0
    s_sel = s_logp.gather(-1, idx.clamp_min(0))  # [n, c]
    if bool(tail.any()):
        kept = (s_sel.exp() * (~tail)).sum(-1)
        s_tail = torch.log1p(-kept.clamp(max=1 - 1e-6))
        s_sel = torch.where(tail, s_tail.unsqueeze(-1), s_sel)
    return t_negent.float() - (t_w.float() * s_sel).sum(-1)


def topk_teacher(logits: Tensor, k: int, temperature: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """Teacher logits ``[..., V]`` -> the coarsened top-k target ``(w, ids, negent)`` of :func:`topk_divergence`
    (exact probabilities, no quantisation: the compact stored form is in teacher_cache.py)."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    top, idx = logp.topk(k, dim=-1)
    tail = -torch.expm1(torch.logsumexp(top, dim=-1).clamp(max=0.0))
    w = torch.cat([top.exp(), tail.unsqueeze(-1)], dim=-1)
    ids = torch.cat([idx, torch.full_like(idx[..., :1], -1)], dim=-1)
    negent = torch.where(w > 0, w * torch.log(w.clamp_min(1e-38)), torch.zeros_like(w)).sum(-1)
    return w, ids, negent


def hidden_state_sum(student_h: Tensor, teacher_h: Tensor, mask: Tensor) -> Tensor:
    """Sum over valid tokens of the per-token MSE (mean over hidden dims). [b, s, d] -> scalar."""
    diff = (student_h.float() - teacher_h.float()).pow(2).mean(-1)  # [b, s]
    return (diff * mask).sum()


def hidden_cosine_sum(student_h: Tensor, teacher_h: Tensor, mask: Tensor) -> Tensor:
    """Sum over valid tokens of ``1 - cos(student, teacher)``: direction only, blind to the scale that
    MSE is dominated by (residual streams grow with depth). [b, s, d] -> scalar."""
    cos = F.cosine_similarity(student_h.float(), teacher_h.float(), dim=-1, eps=1e-6)  # [b, s]
    return ((1.0 - cos) * mask).sum()


HIDDEN_LOSSES = {"mse": hidden_state_sum, "cosine": hidden_cosine_sum}


def pool(hidden: Tensor, mask: Tensor, how: str = "mean") -> Tensor:
    """One vector per sequence from ``[b, s, d]`` states: mean over real tokens, first, or last real token."""
    h = hidden.float()
    if how == "cls":
        return h[:, 0]
    m = mask.float()
    if how == "last":
        last = (m.sum(1).long() - 1).clamp_min(0)  # right padding: the last real token
        return h[torch.arange(h.shape[0], device=h.device), last]
    return (h * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True).clamp_min(1)


def pooled_cosine(student_h: Tensor, teacher_h: Tensor, mask: Tensor, how: str = "mean") -> Tensor:
    """``cos(pool(student), pool(teacher))`` per sequence: ``[b]``."""
    return F.cosine_similarity(pool(student_h, mask, how), pool(teacher_h, mask, how), dim=-1)


def embedding_cosine_sum(student_h: Tensor, teacher_h: Tensor, mask: Tensor, how: str = "mean") -> Tensor:
    """Sum over sequences of ``1 - cos(pool(student), pool(teacher))``: 0 when the embeddings agree."""
    return (1.0 - pooled_cosine(student_h, teacher_h, mask, how)).sum()


def attention_transfer_sum(student_a: Tensor, teacher_a: Tensor, mask: Tensor) -> Tensor:
    """Sum over sequences of ``|| A_s/||A_s||_F - A_t/||A_t||_F ||_F^2`` (heads averaged first).

    ``student_a``/``teacher_a``: ``[b, heads, s, s]`` (head counts may differ); ``mask``: ``[b, s]``.
    Padding rows and columns are zeroed before normalising.
    """
    a_s = student_a.float().mean(1)
    a_t = teacher_a.float().mean(1)
    m = mask.float()
    pair = m.unsqueeze(-1) * m.unsqueeze(-2)
    a_s, a_t = a_s * pair, a_t * pair
    a_s = a_s / a_s.flatten(1).norm(dim=-1).clamp_min(1e-12)[:, None, None]
    a_t = a_t / a_t.flatten(1).norm(dim=-1).clamp_min(1e-12)[:, None, None]
    return (a_s - a_t).pow(2).flatten(1).sum(-1).sum()


class ProgressiveDistillation(nn.Module):
    """Hidden-state matching over ``layer_mapping`` pairs ``(student_layer, teacher_layer)``: MSE, or
    ``loss="cosine"`` (1 - cosine similarity per token).

    Indices are 0-based block indices into lists of per-block outputs. When widths differ a learned
    ``nn.Linear(student_dim, teacher_dim)`` per pair maps student states (trained jointly, never
    saved into the student), as DistillKit and TextBrewer do.
    """

    def __init__(self, layer_mapping: Sequence[tuple[int, int]], student_dim: int | None = None,
                 teacher_dim: int | None = None, loss: str = "mse"):
        super().__init__()
        self.layer_mapping = [tuple(p) for p in layer_mapping]
        self.pair_sum = HIDDEN_LOSSES[loss]
        self._weight = 1.0
        if student_dim is not None and teacher_dim is not None and student_dim != teacher_dim:
            self.projections = nn.ModuleList(nn.Linear(student_dim, teacher_dim) for _ in self.layer_mapping)
        else:
            self.projections = None

    def weight(self, value: float) -> "ProgressiveDistillation":
        self._weight = value
        return self

    def sum_loss(self, student_hiddens: Sequence[Tensor], teacher_hiddens: Sequence[Tensor], mask: Tensor) -> Tensor:
        """Sum over valid tokens, averaged over pairs (unweighted)."""
        total = student_hiddens[0].new_zeros((), dtype=torch.float32)
        for i, (s_layer, t_layer) in enumerate(self.layer_mapping):
            h_s = student_hiddens[s_layer]
            if self.projections is not None:
                h_s = self.projections[i](h_s.to(self.projections[i].weight.dtype))
            total = total + self.pair_sum(h_s, teacher_hiddens[t_layer], mask)
        return total / len(self.layer_mapping)

    def compute_loss(self, student_hiddens: Sequence[Tensor], teacher_hiddens: Sequence[Tensor],
                     mask: Tensor | None = None) -> Tensor:
        """Weighted mean per-token loss (MSE or 1 - cosine)."""
        h0 = student_hiddens[0]
        if mask is None:
            mask = torch.ones(h0.shape[:-1], device=h0.device)
        return self._weight * self.sum_loss(student_hiddens, teacher_hiddens, mask) / mask.sum().clamp_min(1)


class AttentionTransfer(nn.Module):
    """Attention-map transfer: weighted mean over layer pairs and sequences."""

    def __init__(self, layer_mapping: Sequence[tuple[int, int]] | None = None):
        super().__init__()
        self.layer_mapping = [tuple(p) for p in layer_mapping] if layer_mapping else None
        self._weight = 1.0

    def weight(self, value: float) -> "AttentionTransfer":
        self._weight = value
        return self

    def sum_loss(self, student_attn: Sequence[Tensor], teacher_attn: Sequence[Tensor], mask: Tensor) -> Tensor:
        pairs = self.layer_mapping or list(zip(range(len(student_attn)), range(len(teacher_attn))))
        total = student_attn[0].new_zeros((), dtype=torch.float32)
        for s_layer, t_layer in pairs:
            total = total + attention_transfer_sum(student_attn[s_layer], teacher_attn[t_layer], mask)
        return total / len(pairs)

    def compute_loss(self, student_attn: Sequence[Tensor], teacher_attn: Sequence[Tensor],
                     mask: Tensor | None = None) -> Tensor:
        a0 = student_attn[0]
        if mask is None:
            mask = torch.ones((a0.shape[0], a0.shape[-1]), device=a0.device)
        return self._weight * self.sum_loss(student_attn, teacher_attn, mask) / a0.shape[0]


class _FusedForwardKD(torch.autograd.Function):
    """alpha*T^2*KL(t||s) + (1-alpha)*CE summed over rows, with the gradient computed in forward.

    The gradient of the soft term w.r.t. student logits is ``T * (softmax(s/T) - softmax(t/T))`` and
    of CE ``softmax(s) - onehot(y)``: computing it chunk by chunk during the forward pass keeps one
    ``(tokens x vocab)`` buffer instead of autograd's saved softmaxes, and backward is one multiply.
    """

    @staticmethod
    def forward(ctx: Any, s_logits: Tensor, t_logits: Tensor, labels: Tensor, temperature: float,  # type: ignore[override]
                alpha: float, chunk: int) -> tuple[Tensor, Tensor, Tensor]:
        n, vocab = s_logits.shape
        grad = torch.empty((n, vocab), dtype=torch.float32, device=s_logits.device)
        soft = torch.zeros((), dtype=torch.float32, device=s_logits.device)
        hard = torch.zeros((), dtype=torch.float32, device=s_logits.device)
        T = temperature
        for start in range(0, n, chunk):
            sl = slice(start, start + chunk)
            s = s_logits[sl].float()
            y = labels[sl]
            s_logp = F.log_softmax(s / T, dim=-1)
            t_logp = F.log_softmax(t_logits[sl].float()[:, :vocab] / T, dim=-1)
            p_t = t_logp.exp()
            soft += (T * T) * (p_t * (t_logp - s_logp)).sum()
            p_s = s_logp.exp()
            g = grad[sl]
            torch.sub(p_s, p_t, out=g)
            g.mul_(alpha * T)
            if T != 1.0:
                s_logp = F.log_softmax(s, dim=-1)
                p_s = s_logp.exp()
            hard -= s_logp.gather(-1, y.unsqueeze(-1)).sum()
            g.add_(p_s, alpha=1.0 - alpha)
            g.scatter_add_(-1, y.unsqueeze(-1), torch.full_like(y, -(1.0 - alpha), dtype=torch.float32).unsqueeze(-1))
        ctx.save_for_backward(grad)
        ctx.input_dtype = s_logits.dtype
        total = alpha * soft + (1.0 - alpha) * hard
        ctx.mark_non_differentiable(soft, hard)
        return total, soft, hard

    @staticmethod
    def backward(ctx: Any, g_total: Tensor, _g_soft: Tensor, _g_hard: Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return (grad * g_total).to(ctx.input_dtype), None, None, None, None, None


def fused_forward_kd(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, *, temperature: float,
                     alpha: float, chunk_tokens: int = KD_CHUNK_TOKENS) -> tuple[Tensor, KDTerms]:
    """(weighted total sum with gradient, detached terms) for forward-KL KD over valid tokens."""
    vocab = student_logits.shape[-1]
    y = labels.reshape(-1)
    valid = (y != IGNORE_INDEX).nonzero(as_tuple=True)[0]
    s = student_logits.reshape(-1, vocab).index_select(0, valid)
    t = teacher_logits.reshape(-1, teacher_logits.shape[-1]).index_select(0, valid)
    total, soft, hard = _FusedForwardKD.apply(s, t, y.index_select(0, valid), temperature, alpha, chunk_tokens)
    return total, KDTerms(soft=soft, hard=hard, count=torch.tensor(float(valid.numel()), device=s.device))
