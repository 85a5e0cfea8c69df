"""`entrenar finetune`: full, LoRA and QLoRA fine-tuning on the shared engine.

Fine-tuning is distillation without a teacher: the same engine, checkpoints, progress and
outputs, with the plain language-modelling objective.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from entrenar_cli.config.schema import FineTuneYamlConfig
from entrenar_cli.console import info, world_size
from entrenar_cli.errors import ConfigError, DataError, EntrenarError
from entrenar_cli.pipeline.common import (
    RESULT_FIELDS,
    SUMMARY_METRICS,
    RunOptions,
    TrainingRun,
    advisory_estimate,
    disk_bytes_needed,
    masked_lm_tokens,
    precision_and_device,
    record_written,
    run_training,
    weight_average_note,
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
    choice, device = precision_and_device(cfg.training)
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
    from entrenar_cli.estimate import estimate_training
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
                                logits_budget=planned_logits_budget(tr), weight_average=tr.ema_decay is not None)
        return plan_memory_bytes(est, tr, su.model.config.to_dict())

    return advisory_estimate(compute)


class FineTuneRun(TrainingRun):
    """`entrenar finetune` on the shared skeleton (:func:`~entrenar_cli.pipeline.common.run_training`)."""

    command = "finetune"

    def setup(self) -> None:
        from entrenar_cli import models, sharding

        self.su = su = setup(self.cfg)
        self.model, self.tokenizer, self.precision = su.model, su.tokenizer, su.precision
        self.train_blocks, self.eval_blocks = su.train_blocks, su.eval_blocks
        self.parameters, self.trainable = models.count_parameters(su.model)
        sharding.mark_planned(self.cfg.training, su.model)  # the logit-path line then tells the truth

    def plan(self) -> dict[str, Any]:
        from entrenar_cli.objectives import planned_logit_path
        from entrenar_cli.trainer import planned_steps

        su, tr = self.su, self.cfg.training
        steps, per_epoch = planned_steps(tr, len(su.train_blocks), world_size())
        logit_path = planned_logit_path(tr, {"model": su.model}) if su.task in ("causal", "masked") else ""
        return {"method": self.cfg.method, "parameters": self.parameters, "trainable_parameters": self.trainable,
                "estimated_mem_bytes": _estimate(su), "logit_loss": logit_path, "steps": steps,
                "steps_per_epoch": per_epoch, "train_blocks": len(su.train_blocks),
                "eval_blocks": len(su.eval_blocks), "precision": su.precision,
                "precision_reason": su.precision_reason}

    def print_plan(self, plan: dict[str, Any]) -> None:
        from entrenar_cli import sharding
        from entrenar_cli.fsutil import human_bytes

        total, trainable, estimate = plan["parameters"], plan["trainable_parameters"], plan["estimated_mem_bytes"]
        info(f"parameters {total:,}, trainable {trainable:,} ({100 * trainable / max(1, total):.2f}%)"
             + (f"; estimated training memory {human_bytes(estimate)}{sharding.memory_note(self.cfg.training)}"
                if estimate else "")
             + f"; precision {plan['precision_reason'] or plan['precision']}"
             + (f"; logit losses: {plan['logit_loss']}" if plan["logit_loss"] else "")
             + weight_average_note(self.cfg.training.ema_decay))

    def disk_bytes(self, plan: dict[str, Any]) -> int:
        lora = self.cfg.method != "full"
        return disk_bytes_needed(self.parameters, self.trainable, self.cfg.output.save_total_limit,
                                 full_model=not lora or self.cfg.output.merge, adapter=lora)

    def objective(self) -> Any:
        from entrenar_cli.chunking import logits_budget
        from entrenar_cli.objectives import LMObjective

        return LMObjective(self.su.task, None, masked_lm_tokens(self.su.task, self.tokenizer),
                           logits_budget(self.cfg.training))

    def summary(self, plan: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
        ev = result.get("eval") or {}
        return {"run": "finetune", "method": self.cfg.method, **{k: result[k] for k in RESULT_FIELDS},
                "estimated_mem_bytes": plan["estimated_mem_bytes"],
                "student": {"name": self.cfg.model.model_id, "parameters": self.parameters,
                            "trainable_parameters": self.trainable,
                            **{k: ev[k] for k in SUMMARY_METRICS if k in ev}}}

    def save(self, model: Any) -> dict[str, str]:
        return save_outputs(model, self.su, self.out)

    def print_summary(self, summary: dict[str, Any]) -> None:
        _print_summary(summary)


def run(cfg: FineTuneYamlConfig, opts: RunOptions) -> dict[str, Any]:
    """Fine-tune; returns the summary (also written to summary.json)."""
    return run_training(FineTuneRun(cfg, opts))


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
