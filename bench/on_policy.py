"""Off-policy KD vs on-policy distillation at equal optimizer steps (issue 21, BENCHMARKS.md).

The demo (examples/configs/distill-smollm2.yaml: SmolLM2-135M -> 6 of its layers, stdlib source) run
twice with the same seed, data order and steps; the second with ``distillation.on_policy.fraction``.
Both evaluate the same held-out measure: the teacher's NLL of the student's own sampled continuations
of held-out prompts (fixed seed), next to held-out perplexity, and report wall time.

    .venv/bin/python -m bench.on_policy --steps 40 --out runs/on-policy-bench
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

CONFIG = "examples/configs/distill-smollm2.yaml"


def run_case(name: str, fraction: float, args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out) / name
    sets = [f"output.dir={out}", "student.init_from_teacher.layers=6",  # the student BENCHMARKS.md measured
            f"training.max_steps={args.steps}", f"training.eval_steps={args.eval_steps}",
            "training.save_steps=1000000", f"training.num_threads={args.threads}",
            f"training.mixed_precision={args.precision}", f"training.eval_batches={args.eval_batches}",
            f"distillation.on_policy.fraction={fraction}",
            f"distillation.on_policy.prompt_tokens={args.prompt_tokens}",
            f"distillation.on_policy.max_new_tokens={args.max_new_tokens}",
            f"distillation.on_policy.eval_prompts={args.eval_batches * 4}"]
    cmd = [sys.executable, "-m", "entrenar_cli", "distill", CONFIG, "--overwrite", "--quiet"]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["event"] == "eval"]
    train = [r for r in rows if r["event"] == "train"]
    gen = sum(r.get("generated_tokens", 0) for r in train)
    return {"case": name, "fraction": fraction, "wall_s": wall, "train_s": summary["elapsed_s"],
            "before": summary.get("student_before", {}), "evals": evals, "generated_tokens": gen,
            "generated_tokens_per_s": [r.get("generated_tokens_per_s") for r in train if "generated_tokens_per_s" in r]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--eval-steps", type=int, default=20)
    ap.add_argument("--eval-batches", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--fraction", type=float, default=0.5)
    ap.add_argument("--out", default="runs/on-policy-bench")
    args = ap.parse_args()
    results = [run_case("off-policy", 0.0, args), run_case("on-policy", args.fraction, args)]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.json").write_text(json.dumps(results, indent=1))
    print("| run | step | held-out ppl | teacher NLL of student samples | KL to teacher | wall s |")
    print("|---|---|---|---|---|---|")
    for r in results:
        b = r["before"]
        print(f"| {r['case']} | 0 | {b.get('perplexity', float('nan')):.2f} | "
              f"{b.get('teacher_nll_of_student', float('nan')):.3f} | {b.get('kl_to_teacher', float('nan')):.3f} | |")
        for e in r["evals"]:
            print(f"| {r['case']} | {e['step']} | {e['perplexity']:.2f} | {e['teacher_nll_of_student']:.3f} | "
                  f"{e['kl_to_teacher']:.3f} | {r['wall_s']:.0f} (train {r['train_s']:.0f}) |")
    print(json.dumps({r["case"]: {"generated_tokens": r["generated_tokens"]} for r in results}))


if __name__ == "__main__":
    main()
