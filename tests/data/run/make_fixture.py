"""Regenerate the recorded run directory that tests/test_report.py renders.

The files next to this script have the exact layout the training engine writes (metrics.jsonl,
summary.json, resolved_config.yaml, and baseline/ for a ``--baseline`` run). The numbers are
synthetic but shaped like a small SmolLM2 distillation (a 6-layer student of SmolLM2-135M, 120
steps, logging every 4 steps, evaluating every 20) so the curves look like a real run. Replace
them with a real recording once a run on real models exists; keep ``summary.json`` values that
the tests assert (student perplexity 120.5, baseline 132.0, teacher 6.9).

    python tests/data/run/make_fixture.py
"""

from __future__ import annotations

import json
import math
from pathlib import Path

HERE = Path(__file__).resolve().parent
STEPS = 120
LOG_EVERY = 4
EVAL_EVERY = 20
TOKENS_PER_STEP = 4096  # batch 8 x 512 tokens
START = 1764115200.0

CONFIG = """\
teacher:
  model_id: HuggingFaceTB/SmolLM2-135M
  revision: main
  format: safetensors
student:
  model_id: HuggingFaceTB/SmolLM2-135M
  init_from_teacher_layers: [0, 6, 12, 18, 24, 29]
  lora: null
distillation:
  temperature: 2.0
  alpha: 0.7
  progressive:
    enabled: true
    layer_mapping: [[0, 0], [1, 6], [2, 12], [3, 18], [4, 24], [5, 29]]
    weight: 0.3
  attention:
    enabled: true
    weight: 0.1
training:
  max_steps: 120
  batch_size: 8
  learning_rate: 0.0003
  lr_scheduler: cosine
  warmup_steps: 12
  gradient_accumulation: 1
  eval_every: 20
  log_every: 4
  seed: 0
dataset:
  name: python-stdlib
  path: ./data/python-stdlib
  split: train
  eval_split: heldout
  max_length: 512
output:
  dir: ./runs/smollm2-kd
"""

BASELINE_CONFIG = CONFIG.replace("  alpha: 0.7", "  alpha: 0.0").replace(
    "    enabled: true\n    layer_mapping", "    enabled: false\n    layer_mapping"
).replace("  attention:\n    enabled: true", "  attention:\n    enabled: false")


def lr_at(step: int) -> float:
    peak, warmup = 3e-4, 12
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, STEPS - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


def wiggle(step: int, amp: float) -> float:
    """Deterministic noise so the curves do not look drawn with a ruler."""
    return amp * math.sin(step * 1.7) * math.cos(step * 0.31)


def write_run(out: Path, *, kd: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    config = CONFIG if kd else BASELINE_CONFIG
    name = "smollm2-kd" if kd else "smollm2-kd-baseline"
    lines: list[dict] = [
        {"event": "start", "time": START, "run": "distill", "name": name,
         "config": {"teacher": {"model_id": "HuggingFaceTB/SmolLM2-135M"}, "training": {"max_steps": STEPS}}}
    ]
    t_per_step = TOKENS_PER_STEP / 612.0
    # the engine evaluates the untrained student first (summary.json's student_before)
    lines.append({"event": "eval", "step": 0, "eval_loss": round(math.log(900.0), 4), "perplexity": 900.0,
                  "kl_to_teacher": 3.1, "agreement": 0.2, "teacher_perplexity": 6.9})
    for step in range(LOG_EVERY, STEPS + 1, LOG_EVERY):
        decay = math.exp(-step / 35.0)
        ce = 3.35 + 3.6 * decay + wiggle(step, 0.08) + (0.0 if kd else -0.05)
        row: dict = {"event": "train", "step": step, "epoch": round(step / 160, 4),
                     "tokens": step * TOKENS_PER_STEP, "lr": float(f"{lr_at(step):.6g}")}
        if kd:
            loss_kd = 1.1 + 4.2 * decay + wiggle(step, 0.06)
            loss_hidden = 0.05 + 0.4 * decay + wiggle(step, 0.004)
            loss_attn = 0.004 + 0.03 * decay
            loss = 0.7 * loss_kd + 0.3 * ce + 0.3 * loss_hidden + 0.1 * loss_attn
            row.update(loss=round(loss, 4), loss_kd=round(loss_kd, 4), loss_ce=round(ce, 4),
                       loss_hidden=round(loss_hidden, 4), loss_attn=round(loss_attn, 5))
        else:
            row.update(loss=round(ce, 4))
        row.update(grad_norm=round(1.0 + 3 * decay + abs(wiggle(step, 0.3)), 3),
                   tokens_per_s=round((612.0 if kd else 1490.0) + wiggle(step, 15), 1),
                   peak_mem_bytes=(1_234_567_890 if kd else 702_545_920) + step * 1024,
                   elapsed_s=round(step * (t_per_step if kd else TOKENS_PER_STEP / 1490.0), 2))
        lines.append(row)
        if step % EVAL_EVERY == 0:
            frac = step / STEPS
            ppl = 900.0 * (120.5 / 900.0) ** (frac ** 0.6) if kd else 900.0 * (132.0 / 900.0) ** (frac ** 0.6)
            ev: dict = {"event": "eval", "step": step, "eval_loss": round(math.log(ppl), 4),
                        "perplexity": round(ppl, 2)}
            ev["kl_to_teacher"] = round(3.1 - (3.1 - (0.9 if kd else 1.2)) * frac ** 0.6, 3)
            ev["agreement"] = round(0.2 + ((0.45 if kd else 0.41) - 0.2) * frac ** 0.6, 3)
            ev["teacher_perplexity"] = 6.9
            lines.append(ev)
    elapsed = lines[-1 if lines[-1]["event"] == "train" else -2]["elapsed_s"]
    lines.append({"event": "end", "time": START + elapsed, "status": "completed", "steps": STEPS})
    (out / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (out / "resolved_config.yaml").write_text(config)

    final = {"perplexity": 120.5, "kl_to_teacher": 0.9, "agreement": 0.45} if kd else {
        "perplexity": 132.0, "kl_to_teacher": 1.2, "agreement": 0.41}
    summary: dict = {
        "run": "distill", "name": name, "status": "completed", "steps": STEPS,
        "tokens": STEPS * TOKENS_PER_STEP, "elapsed_s": elapsed,
        "tokens_per_s": 614.3 if kd else 1488.2,
        "peak_mem_bytes": 1_234_690_770 if kd else 702_668_800,
        "estimated_mem_bytes": 1_350_000_000 if kd else 760_000_000,
        "teacher": {"name": "HuggingFaceTB/SmolLM2-135M", "parameters": 134515008,
                    "size_bytes": 269030016, "perplexity": 6.9},
        "student": {"name": "SmolLM2-135M[0,6,12,18,24,29]", "parameters": 39000000,
                    "trainable_parameters": 39000000, "size_bytes": 78000000, **final},
        "student_before": {"perplexity": 900.0, "agreement": 0.2, "kl_to_teacher": 3.1},
        "outputs": {"model_dir": f"./runs/smollm2-kd{'' if kd else '/baseline'}/model"},
    }
    if kd:
        summary["baseline"] = {"perplexity": 132.0, "agreement": 0.41, "kl_to_teacher": 1.2}
        summary["outputs"]["baseline_dir"] = "./runs/smollm2-kd/baseline"
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    write_run(HERE, kd=True)
    write_run(HERE / "baseline", kd=False)
