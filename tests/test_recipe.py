"""The LM recipe's knobs from issue 15: skew KL and the annealed KD weight (distillation.alpha_end)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from entrenar_cli.config import DistillationYamlConfig, validate_text
from entrenar_cli.losses import SKEW, kd_terms

TEACHER = torch.tensor([[10.0, 2.0, 1.0], [1.0, 12.0, 2.0]])
STUDENT = torch.tensor([[7.0, 3.0, 2.0], [2.0, 8.0, 3.0]])
LABELS = torch.tensor([0, 1])


def test_skew_kl_against_probabilities() -> None:
    for T in (1.0, 2.0):
        p, q = F.softmax(TEACHER / T, -1), F.softmax(STUDENT / T, -1)
        m = SKEW * p + (1 - SKEW) * q
        expected = (T * T) * (p * (p / m).log()).sum(-1).sum()
        got = kd_terms(STUDENT, TEACHER, LABELS, temperature=T, kind="skew_kl").soft
        assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    # skewing towards the teacher bounds it below forward KL, and it is 0 when the student matches
    fwd = kd_terms(STUDENT, TEACHER, LABELS, kind="forward_kl").soft
    assert kd_terms(STUDENT, TEACHER, LABELS, kind="skew_kl").soft < fwd
    assert kd_terms(TEACHER, TEACHER, LABELS, kind="skew_kl").soft.abs().item() < 1e-6


def _config(teacher: Path, data: Path, out: Path, dist: str) -> DistillationYamlConfig:
    text = (
        f"teacher:\n  model_id: {teacher}\n"
        "student:\n  init_from_teacher: 2\n"
        f"distillation:\n{dist}"
        "training:\n  max_steps: 5\n  batch_size: 4\n  learning_rate: 3e-3\n  logging_steps: 1\n"
        "  mixed_precision: fp32\n"
        f"dataset:\n  path: {data}\n  max_length: 32\n  eval_fraction: 0.2\n"
        f"output:\n  dir: {out}\n"
    )
    return validate_text(text, DistillationYamlConfig, "test.yaml")  # type: ignore[return-value]


def test_alpha_anneals_linearly_over_the_run(tiny_llama: Path, stdlib_text: Path, tmp_path: Path) -> None:
    from entrenar_cli.pipeline.common import RunOptions
    from entrenar_cli.pipeline.distill import run

    out = tmp_path / "sched"
    run(_config(tiny_llama, stdlib_text, out, "  alpha: 0.9\n  alpha_end: 0.1\n"),
        RunOptions(overwrite=True, progress=False))
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("event") == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5]
    for i, r in enumerate(train):
        alpha = 0.9 + (0.1 - 0.9) * i / 4  # step i+1 of 5: progress i/4
        assert r["loss"] == pytest.approx(alpha * r["loss_kd"] + (1 - alpha) * r["loss_ce"], rel=1e-5)


def test_alpha_end_null_keeps_alpha_constant(tiny_llama: Path) -> None:
    from entrenar_cli import models
    from entrenar_cli.config.schema import DistillationSettings
    from entrenar_cli.objectives import DistillObjective

    teacher = models.load_model(models.locate(str(tiny_llama)))
    obj = DistillObjective(teacher, DistillationSettings(alpha=0.5), task="causal", vocab=512,
                           student_dim=64, teacher_dim=64)
    obj.set_progress(0.7)
    assert obj.alpha == 0.5
    obj = DistillObjective(teacher, DistillationSettings(alpha=1.0, alpha_end=0.2), task="causal", vocab=512,
                           student_dim=64, teacher_dim=64)
    obj.set_progress(0.5)
    assert obj.alpha == pytest.approx(0.6)
    obj.set_progress(2.0)  # clamped to the end of the run
    assert obj.alpha == pytest.approx(0.2)
