"""On-policy distillation (issue 21): the student's own continuations, scored by the teacher.

Tiny random llamas (real tokenizer, real text); each test runs in seconds on a CPU.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from entrenar_cli.config import DistillationYamlConfig, validate_text
from entrenar_cli.errors import ConfigError
from entrenar_cli.losses import IGNORE_INDEX
from entrenar_cli.on_policy import continuation_batch, generate, row_seed, sample_next
from entrenar_cli.pipeline.common import RunOptions

ON_POLICY = "distillation:\n  on_policy:\n    fraction: 0.5\n    prompt_tokens: 8\n    max_new_tokens: 12\n"


def op_config(teacher: Path, data: Path, out: Path, extra: str = ON_POLICY, **training: Any) -> DistillationYamlConfig:
    train = {"max_steps": 6, "batch_size": 4, "learning_rate": 3e-3, "logging_steps": 1, "seed": 7,
             "eval_batches": 1, "mixed_precision": "fp32"} | training  # fp32: exact-equality tests below
    text = (f"teacher:\n  model_id: {teacher}\nstudent:\n  init_from_teacher: 2\n"
            "training:\n" + "".join(f"  {k}: {v}\n" for k, v in train.items()) +
            f"dataset:\n  path: {data}\n  max_length: 32\n  eval_fraction: 0.2\noutput:\n  dir: {out}\n" + extra)
    return validate_text(text, DistillationYamlConfig, "op.yaml")  # type: ignore[return-value]


def read_metrics(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _train(out: Path) -> list[dict[str, Any]]:
    return [m for m in read_metrics(out) if m["event"] == "train"]


# ---- masks and sampling ----------------------------------------------------------------------


def test_prompt_and_tokens_after_eos_carry_no_loss() -> None:
    eos = 0
    # prompt [5, 6, 7]; row 0 generates 8, EOS, then padding (EOS); row 1 never ends
    seqs = torch.tensor([[5, 6, 7, 8, eos, eos, eos],
                         [5, 6, 7, 9, 10, 11, 12]])
    b = continuation_batch(seqs, prompt_len=3, eos=[eos])
    assert b["input_ids"].tolist() == seqs[:, :-1].tolist()
    x = IGNORE_INDEX
    # input t predicts labels[t]: inputs 0 and 1 predict prompt tokens (no loss); input 2 predicts the first
    # generated token; the EOS itself is trained; the padding after it is not
    assert b["labels"].tolist() == [[x, x, 8, eos, x, x], [x, x, 9, 10, 11, 12]]
    # inputs after the end token are not attended to (hidden-state/attention losses skip them too)
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]
    # no end token known: every generated token is trained
    assert (continuation_batch(seqs, 3, [])["labels"] != x).sum() == 8


def test_sampling_greedy_top_p_and_inverse_cdf() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]))
    assert sample_next(logits, 0.0, 1.0, torch.tensor([0.9, 0.0])).tolist() == [0, 2]
    assert sample_next(logits, 1.0, 1.0, torch.tensor([0.49, 0.0])).tolist() == [0, 0]
    assert sample_next(logits, 1.0, 1.0, torch.tensor([0.51, 0.95])).tolist() == [1, 2]
    # top_p 0.6: row 0 keeps {0 (0.5), 1 (0.3)}: the draw 0.99 lands on 1, never on 2
    assert sample_next(logits, 1.0, 0.6, torch.tensor([0.99, 0.99])).tolist() == [1, 2]
    draws = torch.stack([sample_next(logits[:1], 1.0, 1.0, torch.rand(1)) for _ in range(2000)])
    assert abs(float((draws == 0).float().mean()) - 0.5) < 0.05
    assert row_seed(1, 2, 3) != row_seed(1, 2, 4) and row_seed(1, 2, 3) == row_seed(1, 2, 3)


def _student(tiny_llama: Path) -> Any:
    from entrenar_cli import models

    return models.load_model(models.locate(str(tiny_llama)))


def test_generation_is_seeded_per_row_and_uses_the_kv_cache(tiny_llama: Path) -> None:
    model = _student(tiny_llama)
    torch.manual_seed(0)
    prompts = torch.randint(1, 500, (3, 6))
    kw = {"max_new_tokens": 10, "temperature": 1.0, "top_p": 0.9, "vocab": 512, "eos": [], "pad": 0}
    both = generate(model, prompts, [11, 22, 33], **kw)
    assert both.shape == (3, 16) and torch.equal(both[:, :6], prompts)
    # a row's sample is a function of its seed only: not of the other rows, nor of the global RNG
    torch.manual_seed(999)
    alone = generate(model, prompts[1:2], [22], **kw)
    torch.testing.assert_close(alone, both[1:2], rtol=0, atol=0)
    assert not torch.equal(generate(model, prompts, [11, 22, 34], **kw)[2], both[2])
    # the KV-cache loop samples what a full forward over the whole sequence predicts (greedy)
    greedy = generate(model, prompts, [1, 2, 3], **(kw | {"temperature": 0.0}))
    with torch.no_grad():
        full = model(input_ids=greedy[:, :-1]).logits[:, 5:, :512].argmax(-1)
    torch.testing.assert_close(full, greedy[:, 6:], rtol=0, atol=0)
    for mode in (True, False):  # sampled in eval mode (no dropout), then put back as it was
        model.train(mode)
        generate(model, prompts, [1, 2, 3], **kw)
        assert model.training is mode


def test_generation_stops_early_at_eos_unless_fixed_length(tiny_llama: Path) -> None:
    model = _student(tiny_llama)
    prompts = torch.randint(1, 500, (2, 4), generator=torch.Generator().manual_seed(1))
    kw = {"max_new_tokens": 8, "temperature": 0.0, "top_p": 1.0, "vocab": 512, "pad": 0}
    first = generate(model, prompts, [1, 2], eos=[], **kw)[:, 4]
    # make every row's first greedy token its end token: generation ends after one token
    short = generate(model, prompts, [1, 2], eos=first.tolist(), **kw)
    assert short.shape == (2, 5)
    fixed = generate(model, prompts, [1, 2], eos=first.tolist(), fixed_length=True, **kw)
    assert fixed.shape == (2, 12) and (fixed[:, 5:] == 0).all()  # padding after the end token


# ---- the objective ---------------------------------------------------------------------------


def _objective_and_batch(tiny_llama: Path, stdlib_text: Path, tmp_path: Path, extra: str,
                         **training: Any) -> tuple[Any, Any, list[dict[str, torch.Tensor]]]:
    from entrenar_cli.pipeline.distill import build_objective, setup
    from entrenar_cli.trainer import Engine, EngineOptions

    cfg = op_config(tiny_llama, stdlib_text, tmp_path / "o", extra, **training)
    su = setup(cfg)
    engine = Engine(cfg.training, su.student, build_objective(su), su.train_blocks, su.eval_blocks,
                    EngineOptions(output_dir=tmp_path / "o", progress=False))
    return engine, engine.objective, engine._step_batches()


@pytest.mark.parametrize("chunked", [True, False])
def test_on_policy_loss_is_the_divergence_on_generated_tokens_only(tiny_llama: Path, stdlib_text: Path,
                                                                    tmp_path: Path, chunked: bool) -> None:
    extra = ON_POLICY + "  temperature: 2.0\n"
    engine, obj, batches = _objective_and_batch(tiny_llama, stdlib_text, tmp_path, extra,
                                                chunked_logits=str(chunked).lower())
    model = engine.accelerator.unwrap_model(engine.model)
    prepared = obj.prepare_step(model, batches, step=0, seed=7)
    # one micro-batch of 4 -> 2 continuations (first) + the 2 other blocks as they were
    assert [b["input_ids"].shape[0] for b in prepared] == [2, 2]
    gen, rest = prepared
    assert "block_ids" not in gen  # the teacher cache never serves generated text
    torch.testing.assert_close(rest["input_ids"], batches[0]["input_ids"][2:])
    torch.testing.assert_close(gen["input_ids"][:, :8], batches[0]["input_ids"][:2, :8])
    valid = gen["labels"] != IGNORE_INDEX
    assert not valid[:, :7].any()  # prompt positions carry no loss
    assert int(valid.sum()) == int(gen["generated_tokens"]) > 0
    terms = obj.loss_terms(model, gen).named()
    assert "loss_ce" not in terms and "loss_kd" not in terms
    # by hand: T^2 * KL(student || teacher) at T=2 over generated positions, nothing else
    with torch.no_grad():
        s = model(input_ids=gen["input_ids"]).logits[..., :512].float() / 2.0
        t = obj.teacher(input_ids=gen["input_ids"]).logits[..., :512].float() / 2.0
        s_lp, t_lp = F.log_softmax(s, -1), F.log_softmax(t, -1)
        rkl = (s_lp.exp() * (s_lp - t_lp)).sum(-1)
    want = 4.0 * rkl[valid].sum()
    torch.testing.assert_close(terms["loss_on_policy"], want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(terms["loss"], want, rtol=1e-4, atol=1e-5)
    assert float(terms["tokens"]) == float(valid.sum())
    # the other rows keep today's KD + CE
    assert {"loss_kd", "loss_ce"} <= set(obj.loss_terms(model, rest).named())


def test_fraction_zero_is_todays_behaviour_and_bad_settings_are_config_errors(tiny_llama: Path, stdlib_text: Path,
                                                                              tmp_path: Path) -> None:
    engine, obj, batches = _objective_and_batch(tiny_llama, stdlib_text, tmp_path, "")
    assert obj.prepare_step(engine.model, batches, step=0, seed=7) is batches
    with pytest.raises(ConfigError, match="prompt_tokens .*shorter than dataset.max_length"):
        op_config(tiny_llama, stdlib_text, tmp_path / "x", "distillation:\n  on_policy:\n    fraction: 0.5\n"
                  "    prompt_tokens: 32\n")
    with pytest.raises(ConfigError, match="fraction"):
        op_config(tiny_llama, stdlib_text, tmp_path / "x", "distillation:\n  on_policy:\n    fraction: 1.5\n")
    with pytest.raises(ConfigError, match="loss"):
        op_config(tiny_llama, stdlib_text, tmp_path / "x", "distillation:\n  on_policy:\n    loss: skew_kl\n")
    from entrenar_cli.pipeline.distill import run

    # the tiny teacher has 256 positions
    cfg = op_config(tiny_llama, stdlib_text, tmp_path / "y", ON_POLICY.replace("12", "300"))
    with pytest.raises(ConfigError, match="exceeds the teacher's 256 positions"):
        run(cfg, RunOptions(progress=False))


def test_cli_rejects_bad_on_policy_settings_with_exit_2(tiny_llama: Path, stdlib_text: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(f"teacher:\n  model_id: {tiny_llama}\nstudent:\n  init_from_teacher: 2\n"
                   "distillation:\n  on_policy:\n    fraction: 0.5\n    loss: tv\n"
                   f"dataset:\n  path: {stdlib_text}\n  max_length: 32\noutput:\n  dir: {tmp_path / 'o'}\n")
    proc = subprocess.run([sys.executable, "-m", "entrenar_cli", "validate", str(cfg)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "on_policy.loss" in proc.stdout + proc.stderr


# ---- whole runs ------------------------------------------------------------------------------


def test_run_logs_generation_and_the_held_out_measure_and_is_deterministic(tiny_llama: Path, stdlib_text: Path,
                                                                           tmp_path: Path) -> None:
    from entrenar_cli.pipeline.distill import run

    a = run(op_config(tiny_llama, stdlib_text, tmp_path / "a", eval_steps=3), RunOptions(progress=False))
    run(op_config(tiny_llama, stdlib_text, tmp_path / "b", eval_steps=3), RunOptions(progress=False))
    ta, tb = _train(tmp_path / "a"), _train(tmp_path / "b")
    assert len(ta) == 6
    assert all(m["generated_tokens"] > 0 and m["generated_tokens_per_s"] > 0 and m["loss_on_policy"] > 0 for m in ta)
    # same seed, same samples, same losses
    assert [m["loss"] for m in ta] == [m["loss"] for m in tb]
    assert [m["generated_tokens"] for m in ta] == [m["generated_tokens"] for m in tb]
    evals = [m for m in read_metrics(tmp_path / "a") if m["event"] == "eval"]
    assert len(evals) == 2 and all(m["teacher_nll_of_student"] > 0 for m in evals)
    assert a["student_before"]["teacher_nll_of_student"] > 0 and "teacher_nll_of_student" in a["student"]
    # another seed samples other continuations
    run(op_config(tiny_llama, stdlib_text, tmp_path / "c", seed=8), RunOptions(progress=False))
    assert [m["generated_tokens"] for m in _train(tmp_path / "c")] != [m["generated_tokens"] for m in ta]


def test_held_out_measure_without_on_policy_training(tiny_llama: Path, stdlib_text: Path, tmp_path: Path) -> None:
    """An off-policy run can report the measure too (the comparison in BENCHMARKS.md needs it)."""
    from entrenar_cli.pipeline.distill import build_objective, setup

    extra = "distillation:\n  on_policy:\n    eval_prompts: 3\n    prompt_tokens: 8\n    max_new_tokens: 6\n"
    su = setup(op_config(tiny_llama, stdlib_text, tmp_path / "m", extra))
    obj = build_objective(su)
    assert obj.on_policy is None
    from entrenar_cli.trainer import Engine, EngineOptions

    engine = Engine(su.cfg.training, su.student, obj, su.train_blocks, su.eval_blocks,
                    EngineOptions(output_dir=tmp_path / "m", progress=False))
    state = torch.get_rng_state()
    first = engine.evaluate()
    assert torch.equal(state, torch.get_rng_state())  # the training RNG stream is untouched
    assert 0 < first["student_sample_tokens"] <= 3 * 6
    assert engine.evaluate()["teacher_nll_of_student"] == first["teacher_nll_of_student"]  # fixed samples


def test_resume_mid_run_equals_straight_run(tiny_llama: Path, stdlib_text: Path, tmp_path: Path) -> None:
    from entrenar_cli.pipeline.distill import build_objective, run, setup
    from entrenar_cli.signals import STOP
    from entrenar_cli.trainer import Engine, EngineOptions

    straight = tmp_path / "straight"
    run(op_config(tiny_llama, stdlib_text, straight, max_steps=8, save_steps=4), RunOptions(progress=False))
    resumed = tmp_path / "resumed"
    cfg = op_config(tiny_llama, stdlib_text, resumed, max_steps=8, save_steps=4)
    su = setup(cfg)
    engine = Engine(cfg.training, su.student, build_objective(su), su.train_blocks, su.eval_blocks,
                    EngineOptions(output_dir=resumed, progress=False))
    # what the SIGTERM handler does: set the stop flag; the run checkpoints at step 4 and stops
    engine.train(on_log=lambda r: setattr(STOP, "signal", signal.SIGTERM) if r["step"] == 4 else None)
    assert engine.state.step == 4
    run(cfg, RunOptions(progress=False, resume=True))
    from safetensors.torch import load_file

    a, b = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)
    la = {m["step"]: (m["loss"], m["generated_tokens"]) for m in _train(straight)}
    lb = {m["step"]: (m["loss"], m["generated_tokens"]) for m in _train(resumed)}
    for step in range(5, 9):
        assert lb[step][1] == la[step][1]
        assert lb[step][0] == pytest.approx(la[step][0], abs=1e-6)


def test_lora_student_with_teacher_cache_and_jsd(tiny_llama: Path, stdlib_text: Path, tmp_path: Path) -> None:
    """LoRA adapters train on continuations; the cache serves the off-policy rows only."""
    from entrenar_cli.pipeline.distill import run

    out = tmp_path / "lora"
    extra = ON_POLICY + "    loss: jsd\n  teacher_cache:\n    enabled: true\n"
    cfg = op_config(tiny_llama, stdlib_text, out, extra, max_steps=4)
    cfg.student.lora = {"rank": 4, "alpha": 8, "target_modules": "all-linear"}  # type: ignore[assignment]
    summary = run(cfg, RunOptions(progress=False))
    assert summary["status"] == "completed" and (out / "adapter").is_dir()
    train = _train(out)
    assert all(m["loss_on_policy"] > 0 and m["loss_kd"] > 0 and m["generated_tokens"] > 0 for m in train)
    # 2 of 4 blocks per step went to the cache (the other 2 are generated text, never cached)
    cache = summary["teacher_cache"]
    assert cache["hits"] + cache["misses"] == 4 * 2


def test_torchrun_two_processes_each_generate_their_share(tiny_llama: Path, stdlib_text: Path,
                                                         tmp_path: Path) -> None:
    """2 processes x batch 4 = 1 process x batch 8: the same blocks become continuations (interleaved
    shards, per-block seeds), so the two runs match."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun is not installed next to this Python")

    def cfg(name: str, batch: int) -> Path:
        path = tmp_path / f"{name}.yaml"
        text = op_config(tiny_llama, stdlib_text, tmp_path / name, batch_size=batch, num_threads=1, max_steps=4)
        import yaml

        path.write_text(yaml.safe_dump(text.model_dump(mode="json", exclude_defaults=True)))
        return path

    proc = subprocess.run([sys.executable, "-m", "entrenar_cli", "distill", str(cfg("one", 8)), "--quiet"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([torchrun, "--nproc-per-node", "2", "-m", "entrenar_cli", "distill", str(cfg("two", 4)),
                           "--quiet"], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = _train(tmp_path / "one"), _train(tmp_path / "two")
    assert len(one) == len(two) == 4
    for a, b in zip(one, two):
        assert b["generated_tokens"] == a["generated_tokens"]  # summed over both processes
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6)
        assert b["loss_on_policy"] == pytest.approx(a["loss_on_policy"], rel=1e-4, abs=1e-6)
