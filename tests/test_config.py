"""The YAML schema: the documented example, every validation rule on both sides, clear errors."""

from __future__ import annotations

import json
import time
import tracemalloc
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from entrenar_cli.config import DistillationYamlConfig, FineTuneYamlConfig, load_config, validate_text
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
    ("distillation.progressive.weight", ["0", "1", "10"], ["-0.01", "10.5"]),
    ("distillation.attention.weight", ["0", "1"], ["-0.01", "1.5"]),
    ("training.epochs", ["1"], ["0", "-3"]),
    ("training.batch_size", ["1", "65536"], ["0", "65537"]),
    ("training.seed", ["0", str(2**63 - 1)], ["-1", str(2**63), "1.5"]),
    ("training.max_steps", ["1", "1000000000"], ["0", "1000000001", "1e400"]),
    ("training.weight_decay", ["0", "0.1"], ["-0.1", ".inf", ".nan"]),
    ("training.max_grad_norm", ["0.5"], ["0", ".inf", "-.inf", ".NaN"]),
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


def test_layer_mapping_defaults_when_left_out_and_is_never_empty() -> None:
    text = MINIMAL + "distillation:\n  progressive:\n    enabled: true\n"
    cfg = validate_text(text, DistillationYamlConfig, "t.yaml")
    assert cfg.distillation.progressive.enabled and cfg.distillation.progressive.layer_mapping is None
    with pytest.raises(ConfigError, match="layer_mapping must not be empty"):
        validate_text(text + "    layer_mapping: []\n", DistillationYamlConfig, "t.yaml")
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
    text = ("model:\n  model_id: org/m\nmethod: qlora\nquantization:\n  bits: 4\n"
            "dataset:\n  path: d.jsonl\noutput:\n  dir: o\n")
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


def _float_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Dotted paths of every float field of a config schema (found, not listed: new fields are covered)."""
    found: list[str] = []
    for name, field in model.model_fields.items():
        args = typing.get_args(field.annotation) or (field.annotation,)
        if float in args:
            found.append(prefix + name)
        for arg in args:
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                found.extend(_float_paths(arg, f"{prefix}{name}."))
    return found


def test_every_float_field_rejects_non_finite_numbers() -> None:
    paths = _float_paths(DistillationYamlConfig)
    assert "training.weight_decay" in paths and "student.lora.alpha" in paths and len(paths) >= 10
    for path in paths:
        for value in (".inf", "-.inf", ".nan"):
            with pytest.raises(ConfigError) as info:
                validate_text(MINIMAL, DistillationYamlConfig, "t.yaml", [f"{path}={value}"])
            assert f"{path}: Input should be a finite number" in str(info.value), (path, str(info.value))
    ft = "model:\n  model_id: org/m\ndataset:\n  path: d.jsonl\noutput:\n  dir: o\n"
    for path in _float_paths(FineTuneYamlConfig):
        with pytest.raises(ConfigError, match="finite number"):
            validate_text(ft, FineTuneYamlConfig, "f.yaml", [f"{path}=.inf"])


def test_duplicate_keys_are_errors_naming_both_lines() -> None:
    text = MINIMAL + "training:\n  seed: 1\n  seed: 2\ntraining:\n  epochs: 2\n"
    with pytest.raises(ConfigError) as info:
        validate_text(text, DistillationYamlConfig, "c.yaml")
    msg = str(info.value)
    assert "c.yaml:11:3: training.seed: duplicate key (lines 10 and 11)" in msg
    assert "c.yaml:12:1: training: duplicate key (lines 9 and 12)" in msg
    assert info.value.exit_code == 2 and len(info.value.problems) == 2
    # keys compare by value; a merge key is not a duplicate and may be overridden
    with pytest.raises(ConfigError, match="lines 10 and 11"):
        validate_text(MINIMAL + "training:\n  seed: 1\n  'seed': 2\n", DistillationYamlConfig, "c.yaml")
    merged = MINIMAL + "training:\n  <<: {epochs: 3, seed: 1}\n  seed: 7\n"
    cfg = validate_text(merged, DistillationYamlConfig, "c.yaml")
    assert cfg.training.epochs == 3 and cfg.training.seed == 7


def _bounded(text: str, match: str, *, trace_memory: bool = False) -> ConfigError:
    """Refused with ``match`` within 10 s of CPU time (an expanded bomb takes hours; CPU time, not wall
    time, so a loaded machine does not fail it) and, traced, under 64 MB."""
    if trace_memory:
        tracemalloc.start()
    start = time.process_time()
    try:
        with pytest.raises(ConfigError, match=match) as info:
            validate_text(text, DistillationYamlConfig, "b.yaml")
        elapsed = time.process_time() - start
        peak = tracemalloc.get_traced_memory()[1] if trace_memory else 0
    finally:
        if trace_memory:
            tracemalloc.stop()
    assert elapsed < 10 and peak < 64 * 2**20, (elapsed, peak)
    return info.value


def test_yaml_aliases_depth_and_size_are_bounded() -> None:
    laughs = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    laughs += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    assert len("\n".join(laughs)) < 1100  # 1 KB that would be 10^9 values
    _bounded(MINIMAL + "\n".join(laughs) + "\n", r"b.yaml:\d+:\d+: the YAML holds more than 10,000 values",
             trace_memory=True)
    merges = ["m0: &m0 {k0: 1, k1: 1, k2: 1}"]
    merges += [f"m{i}: &m{i} {{<<: [" + ", ".join([f"*m{i - 1}"] * 10) + "]}" for i in range(1, 9)]
    _bounded(MINIMAL + "\n".join(merges) + "\n", "more than 10,000 values", trace_memory=True)
    _bounded(MINIMAL + "loop: &l [*l]\n", "recursive", trace_memory=True)
    _bounded(MINIMAL + "x: " + "[" * 100_000 + "]" * 100_000 + "\n", r"b.yaml:9:68: the YAML is nested more than 64")
    _bounded(MINIMAL + "x: " + "{a: " * 100 + "1" + "}" * 100 + "\n", "nested more than 64")
    _bounded("".join("  " * i + f"k{i}:\n" for i in range(1000)), "nested more than 64")
    _bounded("".join("  " * i + "- \n" for i in range(1000)), "nested more than 64")
    _bounded("a: [" + "1, " * 20_000 + "]\n", "more than 10,000 values")
    chain = "c0: &c0 [1]\n" + "".join(f"c{i + 1}: &c{i + 1} [*c{i}]\n" for i in range(100))
    _bounded(MINIMAL + chain, "nested more than 64")
    # a real config with anchors still loads
    ok = MINIMAL.replace("  model_id: org/teacher\n", "  model_id: &t org/teacher\n") + "x-notes: [*t, *t]\n"
    with pytest.raises(ConfigError, match="unknown key 'x-notes'"):
        validate_text(ok, DistillationYamlConfig, "c.yaml")


def test_set_values_are_bounded_like_the_file() -> None:
    with pytest.raises(ConfigError, match="nested more than 64"):
        validate_text(MINIMAL, DistillationYamlConfig, "c.yaml", ["training.seed=" + "[" * 1000 + "]" * 1000])
    with pytest.raises(ConfigError, match="recursive"):
        validate_text(MINIMAL, DistillationYamlConfig, "c.yaml", ["training.seed=&a [*a]"])
    with pytest.raises(ConfigError, match="duplicate key"):
        validate_text(MINIMAL, DistillationYamlConfig, "c.yaml", ["training={seed: 1, seed: 2}"])
    with pytest.raises(ConfigError, match="more than 64 levels of keys"):
        validate_text(MINIMAL, DistillationYamlConfig, "c.yaml", [".".join(["a"] * 5000) + "=1"])


def test_config_file_must_be_a_utf8_text_file(tmp_path: Path) -> None:
    cases = {
        "latin1.yaml": ("teacher:\n  model_id: caf\xe9\n".encode("latin-1"),
                        r"latin1.yaml:2:16: not UTF-8 text \(byte 0xe9\)"),
        "utf16.yaml": ("teacher: {}\n".encode("utf-16"), "UTF-16"),
        "nul.yaml": (b"teacher:\n  model_id: a\x00b\n",
                     r"nul.yaml:2:14: invalid YAML: character U\+0000 is not allowed"),
        "empty.yaml": (b"", "the file is empty"),
        "list.yaml": (b"- teacher\n", "top level must be a mapping"),
        "huge.yaml": (b"# " + b"x" * (2**20 + 10) + b"\n", "larger than 1 MiB"),
    }
    for name, (blob, match) in cases.items():
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(ConfigError, match=match) as info:
            load_config(tmp_path / name, DistillationYamlConfig)
        assert info.value.exit_code == 2
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path, DistillationYamlConfig)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml", DistillationYamlConfig)
    with pytest.raises(ConfigError, match="not a regular file"):
        load_config("/dev/null", DistillationYamlConfig)


def test_bounds_on_counts_and_indices() -> None:
    with pytest.raises(ConfigError, match="number of layers must be <= 65536"):
        validate_text(MINIMAL, DistillationYamlConfig, "c.yaml",
                      ["student.model_id=null", f"student.init_from_teacher={10**30}"])
    with pytest.raises(ConfigError, match="layer indices must be < 65536"):
        mapping = f"distillation:\n  progressive:\n    enabled: true\n    layer_mapping: [[0, {2**64}]]\n"
        validate_text(MINIMAL + mapping, DistillationYamlConfig, "c.yaml")
    with pytest.raises(ConfigError, match="NUL character"):
        validate_text(MINIMAL, DistillationYamlConfig, "c.yaml", ['output.dir="out\\0"'])


def test_model_references_are_checked() -> None:
    for bad, match in [('""', "must not be empty"), ("'  '", "must not be empty"), ("'pkg:'", "pkg:PACKAGE/path"),
                       ("pkg:a.b/model", "pkg:PACKAGE/path"), ("'pkg:../x'", "pkg:PACKAGE/path")]:
        with pytest.raises(ConfigError, match=match) as info:
            validate_text(MINIMAL.replace("org/teacher", bad), DistillationYamlConfig, "c.yaml")
        assert "c.yaml:2:13: teacher.model_id" in str(info.value)
    with pytest.raises(ConfigError, match="student.model_id: must not be empty"):
        validate_text(MINIMAL.replace("org/student", '""'), DistillationYamlConfig, "c.yaml")
    cfg = validate_text(MINIMAL.replace("org/student", "pkg:some_pkg/model"), DistillationYamlConfig, "c.yaml")
    assert cfg.student.model_id == "pkg:some_pkg/model"


def test_keys_that_look_like_tags_or_hold_control_characters() -> None:
    with pytest.raises(ConfigError) as info:
        validate_text(MINIMAL + "training:\n  'a[0]': 1\n", DistillationYamlConfig, "c.yaml")
    assert "c.yaml:10:3: training.a[0]: unknown key 'a[0]'" in str(info.value)
    with pytest.raises(ConfigError) as info:
        validate_text(MINIMAL + '"\\e[2Jboom": 1\n' + "k" * 900 + ": 2\n", DistillationYamlConfig, "c.yaml")
    msg = str(info.value)
    assert "unknown key '\\x1b[2Jboom'" in msg and "\x1b" not in msg  # escaped, not sent to the terminal
    assert "k" * 77 + "..." in msg and "k" * 100 not in msg
