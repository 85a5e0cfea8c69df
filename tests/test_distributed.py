"""Scale-out on a real engine: torchrun with 2 processes (gloo, CPU) matches one process with the
same global batch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def _cfg(path: Path, teacher: Path, data: Path, out: Path, batch: int) -> Path:
    path.write_text(
        f"teacher:\n  model_id: {teacher}\nstudent:\n  init_from_teacher: 2\n"
        f"training:\n  max_steps: 6\n  batch_size: {batch}\n  learning_rate: 3e-3\n  logging_steps: 1\n"
        f"  seed: 1\n  num_threads: 1\n  mixed_precision: fp32\n"  # fp32 tolerances below
        f"dataset:\n  path: {data}\n  max_length: 32\n  eval_fraction: 0.2\noutput:\n  dir: {out}\n")
    return path


def _losses(out: Path) -> list[tuple[int, float, float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["grad_norm"]) for r in rows if r["event"] == "train"]


def test_torchrun_two_processes_match_single_process(tiny_llama: Path, stdlib_text: Path, tmp_path: Path) -> None:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun is not installed next to this Python")
    one = tmp_path / "one"
    two = tmp_path / "two"
    proc = subprocess.run([sys.executable, "-m", "entrenar_cli", "distill",
                           str(_cfg(tmp_path / "one.yaml", tiny_llama, stdlib_text, one, 8)), "--quiet"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([torchrun, "--nproc-per-node", "2", "-m", "entrenar_cli", "distill",
                           str(_cfg(tmp_path / "two.yaml", tiny_llama, stdlib_text, two, 4)), "--quiet"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _losses(one), _losses(two)
    assert [s for s, _, _ in a] == [s for s, _, _ in b] == list(range(1, 7))
    for (_, la, ga), (_, lb, gb) in zip(a, b):
        assert lb == pytest.approx(la, rel=1e-4, abs=1e-6)  # global batch 8 either way
        assert gb == pytest.approx(ga, rel=1e-4)
    # one output, written by rank 0 only: one start and one end event, one model
    events = [json.loads(line)["event"] for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert events.count("start") == 1 and events.count("end") == 1
    assert (two / "model.safetensors").is_file() and proc.stdout.count("distillation completed") == 1
