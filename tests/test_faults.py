"""Faults: SIGTERM mid-run checkpoints and resumes to the same result; crash-safe checkpoints;
non-finite steps are skipped and then stop the run."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


def _yaml(teacher: Path, data: Path, out: Path, steps: int, extra: str = "") -> str:
    return (f"teacher:\n  model_id: {teacher}\nstudent:\n  init_from_teacher: 2\n"
            f"training:\n  max_steps: {steps}\n  batch_size: 4\n  learning_rate: 3e-3\n  logging_steps: 1\n  seed: 1\n{extra}"
            f"dataset:\n  path: {data}\n  max_length: 32\n  eval_fraction: 0.2\noutput:\n  dir: {out}\n")


def _entrenar(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "entrenar_cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_sigterm_checkpoints_and_resume_matches_uninterrupted(tiny_llama: Path, stdlib_text: Path, tmp_path: Path) -> None:
    from entrenar_cli.config import DistillationYamlConfig, validate_text
    from entrenar_cli.pipeline.common import RunOptions
    from entrenar_cli.pipeline.distill import run

    steps, pin = 16, "  mixed_precision: fp32\n"  # compared at fp32 tolerance ('auto' is bf16 on some CPUs)
    run(validate_text(_yaml(tiny_llama, stdlib_text, tmp_path / "a", steps, pin), DistillationYamlConfig, "a.yaml"),
        RunOptions(progress=False))

    cfg = tmp_path / "interrupted.yaml"
    out = tmp_path / "b"
    cfg.write_text(_yaml(tiny_llama, stdlib_text, out, steps, pin))
    proc = _entrenar("distill", str(cfg), "--quiet")
    deadline = time.time() + 300
    while time.time() < deadline:  # wait until training is under way, then interrupt it
        metrics = out / "metrics.jsonl"
        if metrics.exists() and sum('"train"' in l for l in metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=300)
    err = proc.stderr.read()
    assert code == 1, err[-2000:]
    assert "interrupted at step" in err and "--resume" in err and "Traceback" not in err
    ckpts = sorted((out / "checkpoints").glob("step-*"))
    assert ckpts and (ckpts[-1] / "trainer_state.json").is_file()
    stopped_at = json.loads((ckpts[-1] / "trainer_state.json").read_text())["step"]
    assert 3 <= stopped_at < steps

    proc = _entrenar("distill", str(cfg), "--quiet", "--resume")
    assert proc.wait(timeout=600) == 0, proc.stderr.read()[-2000:]
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)


def _latest_step(out: Path) -> int:
    from entrenar_cli.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(out)
    return int(ckpt.name.split("-")[1]) if ckpt else 0


def test_sigkill_at_random_moments_never_leaves_a_broken_checkpoint(tiny_llama: Path, stdlib_text: Path,
                                                                     tmp_path: Path) -> None:
    """kill -9 (no handler runs) while a checkpoint is written every step, three times, then resume."""
    from entrenar_cli.checkpoint import list_checkpoints, load_checkpoint

    cfg, out = tmp_path / "k.yaml", tmp_path / "k"
    cfg.write_text(_yaml(tiny_llama, stdlib_text, out, 30, extra="  save_steps: 1\n"))
    rng = random.Random(0)
    for attempt in range(3):
        before = _latest_step(out)
        proc = _entrenar("distill", str(cfg), "--quiet", *(["--resume"] if attempt else []))
        deadline = time.time() + 300
        while time.time() < deadline and _latest_step(out) < before + 2 and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.3))  # lands inside a checkpoint write or between two
        proc.kill()
        proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read()[-2000:]
        complete = list_checkpoints(out)
        assert complete and _latest_step(out) > before
        for ckpt in complete:  # everything that looks complete is complete
            trainable, _, _, state = load_checkpoint(ckpt)
            assert trainable and state["step"] == int(ckpt.name.split("-")[1])
    proc = _entrenar("distill", str(cfg), "--quiet", "--resume")
    assert proc.wait(timeout=600) == 0, proc.stderr.read()[-2000:]
    assert load_file(str(out / "model.safetensors"))
    assert json.loads((out / "summary.json").read_text())["steps"] == 30


def test_incomplete_checkpoint_is_ignored(tmp_path: Path) -> None:
    from entrenar_cli.checkpoint import latest_checkpoint

    root = tmp_path / "checkpoints"
    (root / "step-000010").mkdir(parents=True)
    (root / "step-000010" / "trainer_state.json").write_text("{}")
    (root / ".step-000020.abc.tmp").mkdir()  # a write killed before its rename
    (root / "step-000030").mkdir()  # no trainer_state.json: incomplete
    assert latest_checkpoint(tmp_path) == root / "step-000010"


def test_non_finite_steps_are_skipped_then_stop(tiny_llama: Path, stdlib_text: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from entrenar_cli.config import DistillationYamlConfig, validate_text
    from entrenar_cli.errors import TrainingError
    from entrenar_cli.pipeline.common import RunOptions
    from entrenar_cli.pipeline.distill import run

    # from step 3 on every gradient is NaN (as after an fp16 overflow): skipped, then the run stops
    text = _yaml(tiny_llama, stdlib_text, tmp_path / "nan", 20, "  max_bad_steps: 3\n")
    cfg = validate_text(text, DistillationYamlConfig, "t.yaml")
    import entrenar_cli.trainer as trainer

    original = trainer.Engine._optimizer_step

    def poisoned(self: trainer.Engine) -> float:
        if self.state.step >= 2:
            for p in self.model.parameters():
                if p.grad is not None:
                    p.grad.fill_(float("nan"))
        return original(self)

    monkeypatch.setattr(trainer.Engine, "_optimizer_step", poisoned)
    with pytest.raises(TrainingError, match="3 optimizer steps in a row had non-finite"):
        run(cfg, RunOptions(progress=False))
    metrics = [json.loads(l) for l in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if m["event"] == "train"] == [1, 2]  # skipped steps are not logged


def test_second_run_on_same_output_dir_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "shared-out"
    code = ("import sys, time\nfrom pathlib import Path\n"
            "from entrenar_cli.pipeline.common import prepare_output_dir, RunOptions\n"
            f"prepare_output_dir(Path({str(out)!r}), RunOptions())\nprint('locked', flush=True)\ntime.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        from entrenar_cli.errors import UsageError
        from entrenar_cli.pipeline.common import RunOptions, prepare_output_dir

        with pytest.raises(UsageError, match=r"in use by another entrenar run \(pid \d+\)"):
            prepare_output_dir(out, RunOptions(resume=True))
    finally:
        holder.kill()
        holder.wait()
    from entrenar_cli.pipeline.common import RunOptions, prepare_output_dir

    prepare_output_dir(out, RunOptions(resume=True))  # the lock died with its process


def test_not_enough_disk_space_is_refused_before_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil
    from collections import namedtuple

    from entrenar_cli.errors import EntrenarError
    from entrenar_cli.pipeline.common import check_free_space

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: usage(10**9, 10**9 - 5 * 2**20, 5 * 2**20))
    with pytest.raises(EntrenarError, match="not enough disk space.*5.00 MiB free"):
        check_free_space(tmp_path, 2**30)
    check_free_space(tmp_path, 2**20)
