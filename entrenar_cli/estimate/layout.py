"""What a configuration builds: its Linear and Embedding modules, and its overall shape.

Everything the estimator reports rests on this layout: the exact parameter count, NF4 / int8
weight sizes (only Linear weights are quantized), LoRA trainable counts (peft adapts Linear and
Embedding modules by name) and the shapes the activation model needs.

Two ways to get it:

* :func:`meta_layout` builds the transformers model on the ``meta`` device (shapes, no memory, no
  weights) and walks its modules: exact for any architecture transformers knows, ~3 s for the
  torch import.
* :func:`analytic_layout` writes the module list down for the catalogue's families (Llama, Mistral,
  Qwen2, GPT-2, BERT/RoBERTa, Phi) without importing torch; ``tests/test_estimate.py`` checks it
  equals the meta-device walk for every catalogue entry, module by module.

Counting convention (the one model cards use): the ``*ForCausalLM`` model for causal language
models (tied embeddings once); the base encoder with its pooler for everything else.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any, Literal

from entrenar_cli.errors import ModelError

Role = Literal["attn_in", "attn_out", "mlp_in", "mlp_out", "embedding", "head", "other"]

_ATTN_SEGMENT = re.compile(r"(^|\.)(self_attn|attn|attention|self_attention|mixer)(\.|$)")
_ATTN_OUT_LEAVES = {"o_proj", "dense", "out_proj", "c_proj", "wo", "o"}
_LAYER_INDEX = re.compile(r"\.(\d+)(\.|$)")
_GATE_LEAVES = ("gate_proj", "gate_up_proj", "w1", "w3", "wi_0", "fc_gate")


@dataclass(frozen=True)
class ModuleInfo:
    """One Linear (or GPT-2 Conv1D) or Embedding module, as transformers names it.

    ``d_in``/``d_out`` are in/out features for linears and (num_embeddings, embedding_dim) for
    embeddings. ``tied`` means the weight is shared with an earlier module and not counted again.
    """

    name: str
    kind: Literal["linear", "embedding"]
    d_in: int
    d_out: int
    bias: bool = False
    tied: bool = False
    output_head: bool = False

    @property
    def weight_params(self) -> int:
        return 0 if self.tied else self.d_in * self.d_out

    @property
    def bias_params(self) -> int:
        return self.d_out if (self.bias and self.kind == "linear") else 0

    @property
    def params(self) -> int:
        return self.weight_params + self.bias_params

    @property
    def leaf(self) -> str:
        return self.name.rsplit(".", 1)[-1]

    @functools.cached_property
    def in_block_name(self) -> str:
        """The name with the block index replaced, equal across identical blocks."""
        return _LAYER_INDEX.sub(r".#\2", self.name, count=1)

    @functools.cached_property
    def layer(self) -> int | None:
        m = _LAYER_INDEX.search(self.name)
        return int(m.group(1)) if m else None


@dataclass(frozen=True)
class Layout:
    """The modules of a model plus the parameters outside them (norms, free-standing tensors)."""

    modules: tuple[ModuleInfo, ...]
    other_params: int
    model_class: str

    @property
    def parameters(self) -> int:
        return sum(m.params for m in self.modules) + self.other_params

    @property
    def head(self) -> ModuleInfo | None:
        return next((m for m in self.modules if m.output_head), None)

    def quantizable_linears(self) -> list[ModuleInfo]:
        """Linears bitsandbytes quantizes: every one except the output head (kept 16-bit)."""
        return [m for m in self.modules if m.kind == "linear" and not m.output_head and not m.tied]

    @functools.cached_property
    def blocks(self) -> dict[int, tuple[ModuleInfo, ...]]:
        """Modules grouped by block index (the first number in their name)."""
        out: dict[int, list[ModuleInfo]] = {}
        for m in self.modules:
            if m.layer is not None:
                out.setdefault(m.layer, []).append(m)
        return {k: tuple(v) for k, v in out.items()}

    def layer_modules(self, index: int) -> tuple[ModuleInfo, ...]:
        return self.blocks.get(index, ())

    def role(self, module: ModuleInfo, hidden: int) -> Role:
        """Where a module sits in a block, for the activation model."""
        if module.output_head:
            return "head"
        if module.kind == "embedding":
            return "embedding"
        if module.layer is None:
            return "other"
        if _ATTN_SEGMENT.search(module.name):
            if module.leaf in _ATTN_OUT_LEAVES or ".output." in module.name:
                return "attn_out"
            return "attn_in"
        return "mlp_in" if module.d_in == hidden else "mlp_out"

    def is_gated(self) -> bool:
        return any(m.leaf in _GATE_LEAVES for m in self.modules if m.layer is not None)


# ----------------------------------------------------------------------------------------------
# config fields under their many names


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language-model part of a config (multimodal configs nest it under ``text_config``)."""
    if "hidden_size" not in config and "n_embd" not in config and isinstance(config.get("text_config"), dict):
        merged = dict(config["text_config"])
        merged.setdefault("model_type", config.get("model_type"))
        return merged
    return config


def field(config: dict[str, Any], *names: str, default: Any = None) -> Any:
    """The first of ``names`` present (and not None) in ``config``."""
    for name in names:
        value = config.get(name)
        if value is not None:
            return value
    return default


@dataclass(frozen=True)
class Shape:
    """The numbers the activation model and the summary need, normalised across families."""

    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int | None
    tie_word_embeddings: bool
    causal_lm: bool
    norm: Literal["rms", "layernorm"]
    hidden_act: str
    gated_mlp: bool
    parallel_block: bool
    attention_dropout: float
    hidden_dropout: float
    embedding_dropout: float

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim


def shape_of(config: dict[str, Any], layout: Layout) -> Shape:
    """Normalise a config (+ its layout, which settles tying and gating) into a :class:`Shape`."""
    cfg = text_config(config)
    model_type = str(cfg.get("model_type") or "unknown")
    hidden = int(field(cfg, "hidden_size", "n_embd", "d_model", "dim", default=0))
    layers = int(field(cfg, "num_hidden_layers", "n_layer", "num_layers", "n_layers", default=0))
    heads = int(field(cfg, "num_attention_heads", "n_head", "num_heads", "n_heads", default=1))
    kv_heads = int(field(cfg, "num_key_value_heads", "num_kv_heads", "n_head_kv", "n_kv_heads", default=heads))
    if cfg.get("multi_query") is True:
        kv_heads = 1
    head_dim = int(field(cfg, "head_dim", default=hidden // max(heads, 1)))
    inter = field(cfg, "intermediate_size", "n_inner", "ffn_dim", "d_ff", "ffn_hidden_size")
    if inter is None:
        inter = 4 * hidden
    head = layout.head
    vocab = int(field(cfg, "vocab_size", "padded_vocab_size", default=head.d_out if head else 0))
    if head is not None:
        vocab = head.d_out
    rms = "rms_norm_eps" in cfg or "layer_norm_rms_epsilon" in cfg or model_type in _RMS_FAMILIES
    act = str(field(cfg, "hidden_act", "activation_function", "hidden_activation", default="gelu"))
    parallel = model_type in ("phi", "gptj", "codegen") or bool(
        cfg.get("use_parallel_residual") or cfg.get("parallel_attn")
    )
    return Shape(
        model_type=model_type,
        num_layers=layers,
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=int(inter),
        vocab_size=vocab,
        max_position_embeddings=field(cfg, "max_position_embeddings", "n_positions", "n_ctx", "max_seq_len"),
        tie_word_embeddings=bool(head is not None and head.tied),
        causal_lm=head is not None,
        norm="rms" if rms else "layernorm",
        hidden_act=act,
        gated_mlp=layout.is_gated(),
        parallel_block=parallel,
        attention_dropout=float(
            field(cfg, "attention_dropout", "attn_pdrop", "attention_probs_dropout_prob", default=0.0)
        ),
        hidden_dropout=float(field(cfg, "resid_pdrop", "hidden_dropout_prob", "hidden_dropout", default=0.0)),
        embedding_dropout=float(field(cfg, "embd_pdrop", "hidden_dropout_prob", "embedding_dropout", default=0.0)),
    )


_RMS_FAMILIES = {"llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "olmo2", "phi3", "smollm3"}


# ----------------------------------------------------------------------------------------------
# analytic layouts (no torch): the catalogue's families


def _lin(name: str, d_in: int, d_out: int, bias: bool = False) -> ModuleInfo:
    return ModuleInfo(name, "linear", d_in, d_out, bias)


def _emb(name: str, num: int, dim: int) -> ModuleInfo:
    return ModuleInfo(name, "embedding", num, dim)


def _llama_like(cfg: dict[str, Any], model_type: str) -> Layout | None:
    if cfg.get("head_dim") not in (None, cfg["hidden_size"] // cfg["num_attention_heads"]):
        return None
    h, layers, heads = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"]
    kv, inter, vocab = cfg.get("num_key_value_heads") or heads, cfg["intermediate_size"], cfg["vocab_size"]
    hd = h // heads
    qkv_bias = {"llama": bool(cfg.get("attention_bias")), "mistral": False, "qwen2": True}[model_type]
    o_bias = bool(cfg.get("attention_bias")) if model_type == "llama" else False
    mlp_bias = bool(cfg.get("mlp_bias")) if model_type == "llama" else False
    mods = [_emb("model.embed_tokens", vocab, h)]
    for i in range(layers):
        p = f"model.layers.{i}"
        mods += [
            _lin(f"{p}.self_attn.q_proj", h, heads * hd, qkv_bias),
            _lin(f"{p}.self_attn.k_proj", h, kv * hd, qkv_bias),
            _lin(f"{p}.self_attn.v_proj", h, kv * hd, qkv_bias),
            _lin(f"{p}.self_attn.o_proj", heads * hd, h, o_bias),
            _lin(f"{p}.mlp.gate_proj", h, inter, mlp_bias),
            _lin(f"{p}.mlp.up_proj", h, inter, mlp_bias),
            _lin(f"{p}.mlp.down_proj", inter, h, mlp_bias),
        ]
    tie = bool(cfg.get("tie_word_embeddings", False))
    mods.append(ModuleInfo("lm_head", "linear", h, vocab, False, tied=tie, output_head=True))
    arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}[model_type]
    return Layout(tuple(mods), other_params=(2 * layers + 1) * h, model_class=arch)


def _gpt2(cfg: dict[str, Any]) -> Layout | None:
    if cfg.get("add_cross_attention"):
        return None
    h, layers, vocab = cfg["n_embd"], cfg["n_layer"], cfg["vocab_size"]
    inner = cfg.get("n_inner") or 4 * h
    mods = [_emb("transformer.wte", vocab, h), _emb("transformer.wpe", cfg.get("n_positions", 1024), h)]
    for i in range(layers):
        p = f"transformer.h.{i}"
        mods += [
            _lin(f"{p}.attn.c_attn", h, 3 * h, True),
            _lin(f"{p}.attn.c_proj", h, h, True),
            _lin(f"{p}.mlp.c_fc", h, inner, True),
            _lin(f"{p}.mlp.c_proj", inner, h, True),
        ]
    tie = bool(cfg.get("tie_word_embeddings", True))
    mods.append(ModuleInfo("lm_head", "linear", h, vocab, False, tied=tie, output_head=True))
    return Layout(tuple(mods), other_params=(4 * layers + 2) * h, model_class="GPT2LMHeadModel")


def _bert_like(cfg: dict[str, Any], model_type: str) -> Layout | None:
    if cfg.get("position_embedding_type", "absolute") != "absolute" or cfg.get("add_cross_attention"):
        return None
    h, layers, vocab, inter = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"], cfg["intermediate_size"]
    mods = [
        _emb("embeddings.word_embeddings", vocab, h),
        _emb("embeddings.position_embeddings", cfg.get("max_position_embeddings", 512), h),
        _emb("embeddings.token_type_embeddings", cfg.get("type_vocab_size", 2), h),
    ]
    for i in range(layers):
        p = f"encoder.layer.{i}"
        mods += [
            _lin(f"{p}.attention.self.query", h, h, True),
            _lin(f"{p}.attention.self.key", h, h, True),
            _lin(f"{p}.attention.self.value", h, h, True),
            _lin(f"{p}.attention.output.dense", h, h, True),
            _lin(f"{p}.intermediate.dense", h, inter, True),
            _lin(f"{p}.output.dense", inter, h, True),
        ]
    mods.append(_lin("pooler.dense", h, h, True))
    cls = {"bert": "BertModel", "roberta": "RobertaModel"}[model_type]
    return Layout(tuple(mods), other_params=(4 * layers + 2) * h, model_class=cls)


def _phi(cfg: dict[str, Any]) -> Layout | None:
    if cfg.get("qk_layernorm"):
        return None
    h, layers, heads = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"]
    kv, inter, vocab = cfg.get("num_key_value_heads") or heads, cfg["intermediate_size"], cfg["vocab_size"]
    hd = h // heads
    mods = [_emb("model.embed_tokens", vocab, h)]
    for i in range(layers):
        p = f"model.layers.{i}"
        mods += [
            _lin(f"{p}.self_attn.q_proj", h, heads * hd, True),
            _lin(f"{p}.self_attn.k_proj", h, kv * hd, True),
            _lin(f"{p}.self_attn.v_proj", h, kv * hd, True),
            _lin(f"{p}.self_attn.dense", heads * hd, h, True),
            _lin(f"{p}.mlp.fc1", h, inter, True),
            _lin(f"{p}.mlp.fc2", inter, h, True),
        ]
    tie = bool(cfg.get("tie_word_embeddings", False))
    mods.append(ModuleInfo("lm_head", "linear", h, vocab, True, tied=tie, output_head=True))
    return Layout(tuple(mods), other_params=(2 * layers + 2) * h, model_class="PhiForCausalLM")


def analytic_layout(config: dict[str, Any]) -> Layout | None:
    """The layout written down for the catalogue's families; None for anything else.

    Only used for configs that are in the catalogue (where a test proves it equals the meta-device
    walk); user configs always go through :func:`meta_layout`, which cannot drift from transformers.
    """
    model_type = config.get("model_type")
    try:
        if model_type in ("llama", "mistral", "qwen2"):
            return _llama_like(config, model_type)
        if model_type == "gpt2":
            return _gpt2(config)
        if model_type in ("bert", "roberta"):
            return _bert_like(config, model_type)
        if model_type == "phi":
            return _phi(config)
    except KeyError:
        return None
    return None


# ----------------------------------------------------------------------------------------------
# meta-device layouts (torch + transformers): any architecture transformers knows


def is_causal_lm_config(config: dict[str, Any]) -> bool:
    """Whether the counted model is the causal-LM class (else the base model, as model cards count).

    The config's ``architectures`` decides when present; otherwise a model type that transformers
    offers as a causal LM but not as a masked LM (BERT-likes are both) counts as causal.
    """
    archs = config.get("architectures") or []
    if archs:
        return any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    try:
        from transformers.models.auto.modeling_auto import (
            MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
            MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        )
    except ImportError:  # pragma: no cover - transformers always has these
        return False
    mt = config.get("model_type")
    return mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and mt not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def build_meta_model(config: dict[str, Any]) -> Any:
    """The transformers model for ``config`` on the meta device: shapes only, no memory, no code from the repo."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    model_type = config.get("model_type")
    if not model_type:
        raise ModelError(
            "config.json has no 'model_type'; cannot tell which architecture it describes",
            hint="pass the directory of a Hugging Face model whose config.json names its model_type",
        )
    fields = {k: v for k, v in config.items() if k not in ("model_type", "auto_map", "quantization_config")}
    try:
        hf_config = AutoConfig.for_model(model_type, **fields)
    except (ValueError, KeyError) as exc:
        raise ModelError(
            f"transformers does not know model type {model_type!r}: {exc}",
            hint="upgrade transformers, or estimate a catalogue model of the same shape "
            "(entrenar estimate --help lists them); remote code is never run",
        ) from None
    auto = AutoModelForCausalLM if is_causal_lm_config(config) else AutoModel
    try:
        with torch.device("meta"):
            return auto.from_config(hf_config)
    except Exception as exc:  # noqa: BLE001 - any construction failure is a config the user must fix
        raise ModelError(
            f"could not build {model_type!r} from this config on the meta device: {type(exc).__name__}: {exc}",
            hint="check the config.json fields; ENTRENAR_DEBUG=1 shows the traceback",
        ) from exc


def layout_of_model(model: Any) -> Layout:
    """Walk a built model: Linear/Conv1D/Embedding modules, tied weights once, the rest as 'other'."""
    import torch.nn as nn

    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        Conv1D = ()  # type: ignore[assignment,misc]

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    seen: set[int] = set()
    mods: list[ModuleInfo] = []
    other = 0
    for name, module in model.named_modules():
        own = list(module.named_parameters(recurse=False))
        if not own and module is not head:
            continue
        if isinstance(module, (nn.Linear, Conv1D)) or isinstance(module, nn.Embedding):
            weight = module.weight
            tied = id(weight) in seen
            seen.add(id(weight))
            bias = getattr(module, "bias", None)
            has_bias = bias is not None
            bias_counted = has_bias and id(bias) not in seen
            if has_bias:
                seen.add(id(bias))
            if isinstance(module, nn.Embedding):
                info = ModuleInfo(name, "embedding", weight.shape[0], weight.shape[1], tied=tied)
            elif isinstance(module, nn.Linear):
                info = ModuleInfo(name, "linear", module.in_features, module.out_features, bias_counted,
                                  tied=tied, output_head=module is head)
            else:  # GPT-2's Conv1D stores (in, out)
                info = ModuleInfo(name, "linear", weight.shape[0], weight.shape[1], bias_counted,
                                  tied=tied, output_head=module is head)
            mods.append(info)
            for pname, p in own:
                if pname not in ("weight", "bias") and id(p) not in seen:
                    seen.add(id(p))
                    other += p.numel()
        else:
            for _, p in own:
                if id(p) not in seen:
                    seen.add(id(p))
                    other += p.numel()
    return Layout(tuple(mods), other_params=other, model_class=type(model).__name__)


def meta_layout(config: dict[str, Any]) -> Layout:
    """The exact layout of ``config`` from transformers itself (meta device, no weights)."""
    return layout_of_model(build_meta_model(config))
