"""Which mixed precision ``training.mixed_precision: auto`` uses, and why.

On CUDA the answer is a property of the device (bf16 on Ampere or newer, fp16 with loss scaling
below). On a CPU it is not: a CPU can report native bf16 (``avx512_bf16``) and still run bf16 matmuls
at half its fp32 speed, so 'auto' there times a short probe -- an autocast linear layer forward and
backward at a small model's shapes, fp32 against bf16 -- and uses bf16 only where it measured faster.

The probe runs on one thread and counts that thread's CPU time, not wall time: the bf16/fp32 ratio
is a property of the cores, and CPU time is what other processes on a busy machine cannot inflate.
The result is cached per machine (CPU model and its avx512/amx flags) and torch version in
``<cache root>/precision.json``, so it runs once; a probe that could not get the CPU to itself
(wall time far above CPU time) decides the run but is not cached. ``ENTRENAR_CPU_BF16=1`` / ``=0``
forces the CPU choice either way (CI runs the suite both ways on whatever CPU it gets).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from entrenar_cli.errors import ConfigError

ENV_CPU_BF16 = "ENTRENAR_CPU_BF16"
CACHE_FILE = "precision.json"
CACHE_VERSION = 2
# bf16 must beat fp32 by this factor: below it, timing noise and the casts outside matmuls eat the gain
MIN_SPEEDUP = 1.1
# the probe's shapes: a block of 512 tokens through a 576 -> 1536 projection (SmolLM2-135M's MLP)
PROBE_SHAPE = (512, 576, 1536)
# wall time above this multiple of CPU time: the probe shared its core, so its result is not cached
CONTENDED = 2.0
# ... but kept this long, so that every process of one launch decides alike
PROVISIONAL_S = 600.0


@dataclass(frozen=True)
class PrecisionChoice:
    """The resolved precision ('fp32' | 'bf16' | 'fp16') and the reason printed next to it."""

    precision: str
    reason: str


@dataclass(frozen=True)
class ProbeResult:
    """Seconds per autocast linear forward+backward (best of the repetitions), fp32 and bf16."""

    fp32_s: float
    bf16_s: float
    contended: bool = False

    @property
    def speedup(self) -> float:
        return self.fp32_s / self.bf16_s if self.bf16_s > 0 else 0.0


def resolve_precision(requested: str, device: torch.device) -> str:
    """The precision to train in; see :func:`choose_precision` for the rule."""
    return choose_precision(requested, device).precision


def precision_dtype(precision: str) -> torch.dtype:
    """The autocast dtype of a resolved precision (fp32 -> float32: autocast off)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def choose_precision(requested: str, device: torch.device) -> PrecisionChoice:
    """An explicit setting is kept; 'auto' picks by device, and on a CPU by measured speed."""
    if requested != "auto":
        return PrecisionChoice(requested, f"{requested}: set by training.mixed_precision")
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return PrecisionChoice("bf16", "bf16: this GPU computes bf16 natively")
        return PrecisionChoice("fp16", "fp16 with loss scaling: this GPU has no native bf16")
    if device.type != "cpu":
        return PrecisionChoice("fp32", f"fp32: auto uses fp32 on {device.type}")
    forced = cpu_bf16_override()
    if forced is not None:
        return (PrecisionChoice("bf16", f"bf16: forced by {ENV_CPU_BF16}=1") if forced
                else PrecisionChoice("fp32", f"fp32: forced by {ENV_CPU_BF16}=0"))
    if not native_cpu_bf16():
        return PrecisionChoice("fp32", "fp32: no native bf16")
    speedup = cached_probe().speedup
    # two decimals near the threshold, so that '1.1x' never stands next to a choice of fp32
    shown = f"{speedup:.2f}" if abs(speedup - MIN_SPEEDUP) < 0.05 else f"{speedup:.1f}"
    if speedup >= MIN_SPEEDUP:
        return PrecisionChoice("bf16", f"bf16: measured {shown}x fp32 on this CPU")
    return PrecisionChoice("fp32", f"fp32: bf16 measured {shown}x fp32 on this CPU")


def cpu_bf16_override() -> bool | None:
    """``ENTRENAR_CPU_BF16``: '1' forces bf16 for 'auto' on a CPU, '0' forces fp32, unset/empty: measure."""
    value = os.environ.get(ENV_CPU_BF16, "").strip().lower()
    if not value:
        return None
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"environment variable {ENV_CPU_BF16}={os.environ[ENV_CPU_BF16]!r} is not 0 or 1",
                      hint=f"set {ENV_CPU_BF16}=1 (bf16 on CPU), =0 (fp32), or unset it to let a probe decide")


def native_cpu_bf16() -> bool:
    """Whether oneDNN has bf16 kernels for this CPU (without them bf16 is emulated, many times slower)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def machine_key() -> str:
    """What the measured ratio depends on: CPU model and flags, torch version (its kernels)."""
    model, flags = platform.processor() or platform.machine(), ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            name, _, value = line.partition(":")
            name = name.strip()
            if name == "model name" and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif name == "flags":
                flags = " ".join(sorted(f for f in value.split() if "avx512" in f or "amx" in f))
                break
    return f"{model} | {flags or '-'} | torch {torch.__version__}"


def cache_path() -> Path:
    from entrenar_cli.fsutil import cache_root

    return cache_root() / CACHE_FILE


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _time_linear(dtype: torch.dtype | None, x: torch.Tensor, layer: torch.nn.Linear) -> float:
    """CPU seconds of this thread for one forward+backward of ``layer`` (dtype None: plain fp32)."""
    t0 = time.thread_time()
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        y = layer(x)
    y.float().sum().backward()
    return time.thread_time() - t0


def probe(*, reps: int = 4, budget_s: float = 0.5) -> ProbeResult:
    """Time fp32 and bf16-autocast linear forward+backward on one thread, interleaved; best of ``reps``.

    One thread: torch then computes (forward and, on CPU, backward) on the calling thread, so its
    CPU time is the work itself. Interleaving and taking the minimum keep a burst of other work from
    deciding the result; ``budget_s`` (wall) bounds the run on a busy machine, at two timings each.
    """
    rows, d_in, d_out = PROBE_SHAPE
    gen = torch.Generator().manual_seed(0)
    dtypes = {"fp32": None, "bf16": torch.bfloat16}
    best = {"fp32": float("inf"), "bf16": float("inf")}
    cpu = 0.0
    with _one_thread(), torch.enable_grad():
        layer = torch.nn.Linear(d_in, d_out)
        x = torch.randn(rows, d_in, generator=gen, requires_grad=True)
        for dtype in dtypes.values():  # warm-up: kernel selection, weight-cast caches
            _time_linear(dtype, x, layer)
        start = time.perf_counter()
        for i in range(reps):
            for name, dtype in dtypes.items():
                t = _time_linear(dtype, x, layer)
                cpu += t
                best[name] = min(best[name], t)
            if i >= 1 and time.perf_counter() - start > budget_s:
                break
        wall = time.perf_counter() - start
    return ProbeResult(fp32_s=best["fp32"], bf16_s=best["bf16"], contended=wall > CONTENDED * cpu + 0.05)


_memo: dict[str, ProbeResult] = {}


def cached_probe(*, run: Callable[[], ProbeResult] | None = None) -> ProbeResult:
    """The probe's result for this machine: from this process, from the cache file, or measured now.

    Measured results are written to the cache file (atomically). A contended measurement is kept for
    :data:`PROVISIONAL_S` only (long enough for the other ranks of a torchrun launch to read it), then
    measured again. A cache that cannot be read or written only means the probe runs again next time
    (well under a second of CPU), never a failure.
    """
    key = machine_key()
    if key in _memo:
        return _memo[key]
    path = cache_path()
    # one process probes at a time (torchrun ranks start together): the others then read its result,
    # so every rank trains in the same precision and no probe is timed against another's
    with _locked(path.with_name(path.name + ".lock")):
        entries = _read_cache(path)
        result = _entry(entries.get(key))
        if result is None:
            result = (run or probe)()
            entries[key] = {"fp32_s": result.fp32_s, "bf16_s": result.bf16_s, "speedup": round(result.speedup, 3),
                            "contended": result.contended, "shape": list(PROBE_SHAPE), "measured_at": time.time()}
            _write_cache(path, entries)
    _memo[key] = result
    return result


def _entry(hit: Any) -> ProbeResult | None:
    if not isinstance(hit, dict):
        return None
    try:
        result = ProbeResult(fp32_s=float(hit["fp32_s"]), bf16_s=float(hit["bf16_s"]),
                             contended=bool(hit.get("contended", False)))
        age = time.time() - float(hit.get("measured_at", 0))
    except (KeyError, TypeError, ValueError):
        return None
    if not (0 < result.fp32_s < float("inf") and 0 < result.bf16_s < float("inf")):
        return None
    if result.contended and not 0 <= age < PROVISIONAL_S:
        return None
    return result


@contextlib.contextmanager
def _locked(lock: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``lock``; without one (no fcntl, unwritable cache) just go on."""
    try:
        import fcntl

        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    except (ImportError, OSError):
        yield
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or not isinstance(data.get("probes"), dict):
        return {}
    return dict(data["probes"])


def _write_cache(path: Path, entries: dict[str, Any]) -> None:
    from entrenar_cli.fsutil import write_json_atomic

    if path.exists() and not path.is_file():
        return  # something else sits at that name: leave it alone
    with contextlib.suppress(OSError):
        write_json_atomic(path, {"version": CACHE_VERSION, "probes": entries})
