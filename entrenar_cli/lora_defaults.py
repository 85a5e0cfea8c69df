"""The one definition of LoRA's defaults: rank, alpha, dropout and target modules per architecture.

Training (``finetune`` and LoRA students in ``distill``), the memory estimator (``entrenar
estimate``, :mod:`entrenar_cli.estimate`), the YAML schema and the Python API
(:mod:`entrenar_cli.hf_pipeline`) all read these, so the estimate counts exactly the adapters a
run trains. Nothing here imports torch, transformers or peft.
"""

from __future__ import annotations

RANK = 16
ALPHA = 32.0
DROPOUT = 0.05
# used for model types with no entry below: every linear layer except the output head (peft's rule)
FALLBACK_TARGETS = "all-linear"

# the attention projections of each family (peft matches a name equal to a target or ending in ".target")
TARGETS: dict[str, tuple[str, ...]] = {
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mistral": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "qwen3": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "gemma": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "phi": ("q_proj", "k_proj", "v_proj", "dense"),
    "gpt2": ("c_attn", "c_proj"),
    "bert": ("query", "key", "value"),
    "roberta": ("query", "key", "value"),
}


def default_targets(model_type: str | None) -> list[str] | str:
    """The modules LoRA adapts when ``target_modules`` is not set: a list of names, or 'all-linear'."""
    found = TARGETS.get(model_type or "")
    return list(found) if found is not None else FALLBACK_TARGETS


def resolve_targets(target_modules: list[str] | tuple[str, ...] | str | None,
                    model_type: str | None) -> list[str] | str:
    """``target_modules`` as given (a list, a regex string or 'all-linear'), else the default."""
    if target_modules is None or (not isinstance(target_modules, str) and len(target_modules) == 0):
        return default_targets(model_type)
    if isinstance(target_modules, str):
        return "all-linear" if target_modules.lower() == "all-linear" else target_modules
    return list(target_modules)
