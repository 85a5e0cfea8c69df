"""Teacher-cache formats: bytes per token vs KD-loss error vs the full-vocabulary loss (issue 18).

Runs the real SmolLM2-135M teacher of ``examples/configs/distill-smollm2.yaml`` on held-out blocks of
stdlib text, encodes its logits in each candidate format, decodes, and compares the forward-KL KD loss
(and its gradient with respect to the student's logits) with the exact full-vocabulary value, for the
fresh 6-layer student (and a trained student given with --student DIR).

    python -m bench.cache_formats [--blocks 8] [--draws 5] [--student runs/x]
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import numpy as np
import torch

from entrenar_cli.losses import kd_terms, topk_teacher
from entrenar_cli.teacher_cache import CacheFormat, decode, decoded_logp_error_bound, encode

CANDIDATES = [(0, 64), (16, 48), (32, 32), (64, 32), (32, 0), (64, 0), (128, 0)]


def _loss_and_grad(s: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None,
                   topk: Any) -> tuple[float, torch.Tensor]:
    s = s.detach().clone().requires_grad_(True)
    terms = kd_terms(s, t, y, teacher_topk=topk)
    terms.soft.backward()
    return float(terms.soft.detach()) / float(terms.count), s.grad.detach()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="examples/configs/distill-smollm2.yaml")
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--draws", type=int, default=5, help="sampling seeds per sampled format")
    ap.add_argument("--student-layers", default="6,15",
                    help="students built from this many teacher layers (spread evenly; more layers = closer)")
    args = ap.parse_args()

    from entrenar_cli import models
    from entrenar_cli.config import DistillationYamlConfig
    from entrenar_cli.pipeline.distill import setup

    torch.set_num_threads(2)
    cfg = DistillationYamlConfig.from_file(args.config, ["training.mixed_precision=fp32"])
    su = setup(cfg)
    blocks = [su.eval_blocks.block(i)[0] for i in range(min(args.blocks, len(su.eval_blocks)))]
    ids = torch.from_numpy(np.stack([b[:-1] for b in blocks]))
    y = torch.from_numpy(np.stack([b[1:] for b in blocks])).reshape(-1)
    with torch.no_grad():
        t = su.teacher(input_ids=ids).logits[..., : su.vocab].float()
    for n_layers in [int(x) for x in args.student_layers.split(",")]:
        student = models.student_from_teacher(su.teacher, models.spread_layers(models.num_layers(su.teacher),
                                                                                n_layers))
        with torch.no_grad():
            s = student(input_ids=ids).logits[..., : su.vocab].float().reshape(-1, su.vocab)
        print(f"\nstudent: {n_layers} of the teacher's layers (untrained)", flush=True)
        table(t, s, y, su.vocab, args.draws)


def table(t: torch.Tensor, s: torch.Tensor, y: torch.Tensor, vocab: int, draws: int) -> None:
    t_flat = t.reshape(-1, vocab)
    full, g_full = _loss_and_grad(s, y, t_flat, None)
    print(f"V={vocab}, {y.numel()} tokens, full-vocabulary KD loss {full:.4f} nats/token")
    print("| format | bytes/token | KD loss vs full (mean over draws) | spread over draws | gradient cosine |"
          " max quantisation error / bound |")
    print("|---|---|---|---|---|---|")
    old, g_old = _loss_and_grad(s, y, None, topk_teacher(t_flat, 2048))
    cos = torch.nn.functional.cosine_similarity(g_old.flatten(), g_full.flatten(), dim=0).item()
    print(f"| previous format: top-2048 + tail outcome | 12,293 | {100 * (old / full - 1):+.2f}% | 0 | "
          f"{cos:.4f} | - |")
    for k, m in CANDIDATES:
        fmt = CacheFormat(k, m, vocab, 1.0)
        rels, coss, ratio = [], [], 0.0
        for d in range(draws if m else 1):
            rec = np.stack([encode(t[i], fmt, seed=1000 * d + i) for i in range(t.shape[0])])
            if k:
                true_lp, _ = torch.log_softmax(t, -1).topk(k, -1)
                dec_lp = (torch.from_numpy(rec["hi"].astype(np.float32))[..., None]
                          - torch.from_numpy(rec["code"].astype(np.float32))
                          * torch.from_numpy(rec["step"].astype(np.float32))[..., None])
                bound = torch.from_numpy(decoded_logp_error_bound(rec))[..., None]
                ratio = max(ratio, float(((dec_lp - true_lp).abs() / bound).max()))
            w, idx, c = decode(rec, fmt)
            val, g = _loss_and_grad(s, y, None, (w.reshape(-1, w.shape[-1]), idx.reshape(-1, idx.shape[-1]),
                                                 c.reshape(-1)))
            rels.append(val / full - 1)
            coss.append(torch.nn.functional.cosine_similarity(g.flatten(), g_full.flatten(), dim=0).item())
        mean = sum(rels) / len(rels)
        spread = math.sqrt(sum((r - mean) ** 2 for r in rels) / max(1, len(rels) - 1)) if len(rels) > 1 else 0.0
        name = f"top-{k} u8" + (f" + {m} tail samples" if m else " + tail outcome (coarsened)") if k else \
            f"{m} samples (no top-k)"
        print(f"| {name} | {fmt.bytes_per_token} | {100 * mean:+.2f}% | {100 * spread:.2f}% | "
              f"{sum(coss) / len(coss):.4f} | {ratio:.2f} |" if k else
              f"| {name} | {fmt.bytes_per_token} | {100 * mean:+.2f}% | {100 * spread:.2f}% | "
              f"{sum(coss) / len(coss):.4f} | - |", flush=True)


if __name__ == "__main__":
    main()
