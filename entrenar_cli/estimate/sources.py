"""Turn what the user typed into a ``config.json`` dict, reading nothing but configuration.

Accepted: a catalogue family and size (``llama 7b``, ``llama:7b``), a local Hugging Face model
directory (its ``config.json``), a local ``config.json``, a local ``.gguf`` file (its metadata), or a
Hub repo id (only ``config.json`` is fetched, through :func:`entrenar_cli.hub.fetch_config_json`).
No weights are read or downloaded, and no code from a repo runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from entrenar_cli.errors import EntrenarError, ModelError, UsageError
from entrenar_cli.estimate import catalogue


@dataclass(frozen=True)
class ResolvedModel:
    """A model's configuration and where it came from."""

    config: dict[str, Any]
    name: str  # what to call it in output: 'llama 7b', a path, a repo id
    source: str  # 'catalogue' | 'local' | 'gguf' | 'hub'
    repo: str | None = None  # the Hub repo the configuration belongs to, when known


def _read_config_json(path: Path) -> dict[str, Any]:
    from entrenar_cli.model_config import read_config_file

    return read_config_file(path)  # the same checks as training: file and key named, exit 2


# llama.cpp architecture name -> (transformers model_type, architectures entry)
_GGUF_ARCHS: dict[str, tuple[str, str]] = {
    "llama": ("llama", "LlamaForCausalLM"),
    "mistral": ("mistral", "MistralForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
}


def open_gguf(path: Path) -> Any:
    """A ``gguf.GGUFReader`` over the whole file: header, metadata and tensor table are parsed, so a
    file truncated anywhere fails here with its name (training uses this check too)."""
    try:
        from gguf import GGUFReader
    except ImportError as exc:  # pragma: no cover - gguf is a dependency
        raise EntrenarError("reading .gguf files needs the 'gguf' package", hint="pip install gguf") from exc
    try:
        return GGUFReader(str(path))
    except Exception as exc:  # noqa: BLE001 - any parse failure means an unusable file
        raise ModelError(f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc})",
                         hint="the file is damaged or incomplete (truncated download?): download it again") from None


def gguf_config(path: Path) -> dict[str, Any]:
    """A transformers-style config from a GGUF file's metadata (no tensor data is read).

    Llama-family architectures are mapped directly from ``gguf.GGUFReader`` fields; any other
    architecture goes through transformers' own GGUF config loader.
    """
    reader = open_gguf(path)

    def get(key: str, default: Any = None) -> Any:
        f = reader.fields.get(key)
        if f is None:
            return default
        try:
            return f.contents()
        except Exception:  # noqa: BLE001 - older gguf versions
            return default

    arch = get("general.architecture")
    if arch not in _GGUF_ARCHS:
        return _gguf_config_via_transformers(path, arch)
    model_type, cls = _GGUF_ARCHS[arch]
    heads = int(get(f"{arch}.attention.head_count"))
    hidden = int(get(f"{arch}.embedding_length"))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = get(f"{arch}.vocab_size") or (len(tokens.data) if tokens is not None else None)
    tensor_names = {t.name for t in reader.tensors}
    config: dict[str, Any] = {
        "architectures": [cls],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": int(get(f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(get(f"{arch}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get(f"{arch}.attention.head_count_kv", heads)),
        "max_position_embeddings": int(get(f"{arch}.context_length", 2048)),
        "rms_norm_eps": float(get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(get(f"{arch}.rope.freq_base", 10000.0)),
        "vocab_size": int(vocab) if vocab is not None else None,
        "tie_word_embeddings": "output.weight" not in tensor_names,
    }
    head_dim = get(f"{arch}.attention.key_length") or get(f"{arch}.rope.dimension_count")
    if head_dim and int(head_dim) != hidden // heads:
        config["head_dim"] = int(head_dim)
    if config["vocab_size"] is None:
        raise ModelError(f"{path}: GGUF metadata has no vocabulary size")
    return config


def _gguf_config_via_transformers(path: Path, arch: Any) -> dict[str, Any]:
    try:
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        config = load_gguf_checkpoint(str(path), return_tensors=False)["config"]
    except Exception as exc:  # noqa: BLE001
        raise ModelError(
            f"{path}: GGUF architecture {arch!r} is not supported for estimates ({type(exc).__name__}: {exc})",
            hint="estimate the original Hugging Face model directory or repo id instead",
        ) from None
    return dict(config)


def _looks_like_path(model: str) -> bool:
    return model.startswith((".", "/", "~")) or model.endswith((".gguf", ".json")) or "\\" in model


def resolve_config(model: str, revision: str | None = None, token: str | None = None) -> dict[str, Any]:
    """The config.json dict of a local directory, a local config.json or .gguf file, or a Hub repo id."""
    path = Path(model).expanduser()
    if path.is_dir():
        cfg = path / "config.json"
        if not cfg.is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return gguf_config(ggufs[0])
            raise UsageError(
                f"{model}: no config.json in this directory",
                hint="pass a Hugging Face model directory (with config.json), a .gguf file, or a Hub repo id",
            )
        return _read_config_json(cfg)
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return gguf_config(path)
        if path.suffix.lower() == ".json":
            return _read_config_json(path)
        raise UsageError(
            f"{model}: not a model directory, config.json or .gguf file",
            hint="pass the model's directory (with config.json), its config.json, or a .gguf file",
        )
    if _looks_like_path(model):
        raise UsageError(f"{model}: no such file or directory")
    try:
        from entrenar_cli.hub import fetch_config_json
    except ImportError as exc:
        raise EntrenarError(
            f"cannot look up Hub model {model!r}: the Hub fetcher is not available ({exc})",
            hint="pass a local model directory instead",
        ) from None
    return fetch_config_json(model, revision=revision, token=token)


def split_spec(spec: str) -> tuple[str, str | None]:
    """'llama:7b' / 'llama 7b' -> ('llama', '7b'); anything else -> (spec, None)."""
    for sep in (":", " "):
        if sep in spec.strip():
            fam, _, size = spec.strip().partition(sep)
            if catalogue.is_family(fam) and size.strip():
                return fam, size.strip()
    return spec, None


def resolve_model(
    model: str, size: str | None = None, *, revision: str | None = None, token: str | None = None
) -> ResolvedModel:
    """Catalogue first (FAMILY [SIZE]), then a local path, then a Hub repo id.

    A name that is neither a family, a path nor an ``org/name`` id is an unknown family: the error
    lists the catalogue (exit code 2).
    """
    if size is None:
        model, size = split_spec(model)
    if size is not None:
        if not catalogue.is_family(model) and Path(model).expanduser().exists():
            raise UsageError(f"SIZE ({size!r}) only applies to catalogue families, not to the path {model!r}")
        entry = catalogue.lookup(model, size)  # raises with the known families and sizes
        return ResolvedModel(entry.config_copy(), entry.display_name, "catalogue", entry.repo)
    path = Path(model).expanduser()
    if path.exists() or _looks_like_path(model):
        config = resolve_config(model)
        from_gguf = path.suffix.lower() == ".gguf" or (path.is_dir() and not (path / "config.json").exists())
        source = "gguf" if from_gguf else "local"
        return ResolvedModel(config, model, source)
    if catalogue.is_family(model):
        entry = catalogue.lookup(model, None)
        return ResolvedModel(entry.config_copy(), entry.display_name, "catalogue", entry.repo)
    if "/" not in model:
        catalogue.lookup(model, None)  # unknown family: raises, listing the known ones
    return ResolvedModel(resolve_config(model, revision, token), model, "hub", model)
