"""GGUF export that llama.cpp loads: metadata, tokenizer, permuted q/k, llama.cpp's quant blocks.

Everything format-specific comes from the ``gguf`` package (the one llama.cpp ships): the writer,
the architecture and tensor-name tables, the quantizers and the tokenizer readers. What this
module adds is the recipe that the Rust original got wrong (REFERENCE.md section 4):

* llama-family ``q_proj``/``k_proj`` rows are permuted from Hugging Face's rotate-half layout to
  the interleaved pairs llama.cpp's rope expects (qwen2 uses NEOX rope and is left as is);
* norms, biases and other 1-D tensors stay F32 whatever the quantization;
* tied embeddings are written once (llama.cpp reuses ``token_embd`` when ``output`` is absent);
* the vocabulary, merges, special tokens and the pre-tokenizer name llama.cpp needs to split
  text the way the Hugging Face tokenizer does.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from entrenar_cli.errors import ModelError, UsageError
from entrenar_cli.export.weights import ModelWeights, as_float32_numpy

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

# Hugging Face model_type -> llama.cpp architecture name
GGUF_ARCHITECTURES: dict[str, str] = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "gpt2": "gpt2"}
GGUF_QUANTIZATIONS = ("f32", "f16", "bf16", "q8_0", "q4_0")
# pre-tokenizer regexes as they appear in tokenizer.json (Split pre-tokenizer) -> llama.cpp name
_SPLIT_REGEX_PRE = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",  # noqa: E501
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",  # noqa: E501
}
# tensors that are recomputed at load time, never stored
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")
# GPT-2 stores these as Conv1D (in, out); GGUF wants (out, in) like nn.Linear
_GPT2_CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")


@dataclass
class GGUFInfo:
    """What was written, for the parity report and for tests."""

    architecture: str
    quantization: str
    tokenizer_model: str
    tokenizer_pre: Optional[str]
    n_tokens: int
    tensor_types: dict[str, str] = field(default_factory=dict)
    rounding: dict[str, tuple[str, bool]] = field(default_factory=dict)
    """Source tensor name -> (GGML type, stored transposed) for every tensor not stored as F32."""
    notes: list[str] = field(default_factory=list)


def check_supported(config: Optional[dict[str, Any]]) -> str:
    """Return the llama.cpp architecture for a config, or refuse with a message saying why."""
    if config is None:
        raise UsageError(
            "GGUF export needs the model's config (architecture, sizes, rope settings)",
            hint="export from a Hugging Face model directory, or set ModelWeights.config",
        )
    model_type = str(config.get("model_type", ""))
    if model_type not in GGUF_ARCHITECTURES:
        raise UsageError(
            f"GGUF export supports the llama, mistral, qwen2 and gpt2 architectures; this model is {model_type!r}",
            hint="use --format safetensors (any architecture) or --format apr",
        )
    problems: list[str] = []
    if model_type == "gpt2":
        act = config.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            problems.append(f"activation_function {act!r} (llama.cpp's gpt2 uses the tanh GELU)")
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if config.get(flag):
                problems.append(f"{flag}=true (not implemented by llama.cpp)")
    else:
        if config.get("hidden_act", "silu") != "silu":
            problems.append(f"hidden_act {config.get('hidden_act')!r} (llama.cpp's {model_type} uses SiLU)")
        rope = _rope_parameters(config)
        rope_type = rope.get("rope_type") or rope.get("type") or "default"
        if rope_type not in ("default", "linear"):
            problems.append(f"rope scaling {rope_type!r} (supported: none, linear)")
        if float(rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)) or 1.0) != 1.0:
            problems.append("partial rotary embeddings")
    if problems:
        raise UsageError(
            f"this {model_type} model uses features the GGUF export does not handle: " + "; ".join(problems),
            hint="use --format safetensors",
        )
    return GGUF_ARCHITECTURES[model_type]


def permute_rotary(w: "np.ndarray", n_head: int) -> "np.ndarray":
    """HF rotate-half q/k rows -> llama.cpp interleaved pairs (per head: [x0..x(d/2-1), y..] -> [x0,y0,...]).

    Works for weights (rows, cols) and biases (rows,). Use n_kv_head for k_proj.
    """
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(
    weights: ModelWeights,
    path: Path,
    quantize: str = "f32",
    *,
    include_metadata: bool = True,
    permute_qk: bool = True,
) -> GGUFInfo:
    """Write ``weights`` (with config and tokenizer) as a GGUF file llama.cpp can load.

    ``permute_qk=False`` exists only for the negative-control test: the file then loads but
    computes the wrong thing, which the parity check must catch.
    """
    import gguf

    if quantize not in GGUF_QUANTIZATIONS:
        raise UsageError(f"--quantize {quantize!r} is not a GGUF type",
                         hint=f"choose one of {', '.join(GGUF_QUANTIZATIONS)}")
    config = weights.config
    arch = check_supported(config)
    assert config is not None
    tokenizer_dir = weights.tokenizer_source()
    if tokenizer_dir is None:
        raise ModelError(
            "GGUF export needs the tokenizer: llama.cpp reads the vocabulary from the GGUF file",
            hint="pass --tokenizer DIR (a directory with tokenizer.json or tokenizer.model)",
        )
    n_layers = int(config.get("num_hidden_layers", config.get("n_layer", 0)))
    writer = gguf.GGUFWriter(str(path), arch)
    info = GGUFInfo(architecture=arch, quantization=quantize, tokenizer_model="", tokenizer_pre=None, n_tokens=0)
    try:
        writer.add_name(weights.metadata.name or "model")
        if include_metadata and weights.metadata.training:
            writer.add_description("trained with entrenar: " + json.dumps(weights.metadata.training, sort_keys=True))
        _add_hparams(writer, arch, config)
        window = config.get("sliding_window")
        if window and (config.get("model_type") == "mistral" or config.get("use_sliding_window")):
            info.notes.append(
                f"sliding-window attention ({window} tokens) is not representable here: llama.cpp attends to "
                "the whole context, which only differs on sequences longer than the window"
            )
        writer.add_file_type(_file_type(quantize))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        vocab_size = int(config.get("vocab_size", 0))
        _add_tokenizer(writer, tokenizer_dir, vocab_size, info)
        name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], n_layers)
        for key, name, data, transposed in _gguf_tensors(weights, config, arch, name_map, permute_qk):
            qtype = _tensor_qtype(name, data, quantize, info)
            writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
            info.tensor_types[name] = qtype.name
            if qtype != gguf.GGMLQuantizationType.F32:
                info.rounding[key] = (qtype.name, transposed)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return info


def _rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """transformers 5 keeps rope settings in ``rope_parameters``; older configs in ``rope_scaling``."""
    rope = dict(config.get("rope_scaling") or {})
    rope.update(config.get("rope_parameters") or {})
    if "rope_theta" not in rope and config.get("rope_theta") is not None:
        rope["rope_theta"] = config["rope_theta"]
    return rope


def _add_hparams(writer: Any, arch: str, config: dict[str, Any]) -> None:
    import gguf

    if arch == "gpt2":
        n_embd = int(config["n_embd"])
        writer.add_context_length(int(config["n_positions"]))
        writer.add_embedding_length(n_embd)
        writer.add_block_count(int(config["n_layer"]))
        writer.add_feed_forward_length(int(config.get("n_inner") or 4 * n_embd))
        writer.add_head_count(int(config["n_head"]))
        writer.add_layer_norm_eps(float(config.get("layer_norm_epsilon", 1e-5)))
        return
    hidden = int(config["hidden_size"])
    n_head = int(config["num_attention_heads"])
    n_kv = int(config.get("num_key_value_heads") or n_head)
    head_dim = int(config.get("head_dim") or hidden // n_head)
    rope = _rope_parameters(config)
    writer.add_vocab_size(int(config["vocab_size"]))
    writer.add_context_length(int(config.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(hidden)
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != hidden // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if (rope.get("rope_type") or rope.get("type")) == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))


def _file_type(quantize: str) -> int:
    import gguf

    return {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    }[quantize]


def _tensor_qtype(name: str, data: "np.ndarray", quantize: str, info: GGUFInfo) -> Any:
    """Per-tensor GGML type: 1-D tensors and position embeddings F32 (as llama.cpp's converter does);
    q4_0 keeps token_embd/output at Q8_0 (llama.cpp's own quantizer keeps them high too); rows that
    do not fill quant blocks fall back to F16."""
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as T

    if data.ndim <= 1 or name.endswith(("_norm.weight", ".bias")) or name == "position_embd.weight":
        return T.F32
    qtype = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0}[quantize]
    if quantize == "q4_0" and name in ("token_embd.weight", "output.weight"):
        qtype = T.Q8_0
    block = GGML_QUANT_SIZES[qtype][0]
    if data.shape[-1] % block:
        info.notes.append(f"{name}: row size {data.shape[-1]} is not a multiple of {block}; stored as F16")
        qtype = T.F16
    return qtype


def _gguf_tensors(
    weights: ModelWeights, config: dict[str, Any], arch: str, name_map: Any, permute_qk: bool
) -> Iterator[tuple[str, str, "np.ndarray", bool]]:
    """(source name, GGUF name, float32 array, transposed) in llama.cpp's layout; every tensor is
    either mapped or known to be recomputed at load time."""
    import numpy as np

    n_head = int(config.get("num_attention_heads", config.get("n_head", 0)))
    n_kv = int(config.get("num_key_value_heads") or n_head)
    tensors = weights.tensors
    embed_key = next((k for k in tensors if k.endswith(("embed_tokens.weight", "wte.weight"))), None)
    tied = "lm_head.weight" not in tensors or (
        embed_key is not None and bool(config.get("tie_word_embeddings"))
        and _same(tensors["lm_head.weight"], tensors[embed_key])
    )
    for key, tensor in tensors.items():
        if key.endswith(_IGNORED_SUFFIXES) or (key == "lm_head.weight" and tied):
            continue
        new_name = name_map.get_name(key, try_suffixes=(".weight", ".bias"))
        if new_name is None:
            raise ModelError(
                f"cannot map tensor {key!r} to a llama.cpp {arch} tensor",
                hint="this checkpoint has weights the GGUF layout has no place for; use --format safetensors",
            )
        data = as_float32_numpy(tensor)
        transposed = arch == "gpt2" and key.endswith(_GPT2_CONV1D)
        if transposed:
            data = np.ascontiguousarray(data.T)
        if arch == "llama" and permute_qk:
            if key.endswith(("q_proj.weight", "q_proj.bias")):
                data = permute_rotary(data, n_head)
            elif key.endswith(("k_proj.weight", "k_proj.bias")):
                data = permute_rotary(data, n_kv)
        yield key, new_name, np.ascontiguousarray(data, dtype=np.float32), transposed


def apply_gguf_rounding(state: dict[str, Any], rounding: dict[str, tuple[str, bool]]) -> dict[str, Any]:
    """The source tensors with exactly the rounding the GGUF file applied (gguf's own quantize and
    dequantize). Quant blocks run along rows and the q/k permutation moves whole rows, so rounding
    the unpermuted tensor gives the same numbers as the file holds."""
    import gguf
    import numpy as np
    import torch

    out = {}
    for key, (qname, transposed) in rounding.items():
        qtype = gguf.GGMLQuantizationType[qname]
        w = as_float32_numpy(state[key])
        layout = np.ascontiguousarray(w.T if transposed else w)
        back = gguf.quants.dequantize(gguf.quants.quantize(layout, qtype), qtype).reshape(layout.shape)
        out[key] = torch.from_numpy(np.ascontiguousarray(back.T if transposed else back, dtype=np.float32))
    return out


def _same(a: Any, b: Any) -> bool:
    import torch

    return a.shape == b.shape and bool(torch.equal(a, b))


# ---------------------------------------------------------------------------------------------
# tokenizer


def detect_pre_tokenizer(tokenizer_json: dict[str, Any]) -> str:
    """llama.cpp's name for a byte-level BPE pre-tokenizer, read from its definition.

    llama.cpp's converter recognises tokenizers by hashing a tokenization; reading the
    pre-tokenizer itself is exact for the definitions below and refuses the rest instead of
    guessing (a wrong name silently changes how text is split).
    """
    pre = tokenizer_json.get("pre_tokenizer") or {}
    items = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in items]
    normalizer = tokenizer_json.get("normalizer")
    if kinds == ["ByteLevel"] and items[0].get("use_regex", True) and not items[0].get("add_prefix_space"):
        name = "gpt-2"
    elif (
        kinds == ["Digits", "ByteLevel"]
        and items[0].get("individual_digits")
        and items[1].get("use_regex", True)
        and not items[1].get("add_prefix_space")
    ):
        name = "smollm"
    elif kinds == ["Split", "ByteLevel"] and not items[1].get("use_regex", True):
        pattern = (items[0].get("pattern") or {}).get("Regex")
        name = _SPLIT_REGEX_PRE.get(pattern or "", "")
    else:
        name = ""
    if name and normalizer and not (name == "qwen2" and normalizer.get("type") == "NFC"):
        name = ""
    if not name:
        raise ModelError(
            f"the tokenizer's pre-tokenizer ({json.dumps(pre)[:120]}) is not one llama.cpp is known to reproduce",
            hint="supported: GPT-2 byte-level, SmolLM/StarCoder digits + byte-level, Llama-3 and Qwen2 regex splits",
        )
    return name


def _add_tokenizer(writer: Any, tokenizer_dir: Path, vocab_size: int, info: GGUFInfo) -> None:
    import gguf

    hf_tok = _load_hf_tokenizer(tokenizer_dir)
    tj = _effective_tokenizer_json(hf_tok, tokenizer_dir)
    model = (tj or {}).get("model") or {}
    if tj is not None and model.get("type") == "BPE" and not model.get("byte_fallback"):
        tokens, types = _bpe_tokens(tj, vocab_size)
        pre = detect_pre_tokenizer(tj)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        info.tokenizer_model, info.tokenizer_pre = "gpt2", pre
        load_merges = True
    else:
        vocab: Any
        if tj is not None and model.get("type") == "BPE" and (tokenizer_dir / "tokenizer.json").is_file():
            # SentencePiece converted to tokenizer.json (byte fallback), as Llama-2 style repos ship it
            vocab = gguf.vocab.LlamaHfVocab(tokenizer_dir)
        elif (tokenizer_dir / "tokenizer.model").is_file():
            vocab = gguf.vocab.SentencePieceVocab(tokenizer_dir)
        else:
            kind = model.get("type") if tj is not None else "none found"
            raise ModelError(
                f"tokenizer in {tokenizer_dir} ({kind}) cannot be written to GGUF",
                hint="supported: byte-level BPE (GPT-2 style) with tokenizer.json, or SentencePiece (tokenizer.model)",
            )
        tokens, scores, types = [], [], []
        for text, score, ttype in vocab.all_tokens():
            tokens.append(text)
            scores.append(float(score))
            types.append(int(ttype))
        for i in range(len(tokens), vocab_size):  # the model may have more rows than tokens
            tokens.append(f"[PAD{i}]".encode())
            scores.append(-1000.0)
            types.append(int(gguf.TokenType.UNUSED))
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        info.tokenizer_model, info.tokenizer_pre = "llama", "default"
        load_merges = False
    if vocab_size and len(tokens) > vocab_size:
        raise ModelError(
            f"the tokenizer has {len(tokens)} tokens but the model's embedding has {vocab_size} rows",
            hint="export with the tokenizer the model was trained with (--tokenizer DIR)",
        )
    info.n_tokens = len(tokens)
    special = gguf.SpecialVocab(tokenizer_dir, load_merges=load_merges, n_vocab=len(tokens))
    if load_merges and tj is not None and model.get("merges"):
        special.merges = _merge_strings(model["merges"])  # the merges transformers actually uses
    special.add_special_token.update(_adds_special_tokens(hf_tok))
    special.add_to_gguf(writer, quiet=True)


def _merge_strings(merges: list[Any]) -> list[str]:
    """GGUF stores merges as "left right"; tokenizers >= 0.20 writes [left, right] pairs, where a
    literal space inside a part is encoded as U+0120 the way llama.cpp's converter does it."""
    out = []
    for merge in merges:
        if isinstance(merge, str):
            out.append(merge)
        else:
            out.append(" ".join(part.replace(" ", chr(ord(" ") + 256)) for part in merge))
    return out


def _bpe_tokens(tj: dict[str, Any], vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens by id with llama.cpp token types (special added tokens CONTROL, others USER_DEFINED)."""
    import gguf

    by_id: dict[int, str] = {int(i): t for t, i in tj["model"]["vocab"].items()}
    kinds: dict[int, int] = {i: int(gguf.TokenType.NORMAL) for i in by_id}
    for added in tj.get("added_tokens") or []:
        tid = int(added["id"])
        by_id[tid] = added["content"]
        kinds[tid] = int(gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED)
    n = max(vocab_size, max(by_id) + 1 if by_id else 0)
    tokens: list[str] = []
    types: list[int] = []
    for i in range(n):
        if i in by_id:
            tokens.append(by_id[i])
            types.append(kinds[i])
        else:
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
    return tokens, types


def _load_hf_tokenizer(tokenizer_dir: Path) -> Any:
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(tokenizer_dir))
    except Exception:  # no loadable HF tokenizer: fall back to the files themselves
        return None


def _effective_tokenizer_json(hf_tok: Any, tokenizer_dir: Path) -> Optional[dict[str, Any]]:
    """The tokenizer as transformers actually runs it, else tokenizer.json as written.

    They can differ: for some model types (qwen2, ...) transformers builds its own pre-tokenizer
    instead of the one in tokenizer.json, and llama.cpp must split text like the former.
    """
    backend = getattr(hf_tok, "backend_tokenizer", None)
    if backend is not None:
        try:
            return json.loads(backend.to_str())
        except Exception:  # pragma: no cover - a backend that cannot serialise itself
            pass
    path = tokenizer_dir / "tokenizer.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _adds_special_tokens(tok: Any) -> dict[str, bool]:
    """Whether the Hugging Face tokenizer puts BOS/EOS around text, observed rather than parsed.

    The heuristics in config files disagree between tokenizer generations; tokenizing a word and
    looking at the ends is what the user will actually get.
    """
    if tok is None:
        return {}
    try:
        ids = list(tok("hello world")["input_ids"])
    except Exception:  # keep what gguf's SpecialVocab read
        return {}
    out: dict[str, bool] = {}
    if tok.bos_token_id is not None:
        out["bos"] = bool(ids) and ids[0] == tok.bos_token_id
    if tok.eos_token_id is not None:
        out["eos"] = bool(ids) and ids[-1] == tok.eos_token_id
    return out
