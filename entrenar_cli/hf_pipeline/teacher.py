"""Teachers for the Python API: a frozen transformers model loaded from SafeTensors only.

``SafeTensorsTeacher.from_path(dir)`` loads through the engine's loader (:mod:`entrenar_cli.models`):
the same checks (headers verified, no pickle, no remote code) and the same Auto classes the CLI uses.
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from entrenar_cli import models
from entrenar_cli.errors import ModelError, UsageError
from entrenar_cli.hf_pipeline._api import as_tensor, python_errors
from entrenar_cli.hf_pipeline.memory import MemoryEstimate


class TeacherModel(abc.ABC):
    """What a distillation teacher offers: its size, and logits, hidden states and attention maps."""

    model: nn.Module
    tokenizer: Any
    task: str

    @abc.abstractmethod
    def num_layers(self) -> int: ...

    @abc.abstractmethod
    def hidden_dim(self) -> int: ...

    @abc.abstractmethod
    def memory_estimate(self) -> MemoryEstimate: ...

    @abc.abstractmethod
    def forward(self, input_ids: Any, attention_mask: Any = None) -> Tensor: ...

    @abc.abstractmethod
    def hidden_states(self, input_ids: Any, attention_mask: Any = None) -> list[Tensor]: ...

    @abc.abstractmethod
    def attention_weights(self, input_ids: Any, attention_mask: Any = None) -> list[Tensor]: ...


def _model_dir(path: Path) -> Path:
    """The model directory: ``path`` itself, or the directory of a ``model.safetensors`` file."""
    if path.is_file():
        if path.suffix != ".safetensors":
            raise UsageError(f"{path} is not a .safetensors file",
                             hint="SafeTensorsTeacher.from_path takes a model directory (with config.json) "
                             "or its .safetensors file")
        return path.parent
    if not path.exists():
        raise UsageError(f"teacher path not found: {path}",
                         hint="pass SafeTensorsTeacher.from_path(a model directory) or download one with "
                         "HfModelFetcher.new().download_model(repo_id).path")
    return path


class SafeTensorsTeacher(TeacherModel):
    """A frozen teacher loaded from SafeTensors weights (pickle is refused: it can run code)."""

    def __init__(self, model: nn.Module, tokenizer: Any = None, *, task: str = "causal", path: Path | None = None,
                 name: str = ""):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.task = task
        self.path = path
        self.name = name or (str(path) if path else type(model).__name__)

    @classmethod
    @python_errors
    def from_path(cls, path: str | Path, *, dtype: torch.dtype = torch.float32) -> "SafeTensorsTeacher":
        """Load the model directory ``path`` (or the directory of ``path``, a ``.safetensors`` file).

        Raises an EntrenarError when the directory holds only pickle weights, has no config.json,
        or a weight file is damaged.
        """
        directory = _model_dir(Path(path).expanduser())
        safe = sorted(directory.glob("*.safetensors"))
        pickled = sorted(f.name for f in directory.iterdir() if f.suffix in models.PICKLE_SUFFIXES)
        if not safe and pickled:
            raise ModelError(
                f"{directory} has only pickle weights ({', '.join(pickled)}); they can execute code when loaded",
                hint="SafeTensorsTeacher loads SafeTensors only: convert the weights to .safetensors "
                "(e.g. model.save_pretrained(dir, safe_serialization=True) in a trusted environment)",
            )
        loc = models.locate(str(directory), allow_pickle=False)  # verifies every SafeTensors header
        return cls._load(loc, dtype)

    @classmethod
    @python_errors
    def from_source(cls, source: Any, *, dtype: torch.dtype = torch.float32) -> "SafeTensorsTeacher":
        """Load a config's teacher section (a local directory, a Hub repo id, or a GGUF file)."""
        if getattr(source, "allow_pickle", False):
            raise UsageError("SafeTensorsTeacher loads SafeTensors only, but the teacher allows pickle",
                             hint="leave allow_pickle off for the teacher")
        return cls._load(models.open_source(source), dtype)

    @classmethod
    def _load(cls, loc: models.ModelLocation, dtype: torch.dtype) -> "SafeTensorsTeacher":
        config = models.read_config(loc)
        task = models.task_of(config)
        model = models.load_model(loc, task=task, dtype=dtype)
        try:
            tokenizer = models.load_tokenizer(loc)
        except ModelError:
            tokenizer = None  # a model without tokenizer files still works on token ids
        return cls(model, tokenizer, task=task, path=loc.path, name=loc.name)

    # ---- facts ---------------------------------------------------------------------------------

    def num_layers(self) -> int:
        return models.num_layers(self.model)

    def hidden_dim(self) -> int:
        return models.hidden_size(self.model)

    def vocab_size(self) -> int:
        return models.vocab_of(self.model)

    def memory_estimate(self) -> MemoryEstimate:
        """Weight memory per storage format, from the estimator and this model's config."""
        return MemoryEstimate.from_config(self.model.config.to_dict())

    # ---- inference -----------------------------------------------------------------------------

    def _run(self, input_ids: Any, attention_mask: Any, **flags: bool) -> Any:
        ids = as_tensor(input_ids, torch.long)
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        device = next(self.model.parameters()).device
        kwargs: dict[str, Any] = {"input_ids": ids.to(device), **flags}
        if attention_mask is not None:
            kwargs["attention_mask"] = as_tensor(attention_mask, torch.long).reshape(ids.shape).to(device)
        with torch.no_grad():
            return self.model(**kwargs)

    def forward(self, input_ids: Any, attention_mask: Any = None) -> Tensor:
        """Logits ``[batch, seq, vocab]`` (``input_ids``: tensor or nested lists of token ids)."""
        out = self._run(input_ids, attention_mask)
        logits = getattr(out, "logits", None)
        if logits is None:
            raise ModelError(f"{self.name} has no language-model head, so it returns no logits",
                             hint="use teacher.hidden_states(input_ids) for encoders without a head")
        return logits

    __call__ = forward

    def hidden_states(self, input_ids: Any, attention_mask: Any = None) -> list[Tensor]:
        """Per-block outputs ``[batch, seq, hidden]``: index ``i`` is block ``i`` and ``-1`` the embedding
        output (the layer-mapping convention of ``with_progressive``)."""
        from entrenar_cli.objectives import block_outputs

        out = self._run(input_ids, attention_mask, output_hidden_states=True)
        return block_outputs(out.hidden_states)

    def attention_weights(self, input_ids: Any, attention_mask: Any = None) -> list[Tensor]:
        """Per-layer attention maps ``[batch, heads, seq, seq]`` (computed with eager attention)."""
        previous = getattr(self.model.config, "_attn_implementation", None)
        switch = previous not in (None, "eager") and hasattr(self.model, "set_attn_implementation")
        if switch:
            self.model.set_attn_implementation("eager")
        try:
            out = self._run(input_ids, attention_mask, output_attentions=True)
        finally:
            if switch:
                self.model.set_attn_implementation(previous)
        attentions = getattr(out, "attentions", None)
        if not attentions or attentions[0] is None:
            raise ModelError(f"{self.name} returned no attention maps")
        return list(attentions)

    def __repr__(self) -> str:
        return f"SafeTensorsTeacher({self.name!r}, layers={self.num_layers()}, hidden_dim={self.hidden_dim()})"


__all__ = ["SafeTensorsTeacher", "TeacherModel"]
