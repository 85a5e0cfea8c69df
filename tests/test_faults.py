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
            f"training:\n  max_steps: {steps}\n  batch_size: 4\n  learning_rate: 3e-3\n"
            f"  logging_steps: 1\n  seed: 1\n{extra}"
            f"dataset:\n  path: {data}\n  max_length: 32\n  eval_fraction: 0.2\noutput:\n  dir: {out}\n")


def _entrenar(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "entrenar_cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_sigterm_checkpoints_and_resume_matches_uninterrupted(tiny_llama: Path, stdlib_text: Path,
                                                              tmp_path: Path) -> None:
    from entrenar_cli.config import DistillationYamlConfig, validate_text
    from entrenar_cli.pipeline.common import RunOptions
    from entrenar_cli.pipeline.distill import run

    # compared at fp32 tolerance ('auto' is bf16 on some CPUs); 60 steps so that a fast CPU cannot finish
    # the run between the third logged step and the signal (one epoch is 98 steps)
    steps, pin = 60, "  mixed_precision: fp32\n"
    run(validate_text(_yaml(tiny_llama, stdlib_text, tmp_path / "a", steps, pin), DistillationYamlConfig, "a.yaml"),
        RunOptions(progress=False))

    cfg = tmp_path / "interrupted.yaml"
    out = tmp_path / "b"
    cfg.write_text(_yaml(tiny_llama, stdlib_text, out, steps, pin))
    proc = _entrenar("distill", str(cfg), "--quiet")
    deadline = time.time() + 300
    while time.time() < deadline:  # wait until training is under way, then interrupt it
        metrics = out / "metrics.jsonl"
        if metrics.exists() and sum('"train"' in ln for ln in metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.02)
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
    code = proc.wait(timeout=600)
    err = " ".join(proc.stderr.read().split())
    assert code == 0, err[-2000:]
    assert f"resumed from step {stopped_at} of {steps}, checkpoint {ckpts[-1]}" in err, err[-2000:]
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)
    # the metrics before training, measured by the interrupted run, survive the resume
    before = json.loads((tmp_path / "a" / "summary.json").read_text())["student_before"]
    kept = json.loads((out / "summary.json").read_text())["student_before"]
    assert before["perplexity"] > 1 and kept.keys() == before.keys()
    assert kept == pytest.approx(before, rel=1e-5)


def _latest_step(out: Path) -> int:
    from entrenar_cli.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(out)
    return int(ckpt.name.split("-")[1]) if ckpt else 0


def test_sigkill_at_random_moments_never_leaves_a_broken_checkpoint(tiny_llama: Path, stdlib_text: Path,
                                                                     tmp_path: Path) -> None:
    """kill -9 (no handler runs) while a checkpoint is written every step, three times, then resume."""
    from entrenar_cli.checkpoint import list_checkpoints, load_checkpoint

    cfg, out = tmp_path / "k.yaml", tmp_path / "k"
    # 90 steps (one epoch is 98): three kills, each ~0.3 s after two new checkpoints, cannot reach the end
    cfg.write_text(_yaml(tiny_llama, stdlib_text, out, 90, extra="  save_steps: 1\n"))
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
    assert json.loads((out / "summary.json").read_text())["steps"] == 90


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
    metrics = [json.loads(ln) for ln in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()]
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


class _Stderr:
    """Collects a child's stderr on a thread, so a test can wait for a line while the child runs."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        import threading

        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            self.lines.append(line)

    def wait_for(self, text: str, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if any(text in line for line in self.lines):
                return
            time.sleep(0.05)
        raise AssertionError(f"{text!r} never appeared:\n" + "".join(self.lines)[-3000:])

    def text(self) -> str:
        self._thread.join(timeout=60)
        return "".join(self.lines)


def _entrenar_paused(*args: str) -> subprocess.Popen[str]:
    """entrenar with the test-only pause before the final save and before an interrupt checkpoint."""
    import os

    env = {**os.environ, "ENTRENAR_TEST_PAUSE_BEFORE_SAVE": "3"}
    return subprocess.Popen([sys.executable, "-m", "entrenar_cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def test_sigterm_after_the_last_step_still_saves_the_model(tiny_llama: Path, stdlib_text: Path,
                                                            tmp_path: Path) -> None:
    """The window that used to lose a finished run: after the final evaluation, before the model is on disk."""
    cfg, out = tmp_path / "t.yaml", tmp_path / "t"
    cfg.write_text(_yaml(tiny_llama, stdlib_text, out, 4))
    proc = _entrenar_paused("distill", str(cfg), "--quiet")
    err = _Stderr(proc)
    err.wait_for("test pause before the final save")
    assert not (out / "model.safetensors").exists()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=300)
    text = " ".join(err.text().split())
    assert code == 0, text[-2000:]
    assert "SIGTERM received after the last training step: the model and summary were saved anyway" in text, text
    assert "Traceback" not in text
    weights = load_file(str(out / "model.safetensors"))
    assert weights and (out / "config.json").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 4


def test_repeated_ctrl_c_still_writes_the_checkpoint(tiny_llama: Path, stdlib_text: Path, tmp_path: Path) -> None:
    """Ctrl-C, then Ctrl-C three more times while the interrupt checkpoint is being written."""
    cfg, out = tmp_path / "c.yaml", tmp_path / "c"
    cfg.write_text(_yaml(tiny_llama, stdlib_text, out, 200))
    proc = _entrenar_paused("distill", str(cfg), "--quiet")
    err = _Stderr(proc)
    deadline = time.time() + 300
    while time.time() < deadline:
        metrics = out / "metrics.jsonl"
        if metrics.exists() and sum('"train"' in ln for ln in metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    err.wait_for("test pause before the interrupt checkpoint")
    for _ in range(3):
        proc.send_signal(signal.SIGINT)
        time.sleep(0.05)
    code = proc.wait(timeout=300)
    text = err.text()
    assert code == 1, text[-2000:]
    assert "interrupted at step" in text and "--resume" in text, text[-2000:]
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]
    from entrenar_cli.checkpoint import latest_checkpoint, load_checkpoint

    ckpt = latest_checkpoint(out)
    assert ckpt is not None
    trainable, _, _, state = load_checkpoint(ckpt)
    assert trainable and 2 <= state["step"] < 200
    assert f"interrupted at step {state['step']} of 98:" in " ".join(text.split())  # 392 blocks / batch 4
