"""Logit losses at vocabulary scale: today's materialised-logits path against the chunked one.

    python -m bench.chunked_losses [--vocab 49152 151936 262144] [--tokens 2048 8192] [--hidden 256]
                                   [--steps 1] [--kind forward_kl] [--max-gb 16]

One KD step on the logit part alone (student final hidden states ``[n, d]`` requiring grad and a
trainable head ``[V, d]``; a frozen teacher head on teacher states; T=2, alpha=0.5):

* ``old``      what objectives.py does today: ``s = h_s @ W_s.T`` and ``t = h_t @ W_t.T`` materialised,
               ``losses.fused_forward_kd`` (the forward-KL default; ``kd_terms`` for the other kinds),
               backward through autograd,
* ``chunked``  ``chunked_losses.chunked_kd_loss`` (default 256 MiB budget),
* ``ce-old`` / ``ce-chunked`` (``--ce``): the fine-tuning CE, ``kd_terms(need_soft=False)`` vs ``chunked_ce``.

Each case runs in a fresh subprocess: its peak memory is ``ru_maxrss`` (or the CUDA allocator's peak)
minus the resident size just before the step, i.e. what the loss step adds on top of weights and
states, also expressed in fp32 logit rows per token (``added / (tokens * V * 4)``). Step time (wall and
process CPU time: the latter is what counts on a shared machine) is the mean of ``--steps`` steps after
a small warm-up step. Cases whose old path would need more than
``--max-gb`` (estimated at 6 fp32 logit rows per token) or more than the memory available are skipped
and reported as such. Benchmarks are not tests.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

from bench.procfs import available_bytes, rss_bytes

OLD_ROWS_PER_TOKEN = 6  # s, t, their index_select copies, the fused gradient, its scaled copy


class _Stop(Exception):
    pass


def _case(path: str, vocab: int, tokens: int, hidden: int, steps: int, kind: str, probe: int = 0) -> dict[str, Any]:
    import torch

    from entrenar_cli.chunked_losses import OutputHead, chunk_rows, chunked_ce, chunked_kd_loss
    from entrenar_cli.losses import fused_forward_kd, kd_terms

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator(device="cpu").manual_seed(0)
    w_s = (torch.randn(vocab, hidden, generator=g) * hidden**-0.5).to(device).requires_grad_(True)
    w_t = (torch.randn(vocab, hidden, generator=g) * hidden**-0.5).to(device)
    h_s_all = torch.randn(tokens, hidden, generator=g).to(device).requires_grad_(True)
    h_t_all = torch.randn(tokens, hidden, generator=g).to(device)
    y_all = torch.randint(0, vocab, (tokens,), generator=g).to(device)
    ce = path.startswith("ce-")

    def step(n: int) -> float:
        h_s, h_t, y = h_s_all[:n], h_t_all[:n], y_all[:n]
        if path == "old":
            s = h_s @ w_s.t()
            with torch.no_grad():
                t = h_t @ w_t.t()
            if kind == "forward_kl":
                loss, _ = fused_forward_kd(s, t, y, temperature=2.0, alpha=0.5)
            else:
                loss = kd_terms(s, t, y, temperature=2.0, kind=kind).total(0.5)
        elif path == "chunked":
            loss, _ = chunked_kd_loss(h_s, OutputHead(w_s), y, teacher_hidden=h_t, teacher_head=OutputHead(w_t),
                                      temperature=2.0, alpha=0.5, kind=kind)
        elif path == "ce-old":
            loss = kd_terms(h_s @ w_s.t(), None, y, need_soft=False).hard
        else:
            loss, _ = chunked_ce(h_s, OutputHead(w_s), y)
        (loss / n).backward()
        value = float(loss)
        h_s_all.grad = None
        w_s.grad = None
        return value

    step(64)  # warm-up: kernels, allocator
    if probe and "chunked" in path:
        # a memory-only probe for machines too slow or busy to finish a step: stop after `probe` chunks of
        # the forward (by then every per-token buffer and one chunk's temporaries exist: the forward's peak)
        import entrenar_cli.chunked_losses as cl

        real, calls = cl._chunk, [0]

        def counted(*a: Any, **k: Any) -> Any:
            calls[0] += 1
            if calls[0] > probe:
                raise _Stop
            return real(*a, **k)

        cl._chunk = counted
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_bytes()
    times, cpu = [], []
    loss = 0.0
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            loss = step(tokens)
        except _Stop:
            loss = float("nan")
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    if device.type == "cuda":
        added = torch.cuda.max_memory_allocated() - base
    else:
        added = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"path": path, "vocab": vocab, "tokens": tokens, "hidden": hidden, "kind": "ce" if ce else kind,
            "device": device.type, "threads": torch.get_num_threads(), "step_s": sum(times) / len(times),
            "cpu_s": sum(cpu) / len(cpu),
            "added_bytes": added, "rows_per_token": added / (tokens * vocab * 4), "loss_per_token": loss / tokens,
            "chunk_rows": chunk_rows(vocab, teacher=not ce) if "chunked" in path else None,
            "probe_chunks": probe if "chunked" in path else 0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, nargs="+", default=[49152, 151936, 262144])
    ap.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--kind", default="forward_kl", choices=["forward_kl", "reverse_kl", "jsd", "skew_kl"])
    ap.add_argument("--max-gb", type=float, default=16.0)
    ap.add_argument("--ce", action="store_true", help="also the CE-only (fine-tuning) paths")
    ap.add_argument("--json", help="append one JSON line per case to this file")
    ap.add_argument("--cases", nargs="+", metavar="PATH:V:TOKENS",
                    help="run these cases in this order instead of the grid (e.g. chunked:151936:8192)")
    ap.add_argument("--probe-chunks", type=int, default=0,
                    help="chunked paths: memory only, stop the step after this many chunks (times are then partial)")
    ap.add_argument("--case", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        path, vocab, tokens = args.case.split(":")
        print(json.dumps(_case(path, int(vocab), int(tokens), args.hidden, args.steps, args.kind, args.probe_chunks)))
        return
    paths = ["old", "chunked"] + (["ce-old", "ce-chunked"] if args.ce else [])
    results: dict[tuple[str, int, int], dict[str, Any]] = {}
    grid = [(p, v, n) for n in args.tokens for v in args.vocab for p in paths]
    if args.cases:
        grid = [(p, int(v), int(n)) for p, v, n in (c.split(":") for c in args.cases)]
    print(f"{'path':<11}{'V':>8}{'tokens':>8}{'added GiB':>11}{'rows/token':>12}{'step s':>9}{'cpu s':>9}  note")
    for path, vocab, tokens in grid:
        need = OLD_ROWS_PER_TOKEN * tokens * vocab * 4 if "old" in path else 2 * 2**30
        if need > args.max_gb * 2**30 or need > available_bytes() - 2 * 2**30:
            print(f"{path:<11}{vocab:>8}{tokens:>8}{'-':>11}{'-':>12}{'-':>9}{'-':>9}  skipped: needs "
                  f"~{need / 2**30:.1f} GiB (limit {args.max_gb:g}, available {available_bytes() / 2**30:.1f})")
            continue
        cmd = [sys.executable, "-m", "bench.chunked_losses", "--case", f"{path}:{vocab}:{tokens}",
               "--hidden", str(args.hidden), "--steps", str(args.steps), "--kind", args.kind,
               "--probe-chunks", str(args.probe_chunks)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        if proc.returncode != 0:
            print(f"{path:<11}{vocab:>8}{tokens:>8}  failed (exit {proc.returncode}): "
                  f"{proc.stderr.strip().splitlines()[-1:]}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        results[(path, vocab, tokens)] = r
        note = ""
        base = results.get(("old" if path == "chunked" else "ce-old", vocab, tokens))
        if path in ("chunked", "ce-chunked") and base is not None:
            note = (f"memory {base['added_bytes'] / max(1, r['added_bytes']):.1f}x less, "
                    f"wall {base['step_s'] / r['step_s']:.2f}x, cpu {base['cpu_s'] / r['cpu_s']:.2f}x faster; "
                    f"loss diff "
                    f"{abs(base['loss_per_token'] - r['loss_per_token']):.1e}")
        print(f"{path:<11}{vocab:>8}{tokens:>8}{r['added_bytes'] / 2**30:>11.2f}{r['rows_per_token']:>12.3f}"
              f"{r['step_s']:>9.2f}{r['cpu_s']:>9.2f}  {note}", flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(r) + "\n")
    for path in ("chunked", "ce-chunked"):
        for vocab in sorted({v for _, v, _ in grid}):
            sizes = sorted({n for p, v, n in results if p == path and v == vocab})
            if len(sizes) < 2:
                continue
            lo, hi = results[(path, vocab, sizes[0])], results[(path, vocab, sizes[-1])]
            if lo and hi and hi["tokens"] > lo["tokens"]:
                slope = (hi["added_bytes"] - lo["added_bytes"]) / (hi["tokens"] - lo["tokens"]) / (vocab * 4)
                print(f"{path} V={vocab}: memory per extra token of micro-batch = {slope:.3f} fp32 logit rows")


if __name__ == "__main__":
    main()
