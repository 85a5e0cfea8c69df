"""Plumbing shared by the facade: ``X.new(...)``, errors that name Python arguments, schema defaults.

The facade states no default of its own: every default is read from the pydantic schema
(:mod:`entrenar_cli.config.schema`), so the Python API and the YAML/CLI can never disagree.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from entrenar_cli.errors import ConfigError, EntrenarError

F = TypeVar("F", bound=Callable[..., Any])


class New:
    """``X.new(a, b)`` is ``X(a, b)``: the document's ``X::new(a, b)``."""

    @classmethod
    def new(cls, *args: Any, **kwargs: Any) -> Any:
        return cls(*args, **kwargs)


class hybridmethod:  # noqa: N801 - used like classmethod
    """A method that works on the class (``X.with_token(t)`` builds one) and on an instance (a copy)."""

    def __init__(self, on_class: Callable[..., Any], on_instance: Callable[..., Any]):
        self.on_class = on_class
        self.on_instance = on_instance
        functools.update_wrapper(self, on_instance)  # type: ignore[arg-type]

    def __get__(self, obj: Any, owner: type) -> Callable[..., Any]:
        if obj is None:
            return functools.partial(self.on_class, owner)
        return functools.partial(self.on_instance, obj)


def schema_default(model: type[BaseModel], name: str) -> Any:
    """The default the schema gives ``model.name`` (default_factory included)."""
    info = model.model_fields[name]
    return info.get_default(call_default_factory=True)


def field_description(model: type[BaseModel] | BaseModel, name: str) -> str:
    cls = model if isinstance(model, type) else type(model)
    return (cls.model_fields[name].description or "").rstrip(".")


def set_field(section: BaseModel, name: str, value: Any, arg: str) -> None:
    """Assign through the schema's validation; a bad value is a ConfigError naming ``arg``."""
    try:
        setattr(section, name, value)
    except ValidationError as exc:
        raise config_error(exc, arg, section, name) from None


def config_error(exc: ValidationError, arg: str, model: Any = None, name: str | None = None) -> ConfigError:
    """A pydantic error as one ConfigError whose message and hint name the Python call."""
    problems = []
    for err in exc.errors():
        msg = str(err.get("msg", "invalid value"))
        msg = msg.removeprefix("Value error, ")
        problems.append(msg)
    hint = None
    if model is not None and name is not None:
        desc = field_description(model, name)
        hint = f"{arg}: {desc}" if desc else None
    return ConfigError(f"{arg}: " + "; ".join(problems), hint=hint, problems=problems)


# CLI flags and YAML keys in messages of the shared code -> what a Python caller passes instead
_FLAG_TO_PYTHON = [
    (re.compile(r"set allow_pickle: true \(--allow-pickle\)"), "pass allow_pickle=True"),
    (re.compile(r"(add |pass )?--allow-pickle"), "use FetchOptions.allow_pickle(True)"),
    (re.compile(r"(pass )?--token( with a token)?"), r"use HfModelFetcher.with_token(token)\2"),
    (re.compile(r"--cache-dir"), "FetchOptions.cache_dir(path)"),
    (re.compile(r"--local-dir"), "FetchOptions.local_dir(path)"),
    (re.compile(r"--format pytorch"), "FetchOptions.format(WeightFormat.PyTorch)"),
    (re.compile(r"--format safetensors"), "FetchOptions.format(WeightFormat.SafeTensors)"),
    (re.compile(r"--format"), "FetchOptions.format(...)"),
    (re.compile(r"--include"), "FetchOptions.patterns(...)"),
    (re.compile(r"--revision"), "FetchOptions.revision(...)"),
    (re.compile(r"--quantize"), "Exporter.quantize(...)"),
    (re.compile(r"(pass )?--force( to replace it)?"), r"call Exporter.overwrite(True)\2"),
    (re.compile(r"another -o path"), "another Exporter(out) path"),
    (re.compile(r"--resume"), "the same TrainerConfig"),
    (re.compile(r"--overwrite"), "DistillationTrainer.save(dir, overwrite=True)"),
    (re.compile(r"--split"), "DatasetOptions.split(...)"),
    (re.compile(r"--config"), "DatasetOptions.config(...)"),
    (re.compile(r"--dataset"), "HfDatasetFetcher"),
    (re.compile(r"'entrenar fetch'"), "HfModelFetcher.download_model"),
    (re.compile(r"\bdistillation\.(progressive\.)?layer_mapping"), "TrainerConfig.with_progressive(layer_mapping)"),
    (re.compile(r"\bdistillation\.progressive\b"), "TrainerConfig.with_progressive(...)"),
    (re.compile(r"\bdistillation\.attention\b"), "TrainerConfig.with_attention_transfer(...)"),
    (re.compile(r"\bdistillation\.embedding\b"), "TrainerConfig.with_embedding(...)"),
    (re.compile(r"\bdataset\.path\b"), "Dataset.from_path(path)"),
    (re.compile(r"\bdataset\.name\b"), "Dataset.from_hub(name)"),
    (re.compile(r"\b(training|distillation|dataset)\.(\w+)"), lambda m: _builder_call(m.group(1), m.group(2))),
    (re.compile(r"\bstudent\.init_from_teacher(\.layers)?"), "TrainerConfig(teacher, student=<layers>)"),
]


def _builder_call(section: str, name: str) -> str:
    """The builder method that sets ``section.name``, else the generic ``TrainerConfig.set``."""
    if section == "dataset":
        from entrenar_cli.hf_pipeline.dataset import DatasetOptions

        return f"DatasetOptions.{name}(...)" if hasattr(DatasetOptions, name) else f"dataset {name}"
    from entrenar_cli.hf_pipeline.config import TrainerConfig

    if hasattr(TrainerConfig, name):
        return f"TrainerConfig.{name}(...)"
    return f'TrainerConfig.set("{section}.{name}", ...)'


def pythonize(text: str | None) -> str | None:
    """Rewrite CLI flags and YAML keys in a message into the Python calls that do the same."""
    if text is None:
        return None
    for pattern, repl in _FLAG_TO_PYTHON:
        text = pattern.sub(repl, text)
    return text


def python_errors(fn: F) -> F:
    """Re-raise EntrenarErrors from the shared code with Python arguments in message and hint."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except EntrenarError as exc:
            if getattr(exc, "_pythonized", False):
                raise
            exc.message = pythonize(exc.message) or ""
            exc.hint = pythonize(exc.hint)
            exc.args = (exc.message,)
            exc._pythonized = True  # type: ignore[attr-defined]
            raise

    return wrapper  # type: ignore[return-value]


def as_tensor(data: Any, dtype: Any = None) -> Any:
    """A torch tensor from a tensor, numpy array or (nested) Python list."""
    import torch

    if isinstance(data, torch.Tensor):
        return data if dtype is None else data.to(dtype)
    return torch.as_tensor(data, dtype=dtype)
