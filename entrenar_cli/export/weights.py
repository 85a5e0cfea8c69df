"""What every exporter writes: named tensors, the model's metadata and (optionally) its HF config.

:class:`ModelWeights` is the one in-memory form shared by the SafeTensors, APR and GGUF writers,
so a model loaded from a Hugging Face directory, a merged LoRA adapter or an APR file goes through
the same code. Tensors are kept as torch tensors in their own dtype (a bf16 model stays bf16 in
SafeTensors and APR); torch is imported inside the functions that need it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch

# SafeTensors dtype names (also used in APR files) <-> torch dtype attribute names
DTYPE_NAMES: dict[str, str] = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}

# tokenizer files copied next to exported weights (and embedded in APR files)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
)


def dtype_name(dtype: "torch.dtype") -> str:
    """The SafeTensors name of a torch dtype ('F32', 'BF16', ...)."""
    short = str(dtype).removeprefix("torch.")
    for name, torch_name in DTYPE_NAMES.items():
        if torch_name == short:
            return name
    raise ValueError(f"unsupported tensor dtype {dtype}")


def torch_dtype(name: str) -> "torch.dtype":
    """The torch dtype for a SafeTensors dtype name."""
    import torch

    if name not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPE_NAMES)}")
    return getattr(torch, DTYPE_NAMES[name])


@dataclass
class ModelMetadata:
    """Model facts written into every export (SafeTensors header, APR metadata, GGUF general.*)."""

    name: str = "model"
    """Human name of the model (GGUF general.name)."""
    architecture: str = ""
    """Hugging Face model_type, e.g. 'llama', 'qwen2', 'gpt2'."""
    hidden_size: int = 0
    num_layers: int = 0
    vocab_size: int = 0
    num_attention_heads: int = 0
    num_key_value_heads: int = 0
    intermediate_size: int = 0
    max_position_embeddings: int = 0
    num_parameters: int = 0
    """Count of stored parameters (tied weights counted once)."""
    dtype: str = ""
    """Dtype of the stored weights ('F32', 'BF16', ...)."""
    source: str = ""
    """Where the model came from (directory, adapter or APR path)."""
    training: dict[str, Any] = field(default_factory=dict)
    """How the model was trained (method, base model, LoRA settings, steps), when known."""

    @classmethod
    def from_config(cls, config: dict[str, Any], name: str = "model", **extra: Any) -> "ModelMetadata":
        """Read the sizes from a Hugging Face config dict (GPT-2 style names included)."""

        def pick(*keys: str) -> int:
            for key in keys:
                value = config.get(key)
                if isinstance(value, int) and not isinstance(value, bool):
                    return value
            return 0

        heads = pick("num_attention_heads", "n_head")
        return cls(
            name=name,
            architecture=str(config.get("model_type", "")),
            hidden_size=pick("hidden_size", "n_embd", "d_model"),
            num_layers=pick("num_hidden_layers", "n_layer"),
            vocab_size=pick("vocab_size"),
            num_attention_heads=heads,
            num_key_value_heads=pick("num_key_value_heads") or heads,
            intermediate_size=pick("intermediate_size", "n_inner"),
            max_position_embeddings=pick("max_position_embeddings", "n_positions"),
            **extra,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelMetadata":
        """Build from a dict, ignoring keys this version does not know (newer files stay readable)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def header_strings(self) -> dict[str, str]:
        """Flat str -> str form for the SafeTensors header (which only stores strings)."""
        out: dict[str, str] = {}
        for key, value in self.to_dict().items():
            if value in ("", 0, {}, None):
                continue
            out[key] = json.dumps(value, sort_keys=True) if isinstance(value, dict) else str(value)
        return out


class ModelWeights:
    """Named tensors plus metadata, the input of every exporter.

    ``config`` (a Hugging Face config dict) and ``tokenizer_dir`` are optional for SafeTensors and
    APR but required for GGUF, whose metadata and vocabulary come from them.
    """

    def __init__(self) -> None:
        self.tensors: dict[str, "torch.Tensor"] = {}
        self.metadata = ModelMetadata()
        self.config: Optional[dict[str, Any]] = None
        self.generation_config: Optional[dict[str, Any]] = None
        self.tokenizer_dir: Optional[Path] = None
        self.files: dict[str, bytes] = {}
        """Extra small files (tokenizer files read from an APR file) keyed by file name."""

    def add_tensor(self, name: str, data: Any, shape: Optional[list[int]] = None) -> None:
        """Add a tensor from a torch tensor, a numpy array or a flat list plus ``shape``."""
        import numpy as np
        import torch

        if isinstance(data, torch.Tensor):
            tensor = data.detach().to("cpu")
        elif isinstance(data, np.ndarray):
            tensor = torch.from_numpy(np.ascontiguousarray(data))
        else:
            tensor = torch.tensor(list(data), dtype=torch.float32)
        if shape is not None:
            expected = 1
            for dim in shape:
                expected *= int(dim)
            if tensor.numel() != expected:
                raise ValueError(f"tensor {name!r}: {tensor.numel()} values do not fill shape {list(shape)}")
            tensor = tensor.reshape([int(d) for d in shape])
        if name in self.tensors:
            raise ValueError(f"tensor {name!r} added twice")
        self.tensors[name] = tensor.contiguous()

    def set_metadata(self, metadata: ModelMetadata) -> None:
        self.metadata = metadata

    def num_parameters(self) -> int:
        return sum(int(t.numel()) for t in self.tensors.values())

    def nbytes(self) -> int:
        return sum(int(t.numel()) * t.element_size() for t in self.tensors.values())

    def tokenizer_source(self) -> Optional[Path]:
        """A directory holding the tokenizer files (materialising embedded APR files if needed)."""
        if self.tokenizer_dir is not None:
            return self.tokenizer_dir
        if not self.files:
            return None
        import tempfile

        tmp = Path(tempfile.mkdtemp(prefix="entrenar-tokenizer-"))
        for fname, blob in self.files.items():
            (tmp / fname).write_bytes(blob)
        self.tokenizer_dir = tmp
        return tmp

    @classmethod
    def from_model(
        cls,
        model: Any,
        *,
        name: str = "model",
        source: str = "",
        tokenizer_dir: Optional[Path] = None,
        training: Optional[dict[str, Any]] = None,
    ) -> "ModelWeights":
        """Take the weights of a transformers model; tensors that share storage are kept once.

        Tied weights (GPT-2's ``lm_head`` is ``wte``) share memory; SafeTensors refuses shared
        tensors and transformers re-ties them on load, so only the first name is written.
        """
        weights = cls()
        seen: set[tuple[int, tuple[int, ...]]] = set()
        for key, tensor in model.state_dict().items():
            ident = (tensor.data_ptr(), tuple(tensor.shape))
            if tensor.numel() and ident in seen:
                continue
            seen.add(ident)
            weights.tensors[key] = tensor.detach().to("cpu").contiguous()
        config = model.config.to_dict()
        weights.config = config
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            try:
                weights.generation_config = gen.to_diff_dict() if hasattr(gen, "to_diff_dict") else gen.to_dict()
            except Exception:  # a generation config that cannot serialise is simply not copied
                weights.generation_config = None
        weights.tokenizer_dir = tokenizer_dir
        first = next(iter(weights.tensors.values()), None)
        weights.metadata = ModelMetadata.from_config(
            config,
            name=name,
            num_parameters=weights.num_parameters(),
            dtype=dtype_name(first.dtype) if first is not None else "",
            source=source,
            training=dict(training or {}),
        )
        return weights

    def to_model(self, *, trust_remote_code: bool = False) -> Any:
        """Build a transformers model from ``config`` and load these tensors (strictly)."""
        import torch
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

        if self.config is None:
            raise ValueError("these weights carry no model config; a model cannot be built from them")
        cfg = dict(self.config)
        model_type = cfg.pop("model_type")
        for key in ("transformers_version", "_name_or_path"):
            cfg.pop(key, None)
        config = AutoConfig.for_model(model_type, **cfg)
        dtype = next(iter(self.tensors.values())).dtype if self.tensors else torch.float32
        auto = AutoModelForCausalLM if is_causal_lm(self.config) else AutoModel
        model = auto.from_config(config, trust_remote_code=trust_remote_code, dtype=dtype)
        result = model.load_state_dict(dict(self.tensors), strict=False)
        if hasattr(model, "tie_weights"):
            model.tie_weights()
        state = model.state_dict()
        loaded = {state[k].data_ptr() for k in self.tensors if k in state}
        # a key missing from the file is fine only when it is tied to a loaded tensor
        missing = [k for k in result.missing_keys if state[k].data_ptr() not in loaded]
        if missing or result.unexpected_keys:
            raise ValueError(
                f"tensors do not match the {model_type} config: missing {missing[:5]}, "
                f"unexpected {list(result.unexpected_keys)[:5]}"
            )
        return model.eval()


def is_causal_lm(config: dict[str, Any]) -> bool:
    """Whether a config describes a text-generation model (it has logits to compare)."""
    archs = config.get("architectures") or []
    if archs:
        return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    return config.get("model_type") in {"llama", "mistral", "qwen2", "gpt2", "phi", "phi3", "gemma", "gemma2"}


def as_float32_numpy(tensor: "torch.Tensor") -> "np.ndarray":
    """A float32 numpy copy (numpy has no bfloat16)."""
    import torch

    return tensor.detach().to(torch.float32).cpu().numpy()
