"""Fine-tuning: full, LoRA and QLoRA on tiny real models through the shared engine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from entrenar_cli.config import FineTuneYamlConfig, validate_text
from entrenar_cli.pipeline.common import RunOptions


def ft_config(model: Path, data: Path, out: Path, method: str, extra: str = "", **training: Any) -> FineTuneYamlConfig:
    train = {"max_steps": 15, "batch_size": 4, "learning_rate": 1e-2, "logging_steps": 1, "seed": 3} | training
    text = (f"model:\n  model_id: {model}\nmethod: {method}\n"
            f"lora:\n  rank: 8\n  alpha: 16\n  dropout: 0.0\n  target_modules: all-linear\n"
            "training:\n" + "".join(f"  {k}: {v}\n" for k, v in train.items()) +
            f"dataset:\n  path: {data}\n  max_length: 32\n  eval_fraction: 0.2\n"
            f"output:\n  dir: {out}\n" + extra)
    return validate_text(text, FineTuneYamlConfig, "ft.yaml")  # type: ignore[return-value]


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["event"] == "train"]


def _falls(values: list[float]) -> bool:
    return sum(values[-4:]) / 4 < 0.95 * sum(values[:4]) / 4


def _logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def test_lora_trains_adapter_reloads_and_merge_matches(trained_tiny_llama: Path, stdlib_text_other: Path,
                                                       tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from entrenar_cli.pipeline.finetune import run

    out = tmp_path / "lora"
    # fp32 and 30 steps: 15 LoRA steps gain only 0.3-1.3% held-out perplexity here (fp32 or bf16 alike; the
    # adapter and its optimizer state are fp32 either way), within bf16's noise; 30 steps gain 1.5-2.3%
    cfg = ft_config(trained_tiny_llama, stdlib_text_other, out, "lora", max_steps=30, mixed_precision="fp32")
    summary = run(cfg, RunOptions(progress=False))
    # held-out perplexity on the new domain (fixed batches, so not noisy like per-step training loss)
    assert summary["student"]["perplexity"] < 0.99 * summary["student_before"]["perplexity"], summary
    assert 0 < summary["student"]["trainable_parameters"] < summary["student"]["parameters"] / 5
    assert summary["peak_mem_bytes"] > 0
    assert summary["outputs"] == {"adapter_dir": str(out / "adapter"), "model_dir": str(out)}
    ids = torch.tensor([[1, 5, 9, 33, 70, 2]])
    adapter_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(trained_tiny_llama), out / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(trained_tiny_llama)
    assert not torch.allclose(_logits(base, ids), _logits(merged, ids), atol=1e-4)  # the adapter did something
    torch.testing.assert_close(_logits(merged, ids), _logits(adapter_model, ids), atol=1e-5, rtol=0)
    assert "trainable" in capsys.readouterr().err


def test_full_finetune_writes_loadable_model(tiny_llama: Path, stdlib_text: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from entrenar_cli.pipeline.finetune import run

    out = tmp_path / "full"
    summary = run(ft_config(tiny_llama, stdlib_text, out, "full", eval_steps=5), RunOptions(progress=False))
    assert _falls(losses(out))
    assert summary["student"]["perplexity"] < summary["student_before"]["perplexity"]
    assert summary["student"]["trainable_parameters"] == summary["student"]["parameters"]
    AutoModelForCausalLM.from_pretrained(out)


def test_qlora_on_cpu_trains_and_merges_in_full_precision(trained_tiny_llama: Path, stdlib_text_other: Path,
                                                         tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    from entrenar_cli.pipeline.finetune import run

    out = tmp_path / "qlora"
    extra = "quantization:\n  bits: 4\n  compute_dtype: float32\n"
    summary = run(ft_config(trained_tiny_llama, stdlib_text_other, out, "qlora", extra), RunOptions(progress=False))
    assert summary["student"]["perplexity"] < summary["student_before"]["perplexity"], summary
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert next(merged.parameters()).dtype == torch.float32
    assert not any("4bit" in type(m).__name__ for m in merged.modules())
    assert (out / "adapter" / "adapter_config.json").is_file()


def test_completion_only_loss_masks_prompt(tiny_tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    from entrenar_cli.config.schema import FineTuneDataSettings
    from entrenar_cli.data import Document
    from entrenar_cli.pipeline.finetune import instruction_encoder

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    ds = FineTuneDataSettings(path="x.jsonl")
    ids, mask = instruction_encoder(tok, ds)(Document(key="k", row={"prompt": "def f(x):", "completion": " return x"}))
    n_prompt = len(tok("def f(x):", add_special_tokens=False)["input_ids"])
    assert mask[:n_prompt] == [0] * n_prompt and all(mask[n_prompt:]) and ids[-1] == tok.eos_token_id
    ds_all = FineTuneDataSettings(path="x.jsonl", completion_only_loss=False)
    _, mask_all = instruction_encoder(tok, ds_all)(Document(key="k", row={"prompt": "a", "completion": "b"}))
    assert all(mask_all)


def test_instruction_jsonl_finetune_labels_only_completions(tiny_llama: Path, tmp_path: Path) -> None:
    from entrenar_cli.pipeline.finetune import setup

    rows = [{"prompt": f"# task {i}\ndef add(a, b):", "completion": f"\n    return a + b + {i}\n"} for i in range(200)]
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    su = setup(ft_config(tiny_llama, data, tmp_path / "o", "lora"))
    ids, mask = su.train_blocks.block(0)
    # prompt tokens carry mask 0: a real share of each block is excluded from the loss
    assert 0.2 < (mask == 0).mean() < 0.9


def test_default_lora_run_output_is_entrenars_own_and_trains_what_estimate_counts(
        tiny_llama: Path, stdlib_text: Path, tmp_path: Path) -> None:
    """A plain LoRA run in a fresh process: no bitsandbytes kernel notice, no transformers progress
    bars or deprecation warnings; it trains the default q/k/v/o adapters `entrenar estimate` counts."""
    import os
    import subprocess
    import sys

    cfg = tmp_path / "ft.yaml"
    cfg.write_text(f"model:\n  model_id: {tiny_llama}\nmethod: lora\n"
                   f"training:\n  max_steps: 2\n  batch_size: 2\n  mixed_precision: fp32\n"
                   f"dataset:\n  path: {stdlib_text}\n  max_length: 32\noutput:\n  dir: {tmp_path / 'out'}\n")
    env = {k: v for k, v in os.environ.items() if k != "ENTRENAR_DEBUG"}
    proc = subprocess.run([sys.executable, "-m", "entrenar_cli", "finetune", str(cfg)], capture_output=True,
                          text=True, timeout=600, env=env)
    both = proc.stdout + proc.stderr
    assert proc.returncode == 0, both[-3000:]
    for noise in ("Failed to load", "kernels", "Loading weights", "Loading checkpoint shards", "it/s]",
                  "Warning:", "warnings.warn", "Writing model shards"):
        assert noise not in both, (noise, both[-3000:])
    assert "trainable 28,672" in both, both[-3000:]  # 4 layers x (q 64x64 + k 64x32 + v 64x32 + o 64x64), r=16
    est = subprocess.run([sys.executable, "-m", "entrenar_cli", "estimate", str(tiny_llama), "--method", "lora",
                          "--json"], capture_output=True, text=True, timeout=300, env=env)
    assert est.returncode == 0, est.stderr
    assert json.loads(est.stdout)["training"]["lora"]["trainable_parameters"] == 28_672
