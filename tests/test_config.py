"""The YAML schema: the documented example, every validation rule on both sides, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from entrenar_cli.config import DistillationYamlConfig, FineTuneYamlConfig, validate_text
from entrenar_cli.errors import ConfigError

MINIMAL = """\
teacher:
  model_id: org/teacher
student:
  model_id: org/student
dataset:
  path: data.txt
output:
  dir: out
"""


def test_design_document_yaml_validates_as_written(repo: Path) -> None:
    cfg = DistillationYamlConfig.from_file(str(repo / "examples/configs/distill-design-doc.yaml"))
    assert cfg.teacher.model_id == "meta-llama/Llama-2-7b"
    assert cfg.student.lora is not None and cfg.student.lora.rank == 64 and cfg.student.lora.alpha == 16
    assert cfg.student.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert cfg.distillation.temperature == 4.0 and cfg.distillation.alpha == 0.7
    assert cfg.distillation.progressive.layer_mapping == [(0, 3), (1, 7), (2, 11)]
    assert cfg.training.learning_rate == pytest.approx(1e-4)  # YAML 1.1 reads 1e-4 as a string
    assert cfg.training.gradient_accumulation == 4
    assert cfg.dataset.max_length == 512 and cfg.output.dir == "./distilled-model"
    assert cfg.validate() == cfg and cfg.to_trainer_config() is cfg


def test_every_example_config_validates(repo: Path) -> None:
    files = sorted((repo / "examples/configs").glob("*.yaml"))
    assert files
    for f in files:
        text = f.read_text()
        assert text.startswith("# yaml-language-server: $schema="), f
        model = FineTuneYamlConfig if "\nmodel:" in text else DistillationYamlConfig
        model.from_file(str(f))


def _with(path: str, value: str) -> str:
    """MINIMAL plus one dotted setting, as YAML."""
    parts = path.split(".")
    lines = [("  " * i) + p + ":" for i, p in enumerate(parts[:-1])]
    lines.append(("  " * (len(parts) - 1)) + f"{parts[-1]}: {value}")
    extra = "\n".join(lines)
    if parts[0] in ("student", "dataset", "output", "teacher"):
        return validate_text(MINIMAL, DistillationYamlConfig, "t.yaml", [f"{path}={value}"])
    return validate_text(MINIMAL + extra + "\n", DistillationYamlConfig, "t.yaml")


# (dotted key, accepted values, rejected values): the original's rules, both sides of each bound
RULES = [
    ("distillation.temperature", ["0.01", "20"], ["0", "-1", "20.5"]),
    ("distillation.alpha", ["0", "1", "0.7"], ["-0.1", "1.1"]),
    ("distillation.progressive.weight", ["0", "1"], ["-0.01", "1.01"]),
    ("distillation.attention.weight", ["0", "1"], ["-0.01", "1.5"]),
    ("training.epochs", ["1"], ["0", "-3"]),
    ("training.batch_size", ["1"], ["0"]),
    ("training.gradient_accumulation", ["1"], ["0"]),
    ("training.learning_rate", ["1e-6", "0.1"], ["0", "0.11"]),
    ("dataset.max_length", ["1", "8192"], ["0", "8193"]),
    ("student.lora.rank", ["1"], ["0"]),
    ("student.lora.alpha", ["0.5"], ["0"]),
    ("student.lora.dropout", ["0", "0.99"], ["1", "-0.1"]),
]


@pytest.mark.parametrize("key,good,bad", RULES, ids=[r[0] for r in RULES])
def test_validation_rule_both_sides(key: str, good: list[str], bad: list[str]) -> None:
    for value in good:
        _with(key, value)
    for value in bad:
        with pytest.raises(ConfigError) as info:
            _with(key, value)
        assert key in str(info.value), str(info.value)
        assert "t.yaml" in str(info.value) or "--set" in str(info.value)


def test_layer_mapping_required_when_progressive_enabled() -> None:
    text = MINIMAL + "distillation:\n  progressive:\n    enabled: true\n"
    with pytest.raises(ConfigError, match="layer_mapping must not be empty"):
        validate_text(text, DistillationYamlConfig, "t.yaml")
    ok = MINIMAL + "distillation:\n  progressive:\n    enabled: false\n"
    assert not validate_text(ok, DistillationYamlConfig, "t.yaml").distillation.progressive.enabled


def test_error_names_field_file_line_and_value() -> None:
    text = MINIMAL + "distillation:\n  temperature: 0\n"
    with pytest.raises(ConfigError) as info:
        validate_text(text, DistillationYamlConfig, "distill.yaml")
    msg = str(info.value)
    assert "distill.yaml:10:16: distillation.temperature" in msg
    assert "greater than 0" in msg and "(got 0)" in msg
    assert info.value.exit_code == 2


def test_unknown_key_suggests_closest() -> None:
    text = MINIMAL + "training:\n  lerning_rate: 0.001\n"
    with pytest.raises(ConfigError) as info:
        validate_text(text, DistillationYamlConfig, "c.yaml")
    msg = str(info.value)
    assert "c.yaml:10:3: training.lerning_rate: unknown key 'lerning_rate'" in msg
    assert "did you mean 'learning_rate'?" in msg


def test_unknown_top_level_section() -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'outptu' \(did you mean 'output'\?\)"):
        validate_text(MINIMAL + "outptu:\n  dir: x\n", DistillationYamlConfig, "c.yaml")


def test_wrong_type_reports_value() -> None:
    text = MINIMAL + "training:\n  epochs: many\n"
    with pytest.raises(ConfigError) as info:
        validate_text(text, DistillationYamlConfig, "c.yaml")
    assert "c.yaml:10:11: training.epochs" in str(info.value) and "'many'" in str(info.value)


def test_all_problems_reported_together() -> None:
    text = MINIMAL + "training:\n  epochs: 0\n  batch_size: 0\n"
    with pytest.raises(ConfigError) as info:
        validate_text(text, DistillationYamlConfig, "c.yaml")
    assert len(info.value.problems) == 2


def test_bad_yaml_syntax_shows_line() -> None:
    text = "teacher:\n  model_id: [unclosed\nstudent: {}\n"
    with pytest.raises(ConfigError) as info:
        validate_text(text, DistillationYamlConfig, "bad.yaml")
    assert "bad.yaml:3:" in str(info.value) and "invalid YAML" in str(info.value)


def test_missing_section_and_non_mapping() -> None:
    with pytest.raises(ConfigError, match="output: required key is missing"):
        validate_text(MINIMAL.replace("output:\n  dir: out\n", ""), DistillationYamlConfig, "c.yaml")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        validate_text("- a\n- b\n", DistillationYamlConfig, "c.yaml")
    with pytest.raises(ConfigError, match="empty"):
        validate_text("", DistillationYamlConfig, "c.yaml")


def test_set_overrides_are_typed_and_validated() -> None:
    cfg = validate_text(
        MINIMAL,
        DistillationYamlConfig,
        "c.yaml",
        ["training.learning_rate=3e-4", "training.max_steps=10", "distillation.progressive.layer_mapping=[[0, 1]]",
         "distillation.progressive.enabled=true", "dataset.path=other.txt"],
    )
    assert cfg.training.learning_rate == pytest.approx(3e-4)
    assert cfg.training.max_steps == 10
    assert cfg.distillation.progressive.layer_mapping == [(0, 1)]
    assert cfg.dataset.path == "other.txt"
    with pytest.raises(ConfigError, match=r"--set: training.max_steps"):
        validate_text(MINIMAL, DistillationYamlConfig, "c.yaml", ["training.max_steps=zero"])
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        validate_text(MINIMAL, DistillationYamlConfig, "c.yaml", ["training.max_steps"])


def test_student_needs_exactly_one_source() -> None:
    text = MINIMAL.replace("  model_id: org/student\n", "  init_from_teacher: 6\n")
    cfg = validate_text(text, DistillationYamlConfig, "c.yaml")
    assert cfg.student.init_from_teacher is not None and cfg.student.init_from_teacher.layers == 6
    both = MINIMAL.replace("  model_id: org/student\n", "  model_id: a/b\n  init_from_teacher: [0, 2]\n")
    with pytest.raises(ConfigError, match="only one of"):
        validate_text(both, DistillationYamlConfig, "c.yaml")


def test_pickle_format_needs_opt_in() -> None:
    with pytest.raises(ConfigError, match="allow_pickle"):
        validate_text(MINIMAL, DistillationYamlConfig, "c.yaml", ["teacher.format=pytorch"])
    validate_text(MINIMAL, DistillationYamlConfig, "c.yaml", ["teacher.format=pytorch", "teacher.allow_pickle=true"])


def test_finetune_config_methods() -> None:
    text = "model:\n  model_id: org/m\nmethod: qlora\nquantization:\n  bits: 4\ndataset:\n  path: d.jsonl\noutput:\n  dir: o\n"
    cfg = validate_text(text, FineTuneYamlConfig, "f.yaml")
    assert cfg.method == "qlora" and cfg.quantization.bits == 4 and cfg.quantization.double_quant
    with pytest.raises(ConfigError, match="bits"):
        validate_text(text.replace("bits: 4", "bits: 3"), FineTuneYamlConfig, "f.yaml")
    with pytest.raises(ConfigError, match="method"):
        validate_text(text.replace("method: qlora", "method: prefix"), FineTuneYamlConfig, "f.yaml")


def test_schema_files_are_current(repo: Path) -> None:
    from entrenar_cli.commands.config_cmds import json_schema_text

    for kind in ("distill", "finetune"):
        stored = (repo / "schemas" / f"{kind}.schema.json").read_text()
        assert stored == json_schema_text(kind), f"schemas/{kind}.schema.json is stale: run 'make schemas'"
        assert json.loads(stored)["additionalProperties"] is False
