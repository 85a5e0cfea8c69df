"""The memory estimator, one package: exact parameter counts and an honest training-memory estimate.

The question a practitioner has before renting a GPU is *will this run fit, and with what
settings?* This package answers it from a ``config.json`` alone; this module is its public API:

* :func:`count_parameters` - exact, from the module layout transformers builds for the config (on
  the meta device: no weights, no memory), or from a layout written down for catalogue models and
  tested to be identical;
* :func:`summarize_config` - the architecture plus weight memory in fp32/bf16/fp16/int8/nf4;
* :func:`estimate_training` - weights, gradients, optimizer state, saved activations, logits and
  a distillation teacher for full fine-tuning, LoRA and QLoRA, and the peak of a training step
  (the model is described in :mod:`entrenar_cli.estimate.training` and ``docs/estimate.md``, and
  checked against measured peaks by ``bench/estimate_vs_measured.py``);
* :class:`MemoryEstimate` - the design document's weight-only API (``from_architecture``,
  ``fits_in``).

Internals:

``catalogue`` the model families ``entrenar estimate llama 7b`` knows without a config file.
``layout``    which Linear / Embedding modules a config builds (analytic for the catalogue, meta device
              otherwise), the basis of exact parameter counts, NF4 sizes and LoRA counts.
``training``  the training-memory model: weights, gradients, optimizer state, saved activations,
              logits, teacher, and the peak over the phases of a training step.
``sources``   turning a user's model argument (catalogue name, directory, .gguf, Hub id) into a config.

Nothing here imports torch unless a config outside the catalogue must be built on the meta device.
"""

from __future__ import annotations

import json
import re
from typing import Any

from entrenar_cli import lora_defaults
from entrenar_cli.errors import UsageError
from entrenar_cli.estimate import catalogue
from entrenar_cli.estimate.layout import Layout, Shape, analytic_layout, meta_layout, shape_of
from entrenar_cli.estimate.sources import ResolvedModel, resolve_config, resolve_model
from entrenar_cli.estimate.training import (
    ATTENTIONS,
    METHODS,
    OPTIMIZERS,
    TRAIN_DTYPES,
    EstimateSettings,
    TrainingEstimate,
    estimate_from_layout,
    lora_targets,
    lora_trainable_params,
    max_batch_size,
    nf4_bytes,
    weights_bytes_by_dtype,
)

__all__ = [
    "ATTENTIONS",
    "METHODS",
    "OPTIMIZERS",
    "TRAIN_DTYPES",
    "EstimateSettings",
    "ResolvedModel",
    "TrainingEstimate",
    "WEIGHT_DTYPES",
    "count_parameters",
    "estimate_training",
    "kv_cache_bytes",
    "largest_batch_size",
    "layout_for",
    "lora_trainable_parameters",
    "nf4_bytes",
    "parse_size",
    "resolve_config",
    "resolve_model",
    "shape_for",
    "summarize_config",
]

WEIGHT_DTYPES: tuple[str, ...] = ("fp32", "bf16", "fp16", "int8", "nf4")


# ----------------------------------------------------------------------------------------------
# layouts


def _fingerprint(config: dict[str, Any]) -> str:
    return json.dumps(config, sort_keys=True, default=str)


_CATALOGUE_PRINTS = {_fingerprint(e.config): e for e in catalogue.CATALOGUE.values()}


_LAYOUTS: dict[str, Layout] = {}


def layout_for(config: dict[str, Any]) -> Layout:
    """The module layout of ``config``: written-down for catalogue configs, else built on the meta device."""
    key = _fingerprint(config)
    layout = _LAYOUTS.get(key)
    if layout is None:
        layout = analytic_layout(config) if key in _CATALOGUE_PRINTS else None
        layout = layout or meta_layout(config)
        if len(_LAYOUTS) >= 64:
            _LAYOUTS.clear()
        _LAYOUTS[key] = layout
    return layout


def shape_for(config: dict[str, Any]) -> Shape:
    """The normalised shape (layers, widths, heads, vocabulary, norm, activation) of ``config``."""
    return shape_of(config, layout_for(config))


def count_parameters(config: dict[str, Any]) -> int:
    """Exact parameter count of ``config`` (tied embeddings once).

    Causal language models count their ``*ForCausalLM`` model, other models their base model (with
    pooler), as model cards do: Llama-2-7B gives 6,738,415,616 and bert-base-uncased 109,482,240.
    """
    return layout_for(config).parameters


def lora_trainable_parameters(
    config: dict[str, Any], rank: int = lora_defaults.RANK, target_modules: list[str] | str | None = None
) -> int:
    """What peft's ``get_nb_trainable_parameters()`` reports for LoRA with this rank and these targets
    (None: the targets training uses, :func:`entrenar_cli.lora_defaults.default_targets`)."""
    layout = layout_for(config)
    shape = shape_of(config, layout)
    return lora_trainable_params(lora_targets(layout, shape.model_type, target_modules), rank)


def kv_cache_bytes(config: dict[str, Any], tokens: int, batch_size: int = 1, dtype: str = "bf16") -> int | None:
    """KV cache for ``batch_size`` sequences of ``tokens``: 2 x layers x kv_heads x head_dim x bytes
    per token (None for encoder-only models, which keep no cache)."""
    shape = shape_for(config)
    if not shape.causal_lm:
        return None
    per = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1}[dtype]
    return 2 * shape.num_layers * shape.kv_dim * per * tokens * batch_size


def summarize_config(config: dict[str, Any]) -> dict[str, Any]:
    """The architecture and weight memory of ``config``, as ``entrenar fetch`` and ``estimate`` print it.

    Keys: model_type, architecture (the counted class), num_layers, hidden_size, num_heads,
    num_kv_heads, head_dim, intermediate_size, vocab_size, max_position_embeddings,
    tie_word_embeddings, parameters, weights_bytes {fp32, bf16, fp16, int8, nf4},
    kv_cache_bytes_per_token (16-bit; None for encoders).
    """
    layout = layout_for(config)
    shape = shape_of(config, layout)
    return {
        "model_type": shape.model_type,
        "architecture": layout.model_class,
        "num_layers": shape.num_layers,
        "hidden_size": shape.hidden_size,
        "num_heads": shape.num_heads,
        "num_kv_heads": shape.num_kv_heads,
        "head_dim": shape.head_dim,
        "intermediate_size": shape.intermediate_size,
        "vocab_size": shape.vocab_size,
        "max_position_embeddings": shape.max_position_embeddings,
        "tie_word_embeddings": shape.tie_word_embeddings,
        "parameters": layout.parameters,
        "weights_bytes": weights_bytes_by_dtype(layout),
        "kv_cache_bytes_per_token": (2 * shape.num_layers * shape.kv_dim * 2) if shape.causal_lm else None,
    }


# ----------------------------------------------------------------------------------------------
# training


def _settings(**kwargs: Any) -> EstimateSettings:
    target_modules = kwargs.get("target_modules")
    if isinstance(target_modules, tuple):
        kwargs["target_modules"] = list(target_modules)
    return EstimateSettings(**kwargs)


def estimate_training(
    config: dict[str, Any],
    *,
    method: str = "full",
    rank: int = lora_defaults.RANK,
    target_modules: list[str] | str | None = None,
    batch_size: int = 1,
    seq_len: int = 512,
    dtype: str = "bf16",
    optimizer: str = "adamw",
    gradient_checkpointing: bool = False,
    attention: str = "sdpa",
    teacher_config: dict[str, Any] | None = None,
    lora_alpha: float | None = None,
    lora_dropout: float = lora_defaults.DROPOUT,
    gradient_accumulation: int = 1,
    device: str = "cuda",
    logits_budget: int | None = None,
    weight_average: bool = False,
) -> TrainingEstimate:
    """Modelled peak memory of training ``config`` (bytes, with its components).

    ``method``: full | lora | qlora. ``dtype``: fp32, or bf16/fp16 mixed precision (see
    :mod:`entrenar_cli.estimate.training` for what each recipe keeps). ``target_modules``: a list
    of module names, a regex string, 'all-linear', or None for the
    targets training uses (:mod:`entrenar_cli.lora_defaults`).
    ``teacher_config`` adds a frozen distillation teacher. ``device`` only changes dropout masks
    and the optimizer's temporaries (CUDA: bool masks, foreach AdamW; CPU: dtype masks,
    per-tensor AdamW). ``logits_budget``: bytes of one chunk of the chunked logit losses (what
    entrenar runs by default, training.logits_budget_mb); None counts materialised logits.
    ``weight_average``: training.ema_decay is set (one fp32 copy of the trained tensors, counted with
    the optimizer state). Raises UsageError for invalid settings.
    """
    settings = _settings(
        method=method,
        rank=rank,
        target_modules=target_modules,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        batch_size=batch_size,
        seq_len=seq_len,
        dtype=dtype,
        optimizer=optimizer,
        gradient_checkpointing=gradient_checkpointing,
        gradient_accumulation=gradient_accumulation,
        attention=attention,
        device=device,
        logits_budget=logits_budget,
        weight_average=weight_average,
    )
    layout = layout_for(config)
    teacher = None
    if teacher_config is not None:
        t_layout = layout_for(teacher_config)
        teacher = (t_layout, shape_of(teacher_config, t_layout))
    return estimate_from_layout(layout, shape_of(config, layout), settings, teacher=teacher)


def largest_batch_size(
    config: dict[str, Any], budget_bytes: int, *, teacher_config: dict[str, Any] | None = None, **settings: Any
) -> int:
    """The largest batch size whose :func:`estimate_training` peak fits ``budget_bytes`` (0 if none)."""
    layout = layout_for(config)
    teacher = None
    if teacher_config is not None:
        t_layout = layout_for(teacher_config)
        teacher = (t_layout, shape_of(teacher_config, t_layout))
    return max_batch_size(layout, shape_of(config, layout), _settings(**settings), budget_bytes, teacher=teacher)


# ----------------------------------------------------------------------------------------------
# sizes


_UNITS = {
    "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]+)\s*$")


def parse_size(text: str) -> int:
    """'24GB' -> 24e9 bytes, '24GiB' -> 24 x 2^30 (also B, KB/KiB, MB/MiB, TB/TiB; case-insensitive).

    A unit is required: GB and GiB differ by 7%, and a card sold as "24 GB" has 24 GiB.
    """
    m = _SIZE_RE.match(text or "")
    if not m or m.group(2).lower() not in _UNITS:
        raise UsageError(
            f"cannot read the size {text!r}",
            hint="give a number with a unit: 24GB (10^9 bytes) or 24GiB (2^30 bytes); also MB, MiB, TB, TiB",
        )
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def describe_architecture(config: dict[str, Any] | None) -> dict[str, Any] | None:
    """Model type, layers, widths, parameters and weight memory of a fetched model's config.

    A config the estimator cannot read must not fail a download that worked, so the summary then
    falls back to what ``config.json`` names directly, with the reason.
    """
    if config is None:
        return None
    basic = {"model_type": config.get("model_type"), "architectures": config.get("architectures")}
    try:
        summary = dict(summarize_config(config))
    except Exception as exc:  # noqa: BLE001 - any estimator failure degrades to the basic facts
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return {**basic, "note": f"no memory estimate: {reason}"}
    if not summary.get("architecture") and config.get("architectures"):
        summary["architectures"] = config.get("architectures")
    return summary
