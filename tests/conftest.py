"""Shared fixtures: isolated state directories and the path of the repo."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _isolated_hf_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reads or writes the user's Hugging Face cache or reaches the network."""
    home = tmp_path_factory.getbasetemp() / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    if "HF_ENDPOINT" in os.environ:
        monkeypatch.delenv("HF_ENDPOINT")


@pytest.fixture
def repo() -> Path:
    return REPO


@pytest.fixture(autouse=True)
def _isolated_entrenar_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tokenized-data caches go to a per-session temp dir, never ~/.cache."""
    monkeypatch.setenv("ENTRENAR_CACHE", str(tmp_path_factory.getbasetemp() / "entrenar-cache"))
    # an estimator failure fails the test instead of becoming a warning and a missing estimate
    monkeypatch.setenv("ENTRENAR_STRICT_ESTIMATE", "1")


def _stdlib_text_dir(root: Path, package: str = "json") -> Path:
    import shutil
    import sysconfig

    src = Path(sysconfig.get_paths()["stdlib"]) / package
    dst = root / f"text-{package}"
    if not dst.exists():
        dst.mkdir(parents=True)
        for f in sorted(src.glob("*.py")):
            shutil.copy(f, dst / f.name)
    return dst


@pytest.fixture(scope="session")
def stdlib_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory of real text: the stdlib's json package source (~100 KB)."""
    return _stdlib_text_dir(tmp_path_factory.mktemp("data"))


def make_tokenizer(files: list[Path], vocab_size: int = 512) -> Any:
    """A real byte-level BPE tokenizer trained on real text (fast: ~1 s)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train([str(f) for f in files], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory, stdlib_text: Path) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    make_tokenizer(sorted(stdlib_text.glob("*.py"))).save_pretrained(out)
    return out


def make_tiny_llama(directory: Path, tokenizer_dir: Path, *, layers: int = 4, hidden: int = 64, seed: int = 0) -> Path:
    """A tiny random llama with a real tokenizer, saved as a Hugging Face directory."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(directory)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, directory / f.name)
    return directory


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    """4-layer, hidden-64 llama teacher (random weights, real tokenizer)."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def trained_tiny_llama(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path, stdlib_text: Path) -> Path:
    """The tiny llama after a short CE fine-tune on real text, so it is a teacher worth matching."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("trained") / "teacher"
    cfg = tmp_path_factory.mktemp("cfg") / "ft.yaml"
    cfg.write_text(
        f"model:\n  model_id: {tiny_llama}\nmethod: full\n"
        f"training:\n  max_steps: 60\n  batch_size: 8\n  learning_rate: 3e-3\n  logging_steps: 20\n"
        "  mixed_precision: fp32\n"  # the same teacher whatever 'auto' picks on this CPU
        f"dataset:\n  path: {stdlib_text}\n  max_length: 64\n  eval_fraction: 0.2\n"
        f"output:\n  dir: {out}\n"
    )
    proc = subprocess.run([sys.executable, "-m", "entrenar_cli", "finetune", str(cfg), "--quiet"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def stdlib_text_other(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Different real text (the stdlib's email package): a new domain for fine-tuning tests."""
    return _stdlib_text_dir(tmp_path_factory.mktemp("data-other"), "email")
