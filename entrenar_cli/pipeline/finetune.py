"""`entrenar finetune`: full, LoRA and QLoRA fine-tuning on the shared engine.

Fine-tuning is distillation without a teacher: the same engine, checkpoints, progress and
outputs, with the plain language-modelling objective.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from entrenar_cli.config.schema import FineTuneYamlConfig
from entrenar_cli.console import info
from entrenar_cli.errors import ConfigError, DataError, EntrenarError
from entrenar_cli.pipeline.common import (
    RunOptions,
    advisory_estimate,
    after_stop_signal,
    check_free_space,
    dir_size,
    disk_bytes_needed,
    interrupted_error,
    log_event,
    output_write_errors,
    prepare_output_dir,
    record_written,
    refresh_report,
    run_inputs,
    start_event,
    store_student_before,
    stored_student_before,
    write_resolved_config,
    write_summary,
)


@dataclass
class FineTuneSetup:
    cfg: FineTuneYamlConfig
    model: Any
    tokenizer: Any
    location: Any
    task: str
    train_blocks: Any
    eval_blocks: Any
    precision: str
    precision_reason: str = ""


def _quantization_config(cfg: FineTuneYamlConfig) -> Any:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise EntrenarError(
            "method 'qlora' needs bitsandbytes, which is not installed",
            hint="pip install 'entrenar-cli[qlora]' (or pip install bitsandbytes)",
        ) from None
    import torch
    from transformers import BitsAndBytesConfig

    q = cfg.quantization
    compute = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[q.compute_dtype]
    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.quant_type,
                              bnb_4bit_use_double_quant=q.double_quant, bnb_4bit_compute_dtype=compute)


def load_base(cfg: FineTuneYamlConfig, loc: Any, task: str, device: Any) -> Any:
    """The model to train: fp32 for full/LoRA, k-bit through bitsandbytes for QLoRA."""
    import torch

    from entrenar_cli import models

    src = cfg.model
    if cfg.method != "qlora":
        return models.load_model(loc, task=task, dtype=torch.float32, trust_remote_code=src.trust_remote_code,
                                 allow_pickle=src.allow_pickle)
    if loc.is_gguf:
        raise ConfigError("method 'qlora' needs safetensors weights, not a GGUF file",
                          hint="export the model to safetensors first, or use method: lora")
    from transformers import AutoModelForCausalLM

    quant = _quantization_config(cfg)
    compute = quant.bnb_4bit_compute_dtype if cfg.quantization.bits == 4 else torch.float32
    # quantize straight onto the training device: bitsandbytes' CUDA kernels, not a CPU pass then a copy
    device_map = {"": device.index or 0} if device.type == "cuda" else None
    model = AutoModelForCausalLM.from_pretrained(loc.path, quantization_config=quant, dtype=compute,
                                                 trust_remote_code=src.trust_remote_code, use_safetensors=True,
                                                 device_map=device_map)
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.training.gradient_checkpointing)


def instruction_encoder(tokenizer: Any, ds: Any) -> Any:
    """Rows -> (ids, loss mask): plain text, prompt/completion, or chat messages via the chat template."""
    eos = tokenizer.eos_token_id

    def encode(doc: Any) -> tuple[list[int], list[int] | None] | None:
        row = doc.row or {}
        style = ds.style
        if style == "auto":
            style = ("chat" if ds.messages_column in row else
                     "prompt_completion" if ds.prompt_column in row else "text")
        if style == "text":
            text = row.get(ds.text_column)
            if text is None:
                raise DataError(f"{doc.key}: no field {ds.text_column!r} (fields: {', '.join(row)})",
                                hint="set dataset.text_column, or dataset.style for instruction data")
            ids = tokenizer(str(text), add_special_tokens=False)["input_ids"] + [eos]
            return ids, None
        if style == "prompt_completion":
            if ds.prompt_column not in row or ds.completion_column not in row:
                raise DataError(f"{doc.key}: needs fields {ds.prompt_column!r} and {ds.completion_column!r} "
                                f"(fields: {', '.join(row)})")
            p = tokenizer(str(row[ds.prompt_column]), add_special_tokens=False)["input_ids"]
            c = tokenizer(str(row[ds.completion_column]), add_special_tokens=False)["input_ids"] + [eos]
            mask = ([0] * len(p) if ds.completion_only_loss else [1] * len(p)) + [1] * len(c)
            return p + c, mask
        messages = row.get(ds.messages_column)
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{doc.key}: field {ds.messages_column!r} must be a list of {{role, content}}")
        return _encode_chat(tokenizer, messages, ds.completion_only_loss, doc.key)

    return encode


def _encode_chat(
    tokenizer: Any, messages: list[dict[str, Any]], assistant_only: bool, key: str
) -> tuple[list[int], list[int]]:
    """Render with the chat template; loss on assistant turns (character spans mapped to tokens)."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{key}: chat rows need a tokenizer with a chat template; this one has none",
                        hint="use prompt/completion rows, or a model that ships a chat template")
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans: list[tuple[int, int]] = []
    for i, msg in enumerate(messages):
        if msg.get("role") != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        after = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if full.startswith(after) and after.startswith(before):
            spans.append((len(before), len(after)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    if not assistant_only:
        return ids, [1] * len(ids)
    mask = [1 if any(a <= start < b for a, b in spans) else 0 for start, _ in enc["offset_mapping"]]
    return ids, mask


def setup(cfg: FineTuneYamlConfig) -> FineTuneSetup:
    from entrenar_cli import models
    from entrenar_cli.data import load_blocks
    from entrenar_cli.pipeline.distill import _precision_and_device

    choice, device = _precision_and_device(cfg.training)
    src = cfg.model
    loc = models.open_source(src)
    tokenizer = models.load_tokenizer(loc, src.trust_remote_code)
    task = models.task_of(models.read_config(loc))
    if cfg.method == "qlora" and task != "causal":
        raise ConfigError(f"method 'qlora' supports causal language models; {src.model_id} is a {task} model")
    info(f"loading {src.model_id} for {cfg.method} fine-tuning")
    model = load_base(cfg, loc, task, device)
    if cfg.method in ("lora", "qlora"):
        model = models.apply_lora(model, cfg.lora)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos and cfg.dataset.max_length > max_pos:
        raise ConfigError(f"dataset.max_length {cfg.dataset.max_length} exceeds the model's {max_pos} positions",
                          hint=f"set dataset.max_length <= {max_pos}")
    ds = cfg.dataset
    rows = ds.style != "text" and any(str(p).endswith((".jsonl", ".json", ".parquet", ".ndjson"))
                                      for p in [ds.path or ".parquet"])
    if rows and task == "causal":
        train, held = load_blocks(ds, tokenizer, causal=True, encode=instruction_encoder(tokenizer, ds), raw_rows=True,
                                  extra_meta={"style": ds.style, "completion_only": ds.completion_only_loss,
                                              "cols": [ds.prompt_column, ds.completion_column, ds.messages_column]})
    else:
        train, held = load_blocks(ds, tokenizer, causal=(task == "causal"))
    info(f"data: {len(train)} training blocks, {len(held)} held-out blocks of {ds.max_length} tokens")
    return FineTuneSetup(cfg, model, tokenizer, loc, task, train, held, choice.precision, choice.reason)


def _estimate(su: FineTuneSetup) -> int | None:
    """Training-memory estimate for the plan (advice: see common.advisory_estimate)."""
    from entrenar_cli.memory import estimate_training
    from entrenar_cli.sharding import plan_memory_bytes, planned_logits_budget

    def compute() -> int:
        tr = su.cfg.training
        # a PeftModel forwards .config to its base model; every transformers model has one
        est = estimate_training(su.model.config.to_dict(), method=su.cfg.method, rank=su.cfg.lora.rank,
                                target_modules=su.cfg.lora.target_modules, batch_size=tr.batch_size,
                                seq_len=su.cfg.dataset.max_length, dtype=su.precision,
                                gradient_checkpointing=tr.gradient_checkpointing, lora_alpha=su.cfg.lora.alpha,
                                lora_dropout=su.cfg.lora.dropout, gradient_accumulation=tr.gradient_accumulation,
                                device="cuda" if su.model.device.type == "cuda" else "cpu",
                                logits_budget=planned_logits_budget(tr))
        return plan_memory_bytes(est, tr, su.model.config.to_dict())

    return advisory_estimate(compute)


def run(cfg: FineTuneYamlConfig, opts: RunOptions) -> dict[str, Any]:
    from entrenar_cli import models
    from entrenar_cli.console import is_main_process
    from entrenar_cli.fsutil import human_bytes
    from entrenar_cli.signals import STOP

    out = Path(cfg.output.dir)
    main = is_main_process()
    if main:  # under torchrun only rank 0 owns the output directory
        prepare_output_dir(out, opts, run_inputs(cfg, opts.config_path))
    su = setup(cfg)
    total, trainable = models.count_parameters(su.model)
    from entrenar_cli import sharding

    sharding.mark_planned(cfg.training, su.model)  # the logit-path line then tells the truth
    estimate = _estimate(su)
    from entrenar_cli.objectives import planned_logit_path

    logit_path = planned_logit_path(cfg.training, {"model": su.model}) if su.task in ("causal", "masked") else ""
    info(f"parameters {total:,}, trainable {trainable:,} ({100 * trainable / max(1, total):.2f}%)"
         + (f"; estimated training memory {human_bytes(estimate)}{sharding.memory_note(cfg.training)}"
            if estimate else "")
         + f"; precision {su.precision_reason or su.precision}"
         + (f"; logit losses: {logit_path}" if logit_path else ""))
    if opts.dry_run:
        return {"dry_run": True, "parameters": total, "trainable_parameters": trainable,
                "estimated_mem_bytes": estimate, "logit_loss": logit_path,
                "train_blocks": len(su.train_blocks), "eval_blocks": len(su.eval_blocks),
                "precision": su.precision, "precision_reason": su.precision_reason}
    if main:
        lora = cfg.method != "full"
        check_free_space(out, disk_bytes_needed(total, trainable, cfg.output.save_total_limit,
                                                full_model=not lora or cfg.output.merge, adapter=lora))
    # from the first step until the model is saved, SIGINT/SIGTERM stop at a safe point
    with STOP, output_write_errors(out):
        summary = _train_and_save(su, out, opts, total, trainable, estimate)
        if not main:
            return summary
        if STOP.signal is not None:
            after_stop_signal(out)
            return summary
    report = refresh_report(out)
    if report:
        info(f"report: {report}")
    return summary


def _train_and_save(su: FineTuneSetup, out: Path, opts: RunOptions, total: int, trainable: int,
                    estimate: int | None) -> dict[str, Any]:
    """Train, then save the model and the summary (exit 1 with a checkpoint when interrupted)."""
    from entrenar_cli.chunking import logits_budget
    from entrenar_cli.console import is_main_process
    from entrenar_cli.objectives import LMObjective
    from entrenar_cli.signals import pause_for_tests
    from entrenar_cli.trainer import Engine, EngineOptions

    cfg = su.cfg
    main = is_main_process()
    if main:
        write_resolved_config(out, cfg)
        record_written(out, "metrics.jsonl")
        if not (opts.resume and (out / "metrics.jsonl").exists()):
            start_event(out, "finetune", cfg)
    mlm = None
    if su.task == "masked" and su.tokenizer.mask_token_id is not None:
        mlm = {"cls": su.tokenizer.cls_token_id, "sep": su.tokenizer.sep_token_id, "mask": su.tokenizer.mask_token_id}
    objective = LMObjective(su.task, None, mlm, logits_budget(cfg.training))
    engine = Engine(cfg.training, su.model, objective, su.train_blocks, su.eval_blocks,
                    EngineOptions(output_dir=out, run="finetune", resume=opts.resume, progress=opts.progress,
                                  keep_checkpoints=cfg.output.save_total_limit,
                                  on_eval=lambda r: _on_eval(out, r)),
                    pad_token_id=su.tokenizer.pad_token_id or 0)
    from entrenar_cli.checkpoint import latest_checkpoint

    if opts.resume and latest_checkpoint(out) is not None:
        before = stored_student_before(out) or {}  # measured by the first run, before its first step
    else:
        before = engine.evaluate() if len(su.eval_blocks) else {}
        if before and main:
            store_student_before(out, before)
    result = engine.train()
    summary: dict[str, Any] = {
        "run": "finetune", "method": cfg.method,
        **{k: result[k] for k in ("status", "steps", "total_steps", "tokens", "elapsed_s", "tokens_per_s",
                                  "peak_mem_bytes", "precision", "device", "skipped_steps", "resumed_from")},
        "estimated_mem_bytes": estimate,
        "student": {"name": cfg.model.model_id, "parameters": total, "trainable_parameters": trainable,
                    **{k: v for k, v in (result.get("eval") or {}).items() if k in ("perplexity", "eval_loss")}},
    }
    if before:
        summary["student_before"] = {"perplexity": before.get("perplexity")}
    if not engine.is_main:
        return summary
    if result["status"] == "completed":
        model = engine.accelerator.unwrap_model(engine.model)
        pause_for_tests("the final save")
        summary["outputs"] = save_outputs(model, su, out)
        summary["student"]["size_bytes"] = dir_size(out)
    write_summary(out, summary)
    log_event(out, {"event": "end", "time": time.time(), "status": result["status"], "steps": result["steps"]})
    _print_summary(summary)
    if result["status"] == "interrupted":
        refresh_report(out)
        raise interrupted_error(result, out, "finetune")
    return summary


def save_outputs(model: Any, su: FineTuneSetup, out: Path) -> dict[str, str]:
    """Full: the model directory. LoRA/QLoRA: the adapter, and the merged model in full precision."""
    import torch

    from entrenar_cli import models

    def record(names: list[str]) -> None:
        record_written(out, *names)

    if su.cfg.method == "full":
        models.save_model_files(model, su.tokenizer, out, before_rename=record)
        return {"model_dir": str(out)}
    adapter = out / "adapter"
    record_written(out, adapter.name)
    models.save_adapter_dir(model, adapter)
    su.tokenizer.save_pretrained(adapter)
    outputs = {"adapter_dir": str(adapter)}
    if su.cfg.output.merge:
        if su.cfg.method == "qlora":
            # merge onto the full-precision base, not the 4-bit one: the result is exact, not re-quantized
            from peft import PeftModel

            base = models.load_model(su.location, task=su.task, dtype=torch.float32,
                                     trust_remote_code=su.cfg.model.trust_remote_code)
            merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
        else:
            merged = model
        models.save_model_files(merged, su.tokenizer, out, before_rename=record)
        outputs["model_dir"] = str(out)
    return outputs


def _on_eval(out: Path, record: dict[str, Any]) -> None:
    info(f"eval step {record['step']}: perplexity {record.get('perplexity', float('nan')):.4g}")
    refresh_report(out)


def _print_summary(summary: dict[str, Any]) -> None:
    from entrenar_cli.console import out
    from entrenar_cli.pipeline.common import memory_phrase

    s = summary["student"]
    before = (summary.get("student_before") or {}).get("perplexity")
    out.print(
        f"fine-tuning ({summary['method']}) {summary['status']}: {summary['steps']} steps, "
        f"{summary['tokens_per_s']:.0f} tokens/s; held-out perplexity "
        + (f"{before:.4g} -> " if before else "") + (f"{s['perplexity']:.4g}" if "perplexity" in s else "-")
        + f"; {memory_phrase(summary)}"
    )
