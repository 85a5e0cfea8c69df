"""Checks of a model's ``config.json`` before transformers builds anything from it.

transformers trusts its config: ``"num_hidden_layers": "six"`` or ``"vocab_size": -1`` surface as a
``TypeError`` or a negative-dimension error deep inside a model constructor, which the user cannot
act on. :func:`check_config` names the file and the key instead, with exit code 2 (the file is the
user's input). It knows the common keys by name and by naming pattern, so it covers every
architecture, not a list of known models; it imports nothing heavy (``entrenar estimate`` uses it).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from entrenar_cli.errors import EXIT_USAGE, ModelError

MAX_DIM = 2**31 - 1  # no tensor dimension or layer count is larger (torch indexes with int64, but nothing is this big)

# sizes and counts: a whole number > 0 (or a list of them, for per-layer values), or null
_POSITIVE = frozenset({
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings",
    "n_layer", "n_head", "n_embd", "n_positions", "d_model", "num_layers", "num_heads",
    "intermediate_size", "num_key_value_heads", "n_inner", "n_ctx", "d_ff", "d_kv", "ffn_dim",
    "encoder_ffn_dim", "decoder_ffn_dim", "num_local_experts", "num_experts_per_tok",
})
_NON_NEGATIVE = frozenset({"type_vocab_size", "head_dim"})  # 0: "derive it" in some families
_POSITIONS = frozenset({"max_position_embeddings", "n_positions"})  # compared, never a shape: 2048.0 is fine
# other counts and sizes, by naming pattern: never text (some use -1 or true/false as special values)
_COUNT_PATTERN = re.compile(r"^(num|n)_[a-z0-9_]+$|_(size|dim)$")
# real numbers by naming pattern: finite, never text
_REAL_PATTERN = re.compile(r"(_eps|epsilon|_theta|_range|dropout|_pdrop|_prob|_factor|_scale|_multiplier)$")
_BOOLS = frozenset({"tie_word_embeddings", "use_cache", "is_decoder", "is_encoder_decoder"})
_STRINGS = frozenset({"hidden_act", "activation_function", "torch_dtype", "dtype"})
_TOKEN_ID = re.compile(r"_token_ids?$")
_OPAQUE = frozenset({"quantization_config", "auto_map", "id2label", "label2id", "task_specific_params"})


def config_error(path: Path | str, message: str, hint: str | None = None) -> ModelError:
    """A ModelError about the user's config.json: exit code 2, the file named first."""
    return ModelError(f"{path}: {message}",
                      hint=hint or "fix the value in config.json (it must describe the weights next to it)",
                      exit_code=EXIT_USAGE)


def _kind(value: Any) -> str:
    return "null" if value is None else "true/false" if isinstance(value, bool) else type(value).__name__


def _is_whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_value(path: Path | str, key: str, value: Any, top: bool) -> None:
    leaf = key.rsplit(".", 1)[-1]
    shown = f"{key!r} is {value!r}" if not isinstance(value, (dict, list)) else f"{key!r} is a {_kind(value)}"
    items = value if isinstance(value, list) else [value]
    if leaf == "model_type" and top:
        if not (isinstance(value, str) and value):
            raise config_error(path, f"{shown}: expected the architecture's name, such as \"llama\" or \"bert\"")
    elif leaf == "architectures":
        if value is not None and not (isinstance(value, list) and all(isinstance(a, str) and a for a in value)):
            raise config_error(path, f"{shown}: expected a list of class names such as [\"LlamaForCausalLM\"]")
    elif leaf in _STRINGS:
        if value is not None and not isinstance(value, str):
            raise config_error(path, f"{shown}: expected a string")
    elif leaf in _BOOLS:
        if value is not None and not isinstance(value, bool):
            raise config_error(path, f"{shown}: expected true or false")
    elif _TOKEN_ID.search(leaf):
        if not all(v is None or _is_whole(v) for v in items):
            raise config_error(path, f"{shown}: expected a token id (a whole number), a list of them, or null")
    elif leaf in _POSITIVE or leaf in _NON_NEGATIVE:
        low = 1 if leaf in _POSITIVE else 0
        def whole(v: Any) -> bool:
            return _is_whole(v) or (leaf in _POSITIONS and isinstance(v, float) and v.is_integer())

        if not all(v is None or (whole(v) and low <= v <= MAX_DIM) for v in items) or items == []:
            raise config_error(path, f"{shown}: expected a whole number between {low} and {MAX_DIM}")
    elif _REAL_PATTERN.search(leaf):
        for v in items:
            if isinstance(v, str):
                raise config_error(path, f"{shown}: expected a number")
            if isinstance(v, float) and not math.isfinite(v):
                raise config_error(path, f"{shown}: numbers must be finite")
    elif _COUNT_PATTERN.search(leaf):
        if any(isinstance(v, str) or (_is_whole(v) and abs(v) > MAX_DIM) for v in items):
            raise config_error(path, f"{shown}: expected a whole number")


def _walk(path: Path | str, data: dict[str, Any], prefix: str, depth: int) -> None:
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            # sub-configs (text_config, vision_config, rope_scaling): same rules, a bounded depth;
            # quantization settings and code maps follow other conventions
            if depth < 4 and key not in _OPAQUE:
                _walk(path, value, f"{name}.", depth + 1)
            continue
        _check_value(path, name, value, depth == 0)


def check_config(data: Any, path: Path | str) -> dict[str, Any]:
    """``data`` (a parsed config.json) when its common keys have usable types and values, else a
    ModelError (exit 2) naming ``path`` and the key."""
    if not isinstance(data, dict):
        raise config_error(path, f"expected a JSON object of settings ({{\"model_type\": ...}}), got a {_kind(data)}",
                           hint="config.json must be the Hugging Face model configuration saved with the weights")
    _walk(path, data, "", 0)
    return data


def read_config_file(path: Path) -> dict[str, Any]:
    """Parse and check a config.json; every failure names the file (unreadable, not JSON, bad values)."""
    import json

    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise config_error(path, f"not UTF-8 text (byte {exc.start})",
                           hint="config.json must be a JSON text file") from None
    except OSError as exc:
        raise ModelError(f"cannot read {path}: {exc.strerror or exc}",
                         hint="check that the file exists and that you may read it", exit_code=EXIT_USAGE) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise config_error(path, f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}",
                           hint="config.json must be valid JSON") from None
    except RecursionError:
        raise config_error(path, "JSON nested too deeply", hint="config.json must be valid JSON") from None
    return check_config(data, path)


def check_with_transformers(data: dict[str, Any], path: Path | str) -> None:
    """Build the architecture's config class from ``data``: transformers checks every field's type
    and the architecture's own rules (hidden size a multiple of the heads, ...). Unknown model
    types are left to the loader, which names them. Imports transformers."""
    from transformers import CONFIG_MAPPING

    model_type = data.get("model_type")
    if model_type not in CONFIG_MAPPING:
        return
    try:
        CONFIG_MAPPING[model_type].from_dict(dict(data))
    except Exception as exc:  # noqa: BLE001 - strict-dataclass, Type and Value errors all mean a bad config
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        detail = lines[-1] if lines else type(exc).__name__
        raise config_error(path, f"transformers rejects it: {detail}",
                           hint="fix the value in config.json (it must describe the weights next to it)") from None
