"""Honesty check: train small llama-style models on this CPU and compare peak memory with the estimate.

For each case a fresh Python process:

1. imports torch/transformers/peft and runs two training steps of a tiny model through the same
   code path (so lazily initialised kernels, thread pools and caches belong to the baseline);
2. resets the kernel's peak-RSS counter (``/proc/self/clear_refs`` = 5) and reads VmRSS: the baseline;
3. builds the model (random weights from a config; QLoRA: bitsandbytes NF4 from a saved copy),
   runs ``--steps`` optimizer steps of a plain loop (forward with labels, backward, drop the
   outputs, AdamW step, ``zero_grad(set_to_none=True)``), and reads VmHWM, the kernel's peak RSS;
4. reports peak - baseline: everything the run itself added, weights included.

The parent computes :func:`entrenar_cli.estimate.estimate_training` for the same configuration
(``device="cpu"``) and prints estimate / measured. A case passes within +-25%.

Allocator note. glibc keeps freed blocks below its (self-raising, up to 32 MiB) mmap threshold in
its heap, so with default settings RSS is a high-water mark of *cached* memory, not of memory in
use: on these small models it runs 1.15-1.3x above the memory in use. The gated measurement runs
the child with ``MALLOC_MMAP_THRESHOLD_=65536``: every block of 64 KiB or more is mapped on its
own and returned to the kernel when freed, so RSS follows the memory the run actually holds
(this is CPU's analogue of reading ``torch.cuda.max_memory_allocated`` rather than what the
caching allocator reserved). ``--default-malloc`` adds the unmodified measurement as a second,
ungated column so the allocator's share stays visible.

Usage:
    python bench/estimate_vs_measured.py            # the standard cases (a few minutes on 2 cores)
    python bench/estimate_vs_measured.py --quick    # the small cases the test suite runs
    python bench/estimate_vs_measured.py --json --default-malloc
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TOLERANCE = 0.25  # the estimate must be within 25% of the measurement
GATE_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}

# hidden 512, 6 layers, vocab 16k: ~35M parameters, big enough that activations, logits and
# optimizer state all matter and none of them is noise
STANDARD_MODEL = {"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 6,
                  "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 16000}
QUICK_MODEL = {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
               "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 8000}

STANDARD_CASES: list[dict[str, Any]] = [
    {"name": "full fp32", "method": "full", "dtype": "fp32", "batch_size": 4, "seq_len": 256},
    {"name": "lora fp32", "method": "lora", "dtype": "fp32", "batch_size": 4, "seq_len": 256},
    {"name": "full bf16 autocast", "method": "full", "dtype": "bf16", "batch_size": 4, "seq_len": 256},
    {"name": "lora bf16, all-linear", "method": "lora", "dtype": "bf16", "batch_size": 4, "seq_len": 256,
     "target_modules": "all-linear"},
    {"name": "lora fp32, checkpointing", "method": "lora", "dtype": "fp32", "batch_size": 4, "seq_len": 256,
     "gradient_checkpointing": True},
    {"name": "full fp32, eager", "method": "full", "dtype": "fp32", "batch_size": 2, "seq_len": 256,
     "attention": "eager"},
    {"name": "qlora bf16 (NF4)", "method": "qlora", "dtype": "bf16", "batch_size": 4, "seq_len": 256},
]
QUICK_CASES: list[dict[str, Any]] = [
    {"name": "full fp32", "method": "full", "dtype": "fp32", "batch_size": 4, "seq_len": 128},
    {"name": "lora fp32", "method": "lora", "dtype": "fp32", "batch_size": 4, "seq_len": 128},
]


def model_config(shape: dict[str, Any]) -> dict[str, Any]:
    """A llama config.json dict (untied head, as Llama-2) with the given shape."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, **shape}


def case_settings(case: dict[str, Any]) -> dict[str, Any]:
    """The estimate_training keyword arguments of a case (LoRA: r=16, dropout 0.05, entrenar's default)."""
    return {
        "method": case["method"],
        "dtype": case["dtype"],
        "batch_size": case["batch_size"],
        "seq_len": case["seq_len"],
        "rank": case.get("rank", 16),
        "target_modules": case.get("target_modules"),
        "lora_dropout": case.get("lora_dropout", 0.05),
        "gradient_checkpointing": case.get("gradient_checkpointing", False),
        "attention": case.get("attention", "sdpa"),
        "device": "cpu",
    }


# ----------------------------------------------------------------------------------------------
# child process: measure one case


def _status_bytes(key: str) -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def build_model(case: dict[str, Any], cfg: dict[str, Any], workdir: str) -> Any:
    """The model a case trains: random weights from ``cfg``; LoRA via peft; QLoRA via bitsandbytes NF4."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    s = case_settings(case)
    hf_cfg = AutoConfig.for_model(**cfg)
    attn = s["attention"]
    if s["method"] == "qlora":
        from transformers import BitsAndBytesConfig

        path = os.path.join(workdir, f"m{cfg['hidden_size']}")
        if not os.path.isdir(path):
            AutoModelForCausalLM.from_config(hf_cfg).save_pretrained(path)
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb, dtype=torch.bfloat16,
                                                     device_map="cpu", attn_implementation=attn)
    else:
        half = s["method"] == "lora" and s["dtype"] == "bf16"  # LoRA bf16: the frozen base in bf16
        model = AutoModelForCausalLM.from_config(hf_cfg, attn_implementation=attn,
                                                 dtype=torch.bfloat16 if half else torch.float32)
    if s["gradient_checkpointing"]:
        model.gradient_checkpointing_enable()
    if s["method"] in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model

        from entrenar_cli.lora_defaults import resolve_targets

        targets = resolve_targets(s["target_modules"], model.config.model_type)  # what a LoRA run trains
        model = get_peft_model(model, LoraConfig(r=s["rank"], lora_alpha=2 * s["rank"],
                                                 lora_dropout=s["lora_dropout"], target_modules=targets))
        if s["gradient_checkpointing"]:
            model.enable_input_require_grads()
    model.train()
    return model


def train_steps(model: Any, case: dict[str, Any], steps: int, vocab: int, batch: int | None = None,
                seq: int | None = None) -> None:
    """A plain loop: forward with labels, backward, drop the outputs, AdamW step, zero_grad(set_to_none)."""
    import torch

    s = case_settings(case)
    batch = batch or s["batch_size"]
    seq = seq or s["seq_len"]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    autocast = s["method"] == "full" and s["dtype"] == "bf16"  # fp32 master weights + bf16 autocast
    for _ in range(steps):
        ids = torch.randint(0, vocab, (batch, seq))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        del out  # a trainer drops the outputs before stepping
        opt.step()
        opt.zero_grad(set_to_none=True)


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    import gc

    import torch

    torch.set_num_threads(int(spec.get("threads", 2)))
    torch.manual_seed(0)
    case, config = spec["case"], spec["config"]
    with tempfile.TemporaryDirectory() as workdir:
        tiny = {**config, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
                "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256}
        warm = build_model(case, tiny, workdir)
        train_steps(warm, case, 2, 256, batch=2, seq=16)
        del warm
        gc.collect()
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
                fh.write("5")  # reset VmHWM to the current RSS
            reset = True
        except OSError:
            reset = False
        baseline = _status_bytes("VmRSS")
        baseline_hwm = _status_bytes("VmHWM")
        t0 = time.perf_counter()
        model = build_model(case, config, workdir)
        after_build = _status_bytes("VmRSS")
        train_steps(model, case, spec["steps"], config["vocab_size"])
        peak = _status_bytes("VmHWM")
    if not reset and baseline_hwm > baseline:
        raise RuntimeError("cannot reset the peak-RSS counter; the measurement would include start-up")
    return {
        "baseline_bytes": baseline,
        "model_bytes": after_build - baseline,
        "measured_bytes": peak - baseline,
        "seconds": round(time.perf_counter() - t0, 2),
    }


def live_tensor_peak(case: dict[str, Any], config: dict[str, Any], steps: int = 2) -> int:
    """Peak bytes of live CPU tensors (parameters and buffers included) over ``steps`` training steps.

    Allocator-independent and in-process: a ``TorchDispatchMode`` registers every tensor storage an
    operator returns and a weak reference notices when it is freed. Slower than a plain run; used
    to check the activation model tensor by tensor, where RSS would add allocator noise.
    """
    import torch
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as workdir:
        model = build_model(case, config, workdir)
    resident = {t.untyped_storage()._cdata: t.untyped_storage().nbytes()
                for t in list(model.parameters()) + list(model.buffers())}
    state = {"cur": 0, "peak": 0}
    refs: dict[int, tuple[Any, int]] = {}

    class Tracker(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            out = func(*args, **(kwargs or {}))
            for key in [k for k, (ref, _) in refs.items() if ref.expired()]:
                state["cur"] -= refs.pop(key)[1]
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                    st = t.untyped_storage()
                    if st._cdata not in refs and st._cdata not in resident:
                        refs[st._cdata] = (StorageWeakRef(st), st.nbytes())
                        state["cur"] += st.nbytes()
            state["peak"] = max(state["peak"], state["cur"])
            return out

    with Tracker():
        train_steps(model, case, steps, config["vocab_size"])
    return state["peak"] + sum(resident.values())


# ----------------------------------------------------------------------------------------------
# parent: run the cases, compare


def measure(case: dict[str, Any], config: dict[str, Any], *, steps: int, default_malloc: bool = False,
            threads: int = 2, timeout: float = 900) -> dict[str, Any]:
    """Run one case in a fresh interpreter; return the child's measurements."""
    env = dict(os.environ)
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if not default_malloc:
        env.update(GATE_ENV)
    env["OMP_NUM_THREADS"] = str(threads)
    env["TOKENIZERS_PARALLELISM"] = "false"
    spec = {"case": case, "config": config, "steps": steps, "threads": threads}
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                          text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"case {case['name']!r} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_cases(cases: list[dict[str, Any]], shape: dict[str, Any], *, steps: int = 3,
              default_malloc: bool = False, jobs: int = 1) -> list[dict[str, Any]]:
    """Estimate and measure every case; each result carries ratio = estimate / measured and ok.

    ``jobs`` > 1 measures cases in parallel processes (one thread each): peak RSS is per process,
    so the numbers do not mix; only the wall time changes.
    """
    from concurrent.futures import ThreadPoolExecutor

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from entrenar_cli.estimate import estimate_training

    config = model_config(shape)
    threads = 2 if jobs == 1 else 1
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        measured = list(pool.map(lambda c: measure(c, config, steps=steps, threads=threads), cases))
    results = []
    for case, got in zip(cases, measured):
        est = estimate_training(config, **case_settings(case))
        row = {
            "name": case["name"],
            "settings": case_settings(case),
            "estimate_bytes": est.total_bytes,
            "measured_bytes": got["measured_bytes"],
            "ratio": round(est.total_bytes / got["measured_bytes"], 4),
            "peak_phase": est.peak_phase,
            "seconds": got["seconds"],
        }
        row["ok"] = abs(row["ratio"] - 1) <= TOLERANCE
        if default_malloc:
            dm = measure(case, config, steps=steps, default_malloc=True, threads=threads)
            row["measured_default_malloc_bytes"] = dm["measured_bytes"]
            row["ratio_default_malloc"] = round(est.total_bytes / dm["measured_bytes"], 4)
        results.append(row)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the small cases the test suite runs")
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per case (default 3)")
    ap.add_argument("--only", help="run only cases whose name contains this text")
    ap.add_argument("--default-malloc", action="store_true", help="also measure with glibc's default settings")
    ap.add_argument("--jobs", type=int, default=1, help="cases measured in parallel (default 1)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return 0
    cases = QUICK_CASES if args.quick else STANDARD_CASES
    if args.only:
        cases = [c for c in cases if args.only in c["name"]]
    shape = QUICK_MODEL if args.quick else STANDARD_MODEL
    results = run_cases(cases, shape, steps=args.steps, default_malloc=args.default_malloc, jobs=args.jobs)
    if args.json:
        print(json.dumps({"model": model_config(shape), "tolerance": TOLERANCE, "results": results}, indent=2))
    else:
        mib = 2**20
        print(f"model: {json.dumps(shape)}; gate: estimate within {TOLERANCE:.0%} of measured peak RSS "
              f"(child env {GATE_ENV})")
        head = f"{'case':28s} {'estimate':>10s} {'measured':>10s} {'ratio':>7s}"
        if args.default_malloc:
            head += f" {'default malloc':>15s} {'ratio':>7s}"
        print(head + "  peak during")
        for r in results:
            line = (f"{r['name']:28s} {r['estimate_bytes'] / mib:7.1f} MiB {r['measured_bytes'] / mib:6.1f} MiB"
                    f" {r['ratio']:7.3f}")
            if args.default_malloc:
                line += f" {r['measured_default_malloc_bytes'] / mib:11.1f} MiB {r['ratio_default_malloc']:7.3f}"
            print(line + f"  {r['peak_phase']}{'' if r['ok'] else '  <-- outside tolerance'}")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
