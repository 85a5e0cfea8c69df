"""Load what the user wants to export: a model directory, a LoRA adapter (merged) or an APR file.

Safety first: weights stored as pickles (``pytorch_model.bin``, ``adapter_model.bin``) can run
arbitrary code when loaded, so they are refused unless the user passes ``--allow-pickle``;
``trust_remote_code`` is off unless the user opts in.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from entrenar_cli.errors import EXIT_USAGE, ModelError, UsageError
from entrenar_cli.export.weights import TOKENIZER_FILES, ModelWeights, is_causal_lm
from entrenar_cli.model_config import check_with_transformers

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass
class LoadedSource:
    """A model ready to export, plus what the parity check needs."""

    path: Path
    kind: str  # "model-dir" | "lora-adapter" | "apr"
    weights: ModelWeights
    model: Any  # the transformers model (None when an APR file carries no config)
    causal_lm: bool
    tokenizer_dir: Optional[Path]


def load_source(
    path: Path,
    *,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    base: Optional[Path] = None,
    tokenizer: Optional[Path] = None,
) -> LoadedSource:
    """Detect the kind of input and load it; every user-caused problem is a clear error."""
    from entrenar_cli.library_output import quiet_libraries

    quiet_libraries()
    if not path.exists():
        raise UsageError(f"model not found: {path}",
                         hint="pass a model directory, a LoRA adapter directory or an .apr.json file")
    if tokenizer is not None and not tokenizer.is_dir():
        raise UsageError(f"--tokenizer {tokenizer}: not a directory")
    if path.is_file():
        if path.name.endswith((".apr.json", ".apr")):
            return _load_apr(path, tokenizer, trust_remote_code)
        if path.suffix == ".gguf":
            raise UsageError(f"{path} is already GGUF",
                             hint="export from the Hugging Face directory the model was trained in")
        raise UsageError(f"{path} is a file; expected a model directory or an .apr.json file")
    if (path / "adapter_config.json").is_file():
        return _load_adapter(path, base, tokenizer, allow_pickle, trust_remote_code)
    if (path / "config.json").is_file():
        return _load_model_dir(path, tokenizer, allow_pickle, trust_remote_code)
    raise UsageError(
        f"{path} is not a model directory (no config.json or adapter_config.json)",
        hint="point at the directory 'entrenar distill' or 'entrenar finetune' wrote",
    )


def check_weight_files(directory: Path, allow_pickle: bool, stem: str = "model") -> bool:
    """True when the weights are SafeTensors (every header verified: a truncated or damaged file is
    refused, named, before anything loads); pickles only with --allow-pickle, else refuse."""
    from entrenar_cli.hub.verify import verify_safetensors

    try:
        names = sorted(os.listdir(directory))
    except OSError as exc:
        raise UsageError(f"cannot list {directory}: {exc.strerror or exc}", hint="check that you may read it") from None
    safe = [directory / n for n in names if n.endswith(".safetensors")]
    for f in safe:
        try:
            verify_safetensors(f)
        except OSError as exc:
            raise UsageError(f"cannot read the weights {f}: {exc.strerror or exc}",
                             hint="check that the file exists and that you may read it") from None
    if safe:
        return True
    pickles = [n for n in names if Path(n).suffix in PICKLE_SUFFIXES]
    if not pickles:
        raise ModelError(f"no {stem} weights in {directory} (no .safetensors file)",
                         hint="point at the directory that holds the weights next to config.json",
                         exit_code=EXIT_USAGE)
    if not allow_pickle:
        raise UsageError(
            f"{directory} has only pickle weights ({', '.join(pickles[:3])}); loading a pickle can run arbitrary code",
            hint="pass --allow-pickle only if you trust where the file came from "
            "(the export itself writes SafeTensors)",
        )
    return False


def find_tokenizer_dir(*candidates: Optional[Path]) -> Optional[Path]:
    """The first directory that holds tokenizer files."""
    for cand in candidates:
        if cand is not None and cand.is_dir() and any(
            (cand / f).is_file() for f in TOKENIZER_FILES[:1] + ("tokenizer.model", "vocab.json", "vocab.txt")
        ):
            return cand
    return None


def _auto_class(config: dict[str, Any]) -> Any:
    from transformers import AutoModel, AutoModelForCausalLM

    return AutoModelForCausalLM if is_causal_lm(config) else AutoModel


def _read_json(path: Path) -> dict[str, Any]:
    """config.json / adapter_config.json, parsed and checked (file and key named on failure, exit 2)."""
    from entrenar_cli.model_config import read_config_file

    return read_config_file(path)


def _optional_json(path: Path) -> Any:
    """Metadata files are a bonus: an unreadable one is skipped, not fatal."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


_SUMMARY_KEYS = ("run", "status", "steps", "total_steps", "tokens", "precision", "teacher", "student", "student_before")


def _training_info(directory: Path) -> dict[str, Any]:
    """Training facts found next to the weights: the summary.json `entrenar distill`/`finetune`
    write, a training.json, and the step/epoch of a Hugging Face trainer_state.json."""
    info: dict[str, Any] = {}
    for summary_dir in (directory, directory.parent):  # an adapter lives in <run>/adapter
        summary = summary_dir / "summary.json"
        if summary.is_file():
            data = _optional_json(summary)
            if isinstance(data, dict) and "run" in data:
                info.update({k: data[k] for k in _SUMMARY_KEYS if k in data})
                break
    own = directory / "training.json"
    if own.is_file():
        data = _optional_json(own)
        if isinstance(data, dict):
            info.update(data)
    state = directory / "trainer_state.json"
    if state.is_file():
        data = _optional_json(state)
        for key in ("global_step", "epoch", "best_metric"):
            if isinstance(data, dict) and data.get(key) is not None:
                info.setdefault(key, data[key])
    return info


def _from_pretrained(auto: Any, where: str, *, use_safetensors: bool, trust_remote_code: bool) -> Any:
    try:
        return auto.from_pretrained(
            where, dtype="auto", use_safetensors=use_safetensors, trust_remote_code=trust_remote_code
        ).eval()
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise UsageError(
                f"{where} needs custom code from its repository to load",
                hint="pass --trust-remote-code only if you trust that code",
            ) from None
        if "Unrecognized model" in str(exc) or "model_type" in str(exc):
            raise ModelError(f"{where}/config.json: transformers cannot build a model from it ({exc})",
                             hint="check model_type in config.json", exit_code=EXIT_USAGE) from None
        raise ModelError(f"cannot load the model in {where}: {exc}") from None
    except (OSError, RuntimeError) as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot load the model in {where}: {text}",
                         hint="check that the weights are complete and match config.json") from None
    except (TypeError, KeyError, AttributeError, IndexError, OverflowError, ZeroDivisionError) as exc:
        raise ModelError(f"{where}/config.json: transformers cannot build a model from it "
                         f"({type(exc).__name__}: {exc})",
                         hint="check model_type and the sizes in config.json", exit_code=EXIT_USAGE) from None


def _load_model_dir(path: Path, tokenizer: Optional[Path], allow_pickle: bool, trust_remote_code: bool) -> LoadedSource:
    config = _read_json(path / "config.json")
    check_with_transformers(config, path / "config.json")
    if config.get("quantization_config"):
        raise ModelError(
            f"{path} holds quantized weights ({_quant_method(config['quantization_config'])})",
            hint="export the unquantized model (merge QLoRA adapters into the full-precision base)",
        )
    safe = check_weight_files(path, allow_pickle)
    auto = _auto_class(config)
    model = _from_pretrained(auto, str(path), use_safetensors=safe, trust_remote_code=trust_remote_code)
    tok_dir = tokenizer or find_tokenizer_dir(path)
    weights = ModelWeights.from_model(
        model, name=path.resolve().name, source=str(path), tokenizer_dir=tok_dir, training=_training_info(path)
    )
    return LoadedSource(path, "model-dir", weights, model, is_causal_lm(weights.config or {}), tok_dir)


def _quant_method(q: Any) -> str:
    return str(q.get("quant_method", "?")) if isinstance(q, dict) else str(q)


def _load_adapter(
    path: Path, base: Optional[Path], tokenizer: Optional[Path], allow_pickle: bool, trust_remote_code: bool
) -> LoadedSource:
    """Load the base model in its stored precision, apply the adapter and merge it into the weights."""
    adapter_cfg = _read_json(path / "adapter_config.json")
    base_ref = str(base) if base is not None else adapter_cfg.get("base_model_name_or_path")
    if not base_ref:
        raise UsageError(f"{path}/adapter_config.json names no base model", hint="pass --base DIR")
    if base is not None and not base.is_dir():
        raise UsageError(f"--base {base}: not a directory")
    check_weight_files(path, allow_pickle, stem="adapter")
    base_dir = Path(base_ref) if Path(base_ref).is_dir() else None
    if base_dir is not None:
        base_config = _read_json(base_dir / "config.json")
        check_with_transformers(base_config, base_dir / "config.json")
        safe_base = check_weight_files(base_dir, allow_pickle)
    else:
        # a Hub id: transformers resolves it (cache or download); the adapter says what task it is
        causal = adapter_cfg.get("task_type") == "CAUSAL_LM"
        base_config, safe_base = {"architectures": ["BaseForCausalLM"] if causal else []}, True
    from peft import PeftModel

    auto = _auto_class(base_config)
    model = _from_pretrained(auto, base_ref, use_safetensors=safe_base, trust_remote_code=trust_remote_code)
    try:
        peft_model = PeftModel.from_pretrained(model, str(path))
    except Exception as exc:  # shape mismatch, unknown target modules: the adapter does not fit the base
        raise ModelError(
            f"cannot apply the adapter {path} to {base_ref}: {exc}",
            hint="pass --base DIR with the model the adapter was trained on",
        ) from None
    merged = peft_model.merge_and_unload().eval()
    training = {
        "method": "lora",
        "base_model": base_ref,
        "lora_r": adapter_cfg.get("r"),
        "lora_alpha": adapter_cfg.get("lora_alpha"),
        "target_modules": adapter_cfg.get("target_modules"),
        **_training_info(path),
    }
    tok_dir = tokenizer or find_tokenizer_dir(path, base_dir)
    weights = ModelWeights.from_model(
        merged, name=path.resolve().name, source=str(path), tokenizer_dir=tok_dir, training=training
    )
    return LoadedSource(path, "lora-adapter", weights, merged, is_causal_lm(weights.config or {}), tok_dir)


def _load_apr(path: Path, tokenizer: Optional[Path], trust_remote_code: bool) -> LoadedSource:
    from entrenar_cli.export.apr import read_apr

    weights = read_apr(path)
    weights.metadata.source = str(path)
    if tokenizer is not None:
        weights.tokenizer_dir = tokenizer
    model = None
    if weights.config is not None:
        try:
            model = weights.to_model(trust_remote_code=trust_remote_code)
        except ValueError as exc:
            raise ModelError(f"{path}: {exc}") from None
    causal = is_causal_lm(weights.config or {}) if weights.config else False
    return LoadedSource(path, "apr", weights, model, causal, weights.tokenizer_source())
