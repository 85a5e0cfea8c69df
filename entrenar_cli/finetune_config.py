"""The design document's fine-tuning API: ``FineTuneConfig`` builders and ``estimate_memory``.

    lora = LoRAConfig.builder().rank(64).alpha(16.0).target_modules(["q_proj", "v_proj"]).build()
    cfg = (FineTuneConfig.builder("meta-llama/Llama-2-7b-hf")
           .method(FineTuneMethod.QLoRA(lora, bits=4))
           .learning_rate(1e-4)
           .mixed_precision(MixedPrecision.BF16)
           .build())
    req = cfg.estimate_memory(7_000_000_000)
    print(f"{req.total_bytes / 1e9:.1f} GB, {req.savings_percent:.0f}% less than full fine-tuning")

``estimate_memory`` runs the same model as ``entrenar estimate`` (:func:`entrenar_cli.memory.estimate_training`):
give it a config.json dict for an exact answer; a bare parameter count is answered with the
catalogue architecture nearest in size (named in ``requirement.reference_model``); no argument
resolves the builder's ``model_id`` (catalogue name, local directory, or Hub config.json).

Also re-exported: :class:`~entrenar_cli.memory.MemoryEstimate` (``from_architecture``, ``fits_in``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from entrenar_cli import lora_defaults
from entrenar_cli.errors import UsageError
from entrenar_cli.memory import Architecture, MemoryEstimate, TrainingEstimate

__all__ = [
    "Architecture",
    "FineTuneConfig",
    "FineTuneConfigBuilder",
    "FineTuneMethod",
    "LoRAConfig",
    "LoRAConfigBuilder",
    "MemoryEstimate",
    "MemoryRequirement",
    "MixedPrecision",
]


class MixedPrecision(str, enum.Enum):
    """Training precision: fp32, or 16-bit mixed precision."""

    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"


@dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapter settings (Hu et al. 2021); defaults from :mod:`entrenar_cli.lora_defaults`,
    the same ones the YAML schema, training and ``entrenar estimate`` use."""

    rank: int = lora_defaults.RANK
    alpha: float = lora_defaults.ALPHA
    target_modules: list[str] | str | None = None  # None: lora_defaults.default_targets(model_type)
    dropout: float = lora_defaults.DROPOUT

    @staticmethod
    def builder() -> "LoRAConfigBuilder":
        return LoRAConfigBuilder()

    def validate(self) -> "LoRAConfig":
        """Raise UsageError listing every invalid field (rank > 0, alpha > 0, 0 <= dropout < 1)."""
        problems = []
        if self.rank <= 0:
            problems.append(f"rank must be > 0 (got {self.rank})")
        if self.alpha <= 0:
            problems.append(f"alpha must be > 0 (got {self.alpha})")
        if not 0 <= self.dropout < 1:
            problems.append(f"dropout must be in [0, 1) (got {self.dropout})")
        if problems:
            raise UsageError("invalid LoRA config: " + "; ".join(problems))
        return self


class LoRAConfigBuilder:
    """Fluent builder for :class:`LoRAConfig`."""

    def __init__(self) -> None:
        self._cfg = LoRAConfig()

    def rank(self, r: int) -> "LoRAConfigBuilder":
        self._cfg = replace(self._cfg, rank=int(r))
        return self

    def alpha(self, a: float) -> "LoRAConfigBuilder":
        self._cfg = replace(self._cfg, alpha=float(a))
        return self

    def target_modules(self, modules: list[str] | str) -> "LoRAConfigBuilder":
        self._cfg = replace(self._cfg, target_modules=modules if isinstance(modules, str) else list(modules))
        return self

    def dropout(self, p: float) -> "LoRAConfigBuilder":
        self._cfg = replace(self._cfg, dropout=float(p))
        return self

    def build(self) -> LoRAConfig:
        return self._cfg.validate()


@dataclass(frozen=True)
class FineTuneMethod:
    """Full fine-tuning, LoRA, or QLoRA (LoRA over a 4-bit NF4 base).

    Use ``FineTuneMethod.Full``, ``FineTuneMethod.LoRA(lora_cfg)`` or
    ``FineTuneMethod.QLoRA(lora_cfg, bits=4)``.
    """

    kind: str
    lora: LoRAConfig | None = None
    bits: int | None = None

    Full: ClassVar["FineTuneMethod"]  # set below: the full fine-tuning instance

    @staticmethod
    def LoRA(lora_config: LoRAConfig | None = None) -> "FineTuneMethod":  # noqa: N802 - design-doc name
        return FineTuneMethod("lora", lora_config or LoRAConfig())

    @staticmethod
    def QLoRA(lora_config: LoRAConfig | None = None, bits: int = 4) -> "FineTuneMethod":  # noqa: N802
        if bits != 4:
            raise UsageError(f"QLoRA bits must be 4 (NF4), got {bits}", hint="use LoRA over an 8-bit base elsewhere")
        return FineTuneMethod("qlora", lora_config or LoRAConfig(), bits)


FineTuneMethod.Full = FineTuneMethod("full")


@dataclass(frozen=True)
class MemoryRequirement:
    """What ``FineTuneConfig.estimate_memory`` answers (bytes)."""

    total_bytes: int
    full_finetune_bytes: int  # the same run as full fine-tuning, for comparison
    savings_percent: float
    estimate: TrainingEstimate
    reference_model: str | None = None  # the catalogue model used when only a parameter count was given

    @property
    def breakdown(self) -> dict[str, int]:
        e = self.estimate
        return {
            "weights": e.weights_bytes,
            "gradients": e.gradients_bytes,
            "optimizer": e.optimizer_bytes,
            "activations": e.activations_bytes,
            "logits": e.logits_bytes,
            "teacher": e.teacher_bytes,
        }


@dataclass(frozen=True)
class FineTuneConfig:
    """A fine-tuning run's settings (a subset of the finetune YAML) and its memory estimate."""

    model_id: str
    method: FineTuneMethod = field(default_factory=lambda: FineTuneMethod.Full)
    learning_rate: float = 1e-4
    mixed_precision: MixedPrecision = MixedPrecision.BF16
    batch_size: int = 1
    seq_len: int = 512
    gradient_checkpointing: bool = False
    optimizer: str = "adamw"

    @staticmethod
    def builder(model_id: str) -> "FineTuneConfigBuilder":
        return FineTuneConfigBuilder(model_id)

    def _settings(self) -> dict[str, Any]:
        lora = self.method.lora
        return {
            "method": self.method.kind,
            "rank": lora.rank if lora else lora_defaults.RANK,
            "target_modules": lora.target_modules if lora else None,
            "lora_alpha": lora.alpha if lora else None,
            "lora_dropout": lora.dropout if lora else lora_defaults.DROPOUT,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "dtype": MixedPrecision(self.mixed_precision).value,
            "optimizer": self.optimizer,
            "gradient_checkpointing": self.gradient_checkpointing,
        }

    def estimate_memory(self, model: int | dict[str, Any] | None = None) -> MemoryRequirement:
        """Peak training memory of this run.

        ``model``: a config.json dict (exact), a parameter count (answered for the catalogue
        architecture nearest in size), or None to resolve ``model_id``.
        """
        from entrenar_cli import catalogue, memory

        reference = None
        if model is None:
            config = memory.resolve_model(self.model_id).config
        elif isinstance(model, dict):
            config = model
        else:
            params = int(model)
            if params <= 0:
                raise UsageError(f"parameter count must be > 0 (got {params})")
            causal = [e for e in catalogue.CATALOGUE.values() if e.config.get("architectures", [""])[0].endswith(
                ("ForCausalLM", "LMHeadModel"))]
            entry = min(causal, key=lambda e: abs(e.parameters - params))
            config, reference = entry.config, entry.display_name
        settings = self._settings()
        est = memory.estimate_training(config, **settings)
        full = est if est.method == "full" else memory.estimate_training(config, **{**settings, "method": "full"})
        savings = 100.0 * (1 - est.total_bytes / full.total_bytes) if full.total_bytes else 0.0
        return MemoryRequirement(est.total_bytes, full.total_bytes, savings, est, reference)


class FineTuneConfigBuilder:
    """Fluent builder for :class:`FineTuneConfig` (the design document's ``FineTuneConfig::builder``)."""

    def __init__(self, model_id: str) -> None:
        self._cfg = FineTuneConfig(model_id)

    def method(self, method: FineTuneMethod) -> "FineTuneConfigBuilder":
        self._cfg = replace(self._cfg, method=method)
        return self

    def learning_rate(self, lr: float) -> "FineTuneConfigBuilder":
        self._cfg = replace(self._cfg, learning_rate=float(lr))
        return self

    def mixed_precision(self, precision: MixedPrecision | str) -> "FineTuneConfigBuilder":
        self._cfg = replace(self._cfg, mixed_precision=MixedPrecision(precision))
        return self

    def batch_size(self, n: int) -> "FineTuneConfigBuilder":
        self._cfg = replace(self._cfg, batch_size=int(n))
        return self

    def seq_len(self, n: int) -> "FineTuneConfigBuilder":
        self._cfg = replace(self._cfg, seq_len=int(n))
        return self

    def gradient_checkpointing(self, enabled: bool = True) -> "FineTuneConfigBuilder":
        self._cfg = replace(self._cfg, gradient_checkpointing=bool(enabled))
        return self

    def optimizer(self, name: str) -> "FineTuneConfigBuilder":
        self._cfg = replace(self._cfg, optimizer=name)
        return self

    def build(self) -> FineTuneConfig:
        """Validate and return the config (UsageError listing every problem)."""
        c = self._cfg
        problems = []
        if not 0 < c.learning_rate <= 0.1:
            problems.append(f"learning_rate must be in (0, 0.1] (got {c.learning_rate})")
        if c.batch_size <= 0:
            problems.append(f"batch_size must be > 0 (got {c.batch_size})")
        if c.seq_len <= 0:
            problems.append(f"seq_len must be > 0 (got {c.seq_len})")
        if problems:
            raise UsageError("invalid fine-tuning config: " + "; ".join(problems))
        if c.method.lora is not None:
            c.method.lora.validate()
        return c
