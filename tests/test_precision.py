"""`training.mixed_precision: auto`: the CPU choice is measured (cached), overridable, and explained.

The probe's timing function is faked here: no test depends on how fast this CPU runs bf16.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from entrenar_cli import precision
from entrenar_cli.errors import ConfigError
from entrenar_cli.precision import ProbeResult, choose_precision

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _fresh(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No override, an empty cache root, no result remembered from another test, native bf16."""
    monkeypatch.delenv(precision.ENV_CPU_BF16, raising=False)
    monkeypatch.setenv("ENTRENAR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(precision, "_memo", {})
    monkeypatch.setattr(precision, "native_cpu_bf16", lambda: True)


def _fake_timings(monkeypatch: pytest.MonkeyPatch, fp32_s: float, bf16_s: float) -> list[torch.dtype | None]:
    """Replace the timed forward+backward with fixed durations; returns the log of calls."""
    calls: list[torch.dtype | None] = []

    def timed(dtype: torch.dtype | None, x: torch.Tensor, layer: torch.nn.Linear) -> float:
        calls.append(dtype)
        return bf16_s if dtype == torch.bfloat16 else fp32_s

    monkeypatch.setattr(precision, "_time_linear", timed)
    return calls


def test_bf16_where_measured_faster(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake_timings(monkeypatch, fp32_s=0.018, bf16_s=0.010)
    choice = choose_precision("auto", CPU)
    assert choice.precision == "bf16" and choice.reason == "bf16: measured 1.8x fp32 on this CPU"
    # 1 warm-up each, then interleaved repetitions of both
    assert calls.count(torch.bfloat16) == calls.count(None) == 5


def test_fp32_where_bf16_measured_slower(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_timings(monkeypatch, fp32_s=0.010, bf16_s=0.020)
    choice = choose_precision("auto", CPU)
    assert choice.precision == "fp32" and choice.reason == "fp32: bf16 measured 0.5x fp32 on this CPU"


def test_a_marginal_gain_is_not_worth_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_timings(monkeypatch, fp32_s=0.0108, bf16_s=0.010)
    assert choose_precision("auto", CPU) == precision.PrecisionChoice(
        "fp32", "fp32: bf16 measured 1.08x fp32 on this CPU")


def test_no_native_bf16_is_fp32_without_probing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "native_cpu_bf16", lambda: False)
    calls = _fake_timings(monkeypatch, fp32_s=0.02, bf16_s=0.01)
    assert choose_precision("auto", CPU) == precision.PrecisionChoice("fp32", "fp32: no native bf16")
    assert calls == [] and not precision.cache_path().exists()


@pytest.mark.parametrize(("value", "expected"), [("1", "bf16"), ("0", "fp32"), ("true", "bf16"), ("off", "fp32")])
def test_environment_override(monkeypatch: pytest.MonkeyPatch, value: str, expected: str) -> None:
    calls = _fake_timings(monkeypatch, fp32_s=0.01, bf16_s=0.02 if expected == "bf16" else 0.005)
    monkeypatch.setenv("ENTRENAR_CPU_BF16", value)
    choice = choose_precision("auto", CPU)
    assert choice.precision == expected and choice.reason.startswith(f"{expected}: forced by ENTRENAR_CPU_BF16=")
    assert calls == []  # forced: nothing measured
    # the override forces 'auto' only; an explicit setting is kept
    assert choose_precision("fp32", CPU).precision == "fp32" and choose_precision("bf16", CPU).precision == "bf16"


def test_environment_override_even_without_native_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "native_cpu_bf16", lambda: False)
    monkeypatch.setenv("ENTRENAR_CPU_BF16", "1")
    assert choose_precision("auto", CPU).precision == "bf16"


def test_bad_override_value_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENTRENAR_CPU_BF16", "maybe")
    with pytest.raises(ConfigError, match="ENTRENAR_CPU_BF16='maybe' is not 0 or 1") as info:
        choose_precision("auto", CPU)
    assert info.value.exit_code == 2


def test_result_is_cached_per_machine_and_reused(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake_timings(monkeypatch, fp32_s=0.02, bf16_s=0.01)
    first = choose_precision("auto", CPU)
    assert first.reason == "bf16: measured 2.0x fp32 on this CPU"
    data = json.loads(precision.cache_path().read_text())
    key = precision.machine_key()
    assert data["version"] == 2 and list(data["probes"]) == [key]
    assert data["probes"][key]["speedup"] == 2.0 and f"torch {torch.__version__}" in key

    # a new process (nothing remembered) reads the file instead of measuring again
    monkeypatch.setattr(precision, "_memo", {})
    n = len(calls)
    assert choose_precision("auto", CPU) == first
    assert len(calls) == n

    # another torch version (other kernels) is another measurement, kept next to the first
    monkeypatch.setattr(precision, "_memo", {})
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    _fake_timings(monkeypatch, fp32_s=0.01, bf16_s=0.02)
    assert choose_precision("auto", CPU).precision == "fp32"
    assert len(json.loads(precision.cache_path().read_text())["probes"]) == 2


def test_a_contended_measurement_is_kept_only_briefly(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    def busy(dtype: torch.dtype | None, x: torch.Tensor, layer: torch.nn.Linear) -> float:
        time.sleep(0.03)  # the wall clock runs while this thread waits for a core: no CPU time
        return 0.002 if dtype is None else 0.001

    monkeypatch.setattr(precision, "_time_linear", busy)
    assert precision.probe(reps=2).contended
    assert choose_precision("auto", CPU).precision == "bf16"
    entry = json.loads(precision.cache_path().read_text())["probes"][precision.machine_key()]
    assert entry["contended"] is True
    # within PROVISIONAL_S the other processes of the launch read it; after that it is measured again
    monkeypatch.setattr(precision, "_memo", {})
    calls = _fake_timings(monkeypatch, fp32_s=0.01, bf16_s=0.02)
    assert choose_precision("auto", CPU).precision == "bf16" and calls == []
    monkeypatch.setattr(precision, "_memo", {})
    monkeypatch.setattr(precision, "PROVISIONAL_S", 0.0)
    assert choose_precision("auto", CPU).precision == "fp32" and calls


def test_unreadable_or_unwritable_cache_only_means_measuring_again(monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path) -> None:
    calls = _fake_timings(monkeypatch, fp32_s=0.02, bf16_s=0.01)
    path = precision.cache_path()
    path.parent.mkdir(parents=True)
    path.write_text("{ not json")
    assert choose_precision("auto", CPU).precision == "bf16" and calls
    assert json.loads(path.read_text())["probes"]  # rewritten whole

    monkeypatch.setattr(precision, "_memo", {})
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("ENTRENAR_CACHE", str(blocker))
    assert choose_precision("auto", CPU).precision == "bf16"
    assert blocker.read_text() == "not a directory"


def test_cuda_keeps_bf16_on_ampere_and_fp16_below(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake_timings(monkeypatch, fp32_s=0.01, bf16_s=0.02)
    monkeypatch.setenv("ENTRENAR_CPU_BF16", "0")  # a CPU setting: no effect on a GPU
    gpu = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert choose_precision("auto", gpu).precision == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert choose_precision("auto", gpu) == precision.PrecisionChoice(
        "fp16", "fp16 with loss scaling: this GPU has no native bf16")
    assert calls == []


def test_real_probe_measures_both(monkeypatch: pytest.MonkeyPatch) -> None:
    threads = torch.get_num_threads()
    result = precision.probe(reps=2)
    assert 0 < result.fp32_s < 5 and 0 < result.bf16_s < 5 and result.speedup > 0
    assert torch.get_num_threads() == threads  # the one-thread probe leaves the setting as it was


def test_trainer_name_still_resolves(monkeypatch: pytest.MonkeyPatch) -> None:
    from entrenar_cli.trainer import precision_dtype, resolve_precision

    monkeypatch.setattr(precision, "cached_probe", lambda **k: ProbeResult(0.01, 0.02))
    assert resolve_precision("auto", CPU) == "fp32" and precision_dtype("bf16") == torch.bfloat16


def test_plan_line_says_why(tiny_llama: Path, stdlib_text: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                            capsys: pytest.CaptureFixture[str]) -> None:
    from entrenar_cli.config import DistillationYamlConfig, validate_text
    from entrenar_cli.pipeline.common import RunOptions
    from entrenar_cli.pipeline.distill import run

    _fake_timings(monkeypatch, fp32_s=0.01, bf16_s=0.02)
    cfg = validate_text(f"teacher:\n  model_id: {tiny_llama}\nstudent:\n  init_from_teacher: 2\n"
                        f"dataset:\n  path: {stdlib_text}\n  max_length: 32\noutput:\n  dir: {tmp_path / 'o'}\n",
                        DistillationYamlConfig, "t.yaml")
    result = run(cfg, RunOptions(dry_run=True, progress=False))  # type: ignore[arg-type]
    assert result["plan"]["precision"] == "fp32"
    assert result["plan"]["precision_reason"] == "fp32: bf16 measured 0.5x fp32 on this CPU"
    assert "precision fp32: bf16 measured 0.5x fp32 on this CPU" in capsys.readouterr().out


def test_lora_adapters_and_optimizer_state_stay_fp32_under_bf16(tiny_llama: Path, stdlib_text: Path,
                                                                 tmp_path: Path) -> None:
    """bf16 is the compute precision only: an update below bf16's resolution still lands in the adapter."""
    from entrenar_cli.config import FineTuneYamlConfig, validate_text
    from entrenar_cli.objectives import LMObjective
    from entrenar_cli.pipeline.finetune import setup
    from entrenar_cli.trainer import Engine, EngineOptions

    cfg = validate_text(f"model:\n  model_id: {tiny_llama}\nmethod: lora\n"
                        "lora:\n  rank: 8\n  alpha: 16\n  dropout: 0.0\n  target_modules: all-linear\n"
                        "training:\n  max_steps: 2\n  batch_size: 4\n  learning_rate: 1e-4\n  mixed_precision: bf16\n"
                        f"  max_grad_norm: null\n  lr_scheduler: constant\n"
                        f"dataset:\n  path: {stdlib_text}\n  max_length: 32\n  eval_fraction: 0.2\n"
                        f"output:\n  dir: {tmp_path / 'o'}\n", FineTuneYamlConfig, "ft.yaml")
    su = setup(cfg)  # type: ignore[arg-type]
    engine = Engine(cfg.training, su.model, LMObjective(su.task), su.train_blocks, su.eval_blocks,
                    EngineOptions(output_dir=tmp_path / "o", run="finetune", progress=False), pad_token_id=0)
    assert engine.autocast_dtype == torch.bfloat16
    trainable = {n: p for n, p in engine.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    engine._run_step()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainable.values())
    engine._optimizer_step()  # B starts at zero, so only B moves now (A's gradient is B^T...)
    assert all(bool(trainable[n].abs().max() > 0) for n in trainable if "lora_B" in n)
    before = {n: p.detach().clone() for n, p in trainable.items()}
    engine._run_step()
    engine._optimizer_step()
    assert {p.dtype for p in trainable.values()} == {torch.float32}
    state = [v for s in engine.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim()]
    assert len(state) == 2 * len(trainable) and {v.dtype for v in state} == {torch.float32}
    a_names = [n for n in trainable if "lora_A" in n]
    total = sum(trainable[n].numel() for n in a_names)
    moved = sum(int((trainable[n] != before[n]).sum()) for n in a_names)
    # Adam moves each weight by about lr = 1e-4, under bf16's resolution at these magnitudes (A ~ 0.06):
    # stored in bf16, most of these updates would round away
    lost_in_bf16 = sum(int((trainable[n].detach().bfloat16() == before[n].bfloat16()).sum()) for n in a_names)
    assert moved > 0.9 * total and lost_in_bf16 > 0.5 * total, (moved, lost_in_bf16, total)
