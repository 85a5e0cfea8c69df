"""A corpus of bad inputs: each gets one clear message naming what to fix, exit 2 (config) or 1
(runtime), and never a traceback."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from entrenar_cli.cli import app

runner = CliRunner()


def _config(tmp: Path, teacher: Path | str, data: Path | str, extra: str = "", student: str = "  init_from_teacher: 2\n",
            dataset_extra: str = "") -> Path:
    cfg = tmp / "bad.yaml"
    cfg.write_text(f"teacher:\n  model_id: {teacher}\nstudent:\n{student}"
                   f"training:\n  max_steps: 2\n  batch_size: 2\n"
                   f"dataset:\n  path: {data}\n  max_length: 32\n{dataset_extra}"
                   f"output:\n  dir: {tmp / 'out'}\n{extra}")
    return cfg


def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# each case: (name, builder(tmp, tiny_llama, text_dir) -> config path, exit code, words the message must hold)
Case = tuple[str, Callable[[Path, Path, Path], Path], int, list[str]]


def _malformed_yaml(t: Path, m: Path, d: Path) -> Path:
    (t / "bad.yaml").write_text("teacher:\n  model_id: [x\n")
    return t / "bad.yaml"


def _wrong_type(t: Path, m: Path, d: Path) -> Path:
    return _config(t, m, d, "distillation:\n  alpha: lots\n")


def _out_of_range(t: Path, m: Path, d: Path) -> Path:
    return _config(t, m, d, "distillation:\n  temperature: 25\n")


def _unknown_key(t: Path, m: Path, d: Path) -> Path:
    return _config(t, m, d, "distillation:\n  temprature: 2\n")


def _mapping_past_layers(t: Path, m: Path, d: Path) -> Path:
    return _config(t, m, d, "distillation:\n  progressive:\n    enabled: true\n    layer_mapping: [[0, 7]]\n")


def _student_layers_past_teacher(t: Path, m: Path, d: Path) -> Path:
    return _config(t, m, d, student="  init_from_teacher: [0, 12]\n")


def _missing_dataset(t: Path, m: Path, d: Path) -> Path:
    return _config(t, m, t / "nope.txt")


def _empty_dataset(t: Path, m: Path, d: Path) -> Path:
    (t / "empty.txt").write_text("")
    return _config(t, m, t / "empty.txt")


def _missing_column(t: Path, m: Path, d: Path) -> Path:
    (t / "rows.jsonl").write_text(json.dumps({"content": "x = 1"}) + "\n")
    return _config(t, m, t / "rows.jsonl")


def _not_parquet(t: Path, m: Path, d: Path) -> Path:
    (t / "data.parquet").write_text("this is not parquet at all")
    return _config(t, m, t / "data.parquet")


def _truncated_safetensors(t: Path, m: Path, d: Path) -> Path:
    bad = _copy_model(m, t / "model")
    blob = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    return _config(t, bad, d)


def _pickle_renamed(t: Path, m: Path, d: Path) -> Path:
    import pickle

    bad = _copy_model(m, t / "model")
    (bad / "model.safetensors").write_bytes(pickle.dumps({"weights": [1, 2, 3]}) * 50)
    return _config(t, bad, d)


def _bad_gguf(t: Path, m: Path, d: Path) -> Path:
    (t / "model.gguf").write_bytes(b"NOTGGUF" + b"\0" * 400)
    return _config(t, t / "model.gguf", d, "", "  init_from_teacher: 1\n")


def _no_model_type(t: Path, m: Path, d: Path) -> Path:
    bad = _copy_model(m, t / "model")
    cfg = json.loads((bad / "config.json").read_text())
    cfg.pop("model_type")
    (bad / "config.json").write_text(json.dumps(cfg))
    return _config(t, bad, d)


def _tokenizer_mismatch(t: Path, m: Path, d: Path) -> Path:
    from transformers import AutoTokenizer

    other = _copy_model(m, t / "student")
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["<not-in-teacher>"])
    tok.save_pretrained(other)
    return _config(t, m, d, student=f"  model_id: {other}\n")


def _output_inside_input(t: Path, m: Path, d: Path) -> Path:
    model = _copy_model(m, t / "model")
    cfg = _config(t, model, d)
    cfg.write_text(cfg.read_text().replace(f"dir: {t / 'out'}", f"dir: {model / 'distilled'}"))
    return cfg


CASES: list[Case] = [
    ("malformed yaml", _malformed_yaml, 2, ["bad.yaml:", "invalid YAML"]),
    ("wrong type", _wrong_type, 2, ["distillation.alpha", "'lots'"]),
    ("out of range", _out_of_range, 2, ["distillation.temperature", "less than or equal to 20"]),
    ("unknown key", _unknown_key, 2, ["temprature", "did you mean 'temperature'"]),
    ("mapping past layers", _mapping_past_layers, 2, ["layer_mapping", "teacher layer 7"]),
    ("student layers past teacher", _student_layers_past_teacher, 2, ["out of range", "4 layers"]),
    ("missing dataset file", _missing_dataset, 1, ["nope.txt", "matches no files"]),
    ("empty dataset file", _empty_dataset, 1, ["no usable text"]),
    ("missing text column", _missing_column, 1, ["rows.jsonl:1", "no field 'text'", "text_column"]),
    ("not parquet", _not_parquet, 1, ["data.parquet", "not a readable Parquet file"]),
    ("truncated safetensors", _truncated_safetensors, 1, ["model.safetensors"]),
    ("pickle renamed to safetensors", _pickle_renamed, 1, ["model.safetensors"]),
    ("bad gguf header", _bad_gguf, 1, ["model.gguf"]),
    ("config without model_type", _no_model_type, 1, ["config.json", "model_type"]),
    ("tokenizer mismatch", _tokenizer_mismatch, 1, ["tokenizers differ"]),
    ("output inside input", _output_inside_input, 2, ["inside the input model directory"]),
]


@pytest.mark.parametrize("name,build,code,words", CASES, ids=[c[0] for c in CASES])
def test_bad_input(name: str, build: Callable[[Path, Path, Path], Path], code: int, words: list[str],
                   tiny_llama: Path, stdlib_text: Path, tmp_path: Path) -> None:
    cfg = build(tmp_path, tiny_llama, stdlib_text)
    result = runner.invoke(app, ["distill", str(cfg), "--quiet"])
    out = result.output
    assert result.exit_code == code, out
    assert "Traceback" not in out and "unexpected failure" not in out, out
    for word in words:
        assert word in out, (word, out)


def test_max_length_beyond_positions(tiny_llama: Path, stdlib_text: Path, tmp_path: Path) -> None:
    cfg = _config(tmp_path, tiny_llama, stdlib_text)
    cfg.write_text(cfg.read_text().replace("max_length: 32", "max_length: 4096"))
    result = runner.invoke(app, ["distill", str(cfg), "--quiet"])
    assert result.exit_code == 2 and "exceeds the teacher's 256 positions" in result.output, result.output
