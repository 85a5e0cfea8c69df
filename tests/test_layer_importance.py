"""student.init_from_teacher.strategy: importance picks the teacher blocks that change the residual stream most."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama

from entrenar_cli.config import DistillationYamlConfig, validate_text
from entrenar_cli.errors import ConfigError
from entrenar_cli.pipeline.common import RunOptions


def test_importance_layers_keeps_first_last_and_highest() -> None:
    from entrenar_cli.models import importance_layers

    scores = [0.5, 0.1, 0.9, 0.2, 0.8, 0.05, 0.3]
    assert importance_layers(scores, 4) == [0, 2, 4, 6]
    assert importance_layers(scores, 3) == [0, 2, 6]
    assert importance_layers(scores, 2) == [0, 6]
    assert importance_layers(scores, 1) == [6]
    assert importance_layers(scores, 7) == list(range(7))
    # ties go to the earlier block
    assert importance_layers([0.0, 0.4, 0.4, 0.4, 0.0], 3) == [0, 1, 4]


def _identity_block(model: torch.nn.Module, i: int) -> None:
    """Zero a llama block's output projections: the block then adds nothing to the residual stream."""
    layer = model.model.layers[i]
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()


def test_block_importance_scores_an_identity_block_zero(tiny_llama: Path) -> None:
    from entrenar_cli import models

    teacher = models.load_model(models.locate(str(tiny_llama)))
    _identity_block(teacher, 2)
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    scores = models.block_importance(teacher, ids)
    assert len(scores) == 4
    assert scores[2] < 1e-3
    assert min(scores[0], scores[1], scores[3]) > 0.01
    assert models.importance_layers(scores, 3) == [0, 1, 3]


def _config(teacher: Path, data: Path, out: Path, init: str) -> DistillationYamlConfig:
    text = (
        f"teacher:\n  model_id: {teacher}\n"
        f"student:\n  init_from_teacher:\n{init}"
        "training:\n  max_steps: 4\n  batch_size: 4\n"
        f"dataset:\n  path: {data}\n  max_length: 32\n  eval_fraction: 0.2\n"
        f"output:\n  dir: {out}\n"
    )
    return validate_text(text, DistillationYamlConfig, "test.yaml")  # type: ignore[return-value]


def test_importance_strategy_in_the_plan(tmp_path: Path, tiny_tokenizer_dir: Path, stdlib_text: Path) -> None:
    from entrenar_cli import models
    from entrenar_cli.pipeline.distill import run

    teacher_dir = make_tiny_llama(tmp_path / "teacher", tiny_tokenizer_dir, layers=5)
    teacher = models.load_model(models.locate(str(teacher_dir)))
    _identity_block(teacher, 1)
    _identity_block(teacher, 3)
    teacher.save_pretrained(teacher_dir)

    plan = run(_config(teacher_dir, stdlib_text, tmp_path / "imp", "    layers: 3\n    strategy: importance\n"),
               RunOptions(dry_run=True, progress=False))["plan"]
    scores = plan["student"]["init_layer_scores"]
    assert len(scores) == 5 and scores[1] < 1e-3 and scores[3] < 1e-3 and scores[2] > 0.01
    assert plan["student"]["init_layers"] == [0, 2, 4]

    spread = run(_config(teacher_dir, stdlib_text, tmp_path / "spread", "    layers: 3\n"),
                 RunOptions(dry_run=True, progress=False))["plan"]
    assert spread["student"]["init_layers"] == [0, 2, 4] and spread["student"]["init_layer_scores"] is None
    spread4 = run(_config(teacher_dir, stdlib_text, tmp_path / "spread4", "    layers: 4\n"),
                  RunOptions(dry_run=True, progress=False))["plan"]
    imp4 = run(_config(teacher_dir, stdlib_text, tmp_path / "imp4", "    layers: 4\n    strategy: importance\n"),
               RunOptions(dry_run=True, progress=False))["plan"]
    assert spread4["student"]["init_layers"] == [0, 1, 3, 4]  # spread keeps both identity blocks
    assert imp4["student"]["init_layers"] in ([0, 1, 2, 4], [0, 2, 3, 4])  # one identity block must go in


def test_importance_strategy_needs_a_layer_count(tmp_path: Path, tiny_llama: Path, stdlib_text: Path) -> None:
    with pytest.raises(ConfigError, match="strategy"):
        _config(tiny_llama, stdlib_text, tmp_path / "x", "    layers: [0, 3]\n    strategy: importance\n")
