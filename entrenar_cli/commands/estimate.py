"""`entrenar estimate`: will this run fit, and with what settings?

A thin layer over :mod:`entrenar_cli.estimate`: resolve the model's config (catalogue, local
directory or .gguf, or Hub config.json), estimate, render a table or JSON. Catalogue lookups never
import torch, so they answer in well under a second.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Optional

import typer

from entrenar_cli import lora_defaults
from entrenar_cli.commands.options import JsonOption

SCHEMA_ID = "entrenar.estimate/v1"
_ROWS: list[tuple[str, str]] = [
    ("weights_bytes", "weights"),
    ("gradients_bytes", "gradients"),
    ("optimizer_bytes", "optimizer state"),
    ("autocast_copies_bytes", "16-bit weight copies"),
    ("activations_bytes", "activations"),
    ("logits_bytes", "logits + loss"),
    ("teacher_bytes", "teacher"),
    ("workspace_bytes", "temporaries"),
]


def estimate(
    model: Annotated[
        str,
        typer.Argument(
            metavar="MODEL",
            help="A catalogue family (llama, llama3, mistral, qwen2.5, tinyllama, smollm2, gpt2, bert, "
            "roberta, codebert, phi2), a local model directory, config.json or .gguf file, or a Hub repo id.",
        ),
    ],
    size: Annotated[
        Optional[str],
        typer.Argument(metavar="SIZE", help="Size within a catalogue family: 7b, 0.5B, 124m (case-insensitive)."),
    ] = None,
    method: Annotated[
        Optional[str],
        typer.Option("--method", "-m", help="full | lora | qlora. Default: show all three side by side."),
    ] = None,
    rank: Annotated[int, typer.Option("--rank", "-r", help="LoRA rank r.")] = lora_defaults.RANK,
    target_modules: Annotated[
        Optional[str],
        typer.Option(
            "--target-modules",
            help="LoRA targets: comma-separated module names (q_proj,v_proj) or all-linear. "
            "Default: the targets training uses (the attention projections, e.g. q/k/v/o for Llama).",
        ),
    ] = None,
    lora_dropout: Annotated[
        float, typer.Option("--lora-dropout", help="LoRA dropout (> 0 keeps a mask per adapter input).")
    ] = lora_defaults.DROPOUT,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Sequences per micro-batch.")] = 1,
    seq_len: Annotated[int, typer.Option("--seq-len", "-s", help="Tokens per sequence.")] = 512,
    dtype: Annotated[
        str,
        typer.Option("--dtype", help="fp32, or bf16 / fp16 mixed precision (fp32 master weights for full)."),
    ] = "bf16",
    optimizer: Annotated[
        str,
        typer.Option("--optimizer", help="adamw (torch's default, foreach on CUDA) | adamw-fused | adamw-8bit | sgd."),
    ] = "adamw",
    gradient_checkpointing: Annotated[
        bool, typer.Option("--gradient-checkpointing", help="Recompute activations block by block.")
    ] = False,
    attention: Annotated[
        str, typer.Option("--attention", help="sdpa (no attention matrix kept) | eager (keeps it: ~s^2).")
    ] = "sdpa",
    device: Annotated[
        str, typer.Option("--device", help="cuda | cpu (dropout masks and optimizer temporaries differ).")
    ] = "cuda",
    teacher: Annotated[
        Optional[str],
        typer.Option(
            "--teacher",
            help="Distillation teacher (frozen): a catalogue model as FAMILY:SIZE (llama:7b), a directory, "
            ".gguf file or Hub repo id. Adds its weights, logits and the KD loss tensors.",
        ),
    ] = None,
    fits: Annotated[
        Optional[str],
        typer.Option(
            "--fits",
            metavar="SIZE",
            help="Memory budget, e.g. 24GB (10^9 bytes) or 24GiB (2^30 bytes): gives a verdict and the "
            "largest batch size that fits.",
        ),
    ] = None,
    revision: Annotated[Optional[str], typer.Option("--revision", help="Hub branch, tag or commit.")] = None,
    devices: Annotated[
        int, typer.Option("--devices", help="Processes (GPUs) training together; with --sharding: memory per device.")
    ] = 1,
    sharding: Annotated[
        str,
        typer.Option("--sharding", help="none (DDP: every device holds everything) | fsdp (weights, gradients, "
                     "optimizer state and the teacher divided across --devices; training.sharding)."),
    ] = "none",
    logits_budget_mb: Annotated[
        int,
        typer.Option("--logits-budget-mb", min=0, help="Chunked logit losses' budget per chunk (MiB; "
                     "training.logits_budget_mb, default 256 as entrenar trains); 0: materialised logits."),
    ] = 256,
    as_json: JsonOption = False,
) -> None:
    """Plan memory before renting a GPU: exact parameter count, weight sizes, KV cache, and training
    memory (weights, gradients, optimizer state, activations, logits) for full fine-tuning, LoRA
    and QLoRA, with the largest batch size that fits a budget. Reads only config.json.

    \b
    Example: entrenar estimate llama 7b
    Example: entrenar estimate llama 7b --method qlora --seq-len 2048 --fits 24GiB
    Example: entrenar estimate Qwen/Qwen2.5-0.5B --method lora --target-modules all-linear --json
    Example: entrenar estimate smollm2 135m --teacher llama:7b --method full --dtype fp32
    Example: entrenar estimate llama3 8b --teacher llama:70b --method full --devices 8 --sharding fsdp

    Totals are the modelled peak of tensor memory (docs/estimate.md); add the CUDA context and
    allocator slack (typically under 1 GiB) on a GPU.
    """
    from entrenar_cli import estimate as estimator

    resolved = _resolve(model, size, revision)
    teacher_resolved = _resolve(teacher, None, None, "--teacher") if teacher is not None else None
    targets: list[str] | str | None = None
    if target_modules is not None:
        parts = [t.strip() for t in target_modules.split(",") if t.strip()]
        targets = "all-linear" if parts == ["all-linear"] else parts
    methods = [method] if method else list(estimator.METHODS)
    settings = dict(
        rank=rank,
        target_modules=targets,
        lora_dropout=lora_dropout,
        batch_size=batch_size,
        seq_len=seq_len,
        dtype=dtype,
        optimizer=optimizer,
        gradient_checkpointing=gradient_checkpointing,
        attention=attention,
        device=device,
        logits_budget=logits_budget_mb * 2**20 if logits_budget_mb else None,
    )
    _check_all(methods, settings)
    _check_devices(devices, sharding, methods)
    budget = _budget(fits) if fits is not None else None

    config = resolved.config
    teacher_config = teacher_resolved.config if teacher_resolved else None
    summary = estimator.summarize_config(config)
    estimates = {
        m: estimator.estimate_training(config, method=m, teacher_config=teacher_config, **settings) for m in methods
    }
    multi = devices > 1 or sharding != "none"
    per_device = {m: _per_device(config, teacher_config, est, devices, sharding) for m, est in estimates.items()} \
        if multi else {}
    verdicts: dict[str, dict[str, Any]] = {}
    if budget is not None:
        for m, est in estimates.items():
            if multi:
                verdicts[m] = _sharded_verdict(config, teacher_config, m, settings, devices, sharding, budget,
                                               per_device[m].per_device_bytes)
                continue
            best = estimator.largest_batch_size(
                config, budget, teacher_config=teacher_config, method=m, **{**settings, "batch_size": 1}
            )
            verdicts[m] = {"fits": est.total_bytes <= budget, "max_batch_size": best}

    doc = build_document(resolved, summary, settings, estimates, teacher_resolved, fits, budget, verdicts)
    if multi:
        doc["devices"] = {"devices": devices, "sharding": sharding,
                          "per_device": {m: d.to_dict() for m, d in per_device.items()}}
    if as_json:
        typer.echo(json.dumps(doc, indent=2))
        return
    render(doc)


MAX_BUDGET = 2**60  # 1 EiB: anything larger is a typo, not a memory size


def _budget(text: str) -> int:
    """``--fits`` in bytes; zero, negative, non-finite, absurdly large or unreadable sizes are exit 2."""
    from entrenar_cli import estimate as estimator
    from entrenar_cli.errors import UsageError

    hint = "give a memory size with a unit: 24GB (10^9 bytes) or 24GiB (2^30 bytes); also MB, MiB, TB, TiB"
    shown = repr(text if len(text) <= 40 else text[:37] + "...")
    try:
        budget = estimator.parse_size(text)
    except UsageError:
        raise UsageError(f"--fits {shown} is not a memory size", hint=hint) from None
    except (OverflowError, ValueError):  # more digits than a float holds
        raise UsageError(f"--fits {shown} is beyond 1 EiB: not a memory size", hint=hint) from None
    if budget <= 0:
        raise UsageError(f"--fits {shown}: the budget must be more than zero bytes", hint=hint)
    if budget > MAX_BUDGET:
        raise UsageError(f"--fits {shown} is beyond 1 EiB: not a memory size", hint=hint)
    return budget


def _resolve(model: str, size: str | None, revision: str | None, what: str = "MODEL") -> Any:
    """The model's config: a catalogue family, a path, a Hub id, or ``pkg:PACKAGE/path`` as in the YAML."""
    import dataclasses

    from entrenar_cli import estimate as estimator
    from entrenar_cli.config.schema import check_model_ref
    from entrenar_cli.errors import UsageError

    try:
        check_model_ref(model)
    except ValueError as exc:
        raise UsageError(f"{what} {model!r}: {exc}") from None
    if not model.startswith("pkg:"):
        return estimator.resolve_model(model, size, revision=revision)
    from entrenar_cli.models import package_path  # imports torch: paid only for pkg: references

    if size is not None:
        raise UsageError(f"SIZE ({size!r}) only applies to catalogue families, not to {model!r}")
    path = package_path(model)
    if not path.exists():
        raise UsageError(f"{model}: no such file or directory in the package ({path})",
                         hint="list the package's files, e.g. 'pip show -f PACKAGE'")
    return dataclasses.replace(estimator.resolve_model(str(path), None, revision=None), name=model)


def _check_devices(devices: int, sharding: str, methods: list[str]) -> None:
    from entrenar_cli.errors import UsageError

    problems = []
    if devices < 1:
        problems.append(f"--devices must be at least 1 (got {devices})")
    if sharding not in ("none", "fsdp"):  # estimate.training.SHARDINGS (not imported: a bad flag needs no model)
        problems.append(f"--sharding must be one of none, fsdp (got {sharding!r})")
    elif sharding == "fsdp" and methods == ["qlora"]:
        problems.append("--sharding fsdp does not apply to qlora (entrenar does not shard a quantised model)")
    if problems:
        raise UsageError("; ".join(problems), hint="see 'entrenar estimate --help'")


def _per_device(config: dict[str, Any], teacher_config: dict[str, Any] | None, est: Any, devices: int,
                sharding: str) -> Any:
    """One device's memory (estimate.training.per_device_estimate); qlora under fsdp: DDP's answer,
    marked as not sharded (entrenar refuses to shard a quantised student)."""
    from entrenar_cli import estimate as estimator
    from entrenar_cli.estimate.training import per_device_estimate

    if est.method == "qlora":
        sharding = "none"
    teacher_layout = estimator.layout_for(teacher_config) if teacher_config is not None else None
    return per_device_estimate(est, estimator.layout_for(config), devices=devices, sharding=sharding,
                               teacher_layout=teacher_layout)


def _sharded_verdict(config: dict[str, Any], teacher_config: dict[str, Any] | None, method: str,
                     settings: dict[str, Any], devices: int, sharding: str, budget: int,
                     per_device_bytes: int) -> dict[str, Any]:
    """--fits per device: does one device's share fit, and the largest per-device batch that does."""
    from entrenar_cli import estimate as estimator

    def fits(b: int) -> bool:
        est = estimator.estimate_training(config, method=method, teacher_config=teacher_config,
                                       **{**settings, "batch_size": b})
        return _per_device(config, teacher_config, est, devices, sharding).per_device_bytes <= budget

    best = 0
    if fits(1):
        lo, hi = 1, 2
        while hi <= 1 << 16 and fits(hi):
            lo, hi = hi, hi * 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        best = lo
    return {"fits": per_device_bytes <= budget, "max_batch_size": best}


def _check_all(methods: list[str], settings: dict[str, Any]) -> None:
    """Every bad option in one message (exit 2), naming the flag."""
    from entrenar_cli.errors import UsageError
    from entrenar_cli.estimate import EstimateSettings

    problems = []
    for m in methods:
        try:
            EstimateSettings(method=m, **settings).check()
        except UsageError as exc:
            problems.extend(p for p in exc.message.split("; ") if p not in problems)
    if problems:
        raise UsageError("; ".join(problems), hint="see 'entrenar estimate --help'")


def build_document(
    resolved: Any,
    summary: dict[str, Any],
    settings: dict[str, Any],
    estimates: dict[str, Any],
    teacher: Any,
    fits_text: str | None,
    budget: int | None,
    verdicts: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """The ``--json`` document (schema ``entrenar.estimate/v1``, documented in docs/estimate.md)."""
    from entrenar_cli import estimate as estimator

    config = resolved.config
    kv = None
    if summary["kv_cache_bytes_per_token"] is not None:
        per_token = summary["kv_cache_bytes_per_token"]
        max_ctx = summary["max_position_embeddings"]
        kv = {
            "dtype": "bf16",
            "bytes_per_token": per_token,
            "batch_size": settings["batch_size"],
            "seq_len": settings["seq_len"],
            "bytes": estimator.kv_cache_bytes(config, settings["seq_len"], settings["batch_size"]),
            "max_context": max_ctx,
            "bytes_at_max_context": per_token * max_ctx if max_ctx else None,
        }
    model = {"name": resolved.name, "source": resolved.source, "repo": resolved.repo}
    model.update({k: v for k, v in summary.items() if k != "weights_bytes"})
    return {
        "schema": SCHEMA_ID,
        "model": model,
        "weights_bytes": summary["weights_bytes"],
        "kv_cache": kv,
        "settings": {**settings, "target_modules": settings["target_modules"]},
        "teacher": None if teacher is None else {
            "name": teacher.name,
            "source": teacher.source,
            "repo": teacher.repo,
            "parameters": estimator.count_parameters(teacher.config),
        },
        "training": {m: est.to_dict() for m, est in estimates.items()},
        "fits": None if budget is None else {"budget": fits_text, "budget_bytes": budget, "methods": verdicts},
    }


# ----------------------------------------------------------------------------------------------
# rendering


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(n)


def render(doc: dict[str, Any]) -> None:
    """The human report: model line, weights, KV cache, the training table, the --fits verdict."""
    from rich.table import Table
    from rich.text import Text

    from entrenar_cli.console import out

    m = doc["model"]
    origin = f" · config from {m['repo']}" if m.get("repo") and m["repo"] != m["name"] else ""
    out.print(Text(f"{m['name']}{origin}", style="bold"))
    ctx = f", context {m['max_position_embeddings']}" if m.get("max_position_embeddings") else ""
    tied = ", tied embeddings" if m["tie_word_embeddings"] else ""
    out.print(
        f"{m['architecture']}: {m['num_layers']} layers, hidden {m['hidden_size']}, {m['num_heads']} heads "
        f"({m['num_kv_heads']} KV, head dim {m['head_dim']}), MLP {m['intermediate_size']}, "
        f"vocab {m['vocab_size']}{ctx}{tied}"
    )
    out.print(f"Parameters: {m['parameters']:,} ({_count(m['parameters'])}), exact")

    w = doc["weights_bytes"]
    wt = Table(title="Weights", title_justify="left", show_edge=False)
    wt.add_column("format")
    wt.add_column("bits/param", justify="right")
    wt.add_column("GiB", justify="right")
    wt.add_column("GB", justify="right")
    labels = {
        "fp32": "fp32",
        "bf16": "bf16 / fp16",
        "int8": "int8 (LLM.int8, Linear only)",
        "nf4": "nf4 (QLoRA; embeddings, lm_head 16-bit)",
    }
    for key, label in labels.items():
        b = w[key]
        wt.add_row(label, f"{8 * b / m['parameters']:.2f}", f"{b / 2**30:.2f}", f"{b / 1e9:.2f}")
    out.print()
    out.print(wt)

    kv = doc["kv_cache"]
    if kv:
        line = (f"KV cache (bf16): {kv['bytes_per_token'] / 2**10:.1f} KiB per token; "
                f"{_gib(kv['bytes'])} for {kv['batch_size']} x {kv['seq_len']} tokens")
        if kv.get("bytes_at_max_context"):
            line += f"; {_gib(kv['bytes_at_max_context'])} for 1 x {kv['max_context']} (full context)"
        out.print()
        out.print(line)

    s = doc["settings"]
    training = doc["training"]
    prec = "fp32" if s["dtype"] == "fp32" else f"{s['dtype']} mixed precision"
    ckpt = "gradient checkpointing" if s["gradient_checkpointing"] else "no checkpointing"
    budget = s.get("logits_budget")
    logits = f"chunked logits ({budget // 2**20} MiB chunks)" if budget else "materialised logits"
    big = max(e["total_bytes"] for e in training.values()) >= 2**30
    unit, scale = ("GiB", 2**30) if big else ("MiB", 2**20)
    title = (f"Training memory, {unit} (batch {s['batch_size']} x {s['seq_len']} tokens, {prec}, "
             f"{s['optimizer']}, {s['attention']} attention, {ckpt}, {s['device']}, {logits})")
    if doc["teacher"]:
        title += f", teacher {doc['teacher']['name']} ({_count(doc['teacher']['parameters'])})"
    tt = Table(title=title, title_justify="left", show_edge=False)
    tt.add_column("", no_wrap=True)
    for meth, est in training.items():
        head = meth if meth == "full" else f"{meth} r={est['lora_rank']}"
        tt.add_column(head, justify="right")
    tt.add_row("trainable parameters", *[
        _count(e["trainable_parameters"]) + ("" if e["method"] == "full" else f" ({e['trainable_percent']:.2f}%)")
        for e in training.values()
    ])
    for key, label in _ROWS:
        if any(e[key] for e in training.values()):
            tt.add_row(label, *[f"{e[key] / scale:.2f}" for e in training.values()])
    tt.add_row(Text("peak (total)", style="bold"), *[Text(f"{e['total_bytes'] / scale:.2f}", style="bold")
                                                     for e in training.values()])
    tt.add_row("peak during", *[e["peak_phase"] for e in training.values()])
    dev = doc.get("devices")
    if dev:
        label = f"per device ({dev['devices']} x {dev['sharding']})"
        cells = []
        for meth in training:
            d = dev["per_device"][meth]
            note = "" if d["sharding"] == dev["sharding"] else " (not sharded)"
            cells.append(Text(f"{d['per_device_bytes'] / scale:.2f}{note}", style="bold"))
        tt.add_row(Text(label, style="bold"), *cells)
        tt.add_row("per device peak during", *[dev["per_device"][meth]["peak_phase"] for meth in training])
    fits = doc["fits"]
    if fits:
        if dev:
            tt.add_row("", *["" for _ in training])
        cells = []
        for meth in training:
            v = fits["methods"][meth]
            verdict = "yes" if v["fits"] else "no"
            cells.append(f"{verdict}, max {v['max_batch_size']}" if v["max_batch_size"] else f"{verdict}, none")
        tt.add_row(f"fits {fits['budget']}? max batch", *cells)
    out.print()
    out.print(tt)
    if fits:
        b = fits["budget_bytes"]
        out.print(f"Budget {fits['budget']} = {b / 2**30:.2f} GiB = {b / 1e9:.2f} GB.")
    targets = {tuple(e["lora_target_modules"]) for e in training.values() if e["lora_target_modules"]}
    if targets:
        out.print(f"LoRA targets: {', '.join(sorted(targets)[0])}")
    out.print("GiB = 2^30 bytes, GB = 10^9. Totals are the modelled peak of tensor memory "
              "(docs/estimate.md); add the CUDA context and allocator slack on a GPU.", style="dim")


def _gib(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def register(app: typer.Typer) -> None:
    app.command()(estimate)
