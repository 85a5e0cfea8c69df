"""teacher.correction: the teacher is fine-tuned on the training blocks before distilling (issue 15)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from entrenar_cli.config import DistillationYamlConfig, validate_text
from entrenar_cli.errors import ConfigError


def _config(teacher: Path, data: Path, out: Path, *, teacher_extra: str = "", cache: bool = False) -> str:
    return (
        f"teacher:\n  model_id: {teacher}\n  correction:\n    steps: 8\n    learning_rate: 3e-3\n    warmup_steps: 1\n"
        f"{teacher_extra}"
        "student:\n  init_from_teacher: 2\n"
        + ("distillation:\n  teacher_cache:\n    enabled: true\n" if cache else "")
        + "training:\n  max_steps: 2\n  batch_size: 4\n  learning_rate: 3e-3\n  logging_steps: 1\n  eval_batches: 4\n"
        "  mixed_precision: fp32\n"
        f"dataset:\n  path: {data}\n  max_length: 32\n  eval_fraction: 0.2\n"
        f"output:\n  dir: {out}\n"
    )


def _cfg(*args: Path, **kw: object) -> DistillationYamlConfig:
    return validate_text(_config(*args, **kw), DistillationYamlConfig, "test.yaml")  # type: ignore[arg-type,return-value]


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().float() for k, v in model.state_dict().items()}


def test_correction_trains_the_teacher_not_the_students_init(tiny_llama: Path, stdlib_text: Path,
                                                            tmp_path: Path) -> None:
    from entrenar_cli import models
    from entrenar_cli.pipeline.distill import setup, teacher_cache_spec
    from entrenar_cli.pipeline.teacher_correction import correct_teacher

    out = tmp_path / "run"
    out.mkdir()
    su = setup(_cfg(tiny_llama, stdlib_text, out))
    original_teacher, student_init = _state(su.teacher), _state(su.student)
    manifest = teacher_cache_spec(su)["manifest"]
    assert manifest["correction"] == {"steps": 8, "learning_rate": 3e-3, "warmup_steps": 1}

    record = correct_teacher(su, out, resume=False, progress=False)

    assert record is not None and record["steps"] == 8
    # a random teacher fine-tuned on real text: far better on the held-out blocks
    assert record["perplexity_after"] < 0.8 * record["perplexity_before"]
    corrected = _state(su.teacher)
    assert any(not torch.equal(corrected[k], original_teacher[k]) for k in corrected)
    assert not any(p.requires_grad for p in su.teacher.parameters()) and not su.teacher.training
    # the student is still the uncorrected teacher's layers 0 and 3
    assert all(torch.equal(v, student_init[k]) for k, v in _state(su.student).items())
    # the corrected teacher is a model directory transformers loads, with the same weights
    saved = models.load_model(models.locate(str(out / "teacher-corrected")), task="causal")
    assert all(torch.equal(v, corrected[k]) for k, v in _state(saved).items())
    assert json.loads((out / "teacher-corrected" / "correction.json").read_text())["steps"] == 8

    # --resume loads it instead of training again
    su2 = setup(_cfg(tiny_llama, stdlib_text, out))
    again = correct_teacher(su2, out, resume=True, progress=False)
    assert again == json.loads(json.dumps(record))
    assert all(torch.equal(v, corrected[k]) for k, v in _state(su2.teacher).items())


def test_distill_with_correction_reports_it_and_distills_from_the_corrected_teacher(
        tiny_llama: Path, stdlib_text: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = tmp_path / "d.yaml"
    cfg.write_text(_config(tiny_llama, stdlib_text, out))
    proc = subprocess.run([sys.executable, "-m", "entrenar_cli", "distill", str(cfg)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    assert "teacher correction: 8 steps of full fine-tuning (lr 0.003)" in text
    summary = json.loads((out / "summary.json").read_text())
    tc = summary["teacher_correction"]
    assert tc["perplexity_after"] < tc["perplexity_before"]
    # the KD run's evaluations measure the student against the corrected teacher
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    assert evals and evals[-1]["teacher_perplexity"] == pytest.approx(tc["perplexity_after"], rel=1e-4)
    # the run list owns the corrected teacher, so --overwrite may remove it and nothing else
    assert "teacher-corrected" in json.loads((out / ".entrenar-run.json").read_text())["written"]


def test_correction_refused_where_it_cannot_run(tiny_llama: Path, stdlib_text: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="device_map"):
        _cfg(tiny_llama, stdlib_text, tmp_path / "a", teacher_extra="  device_map: auto\n")
    # `correction: 300` is short for {steps: 300}
    short = _config(tiny_llama, stdlib_text, tmp_path / "b").replace(
        "  correction:\n    steps: 8\n    learning_rate: 3e-3\n    warmup_steps: 1\n", "  correction: 300\n")
    cfg = validate_text(short, DistillationYamlConfig, "test.yaml")
    assert cfg.teacher.correction is not None and cfg.teacher.correction.steps == 300  # type: ignore[attr-defined]
    # a cache fill does not train the teacher: one message, exit 2
    path = tmp_path / "c.yaml"
    path.write_text(_config(tiny_llama, stdlib_text, tmp_path / "c", cache=True))
    proc = subprocess.run([sys.executable, "-m", "entrenar_cli", "cache", str(path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "teacher.correction" in proc.stderr and "Traceback" not in proc.stderr
