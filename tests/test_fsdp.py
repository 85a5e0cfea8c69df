"""Sharded training (FSDP2) on a real engine: torchrun with 2 CPU processes (gloo).

The sharded run matches one process with the same global batch (losses and gradient norms to 1e-4,
the gathered model to 1e-4, loaded by transformers); a run killed with SIGKILL and resumed from its
sharded checkpoint equals the straight run (both keep a weight average, ``training.ema_decay``, which is what
they save); a LoRA student under sharding saves an adapter peft loads.
All at fp32 (``training.mixed_precision: fp32``) so the tolerances mean something.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_distributed import _losses

STEPS = 30
# the kill lands after this step's checkpoint, late enough that the weight average still remembers the
# steps before it (its warm-up forgets the first ones: a run resumed at step 3 would pass unrestored)
KILL_AFTER = 24
# the module's runs keep a weight average: the saved model is the average of the shards' weights, and a
# resumed run restores it from the sharded checkpoint (without one, the resumed average would differ)
_EMA = "  ema_decay: 0.8\n"


def _torchrun() -> str:
    path = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if path is None:
        pytest.skip("torchrun is not installed next to this Python")
    return path


def _cfg(path: Path, teacher: Path, data: Path, out: Path, *, batch: int, accumulation: int = 1,
         sharding: str = "none", extra: str = "", student: str = "", steps: int = STEPS) -> Path:
    path.write_text(
        f"teacher:\n  model_id: {teacher}\nstudent:\n  init_from_teacher: 2\n{student}"
        f"training:\n  max_steps: {steps}\n  batch_size: {batch}\n  gradient_accumulation: {accumulation}\n"
        f"  learning_rate: 3e-3\n  logging_steps: 1\n  seed: 1\n  num_threads: 1\n  mixed_precision: fp32\n"
        f"  max_grad_norm: 0.5\n  sharding: {sharding}\n{extra}"  # 0.5: clipping acts on most steps
        f"dataset:\n  path: {data}\n  max_length: 32\n  eval_fraction: 0.2\noutput:\n  dir: {out}\n")
    return path


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "ENTRENAR_CPU_BF16": "0"}


def _two(cfg: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*_launch(), str(cfg), "--quiet", *extra], capture_output=True, text=True, timeout=600,
                          env=_env())


def _launch() -> list[str]:
    # --standalone: a free rendezvous port, so runs of other tests on the machine cannot collide
    return [_torchrun(), "--standalone", "--nproc-per-node", "2", "-m", "entrenar_cli", "distill"]


def _descendants(pid: int) -> list[int]:
    """Child processes of ``pid``, recursively (Linux /proc)."""
    try:
        children = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
    return [d for c in children for d in (c, *_descendants(c))]


def _weights(directory: Path) -> dict[str, object]:
    from safetensors.torch import load_file

    return load_file(str(directory / "model.safetensors"))


@pytest.fixture(scope="module")
def runs(tiny_llama: Path, stdlib_text: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One process, batch 8 (reference); two sharded processes, batch 2 x accumulation 2 each (same
    global batch 8), checkpointing every 3 steps."""
    tmp = tmp_path_factory.mktemp("fsdp")
    one, two = tmp / "one", tmp / "two"
    proc = subprocess.run([sys.executable, "-m", "entrenar_cli", "distill",
                           str(_cfg(tmp / "one.yaml", tiny_llama, stdlib_text, one, batch=8, extra=_EMA)), "--quiet"],
                          capture_output=True, text=True, timeout=600, env=_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = _two(_cfg(tmp / "two.yaml", tiny_llama, stdlib_text, two, batch=2, accumulation=2, sharding="fsdp",
                     extra="  save_steps: 3\n" + _EMA))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"one": one, "two": two, "tmp": tmp}


def test_sharded_run_matches_single_process_and_gathers_the_model(runs: dict[str, Path]) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    a, b = _losses(runs["one"]), _losses(runs["two"])
    assert [s for s, _, _ in a] == [s for s, _, _ in b] == list(range(1, STEPS + 1))
    for (_, la, ga), (_, lb, gb) in zip(a, b):
        assert lb == pytest.approx(la, rel=1e-4, abs=1e-6)
        assert gb == pytest.approx(ga, rel=1e-4)
    # one output written by rank 0; checkpoints in the sharded format (SafeTensors shards, no pickle)
    events = [json.loads(line)["event"] for line in (runs["two"] / "metrics.jsonl").read_text().splitlines()]
    assert events.count("start") == 1 and events.count("end") == 1
    ckpt = sorted((runs["two"] / "checkpoints").glob("step-*"))[-1]
    assert sorted(p.suffix for p in (ckpt / "shards").iterdir()) == [".safetensors", ".safetensors"]
    assert not list(ckpt.rglob("*.metadata")) and not list(ckpt.rglob("*.distcp")) and not list(ckpt.rglob("*.pt"))
    # the gathered model: full shapes, the usual architecture name, equal to the 1-process model
    model = AutoModelForCausalLM.from_pretrained(runs["two"])
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.architectures == ["LlamaForCausalLM"]
    ref, got = _weights(runs["one"]), _weights(runs["two"])
    assert sorted(ref) == sorted(got)
    for k in ref:
        assert got[k].shape == ref[k].shape
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-4)
    state = model.state_dict()
    for k, v in got.items():
        assert torch.equal(state[k], v)


def test_sharded_kill_and_resume_equals_straight_run(runs: dict[str, Path], tiny_llama: Path,
                                                     stdlib_text: Path) -> None:
    import torch

    out = runs["tmp"] / "killed"
    cfg = _cfg(runs["tmp"] / "killed.yaml", tiny_llama, stdlib_text, out, batch=2, accumulation=2,
               sharding="fsdp", extra="  save_steps: 3\n" + _EMA)
    proc = subprocess.Popen([*_launch(), str(cfg), "--quiet"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=_env())
    deadline, mark = time.monotonic() + 300, out / "checkpoints" / f"step-{KILL_AFTER:06d}"
    while not mark.is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    for pid in [*_descendants(proc.pid), proc.pid]:  # both ranks (torchrun starts each in its own session)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)  # no handler runs
    proc.wait()
    killed_at = max(json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
                    if json.loads(line)["event"] == "train")
    assert killed_at < STEPS, "the run finished before the kill: nothing was resumed"
    resumed = _two(cfg, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step" in resumed.stderr
    straight = {s: (loss, g) for s, loss, g in _losses(runs["two"])}
    after = [(s, loss, g) for s, loss, g in _losses(out)][-(STEPS - KILL_AFTER):]
    assert after[-1][0] == STEPS
    for s, loss, g in after:  # every step after the resume point equals the straight run's
        assert loss == pytest.approx(straight[s][0], rel=1e-6, abs=1e-7)
        assert g == pytest.approx(straight[s][1], rel=1e-6)
    ref, got = _weights(runs["two"]), _weights(out)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-6, atol=1e-6)


def test_sharded_lora_student_saves_an_adapter_peft_loads(tiny_llama: Path, stdlib_text: Path,
                                                          tmp_path: Path) -> None:
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    cfg = _cfg(tmp_path / "lora.yaml", tiny_llama, stdlib_text, out, batch=2, sharding="fsdp", steps=3,
               student="  lora:\n    rank: 4\n    alpha: 8\n    target_modules: all-linear\n")
    proc = _two(cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    a_key = next(k for k in adapter if "q_proj.lora_A" in k)
    b_key = next(k for k in adapter if "q_proj.lora_B" in k)
    assert adapter[a_key].shape == (4, 64)  # whole matrices, not one process's shard
    assert adapter[b_key].abs().max() > 0  # lora_B starts at zero: it trained
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out), out / "adapter")
    loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(adapter)
    name = next(k for k in loaded if "layers.0.self_attn.q_proj.lora_B" in k)
    torch.testing.assert_close(loaded[name], adapter[b_key])


# ---- refusals, the plan and the estimator: one process, no torchrun --------------------------------


def test_deepspeed_and_unsupported_combinations_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from entrenar_cli import sharding
    from entrenar_cli.errors import EXIT_USAGE, ConfigError

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ConfigError, match="DeepSpeed") as exc:
        sharding.requested_sharding(SimpleNamespace(sharding="none"))
    assert exc.value.exit_code == EXIT_USAGE
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    assert sharding.requested_sharding(SimpleNamespace(sharding="none")) == "none"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # accelerate launch --config_file fsdp.yaml
    assert sharding.requested_sharding(SimpleNamespace(sharding="none")) == "fsdp"
    import torch

    with pytest.raises(ConfigError, match="compile"):
        sharding.check_supported(SimpleNamespace(compile=True), torch.nn.Linear(2, 2))


def test_sharded_plan_prints_per_device_memory(tiny_llama: Path, stdlib_text: Path, tmp_path: Path) -> None:
    cfg = _cfg(tmp_path / "plan.yaml", tiny_llama, stdlib_text, tmp_path / "out", batch=2, sharding="fsdp")
    proc = subprocess.run([sys.executable, "-m", "entrenar_cli", "distill", str(cfg), "--dry-run"],
                          capture_output=True, text=True, timeout=600, env=_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout + proc.stderr
    assert "per device (1 process, FSDP)" in text
    assert "full logits: the student is sharded (FSDP)" in text


def test_estimate_per_device_under_fsdp() -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "entrenar_cli", "estimate", "llama3", "8b", "--teacher",
                               "llama:70b", "--seq-len", "2048", "--gradient-checkpointing", *args],
                              capture_output=True, text=True, timeout=120)

    proc = run("--method", "full", "--devices", "8", "--sharding", "fsdp", "--fits", "80GiB", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    total = doc["training"]["full"]["total_bytes"]
    dev = doc["devices"]["per_device"]["full"]
    # state divided by 8, activations and logits not: well under a quarter, above an eighth
    assert total / 8 < dev["per_device_bytes"] < total / 4
    assert doc["fits"]["methods"]["full"]["fits"] and doc["fits"]["methods"]["full"]["max_batch_size"] >= 1
    ddp = json.loads(run("--method", "full", "--devices", "8", "--json").stdout)
    assert ddp["devices"]["per_device"]["full"]["per_device_bytes"] == ddp["training"]["full"]["total_bytes"]
    bad = run("--sharding", "zero3")
    assert bad.returncode == 2 and "--sharding must be one of none, fsdp" in bad.stderr
    assert run("--method", "qlora", "--sharding", "fsdp").returncode == 2
