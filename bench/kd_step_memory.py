"""What one distillation step adds per token of micro-batch: materialised logits against the chunked path.

    python -m bench.kd_step_memory [--vocab 49152 151936 262144] [--batch 2 6] [--seq 512] [--max-gb 14]

The issue-17 setup, through entrenar's own objective and optimizer step (not the loss alone): a
4-layer, 256-wide Qwen2-shaped teacher with random weights and vocabulary V, the student = 2 layers of
the same shape, fp32, sequences of ``--seq`` tokens, T=2, alpha=0.5, forward KL. Each case runs in a
fresh subprocess: ``DistillObjective.loss_terms`` + backward + AdamW step, twice (the second is
measured: optimizer state exists). Peak memory is ``ru_maxrss`` minus the resident size after models
and optimizer were built; the slope between two batch sizes, divided by one fp32 logit row
(``4 x V`` bytes), is the memory each extra token costs in logit rows. Step time is process CPU time
(both paths measured in this one invocation; the machine is shared, so compare ratios only).
Benchmarks are not tests.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from typing import Any

from bench.procfs import rss_bytes

OLD_ROWS_PER_TOKEN = 5.6  # what the materialised path measured (issue 17)


def case(vocab: int, batch: int, seq: int, chunked: bool) -> dict[str, Any]:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from entrenar_cli.config.schema import DistillationSettings
    from entrenar_cli.objectives import DistillObjective

    torch.manual_seed(0)
    torch.set_num_threads(2)

    def model(layers: int) -> Any:
        return Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, hidden_size=256, intermediate_size=1024,
                                            num_hidden_layers=layers, num_attention_heads=4,
                                            num_key_value_heads=2, max_position_embeddings=seq,
                                            tie_word_embeddings=True))

    teacher, student = model(4).eval(), model(2).train()
    settings = DistillationSettings(temperature=2.0, alpha=0.5)
    objective = DistillObjective(teacher, settings, task="causal", vocab=vocab, student_dim=256, teacher_dim=256,
                                 logits_budget=256 * 2**20 if chunked else None)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4, foreach=False)
    ids = torch.randint(0, vocab, (batch, seq + 1))
    data = {"input_ids": ids[:, :-1], "attention_mask": torch.ones(batch, seq, dtype=torch.long),
            "labels": ids[:, 1:]}

    def step() -> float:
        terms = objective.loss_terms(student, data)
        (terms.loss / terms.tokens).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(terms.loss / terms.tokens)

    # build optimizer state on one token so the measured step's baseline includes it
    small = {k: v[:1, :8] for k, v in data.items()}
    terms = objective.loss_terms(student, small)
    terms.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    base = rss_bytes()
    t0 = time.process_time()
    loss = step()
    cpu = time.process_time() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"added_bytes": peak - base, "cpu_s": cpu, "loss": loss, "path": objective.logit_path.note}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, nargs="+", default=[49_152, 151_936, 262_144])
    ap.add_argument("--batch", type=int, nargs=2, default=[2, 6])
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--max-gb", type=float, default=14.0)
    ap.add_argument("--case", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        v, b, s, c = args.case
        print("RESULT " + json.dumps(case(int(v), int(b), int(s), c == "chunked")))
        return
    rows = []
    for vocab in args.vocab:
        res: dict[tuple[str, int], dict[str, Any]] = {}
        for path in ("full", "chunked"):
            for batch in args.batch:
                need = OLD_ROWS_PER_TOKEN * batch * args.seq * vocab * 4 / 2**30
                if path == "full" and need > args.max_gb:
                    print(f"V={vocab} {path} batch {batch}: skipped (~{need:.0f} GiB)", flush=True)
                    continue
                proc = subprocess.run([sys.executable, "-m", "bench.kd_step_memory", "--case", str(vocab), str(batch),
                                       str(args.seq), path], capture_output=True, text=True)
                line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    print(f"V={vocab} {path} batch {batch}: failed\n{proc.stderr[-1500:]}", flush=True)
                    continue
                r = json.loads(line[7:])
                res[(path, batch)] = r
                print(f"V={vocab} {path:7s} batch {batch}: added {r['added_bytes'] / 2**30:.2f} GiB, "
                      f"CPU {r['cpu_s']:.1f} s, loss {r['loss']:.6f}  [{r['path']}]", flush=True)
        lo, hi = args.batch
        for path in ("full", "chunked"):
            if (path, lo) in res and (path, hi) in res:
                slope = (res[(path, hi)]["added_bytes"] - res[(path, lo)]["added_bytes"]) / ((hi - lo) * args.seq)
                rows.append((vocab, path, slope / (4 * vocab)))
                print(f"V={vocab} {path}: {slope / 2**20:.3f} MiB per extra token = {slope / (4 * vocab):.3f} fp32 "
                      "logit rows", flush=True)
    print(json.dumps({"rows_per_token": rows}))


if __name__ == "__main__":
    main()
