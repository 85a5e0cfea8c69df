"""``training.ema_decay``: an exponential moving average of the trained weights, evaluated and saved.

The average is computed here by hand from the weights after every step and compared with what the
engine evaluates, saves and restores on --resume. fp32 pinned: the tolerances are fp32's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from test_distill import _engine, distill_config, read_metrics, straight_and_resumed

from entrenar_cli.errors import ConfigError
from entrenar_cli.weight_average import WeightAverage, warmed_decay

DECAY = 0.8


def test_decay_warms_up_then_holds() -> None:
    assert warmed_decay(0.99, 1) == pytest.approx(2 / 11)
    assert warmed_decay(0.99, 80) == pytest.approx(81 / 90)
    assert warmed_decay(0.8, 80) == 0.8  # (1 + t) / (10 + t) passes 0.8 at t = 35


def test_average_updates_swaps_back_and_applies() -> None:
    p = torch.nn.Parameter(torch.zeros(3))
    avg = WeightAverage({"p": p}, decay=0.5)
    with torch.no_grad():
        p.fill_(1.0)
    avg.update(1)  # decay min(0.5, 2/11): the average moves 9/11 of the way
    assert torch.allclose(avg.shadow["p"], torch.full((3,), 9 / 11))
    with torch.no_grad():
        p.fill_(2.0)
    avg.update(100)  # decay 0.5
    expected = 0.5 * 9 / 11 + 0.5 * 2.0
    with avg.applied():
        assert torch.allclose(p, torch.full((3,), expected))
    assert torch.equal(p, torch.full((3,), 2.0))  # the model's own weights are back
    avg.apply()
    assert torch.allclose(p, torch.full((3,), expected))


def test_config_refuses_a_decay_outside_0_1(tiny_llama: Path, stdlib_text: Path, tmp_path: Path) -> None:
    for bad in (1, 0, 1.5):
        with pytest.raises(ConfigError, match="ema_decay"):
            distill_config(tiny_llama, stdlib_text, tmp_path, ema_decay=bad)


def _by_hand(engine: Any) -> tuple[dict[str, torch.Tensor], dict[int, tuple[float, float]], Any]:
    """An on_log that keeps its own average of the engine's weights after every step and, at step 6
    (before the engine evaluates there), the held-out perplexity of the raw weights and of that average."""
    model = engine.accelerator.unwrap_model(engine.model)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    mine = {n: p.detach().clone() for n, p in params.items()}
    seen: dict[int, tuple[float, float]] = {}

    def perplexity() -> float:
        model.eval()
        with torch.no_grad():
            return engine.objective.evaluate(model, engine.eval_batches())["perplexity"]

    def on_log(record: dict[str, Any]) -> None:
        step = record["step"]
        with torch.no_grad():
            for n, p in params.items():
                mine[n].lerp_(p.detach(), 1 - warmed_decay(DECAY, step))
            if step == 6:
                raw = perplexity()
                held = {n: p.detach().clone() for n, p in params.items()}
                for n, p in params.items():
                    p.copy_(mine[n])
                seen[step] = (raw, perplexity())
                for n, p in params.items():
                    p.copy_(held[n])
        model.train()

    return mine, seen, on_log


def test_engine_evaluates_and_keeps_the_average(tiny_llama: Path, stdlib_text: Path, tmp_path: Path) -> None:
    pin = {"mixed_precision": "fp32", "max_steps": 12, "eval_steps": 6}
    engine = _engine(distill_config(tiny_llama, stdlib_text, tmp_path / "ema", ema_decay=DECAY, **pin))
    mine, seen, on_log = _by_hand(engine)
    engine.train(on_log=on_log)
    evals = {m["step"]: m["perplexity"] for m in read_metrics(tmp_path / "ema") if m["event"] == "eval"}
    raw, averaged = seen[6]
    assert evals[6] == pytest.approx(averaged, rel=1e-6)  # the logged evaluation is the average's
    assert abs(raw - averaged) > 1e-3 * raw  # ... which is not the last step's weights
    model = engine.accelerator.unwrap_model(engine.model)
    for n, p in model.named_parameters():  # training ends with the average in the model
        torch.testing.assert_close(p.detach(), mine[n], atol=1e-6, rtol=0, msg=n)

    # the average does not change training: the same losses as a run without it
    plain = tmp_path / "plain"
    _engine(distill_config(tiny_llama, stdlib_text, plain, **pin)).train()
    losses = [[m["loss"] for m in read_metrics(out) if m["event"] == "train"] for out in (tmp_path / "ema", plain)]
    assert losses[0] == losses[1] and len(losses[0]) == 12


def test_resume_restores_the_average(tiny_llama: Path, stdlib_text: Path, tmp_path: Path) -> None:
    # stopped at 12 of 16: the average still weighs the steps before the stop (at step 3 the warm-up would
    # have forgotten them, and an average not restored would pass)
    straight_and_resumed(tiny_llama, stdlib_text, tmp_path, 12, max_steps=16, ema_decay=DECAY)


def test_python_api_saves_the_average_and_keeps_training_its_own_weights(tiny_llama: Path, stdlib_text: Path,
                                                                          tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from entrenar_cli.hf_pipeline import Dataset, DatasetOptions, DistillationTrainer, SafeTensorsTeacher, TrainerConfig

    teacher = SafeTensorsTeacher.from_path(tiny_llama)
    data = Dataset.from_path(stdlib_text, teacher, DatasetOptions().max_length(16).max_blocks(12))
    cfg = (TrainerConfig(str(tiny_llama), student=2).learning_rate(3e-3).batch_size(4).mixed_precision("fp32")
           .num_threads(1).lr_scheduler("constant").ema_decay(DECAY))
    trainer = DistillationTrainer(cfg, teacher)
    batch = next(data.batches(4))
    params = dict(trainer.student.named_parameters())
    mine = {n: p.detach().clone() for n, p in params.items()}
    for step in range(1, 5):
        trainer.step(batch)
        for n, p in params.items():
            mine[n].lerp_(p.detach(), 1 - warmed_decay(DECAY, step))
    raw = {n: p.detach().clone() for n, p in params.items()}
    saved = load_file(str(trainer.save(tmp_path / "student") / "model.safetensors"))
    name = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(saved[name], mine[name], atol=1e-6, rtol=0)
    assert not torch.allclose(saved[name], raw[name], atol=1e-4)
    assert torch.equal(params[name], raw[name])  # training goes on from its own weights


def test_estimate_counts_the_average_and_the_plan_says_so(tiny_llama: Path) -> None:
    import json

    from entrenar_cli.estimate import estimate_training
    from entrenar_cli.pipeline.common import weight_average_note

    cfg = json.loads((tiny_llama / "config.json").read_text())
    for method in ("full", "lora"):
        plain = estimate_training(cfg, method=method, dtype="fp32")
        averaged = estimate_training(cfg, method=method, dtype="fp32", weight_average=True)
        assert averaged.optimizer_bytes - plain.optimizer_bytes == 4 * plain.trainable_parameters
        assert averaged.total_bytes > plain.total_bytes
    assert weight_average_note(None) == ""
    assert "decay 0.9" in weight_average_note(0.9) and "saved model use the average" in weight_average_note(0.9)
