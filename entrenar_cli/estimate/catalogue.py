"""Built-in catalogue of published model configurations for ``entrenar estimate FAMILY SIZE``.

Each entry holds the architecture fields of a published ``config.json`` (from the repo it
cites; tokenizer ids and bookkeeping such as ``transformers_version`` are left out, since no
parameter or activation depends on them) plus the exact parameter count. The counts are those in
``REFERENCE.md`` section 3 (and SmolLM2's model card); ``tests/test_estimate.py`` checks that
building each config on the meta device with transformers gives exactly the stored number, so a
catalogue answer needs no torch import and stays under a second.

Counting convention (the one model cards use): causal language models count the whole
``*ForCausalLM`` model with tied embeddings once; encoder-only models (BERT, RoBERTa) count the
base encoder with its pooler, without the pre-training head.

Pure data and dict lookups: no torch, no transformers.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from entrenar_cli.errors import UsageError


@dataclass(frozen=True)
class CatalogueEntry:
    """One published model: where its config came from, the config, and its exact size."""

    family: str
    size: str
    repo: str  # the Hub repo whose config.json the fields below were copied from
    parameters: int
    config: dict[str, Any]

    @property
    def display_name(self) -> str:
        return f"{self.family} {self.size}"

    def config_copy(self) -> dict[str, Any]:
        """A deep copy, so callers may annotate it freely."""
        return copy.deepcopy(self.config)


def _llama2(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "max_position_embeddings": 4096,
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "vocab_size": 32000,
    }


def _qwen25(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, *, vocab: int,
            tie: bool, max_pos: int) -> dict[str, Any]:
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "attention_dropout": 0.0,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "max_position_embeddings": max_pos,
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": max_pos,
        "tie_word_embeddings": tie,
        "torch_dtype": "bfloat16",
        "use_sliding_window": False,
        "vocab_size": vocab,
    }


_ENTRIES: list[CatalogueEntry] = [
    CatalogueEntry("llama", "7b", "meta-llama/Llama-2-7b-hf", 6_738_415_616, _llama2(4096, 11008, 32, 32, 32)),
    CatalogueEntry("llama", "13b", "meta-llama/Llama-2-13b-hf", 13_015_864_320, _llama2(5120, 13824, 40, 40, 40)),
    CatalogueEntry("llama", "70b", "meta-llama/Llama-2-70b-hf", 68_976_648_192, _llama2(8192, 28672, 80, 64, 8)),
    CatalogueEntry(
        "llama3", "8b", "meta-llama/Meta-Llama-3-8B", 8_030_261_248,
        {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "hidden_act": "silu",
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "max_position_embeddings": 8192,
            "num_attention_heads": 32,
            "num_hidden_layers": 32,
            "num_key_value_heads": 8,
            "pretraining_tp": 1,
            "rms_norm_eps": 1e-05,
            "rope_scaling": None,
            "rope_theta": 500000.0,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
            "vocab_size": 128256,
        },
    ),
    CatalogueEntry(
        "mistral", "7b", "mistralai/Mistral-7B-v0.1", 7_241_732_096,
        {
            "architectures": ["MistralForCausalLM"],
            "model_type": "mistral",
            "hidden_act": "silu",
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "max_position_embeddings": 32768,
            "num_attention_heads": 32,
            "num_hidden_layers": 32,
            "num_key_value_heads": 8,
            "rms_norm_eps": 1e-05,
            "rope_theta": 10000.0,
            "sliding_window": 4096,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
            "vocab_size": 32000,
        },
    ),
    CatalogueEntry("qwen2.5", "0.5b", "Qwen/Qwen2.5-0.5B", 494_032_768,
                   _qwen25(896, 4864, 24, 14, 2, vocab=151936, tie=True, max_pos=32768)),
    CatalogueEntry("qwen2.5", "1.5b", "Qwen/Qwen2.5-1.5B", 1_543_714_304,
                   _qwen25(1536, 8960, 28, 12, 2, vocab=151936, tie=True, max_pos=131072)),
    CatalogueEntry("qwen2.5", "7b", "Qwen/Qwen2.5-7B", 7_615_616_512,
                   _qwen25(3584, 18944, 28, 28, 4, vocab=152064, tie=False, max_pos=131072)),
    CatalogueEntry(
        "tinyllama", "1.1b", "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T", 1_100_048_384,
        {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "hidden_size": 2048,
            "intermediate_size": 5632,
            "max_position_embeddings": 2048,
            "num_attention_heads": 32,
            "num_hidden_layers": 22,
            "num_key_value_heads": 4,
            "pretraining_tp": 1,
            "rms_norm_eps": 1e-05,
            "rope_scaling": None,
            "rope_theta": 10000.0,
            "tie_word_embeddings": False,
            "torch_dtype": "float32",
            "vocab_size": 32000,
        },
    ),
    CatalogueEntry(
        "smollm2", "135m", "HuggingFaceTB/SmolLM2-135M", 134_515_008,
        {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "hidden_act": "silu",
            "hidden_size": 576,
            "intermediate_size": 1536,
            "max_position_embeddings": 8192,
            "mlp_bias": False,
            "num_attention_heads": 9,
            "num_hidden_layers": 30,
            "num_key_value_heads": 3,
            "pretraining_tp": 1,
            "rms_norm_eps": 1e-05,
            "rope_scaling": None,
            "rope_theta": 100000,
            "tie_word_embeddings": True,
            "torch_dtype": "bfloat16",
            "vocab_size": 49152,
        },
    ),
    CatalogueEntry(
        "gpt2", "124m", "openai-community/gpt2", 124_439_808,
        {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "activation_function": "gelu_new",
            "attn_pdrop": 0.1,
            "embd_pdrop": 0.1,
            "layer_norm_epsilon": 1e-05,
            "n_ctx": 1024,
            "n_embd": 768,
            "n_head": 12,
            "n_layer": 12,
            "n_positions": 1024,
            "resid_pdrop": 0.1,
            "vocab_size": 50257,
        },
    ),
    CatalogueEntry(
        "bert", "base", "google-bert/bert-base-uncased", 109_482_240,
        {
            "architectures": ["BertForMaskedLM"],
            "model_type": "bert",
            "attention_probs_dropout_prob": 0.1,
            "hidden_act": "gelu",
            "hidden_dropout_prob": 0.1,
            "hidden_size": 768,
            "intermediate_size": 3072,
            "layer_norm_eps": 1e-12,
            "max_position_embeddings": 512,
            "num_attention_heads": 12,
            "num_hidden_layers": 12,
            "pad_token_id": 0,
            "position_embedding_type": "absolute",
            "type_vocab_size": 2,
            "vocab_size": 30522,
        },
    ),
    CatalogueEntry(
        "roberta", "base", "FacebookAI/roberta-base", 124_645_632,
        {
            "architectures": ["RobertaForMaskedLM"],
            "model_type": "roberta",
            "attention_probs_dropout_prob": 0.1,
            "hidden_act": "gelu",
            "hidden_dropout_prob": 0.1,
            "hidden_size": 768,
            "intermediate_size": 3072,
            "layer_norm_eps": 1e-05,
            "max_position_embeddings": 514,
            "num_attention_heads": 12,
            "num_hidden_layers": 12,
            "pad_token_id": 1,
            "type_vocab_size": 1,
            "vocab_size": 50265,
        },
    ),
    CatalogueEntry(
        "codebert", "base", "microsoft/codebert-base", 124_645_632,
        {
            "architectures": ["RobertaModel"],
            "model_type": "roberta",
            "attention_probs_dropout_prob": 0.1,
            "hidden_act": "gelu",
            "hidden_dropout_prob": 0.1,
            "hidden_size": 768,
            "intermediate_size": 3072,
            "layer_norm_eps": 1e-05,
            "max_position_embeddings": 514,
            "num_attention_heads": 12,
            "num_hidden_layers": 12,
            "pad_token_id": 1,
            "type_vocab_size": 1,
            "vocab_size": 50265,
        },
    ),
    CatalogueEntry(
        "phi2", "2.7b", "microsoft/phi-2", 2_779_683_840,
        {
            "architectures": ["PhiForCausalLM"],
            "model_type": "phi",
            "attention_dropout": 0.0,
            "embd_pdrop": 0.0,
            "hidden_act": "gelu_new",
            "hidden_size": 2560,
            "intermediate_size": 10240,
            "layer_norm_eps": 1e-05,
            "max_position_embeddings": 2048,
            "num_attention_heads": 32,
            "num_hidden_layers": 32,
            "num_key_value_heads": 32,
            "partial_rotary_factor": 0.4,
            "qk_layernorm": False,
            "resid_pdrop": 0.1,
            "rope_scaling": None,
            "rope_theta": 10000.0,
            "tie_word_embeddings": False,
            "torch_dtype": "float16",
            "vocab_size": 51200,
        },
    ),
]

# Other spellings users type. Family aliases map to a family; size aliases to (family, size).
_FAMILY_ALIASES: dict[str, str] = {
    "llama2": "llama",
    "llama-2": "llama",
    "llama-3": "llama3",
    "qwen": "qwen2.5",
    "qwen2.5": "qwen2.5",
    "qwen-2.5": "qwen2.5",
    "phi-2": "phi2",
    "smollm": "smollm2",
    "smollm-2": "smollm2",
    "gpt-2": "gpt2",
}
_SIZE_ALIASES: dict[tuple[str, str], str] = {
    ("gpt2", "small"): "124m",
    ("gpt2", "base"): "124m",
    ("phi2", "2b"): "2.7b",
    ("phi2", "3b"): "2.7b",
}

CATALOGUE: dict[tuple[str, str], CatalogueEntry] = {(e.family, e.size): e for e in _ENTRIES}


def families() -> dict[str, list[str]]:
    """Known families and their sizes, in catalogue order (for help and error messages)."""
    out: dict[str, list[str]] = {}
    for entry in _ENTRIES:
        out.setdefault(entry.family, []).append(entry.size)
    return out


def known_models_text() -> str:
    """One line listing every family with its sizes, e.g. 'llama (7b, 13b, 70b), ...'."""
    return ", ".join(f"{fam} ({', '.join(sizes)})" for fam, sizes in families().items())


def _family_key(family: str) -> str | None:
    key = family.strip().lower()
    key = _FAMILY_ALIASES.get(key, key)
    return key if key in families() else None


def canonical_family(name: str) -> str:
    """The catalogue's name for a family or alias ('Llama2' -> 'llama'); UsageError when unknown."""
    fam = _family_key(name)
    if fam is None:
        raise UsageError(
            f"unknown model family {name!r}",
            hint=f"known families: {known_models_text()}; or pass a local model directory or a "
            "Hub repo id (org/name)",
        )
    return fam


def is_family(name: str) -> bool:
    """Whether ``name`` is a catalogue family or one of its aliases."""
    return _family_key(name) is not None


def lookup(family: str, size: str | None = None) -> CatalogueEntry:
    """The entry for FAMILY SIZE (case-insensitive; SIZE may be omitted when the family has one).

    Raises UsageError (exit 2) naming every known family and size when nothing matches.
    """
    fam = canonical_family(family)
    sizes = families()[fam]
    if size is None:
        if len(sizes) == 1:
            return CATALOGUE[(fam, sizes[0])]
        raise UsageError(
            f"model family {fam!r} needs a size",
            hint=f"known sizes for {fam}: {', '.join(sizes)} (e.g. 'entrenar estimate {fam} {sizes[0]}')",
        )
    sz = size.strip().lower().replace(" ", "")
    sz = _SIZE_ALIASES.get((fam, sz), sz)
    entry = CATALOGUE.get((fam, sz))
    if entry is None:
        raise UsageError(
            f"unknown size {size!r} for model family {fam!r}",
            hint=f"known sizes for {fam}: {', '.join(sizes)}; all families: {known_models_text()}",
        )
    return entry
