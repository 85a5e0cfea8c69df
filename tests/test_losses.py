"""Losses against hand-computed values and plain reference implementations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from entrenar_cli.hf_pipeline import DistillationLoss  # the design document's loss object (a facade)
from entrenar_cli.losses import (
    AttentionTransfer,
    ProgressiveDistillation,
    embedding_cosine_sum,
    kd_terms,
    pool,
    topk_teacher,
)

TEACHER = torch.tensor([[10.0, 2.0, 1.0], [1.0, 12.0, 2.0]])
STUDENT = torch.tensor([[7.0, 3.0, 2.0], [2.0, 8.0, 3.0]])
LABELS = torch.tensor([0, 1])


def test_documented_example_total_1_181182() -> None:
    terms = DistillationLoss(temperature=4.0, alpha=0.7).terms(STUDENT, TEACHER, LABELS)
    assert terms["soft"].item() == pytest.approx(1.680134, abs=2e-6)
    assert terms["hard"].item() == pytest.approx(0.016960, abs=2e-6)
    assert terms["total"].item() == pytest.approx(1.181182, abs=2e-6)
    assert DistillationLoss(4.0, 0.7).forward(STUDENT, TEACHER, LABELS).item() == pytest.approx(1.181182, abs=2e-6)


def test_direction_is_teacher_to_student() -> None:
    # the reverse direction KL(s||t) * T^2 gives 2.0338 on the same example
    rev = DistillationLoss(4.0, 0.7, kind="reverse_kl").terms(STUDENT, TEACHER, LABELS)["soft"].item()
    assert rev == pytest.approx(2.0338, abs=1e-4)


def _reference_kd(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, T: float, alpha: float) -> torch.Tensor:
    soft = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True, reduction="batchmean") * T * T
    return alpha * soft + (1 - alpha) * F.cross_entropy(s, y)


@pytest.mark.parametrize("T,alpha", [(1.0, 1.0), (2.0, 0.5), (4.0, 0.7), (0.5, 0.0)])
def test_matches_reference_implementation(T: float, alpha: float) -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(37, 101, generator=g) * 3, torch.randn(37, 101, generator=g) * 3
    y = torch.randint(0, 101, (37,), generator=g)
    ours = DistillationLoss(T, alpha).forward(s, t, y)
    assert ours.item() == pytest.approx(_reference_kd(s, t, y, T, alpha).item(), rel=1e-5)


def test_ignored_labels_and_chunking() -> None:
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 9, 50, generator=g), torch.randn(2, 9, 50, generator=g)
    y = torch.randint(0, 50, (2, 9), generator=g)
    y[0, :4] = -100
    full = kd_terms(s, t, y, temperature=2.0)
    chunked = kd_terms(s, t, y, temperature=2.0, chunk_tokens=3)
    assert full.count.item() == 14
    assert chunked.soft.item() == pytest.approx(full.soft.item(), rel=1e-6)
    valid = y != -100
    ref = _reference_kd(s[valid], t[valid], y[valid], 2.0, 0.0) * 14
    assert full.hard.item() == pytest.approx(ref.item(), rel=1e-5)


def test_jsd_is_symmetric_and_bounded() -> None:
    a = DistillationLoss(1.0, 1.0, kind="jsd").terms(STUDENT, TEACHER, LABELS)["soft"].item()
    b = DistillationLoss(1.0, 1.0, kind="jsd").terms(TEACHER, STUDENT, LABELS)["soft"].item()
    assert a == pytest.approx(b, rel=1e-6) and 0 < a < math.log(2)


def test_topk_teacher_exact_when_k_covers_vocab_and_close_for_peaked() -> None:
    g = torch.Generator().manual_seed(2)
    s = torch.randn(64, 200, generator=g)
    t = torch.randn(64, 200, generator=g) * 8  # peaked, like a trained LM
    y = torch.randint(0, 200, (64,), generator=g)
    full = kd_terms(s, t, y).soft.item()
    assert kd_terms(s, None, y, teacher_topk=topk_teacher(t, 199)).soft.item() == pytest.approx(full, rel=2e-2)
    approx = kd_terms(s, None, y, teacher_topk=topk_teacher(t, 32)).soft.item()
    assert approx == pytest.approx(full, rel=0.05)


def test_progressive_mse_and_learned_projection() -> None:
    hs = [torch.ones(2, 3, 4), torch.zeros(2, 3, 4)]
    ht = [torch.zeros(2, 3, 4), torch.full((2, 3, 4), 2.0)]
    p = ProgressiveDistillation([(0, 0), (1, 1)]).weight(0.5)
    # pair 0: MSE 1, pair 1: MSE 4 -> mean 2.5, weighted 1.25
    assert p.compute_loss(hs, ht).item() == pytest.approx(1.25)
    proj = ProgressiveDistillation([(0, 1)], student_dim=4, teacher_dim=8)
    assert proj.projections is not None and proj.projections[0].weight.shape == (8, 4)
    loss = proj.compute_loss([torch.randn(2, 3, 4)], [torch.zeros(2, 3, 8), torch.randn(2, 3, 8)])
    loss.backward()
    assert proj.projections[0].weight.grad is not None


def test_progressive_cosine_is_one_minus_cosine_per_token_and_ignores_scale() -> None:
    hs = [torch.tensor([[[1.0, 0.0], [1.0, 1.0], [3.0, 4.0]]])]
    ht = [torch.tensor([[[0.0, 2.0], [2.0, 2.0], [-6.0, -8.0]]])]
    p = ProgressiveDistillation([(0, 0)], loss="cosine")
    # per token: 1 - 0 (orthogonal), 1 - 1 (same direction, other scale), 1 - (-1) (opposite) -> mean 1.0
    assert p.compute_loss(hs, ht).item() == pytest.approx(1.0)
    mask = torch.tensor([[1.0, 1.0, 0.0]])  # the padded third token does not count
    assert p.compute_loss(hs, ht, mask).item() == pytest.approx(0.5)
    assert ProgressiveDistillation([(0, 0)]).compute_loss(hs, ht, mask).item() == pytest.approx((2.5 + 1.0) / 2)  # MSE


def test_attention_transfer_value_and_head_averaging() -> None:
    a = torch.softmax(torch.randn(2, 4, 5, 5), -1)
    assert AttentionTransfer().compute_loss([a], [a]).item() == pytest.approx(0.0, abs=1e-7)
    # different head counts: heads are averaged first
    b = a.mean(1, keepdim=True).expand(2, 2, 5, 5)
    assert AttentionTransfer().compute_loss([b], [a]).item() == pytest.approx(0.0, abs=1e-6)
    # reference: || A/||A|| - B/||B|| ||^2 averaged over sequences
    c = torch.softmax(torch.randn(2, 1, 5, 5), -1)
    ref = sum(((a[i].mean(0) / a[i].mean(0).norm()) - (c[i, 0] / c[i, 0].norm())).pow(2).sum() for i in range(2)) / 2
    assert AttentionTransfer().weight(0.1).compute_loss([c], [a]).item() == pytest.approx(0.1 * ref.item(), rel=1e-5)


def test_pooling_ignores_padding_and_picks_first_or_last_real_token() -> None:
    h = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [100.0, 100.0]]])  # third token is padding
    mask = torch.tensor([[1, 1, 0]])
    assert pool(h, mask, "mean").tolist() == [[2.0, 1.0]]
    assert pool(h, mask, "cls").tolist() == [[1.0, 0.0]]
    assert pool(h, mask, "last").tolist() == [[3.0, 2.0]]


def test_embedding_cosine_term_values_and_gradient() -> None:
    mask = torch.ones(3, 2)
    t = torch.tensor([[[1.0, 0.0]] * 2, [[0.0, 1.0]] * 2, [[1.0, 1.0]] * 2])
    # same direction (any scale) -> 0; orthogonal -> 1; opposite -> 2
    s = torch.tensor([[[5.0, 0.0]] * 2, [[1.0, 0.0]] * 2, [[-1.0, -1.0]] * 2], requires_grad=True)
    per_seq = [0.0, 1.0, 2.0]
    assert embedding_cosine_sum(s, t, mask).item() == pytest.approx(sum(per_seq), abs=1e-6)
    embedding_cosine_sum(s, t, mask).backward()
    assert s.grad is not None and s.grad[0].abs().max().item() < 1e-6 and s.grad[1].abs().max().item() > 0


@pytest.mark.parametrize("T,alpha", [(1.0, 1.0), (2.0, 0.5), (1.0, 0.0)])
def test_fused_kd_matches_autograd_loss_and_gradient(T: float, alpha: float) -> None:
    from entrenar_cli.losses import fused_forward_kd

    g = torch.Generator().manual_seed(5)
    s = (torch.randn(2, 7, 300, generator=g) * 3).requires_grad_()
    t = torch.randn(2, 7, 300, generator=g) * 3
    y = torch.randint(0, 300, (2, 7), generator=g)
    y[0, :2] = -100
    ref = kd_terms(s, t, y, temperature=T)
    ref.total(alpha).backward()
    want = s.grad.clone()
    s.grad = None
    total, terms = fused_forward_kd(s, t, y, temperature=T, alpha=alpha, chunk_tokens=4)
    total.backward()
    assert total.item() == pytest.approx(ref.total(alpha).item(), rel=1e-6)
    assert terms.soft.item() == pytest.approx(ref.soft.item(), rel=1e-6)
    torch.testing.assert_close(s.grad, want, atol=1e-6, rtol=1e-5)
