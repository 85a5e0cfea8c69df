"""The command line: help, exit codes, validate/schema, start-up without torch."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from entrenar_cli.cli import app

runner = CliRunner()
COMMANDS = ["fetch", "estimate", "distill", "finetune", "export", "validate", "schema", "report"]


def test_help_lists_every_command() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in COMMANDS:
        assert f"  {name} " in result.output


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_has_help_with_example(name: str) -> None:
    result = runner.invoke(app, [name, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example" in result.output or "example" in result.output, result.output


def test_version() -> None:
    from entrenar_cli import __version__

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"entrenar {__version__}"


def test_validate_documented_example(repo: Path) -> None:
    result = runner.invoke(app, ["validate", str(repo / "examples/configs/distill-design-doc.yaml"), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["valid"] and doc["kind"] == "distill"
    assert doc["config"]["distillation"]["temperature"] == 4.0
    assert doc["config"]["training"]["lr_scheduler"] == "cosine"  # defaults resolved


def test_validate_temperature_zero_exit_2_names_field_and_line(repo: Path, tmp_path: Path) -> None:
    src = (repo / "examples/configs/distill-design-doc.yaml").read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(src.replace("temperature: 4.0", "temperature: 0"))
    line = next(i for i, ln in enumerate(bad.read_text().splitlines(), 1) if "temperature: 0" in ln)
    result = runner.invoke(app, ["validate", str(bad)])
    assert result.exit_code == 2
    assert f"bad.yaml:{line}:16: distillation.temperature" in result.output
    assert "Traceback" not in result.output


def test_validate_set_override(repo: Path) -> None:
    cfg = str(repo / "examples/configs/distill-design-doc.yaml")
    result = runner.invoke(app, ["validate", cfg, "--json", "--set", "training.epochs=2"])
    assert result.exit_code == 0 and json.loads(result.stdout)["config"]["training"]["epochs"] == 2
    result = runner.invoke(app, ["validate", cfg, "--set", "training.epochs=0"])
    assert result.exit_code == 2 and "--set: training.epochs" in result.output


def test_validate_missing_file() -> None:
    result = runner.invoke(app, ["validate", "nope.yaml"])
    assert result.exit_code == 2 and "config file not found: nope.yaml" in result.output


def test_schema_command() -> None:
    result = runner.invoke(app, ["schema", "finetune"])
    assert result.exit_code == 0 and json.loads(result.stdout)["title"] == "FineTuneYamlConfig"
    assert runner.invoke(app, ["schema", "bogus"]).exit_code == 2


def test_unknown_option_is_usage_error() -> None:
    assert runner.invoke(app, ["validate", "--bogus"]).exit_code == 2


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "entrenar_cli", *args], capture_output=True, text=True, timeout=60)


def test_help_and_validate_do_not_import_torch(repo: Path) -> None:
    probe = (
        "import sys; sys.argv=['entrenar', *sys.argv[1:]]\n"
        "from entrenar_cli.cli import app\n"
        "try:\n    app()\nexcept SystemExit:\n    pass\n"
        "heavy=[m for m in ('torch','transformers','peft','accelerate') if m in sys.modules]\n"
        "print('HEAVY', heavy, file=sys.stderr)\n"
    )
    for args in (["--help"], ["validate", str(repo / "examples/configs/distill-design-doc.yaml")]):
        proc = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=60)
        assert "HEAVY []" in proc.stderr, proc.stderr


def test_help_starts_fast_in_a_subprocess() -> None:
    # a guard against importing torch at start-up (~3 s), not a benchmark: the bound is loose
    t0 = time.perf_counter()
    proc = _run("--help")
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0 and "distill" in proc.stdout
    assert elapsed < 2.0, elapsed


def test_runtime_error_exit_code_in_subprocess(tmp_path: Path) -> None:
    bad = tmp_path / "c.yaml"
    bad.write_text("teacher: [1, 2\n")
    proc = _run("validate", str(bad))
    assert proc.returncode == 2 and "invalid YAML" in proc.stderr and "Traceback" not in proc.stderr


def test_memory_line_says_what_the_peak_counts() -> None:
    from entrenar_cli.pipeline.common import memory_phrase

    cpu = memory_phrase({"device": "cpu", "peak_mem_bytes": 3 * 2**30, "estimated_mem_bytes": 2**30})
    assert cpu == "peak RSS 3.00 GiB (whole process; training-memory estimate 1.00 GiB)"
    gpu = memory_phrase({"device": "cuda", "peak_mem_bytes": 2**30, "estimated_mem_bytes": None})
    assert gpu == "peak GPU memory 1.00 GiB"


def test_a_command_that_succeeded_closes_the_process_group(repo: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Under torchrun every rank waits for the others and shuts the process group down after a command that
    succeeded (an open gloo group can abort a rank at exit: pytorch#190489); not after one that failed."""
    import torch.distributed as dist

    from entrenar_cli import cli

    closed: list[bool] = []
    monkeypatch.setattr(cli, "close_process_group", lambda: closed.append(True))
    cfg = str(repo / "examples/configs/distill-design-doc.yaml")
    assert runner.invoke(app, ["validate", cfg]).exit_code == 0 and closed == [True]
    assert runner.invoke(app, ["validate", cfg, "--set", "training.epochs=0"]).exit_code == 2 and closed == [True]
    monkeypatch.undo()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        cli.close_process_group()
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    cli.close_process_group()  # nothing open: nothing to do
