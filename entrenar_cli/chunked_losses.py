"""Vocabulary-scale logit losses that never hold a whole ``[tokens x vocab]`` tensor.

A 150k-262k-row vocabulary makes the logits, not the model, the largest thing in a distillation
step: student logits, teacher logits, their softmaxes and the logits' gradient are each
``tokens x vocab`` floats (5.6 fp32 rows per token today). Here every logit loss is computed from
the **final hidden states and the output head's weight**, a chunk of tokens at a time: the chunk's
student logits (and, under no_grad, the teacher's) are formed, the loss and its gradient with
respect to those logits are computed at once, and the gradient is immediately folded back through
the head into ``d(loss)/d(hidden)`` (``[tokens x d]``) and ``d(loss)/d(weight)`` (``[vocab x d]``,
accumulated). The chunk's logits are then dropped, so memory is one chunk's temporaries (a fixed
budget) plus ``O(tokens x d)``. Backward only scales the stored gradients by ``grad_output``. This is
the idea of Liger-Kernel's fused-linear losses and Apple's Cut Cross-Entropy, in plain PyTorch.

Results are the same sums :func:`entrenar_cli.losses.kd_terms` returns for materialised logits
(``soft = T^2 * divergence``, ``hard = CE``, both summed over tokens whose label is not -100, and the
count), so callers normalise exactly as today. The math runs in fp32 whatever the inputs' dtype;
the head's matmuls run in the autocast dtype when autocast is on (as the model's own head would),
otherwise in the promoted dtype of hidden states and weight.

Head transforms supported on either side: ``logits = softcap(scale * (h @ W.T + b))[..., :vocab]``
with ``softcap(x) = cap * tanh(x / cap)`` (Gemma 2/3), ``scale`` a multiplier (Cohere ``logit_scale``,
Falcon-H1 ``lm_head_multiplier``; Granite's ``logits_scaling`` divides, i.e. ``scale = 1/s``).

Divergences (per token, at temperature T, ``p = softmax(student/T)``, ``q = softmax(teacher/T)``):

* ``forward_kl``  KL(q || p)
* ``reverse_kl``  KL(p || q)
* ``skew_kl``     KL(q || lam * q + (1 - lam) * p), lam = ``losses.SKEW`` (DistiLLM)
* ``jsd``         generalised JSD with mixture ``m = beta * q + (1 - beta) * p``:
                  ``beta * KL(q || m) + (1 - beta) * KL(p || m)`` (TRL/GKD convention); ``beta = 0.5``
                  is today's symmetric JSD in :func:`entrenar_cli.losses._divergence`.
* cached sparse teacher targets ``(weights, ids, negentropy)`` (top-k + tail, or sampled ids, see
  teacher_cache.py): the forward KL of :func:`entrenar_cli.losses.topk_divergence` (``kind`` and the
  temperature of the target are the cache's, as today).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from entrenar_cli import losses as _losses
from entrenar_cli.chunking import DEFAULT_BUDGET_BYTES, chunk_rows
from entrenar_cli.losses import IGNORE_INDEX, KDTerms

KINDS = ("forward_kl", "reverse_kl", "jsd", "skew_kl")
# skew KL's teacher share (losses.SKEW: DistiLLM's 0.1)
SKEW: float = getattr(_losses, "SKEW", 0.1)
# top-k tail clamp of losses.topk_divergence (the student's tail mass is 1 - sum(top-k), floored)
_TAIL_MAX = 1 - 1e-6


class OutputHead(NamedTuple):
    """``logits = softcap(scale * (hidden @ weight.T + bias))``: what a model's output head computes."""

    weight: Tensor  # [V, d]
    bias: Tensor | None = None  # [V]
    softcap: float | None = None  # cap * tanh(x / cap) after scaling
    scale: float | None = None  # multiplier before soft-capping


def head_logits(hidden: Tensor, head: OutputHead, vocab: int | None = None) -> Tensor:
    """The materialised logits ``[..., vocab]`` a head produces: the reference the chunked losses match."""
    w, b = head.weight[:vocab], None if head.bias is None else head.bias[:vocab]
    z = torch.nn.functional.linear(hidden, w, b)
    if head.scale is not None:
        z = z * head.scale
    if head.softcap is not None:
        z = torch.tanh(z / head.softcap) * head.softcap
    return z


# ---- one side's head, prepared once per call ------------------------------------------------


def _compute_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


class _Side:
    """A head in its compute dtype, trimmed to ``vocab`` rows: chunk logits and the chain rule back."""

    def __init__(self, head: OutputHead, hidden: Tensor, vocab: int):
        self.dtype = _compute_dtype(hidden, head.weight)
        self.w = head.weight[:vocab].detach().to(self.dtype)
        self.b = None if head.bias is None else head.bias[:vocab].detach().to(self.dtype)
        self.scale = head.scale
        self.cap = head.softcap

    @property
    def plain(self) -> bool:
        """Final logits are the matmul's output (no scaling or soft-capping)."""
        return self.scale is None and self.cap is None

    def logits(self, h: Tensor, upcast: bool = True) -> Tensor:
        """fp32 final logits ``[rows, vocab]`` for hidden rows ``h`` (a fresh tensor, safe to modify);
        ``upcast=False`` on a :attr:`plain` head: the matmul's output in the compute dtype."""
        h = h.to(self.dtype)
        z = torch.addmm(self.b, h, self.w.t()) if self.b is not None else h @ self.w.t()
        if not upcast:
            return z
        z = z.float()
        if self.scale is not None:
            z.mul_(self.scale)
        if self.cap is not None:
            z.div_(self.cap).tanh_().mul_(self.cap)
        return z

    def to_raw_grad(self, g: Tensor, z: Tensor) -> Tensor:
        """d/d(final logits) -> d/d(h @ W.T + b), in place; ``z`` are the final logits (consumed)."""
        if self.cap is not None:  # d(cap * tanh(x / cap))/dx = 1 - tanh^2 = 1 - (z / cap)^2
            u = z.div_(self.cap)
            g.mul_(u.square_().neg_().add_(1.0))
        if self.scale is not None:
            g.mul_(self.scale)
        return g


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """``(a * b).sum(-1)`` for [n, V] without an [n, V] temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


@dataclass(frozen=True)
class _Config:
    temperature: float
    alpha: float
    kind: str
    beta: float
    need_soft: bool


def _chunk(s: Tensor, y: Tensor, teacher: Tensor | tuple[Tensor, Tensor, Tensor] | None, cfg: _Config,
           need_grad: bool, grad_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """(soft sum, hard sum, d(alpha*soft + (1-alpha)*hard)/d(final student logits) or None) for one chunk.

    ``s``: student logits [c, V] (kept intact); ``teacher``: teacher logits [c, V] (consumed) or a top-k
    triple for these rows; logits in a lower precision are upcast here, so that a fused kernel reads
    them once. ``grad_dtype``: the dtype the gradient is returned in (default fp32).
    """
    s = s.float()
    if isinstance(teacher, Tensor):
        teacher = teacher.float()
    T, a = cfg.temperature, cfg.alpha
    lse = torch.logsumexp(s, dim=-1)
    hard = (lse - s.gather(-1, y.unsqueeze(-1)).squeeze(-1)).sum()
    soft = s.new_zeros(())
    g: Tensor | None = None
    if cfg.need_soft:
        s_logp = torch.log_softmax(s / T if T != 1.0 else s, dim=-1)  # as kd_terms: same rounding
        ga = a * T  # d(T^2 * D)/d(s) = T * dD/d(s/T), weighted by alpha
        if isinstance(teacher, tuple):
            soft, g = _sparse_forward_kl(s_logp, teacher, need_grad)
        else:
            t_logp = teacher
            if T != 1.0:
                t_logp.div_(T)
            t_logp.sub_(torch.logsumexp(t_logp, dim=-1, keepdim=True))
            if cfg.kind == "forward_kl":
                p_t = t_logp.exp()
                diff = t_logp.sub_(s_logp)
                soft = torch.dot(p_t.view(-1), diff.view(-1))
                if need_grad:  # dD/dz = p - q
                    g = torch.exp(s_logp, out=diff).sub_(p_t)
            elif cfg.kind == "reverse_kl":
                p_s = s_logp.exp()
                logr = t_logp.neg_().add_(s_logp)
                d_rows = _rowdot(p_s, logr)
                soft = d_rows.sum()
                if need_grad:  # dD/dz = p * (log p - log q - D)
                    g = logr.sub_(d_rows.unsqueeze(-1)).mul_(p_s)
            elif cfg.kind == "skew_kl":
                lam = SKEW
                m = torch.logaddexp(t_logp + math.log(lam), s_logp + math.log1p(-lam))
                p = t_logp.exp()
                diff = t_logp.sub_(m)
                soft = torch.dot(p.view(-1), diff.view(-1))
                if need_grad:  # dD/dz = -(1 - lam) * p * (r - <p, r>),  r = q / m
                    r = diff.exp_()
                    p_s = torch.exp(s_logp, out=p)
                    g = r.sub_(_rowdot(p_s, r).unsqueeze(-1)).mul_(p_s).mul_(-(1.0 - lam))
            elif cfg.kind == "jsd":
                beta = cfg.beta
                m = torch.logaddexp(s_logp + math.log1p(-beta), t_logp + math.log(beta))
                p = t_logp.exp()
                kl_t = torch.dot(p.view(-1), t_logp.sub_(m).view(-1))
                p_s = torch.exp(s_logp, out=p)
                ls = torch.sub(s_logp, m, out=t_logp)
                kl_s = _rowdot(p_s, ls)
                soft = beta * kl_t + (1.0 - beta) * kl_s.sum()
                if need_grad:  # dD/dz = (1 - beta) * p * (log p - log m - KL(p || m))
                    g = ls.sub_(kl_s.unsqueeze(-1)).mul_(p_s).mul_(1.0 - beta)
            else:
                raise ValueError(f"unknown kd_loss {cfg.kind!r}")
        soft = soft * (T * T)
        if g is not None:
            g.mul_(ga)
        del s_logp
    if need_grad and a < 1.0:  # CE: softmax(s) - onehot(y)
        p1 = torch.sub(s, lse.unsqueeze(-1)).exp_()
        if g is None:
            g = p1.mul_(1.0 - a)
        else:
            g.add_(p1, alpha=1.0 - a)
            del p1
        g.scatter_add_(-1, y.unsqueeze(-1), torch.full((y.numel(), 1), -(1.0 - a), device=g.device))
    if g is not None and grad_dtype is not None:
        g = g.to(grad_dtype)
    return soft, hard, g


_compiled_chunk: Any = None
_fuse_failed: str | None = None


def _chunk_impl(fused: bool) -> Any:
    """:func:`_chunk`, or (``fused``) its torch.compile form: the ~20 element-wise passes over each
    ``[rows x vocab]`` chunk become a few fused loops (CPU: vectorised C++, CUDA: Triton kernels)."""
    global _compiled_chunk
    if not fused or _fuse_failed is not None:
        return _chunk
    if _compiled_chunk is None:
        _compiled_chunk = torch.compile(_chunk, dynamic=None)
    return _compiled_chunk


def _call_chunk(fn: Any, *args: Any) -> tuple[Tensor, Tensor, Tensor | None]:
    """Run a chunk; a fused kernel that cannot be built here (no C++ compiler, an unsupported backend)
    switches this process to the unfused kernels once, with a warning, instead of failing the run."""
    global _fuse_failed
    if fn is _chunk or _fuse_failed is not None:
        return _chunk(*args)
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 - any compiler failure: the unfused path computes the same
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        _fuse_failed = f"{type(exc).__name__}: {first}"[:300]
        from entrenar_cli.console import warn

        warn(f"fused logit losses unavailable here ({_fuse_failed}); continuing with the unfused kernels "
             "(set training.fused_losses: false to skip the attempt)")
        return _chunk(*args)


def _sparse_forward_kl(s_logp: Tensor, target: tuple[Tensor, Tensor, Tensor],
                       need_grad: bool) -> tuple[Tensor, Tensor | None]:
    """losses.topk_divergence summed over rows, and its gradient w.r.t. the student's ``z = s/T``.

    ``target = (w, ids, negent)``: ``D = negent - sum_j w_j log q(ids_j)``, id -1 standing for the
    student's mass outside the row's other ids (clamped as there), ids may repeat.
    """
    w, ids, negent = target
    w = w.float()
    idx = ids.long()
    tail = idx < 0
    idx = idx.clamp_min(0)
    s_sel = s_logp.gather(-1, idx)  # [c, k]
    e = s_sel.exp().mul_(~tail)
    kept = e.sum(-1)
    clamped = kept.clamp(max=_TAIL_MAX)
    s_sel = torch.where(tail, torch.log1p(-clamped).unsqueeze(-1), s_sel)
    soft = negent.float().sum() - torch.dot(w.view(-1), s_sel.view(-1))
    if not need_grad:
        return soft, None
    # dD/d(log q_j) = -w_j + w_tail * q_j / (1 - kept) on kept ids (no tail term where the clamp is active)
    w_tail = (w * tail).sum(-1)
    coef = w_tail * (kept <= _TAIL_MAX).float() / (1.0 - clamped)
    g_sel = e.mul_(coef.unsqueeze(-1)).sub_(w * ~tail)  # 0 on tail columns
    # through log_softmax: dz = G - p * sum(G)
    g = s_logp.exp().mul_(-g_sel.sum(-1, keepdim=True))
    g.scatter_add_(-1, idx, g_sel)
    return soft, g


def _run(h_s: Tensor, student: _Side, y: Tensor, h_t: Tensor | None, teacher: _Side | None,
         topk: tuple[Tensor, Tensor, Tensor] | None, cfg: _Config, rows: int, grad_h: bool, grad_w: bool,
         grad_b: bool, fused: bool = False) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """The chunk loop: (soft sum, hard sum, dL/dh [n, d] fp32, dL/dW [V, d] fp32, dL/db [V] fp32)."""
    chunk = _chunk_impl(fused)
    # fused: the logits' upcast and the gradient's downcast join the compiled kernel (plain heads only:
    # scaling and soft-capping stay outside it, on fp32 logits)
    raw = fused and student.plain and (teacher is None or teacher.plain)
    grad_dtype = student.dtype if raw and student.dtype != torch.float32 else None
    n, d = h_s.shape
    vocab = student.w.shape[0]
    dev = h_s.device
    soft = torch.zeros((), dtype=torch.float32, device=dev)
    hard = torch.zeros((), dtype=torch.float32, device=dev)
    need_grad = grad_h or grad_w or grad_b
    g_h = torch.empty((n, d), dtype=torch.float32, device=dev) if grad_h else None
    g_b = torch.zeros((vocab,), dtype=torch.float32, device=dev) if grad_b else None
    # the weight-gradient products accumulate in the compute dtype and join the fp32 total every
    # `flush_every` chunks: fp32 never needs to, bf16 every _FLUSH_CHUNKS (an fp32 [V x d] upcast and add
    # per chunk cost more than the product itself on a CPU), fp16 every chunk (its range)
    flush_every = {torch.float32: 0, torch.bfloat16: _FLUSH_CHUNKS}.get(student.dtype, 1)
    g_w: Tensor | None = None
    part: Tensor | None = None
    pending = 0
    for start in range(0, n, rows):
        sl = slice(start, min(n, start + rows))
        h_c = h_s[sl]
        s = student.logits(h_c, upcast=not raw)
        t: Tensor | tuple[Tensor, Tensor, Tensor] | None = None
        if cfg.need_soft:
            if topk is not None:
                t = (topk[0][sl], topk[1][sl], topk[2][sl])
            else:
                assert teacher is not None and h_t is not None
                t = teacher.logits(h_t[sl], upcast=not raw)
        c_soft, c_hard, g = _call_chunk(chunk, s, y[sl], t, cfg, need_grad, grad_dtype)
        del t
        soft += c_soft
        hard += c_hard
        if g is None:
            continue
        g = student.to_raw_grad(g, s)
        del s
        if g_b is not None:
            g_b += g.sum(0, dtype=torch.float32)
        g_c = g if student.dtype == torch.float32 else g.to(student.dtype)
        if g_h is not None:
            if g_c.dtype == torch.float32:
                torch.mm(g_c, student.w, out=g_h[sl])
            else:
                g_h[sl] = torch.mm(g_c, student.w).float()
        if grad_w:
            h_w = h_c.to(student.dtype)
            part = torch.mm(g_c.t(), h_w) if part is None else part.addmm_(g_c.t(), h_w)
            pending += 1
            if pending == flush_every:
                g_w = _flush(g_w, part)
                part, pending = None, 0
    if part is not None:
        g_w = _flush(g_w, part)
    if grad_w and g_w is None:  # no valid rows
        g_w = torch.zeros((vocab, d), dtype=torch.float32, device=dev)
    return soft, hard, g_h, g_w, g_b


# chunks whose bf16 weight-gradient products are summed in bf16 before joining the fp32 total: at most
# this many roundings of a partial sum (relative error ~sqrt(8) * 2^-9 typical), the upcast paid 1/8 as often
_FLUSH_CHUNKS = 8


def _flush(total: Tensor | None, part: Tensor) -> Tensor:
    """``total + part`` in fp32 (``part`` itself when it is the first and already fp32: no copy)."""
    return part.float() if total is None else total.add_(part)


class _ChunkedLogitLoss(torch.autograd.Function):
    """``alpha * soft + (1 - alpha) * hard`` over rows, with its gradient computed in forward."""

    @staticmethod
    def forward(ctx: Any, h_s: Tensor, w_s: Tensor, b_s: Tensor | None,  # type: ignore[override]
                setup: tuple[Any, ...]) -> tuple[Tensor, Tensor, Tensor]:
        student, y, h_t, teacher, topk, cfg, rows, fused = setup
        device_type = h_s.device.type
        with torch.autocast(device_type, enabled=False):
            soft, hard, g_h, g_w, g_b = _run(h_s, student, y, h_t, teacher, topk, cfg, rows,
                                             ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                                             b_s is not None and ctx.needs_input_grad[2], fused)
        ctx.save_for_backward(*(x if x is not None else torch.empty(0) for x in (g_h, g_w, g_b)))
        ctx.has = (g_h is not None, g_w is not None, g_b is not None)
        ctx.dtypes = (h_s.dtype, w_s.dtype, None if b_s is None else b_s.dtype)
        total = cfg.alpha * soft + (1.0 - cfg.alpha) * hard
        ctx.mark_non_differentiable(soft, hard)
        return total, soft, hard

    @staticmethod
    def backward(ctx: Any, g_total: Tensor, *_: Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        if getattr(ctx, "consumed", False):
            raise RuntimeError("the chunked logit loss scales its stored gradients in place: backward runs once")
        ctx.consumed = True
        out: list[Tensor | None] = []
        for grad, has, dtype in zip(ctx.saved_tensors, ctx.has, ctx.dtypes):
            # in place: a [vocab x d] fp32 weight gradient is not copied
            out.append(grad.mul_(g_total).to(dtype) if has else None)
        return out[0], out[1], out[2], None


# ---- public entry points --------------------------------------------------------------------


def _flat_valid(labels: Tensor, *tensors: Tensor | None) -> tuple[Tensor, Tensor, list[Tensor | None]]:
    """(valid row indices, their labels, each tensor's valid rows) with leading dims flattened like labels."""
    y = labels.reshape(-1)
    valid = (y != IGNORE_INDEX).nonzero(as_tuple=True)[0]
    out: list[Tensor | None] = []
    for x in tensors:
        if x is None:
            out.append(None)
            continue
        flat = x.reshape(-1, *x.shape[labels.dim():])
        if flat.shape[0] != y.shape[0]:
            raise ValueError(f"rows {tuple(x.shape)} do not match labels {tuple(labels.shape)}")
        out.append(flat.index_select(0, valid))
    return valid, y.index_select(0, valid), out


def _check(temperature: float, alpha: float, kind: str, beta: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if kind not in KINDS:
        raise ValueError(f"unknown kd_loss {kind!r} (one of {', '.join(KINDS)})")
    if not 0.0 < beta < 1.0:
        raise ValueError(f"jsd beta must be in (0, 1), got {beta}")


def chunked_kd_loss(
    student_hidden: Tensor,
    student_head: OutputHead,
    labels: Tensor,
    *,
    teacher_hidden: Tensor | None = None,
    teacher_head: OutputHead | None = None,
    teacher_topk: tuple[Tensor, Tensor, Tensor] | None = None,
    temperature: float = 1.0,
    alpha: float = 0.5,
    kind: str = "forward_kl",
    beta: float = 0.5,
    vocab: int | None = None,
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
    chunk_tokens: int | None = None,
    fused: bool = False,
) -> tuple[Tensor, KDTerms]:
    """Logit KD + CE from hidden states: ``(alpha * soft + (1 - alpha) * hard, KDTerms)``.

    ``student_hidden``: ``[..., d_s]`` states that enter the student's head; ``labels``: ``[...]``
    (-100 = ignored). The teacher is either ``teacher_hidden`` ``[..., d_t]`` + ``teacher_head`` (used
    under no_grad) or a cached sparse target ``teacher_topk`` ``(weights, ids, negentropy)`` ``[..., c]``/``[...]``
    (:func:`losses.topk_teacher`, teacher_cache.py). Only the
    first ``vocab`` logits of each side are compared (default: all of the student's). The first return
    value carries the gradient to ``student_hidden``, the head weight and bias (those that require it);
    the terms' ``soft``/``hard`` are detached sums, exactly what :func:`losses.kd_terms` returns. With
    ``alpha == 0`` no teacher is needed and ``soft`` is 0 (plain chunked CE). ``fused``: the per-chunk
    element-wise work runs as torch.compile'd fused kernels (same math; see :func:`_chunk_impl`).
    """
    _check(temperature, alpha, kind, beta)
    need_soft = alpha > 0
    if need_soft and teacher_topk is None and (teacher_hidden is None or teacher_head is None):
        raise ValueError("alpha > 0 needs a teacher: teacher_hidden + teacher_head, or teacher_topk")
    w_s = student_head.weight
    vocab = int(vocab if vocab is not None else w_s.shape[0])
    if vocab > w_s.shape[0] or (need_soft and teacher_topk is None and vocab > teacher_head.weight.shape[0]):
        raise ValueError(f"vocab {vocab} exceeds a head's rows")
    if student_hidden.shape[-1] != w_s.shape[1]:
        raise ValueError(f"student hidden size {student_hidden.shape[-1]} != head input {w_s.shape[1]}")
    h_flat = student_hidden.reshape(-1, student_hidden.shape[-1])
    if h_flat.shape[0] != labels.numel():
        raise ValueError(f"hidden rows {h_flat.shape[0]} do not match labels {tuple(labels.shape)}")
    t_h = teacher_hidden if need_soft and teacher_topk is None else None
    tk = teacher_topk if need_soft and teacher_topk is not None else (None, None, None)
    valid, y, (h_t, tk_v, tk_i, tk_t) = _flat_valid(labels, t_h, *tk)
    h_s = h_flat.index_select(0, valid)
    student = _Side(student_head, h_s, vocab)
    teacher = _Side(teacher_head, h_t, vocab) if h_t is not None and teacher_head is not None else None
    if h_t is not None:
        h_t = h_t.detach()
    topk = (tk_v, tk_i, tk_t) if tk_v is not None else None
    cfg = _Config(temperature, alpha, kind, beta, need_soft)
    rows = chunk_tokens or chunk_rows(vocab, budget_bytes, teacher=need_soft)
    w = w_s[:vocab]
    b = None if student_head.bias is None else student_head.bias[:vocab]
    count = torch.tensor(float(valid.numel()), device=h_s.device)
    wants_grad = torch.is_grad_enabled() and (h_s.requires_grad or w.requires_grad or
                                              (b is not None and b.requires_grad))
    if not wants_grad:
        with torch.no_grad(), torch.autocast(h_s.device.type, enabled=False):
            soft, hard, *_ = _run(h_s, student, y, h_t, teacher, topk, cfg, rows, False, False, False, fused)
        return alpha * soft + (1.0 - alpha) * hard, KDTerms(soft=soft, hard=hard, count=count)
    total, soft, hard = _ChunkedLogitLoss.apply(h_s, w, b, (student, y, h_t, teacher, topk, cfg, rows, fused))
    return total, KDTerms(soft=soft, hard=hard, count=count)


def chunked_ce(hidden: Tensor, head: OutputHead, labels: Tensor, *, vocab: int | None = None,
               budget_bytes: int = DEFAULT_BUDGET_BYTES, chunk_tokens: int | None = None,
               fused: bool = False) -> tuple[Tensor, KDTerms]:
    """Summed cross-entropy over valid tokens from hidden states (fine-tuning): ``(hard, KDTerms)``."""
    return chunked_kd_loss(hidden, head, labels, alpha=0.0, vocab=vocab, budget_bytes=budget_bytes,
                           chunk_tokens=chunk_tokens, fused=fused)


@dataclass
class EvalSums:
    """Held-out sums over valid tokens (tensors: no host sync until the caller reads them)."""

    ce: Tensor  # student cross-entropy
    kl: Tensor  # KL(teacher || student) at T=1
    agree: Tensor  # tokens where the student's and the teacher's argmax agree
    teacher_ce: Tensor  # teacher cross-entropy
    count: Tensor


@torch.no_grad()
def chunked_eval_sums(student_hidden: Tensor, student_head: OutputHead, teacher_hidden: Tensor,
                      teacher_head: OutputHead, labels: Tensor, *, vocab: int | None = None,
                      budget_bytes: int = DEFAULT_BUDGET_BYTES, chunk_tokens: int | None = None) -> EvalSums:
    """What DistillObjective.evaluate measures (student CE, forward KL at T=1, top-1 agreement, teacher CE).

    Matches ``kd_terms(s, t, labels)``, ``kd_terms(t, None, labels)`` and the argmax agreement on
    materialised ``[..., :vocab]`` logits, one chunk of tokens at a time.
    """
    vocab = int(vocab if vocab is not None else student_head.weight.shape[0])
    valid, y, (h_s, h_t) = _flat_valid(labels, student_hidden, teacher_hidden)
    assert h_s is not None and h_t is not None
    student = _Side(student_head, h_s, vocab)
    teacher = _Side(teacher_head, h_t, vocab)
    rows = chunk_tokens or chunk_rows(vocab, budget_bytes, teacher=True)
    dev = h_s.device
    ce, kl, agree, t_ce = (torch.zeros((), dtype=torch.float32, device=dev) for _ in range(4))
    with torch.autocast(dev.type, enabled=False):
        for start in range(0, h_s.shape[0], rows):
            sl = slice(start, start + rows)
            yc = y[sl].unsqueeze(-1)
            s = student.logits(h_s[sl])
            t = teacher.logits(h_t[sl])
            agree += (s.argmax(-1) == t.argmax(-1)).sum()
            s_lse = torch.logsumexp(s, -1, keepdim=True)
            t_lse = torch.logsumexp(t, -1, keepdim=True)
            ce += (s_lse - s.gather(-1, yc)).sum()
            t_ce += (t_lse - t.gather(-1, yc)).sum()
            s_logp = s.sub_(s_lse)
            t_logp = t.sub_(t_lse)
            p_t = t_logp.exp()
            kl += torch.dot(p_t.view(-1), t_logp.sub_(s_logp).view(-1))
    return EvalSums(ce=ce, kl=kl, agree=agree, teacher_ce=t_ce, count=torch.tensor(float(valid.numel()), device=dev))


# ---- finding a model's head and the states that enter it ---------------------------------------

# config attribute -> how it transforms the head's output (multiplier, or divisor)
_SCALE_ATTRS: tuple[tuple[str, bool], ...] = (
    ("logit_scale", False),  # Cohere, Cohere2: logits * logit_scale
    ("logits_scaling", True),  # Granite family: logits / logits_scaling
    ("lm_head_multiplier", False),  # Falcon-H1
    ("output_multiplier", False),
)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model inside DDP/DataParallel, torch.compile's wrapper and a peft PeftModel."""
    for _ in range(8):
        name = type(model).__name__
        if name in ("DistributedDataParallel", "DataParallel", "FullyShardedDataParallel") and \
                isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif callable(getattr(model, "get_base_model", None)) and hasattr(model, "peft_config"):
            model = model.get_base_model()
        else:
            break
    return model


def _text_config(model: nn.Module) -> Any:
    cfg = getattr(model, "config", None)
    get = getattr(cfg, "get_text_config", None)
    return get() if callable(get) else cfg


def output_head(model: nn.Module) -> OutputHead | None:
    """The output head of a transformers causal/masked LM as an :class:`OutputHead`, or None.

    Works through DDP, torch.compile and peft wrappers; tied heads return the (shared) embedding
    weight. The hidden states that enter it are :func:`final_hidden`'s (for BERT-style MLM heads: the
    output of the head's transform, which therefore still trains). None when the head is not a plain
    ``nn.Linear`` (a LoRA-wrapped or quantised head, a ``modules_to_save`` copy): the caller falls back
    to materialised logits. Architectures that post-process logits in ways not listed here are caught
    by :func:`head_matches`, which callers should run once on a few tokens.
    """
    m = unwrap_model(model)
    get = getattr(m, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if type(head) is not nn.Linear or not head.weight.is_floating_point():
        return None
    cfg = _text_config(m)
    cap = getattr(cfg, "final_logit_softcapping", None)
    scale: float | None = None
    for attr, divide in _SCALE_ATTRS:
        value = getattr(cfg, attr, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and float(value) != 1.0:
            scale = (1.0 / float(value)) if divide else float(value)
            break
    return OutputHead(weight=head.weight, bias=head.bias, softcap=float(cap) if cap else None, scale=scale)


class _Captured:
    hidden: Tensor | None = None


@contextlib.contextmanager
def capture_head_input(model: nn.Module) -> Iterator[_Captured]:
    """While active, the model's output head records its input and returns a ``[..., 1]`` placeholder.

    So ``model(**kwargs)`` runs the whole network (through DDP's forward, which the gradient sync
    needs, peft, MLM transforms, hooks) but never forms the ``[tokens x vocab]`` logits; its ``.logits``
    is the placeholder and must not be used.
    """
    head = unwrap_model(model).get_output_embeddings()
    box = _Captured()

    def forward(x: Tensor) -> Tensor:
        box.hidden = x
        return x.new_zeros((*x.shape[:-1], 1))

    previous = head.__dict__.get("forward")  # accelerate's hooks patch forward on the instance
    head.forward = forward
    try:
        yield box
    finally:
        if previous is not None:
            head.forward = previous
        else:
            del head.forward


def final_hidden(model: nn.Module, **kwargs: Any) -> tuple[Tensor, Any]:
    """(states entering the output head ``[..., d]``, the model's output) without computing logits.

    Call with the usual forward kwargs (input_ids, attention_mask, output_hidden_states, ...); the
    output's ``hidden_states``/``attentions`` are as usual, its ``logits`` a placeholder. An alternative
    for causal LMs is ``model.base_model(**kwargs).last_hidden_state`` (``model.model`` for llama,
    ``model.transformer`` for gpt2), but that bypasses DDP's forward and an MLM head's transform.
    """
    with capture_head_input(model) as box:
        out = model(**kwargs)
    if box.hidden is None:
        raise RuntimeError(f"{type(unwrap_model(model)).__name__}'s output head was not called")
    return box.hidden, out


@torch.no_grad()
def head_matches(model: nn.Module, head: OutputHead, rtol: float = 1e-3, **kwargs: Any) -> bool:
    """Whether ``head`` applied to :func:`final_hidden` reproduces ``model(**kwargs).logits``.

    A once-per-run check on a few tokens that guards against architectures post-processing logits in
    ways :func:`output_head` does not know (extra bias, vocab slicing): on False, fall back.
    """
    reference = model(**kwargs).logits
    hidden, _ = final_hidden(model, **kwargs)
    if reference.shape[-1] != head.weight.shape[0]:
        return False
    ours = head_logits(hidden.to(head.weight.dtype), head).float()
    reference = reference.float()
    tol = rtol * max(1.0, float(reference.abs().max()))
    return bool(ours.shape == reference.shape and (ours - reference).abs().max() <= tol)
