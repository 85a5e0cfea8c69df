"""The output directory: --overwrite removes only what an earlier run wrote (its run list); the
directory never overlaps an input, the working directory, home or /; an unwritable directory or a
full disk is one clear message; outputs honour the umask."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from entrenar_cli.cli import app

runner = CliRunner()
RUN_LIST = ".entrenar-run.json"


def _yaml(teacher: Path | str, data: Path | str, out: Path | str, steps: int = 2, extra: str = "") -> str:
    return (f"teacher:\n  model_id: {teacher}\nstudent:\n  init_from_teacher: 2\n"
            f"training:\n  max_steps: {steps}\n  batch_size: 2\n  logging_steps: 1\n{extra}"
            f"dataset:\n  path: {json.dumps(str(data))}\n  max_length: 32\n  eval_fraction: 0.2\n"
            f"output:\n  dir: {json.dumps(str(out))}\n")


def _distill(cfg: Path, *args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["distill", str(cfg), "--quiet", *args])
    assert "Traceback" not in result.output and "unexpected failure" not in result.output, result.output
    return result.exit_code, " ".join(result.output.split())  # rich wraps long lines


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_empty_output_dir_is_refused_and_the_working_directory_survives(
        tiny_llama: Path, stdlib_text: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(_yaml(tiny_llama, stdlib_text, ""))
    before = _tree(tmp_path)
    code, out = _distill(cfg, "--overwrite")
    assert code == 2 and "output.dir" in out and "must not be empty" in out, out
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("where,words", [
    (".", "is the current working directory"),
    ("..", "contains the current working directory"),  # cwd is HOME/a/work
    ("~", "is your home directory"),
    ("/", "is the filesystem root"),
])
def test_working_directory_home_and_root_are_refused(where: str, words: str, tiny_llama: Path, stdlib_text: Path,
                                                     tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home, work = tmp_path / "home", tmp_path / "home" / "a" / "work"
    work.mkdir(parents=True)
    (work / "notes.txt").write_text("mine")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    cfg = work / "c.yaml"
    cfg.write_text(_yaml(tiny_llama, stdlib_text, where))
    before = _tree(home)
    code, out = _distill(cfg, "--overwrite")
    assert code == 2 and words in out, out
    assert _tree(home) == before


def test_tilde_in_output_dir_expands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from entrenar_cli.config import DistillationYamlConfig, validate_text

    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = validate_text(_yaml("t", "d", "~/runs/x"), DistillationYamlConfig, "c.yaml")
    assert cfg.output.dir == str(tmp_path / "runs" / "x")


def _first_run(tiny_llama: Path, data: Path | str, out: Path, tmp: Path, extra: str = "") -> Path:
    cfg = tmp / "first.yaml"
    cfg.write_text(_yaml(tiny_llama, data, out, extra=extra))
    code, text = _distill(cfg)
    assert code == 0, text
    return cfg


@pytest.fixture
def finished_run(tiny_llama: Path, stdlib_text: Path, tmp_path: Path) -> tuple[Path, Path]:
    """(config, output dir) of a finished 2-step distill run with a checkpoint every step."""
    out = tmp_path / "run"
    old = os.umask(0o027)  # a non-default umask: outputs must follow it
    try:
        cfg = _first_run(tiny_llama, stdlib_text, out, tmp_path, extra="  save_steps: 1\n")
    finally:
        os.umask(old)
    return cfg, out


def test_run_list_names_everything_the_run_wrote(finished_run: tuple[Path, Path]) -> None:
    _, out = finished_run
    written = set(json.loads((out / RUN_LIST).read_text())["written"])
    present = {p.name for p in out.iterdir()} - {RUN_LIST, ".entrenar.lock"}
    assert present == written, (present, written)
    assert {"model.safetensors", "config.json", "checkpoints", "metrics.jsonl", "summary.json",
            "resolved_config.yaml", "report.html"} <= written


def test_outputs_honour_the_umask(finished_run: tuple[Path, Path]) -> None:
    _, out = finished_run
    mode = lambda p: p.stat().st_mode & 0o777  # noqa: E731
    assert mode(out / "model.safetensors") == 0o640
    assert mode(out / "config.json") == 0o640
    ckpt = next((out / "checkpoints").glob("step-*"))
    assert mode(ckpt) == 0o750
    assert mode(ckpt / "trainable.safetensors") == 0o640


def test_overwrite_refuses_a_file_it_did_not_write_then_removes_only_its_own(
        finished_run: tuple[Path, Path]) -> None:
    cfg, out = finished_run
    (out / "my-notes.md").write_text("mine")
    listed = set(json.loads((out / RUN_LIST).read_text())["written"])
    code, text = _distill(cfg, "--overwrite")
    assert code == 2 and f"{out / 'my-notes.md'}" in text and "entrenar did not write" in text, text
    assert (out / "my-notes.md").read_text() == "mine" and (out / "model.safetensors").is_file()
    assert set(json.loads((out / RUN_LIST).read_text())["written"]) == listed

    (out / "my-notes.md").unlink()
    stale = out / "checkpoints" / "step-000001"
    assert stale.is_dir()
    code, text = _distill(cfg, "--overwrite", "--set", "training.save_steps=5")
    assert code == 0, text
    assert not stale.exists()  # the earlier run's checkpoints went; no checkpoint in the new run
    assert (out / "model.safetensors").is_file()


def test_overwrite_refuses_a_directory_without_a_run_list(tiny_llama: Path, stdlib_text: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("mine")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(_yaml(tiny_llama, stdlib_text, out))
    code, text = _distill(cfg, "--overwrite")
    assert code == 2 and str(out / "thesis.tex") in text and "no record of an entrenar run" in text, text
    assert (out / "thesis.tex").read_text() == "mine"


@pytest.mark.parametrize("inside", ["dataset", "teacher", "config"])
def test_output_dir_holding_an_input_is_refused(inside: str, tiny_llama: Path, stdlib_text: Path,
                                                tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / RUN_LIST).write_text(json.dumps({"written": ["data", "teacher", "c.yaml"]}))  # a forged claim
    data, teacher, cfg = stdlib_text, tiny_llama, tmp_path / "c.yaml"
    if inside == "dataset":
        data = Path(shutil.copytree(stdlib_text, out / "data"))
    elif inside == "teacher":
        teacher = Path(shutil.copytree(tiny_llama, out / "teacher"))
    else:
        cfg = out / "c.yaml"
    cfg.write_text(_yaml(teacher, data, out))
    before = _tree(out)
    code, text = _distill(cfg, "--overwrite")
    what = {"dataset": "the dataset directory", "teacher": "the input model directory",
            "config": "the config file"}[inside]
    assert code == 2 and f"contains {what}" in text, text
    assert _tree(out) == before


def test_second_run_inside_the_first_runs_dataset_is_refused(tiny_llama: Path, stdlib_text: Path,
                                                             tmp_path: Path) -> None:
    data = Path(shutil.copytree(stdlib_text, tmp_path / "corpus"))
    _first_run(tiny_llama, f"{data}/**/*.py", tmp_path / "run1", tmp_path)
    cfg = tmp_path / "second.yaml"
    cfg.write_text(_yaml(tiny_llama, f"{data}/**/*.py", data / "run2"))
    code, text = _distill(cfg)
    assert code == 2 and "is inside the dataset directory" in text and "training data" in text, text
    assert not (data / "run2").exists()
    # a glob that cannot reach the output directory's files is fine: data/*.py never matches data/runs/x/*
    cfg.write_text(_yaml(tiny_llama, f"{data}/*.py", data / "runs" / "x"))
    code, text = _distill(cfg, "--dry-run")
    assert code == 0, text


def _make_unwritable(directory: Path) -> str:
    """Make ``directory`` unwritable for this process; returns how (root writes through 0555)."""
    if os.geteuid() != 0:
        directory.chmod(0o555)
        return "permission denied"
    if subprocess.run(["chattr", "+i", str(directory)], capture_output=True).returncode != 0:
        pytest.skip("running as root on a file system without chattr +i: cannot make a directory unwritable")
    return "operation not permitted"


def test_unwritable_output_dir_is_a_clear_usage_error(tiny_llama: Path, stdlib_text: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    how = _make_unwritable(out)
    try:
        cfg = tmp_path / "c.yaml"
        cfg.write_text(_yaml(tiny_llama, stdlib_text, out))
        code, text = _distill(cfg)
        assert code == 2 and f"output directory {out} is not writable ({how})" in text, text
        assert not (out / ".entrenar.lock").exists()  # writability is checked before the lock is opened
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(out)], check=True)
        out.chmod(0o755)


def test_read_only_mount_is_a_clear_usage_error(tiny_llama: Path, stdlib_text: Path, tmp_path: Path) -> None:
    mnt = tmp_path / "ro"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a read-only tmpfs needs root with mount rights")
    try:
        cfg = tmp_path / "c.yaml"
        cfg.write_text(_yaml(tiny_llama, stdlib_text, mnt / "out"))
        code, text = _distill(cfg)
        assert code == 2 and f"output directory {mnt / 'out'}" in text and "read-only file system" in text, text
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_output_dir_under_a_file_is_a_clear_usage_error(tiny_llama: Path, stdlib_text: Path, tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("x")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(_yaml(tiny_llama, stdlib_text, tmp_path / "a-file" / "out"))
    code, text = _distill(cfg)
    assert code == 2 and "a file is in the way" in text, text


def test_free_space_counts_every_checkpoint() -> None:
    from entrenar_cli.pipeline.common import disk_bytes_needed

    mib = 16 * 2**20
    # full training: 3 checkpoints on disk at the peak (2 kept + the one being written), 12 B/param each
    assert disk_bytes_needed(1000, 1000, 2) == 3 * 12_000 + 4_000 + mib
    # LoRA, merged: checkpoints hold only the adapter; the merged model and the adapter are saved
    assert disk_bytes_needed(1000, 10, 5, full_model=True, adapter=True) == 6 * 120 + 4_000 + 40 + mib
    assert disk_bytes_needed(1000, 10, 5, full_model=False, adapter=True) == 6 * 120 + 40 + mib


def test_free_space_check_refuses_before_training(tiny_llama: Path, stdlib_text: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from collections import namedtuple

    real = shutil.disk_usage
    usage = namedtuple("usage", "total used free")
    # 16.5 MiB free: the fixed 16 MiB allowance fits, three checkpoints of the ~0.1 M-parameter student do not
    monkeypatch.setattr(shutil, "disk_usage",
                        lambda p: usage(real(p).total, 0, 16 * 2**20 + 2**19))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(_yaml(tiny_llama, stdlib_text, tmp_path / "out", extra="  save_steps: 1\n"))
    code, text = _distill(cfg, "--set", "output.save_total_limit=3")
    assert code == 1 and "not enough disk space" in text and "16.50 MiB free" in text, text
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_disk_full_during_the_final_save_is_a_clear_runtime_error(tiny_llama: Path, stdlib_text: Path,
                                                                  tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import entrenar_cli.models as models

    def full(*_a: object, **_k: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / "model.safetensors"))

    monkeypatch.setattr(models, "save_model_files", full)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(_yaml(tiny_llama, stdlib_text, tmp_path / "out", steps=2, extra="  save_steps: 1\n"))
    code, text = _distill(cfg)
    assert code == 1, text
    assert f"could not write {tmp_path / 'out' / 'model.safetensors'}: No space left on device" in text, text
    assert "--resume" in text and "step-000001" in text, text


def test_file_size_limit_during_a_save_is_a_clear_runtime_error(tiny_llama: Path, stdlib_text: Path,
                                                                tmp_path: Path) -> None:
    """A real write failure (ulimit -f): safetensors' writer reports EFBIG as text; still one message."""
    import resource

    cfg = tmp_path / "c.yaml"
    out = tmp_path / "out"
    cfg.write_text(_yaml(tiny_llama, stdlib_text, out, steps=1))
    code, text = _distill(cfg, "--dry-run")  # tokenizes the data into the cache before the limit applies
    assert code == 0, text
    limit = 150 * 1024  # metrics and config fit; the ~400 KB model does not

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run([sys.executable, "-m", "entrenar_cli", "distill", str(cfg), "--quiet"],
                          capture_output=True, text=True, timeout=900, preexec_fn=cap)
    err = " ".join(proc.stderr.split())
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "could not write" in err and "File too large" in err and str(out) in err, err
    assert "unexpected failure" not in err and "Traceback" not in err
    assert not (out / "config.json").exists()  # no model that looks complete
