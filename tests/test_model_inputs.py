"""Bad model inputs: a config.json that is not a mapping, not JSON or has wrong types, a tokenizer
larger than the model's vocabulary, a GGUF truncated in the middle, missing or unreadable weights,
and exporting a corrupt SafeTensors file. Each gets one message naming the file (and the key),
the documented exit code, and never a traceback or the catch-all "unexpected failure"."""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from entrenar_cli.cli import app

runner = CliRunner()


def _model(tmp: Path, src: Path) -> Path:
    dst = tmp / "model"
    shutil.copytree(src, dst)
    return dst


def _edit_config(model: Path, **changes: object) -> None:
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(changes)
    (model / "config.json").write_text(json.dumps(cfg))


def _finetune_yaml(tmp: Path, model: Path | str, data: Path) -> Path:
    cfg = tmp / "ft.yaml"
    cfg.write_text(f"model:\n  model_id: {model}\nmethod: lora\n"
                   f"training:\n  max_steps: 1\n  batch_size: 2\n"
                   f"dataset:\n  path: {data}\n  max_length: 32\n"
                   f"output:\n  dir: {tmp / 'out'}\n")
    return cfg


def _clean(out: str) -> None:
    assert "Traceback" not in out and "unexpected failure" not in out, out


# each case: builder(tmp, tiny model dir) -> the model path to train; exit code; words the message must hold
Case = tuple[str, Callable[[Path, Path], Path], int, list[str]]


def _not_a_mapping(t: Path, m: Path) -> Path:
    d = _model(t, m)
    (d / "config.json").write_text("[1, 2, 3]")
    return d


def _not_json(t: Path, m: Path) -> Path:
    d = _model(t, m)
    (d / "config.json").write_text('{"model_type": "llama",')
    return d


def _layers_as_text(t: Path, m: Path) -> Path:
    d = _model(t, m)
    _edit_config(d, num_hidden_layers="six")
    return d


def _negative_vocab(t: Path, m: Path) -> Path:
    d = _model(t, m)
    _edit_config(d, vocab_size=-1)
    return d


def _hidden_as_list(t: Path, m: Path) -> Path:
    d = _model(t, m)
    _edit_config(d, hidden_size=[64])
    return d


def _infinite_eps(t: Path, m: Path) -> Path:
    d = _model(t, m)
    text = (d / "config.json").read_text()
    cfg = json.loads(text)
    (d / "config.json").write_text(text.replace(f'"rms_norm_eps": {json.dumps(cfg["rms_norm_eps"])}',
                                                '"rms_norm_eps": Infinity'))
    return d


def _unknown_model_type(t: Path, m: Path) -> Path:
    d = _model(t, m)
    _edit_config(d, model_type="lama")
    return d


def _sizes_differ_from_weights(t: Path, m: Path) -> Path:
    d = _model(t, m)
    _edit_config(d, vocab_size=600)  # the weights have 512 rows; the tokenizer 512 tokens
    return d


def _tokenizer_larger_than_vocab(t: Path, m: Path) -> Path:
    from transformers import AutoTokenizer

    d = _model(t, m)
    tok = AutoTokenizer.from_pretrained(d)
    tok.add_tokens([f"<extra-{i}>" for i in range(5)])
    tok.save_pretrained(d)
    return d


def _no_weights(t: Path, m: Path) -> Path:
    d = _model(t, m)
    (d / "model.safetensors").unlink()
    return d


def _unreadable_weights(t: Path, m: Path) -> Path:
    d = _model(t, m)
    (d / "model.safetensors").unlink()
    (d / "model.safetensors").mkdir()  # unreadable as a file, also for root (chmod is not)
    return d


CASES: list[Case] = [
    ("config not a mapping", _not_a_mapping, 2, ["config.json", "expected a JSON object", "list"]),
    ("config not json", _not_json, 2, ["config.json", "invalid JSON at line 1, column 24"]),
    ("num_hidden_layers as text", _layers_as_text, 2, ["config.json", "'num_hidden_layers' is 'six'"]),
    ("negative vocab_size", _negative_vocab, 2, ["config.json", "'vocab_size' is -1"]),
    ("hidden_size a list", _hidden_as_list, 2, ["config.json", "'hidden_size'"]),
    ("infinite rms_norm_eps", _infinite_eps, 2, ["config.json", "'rms_norm_eps' is inf", "finite"]),
    ("unknown model_type", _unknown_model_type, 2, ["config.json", "model_type 'lama'"]),
    ("sizes differ from weights", _sizes_differ_from_weights, 2, ["config.json", "do not match the weights"]),
    ("tokenizer larger than vocab", _tokenizer_larger_than_vocab, 2, ["517 tokens", "512 rows", "512..516"]),
    ("no weights", _no_weights, 2, ["no weights", "model"]),
    ("unreadable weights", _unreadable_weights, 2, ["cannot read the weights", "model.safetensors"]),
]


@pytest.mark.parametrize("name,build,code,words", CASES, ids=[c[0] for c in CASES])
def test_bad_model_input(name: str, build: Callable[[Path, Path], Path], code: int, words: list[str],
                         tiny_llama: Path, stdlib_text: Path, tmp_path: Path) -> None:
    model = build(tmp_path, tiny_llama)
    result = runner.invoke(app, ["finetune", str(_finetune_yaml(tmp_path, model, stdlib_text)), "--quiet"])
    _clean(result.output)
    assert result.exit_code == code, result.output
    for word in words:
        assert word in result.output, (word, result.output)


def test_bad_config_json_is_named_by_distill_and_estimate(tiny_llama: Path, stdlib_text: Path,
                                                          tmp_path: Path) -> None:
    model = _layers_as_text(tmp_path, tiny_llama)
    cfg = tmp_path / "d.yaml"
    cfg.write_text(f"teacher:\n  model_id: {model}\nstudent:\n  init_from_teacher: 2\n"
                   f"training:\n  max_steps: 1\n  batch_size: 2\n"
                   f"dataset:\n  path: {stdlib_text}\n  max_length: 32\noutput:\n  dir: {tmp_path / 'out'}\n")
    for args in (["distill", str(cfg), "--quiet"], ["estimate", str(model), "--method", "lora"]):
        result = runner.invoke(app, args)
        _clean(result.output)
        assert result.exit_code == 2, (args, result.output)
        assert "config.json" in result.output and "'num_hidden_layers' is 'six'" in result.output, result.output


@pytest.fixture(scope="module")
def truncated_gguf(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> Path:
    out = tmp_path_factory.mktemp("gguf")
    result = runner.invoke(app, ["export", str(tiny_llama), "--format", "gguf", "-o", str(out / "full.gguf"),
                                 "--no-parity"])
    assert result.exit_code == 0, result.output
    blob = (out / "full.gguf").read_bytes()
    (out / "cut.gguf").write_bytes(blob[: len(blob) * 2 // 3])  # header intact, tensor data cut
    return out / "cut.gguf"


def test_truncated_gguf_gives_estimates_message_in_distill_and_finetune(truncated_gguf: Path, stdlib_text: Path,
                                                                        tmp_path: Path) -> None:
    est = runner.invoke(app, ["estimate", str(truncated_gguf)])
    _clean(est.output)
    assert est.exit_code == 1 and "cut.gguf: not a readable GGUF file" in est.output, est.output
    message = next(line for line in est.output.splitlines() if "not a readable GGUF file" in line)
    d_cfg = tmp_path / "d.yaml"
    d_cfg.write_text(f"teacher:\n  model_id: {truncated_gguf}\nstudent:\n  init_from_teacher: 1\n"
                     f"training:\n  max_steps: 1\n  batch_size: 2\n"
                     f"dataset:\n  path: {stdlib_text}\n  max_length: 32\noutput:\n  dir: {tmp_path / 'd-out'}\n")
    (tmp_path / "ft").mkdir()
    f_cfg = _finetune_yaml(tmp_path / "ft", truncated_gguf, stdlib_text)
    for args in (["distill", str(d_cfg), "--quiet"], ["finetune", str(f_cfg), "--quiet"]):
        result = runner.invoke(app, args)
        _clean(result.output)
        assert result.exit_code == 1, (args, result.output)
        assert message in result.output, (args, result.output)


def _truncate(f: Path) -> None:
    blob = f.read_bytes()
    f.write_bytes(blob[: len(blob) // 2])


def _bad_header(f: Path) -> None:
    blob = f.read_bytes()
    f.write_bytes(blob[:8] + b"{not json" + blob[17:])


def _header_beyond_file(f: Path) -> None:
    blob = f.read_bytes()
    f.write_bytes(struct.pack("<Q", 4 * len(blob)) + blob[8:])


@pytest.mark.parametrize("damage,words", [
    (_truncate, ["lies outside the file", "truncated"]),
    (_bad_header, ["header is not valid JSON"]),
    (_header_beyond_file, ["header length", "does not fit"]),
], ids=["truncated", "bad header", "header length beyond file"])
def test_export_refuses_corrupt_safetensors_before_loading(damage: Callable[[Path], None], words: list[str],
                                                           tiny_llama: Path, tmp_path: Path) -> None:
    model = _model(tmp_path, tiny_llama)
    damage(model / "model.safetensors")
    out = tmp_path / "exported"
    result = runner.invoke(app, ["export", str(model), "-o", str(out)])
    _clean(result.output)
    assert result.exit_code == 1, result.output
    assert "corrupt SafeTensors file model.safetensors" in result.output, result.output
    for word in words:
        assert word in result.output, (word, result.output)
    assert not out.exists()


def test_export_names_a_bad_config_json(tiny_llama: Path, tmp_path: Path) -> None:
    model = _negative_vocab(tmp_path, tiny_llama)
    result = runner.invoke(app, ["export", str(model), "-o", str(tmp_path / "exported")])
    _clean(result.output)
    assert result.exit_code == 2 and "config.json: 'vocab_size' is -1" in result.output, result.output


def test_real_configs_pass_the_config_check() -> None:
    """Every default configuration transformers ships passes: the check rejects bad values, not
    architectures it has not heard of."""
    from transformers import CONFIG_MAPPING

    from entrenar_cli.model_config import check_config

    checked = 0
    for model_type in ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "phi", "phi3", "gpt2", "gpt_neo",
                       "gpt_neox", "bert", "roberta", "distilbert", "t5", "opt", "falcon", "bloom", "mixtral",
                       "deberta-v2", "electra"):
        check_config(CONFIG_MAPPING[model_type]().to_dict(), model_type)
        checked += 1
    assert checked == 21
